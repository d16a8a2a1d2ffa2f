//! The VMM's side of a Xen guest's split drivers: a xenstore on the guest's store
//! ring, the back end of each xenbus device (a vbd per disk, served by
//! [`BlkifBackend`] once the front end connects), and the PV console (`hvc0`).
//!
//! Threads (each a PV backend thread under the sandbox's filter):
//! * `xenstore`: answers the guest's store requests; as domain 0 it watches each
//!   device's front-end state and runs the back end's half of the handshake
//!   ([`XenbusDevice`]): when the front end says Initialised, the ring it granted is
//!   mapped, its event channel bound, a `xen-vbd<N>` thread started, and the back end
//!   says Connected. A front end that closes gets its thread stopped and its ring
//!   unmapped; a front end with bad details gets the back end Closed with the reason
//!   in its `error` node.
//! * `xen-vbd<N>`: one per disk, started with the store (backend threads may not
//!   start threads); it serves the blkif ring the store thread hands it while the
//!   front end is connected.
//! * `xen-console`: copies what the guest writes to the console ring out, and what
//!   comes in to the guest.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use vm_memory::GuestAddress;
use vmcraft_block::BlockImage;
use vmcraft_memory::GuestMemory;
use vmcraft_pv_hypercall::blkif::BlkifBackend;
use vmcraft_pv_hypercall::console::ConsoleBackend;
use vmcraft_pv_hypercall::evtchn::{BackendPort, EventChannels, EvtchnError};
use vmcraft_pv_hypercall::grant::{GrantTable, Mapping};
use vmcraft_pv_hypercall::hvm::{param, HvmParams};
use vmcraft_pv_hypercall::ring::GuestRingMemory;
use vmcraft_pv_hypercall::xenstore::ring::{StoreRing, StoreRingState};
use vmcraft_pv_hypercall::xenstore::xenbus::{Action, DeviceInfo, FrontendDetails, XenbusDevice};
use vmcraft_pv_hypercall::xenstore::Xenstore;
use vmcraft_sandbox::{Thread, ThreadKind};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{XenHvm, CONSOLE_PAGE, DOMID, STORE_PAGE};
use vmcraft_devices::lifecycle::{
    epoll_for, epoll_over, next_ready, wait, Gate, Leave, GATE, PORT, STOP,
};
use vmcraft_memory::report::ErrorChain;

/// The first virtual-device number of the guest's disks: `xvda` (Xen's major 202,
/// minor 0). Disk N is `51712 + 16 N`.
pub const XVDA: u32 = 202 << 8;

/// Backend ids in the event-channel table (the VMM's own numbering).
const STORE_BACKEND: u32 = 0x100;
const CONSOLE_BACKEND: u32 = 0x101;
const VBD_BACKEND: u32 = 0x200;

/// Why the services could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum XenServiceError {
    /// An event channel could not be set up.
    #[error("cannot set up the event channel of the {0}")]
    Evtchn(&'static str, #[source] EvtchnError),
    /// The store's or console's page is not guest memory.
    #[error("the {0} page is not guest memory")]
    Page(&'static str),
    /// The store refused the VMM's own entries.
    #[error("cannot write the guest's xenstore entries")]
    Store(#[source] vmcraft_pv_hypercall::xenstore::store::XsError),
    /// A thread or eventfd could not be created.
    #[error("cannot start the Xen backend threads")]
    Host(#[source] std::io::Error),
    /// A thread could not be spawned.
    #[error("cannot spawn a Xen backend thread")]
    Thread(#[source] vmcraft_sandbox::SandboxError),
    /// A saved state (a snapshot's, a migration's) is refused.
    #[error("the saved Xen services: {0}")]
    BadState(String),
}

/// One disk for the guest.
#[derive(Debug)]
pub struct XenDisk {
    /// The image.
    pub file: File,
    /// Whether the guest may only read it.
    pub read_only: bool,
}

/// A disk and its xenbus device, on the store thread's side.
struct Vbd {
    id: u32,
    device: XenbusDevice,
    image: Arc<BlockImage>,
    link: Arc<VbdLink>,
    /// The front end's ring, mapped while connected.
    ring: Option<Mapping>,
    /// What the front end connected with.
    connected: Option<FrontendDetails>,
}

/// What the store thread serves: the guest's store ring and the vbds' back ends
/// (locked by the store thread while it serves, by a snapshot while it is parked).
struct StoreSide {
    ring: StoreRing<GuestRingMemory>,
    vbds: Vec<Vbd>,
}

/// The Xen services in a snapshot: the store, the store ring's side, each vbd's
/// xenbus state and connection. The rings, the console page and the grants are
/// guest memory.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct XenServicesState {
    store: vmcraft_pv_hypercall::xenstore::store::Store,
    ring: StoreRingState,
    vbds: Vec<VbdState>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct VbdState {
    device: XenbusDevice,
    connected: Option<FrontendDetails>,
}

/// What the store thread hands a vbd's thread: the backend of the connected front
/// end (or none), an eventfd saying it changed, and the eventfd the front end's
/// event channel signals (bound to each new channel on connect).
struct VbdLink {
    changed: EventFd,
    notified: Arc<EventFd>,
    live: Mutex<Option<LiveVbd>>,
}

/// A connected vbd's backend and the front end's port.
struct LiveVbd {
    backend: BlkifBackend,
    port: u32,
}

/// What the services share with their threads.
struct Shared {
    memory: GuestMemory,
    channels: Arc<EventChannels>,
    grants: Arc<GrantTable>,
    stop: EventFd,
    gate: Arc<Gate>,
}

/// The running services; dropping them stops and joins their threads.
pub struct XenServices {
    shared: Arc<Shared>,
    threads: Vec<Thread<()>>,
    /// The store's state, for the embedding program (and tests) to read.
    pub xenstore: Arc<Mutex<Xenstore>>,
    side: Arc<Mutex<StoreSide>>,
    /// The store's and the console's notification eventfds, to have each thread
    /// look at its ring once after a restore.
    looks: Vec<EventFd>,
}

impl std::fmt::Debug for XenServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenServices")
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

/// Allocate a guest port for a VMM backend and bind it: the guest finds it in an HVM
/// parameter or the store.
fn backend_port(
    channels: &EventChannels,
    what: &'static str,
    backend: u32,
) -> Result<BackendPort, XenServiceError> {
    let port = channels
        .alloc_unbound(0)
        .map_err(|e| XenServiceError::Evtchn(what, e))?;
    channels
        .bind_backend(port, backend, 0)
        .map_err(|e| XenServiceError::Evtchn(what, e))
}

impl XenServices {
    /// Start the store (with a vbd per disk of `disks`) and the console (output to
    /// `console_out`, input from `console_in` if given) for the guest of `xen`, and
    /// publish where they are in its HVM parameters. Call before the guest boots.
    pub fn start(
        xen: &XenHvm,
        memory: GuestMemory,
        disks: Vec<XenDisk>,
        console_out: Box<dyn Write + Send>,
        console_in: Option<File>,
    ) -> Result<Self, XenServiceError> {
        Self::start_on(
            xen.channels.clone(),
            xen.grants.clone(),
            &xen.params,
            memory,
            disks,
            console_out,
            console_in,
        )
    }

    /// [`start`](Self::start) on the parts of a Xen platform.
    pub fn start_on(
        channels: Arc<EventChannels>,
        grants: Arc<GrantTable>,
        params: &HvmParams,
        memory: GuestMemory,
        disks: Vec<XenDisk>,
        console_out: Box<dyn Write + Send>,
        console_in: Option<File>,
    ) -> Result<Self, XenServiceError> {
        let shared = Arc::new(Shared {
            memory: memory.clone(),
            channels: channels.clone(),
            grants,
            stop: EventFd::new(EFD_NONBLOCK).map_err(XenServiceError::Host)?,
            gate: Arc::new(Gate::new().map_err(XenServiceError::Host)?),
        });
        let store_port = backend_port(&channels, "xenstore", STORE_BACKEND)?;
        let console_port = backend_port(&channels, "console", CONSOLE_BACKEND)?;
        let ring_mem = GuestRingMemory::new(memory.clone(), GuestAddress(STORE_PAGE), 4096)
            .map_err(|_| XenServiceError::Page("xenstore"))?;
        let ring = StoreRing::new(ring_mem, DOMID).ok_or(XenServiceError::Page("xenstore"))?;
        let console = ConsoleBackend::new(memory, GuestAddress(CONSOLE_PAGE))
            .map_err(|_| XenServiceError::Page("console"))?;

        let mut xs = Xenstore::default();
        let vbds = guest_entries(&mut xs, disks)?;
        let xenstore = Arc::new(Mutex::new(xs));
        let mut threads = Vec::new();
        for vbd in &vbds {
            let (s, link) = (shared.clone(), vbd.link.clone());
            let name = format!("xen-vbd{}", vbd.id);
            // Made here: backend threads may not create file descriptors.
            let epoll = vbd_epoll(&shared, &link).map_err(XenServiceError::Host)?;
            shared.gate.enter();
            threads.push(
                vmcraft_sandbox::spawn(ThreadKind::PvBackend, &name.clone(), move || {
                    serve_vbd(&s, &link, &epoll, &name)
                })
                .map_err(XenServiceError::Thread)?,
            );
        }

        params.set_host(param::STORE_PFN, STORE_PAGE / 4096);
        params.set_host(param::STORE_EVTCHN, u64::from(store_port.port));
        params.set_host(param::CONSOLE_PFN, CONSOLE_PAGE / 4096);
        params.set_host(param::CONSOLE_EVTCHN, u64::from(console_port.port));

        let epoll = epoll_for(&store_port.notified, &shared.stop, &shared.gate.wake)
            .map_err(XenServiceError::Host)?;
        let mut looks = vec![store_port
            .notified
            .try_clone()
            .map_err(XenServiceError::Host)?];
        let side = Arc::new(Mutex::new(StoreSide { ring, vbds }));
        let store_thread = StoreThread {
            epoll,
            shared: shared.clone(),
            xenstore: xenstore.clone(),
            side: side.clone(),
            port: store_port,
        };
        shared.gate.enter();
        threads.push(
            vmcraft_sandbox::spawn(ThreadKind::PvBackend, "xenstore", move || {
                store_thread.run()
            })
            .map_err(XenServiceError::Thread)?,
        );

        let epoll = epoll_for(&console_port.notified, &shared.stop, &shared.gate.wake)
            .map_err(XenServiceError::Host)?;
        if let Some(input) = &console_in {
            use std::os::fd::AsRawFd;
            use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
            epoll
                .ctl(
                    ControlOperation::Add,
                    input.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, CONSOLE_INPUT),
                )
                .map_err(XenServiceError::Host)?;
        }
        looks.push(
            console_port
                .notified
                .try_clone()
                .map_err(XenServiceError::Host)?,
        );
        let console = ConsoleThread {
            shared: shared.clone(),
            console,
            port: console_port,
            out: console_out,
            input: console_in,
            pending: Vec::new(),
            epoll,
        };
        shared.gate.enter();
        threads.push(
            vmcraft_sandbox::spawn(ThreadKind::PvBackend, "xen-console", move || console.run())
                .map_err(XenServiceError::Thread)?,
        );
        Ok(XenServices {
            shared,
            threads,
            xenstore,
            side,
            looks,
        })
    }

    fn side(&self) -> std::sync::MutexGuard<'_, StoreSide> {
        self.side.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Park every service thread between requests (what each took from its ring
    /// answered) and return their state. [`resume`](Self::resume) lets them go on.
    pub fn pause(&self) -> XenServicesState {
        self.shared.gate.pause_all();
        let store = self
            .xenstore
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .store
            .clone();
        let side = self.side();
        XenServicesState {
            store,
            ring: side.ring.save(),
            vbds: side
                .vbds
                .iter()
                .map(|v| VbdState {
                    device: v.device.clone(),
                    connected: v.connected,
                })
                .collect(),
        }
    }

    /// Let the threads serve again after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.shared.gate.resume_all();
    }

    /// Put `state` back into services started (by the same set-up) on the restored
    /// memory, before the guest runs: the store, the store ring's side, each vbd's
    /// xenbus state, and each connected vbd's ring mapped and its port bound again.
    /// Call after the grant frames are placed again and before the event-channel
    /// table is restored (which then finds the vbds' ports bound). Checked as
    /// outside data; the services stay as they were on an error.
    pub fn restore(&self, state: &XenServicesState) -> Result<(), XenServiceError> {
        let bad = |what: String| XenServiceError::BadState(what);
        state
            .store
            .check()
            .map_err(|e| bad(format!("the store: {e}")))?;
        let mut side = self.side();
        if state.vbds.len() != side.vbds.len() {
            return Err(bad(format!(
                "{} vbds saved, {} here",
                state.vbds.len(),
                side.vbds.len()
            )));
        }
        for (saved, vbd) in state.vbds.iter().zip(&side.vbds) {
            if saved.device.frontend != vbd.device.frontend
                || saved.device.backend != vbd.device.backend
            {
                return Err(bad(format!(
                    "vbd {} saved at {}, here at {}",
                    vbd.id, saved.device.frontend, vbd.device.frontend
                )));
            }
        }
        side.ring
            .restore(&state.ring)
            .map_err(|e| bad(format!("the store ring: {e}")))?;
        self.xenstore
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .store = state.store.clone();
        for (saved, vbd) in state.vbds.iter().zip(side.vbds.iter_mut()) {
            vbd.device = saved.device.clone();
            if let Some(details) = saved.connected {
                connect_restored(&self.shared, vbd, details)
                    .map_err(|e| bad(format!("vbd {}: {e}", vbd.id)))?;
            }
        }
        for fd in &self.looks {
            // Saturation means a look is pending already.
            let _ = fd.write(1);
        }
        Ok(())
    }
}

impl Drop for XenServices {
    fn drop(&mut self) {
        // Saturation means a stop is pending already.
        let _ = self.shared.stop.write(1);
        // Threads parked for a snapshot go back to their loops, and see the stop.
        self.resume();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The guest's directory and one xenbus vbd per disk (the entries a toolstack
/// writes before the guest boots).
fn guest_entries(xs: &mut Xenstore, disks: Vec<XenDisk>) -> Result<Vec<Vbd>, XenServiceError> {
    use XenServiceError::Store as S;
    let home = vmcraft_pv_hypercall::xenstore::store::domain_path(DOMID);
    let store = &mut xs.store;
    store.mkdir(0, 0, home.as_bytes()).map_err(S)?;
    store
        .write(0, 0, format!("{home}/name").as_bytes(), b"vmcraft-guest")
        .map_err(S)?;
    store
        .write(
            0,
            0,
            format!("{home}/domid").as_bytes(),
            DOMID.to_string().as_bytes(),
        )
        .map_err(S)?;
    let mut vbds = Vec::new();
    for (n, disk) in disks.into_iter().enumerate() {
        let id = XVDA + 16 * n as u32;
        let image = BlockImage::open(disk.file, disk.read_only).map_err(XenServiceError::Host)?;
        let info = DeviceInfo::vbd(image.sectors(), image.read_only());
        let device = XenbusDevice::create(store, DOMID, id, &info).map_err(S)?;
        let token = format!("vbd{id}");
        store
            .watch(
                0,
                format!("{}/state", device.frontend).as_bytes(),
                token.as_bytes(),
            )
            .map_err(S)?;
        let changed = EventFd::new(EFD_NONBLOCK).map_err(XenServiceError::Host)?;
        vbds.push(Vbd {
            id,
            device,
            image: Arc::new(image),
            link: Arc::new(VbdLink {
                changed,
                notified: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(XenServiceError::Host)?),
                live: Mutex::new(None),
            }),
            ring: None,
            connected: None,
        });
    }
    // Every node of the guest's home is the guest's (the devices' directories keep
    // their own permissions).
    store
        .set_perms(
            0,
            0,
            home.as_bytes(),
            &[vmcraft_pv_hypercall::xenstore::store::Perm {
                dom: DOMID,
                access: vmcraft_pv_hypercall::xenstore::store::Access::None,
            }],
        )
        .map_err(S)?;
    Ok(vbds)
}

/// The console thread's epoll token for its input.
const CONSOLE_INPUT: u64 = 3;

/// The console's thread: the guest's output out, the input in (what the ring has no
/// room for waits, and the input is not read meanwhile).
struct ConsoleThread {
    shared: Arc<Shared>,
    console: ConsoleBackend,
    port: BackendPort,
    out: Box<dyn Write + Send>,
    input: Option<File>,
    pending: Vec<u8>,
    epoll: vmm_sys_util::epoll::Epoll,
}

impl ConsoleThread {
    fn run(mut self) {
        let s = self.shared.clone();
        let _leave = Leave(&s.gate);
        while let Some(ready) = next_ready(&self.epoll, &s.gate, "xen-console") {
            // Reading resets the counter; an error means it was zero already.
            let _ = self.port.notified.read();
            let mut notify = match self.console.drain_output(&mut *self.out) {
                Ok(n) => n > 0,
                Err(e) => {
                    log::warn!("xen-console: stops serving the guest: {}", ErrorChain(&e));
                    return;
                }
            };
            if ready.has(CONSOLE_INPUT) && self.pending.is_empty() {
                self.read_input();
            }
            if !self.pending.is_empty() {
                match self.console.feed_input(&self.pending) {
                    Ok(taken) => {
                        self.pending.drain(..taken);
                        notify |= taken > 0;
                    }
                    Err(e) => {
                        log::warn!("xen-console: stops serving the guest: {}", ErrorChain(&e));
                        return;
                    }
                }
                self.arm_input(self.pending.is_empty());
            }
            if notify {
                let _ = s.channels.notify_guest(self.port.port);
            }
        }
    }

    /// Read what the input has (at most a ring's worth); at its end, stop watching it.
    fn read_input(&mut self) {
        use std::io::Read;
        let Some(input) = self.input.as_mut() else {
            return;
        };
        let mut buf = [0u8; 1024];
        match input.read(&mut buf) {
            Ok(0) | Err(_) => {
                // End of input (or an error): the guest keeps its console output.
                use std::os::fd::AsRawFd;
                use vmm_sys_util::epoll::{ControlOperation, EpollEvent};
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    input.as_raw_fd(),
                    EpollEvent::default(),
                );
                self.input = None;
            }
            Ok(n) => self.pending.extend_from_slice(&buf[..n]),
        }
    }

    /// Watch the input (when nothing waits for the ring) or not.
    fn arm_input(&self, on: bool) {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
        if let Some(input) = &self.input {
            let events = if on { EventSet::IN } else { EventSet::empty() };
            let _ = self.epoll.ctl(
                ControlOperation::Modify,
                input.as_raw_fd(),
                EpollEvent::new(events, CONSOLE_INPUT),
            );
        }
    }
}

/// The store's thread.
struct StoreThread {
    epoll: vmm_sys_util::epoll::Epoll,
    shared: Arc<Shared>,
    xenstore: Arc<Mutex<Xenstore>>,
    side: Arc<Mutex<StoreSide>>,
    port: BackendPort,
}

impl StoreThread {
    fn run(self) {
        let s = self.shared.clone();
        let _leave = Leave(&s.gate);
        while wait(&self.epoll, &self.port.notified, &s.gate) {
            if !self.serve() {
                return;
            }
        }
        let mut side = self.side.lock().unwrap_or_else(|p| p.into_inner());
        for vbd in &mut side.vbds {
            disconnect(&s, vbd);
        }
    }

    /// Answer the guest, then act on the front ends' changes (which may make more
    /// to say to the guest: its own watches fire on the back ends' states). False if
    /// the ring is broken.
    fn serve(&self) -> bool {
        let mut xs = self.xenstore.lock().unwrap_or_else(|p| p.into_inner());
        let mut side = self.side.lock().unwrap_or_else(|p| p.into_inner());
        for _round in 0..4 {
            match side.ring.serve(&mut xs) {
                Ok(served) => {
                    log::trace!(
                        "xenstore: {} requests answered, {} reply bytes",
                        served.requests,
                        served.reply_bytes
                    );
                    if served.notify() {
                        let _ = self.shared.channels.notify_guest(self.port.port);
                    }
                }
                Err(e) => {
                    log::warn!(
                        "xenstore: the guest's ring is broken, the store stops serving it: {e}"
                    );
                    return false;
                }
            }
            let events = xs.store.take_events(0);
            if events.is_empty() {
                break;
            }
            for event in events {
                let Some(vbd) = side
                    .vbds
                    .iter_mut()
                    .find(|v| event.token == format!("vbd{}", v.id).as_bytes())
                else {
                    continue;
                };
                frontend_changed(&self.shared, &mut xs, vbd);
            }
        }
        true
    }
}

/// A vbd's front end changed state: connect or disconnect its back end.
fn frontend_changed(shared: &Arc<Shared>, xs: &mut Xenstore, vbd: &mut Vbd) {
    let action = match vbd.device.frontend_changed(&mut xs.store) {
        Ok(action) => action,
        Err(e) => {
            log::warn!("vbd {}: the front end's details are refused: {e}", vbd.id);
            return;
        }
    };
    match action {
        None => {}
        Some(Action::Disconnect) => {
            disconnect(shared, vbd);
            log::info!("vbd {}: disconnected", vbd.id);
        }
        Some(Action::Connect(details)) => match connect(shared, vbd, details) {
            Ok(()) => {
                if let Err(e) = vbd.device.connected(&mut xs.store) {
                    log::warn!("vbd {}: cannot say Connected: {e}", vbd.id);
                }
                log::info!(
                    "vbd {}: connected, ring grant {}, event channel {}, {} sectors",
                    vbd.id,
                    details.ring_ref,
                    details.event_channel,
                    vbd.image.sectors()
                );
            }
            Err(reason) => {
                log::warn!("vbd {}: cannot connect: {reason}", vbd.id);
                let _ = vbd.device.failed(&mut xs.store, &reason);
            }
        },
    }
}

/// Map the front end's ring, bind its channel, hand the backend to the vbd's thread.
fn connect(
    shared: &Arc<Shared>,
    vbd: &mut Vbd,
    details: vmcraft_pv_hypercall::xenstore::xenbus::FrontendDetails,
) -> Result<(), String> {
    disconnect(shared, vbd);
    attach(shared, vbd, details, false)
}

/// [`connect`] for a restore: the ring mapped again and the saved port bound again
/// (in a table whose saved state is restored after), the xenbus state left as saved;
/// the thread looks at the ring once, since a notification of the old process was an
/// eventfd count, not guest memory.
fn connect_restored(
    shared: &Arc<Shared>,
    vbd: &mut Vbd,
    details: vmcraft_pv_hypercall::xenstore::xenbus::FrontendDetails,
) -> Result<(), String> {
    attach(shared, vbd, details, true)?;
    let _ = vbd.link.notified.write(1);
    Ok(())
}

/// Map the ring `details` names, bind its port (as a restore binds it, or afresh),
/// and hand the backend to the vbd's thread.
fn attach(
    shared: &Arc<Shared>,
    vbd: &mut Vbd,
    details: vmcraft_pv_hypercall::xenstore::xenbus::FrontendDetails,
    restored: bool,
) -> Result<(), String> {
    let ring = shared
        .grants
        .map(details.ring_ref, true)
        .map_err(|e| format!("ring grant {}: {e}", details.ring_ref))?;
    let undo = |e: String| {
        let _ = shared.grants.unmap(ring);
        e
    };
    let backend = BlkifBackend::new(
        shared.memory.clone(),
        ring.page,
        shared.grants.clone(),
        vbd.image.clone(),
    )
    .map_err(|e| undo(format!("ring: {e}")))?;
    let port = details.event_channel;
    let (backend_id, notified) = (VBD_BACKEND + vbd.id, vbd.link.notified.clone());
    let bound = if restored {
        shared
            .channels
            .bind_backend_restored(port, backend_id, 0, notified)
    } else {
        shared
            .channels
            .bind_backend_to(port, backend_id, 0, notified)
    };
    bound.map_err(|e| undo(format!("event channel {port}: {e}")))?;
    *vbd.link.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(LiveVbd { backend, port });
    vbd.ring = Some(ring);
    vbd.connected = Some(details);
    // Saturation means the thread has a change to look at already.
    let _ = vbd.link.changed.write(1);
    Ok(())
}

/// Take the backend from the vbd's thread (once it is done with a batch) and
/// release the front end's ring.
fn disconnect(shared: &Shared, vbd: &mut Vbd) {
    let live = vbd
        .link
        .live
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(live) = live {
        let _ = shared.channels.close(live.port);
        let _ = vbd.link.changed.write(1);
    }
    if let Some(ring) = vbd.ring.take() {
        let _ = shared.grants.unmap(ring);
    }
    vbd.connected = None;
}

/// A vbd thread's epoll token for its link's changes (beside the backend's own).
const CHANGED: u64 = 3;

/// A vbd thread's epoll set: the stop, the gate, its link's changes and the front
/// end's notifications.
fn vbd_epoll(shared: &Shared, link: &VbdLink) -> std::io::Result<vmm_sys_util::epoll::Epoll> {
    epoll_over(&[
        (&shared.stop, STOP),
        (&shared.gate.wake, GATE),
        (&link.changed, CHANGED),
        (&link.notified, PORT),
    ])
}

/// A vbd's thread: wait for the store thread's changes and the front end's
/// notifications; serve the ring while connected.
fn serve_vbd(shared: &Shared, link: &VbdLink, epoll: &vmm_sys_util::epoll::Epoll, name: &str) {
    let _leave = Leave(&shared.gate);
    while next_ready(epoll, &shared.gate, name).is_some() {
        // Reading resets a counter; an error means it was zero already.
        let _ = link.changed.read();
        let _ = link.notified.read();
        let mut live = link.live.lock().unwrap_or_else(|p| p.into_inner());
        let Some(l) = live.as_mut() else {
            continue;
        };
        // After a connect, requests may be waiting without a notification: the
        // ring is looked at on either event.
        match l.backend.process() {
            Ok(done) => {
                if done.notify {
                    let _ = shared.channels.notify_guest(l.port);
                }
            }
            Err(e) => {
                log::warn!("{name}: stops serving the guest: {}", ErrorChain(&e));
                *live = None;
            }
        }
    }
}
