//! Bounded work under floods. A hostile guest abuses its virtio-blk device (chains
//! naming gigabytes, looping chains, an available index a ring ahead, a notification
//! storm, oversized requests) or its paravirtual channel (a blkif producer a ring
//! ahead, a hypercall storm, a doorbell storm) while a well-behaved VM in the same
//! process does checked I/O on a device of the same kind. Each flood ends as the
//! documentation says (NEEDS_RESET, an error status and the queue goes on, a broken
//! ring no longer served with a logged reason, an errno per bad hypercall), the
//! hostile guest's device still serves it where it can, the well-behaved VM completes,
//! and the process's memory stays bounded.
//!
//! One test (its own process), so that the resident-memory figures and the logged
//! warnings are this test's.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::devices::virtio::block::{Block, Disk};
use vmcraft::machine::Machine;
use vmcraft::memory::host_usage::ProcessMemory;
use vmcraft::pv::evtchn::MAX_PORTS;
use vmcraft_guest_kit::Guest;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How far the process's resident memory may grow while a flood VM and a well-behaved
/// VM run (two guests of 16 MiB, their device threads, and the floods' own
/// allocations), and how much may stay after both are gone.
const PEAK_GROWTH: u64 = 48 << 20;
const LEFT_AFTER: u64 = 8 << 20;

/// (kind, rounds, what it is) for the `virtio_flood` guest.
const VIRTIO_FLOODS: [(u64, u64, &str); 5] = [
    (1, 200, "chains naming nearly 4 GiB"),
    (2, 200, "looping chains"),
    (3, 200, "an available index a ring ahead"),
    (4, 50_000, "a notification storm"),
    (5, 2_000, "oversized requests in guest memory"),
];

/// (kind, rounds, what it is) for the `pv_flood` guest.
const PV_FLOODS: [(u64, u64, &str); 3] = [
    (1, 1, "a blkif producer a ring ahead"),
    (2, 50_000, "a hypercall storm"),
    (3, 50_000, "a doorbell storm"),
];

fn disk(name: &str) -> (ScratchImage, Disk) {
    let image = ScratchImage::new(name, 4 << 20);
    let disk = Disk::new(image.file(), false, name).unwrap();
    (image, disk)
}

/// Samples the process's resident memory into `peak` until every VM has stopped.
fn watch(vms: &[&Machine], peak: &mut u64) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while vms.iter().any(|vm| vm.stop_reason().is_none()) && Instant::now() < deadline {
        *peak = (*peak).max(ProcessMemory::current().unwrap().rss);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The hostile VM ended as its guest says a flood of `kind` ends (exit code 0,
/// `flood <kind> done <rounds>` on COM1); returns what COM1 said.
fn flood_ended(
    running: Machine,
    serial: &SharedBuffer,
    kind: u64,
    rounds: u64,
    what: &str,
) -> String {
    let out = running.run_for(Duration::from_secs(1)).unwrap();
    let console = String::from_utf8_lossy(&serial.contents()).into_owned();
    assert_eq!(
        out.reason,
        vmcraft_guest_kit::exited(0),
        "flood {kind} ({what}): {console}"
    );
    assert!(
        console.contains(&format!("flood {kind:#018x} done {rounds:#018x}")),
        "flood {kind} ({what}): {console}"
    );
    console
}

fn virtio_flood(kind: u64, rounds: u64, what: &str, peak: &mut u64) {
    let (_hostile_image, hostile_disk) = disk(&format!("flood-{kind}"));
    let (_good_image, good_disk) = disk(&format!("flood-good-{kind}"));
    let hostile = start_virtio_vm(
        Guest::VIRTIO_FLOOD,
        kind | rounds << 8,
        vec![Box::new(Block::new(hostile_disk, "vblk0"))],
    );
    let good = start_virtio_vm(
        Guest::VIRTIO_BLK,
        1,
        vec![Box::new(Block::new(good_disk, "vblk1"))],
    );
    watch(&[&hostile.running, &good.running], peak);
    flood_ended(hostile.running, &hostile.serial, kind, rounds, what);
    let good_out = good.running.run_for(Duration::from_secs(1)).unwrap();
    assert_eq!(
        good_out.reason,
        vmcraft_guest_kit::exited(0),
        "the well-behaved VM during flood {kind} ({what}): {}",
        String::from_utf8_lossy(&good.serial.contents())
    );
}

/// A PV guest with its own backends: COM1 and the PV console's output, and what
/// must live while it runs.
struct PvVm {
    running: Machine,
    table: std::sync::Arc<vmcraft::pv::hypercall::HypercallTable>,
    serial: SharedBuffer,
    console: SharedBuffer,
    _backends: std::sync::Arc<vmcraft::pv_machine::PvBackends>,
    _image: ScratchImage,
}

fn start_pv_vm(guest: Guest, param: u64, name: &str) -> PvVm {
    let image = ScratchImage::new(name, 1 << 20);
    let console = SharedBuffer::new();
    let mut m = HypercallRig::new(16);
    let backends = m.pv_backends(
        image.file(),
        Box::new(console.clone()),
        std::sync::Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
    );
    let serial = m.serial.clone();
    let (running, table) = m.start(guest, param);
    PvVm {
        running,
        table,
        serial,
        console,
        _backends: backends,
        _image: image,
    }
}

fn pv_flood(kind: u64, rounds: u64, what: &str, peak: &mut u64) {
    let hostile = start_pv_vm(Guest::PV_FLOOD, kind | rounds << 8, "pv-flood");
    let good = start_pv_vm(Guest::PV_DEMO, 0, "pv-flood-good");
    watch(&[&hostile.running, &good.running], peak);
    let serial = flood_ended(hostile.running, &hostile.serial, kind, rounds, what);
    let good_out = good.running.run_for(Duration::from_secs(1)).unwrap();
    // The console backend is a thread of its own: its output comes a moment later.
    assert!(
        eventually(10, || hostile.console.contents()
            == b"pv console still served\n"),
        "PV flood {kind} ({what}): the PV console said {:?}",
        String::from_utf8_lossy(&hostile.console.contents())
    );
    match kind {
        1 => {
            let logged = logged_warnings();
            assert!(
                logged
                    .iter()
                    .any(|l| l.contains("pv-block: stops serving the guest") && l.contains("ring")),
                "no warning says why the block ring stopped: {logged:?}"
            );
        }
        2 => {
            // Every fifth call was unknown; the rest were event-channel operations.
            let unknown = rounds.div_ceil(5);
            assert_eq!(hostile.table.unknown_calls(), unknown);
            assert_eq!(hostile.table.count(32), rounds - unknown);
            // alloc_unbound succeeded until every port but 0 and the two the
            // backends hold was taken, then failed with EINVAL (the guest checked).
            let ports = u64::from(MAX_PORTS) - 3;
            assert!(
                serial.contains(&format!("ports {ports:#018x}")),
                "PV flood {kind}: {serial}"
            );
        }
        _ => {}
    }
    assert_eq!(
        good_out.reason,
        vmcraft_guest_kit::exited(0),
        "the well-behaved PV VM during flood {kind} ({what}): {}",
        String::from_utf8_lossy(&good.serial.contents())
    );
    assert!(
        eventually(10, || String::from_utf8_lossy(&good.console.contents())
            .contains("pv block ok")),
        "the well-behaved PV VM during flood {kind} ({what}): {:?}",
        String::from_utf8_lossy(&good.console.contents())
    );
}

#[test]
fn floods_end_as_documented_and_leave_the_other_vm_served() {
    require_kvm();
    record_warnings();
    let baseline = ProcessMemory::current().unwrap().rss;
    let mut peak = baseline;
    for (kind, rounds, what) in VIRTIO_FLOODS {
        virtio_flood(kind, rounds, what, &mut peak);
    }
    for (kind, rounds, what) in PV_FLOODS {
        pv_flood(kind, rounds, what, &mut peak);
    }
    let after = ProcessMemory::current().unwrap().rss;
    eprintln!(
        "resident: {} KiB before, {} KiB at most during the floods, {} KiB after",
        baseline >> 10,
        peak >> 10,
        after >> 10
    );
    assert!(
        peak < baseline + PEAK_GROWTH,
        "resident memory grew by {} KiB during the floods",
        (peak - baseline) >> 10
    );
    assert!(
        after < baseline + LEFT_AFTER,
        "{} KiB stayed after the floods",
        (after.saturating_sub(baseline)) >> 10
    );
}
