//! Snapshots of running machines on real KVM: a CPL-3 guest that keeps rewriting and
//! checking 64 MiB is snapshotted mid-run, then both the original (resumed) and two
//! machines restored from the snapshot run to the end. Each must verify all its memory
//! and print the rest of its output: the output before the snapshot followed by the
//! output after it is exactly an undisturbed run's, so nothing was lost or repeated.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use vmcraft::builder::MachineBuilder;
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::machine::Machine;
use vmcraft::snapshot::{MachineSnapshotError, STATE_FILE};
use vmcraft::vcpu::VcpuConfig;
use vmcraft_guest_kit::{memcheck_output, Guest};

const MIB: u64 = 64;
const ROUNDS: u64 = 12;
const RAM: u64 = (16 + MIB + 16) << 20;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("vmcraft-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_memcheck(serial: &SharedBuffer) -> Machine {
    common::start_memcheck(serial, MIB, ROUNDS)
}

fn restore(dir: &Dir, serial: &SharedBuffer) -> Result<Machine, MachineSnapshotError> {
    sandboxed();
    let (b, saved) = MachineBuilder::from_snapshot(&dir.0, Box::new(serial.clone()))?;
    assert_eq!(saved.info().ram_bytes, RAM);
    b.start_restored(&saved)
}

#[test]
fn a_snapshot_mid_run_resumes_and_restores_with_nothing_lost_or_repeated() {
    let expected = memcheck_output(MIB, ROUNDS);
    let serial = SharedBuffer::new();
    let m = start_memcheck(&serial);
    // Let a few rounds pass: memory is full of the guest's writes.
    assert!(
        eventually(60, || serial.contents().len() > 3 * 40),
        "{}",
        String::from_utf8_lossy(&serial.contents())
    );
    let dir = Dir::new("snapshot-memcheck");
    let report = m.snapshot(&dir.0).unwrap();
    let before = serial.contents();
    assert!(
        before.len() < expected.len(),
        "the guest finished before the snapshot"
    );
    // Most of the 96 MiB was never touched: the memory file skips it.
    assert!(report.memory.written >= MIB * 256, "{report:?}");
    assert!(report.memory.written < report.memory.pages, "{report:?}");
    eprintln!("{report:?}");

    // The original goes on from where it paused.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(serial.contents(), before, "a paused guest printed");
    m.resume();
    finish(m, &serial, "the original, resumed");
    assert_eq!(String::from_utf8_lossy(&serial.contents()), expected);

    // Two machines restored from the one snapshot, one after the other: each goes on
    // from the snapshot, not from what the other wrote to its copy of memory.
    for run in 0..2 {
        let after = SharedBuffer::new();
        let m = restore(&dir, &after).unwrap();
        finish(m, &after, &format!("restore {run}"));
        let mut whole = before.clone();
        whole.extend(after.contents());
        assert_eq!(
            String::from_utf8_lossy(&whole),
            expected,
            "restore {run}: output before the snapshot, then after the restore"
        );
    }
}

#[test]
fn a_damaged_snapshot_or_a_different_machine_is_refused_by_name() {
    let serial = SharedBuffer::new();
    let m = start_memcheck(&serial);
    assert!(eventually(60, || !serial.contents().is_empty()));
    let dir = Dir::new("snapshot-damaged");
    m.snapshot(&dir.0).unwrap();
    drop(m);
    let state = dir.0.join(STATE_FILE);
    let good = std::fs::read(&state).unwrap();
    let message = |e: MachineSnapshotError| {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text += &format!(": {s}");
            source = s.source();
        }
        text
    };

    // Truncated.
    std::fs::write(&state, &good[..good.len() / 2]).unwrap();
    let err = message(restore(&dir, &SharedBuffer::new()).unwrap_err());
    assert!(
        err.contains("is ") && err.contains("bytes long but its header says"),
        "{err}"
    );

    // One flipped bit in the last section.
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    std::fs::write(&state, &flipped).unwrap();
    let err = message(restore(&dir, &SharedBuffer::new()).unwrap_err());
    assert!(err.contains("corrupted (checksum mismatch)"), "{err}");

    // A machine built with a device the saved one did not have.
    std::fs::write(&state, &good).unwrap();
    sandboxed();
    let (mut b, saved) = MachineBuilder::from_snapshot(&dir.0, Box::new(std::io::sink())).unwrap();
    b.add_virtio(Box::new(vmcraft::devices::virtio::rng::Rng::new("extra")))
        .unwrap();
    let err = message(b.start_restored(&saved).unwrap_err());
    assert!(
        err.contains("virtio device types [] saved, [4] built"),
        "{err}"
    );

    // The memory file gone.
    std::fs::remove_file(dir.0.join(vmcraft::snapshot::MEMORY_FILE)).unwrap();
    let err = message(restore(&dir, &SharedBuffer::new()).unwrap_err());
    assert!(
        err.starts_with("cannot open the snapshot memory file"),
        "{err}"
    );
}

/// A port whose first read says it has begun, waits for the test's word, answers
/// 0x5a; later reads answer 0xee.
struct GatedPort {
    gate: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    begun: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    reads: std::sync::atomic::AtomicU32,
}

impl vmcraft::devices::vm_device::DevicePio for GatedPort {
    fn pio_read(
        &self,
        _: vmcraft::devices::vm_device::bus::PioAddress,
        _: vmcraft::devices::vm_device::bus::PioAddressOffset,
        data: &mut [u8],
    ) {
        use std::sync::atomic::Ordering;
        if self.reads.fetch_add(1, Ordering::SeqCst) == 0 {
            let _ = self.begun.lock().unwrap().send(());
            let _ = self.gate.lock().unwrap().recv();
            data.fill(0x5a);
        } else {
            data.fill(0xee);
        }
    }
    fn pio_write(
        &self,
        _: vmcraft::devices::vm_device::bus::PioAddress,
        _: vmcraft::devices::vm_device::bus::PioAddressOffset,
        _: &[u8],
    ) {
    }
}

const GATED_PORT: u16 = 0x520;

/// Put a [`GatedPort`] on `b`'s bus; `reads` it has answered already. Returns the
/// word that opens its first read, and the word that the read has begun.
fn gated(
    b: &mut MachineBuilder,
    reads: u32,
) -> (std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let (begun_tx, begun) = std::sync::mpsc::channel();
    let port = std::sync::Arc::new(GatedPort {
        gate: std::sync::Mutex::new(rx),
        begun: std::sync::Mutex::new(begun_tx),
        reads: reads.into(),
    });
    b.buses_mut().register_pio(GATED_PORT, 4, port).unwrap();
    (tx, begun)
}

/// The snapshot is taken while the vCPU's port read is being answered: the value
/// reaches the guest's register only when the vCPU enters KVM again, which the pause
/// does (with immediate_exit) before saving. Without that, the restored guest would
/// still be at its `in` instruction, read again, and get 0xee.
#[test]
fn a_port_read_in_flight_at_the_snapshot_completes_before_the_state_is_saved() {
    let mut b = machine_builder(16 << 20, Box::new(std::io::sink()));
    let (open, begun) = gated(&mut b, 0);
    let guest = Guest::IN_EXIT;
    b.load(guest.image()).unwrap();
    let m = b
        .start(&[VcpuConfig::at(guest.entry(0, u64::from(GATED_PORT)))])
        .unwrap();
    let dir = Dir::new("snapshot-in-flight");
    // The vCPU is inside the port's read (however long a loaded host took to get
    // there).
    begun
        .recv_timeout(Duration::from_secs(60))
        .expect("the guest never reached the port");
    std::thread::scope(|s| {
        let snap = s.spawn(|| m.snapshot(&dir.0).unwrap());
        // The pause is waiting for the vCPU, which is inside the port's read.
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !snap.is_finished(),
            "the snapshot did not wait for the read"
        );
        open.send(()).unwrap();
        snap.join().unwrap();
    });
    m.resume();
    let outcome = m.run_for(Duration::from_secs(20)).unwrap();
    assert_eq!(outcome.reason, vmcraft_guest_kit::exited(0x5a5a_5a5a));

    sandboxed();
    let (mut b, saved) = MachineBuilder::from_snapshot(&dir.0, Box::new(std::io::sink())).unwrap();
    // The restored machine's port has answered its first read already (before the
    // snapshot): a read now would answer 0xee.
    gated(&mut b, 1);
    let m = b.start_restored(&saved).unwrap();
    let outcome = m.run_for(Duration::from_secs(20)).unwrap();
    assert_eq!(outcome.reason, vmcraft_guest_kit::exited(0x5a5a_5a5a));
}

/// Snapshots taken while `kind` keeps batches of block requests in flight: some catch
/// requests the device has not taken yet, some the device is serving, some completed
/// that the guest has not seen. The original goes on after each, and every snapshot
/// restored later (on a copy of the disk taken with it) runs to the end with every
/// page checked and its output continuing exactly where the snapshot cut it.
fn disk_requests_in_flight_survive_snapshots(kind: DiskGuest) {
    let disk_rounds = kind.rounds(400);
    record_warnings();
    let expected = kind.expected(disk_rounds);
    let dir = Dir::new(&format!("snapshot-{kind:?}"));
    std::fs::create_dir_all(&dir.0).unwrap();
    let image = dir.0.join("disk");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let serial = SharedBuffer::new();
    let m = kind.start(&serial, &image, disk_rounds);
    let mut taken = Vec::new();
    while m.stop_reason().is_none() && taken.len() < 6 {
        std::thread::sleep(Duration::from_millis(15));
        let snap = dir.0.join(format!("snap{}", taken.len()));
        m.snapshot(&snap).unwrap();
        std::fs::copy(&image, snap.join("disk")).unwrap();
        taken.push((snap, serial.contents()));
        m.resume();
    }
    finish(m, &serial, "the original, snapshotted and resumed");
    assert_eq!(String::from_utf8_lossy(&serial.contents()), expected);
    assert!(
        taken.len() >= 3,
        "only {} snapshots before the end",
        taken.len()
    );
    for (snap, before) in taken {
        sandboxed();
        let after = SharedBuffer::new();
        let (mut b, saved) = MachineBuilder::from_snapshot(&snap, Box::new(after.clone())).unwrap();
        kind.attach(&mut b, &snap.join("disk"));
        let m = b.start_restored(&saved).unwrap();
        finish(m, &after, &format!("restored from {}", snap.display()));
        let mut whole = before;
        whole.extend(after.contents());
        assert_eq!(
            String::from_utf8_lossy(&whole),
            expected,
            "{}",
            snap.display()
        );
    }
}

#[test]
fn virtio_blk_requests_in_flight_survive_snapshots() {
    disk_requests_in_flight_survive_snapshots(DiskGuest::VirtioBlk);
}

/// The same through the paravirtual channel (grants, event channels, the doorbell):
/// the restored machine starts PV backends on the restored memory, and the
/// event-channel table comes back with the state.
#[test]
fn pv_rings_and_event_channels_in_flight_survive_snapshots() {
    disk_requests_in_flight_survive_snapshots(DiskGuest::Pv);
}

/// The same through the emulated ATA disk, a snapshot part of the embedding program's:
/// snapshots land inside PIO transfers (between the task file and the last word of a
/// sector), and the restored disk goes on with the transfer where the guest left it.
#[test]
fn ata_transfers_in_progress_survive_snapshots() {
    disk_requests_in_flight_survive_snapshots(DiskGuest::Ata);
}

/// Every vCPU is saved and put back: two vCPUs each counting in their own word are
/// snapshotted; in the restored machine both words start where the snapshot has them
/// and both go on counting.
#[test]
fn every_vcpu_of_a_two_vcpu_machine_is_restored() {
    use vm_memory::Bytes;
    let mut b = machine_builder(16 << 20, Box::new(std::io::sink()));
    let guest = Guest::COUNTER;
    b.load(guest.image()).unwrap();
    let vcpus: Vec<_> = (0..2).map(|i| VcpuConfig::at(guest.entry(i, 0))).collect();
    let m = b.start(&vcpus).unwrap();
    let count =
        |m: &Machine, i: u32| -> u64 { m.vm().memory().read_obj(Guest::counter_addr(i)).unwrap() };
    assert!(eventually(20, || count(&m, 0) > 0 && count(&m, 1) > 0));
    let dir = Dir::new("snapshot-two-vcpus");
    m.snapshot(&dir.0).unwrap();
    let saved = [count(&m, 0), count(&m, 1)];
    drop(m);
    sandboxed();
    let (b, snapshot) = MachineBuilder::from_snapshot(&dir.0, Box::new(std::io::sink())).unwrap();
    assert_eq!(snapshot.info().vcpus, 2);
    // Before the vCPUs run, memory is the snapshot's.
    let at_restore = [0, 1].map(|i| b.memory().read_obj::<u64>(Guest::counter_addr(i)).unwrap());
    assert_eq!(at_restore, saved);
    let m = b.start_restored(&snapshot).unwrap();
    for i in 0..2 {
        assert!(
            eventually(20, || count(&m, i) > saved[i as usize] + 1000),
            "vCPU {i} does not count on after the restore"
        );
    }
}

/// A balloon's inflated pages are saved with the machine (its transport's section
/// carries the device's state): the restored device knows them as its own, the guest deflates them
/// with nothing redundant, and every page it then writes and checks is good.
#[test]
fn a_balloon_keeps_its_pages_across_a_snapshot() {
    use vmcraft::devices::virtio::balloon::Balloon;
    use vmcraft_guest_kit::Phased;
    const RAM: u64 = 64 << 20;
    let serial = SharedBuffer::new();
    let guest = Guest::PHASED;
    let build = |b: &mut MachineBuilder| {
        let (balloon, control) = Balloon::new("vballoon").unwrap();
        b.add_virtio(Box::new(balloon)).unwrap();
        control
    };
    let mut b = machine_builder(RAM, Box::new(serial.clone()));
    let control = build(&mut b);
    b.load(guest.image()).unwrap();
    let m = b
        .start(&[VcpuConfig::at(guest.entry(0, Phased::pool_pages(RAM)))])
        .unwrap();
    let status = |m: &Machine| Phased::status(m.vm().memory()).unwrap();
    Phased::want(m.vm().memory(), 2_048).unwrap();
    control.set_target(4_096);
    assert!(
        eventually(30, || status(&m).ballooned == 4_096),
        "{:?}",
        status(&m)
    );
    let dir = Dir::new("snapshot-balloon");
    m.snapshot(&dir.0).unwrap();
    drop(m);

    sandboxed();
    let after = SharedBuffer::new();
    let (mut b, saved) = MachineBuilder::from_snapshot(&dir.0, Box::new(after.clone())).unwrap();
    let control = build(&mut b);
    let m = b.start_restored(&saved).unwrap();
    assert_eq!((control.inflated_pages(), control.target()), (4_096, 4_096));
    control.set_target(0);
    Phased::want(m.vm().memory(), Phased::pool_pages(RAM) as u32).unwrap();
    assert!(
        eventually(30, || {
            let s = status(&m);
            s.ballooned == 0 && u64::from(s.working_set) == Phased::pool_pages(RAM)
        }),
        "{:?}",
        status(&m)
    );
    assert_eq!(
        (control.inflated_pages(), control.redundant_pages()),
        (0, 0)
    );
    assert!(m.stop_reason().is_none(), "{:?}", after.contents());
}

/// virtio-net across a snapshot, its host side reopened in the restored machine (as a
/// TAP would be): the guest has sent its datagram and waits for the answer with its
/// receive buffers posted; the snapshot is restored onto a new backend, the answer
/// goes in there, and the restored guest takes it from the buffers it posted before.
#[test]
fn a_nic_waiting_for_a_frame_gets_it_through_the_backend_of_the_restored_machine() {
    use std::os::unix::net::UnixDatagram;
    use vmcraft::devices::virtio::net::Net;
    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    let dir = Dir::new("snapshot-net");
    let (ours, theirs) = UnixDatagram::pair().unwrap();
    let serial = SharedBuffer::new();
    let mut b = machine_builder(16 << 20, Box::new(serial.clone()));
    b.add_virtio(Box::new(Net::new(Box::new(ours), MAC, "vnet0")))
        .unwrap();
    b.load(Guest::VIRTIO_NET.image()).unwrap();
    let m = b
        .start(&[VcpuConfig::at(Guest::VIRTIO_NET.entry(0, 0))])
        .unwrap();
    theirs
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut frame = [0u8; 2048];
    let n = theirs.recv(&mut frame).expect("the guest's datagram");
    let hello = &frame[..n];
    assert!(hello.ends_with(b"hello from a vmcraft guest"));
    m.snapshot(&dir.0).unwrap();
    drop(m);
    drop(theirs);

    // The answer: the guest's frame with its addresses and ports swapped, and "pong".
    let mut pong = hello[..14 + 20 + 8].to_vec();
    pong[..6].copy_from_slice(&hello[6..12]);
    pong[6..12].copy_from_slice(&hello[..6]);
    pong[14 + 12..14 + 16].copy_from_slice(&hello[14 + 16..14 + 20]);
    pong[14 + 16..14 + 20].copy_from_slice(&hello[14 + 12..14 + 16]);
    pong[34..36].copy_from_slice(&hello[36..38]);
    pong[36..38].copy_from_slice(&hello[34..36]);
    pong.extend_from_slice(b"pong");

    sandboxed();
    let (ours, theirs) = UnixDatagram::pair().unwrap();
    let after = SharedBuffer::new();
    let (mut b, saved) = MachineBuilder::from_snapshot(&dir.0, Box::new(after.clone())).unwrap();
    b.add_virtio(Box::new(Net::new(Box::new(ours), MAC, "vnet0")))
        .unwrap();
    let m = b.start_restored(&saved).unwrap();
    theirs.send(&pong).unwrap();
    finish(m, &after, "the restored NIC");
}

/// A machine restored from a snapshot runs on the snapshot's memory file: writing a
/// snapshot over that file is refused (it would pull the guest's memory from under
/// it), and a snapshot into the same directory goes through new files and renames, so
/// the running guest keeps its memory and still ends correctly. A signed snapshot
/// restores with its key; with another memory file in its place it is refused.
#[test]
fn snapshots_never_overwrite_a_restored_guest_and_signed_ones_refuse_swapped_memory() {
    use vmcraft::snapshot::open_snapshot_file;
    let expected = memcheck_output(MIB, ROUNDS);
    let serial = SharedBuffer::new();
    let m = start_memcheck(&serial);
    assert!(eventually(60, || serial.contents().len() > 2 * 40));
    let dir = Dir::new("snapshot-backing");
    let key = [0x5a_u8; 32];
    m.snapshot_signed(&dir.0, Some(&key)).unwrap();
    let before = serial.contents();
    drop(m);
    // Restored with the key.
    sandboxed();
    let after = SharedBuffer::new();
    let (b, saved) =
        MachineBuilder::from_snapshot_signed(&dir.0, Some(&key), Box::new(after.clone())).unwrap();
    let m = b.start_restored(&saved).unwrap();
    assert!(eventually(60, || after.contents().len() > 2 * 40));
    // Over its own backing files: refused, and the guest goes on.
    let mut state = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.0.join("state"))
        .unwrap();
    let memory = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.0.join("memory"))
        .unwrap();
    let err = m.snapshot_into(&mut state, &memory).unwrap_err();
    assert!(
        matches!(err, MachineSnapshotError::OntoBackingFile { .. }),
        "{err}"
    );
    // Into the same directory by name: new files, renamed into place.
    m.snapshot(&dir.0).unwrap();
    m.resume();
    finish(
        m,
        &after,
        "the guest restored, then saved again into its own directory",
    );
    let mut whole = before;
    whole.extend(after.contents());
    assert_eq!(String::from_utf8_lossy(&whole), expected);
    // The unsigned snapshot just written, checked with a key: refused.
    let err = MachineBuilder::from_snapshot_signed(&dir.0, Some(&key), Box::new(std::io::sink()))
        .unwrap_err();
    assert!(err.to_string().contains("state file"), "{err}");
    // A FIFO where the state file should be: refused at once, not waited on.
    let fifo = Dir::new("snapshot-fifo");
    std::fs::create_dir_all(&fifo.0).unwrap();
    let path = fifo.0.join("state");
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let err = open_snapshot_file(&path, "snapshot state file").unwrap_err();
    assert!(
        matches!(err, MachineSnapshotError::NotARegularFile { .. }),
        "{err}"
    );
}

/// A signed snapshot whose memory file was replaced by another snapshot's is refused
/// before anything runs.
#[test]
fn a_signed_snapshot_with_another_memory_file_is_refused() {
    let serial = SharedBuffer::new();
    let m = start_memcheck(&serial);
    assert!(eventually(60, || serial.contents().len() > 2 * 40));
    let (one, two) = (Dir::new("signed-one"), Dir::new("signed-two"));
    let key = [0x33_u8; 32];
    m.snapshot_signed(&one.0, Some(&key)).unwrap();
    m.resume();
    assert!(eventually(60, || serial.contents().len() > 4 * 40));
    m.snapshot_signed(&two.0, Some(&key)).unwrap();
    drop(m);
    std::fs::copy(two.0.join("memory"), one.0.join("memory")).unwrap();
    sandboxed();
    let err = MachineBuilder::from_snapshot_signed(&one.0, Some(&key), Box::new(std::io::sink()))
        .unwrap_err();
    assert!(matches!(err, MachineSnapshotError::MemoryDigest), "{err}");
}
