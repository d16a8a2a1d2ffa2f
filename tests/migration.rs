//! Live migration between two machines over TCP on localhost, on real KVM: a guest that
//! keeps rewriting and checking 64 MiB, and one that keeps virtio-blk batches in
//! flight, are migrated while they run. After it each goes on at the destination and
//! verifies all its memory: the source's output up to the hand-over followed by the
//! destination's is exactly an undisturbed run's. A wrong secret, and a connection cut
//! mid-way, leave the source running to the end.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use vmcraft::builder::{Machine, MachineBuilder};
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::migration::{MigrationError, MigrationOptions};
use vmcraft::vcpu::VcpuConfig;
use vmcraft_guest_kit::{memcheck_output, Guest};

const MIB: u64 = 64;
const ROUNDS: u64 = 40;
const RAM: u64 = (16 + MIB + 16) << 20;
const SECRET: &[u8] = b"a secret both VMMs were given";

fn start_memcheck(serial: &SharedBuffer) -> Machine {
    let mut b = machine_builder(RAM, Box::new(serial.clone()));
    let guest = Guest::MEMCHECK;
    b.load(guest.image()).unwrap();
    b.start(&[VcpuConfig::at(guest.entry(0, MIB | ROUNDS << 16))])
        .unwrap()
}

fn finish(m: Machine, serial: &SharedBuffer, what: &str) {
    let outcome = m.running.wait_timeout(Duration::from_secs(120)).unwrap();
    assert_eq!(
        outcome.reason,
        vmcraft_guest_kit::exited(0),
        "{what}: {}",
        String::from_utf8_lossy(&serial.contents())
    );
}

/// Receive one migration on `listener` with `secret`, add devices with `devices`,
/// start it; the destination's COM1 goes to `serial`.
fn destination(
    listener: TcpListener,
    secret: &'static [u8],
    serial: SharedBuffer,
    devices: impl FnOnce(&mut MachineBuilder) + Send + 'static,
) -> std::thread::JoinHandle<Result<Machine, MigrationError>> {
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        sandboxed();
        let (mut b, incoming) = MachineBuilder::accept_migration(stream, secret, Box::new(serial))?;
        devices(&mut b);
        incoming.start(b)
    })
}

fn listener() -> (TcpListener, std::net::SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

#[test]
fn a_guest_rewriting_its_memory_migrates_with_nothing_lost_or_repeated() {
    let expected = memcheck_output(MIB, ROUNDS);
    let src_serial = SharedBuffer::new();
    let src = start_memcheck(&src_serial);
    assert!(eventually(60, || src_serial.contents().len() > 2 * 40));
    let (l, addr) = listener();
    let dst_serial = SharedBuffer::new();
    let dst = destination(l, SECRET, dst_serial.clone(), |_| {});
    let report = src
        .migrate(
            TcpStream::connect(addr).unwrap(),
            SECRET,
            MigrationOptions::default(),
        )
        .unwrap();
    eprintln!("{report:?}");
    let before = src_serial.contents();
    let outcome = src.running.wait_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(outcome.reason, vmcraft::vcpu::StopReason::Requested);
    let dst = dst.join().unwrap().unwrap();
    finish(dst, &dst_serial, "the destination");
    let mut whole = before;
    whole.extend(dst_serial.contents());
    assert_eq!(String::from_utf8_lossy(&whole), expected);
    // Round 0 copied the 64 MiB the guest had written, and the guest kept dirtying
    // its span while later rounds ran.
    assert!(report.rounds[0].pages >= MIB * 256, "{report:?}");
    assert!(report.pages_sent() >= report.rounds[0].pages, "{report:?}");
    assert!(
        report.state_bytes > 0 && report.downtime < report.total,
        "{report:?}"
    );
}

#[test]
fn a_wrong_secret_is_refused_and_the_source_runs_on() {
    let expected = memcheck_output(MIB, ROUNDS);
    let src_serial = SharedBuffer::new();
    let src = start_memcheck(&src_serial);
    let (l, addr) = listener();
    let dst = destination(l, b"another secret", SharedBuffer::new(), |_| {});
    let err = src
        .migrate(
            TcpStream::connect(addr).unwrap(),
            SECRET,
            MigrationOptions::default(),
        )
        .unwrap_err();
    // The destination refuses first; the source sees its connection close.
    assert!(
        matches!(
            err,
            MigrationError::NotAuthenticated | MigrationError::Connection { .. }
        ),
        "{err}"
    );
    assert!(matches!(
        dst.join().unwrap().unwrap_err(),
        MigrationError::NotAuthenticated
    ));
    finish(src, &src_serial, "the source, after a refused migration");
    assert_eq!(String::from_utf8_lossy(&src_serial.contents()), expected);
}

/// A proxy between source and destination that cuts both connections after `limit`
/// bytes from the source.
fn cutting_proxy(limit: u64) -> (std::net::SocketAddr, TcpListener) {
    let (front, front_addr) = listener();
    let (back, back_addr) = listener();
    std::thread::spawn(move || {
        let (mut from_src, _) = front.accept().unwrap();
        let mut to_dst = TcpStream::connect(back_addr).unwrap();
        let (mut dst_r, mut src_w) = (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut dst_r, &mut src_w);
        });
        let mut buf = vec![0u8; 65536];
        let mut passed = 0u64;
        while passed < limit {
            let n = match from_src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n.min((limit - passed) as usize),
            };
            if to_dst.write_all(&buf[..n]).is_err() {
                break;
            }
            passed += n as u64;
        }
        let _ = from_src.shutdown(std::net::Shutdown::Both);
        let _ = to_dst.shutdown(std::net::Shutdown::Both);
    });
    (front_addr, back)
}

#[test]
fn a_connection_cut_mid_copy_leaves_the_source_running_and_nothing_at_the_destination() {
    let expected = memcheck_output(MIB, ROUNDS);
    let src_serial = SharedBuffer::new();
    let src = start_memcheck(&src_serial);
    assert!(eventually(60, || !src_serial.contents().is_empty()));
    // Cut 16 MiB into the memory copy.
    let (addr, back) = cutting_proxy(16 << 20);
    let dst = destination(back, SECRET, SharedBuffer::new(), |_| {});
    let err = src
        .migrate(
            TcpStream::connect(addr).unwrap(),
            SECRET,
            MigrationOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(err, MigrationError::Connection { .. }), "{err}");
    assert!(matches!(
        dst.join().unwrap().unwrap_err(),
        MigrationError::Connection { .. }
    ));
    finish(src, &src_serial, "the source, after a broken migration");
    assert_eq!(String::from_utf8_lossy(&src_serial.contents()), expected);
}

fn blk(b: &mut MachineBuilder, image: &std::path::Path) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let disk = vmcraft::devices::virtio::block::Disk::new(file, false, "mig").unwrap();
    b.add_virtio(Box::new(vmcraft::devices::virtio::block::Block::new(
        disk, "vblk0",
    )))
    .unwrap();
}

/// The disk is shared (both VMMs open the same image, as with network storage); the
/// requests in flight when the source stops complete there or at the destination,
/// never twice and never lost.
#[test]
fn virtio_blk_requests_in_flight_migrate() {
    const BLK_ROUNDS: u64 = 1500;
    let expected = vmcraft_guest_kit::blkcheck_output(BLK_ROUNDS);
    let image = ScratchImage::new("migrate-blk", 1 << 20);
    let path = image.path().to_owned();
    let src_serial = SharedBuffer::new();
    let mut b = machine_builder(32 << 20, Box::new(src_serial.clone()));
    blk(&mut b, &path);
    let guest = Guest::BLKCHECK;
    b.load(guest.image()).unwrap();
    let src = b
        .start(&[VcpuConfig::at(guest.entry(0, 1 | BLK_ROUNDS << 16))])
        .unwrap();
    assert!(eventually(60, || src_serial.contents().len() > 20 * 28));
    let (l, addr) = listener();
    let dst_serial = SharedBuffer::new();
    let dst_path = path.clone();
    let dst = destination(l, SECRET, dst_serial.clone(), move |b| blk(b, &dst_path));
    let report = src
        .migrate(
            TcpStream::connect(addr).unwrap(),
            SECRET,
            MigrationOptions::default(),
        )
        .unwrap();
    eprintln!("{report:?}");
    let before = src_serial.contents();
    assert!(
        before.len() < expected.len(),
        "the guest ended before the migration"
    );
    src.running.wait_timeout(Duration::from_secs(10)).unwrap();
    let dst = dst.join().unwrap().unwrap();
    finish(dst, &dst_serial, "the destination");
    let mut whole = before;
    whole.extend(dst_serial.contents());
    assert_eq!(String::from_utf8_lossy(&whole), expected);
}

/// A guest with PV blkif batches in flight (grants, event channels, the doorbell)
/// migrates: the destination starts its own PV backends on the arriving memory, and
/// the event-channel table comes with the state.
#[test]
fn pv_rings_and_event_channels_in_flight_migrate() {
    const PV_ROUNDS: u64 = 1500;
    let expected = vmcraft_guest_kit::pvcheck_output(PV_ROUNDS);
    let image = ScratchImage::new("migrate-pv", 1 << 20);
    let src_serial = SharedBuffer::new();
    let mut b = machine_builder(32 << 20, Box::new(src_serial.clone()));
    let _pv = add_pv(&mut b, image.file(), Box::new(std::io::sink()));
    let guest = Guest::PVCHECK;
    b.load(guest.image()).unwrap();
    let src = b
        .start(&[VcpuConfig::at(guest.entry(0, PV_ROUNDS << 16))])
        .unwrap();
    assert!(eventually(60, || src_serial.contents().len() > 20 * 28));
    let (l, addr) = listener();
    let dst_serial = SharedBuffer::new();
    let dst_out = dst_serial.clone();
    let disk = image.file();
    let dst = std::thread::spawn(move || {
        let (stream, _) = l.accept().unwrap();
        sandboxed();
        let (mut b, incoming) =
            MachineBuilder::accept_migration(stream, SECRET, Box::new(dst_out))?;
        let pv = add_pv(&mut b, disk, Box::new(std::io::sink()));
        incoming.start(b).map(|m| (m, pv, dst_serial))
    });
    let report = src
        .migrate(
            TcpStream::connect(addr).unwrap(),
            SECRET,
            MigrationOptions::default(),
        )
        .unwrap();
    eprintln!("{report:?}");
    let before = src_serial.contents();
    assert!(
        before.len() < expected.len(),
        "the guest ended before the migration"
    );
    src.running.wait_timeout(Duration::from_secs(10)).unwrap();
    let (dst, _pv, dst_serial) = dst.join().unwrap().unwrap();
    finish(dst, &dst_serial, "the destination");
    let mut whole = before;
    whole.extend(dst_serial.contents());
    assert_eq!(String::from_utf8_lossy(&whole), expected);
}
