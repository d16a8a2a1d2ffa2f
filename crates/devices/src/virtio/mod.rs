//! Virtio devices over the virtio-mmio transport (version 2).
//!
//! * [`mmio::MmioTransport`]: the register model a guest driver talks to: feature
//!   negotiation, the status state machine, queue setup with validation, config space,
//!   interrupt status and acknowledge, reset. Put it on the MMIO bus.
//! * [`VirtioDevice`]: what a device implements; the transport activates it with its
//!   queues once the driver sets DRIVER_OK, and resets it when the driver writes 0.
//! * [`Interrupt`]: the device's interrupt status and its irqfd, or its MSI-X vectors (one
//!   per queue, [`Interrupt::queue`]); a device that meets a
//!   guest protocol error calls [`Interrupt::device_error`], which sets NEEDS_RESET and
//!   raises a configuration interrupt, and stops serving that device only.
//! * [`block::Block`]: virtio-blk on a raw image file, served on its own I/O thread.
//! * [`rng::Rng`]: virtio-rng from the host's getrandom.
//! * [`balloon::Balloon`]: virtio-balloon: inflate, deflate, statistics and free page
//!   reporting, the pages given back freed on the host.
//! * [`console::Console`]: virtio-console, one port, to any writer and from any fd.
//! * [`net::Net`]: virtio-net on a [`tap::Tap`] or any other frame backend.
//! * [`queue`]: the serving loop and chain checks the devices share.
//!
//! Queue notifications arrive on one eventfd per queue ([`mmio::MmioTransport::notifiers`]):
//! register them with KVM as ioeventfds on the QueueNotify register so a notification
//! never leaves the kernel; without that, the transport signals them itself.

pub mod balloon;
pub mod block;
pub mod chain_buffers;
pub mod console;
pub mod mmio;
#[cfg(test)]
mod mmio_conformance;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;
pub mod tap;
#[cfg(test)]
mod test_util;
pub mod transport;
pub mod vhost_user;
pub mod vsock;
pub mod worker;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vmcraft_memory::GuestMemory;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

pub use virtio_bindings;
pub use virtio_queue;
/// The eventfd type of the notifiers and requeue handles in this module's API.
pub use vmm_sys_util::eventfd::EventFd;

/// Feature bit: the device conforms to virtio 1.x (required by this transport).
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: used/avail event indices (notification suppression on both sides).
pub const F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// What a device behind a [`mmio::MmioTransport`] implements.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 for block, 1 for net, ...).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers, transport features ([`F_VERSION_1`],
    /// [`F_EVENT_IDX`]) included.
    fn features(&self) -> u64;
    /// Read `data.len()` bytes of the configuration space at `offset`. Bytes past
    /// the end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A driver write to the configuration space; ignored unless the device has
    /// writable fields.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// Start serving `queues` (the driver has set DRIVER_OK).
    fn activate(&mut self, queues: ActiveQueues) -> Result<(), ActivateError>;
    /// Stop serving (the driver wrote 0 to the status register); afterwards the device
    /// can be activated again.
    fn reset(&mut self);
    /// Stop serving for a snapshot, every chain taken from a queue completed (so
    /// each queue's next available index equals its used index in guest memory, from
    /// which a restored VM resumes it). A device whose I/O threads park
    /// ([`worker::Worker::pause`]) does so and returns `true`: [`resume`] lets them go
    /// on where they were; the default does that with the device's
    /// [`workers`](VirtioDevice::workers). Without any, the default stops as
    /// [`VirtioDevice::reset`] does and returns `false`: the transport then activates
    /// the device again to go on. A device that holds chains across wakeups must
    /// complete them here.
    ///
    /// [`resume`]: VirtioDevice::resume
    fn pause(&mut self) -> bool {
        let workers = self.workers();
        if workers.is_empty() {
            self.reset();
            return false;
        }
        for worker in workers {
            worker.pause();
        }
        true
    }
    /// Go on after a [`pause`](VirtioDevice::pause) that returned `true`.
    fn resume(&mut self) {
        for worker in self.workers() {
            worker.resume();
        }
    }
    /// The device's I/O threads (one, or one per queue), if it serves on
    /// [`worker::Worker`]s: then the default [`pause`](VirtioDevice::pause) parks
    /// them.
    fn workers(&self) -> &[worker::Worker] {
        &[]
    }
    /// The device's own state for a snapshot, beyond its queues and registers (a
    /// balloon's inflated pages), taken after [`VirtioDevice::pause`]. The default:
    /// none (empty).
    fn save_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Put back what [`VirtioDevice::save_state`] returned on the saved machine, whose
    /// memory `mem` is in place; called before the device serves again. The default
    /// takes only the empty state.
    fn restore_state(
        &mut self,
        state: &[u8],
        mem: &GuestMemory,
    ) -> Result<(), crate::state::StateError> {
        let _ = mem;
        if state.is_empty() {
            Ok(())
        } else {
            Err(crate::state::StateError::new(
                "virtio device",
                format!(
                    "{} bytes of state for a device that keeps none",
                    state.len()
                ),
            ))
        }
    }
}

/// Everything a device needs to serve its queues.
#[derive(Debug)]
pub struct ActiveQueues {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The queues, as the driver configured them (all ready).
    pub queues: Vec<Queue>,
    /// One eventfd per queue, signalled when the driver notifies it.
    pub notifiers: Vec<EventFd>,
    /// Interrupt status and line.
    pub interrupt: std::sync::Arc<Interrupt>,
    /// The features the driver accepted.
    pub driver_features: u64,
}

impl ActiveQueues {
    /// Take the device's `N` queues, every one of which the driver must have made
    /// ready.
    pub fn take_ready<const N: usize>(&mut self) -> Result<[Queue; N], ActivateError> {
        if let Some(i) = self.queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::QueueNotReady(i));
        }
        let queues = std::mem::take(&mut self.queues);
        let count = queues.len();
        queues
            .try_into()
            .map_err(|_| ActivateError::QueueNotReady(count.min(N)))
    }

    /// Take every queue of the device (however many it has), each of which the
    /// driver must have made ready.
    pub fn take_all_ready(&mut self) -> Result<Vec<Queue>, ActivateError> {
        if let Some(i) = self.queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::QueueNotReady(i));
        }
        Ok(std::mem::take(&mut self.queues))
    }

    /// A second handle on queue `queue`'s notifier, for the serving functions to wake
    /// the device's own event loop when they stop at their budget
    /// ([`queue::SERVE_BUDGET`]) with chains left.
    pub fn requeue(&self, queue: usize) -> Result<EventFd, ActivateError> {
        self.notifiers
            .get(queue)
            .ok_or(ActivateError::QueueNotReady(queue))?
            .try_clone()
            .map_err(|source| ActivateError::Host {
                what: "duplicate the queue notifier",
                source,
            })
    }
}

/// Copy `data.len()` bytes of `config` at `offset` into `data`; bytes past the end of
/// the configuration space read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(config.len());
    let end = start.saturating_add(data.len()).min(config.len());
    data[..end - start].copy_from_slice(&config[start..end]);
}

/// Errors from activating a device.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ActivateError {
    /// The driver left a queue the device needs unconfigured.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// A host resource (eventfd, thread) could not be created.
    #[error("cannot start the device: {what}")]
    Host {
        /// What failed.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Interrupt status bit: a queue has new used buffers.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration (or the device status) changed.
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// The "no vector" value of a virtio-pci MSI-X vector register.
pub const NO_VECTOR: u16 = 0xffff;

/// A device's interrupt status register, its NEEDS_RESET flag and where its
/// interrupts go: the eventfd of its interrupt line (register it with KVM as an
/// irqfd), or, on a transport with MSI-X, the vector the driver chose for each queue
/// and for configuration changes.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    /// The used-buffer bit reads as set whatever was acknowledged: another process
    /// signals the line directly ([`Interrupt::direct_queue_notifier`]).
    sticky_vring: AtomicBool,
    needs_reset: AtomicBool,
    irq: EventFd,
    msix: Option<MsixRouting>,
    counters: DeviceCounters,
}

/// What a device has done since it was created (over every activation), counted
/// where every vmcraft device passes: the serving loops of [`queue`], the I/O
/// thread's wake-ups, the interrupts. Read with [`Interrupt::counters`] (a metrics
/// file's per-device figures).
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Wake-ups of the I/O thread for a queue: the driver's notifications (several
    /// that came together count once), and one per queue at each activation.
    pub notifications: AtomicU64,
    /// Descriptor chains completed (requests, packets, buffers).
    pub chains: AtomicU64,
    /// Queue interrupts sent to the driver.
    pub interrupts: AtomicU64,
    /// Times the driver broke the protocol and the device was marked NEEDS_RESET.
    pub protocol_errors: AtomicU64,
}

impl DeviceCounters {
    /// Add `n` to `counter`.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Read `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Which MSI-X vector each queue and configuration changes use.
#[derive(Debug)]
struct MsixRouting {
    vectors: Arc<crate::pci::msix::MsixVectors>,
    config: AtomicU16,
    queues: Box<[AtomicU16]>,
}

/// One queue's way to interrupt the driver ([`Interrupt::queue`]): what the serving
/// loops of [`queue`] take.
#[derive(Debug, Clone, Copy)]
pub struct QueueInterrupt<'a> {
    interrupt: &'a Interrupt,
    queue: u16,
}

impl QueueInterrupt<'_> {
    /// The queue has new used buffers: interrupt the driver.
    pub fn signal(&self) {
        self.interrupt.signal_queue(self.queue)
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Interrupt {
        self.interrupt
    }
}

impl Interrupt {
    /// A new interrupt with a fresh eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Interrupt {
            status: AtomicU32::new(0),
            sticky_vring: AtomicBool::new(false),
            needs_reset: AtomicBool::new(false),
            irq: EventFd::new(EFD_NONBLOCK)?,
            msix: None,
            counters: DeviceCounters::default(),
        })
    }

    /// What the device has done so far.
    pub fn counters(&self) -> &DeviceCounters {
        &self.counters
    }

    /// An interrupt that goes through `vectors` (MSI-X) for a device with `queues`
    /// queues, every queue and configuration changes on [`NO_VECTOR`] until the
    /// driver chooses ([`set_queue_vector`](Self::set_queue_vector),
    /// [`set_config_vector`](Self::set_config_vector)).
    pub fn with_msix(
        vectors: Arc<crate::pci::msix::MsixVectors>,
        queues: usize,
    ) -> io::Result<Self> {
        Ok(Interrupt {
            msix: Some(MsixRouting {
                vectors,
                config: AtomicU16::new(NO_VECTOR),
                queues: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            }),
            ..Interrupt::new()?
        })
    }

    /// Queue `queue`'s interrupt handle.
    pub fn queue(&self, queue: u16) -> QueueInterrupt<'_> {
        QueueInterrupt {
            interrupt: self,
            queue,
        }
    }

    /// Queue `queue` has new used buffers: its MSI-X vector, or the line with the
    /// used-buffer bit in the status register.
    pub fn signal_queue(&self, queue: u16) {
        DeviceCounters::add(&self.counters.interrupts, 1);
        match &self.msix {
            Some(m) if m.vectors.enabled() => {
                if let Some(v) = m.queues.get(usize::from(queue)) {
                    m.vectors.fire(v.load(Ordering::SeqCst));
                }
            }
            _ => self.raise(INT_VRING),
        }
    }

    /// Send queue `queue`'s interrupts to MSI-X vector `vector` ([`NO_VECTOR`]: none).
    pub fn set_queue_vector(&self, queue: u16, vector: u16) {
        if let Some(slot) = self
            .msix
            .as_ref()
            .and_then(|m| m.queues.get(usize::from(queue)))
        {
            slot.store(vector, Ordering::SeqCst);
        }
    }

    /// Queue `queue`'s MSI-X vector ([`NO_VECTOR`] without MSI-X).
    pub fn queue_vector(&self, queue: u16) -> u16 {
        self.msix
            .as_ref()
            .and_then(|m| m.queues.get(usize::from(queue)))
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst))
    }

    /// Send configuration-change interrupts to MSI-X vector `vector`.
    pub fn set_config_vector(&self, vector: u16) {
        if let Some(m) = &self.msix {
            m.config.store(vector, Ordering::SeqCst);
        }
    }

    /// The configuration-change MSI-X vector ([`NO_VECTOR`] without MSI-X).
    pub fn config_vector(&self) -> u16 {
        self.msix
            .as_ref()
            .map_or(NO_VECTOR, |m| m.config.load(Ordering::SeqCst))
    }

    /// The eventfd to register as an irqfd.
    pub fn irq_eventfd(&self) -> &EventFd {
        &self.irq
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        let sticky = if self.sticky_vring.load(Ordering::SeqCst) {
            INT_VRING
        } else {
            0
        };
        self.status.load(Ordering::SeqCst) | sticky
    }

    /// An eventfd that interrupts the driver for queue `queue` when another process
    /// writes it, with no VMM thread in between (a vhost-user backend's call): with
    /// MSI-X enabled and a vector chosen for the queue, that vector's irqfd (its mask
    /// is then the guest's to honour: KVM delivers a masked vector's message as an
    /// unmasked one's, which a driver takes as a spurious interrupt); otherwise the
    /// line's irqfd, the used-buffer bit of the status register then reading as set
    /// until the device is reset (a driver looks at every queue on each interrupt,
    /// and finds nothing new on those without). Interrupts sent this way are not
    /// counted in [`counters`](Self::counters).
    pub fn direct_queue_notifier(&self, queue: u16) -> io::Result<EventFd> {
        if let Some(m) = self.msix.as_ref().filter(|m| m.vectors.enabled()) {
            let vector = m
                .queues
                .get(usize::from(queue))
                .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst));
            return match m.vectors.irqfd(vector) {
                Some(fd) => fd.try_clone(),
                // No vector: the driver wants no interrupts from this queue; an
                // eventfd nobody reads.
                None => EventFd::new(EFD_NONBLOCK),
            };
        }
        self.sticky_vring.store(true, Ordering::SeqCst);
        self.irq.try_clone()
    }

    /// Whether a device error has set NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Raise `bits` in the status register and signal the line; with MSI-X enabled,
    /// the configuration vector for [`INT_CONFIG`] and every queue's vector for
    /// [`INT_VRING`] (which names no queue), and the status register is left alone
    /// (virtio 1.2 §4.1.5.3: the ISR bits are for when MSI-X is off).
    pub fn raise(&self, bits: u32) {
        if let Some(m) = self.msix.as_ref().filter(|m| m.vectors.enabled()) {
            if bits & INT_CONFIG != 0 {
                m.vectors.fire(m.config.load(Ordering::SeqCst));
            }
            if bits & INT_VRING != 0 {
                for v in m.queues.iter() {
                    m.vectors.fire(v.load(Ordering::SeqCst));
                }
            }
            return;
        }
        self.status.fetch_or(bits, Ordering::SeqCst);
        // A failed write means the counter is saturated: an interrupt is pending anyway.
        let _ = self.irq.write(1);
    }

    /// Signal again what may be pending, without changing the status register: with
    /// MSI-X enabled every queue's vector, else the line if the status register has
    /// bits set. After a restore, an interrupt a device raised before the vCPUs'
    /// local APIC state was put back went under it (a vsock's transport reset, raised
    /// as the device starts): the driver, interrupted again, finds what it missed,
    /// and finds nothing new otherwise.
    pub fn raise_again(&self) {
        if let Some(m) = self.msix.as_ref().filter(|m| m.vectors.enabled()) {
            for v in m.queues.iter() {
                m.vectors.fire(v.load(Ordering::SeqCst));
            }
            return;
        }
        if self.status() != 0 {
            // A failed write means the counter is saturated: an interrupt is pending.
            let _ = self.irq.write(1);
        }
    }

    /// The guest broke the protocol: set NEEDS_RESET and raise a configuration
    /// interrupt. The device stops serving until the driver resets it.
    pub fn device_error(&self) {
        DeviceCounters::add(&self.counters.protocol_errors, 1);
        self.needs_reset.store(true, Ordering::SeqCst);
        self.raise(INT_CONFIG);
    }

    /// Set the status register to `bits` without signalling the line (a restore: the
    /// line's state is the interrupt controller's).
    pub(crate) fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// Set NEEDS_RESET without an interrupt (a restore).
    pub(crate) fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }

    /// The driver acknowledged `bits`.
    pub(crate) fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Device reset: clear everything.
    pub(crate) fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.sticky_vring.store(false, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod interrupt_tests {
    use super::*;
    use crate::pci::msix::{MsixTable, MsixVectors, CONTROL_ENABLE};

    fn fired(vectors: &MsixVectors, v: u16) -> u64 {
        vectors.irqfd(v).unwrap().read().unwrap_or(0)
    }

    #[test]
    fn without_msix_queues_and_configuration_share_the_line_and_the_status() {
        let i = Interrupt::new().unwrap();
        i.queue(3).signal();
        assert_eq!(i.status(), INT_VRING);
        i.device_error();
        assert_eq!(i.status(), INT_VRING | INT_CONFIG);
        assert_eq!(i.irq_eventfd().read().unwrap(), 2);
        assert_eq!(
            (i.queue_vector(0), i.config_vector()),
            (NO_VECTOR, NO_VECTOR)
        );
    }

    #[test]
    fn a_direct_notifier_is_the_line_with_the_used_bit_kept_or_the_queues_vector() {
        let i = Interrupt::new().unwrap();
        let line = i.direct_queue_notifier(1).unwrap();
        line.write(1).unwrap();
        assert_eq!(i.irq_eventfd().read().unwrap(), 1, "the line's own eventfd");
        assert_eq!(i.status(), INT_VRING);
        i.acknowledge(INT_VRING);
        assert_eq!(i.status(), INT_VRING, "kept while the device runs");
        i.clear();
        assert_eq!(i.status(), 0);

        let vectors = Arc::new(MsixVectors::new(2).unwrap());
        let mut table = MsixTable::new(vectors.clone());
        table.set_bus_master(true);
        table.set_control(CONTROL_ENABLE);
        let m = Interrupt::with_msix(vectors.clone(), 2).unwrap();
        m.set_queue_vector(0, 1);
        m.direct_queue_notifier(0).unwrap().write(1).unwrap();
        assert_eq!(fired(&vectors, 1), 1, "the queue's vector's irqfd");
        // No vector for queue 1: an eventfd that reaches nothing.
        m.direct_queue_notifier(1).unwrap().write(1).unwrap();
        assert_eq!((fired(&vectors, 0), fired(&vectors, 1)), (0, 0));
        assert_eq!(m.status(), 0);
    }

    #[test]
    fn with_msix_each_queue_fires_its_own_vector_and_configuration_changes_theirs() {
        let vectors = Arc::new(MsixVectors::new(3).unwrap());
        let mut table = MsixTable::new(vectors.clone());
        table.set_bus_master(true);
        table.set_control(CONTROL_ENABLE);
        for v in 0..3u64 {
            table.write(v * 16 + 12, &0u32.to_le_bytes());
        }
        let i = Interrupt::with_msix(vectors.clone(), 2).unwrap();
        // No vector chosen yet: nothing fires.
        i.queue(0).signal();
        assert_eq!((0..3).map(|v| fired(&vectors, v)).sum::<u64>(), 0);
        i.set_queue_vector(0, 2);
        i.set_queue_vector(1, 1);
        i.set_config_vector(0);
        i.set_queue_vector(7, 1); // no such queue: ignored
        i.queue(0).signal();
        i.queue(0).signal();
        i.queue(1).signal();
        i.queue(9).signal(); // no such queue: nothing
        assert_eq!(
            (fired(&vectors, 0), fired(&vectors, 1), fired(&vectors, 2)),
            (0, 1, 2)
        );
        // A protocol error: NEEDS_RESET and the configuration vector; the ISR-style
        // status is not used with MSI-X.
        i.device_error();
        assert!(i.needs_reset());
        assert_eq!(fired(&vectors, 0), 1);
        assert_eq!(i.status(), 0);
        assert_eq!(i.irq_eventfd().read().ok(), None);
        // INT_VRING without a queue: every queue's vector.
        i.raise(INT_VRING);
        assert_eq!((fired(&vectors, 1), fired(&vectors, 2)), (1, 1));
    }
}
