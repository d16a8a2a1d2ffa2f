//! virtio devices driven by real guests on real KVM: a C driver at CPL 3 talks to the
//! virtio-mmio transport, notifications go through ioeventfds, requests are served on
//! the device's I/O thread.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use common::*;
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::devices::virtio::block::{Block, Disk};
use vmcraft::devices::virtio::console::Console;
use vmcraft::devices::virtio::mmio::MmioTransport;
use vmcraft::devices::virtio::net::Net;
use vmcraft::devices::virtio::rng::Rng;
use vmcraft::devices::virtio::tap::Tap;
use vmcraft::devices::virtio::VirtioDevice;
use vmcraft::vcpu::{ExitKind, StopReason, VcpuConfig};
use vmcraft_guest_kit::Guest;

const DISK_SECTORS: u64 = 2048; // 1 MiB

fn pattern_word(seed: u32, i: u32) -> u32 {
    seed.wrapping_mul(2_654_435_761) ^ i
}

fn check_image(file: &File, sector: u64, seed: u32) {
    let mut data = vec![0u8; 4096];
    file.read_exact_at(&mut data, sector * 512).unwrap();
    for (i, word) in data.chunks_exact(4).enumerate() {
        let got = u32::from_le_bytes(word.try_into().unwrap());
        let want = pattern_word(seed, 4 * i as u32);
        assert_eq!(got, want, "sector {sector} word {i}");
    }
}

fn run_block_guest(event_idx: bool) {
    run_block_guest_with(u64::from(event_idx));
}

/// The virtio-blk guest with parameter `param` (bit 0 EVENT_IDX, bit 2 teardown and
/// re-initialisation, bit 3 reset with I/O in flight); returns its console output.
fn run_block_guest_with(param: u64) -> String {
    let event_idx = param & 1 != 0;
    let image = ScratchImage::new(&format!("blk-guest-{param}"), DISK_SECTORS * 512);
    let file = image.file();
    let host_view = file.try_clone().unwrap();
    let disk = Disk::new(file, false, "vmcraft-disk-0").unwrap();
    let blk: Box<dyn VirtioDevice> = Box::new(Block::new(disk, "vblk0"));
    let vm = start_virtio_vm(Guest::VIRTIO_BLK, param, vec![blk]);
    let outcome = vm.running.run_for(TIMEOUT).unwrap();
    let console = String::from_utf8_lossy(&vm.serial.contents()).into_owned();
    let transport = vm.transports[0].lock().unwrap();
    assert_eq!(
        outcome.reason,
        vmcraft_guest_kit::exited(0),
        "guest failed; console: {console}; transport: {transport:?}"
    );
    assert!(
        console.contains("capacity 0x0000000000000800\n"),
        "{console}"
    );
    assert!(console.contains("id vmcraft-disk-0\n"), "{console}");
    assert!(
        transport.last_error().is_none(),
        "{:?}",
        transport.last_error()
    );
    assert_ne!(
        transport.driver_features() & (1 << 9),
        0,
        "FLUSH negotiated"
    );
    // After a re-initialisation the driver took the other EVENT_IDX choice.
    let renegotiated = param & 4 != 0;
    assert_eq!(
        transport.driver_features() & (1 << 29) != 0,
        event_idx != renegotiated
    );
    // What the guest wrote is in the image file.
    check_image(&host_view, 8, 1);
    for s in 0..16 {
        check_image(&host_view, 64 + 8 * s, 100 + s as u32);
    }
    if renegotiated {
        assert!(console.contains("re-initialised\n"), "{console}");
        check_image(&host_view, 16, 9);
    }
    if param & 8 != 0 {
        assert!(console.contains("reset in flight ok\n"), "{console}");
        check_image(&host_view, 24, 11);
    }
    // The guest never acknowledges an interrupt (it polls the used ring with
    // interrupts off): the device kept serving with InterruptStatus left set. (With
    // EVENT_IDX whether the last completions asked for an interrupt depends on where
    // the polling guest had moved used_event, so this is checked without it.)
    if transport.driver_features() & (1 << 29) == 0 {
        assert_ne!(
            transport.interrupt().status() & vmcraft::devices::virtio::INT_VRING,
            0
        );
    }
    drop(image);
    console
}

/// Teardown as virtio 1.2 §4.2.2.2 says, by a driver that stops the queue while the
/// device is live and polls QueueReady until it reads 0; then a reset and a bring-up
/// with different features, and the device works again.
#[test]
fn a_driver_tears_the_queue_down_live_and_the_device_works_after_reset() {
    run_block_guest_with(4);
    run_block_guest_with(4 | 1);
}

/// A reset with 16 writes published and notified: once the status reads 0 the device
/// leaves the old rings alone, and after a new bring-up it works.
#[test]
fn a_reset_with_io_in_flight_leaves_the_old_rings_alone() {
    run_block_guest_with(8);
    run_block_guest_with(8 | 1);
}

#[test]
fn a_guest_driver_reads_writes_flushes_and_batches_through_virtio_blk() {
    run_block_guest(false);
}

#[test]
fn the_same_with_event_idx() {
    run_block_guest(true);
}

#[test]
fn notifications_stay_in_the_kernel_with_ioeventfd() {
    let file = ScratchImage::new("blk-exits", DISK_SECTORS * 512).file();
    let blk: Box<dyn VirtioDevice> =
        Box::new(Block::new(Disk::new(file, false, "x").unwrap(), "vblk0"));
    let vm = start_virtio_vm(Guest::VIRTIO_BLK, 1, vec![blk]);
    let outcome = vm.running.wait_stopped(Some(TIMEOUT)).unwrap();
    assert_eq!(outcome.reason, vmcraft_guest_kit::exited(0));
    let stats = vm.running.stats(0).unwrap();
    let console = String::from_utf8_lossy(&vm.serial.contents()).into_owned();
    let notifications = console
        .lines()
        .find_map(|l| l.strip_prefix("requests 38 notifications 0x"))
        .map(|hex| u64::from_str_radix(hex, 16).unwrap())
        .unwrap_or_else(|| panic!("no notification count in {console}"));
    // Every request was notified (batches once), yet no notification reached the VMM:
    // the MMIO writes the VMM saw are only the set-up registers.
    assert!((1..=38).contains(&notifications), "{notifications}");
    let mmio_writes = stats.count(ExitKind::MmioWrite);
    assert!(
        mmio_writes < 40,
        "{mmio_writes} MMIO write exits: notifications left the kernel?"
    );
}

/// The console guest with a virtio-console whose input is the returned socket end
/// (output collected in the returned buffer), and optionally a virtio-blk after it.
fn console_vm(param: u64, with_blk: Option<Disk>) -> (VirtioVm, SharedBuffer, UnixStream) {
    let output = SharedBuffer::new();
    let (host_end, guest_end) = UnixStream::pair().unwrap();
    let mut devices: Vec<Box<dyn VirtioDevice>> = vec![Box::new(Console::new(
        Box::new(output.clone()),
        Some(Box::new(guest_end)),
        "vcon0",
    ))];
    if let Some(disk) = with_blk {
        devices.push(Box::new(Block::new(disk, "vblk0")));
    }
    (
        start_virtio_vm(Guest::VIRTIO_CONSOLE, param, devices),
        output,
        host_end,
    )
}

/// Run the console guest, send it "ping" from the host before it posts a buffer (so
/// the bytes must wait in the device, not be lost) and check its greeting and echo.
/// Returns the VM's virtio transports.
fn ping_over_console(param: u64, with_blk: Option<Disk>) -> Vec<Arc<Mutex<MmioTransport>>> {
    use std::io::Write;
    let (vm, output, mut host) = console_vm(param, with_blk);
    host.write_all(b"ping\n").unwrap();
    let outcome = vm.running.run_for(TIMEOUT).unwrap();
    let text = String::from_utf8_lossy(&output.contents()).into_owned();
    assert_eq!(
        outcome.reason,
        vmcraft_guest_kit::exited(0),
        "console: {text:?}"
    );
    assert_eq!(text, "hello from virtio-console\ngot: ping\n");
    vm.transports
}

#[test]
fn a_guest_talks_both_ways_over_virtio_console() {
    ping_over_console(0, None);
}

#[test]
fn a_device_the_guest_broke_needs_reset_while_the_others_keep_serving() {
    let file = ScratchImage::new("blk-broken", DISK_SECTORS * 512).file();
    let disk = Disk::new(file, false, "x").unwrap();
    // The console keeps serving while the guest breaks the block device.
    let transports = ping_over_console(1, Some(disk));
    let blk = transports[1].lock().unwrap();
    assert_ne!(
        blk.status() & 64,
        0,
        "NEEDS_RESET is set on the broken device"
    );
    assert!(
        matches!(
            blk.last_error(),
            Some(vmcraft::devices::virtio::mmio::DriverError::BadQueueSize { queue: 0, size: 3 })
        ),
        "{:?}",
        blk.last_error()
    );
}

/// A TAP interface in a network namespace of its own, addressed 10.0.2.1/24 with MAC
/// 02:00:00:00:00:01 and a static neighbour entry for the guest, plus a UDP socket
/// bound to 10.0.2.1:5000 in that namespace.
fn tap_in_private_netns() -> (Tap, std::net::UdpSocket) {
    let (mut taps, socket) = multi_queue_tap_in_private_netns(1);
    (taps.remove(0), socket)
}

/// [`tap_in_private_netns`] with `queues` queues of a multi-queue TAP.
fn multi_queue_tap_in_private_netns(queues: u16) -> (Vec<Tap>, std::net::UdpSocket) {
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces; it is a fresh thread
        // that ends right after setting the interface up.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "this test creates a network namespace (needs CAP_SYS_ADMIN): {}",
            std::io::Error::last_os_error()
        );
        let tap =
            Tap::open_queues("vmtap0", queues).expect("create a TAP interface in the namespace");
        // Children inherit this thread's namespace.
        for args in [
            "link set lo up",
            "link set vmtap0 address 02:00:00:00:00:01",
            "addr add 10.0.2.1/24 dev vmtap0",
            "link set vmtap0 up",
            "neigh add 10.0.2.2 lladdr 02:00:00:00:00:02 dev vmtap0",
        ] {
            let status = std::process::Command::new("ip")
                .args(args.split(' '))
                .status()
                .expect("run ip (iproute2)");
            assert!(status.success(), "ip {args} failed");
        }
        let socket = std::net::UdpSocket::bind("10.0.2.1:5000").expect("bind in the namespace");
        (tap, socket)
    })
    .join()
    .unwrap()
}

#[test]
fn a_guest_exchanges_real_frames_with_the_host_through_a_tap() {
    require_kvm();
    let (tap, socket) = tap_in_private_netns();
    let nic: Box<dyn VirtioDevice> = Box::new(Net::new(Box::new(tap), [2, 0, 0, 0, 0, 2], "vnet0"));
    let vm = start_virtio_vm(Guest::VIRTIO_NET, 0, vec![nic]);
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 256];
    let (n, from) = socket.recv_from(&mut buf).unwrap_or_else(|e| {
        panic!(
            "no datagram from the guest: {e}; {:?}",
            vm.transports[0].lock().unwrap()
        )
    });
    assert_eq!(&buf[..n], b"hello from a vmcraft guest");
    assert_eq!(from.to_string(), "10.0.2.2:4000");
    socket.send_to(b"pong", from).unwrap();
    let outcome = vm.running.run_for(TIMEOUT).unwrap();
    assert_eq!(outcome.reason, vmcraft_guest_kit::exited(0));
}

/// A multi-queue network device from a configuration (`queues: 2`, two queues of a
/// multi-queue TAP), driven by a guest whose driver does not take MQ: the device
/// serves it on its first pair, as a device must for a driver without MQ.
#[test]
fn a_driver_without_mq_uses_the_first_pair_of_a_configured_multi_queue_nic() {
    use vmcraft::config::{DeviceConfig, DeviceResource, HostResources, MachineConfig, NetConfig};
    require_kvm();
    let (taps, socket) = multi_queue_tap_in_private_netns(2);
    assert_eq!(taps.len(), 2);
    let config = MachineConfig {
        memory_mib: 16,
        devices: vec![DeviceConfig::VirtioNet(NetConfig {
            tap: "vmtap0".into(),
            mac: Some("02:00:00:00:00:02".into()),
            queues: Some(2),
        })],
        ..MachineConfig::default()
    };
    let serial = SharedBuffer::new();
    let mut b = machine_builder(16 << 20, Box::new(serial.clone()));
    b.configure(
        &config,
        HostResources {
            kernel: None,
            devices: vec![DeviceResource::Tap(taps)],
        },
    )
    .unwrap();
    let guest = Guest::VIRTIO_NET;
    b.load(guest.image()).unwrap();
    let machine = b.start(&[VcpuConfig::at(guest.entry(0, 0))]).unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 256];
    let (n, from) = socket
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no datagram from the guest: {e}; {:?}", machine.virtio()));
    assert_eq!(&buf[..n], b"hello from a vmcraft guest");
    socket.send_to(b"pong", from).unwrap();
    let transport = machine.virtio()[0].transport.clone();
    let outcome = machine.run_for(TIMEOUT).unwrap();
    assert_eq!(outcome.reason, vmcraft_guest_kit::exited(0));
    // The device offers MQ (net::several_pairs_offer_mq_and_a_control_queue_and_say_how_many);
    // this driver did not take it.
    let transport = transport.lock().unwrap();
    assert_eq!(
        transport.driver_features() & vmcraft::devices::virtio::net::F_MQ,
        0
    );
}

#[test]
fn a_guest_draws_entropy_from_virtio_rng() {
    let vm = start_virtio_vm(Guest::VIRTIO_RNG, 0, vec![Box::new(Rng::new("vrng0"))]);
    let outcome = vm.running.run_for(TIMEOUT).unwrap();
    assert_eq!(outcome.reason, vmcraft_guest_kit::exited(0));
    assert_eq!(vm.serial.contents(), b"rng ok\n");
}

/// A device that cannot start on the host's side (here: its I/O thread cannot be
/// made) stops the VM with `DeviceFailed` and its device ID, instead of leaving the
/// guest waiting on a device that never serves it.
#[test]
fn a_device_that_cannot_start_stops_the_vm() {
    use vmcraft::devices::virtio::{ActivateError, ActiveQueues};
    struct Broken;
    impl VirtioDevice for Broken {
        fn device_type(&self) -> u32 {
            4 // entropy: the rng guest drives it
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            vmcraft::devices::virtio::F_VERSION_1 | vmcraft::devices::virtio::F_EVENT_IDX
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn activate(&mut self, _: ActiveQueues) -> Result<(), ActivateError> {
            Err(ActivateError::Host {
                what: "spawn the I/O thread",
                source: std::io::Error::from_raw_os_error(libc::EAGAIN),
            })
        }
        fn reset(&mut self) {}
    }
    let vm = start_virtio_vm(Guest::VIRTIO_RNG, 0, vec![Box::new(Broken)]);
    let outcome = vm.running.run_for(TIMEOUT).unwrap();
    assert_eq!(outcome.reason, StopReason::DeviceFailed(4));
    let transport = vm.transports[0].lock().unwrap();
    assert!(
        matches!(
            transport.last_error(),
            Some(vmcraft::devices::virtio::mmio::DriverError::Activation(_))
        ),
        "{transport:?}"
    );
}
