//! Driver-side sequences against the virtio-mmio transport, table-driven: each case is
//! a list of register accesses with the reads, the device's events and the status
//! expected after each step, named after the statement of virtio 1.2 it checks (see
//! docs/virtio-conformance.md). No KVM: guest memory is a plain mapping.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK, VIRTIO_CONFIG_S_DRIVER as DRV,
    VIRTIO_CONFIG_S_DRIVER_OK as DOK, VIRTIO_CONFIG_S_FEATURES_OK as FOK,
    VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;

use super::mmio::tests::{memory, Probe};
use super::mmio::MmioTransport;
use super::{INT_CONFIG, INT_VRING};

/// One step of a driver's sequence.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Write a 32-bit register.
    W(u32, u32),
    /// Read a 32-bit register and expect this value.
    R(u32, u32),
    /// Expect these bits set in the status register (and NEEDS_RESET as given).
    Status(u32),
    /// Expect the device's event log to end with this entry (prefix match).
    Event(&'static str),
    /// Expect this many activations of the device so far.
    Activations(usize),
    /// Raise interrupt bits from the device side.
    Raise(u32),
}
use Step::*;

const VERSION_1_HI: u32 = 1; // VIRTIO_F_VERSION_1 is bit 32: bit 0 of the high word
const EVENT_IDX_LO: u32 = 1 << 29;
const QUEUE: u64 = 0x1_0000;

/// The steps of setting up queue `index` with `size` entries at `base`, ready.
fn queue_setup(index: u32, size: u32, base: u64) -> Vec<Step> {
    vec![
        W(reg::VIRTIO_MMIO_QUEUE_SEL, index),
        R(reg::VIRTIO_MMIO_QUEUE_READY, 0),
        W(reg::VIRTIO_MMIO_QUEUE_NUM, size),
        W(reg::VIRTIO_MMIO_QUEUE_DESC_LOW, base as u32),
        W(reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, 0),
        W(reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, (base + 0x1000) as u32),
        W(reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0),
        W(reg::VIRTIO_MMIO_QUEUE_USED_LOW, (base + 0x2000) as u32),
        W(reg::VIRTIO_MMIO_QUEUE_USED_HIGH, 0),
        W(reg::VIRTIO_MMIO_QUEUE_READY, 1),
        R(reg::VIRTIO_MMIO_QUEUE_READY, 1),
    ]
}

/// §3.1.1 up to FEATURES_OK, accepting VERSION_1 and the low word `low`.
fn negotiate(low: u32) -> Vec<Step> {
    vec![
        W(reg::VIRTIO_MMIO_STATUS, 0),
        R(reg::VIRTIO_MMIO_STATUS, 0),
        W(reg::VIRTIO_MMIO_STATUS, ACK),
        W(reg::VIRTIO_MMIO_STATUS, ACK | DRV),
        W(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1),
        R(reg::VIRTIO_MMIO_DEVICE_FEATURES, VERSION_1_HI),
        W(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0),
        W(reg::VIRTIO_MMIO_DRIVER_FEATURES, low),
        W(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1),
        W(reg::VIRTIO_MMIO_DRIVER_FEATURES, VERSION_1_HI),
        W(reg::VIRTIO_MMIO_STATUS, ACK | DRV | FOK),
        Status(ACK | DRV | FOK),
    ]
}

fn bring_up() -> Vec<Step> {
    let mut s = negotiate(EVENT_IDX_LO);
    s.extend(queue_setup(0, 16, QUEUE));
    s.extend(queue_setup(1, 8, QUEUE + 0x4000));
    s.push(W(reg::VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK));
    s.push(Status(ACK | DRV | FOK | DOK));
    s.push(Event("activate [16, 8]"));
    s
}

fn cat(parts: Vec<Vec<Step>>) -> Vec<Step> {
    parts.into_iter().flatten().collect()
}

/// Run `steps` on a fresh transport; panics with the case name and step index.
fn run(name: &str, steps: &[Step]) {
    let probe = Probe::default();
    let log = probe.log.clone();
    let mut t = MmioTransport::new(Box::new(probe), memory()).unwrap();
    for (i, step) in steps.iter().enumerate() {
        let at = format!("{name}, step {i} ({step:?})");
        match *step {
            W(off, v) => t.write(u64::from(off), &v.to_le_bytes()),
            R(off, want) => {
                let mut b = [0u8; 4];
                t.read(u64::from(off), &mut b);
                assert_eq!(u32::from_le_bytes(b), want, "{at}");
            }
            Status(want) => {
                let mut b = [0u8; 4];
                t.read(u64::from(reg::VIRTIO_MMIO_STATUS), &mut b);
                assert_eq!(u32::from_le_bytes(b), want, "{at}");
            }
            Event(prefix) => {
                let log = log.lock().unwrap();
                let last = log.last().map(String::as_str).unwrap_or("");
                assert!(last.starts_with(prefix), "{at}: last event {last:?}");
            }
            Activations(n) => {
                let log = log.lock().unwrap();
                let activations = log.iter().filter(|e| e.starts_with("activate")).count();
                assert_eq!(activations, n, "{at}");
            }
            Raise(bits) => t.interrupt().raise(bits),
        }
    }
}

#[test]
fn driver_sequences() {
    let cases: Vec<(&str, Vec<Step>)> = vec![
        (
            "§4.2.2.1 identity: magic, version 2, device and vendor ids",
            vec![
                R(reg::VIRTIO_MMIO_MAGIC_VALUE, 0x7472_6976),
                R(reg::VIRTIO_MMIO_VERSION, 2),
                R(reg::VIRTIO_MMIO_DEVICE_ID, 42),
            ],
        ),
        ("§3.1.1 bring-up: activation only at DRIVER_OK", {
            let mut s = negotiate(EVENT_IDX_LO);
            s.extend(queue_setup(0, 16, QUEUE));
            s.push(Activations(0));
            s.extend(queue_setup(1, 8, QUEUE + 0x4000));
            s.push(Activations(0));
            s.push(W(reg::VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK));
            s.push(Event(
                "activate [16, 8] ready [true, true] features 0x120000000",
            ));
            s
        }),
        (
            "§2.2.1 FEATURES_OK is refused without VERSION_1",
            vec![
                W(reg::VIRTIO_MMIO_STATUS, ACK),
                W(reg::VIRTIO_MMIO_STATUS, ACK | DRV),
                W(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0),
                W(reg::VIRTIO_MMIO_DRIVER_FEATURES, 1),
                W(reg::VIRTIO_MMIO_STATUS, ACK | DRV | FOK),
                Status(ACK | DRV),
            ],
        ),
        (
            "§2.2.1 FEATURES_OK is refused with an unoffered feature",
            cat(vec![
                vec![
                    W(reg::VIRTIO_MMIO_STATUS, ACK),
                    W(reg::VIRTIO_MMIO_STATUS, ACK | DRV),
                ],
                vec![
                    W(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0),
                    W(reg::VIRTIO_MMIO_DRIVER_FEATURES, 0b10),
                    W(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1),
                    W(reg::VIRTIO_MMIO_DRIVER_FEATURES, VERSION_1_HI),
                    W(reg::VIRTIO_MMIO_STATUS, ACK | DRV | FOK),
                    Status(ACK | DRV),
                ],
            ]),
        ),
        (
            "§2.1.2 DRIVER_OK before FEATURES_OK starts nothing",
            vec![
                W(reg::VIRTIO_MMIO_STATUS, ACK),
                W(reg::VIRTIO_MMIO_STATUS, ACK | DRV),
                W(reg::VIRTIO_MMIO_STATUS, ACK | DRV | DOK),
                Status(ACK | DRV),
                Activations(0),
            ],
        ),
        (
            "§4.2.2 QueueReady reads back; 0 while live stops the device",
            cat(vec![
                bring_up(),
                vec![
                    W(reg::VIRTIO_MMIO_QUEUE_SEL, 1),
                    W(reg::VIRTIO_MMIO_QUEUE_READY, 0),
                    R(reg::VIRTIO_MMIO_QUEUE_READY, 0),
                    Event("reset"),
                    W(reg::VIRTIO_MMIO_QUEUE_SEL, 0),
                    R(reg::VIRTIO_MMIO_QUEUE_READY, 1),
                    W(reg::VIRTIO_MMIO_QUEUE_READY, 0),
                    R(reg::VIRTIO_MMIO_QUEUE_READY, 0),
                    W(reg::VIRTIO_MMIO_STATUS, 0),
                    Status(0),
                ],
                bring_up(),
            ]),
        ),
        (
            "§4.2.2 queue registers are ignored while the queue is ready or the device live",
            cat(vec![
                bring_up(),
                vec![
                    W(reg::VIRTIO_MMIO_QUEUE_SEL, 0),
                    W(reg::VIRTIO_MMIO_QUEUE_NUM, 3),
                    W(reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1_0001),
                    Status(ACK | DRV | FOK | DOK),
                    R(reg::VIRTIO_MMIO_QUEUE_READY, 1),
                ],
            ]),
        ),
        (
            "§4.2.2 QueueNum above QueueNumMax: refused at QueueReady, NEEDS_RESET",
            cat(vec![
                negotiate(0),
                vec![
                    W(reg::VIRTIO_MMIO_QUEUE_SEL, 1),
                    R(reg::VIRTIO_MMIO_QUEUE_NUM_MAX, 8),
                    W(reg::VIRTIO_MMIO_QUEUE_NUM, 16),
                    Status(ACK | DRV | FOK),
                    W(reg::VIRTIO_MMIO_QUEUE_READY, 1),
                    R(reg::VIRTIO_MMIO_QUEUE_READY, 0),
                    Status(ACK | DRV | FOK | NEEDS_RESET),
                    R(reg::VIRTIO_MMIO_INTERRUPT_STATUS, INT_CONFIG),
                    W(reg::VIRTIO_MMIO_STATUS, 0),
                    Status(0),
                    R(reg::VIRTIO_MMIO_INTERRUPT_STATUS, 0),
                ],
            ]),
        ),
        (
            "§4.2.2.1 interrupt bits stay until acknowledged, one at a time",
            vec![
                Raise(INT_VRING | INT_CONFIG),
                R(reg::VIRTIO_MMIO_INTERRUPT_STATUS, INT_VRING | INT_CONFIG),
                W(reg::VIRTIO_MMIO_INTERRUPT_ACK, INT_VRING),
                R(reg::VIRTIO_MMIO_INTERRUPT_STATUS, INT_CONFIG),
                W(reg::VIRTIO_MMIO_INTERRUPT_ACK, INT_CONFIG),
                R(reg::VIRTIO_MMIO_INTERRUPT_STATUS, 0),
            ],
        ),
        (
            "§4.2.2.1 reset clears InterruptStatus and every QueueReady",
            cat(vec![
                bring_up(),
                vec![
                    Raise(INT_VRING),
                    W(reg::VIRTIO_MMIO_STATUS, 0),
                    R(reg::VIRTIO_MMIO_INTERRUPT_STATUS, 0),
                    W(reg::VIRTIO_MMIO_QUEUE_SEL, 0),
                    R(reg::VIRTIO_MMIO_QUEUE_READY, 0),
                    W(reg::VIRTIO_MMIO_QUEUE_SEL, 1),
                    R(reg::VIRTIO_MMIO_QUEUE_READY, 0),
                    Event("reset"),
                ],
            ]),
        ),
        (
            "§2.1.2 status bits are not cleared one by one (only a reset clears them)",
            cat(vec![
                bring_up(),
                vec![
                    W(reg::VIRTIO_MMIO_STATUS, ACK | DRV),
                    Status(ACK | DRV | FOK | DOK),
                ],
            ]),
        ),
        (
            "§2.1 the driver sets only its own status bits; others are ignored",
            vec![
                W(reg::VIRTIO_MMIO_STATUS, 0x6501_6500 | ACK),
                Status(ACK),
                W(reg::VIRTIO_MMIO_STATUS, ACK | NEEDS_RESET),
                Status(ACK),
            ],
        ),
        (
            "§2.2.1 re-negotiation after a reset with a different set",
            cat(vec![
                bring_up(),
                negotiate(0),
                vec![Status(ACK | DRV | FOK)],
            ]),
        ),
        (
            "§4.2.2 a selected queue that does not exist reads as absent",
            vec![
                W(reg::VIRTIO_MMIO_QUEUE_SEL, 7),
                R(reg::VIRTIO_MMIO_QUEUE_NUM_MAX, 0),
                R(reg::VIRTIO_MMIO_QUEUE_READY, 0),
                W(reg::VIRTIO_MMIO_QUEUE_READY, 1),
                R(reg::VIRTIO_MMIO_QUEUE_READY, 0),
            ],
        ),
    ];
    for (name, steps) in &cases {
        run(name, steps);
    }
}
