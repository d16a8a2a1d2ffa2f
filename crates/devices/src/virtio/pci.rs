//! The virtio-pci transport, modern (virtio 1.2 §4.1): a PCI function whose BAR 0
//! holds the common configuration, the ISR status, the device configuration, the
//! queue notifications and the MSI-X table and PBA, each announced by a vendor
//! capability; plus the PCI configuration access capability (a window onto BAR 0
//! through configuration space). What the registers mean to the device (status,
//! features, queue setup and its checks) is [`VirtioCore`]'s, shared with
//! virtio-mmio.
//!
//! BAR 0 (64-bit, [`BAR_SIZE`] bytes):
//!
//! | offset | what |
//! |---|---|
//! | [`COMMON_OFFSET`] | common configuration |
//! | [`ISR_OFFSET`] | ISR status (read to clear) |
//! | [`DEVICE_OFFSET`] | device configuration |
//! | [`NOTIFY_OFFSET`] | notifications: queue `q` at `4 q` ([`NOTIFY_MULTIPLIER`]) |
//! | [`MSIX_TABLE_OFFSET`] | MSI-X table |
//! | [`MSIX_PBA_OFFSET`] | MSI-X pending bits |
//!
//! Each queue gets its MSI-X vector from the driver (`queue_msix_vector`); a vector
//! the function does not have reads back as [`NO_VECTOR`], as the specification
//! requires. A rewritten table entry is passed to the [`MsiRoutes`] the embedding
//! program gave, which points the vector's KVM route at the new message.

use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;

use super::transport::{DriverError, TransportState, VirtioCore};
use super::{Interrupt, VirtioDevice, NO_VECTOR};
use crate::pci::config::{BarKind, BarRange, ConfigurationState, PciConfiguration, PciHeader};
use crate::pci::msix::{MsiMessage, MsixState, MsixTable, MsixVectors, TableChange};
use crate::pci::root::PciFunction;
use crate::state::StateError;
use crate::stop::StopLatch;
use vmcraft_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

/// The virtio vendor ID.
pub const VENDOR_ID: u16 = 0x1af4;
/// A modern device's PCI device ID: this plus its virtio device type.
pub const DEVICE_ID_BASE: u16 = 0x1040;
/// Bytes of BAR 0.
pub const BAR_SIZE: u64 = 0x1_0000;
/// The common configuration in BAR 0.
pub const COMMON_OFFSET: u64 = 0x0000;
/// Bytes of the common configuration (without the optional notification-data and
/// queue-reset fields, whose features are not offered).
pub const COMMON_SIZE: u64 = 0x38;
/// The ISR status in BAR 0.
pub const ISR_OFFSET: u64 = 0x1000;
/// The device configuration in BAR 0.
pub const DEVICE_OFFSET: u64 = 0x2000;
/// Bytes of the device configuration window.
pub const DEVICE_SIZE: u64 = 0x1000;
/// The notification area in BAR 0.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// The MSI-X table in BAR 0.
pub const MSIX_TABLE_OFFSET: u64 = 0x8000;
/// The MSI-X pending-bit array in BAR 0.
pub const MSIX_PBA_OFFSET: u64 = 0xc000;

/// The vendor-specific capability id virtio uses.
const VENDOR_CAPABILITY: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;

/// Points each MSI-X vector's interrupt route at the message the guest wrote for it
/// (KVM's GSI routing, in the `vmcraft` crate's glue).
pub trait MsiRoutes: Send + Sync {
    /// Vector `vector` of this function now sends `message`.
    fn set_route(&self, vector: u16, message: MsiMessage);
}

/// Where a transport's queue notifications are caught without an exit (KVM
/// ioeventfds, in the `vmcraft` crate's glue): told when BAR 0 starts or stops
/// decoding, or moves, so the catching follows it.
pub trait NotifyWindow: Send {
    /// The notification area moved from `from` to `to` (either absent: decoding was
    /// off): queue `q`'s notifier is at the area + 4 q.
    fn moved(&mut self, notifiers: &[EventFd], from: Option<u64>, to: Option<u64>);
}

/// The virtio-pci transport's state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciTransportState {
    /// The virtio registers (status, features, queues) and the device's own state.
    pub virtio: TransportState,
    /// What the guest changed in configuration space (command, BARs, MSI-X control).
    pub config: ConfigurationState,
    /// The MSI-X table, control and pending bits.
    pub msix: MsixState,
    /// The configuration-change vector.
    pub config_vector: u16,
    /// Each queue's vector.
    pub queue_vectors: Vec<u16>,
}

impl vmcraft_snapshot::Versioned for PciTransportState {
    const VERSION: u32 = 1;
}

/// One virtio device as a PCI function. See the [module documentation](self).
pub struct PciTransport {
    core: VirtioCore,
    config: PciConfiguration,
    /// The configuration space as built, for saving only what the guest changed.
    built: PciConfiguration,
    msix: MsixTable,
    msix_cap: usize,
    pci_cfg_cap: usize,
    routes: Option<Arc<dyn MsiRoutes>>,
    notify_window: Option<Box<dyn NotifyWindow>>,
}

impl std::fmt::Debug for PciTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciTransport")
            .field("core", &self.core)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The PCI class code for a virtio device type.
fn class_of(device_type: u32) -> [u8; 3] {
    match device_type {
        1 => [0x02, 0x00, 0x00], // network controller, Ethernet
        2 => [0x01, 0x00, 0x00], // mass storage, SCSI
        3 => [0x07, 0x80, 0x00], // communication, other
        _ => [0xff, 0x00, 0x00], // unassigned class
    }
}

fn capability(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    // cap_len, cfg_type, bar, id, padding[2], offset, length, then `extra`.
    let mut body = vec![(16 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

impl PciTransport {
    /// A transport for `device` over guest memory `mem`, with one MSI-X vector per
    /// queue plus one for configuration changes.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory) -> std::io::Result<Self> {
        let queues = device.queue_max_sizes().len();
        let vectors = Arc::new(MsixVectors::new(queues as u16 + 1)?);
        let device_type = device.device_type();
        let interrupt = Interrupt::with_msix(vectors.clone(), queues)?;
        let core = VirtioCore::new("virtio-pci", device, mem, interrupt)?;
        let mut config = PciConfiguration::new(PciHeader {
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID_BASE + device_type as u16,
            revision: 1,
            class: class_of(device_type),
            subsystem_vendor_id: VENDOR_ID,
            subsystem_id: 0x40,
            interrupt_pin: 0,
        });
        let invalid = |e: &dyn std::error::Error| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
        };
        config
            .add_bar(0, BAR_SIZE, BarKind::Memory64)
            .map_err(|e| invalid(&e))?;
        let msix = MsixTable::new(vectors);
        let notify_length = queues as u64 * u64::from(NOTIFY_MULTIPLIER);
        let caps = [
            capability(CAP_COMMON, COMMON_OFFSET, COMMON_SIZE, &[]),
            capability(CAP_ISR, ISR_OFFSET, 4, &[]),
            capability(CAP_DEVICE, DEVICE_OFFSET, DEVICE_SIZE, &[]),
            capability(
                CAP_NOTIFY,
                NOTIFY_OFFSET,
                notify_length.max(4),
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
        ];
        for body in &caps {
            config
                .add_capability(VENDOR_CAPABILITY, body, &[])
                .map_err(|e| invalid(&e))?;
        }
        // The configuration access window: bar, offset and length are the driver's
        // to write, then pci_cfg_data (4 bytes) reads and writes BAR 0 there.
        let window = capability(CAP_PCI_CFG, 0, 0, &[0; 4]);
        let mut writable = vec![0u8; window.len()];
        writable[2] = 0xff; // bar
        writable[6..10].fill(0xff); // offset
        writable[10..14].fill(0xff); // length
        let pci_cfg_cap = config
            .add_capability(VENDOR_CAPABILITY, &window, &writable)
            .map_err(|e| invalid(&e))?;
        let (body, writable) =
            msix.capability(0, MSIX_TABLE_OFFSET as u32, 0, MSIX_PBA_OFFSET as u32);
        let msix_cap = config
            .add_capability(crate::pci::msix::CAPABILITY_ID, &body, &writable)
            .map_err(|e| invalid(&e))?;
        Ok(PciTransport {
            core,
            built: config.clone(),
            config,
            msix,
            msix_cap,
            pci_cfg_cap,
            routes: None,
            notify_window: None,
        })
    }

    /// Put BAR 0 at `address` (aligned to [`BAR_SIZE`]), as firmware would.
    pub fn place(&mut self, address: u64) -> Result<(), crate::pci::config::BarError> {
        self.config.place_bar(0, address)?;
        self.built = self.config.clone();
        Ok(())
    }

    /// Where vector messages go when the guest writes them.
    pub fn set_msi_routes(&mut self, routes: Arc<dyn MsiRoutes>) {
        self.routes = Some(routes);
    }

    /// Where the queue notifications are caught, following BAR 0.
    pub fn set_notify_window(&mut self, window: Box<dyn NotifyWindow>) {
        self.notify_window = Some(window);
    }

    /// Stop the VM through `latch` when the device fails on the host's side.
    pub fn stop_vm_on_host_failure(&mut self, latch: Arc<StopLatch>) {
        self.core.stop_vm_on_host_failure(latch)
    }

    /// The virtio device type behind this transport.
    pub fn device_type(&self) -> u32 {
        self.core.device_type()
    }

    /// One eventfd per queue, to register as ioeventfds at BAR 0 +
    /// [`NOTIFY_OFFSET`] + 4 × the queue's index (any value written).
    pub fn notifiers(&self) -> &[EventFd] {
        self.core.notifiers()
    }

    /// The MSI-X vectors (an irqfd each, for the vector's route).
    pub fn vectors(&self) -> &Arc<MsixVectors> {
        self.msix.vectors()
    }

    /// Vector `vector`'s message as the guest last wrote it.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        self.msix.message(vector)
    }

    /// The device status (NEEDS_RESET included).
    pub fn status(&self) -> u32 {
        self.core.status()
    }

    /// The last protocol error the driver made, if any.
    pub fn last_error(&self) -> Option<&DriverError> {
        self.core.last_error()
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.core.driver_features()
    }

    /// Tell the driver the configuration changed.
    pub fn config_changed(&mut self) {
        self.core.config_changed()
    }

    /// The interrupt the device raises.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        self.core.interrupt()
    }

    /// Pause the device for a snapshot and return the transport's state.
    pub fn pause_for_snapshot(&mut self) -> PciTransportState {
        let interrupt = self.core.interrupt();
        PciTransportState {
            config_vector: interrupt.config_vector(),
            queue_vectors: (0..self.core.queue_count() as u16)
                .map(|q| interrupt.queue_vector(q))
                .collect(),
            virtio: self.core.pause_for_snapshot(),
            config: self.config.save(&self.built),
            msix: self.msix.save(),
        }
    }

    /// Serve again after [`pause_for_snapshot`](Self::pause_for_snapshot).
    pub fn resume_after_snapshot(&mut self) {
        self.core.resume_after_snapshot()
    }

    /// Put back a snapshot's state: configuration space, MSI-X (every vector's
    /// route set again), vectors, then the virtio registers (the device serving again
    /// if it was). Everything is checked; the first bad value is named.
    pub fn restore_state(&mut self, state: &PciTransportState) -> Result<(), StateError> {
        let bad = |reason: String| StateError::new("virtio-pci transport", reason);
        let vectors = self.msix.vectors().count();
        let valid = |v: u16| v == NO_VECTOR || v < vectors;
        if state.queue_vectors.len() != self.core.queue_count() {
            return Err(bad(format!(
                "{} queue vectors saved for {} queues",
                state.queue_vectors.len(),
                self.core.queue_count()
            )));
        }
        if let Some(v) = std::iter::once(&state.config_vector)
            .chain(&state.queue_vectors)
            .find(|&&v| !valid(v))
        {
            return Err(bad(format!("vector {v} of a function with {vectors}")));
        }
        let mut config = self.built.clone();
        config
            .restore(&state.config)
            .map_err(|e| bad(format!("configuration space: {e}")))?;
        let mut msix = MsixTable::new(self.msix.vectors().clone());
        msix.set_bus_master(config.bus_master());
        msix.restore(&state.msix)
            .map_err(|e| bad(format!("MSI-X: {e}")))?;
        if config.read_u16(self.msix_cap + 2) & 0xc000 != state.msix.control {
            return Err(bad(
                "the MSI-X control differs from the configuration space".into(),
            ));
        }
        self.core.restore_state(&state.virtio)?;
        self.config = config;
        self.msix = msix;
        let interrupt = self.core.interrupt();
        interrupt.set_config_vector(state.config_vector);
        for (q, &v) in state.queue_vectors.iter().enumerate() {
            interrupt.set_queue_vector(q as u16, v);
        }
        if let Some(routes) = &self.routes {
            for v in 0..vectors {
                if let Some(message) = self.msix.message(v) {
                    routes.set_route(v, message);
                }
            }
        }
        Ok(())
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let c = &self.core;
        let interrupt = c.interrupt();
        let queue = c.queue_sel() as u16;
        let (size, rings) = c.queue_setup().unwrap_or((0, [0; 3]));
        let mut regs = [0u8; COMMON_SIZE as usize];
        let [device_sel, driver_sel] = c.feature_selectors();
        let mut put = |at: usize, bytes: &[u8]| regs[at..at + bytes.len()].copy_from_slice(bytes);
        put(0x00, &device_sel.to_le_bytes());
        put(0x04, &c.device_features_word().to_le_bytes());
        put(0x08, &driver_sel.to_le_bytes());
        put(0x0c, &c.driver_features_word().to_le_bytes());
        put(0x10, &interrupt.config_vector().to_le_bytes());
        put(0x12, &(c.queue_count() as u16).to_le_bytes());
        put(0x14, &[c.status() as u8]);
        put(0x15, &[c.config_generation() as u8]);
        put(0x16, &queue.to_le_bytes());
        put(0x18, &(size as u16).to_le_bytes());
        put(0x1a, &interrupt.queue_vector(queue).to_le_bytes());
        put(0x1c, &u16::from(c.queue_ready()).to_le_bytes());
        put(0x1e, &queue.to_le_bytes());
        for (i, ring) in rings.iter().enumerate() {
            put(0x20 + 8 * i, &ring.to_le_bytes());
        }
        let at = offset as usize;
        match regs.get(at..at + data.len()) {
            Some(bytes) if at.is_multiple_of(data.len()) => data.copy_from_slice(bytes),
            _ => data.fill(0),
        }
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let value = match *data {
            [a] => u64::from(a),
            [a, b] => u64::from(u16::from_le_bytes([a, b])),
            [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
            [..] if data.len() == 8 => u64::from_le_bytes(data.try_into().expect("eight bytes")),
            _ => return,
        };
        let width = data.len() as u64;
        if !offset.is_multiple_of(width) {
            return;
        }
        let vectors = self.msix.vectors().count();
        let checked = |v: u16| if v < vectors { v } else { NO_VECTOR };
        let c = &mut self.core;
        match (offset, width) {
            (0x00, 4) => c.select_device_features(value as u32),
            (0x08, 4) => c.select_driver_features(value as u32),
            (0x0c, 4) => c.write_driver_features(value as u32),
            (0x10, 2) => c.interrupt().set_config_vector(checked(value as u16)),
            (0x14, 1) => {
                c.set_status(value as u32);
                if value == 0 {
                    self.reset_vectors();
                }
            }
            (0x16, 2) => c.select_queue(value as u32),
            (0x18, 2) => c.set_queue_size(value as u32),
            (0x1a, 2) => {
                let queue = c.queue_sel() as u16;
                c.interrupt().set_queue_vector(queue, checked(value as u16));
            }
            // The driver writes 1 to enable; it must not write 0 (§4.1.4.3.2).
            (0x1c, 2) if value == 1 => c.set_queue_ready(true),
            (0x20 | 0x28 | 0x30, 8) => {
                let ring = ((offset - 0x20) / 8) as usize;
                c.set_queue_ring(ring, false, value as u32);
                c.set_queue_ring(ring, true, (value >> 32) as u32);
            }
            (0x20..=0x34, 4) => {
                let ring = ((offset - 0x20) / 8) as usize;
                c.set_queue_ring(ring, offset % 8 == 4, value as u32);
            }
            _ => {}
        }
    }

    /// After a device reset every vector is NO_VECTOR again.
    fn reset_vectors(&self) {
        let interrupt = self.core.interrupt();
        interrupt.set_config_vector(NO_VECTOR);
        for q in 0..self.core.queue_count() as u16 {
            interrupt.set_queue_vector(q, NO_VECTOR);
        }
    }

    /// A read of BAR 0 at `offset`.
    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_SIZE => self.common_read(o, data),
            ISR_OFFSET if data.len() == 1 => {
                // Reading the ISR status clears it (§4.1.4.5).
                let interrupt = self.core.interrupt();
                let isr = interrupt.status() & 0x3;
                interrupt.acknowledge(isr);
                data[0] = isr as u8;
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.core.read_config(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.read(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                self.msix.read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    /// A write of BAR 0 at `offset`.
    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_SIZE => self.common_write(o, data),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.core.write_config(o - DEVICE_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + 0x1000).contains(&o) => {
                let at = o - NOTIFY_OFFSET;
                if at.is_multiple_of(u64::from(NOTIFY_MULTIPLIER)) {
                    self.core.notify((at / u64::from(NOTIFY_MULTIPLIER)) as u32);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                for change in self.msix.write(o - MSIX_TABLE_OFFSET, data) {
                    if let (TableChange::Message(v), Some(routes)) = (change, &self.routes) {
                        if let Some(message) = self.msix.message(v) {
                            routes.set_route(v, message);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// The window of the PCI configuration access capability: BAR 0 at its offset,
    /// if the driver set bar 0 and a length of 1, 2 or 4 that this access matches.
    fn window(&self, data_len: usize) -> Option<u64> {
        let at = self.pci_cfg_cap;
        let bar = self.config.read_u32(at + 4) & 0xff;
        let offset = u64::from(self.config.read_u32(at + 8));
        let length = self.config.read_u32(at + 12) as usize;
        (bar == 0 && length == data_len && matches!(length, 1 | 2 | 4) && offset < BAR_SIZE)
            .then_some(offset)
    }
}

impl PciFunction for PciTransport {
    fn configuration(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        let window = self.pci_cfg_cap + 16;
        if (window..window + 4).contains(&offset) {
            match self.window(data.len()) {
                Some(at) if offset == window => self.bar0_read(at, data),
                _ => data.fill(0),
            }
            return;
        }
        self.config.read(offset, data)
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let window = self.pci_cfg_cap + 16;
        if (window..window + 4).contains(&offset) {
            if let Some(at) = self.window(data.len()).filter(|_| offset == window) {
                self.bar0_write(at, data);
            }
            return;
        }
        self.config.write(offset, data);
        let control = self.config.read_u16(self.msix_cap + 2);
        if control & 0xc000 != self.msix.control() {
            self.msix.set_control(control);
        }
        self.msix.set_bus_master(self.config.bus_master());
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == 0 {
            self.bar0_read(offset, data)
        } else {
            data.fill(0xff)
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == 0 {
            self.bar0_write(offset, data)
        }
    }

    fn bars_moved(&mut self, before: &[BarRange], after: &[BarRange]) {
        let area = |bars: &[BarRange]| {
            bars.iter()
                .find(|b| b.index == 0)
                .map(|b| b.address + NOTIFY_OFFSET)
        };
        let (from, to) = (area(before), area(after));
        if from != to {
            if let Some(window) = self.notify_window.as_mut() {
                window.moved(self.core.notifiers(), from, to);
            }
        }
    }
}

impl PciTransport {
    /// Whether the device has set NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.core.status() & VIRTIO_CONFIG_S_NEEDS_RESET != 0
    }
}

#[cfg(test)]
mod tests;
