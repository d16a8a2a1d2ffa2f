//! The independent driver: rcore-os's `virtio-drivers` crate, written for other
//! hypervisors, drives vmcraft's virtio-blk, -rng, -console and -net from inside a
//! guest (`Guest::INDEPENDENT`), once with every device a virtio-pci function that it
//! finds through ECAM, sizes and reads the capabilities of on its own, and once on
//! virtio-mmio. The host side of each device is real: a disk image the host filled
//! and checks afterwards, console input and output, a datagram socket that echoes the
//! guest's frame.

mod common;

use std::io::Write;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::Duration;

use common::{logged_warnings, machine_builder, record_warnings, ScratchImage};
use vm_memory::{Bytes, GuestAddress};
use vmcraft::acpi::AcpiDevice;
use vmcraft::builder::MachineBuilder;
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::devices::virtio::block::{Block, Disk};
use vmcraft::devices::virtio::console::Console;
use vmcraft::devices::virtio::mmio::WINDOW_SIZE;
use vmcraft::devices::virtio::net::Net;
use vmcraft::devices::virtio::rng::Rng;
use vmcraft::devices::virtio::VirtioDevice;
use vmcraft::vcpu::VcpuConfig;
use vmcraft_guest_kit::abi::independent::{
    disk_byte, written_byte, Plan, ETHERTYPE, GUEST_LINE, HOST_LINE, WRITE_AT, WRITE_SECTORS,
};
use vmcraft_guest_kit::Guest;

/// Where the host writes the plan: below the guest's heap, above its image.
const PLAN_AT: u64 = 0x3f_f000;
const DISK_SECTORS: u64 = 2048;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// The host side of the four devices.
struct Peers {
    disk: ScratchImage,
    console_out: SharedBuffer,
    console_in: UnixStream,
    wire: UnixDatagram,
}

/// The four devices in the order the guest's checks name them, and their peers.
fn devices() -> (Vec<Box<dyn VirtioDevice>>, Peers) {
    let disk = ScratchImage::new("independent", DISK_SECTORS * 512);
    let contents: Vec<u8> = (0..DISK_SECTORS * 512)
        .map(|at| disk_byte(at / 512, (at % 512) as usize))
        .collect();
    disk.file().write_all(&contents).unwrap();
    let console_out = SharedBuffer::new();
    let (console_in, guest_in) = UnixStream::pair().unwrap();
    let (wire, guest_wire) = UnixDatagram::pair().unwrap();
    let devices: Vec<Box<dyn VirtioDevice>> = vec![
        Box::new(Block::new(
            Disk::new(common::open_rw(disk.path()), false, "independent").unwrap(),
            "vblk0",
        )),
        Box::new(Rng::new("rng0")),
        Box::new(Console::new(
            Box::new(console_out.clone()),
            Some(Box::new(guest_in)),
            "hvc0",
        )),
        Box::new(Net::new(Box::new(guest_wire), MAC, "net0")),
    ];
    let peers = Peers {
        disk,
        console_out,
        console_in,
        wire,
    };
    (devices, peers)
}

/// Run the guest on `b` (COM1 into `serial`) with `plan` while the peers answer it;
/// then check what the guest reported and what reached the host.
fn run(mut b: MachineBuilder, serial: &SharedBuffer, mut plan: Plan, peers: &Peers) {
    plan.magic = Plan::MAGIC;
    plan.disk_sectors = DISK_SECTORS;
    let mut mac = [0u8; 8];
    mac[..6].copy_from_slice(&MAC);
    plan.mac = u64::from_le_bytes(mac);
    b.memory()
        .write_slice(&plan.to_bytes(), GuestAddress(PLAN_AT))
        .unwrap();
    let guest = Guest::INDEPENDENT;
    b.load(guest.image()).unwrap();
    (&peers.console_in).write_all(HOST_LINE).unwrap();
    let m = b.start(&[VcpuConfig::at(guest.entry(0, PLAN_AT))]).unwrap();
    let said = || String::from_utf8_lossy(&serial.contents()).into_owned();
    // The wire's far end: echo the guest's frame with its payload reversed.
    peers
        .wire
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut frame = [0u8; 2048];
    let n = peers
        .wire
        .recv(&mut frame)
        .unwrap_or_else(|e| panic!("no frame from the guest ({e}):\n{}", said()));
    let frame = &mut frame[..n];
    assert_eq!(frame[12..14], ETHERTYPE, "{frame:02x?}");
    assert_eq!(frame[6..12], MAC, "the source is the device's MAC");
    frame[14..].reverse();
    peers.wire.send(frame).unwrap();

    let outcome = m.run_for(Duration::from_secs(120)).unwrap();
    let said = said();
    assert_eq!(
        outcome.reason,
        vmcraft_guest_kit::exited(0),
        "{said}\nwarnings: {:?}",
        logged_warnings()
    );
    // 1 for finding the devices, 4 block, 1 entropy, 2 console, 2 net.
    assert!(said.contains("independent: 10/10 passed"), "{said}");
    assert!(!said.contains("FAILED"), "{said}");
    // What the driver wrote reached the host: the console line and the sectors.
    assert_eq!(peers.console_out.contents(), GUEST_LINE);
    let disk = peers.disk.contents();
    for s in WRITE_AT..WRITE_AT + WRITE_SECTORS {
        for i in 0..512 {
            assert_eq!(
                disk[s * 512 + i],
                written_byte(s as u64, i),
                "sector {s} byte {i}"
            );
        }
    }
    // And nothing else changed.
    for s in
        (0..DISK_SECTORS as usize).filter(|s| !(WRITE_AT..WRITE_AT + WRITE_SECTORS).contains(s))
    {
        assert!(
            (0..512).all(|i| disk[s * 512 + i] == disk_byte(s as u64, i)),
            "sector {s} changed"
        );
    }
}

#[test]
fn virtio_drivers_passes_on_pci() {
    common::require_kvm();
    record_warnings();
    let serial = SharedBuffer::new();
    let mut b = machine_builder(64 << 20, Box::new(serial.clone()));
    let (devices, peers) = devices();
    for d in devices {
        b.add_virtio_pci(d).unwrap();
    }
    let ecam = b
        .acpi(1)
        .devices
        .into_iter()
        .find_map(|d| match d {
            AcpiDevice::PciHostBridge { ecam, .. } => Some(ecam),
            _ => None,
        })
        .expect("a PCI host bridge");
    let plan = Plan {
        transport: Plan::PCI,
        base: ecam,
        ..Plan::default()
    };
    run(b, &serial, plan, &peers);
    let said = String::from_utf8_lossy(&serial.contents()).into_owned();
    // It found the host bridge and the four functions itself.
    assert!(said.contains("00:00.0 1b36:0008"), "{said}");
    assert_eq!(said.matches(" 1af4:10").count(), 4, "{said}");
}

#[test]
fn virtio_drivers_passes_on_mmio() {
    common::require_kvm();
    record_warnings();
    let serial = SharedBuffer::new();
    let mut b = machine_builder(64 << 20, Box::new(serial.clone()));
    let (devices, peers) = devices();
    let mut plan = Plan {
        transport: Plan::MMIO,
        window_size: WINDOW_SIZE,
        ..Plan::default()
    };
    for d in devices {
        plan.windows[plan.count as usize] = b.add_virtio(d).unwrap().base;
        plan.count += 1;
    }
    run(b, &serial, plan, &peers);
}
