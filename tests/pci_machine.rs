//! virtio-pci on a real KVM machine, driven from the machine's own buses as a guest's
//! accesses reach them: configuration through both mechanisms, the ACPI description,
//! MSI-X routes KVM accepts, notification ioeventfds that KVM holds at BAR 0 once
//! decoding is on (and moved with it), and a snapshot whose restore puts all of it
//! back. Linux's own virtio_pci driving these functions is the tier's `pci` scenario.

mod common;

use std::path::PathBuf;

use common::{logged_warnings, machine_builder, record_warnings, sandboxed};
use vmcraft::acpi::AcpiDevice;
use vmcraft::builder::MachineBuilder;
use vmcraft::devices::bus::IoBuses;
use vmcraft::devices::virtio::pci::{MSIX_TABLE_OFFSET, NOTIFY_OFFSET};
use vmcraft::devices::virtio::rng::Rng;
use vmcraft::pci_machine::PciSlot;
use vmcraft::vcpu::ioevent::IoEvents;
use vmcraft::vcpu::VcpuConfig;
use vmcraft_guest_kit::Guest;

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config_address(device: u8, register: u8) -> [u8; 4] {
    (0x8000_0000u32 | u32::from(device) << 11 | u32::from(register)).to_le_bytes()
}

fn read32(buses: &IoBuses, device: u8, register: u8) -> u32 {
    buses.pio_write(0xcf8, &config_address(device, register));
    let mut d = [0u8; 4];
    buses.pio_read(0xcfc, &mut d);
    u32::from_le_bytes(d)
}

fn write16(buses: &IoBuses, device: u8, register: u8, value: u16) {
    buses.pio_write(0xcf8, &config_address(device, register & !3));
    buses.pio_write(0xcfc + u16::from(register & 3), &value.to_le_bytes());
}

/// The offset of the MSI-X capability of `device`.
fn msix_cap(buses: &IoBuses, device: u8) -> u8 {
    let mut at = read32(buses, device, 0x34) as u8;
    while read32(buses, device, at) & 0xff != 0x11 {
        at = (read32(buses, device, at) >> 8) as u8;
        assert_ne!(at, 0, "no MSI-X capability");
    }
    at
}

fn two_rngs() -> (MachineBuilder, Vec<PciSlot>) {
    let mut b = machine_builder(32 << 20, Box::new(std::io::sink()));
    let slots = (0..2)
        .map(|i| {
            b.add_virtio_pci(Box::new(Rng::new(&format!("rng{i}"))))
                .unwrap()
        })
        .collect();
    (b, slots)
}

/// What the guest's driver does before it uses the functions: memory decoding and bus
/// mastering on, MSI-X on, vector 0 of each function pointed at the boot vCPU.
fn program(buses: &IoBuses, slots: &[PciSlot]) {
    for s in slots {
        write16(buses, s.device, 0x04, 0x6);
        let cap = msix_cap(buses, s.device);
        write16(buses, s.device, cap + 2, 0x8000);
        let entry = s.bar + MSIX_TABLE_OFFSET;
        buses.mmio_write(entry, &0xfee0_0000u32.to_le_bytes());
        buses.mmio_write(entry + 8, &(0x40 + u32::from(s.device)).to_le_bytes());
        buses.mmio_write(entry + 12, &0u32.to_le_bytes());
    }
}

/// Whether KVM holds an ioeventfd at `addr` (assigning another one there fails).
fn ioeventfd_held(events: &IoEvents, addr: u64) -> bool {
    let probe = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    match events.assign(&probe, addr) {
        Ok(()) => {
            events.deassign(&probe, addr).unwrap();
            false
        }
        Err(_) => true,
    }
}

#[test]
fn functions_are_found_routed_and_notified_and_a_snapshot_restores_them() {
    common::require_kvm();
    record_warnings();
    let (b, slots) = two_rngs();
    assert_eq!(
        slots.iter().map(|s| s.device).collect::<Vec<_>>(),
        [1, 2],
        "device 0 is the host bridge"
    );
    // The ACPI tables name the bridge and its windows.
    let bridge = b
        .acpi(1)
        .devices
        .into_iter()
        .find_map(|d| match d {
            AcpiDevice::PciHostBridge { ecam, window, .. } => Some((ecam, window)),
            _ => None,
        })
        .expect("a PCI host bridge in the ACPI description");
    assert!(slots.iter().all(|s| s.bar >= bridge.1));
    // The builder lists its functions, each saying where it is.
    assert_eq!(b.pci_slots().len(), 2);
    let shown = format!("{:?}", b.pci_slots()[1]);
    assert!(
        shown.contains("device: 2") && shown.contains(&format!("{:#x}", slots[1].bar)),
        "{shown}"
    );
    let events = IoEvents::new(b.vm().fd()).unwrap();
    let guest = Guest::COUNTER;
    let mut b = b;
    b.load(guest.image()).unwrap();
    let m = b.start(&[VcpuConfig::at(guest.entry(0, 0))]).unwrap();
    let buses = m.buses();
    // Both mechanisms: the legacy ports and ECAM.
    assert_eq!(read32(buses, 0, 0), 0x0008_1b36, "the host bridge");
    assert_eq!(read32(buses, 1, 0), 0x1044_1af4, "virtio-rng, modern");
    let mut d = [0u8; 4];
    buses.mmio_read(bridge.0 + (2 << 15), &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x1044_1af4);
    assert_eq!(read32(buses, 3, 0), u32::MAX, "nothing at device 3");
    // No notification is caught before the guest turns decoding on.
    let notify = |s: &PciSlot| s.bar + NOTIFY_OFFSET;
    assert!(!ioeventfd_held(&events, notify(&slots[0])));
    program(buses, &slots);
    for s in &slots {
        assert!(ioeventfd_held(&events, notify(s)), "device {}", s.device);
    }
    assert!(
        !logged_warnings().iter().any(|w| w.contains("no route")),
        "{:?}",
        logged_warnings()
    );
    // The guest moves device 2's BAR 0 within the window: the ioeventfd follows.
    let moved = slots[1].bar + 0x10_0000;
    buses.pio_write(0xcf8, &config_address(2, 0x10));
    buses.pio_write(0xcfc, &(moved as u32 | 0xc).to_le_bytes());
    assert!(ioeventfd_held(&events, moved + NOTIFY_OFFSET));
    assert!(!ioeventfd_held(&events, notify(&slots[1])));

    let dir = Dir(std::env::temp_dir().join(format!("vmcraft-pci-{}", std::process::id())));
    m.snapshot(&dir.0).unwrap();
    let messages: Vec<_> = slots
        .iter()
        .map(|s| s.transport.lock().unwrap().message(0))
        .collect();
    drop(m);
    drop(events);

    sandboxed();
    let (mut b, saved) = MachineBuilder::from_snapshot(&dir.0, Box::new(std::io::sink())).unwrap();
    let restored: Vec<PciSlot> = (0..2)
        .map(|i| {
            b.add_virtio_pci(Box::new(Rng::new(&format!("rng{i}"))))
                .unwrap()
        })
        .collect();
    let events = IoEvents::new(b.vm().fd()).unwrap();
    let m = b.start_restored(&saved).unwrap();
    let buses = m.buses();
    assert_eq!(
        read32(buses, 1, 0x04) & 0x6,
        0x6,
        "decoding and bus mastering"
    );
    assert_eq!(read32(buses, 2, 0x10) & !0xf, moved as u32, "the moved BAR");
    for (s, before) in restored.iter().zip(&messages) {
        assert_eq!(s.transport.lock().unwrap().message(0), *before);
    }
    assert!(ioeventfd_held(&events, notify(&restored[0])));
    assert!(ioeventfd_held(&events, moved + NOTIFY_OFFSET));
    assert!(!ioeventfd_held(&events, notify(&restored[1])));
    assert!(m.stop_reason().is_none());
}
