//! What the minimal VMM prints when the VM has stopped: why, when, the exit
//! statistics, host memory and the accesses no device claimed.

use std::error::Error;
use std::time::{Duration, Instant};

use vmcraft::devices::bus::{UnclaimedAccesses, UnclaimedPort};
use vmcraft::machine::Machine;
use vmcraft::memory::host_usage::ProcessMemory;
use vmcraft::vcpu::{ExitStatsSnapshot, StopReason, VmOutcome};

/// The figures of one run.
pub struct Report<'a> {
    pub outcome: VmOutcome,
    pub started: Instant,
    pub first_exit: Duration,
    pub stats: &'a [ExitStatsSnapshot],
    pub guest_resident: u64,
    /// The accesses no device claimed, and by port.
    pub unclaimed: (UnclaimedAccesses, Vec<UnclaimedPort>),
    /// `/proc/self/status`, opened before the filters went on.
    pub status: &'a std::fs::File,
}

/// Print `r` to stdout.
pub fn print(r: &Report<'_>) -> Result<(), Box<dyn Error>> {
    let (outcome, started, first_exit, stats, guest_resident) = (
        r.outcome,
        r.started,
        r.first_exit,
        r.stats,
        r.guest_resident,
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
    let (u, ports) = &r.unclaimed;
    println!("minimal-vmm: unclaimed accesses: {} port reads, {} port writes, {} MMIO reads, {} MMIO writes",
        u.pio_reads, u.pio_writes, u.mmio_reads, u.mmio_writes);
    if !ports.is_empty() {
        let list: Vec<String> = ports
            .iter()
            .map(|p| format!("{:#x} ({}r/{}w)", p.port, p.reads, p.writes))
            .collect();
        println!("minimal-vmm: unclaimed ports: {}", list.join(", "));
    }
    Ok(())
}

/// The lines about the balloon and the Xen platform, if the machine has them (read
/// while it still runs).
pub fn extra_lines(
    machine: &Machine,
    balancing: Option<&vmcraft::balancing::Balancing>,
) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(control) = machine.balloon() {
        lines.push(format!(
            "minimal-vmm: balloon: target {} MiB, the guest holds {} MiB in it ({} MiB freed on the host; {} MiB of free pages reported), {} balancer steps, the last: {:?}",
            control.target() >> 8,
            control.actual() >> 8,
            control.inflated_pages() >> 8,
            control.reported_pages() >> 8,
            balancing.map_or(0, |b| b.steps()),
            balancing.and_then(|b| b.last_step()),
        ));
    }
    if let Some(xen) = machine.xen() {
        let table = machine.hypercalls();
        let table = table.as_deref();
        let count = |nr| table.map_or(0, |t| t.count(nr));
        let hvm = &xen.hvm;
        lines.push(format!(
            "minimal-vmm: xen: shared info at {:#x}, {} grant frames in use, vCPU 0 upcall vector {:#x}; hypercalls: xen_version {}, memory_op {}, hvm_op {}, event_channel_op {}, grant_table_op {}, vcpu_op {}, sched_op {}, unknown {}",
            hvm.channels.shared_info().map_or(0, |a| a.0),
            hvm.grants.frames_in_use(),
            hvm.upcalls.vector(0),
            count(17),
            count(12),
            count(34),
            count(32),
            count(20),
            count(24),
            count(29),
            table.map_or(0, |t| t.unknown_calls()),
        ));
    }
    lines
}

/// Stop the vCPUs, print the report, and say why the VM stopped.
pub fn finish(
    machine: Machine,
    started: Instant,
    first_exit: Duration,
    status: &std::fs::File,
) -> Result<StopReason, Box<dyn Error>> {
    let stats: Vec<_> = (0..machine.vcpu_count())
        .map(|i| machine.stats(i))
        .collect::<Result<_, _>>()?;
    let guest_resident = machine.vm().ram().resident_bytes()?;
    machine.stop();
    let buses = machine.buses();
    let unclaimed = (buses.unclaimed(), buses.unclaimed_ports());
    let failure = machine.failure().map(|f| f.to_string());
    // The devices stop with the machine, writing out what the guest gave them
    // before it stopped: the report comes after the guest's last words.
    let outcome = machine.wait()?;
    print(&Report {
        outcome,
        started,
        first_exit,
        stats: &stats,
        guest_resident,
        unclaimed,
        status,
    })?;
    if let Some(failure) = failure {
        println!("minimal-vmm: {failure}");
    }
    Ok(outcome.reason)
}
