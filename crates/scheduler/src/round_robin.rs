//! The baseline: one global FIFO, a fixed slice, no weights, caps or boost. Hard
//! affinity is honoured.

use std::collections::{HashMap, VecDeque};

use crate::{
    check_weight, Affinity, Decision, DomainId, Nanos, PcpuId, Policy, SchedError, VcpuId, MS,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Blocked,
    Queued,
    Running(u32),
}

/// Round robin over all runnable vCPUs.
#[derive(Debug)]
pub struct RoundRobin {
    slice: Nanos,
    queue: VecDeque<VcpuId>,
    vcpus: HashMap<VcpuId, (State, Affinity)>,
    domains: Vec<DomainId>,
    current: Vec<Option<(VcpuId, Nanos)>>,
}

impl RoundRobin {
    /// A baseline with `slice` on `pcpus` pCPUs.
    pub fn new(slice: Nanos, pcpus: u32) -> RoundRobin {
        RoundRobin {
            slice: slice.max(1),
            queue: VecDeque::new(),
            vcpus: HashMap::new(),
            domains: Vec::new(),
            current: vec![None; pcpus.max(1) as usize],
        }
    }

    /// The baseline with Xen's 30 ms slice.
    pub fn xen_slice(pcpus: u32) -> RoundRobin {
        RoundRobin::new(30 * MS, pcpus)
    }

    fn state(&self, vcpu: VcpuId) -> Result<State, SchedError> {
        self.vcpus
            .get(&vcpu)
            .map(|v| v.0)
            .ok_or(SchedError::NoVcpu(vcpu))
    }

    fn set(&mut self, vcpu: VcpuId, state: State) {
        if let Some(v) = self.vcpus.get_mut(&vcpu) {
            v.0 = state;
        }
    }

    fn running_on(&self, vcpu: VcpuId, op: &'static str) -> Result<u32, SchedError> {
        match self.state(vcpu)? {
            State::Running(p) => Ok(p),
            State::Blocked => Err(SchedError::BadState {
                vcpu,
                op,
                state: "blocked",
            }),
            State::Queued => Err(SchedError::BadState {
                vcpu,
                op,
                state: "queued",
            }),
        }
    }
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round robin"
    }

    fn add_domain(&mut self, dom: DomainId, weight: u32, _cap: u32) -> Result<(), SchedError> {
        check_weight(weight)?;
        if self.domains.contains(&dom) {
            return Err(SchedError::DomainExists(dom));
        }
        self.domains.push(dom);
        Ok(())
    }

    fn add_vcpu(
        &mut self,
        vcpu: VcpuId,
        dom: DomainId,
        affinity: Affinity,
    ) -> Result<(), SchedError> {
        if !self.domains.contains(&dom) {
            return Err(SchedError::NoDomain(dom));
        }
        if self.vcpus.contains_key(&vcpu) {
            return Err(SchedError::VcpuExists(vcpu));
        }
        if !(0..self.current.len() as u32).any(|p| affinity.allows(PcpuId(p))) {
            return Err(SchedError::NoAllowedPcpu(vcpu));
        }
        self.vcpus.insert(vcpu, (State::Blocked, affinity));
        Ok(())
    }

    fn wake(&mut self, vcpu: VcpuId, _now: Nanos) -> Result<Option<PcpuId>, SchedError> {
        if self.state(vcpu)? != State::Blocked {
            return Err(SchedError::BadState {
                vcpu,
                op: "wake",
                state: "runnable",
            });
        }
        self.set(vcpu, State::Queued);
        self.queue.push_back(vcpu);
        let affinity = &self.vcpus[&vcpu].1;
        let idle = (0..self.current.len() as u32)
            .find(|&p| self.current[p as usize].is_none() && affinity.allows(PcpuId(p)));
        Ok(idle.map(PcpuId))
    }

    fn block(&mut self, vcpu: VcpuId, _now: Nanos) -> Result<PcpuId, SchedError> {
        let p = self.running_on(vcpu, "block")?;
        self.set(vcpu, State::Blocked);
        self.current[p as usize] = None;
        Ok(PcpuId(p))
    }

    fn yield_now(&mut self, vcpu: VcpuId, _now: Nanos) -> Result<PcpuId, SchedError> {
        let p = self.running_on(vcpu, "yield")?;
        self.set(vcpu, State::Queued);
        self.queue.push_back(vcpu);
        self.current[p as usize] = None;
        Ok(PcpuId(p))
    }

    fn schedule(&mut self, pcpu: PcpuId, now: Nanos) -> Decision {
        let p = pcpu.0.min(self.current.len() as u32 - 1);
        if let Some((v, start)) = self.current[p as usize] {
            if now < start + self.slice {
                return Decision {
                    vcpu: Some(v),
                    until: start + self.slice,
                    kick: Vec::new(),
                };
            }
            self.set(v, State::Queued);
            self.queue.push_back(v);
            self.current[p as usize] = None;
        }
        let pos = self
            .queue
            .iter()
            .position(|v| self.vcpus[v].1.allows(PcpuId(p)));
        match pos.and_then(|i| self.queue.remove(i)) {
            Some(v) => {
                self.set(v, State::Running(p));
                self.current[p as usize] = Some((v, now));
                Decision {
                    vcpu: Some(v),
                    until: now + self.slice,
                    kick: Vec::new(),
                }
            }
            None => Decision {
                vcpu: None,
                until: now + self.slice,
                kick: Vec::new(),
            },
        }
    }

    fn current(&self, pcpu: PcpuId) -> Option<VcpuId> {
        self.current.get(pcpu.0 as usize)?.map(|c| c.0)
    }

    fn pcpus(&self) -> u32 {
        self.current.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_runnable_vcpu_takes_its_turn() {
        let mut s = RoundRobin::new(10 * MS, 1);
        s.add_domain(DomainId(0), 256, 0).unwrap();
        for v in 0..3 {
            s.add_vcpu(VcpuId(v), DomainId(0), Affinity::any()).unwrap();
            s.wake(VcpuId(v), 0).unwrap();
        }
        let mut order = Vec::new();
        let mut t = 0;
        for _ in 0..6 {
            let d = s.schedule(PcpuId(0), t);
            order.push(d.vcpu.unwrap().0);
            t = d.until;
        }
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
        let p = s.block(VcpuId(0), t).unwrap_err();
        assert!(matches!(p, SchedError::BadState { .. }));
        assert_eq!(s.schedule(PcpuId(0), t).vcpu, Some(VcpuId(0)));
        assert_eq!(s.block(VcpuId(0), t + 1), Ok(PcpuId(0)));
        assert_eq!(s.schedule(PcpuId(0), t + 1).vcpu, Some(VcpuId(1)));
    }
}
