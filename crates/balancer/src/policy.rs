//! The balancer: balloon targets from reported use and host pressure. All quantities
//! are in 4 KiB pages.

/// A VM's bounds: its target never goes below `floor` nor above `ceiling` (its RAM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmLimits {
    /// Pages the VM always keeps.
    pub floor: u64,
    /// Pages the VM has (its RAM): the most it can keep.
    pub ceiling: u64,
}

/// What a VM reports each step (its balloon statistics, or a PV guest's report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmReport {
    /// Pages the guest uses: its RAM minus what it reports free (page cache it could
    /// drop counts as used: dropping it costs the guest I/O).
    pub used: u64,
}

/// What the host reports each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostReport {
    /// Pages the host can give the VMs in all.
    pub budget: u64,
    /// Memory pressure from 0 (none) to 1 (the host is thrashing); see
    /// [`crate::psi::Pressure::level`].
    pub pressure: f64,
}

/// The policy's knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalancerConfig {
    /// How fast the estimate follows a fall in use, per step (0 to 1): the estimate
    /// moves this fraction of the way down. A rise is followed at once.
    pub decay: f64,
    /// Headroom over the estimate without host pressure (0.2: 20 % more).
    pub headroom: f64,
    /// The smallest change of a target worth a balloon operation, in pages; smaller
    /// changes wait (unless the VM uses more than its target and the change gives it
    /// more).
    pub step: u64,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            decay: 0.2,
            headroom: 0.2,
            step: 256,
        }
    }
}

/// One VM as the balancer sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Vm {
    limits: VmLimits,
    /// The working-set estimate, in pages (`None` until the first report).
    estimate: Option<f64>,
    /// The current target.
    target: u64,
}

impl Vm {
    fn estimate(&self) -> f64 {
        self.estimate.unwrap_or(self.limits.ceiling as f64)
    }
}

/// The balancer: call [`Balancer::step`] with fresh reports; it returns each VM's
/// target. Deterministic: the same reports give the same targets.
#[derive(Debug, Clone)]
pub struct Balancer {
    config: BalancerConfig,
    vms: Vec<Vm>,
}

impl Balancer {
    /// A balancer for VMs with `limits` (a floor above its ceiling is lowered to it);
    /// every VM starts at its ceiling.
    pub fn new(config: BalancerConfig, limits: &[VmLimits]) -> Self {
        let vms = limits
            .iter()
            .map(|l| {
                let limits = VmLimits {
                    floor: l.floor.min(l.ceiling),
                    ceiling: l.ceiling,
                };
                Vm {
                    limits,
                    estimate: None,
                    target: limits.ceiling,
                }
            })
            .collect();
        Balancer { config, vms }
    }

    /// The current targets.
    pub fn targets(&self) -> Vec<u64> {
        self.vms.iter().map(|v| v.target).collect()
    }

    /// The working-set estimates, in pages (a VM not yet reported counts as using
    /// all it has).
    pub fn estimates(&self) -> Vec<f64> {
        self.vms.iter().map(Vm::estimate).collect()
    }

    /// One step: update each VM's estimate from `reports` (one per VM, in order; a
    /// missing report leaves its VM as it was) and return the targets.
    pub fn step(&mut self, host: &HostReport, reports: &[VmReport]) -> Vec<u64> {
        let reports: Vec<Option<VmReport>> = reports.iter().copied().map(Some).collect();
        self.step_some(host, &reports)
    }

    /// [`Balancer::step`] where any VM may have no report this time (`None`, or past
    /// the end of `reports`): its estimate stays as it was.
    pub fn step_some(&mut self, host: &HostReport, reports: &[Option<VmReport>]) -> Vec<u64> {
        let pressure = if host.pressure.is_finite() {
            host.pressure.clamp(0.0, 1.0)
        } else {
            1.0
        };
        let decay = self.config.decay.clamp(0.0, 1.0);
        // Under pressure the estimate falls faster and the headroom shrinks.
        let decay = decay + (1.0 - decay) * pressure * 0.5;
        let headroom = self.config.headroom.max(0.0) * (1.0 - pressure);
        for (vm, report) in self
            .vms
            .iter_mut()
            .zip(reports)
            .filter_map(|(vm, r)| Some((vm, r.as_ref()?)))
        {
            let used = report.used.min(vm.limits.ceiling) as f64;
            vm.estimate = Some(match vm.estimate {
                Some(e) if used < e => e - decay * (e - used),
                // The first report, or a rise: taken at once.
                _ => used,
            });
        }
        let needs: Vec<u64> = self
            .vms
            .iter()
            .map(|vm| {
                let need = (vm.estimate() * (1.0 + headroom)).ceil() as u64;
                need.clamp(vm.limits.floor, vm.limits.ceiling)
            })
            .collect();
        let proposed = fit_budget(&self.vms, &needs, host.budget);
        for ((vm, new), report) in self
            .vms
            .iter_mut()
            .zip(proposed)
            .zip(reports.iter().copied().chain(std::iter::repeat(None)))
        {
            // A VM using more than its target gets any increase at once; other
            // changes wait until they are worth a balloon operation.
            let starved = report.is_some_and(|r| r.used > vm.target) && new > vm.target;
            if vm.target.abs_diff(new) >= self.config.step || starved {
                vm.target = new;
            }
        }
        self.targets()
    }
}

/// Scale `needs` down to `budget` when they do not fit: every VM keeps its floor, and
/// what the budget has above the floors is shared in proportion to what each needs
/// above its floor. (If the floors alone exceed the budget, the floors it is.)
fn fit_budget(vms: &[Vm], needs: &[u64], budget: u64) -> Vec<u64> {
    let total: u64 = needs.iter().sum();
    if total <= budget {
        return needs.to_vec();
    }
    let floors: u64 = vms.iter().map(|v| v.limits.floor).sum();
    let spare = budget.saturating_sub(floors) as f64;
    let wanted: u64 = vms.iter().zip(needs).map(|(v, n)| n - v.limits.floor).sum();
    vms.iter()
        .zip(needs)
        .map(|(v, n)| {
            let share = if wanted == 0 {
                0.0
            } else {
                spare * (n - v.limits.floor) as f64 / wanted as f64
            };
            v.limits.floor + share.floor() as u64
        })
        .collect()
}

#[cfg(test)]
mod tests;
