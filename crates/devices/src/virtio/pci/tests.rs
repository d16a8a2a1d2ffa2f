//! The virtio-pci transport driven as Linux's virtio_pci (modern) drives it: every
//! structure found through the capability list, features negotiated through the
//! common configuration, each queue given a vector, MSI-X programmed through the
//! table in BAR 0.

use super::*;
use crate::pci::msix::CONTROL_ENABLE;
use crate::virtio::mmio::tests::{memory, Probe};
use crate::virtio::{F_EVENT_IDX, F_VERSION_1};
use std::sync::Mutex;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};

const BAR: u64 = 0xe000_0000;

fn transport() -> (PciTransport, Arc<Mutex<Vec<String>>>) {
    let probe = Probe::default();
    let log = probe.log.clone();
    let mut t = PciTransport::new(Box::new(probe), memory()).unwrap();
    t.place(BAR).unwrap();
    (t, log)
}

/// The virtio capabilities as a driver finds them: type → (bar, offset, length,
/// capability offset).
fn virtio_caps(t: &mut PciTransport) -> Vec<(u8, u8, u32, u32, usize)> {
    let mut found = Vec::new();
    let mut at = t.configuration().read_u32(0x34) as usize & 0xfc;
    let mut seen = 0;
    while at != 0 && seen < 48 {
        let header = t.configuration().read_u32(at);
        if header & 0xff == 0x09 {
            let word = t.configuration().read_u32(at);
            let cfg_type = (word >> 24) as u8;
            let bar = t.configuration().read_u32(at + 4) as u8;
            let offset = t.configuration().read_u32(at + 8);
            let length = t.configuration().read_u32(at + 12);
            found.push((cfg_type, bar, offset, length, at));
        }
        at = (header >> 8) as usize & 0xfc;
        seen += 1;
    }
    found
}

fn r(t: &mut PciTransport, offset: u64, width: usize) -> u64 {
    let mut d = [0u8; 8];
    t.bar_read(0, offset, &mut d[..width]);
    u64::from_le_bytes(d)
}

fn w(t: &mut PciTransport, offset: u64, width: usize, value: u64) {
    t.bar_write(0, offset, &value.to_le_bytes()[..width]);
}

/// Bring the device up as virtio_pci does: negotiate, set up both queues with a
/// vector each, DRIVER_OK.
fn bring_up(t: &mut PciTransport) {
    w(t, 0x14, 1, 0);
    w(t, 0x14, 1, u64::from(VIRTIO_CONFIG_S_ACKNOWLEDGE));
    w(
        t,
        0x14,
        1,
        u64::from(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER),
    );
    for sel in 0..2u64 {
        w(t, 0x00, 4, sel);
        let offered = r(t, 0x04, 4);
        w(t, 0x08, 4, sel);
        w(t, 0x0c, 4, offered);
    }
    let features = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    w(
        t,
        0x14,
        1,
        u64::from(features | VIRTIO_CONFIG_S_FEATURES_OK),
    );
    assert_eq!(
        r(t, 0x14, 1) as u32 & VIRTIO_CONFIG_S_FEATURES_OK,
        VIRTIO_CONFIG_S_FEATURES_OK
    );
    w(t, 0x10, 2, 2); // configuration changes on vector 2
    for q in 0..2u64 {
        w(t, 0x16, 2, q);
        let size = r(t, 0x18, 2);
        w(t, 0x18, 2, size);
        w(t, 0x1a, 2, q);
        assert_eq!(r(t, 0x1a, 2), q, "vector {q} accepted");
        let base = 0x1000 * (q + 1) * 4;
        // Two 32-bit halves, as Linux's vp_iowrite64_twopart does.
        w(t, 0x20, 4, base);
        w(t, 0x24, 4, 0);
        w(t, 0x28, 8, base + 0x1000);
        w(t, 0x30, 4, base + 0x2000);
        w(t, 0x34, 4, 0);
        w(t, 0x1c, 2, 1);
        assert_eq!(r(t, 0x1c, 2), 1, "queue {q} enabled");
    }
    w(
        t,
        0x14,
        1,
        u64::from(features | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK),
    );
}

#[test]
fn the_function_announces_itself_and_every_structure_through_capabilities() {
    let (mut t, _) = transport();
    let c = t.configuration();
    assert_eq!(c.read_u32(0), (0x1040 + 42) << 16 | 0x1af4);
    assert_eq!(c.read_u32(0x08) & 0xff, 1, "revision 1: modern only");
    assert_eq!(c.read_u16(0x2c), 0x1af4);
    assert_eq!(c.bar(0).unwrap().address, BAR);
    let caps = virtio_caps(&mut t);
    let by_type = |ty: u8| caps.iter().find(|c| c.0 == ty).copied().unwrap();
    assert_eq!(by_type(1).1..=by_type(1).3 as u8, 0..=COMMON_SIZE as u8);
    assert_eq!((by_type(3).2, by_type(4).2), (0x1000, 0x2000));
    let notify = by_type(2);
    assert_eq!((notify.2, notify.3), (0x3000, 8));
    assert_eq!(t.configuration().read_u32(notify.4 + 16), NOTIFY_MULTIPLIER);
    assert!(
        caps.iter().any(|c| c.0 == 5),
        "a PCI configuration access capability"
    );
    // MSI-X: 3 vectors (two queues and configuration), table and PBA in BAR 0.
    let mut at = t.configuration().read_u32(0x34) as usize;
    while t.configuration().read_u32(at) & 0xff != 0x11 {
        at = (t.configuration().read_u32(at) >> 8) as usize & 0xfc;
    }
    let c = t.configuration();
    assert_eq!(c.read_u16(at + 2) & 0x7ff, 2);
    assert_eq!(c.read_u32(at + 4), MSIX_TABLE_OFFSET as u32);
    assert_eq!(c.read_u32(at + 8), MSIX_PBA_OFFSET as u32);
    // The common configuration as a fresh device shows it.
    assert_eq!(r(&mut t, 0x12, 2), 2, "num_queues");
    w(&mut t, 0x16, 2, 1);
    assert_eq!((r(&mut t, 0x18, 2), r(&mut t, 0x1e, 2)), (8, 1));
    assert_eq!(r(&mut t, 0x1a, 2), u64::from(NO_VECTOR));
    w(&mut t, 0x16, 2, 5);
    assert_eq!(r(&mut t, 0x18, 2), 0, "no queue 5: size 0");
}

#[test]
fn a_driver_brings_the_device_up_and_each_queue_interrupts_on_its_vector() {
    let (mut t, log) = transport();
    bring_up(&mut t);
    assert_eq!(
        *log.lock().unwrap(),
        [
            "reset".to_string(),
            format!(
                "activate [16, 8] ready [true, true] features {:#x}",
                F_VERSION_1 | F_EVENT_IDX | 0b101
            )
        ]
    );
    // Features read back as negotiated.
    w(&mut t, 0x08, 4, 1);
    assert_eq!(r(&mut t, 0x0c, 4), F_VERSION_1 >> 32);
    // MSI-X on, vectors programmed and unmasked through the table.
    let routes = Arc::new(Recorded::default());
    t.set_msi_routes(routes.clone());
    let msix_cap = t.msix_cap;
    // pci_enable_device and pci_set_master, then MSI-X on.
    let command = crate::pci::config::COMMAND_MEMORY | crate::pci::config::COMMAND_BUS_MASTER;
    t.config_write(crate::pci::config::COMMAND, &command.to_le_bytes());
    t.config_write(msix_cap + 2, &CONTROL_ENABLE.to_le_bytes());
    for v in 0..3u64 {
        let entry = MSIX_TABLE_OFFSET + v * 16;
        w(&mut t, entry, 4, 0xfee0_0000);
        w(&mut t, entry + 8, 4, 0x30 + v);
        w(&mut t, entry + 12, 4, 0);
    }
    let expected: Vec<(u16, u64, u32)> = (0..3u16)
        .flat_map(|v| [(v, 0xfee0_0000, 0), (v, 0xfee0_0000, 0x30 + u32::from(v))])
        .collect();
    assert_eq!(*routes.0.lock().unwrap(), expected);
    let fired = |t: &PciTransport, v: u16| t.vectors().irqfd(v).unwrap().read().unwrap_or(0);
    t.interrupt().queue(1).signal();
    t.interrupt().queue(0).signal();
    t.interrupt().queue(1).signal();
    assert_eq!((fired(&t, 0), fired(&t, 1), fired(&t, 2)), (1, 2, 0));
    t.config_changed();
    assert_eq!(fired(&t, 2), 1);
    // Bus mastering off: the queue's event waits in its pending bit until it is on.
    let no_master = crate::pci::config::COMMAND_MEMORY;
    t.config_write(crate::pci::config::COMMAND, &no_master.to_le_bytes());
    t.interrupt().queue(0).signal();
    assert_eq!(fired(&t, 0), 0);
    t.config_write(crate::pci::config::COMMAND, &command.to_le_bytes());
    assert_eq!(fired(&t, 0), 1);
    assert_eq!(r(&mut t, 0x15, 1), 1, "config generation");
    // With MSI-X the ISR is not used.
    assert_eq!(r(&mut t, ISR_OFFSET, 1), 0);
    // Notifications: queue 1 at 4 × 1.
    w(&mut t, NOTIFY_OFFSET + 4, 2, 1);
    assert_eq!(t.notifiers()[1].read().unwrap(), 1);
    // A reset: status 0, every vector NO_VECTOR again.
    w(&mut t, 0x14, 1, 0);
    assert_eq!(r(&mut t, 0x14, 1), 0);
    assert_eq!(r(&mut t, 0x10, 2), u64::from(NO_VECTOR));
    w(&mut t, 0x16, 2, 0);
    assert_eq!(r(&mut t, 0x1a, 2), u64::from(NO_VECTOR));
    assert_eq!(log.lock().unwrap().last().unwrap(), "reset");
}

#[derive(Default)]
struct Recorded(Mutex<Vec<(u16, u64, u32)>>);

impl MsiRoutes for Recorded {
    fn set_route(&self, vector: u16, message: MsiMessage) {
        self.0
            .lock()
            .unwrap()
            .push((vector, message.address, message.data));
    }
}

#[test]
fn vectors_the_function_lacks_read_back_as_no_vector_and_bad_setups_need_a_reset() {
    let (mut t, _) = transport();
    w(
        &mut t,
        0x14,
        1,
        u64::from(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER),
    );
    w(&mut t, 0x10, 2, 3);
    assert_eq!(r(&mut t, 0x10, 2), u64::from(NO_VECTOR));
    w(&mut t, 0x16, 2, 0);
    w(&mut t, 0x1a, 2, 7);
    assert_eq!(r(&mut t, 0x1a, 2), u64::from(NO_VECTOR));
    // A queue size that is not a power of two: enabling it fails and the device
    // needs a reset (a configuration interrupt on NO_VECTOR goes nowhere).
    w(&mut t, 0x18, 2, 3);
    w(&mut t, 0x1c, 2, 1);
    assert_eq!(r(&mut t, 0x1c, 2), 0);
    assert!(t.needs_reset());
    assert!(matches!(
        t.last_error(),
        Some(DriverError::BadQueueSize { queue: 0, size: 3 })
    ));
    // Writing 0 to queue_enable is not the driver's to do: ignored.
    w(&mut t, 0x1c, 2, 0);
    // Odd widths and misaligned accesses of the common configuration.
    w(&mut t, 0x16, 4, 1);
    assert_eq!(r(&mut t, 0x16, 2), 0);
    w(&mut t, 0x17, 1, 1);
    assert_eq!(r(&mut t, 0x16, 2), 0);
    let mut three = [0u8; 3];
    t.bar_read(0, 0, &mut three);
    assert_eq!(three, [0; 3]);
    t.bar_write(0, 0, &[1, 2, 3]);
    // Other BARs: nothing.
    let mut d = [0u8; 4];
    t.bar_read(2, 0, &mut d);
    assert_eq!(d, [0xff; 4]);
}

#[test]
fn without_msix_the_isr_carries_interrupts_and_clears_on_read() {
    let (mut t, _) = transport();
    // MSI-X off (§4.1.5.3): the ISR bit is set before the notification, and the
    // driver's read clears it.
    t.interrupt().raise(crate::virtio::INT_CONFIG);
    assert_eq!(r(&mut t, ISR_OFFSET, 1), 2);
    assert_eq!(r(&mut t, ISR_OFFSET, 1), 0);
    t.interrupt().queue(1).signal();
    assert_eq!(r(&mut t, ISR_OFFSET, 1), 1);
    assert_eq!(r(&mut t, ISR_OFFSET, 1), 0);
    // With MSI-X on, the vectors carry them and the ISR stays 0.
    let msix_cap = t.msix_cap;
    t.config_write(msix_cap + 2, &CONTROL_ENABLE.to_le_bytes());
    t.interrupt().queue(1).signal();
    t.interrupt().raise(crate::virtio::INT_CONFIG);
    assert_eq!(r(&mut t, ISR_OFFSET, 1), 0);
}

#[test]
fn the_configuration_access_window_reaches_bar_0() {
    let (mut t, _) = transport();
    let cap = virtio_caps(&mut t)
        .into_iter()
        .find(|c| c.0 == 5)
        .unwrap()
        .4;
    // bar 0, offset 0x12 (num_queues), length 2.
    t.config_write(cap + 4, &[0]);
    t.config_write(cap + 8, &0x12u32.to_le_bytes());
    t.config_write(cap + 12, &2u32.to_le_bytes());
    let mut d = [0u8; 2];
    t.config_read(cap + 16, &mut d);
    assert_eq!(u16::from_le_bytes(d), 2);
    // A length that does not match the access reads 0 and writes nothing.
    let mut four = [0u8; 4];
    t.config_read(cap + 16, &mut four);
    assert_eq!(four, [0; 4]);
    // Writing the status through the window.
    t.config_write(cap + 8, &0x14u32.to_le_bytes());
    t.config_write(cap + 12, &1u32.to_le_bytes());
    t.config_write(cap + 16, &[VIRTIO_CONFIG_S_ACKNOWLEDGE as u8]);
    assert_eq!(t.status(), VIRTIO_CONFIG_S_ACKNOWLEDGE);
    // The identity cannot be written through configuration space.
    t.config_write(0, &[0; 4]);
    assert_eq!(t.configuration().read_u16(0), VENDOR_ID);
}

#[test]
fn a_snapshot_restores_the_function_its_vectors_and_its_routes_and_refuses_forgeries() {
    let (mut t, log) = transport();
    bring_up(&mut t);
    let msix_cap = t.msix_cap;
    t.config_write(
        4,
        &(crate::pci::config::COMMAND_MEMORY | crate::pci::config::COMMAND_BUS_MASTER)
            .to_le_bytes(),
    );
    t.config_write(msix_cap + 2, &CONTROL_ENABLE.to_le_bytes());
    w(&mut t, MSIX_TABLE_OFFSET + 16, 4, 0xfee0_1000);
    w(&mut t, MSIX_TABLE_OFFSET + 24, 4, 0x45);
    let state = t.pause_for_snapshot();
    t.resume_after_snapshot();
    assert_eq!(state.queue_vectors, [0, 1]);
    assert_eq!(state.config_vector, 2);

    let (mut restored, restored_log) = transport();
    let routes = Arc::new(Recorded::default());
    restored.set_msi_routes(routes.clone());
    restored.restore_state(&state).unwrap();
    assert_eq!(
        restored.configuration().command(),
        t.configuration().command()
    );
    assert_eq!(restored.message(1), t.message(1));
    assert!(routes.0.lock().unwrap().contains(&(1, 0xfee0_1000, 0x45)));
    assert_eq!(restored.status(), t.status());
    assert_eq!(restored.interrupt().queue_vector(1), 1);
    assert!(restored_log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.starts_with("activate")));
    let _ = log;

    let refused = |mutate: &dyn Fn(&mut PciTransportState)| {
        let mut forged = state.clone();
        mutate(&mut forged);
        let (mut fresh, _) = transport();
        fresh.restore_state(&forged).unwrap_err().to_string()
    };
    assert!(refused(&|s| s.queue_vectors.push(0)).contains("3 queue vectors"));
    assert!(refused(&|s| s.config_vector = 9).contains("vector 9"));
    assert!(refused(&|s| s.config.changed.push((0, 0))).contains("configuration space"));
    assert!(refused(&|s| s.msix.entries.pop().map(drop).unwrap_or(())).contains("MSI-X"));
    assert!(refused(&|s| s.msix.control = 0).contains("MSI-X control"));
}

type Moves = Arc<Mutex<Vec<(Option<u64>, Option<u64>, usize)>>>;

struct Window(Moves);

impl NotifyWindow for Window {
    fn moved(&mut self, notifiers: &[EventFd], from: Option<u64>, to: Option<u64>) {
        self.0.lock().unwrap().push((from, to, notifiers.len()));
    }
}

#[test]
fn the_notification_area_follows_bar_0_as_the_guest_enables_moves_and_restores_it() {
    use crate::pci::config::COMMAND_MEMORY;
    use crate::pci::root::{ecam_offset, PciRoot};
    let (mut t, _) = transport();
    let moves = Moves::default();
    t.set_notify_window(Box::new(Window(moves.clone())));
    let t = Arc::new(Mutex::new(t));
    let root = PciRoot::new();
    let dev = root.add(t.clone()).unwrap();
    let write = |reg: u16, data: &[u8]| root.config_write(ecam_offset(dev, 0, reg), data);
    write(4, &COMMAND_MEMORY.to_le_bytes());
    write(0x10, &0xd000_0000u32.to_le_bytes());
    write(4, &0u16.to_le_bytes());
    // A restore that puts memory decoding back behind the root's back.
    t.lock()
        .unwrap()
        .config
        .write(4, &COMMAND_MEMORY.to_le_bytes());
    root.refresh(dev);
    root.refresh(dev);
    let notify = |bar: u64| Some(bar + NOTIFY_OFFSET);
    assert_eq!(
        *moves.lock().unwrap(),
        [
            (None, notify(BAR), 2),
            (notify(BAR), notify(0xd000_0000), 2),
            (notify(0xd000_0000), None, 2),
            (None, notify(0xd000_0000), 2),
        ]
    );
    // Accesses follow the BAR: the common configuration at the new address.
    let mut d = [0u8; 2];
    root.bar_read(0xd000_0012, false, &mut d);
    assert_eq!(u16::from_le_bytes(d), 2, "num_queues");
}
