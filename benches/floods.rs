//! What a hostile guest's floods cost the VMM: for each kind of abuse of its virtio-blk
//! device (the `virtio_flood` guest: chains naming nearly 4 GiB, looping chains, an
//! available index a ring ahead, a notification storm, oversized requests) and of its
//! paravirtual channel (the `pv_flood` guest: a blkif producer a ring ahead, a
//! hypercall storm, a doorbell storm), the rounds per second and, per round: the CPU time of every thread but the vCPU's (the
//! device threads, which a reset replaces, and the rest of the process: `getrusage`
//! minus the vCPU thread's schedstat), the vCPU thread's time handling exits in the VMM,
//! and the exits; and the process's resident memory at the start and at most during
//! the flood. `tests/floods.rs` asserts the bounds; this
//! prints the figures. The longer hostile soak is `tests/soak.rs` with
//! `VMCRAFT_SOAK_SECONDS` set.
//!
//! ```text
//! cargo bench --bench floods
//! ```

mod common;

use std::time::{Duration, Instant};

use std::sync::Arc;

use vmcraft::builder::MachineBuilder;
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::devices::virtio::block::{Block, Disk};
use vmcraft::memory::host_usage::ProcessMemory;
use vmcraft::pv_machine::{PvDevices, PvUpcall};
use vmcraft::vcpu::VcpuConfig;
use vmcraft_guest_kit::Guest;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// (guest, kind, rounds, what it is)
const FLOODS: [(Guest, u64, u64, &str); 8] = [
    (
        Guest::VIRTIO_FLOOD,
        1,
        2_000,
        "chains naming nearly 4 GiB (reset each)",
    ),
    (Guest::VIRTIO_FLOOD, 2, 2_000, "looping chains (reset each)"),
    (
        Guest::VIRTIO_FLOOD,
        3,
        2_000,
        "avail index a ring ahead (reset each)",
    ),
    (Guest::VIRTIO_FLOOD, 4, 200_000, "notification storm"),
    (Guest::VIRTIO_FLOOD, 5, 50_000, "oversized requests"),
    (Guest::PV_FLOOD, 1, 1, "PV: blkif producer a ring ahead"),
    (Guest::PV_FLOOD, 2, 500_000, "PV: hypercall storm"),
    (Guest::PV_FLOOD, 3, 500_000, "PV: doorbell storm"),
];

fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage through a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    // SAFETY: zero-initialised, and getrusage filled it.
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn main() {
    common::require_kvm("floods");
    let image = common::Image::new("floods", 4 << 20);
    println!("floods from a hostile CPL-3 guest on its virtio-blk device or its PV channel");
    println!(
        "{:<44} {:>8} {:>10} {:>14} {:>14} {:>12} {:>8} {:>8}",
        "",
        "rounds",
        "rounds/s",
        "devices µs/rnd",
        "exits µs/rnd",
        "exits/round",
        "RSS MiB",
        "peak MiB"
    );
    let only = common::row_filter();
    for (guest, kind, rounds, what) in FLOODS {
        if !only(what) {
            continue;
        }
        let serial = SharedBuffer::new();
        let mut b = MachineBuilder::new(16 << 20, Box::new(serial.clone())).expect("machine");
        let image = image.file.try_clone().expect("dup");
        let backends = if guest == Guest::VIRTIO_FLOOD {
            let disk = Disk::new(image, false, "flood").expect("disk");
            b.add_virtio(Box::new(Block::new(disk, "vblk0")))
                .expect("attach");
            None
        } else {
            let pv = PvDevices {
                layout: vmcraft_guest_kit::PV_LAYOUT,
                disk: image,
                read_only: false,
                console: Box::new(std::io::sink()),
            };
            let upcall = PvUpcall::Custom(Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
            Some(b.add_pv(pv, upcall).expect("PV backends"))
        };
        b.load(guest.image()).expect("load");
        let rss = ProcessMemory::current().expect("status").rss;
        let (cpu, start) = (process_cpu(), Instant::now());
        let running = b
            .start(&[VcpuConfig::at(guest.entry(0, kind | rounds << 8))])
            .expect("start");
        // The vCPU thread's CPU is read while it lives (it ends with the VM); the
        // last reading misses at most one sampling period.
        let (mut peak, mut vcpu_ns) = (rss, 0);
        while running.stop_reason().is_none() && start.elapsed() < Duration::from_secs(600) {
            peak = peak.max(ProcessMemory::current().expect("status").rss);
            vcpu_ns = common::thread_cpu_ns("vcpu0").unwrap_or(vcpu_ns);
            std::thread::sleep(Duration::from_millis(5));
        }
        let (elapsed, cpu) = (start.elapsed(), process_cpu() - cpu);
        let vcpu_thread = Duration::from_nanos(vcpu_ns);
        let stats = running.total_stats();
        let outcome = running
            .run_for(Duration::from_secs(1))
            .expect("the flood guest stops");
        drop(backends);
        assert_eq!(
            outcome.reason,
            vmcraft_guest_kit::exited(0),
            "{what}: {}",
            String::from_utf8_lossy(&serial.contents())
        );
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let per_round = |d: Duration| d.as_secs_f64() * 1e6 / rounds as f64;
        println!(
            "{:<44} {:>8} {:>10.0} {:>14.2} {:>14.2} {:>12.2} {:>8.2} {:>8.2}",
            what,
            rounds,
            rounds as f64 / elapsed.as_secs_f64(),
            per_round(cpu.saturating_sub(vcpu_thread)),
            per_round(Duration::from_nanos(stats.total_nanos())),
            stats.total() as f64 / rounds as f64,
            mib(rss),
            mib(peak)
        );
    }
    println!(
        "devices: CPU time of every thread but the vCPU's; exits: the vCPU thread's time handling exits in the VMM; per round"
    );
}
