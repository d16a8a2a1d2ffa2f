//! The half of a virtio transport that does not depend on where its registers are:
//! the device status state machine, feature negotiation, queue setup and its checks,
//! activation, reset, and the registers' state in snapshots. [`VirtioCore`] is what
//! virtio-mmio ([`super::mmio`]) and virtio-pci ([`super::pci`]) decode their
//! registers into; neither repeats any of it.
//!
//! Rules a hostile driver cannot break, on either transport:
//! * feature words are accepted only between DRIVER and FEATURES_OK; FEATURES_OK sticks
//!   only if the driver took [`F_VERSION_1`] and nothing the device
//!   did not offer;
//! * queue size must be a power of two no larger than the maximum, and the rings must
//!   lie inside guest memory and be aligned, when the driver makes the queue ready;
//!   otherwise the queue stays not ready and the device is marked NEEDS_RESET;
//! * queue registers cannot change once the queue is ready or the device is live;
//! * the status only ever gains bits until a write of 0 resets the device.

use crate::state::StateError;
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmcraft_memory::GuestMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, ActiveQueues, Interrupt, VirtioDevice, F_EVENT_IDX, F_VERSION_1};
use crate::stop::{DeviceStop, StopLatch};

/// Everything that can go wrong in the driver's use of the transport, kept for
/// diagnosis ([`VirtioCore::last_error`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The driver accepted features the device does not offer.
    #[error("the driver accepted features {0:#x} that the device does not offer")]
    UnofferedFeatures(u64),
    /// The driver did not accept VIRTIO_F_VERSION_1.
    #[error("the driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not served)")]
    NoVersion1,
    /// A queue size that is zero, not a power of two or above the maximum.
    #[error("queue {queue}: size {size} is zero, not a power of two or above the maximum")]
    BadQueueSize {
        /// Queue index.
        queue: u32,
        /// The size written.
        size: u32,
    },
    /// A ring outside guest memory or misaligned.
    #[error("queue {queue}: a ring is outside guest memory or misaligned")]
    BadQueueAddress {
        /// Queue index.
        queue: u32,
    },
    /// A queue's configuration was refused when the device started.
    #[error("queue {queue}: its configuration is not valid")]
    InvalidQueue {
        /// Queue index.
        queue: u32,
        /// What virtio-queue found.
        #[source]
        source: virtio_queue::Error,
    },
    /// The device refused to start.
    #[error("the device could not start")]
    Activation(#[source] ActivateError),
}

/// A queue's configuration registers as written (the device uses them when the
/// driver makes the queue ready).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct QueueSetup {
    size: u32,
    /// Descriptor table, available ring, used ring.
    rings: [u64; 3],
}

impl QueueSetup {
    fn new(max_size: u16) -> Self {
        QueueSetup {
            size: max_size.into(),
            rings: [0; 3],
        }
    }
}

/// One queue of a [`TransportState`]: its registers as the driver wrote them, and the
/// configuration it was made ready with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueRegisters {
    /// QueueNum and the three ring addresses as last written.
    pub setup_size: u32,
    /// Descriptor table, available ring, used ring, as last written.
    pub setup_rings: [u64; 3],
    /// Whether QueueReady is set.
    pub ready: bool,
}

/// The transport's registers in a snapshot. The device's queues resume from the used
/// index in guest memory (see [`VirtioDevice::pause`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// The device type, checked against the device restored behind it.
    pub device_type: u32,
    /// The device status register (without NEEDS_RESET).
    pub status: u32,
    /// Whether the device had set NEEDS_RESET.
    pub needs_reset: bool,
    /// The interrupt status register.
    pub interrupt_status: u32,
    /// QueueSel, DeviceFeaturesSel, DriverFeaturesSel.
    pub selectors: [u32; 3],
    /// The features the driver accepted.
    pub driver_features: u64,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Each queue's registers.
    pub queues: Vec<QueueRegisters>,
    /// The device's own state ([`VirtioDevice::save_state`]; empty for a device
    /// that has none).
    pub device: Vec<u8>,
}

impl vmcraft_snapshot::Versioned for TransportState {
    const VERSION: u32 = 2;
}

/// The half of a virtio transport that does not depend on its registers' layout.
/// See the [module documentation](self).
pub struct VirtioCore {
    /// The transport's name, for logs and errors.
    transport: &'static str,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    notifiers: Vec<EventFd>,
    queues: Vec<Queue>,
    /// Per queue: the size and ring addresses as the driver last wrote them, checked
    /// only when it sets QueueReady (a driver may correct a value before that).
    setup: Vec<QueueSetup>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    last_error: Option<DriverError>,
    /// Where a failure on the host's side (a device that cannot start) stops the VM.
    host_failure: Option<Arc<StopLatch>>,
    /// Whether a snapshot parked the device (else it was stopped, and is activated
    /// again to go on).
    parked: bool,
}

impl std::fmt::Debug for VirtioCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(self.transport)
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("last_error", &self.last_error)
            .finish_non_exhaustive()
    }
}

impl VirtioCore {
    /// The core of transport `transport` (its name in logs) for `device` over guest
    /// memory `mem`, interrupting through `interrupt`.
    pub fn new(
        transport: &'static str,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        interrupt: Interrupt,
    ) -> std::io::Result<Self> {
        let queues = new_queues(device.as_ref());
        let notifiers = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<_, _>>()?;
        Ok(VirtioCore {
            transport,
            device,
            mem,
            interrupt: Arc::new(interrupt),
            notifiers,
            setup: new_setups(&queues),
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            last_error: None,
            host_failure: None,
            parked: false,
        })
    }

    /// Stop the VM through `latch` when the device fails on the host's side (it
    /// cannot start its I/O thread, say) instead of leaving a guest waiting on a device
    /// that will never serve it. Guest errors still only set NEEDS_RESET.
    pub fn stop_vm_on_host_failure(&mut self, latch: Arc<StopLatch>) {
        self.host_failure = Some(latch);
    }

    /// The virtio device type of the device behind this transport (2 block, 4 entropy,
    /// ...).
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Pause the device for a snapshot ([`VirtioDevice::pause`]) and return the
    /// registers. Call [`VirtioCore::resume_after_snapshot`] to go on.
    pub fn pause_for_snapshot(&mut self) -> TransportState {
        if self.serving() {
            self.parked = self.device.pause();
        }
        TransportState {
            device: self.device.save_state(),
            device_type: self.device.device_type(),
            status: self.status,
            needs_reset: self.interrupt.needs_reset(),
            interrupt_status: self.interrupt.status(),
            selectors: [
                self.queue_sel,
                self.device_features_sel,
                self.driver_features_sel,
            ],
            driver_features: self.driver_features,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .zip(&self.setup)
                .map(|(q, s)| QueueRegisters {
                    setup_size: s.size,
                    setup_rings: s.rings,
                    ready: q.ready(),
                })
                .collect(),
        }
    }

    /// Serve again after [`VirtioCore::pause_for_snapshot`]: each queue resumes
    /// from the used index in guest memory.
    pub fn resume_after_snapshot(&mut self) {
        if !self.serving() {
            return;
        }
        if std::mem::take(&mut self.parked) {
            self.device.resume();
        } else {
            self.activate(true);
        }
    }

    /// Put back the registers of `state` (from a snapshot, whose memory this
    /// transport's guest memory holds) and, if the device was serving, start serving
    /// from the used index in guest memory. Every queue is checked as when the driver
    /// makes it ready: a state this transport would not have accepted from the driver
    /// is refused.
    pub fn restore_state(&mut self, state: &TransportState) -> Result<(), StateError> {
        let transport = self.transport;
        let bad = |reason: String| StateError::new(transport, reason);
        if state.device_type != self.device.device_type() {
            return Err(bad(format!(
                "a snapshot of device type {} for a device of type {}",
                state.device_type,
                self.device.device_type()
            )));
        }
        if state.queues.len() != self.queues.len() {
            return Err(bad(format!(
                "{} queues saved for a device with {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        const DRIVER_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK
            | VIRTIO_CONFIG_S_FAILED;
        if state.status & !DRIVER_BITS != 0 {
            return Err(bad(format!(
                "status {:#x} has bits a driver cannot set",
                state.status
            )));
        }
        let offered = self.device.features();
        if state.driver_features & !offered != 0 {
            return Err(bad(format!(
                "features {:#x} accepted that the device does not offer",
                state.driver_features & !offered
            )));
        }
        if state.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && state.driver_features & F_VERSION_1 == 0
        {
            return Err(bad("FEATURES_OK without VERSION_1".into()));
        }
        self.reset();
        self.status = state.status;
        [
            self.queue_sel,
            self.device_features_sel,
            self.driver_features_sel,
        ] = state.selectors;
        self.driver_features = state.driver_features;
        self.config_generation = state.config_generation;
        for (i, saved) in state.queues.iter().enumerate() {
            self.setup[i] = QueueSetup {
                size: saved.setup_size,
                rings: saved.setup_rings,
            };
            if saved.ready {
                let sel = std::mem::replace(&mut self.queue_sel, i as u32);
                self.make_queue_ready();
                self.queue_sel = sel;
                if let Some(error) = self.last_error.take() {
                    self.reset();
                    return Err(bad(format!("queue {i}: {error}")));
                }
            }
        }
        self.interrupt.acknowledge(u32::MAX);
        if state.interrupt_status != 0 {
            // The line's level is the irqchip's, restored with the VM: set the bits
            // without signalling it again.
            self.interrupt.set_status(state.interrupt_status);
        }
        if state.needs_reset {
            self.interrupt.set_needs_reset();
        }
        if let Err(e) = self.device.restore_state(&state.device, &self.mem) {
            self.reset();
            return Err(e);
        }
        self.resume_after_snapshot();
        match self.last_error.take() {
            Some(error) => {
                self.reset();
                Err(bad(format!("the device did not start again: {error}")))
            }
            None => Ok(()),
        }
    }

    /// Whether the device's I/O thread is (or should be) serving: DRIVER_OK, no
    /// NEEDS_RESET, no FAILED.
    fn serving(&self) -> bool {
        self.live() && self.status & VIRTIO_CONFIG_S_FAILED == 0 && !self.interrupt.needs_reset()
    }

    /// The interrupt (its eventfd is the device's irqfd).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// One eventfd per queue, to register as ioeventfds at
    /// `base + QUEUE_NOTIFY_OFFSET` with the queue index as datamatch.
    pub fn notifiers(&self) -> &[EventFd] {
        &self.notifiers
    }

    /// The device status register (NEEDS_RESET included).
    pub fn status(&self) -> u32 {
        let mut status = self.status;
        if self.interrupt.needs_reset() {
            status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        }
        status
    }

    /// The last protocol error the driver made, if any.
    pub fn last_error(&self) -> Option<&DriverError> {
        self.last_error.as_ref()
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    fn live(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
    }

    fn fail(&mut self, error: DriverError) {
        log::warn!(
            "{}: device type {} needs a reset: {}",
            self.transport,
            self.device.device_type(),
            vmcraft_memory::report::ErrorChain(&error)
        );
        self.last_error = Some(error);
        self.interrupt.device_error();
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Guest memory.
    #[cfg(test)]
    pub(crate) fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The device's feature word DeviceFeaturesSel selects (0 past the second).
    pub(crate) fn device_features_word(&self) -> u32 {
        match self.device_features_sel {
            0 => self.device.features() as u32,
            1 => (self.device.features() >> 32) as u32,
            _ => 0,
        }
    }

    /// DeviceFeaturesSel and DriverFeaturesSel.
    pub(crate) fn feature_selectors(&self) -> [u32; 2] {
        [self.device_features_sel, self.driver_features_sel]
    }

    /// Set DeviceFeaturesSel.
    pub(crate) fn select_device_features(&mut self, value: u32) {
        self.device_features_sel = value;
    }

    /// Set DriverFeaturesSel.
    pub(crate) fn select_driver_features(&mut self, value: u32) {
        self.driver_features_sel = value;
    }

    /// The driver's feature word DriverFeaturesSel selects.
    pub(crate) fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver writes the feature word DriverFeaturesSel selects: kept only while
    /// it negotiates (DRIVER set, FEATURES_OK not yet).
    pub(crate) fn write_driver_features(&mut self, value: u32) {
        let negotiating = self.status & VIRTIO_CONFIG_S_DRIVER != 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        if !negotiating {
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => {}
        }
    }

    /// How many queues the device has.
    pub(crate) fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// QueueSel.
    pub(crate) fn queue_sel(&self) -> u32 {
        self.queue_sel
    }

    /// Set QueueSel (a queue past the last reads as absent).
    pub(crate) fn select_queue(&mut self, value: u32) {
        self.queue_sel = value;
    }

    /// The selected queue's maximum size (0 if there is no such queue).
    pub(crate) fn queue_max_size(&self) -> u16 {
        self.queues
            .get(self.queue_sel as usize)
            .map_or(0, |q| q.max_size())
    }

    /// Whether the selected queue is ready.
    pub(crate) fn queue_ready(&self) -> bool {
        self.queues
            .get(self.queue_sel as usize)
            .is_some_and(|q| q.ready())
    }

    /// The selected queue's size and rings as last written (none past the last queue).
    pub(crate) fn queue_setup(&self) -> Option<(u32, [u64; 3])> {
        self.setup
            .get(self.queue_sel as usize)
            .map(|s| (s.size, s.rings))
    }

    /// Whether the selected queue may be configured now: it exists, is not ready,
    /// and the device is not live.
    pub(crate) fn configuring_queue(&self) -> bool {
        !self.live()
            && self
                .queues
                .get(self.queue_sel as usize)
                .is_some_and(|q| !q.ready())
    }

    /// The selected queue's size, as the driver writes it (checked when it is made
    /// ready); ignored unless the queue is being configured.
    pub(crate) fn set_queue_size(&mut self, value: u32) {
        if self.configuring_queue() {
            self.setup[self.queue_sel as usize].size = value;
        }
    }

    /// Half (`high`: the upper 32 bits) of ring `ring` (0 descriptors, 1 available or
    /// driver area, 2 used or device area) of the selected queue; ignored unless the
    /// queue is being configured.
    pub(crate) fn set_queue_ring(&mut self, ring: usize, high: bool, value: u32) {
        if !self.configuring_queue() || ring > 2 {
            return;
        }
        let setup = &mut self.setup[self.queue_sel as usize];
        let old = setup.rings[ring];
        setup.rings[ring] = if high {
            (old & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (old & !0xffff_ffff) | u64::from(value)
        };
    }

    /// The driver enables (`true`, only while configuring the queue) or stops the
    /// selected queue.
    pub(crate) fn set_queue_ready(&mut self, ready: bool) {
        if ready {
            if self.configuring_queue() {
                self.make_queue_ready();
            }
        } else {
            self.stop_queue();
        }
    }

    /// The driver notifies queue `queue` (a queue past the last is ignored).
    pub(crate) fn notify(&self, queue: u32) {
        if let Some(fd) = self.notifiers.get(queue as usize) {
            // Saturation means a wakeup is already pending.
            let _ = fd.write(1);
        }
    }

    /// ConfigGeneration.
    pub(crate) fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// A read of the device's configuration space.
    pub(crate) fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.device.read_config(offset, data)
    }

    /// A write of the device's configuration space, taken once the driver has set
    /// DRIVER.
    pub(crate) fn write_config(&mut self, offset: u64, data: &[u8]) {
        if self.status & VIRTIO_CONFIG_S_DRIVER != 0 {
            self.device.write_config(offset, data);
        }
    }

    /// QueueReady = 1: the size and rings as last written must be valid (size a power
    /// of two up to the maximum, rings aligned and inside guest memory), else the queue
    /// stays unready and the device needs a reset.
    pub(crate) fn make_queue_ready(&mut self) {
        let queue = self.queue_sel;
        let mem = self.mem.clone();
        let setup = self.setup[queue as usize];
        let q = self.selected_queue().expect("configuring_queue checked it");
        let size_ok = u16::try_from(setup.size).is_ok_and(|s| q.try_set_size(s).is_ok())
            && q.size().is_power_of_two();
        if !size_ok {
            self.fail(DriverError::BadQueueSize {
                queue,
                size: setup.size,
            });
            return;
        }
        let [desc, avail, used] = setup.rings.map(GuestAddress);
        let rings_ok = q.try_set_desc_table_address(desc).is_ok()
            && q.try_set_avail_ring_address(avail).is_ok()
            && q.try_set_used_ring_address(used).is_ok();
        q.set_ready(true);
        if !rings_ok || !q.is_valid(&mem) {
            q.set_ready(false);
            self.fail(DriverError::BadQueueAddress { queue });
        }
    }

    /// QueueReady = 0: the driver stops using the queue (virtio 1.2 §4.2.2.2) and reads
    /// 0 back. While the device is live its I/O thread stops, for every queue: it
    /// resumes after the driver resets the device and sets it up again.
    pub(crate) fn stop_queue(&mut self) {
        let live = self.live();
        let Some(q) = self.selected_queue() else {
            return;
        };
        let was_ready = q.ready();
        q.set_ready(false);
        if live && was_ready {
            self.device.reset();
        }
    }

    pub(crate) fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver owns these bits; anything else it writes (NEEDS_RESET, which the
        // device sets, undefined bits, the upper 24 bits of the register) is ignored.
        let value = value
            & (VIRTIO_CONFIG_S_ACKNOWLEDGE
                | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK
                | VIRTIO_CONFIG_S_DRIVER_OK
                | VIRTIO_CONFIG_S_FAILED);
        // Bits are only ever added (the spec forbids clearing them without a reset).
        if value & self.status != self.status {
            return;
        }
        let new = value & !self.status;
        let mut status = value;
        if new & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0 {
                self.last_error = Some(DriverError::UnofferedFeatures(
                    self.driver_features & !offered,
                ));
                status &= !VIRTIO_CONFIG_S_FEATURES_OK;
            } else if self.driver_features & F_VERSION_1 == 0 {
                self.last_error = Some(DriverError::NoVersion1);
                status &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        let order_ok = |bit: u32, needs: u32| new & bit == 0 || status & needs == needs;
        if !order_ok(VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE)
            || !order_ok(VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER)
            || !order_ok(VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK)
        {
            return;
        }
        self.status = status;
        if new & VIRTIO_CONFIG_S_DRIVER_OK != 0 && new & VIRTIO_CONFIG_S_FAILED == 0 {
            self.activate(false);
        }
    }

    /// Start the device on its queues: from the start (`resume` false), or from the
    /// used index in guest memory (after a snapshot).
    fn activate(&mut self, resume: bool) {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (queue, q) in self.queues.iter().enumerate() {
            let state = q.state();
            match Queue::try_from(state) {
                Ok(mut copy) => {
                    copy.set_event_idx(self.driver_features & F_EVENT_IDX != 0);
                    // After a snapshot the device goes on where it stopped: it
                    // completed every chain it took, so the next one to take is the
                    // next to complete, the used index in guest memory.
                    if resume {
                        let used = copy
                            .used_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                            .map_or(0, |u| u.0);
                        copy.set_next_avail(used);
                        copy.set_next_used(used);
                    }
                    queues.push(copy);
                }
                Err(source) => {
                    self.fail(DriverError::InvalidQueue {
                        queue: queue as u32,
                        source,
                    });
                    return;
                }
            }
        }
        let notifiers = match self
            .notifiers
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(n) => n,
            Err(source) => {
                self.fail(DriverError::Activation(ActivateError::Host {
                    what: "clone the queue notifiers",
                    source,
                }));
                return;
            }
        };
        let active = ActiveQueues {
            mem: self.mem.clone(),
            queues,
            notifiers,
            interrupt: self.interrupt.clone(),
            driver_features: self.driver_features,
        };
        if let Err(e) = self.device.activate(active) {
            if let (ActivateError::Host { .. }, Some(latch)) = (&e, &self.host_failure) {
                let code = self.device.device_type();
                log::error!(
                    "{}: device type {code} cannot start, stopping the VM: {}",
                    self.transport,
                    vmcraft_memory::report::ErrorChain(&e)
                );
                latch.request(DeviceStop::DeviceFailed(code));
            }
            self.fail(DriverError::Activation(e));
            return;
        }
        if resume {
            // A notification the driver sent before the snapshot may have been
            // counted by an eventfd of the old process and never served: each queue
            // is looked at once (a device takes a notification with nothing new as
            // the driver's right to send).
            for fd in &self.notifiers {
                // Saturation means a look is pending already.
                let _ = fd.write(1);
            }
        }
    }

    pub(crate) fn reset(&mut self) {
        self.device.reset();
        self.queues = new_queues(self.device.as_ref());
        self.setup = new_setups(&self.queues);
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt.clear();
        for fd in &self.notifiers {
            // Drain stale notifications; an error means there were none.
            let _ = fd.read();
        }
    }

    /// Tell the driver the configuration changed (bumps the generation, raises a
    /// configuration interrupt).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.raise(super::INT_CONFIG);
    }
}

/// Each queue's registers as a reset leaves them: the maximum size, rings at 0.
fn new_setups(queues: &[Queue]) -> Vec<QueueSetup> {
    queues
        .iter()
        .map(|q| QueueSetup::new(q.max_size()))
        .collect()
}

fn new_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| Queue::new(max).unwrap_or_default())
        .collect()
}
