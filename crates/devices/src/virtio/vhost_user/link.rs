//! One vhost-user device's connection to its backend: the negotiation, the rings
//! handed over, and the thread that watches the backend's socket and connects again
//! when the backend restarts.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmcraft_memory::GuestMemory;
use vmcraft_sandbox::ThreadKind;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{
    request, wanted_protocol_features, ConfigSpace, VhostUserError, VhostUserSpec,
    F_PROTOCOL_FEATURES, PASSED_FEATURES, REPLY_TIMEOUT, TYPE_BLOCK,
};
use crate::virtio::{Interrupt, F_VERSION_1, INT_CONFIG};

/// A negotiated connection to a backend.
pub(super) struct Connection {
    pub(super) frontend: Frontend,
    /// The features the backend offered, protocol features bit included.
    pub(super) backend_features: u64,
    pub(super) protocol: VhostUserProtocolFeatures,
    pub(super) config: Vec<u8>,
}

/// One queue the driver made ready, as it was handed to the backend.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ring {
    pub(super) index: usize,
    pub(super) size: u16,
    pub(super) desc: u64,
    pub(super) avail: u64,
    pub(super) used: u64,
    /// The next available index at activation.
    pub(super) next_avail: u16,
}

/// What a running device handed to its backend: enough to hand it over again.
pub(super) struct Rings {
    pub(super) mem: GuestMemory,
    pub(super) driver_features: u64,
    pub(super) rings: Vec<Ring>,
    /// Every queue's notifier (the driver's kick), by queue index.
    pub(super) kicks: Vec<EventFd>,
    /// Every queue's call eventfd, by queue index: the queue's irqfd.
    pub(super) calls: Vec<EventFd>,
    pub(super) interrupt: Arc<Interrupt>,
}

/// Where the ring's next index comes from when it is handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Base {
    /// The driver's queue as activated (a fresh start, or after a restore).
    Activation,
    /// The used index in guest memory: a backend that restarted does again what its
    /// predecessor took and did not complete.
    UsedIndex,
}

impl Connection {
    /// Negotiate a `spec` device over `stream`.
    pub(super) fn negotiate(
        stream: UnixStream,
        spec: &VhostUserSpec,
    ) -> Result<Connection, VhostUserError> {
        let queues = spec.queue_sizes.len();
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
        Ok(Connection {
            frontend,
            backend_features,
            protocol,
            config,
        })
    }

    /// Hand the backend guest memory and `rings`, each from `base`.
    pub(super) fn start(&mut self, rings: &Rings, base: Base) -> Result<(), VhostUserError> {
        let mem = &rings.mem;
        let mut regions = Vec::new();
        for region in mem.iter() {
            let shared = std::ops::Deref::deref(region).flags() & libc::MAP_SHARED != 0;
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
        // The driver's features must still be the backend's (a restarted backend may
        // be another version).
        let wanted = rings.driver_features & PASSED_FEATURES;
        if wanted & !self.backend_features != 0 {
            return Err(VhostUserError::FeaturesGone {
                driver: wanted,
                backend: self.backend_features,
            });
        }
        let features = wanted | (self.backend_features & F_PROTOCOL_FEATURES);
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
        for ring in &rings.rings {
            let index = ring.index;
            let config = VringConfigData {
                queue_max_size: ring.size,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: host_address(ring.desc)?,
                used_ring_addr: host_address(ring.used)?,
                avail_ring_addr: host_address(ring.avail)?,
                log_addr: None,
            };
            let next = match base {
                Base::Activation => ring.next_avail,
                // The used ring's index, the second 16-bit field.
                Base::UsedIndex => mem
                    .read_obj::<u16>(GuestAddress(ring.used + 2))
                    .map_err(|_| VhostUserError::NotShared(ring.used))?,
            };
            self.frontend
                .set_vring_num(index, ring.size)
                .map_err(request("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(index, &config)
                .map_err(request("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, next)
                .map_err(request("SET_VRING_BASE"))?;
            // The call before the kick: a backend starts the ring on its kick.
            self.frontend
                .set_vring_call(index, &rings.calls[index])
                .map_err(request("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, &rings.kicks[index])
                .map_err(request("SET_VRING_KICK"))?;
        }
        if self.backend_features & F_PROTOCOL_FEATURES != 0 {
            for ring in &rings.rings {
                self.frontend
                    .set_vring_enable(ring.index, true)
                    .map_err(request("SET_VRING_ENABLE"))?;
            }
        }
        // Without REPLY_ACK the backend answers none of the above: a request that has
        // a reply makes sure it has taken them all (it handles its messages in order)
        // before the guest runs on and notifies a queue, which a backend still
        // holding a disabled ring would drop.
        if !self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            self.frontend
                .get_features()
                .map_err(request("GET_FEATURES (a barrier)"))?;
        }
        // And one notification per queue from here: what the driver made available
        // before (a ring handed over again) is seen now; a backend that finds nothing
        // new does nothing.
        for ring in &rings.rings {
            let _ = rings.kicks[ring.index].write(1);
        }
        Ok(())
    }

    /// Stop the backend's use of `rings` (`GET_VRING_BASE`).
    pub(super) fn stop(&mut self, rings: &Rings, name: &str) {
        for ring in &rings.rings {
            if let Err(e) = self.frontend.get_vring_base(ring.index) {
                log::warn!(
                    "{name}: the vhost-user backend did not stop queue {}: {e}",
                    ring.index
                );
            }
        }
    }
}

/// What the device and its link thread share.
pub(super) struct Shared {
    pub(super) name: String,
    pub(super) spec: VhostUserSpec,
    /// Where to connect again; none for a device made on a stream.
    pub(super) path: Option<PathBuf>,
    /// How long a backend that went away has to come back before the device is
    /// marked NEEDS_RESET.
    pub(super) reconnect_window: Duration,
    /// Lock order: `rings`, then `connection`.
    pub(super) rings: Mutex<Option<Rings>>,
    pub(super) connection: Mutex<Connection>,
    /// The backend has gone and no other has taken its place: nothing is sent.
    pub(super) gone: AtomicBool,
    /// Tells the link thread to look at `rings` and the connection again.
    pub(super) changed: EventFd,
    pub(super) stop: EventFd,
}

/// A poisoned lock's data is still the device's: a panic elsewhere does not make
/// it unusable.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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

const TOKEN_STOP: u64 = u64::MAX;
const TOKEN_CHANGED: u64 = u64::MAX - 1;
const TOKEN_SOCKET: u64 = u64::MAX - 2;

/// The link thread: started with the device, ended by [`Shared::stop`].
pub(super) fn spawn(shared: Arc<Shared>) -> Result<vmcraft_sandbox::Thread<()>, VhostUserError> {
    let name = format!("{}-link", shared.name);
    vmcraft_sandbox::spawn(ThreadKind::HostSockets, &name, move || {
        if let Err(e) = run(&shared) {
            log::error!(
                "{}: the vhost-user link stopped: {e}; the backend's completions no longer reach the guest",
                shared.name
            );
        }
    })
    .map_err(|e| VhostUserError::Host {
        what: "start the link thread",
        source: std::io::Error::other(e),
    })
}

/// The descriptor the link thread waits on now: the backend's socket, unless it is
/// gone. (The calls go to KVM, not to this thread.)
fn watched(shared: &Shared) -> Option<RawFd> {
    let _rings = lock(&shared.rings);
    (!shared.gone.load(Ordering::SeqCst)).then(|| lock(&shared.connection).frontend.as_raw_fd())
}

fn run(shared: &Shared) -> std::io::Result<()> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        shared.stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, TOKEN_STOP),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        shared.changed.as_raw_fd(),
        EpollEvent::new(EventSet::IN, TOKEN_CHANGED),
    )?;
    let mut registered: Option<RawFd> = None;
    let mut events = vec![EpollEvent::default(); 8];
    // Whether the device changed what to watch (its rings started or stopped, a new
    // socket). Descriptors are compared by nothing but being told: a closed one's
    // number is soon another's.
    let mut dirty = true;
    // Since when bytes have waited on the socket with nobody reading them.
    let mut unasked: Option<Instant> = None;
    loop {
        if dirty {
            dirty = false;
            if let Some(fd) = registered {
                // Gone already if it was closed.
                let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            registered = watched(shared);
            if let Some(fd) = registered {
                watch(&epoll, fd, TOKEN_SOCKET)?;
            }
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_STOP => return Ok(()),
                TOKEN_CHANGED => {
                    let _ = shared.changed.read();
                    dirty = true;
                }
                TOKEN_SOCKET => match peer_closed(registered.unwrap_or(-1)) {
                    Some(true) => {
                        unasked = None;
                        if reconnect(shared) == Reconnected::Stopped {
                            return Ok(());
                        }
                        dirty = true;
                    }
                    Some(false) => {
                        // A reply on its way to the thread that asked (a configuration
                        // write) is read within its timeout; bytes that stay longer
                        // were sent unasked: the backend breaks the protocol.
                        let since = *unasked.get_or_insert_with(Instant::now);
                        if since.elapsed() > 2 * REPLY_TIMEOUT {
                            log::error!(
                                "{}: the vhost-user backend sent what nobody asked for: the device needs a reset",
                                shared.name
                            );
                            shared.gone.store(true, Ordering::SeqCst);
                            mark_broken(shared);
                            unasked = None;
                            dirty = true;
                        } else {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                    None => unasked = None,
                },
                _ => {}
            }
        }
    }
}

/// Watch `fd` for reading under `token` (again, if it was).
fn watch(epoll: &Epoll, fd: RawFd, token: u64) -> std::io::Result<()> {
    let event = EpollEvent::new(EventSet::IN, token);
    match epoll.ctl(ControlOperation::Add, fd, event) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            epoll.ctl(ControlOperation::Modify, fd, event)
        }
        other => other,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Reconnected {
    Yes,
    No,
    Stopped,
}

/// The backend closed its socket: connect again (every 100 ms within the reconnect
/// window, then every second) and hand the running rings over from their used
/// indices; the device is marked NEEDS_RESET if the window passes first.
fn reconnect(shared: &Shared) -> Reconnected {
    shared.gone.store(true, Ordering::SeqCst);
    let name = &shared.name;
    let Some(path) = shared.path.clone() else {
        log::error!("{name}: the vhost-user backend closed its socket: the device needs a reset");
        mark_broken(shared);
        return Reconnected::No;
    };
    log::warn!(
        "{name}: the vhost-user backend closed its socket; connecting to {} again (for {} s before the device is marked broken)",
        path.display(),
        shared.reconnect_window.as_secs()
    );
    let started = Instant::now();
    let mut marked = false;
    let mut last_error = String::new();
    loop {
        let pause = if started.elapsed() < shared.reconnect_window {
            Duration::from_millis(100)
        } else {
            if !marked {
                log::error!(
                    "{name}: the vhost-user backend at {} did not come back within {} s ({last_error}): the device needs a reset",
                    path.display(),
                    shared.reconnect_window.as_secs()
                );
                mark_broken(shared);
                marked = true;
            }
            Duration::from_secs(1)
        };
        // Stopped while waiting: the device is being dropped.
        let mut poll = [libc::pollfd {
            fd: shared.stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one pollfd this function owns, for the duration of the call.
        let rc = unsafe { libc::poll(poll.as_mut_ptr(), 1, pause.as_millis() as i32) };
        if rc > 0 {
            return Reconnected::Stopped;
        }
        let stream = match UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e) => {
                last_error = e.to_string();
                continue;
            }
        };
        match hand_over(shared, stream) {
            Ok(()) => {
                shared.gone.store(false, Ordering::SeqCst);
                log::warn!(
                    "{name}: connected again to the vhost-user backend at {} after {} ms",
                    path.display(),
                    started.elapsed().as_millis()
                );
                return Reconnected::Yes;
            }
            Err(e) => {
                last_error = vmcraft_memory::report::ErrorChain(&e).to_string();
                log::warn!("{name}: the restarted vhost-user backend refused: {last_error}");
            }
        }
    }
}

/// Negotiate with a new backend and give it the running rings.
fn hand_over(shared: &Shared, stream: UnixStream) -> Result<(), VhostUserError> {
    let rings = lock(&shared.rings);
    let mut connection = Connection::negotiate(stream, &shared.spec)?;
    if let Some(r) = rings.as_ref() {
        connection.start(r, Base::UsedIndex)?;
    }
    let mut current = lock(&shared.connection);
    let config_changed = connection.config != current.config;
    *current = connection;
    if let Some(r) = rings.as_ref() {
        // Completions the old backend made and had not signalled yet.
        for ring in &r.rings {
            r.interrupt.queue(ring.index as u16).signal();
        }
        if config_changed {
            r.interrupt.raise(INT_CONFIG);
        }
    }
    Ok(())
}

/// Mark the running device NEEDS_RESET (a configuration interrupt to its driver).
fn mark_broken(shared: &Shared) {
    if let Some(r) = lock(&shared.rings).as_ref() {
        r.interrupt.device_error();
    }
}
