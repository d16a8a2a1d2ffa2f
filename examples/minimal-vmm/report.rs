//! What the minimal VMM prints when the VM has stopped: why, when, the exit
//! statistics, host memory and the accesses no device claimed.

use std::error::Error;
use std::time::{Duration, Instant};

use vmcraft::devices::bus::IoBuses;
use vmcraft::memory::host_usage::ProcessMemory;
use vmcraft::vcpu::{ExitStatsSnapshot, VmOutcome};

/// The figures of one run.
pub struct Report<'a> {
    pub outcome: VmOutcome,
    pub started: Instant,
    pub first_exit: Duration,
    pub stats: &'a [ExitStatsSnapshot],
    pub guest_resident: u64,
    pub buses: &'a IoBuses,
    /// `/proc/self/status`, opened before the filters went on.
    pub status: &'a std::fs::File,
}

/// Print `r` to stdout.
pub fn print(r: &Report<'_>) -> Result<(), Box<dyn Error>> {
    let (outcome, started, first_exit, stats, guest_resident, buses) = (
        r.outcome,
        r.started,
        r.first_exit,
        r.stats,
        r.guest_resident,
        r.buses,
    );
    println!();
    let by = outcome
        .vcpu
        .map_or(String::new(), |v| format!(" (vCPU {v})"));
    println!(
        "minimal-vmm: VM stopped: {}{by}, {:.1} ms after start (vCPUs running after {:.1} ms)",
        outcome.reason,
        started.elapsed().as_secs_f64() * 1e3,
        first_exit.as_secs_f64() * 1e3
    );
    for (i, s) in stats.iter().enumerate() {
        println!(
            "minimal-vmm: exit statistics of vCPU {i} ({} exits):",
            s.total()
        );
        print!("{s}");
    }
    let memory = ProcessMemory::read_from(r.status)?;
    println!(
        "minimal-vmm: host memory: peak RSS {} KiB, guest RAM resident {} KiB, VMM overhead {} KiB",
        memory.peak_rss >> 10,
        guest_resident >> 10,
        memory.peak_rss.saturating_sub(guest_resident) >> 10
    );
    let u = buses.unclaimed();
    println!("minimal-vmm: unclaimed accesses: {} port reads, {} port writes, {} MMIO reads, {} MMIO writes",
        u.pio_reads, u.pio_writes, u.mmio_reads, u.mmio_writes);
    let ports = buses.unclaimed_ports();
    if !ports.is_empty() {
        let list: Vec<String> = ports
            .iter()
            .map(|p| format!("{:#x} ({}r/{}w)", p.port, p.reads, p.writes))
            .collect();
        println!("minimal-vmm: unclaimed ports: {}", list.join(", "));
    }
    Ok(())
}
