//! The credit scheduler measured: decision cost, fairness against the ideal, and the
//! wake-to-run latency of an I/O-bound vCPU among hogs, with round robin alongside.
//!
//! ```text
//! cargo bench -p vmcraft-scheduler --bench policy
//! ```
//!
//! Targets: share error ≤ 2 % of ideal over 1 s windows; I/O vCPU wake-to-run p99 ≤
//! rate limit + 1 ms; ≤ 1 µs per decision at 1024 vCPUs.

use std::time::Instant;

use vmcraft_scheduler::credit::{Credit, CreditParams};
use vmcraft_scheduler::round_robin::RoundRobin;
use vmcraft_scheduler::sim::{DomainSpec, Scenario, Workload};
use vmcraft_scheduler::{Affinity, DomainId, PcpuId, Policy, VcpuId, MS};

fn decision_cost(vcpus: u32, pcpus: u32) -> f64 {
    let mut s = Credit::new(CreditParams::default(), pcpus);
    let domains = vcpus.min(64);
    for d in 0..domains {
        s.add_domain(DomainId(d), 128 + 64 * (d % 8), 0).unwrap();
    }
    for v in 0..vcpus {
        s.add_vcpu(VcpuId(v), DomainId(v % domains), Affinity::any())
            .unwrap();
        s.wake(VcpuId(v), 0).unwrap();
    }
    // Warm up, then time decisions with the clock moving 1 ms per decision so ticks
    // and accounting run at their real rate.
    let mut now = 0;
    for i in 0..10_000u64 {
        now += MS / 4;
        s.schedule(PcpuId((i % u64::from(pcpus)) as u32), now);
    }
    let n = 200_000u64;
    let start = Instant::now();
    for i in 0..n {
        now += MS / 4;
        std::hint::black_box(s.schedule(PcpuId((i % u64::from(pcpus)) as u32), now));
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

/// Xen's credit parameters scaled down tenfold: 3 ms slices, 1 ms ticks.
fn fine() -> CreditParams {
    CreditParams {
        timeslice: 3 * MS,
        tick: MS,
        ratelimit: MS / 2,
        boost: true,
    }
}

fn fairness(name: &str, scenario: &Scenario) {
    let policies: Vec<(&str, Box<dyn Policy>)> = vec![
        (
            "credit",
            Box::new(Credit::new(CreditParams::default(), scenario.pcpus)),
        ),
        (
            "round robin",
            Box::new(RoundRobin::xen_slice(scenario.pcpus)),
        ),
    ];
    fairness_of(name, scenario, policies);
}

fn fairness_of(name: &str, scenario: &Scenario, policies: Vec<(&str, Box<dyn Policy>)>) {
    for (label, mut policy) in policies {
        let report = scenario.run(policy.as_mut()).expect("scenario");
        let mut worst_rel: f64 = 0.0;
        let mut worst_abs: f64 = 0.0;
        let mut worst_window_abs: f64 = 0.0;
        let mut worst_window_rel: f64 = 0.0;
        for v in &report.vcpus {
            worst_rel = worst_rel.max((v.share - v.ideal).abs() / v.ideal);
            worst_abs = worst_abs.max((v.share - v.ideal).abs());
            for w in &v.window_shares {
                worst_window_abs = worst_window_abs.max((w - v.ideal).abs());
            }
            worst_window_rel = worst_window_rel.max(v.worst_window_error());
        }
        let shares: Vec<String> = report
            .vcpus
            .iter()
            .map(|v| format!("{:.3}/{:.3}", v.share, v.ideal))
            .collect();
        println!(
            "{:<30} {:<22} {:>7.2}% {:>8.4} {:>8.4} {:>7.1}% {:>8}   {}",
            name,
            label,
            100.0 * worst_rel,
            worst_abs,
            worst_window_abs,
            100.0 * worst_window_rel,
            report.context_switches,
            shares.join(" ")
        );
    }
}

fn latency(pcpus: u32, hogs: usize) {
    let scenario = Scenario::new(pcpus, 20_000 * MS)
        .domain(DomainSpec::new(256).hogs(hogs))
        .domain(DomainSpec::new(256).vcpu(Workload::IoBound {
            run: MS / 2,
            sleep: 9 * MS,
        }));
    let params = CreditParams::default();
    let mut policies: Vec<Box<dyn Policy>> = vec![
        Box::new(Credit::new(params, pcpus)),
        Box::new(Credit::new(
            CreditParams {
                boost: false,
                ..params
            },
            pcpus,
        )),
        Box::new(RoundRobin::xen_slice(pcpus)),
    ];
    for policy in &mut policies {
        let report = scenario.run(policy.as_mut()).expect("scenario");
        let io = report.vcpus.last().expect("the I/O vCPU");
        let l = io.wake_latency;
        println!(
            "{} pCPU, {} hogs + 1 I/O vCPU   {:<18} p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms  share {:.3}/{:.3}",
            pcpus,
            hogs,
            report.policy,
            l.p50 as f64 / 1e6,
            l.p99 as f64 / 1e6,
            l.max as f64 / 1e6,
            io.share,
            io.ideal
        );
    }
}

fn main() {
    println!("decision cost (credit, 4 pCPUs, all vCPUs runnable):");
    for vcpus in [1, 4, 16, 64, 256, 1024] {
        println!(
            "  {vcpus:>5} vCPUs: {:>8.1} ns per decision",
            decision_cost(vcpus, 4)
        );
    }
    println!("  target: <= 1000 ns at 1024 vCPUs");
    println!();
    println!("fairness over 20 s: worst |share - ideal| over the run (relative, absolute), in any 1 s window (absolute, relative); context switches");
    let hogs = |w: u32| DomainSpec::new(w).hogs(1);
    for (pcpus, label) in [(1, "1 pCPU"), (2, "2 pCPUs")] {
        fairness(
            &format!("weights 1:2:4, {label}"),
            &Scenario::new(pcpus, 20_000 * MS)
                .domain(hogs(100))
                .domain(hogs(200))
                .domain(hogs(400)),
        );
    }
    let weights_1124 = Scenario::new(2, 20_000 * MS)
        .domain(hogs(256))
        .domain(hogs(256))
        .domain(hogs(512))
        .domain(hogs(1024));
    fairness("weights 1:1:2:4, 2 pCPUs", &weights_1124);
    fairness(
        "cap 50% + hog, 1 pCPU",
        &Scenario::new(1, 20_000 * MS)
            .domain(DomainSpec::new(256).cap(50).hogs(1))
            .domain(hogs(256)),
    );
    fairness(
        "cap 50% alone, 1 pCPU",
        &Scenario::new(1, 20_000 * MS).domain(DomainSpec::new(256).cap(50).hogs(1)),
    );
    fairness(
        "tick dodger + hog, 1 pCPU",
        &Scenario::new(1, 20_000 * MS)
            .domain(hogs(256))
            .domain(DomainSpec::new(256).vcpu(Workload::TickDodger {
                tick: 10 * MS,
                margin: 100_000,
            })),
    );
    let finer: Vec<(&str, Box<dyn Policy>)> = vec![(
        "credit, 3 ms slice, 1 ms tick",
        Box::new(Credit::new(fine(), 2)),
    )];
    fairness_of("weights 1:1:2:4, 2 pCPUs", &weights_1124, finer);
    println!("  target: share error <= 2 % of ideal over 1 s windows");
    println!();
    println!("I/O vCPU (0.5 ms of CPU every 9.5 ms) wake-to-run among hogs:");
    for (pcpus, hogs) in [(1, 3), (2, 3), (2, 4)] {
        latency(pcpus, hogs);
    }
    println!("  target: p99 <= rate limit (1 ms) + 1 ms with BOOST");
}
