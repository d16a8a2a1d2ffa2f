//! virtio-console with one port: guest output to any writer (stdout, a Unix socket),
//! guest input from any readable fd (stdin, a socket), through the receive queue.
//!
//! Input is never lost: bytes read from the fd wait in a bounded buffer until the
//! driver posts receive buffers; while that buffer is full the fd is not read (the
//! sender blocks). A transmit chain with a device-writable buffer, or a receive chain
//! with a device-readable one, is the wrong direction: it completes with length 0 and
//! nothing is written.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vmcraft_memory::GuestMemory;
use vmcraft_sandbox::ThreadKind;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::queue::{check_chain, serve_available, ProtocolError};
use super::worker::{spawn_device, Token, Worker};
use super::{
    read_config_bytes, ActivateError, ActiveQueues, Interrupt, VirtioDevice, F_EVENT_IDX,
    F_VERSION_1,
};

/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 64;
/// Input bytes held while the driver has no receive buffers.
pub const INPUT_BUFFER: usize = 64 << 10;
/// The receive queue (port 0).
pub const RX_QUEUE: usize = 0;
/// The transmit queue (port 0).
pub const TX_QUEUE: usize = 1;

/// Where console input comes from: a readable fd.
pub trait ConsoleInput: Read + AsRawFd + Send {}
impl<T: Read + AsRawFd + Send> ConsoleInput for T {}

type Output = Arc<Mutex<Box<dyn Write + Send>>>;
type Input = Arc<Mutex<Box<dyn ConsoleInput>>>;

/// The virtio-console device (one port, no multiport).
pub struct Console {
    output: Output,
    input: Option<Input>,
    worker: Option<Worker>,
    name: String,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("name", &self.name)
            .field("has_input", &self.input.is_some())
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console writing guest output to `output` and, if given, feeding `input` to
    /// the guest. `name` names its I/O thread.
    ///
    /// Input that epoll cannot watch (a regular file, `/dev/null`) is read by a relay
    /// thread into a socket the I/O thread watches; its end of file ends the input,
    /// as a closed socket does.
    pub fn new(
        output: Box<dyn Write + Send>,
        input: Option<Box<dyn ConsoleInput>>,
        name: &str,
    ) -> Console {
        let input = input.and_then(|i| match pollable(i, name) {
            Ok(i) => Some(Arc::new(Mutex::new(i))),
            Err(e) => {
                log::warn!("virtio-console {name}: input unusable, console is output only: {e}");
                None
            }
        });
        Console {
            output: Arc::new(Mutex::new(output)),
            input,
            worker: None,
            name: name.to_string(),
        }
    }
}

/// `input` if epoll can watch it, else the read end of a socket pair that a relay
/// thread fills from it.
fn pollable(
    mut input: Box<dyn ConsoleInput>,
    name: &str,
) -> std::io::Result<Box<dyn ConsoleInput>> {
    let probe = Epoll::new()?;
    match probe.ctl(
        ControlOperation::Add,
        input.as_raw_fd(),
        EpollEvent::new(EventSet::IN, 0),
    ) {
        Ok(()) => return Ok(input),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        Err(e) => return Err(e),
    }
    let (ours, mut relay) = std::os::unix::net::UnixStream::pair()?;
    vmcraft_sandbox::spawn(ThreadKind::DeviceIo, &format!("{name}-input"), move || {
        // Ends at the input's end of file (at once for /dev/null) or when the device
        // side is gone; dropping `relay` is the end of file it sees.
        let _ = std::io::copy(&mut input, &mut relay);
    })
    .map_err(io::Error::other)?;
    Ok(Box::new(ours))
}

/// Write the readable bytes of one transmit chain to `out`; returns the used length
/// (always 0: the device writes nothing into transmit buffers).
pub fn transmit(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    out: &mut dyn Write,
) -> Result<u32, ProtocolError> {
    check_chain(&chain)?;
    if chain.clone().any(|d| d.is_write_only()) {
        return Ok(0);
    }
    let mut reader: Reader<'_, _> =
        Reader::new(mem, chain).map_err(ProtocolError::BufferOutsideMemory)?;
    let mut buf = [0u8; 4096];
    loop {
        let n = reader.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        // Output errors (a closed socket) drop the bytes but keep the guest going.
        let _ = out.write_all(&buf[..n]);
    }
    let _ = out.flush();
    Ok(0)
}

/// Receive-side state: bytes waiting for buffers.
#[derive(Debug, Default)]
pub struct Pending {
    bytes: VecDeque<u8>,
}

impl Pending {
    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    /// Room left.
    pub fn room(&self) -> usize {
        INPUT_BUFFER - self.bytes.len()
    }
    /// Queue input bytes (at most [`Pending::room`] are kept; returns how many).
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.room());
        self.bytes.extend(&bytes[..n]);
        n
    }

    /// Move waiting bytes into the receive queue's buffers; returns how many chains
    /// were completed. When bytes are left and no buffer is posted, the driver is
    /// asked to notify (EVENT_IDX) when it adds some.
    pub fn deliver(
        &mut self,
        rx: &mut Queue,
        mem: &GuestMemory,
        interrupt: &Interrupt,
    ) -> Result<usize, ProtocolError> {
        let mut completed = 0;
        while !self.bytes.is_empty() {
            let chain = match rx.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => return Err(ProtocolError::Ring(e)),
            };
            let Some(chain) = chain else {
                if rx.event_idx_enabled()
                    && rx.enable_notification(mem).map_err(ProtocolError::Ring)?
                {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let len = self.fill(chain, mem)?;
            rx.add_used(mem, head, len).map_err(ProtocolError::Ring)?;
            completed += 1;
        }
        if completed > 0 && rx.needs_notification(mem).map_err(ProtocolError::Ring)? {
            interrupt.signal_queue(RX_QUEUE as u16);
        }
        Ok(completed)
    }

    fn fill(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> Result<u32, ProtocolError> {
        check_chain(&chain)?;
        if chain.clone().any(|d| !d.is_write_only()) {
            return Ok(0);
        }
        let mut writer: Writer<'_, _> =
            Writer::new(mem, chain).map_err(ProtocolError::BufferOutsideMemory)?;
        let n = writer.available_bytes().min(self.bytes.len());
        let (a, b) = self.bytes.as_slices();
        let first = n.min(a.len());
        writer
            .write_all(&a[..first])
            .and_then(|()| writer.write_all(&b[..n - first]))
            .map_err(|source| ProtocolError::BufferCopy {
                what: "console input",
                source,
            })?;
        self.bytes.drain(..n);
        Ok(n as u32)
    }
}

struct Serving {
    rx: Queue,
    tx: Queue,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    output: Output,
    input: Option<(Input, RawFd)>,
    pending: Pending,
    input_paused: bool,
    /// The transmit queue's notifier, signalled when serving stops at its budget.
    tx_requeue: EventFd,
}

impl Serving {
    fn on_event(&mut self, epoll: &Epoll, token: Token) -> Result<(), ProtocolError> {
        match token {
            Token::Queue(TX_QUEUE) => {
                let mut out = self.output.lock().unwrap_or_else(|p| p.into_inner());
                let mem = &self.mem;
                serve_available(
                    &mut self.tx,
                    mem,
                    self.interrupt.queue(TX_QUEUE as u16),
                    &self.tx_requeue,
                    |chain| transmit(chain, mem, &mut **out),
                )?;
            }
            Token::Queue(_) => {}
            Token::Fd(_) => self.read_input(epoll),
        }
        self.pending
            .deliver(&mut self.rx, &self.mem, &self.interrupt)?;
        self.pace_input(epoll);
        Ok(())
    }

    fn read_input(&mut self, epoll: &Epoll) {
        let Some((input, fd)) = &self.input else {
            return;
        };
        let mut buf = vec![0u8; self.pending.room().min(16 << 10)];
        if buf.is_empty() {
            return;
        }
        let n = input
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(&mut buf);
        match n {
            Ok(0) | Err(_) => {
                // End of input (or a dead fd): stop watching it.
                let _ = epoll.ctl(ControlOperation::Delete, *fd, EpollEvent::default());
                self.input = None;
            }
            Ok(n) => {
                self.pending.push(&buf[..n]);
            }
        }
    }

    /// Stop reading input while the buffer is full; resume when there is room.
    fn pace_input(&mut self, epoll: &Epoll) {
        let Some((_, fd)) = &self.input else {
            return;
        };
        let full = self.pending.room() == 0;
        if full != self.input_paused {
            let events = if full {
                EventSet::empty()
            } else {
                EventSet::IN
            };
            let token = 2; // the first extra fd after the two queues
            if epoll
                .ctl(
                    ControlOperation::Modify,
                    *fd,
                    EpollEvent::new(events, token),
                )
                .is_ok()
            {
                self.input_paused = full;
            }
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_EVENT_IDX
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports (1), emerg_wr: only max_nr_ports is non-zero.
        let mut config = [0u8; 12];
        config[4] = 1;
        read_config_bytes(&config, offset, data)
    }
    fn activate(&mut self, mut active: ActiveQueues) -> Result<(), ActivateError> {
        let [rx, tx] = active.take_ready()?;
        let input = self.input.as_ref().map(|i| {
            let fd = i.lock().unwrap_or_else(|p| p.into_inner()).as_raw_fd();
            (i.clone(), fd)
        });
        let fds = input.iter().map(|(_, fd)| *fd).collect();
        let mut serving = Serving {
            rx,
            tx,
            mem: active.mem.clone(),
            interrupt: active.interrupt.clone(),
            output: self.output.clone(),
            input,
            pending: Pending::default(),
            input_paused: false,
            tx_requeue: active.requeue(TX_QUEUE)?,
        };
        let worker = spawn_device(&self.name, active, fds, move |epoll, token| {
            serving.on_event(epoll, token)
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
    use crate::serial::SharedBuffer;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use crate::virtio::test_util::{desc as d, used_lens as used};

    #[test]
    fn input_epoll_refuses_is_relayed_to_its_end() {
        // /dev/null and regular files cannot be added to an epoll set (EPERM).
        let mut null = pollable(Box::new(std::fs::File::open("/dev/null").unwrap()), "t").unwrap();
        let epoll = Epoll::new().unwrap();
        let watch = EpollEvent::new(EventSet::IN, 0);
        epoll
            .ctl(ControlOperation::Add, null.as_raw_fd(), watch)
            .unwrap();
        let mut buf = Vec::new();
        null.read_to_end(&mut buf).unwrap();
        assert!(buf.is_empty());

        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        std::fs::write(file.as_path(), b"typed ahead").unwrap();
        let f = std::fs::File::open(file.as_path()).unwrap();
        let mut relayed = pollable(Box::new(f), "t").unwrap();
        relayed.read_to_end(&mut buf).unwrap();
        assert_eq!(buf, b"typed ahead");

        // A socket is watched as it is: no relay.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        assert_eq!(pollable(Box::new(a), "t").unwrap().as_raw_fd(), fd);
    }

    #[test]
    fn transmit_writes_the_readable_bytes() {
        let mem = crate::virtio::mmio::tests::memory();
        mem.write_slice(b"hello ", GuestAddress(0x1_0000)).unwrap();
        mem.write_slice(b"world\n", GuestAddress(0x2_0000)).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.add_desc_chains(
            &[
                d(0x1_0000, 6, VRING_DESC_F_NEXT, 1),
                d(0x2_0000, 6, 0, 0),
                d(0x3_0000, 6, VRING_DESC_F_WRITE, 0), // wrong direction: ignored
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let out = SharedBuffer::new();
        let mut w: Box<dyn Write + Send> = Box::new(out.clone());
        let interrupt = Interrupt::new().unwrap();
        let requeue = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let served = serve_available(&mut q, &mem, interrupt.queue(1), &requeue, |c| {
            transmit(c, &mem, &mut *w)
        });
        assert_eq!(served.ok(), Some(2));
        assert_eq!(out.contents(), b"hello world\n");
        assert_eq!(used(&mem, &mock), vec![0, 0]);
    }

    #[test]
    fn input_waits_for_buffers_and_is_split_across_them() {
        let mem = crate::virtio::mmio::tests::memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut rx: Queue = mock.create_queue().unwrap();
        let interrupt = Interrupt::new().unwrap();
        let mut pending = Pending::default();
        pending.push(b"0123456789");
        // No buffers yet: nothing is delivered, nothing lost.
        assert_eq!(pending.deliver(&mut rx, &mem, &interrupt).ok(), Some(0));
        assert_eq!(pending.len(), 10);
        mock.add_desc_chains(
            &[
                d(0x1_0000, 4, VRING_DESC_F_WRITE, 0),
                d(0x2_0000, 4, 0, 0), // wrong direction: completes empty
                d(0x3_0000, 100, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        assert_eq!(pending.deliver(&mut rx, &mem, &interrupt).ok(), Some(3));
        assert!(pending.is_empty());
        assert_eq!(used(&mem, &mock), vec![4, 0, 6]);
        let mut a = [0u8; 4];
        let mut c = [0u8; 6];
        mem.read_slice(&mut a, GuestAddress(0x1_0000)).unwrap();
        mem.read_slice(&mut c, GuestAddress(0x3_0000)).unwrap();
        assert_eq!((&a, &c), (b"0123", b"456789"));
        assert_eq!(
            interrupt.status() & crate::virtio::INT_VRING,
            crate::virtio::INT_VRING
        );
    }

    #[test]
    fn the_input_buffer_is_bounded() {
        let mut p = Pending::default();
        assert_eq!(p.push(&vec![1u8; INPUT_BUFFER + 10]), INPUT_BUFFER);
        assert_eq!(p.room(), 0);
        assert_eq!(p.push(b"x"), 0);
    }
}
