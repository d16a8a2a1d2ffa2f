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
use vmcraft::builder::MachineBuilder;
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::machine::Machine;
use vmcraft::migration::{IncomingOptions, MigrationAuth, MigrationError, MigrationOptions};
use vmcraft_guest_kit::memcheck_output;

const MIB: u64 = 16;
/// Long enough that the guest outlives its migration on a loaded host.
const ROUNDS: u64 = 600;
/// Guest RAM of the memcheck machine (`common::start_memcheck`).
const RAM: u64 = (MIB + 32) << 20;

/// What an undisturbed memcheck run prints (computed once).
fn expected() -> &'static str {
    static EXPECTED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    EXPECTED.get_or_init(|| memcheck_output(MIB, ROUNDS))
}

fn auth() -> MigrationAuth {
    MigrationAuth::shared_secret(b"a secret both VMMs were given, 32 bytes or more".to_vec())
        .unwrap()
}

fn start_memcheck(serial: &SharedBuffer) -> Machine {
    common::start_memcheck(serial, MIB, ROUNDS)
}

/// Options for a destination of the memcheck machine, waiting at most `peer` for a
/// record.
fn incoming(ram: u64) -> IncomingOptions {
    IncomingOptions::new(ram)
}

/// Bytes of `m`'s guest RAM.
fn ram_of(m: &Machine) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    m.vm().memory().iter().map(|r| r.len()).sum()
}

/// Receive one migration on `listener` with `auth`, add devices with `devices`,
/// start it; the destination's COM1 goes to `serial`.
fn destination(
    listener: TcpListener,
    auth: MigrationAuth,
    serial: SharedBuffer,
    devices: impl FnOnce(&mut MachineBuilder) + Send + 'static,
) -> std::thread::JoinHandle<Result<Machine, MigrationError>> {
    destination_with(listener, auth, incoming(RAM), serial, devices)
}

fn destination_with(
    listener: TcpListener,
    auth: MigrationAuth,
    options: IncomingOptions,
    serial: SharedBuffer,
    devices: impl FnOnce(&mut MachineBuilder) + Send + 'static,
) -> std::thread::JoinHandle<Result<Machine, MigrationError>> {
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        sandboxed();
        let (mut b, incoming) =
            MachineBuilder::accept_migration(stream, &auth, &options, Box::new(serial))?;
        devices(&mut b);
        incoming.start(b)
    })
}

/// Migrate `src` to a destination in another thread whose devices `devices` adds;
/// returns the report, the destination's machine (to be joined) and its COM1.
fn migrate_to_a_thread(
    src: &Machine,
    devices: impl FnOnce(&mut MachineBuilder) + Send + 'static,
) -> (
    vmcraft::migration::MigrationReport,
    std::thread::JoinHandle<Result<Machine, MigrationError>>,
    SharedBuffer,
) {
    let (l, addr) = listener();
    let dst_serial = SharedBuffer::new();
    let dst = destination_with(
        l,
        auth(),
        incoming(ram_of(src)),
        dst_serial.clone(),
        devices,
    );
    let report = src
        .migrate(
            TcpStream::connect(addr).unwrap(),
            &auth(),
            MigrationOptions::default(),
        )
        .unwrap();
    (report, dst, dst_serial)
}

fn listener() -> (TcpListener, std::net::SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

#[test]
fn a_guest_rewriting_its_memory_migrates_with_nothing_lost_or_repeated() {
    let expected = expected().to_owned();
    let src_serial = SharedBuffer::new();
    let src = start_memcheck(&src_serial);
    assert!(eventually(60, || src_serial.contents().len() > 2 * 40));
    let (report, dst, dst_serial) = migrate_to_a_thread(&src, |_| {});
    eprintln!("{report:?}");
    let before = src_serial.contents();
    let outcome = src.run_for(Duration::from_secs(10)).unwrap();
    assert_eq!(outcome.reason, vmcraft::vcpu::StopReason::Requested);
    let dst = dst.join().unwrap().unwrap();
    finish(dst, &dst_serial, "the destination");
    let mut whole = before;
    whole.extend(dst_serial.contents());
    assert_eq!(String::from_utf8_lossy(&whole), expected);
    // Round 0 copied the 16 MiB the guest had written, and the guest kept dirtying
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
    let expected = expected().to_owned();
    let src_serial = SharedBuffer::new();
    let src = start_memcheck(&src_serial);
    let (l, addr) = listener();
    let other =
        MigrationAuth::shared_secret(b"another secret, also 32 bytes long or more".to_vec());
    let dst = destination(l, other.unwrap(), SharedBuffer::new(), |_| {});
    let err = src
        .migrate(
            TcpStream::connect(addr).unwrap(),
            &auth(),
            MigrationOptions::default(),
        )
        .unwrap_err();
    // The destination refuses first; the source sees its connection close.
    assert!(
        matches!(
            err,
            MigrationError::NotAuthenticated
                | MigrationError::Connection { .. }
                | MigrationError::Closed(_)
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
    let expected = expected().to_owned();
    let src_serial = SharedBuffer::new();
    let src = start_memcheck(&src_serial);
    assert!(eventually(60, || !src_serial.contents().is_empty()));
    // Cut 16 MiB into the memory copy.
    let (addr, back) = cutting_proxy(16 << 20);
    let dst = destination(back, auth(), SharedBuffer::new(), |_| {});
    let err = src
        .migrate(
            TcpStream::connect(addr).unwrap(),
            &auth(),
            MigrationOptions::default(),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            MigrationError::Connection { .. } | MigrationError::Closed(_)
        ),
        "{err}"
    );
    let err = dst.join().unwrap().unwrap_err();
    assert!(matches!(err, MigrationError::Closed(_)), "{err}");
    finish(src, &src_serial, "the source, after a broken migration");
    assert_eq!(String::from_utf8_lossy(&src_serial.contents()), expected);
}

/// `kind` with block requests in flight migrates; the disk is shared (both VMMs
/// open the same image, as with network storage). The requests in flight when the
/// source stops complete there or at the destination, never twice and never lost.
fn disk_requests_in_flight_migrate(kind: DiskGuest) {
    let disk_rounds = kind.rounds(1500);
    let expected = kind.expected(disk_rounds);
    let image = ScratchImage::new(&format!("migrate-{kind:?}"), 1 << 20);
    let src_serial = SharedBuffer::new();
    let src = kind.start(&src_serial, image.path(), disk_rounds);
    let lines = kind.rounds(20) as usize;
    assert!(eventually(60, || src_serial.contents().len() > lines * 28));
    let path = image.path().to_owned();
    let (report, dst, dst_serial) = migrate_to_a_thread(&src, move |b| kind.attach(b, &path));
    eprintln!("{kind:?}: {report:?}");
    let before = src_serial.contents();
    assert!(
        before.len() < expected.len(),
        "the guest ended before the migration"
    );
    src.run_for(Duration::from_secs(10)).unwrap();
    let dst = dst.join().unwrap().unwrap();
    finish(dst, &dst_serial, "the destination");
    let mut whole = before;
    whole.extend(dst_serial.contents());
    assert_eq!(String::from_utf8_lossy(&whole), expected);
}

#[test]
fn virtio_blk_requests_in_flight_migrate() {
    disk_requests_in_flight_migrate(DiskGuest::VirtioBlk);
}

/// The same through the PV channel (grants, event channels, the doorbell): the
/// destination starts its own PV backends on the arriving memory, and the
/// event-channel table comes with the state.
#[test]
fn pv_rings_and_event_channels_in_flight_migrate() {
    disk_requests_in_flight_migrate(DiskGuest::Pv);
}

/// The same through the emulated ATA disk: a PIO transfer in progress at the stop goes
/// on at the destination from the word the guest had reached.
#[test]
fn ata_transfers_in_progress_migrate() {
    disk_requests_in_flight_migrate(DiskGuest::Ata);
}
