//! The virtio-vsock device on its three queues (rx 0, tx 1, event 2), served on one
//! I/O thread by the [`Muxer`] of its connections, with host streams from its
//! [`Door`].
//!
//! * **tx**: each chain is one packet; its header is checked
//!   ([`PacketHeader::check_from_guest`]); a header that names the wrong context ids
//!   is dropped, any other refused header (and a payload over [`MAX_PAYLOAD`]) gets
//!   the guest a reset of the connection it names. A chain too short for a header is
//!   completed and dropped. Nothing the guest sends ends the device.
//! * **rx**: a chain is taken only when the muxer has a packet that fits it; the
//!   chain is otherwise left for later.
//! * **event**: after a [`restore_state`](VirtioDevice::restore_state) (a restored
//!   snapshot, a migration's destination) the device owes the guest
//!   `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the guest drops the connections it had
//!   (their host streams did not come along) and reads its context id again (a clone
//!   may be given a new one); new connections work at once.
//!
//! At a snapshot the I/O thread parks between wake-ups; the connections of the VM
//! that goes on are untouched (what the host sent waits in its socket, what the guest
//! sent waits in the muxer), and the restored copy starts with none.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::ByteValued;
use vmcraft_memory::GuestMemory;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::door::{Door, DoorConnector};
use super::muxer::{Limits, Muxer, Watch};
use super::wire::{valid_guest_cid, HeaderError, PacketHeader, EVENT_TRANSPORT_RESET, HEADER_SIZE};
use crate::virtio::queue::{check_chain, serve_available, ProtocolError, SERVE_BUDGET};
use crate::virtio::worker::{spawn_device, Token, Worker};
use crate::virtio::{
    read_config_bytes, ActivateError, ActiveQueues, Interrupt, VirtioDevice, F_EVENT_IDX,
    F_VERSION_1,
};

/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// The event queue.
pub const EVENT_QUEUE: usize = 2;
/// Entries in the rx and tx queues.
pub const QUEUE_SIZE: u16 = 256;
/// Entries in the event queue.
pub const EVENT_QUEUE_SIZE: u16 = 16;
/// The largest payload of one packet, either way (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: usize = 64 << 10;

/// The device's queues.
const QUEUES: usize = 3;

/// Host streams are registered on the I/O thread's epoll with this added to their
/// descriptor (they come as [`Token::Fd`] past the door's eventfd).
const STREAM_TOKEN: usize = 1 << 32;

/// The virtio-vsock device. See the [module documentation](self).
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    door: Arc<Door>,
    limits: Limits,
    name: String,
    worker: Option<Worker>,
    /// A transport reset is owed to the guest (set by a restore).
    reset_owed: Arc<AtomicBool>,
}

/// A context id a guest may not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("context id {0} is reserved (a guest's is 3 to 4294967294)")]
pub struct InvalidCid(pub u64);

impl Vsock {
    /// The device of the guest with context id `guest_cid`, its host side through
    /// `door`, within `limits`; `name` names its I/O thread.
    pub fn new(
        guest_cid: u64,
        door: Arc<Door>,
        limits: Limits,
        name: &str,
    ) -> Result<Vsock, InvalidCid> {
        if !valid_guest_cid(guest_cid) {
            return Err(InvalidCid(guest_cid));
        }
        Ok(Vsock {
            guest_cid,
            door,
            limits,
            name: name.to_string(),
            worker: None,
            reset_owed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The guest's context id.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, EVENT_QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_EVENT_IDX
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data)
    }
    fn activate(&mut self, mut active: ActiveQueues) -> Result<(), ActivateError> {
        let [rx, tx, event] = active.take_ready()?;
        let mut serving = Serving {
            rx,
            tx,
            event,
            mem: active.mem.clone(),
            interrupt: active.interrupt.clone(),
            muxer: Muxer::new(self.guest_cid, self.limits),
            connector: self.door.connector(),
            door: self.door.clone(),
            guest_cid: self.guest_cid,
            reset_owed: self.reset_owed.clone(),
            tx_requeue: active.requeue(TX_QUEUE)?,
            rx_requeue: active.requeue(RX_QUEUE)?,
            packet: vec![0u8; MAX_PAYLOAD],
        };
        let door_fd = self.door.accepted_ready().as_raw_fd();
        let worker = spawn_device(&self.name, active, vec![door_fd], move |epoll, token| {
            serving.on_event(epoll, token)
        })?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) {
        // The connections go with the thread; the driver starts afresh.
        self.worker = None;
        self.reset_owed.store(false, Ordering::SeqCst);
    }
    fn workers(&self) -> &[Worker] {
        self.worker.as_slice()
    }
    /// The context id the guest had (8 bytes, little-endian).
    fn save_state(&self) -> Vec<u8> {
        self.guest_cid.to_le_bytes().to_vec()
    }
    /// Any saved context id is taken (a clone may get a new one: the guest reads it
    /// again at the transport reset this owes it).
    fn restore_state(
        &mut self,
        state: &[u8],
        _mem: &GuestMemory,
    ) -> Result<(), crate::state::StateError> {
        let saved: [u8; 8] = state.try_into().map_err(|_| {
            crate::state::StateError::new(
                "virtio-vsock",
                format!("{} bytes of state, not a context id's 8", state.len()),
            )
        })?;
        let saved = u64::from_le_bytes(saved);
        if saved != self.guest_cid {
            log::info!(
                "vsock: restored with context id {} (saved with {saved})",
                self.guest_cid
            );
        }
        self.reset_owed.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// The I/O thread's state.
struct Serving {
    rx: Queue,
    tx: Queue,
    event: Queue,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    muxer: Muxer<UnixStream>,
    connector: DoorConnector,
    door: Arc<Door>,
    guest_cid: u64,
    reset_owed: Arc<AtomicBool>,
    tx_requeue: EventFd,
    rx_requeue: EventFd,
    packet: Vec<u8>,
}

impl Serving {
    fn on_event(&mut self, epoll: &Epoll, token: Token) -> Result<(), ProtocolError> {
        match token {
            Token::Queue(TX_QUEUE) => self.serve_tx()?,
            Token::Fd(0) => {
                for client in self.door.take_accepted() {
                    self.muxer.new_client(client);
                }
            }
            Token::Fd(i) if i >= STREAM_TOKEN => {
                let fd = (i - STREAM_TOKEN) as RawFd;
                self.muxer.host_writable(fd);
                self.muxer.host_readable(fd);
            }
            // rx and event: buffers were added, served below.
            _ => {}
        }
        self.post_transport_reset()?;
        self.apply_watch(epoll);
        self.pump_rx()?;
        self.apply_watch(epoll);
        Ok(())
    }

    /// Watch the host streams the muxer opened, stop watching those it closed.
    fn apply_watch(&mut self, epoll: &Epoll) {
        for watch in self.muxer.take_watch() {
            match watch {
                Watch::Add(fd) => {
                    let events = EventSet::IN
                        | EventSet::OUT
                        | EventSet::EDGE_TRIGGERED
                        | EventSet::READ_HANG_UP;
                    // The worker gives tokens past its queues as `Token::Fd(token - queues)`.
                    let data = (QUEUES + STREAM_TOKEN + fd as usize) as u64;
                    if let Err(e) =
                        epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, data))
                    {
                        log::warn!("vsock: cannot watch a host stream: {e}");
                    }
                }
                // Closed already (its epoll entry went with it), or its number taken
                // by a stream added after it: either way nothing to undo.
                Watch::Remove(fd) => {
                    let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                }
            }
        }
    }

    /// The guest's packets, each to the muxer.
    fn serve_tx(&mut self) -> Result<(), ProtocolError> {
        let Serving {
            tx,
            mem,
            interrupt,
            muxer,
            connector,
            packet,
            guest_cid,
            tx_requeue,
            ..
        } = self;
        serve_available(
            tx,
            mem,
            interrupt.queue(TX_QUEUE as u16),
            tx_requeue,
            |chain| {
                from_guest(chain, mem, *guest_cid, packet, muxer, connector)?;
                Ok(0)
            },
        )?;
        Ok(())
    }

    /// Packets for the guest into its rx buffers, as many as it has and the muxer
    /// has (at most [`SERVE_BUDGET`] a call).
    fn pump_rx(&mut self) -> Result<(), ProtocolError> {
        let (mut taken, mut delivered) = (0, 0);
        let mem = &self.mem;
        loop {
            if taken >= SERVE_BUDGET {
                let _ = self.rx_requeue.write(1);
                break;
            }
            if !self.muxer.has_work() {
                break;
            }
            let chain = self.rx.iter(mem).map_err(ProtocolError::Ring)?.next();
            let Some(chain) = chain else {
                if self.rx.event_idx_enabled()
                    && self
                        .rx
                        .enable_notification(mem)
                        .map_err(ProtocolError::Ring)?
                {
                    continue;
                }
                break;
            };
            taken += 1;
            let head = chain.head_index();
            check_chain(&chain)?;
            let mut writer = Writer::new(mem, chain).map_err(ProtocolError::BufferOutsideMemory)?;
            let room = writer.available_bytes();
            if room < HEADER_SIZE {
                log::warn!("vsock: an rx buffer of {room} bytes, too small for a header: dropped");
                self.rx
                    .add_used(mem, head, 0)
                    .map_err(ProtocolError::Ring)?;
                delivered += 1;
                continue;
            }
            let room = (room - HEADER_SIZE).min(MAX_PAYLOAD);
            let Some((header, n)) = self.muxer.to_guest(&mut self.packet[..room]) else {
                // Nothing fits now: the buffer stays the guest's.
                self.rx.go_to_previous_position();
                break;
            };
            writer
                .write_all(header.as_slice())
                .and_then(|()| writer.write_all(&self.packet[..n]))
                .map_err(|source| ProtocolError::BufferCopy {
                    what: "vsock packet",
                    source,
                })?;
            self.rx
                .add_used(mem, head, (HEADER_SIZE + n) as u32)
                .map_err(ProtocolError::Ring)?;
            delivered += 1;
        }
        if delivered > 0 {
            crate::virtio::DeviceCounters::add(&self.interrupt.counters().chains, delivered);
            if self
                .rx
                .needs_notification(mem)
                .map_err(ProtocolError::Ring)?
            {
                self.interrupt.queue(RX_QUEUE as u16).signal();
            }
        }
        Ok(())
    }

    /// The transport reset owed after a restore, once the guest has an event buffer.
    fn post_transport_reset(&mut self) -> Result<(), ProtocolError> {
        if !self.reset_owed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mem = &self.mem;
        let chain = self.event.iter(mem).map_err(ProtocolError::Ring)?.next();
        let Some(chain) = chain else {
            if self.event.event_idx_enabled() {
                self.event
                    .enable_notification(mem)
                    .map_err(ProtocolError::Ring)?;
            }
            return Ok(());
        };
        let head = chain.head_index();
        check_chain(&chain)?;
        let mut writer = Writer::new(mem, chain).map_err(ProtocolError::BufferOutsideMemory)?;
        let used = if writer.available_bytes() >= 4 {
            writer
                .write_all(&EVENT_TRANSPORT_RESET.to_le_bytes())
                .map_err(|source| ProtocolError::BufferCopy {
                    what: "vsock event",
                    source,
                })?;
            self.reset_owed.store(false, Ordering::SeqCst);
            self.muxer.reset_all();
            4
        } else {
            log::warn!("vsock: an event buffer too small for an event: dropped");
            0
        };
        self.event
            .add_used(mem, head, used)
            .map_err(ProtocolError::Ring)?;
        if self
            .event
            .needs_notification(mem)
            .map_err(ProtocolError::Ring)?
        {
            self.interrupt.queue(EVENT_QUEUE as u16).signal();
        }
        Ok(())
    }
}

/// One packet from the guest's tx queue, to `muxer`: checked, refused with a reset
/// where it names a connection, never an error for what it says (only for a chain
/// outside guest memory).
fn from_guest(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    guest_cid: u64,
    packet: &mut [u8],
    muxer: &mut Muxer<UnixStream>,
    connector: &mut DoorConnector,
) -> Result<(), ProtocolError> {
    check_chain(&chain)?;
    let mut reader = Reader::new(mem, chain).map_err(ProtocolError::BufferOutsideMemory)?;
    let mut header = PacketHeader::default();
    if reader.available_bytes() < HEADER_SIZE || reader.read_exact(header.as_mut_slice()).is_err() {
        log::debug!("vsock: a tx chain too short for a header: dropped");
        return Ok(());
    }
    let room = reader.available_bytes();
    let key = (header.dst_port, header.src_port);
    match header.check_from_guest(guest_cid, room) {
        Ok(()) => {}
        Err(e @ (HeaderError::SourceCid(_) | HeaderError::DestinationCid(_))) => {
            log::debug!("vsock: a packet dropped: {e}");
            return Ok(());
        }
        Err(e) => {
            log::debug!("vsock: a packet refused: {e}");
            muxer.refuse(key);
            return Ok(());
        }
    }
    let len = header.len as usize;
    if len > packet.len() {
        log::debug!("vsock: a packet of {len} bytes (at most {MAX_PAYLOAD}) refused");
        muxer.refuse(key);
        return Ok(());
    }
    if reader.read_exact(&mut packet[..len]).is_err() {
        muxer.refuse(key);
        return Ok(());
    }
    muxer.from_guest(&header, &packet[..len], connector);
    Ok(())
}
