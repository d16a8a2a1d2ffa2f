//! Xen's credit scheduler (credit1) as a pure state machine.
//!
//! Credit is kept as nanoseconds of CPU time (Xen's 10 credits per millisecond: 300
//! credits are one 30 ms slice). The rules, after Xen:
//! * every timeslice, accounting hands out `timeslice × pCPUs` among the active
//!   domains in proportion to weight × active vCPUs; a domain limited by its cap or by
//!   its vCPU count (one pCPU each) gets its limit and the rest is redistributed;
//! * a vCPU whose credit exceeds one slice stops earning and has its credit halved;
//!   credit never falls below minus one slice at accounting;
//! * credit is burned from measured run time at every decision and tick (not sampled
//!   per tick, which let a guest that yields just before each tick run for free);
//! * priority is UNDER with credit left, OVER without; a vCPU that wakes while UNDER
//!   is BOOSTed until the next tick finds it running;
//! * a capped domain's vCPU with negative credit is parked until accounting gives it
//!   credit again;
//! * each pCPU has a run queue ordered BOOST, UNDER, OVER (FIFO within one); a pCPU
//!   with nothing better than OVER steals the best allowed vCPU from its peers;
//! * a vCPU runs at least the rate limit before it can be preempted, and a full
//!   slice unless something of higher priority waits.

use std::collections::{HashMap, VecDeque};

use crate::{
    check_weight, Affinity, Decision, DomainId, Nanos, PcpuId, Policy, SchedError, VcpuId, MS,
};

/// The knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditParams {
    /// Length of a slice, and the accounting period (Xen: 30 ms).
    pub timeslice: Nanos,
    /// Tick: credit is burned and BOOST ends on this period (Xen: 10 ms).
    pub tick: Nanos,
    /// Least run time before preemption (Xen: 1 ms).
    pub ratelimit: Nanos,
    /// Whether waking vCPUs with credit left are boosted.
    pub boost: bool,
}

impl Default for CreditParams {
    fn default() -> Self {
        CreditParams {
            timeslice: 30 * MS,
            tick: 10 * MS,
            ratelimit: MS,
            boost: true,
        }
    }
}

/// A vCPU's priority; higher is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// Out of credit.
    Over = 0,
    /// Credit left.
    Under = 1,
    /// Just woke with credit left.
    Boost = 2,
}

const PRIORITIES: [Priority; 3] = [Priority::Boost, Priority::Under, Priority::Over];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Blocked,
    Queued(u32),
    Running(u32),
    /// Runnable, but its capped domain is out of credit.
    Parked,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Blocked => "blocked",
            State::Queued(_) => "queued",
            State::Running(_) => "running",
            State::Parked => "parked",
        }
    }
}

#[derive(Debug)]
struct Vcpu {
    id: VcpuId,
    dom: usize,
    credit: i64,
    pri: Priority,
    state: State,
    affinity: Affinity,
    last_pcpu: u32,
    /// Credit has been burned up to this time (while running).
    last_burn: Nanos,
    /// Earning credit at accounting.
    active: bool,
}

#[derive(Debug)]
struct Domain {
    weight: u32,
    cap: u32,
    vcpus: Vec<usize>,
}

#[derive(Debug, Default)]
struct Pcpu {
    runq: [VecDeque<usize>; 3],
    current: Option<usize>,
    slice_start: Nanos,
}

impl Pcpu {
    fn queue(&mut self, pri: Priority) -> &mut VecDeque<usize> {
        &mut self.runq[2 - pri as usize]
    }
    fn best_priority(&self) -> Option<Priority> {
        PRIORITIES
            .iter()
            .zip(&self.runq)
            .find(|(_, q)| !q.is_empty())
            .map(|(p, _)| *p)
    }
}

/// The credit1 scheduler.
#[derive(Debug)]
pub struct Credit {
    params: CreditParams,
    vcpus: Vec<Vcpu>,
    vcpu_index: HashMap<VcpuId, usize>,
    domains: Vec<Domain>,
    domain_index: HashMap<DomainId, usize>,
    pcpus: Vec<Pcpu>,
    next_tick: Nanos,
    ticks: u64,
    /// pCPUs to kick with the next decision (work made runnable by accounting).
    pending_kicks: Vec<PcpuId>,
}

impl Credit {
    /// A scheduler for `pcpus` pCPUs (at least one).
    pub fn new(params: CreditParams, pcpus: u32) -> Credit {
        let params = CreditParams {
            tick: params.tick.max(1),
            timeslice: params.timeslice.max(params.tick.max(1)),
            ..params
        };
        Credit {
            params,
            vcpus: Vec::new(),
            vcpu_index: HashMap::new(),
            domains: Vec::new(),
            domain_index: HashMap::new(),
            pcpus: (0..pcpus.max(1)).map(|_| Pcpu::default()).collect(),
            next_tick: params.tick,
            ticks: 0,
            pending_kicks: Vec::new(),
        }
    }

    /// The parameters in force.
    pub fn params(&self) -> CreditParams {
        self.params
    }

    /// A vCPU's credit (nanoseconds of CPU time) and priority.
    pub fn credit(&self, vcpu: VcpuId) -> Option<(i64, Priority)> {
        let v = &self.vcpus[*self.vcpu_index.get(&vcpu)?];
        Some((v.credit, v.pri))
    }

    fn slice(&self) -> i64 {
        self.params.timeslice as i64
    }

    fn index(&self, vcpu: VcpuId) -> Result<usize, SchedError> {
        self.vcpu_index
            .get(&vcpu)
            .copied()
            .ok_or(SchedError::NoVcpu(vcpu))
    }

    fn bad_state(&self, v: usize, op: &'static str) -> SchedError {
        SchedError::BadState {
            vcpu: self.vcpus[v].id,
            op,
            state: self.vcpus[v].state.name(),
        }
    }

    /// Charge a running vCPU for its run time up to `until`.
    fn burn(&mut self, v: usize, until: Nanos) {
        let vcpu = &mut self.vcpus[v];
        let ran = until.saturating_sub(vcpu.last_burn);
        vcpu.last_burn = vcpu.last_burn.max(until);
        if ran > 0 {
            vcpu.credit -= ran as i64;
            // Out of credit: it must earn again, or it would starve behind those
            // that do.
            if vcpu.credit <= 0 {
                vcpu.active = true;
            }
        }
        if vcpu.pri != Priority::Boost {
            vcpu.pri = Self::priority_for(vcpu.credit);
        }
    }

    fn priority_for(credit: i64) -> Priority {
        if credit > 0 {
            Priority::Under
        } else {
            Priority::Over
        }
    }

    fn enqueue(&mut self, v: usize, pcpu: u32) {
        let pri = self.vcpus[v].pri;
        self.vcpus[v].state = State::Queued(pcpu);
        self.pcpus[pcpu as usize].queue(pri).push_back(v);
    }

    fn dequeue(&mut self, v: usize) {
        if let State::Queued(p) = self.vcpus[v].state {
            let pri = self.vcpus[v].pri;
            let q = self.pcpus[p as usize].queue(pri);
            if let Some(pos) = q.iter().position(|&x| x == v) {
                q.remove(pos);
            }
        }
    }

    /// Process every tick (and accounting) due by `now`.
    fn advance(&mut self, now: Nanos) {
        let per_acct = (self.params.timeslice / self.params.tick).max(1);
        while self.next_tick <= now {
            let t = self.next_tick;
            for p in 0..self.pcpus.len() {
                if let Some(v) = self.pcpus[p].current {
                    self.burn(v, t);
                    // A vCPU a tick finds running earns at the next accounting (and
                    // one that never is, like a short sleeper, leaves its share to
                    // the others); BOOST lasts until a tick finds it running.
                    let vcpu = &mut self.vcpus[v];
                    vcpu.active = true;
                    if vcpu.pri == Priority::Boost {
                        vcpu.pri = Self::priority_for(vcpu.credit);
                    }
                }
            }
            self.ticks += 1;
            if self.ticks.is_multiple_of(per_acct) {
                self.account();
            }
            self.next_tick += self.params.tick;
        }
    }

    /// Hand out one slice per pCPU among the active domains.
    fn account(&mut self) {
        let slice = self.slice();
        let total = slice * self.pcpus.len() as i64;
        for v in &mut self.vcpus {
            if v.state != State::Blocked && v.credit <= 0 {
                v.active = true;
            }
        }
        // (domain, weight × active vCPUs, limit)
        let mut open: Vec<(usize, i64, i64)> = Vec::new();
        for (d, dom) in self.domains.iter().enumerate() {
            let active = dom.vcpus.iter().filter(|&&v| self.vcpus[v].active).count() as i64;
            if active == 0 {
                continue;
            }
            let mut limit = active.min(self.pcpus.len() as i64) * slice;
            if dom.cap > 0 {
                limit = limit.min(i64::from(dom.cap) * slice / 100);
            }
            open.push((d, i64::from(dom.weight) * active, limit));
        }
        // Water-filling: domains whose fair share exceeds their limit get the limit;
        // what they leave goes to the others by weight.
        let mut shares = vec![0i64; self.domains.len()];
        let mut remaining = total;
        loop {
            let weight: i64 = open.iter().map(|o| o.1).sum();
            if weight == 0 {
                break;
            }
            let limited: Vec<usize> = (0..open.len())
                .filter(|&i| remaining * open[i].1 / weight > open[i].2)
                .collect();
            if limited.is_empty() {
                for &(d, w, _) in &open {
                    shares[d] = remaining * w / weight;
                }
                break;
            }
            for &i in limited.iter().rev() {
                let (d, _, limit) = open.remove(i);
                shares[d] = limit;
                remaining -= limit;
            }
        }
        for (d, &share) in shares.iter().enumerate() {
            let active: Vec<usize> = self.domains[d]
                .vcpus
                .iter()
                .copied()
                .filter(|&v| self.vcpus[v].active)
                .collect();
            let per_vcpu = if active.is_empty() {
                0
            } else {
                share / active.len() as i64
            };
            let capped = self.domains[d].cap > 0;
            for v in self.domains[d].vcpus.clone() {
                let old_pri = self.vcpus[v].pri;
                let vcpu = &mut self.vcpus[v];
                if vcpu.active {
                    vcpu.credit += per_vcpu;
                    if vcpu.credit > slice {
                        // Stops earning until it runs again, and keeps half.
                        vcpu.active = false;
                        vcpu.credit /= 2;
                    }
                }
                vcpu.credit = vcpu.credit.max(-slice);
                if vcpu.pri != Priority::Boost {
                    vcpu.pri = Self::priority_for(vcpu.credit);
                }
                // Queued vCPUs move to the queue of their new priority.
                if let State::Queued(p) = vcpu.state {
                    if vcpu.pri != old_pri {
                        let q = self.pcpus[p as usize].queue(old_pri);
                        if let Some(pos) = q.iter().position(|&x| x == v) {
                            q.remove(pos);
                        }
                        let new_pri = self.vcpus[v].pri;
                        self.pcpus[p as usize].queue(new_pri).push_back(v);
                    }
                }
                if capped {
                    self.apply_cap(v);
                }
            }
        }
    }

    /// Park a capped vCPU out of credit; unpark one that has credit again.
    fn apply_cap(&mut self, v: usize) {
        let credit = self.vcpus[v].credit;
        match self.vcpus[v].state {
            State::Queued(_) if credit < 0 => {
                self.dequeue(v);
                self.vcpus[v].state = State::Parked;
            }
            State::Parked if credit >= 0 => {
                let p = self.place(v);
                self.enqueue(v, p);
                if self.pcpus[p as usize].current.is_none() {
                    self.pending_kicks.push(PcpuId(p));
                }
            }
            // A running vCPU out of credit is parked when its pCPU next decides.
            _ => {}
        }
    }

    fn parked_by_cap(&self, v: usize) -> bool {
        let dom = &self.domains[self.vcpus[v].dom];
        dom.cap > 0 && self.vcpus[v].credit < 0
    }

    /// Where a runnable vCPU goes: its last pCPU if idle, else any idle allowed pCPU,
    /// else its last pCPU, else the first allowed one.
    fn place(&self, v: usize) -> u32 {
        let vcpu = &self.vcpus[v];
        let allowed = |p: u32| vcpu.affinity.allows(PcpuId(p));
        let n = self.pcpus.len() as u32;
        let idle = |p: u32| self.pcpus[p as usize].current.is_none();
        if allowed(vcpu.last_pcpu) && idle(vcpu.last_pcpu) {
            return vcpu.last_pcpu;
        }
        if let Some(p) = (0..n).find(|&p| allowed(p) && idle(p)) {
            return p;
        }
        if allowed(vcpu.last_pcpu) {
            return vcpu.last_pcpu;
        }
        (0..n).find(|&p| allowed(p)).unwrap_or(0)
    }

    /// The best vCPU waiting for `pcpu` (local, or stealable from a peer) at priority
    /// at least `better_than` (exclusive); removed from its queue.
    fn take_best(&mut self, pcpu: u32, better_than: Option<Priority>) -> Option<usize> {
        let local = self.pcpus[pcpu as usize].best_priority();
        let wanted = |p: Priority| better_than.is_none_or(|b| p > b);
        if let Some(pri) = local.filter(|&p| wanted(p)) {
            // Prefer a peer's vCPU only if it is strictly better than the local best.
            if pri == Priority::Boost {
                return self.pcpus[pcpu as usize].queue(pri).pop_front();
            }
            if let Some(v) = self.steal(pcpu, Some(pri)) {
                return Some(v);
            }
            return self.pcpus[pcpu as usize].queue(pri).pop_front();
        }
        self.steal(pcpu, better_than)
    }

    /// Take the best vCPU from a peer's queue that may run on `pcpu`, strictly
    /// better than `better_than`.
    fn steal(&mut self, pcpu: u32, better_than: Option<Priority>) -> Option<usize> {
        let n = self.pcpus.len() as u32;
        for pri in PRIORITIES {
            if better_than.is_some_and(|b| pri <= b) {
                break;
            }
            for k in 1..n {
                let peer = ((pcpu + k) % n) as usize;
                let q = &self.pcpus[peer].runq[2 - pri as usize];
                if let Some(pos) = q
                    .iter()
                    .position(|&v| self.vcpus[v].affinity.allows(PcpuId(pcpu)))
                {
                    return self.pcpus[peer].queue(pri).remove(pos);
                }
            }
        }
        None
    }

    /// Idle pCPUs that could take work waiting on `pcpu`'s queue.
    fn idle_helpers(&self, pcpu: u32) -> Vec<PcpuId> {
        let mut kick = Vec::new();
        let queue = &self.pcpus[pcpu as usize].runq;
        let mut waiting = queue.iter().flatten();
        for p in 0..self.pcpus.len() as u32 {
            if p == pcpu || self.pcpus[p as usize].current.is_some() {
                continue;
            }
            // One waiting vCPU per idle pCPU that may take it.
            if waiting.any(|&v| self.vcpus[v].affinity.allows(PcpuId(p))) {
                kick.push(PcpuId(p));
            } else {
                break;
            }
        }
        kick
    }

    /// Check the structural invariants (for tests): every vCPU is in exactly one
    /// place, no vCPU runs on two pCPUs, queues hold their own priority, and credit
    /// stays within bounds.
    pub fn check_invariants(&self) -> Result<(), String> {
        let slice = self.slice();
        let mut seen = vec![0u32; self.vcpus.len()];
        for (p, pcpu) in self.pcpus.iter().enumerate() {
            for (qi, q) in pcpu.runq.iter().enumerate() {
                for &v in q {
                    seen[v] += 1;
                    if self.vcpus[v].state != State::Queued(p as u32) {
                        return Err(format!(
                            "{:?} in queue of pCPU {p} but {:?}",
                            self.vcpus[v].id, self.vcpus[v].state
                        ));
                    }
                    if 2 - self.vcpus[v].pri as usize != qi {
                        return Err(format!(
                            "{:?} in the wrong priority queue",
                            self.vcpus[v].id
                        ));
                    }
                    if !self.vcpus[v].affinity.allows(PcpuId(p as u32)) {
                        return Err(format!(
                            "{:?} queued on a pCPU it may not use",
                            self.vcpus[v].id
                        ));
                    }
                }
            }
            if let Some(v) = pcpu.current {
                seen[v] += 1;
                if self.vcpus[v].state != State::Running(p as u32) {
                    return Err(format!(
                        "{:?} current on pCPU {p} but {:?}",
                        self.vcpus[v].id, self.vcpus[v].state
                    ));
                }
            }
        }
        for (v, vcpu) in self.vcpus.iter().enumerate() {
            let expected = match vcpu.state {
                State::Queued(_) | State::Running(_) => 1,
                State::Blocked | State::Parked => 0,
            };
            if seen[v] != expected {
                return Err(format!(
                    "{:?} ({:?}) found {} times",
                    vcpu.id, vcpu.state, seen[v]
                ));
            }
            if vcpu.credit < -3 * slice || vcpu.credit > 2 * slice {
                return Err(format!(
                    "{:?} credit {} out of bounds",
                    vcpu.id, vcpu.credit
                ));
            }
        }
        Ok(())
    }
}

impl Policy for Credit {
    fn name(&self) -> &'static str {
        if self.params.boost {
            "credit"
        } else {
            "credit (no boost)"
        }
    }

    fn add_domain(&mut self, dom: DomainId, weight: u32, cap: u32) -> Result<(), SchedError> {
        check_weight(weight)?;
        if self.domain_index.contains_key(&dom) {
            return Err(SchedError::DomainExists(dom));
        }
        self.domain_index.insert(dom, self.domains.len());
        self.domains.push(Domain {
            weight,
            cap,
            vcpus: Vec::new(),
        });
        Ok(())
    }

    fn add_vcpu(
        &mut self,
        vcpu: VcpuId,
        dom: DomainId,
        affinity: Affinity,
    ) -> Result<(), SchedError> {
        let d = *self
            .domain_index
            .get(&dom)
            .ok_or(SchedError::NoDomain(dom))?;
        if self.vcpu_index.contains_key(&vcpu) {
            return Err(SchedError::VcpuExists(vcpu));
        }
        let first = (0..self.pcpus.len() as u32)
            .find(|&p| affinity.allows(PcpuId(p)))
            .ok_or(SchedError::NoAllowedPcpu(vcpu))?;
        let v = self.vcpus.len();
        self.vcpus.push(Vcpu {
            id: vcpu,
            dom: d,
            credit: 0,
            pri: Priority::Over,
            state: State::Blocked,
            affinity,
            last_pcpu: first,
            last_burn: 0,
            active: true,
        });
        self.vcpu_index.insert(vcpu, v);
        self.domains[d].vcpus.push(v);
        Ok(())
    }

    fn wake(&mut self, vcpu: VcpuId, now: Nanos) -> Result<Option<PcpuId>, SchedError> {
        let v = self.index(vcpu)?;
        if self.vcpus[v].state != State::Blocked {
            return Err(self.bad_state(v, "wake"));
        }
        self.advance(now);
        let boost = self.params.boost;
        let vcpu_ref = &mut self.vcpus[v];
        vcpu_ref.pri = Self::priority_for(vcpu_ref.credit);
        if boost && vcpu_ref.pri == Priority::Under {
            vcpu_ref.pri = Priority::Boost;
        }
        if self.parked_by_cap(v) {
            self.vcpus[v].state = State::Parked;
            return Ok(None);
        }
        let p = self.place(v);
        self.enqueue(v, p);
        let pcpu = &self.pcpus[p as usize];
        let preempt = match pcpu.current {
            None => true,
            Some(cur) => self.vcpus[v].pri > self.vcpus[cur].pri,
        };
        Ok(preempt.then_some(PcpuId(p)))
    }

    fn block(&mut self, vcpu: VcpuId, now: Nanos) -> Result<PcpuId, SchedError> {
        let v = self.index(vcpu)?;
        let State::Running(p) = self.vcpus[v].state else {
            return Err(self.bad_state(v, "block"));
        };
        self.advance(now);
        self.burn(v, now);
        self.vcpus[v].state = State::Blocked;
        self.pcpus[p as usize].current = None;
        Ok(PcpuId(p))
    }

    fn yield_now(&mut self, vcpu: VcpuId, now: Nanos) -> Result<PcpuId, SchedError> {
        let v = self.index(vcpu)?;
        let State::Running(p) = self.vcpus[v].state else {
            return Err(self.bad_state(v, "yield"));
        };
        self.advance(now);
        self.burn(v, now);
        self.pcpus[p as usize].current = None;
        if self.parked_by_cap(v) {
            self.vcpus[v].state = State::Parked;
        } else {
            // Behind every vCPU of its priority.
            self.enqueue(v, p);
        }
        Ok(PcpuId(p))
    }

    fn schedule(&mut self, pcpu: PcpuId, now: Nanos) -> Decision {
        let p = pcpu.0.min(self.pcpus.len() as u32 - 1);
        self.advance(now);
        let params = self.params;
        let mut kick = std::mem::take(&mut self.pending_kicks);
        if let Some(v) = self.pcpus[p as usize].current {
            self.burn(v, now);
            let ran = now.saturating_sub(self.pcpus[p as usize].slice_start);
            if self.parked_by_cap(v) {
                self.vcpus[v].state = State::Parked;
                self.pcpus[p as usize].current = None;
            } else {
                let waiting = self.pcpus[p as usize]
                    .best_priority()
                    .max(self.best_stealable(p));
                let keep = ran < params.ratelimit
                    || (ran < params.timeslice && waiting.is_none_or(|w| w <= self.vcpus[v].pri));
                if keep {
                    let end = if ran < params.ratelimit {
                        self.pcpus[p as usize].slice_start + params.ratelimit
                    } else {
                        self.pcpus[p as usize].slice_start + params.timeslice
                    };
                    kick.extend(self.idle_helpers(p));
                    return Decision {
                        vcpu: Some(self.vcpus[v].id),
                        until: end.min(self.next_tick),
                        kick,
                    };
                }
                self.pcpus[p as usize].current = None;
                self.enqueue(v, p);
            }
        }
        let next = self.take_best(p, None);
        match next {
            Some(v) => {
                let pc = &mut self.pcpus[p as usize];
                pc.current = Some(v);
                pc.slice_start = now;
                let vcpu = &mut self.vcpus[v];
                vcpu.state = State::Running(p);
                vcpu.last_burn = now;
                vcpu.last_pcpu = p;
                kick.extend(self.idle_helpers(p));
                Decision {
                    vcpu: Some(self.vcpus[v].id),
                    until: (now + params.timeslice).min(self.next_tick),
                    kick,
                }
            }
            None => Decision {
                vcpu: None,
                until: self.next_tick,
                kick,
            },
        }
    }

    fn current(&self, pcpu: PcpuId) -> Option<VcpuId> {
        let v = self.pcpus.get(pcpu.0 as usize)?.current?;
        Some(self.vcpus[v].id)
    }

    fn pcpus(&self) -> u32 {
        self.pcpus.len() as u32
    }
}

impl Credit {
    /// The best priority a peer queue holds for `pcpu`.
    fn best_stealable(&self, pcpu: u32) -> Option<Priority> {
        let n = self.pcpus.len() as u32;
        PRIORITIES.into_iter().find(|&pri| {
            (1..n).any(|k| {
                let peer = ((pcpu + k) % n) as usize;
                self.pcpus[peer].runq[2 - pri as usize]
                    .iter()
                    .any(|&v| self.vcpus[v].affinity.allows(PcpuId(pcpu)))
            })
        })
    }
}

#[cfg(test)]
mod tests;
