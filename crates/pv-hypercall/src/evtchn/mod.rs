//! Event channels, Xen's 2-level ABI: a shared-info page in guest memory holds the
//! pending and mask bitmaps (4096 ports) and, per vCPU, `evtchn_upcall_pending`,
//! `evtchn_upcall_mask` and the `evtchn_pending_sel` selector.
//!
//! Raising a port sets its pending bit; if the bit was clear and the port is not
//! masked, the port's word is set in the vCPU's selector, `upcall_pending` is set and,
//! unless the vCPU masks upcalls, the upcall is delivered (an interrupt through an
//! irqfd, on the vector the embedding program chose). Unmasking a pending port raises
//! it again.
//!
//! The guest's side of a channel is a port in this table; the VMM's side (a backend)
//! is an eventfd the guest's `send` signals, which an event-manager subscriber can
//! wait on. Operations: `alloc_unbound`, `bind_interdomain` (connect a guest port to
//! a backend), `bind_virq` and `bind_ipi` (ports the VMM or the guest itself raises
//! on one vCPU), `bind_vcpu`, `send`, `close`, `unmask`, `status`. `init_control`
//! (the FIFO ABI) is refused with `ENOSYS`, so a guest such as Linux keeps 2-level.
//!
//! The shared-info page is where the embedding program says
//! ([`EventChannels::new`]) or, for a guest that chooses (an HVM guest's
//! `XENMEM_add_to_physmap`), nowhere until [`EventChannels::place_shared_info`]. A
//! vCPU's `vcpu_info` is its slot in the shared-info page until the guest registers
//! another place ([`EventChannels::register_vcpu_info`], `VCPUOP_register_vcpu_info`).

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileMemory};
use vmcraft_memory::GuestMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Number of Xen's virtual IRQs (`NR_VIRQS`).
pub const NR_VIRQS: u32 = 24;
/// Ports in the 2-level ABI (64 words of 64 bits).
pub const MAX_PORTS: u32 = 4096;
/// vCPUs the shared-info page has room for.
pub const MAX_VCPUS: u32 = 32;
/// Size of one `vcpu_info`.
pub const VCPU_INFO_SIZE: u64 = 64;
/// Offset of `evtchn_pending[]` in the shared-info page.
pub const PENDING_OFFSET: u64 = VCPU_INFO_SIZE * MAX_VCPUS as u64;
/// Offset of `evtchn_mask[]`.
pub const MASK_OFFSET: u64 = PENDING_OFFSET + 8 * 64;
/// Offsets inside a `vcpu_info`.
const UPCALL_PENDING: u64 = 0;
const UPCALL_MASK: u64 = 1;
const PENDING_SEL: u64 = 8;

/// Errors from event-channel operations; each maps to the errno a guest sees.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EvtchnError {
    /// A port outside the table or not in the state the operation needs.
    #[error("port {0} is not valid for this operation")]
    BadPort(u32),
    /// No free port.
    #[error("no free event-channel port")]
    NoFreePort,
    /// A vCPU outside the shared-info page.
    #[error("vCPU {0} has no vcpu_info")]
    BadVcpu(u32),
    /// A `vcpu_info` that is not 64 bytes of guest memory in one page.
    #[error("a vcpu_info at {0:#x} is not 64 aligned bytes of guest memory within one page")]
    BadVcpuInfo(u64),
    /// A virtual IRQ past the last.
    #[error("virtual IRQ {0} does not exist")]
    BadVirq(u32),
    /// A virtual IRQ bound already.
    #[error("virtual IRQ {virq} of vCPU {vcpu} is bound already")]
    VirqBound {
        /// The virtual IRQ.
        virq: u32,
        /// The vCPU.
        vcpu: u32,
    },
    /// The shared-info page is not in guest memory.
    #[error("the shared-info page at {0:#x} is outside guest memory")]
    BadSharedInfo(u64),
    /// A saved table that does not fit this one (its ports, or the backends bound
    /// here).
    #[error("saved event-channel port {port}: {reason}")]
    BadState {
        /// The port.
        port: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// The backend's eventfd could not be made (the value is the OS error number).
    #[error("cannot create a backend eventfd: {}", std::io::Error::from_raw_os_error(*.0))]
    EventFd(i32),
}

/// The OS error number of `e` (EIO for an error that has none).
fn os_errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(5)
}

impl EvtchnError {
    /// The errno a hypercall returns for it.
    pub fn errno(&self) -> i64 {
        match self {
            EvtchnError::BadPort(_)
            | EvtchnError::BadVcpu(_)
            | EvtchnError::BadVirq(_)
            | EvtchnError::BadState { .. } => crate::hypercall::errno::EINVAL,
            EvtchnError::VirqBound { .. } => 17, // EEXIST
            EvtchnError::BadVcpuInfo(_) => crate::hypercall::errno::EFAULT,
            EvtchnError::NoFreePort => 28, // ENOSPC
            EvtchnError::BadSharedInfo(_) => crate::hypercall::errno::EFAULT,
            EvtchnError::EventFd(_) => 12, // ENOMEM
        }
    }
}

/// A port's state, as `status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortStatus {
    /// Not allocated.
    Closed,
    /// Allocated, waiting for the other end (`remote_dom` may bind).
    Unbound {
        /// Who may bind.
        remote_dom: u16,
    },
    /// Connected to a backend.
    Interdomain {
        /// The backend's id.
        backend: u32,
    },
    /// Bound to a virtual IRQ of one vCPU.
    Virq {
        /// The virtual IRQ.
        virq: u32,
        /// The vCPU.
        vcpu: u32,
    },
    /// An inter-processor event of the guest, to one vCPU.
    Ipi {
        /// The vCPU.
        vcpu: u32,
    },
}

/// Delivers the upcall to the guest (an irqfd in a VMM; a counter in tests).
pub trait Upcall: Send + Sync {
    /// Interrupt vCPU `vcpu`.
    fn raise(&self, vcpu: u32);
    /// Whether an upcall to `vcpu` could not be delivered and is still owed (an
    /// interrupt controller not yet enabled took none): the next event for that vCPU
    /// raises it again even if the guest has it flagged already. A delivery that
    /// cannot fail owes nothing.
    fn owed(&self, vcpu: u32) -> bool {
        let _ = vcpu;
        false
    }
}

impl Upcall for EventFd {
    fn raise(&self, _vcpu: u32) {
        // Saturation means an interrupt is pending already.
        let _ = self.write(1);
    }
}

/// The VMM's end of a channel: `notified` is signalled each time the guest sends.
#[derive(Debug)]
pub struct BackendPort {
    /// The backend's id (its own numbering).
    pub backend: u32,
    /// The guest's port.
    pub port: u32,
    /// Signalled by the guest's `send`.
    pub notified: EventFd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Slot {
    Free,
    Unbound { remote_dom: u16 },
    Bound { backend: u32, vcpu: u32 },
    Virq { virq: u32, vcpu: u32 },
    Ipi { vcpu: u32 },
}

/// Where nothing is placed yet.
const UNPLACED: u64 = u64::MAX;

/// Where a guest placed its event-channel pages ([`EventChannels::placement`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    /// The shared-info page.
    pub shared_info: Option<u64>,
    /// Each vCPU's registered `vcpu_info`.
    pub vcpu_info: Vec<Option<u64>>,
}

/// The event-channel table in a snapshot: every port that is not free. The pending
/// and mask bits live in the shared-info page, in guest memory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChannelsState {
    ports: Vec<(u32, Slot)>,
}

impl vmcraft_snapshot::Versioned for ChannelsState {
    const VERSION: u32 = 1;
}

struct Inner {
    slots: Vec<Slot>,
    backends: Vec<Option<Arc<EventFd>>>,
}

/// The event channels of one guest.
pub struct EventChannels {
    memory: GuestMemory,
    /// The shared-info page's address, or [`UNPLACED`].
    shared_info: AtomicU64,
    /// Each vCPU's registered `vcpu_info`, or [`UNPLACED`] for its slot in the
    /// shared-info page.
    vcpu_info: Vec<AtomicU64>,
    upcall: Arc<dyn Upcall>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for EventChannels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventChannels")
            .field("shared_info", &self.shared_info.load(SeqCst))
            .finish_non_exhaustive()
    }
}

impl EventChannels {
    /// Channels whose shared-info page is at `shared_info` (one 4 KiB page inside
    /// guest memory), delivering upcalls through `upcall`. Port 0 is reserved, as in
    /// Xen.
    pub fn new(
        memory: GuestMemory,
        shared_info: GuestAddress,
        upcall: Arc<dyn Upcall>,
    ) -> Result<Self, EvtchnError> {
        let channels = Self::unplaced(memory, upcall);
        channels.check_shared_info(shared_info)?;
        channels.shared_info.store(shared_info.0, SeqCst);
        Ok(channels)
    }

    /// Channels whose shared-info page the guest places later
    /// ([`place_shared_info`](Self::place_shared_info)); until then nothing can be
    /// delivered.
    pub fn unplaced(memory: GuestMemory, upcall: Arc<dyn Upcall>) -> Self {
        let mut slots = vec![Slot::Free; MAX_PORTS as usize];
        slots[0] = Slot::Unbound {
            remote_dom: u16::MAX,
        };
        EventChannels {
            memory,
            shared_info: AtomicU64::new(UNPLACED),
            vcpu_info: (0..MAX_VCPUS).map(|_| AtomicU64::new(UNPLACED)).collect(),
            upcall,
            inner: Mutex::new(Inner {
                slots,
                backends: Vec::new(),
            }),
        }
    }

    fn check_shared_info(&self, at: GuestAddress) -> Result<(), EvtchnError> {
        if !at.0.is_multiple_of(4096) || !self.memory.check_range(at, 4096) {
            return Err(EvtchnError::BadSharedInfo(at.0));
        }
        Ok(())
    }

    /// Put the shared-info page at `at` (page aligned, in guest memory), as a fresh
    /// page: zeroed, every port unmasked and not pending. The vCPUs' `vcpu_info` slots
    /// move with it unless registered elsewhere.
    pub fn place_shared_info(&self, at: GuestAddress) -> Result<(), EvtchnError> {
        self.check_shared_info(at)?;
        self.memory
            .write_slice(&[0u8; 4096], at)
            .map_err(|_| EvtchnError::BadSharedInfo(at.0))?;
        self.shared_info.store(at.0, SeqCst);
        Ok(())
    }

    /// Where the guest placed its shared-info page and each vCPU's `vcpu_info`
    /// (`None`: not placed, or in the shared-info page), for a snapshot.
    pub fn placement(&self) -> Placement {
        let at = |a: &AtomicU64| Some(a.load(SeqCst)).filter(|&a| a != UNPLACED);
        Placement {
            shared_info: at(&self.shared_info),
            vcpu_info: self.vcpu_info.iter().map(at).collect(),
        }
    }

    /// Put back a snapshot's [`Placement`] without touching guest memory (the pages
    /// are in the restored memory). Checked as [`place_shared_info`] and
    /// [`register_vcpu_info`] check a guest's; on an error nothing changes.
    ///
    /// [`place_shared_info`]: Self::place_shared_info
    /// [`register_vcpu_info`]: Self::register_vcpu_info
    pub fn restore_placement(&self, placement: &Placement) -> Result<(), EvtchnError> {
        if let Some(at) = placement.shared_info {
            self.check_shared_info(GuestAddress(at))?;
        }
        if placement.vcpu_info.len() > self.vcpu_info.len() {
            return Err(EvtchnError::BadVcpu(placement.vcpu_info.len() as u32));
        }
        for at in placement.vcpu_info.iter().flatten() {
            if !at.is_multiple_of(8)
                || at % 4096 + VCPU_INFO_SIZE > 4096
                || !self
                    .memory
                    .check_range(GuestAddress(*at), VCPU_INFO_SIZE as usize)
            {
                return Err(EvtchnError::BadVcpuInfo(*at));
            }
        }
        self.shared_info
            .store(placement.shared_info.unwrap_or(UNPLACED), SeqCst);
        for (slot, at) in self.vcpu_info.iter().zip(&placement.vcpu_info) {
            slot.store(at.unwrap_or(UNPLACED), SeqCst);
        }
        Ok(())
    }

    /// Where the shared-info page is, if placed.
    pub fn shared_info(&self) -> Option<GuestAddress> {
        let at = self.shared_info.load(SeqCst);
        (at != UNPLACED).then_some(GuestAddress(at))
    }

    /// `VCPUOP_register_vcpu_info`: `vcpu`'s `vcpu_info` moves to `at` (64 bytes
    /// inside one page of guest memory). Its contents move with it; then, as Xen
    /// does, every selector bit and `upcall_pending` are set and an upcall is
    /// raised, so the guest rescans and loses nothing.
    pub fn register_vcpu_info(&self, vcpu: u32, at: GuestAddress) -> Result<(), EvtchnError> {
        let slot = self
            .vcpu_info
            .get(vcpu as usize)
            .ok_or(EvtchnError::BadVcpu(vcpu))?;
        let bad = EvtchnError::BadVcpuInfo(at.0);
        if !at.0.is_multiple_of(8)
            || at.0 % 4096 + VCPU_INFO_SIZE > 4096
            || !self.memory.check_range(at, VCPU_INFO_SIZE as usize)
        {
            return Err(bad);
        }
        let mut old = [0u8; VCPU_INFO_SIZE as usize];
        if let Some(from) = self.vcpu_addr(vcpu, 0) {
            // An unplaced shared-info page has nothing to move.
            let _ = self.memory.read_slice(&mut old, from);
        }
        self.memory.write_slice(&old, at).map_err(|_| bad)?;
        slot.store(at.0, SeqCst);
        self.update_word(GuestAddress(at.0 + PENDING_SEL), |w| {
            w.store(u64::MAX, SeqCst)
        });
        let _ = self
            .memory
            .store(1u8, GuestAddress(at.0 + UPCALL_PENDING), SeqCst);
        self.upcall.raise(vcpu);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn word_addr(&self, base: u64, port: u32) -> Option<GuestAddress> {
        let page = self.shared_info()?;
        Some(GuestAddress(page.0 + base + 8 * u64::from(port / 64)))
    }

    fn vcpu_addr(&self, vcpu: u32, field: u64) -> Option<GuestAddress> {
        match self.vcpu_info.get(vcpu as usize)?.load(SeqCst) {
            UNPLACED => {
                let page = self.shared_info()?;
                Some(GuestAddress(
                    page.0 + VCPU_INFO_SIZE * u64::from(vcpu) + field,
                ))
            }
            at => Some(GuestAddress(at + field)),
        }
    }

    /// `f` on the live 64-bit word at `addr` (the guest changes these words
    /// concurrently); `None` if it is not in guest memory.
    fn with_word<R>(
        &self,
        addr: Option<GuestAddress>,
        f: impl FnOnce(&AtomicU64) -> R,
    ) -> Option<R> {
        let slice = self.memory.get_slice(addr?, 8).ok()?;
        let word = slice.get_atomic_ref::<AtomicU64>(0).ok()?;
        Some(f(word))
    }

    /// [`EventChannels::with_word`] for an `f` that changes the word: its page is
    /// marked dirty in guest memory's bitmap (an atomic through a reference marks
    /// nothing by itself), so a migration copies it again.
    fn update_word<R>(
        &self,
        addr: impl Into<Option<GuestAddress>>,
        f: impl FnOnce(&AtomicU64) -> R,
    ) -> Option<R> {
        use vm_memory::bitmap::Bitmap;
        let slice = self.memory.get_slice(addr.into()?, 8).ok()?;
        let word = slice.get_atomic_ref::<AtomicU64>(0).ok()?;
        let result = f(word);
        slice.bitmap().mark_dirty(0, 8);
        Some(result)
    }

    fn raise(&self, port: u32, vcpu: u32) {
        let deliver = protocol::raise(self, port, vcpu) || self.upcall.owed(vcpu);
        log::trace!("event channel {port} to vCPU {vcpu}: upcall {deliver}");
        if deliver {
            self.upcall.raise(vcpu);
        }
    }

    /// The table, for a snapshot.
    pub fn save_state(&self) -> ChannelsState {
        ChannelsState {
            ports: self
                .lock()
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| **s != Slot::Free)
                .map(|(p, s)| (p as u32, *s))
                .collect(),
        }
    }

    /// Put back a saved table. The backends bound here (by the same set-up as when it
    /// was saved) must be bound to the same ports, and nothing else may be bound: a
    /// saved port bound to a backend that does not exist here, a port out of range or
    /// listed twice is refused, and the table is left as it was.
    pub fn restore_state(&self, state: &ChannelsState) -> Result<(), EvtchnError> {
        let mut inner = self.lock();
        let mut slots = vec![Slot::Free; MAX_PORTS as usize];
        for &(port, slot) in &state.ports {
            let bad = |reason| EvtchnError::BadState { port, reason };
            let entry = slots
                .get_mut(port as usize)
                .ok_or(bad("past the last port"))?;
            if *entry != Slot::Free {
                return Err(bad("listed twice"));
            }
            match slot {
                Slot::Free => return Err(bad("listed as free")),
                Slot::Bound { vcpu, .. } | Slot::Virq { vcpu, .. } | Slot::Ipi { vcpu }
                    if vcpu >= MAX_VCPUS =>
                {
                    return Err(bad("bound to a vCPU past the last"))
                }
                Slot::Virq { virq, .. } if virq >= NR_VIRQS => {
                    return Err(bad("bound to a virtual IRQ past the last"))
                }
                Slot::Bound { .. } if inner.slots[port as usize] != slot => {
                    return Err(bad("bound to a backend this machine does not bind there"))
                }
                _ => {}
            }
            *entry = slot;
        }
        for (port, (now, saved)) in inner.slots.iter().zip(&slots).enumerate() {
            if matches!(now, Slot::Bound { .. }) && now != saved {
                return Err(EvtchnError::BadState {
                    port: port as u32,
                    reason: "a backend's port the snapshot does not have",
                });
            }
        }
        inner.slots = slots;
        Ok(())
    }

    /// `alloc_unbound`: a new port that `remote_dom` may bind to.
    pub fn alloc_unbound(&self, remote_dom: u16) -> Result<u32, EvtchnError> {
        let mut inner = self.lock();
        let port = inner
            .slots
            .iter()
            .position(|s| *s == Slot::Free)
            .ok_or(EvtchnError::NoFreePort)?;
        inner.slots[port] = Slot::Unbound { remote_dom };
        Ok(port as u32)
    }

    /// `bind_interdomain` from the VMM's side: connect the guest's unbound `port`
    /// to backend `backend`, with upcalls to `vcpu`. Returns the backend's end.
    pub fn bind_backend(
        &self,
        port: u32,
        backend: u32,
        vcpu: u32,
    ) -> Result<BackendPort, EvtchnError> {
        if vcpu >= MAX_VCPUS {
            return Err(EvtchnError::BadVcpu(vcpu));
        }
        let mut inner = self.lock();
        match inner.slots.get(port as usize) {
            Some(Slot::Unbound { .. }) if port != 0 => {}
            _ => return Err(EvtchnError::BadPort(port)),
        }
        let notified =
            EventFd::new(EFD_NONBLOCK).map_err(|e| EvtchnError::EventFd(os_errno(&e)))?;
        let ours = notified
            .try_clone()
            .map_err(|e| EvtchnError::EventFd(os_errno(&e)))?;
        Self::bind_locked(&mut inner, port, backend, vcpu, Arc::new(ours));
        Ok(BackendPort {
            backend,
            port,
            notified,
        })
    }

    /// [`bind_backend`](Self::bind_backend) with the backend's own eventfd, which the
    /// guest's `send` signals: for a backend that binds again and again (each time a
    /// front end connects) from a thread that may not create file descriptors.
    pub fn bind_backend_to(
        &self,
        port: u32,
        backend: u32,
        vcpu: u32,
        notified: Arc<EventFd>,
    ) -> Result<(), EvtchnError> {
        self.bind_if(port, backend, vcpu, notified, |slot| {
            matches!(slot, Slot::Unbound { .. })
        })
    }

    /// Bind `port` to a backend as a snapshot had it (a restore, before
    /// [`restore_state`](Self::restore_state) checks the table against it): the port
    /// may be free in this table.
    pub fn bind_backend_restored(
        &self,
        port: u32,
        backend: u32,
        vcpu: u32,
        notified: Arc<EventFd>,
    ) -> Result<(), EvtchnError> {
        self.bind_if(port, backend, vcpu, notified, |slot| {
            matches!(slot, Slot::Free | Slot::Unbound { .. })
        })
    }

    fn bind_if(
        &self,
        port: u32,
        backend: u32,
        vcpu: u32,
        notified: Arc<EventFd>,
        bindable: impl Fn(&Slot) -> bool,
    ) -> Result<(), EvtchnError> {
        if vcpu >= MAX_VCPUS {
            return Err(EvtchnError::BadVcpu(vcpu));
        }
        let mut inner = self.lock();
        match inner.slots.get(port as usize) {
            Some(slot) if port != 0 && bindable(slot) => {}
            _ => return Err(EvtchnError::BadPort(port)),
        }
        Self::bind_locked(&mut inner, port, backend, vcpu, notified);
        Ok(())
    }

    fn bind_locked(inner: &mut Inner, port: u32, backend: u32, vcpu: u32, fd: Arc<EventFd>) {
        inner.slots[port as usize] = Slot::Bound { backend, vcpu };
        if inner.backends.len() <= port as usize {
            inner.backends.resize_with(port as usize + 1, || None);
        }
        inner.backends[port as usize] = Some(fd);
    }

    /// `send` from the guest: signal the backend bound to `port`.
    pub fn send(&self, port: u32) -> Result<(), EvtchnError> {
        let inner = self.lock();
        log::trace!(
            "event channel {port}: send ({:?})",
            inner.slots.get(port as usize)
        );
        match (
            inner.slots.get(port as usize),
            inner.backends.get(port as usize),
        ) {
            (Some(Slot::Bound { .. }), Some(Some(fd))) => {
                // Saturation means the backend has a notification pending already.
                let _ = fd.write(1);
                Ok(())
            }
            // As Xen: a send on an unbound port goes nowhere.
            (Some(Slot::Unbound { .. }), _) if port != 0 => Ok(()),
            (Some(&Slot::Ipi { vcpu }), _) => {
                drop(inner);
                self.raise(port, vcpu);
                Ok(())
            }
            _ => Err(EvtchnError::BadPort(port)),
        }
    }

    /// A free port, taken for `slot`.
    fn take_port(&self, inner: &mut Inner, slot: Slot) -> Result<u32, EvtchnError> {
        let port = inner
            .slots
            .iter()
            .position(|s| *s == Slot::Free)
            .ok_or(EvtchnError::NoFreePort)?;
        inner.slots[port] = slot;
        Ok(port as u32)
    }

    /// `bind_virq`: a port for virtual IRQ `virq` of `vcpu`. A virtual IRQ is bound
    /// once per vCPU.
    pub fn bind_virq(&self, virq: u32, vcpu: u32) -> Result<u32, EvtchnError> {
        if virq >= NR_VIRQS {
            return Err(EvtchnError::BadVirq(virq));
        }
        if vcpu >= MAX_VCPUS {
            return Err(EvtchnError::BadVcpu(vcpu));
        }
        let mut inner = self.lock();
        if inner.slots.contains(&Slot::Virq { virq, vcpu }) {
            return Err(EvtchnError::VirqBound { virq, vcpu });
        }
        self.take_port(&mut inner, Slot::Virq { virq, vcpu })
    }

    /// `bind_ipi`: a port the guest's `send` raises on `vcpu`.
    pub fn bind_ipi(&self, vcpu: u32) -> Result<u32, EvtchnError> {
        if vcpu >= MAX_VCPUS {
            return Err(EvtchnError::BadVcpu(vcpu));
        }
        self.take_port(&mut self.lock(), Slot::Ipi { vcpu })
    }

    /// `bind_vcpu`: notifications of `port` (bound to a backend, or unbound) go to
    /// `vcpu` from now on. Per-vCPU ports (virtual IRQs, IPIs) stay where they are.
    pub fn bind_vcpu(&self, port: u32, vcpu: u32) -> Result<(), EvtchnError> {
        if vcpu >= MAX_VCPUS {
            return Err(EvtchnError::BadVcpu(vcpu));
        }
        let mut inner = self.lock();
        match inner.slots.get_mut(port as usize) {
            Some(Slot::Bound { vcpu: v, .. }) => {
                *v = vcpu;
                Ok(())
            }
            Some(Slot::Unbound { .. }) if port != 0 => Ok(()),
            _ => Err(EvtchnError::BadPort(port)),
        }
    }

    /// Deliver `vcpu`'s upcall again if its `upcall_pending` is set (and upcalls are
    /// not masked): what Xen does when a guest registers the vector upcalls come on,
    /// so that events flagged before (a `vcpu_info` registration flags them all) are
    /// not left waiting for an upcall that could not be delivered. Returns whether it
    /// delivered.
    pub fn kick(&self, vcpu: u32) -> bool {
        let pending = self
            .vcpu_addr(vcpu, UPCALL_PENDING)
            .and_then(|at| self.memory.load::<u8>(at, SeqCst).ok())
            .is_some_and(|p| p != 0);
        let deliver = pending && !protocol::Words::upcall_masked(self, vcpu);
        if deliver {
            self.upcall.raise(vcpu);
        }
        deliver
    }

    /// Raise virtual IRQ `virq` on `vcpu`, if the guest bound it; returns whether
    /// it had.
    pub fn raise_virq(&self, virq: u32, vcpu: u32) -> bool {
        let port = self
            .lock()
            .slots
            .iter()
            .position(|s| *s == Slot::Virq { virq, vcpu });
        match port {
            Some(port) => {
                self.raise(port as u32, vcpu);
                true
            }
            None => false,
        }
    }

    /// A backend notifies the guest on `port`.
    pub fn notify_guest(&self, port: u32) -> Result<(), EvtchnError> {
        let vcpu = match self.lock().slots.get(port as usize) {
            Some(Slot::Bound { vcpu, .. }) => *vcpu,
            _ => return Err(EvtchnError::BadPort(port)),
        };
        self.raise(port, vcpu);
        Ok(())
    }

    /// `close`: free `port` (a bound backend's eventfd stops being signalled).
    pub fn close(&self, port: u32) -> Result<(), EvtchnError> {
        let mut inner = self.lock();
        match inner.slots.get(port as usize) {
            Some(Slot::Free) | None => return Err(EvtchnError::BadPort(port)),
            _ if port == 0 => return Err(EvtchnError::BadPort(port)),
            _ => {}
        }
        inner.slots[port as usize] = Slot::Free;
        if let Some(b) = inner.backends.get_mut(port as usize) {
            *b = None;
        }
        Ok(())
    }

    /// `unmask`: clear `port`'s mask bit and, if it is pending, raise it again.
    pub fn unmask(&self, port: u32) -> Result<(), EvtchnError> {
        let vcpu = match self.lock().slots.get(port as usize) {
            Some(Slot::Bound { vcpu, .. } | Slot::Virq { vcpu, .. } | Slot::Ipi { vcpu }) => *vcpu,
            Some(Slot::Unbound { .. }) if port != 0 => 0,
            _ => return Err(EvtchnError::BadPort(port)),
        };
        self.update_word(self.word_addr(MASK_OFFSET, port), |w| {
            w.fetch_and(!(1u64 << (port % 64)), SeqCst)
        });
        let pending = self.with_word(self.word_addr(PENDING_OFFSET, port), |w| {
            w.load(SeqCst) & (1u64 << (port % 64)) != 0
        });
        if pending == Some(true) && (protocol::deliver(self, port, vcpu) || self.upcall.owed(vcpu))
        {
            self.upcall.raise(vcpu);
        }
        Ok(())
    }

    /// `status` of `port`.
    pub fn status(&self, port: u32) -> Result<PortStatus, EvtchnError> {
        match self.lock().slots.get(port as usize) {
            None => Err(EvtchnError::BadPort(port)),
            Some(Slot::Free) => Ok(PortStatus::Closed),
            Some(Slot::Unbound { remote_dom }) => Ok(PortStatus::Unbound {
                remote_dom: *remote_dom,
            }),
            Some(Slot::Bound { backend, .. }) => Ok(PortStatus::Interdomain { backend: *backend }),
            Some(&Slot::Virq { virq, vcpu }) => Ok(PortStatus::Virq { virq, vcpu }),
            Some(&Slot::Ipi { vcpu }) => Ok(PortStatus::Ipi { vcpu }),
        }
    }
}

/// Xen's hypercall number for event-channel operations.
pub const HYPERVISOR_EVENT_CHANNEL_OP: u64 = 32;

/// Xen's `EVTCHNOP_*` commands this table implements (the command is in `rdi`, a
/// pointer to its argument struct in `rsi`).
pub mod op {
    /// `struct evtchn_bind_virq { virq, vcpu, port (out) }`.
    pub const BIND_VIRQ: u64 = 1;
    /// `struct evtchn_bind_ipi { vcpu, port (out) }`.
    pub const BIND_IPI: u64 = 7;
    /// `struct evtchn_bind_vcpu { port, vcpu }`.
    pub const BIND_VCPU: u64 = 8;
    /// `struct evtchn_init_control`: the FIFO ABI, which this table refuses.
    pub const INIT_CONTROL: u64 = 11;
    /// `struct evtchn_close { port }`.
    pub const CLOSE: u64 = 3;
    /// `struct evtchn_send { port }`.
    pub const SEND: u64 = 4;
    /// `struct evtchn_status { dom, port, status (out), vcpu (out), u (out) }`.
    pub const STATUS: u64 = 5;
    /// `struct evtchn_alloc_unbound { dom, remote_dom, port (out) }`.
    pub const ALLOC_UNBOUND: u64 = 6;
    /// `struct evtchn_unmask { port }`.
    pub const UNMASK: u64 = 9;
}

/// `EVTCHNSTAT_*` values `status` writes.
mod stat {
    pub const CLOSED: u32 = 0;
    pub const UNBOUND: u32 = 1;
    pub const INTERDOMAIN: u32 = 2;
    pub const VIRQ: u32 = 4;
    pub const IPI: u32 = 5;
}

impl EventChannels {
    /// Register `HYPERVISOR_event_channel_op` (32) in `table`, serving the guest's
    /// `alloc_unbound`, `send`, `close`, `unmask` and `status` with Xen's argument
    /// structs.
    pub fn register_hypercalls(
        self: &Arc<Self>,
        table: &mut crate::hypercall::HypercallTable,
    ) -> Result<(), crate::hypercall::TableError> {
        table.register_op(self.clone())
    }

    fn hypercall(
        &self,
        ctx: &crate::hypercall::HypercallContext<'_>,
        cmd: u64,
        arg: u64,
    ) -> Result<u64, crate::hypercall::HypercallFault> {
        use crate::hypercall::HypercallFault;
        let invalid = |e: EvtchnError| HypercallFault::Invalid {
            index: 1,
            value: u64::from(match e {
                EvtchnError::BadPort(p) | EvtchnError::BadVcpu(p) => p,
                _ => u32::MAX,
            }),
        };
        use vmcraft_pv_wire::xen::{
            EvtchnAllocUnbound, EvtchnBindIpi, EvtchnBindVcpu, EvtchnBindVirq, EvtchnPort,
            EvtchnStatus,
        };
        let port_arg =
            || -> Result<u32, HypercallFault> { ctx.read_obj::<EvtchnPort>(arg).map(|p| p.port) };
        match cmd {
            op::ALLOC_UNBOUND => {
                let mut a: EvtchnAllocUnbound = ctx.read_obj(arg)?;
                a.port = self.alloc_unbound(a.remote_dom).map_err(invalid)?;
                ctx.write_obj(arg, &a)?;
                Ok(0)
            }
            op::BIND_VIRQ => {
                let mut a: EvtchnBindVirq = ctx.read_obj(arg)?;
                a.port = self.bind_virq(a.virq, a.vcpu).map_err(invalid)?;
                ctx.write_obj(arg, &a)?;
                Ok(0)
            }
            op::BIND_IPI => {
                let mut a: EvtchnBindIpi = ctx.read_obj(arg)?;
                a.port = self.bind_ipi(a.vcpu).map_err(invalid)?;
                ctx.write_obj(arg, &a)?;
                Ok(0)
            }
            op::BIND_VCPU => {
                let a: EvtchnBindVcpu = ctx.read_obj(arg)?;
                self.bind_vcpu(a.port, a.vcpu).map(|_| 0).map_err(invalid)
            }
            op::SEND => self.send(port_arg()?).map(|_| 0).map_err(invalid),
            op::CLOSE => self.close(port_arg()?).map(|_| 0).map_err(invalid),
            op::UNMASK => self.unmask(port_arg()?).map(|_| 0).map_err(invalid),
            op::STATUS => {
                let mut a: EvtchnStatus = ctx.read_obj(arg)?;
                let (status, vcpu, extra) = match self.status(a.port).map_err(invalid)? {
                    PortStatus::Closed => (stat::CLOSED, 0, 0u64),
                    PortStatus::Unbound { remote_dom } => (stat::UNBOUND, 0, u64::from(remote_dom)),
                    PortStatus::Interdomain { backend } => {
                        (stat::INTERDOMAIN, 0, u64::from(backend))
                    }
                    PortStatus::Virq { virq, vcpu } => (stat::VIRQ, vcpu, u64::from(virq)),
                    PortStatus::Ipi { vcpu } => (stat::IPI, vcpu, 0),
                };
                (a.status, a.vcpu, a.detail) = (status, vcpu, extra);
                ctx.write_obj(arg, &a)?;
                Ok(0)
            }
            // INIT_CONTROL and every other command: not served, as Xen answers
            // what it does not know.
            other => Err(HypercallFault::Unsupported(other)),
        }
    }
}

impl protocol::Words for EventChannels {
    fn pending_fetch_or(&self, word: u32, mask: u64) -> u64 {
        // A word outside memory reads as already set: nothing is delivered.
        self.update_word(self.word_addr(PENDING_OFFSET, 64 * word), |w| {
            w.fetch_or(mask, SeqCst)
        })
        .unwrap_or(mask)
    }
    fn mask_load(&self, word: u32) -> u64 {
        self.with_word(self.word_addr(MASK_OFFSET, 64 * word), |w| w.load(SeqCst))
            .unwrap_or(u64::MAX)
    }
    fn selector_fetch_or(&self, vcpu: u32, mask: u64) -> u64 {
        self.update_word(self.vcpu_addr(vcpu, PENDING_SEL), |w| {
            w.fetch_or(mask, SeqCst)
        })
        .unwrap_or(mask)
    }
    fn set_upcall_pending(&self, vcpu: u32) {
        if let Some(at) = self.vcpu_addr(vcpu, UPCALL_PENDING) {
            let _ = self.memory.store(1u8, at, SeqCst);
        }
    }
    fn upcall_masked(&self, vcpu: u32) -> bool {
        self.vcpu_addr(vcpu, UPCALL_MASK)
            .and_then(|at| self.memory.load::<u8>(at, SeqCst).ok())
            .is_none_or(|m| m != 0)
    }
}

mod protocol;

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_tests;

impl crate::hypercall::OpHypercall for EventChannels {
    const NR: u64 = HYPERVISOR_EVENT_CHANNEL_OP;
    const NAME: &'static str = "event_channel_op";
    fn op(
        &self,
        ctx: &crate::hypercall::HypercallContext<'_>,
        command: u64,
        arg: u64,
    ) -> Result<u64, crate::hypercall::HypercallFault> {
        self.hypercall(ctx, command, arg)
    }
}
