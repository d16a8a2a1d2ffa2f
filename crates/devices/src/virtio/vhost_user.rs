//! vhost-user devices: virtio devices served by another process (a *backend*:
//! virtiofsd, qemu-storage-daemon, rust-vmm's vhost-device-*, vmcraft's own
//! `vmcraft-vhost-user-backend`), which reads and writes guest memory itself.
//!
//! [`VhostUser`] is the VMM's side (the *frontend*, on rust-vmm's `vhost` crate):
//! a [`VirtioDevice`] whose queues the backend serves. When it is made it connects
//! to the backend's Unix socket and negotiates (`SET_OWNER`, the backend's features,
//! protocol features `MQ`, `REPLY_ACK` and `CONFIG`, the queue count, the
//! configuration space); when the driver starts the device it hands the backend the
//! guest's memory (`SET_MEM_TABLE`: each region's memory file, which needs guest RAM
//! made with [`GuestRam::new_shared`](vmcraft_memory::GuestRam::new_shared)), each
//! ready queue's size, rings and next index, and two eventfds per queue:
//!
//! * the queue's *kick*, the notifier KVM signals on the driver's write to the notify
//!   register (an ioeventfd): the backend wakes without the VMM;
//! * the queue's *call*, which the backend signals after it has used buffers. A
//!   thread of the device (`<name>-call`) passes it on through the transport's
//!   [`Interrupt`](super::Interrupt) (the used-buffer bit on virtio-mmio, the queue's
//!   own vector with MSI-X, masking honoured). The data never passes through the VMM.
//!
//! A backend is another party: every reply is checked by the `vhost` crate, the
//! socket has a timeout ([`REPLY_TIMEOUT`]) so that a backend that stops answering
//! fails the request instead of holding a vCPU, and a backend that goes away while
//! the device runs (its socket closes) marks the device NEEDS_RESET (the driver gets
//! a configuration interrupt); the VM and its other devices run on.
//!
//! Not here: migration and snapshots of a machine with vhost-user devices (the
//! backend's own state is not saved; the machine refuses them, naming the device),
//! the backend's configuration-change messages (no backend request channel is
//! opened), reconnection to a restarted backend.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::{Next, Token, Worker};
use super::{ActivateError, ActiveQueues, VirtioDevice, F_EVENT_IDX, F_VERSION_1};

/// How long the device waits for a backend's reply before the request fails.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The feature bit a backend sets to say it speaks protocol features
/// (`VHOST_USER_F_PROTOCOL_FEATURES`); never offered to the driver.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Feature bits of the transport a backend's offer may carry to the driver: the
/// device's own (0 to 23), indirect descriptors, event indices, VERSION_1. Packed
/// rings, in-order use, IOMMU translation and the rest of the transport's bits are
/// not offered: this transport's queues are split rings in guest-physical memory.
const PASSED_FEATURES: u64 = 0x00ff_ffff | (1 << 28) | F_EVENT_IDX | F_VERSION_1;

/// The protocol features this frontend uses, where the backend has them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
}

/// The most queues a vhost-user device may have here.
pub const MAX_QUEUES: usize = 64;

/// What kind of device a backend serves, as the driver will see it: its type, its
/// queues, and where its configuration space comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserSpec {
    /// The virtio device ID.
    pub device_type: u32,
    /// Each queue's maximum size (the length is the number of queues).
    pub queue_sizes: Vec<u16>,
    /// The configuration space.
    pub config: ConfigSpace,
}

/// Where a vhost-user device's configuration space comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSpace {
    /// None (a device type without one, such as virtio-rng).
    None,
    /// This many bytes read from the backend (`GET_CONFIG`, which needs its `CONFIG`
    /// protocol feature) when the device is made.
    FromBackend(u32),
    /// These bytes, made by the VMM (virtio-fs's tag, which virtiofsd leaves to its
    /// frontend).
    Local(Vec<u8>),
}

/// virtio-blk's device ID.
pub const TYPE_BLOCK: u32 = 2;
/// virtio-rng's device ID.
pub const TYPE_RNG: u32 = 4;
/// virtio-vsock's device ID.
pub const TYPE_VSOCK: u32 = 19;
/// virtio-fs's device ID.
pub const TYPE_FS: u32 = 26;

/// The longest virtio-fs tag (its configuration field is 36 bytes).
pub const FS_TAG_MAX: usize = 36;

/// The default size of each queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

impl VhostUserSpec {
    /// virtio-blk with `queues` request queues, its configuration read from the
    /// backend (capacity, block size, ...), its queue count set to `queues`.
    pub fn block(queues: u16) -> VhostUserSpec {
        VhostUserSpec {
            device_type: TYPE_BLOCK,
            queue_sizes: vec![DEFAULT_QUEUE_SIZE; usize::from(queues.max(1))],
            // virtio_blk_config up to the discard and write-zeroes fields.
            config: ConfigSpace::FromBackend(60),
        }
    }

    /// virtio-rng: one queue, no configuration.
    pub fn rng() -> VhostUserSpec {
        VhostUserSpec {
            device_type: TYPE_RNG,
            queue_sizes: vec![DEFAULT_QUEUE_SIZE],
            config: ConfigSpace::None,
        }
    }

    /// virtio-vsock: rx, tx and event queues; the guest's CID from the backend.
    pub fn vsock() -> VhostUserSpec {
        VhostUserSpec {
            device_type: TYPE_VSOCK,
            queue_sizes: vec![DEFAULT_QUEUE_SIZE; 3],
            config: ConfigSpace::FromBackend(8),
        }
    }

    /// virtio-fs mounted by `tag` (1 to 36 bytes), with a high-priority queue and
    /// `request_queues` request queues.
    pub fn fs(tag: &str, request_queues: u16) -> Result<VhostUserSpec, VhostUserError> {
        if tag.is_empty() || tag.len() > FS_TAG_MAX || tag.contains('\0') {
            return Err(VhostUserError::BadFsTag(tag.to_string()));
        }
        let mut config = vec![0u8; FS_TAG_MAX + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        let request_queues = request_queues.max(1);
        config[FS_TAG_MAX..].copy_from_slice(&u32::from(request_queues).to_le_bytes());
        Ok(VhostUserSpec {
            device_type: TYPE_FS,
            queue_sizes: vec![DEFAULT_QUEUE_SIZE; 1 + usize::from(request_queues)],
            config: ConfigSpace::Local(config),
        })
    }
}

/// Why a vhost-user device could not be made or started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VhostUserError {
    /// The backend's socket could not be connected.
    #[error("cannot connect to the vhost-user backend at {path}")]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// A request to the backend failed (refused, not answered in time, or answered
    /// with something the protocol does not allow).
    #[error("the vhost-user backend failed {request}")]
    Request {
        /// The request.
        request: &'static str,
        /// What the vhost crate reported.
        #[source]
        source: vhost::Error,
    },
    /// The backend does not offer VIRTIO_F_VERSION_1.
    #[error("the vhost-user backend offers features {0:#x}, without VIRTIO_F_VERSION_1")]
    NoVersion1(u64),
    /// The device needs the backend's configuration space, and the backend does not
    /// have the CONFIG protocol feature.
    #[error("the vhost-user backend cannot give its configuration space (no CONFIG protocol feature; protocol features {0:#x})")]
    NoConfig(u64),
    /// The backend serves fewer queues than the device needs.
    #[error("the vhost-user backend serves {backend} queues, the device needs {wanted}")]
    TooFewQueues {
        /// What the device needs.
        wanted: usize,
        /// What the backend serves.
        backend: u64,
    },
    /// A device with no queue, or more than [`MAX_QUEUES`], or a queue size that is
    /// not a power of two.
    #[error("{queues} queues of sizes {sizes:?}: 1 to {MAX_QUEUES} queues of power-of-two sizes")]
    BadQueues {
        /// How many.
        queues: usize,
        /// Their sizes.
        sizes: Vec<u16>,
    },
    /// A virtio-fs tag that is empty, longer than 36 bytes or has a NUL.
    #[error("virtio-fs tag {0:?} is not 1 to 36 bytes without NUL")]
    BadFsTag(String),
    /// Guest RAM is not mapped from a memory file, which the backend needs.
    #[error("guest RAM at {0:#x} is not shared memory: a vhost-user backend cannot map it (make the machine's RAM shared)")]
    NotShared(u64),
    /// A host resource (an eventfd) could not be made.
    #[error("cannot {what}")]
    Host {
        /// What failed.
        what: &'static str,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
}

fn request(request: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    move |source| VhostUserError::Request { request, source }
}

/// A virtio device served by a vhost-user backend. See the
/// [module documentation](self).
pub struct VhostUser {
    name: String,
    spec: VhostUserSpec,
    frontend: Frontend,
    /// The features the backend offered, protocol features bit included.
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    config: Vec<u8>,
    /// The backend closed its socket: nothing more is sent.
    gone: Arc<AtomicBool>,
    /// The queues handed to the backend at the last activation.
    started: Vec<usize>,
    calls: Vec<EventFd>,
    worker: Option<Worker>,
}

impl std::fmt::Debug for VhostUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUser")
            .field("name", &self.name)
            .field("spec", &self.spec)
            .field("backend_features", &self.backend_features)
            .field("protocol", &self.protocol)
            .field("gone", &self.gone)
            .finish_non_exhaustive()
    }
}

impl VhostUser {
    /// Connect to the backend listening at `path` and negotiate a `spec` device
    /// with it.
    pub fn connect(path: &Path, spec: VhostUserSpec, name: &str) -> Result<Self, VhostUserError> {
        let stream = UnixStream::connect(path).map_err(|source| VhostUserError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Self::on_stream(stream, spec, name)
    }

    /// Negotiate a `spec` device with the backend at the other end of `stream` (a
    /// connected socket: the embedder's, or a socket pair's end given to a backend
    /// started with it).
    pub fn on_stream(
        stream: UnixStream,
        spec: VhostUserSpec,
        name: &str,
    ) -> Result<Self, VhostUserError> {
        let queues = spec.queue_sizes.len();
        if !(1..=MAX_QUEUES).contains(&queues)
            || spec.queue_sizes.iter().any(|s| !s.is_power_of_two())
        {
            return Err(VhostUserError::BadQueues {
                queues,
                sizes: spec.queue_sizes.clone(),
            });
        }
        let host = |what| move |source| VhostUserError::Host { what, source };
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(host("set the backend socket's timeouts"))?;
        let mut frontend = Frontend::from_stream(stream, queues as u64);
        frontend.set_owner().map_err(request("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(request("GET_FEATURES"))?;
        if backend_features & F_VERSION_1 == 0 {
            return Err(VhostUserError::NoVersion1(backend_features));
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        if backend_features & F_PROTOCOL_FEATURES != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(request("GET_PROTOCOL_FEATURES"))?;
            protocol = offered & wanted_protocol_features();
            frontend
                .set_protocol_features(protocol)
                .map_err(request("SET_PROTOCOL_FEATURES"))?;
        }
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let backend = frontend.get_queue_num().map_err(request("GET_QUEUE_NUM"))?;
            if backend < queues as u64 {
                return Err(VhostUserError::TooFewQueues {
                    wanted: queues,
                    backend,
                });
            }
        }
        let mut config = match &spec.config {
            ConfigSpace::None => Vec::new(),
            ConfigSpace::Local(bytes) => bytes.clone(),
            ConfigSpace::FromBackend(size) => {
                if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
                    return Err(VhostUserError::NoConfig(protocol.bits()));
                }
                let (_, bytes) = frontend
                    .get_config(
                        0,
                        *size,
                        VhostUserConfigFlags::WRITABLE,
                        &vec![0u8; *size as usize],
                    )
                    .map_err(request("GET_CONFIG"))?;
                bytes
            }
        };
        // virtio-blk's queue count is the frontend's to choose (the backend reports
        // how many it could serve).
        if spec.device_type == TYPE_BLOCK && config.len() >= 36 {
            config[34..36].copy_from_slice(&(queues as u16).to_le_bytes());
        }
        Ok(VhostUser {
            name: name.to_string(),
            spec,
            frontend,
            backend_features,
            protocol,
            config,
            gone: Arc::new(AtomicBool::new(false)),
            started: Vec::new(),
            calls: Vec::new(),
            worker: None,
        })
    }

    /// Whether the backend has closed its socket (the device then needs a reset, and
    /// cannot start again).
    pub fn backend_gone(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
    }

    /// The protocol features in use.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Hand the backend guest memory and every ready queue, and start passing its
    /// calls on as interrupts.
    fn start(&mut self, active: &ActiveQueues) -> Result<(), VhostUserError> {
        let mem = &active.mem;
        let mut regions = Vec::new();
        for region in mem.iter() {
            let shared = region.deref_flags() & libc::MAP_SHARED != 0;
            let Some(file) = region.file_offset().filter(|_| shared) else {
                return Err(VhostUserError::NotShared(region.start_addr().0));
            };
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                mmap_offset: file.start(),
                mmap_handle: file.file().as_raw_fd(),
            });
        }
        let features = (active.driver_features & PASSED_FEATURES)
            | (self.backend_features & F_PROTOCOL_FEATURES);
        self.frontend
            .set_features(features)
            .map_err(request("SET_FEATURES"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(request("SET_MEM_TABLE"))?;
        let host_address = |gpa: u64| -> Result<u64, VhostUserError> {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|_| VhostUserError::NotShared(gpa))
        };
        let mut calls = Vec::new();
        let mut started = Vec::new();
        for (index, queue) in active.queues.iter().enumerate() {
            let call = EventFd::new(EFD_NONBLOCK).map_err(|source| VhostUserError::Host {
                what: "make a queue's call eventfd",
                source,
            })?;
            if !queue.ready() {
                calls.push(call);
                continue;
            }
            let config = VringConfigData {
                queue_max_size: self.spec.queue_sizes[index],
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host_address(queue.desc_table())?,
                used_ring_addr: host_address(queue.used_ring())?,
                avail_ring_addr: host_address(queue.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(index, queue.size())
                .map_err(request("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(index, &config)
                .map_err(request("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, queue.next_avail())
                .map_err(request("SET_VRING_BASE"))?;
            // The call before the kick: a backend starts the ring on its kick.
            self.frontend
                .set_vring_call(index, &call)
                .map_err(request("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, &active.notifiers[index])
                .map_err(request("SET_VRING_KICK"))?;
            started.push(index);
            calls.push(call);
        }
        if self.backend_features & F_PROTOCOL_FEATURES != 0 {
            for &index in &started {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(request("SET_VRING_ENABLE"))?;
            }
        }
        self.started = started;
        let relayed = calls
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| VhostUserError::Host {
                what: "duplicate a call eventfd",
                source,
            })?;
        self.calls = calls;
        let interrupt = active.interrupt.clone();
        let gone = self.gone.clone();
        let socket = self.frontend.as_raw_fd();
        let name = self.name.clone();
        let worker = Worker::spawn(
            format!("{}-call", self.name),
            relayed,
            vec![socket],
            move |_, token| match token {
                Token::Queue(q) => {
                    interrupt.queue(q as u16).signal();
                    Next::Continue
                }
                Token::Fd(_) => match peer_closed(socket) {
                    Some(true) => {
                        log::error!(
                            "{name}: the vhost-user backend closed its socket: the device needs a reset"
                        );
                        gone.store(true, Ordering::SeqCst);
                        interrupt.device_error();
                        Next::Stop
                    }
                    // A reply on its way to the thread that asked (a configuration
                    // write), or nothing.
                    _ => {
                        std::thread::yield_now();
                        Next::Continue
                    }
                },
            },
        )
        .map_err(|source| VhostUserError::Host {
            what: "start the call thread",
            source,
        })?;
        self.worker = Some(worker);
        Ok(())
    }

    /// Stop the backend's use of every started queue (`GET_VRING_BASE`).
    fn stop(&mut self) {
        self.worker = None;
        let started = std::mem::take(&mut self.started);
        self.calls.clear();
        if self.backend_gone() {
            return;
        }
        for index in started {
            if let Err(e) = self.frontend.get_vring_base(index) {
                log::warn!(
                    "{}: the vhost-user backend did not stop queue {index}: {e}",
                    self.name
                );
            }
        }
    }
}

/// Whether the peer of socket `fd` has closed it: `Some(true)` at its end of stream
/// or a reset, `Some(false)` if bytes wait to be read, `None` if nothing does.
fn peer_closed(fd: RawFd) -> Option<bool> {
    let mut byte = 0u8;
    // SAFETY: a one-byte buffer this function owns; MSG_PEEK leaves the bytes for
    // the frontend, MSG_DONTWAIT keeps the call from blocking.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Some(true),
        n if n > 0 => Some(false),
        _ => match std::io::Error::last_os_error().kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => None,
            _ => Some(true),
        },
    }
}

/// A region's mapping flags.
trait RegionFlags {
    fn deref_flags(&self) -> i32;
}

impl RegionFlags for vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap> {
    fn deref_flags(&self) -> i32 {
        std::ops::Deref::deref(self).flags()
    }
}

impl VirtioDevice for VhostUser {
    fn device_type(&self) -> u32 {
        self.spec.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.spec.queue_sizes
    }

    fn features(&self) -> u64 {
        self.backend_features & PASSED_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Some(end) = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data.len()))
            .filter(|&end| end <= self.config.len())
        else {
            return;
        };
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) || self.backend_gone() {
            return;
        }
        match self
            .frontend
            .set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data)
        {
            Ok(()) => self.config[end - data.len()..end].copy_from_slice(data),
            Err(e) => log::warn!(
                "{}: the vhost-user backend refused a configuration write of {} bytes at {offset}: {e}",
                self.name,
                data.len()
            ),
        }
    }

    fn activate(&mut self, active: ActiveQueues) -> Result<(), ActivateError> {
        if self.backend_gone() {
            return Err(ActivateError::Host {
                what: "start a device whose vhost-user backend is gone",
                source: std::io::Error::from(std::io::ErrorKind::NotConnected),
            });
        }
        self.start(&active).map_err(|e| {
            log::error!("{}: {}", self.name, vmcraft_memory::report::ErrorChain(&e));
            self.stop();
            ActivateError::Host {
                what: "start the vhost-user backend's queues",
                source: std::io::Error::other(e),
            }
        })
    }

    fn reset(&mut self) {
        self.stop();
    }

    /// The backend's queues stopped (`GET_VRING_BASE`), not parked: the transport
    /// starts them again from the used indices in guest memory.
    fn pause(&mut self) -> bool {
        self.stop();
        false
    }

    fn workers(&self) -> &[Worker] {
        self.worker.as_slice()
    }
}

impl Drop for VhostUser {
    fn drop(&mut self) {
        self.stop();
    }
}
