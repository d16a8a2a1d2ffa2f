//! CPU scheduling for vmcraft VMMs: which vCPU each physical CPU (host worker
//! thread) runs, and for how long.
//!
//! * [`credit::Credit`]: Xen's credit1 scheduler as a pure, deterministic state
//!   machine: weights, caps, BOOST/UNDER/OVER priorities, credit burned from
//!   measured run time, accounting with redistribution of unused share, per-pCPU run
//!   queues with work stealing, hard affinity, rate limit.
//! * [`round_robin::RoundRobin`]: a plain round-robin baseline behind the same
//!   [`Policy`] trait.
//! * [`sim`]: a discrete-event simulator that runs workloads (CPU hogs, I/O-bound
//!   sleepers, periodic tasks, tick dodgers) on N pCPUs under any policy and reports
//!   shares against the ideal, wake-to-run latency and context switches.
//! * `runtime` (feature `runtime`): the vCPUs of KVM VMs on a pool of worker threads,
//!   following a policy, preempted on time by kicks.
//!
//! Time is passed in (nanoseconds on any monotonic clock), so the same calls always
//! give the same schedule.
//!
//! ```
//! use vmcraft_scheduler::{credit::{Credit, CreditParams}, Affinity, DomainId, PcpuId, Policy, VcpuId};
//!
//! let mut s = Credit::new(CreditParams::default(), 1);
//! s.add_domain(DomainId(0), 256, 0).unwrap();
//! s.add_vcpu(VcpuId(0), DomainId(0), Affinity::any()).unwrap();
//! s.wake(VcpuId(0), 0).unwrap();
//! let d = s.schedule(PcpuId(0), 0);
//! assert_eq!(d.vcpu, Some(VcpuId(0)));
//! assert!(d.until > 0); // the next decision is due then (a tick or the slice end)
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod credit;
pub mod round_robin;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod sim;

use thiserror::Error;

/// Nanoseconds on the caller's monotonic clock.
pub type Nanos = u64;

/// One millisecond.
pub const MS: Nanos = 1_000_000;

/// A virtual CPU, numbered by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VcpuId(pub u32);

/// A domain (a VM): the unit that weights and caps apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainId(pub u32);

/// A physical CPU: a host worker thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PcpuId(pub u32);

/// The pCPUs a vCPU may run on (hard affinity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Affinity(Option<Vec<u64>>);

impl Affinity {
    /// Any pCPU.
    pub fn any() -> Self {
        Affinity(None)
    }

    /// Only the given pCPUs.
    pub fn only(pcpus: &[PcpuId]) -> Self {
        let mut bits = Vec::new();
        for p in pcpus {
            let (word, bit) = (p.0 as usize / 64, p.0 % 64);
            if bits.len() <= word {
                bits.resize(word + 1, 0);
            }
            bits[word] |= 1u64 << bit;
        }
        Affinity(Some(bits))
    }

    /// Whether `pcpu` is allowed.
    pub fn allows(&self, pcpu: PcpuId) -> bool {
        match &self.0 {
            None => true,
            Some(bits) => bits
                .get(pcpu.0 as usize / 64)
                .is_some_and(|w| w & (1u64 << (pcpu.0 % 64)) != 0),
        }
    }
}

/// What a pCPU does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The vCPU to run, or `None` to idle.
    pub vcpu: Option<VcpuId>,
    /// When to ask again (absolute time), at the latest: the slice end or the next
    /// tick. Blocking, yielding and wakeups that name this pCPU call for an earlier
    /// decision.
    pub until: Nanos,
    /// Other pCPUs that should decide again now (idle ones that can take queued
    /// work).
    pub kick: Vec<PcpuId>,
}

/// Errors from configuring a policy.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SchedError {
    /// The domain exists already.
    #[error("domain {0:?} exists already")]
    DomainExists(DomainId),
    /// No such domain.
    #[error("no domain {0:?}")]
    NoDomain(DomainId),
    /// The vCPU exists already.
    #[error("vCPU {0:?} exists already")]
    VcpuExists(VcpuId),
    /// No such vCPU.
    #[error("no vCPU {0:?}")]
    NoVcpu(VcpuId),
    /// A weight outside 1..=65535.
    #[error("weight {0} is outside 1..=65535")]
    BadWeight(u32),
    /// The affinity allows no pCPU of this scheduler.
    #[error("the affinity of vCPU {0:?} allows none of the pCPUs")]
    NoAllowedPcpu(VcpuId),
    /// The operation does not fit the vCPU's state (waking a running vCPU, blocking
    /// one that is not running, ...).
    #[error("vCPU {vcpu:?} cannot {op} in state {state}")]
    BadState {
        /// The vCPU.
        vcpu: VcpuId,
        /// The operation.
        op: &'static str,
        /// Its state.
        state: &'static str,
    },
}

/// The range of domain weights every policy accepts (Xen's).
pub const WEIGHTS: core::ops::RangeInclusive<u32> = 1..=65535;

/// `weight`, if it is inside [`WEIGHTS`].
pub fn check_weight(weight: u32) -> Result<u32, SchedError> {
    if WEIGHTS.contains(&weight) {
        Ok(weight)
    } else {
        Err(SchedError::BadWeight(weight))
    }
}

/// A scheduling policy: the calls a runtime or a simulator makes.
///
/// A vCPU is added blocked; [`Policy::wake`] makes it runnable. A pCPU asks
/// [`Policy::schedule`] what to run whenever its current vCPU blocks or yields, when
/// a wakeup names it, and at the time the last decision gave.
pub trait Policy {
    /// The policy's name, for reports.
    fn name(&self) -> &'static str;
    /// Add a domain with `weight` (1..=65535; Xen's default is 256) and `cap` (percent
    /// of one pCPU, 0 = none).
    fn add_domain(&mut self, dom: DomainId, weight: u32, cap: u32) -> Result<(), SchedError>;
    /// Add a blocked vCPU to `dom`.
    fn add_vcpu(
        &mut self,
        vcpu: VcpuId,
        dom: DomainId,
        affinity: Affinity,
    ) -> Result<(), SchedError>;
    /// The vCPU became runnable at `now`. Returns the pCPU that should decide again
    /// now (an idle one, or one whose current vCPU it should preempt).
    fn wake(&mut self, vcpu: VcpuId, now: Nanos) -> Result<Option<PcpuId>, SchedError>;
    /// The running vCPU blocked at `now`. Returns its pCPU, which must decide again.
    fn block(&mut self, vcpu: VcpuId, now: Nanos) -> Result<PcpuId, SchedError>;
    /// The running vCPU gave up the rest of its slice at `now`. Returns its pCPU,
    /// which must decide again.
    fn yield_now(&mut self, vcpu: VcpuId, now: Nanos) -> Result<PcpuId, SchedError>;
    /// What `pcpu` runs from `now`.
    fn schedule(&mut self, pcpu: PcpuId, now: Nanos) -> Decision;
    /// The vCPU `pcpu` is running.
    fn current(&self, pcpu: PcpuId) -> Option<VcpuId>;
    /// Number of pCPUs.
    fn pcpus(&self) -> u32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_masks() {
        let a = Affinity::only(&[PcpuId(1), PcpuId(70)]);
        assert!(a.allows(PcpuId(1)) && a.allows(PcpuId(70)));
        assert!(!a.allows(PcpuId(0)) && !a.allows(PcpuId(2)) && !a.allows(PcpuId(500)));
        assert!(Affinity::any().allows(PcpuId(1000)));
    }
}
