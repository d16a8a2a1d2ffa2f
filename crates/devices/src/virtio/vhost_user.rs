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
//! * the queue's *call*, which the backend signals after it has used buffers: the
//!   queue's irqfd itself ([`Interrupt::direct_queue_notifier`](super::Interrupt::direct_queue_notifier):
//!   its MSI-X vector's, or the line's with the used-buffer bit kept set), so KVM
//!   interrupts the guest without a VMM thread. Neither the data nor the
//!   notifications pass through the VMM.
//!
//! A backend is another party: every reply is checked by the `vhost` crate, and the
//! socket has a timeout ([`REPLY_TIMEOUT`]) so that a backend that stops answering
//! fails the request instead of holding a vCPU. A backend that closes its socket
//! (it crashed, or was restarted) is connected to again by the link thread, at the
//! same path, for [`RECONNECT_WINDOW`]: the new backend is given the running rings
//! from their used indices in guest memory, so it does again what its predecessor
//! took and did not complete (a block request, a random number), and the driver sees
//! nothing but the wait. Past the window the device is marked NEEDS_RESET (the driver
//! gets a configuration interrupt), the link keeps trying every second, and the VM
//! and its other devices run on. The link thread is the one kind of thread that
//! connects sockets (`ThreadKind::HostSockets`); the vCPUs never do.
//!
//! Not here: migration and snapshots of a machine with vhost-user devices (the
//! backend's own state is not saved; the machine refuses them, naming the device),
//! the backend's configuration-change messages (no backend request channel is
//! opened).

mod link;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, ActiveQueues, VirtioDevice, F_EVENT_IDX, F_VERSION_1};
use link::{lock, Shared};

/// How long the device waits for a backend's reply before the request fails.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a backend that closed its socket has to come back (a process restarted
/// on the same socket) before the device is marked NEEDS_RESET.
pub const RECONNECT_WINDOW: Duration = Duration::from_secs(10);

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
    /// A restarted backend no longer offers features the driver took.
    #[error("the vhost-user backend offers features {backend:#x}, without some the driver took ({driver:#x})")]
    FeaturesGone {
        /// What the driver took.
        driver: u64,
        /// What the backend offers now.
        backend: u64,
    },
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
    shared: Arc<Shared>,
    link: Option<vmcraft_sandbox::Thread<()>>,
    /// Whether the rings were handed to the backend and not taken back.
    started: bool,
}

impl std::fmt::Debug for VhostUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUser")
            .field("name", &self.shared.name)
            .field("spec", &self.shared.spec)
            .field("path", &self.shared.path)
            .field("gone", &self.shared.gone)
            .finish_non_exhaustive()
    }
}

impl VhostUser {
    /// Connect to the backend listening at `path` and negotiate a `spec` device
    /// with it; if the backend goes away, the device connects to `path` again.
    pub fn connect(path: &Path, spec: VhostUserSpec, name: &str) -> Result<Self, VhostUserError> {
        let stream = UnixStream::connect(path).map_err(|source| VhostUserError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(stream, Some(path.to_path_buf()), spec, name)
    }

    /// Negotiate a `spec` device with the backend at the other end of `stream` (a
    /// connected socket: the embedder's, or a socket pair's end given to a backend
    /// started with it). If the backend goes away, the device connects to `path`
    /// again when there is one (within [`RECONNECT_WINDOW`], after which it is marked
    /// NEEDS_RESET and the device keeps trying every second), and is marked
    /// NEEDS_RESET at once when there is none.
    pub fn new(
        stream: UnixStream,
        path: Option<PathBuf>,
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
        let connection = link::Connection::negotiate(stream, &spec)?;
        let eventfd = |what| {
            EventFd::new(EFD_NONBLOCK).map_err(|source| VhostUserError::Host { what, source })
        };
        let shared = Arc::new(link::Shared {
            name: name.to_string(),
            spec,
            path,
            reconnect_window: RECONNECT_WINDOW,
            rings: Mutex::new(None),
            connection: Mutex::new(connection),
            gone: AtomicBool::new(false),
            changed: eventfd("make the link's eventfd")?,
            stop: eventfd("make the link's stop eventfd")?,
        });
        let link = link::spawn(shared.clone())?;
        Ok(VhostUser {
            shared,
            link: Some(link),
            started: false,
        })
    }

    /// Whether the backend has gone and no other has taken its place (the device then
    /// cannot start).
    pub fn backend_gone(&self) -> bool {
        self.shared.gone.load(Ordering::SeqCst)
    }

    /// The protocol features in use.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        lock(&self.shared.connection).protocol
    }

    /// Hand the backend guest memory and every ready queue.
    fn start(&mut self, active: ActiveQueues) -> Result<(), VhostUserError> {
        let host = |what| move |source| VhostUserError::Host { what, source };
        let mut rings = Vec::new();
        for (index, queue) in active.queues.iter().enumerate() {
            if queue.ready() {
                rings.push(link::Ring {
                    index,
                    size: queue.size(),
                    desc: queue.desc_table(),
                    avail: queue.avail_ring(),
                    used: queue.used_ring(),
                    next_avail: queue.next_avail(),
                });
            }
        }
        // The backend interrupts the driver itself: each queue's call is the queue's
        // irqfd (its MSI-X vector's, or the line's).
        let calls = (0..active.queues.len())
            .map(|q| active.interrupt.direct_queue_notifier(q as u16))
            .collect::<Result<Vec<_>, _>>()
            .map_err(host("duplicate the queues' irqfds"))?;
        let running = link::Rings {
            mem: active.mem,
            driver_features: active.driver_features,
            rings,
            kicks: active.notifiers,
            calls,
            interrupt: active.interrupt,
        };
        let mut slot = lock(&self.shared.rings);
        lock(&self.shared.connection).start(&running, link::Base::Activation)?;
        *slot = Some(running);
        drop(slot);
        self.started = true;
        // The link thread watches the new calls.
        let _ = self.shared.changed.write(1);
        Ok(())
    }

    /// Take every started queue back from the backend (`GET_VRING_BASE`).
    fn stop(&mut self) {
        let mut slot = lock(&self.shared.rings);
        if let Some(running) = slot.take() {
            if !self.backend_gone() {
                lock(&self.shared.connection).stop(&running, &self.shared.name);
            }
        }
        drop(slot);
        self.started = false;
        let _ = self.shared.changed.write(1);
    }
}

impl VirtioDevice for VhostUser {
    fn device_type(&self) -> u32 {
        self.shared.spec.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.shared.spec.queue_sizes
    }

    fn features(&self) -> u64 {
        lock(&self.shared.connection).backend_features & PASSED_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&lock(&self.shared.connection).config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if self.backend_gone() {
            return;
        }
        let mut connection = lock(&self.shared.connection);
        let Some(end) = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data.len()))
            .filter(|&end| end <= connection.config.len())
        else {
            return;
        };
        if !connection
            .protocol
            .contains(VhostUserProtocolFeatures::CONFIG)
        {
            return;
        }
        match connection
            .frontend
            .set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data)
        {
            Ok(()) => connection.config[end - data.len()..end].copy_from_slice(data),
            Err(e) => log::warn!(
                "{}: the vhost-user backend refused a configuration write of {} bytes at {offset}: {e}",
                self.shared.name,
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
        self.start(active).map_err(|e| {
            log::error!(
                "{}: {}",
                self.shared.name,
                vmcraft_memory::report::ErrorChain(&e)
            );
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
}

impl Drop for VhostUser {
    fn drop(&mut self) {
        if self.started {
            self.stop();
        }
        let _ = self.shared.stop.write(1);
        if let Some(link) = self.link.take() {
            // A panic in the link thread has been reported by the panic hook.
            let _ = link.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A backend of a few lines: answers an rng's negotiation (VERSION_1 and protocol
    /// features; MQ; one queue), then does what `after` says.
    fn scripted_backend(
        mut theirs: UnixStream,
        after: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) {
        std::thread::spawn(move || {
            let mut answered = 0;
            while answered < 3 {
                let mut header = [0u8; 12];
                if theirs.read_exact(&mut header).is_err() {
                    return;
                }
                let request = u32::from_le_bytes(header[0..4].try_into().unwrap());
                let size = u32::from_le_bytes(header[8..12].try_into().unwrap());
                let mut body = vec![0u8; size as usize];
                theirs.read_exact(&mut body).unwrap();
                let value: u64 = match request {
                    1 => F_VERSION_1 | F_PROTOCOL_FEATURES,     // GET_FEATURES
                    15 => VhostUserProtocolFeatures::MQ.bits(), // GET_PROTOCOL_FEATURES
                    17 => 1,                                    // GET_QUEUE_NUM
                    _ => continue,                              // no reply
                };
                let mut reply = Vec::new();
                reply.extend_from_slice(&request.to_le_bytes());
                reply.extend_from_slice(&0x5u32.to_le_bytes());
                reply.extend_from_slice(&8u32.to_le_bytes());
                reply.extend_from_slice(&value.to_le_bytes());
                theirs.write_all(&reply).unwrap();
                answered += 1;
            }
            after(&mut theirs);
        });
    }

    #[test]
    fn a_negotiated_device_offers_the_backends_features_masked_and_needs_its_memory_shared() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        scripted_backend(theirs, |s| {
            // Keep the socket open until the device is dropped.
            let mut buf = [0u8; 64];
            while s.read(&mut buf).is_ok_and(|n| n > 0) {}
        });
        let device = VhostUser::new(ours, None, VhostUserSpec::rng(), "vu-test").unwrap();
        assert_eq!(device.features(), F_VERSION_1);
        assert_eq!(device.device_type(), TYPE_RNG);
        assert!(device
            .protocol_features()
            .contains(VhostUserProtocolFeatures::MQ));
        assert!(!device.backend_gone());
    }

    #[test]
    fn a_backend_that_sends_what_nobody_asked_for_is_cut_off() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        scripted_backend(theirs, |s| {
            s.write_all(b"unasked bytes").unwrap();
            let mut buf = [0u8; 64];
            while s.read(&mut buf).is_ok_and(|n| n > 0) {}
        });
        let device = VhostUser::new(ours, None, VhostUserSpec::rng(), "vu-test").unwrap();
        let deadline = std::time::Instant::now() + 4 * REPLY_TIMEOUT;
        while !device.backend_gone() {
            assert!(std::time::Instant::now() < deadline, "still trusted");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn a_backend_without_version_1_or_with_too_few_queues_is_refused() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut header = [0u8; 12];
            // SET_OWNER, then GET_FEATURES answered without VERSION_1.
            theirs.read_exact(&mut header).unwrap();
            theirs.read_exact(&mut header).unwrap();
            let mut reply = Vec::new();
            reply.extend_from_slice(&1u32.to_le_bytes());
            reply.extend_from_slice(&0x5u32.to_le_bytes());
            reply.extend_from_slice(&8u32.to_le_bytes());
            reply.extend_from_slice(&(1u64 << 30).to_le_bytes());
            theirs.write_all(&reply).unwrap();
        });
        let err = VhostUser::new(ours, None, VhostUserSpec::rng(), "vu-test").unwrap_err();
        assert!(matches!(err, VhostUserError::NoVersion1(_)), "{err}");

        let (ours, theirs) = UnixStream::pair().unwrap();
        scripted_backend(theirs, |_| {});
        // The backend serves one queue; a vsock needs three.
        let err = VhostUser::new(ours, None, VhostUserSpec::vsock(), "vu-test").unwrap_err();
        assert!(
            matches!(
                err,
                VhostUserError::TooFewQueues {
                    wanted: 3,
                    backend: 1
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn specs_refuse_bad_tags_and_queues() {
        assert!(VhostUserSpec::fs("", 1).is_err());
        assert!(VhostUserSpec::fs(&"x".repeat(37), 1).is_err());
        let fs = VhostUserSpec::fs("share", 2).unwrap();
        assert_eq!(fs.queue_sizes.len(), 3);
        let ConfigSpace::Local(config) = &fs.config else {
            panic!("virtio-fs's configuration is the frontend's");
        };
        assert_eq!(&config[..5], b"share");
        assert_eq!(&config[36..], &2u32.to_le_bytes());
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let bad = VhostUserSpec {
            device_type: 1,
            queue_sizes: vec![3],
            config: ConfigSpace::None,
        };
        assert!(matches!(
            VhostUser::new(ours, None, bad, "vu-test"),
            Err(VhostUserError::BadQueues { .. })
        ));
    }
}
