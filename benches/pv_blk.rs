//! The PV block device from inside a guest: 4 KiB reads and writes per second, host
//! CPU time per request, VMM exits and guest notifications per request, at batch 1 and
//! 32.
//!
//! ```text
//! cargo bench --bench pv_blk
//! ```
//!
//! The guest (`pv_blk_bench`, CPL 3) keeps `batch` requests in flight on a blkif ring
//! through granted pages and notifies the backend through the event-channel doorbell
//! (an ioeventfd) only when the ring says the backend asked (ring.h's suppression). It
//! reads or writes the first 16 MiB in order (the backend merges adjacent reads into
//! one `preadv`) or at random 4 KiB-aligned offsets. Host CPU per request
//! is the `pv-block` thread's CPU time plus the vCPU's time in the VMM (hypercalls),
//! over the requests. Target at batch 32: at most 0.05 notifications per request.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmcraft::builder::MachineBuilder;
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::pv_machine::{PvDevices, PvUpcall};
use vmcraft::vcpu::VcpuConfig;
use vmcraft_guest_kit::Guest;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const DISK_BYTES: u64 = 16 << 20;

struct Run {
    requests: u64,
    elapsed: Duration,
    host_cpu_ns: u64,
    exits: u64,
    notifications: u64,
}

fn run(image: &common::Image, write: bool, random: bool, batch: u64, requests: u64) -> Run {
    let mut b = MachineBuilder::new(16 << 20, Box::new(std::io::sink())).unwrap();
    let console = SharedBuffer::new();
    let upcall = PvUpcall::Custom(Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let pv = PvDevices {
        layout: vmcraft_guest_kit::PV_LAYOUT,
        disk: image.file.try_clone().unwrap(),
        read_only: false,
        console: Box::new(console.clone()),
    };
    let backends = b.add_pv(pv, upcall).unwrap();
    let guest = Guest::PV_BLK_BENCH;
    b.load(guest.image()).unwrap();
    let param =
        (u64::from(write) << 1) | (u64::from(random) << 2) | (batch << 8) | (requests << 16);
    let start = Instant::now();
    let running = b.start(&[VcpuConfig::at(guest.entry(0, param))]).unwrap();
    let outcome = running
        .wait_stopped(Some(Duration::from_secs(600)))
        .unwrap();
    let elapsed = start.elapsed();
    let io_cpu = common::thread_cpu_ns("pv-block");
    let stats = running.total_stats();
    running.stop();
    running.wait().unwrap();
    // The console thread may still be draining the last line.
    std::thread::sleep(Duration::from_millis(50));
    drop(backends);
    let text = String::from_utf8_lossy(&console.contents()).into_owned();
    assert_eq!(
        outcome.reason,
        vmcraft_guest_kit::exited(0),
        "guest failed: {text}"
    );
    let notifications = text
        .lines()
        .find_map(|l| l.strip_prefix("notifications 0x"))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .expect("notification count");
    // Exits for the console line (one send per write call: 3) are not I/O.
    let exits = stats.total().saturating_sub(3);
    Run {
        requests,
        elapsed,
        host_cpu_ns: io_cpu.expect("the pv-block thread") + stats.total_nanos(),
        exits,
        notifications,
    }
}

fn main() {
    common::require_kvm("pv_blk");
    let image = common::Image::new("pv-blk", DISK_BYTES);
    println!("PV block (blkif over grants, event channels), 4 KiB requests from a CPL-3 guest");
    println!(
        "{:<40} {:>12} {:>16} {:>12} {:>16}",
        "", "requests/s", "host CPU µs/req", "exits/req", "notifications/req"
    );
    for write in [false, true] {
        for (batch, requests, random) in [
            (1u64, 20_000u64, false),
            (32, 100_000, false),
            (32, 100_000, true),
        ] {
            let r = run(&image, write, random, batch, requests);
            let n = r.requests as f64;
            println!(
                "{:<40} {:>12.0} {:>16.2} {:>12.4} {:>16.4}",
                format!(
                    "guest {}, batch {batch}{}",
                    if write { "write" } else { "read" },
                    if random { ", random offsets" } else { "" }
                ),
                n / r.elapsed.as_secs_f64(),
                r.host_cpu_ns as f64 / n / 1e3,
                r.exits as f64 / n,
                r.notifications as f64 / n
            );
        }
    }
    println!("target: at batch 32, at most 0.05 notifications per request");
}
