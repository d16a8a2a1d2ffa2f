//! The virtio-mmio transport, version 2 (virtio 1.x, "modern" only).
//!
//! The register model is plain code: [`MmioTransport::read`] and
//! [`MmioTransport::write`] take an offset into the 4 KiB window and bytes, and are
//! unit tested without KVM. [`MmioTransport`] implements `vm-device`'s
//! `MutDeviceMmio`, so `Arc<Mutex<MmioTransport>>` goes straight onto an MMIO bus.
//!
//! What the transport enforces against a hostile driver (features, queue setup,
//! status) is [`VirtioCore`]'s, shared with virtio-pci; this module is the register
//! layout.

use crate::state::StateError;
use std::sync::Arc;

use virtio_bindings::virtio_mmio as reg;
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vmcraft_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use super::transport::VirtioCore;
pub use super::transport::{DriverError, QueueRegisters, TransportState};
use super::{Interrupt, VirtioDevice};
use crate::stop::StopLatch;

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

/// The virtio-mmio register file of one device.
#[derive(Debug)]
pub struct MmioTransport {
    core: VirtioCore,
}

impl MmioTransport {
    /// A transport for `device` over guest memory `mem`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory) -> std::io::Result<Self> {
        Ok(MmioTransport {
            core: VirtioCore::new("virtio-mmio", device, mem, Interrupt::new()?)?,
        })
    }

    /// Stop the VM through `latch` when the device fails on the host's side (it
    /// cannot start its I/O thread, say) instead of leaving a guest waiting on a device
    /// that will never serve it. Guest errors still only set NEEDS_RESET.
    pub fn stop_vm_on_host_failure(&mut self, latch: Arc<StopLatch>) {
        self.core.stop_vm_on_host_failure(latch)
    }

    /// The virtio device type of the device behind this transport (2 block, 4 entropy,
    /// ...).
    pub fn device_type(&self) -> u32 {
        self.core.device_type()
    }

    /// Pause the device for a snapshot ([`VirtioDevice::pause`]) and return the
    /// registers. Call [`MmioTransport::resume_after_snapshot`] to go on.
    pub fn pause_for_snapshot(&mut self) -> TransportState {
        self.core.pause_for_snapshot()
    }

    /// Serve again after [`MmioTransport::pause_for_snapshot`]: each queue resumes
    /// from the used index in guest memory.
    pub fn resume_after_snapshot(&mut self) {
        self.core.resume_after_snapshot()
    }

    /// Put back the registers of `state` (from a snapshot, whose memory this
    /// transport's guest memory holds) and, if the device was serving, start serving
    /// from the used index in guest memory. A state this transport would not have
    /// accepted from the driver is refused.
    pub fn restore_state(&mut self, state: &TransportState) -> Result<(), StateError> {
        self.core.restore_state(state)
    }

    /// The interrupt (its eventfd is the device's irqfd).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        self.core.interrupt()
    }

    /// One eventfd per queue, to register as ioeventfds at
    /// `base + QUEUE_NOTIFY_OFFSET` with the queue index as datamatch.
    pub fn notifiers(&self) -> &[EventFd] {
        self.core.notifiers()
    }

    /// The device status register (NEEDS_RESET included).
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

    /// Tell the driver the configuration changed (bumps the generation, raises a
    /// configuration interrupt).
    pub fn config_changed(&mut self) {
        self.core.config_changed()
    }

    /// A register read at `offset`; wrong-width register reads return all ones.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let config = u64::from(reg::VIRTIO_MMIO_CONFIG);
        if offset >= config {
            self.core.read_config(offset - config, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0xff);
            return;
        }
        let c = &self.core;
        let value = match offset as u32 {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            reg::VIRTIO_MMIO_VERSION => VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => c.device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => c.device_features_word(),
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => u32::from(c.queue_max_size()),
            reg::VIRTIO_MMIO_QUEUE_READY => u32::from(c.queue_ready()),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => c.interrupt().status(),
            reg::VIRTIO_MMIO_STATUS => c.status(),
            reg::VIRTIO_MMIO_CONFIG_GENERATION => c.config_generation(),
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
    /// (QueueNum and the ring address registers are write-only, virtio 1.2 §4.2.2.)
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let config = u64::from(reg::VIRTIO_MMIO_CONFIG);
        if offset >= config {
            self.core.write_config(offset - config, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes(bytes);
        let c = &mut self.core;
        match offset as u32 {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => c.select_device_features(value),
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => c.select_driver_features(value),
            reg::VIRTIO_MMIO_DRIVER_FEATURES => c.write_driver_features(value),
            reg::VIRTIO_MMIO_QUEUE_SEL => c.select_queue(value),
            reg::VIRTIO_MMIO_QUEUE_NUM => c.set_queue_size(value),
            reg::VIRTIO_MMIO_QUEUE_READY if value <= 1 => c.set_queue_ready(value == 1),
            r @ (reg::VIRTIO_MMIO_QUEUE_DESC_LOW
            | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | reg::VIRTIO_MMIO_QUEUE_USED_LOW
            | reg::VIRTIO_MMIO_QUEUE_USED_HIGH) => {
                let ring = match r & !4 {
                    reg::VIRTIO_MMIO_QUEUE_DESC_LOW => 0,
                    reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => 1,
                    _ => 2,
                };
                c.set_queue_ring(ring, r % 8 == 4, value)
            }
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => c.notify(value),
            reg::VIRTIO_MMIO_INTERRUPT_ACK => c.interrupt().acknowledge(value),
            reg::VIRTIO_MMIO_STATUS => c.set_status(value),
            _ => {}
        }
    }
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
    use crate::virtio::{ActiveQueues, F_EVENT_IDX, F_VERSION_1};
    use std::sync::Mutex;
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    };
    use virtio_queue::QueueT;
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
        let mut restored = MmioTransport::new(Box::new(p), t.core.memory().clone()).unwrap();
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
