//! The virtio-mmio transport, version 2 (virtio 1.x, "modern" only).
//!
//! The register model is plain code: [`MmioTransport::read`] and
//! [`MmioTransport::write`] take an offset into the 4 KiB window and bytes, and are
//! unit tested without KVM. [`MmioTransport`] implements `vm-device`'s
//! `MutDeviceMmio`, so `Arc<Mutex<MmioTransport>>` goes straight onto an MMIO bus.
//!
//! Rules a hostile driver cannot break:
//! * feature words are accepted only between DRIVER and FEATURES_OK; FEATURES_OK sticks
//!   only if the driver took [`F_VERSION_1`] and nothing the device
//!   did not offer;
//! * queue size must be a power of two no larger than the maximum, and the rings must
//!   lie inside guest memory and be aligned, when the driver sets QueueReady; otherwise
//!   the queue stays not ready and the device is marked NEEDS_RESET;
//! * queue registers cannot change once the queue is ready or the device is live;
//! * the status only ever gains bits until a write of 0 resets the device.

use crate::state::StateError;
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vm_memory::GuestAddress;
use vmcraft_memory::GuestMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, ActiveQueues, Interrupt, VirtioDevice, F_EVENT_IDX, F_VERSION_1};
use crate::stop::{DeviceStop, StopLatch};

/// "virt" in little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The transport version this implements.
pub const VERSION: u32 = 2;
/// The vendor ID vmcraft devices report ("VMCR").
pub const VENDOR_ID: u32 = 0x5243_4d56;
/// Size of one device's MMIO window.
pub const WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register, for ioeventfd registration.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// Everything that can go wrong in the driver's use of the transport, kept for
/// diagnosis ([`MmioTransport::last_error`]).
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

/// A queue's configuration registers as written (virtio 1.2 §4.2.2: QueueNum and the
/// ring address registers are write-only; the device uses them when QueueReady is set).
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

/// The virtio-mmio register file of one device.
pub struct MmioTransport {
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

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("last_error", &self.last_error)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// A transport for `device` over guest memory `mem`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory) -> std::io::Result<Self> {
        let queues = new_queues(device.as_ref());
        let notifiers = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<_, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new()?),
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
    /// registers. Call [`MmioTransport::resume_after_snapshot`] to go on.
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

    /// Serve again after [`MmioTransport::pause_for_snapshot`]: each queue resumes
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
        let bad = |reason: String| StateError::new("virtio-mmio transport", reason);
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
            "virtio-mmio: device type {} needs a reset: {}",
            self.device.device_type(),
            vmcraft_memory::report::ErrorChain(&error)
        );
        self.last_error = Some(error);
        self.interrupt.device_error();
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A register read at `offset`; wrong-width register reads return all ones.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let config = u64::from(reg::VIRTIO_MMIO_CONFIG);
        if offset >= config {
            self.device.read_config(offset - config, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0xff);
            return;
        }
        let queue = self.queues.get(self.queue_sel as usize);
        let value = match offset as u32 {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            reg::VIRTIO_MMIO_VERSION => VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            reg::VIRTIO_MMIO_STATUS => self.status(),
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: every selected region is absent, which reads
            // as a length and base of -1 (virtio 1.2 §4.2.2).
            reg::VIRTIO_MMIO_SHM_LEN_LOW
            | reg::VIRTIO_MMIO_SHM_LEN_HIGH
            | reg::VIRTIO_MMIO_SHM_BASE_LOW
            | reg::VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A register write at `offset`; wrong-width register writes are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let config = u64::from(reg::VIRTIO_MMIO_CONFIG);
        if offset >= config {
            if self.status & VIRTIO_CONFIG_S_DRIVER != 0 {
                self.device.write_config(offset - config, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes(bytes);
        let configuring_queue = !self.live()
            && self
                .queues
                .get(self.queue_sel as usize)
                .is_some_and(|q| !q.ready());
        match offset as u32 {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => {
                let negotiating = self.status & VIRTIO_CONFIG_S_DRIVER != 0
                    && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
                if negotiating {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(value)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                        }
                        _ => {}
                    }
                }
            }
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            reg::VIRTIO_MMIO_QUEUE_NUM if configuring_queue => {
                self.setup[self.queue_sel as usize].size = value;
            }
            reg::VIRTIO_MMIO_QUEUE_READY if value == 1 && configuring_queue => {
                self.make_queue_ready()
            }
            reg::VIRTIO_MMIO_QUEUE_READY if value == 0 => self.stop_queue(),
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW
            | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | reg::VIRTIO_MMIO_QUEUE_USED_LOW
            | reg::VIRTIO_MMIO_QUEUE_USED_HIGH
                if configuring_queue =>
            {
                self.set_queue_address(offset as u32, value)
            }
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => {
                if let Some(fd) = self.notifiers.get(value as usize) {
                    // Saturation means a wakeup is already pending.
                    let _ = fd.write(1);
                }
            }
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::VIRTIO_MMIO_STATUS => self.set_status(value),
            _ => {}
        }
    }

    /// One half of a ring address, recorded; it is checked at QueueReady.
    fn set_queue_address(&mut self, register: u32, value: u32) {
        let setup = &mut self.setup[self.queue_sel as usize];
        let ring = match register & !4 {
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => 0,
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => 1,
            _ => 2,
        };
        let old = setup.rings[ring];
        setup.rings[ring] = if register % 8 == 4 {
            (old & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (old & !0xffff_ffff) | u64::from(value)
        };
    }

    /// QueueReady = 1: the size and rings as last written must be valid (size a power
    /// of two up to the maximum, rings aligned and inside guest memory), else the queue
    /// stays unready and the device needs a reset.
    fn make_queue_ready(&mut self) {
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
    fn stop_queue(&mut self) {
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

    fn set_status(&mut self, value: u32) {
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
                    "virtio-mmio: device type {code} cannot start, stopping the VM: {}",
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

    fn reset(&mut self) {
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

impl MutDeviceMmio for MmioTransport {
    fn mmio_read(&mut self, _: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.read(offset, data)
    }
    fn mmio_write(&mut self, _: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.write(offset, data)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::virtio::ActivateError;
    use std::sync::Mutex;
    use vmcraft_memory::{layout::MemoryLayout, GuestRam};

    /// A device that records activations and resets, and keeps the queue notifiers
    /// of its last activation.
    #[derive(Default)]
    pub(crate) struct Probe {
        pub(crate) log: Arc<Mutex<Vec<String>>>,
        pub(crate) notifiers: Arc<Mutex<Vec<EventFd>>>,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            F_VERSION_1 | F_EVENT_IDX | 0b101
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn activate(&mut self, q: ActiveQueues) -> Result<(), ActivateError> {
            let sizes: Vec<u16> = q.queues.iter().map(|q| q.size()).collect();
            self.log.lock().unwrap().push(format!(
                "activate {sizes:?} ready {:?} features {:#x}",
                q.queues.iter().map(|q| q.ready()).collect::<Vec<_>>(),
                q.driver_features
            ));
            *self.notifiers.lock().unwrap() = q.notifiers;
            Ok(())
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().push("reset".into());
        }
    }

    pub(crate) fn memory() -> GuestMemory {
        GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap())
            .unwrap()
            .memory()
            .clone()
    }

    fn probe() -> (MmioTransport, Arc<Mutex<Vec<String>>>) {
        let p = Probe::default();
        let log = p.log.clone();
        (MmioTransport::new(Box::new(p), memory()).unwrap(), log)
    }

    fn r(t: &MmioTransport, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u32, v: u32) {
        t.write(u64::from(off), &v.to_le_bytes());
    }

    const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const DRV: u32 = VIRTIO_CONFIG_S_DRIVER;
    const FOK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    const DOK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;

    pub(crate) fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, reg::VIRTIO_MMIO_STATUS, ACK);
        w(t, reg::VIRTIO_MMIO_STATUS, ACK | DRV);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        w(t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
    }

    pub(crate) fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
        w(t, reg::VIRTIO_MMIO_QUEUE_SEL, index);
        w(t, reg::VIRTIO_MMIO_QUEUE_NUM, size);
        w(t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, base as u32);
        w(t, reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, (base >> 32) as u32);
        w(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
        w(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        w(t, reg::VIRTIO_MMIO_QUEUE_USED_LOW, (base + 0x2000) as u32);
        w(t, reg::VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        w(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    }

    pub(crate) fn driver_ok(t: &mut MmioTransport) {
        w(t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
    }

    /// A restored transport looks at each queue once: a notification the driver
    /// sent before the snapshot was counted in the old process only.
    #[test]
    fn a_restored_transport_notifies_each_queue_once() {
        let (mut t, _) = probe();
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, 0, 16, 0x10000);
        setup_queue(&mut t, 1, 4, 0x20000);
        driver_ok(&mut t);
        let state = t.pause_for_snapshot();
        let p = Probe::default();
        let notifiers = p.notifiers.clone();
        let mut restored = MmioTransport::new(Box::new(p), t.mem.clone()).unwrap();
        restored.restore_state(&state).unwrap();
        let counts: Vec<_> = notifiers
            .lock()
            .unwrap()
            .iter()
            .map(|fd| fd.read().ok())
            .collect();
        assert_eq!(counts, [Some(1), Some(1)]);
    }

    #[test]
    fn identity_registers() {
        let (mut t, _) = probe();
        assert_eq!(r(&t, reg::VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_DEVICE_ID), 42);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        assert_eq!(
            r(&t, reg::VIRTIO_MMIO_DEVICE_FEATURES),
            F_EVENT_IDX as u32 | 0b101
        );
        w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 1);
        w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 0);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        // Config space: any width, at any offset.
        let mut b = [0u8; 3];
        t.read(0x105, &mut b);
        assert_eq!(b, [5, 6, 7]);
        // Wrong-width register reads are all ones.
        let mut b = [0u8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn a_full_bring_up_activates_with_the_configured_queues() {
        let (mut t, log) = probe();
        negotiate(&mut t, F_VERSION_1 | F_EVENT_IDX);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_STATUS), ACK | DRV | FOK);
        setup_queue(&mut t, 0, 16, 0x10000);
        setup_queue(&mut t, 1, 4, 0x20000);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_QUEUE_READY), 1);
        driver_ok(&mut t);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_STATUS), ACK | DRV | FOK | DOK);
        assert_eq!(
            log.lock().unwrap().as_slice(),
            [format!(
                "activate [16, 4] ready [true, true] features {:#x}",
                F_VERSION_1 | F_EVENT_IDX
            )]
        );
        // Queue configuration is frozen while live...
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 1);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 2);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x9000);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_QUEUE_READY), 1);
        // ...but the driver may stop using a queue (virtio 1.2 §4.2.2.2): QueueReady
        // reads back 0 and the device stops.
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(log.lock().unwrap().last().unwrap(), "reset");
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
        // Reset.
        w(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_STATUS), 0);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(log.lock().unwrap().last().unwrap(), "reset");
    }

    #[test]
    fn features_ok_needs_version_1_and_only_offered_bits() {
        let (mut t, log) = probe();
        negotiate(&mut t, 0b101);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_STATUS), ACK | DRV);
        assert!(matches!(t.last_error(), Some(DriverError::NoVersion1)));
        w(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
        negotiate(&mut t, F_VERSION_1 | 0b10);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_STATUS), ACK | DRV);
        assert!(matches!(
            t.last_error(),
            Some(DriverError::UnofferedFeatures(0b10))
        ));
        // DRIVER_OK without FEATURES_OK is refused: nothing activates.
        driver_ok(&mut t);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_STATUS), ACK | DRV);
        assert!(log.lock().unwrap().iter().all(|l| l == "reset"));
        // Feature writes after FEATURES_OK are ignored.
        w(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
        negotiate(&mut t, F_VERSION_1);
        w(&mut t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::VIRTIO_MMIO_DRIVER_FEATURES, 0b100);
        assert_eq!(t.driver_features(), F_VERSION_1);
    }

    #[test]
    fn status_bits_cannot_be_cleared_or_skipped() {
        let (mut t, _) = probe();
        w(&mut t, reg::VIRTIO_MMIO_STATUS, DRV);
        assert_eq!(
            r(&t, reg::VIRTIO_MMIO_STATUS),
            0,
            "DRIVER before ACKNOWLEDGE"
        );
        negotiate(&mut t, F_VERSION_1);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_STATUS), ACK | DRV | FOK);
    }

    #[test]
    fn bad_queue_setups_leave_the_queue_unready_and_need_reset() {
        for (size, base, what) in [
            (3u32, 0x10000u64, "size not a power of two"),
            (32, 0x10000, "size above the maximum"),
            (0, 0x10000, "size zero"),
            (16, 0x10_0000 - 0x100, "rings past the end of memory"),
            (16, 0x5000_0000, "rings outside memory"),
            (16, 0x10001, "misaligned descriptor table"),
        ] {
            let (mut t, _) = probe();
            negotiate(&mut t, F_VERSION_1);
            setup_queue(&mut t, 0, size, base);
            assert_eq!(r(&t, reg::VIRTIO_MMIO_QUEUE_READY), 0, "{what}");
            assert_ne!(
                r(&t, reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
                0,
                "{what}"
            );
            assert_ne!(
                r(&t, reg::VIRTIO_MMIO_INTERRUPT_STATUS) & super::super::INT_CONFIG,
                0
            );
            // A reset clears the error.
            w(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
            assert_eq!(r(&t, reg::VIRTIO_MMIO_STATUS), 0);
            assert_eq!(r(&t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        }
    }

    #[test]
    fn a_driver_may_correct_queue_registers_before_queue_ready() {
        let (mut t, log) = probe();
        negotiate(&mut t, F_VERSION_1);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 3); // not a power of two...
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x10001); // ...misaligned...
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, 7); // ...outside memory
        assert_eq!(
            r(&t, reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        setup_queue(&mut t, 0, 16, 0x10000); // corrected
        setup_queue(&mut t, 1, 4, 0x20000);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_QUEUE_READY), 1);
        assert_eq!(
            r(&t, reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        driver_ok(&mut t);
        assert!(log
            .lock()
            .unwrap()
            .last()
            .unwrap()
            .starts_with("activate [16, 4]"));
    }

    #[test]
    fn absent_shared_memory_regions_read_as_minus_one() {
        let (mut t, _) = probe();
        for sel in [0, 1, 255] {
            w(&mut t, reg::VIRTIO_MMIO_SHM_SEL, sel);
            for off in [
                reg::VIRTIO_MMIO_SHM_LEN_LOW,
                reg::VIRTIO_MMIO_SHM_LEN_HIGH,
                reg::VIRTIO_MMIO_SHM_BASE_LOW,
                reg::VIRTIO_MMIO_SHM_BASE_HIGH,
            ] {
                assert_eq!(r(&t, off), u32::MAX, "register {off:#x}, region {sel}");
            }
        }
    }

    #[test]
    fn notify_signals_the_queue_eventfd_and_ack_clears_interrupts() {
        let (mut t, _) = probe();
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(t.notifiers()[1].read().unwrap(), 1);
        assert!(t.notifiers()[0].read().is_err(), "queue 0 was not notified");
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 9); // no such queue: ignored
        t.interrupt().raise(3);
        w(&mut t, reg::VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(r(&t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 2);
        t.config_changed();
        assert_eq!(r(&t, reg::VIRTIO_MMIO_CONFIG_GENERATION), 1);
    }
}
