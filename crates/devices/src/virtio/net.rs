//! virtio-net on a frame backend (a [`Tap`](super::tap::Tap), or anything that
//! moves whole Ethernet frames, such as a datagram socket in tests).
//!
//! Features: VERSION_1, EVENT_IDX, MAC and STATUS (link up); no offloads, so every
//! frame carries a zeroed 12-byte `virtio_net_hdr_v1`. One receive and one transmit
//! queue, served on the device's I/O thread together with the backend's fd.
//!
//! With several queue pairs ([`Net::with_queue_pairs`], a backend each: the queues of
//! a multi-queue TAP), the device also offers MQ and CTRL_VQ (virtio 1.2 §5.1.6.5.5):
//! each pair is served by a thread of its own (`<name>-q<pair>`) with its backend, and
//! the control queue (after the last pair) by `<name>-ctrl`, which answers
//! `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` and refuses every other command. Pairs past the
//! number the driver set are not used: their threads leave their backend unread (the
//! host's TAP holds or drops what it steers there, as for a full queue), so a driver
//! that wants every flow should enable every pair, as Linux does with a vCPU per pair.
//!
//! A frame read from the backend is held until the driver posts a receive buffer big
//! enough for it; meanwhile the backend is not read (the host queues or drops, as a
//! real link would). Transmit chains shorter than the header, longer than a 64 KiB
//! frame, or with a device-writable buffer are dropped (completed with length 0).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vmcraft_memory::GuestMemory;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::queue::{check_chain, serve_available, ProtocolError, SERVE_BUDGET};
use super::worker::{spawn_queues, Token, Worker};
use super::{
    read_config_bytes, ActivateError, ActiveQueues, QueueInterrupt, VirtioDevice, F_EVENT_IDX,
    F_VERSION_1,
};
use std::io::{Read, Write};

/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// Size of `virtio_net_hdr_v1`.
pub const HEADER_SIZE: usize = 12;
/// Largest frame (no GSO: a 64 KiB MTU at most).
pub const MAX_FRAME: usize = 65535;
/// Feature bit: the device has a MAC address in its config.
pub const F_MAC: u64 = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
/// Feature bit: the config has a link status.
pub const F_STATUS: u64 = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_STATUS;
/// `VIRTIO_NET_F_CTRL_VQ`: a control queue after the data queues.
pub const F_CTRL_VQ: u64 = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ;
/// `VIRTIO_NET_F_MQ`: several queue pairs, their number set through the control queue.
pub const F_MQ: u64 = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MQ;
/// Most queue pairs a device takes (a thread and a backend each).
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// Entries in the control queue.
pub const CTRL_QUEUE_SIZE: u16 = 64;
/// `VIRTIO_NET_CTRL_MQ`, the multiqueue command class.
const CTRL_MQ: u8 = 4;
/// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`.
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
/// `VIRTIO_NET_OK` and `VIRTIO_NET_ERR`, the command's acknowledgement.
const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;

/// Something that sends and receives whole Ethernet frames through a pollable fd.
/// `recv_frame` must not block: with nothing to read it returns `WouldBlock`.
pub trait FrameIo: AsRawFd + Send {
    /// Read one frame into `buf`; returns its length.
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Send one frame.
    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()>;
}

/// A datagram socket pair's end as a wire (for tests, or a user-space switch on the
/// other end). Each call is non-blocking by itself (`MSG_DONTWAIT`), whatever the
/// socket's mode: no `ioctl` or `fcntl` on the device's thread, which its seccomp
/// filter forbids.
impl FrameIo for UnixDatagram {
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`, which is valid and
        // exclusively borrowed for the call; the fd is this socket's, open while
        // `self` lives.
        let n = unsafe {
            libc::recv(
                self.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        // Never block the device's thread on a peer that does not read: a full queue
        // is `WouldBlock`, and the frame is dropped as a wire would drop it.
        // SAFETY: send reads `frame.len()` bytes from `frame`, valid for the call; the
        // fd is this socket's, open while `self` lives.
        let n = unsafe {
            libc::send(
                self.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(n)
            .map(drop)
            .map_err(|_| io::Error::last_os_error())
    }
}

type Backend = Arc<Mutex<Box<dyn FrameIo>>>;

/// The virtio-net device.
pub struct Net {
    /// A backend per queue pair.
    backends: Vec<Backend>,
    mac: [u8; 6],
    /// rx and tx per pair, then the control queue if there are several pairs.
    queue_sizes: Vec<u16>,
    /// How many pairs the driver uses (VQ_PAIRS_SET), shared with the threads.
    active_pairs: Arc<AtomicU16>,
    workers: Vec<Worker>,
    name: String,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("name", &self.name)
            .field("mac", &self.mac)
            .finish_non_exhaustive()
    }
}

impl Net {
    /// A device on `backend` with MAC address `mac`; `name` names its I/O thread.
    pub fn new(backend: Box<dyn FrameIo>, mac: [u8; 6], name: &str) -> Net {
        Net {
            backends: vec![Arc::new(Mutex::new(backend))],
            mac,
            queue_sizes: vec![QUEUE_SIZE, QUEUE_SIZE],
            active_pairs: Arc::new(AtomicU16::new(1)),
            workers: Vec::new(),
            name: name.to_string(),
        }
    }

    /// A device with a queue pair per backend (1 to [`MAX_QUEUE_PAIRS`]; for a TAP,
    /// the queues of [`Tap::open_queues`](super::tap::Tap::open_queues)); with more
    /// than one it offers MQ and a control queue.
    ///
    /// ```
    /// # use std::os::unix::net::UnixDatagram;
    /// # use vmcraft_devices::virtio::net::{FrameIo, Net};
    /// let ends: Vec<Box<dyn FrameIo>> = (0..2)
    ///     .map(|_| Box::new(UnixDatagram::pair().unwrap().0) as Box<dyn FrameIo>)
    ///     .collect();
    /// let nic = Net::with_queue_pairs(ends, [2, 0, 0, 0, 0, 1], "vnet0").unwrap();
    /// # let _ = nic;
    /// ```
    pub fn with_queue_pairs(
        backends: Vec<Box<dyn FrameIo>>,
        mac: [u8; 6],
        name: &str,
    ) -> io::Result<Net> {
        let pairs = backends.len();
        if pairs == 0 || pairs > usize::from(MAX_QUEUE_PAIRS) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{pairs} queue pairs for virtio-net {name} (1 to {MAX_QUEUE_PAIRS})"),
            ));
        }
        let mut queue_sizes = vec![QUEUE_SIZE; 2 * pairs];
        if pairs > 1 {
            queue_sizes.push(CTRL_QUEUE_SIZE);
        }
        Ok(Net {
            backends: backends
                .into_iter()
                .map(|b| Arc::new(Mutex::new(b)))
                .collect(),
            mac,
            queue_sizes,
            active_pairs: Arc::new(AtomicU16::new(1)),
            workers: Vec::new(),
            name: name.to_string(),
        })
    }

    /// How many queue pairs the device has.
    pub fn queue_pairs(&self) -> u16 {
        self.backends.len() as u16
    }
}

/// Answer one control command (class, command, then its data, in the chain's readable
/// part; the last writable byte takes the acknowledgement): `VQ_PAIRS_SET` with 1 to
/// `max_pairs` pairs is taken into `active`, anything else is refused. Returns the
/// used length (1, the acknowledgement).
pub fn control_command(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    max_pairs: u16,
    active: &AtomicU16,
) -> Result<u32, ProtocolError> {
    check_chain(&chain)?;
    let mut reader: Reader<'_, _> =
        Reader::new(mem, chain.clone()).map_err(ProtocolError::BufferOutsideMemory)?;
    let mut writer: Writer<'_, _> =
        Writer::new(mem, chain).map_err(ProtocolError::BufferOutsideMemory)?;
    if writer.available_bytes() == 0 {
        // Nowhere to acknowledge: nothing done, the chain completed empty.
        return Ok(0);
    }
    let mut command = [0u8; 4];
    let ack = if reader.available_bytes() == 4 && reader.read_exact(&mut command).is_ok() {
        let pairs = u16::from_le_bytes([command[2], command[3]]);
        if command[0] == CTRL_MQ
            && command[1] == CTRL_MQ_VQ_PAIRS_SET
            && (1..=max_pairs).contains(&pairs)
        {
            active.store(pairs, Ordering::SeqCst);
            CTRL_OK
        } else {
            CTRL_ERR
        }
    } else {
        CTRL_ERR
    };
    let skip = writer.available_bytes() - 1;
    if skip > 0 {
        writer = writer
            .split_at(skip)
            .map_err(|source| ProtocolError::BufferCopy {
                what: "control acknowledgement",
                source: io::Error::other(source.to_string()),
            })?;
    }
    writer
        .write_all(&[ack])
        .map_err(|source| ProtocolError::BufferCopy {
            what: "control acknowledgement",
            source,
        })?;
    Ok(1)
}

/// Send the frame in one transmit chain; returns the used length (0).
pub fn transmit(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    backend: &mut dyn FrameIo,
    buf: &mut [u8],
) -> Result<u32, ProtocolError> {
    check_chain(&chain)?;
    if chain.clone().any(|d| d.is_write_only()) {
        return Ok(0);
    }
    let mut reader: Reader<'_, _> =
        Reader::new(mem, chain).map_err(ProtocolError::BufferOutsideMemory)?;
    let total = reader.available_bytes();
    if !(HEADER_SIZE..=HEADER_SIZE + MAX_FRAME).contains(&total) || buf.len() < total {
        return Ok(0);
    }
    if reader.read_exact(&mut buf[..total]).is_err() {
        return Ok(0);
    }
    // A send error (the link is down, the host queue is full) drops the frame, as
    // a wire would.
    let _ = backend.send_frame(&buf[HEADER_SIZE..total]);
    Ok(0)
}

/// Put `frame` in one receive chain behind a zeroed header (num_buffers = 1). Returns
/// the used length, or `None` when the chain cannot take it (wrong direction, too
/// small): the chain is then completed empty and the frame waits for the next.
pub fn receive_into(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    frame: &[u8],
) -> Result<Option<u32>, ProtocolError> {
    check_chain(&chain)?;
    if chain.clone().any(|d| !d.is_write_only()) {
        return Ok(None);
    }
    let mut writer: Writer<'_, _> =
        Writer::new(mem, chain).map_err(ProtocolError::BufferOutsideMemory)?;
    if writer.available_bytes() < HEADER_SIZE + frame.len() {
        return Ok(None);
    }
    let mut header = [0u8; HEADER_SIZE];
    header[10] = 1; // num_buffers
    writer
        .write_all(&header)
        .and_then(|()| writer.write_all(frame))
        .map_err(|source| ProtocolError::BufferCopy {
            what: "received frame",
            source,
        })?;
    Ok(Some((HEADER_SIZE + frame.len()) as u32))
}

/// The receive path: frames from the backend into the receive queue.
#[derive(Debug)]
pub struct RxPath {
    frame: Vec<u8>,
    /// Length of a frame read but not yet delivered.
    held: Option<usize>,
}

impl Default for RxPath {
    fn default() -> Self {
        RxPath {
            frame: vec![0u8; MAX_FRAME],
            held: None,
        }
    }
}

impl RxPath {
    /// Whether a frame waits for a receive buffer.
    pub fn holding(&self) -> bool {
        self.held.is_some()
    }

    /// Move frames from `backend` into `rx` until the backend is empty or the driver
    /// has no buffer; returns how many frames were delivered. At most
    /// [`SERVE_BUDGET`] receive chains per call, however fast frames and buffers come:
    /// past that it signals `requeue` (the receive queue's notifier) so that its event
    /// loop calls it again, and returns.
    pub fn pump(
        &mut self,
        rx: &mut Queue,
        mem: &GuestMemory,
        backend: &mut dyn FrameIo,
        interrupt: QueueInterrupt<'_>,
        requeue: &EventFd,
    ) -> Result<usize, ProtocolError> {
        let (mut delivered, mut taken) = (0, 0);
        loop {
            if taken >= SERVE_BUDGET {
                // If the write fails the counter is saturated and the loop wakes anyway.
                let _ = requeue.write(1);
                break;
            }
            let len = match self.held {
                Some(len) => len,
                None => match backend.recv_frame(&mut self.frame) {
                    Ok(len) => {
                        self.held = Some(len);
                        len
                    }
                    // Empty (WouldBlock) or broken: nothing more to deliver now.
                    Err(_) => break,
                },
            };
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
            taken += 1;
            let used = receive_into(chain, mem, &self.frame[..len])?;
            rx.add_used(mem, head, used.unwrap_or(0))
                .map_err(ProtocolError::Ring)?;
            if used.is_some() {
                self.held = None;
                delivered += 1;
            }
        }
        if delivered > 0 && rx.needs_notification(mem).map_err(ProtocolError::Ring)? {
            interrupt.signal();
        }
        Ok(delivered)
    }
}

/// One queue pair's thread.
struct Serving {
    rx: Queue,
    tx: Queue,
    /// The pair's number (its queues are 2 pair and 2 pair + 1).
    pair: u16,
    /// How many pairs the driver uses: past them, the pair is idle.
    active_pairs: Arc<AtomicU16>,
    mem: GuestMemory,
    interrupt: Arc<super::Interrupt>,
    backend: Backend,
    backend_fd: RawFd,
    rx_path: RxPath,
    backend_paused: bool,
    tx_buf: Vec<u8>,
    /// The transmit queue's notifier, signalled when serving stops at its budget.
    tx_requeue: EventFd,
    /// The receive queue's notifier, likewise.
    rx_requeue: EventFd,
}

impl Serving {
    fn on_event(&mut self, epoll: &Epoll, token: Token) -> Result<(), ProtocolError> {
        let mut backend = self.backend.lock().unwrap_or_else(|p| p.into_inner());
        let (rx_index, tx_index) = (2 * self.pair, 2 * self.pair + 1);
        if token == Token::Queue(TX_QUEUE) {
            let mem = &self.mem;
            let buf = &mut self.tx_buf;
            serve_available(
                &mut self.tx,
                mem,
                self.interrupt.queue(tx_index),
                &self.tx_requeue,
                |chain| transmit(chain, mem, &mut **backend, buf),
            )?;
        }
        let in_use = self.pair < self.active_pairs.load(Ordering::SeqCst);
        if in_use {
            self.rx_path.pump(
                &mut self.rx,
                &self.mem,
                &mut **backend,
                self.interrupt.queue(rx_index),
                &self.rx_requeue,
            )?;
        }
        // While a frame waits for a buffer, or the pair is not in use, stop polling
        // the backend.
        let pause = self.rx_path.holding() || !in_use;
        if pause != self.backend_paused {
            let events = if pause {
                EventSet::empty()
            } else {
                EventSet::IN
            };
            if epoll
                .ctl(
                    ControlOperation::Modify,
                    self.backend_fd,
                    EpollEvent::new(events, 2),
                )
                .is_ok()
            {
                self.backend_paused = pause;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn features(&self) -> u64 {
        let mq = if self.backends.len() > 1 {
            F_MQ | F_CTRL_VQ
        } else {
            0
        };
        F_VERSION_1 | F_EVENT_IDX | F_MAC | F_STATUS | mq
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], status (link up), max_virtqueue_pairs.
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&self.mac);
        config[6] = 1;
        config[8..10].copy_from_slice(&self.queue_pairs().to_le_bytes());
        read_config_bytes(&config, offset, data)
    }
    fn activate(&mut self, mut active: ActiveQueues) -> Result<(), ActivateError> {
        // Without MQ the driver has one pair (queues 0 and 1), and the control queue,
        // if it took CTRL_VQ, is queue 2 (§5.1.2); with MQ, the control queue follows
        // every pair. Queues past those are the driver's to leave unused.
        let features = active.driver_features;
        let pairs = if features & F_MQ != 0 {
            self.backends.len()
        } else {
            1
        };
        let control = features & F_CTRL_VQ != 0;
        let used = 2 * pairs + usize::from(control);
        let mut queues = std::mem::take(&mut active.queues);
        queues.truncate(used);
        if queues.len() < used {
            return Err(ActivateError::QueueNotReady(queues.len()));
        }
        if let Some(i) = queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::QueueNotReady(i));
        }
        let mut queues = queues.into_iter();
        let mut workers = Vec::with_capacity(used);
        for pair in 0..pairs {
            let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
                return Err(ActivateError::QueueNotReady(2 * pair));
            };
            let backend = self.backends[pair].clone();
            let backend_fd = backend
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_raw_fd();
            let (rx_index, tx_index) = (2 * pair, 2 * pair + 1);
            let mut serving = Serving {
                rx,
                tx,
                pair: pair as u16,
                active_pairs: self.active_pairs.clone(),
                mem: active.mem.clone(),
                interrupt: active.interrupt.clone(),
                backend,
                backend_fd,
                rx_path: RxPath::default(),
                backend_paused: false,
                tx_buf: vec![0u8; HEADER_SIZE + MAX_FRAME],
                tx_requeue: active.requeue(tx_index)?,
                rx_requeue: active.requeue(rx_index)?,
            };
            // One pair: the device's one I/O thread; several: one per pair.
            let thread = if self.backends.len() == 1 {
                format!("{}-io", self.name)
            } else {
                format!("{}-q{pair}", self.name)
            };
            let notifiers = vec![active.requeue(rx_index)?, active.requeue(tx_index)?];
            workers.push(spawn_queues(
                thread,
                &self.name,
                notifiers,
                active.interrupt.clone(),
                vec![backend_fd],
                move |epoll, token| serving.on_event(epoll, token),
            )?);
        }
        if let Some(mut ctrl) = queues.next() {
            let index = 2 * pairs;
            let (mem, interrupt) = (active.mem.clone(), active.interrupt.clone());
            let requeue = active.requeue(index)?;
            let (max, active_pairs) = (pairs as u16, self.active_pairs.clone());
            let pair_notifiers: Vec<EventFd> = (0..2 * pairs)
                .map(|q| active.requeue(q))
                .collect::<Result<_, _>>()?;
            let serve = move |_: &Epoll, _| {
                let before = active_pairs.load(Ordering::SeqCst);
                serve_available(
                    &mut ctrl,
                    &mem,
                    interrupt.queue(index as u16),
                    &requeue,
                    |c| control_command(c, &mem, max, &active_pairs),
                )?;
                // Pairs taken into use look at their backends again.
                if active_pairs.load(Ordering::SeqCst) > before {
                    for n in &pair_notifiers {
                        let _ = n.write(1);
                    }
                }
                Ok(())
            };
            workers.push(spawn_queues(
                format!("{}-ctrl", self.name),
                &self.name,
                vec![active.requeue(index)?],
                active.interrupt.clone(),
                Vec::new(),
                serve,
            )?);
        }
        self.workers = workers;
        Ok(())
    }
    fn reset(&mut self) {
        self.workers.clear();
        // After a reset the driver starts again on the first pair (§5.1.6.5.5).
        self.active_pairs.store(1, Ordering::SeqCst);
    }

    fn workers(&self) -> &[Worker] {
        &self.workers
    }

    /// With several pairs: how many the driver uses (2 bytes, little-endian). A
    /// single-pair device keeps nothing.
    fn save_state(&self) -> Vec<u8> {
        if self.backends.len() > 1 {
            self.active_pairs
                .load(Ordering::SeqCst)
                .to_le_bytes()
                .to_vec()
        } else {
            Vec::new()
        }
    }

    fn restore_state(
        &mut self,
        state: &[u8],
        _mem: &GuestMemory,
    ) -> Result<(), crate::state::StateError> {
        let bad = |reason: String| crate::state::StateError::new("virtio-net", reason);
        match (self.backends.len(), state) {
            (1, []) => Ok(()),
            (pairs, &[lo, hi]) if pairs > 1 => {
                let used = u16::from_le_bytes([lo, hi]);
                if !(1..=pairs as u16).contains(&used) {
                    return Err(bad(format!("{used} queue pairs in use of {pairs}")));
                }
                self.active_pairs.store(used, Ordering::SeqCst);
                Ok(())
            }
            (pairs, state) => Err(bad(format!(
                "{} bytes of state for a device of {pairs} queue pairs",
                state.len()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use crate::virtio::test_util::{desc as d, used_lens as used};
    use crate::virtio::Interrupt;

    /// A control chain: the 2-byte header and `data` at 0x1_0000 (readable), the
    /// acknowledgement byte at 0x3_0000 (writable).
    fn control(mem: &GuestMemory, mock: &MockSplitQueue<'_, GuestMemory>, command: &[u8]) {
        mem.write_slice(command, GuestAddress(0x1_0000)).unwrap();
        mem.write_slice(&[0xee], GuestAddress(0x3_0000)).unwrap();
        mock.add_desc_chains(
            &[
                d(0x1_0000, command.len() as u32, VRING_DESC_F_NEXT, 1),
                d(0x3_0000, 1, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
    }

    #[test]
    fn the_control_queue_sets_the_pairs_in_use_and_refuses_everything_else() {
        let mem = crate::virtio::mmio::tests::memory();
        let active = AtomicU16::new(1);
        let ack = |command: &[u8]| {
            let mock = MockSplitQueue::new(&mem, 16);
            control(&mem, &mock, command);
            let mut q: Queue = mock.create_queue().unwrap();
            let chain = q.iter(&mem).unwrap().next().unwrap();
            assert_eq!(control_command(chain, &mem, 4, &active).unwrap(), 1);
            let mut b = [0u8];
            mem.read_slice(&mut b, GuestAddress(0x3_0000)).unwrap();
            b[0]
        };
        // VQ_PAIRS_SET 3 of 4: taken.
        assert_eq!(ack(&[4, 0, 3, 0]), CTRL_OK);
        assert_eq!(active.load(Ordering::SeqCst), 3);
        // 0 pairs, more than the device has, another class or command, a short or
        // long command: refused, nothing changed.
        for bad in [
            &[4u8, 0, 0, 0][..],
            &[4, 0, 5, 0],
            &[4, 0, 0, 1],
            &[0, 0, 1, 0], // VIRTIO_NET_CTRL_RX (not offered)
            &[4, 1, 2, 0], // RSS_CONFIG (not offered)
            &[4, 0],
            &[4, 0, 2, 0, 0],
        ] {
            assert_eq!(ack(bad), CTRL_ERR, "{bad:?}");
            assert_eq!(active.load(Ordering::SeqCst), 3, "{bad:?}");
        }
    }

    #[test]
    fn several_pairs_offer_mq_and_a_control_queue_and_say_how_many() {
        let ends = |n: usize| -> Vec<Box<dyn FrameIo>> {
            (0..n)
                .map(|_| Box::new(UnixDatagram::pair().unwrap().0) as Box<dyn FrameIo>)
                .collect()
        };
        let mut one = Net::with_queue_pairs(ends(1), [2, 0, 0, 0, 0, 1], "n").unwrap();
        assert_eq!(one.features() & (F_MQ | F_CTRL_VQ), 0);
        assert_eq!(one.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        assert!(one.save_state().is_empty());
        let mut four = Net::with_queue_pairs(ends(4), [2, 0, 0, 0, 0, 1], "n").unwrap();
        assert_eq!(four.features() & (F_MQ | F_CTRL_VQ), F_MQ | F_CTRL_VQ);
        assert_eq!(four.queue_max_sizes().len(), 9);
        assert_eq!(four.queue_max_sizes()[8], CTRL_QUEUE_SIZE);
        let mut pairs = [0u8; 2];
        four.read_config(8, &mut pairs);
        assert_eq!(u16::from_le_bytes(pairs), 4);
        // The pairs in use are saved and checked on restore.
        let mem = crate::virtio::mmio::tests::memory();
        four.active_pairs.store(3, Ordering::SeqCst);
        let saved = four.save_state();
        four.reset();
        assert_eq!(four.active_pairs.load(Ordering::SeqCst), 1);
        four.restore_state(&saved, &mem).unwrap();
        assert_eq!(four.active_pairs.load(Ordering::SeqCst), 3);
        assert!(four.restore_state(&[5, 0], &mem).is_err());
        assert!(four.restore_state(&[], &mem).is_err());
        assert!(one.restore_state(&[1, 0], &mem).is_err());
        for n in [0, usize::from(MAX_QUEUE_PAIRS) + 1] {
            assert!(Net::with_queue_pairs(ends(n), [2, 0, 0, 0, 0, 1], "n").is_err());
        }
    }

    #[test]
    fn a_peer_that_never_reads_drops_frames_instead_of_blocking_the_device() {
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut backend: Box<dyn FrameIo> = Box::new(ours);
            // Far more than a socket buffer holds; `theirs` never reads.
            let refused = (0..4096)
                .filter(|_| backend.send_frame(&[0u8; 1514]).is_err())
                .count();
            done.send(refused).unwrap();
        });
        let refused = finished
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("send_frame blocked on a full peer");
        assert!(refused > 0, "some frames must have been dropped");
        drop(theirs);
    }

    #[test]
    fn transmitted_frames_lose_their_header_and_bad_chains_are_dropped() {
        let mem = crate::virtio::mmio::tests::memory();
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        let mut backend: Box<dyn FrameIo> = Box::new(ours);
        mem.write_slice(&[0u8; HEADER_SIZE], GuestAddress(0x1_0000))
            .unwrap();
        mem.write_slice(b"frame-one", GuestAddress(0x2_0000))
            .unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.add_desc_chains(
            &[
                d(0x1_0000, HEADER_SIZE as u32, VRING_DESC_F_NEXT, 1),
                d(0x2_0000, 9, 0, 0),
                d(0x1_0000, 4, 0, 0), // shorter than the header
                d(0x2_0000, 20, VRING_DESC_F_WRITE, 0), // wrong direction
            ],
            0,
        )
        .unwrap();
        let mut tx: Queue = mock.create_queue().unwrap();
        let interrupt = Interrupt::new().unwrap();
        let mut buf = vec![0u8; HEADER_SIZE + MAX_FRAME];
        let requeue = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let served = serve_available(&mut tx, &mem, interrupt.queue(1), &requeue, |c| {
            transmit(c, &mem, &mut *backend, &mut buf)
        });
        assert_eq!(served.ok(), Some(3));
        assert_eq!(used(&mem, &mock), vec![0, 0, 0]);
        let mut got = [0u8; 64];
        assert_eq!(theirs.recv(&mut got).unwrap(), 9);
        assert_eq!(&got[..9], b"frame-one");
        theirs.set_nonblocking(true).unwrap();
        assert!(theirs.recv(&mut got).is_err(), "only one frame went out");
    }

    /// A driver that keeps posting receive buffers too small for the frame waiting
    /// gets a bounded turn: the device thread returns to its loop, asked back.
    #[test]
    fn a_turn_of_the_receive_path_is_bounded() {
        use crate::virtio::queue::SERVE_BUDGET;
        let mem = crate::virtio::mmio::tests::memory();
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        let mut backend: Box<dyn FrameIo> = Box::new(ours);
        theirs.send(b"a frame no buffer takes").unwrap();
        let mock = MockSplitQueue::new(&mem, 2048);
        let small = d(0x2_0000, 8, VRING_DESC_F_WRITE, 0);
        mock.add_desc_chains(&vec![small; SERVE_BUDGET + 10], 0)
            .unwrap();
        let mut rx: Queue = mock.create_queue().unwrap();
        // The mock lays a 2048-entry used ring over its available ring: put it apart.
        rx.set_used_ring_address(Some(0x1_0000), Some(0));
        let interrupt = Interrupt::new().unwrap();
        let requeue = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut path = RxPath::default();
        let pump = |path: &mut RxPath, rx: &mut Queue, backend: &mut dyn FrameIo| {
            path.pump(rx, &mem, backend, interrupt.queue(0), &requeue)
                .unwrap()
        };
        assert_eq!(pump(&mut path, &mut rx, &mut *backend), 0);
        assert_eq!(rx.next_used(), SERVE_BUDGET as u16, "one turn's chains");
        assert_eq!(requeue.read().unwrap(), 1, "the event loop is asked back");
        assert!(path.holding());
        assert_eq!(pump(&mut path, &mut rx, &mut *backend), 0);
        assert_eq!(rx.next_used(), SERVE_BUDGET as u16 + 10);
        assert!(requeue.read().is_err(), "no buffer left: no requeue");
    }

    #[test]
    fn received_frames_wait_for_a_buffer_big_enough() {
        let mem = crate::virtio::mmio::tests::memory();
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        let mut backend: Box<dyn FrameIo> = Box::new(ours);
        theirs.send(b"first frame").unwrap();
        theirs.send(b"second").unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut rx: Queue = mock.create_queue().unwrap();
        let interrupt = Interrupt::new().unwrap();
        let requeue = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut path = RxPath::default();
        // No buffers: the first frame is held, not lost.
        assert_eq!(
            path.pump(&mut rx, &mem, &mut *backend, interrupt.queue(0), &requeue)
                .ok(),
            Some(0)
        );
        assert!(path.holding());
        mock.add_desc_chains(
            &[
                d(0x1_0000, 8, VRING_DESC_F_WRITE, 0),    // too small
                d(0x2_0000, 1526, 0, 0),                  // wrong direction
                d(0x3_0000, 1526, VRING_DESC_F_WRITE, 0), // takes the first frame
                d(0x4_0000, 1526, VRING_DESC_F_WRITE, 0), // takes the second
            ],
            0,
        )
        .unwrap();
        assert_eq!(
            path.pump(&mut rx, &mem, &mut *backend, interrupt.queue(0), &requeue)
                .ok(),
            Some(2)
        );
        assert!(!path.holding());
        assert_eq!(used(&mem, &mock), vec![0, 0, 23, 18]);
        let mut got = [0u8; 23];
        mem.read_slice(&mut got, GuestAddress(0x3_0000)).unwrap();
        assert_eq!(got[10], 1, "num_buffers");
        assert_eq!(&got[HEADER_SIZE..], b"first frame");
    }

    #[test]
    fn config_has_the_mac_and_link_up() {
        let (ours, _theirs) = UnixDatagram::pair().unwrap();
        let net = Net::new(Box::new(ours), [2, 0, 0, 0, 0, 7], "n");
        let mut cfg = [0u8; 8];
        net.read_config(0, &mut cfg);
        assert_eq!(cfg, [2, 0, 0, 0, 0, 7, 1, 0]);
    }
}
