//! virtio-rng (entropy device): fills the driver's buffers from the host's getrandom,
//! at most [`MAX_BYTES_PER_REQUEST`] per request.
//!
//! A request is a chain of device-writable buffers; the used length says how many
//! bytes were filled. A chain with a driver-readable buffer is the wrong direction: it
//! completes with length 0 and nothing written.

use std::io::{self, Write};

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::{DescriptorChain, Queue, Writer};
use vmcraft_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use super::queue::{check_chain, serve_available, ProtocolError};
use super::worker::{spawn_device, Worker};
use super::{ActivateError, ActiveQueues, Interrupt, VirtioDevice, F_EVENT_IDX, F_VERSION_1};

/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 64;
/// The most bytes one request gets.
pub const MAX_BYTES_PER_REQUEST: usize = 64 << 10;

/// The virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    worker: Option<Worker>,
    name: String,
}

impl Rng {
    /// A new device; `name` names its I/O thread.
    pub fn new(name: &str) -> Rng {
        Rng {
            worker: None,
            name: name.to_string(),
        }
    }
}

/// Fill `buf` from the host's getrandom.
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is valid for writes of `rest.len()` bytes, which is all
        // getrandom writes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// Complete one entropy request; returns the bytes written.
pub fn fill_request(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    scratch: &mut [u8],
) -> Result<u32, ProtocolError> {
    check_chain(&chain)?;
    if chain.clone().any(|d| !d.is_write_only()) {
        return Ok(0);
    }
    let mut writer: Writer<'_, _> =
        Writer::new(mem, chain).map_err(ProtocolError::BufferOutsideMemory)?;
    let mut want = writer.available_bytes().min(MAX_BYTES_PER_REQUEST);
    while want > 0 {
        let n = want.min(scratch.len());
        if getrandom(&mut scratch[..n]).is_err() || writer.write_all(&scratch[..n]).is_err() {
            break;
        }
        want -= n;
    }
    Ok(writer.bytes_written() as u32)
}

/// Serve the available requests of `queue` (at most
/// [`SERVE_BUDGET`](super::queue::SERVE_BUDGET) a call, then `requeue` is signalled).
pub fn serve_queue(
    queue: &mut Queue,
    mem: &GuestMemory,
    interrupt: &Interrupt,
    requeue: &EventFd,
    scratch: &mut [u8],
) -> Result<usize, ProtocolError> {
    serve_available(queue, mem, interrupt.queue(0), requeue, |chain| {
        fill_request(chain, mem, scratch)
    })
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_EVENT_IDX
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, mut active: ActiveQueues) -> Result<(), ActivateError> {
        let [mut queue] = active.take_ready()?;
        let (mem, interrupt) = (active.mem.clone(), active.interrupt.clone());
        let requeue = active.requeue(0)?;
        let mut scratch = vec![0u8; 4096];
        let worker = spawn_device(&self.name, active, Vec::new(), move |_, _| {
            serve_queue(&mut queue, &mem, &interrupt, &requeue, &mut scratch).map(drop)
        })?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) {
        self.worker = None;
    }

    fn workers(&self) -> &[Worker] {
        self.worker.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn run(mem: &GuestMemory, descs: &[RawDescriptor]) -> (Result<usize, ProtocolError>, Vec<u32>) {
        let mock = MockSplitQueue::new(mem, 16);
        mock.add_desc_chains(descs, 0).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let interrupt = Interrupt::new().unwrap();
        let mut scratch = vec![0u8; 4096];
        let requeue = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let r = serve_queue(&mut q, mem, &interrupt, &requeue, &mut scratch);
        (r, crate::virtio::test_util::used_lens(mem, &mock))
    }

    use crate::virtio::test_util::desc as d;

    #[test]
    fn buffers_are_filled_up_to_the_cap() {
        let mem = crate::virtio::mmio::tests::memory();
        let (r, lens) = run(
            &mem,
            &[
                d(0x1_0000, 100, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                d(0x2_0000, 28, VRING_DESC_F_WRITE, 0),
            ],
        );
        assert_eq!((r.ok(), lens), (Some(1), vec![128]));
        let mut got = [0u8; 100];
        mem.read_slice(&mut got, GuestAddress(0x1_0000)).unwrap();
        assert!(got.iter().any(|&b| b != 0), "random bytes are not all zero");
        // A request for more than the cap gets the cap.
        let (r, lens) = run(&mem, &[d(0x1_0000, 0x8_0000, VRING_DESC_F_WRITE, 0)]);
        assert_eq!(
            (r.ok(), lens),
            (Some(1), vec![MAX_BYTES_PER_REQUEST as u32])
        );
    }

    #[test]
    fn wrong_direction_gets_nothing_and_broken_chains_need_reset() {
        let mem = crate::virtio::mmio::tests::memory();
        let (r, lens) = run(&mem, &[d(0x1_0000, 64, 0, 0)]);
        assert_eq!((r.ok(), lens), (Some(1), vec![0]));
        let (r, _) = run(
            &mem,
            &[d(0x1_0000, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0)],
        );
        assert!(matches!(r, Err(ProtocolError::UnterminatedChain)), "{r:?}");
        let (r, _) = run(&mem, &[d(0xfff_0000, 64, VRING_DESC_F_WRITE, 0)]);
        assert!(matches!(r, Err(ProtocolError::BufferOutsideMemory(_))));
    }
}
