//! A virtio device written outside vmcraft's crates, with only their public API: a
//! console-type device (virtio ID 3, a receive and a transmit queue) that prints what
//! the guest transmits and answers a greeting with "ping". vmcraft's virtio-console test
//! guest drives it: it greets, waits for "ping" and answers "got: ping".
//!
//! ```text
//! cargo run --release --example custom-device
//! ```

use std::error::Error;
use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use vmcraft::builder::MachineBuilder;
use vmcraft::devices::debug_exit;
use vmcraft::devices::virtio::queue::{serve_available, ProtocolError};
use vmcraft::devices::virtio::virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vmcraft::devices::virtio::worker::{spawn_device, Token, Worker};
use vmcraft::devices::virtio::{
    ActivateError, ActiveQueues, EventFd, Interrupt, VirtioDevice, F_VERSION_1,
};
use vmcraft::memory::GuestMemory;
use vmcraft::vcpu::{StopReason, VcpuConfig};
use vmcraft_guest_kit::Guest;

/// The transmit queue's index (the receive queue is 0).
const TX: usize = 1;

/// The device: a worker thread while the driver has it running.
#[derive(Default)]
struct Pinger {
    worker: Option<Worker>,
}

/// Print each transmitted buffer; a greeting earns a "ping" in `pending`. Serving
/// stops after a bounded number of buffers and signals `requeue` (the queue's own
/// notifier), so a driver that never stops sending cannot keep this thread forever.
fn transmit(
    tx: &mut Queue,
    mem: &GuestMemory,
    irq: &Interrupt,
    requeue: &EventFd,
    pending: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    serve_available(tx, mem, irq.queue(1), requeue, |chain| {
        let mut text = Vec::new();
        let copy = |source| ProtocolError::BufferCopy {
            what: "greeting",
            source,
        };
        Reader::new(mem, chain)
            .map_err(ProtocolError::BufferOutsideMemory)?
            .read_to_end(&mut text)
            .map_err(copy)?;
        print!("guest says: {}", String::from_utf8_lossy(&text));
        if text.starts_with(b"hello") {
            pending.extend_from_slice(b"ping\n");
        }
        Ok(0) // the device writes nothing into transmit buffers
    })
    .map(drop)
}

/// Move `pending` bytes into the receive buffers the guest has posted.
fn receive(
    rx: &mut Queue,
    mem: &GuestMemory,
    irq: &Interrupt,
    pending: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    while !pending.is_empty() {
        let chain = rx.iter(mem).map_err(ProtocolError::Ring)?.next();
        let Some(chain) = chain else { break }; // no buffer yet: wait for the next kick
        let head = chain.head_index();
        let mut writer = Writer::new(mem, chain).map_err(ProtocolError::BufferOutsideMemory)?;
        let n = pending.len().min(writer.available_bytes());
        std::io::Write::write_all(&mut writer, &pending[..n]).map_err(|source| {
            ProtocolError::BufferCopy {
                what: "ping",
                source,
            }
        })?;
        pending.drain(..n);
        rx.add_used(mem, head, n as u32)
            .map_err(ProtocolError::Ring)?;
        irq.signal_queue(0);
    }
    Ok(())
}

impl VirtioDevice for Pinger {
    fn device_type(&self) -> u32 {
        3
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn features(&self) -> u64 {
        F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, mut active: ActiveQueues) -> Result<(), ActivateError> {
        let [mut rx, mut tx] = active.take_ready()?;
        let (mem, irq) = (active.mem.clone(), active.interrupt.clone());
        let requeue = active.requeue(TX)?;
        let mut pending = Vec::new();
        // The handler runs on the device's own thread for every notification; an
        // error marks this device NEEDS_RESET and leaves the rest of the VM alone.
        let worker = spawn_device("pinger", active, Vec::new(), move |_, token| {
            if token == Token::Queue(TX) {
                transmit(&mut tx, &mem, &irq, &requeue, &mut pending)?;
            }
            receive(&mut rx, &mem, &irq, &mut pending)
        })?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) {
        self.worker = None; // stops and joins the thread
    }
    fn workers(&self) -> &[Worker] {
        self.worker.as_slice() // parked, not stopped, for a snapshot
    }
}

fn main() -> Result<ExitCode, Box<dyn Error>> {
    let mut b = MachineBuilder::new(16 << 20, Box::new(std::io::stdout()))?;
    b.add_virtio(Box::new(Pinger::default()))?; // the first window, where the guest looks
    b.load(Guest::VIRTIO_CONSOLE.image())?;
    let machine = b.start(&[VcpuConfig::at(Guest::VIRTIO_CONSOLE.entry(0, 0))])?;
    let outcome = machine.run_for(Duration::from_secs(30))?;
    println!("custom-device: VM stopped: {}", outcome.reason);
    Ok(match outcome.reason {
        StopReason::Device {
            device: debug_exit::NAME,
            code: 0,
        } => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}
