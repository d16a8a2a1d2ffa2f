//! Bounded work under floods: a hostile guest abuses its virtio-blk device (chains
//! naming gigabytes, looping chains, an available index a ring ahead, a notification
//! storm, oversized requests) while a well-behaved VM in the same process does checked
//! I/O. Each flood ends as the device documentation says (NEEDS_RESET, or an error
//! status and the queue goes on), the hostile guest's device serves it again after a
//! reset, the well-behaved VM completes, and the process's memory stays bounded.
//!
//! One test (its own process), so that the resident-memory figures are this test's.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vmcraft::devices::virtio::block::{Block, Disk};
use vmcraft::memory::host_usage::ProcessMemory;
use vmcraft_guest_kit::Guest;

/// How far the process's resident memory may grow while a flood VM and a well-behaved
/// VM run (two guests of 16 MiB, their device threads, and the floods' own
/// allocations), and how much may stay after both are gone.
const PEAK_GROWTH: u64 = 48 << 20;
const LEFT_AFTER: u64 = 8 << 20;

/// (kind, rounds, what it is)
const FLOODS: [(u64, u64, &str); 5] = [
    (1, 200, "chains naming nearly 4 GiB"),
    (2, 200, "looping chains"),
    (3, 200, "an available index a ring ahead"),
    (4, 50_000, "a notification storm"),
    (5, 2_000, "oversized requests in guest memory"),
];

fn disk(name: &str) -> (ScratchImage, Disk) {
    let image = ScratchImage::new(name, 4 << 20);
    let disk = Disk::new(image.file(), false, name).unwrap();
    (image, disk)
}

#[test]
fn floods_end_as_documented_and_leave_the_other_vm_served() {
    require_kvm();
    let baseline = ProcessMemory::current().unwrap().rss;
    let mut peak = baseline;
    for (kind, rounds, what) in FLOODS {
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
        // Sample the resident set while both run.
        let deadline = Instant::now() + Duration::from_secs(300);
        while (hostile.running.stop_reason().is_none() || good.running.stop_reason().is_none())
            && Instant::now() < deadline
        {
            peak = peak.max(ProcessMemory::current().unwrap().rss);
            std::thread::sleep(Duration::from_millis(5));
        }
        let flood_out = hostile
            .running
            .wait_timeout(Duration::from_secs(1))
            .unwrap();
        let good_out = good.running.wait_timeout(Duration::from_secs(1)).unwrap();
        let console = String::from_utf8_lossy(&hostile.serial.contents()).into_owned();
        assert_eq!(
            flood_out.reason,
            vmcraft_guest_kit::exited(0),
            "flood {kind} ({what}): {console}"
        );
        assert!(
            console.contains(&format!("flood {kind:#018x} done {rounds:#018x}")),
            "flood {kind} ({what}): {console}"
        );
        assert_eq!(
            good_out.reason,
            vmcraft_guest_kit::exited(0),
            "the well-behaved VM during flood {kind} ({what}): {}",
            String::from_utf8_lossy(&good.serial.contents())
        );
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
