//! A discrete-event simulator: domains of vCPUs with workloads on N pCPUs, under any
//! [`Policy`]. Deterministic: the same scenario and policy give the same report.
//!
//! ```
//! use vmcraft_scheduler::credit::{Credit, CreditParams};
//! use vmcraft_scheduler::sim::{DomainSpec, Scenario, Workload};
//! use vmcraft_scheduler::MS;
//!
//! let scenario = Scenario::new(1, 3000 * MS)
//!     .domain(DomainSpec::new(256).hogs(1))
//!     .domain(DomainSpec::new(512).hogs(1));
//! let report = scenario.run(&mut Credit::new(CreditParams::default(), 1)).unwrap();
//! let (a, b) = (&report.vcpus[0], &report.vcpus[1]);
//! assert!((a.share - 1.0 / 3.0).abs() < 0.02 && (b.share - 2.0 / 3.0).abs() < 0.02);
//! ```

use crate::{Affinity, DomainId, Nanos, PcpuId, Policy, SchedError, VcpuId};

/// What a vCPU does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Always runnable.
    Hog,
    /// Runs `run` of CPU time, then sleeps `sleep`, forever.
    IoBound {
        /// CPU time per burst.
        run: Nanos,
        /// Sleep between bursts.
        sleep: Nanos,
    },
    /// Wakes at every multiple of `period` needing `work` of CPU time.
    Periodic {
        /// Period.
        period: Nanos,
        /// CPU time per period.
        work: Nanos,
    },
    /// Wants all the CPU but yields `margin` before every `tick` boundary, the trick
    /// that let a guest run for free under per-tick sampled accounting.
    TickDodger {
        /// The tick it dodges.
        tick: Nanos,
        /// How long before the tick it yields.
        margin: Nanos,
    },
}

impl Workload {
    /// The fraction of one pCPU it would use alone.
    pub fn demand(&self) -> f64 {
        match *self {
            Workload::Hog | Workload::TickDodger { .. } => 1.0,
            Workload::IoBound { run, sleep } => run as f64 / (run + sleep).max(1) as f64,
            Workload::Periodic { period, work } => (work as f64 / period.max(1) as f64).min(1.0),
        }
    }
}

/// One vCPU of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuSpec {
    /// What it runs.
    pub workload: Workload,
    /// Where it may run.
    pub affinity: Affinity,
}

/// A domain: weight, cap and vCPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    /// Weight (1..=65535).
    pub weight: u32,
    /// Cap in percent of one pCPU (0 = none).
    pub cap: u32,
    /// Its vCPUs.
    pub vcpus: Vec<VcpuSpec>,
}

impl DomainSpec {
    /// A domain with `weight`, no cap and no vCPUs yet.
    pub fn new(weight: u32) -> Self {
        DomainSpec {
            weight,
            cap: 0,
            vcpus: Vec::new(),
        }
    }
    /// With a cap (percent of one pCPU).
    pub fn cap(mut self, cap: u32) -> Self {
        self.cap = cap;
        self
    }
    /// With one more vCPU running `workload` anywhere.
    pub fn vcpu(mut self, workload: Workload) -> Self {
        self.vcpus.push(VcpuSpec {
            workload,
            affinity: Affinity::any(),
        });
        self
    }
    /// With `n` more CPU hogs.
    pub fn hogs(mut self, n: usize) -> Self {
        for _ in 0..n {
            self = self.vcpu(Workload::Hog);
        }
        self
    }
}

/// A simulation: pCPUs, duration and domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// Number of pCPUs.
    pub pcpus: u32,
    /// Simulated time.
    pub duration: Nanos,
    /// Window for the per-window shares (1 s by default).
    pub window: Nanos,
    /// The domains (domain `i` gets `DomainId(i)`; vCPUs are numbered in order).
    pub domains: Vec<DomainSpec>,
}

impl Scenario {
    /// A scenario on `pcpus` pCPUs lasting `duration`.
    pub fn new(pcpus: u32, duration: Nanos) -> Self {
        Scenario {
            pcpus,
            duration,
            window: 1_000_000_000,
            domains: Vec::new(),
        }
    }

    /// With one more domain.
    pub fn domain(mut self, d: DomainSpec) -> Self {
        self.domains.push(d);
        self
    }

    /// Each vCPU's ideal share of one pCPU: weighted max-min fairness under demand,
    /// caps and the pCPU count (the weight applies per vCPU, as in credit1).
    pub fn ideal_shares(&self) -> Vec<f64> {
        let vcpus: Vec<(usize, f64, f64)> = self
            .domains
            .iter()
            .enumerate()
            .flat_map(|(d, dom)| {
                dom.vcpus
                    .iter()
                    .map(move |v| (d, f64::from(dom.weight), v.workload.demand()))
            })
            .collect();
        let mut share = vec![0.0; vcpus.len()];
        let mut fixed = vec![false; vcpus.len()];
        let mut capacity = f64::from(self.pcpus);
        loop {
            let free: Vec<usize> = (0..vcpus.len()).filter(|&i| !fixed[i]).collect();
            let weight: f64 = free.iter().map(|&i| vcpus[i].1).sum();
            if free.is_empty() || weight == 0.0 {
                break;
            }
            for &i in &free {
                share[i] = capacity * vcpus[i].1 / weight;
            }
            // Fix the vCPUs whose demand is below their share.
            let over_demand: Vec<usize> = free
                .iter()
                .copied()
                .filter(|&i| share[i] > vcpus[i].2)
                .collect();
            // And the domains whose cap is below the sum of their shares.
            let mut over_cap = Vec::new();
            for (d, dom) in self.domains.iter().enumerate() {
                if dom.cap == 0 {
                    continue;
                }
                let cap = f64::from(dom.cap) / 100.0;
                let members: Vec<usize> = (0..vcpus.len()).filter(|&i| vcpus[i].0 == d).collect();
                let total: f64 = members.iter().map(|&i| share[i]).sum();
                if total > cap + 1e-12 && members.iter().any(|&i| !fixed[i]) {
                    over_cap.push((members, cap));
                }
            }
            if over_demand.is_empty() && over_cap.is_empty() {
                break;
            }
            for i in over_demand {
                share[i] = vcpus[i].2;
                fixed[i] = true;
                capacity -= share[i];
            }
            for (members, cap) in over_cap {
                let already: f64 = members
                    .iter()
                    .filter(|&&i| fixed[i])
                    .map(|&i| share[i])
                    .sum();
                let open: Vec<usize> = members.iter().copied().filter(|&i| !fixed[i]).collect();
                let each = ((cap - already) / open.len() as f64).max(0.0);
                for i in open {
                    share[i] = each.min(vcpus[i].2);
                    fixed[i] = true;
                    capacity -= share[i];
                }
            }
            capacity = capacity.max(0.0);
        }
        share
    }

    /// Run the scenario under `policy` (a fresh one, with as many pCPUs).
    pub fn run(&self, policy: &mut dyn Policy) -> Result<Report, SchedError> {
        Simulation::new(self, policy)?.run()
    }
}

/// Wake-to-run latency percentiles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    /// Wakeups measured.
    pub count: usize,
    /// Median.
    pub p50: Nanos,
    /// 99th percentile.
    pub p99: Nanos,
    /// Largest.
    pub max: Nanos,
}

impl Latency {
    fn of(mut samples: Vec<Nanos>) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Latency {
            count: samples.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: *samples.last().expect("not empty"),
        }
    }
}

/// What one vCPU got.
#[derive(Debug, Clone, PartialEq)]
pub struct VcpuReport {
    /// The vCPU.
    pub vcpu: VcpuId,
    /// Its domain.
    pub domain: DomainId,
    /// Its workload.
    pub workload: Workload,
    /// CPU time received.
    pub cpu_time: Nanos,
    /// Share of one pCPU over the whole run.
    pub share: f64,
    /// The ideal share.
    pub ideal: f64,
    /// Share of one pCPU in each full window.
    pub window_shares: Vec<f64>,
    /// Time from becoming runnable to running.
    pub wake_latency: Latency,
    /// Times it was switched in.
    pub switches_in: u64,
}

impl VcpuReport {
    /// The largest error of a full window's share against the ideal, as a fraction of
    /// the ideal.
    pub fn worst_window_error(&self) -> f64 {
        self.window_shares
            .iter()
            .map(|s| (s - self.ideal).abs() / self.ideal.max(1e-9))
            .fold(0.0, f64::max)
    }
}

/// The outcome of a simulation.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The policy's name.
    pub policy: &'static str,
    /// Per vCPU, in order.
    pub vcpus: Vec<VcpuReport>,
    /// Context switches (a pCPU moving from one vCPU to another, or from idle).
    pub context_switches: u64,
    /// Scheduling decisions made.
    pub decisions: u64,
    /// Time pCPUs spent idle.
    pub idle_time: Nanos,
}

#[derive(Debug, Clone)]
struct SimVcpu {
    workload: Workload,
    runnable: bool,
    /// CPU time left in the current burst (`u64::MAX` for hogs).
    burst_left: Nanos,
    wake_at: Option<Nanos>,
    woke_at: Option<Nanos>,
    running_on: Option<u32>,
    cpu_time: Nanos,
    windows: Vec<Nanos>,
    latencies: Vec<Nanos>,
    switches_in: u64,
}

struct Simulation<'a> {
    scenario: &'a Scenario,
    policy: &'a mut dyn Policy,
    vcpus: Vec<SimVcpu>,
    until: Vec<Nanos>,
    now: Nanos,
    decisions: u64,
    switches: u64,
    idle: Nanos,
}

impl<'a> Simulation<'a> {
    fn new(scenario: &'a Scenario, policy: &'a mut dyn Policy) -> Result<Self, SchedError> {
        let mut vcpus = Vec::new();
        for (d, dom) in scenario.domains.iter().enumerate() {
            policy.add_domain(DomainId(d as u32), dom.weight, dom.cap)?;
            for spec in &dom.vcpus {
                let id = VcpuId(vcpus.len() as u32);
                policy.add_vcpu(id, DomainId(d as u32), spec.affinity.clone())?;
                vcpus.push(SimVcpu {
                    workload: spec.workload,
                    runnable: false,
                    burst_left: 0,
                    wake_at: Some(0),
                    woke_at: None,
                    running_on: None,
                    cpu_time: 0,
                    windows: Vec::new(),
                    latencies: Vec::new(),
                    switches_in: 0,
                });
            }
        }
        Ok(Simulation {
            scenario,
            until: vec![0; scenario.pcpus.max(1) as usize],
            policy,
            vcpus,
            now: 0,
            decisions: 0,
            switches: 0,
            idle: 0,
        })
    }

    /// CPU time a vCPU wants when it wakes or is refilled.
    fn fresh_burst(&self, v: usize) -> Nanos {
        match self.vcpus[v].workload {
            Workload::Hog => Nanos::MAX,
            Workload::IoBound { run, .. } => run.max(1),
            Workload::Periodic { work, .. } => work.max(1),
            Workload::TickDodger { tick, margin } => self.dodger_burst(tick, margin),
        }
    }

    fn dodger_burst(&self, tick: Nanos, margin: Nanos) -> Nanos {
        let tick = tick.max(1);
        let mut boundary = (self.now / tick + 1) * tick;
        while boundary.saturating_sub(margin) <= self.now {
            boundary += tick;
        }
        boundary - margin - self.now
    }

    fn charge(&mut self, from: Nanos, to: Nanos) {
        let window = self.scenario.window.max(1);
        for v in 0..self.vcpus.len() {
            if self.vcpus[v].running_on.is_none() {
                continue;
            }
            let elapsed = to - from;
            let vc = &mut self.vcpus[v];
            vc.cpu_time += elapsed;
            if vc.burst_left != Nanos::MAX {
                vc.burst_left = vc.burst_left.saturating_sub(elapsed);
            }
            // Intervals never cross a window boundary (boundaries are events).
            let w = (from / window) as usize;
            if vc.windows.len() <= w {
                vc.windows.resize(w + 1, 0);
            }
            vc.windows[w] += elapsed;
        }
        let running = self.vcpus.iter().filter(|v| v.running_on.is_some()).count() as u64;
        self.idle += (u64::from(self.scenario.pcpus) - running.min(u64::from(self.scenario.pcpus)))
            * (to - from);
    }

    fn reschedule(&mut self, pcpu: u32) {
        let mut work = vec![pcpu];
        while let Some(p) = work.pop() {
            let d = self.policy.schedule(PcpuId(p), self.now);
            self.decisions += 1;
            for (i, vc) in self.vcpus.iter_mut().enumerate() {
                if vc.running_on == Some(p) && d.vcpu != Some(VcpuId(i as u32)) {
                    vc.running_on = None;
                }
            }
            if let Some(next) = d.vcpu {
                let vc = &mut self.vcpus[next.0 as usize];
                if vc.running_on != Some(p) {
                    vc.running_on = Some(p);
                    vc.switches_in += 1;
                    self.switches += 1;
                    if let Some(w) = vc.woke_at.take() {
                        vc.latencies.push(self.now - w);
                    }
                }
            }
            self.until[p as usize] = d.until.max(self.now + 1);
            for k in d.kick {
                if !work.contains(&k.0) {
                    work.push(k.0);
                }
            }
        }
    }

    fn run(mut self) -> Result<Report, SchedError> {
        let duration = self.scenario.duration;
        let window = self.scenario.window.max(1);
        loop {
            // Wakeups due now.
            for v in 0..self.vcpus.len() {
                if self.vcpus[v].wake_at == Some(self.now) {
                    self.vcpus[v].wake_at = None;
                    self.vcpus[v].runnable = true;
                    self.vcpus[v].burst_left = self.fresh_burst(v);
                    self.vcpus[v].woke_at = Some(self.now);
                    if let Some(p) = self.policy.wake(VcpuId(v as u32), self.now)? {
                        self.reschedule(p.0);
                    }
                }
            }
            // Decisions due now.
            for p in 0..self.until.len() as u32 {
                if self.until[p as usize] <= self.now {
                    self.reschedule(p);
                }
            }
            // The next event.
            let mut next = duration.min((self.now / window + 1) * window);
            for &u in &self.until {
                next = next.min(u);
            }
            for vc in &self.vcpus {
                if let Some(w) = vc.wake_at {
                    next = next.min(w);
                }
                if vc.running_on.is_some() && vc.burst_left != Nanos::MAX {
                    next = next.min(self.now + vc.burst_left);
                }
            }
            let next = next.max(self.now + 1).min(duration.max(self.now + 1));
            let from = self.now;
            self.charge(from, next);
            self.now = next;
            if self.now >= duration {
                break;
            }
            // Bursts that ended.
            for v in 0..self.vcpus.len() {
                let Some(p) = self.vcpus[v].running_on else {
                    continue;
                };
                if self.vcpus[v].burst_left != 0 {
                    continue;
                }
                let id = VcpuId(v as u32);
                match self.vcpus[v].workload {
                    Workload::Hog => {}
                    Workload::IoBound { sleep, .. } => {
                        self.policy.block(id, self.now)?;
                        self.vcpus[v].running_on = None;
                        self.vcpus[v].runnable = false;
                        self.vcpus[v].wake_at = Some(self.now + sleep.max(1));
                        self.reschedule(p);
                    }
                    Workload::Periodic { period, .. } => {
                        self.policy.block(id, self.now)?;
                        self.vcpus[v].running_on = None;
                        self.vcpus[v].runnable = false;
                        let period = period.max(1);
                        self.vcpus[v].wake_at = Some((self.now / period + 1) * period);
                        self.reschedule(p);
                    }
                    Workload::TickDodger { .. } => {
                        self.policy.yield_now(id, self.now)?;
                        self.vcpus[v].running_on = None;
                        self.vcpus[v].burst_left = self.fresh_burst(v);
                        self.vcpus[v].woke_at = Some(self.now);
                        self.reschedule(p);
                    }
                }
            }
        }
        let ideal = self.scenario.ideal_shares();
        let full_windows = (duration / window) as usize;
        let mut domain_of = Vec::new();
        for (d, dom) in self.scenario.domains.iter().enumerate() {
            domain_of.extend(std::iter::repeat_n(DomainId(d as u32), dom.vcpus.len()));
        }
        let vcpus = self
            .vcpus
            .into_iter()
            .enumerate()
            .map(|(i, mut vc)| {
                vc.windows.resize(full_windows.max(vc.windows.len()), 0);
                VcpuReport {
                    vcpu: VcpuId(i as u32),
                    domain: domain_of[i],
                    workload: vc.workload,
                    cpu_time: vc.cpu_time,
                    share: vc.cpu_time as f64 / duration.max(1) as f64,
                    ideal: ideal[i],
                    window_shares: vc.windows[..full_windows]
                        .iter()
                        .map(|&t| t as f64 / window as f64)
                        .collect(),
                    wake_latency: Latency::of(vc.latencies),
                    switches_in: vc.switches_in,
                }
            })
            .collect();
        Ok(Report {
            policy: self.policy.name(),
            vcpus,
            context_switches: self.switches,
            decisions: self.decisions,
            idle_time: self.idle,
        })
    }
}
