//! A simulator of VMs whose working sets rise and fall, to measure the balancer against
//! static allocation: host memory the VMs hold over time, and what the guests went
//! without.
//!
//! The model, one step a second:
//! - each VM's working set follows its [`Phase`]s, out of phase with the others;
//! - a guest uses its working set, up to its target: what it needs above the target
//!   is a *shortfall* (the guest would reclaim or swap), counted in page-steps;
//! - statically allocated, a VM holds the most it ever touched (a guest does not give
//!   memory back by itself); balanced, it holds its target, or less while it has not
//!   touched that much yet.
//!
//! ```
//! use vmcraft_balancer::policy::BalancerConfig;
//! use vmcraft_balancer::sim::{Phase, Simulation};
//!
//! // Two VMs of 65,536 pages taking turns: 60,000 pages for 30 steps, then 5,000.
//! let busy = Phase { pages: 60_000, steps: 30 };
//! let idle = Phase { pages: 5_000, steps: 30 };
//! let vms = [vec![busy, idle], vec![idle, busy]];
//! let sim = Simulation { ceiling: 65_536, floor: 4_096, budget: 131_072, steps: 240 };
//! let r = sim.run(BalancerConfig::default(), &vms);
//! assert!(r.balanced_mean < 0.8 * r.static_mean);
//! ```

use crate::policy::{Balancer, BalancerConfig, HostReport, VmLimits, VmReport};

/// A stretch of a VM's life: it needs `pages` for `steps` steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phase {
    /// The working set, in pages.
    pub pages: u64,
    /// How long, in steps.
    pub steps: u64,
}

/// The simulated host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Simulation {
    /// Each VM's RAM, in pages.
    pub ceiling: u64,
    /// Each VM's floor, in pages.
    pub floor: u64,
    /// The host's budget for all VMs, in pages.
    pub budget: u64,
    /// Steps to run.
    pub steps: u64,
}

/// One step's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The step.
    pub step: u64,
    /// Pages the VMs hold with static allocation.
    pub static_pages: u64,
    /// Pages the VMs hold with the balancer.
    pub balanced_pages: u64,
    /// Each VM's working set this step.
    pub working_sets: Vec<u64>,
    /// Each VM's target this step.
    pub targets: Vec<u64>,
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct SimReport {
    /// Every step.
    pub samples: Vec<Sample>,
    /// The most pages held at once, statically allocated.
    pub static_peak: u64,
    /// The most pages held at once, balanced.
    pub balanced_peak: u64,
    /// The mean pages held, statically allocated.
    pub static_mean: f64,
    /// The mean pages held, balanced.
    pub balanced_mean: f64,
    /// Page-steps the guests needed above their targets.
    pub shortfall: u64,
    /// Target changes (balloon operations).
    pub changes: u64,
}

/// The working set of a VM following `phases` (repeated) at `step`.
pub fn working_set(phases: &[Phase], step: u64) -> u64 {
    let period: u64 = phases.iter().map(|p| p.steps).sum();
    if period == 0 {
        return 0;
    }
    let mut t = step % period;
    for p in phases {
        if t < p.steps {
            return p.pages;
        }
        t -= p.steps;
    }
    0
}

impl Simulation {
    /// Run VMs following `vms` (one list of phases each) under the balancer with
    /// `config`.
    pub fn run(&self, config: BalancerConfig, vms: &[Vec<Phase>]) -> SimReport {
        let limits = vec![
            VmLimits {
                floor: self.floor,
                ceiling: self.ceiling,
            };
            vms.len()
        ];
        let mut balancer = Balancer::new(config, &limits);
        let host = HostReport {
            budget: self.budget,
            pressure: 0.0,
        };
        let mut touched = vec![0u64; vms.len()];
        let mut targets = balancer.targets();
        let (mut shortfall, mut changes) = (0, 0);
        let mut samples = Vec::with_capacity(self.steps as usize);
        for step in 0..self.steps {
            let ws: Vec<u64> = vms
                .iter()
                .map(|p| working_set(p, step).min(self.ceiling))
                .collect();
            // The guests use what they need, up to their targets.
            let used: Vec<u64> = ws.iter().zip(&targets).map(|(w, t)| *w.min(t)).collect();
            shortfall += ws.iter().zip(&used).map(|(w, u)| w - u).sum::<u64>();
            for (t, u) in touched.iter_mut().zip(&ws) {
                *t = (*t).max(*u);
            }
            let reports: Vec<VmReport> = ws.iter().map(|&w| VmReport { used: w }).collect();
            let new = balancer.step(&host, &reports);
            changes += new.iter().zip(&targets).filter(|(a, b)| a != b).count() as u64;
            targets = new;
            let balanced: u64 = targets.iter().zip(&touched).map(|(t, m)| *t.min(m)).sum();
            samples.push(Sample {
                step,
                static_pages: touched.iter().sum(),
                balanced_pages: balanced,
                working_sets: ws,
                targets: targets.clone(),
            });
        }
        let n = samples.len().max(1) as f64;
        SimReport {
            static_peak: samples.iter().map(|s| s.static_pages).max().unwrap_or(0),
            balanced_peak: samples.iter().map(|s| s.balanced_pages).max().unwrap_or(0),
            static_mean: samples.iter().map(|s| s.static_pages as f64).sum::<f64>() / n,
            balanced_mean: samples.iter().map(|s| s.balanced_pages as f64).sum::<f64>() / n,
            shortfall,
            changes,
            samples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Eight VMs of 65,536 pages (256 MiB) whose working sets rise to 56,000 pages
    /// and fall to 8,000, each a quarter of a period out of phase with the next.
    fn out_of_phase() -> Vec<Vec<Phase>> {
        (0..8)
            .map(|i| {
                let mut p = vec![
                    Phase {
                        pages: 56_000,
                        steps: 30,
                    },
                    Phase {
                        pages: 8_000,
                        steps: 90,
                    },
                ];
                // Start each VM at another point of its period.
                let shift = 15 * i as u64 % 120;
                if shift > 0 {
                    p.insert(
                        0,
                        Phase {
                            pages: 8_000,
                            steps: shift,
                        },
                    );
                    p[2].steps -= shift.min(p[2].steps);
                }
                p
            })
            .collect()
    }

    #[test]
    fn the_balancer_holds_far_less_than_static_allocation_at_little_cost() {
        let sim = Simulation {
            ceiling: 65_536,
            floor: 4_096,
            budget: 8 * 65_536,
            steps: 600,
        };
        let r = sim.run(BalancerConfig::default(), &out_of_phase());
        eprintln!(
            "static mean {:.0} peak {}, balanced mean {:.0} peak {}, shortfall {}, changes {}",
            r.static_mean, r.static_peak, r.balanced_mean, r.balanced_peak, r.shortfall, r.changes
        );
        // Static allocation ends up holding every VM's peak.
        assert_eq!(r.static_peak, 8 * 56_000);
        assert!(
            r.balanced_mean < 0.6 * r.static_mean,
            "balanced {} vs static {}",
            r.balanced_mean,
            r.static_mean
        );
        // A rise is given at once (the next step), so the guests go short for one
        // step per rise at most.
        let rises = 600 / 120 * 8 + 8;
        assert!(r.shortfall <= rises * 56_000, "shortfall {}", r.shortfall);
        // Not a balloon operation per VM per step.
        assert!(r.changes < 600 * 8 / 4, "{} changes", r.changes);
    }

    #[test]
    fn working_sets_repeat_their_phases() {
        let p = [Phase { pages: 1, steps: 2 }, Phase { pages: 5, steps: 1 }];
        let ws: Vec<u64> = (0..7).map(|s| working_set(&p, s)).collect();
        assert_eq!(ws, [1, 1, 5, 1, 1, 5, 1]);
        assert_eq!(working_set(&[], 3), 0);
    }
}
