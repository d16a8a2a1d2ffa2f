//! Properties of the policy, over many random VMs, reports and hosts (a fixed-seed
//! generator: every run checks the same cases).

use super::*;

/// A random case: limits for 1 to 8 VMs, a host budget, a pressure.
fn case(rng: &mut fastrand::Rng) -> (Vec<VmLimits>, HostReport) {
    let n = 1 + rng.u64(..8) as usize;
    let limits: Vec<VmLimits> = (0..n)
        .map(|_| {
            let ceiling = 1024 + rng.u64(..262_144);
            VmLimits {
                floor: rng.u64(..ceiling + 1),
                ceiling,
            }
        })
        .collect();
    let total: u64 = limits.iter().map(|l| l.ceiling).sum();
    let pressure = match rng.u64(..4) {
        0 => 0.0,
        1 => 1.0,
        _ => rng.f64(),
    };
    (
        limits,
        HostReport {
            budget: rng.u64(..total + total / 2),
            pressure,
        },
    )
}

fn reports(rng: &mut fastrand::Rng, limits: &[VmLimits]) -> Vec<VmReport> {
    limits
        .iter()
        .map(|l| VmReport {
            // Sometimes more than the VM has (a lying guest).
            used: rng.u64(..l.ceiling + l.ceiling / 4),
        })
        .collect()
}

#[test]
fn targets_stay_within_each_floor_and_ceiling() {
    let mut rng = fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15);
    for _ in 0..500 {
        let (limits, mut host) = case(&mut rng);
        let mut b = Balancer::new(BalancerConfig::default(), &limits);
        for step in 0..50 {
            if step % 7 == 0 {
                host.pressure = [f64::NAN, -1.0, 2.0, rng.f64()][rng.u64(..4) as usize];
            }
            let t = b.step(&host, &reports(&mut rng, &limits));
            for (t, l) in t.iter().zip(&limits) {
                assert!(l.floor <= *t && *t <= l.ceiling, "{t} outside {l:?}");
            }
        }
    }
}

#[test]
fn targets_fit_the_budget_when_the_floors_do() {
    let mut rng = fastrand::Rng::with_seed(0x1234_5678_9abc_def1);
    let config = BalancerConfig::default();
    for _ in 0..500 {
        let (limits, host) = case(&mut rng);
        let floors: u64 = limits.iter().map(|l| l.floor).sum();
        if floors > host.budget {
            continue;
        }
        let mut b = Balancer::new(config, &limits);
        for _ in 0..50 {
            let t = b.step(&host, &reports(&mut rng, &limits));
            // A target may stay above its share by less than one step (a change too
            // small to be worth a balloon operation), or follow a starved VM's use.
            let slack = config.step * limits.len() as u64;
            let total: u64 = t.iter().sum();
            assert!(
                total <= host.budget + slack,
                "{total} pages given, budget {}",
                host.budget
            );
        }
    }
}

/// Once the reports stop changing, the targets settle: within 100 steps nothing moves
/// any more, and on the way each target changes direction at most twice (its own
/// estimate only falls; over budget, a VM's share can first grow while the others'
/// needs fall faster, until the needs fit).
#[test]
fn targets_settle_once_reports_stop_changing() {
    let mut rng = fastrand::Rng::with_seed(0xdead_beef_cafe_f00d);
    for _ in 0..300 {
        let (limits, host) = case(&mut rng);
        let mut b = Balancer::new(BalancerConfig::default(), &limits);
        for _ in 0..20 {
            b.step(&host, &reports(&mut rng, &limits));
        }
        let r = reports(&mut rng, &limits);
        let history: Vec<Vec<u64>> = (0..200).map(|_| b.step(&host, &r)).collect();
        assert_eq!(history[100], history[199], "{limits:?} {r:?} {host:?}");
        for vm in 0..limits.len() {
            let seq: Vec<u64> = history.iter().map(|t| t[vm]).collect();
            let moves: Vec<bool> = seq
                .windows(2)
                .filter(|w| w[0] != w[1])
                .map(|w| w[1] > w[0])
                .collect();
            let reversals = moves.windows(2).filter(|m| m[0] != m[1]).count();
            assert!(
                reversals <= 2,
                "VM {vm} reversed {reversals} times: {seq:?}"
            );
        }
    }
}

#[test]
fn a_rise_is_followed_at_once_a_fall_slowly() {
    let limits = [VmLimits {
        floor: 0,
        ceiling: 100_000,
    }];
    let host = HostReport {
        budget: 1_000_000,
        pressure: 0.0,
    };
    let mut b = Balancer::new(BalancerConfig::default(), &limits);
    b.step(&host, &[VmReport { used: 10_000 }]);
    assert_eq!(b.estimates()[0], 10_000.0);
    assert_eq!(b.step(&host, &[VmReport { used: 50_000 }])[0], 60_000);
    // Back down: 20 % of the way per step.
    b.step(&host, &[VmReport { used: 10_000 }]);
    assert_eq!(b.estimates()[0], 42_000.0);
}

#[test]
fn pressure_shrinks_the_headroom_and_speeds_the_fall() {
    let limits = [VmLimits {
        floor: 0,
        ceiling: 100_000,
    }];
    let calm = HostReport {
        budget: 1_000_000,
        pressure: 0.0,
    };
    let pressed = HostReport {
        pressure: 1.0,
        ..calm
    };
    let mut b = Balancer::new(BalancerConfig::default(), &limits);
    assert_eq!(b.step(&calm, &[VmReport { used: 50_000 }])[0], 60_000);
    assert_eq!(b.step(&pressed, &[VmReport { used: 50_000 }])[0], 50_000);
    // Under full pressure the estimate falls 60 % of the way per step, not 20 %.
    b.step(&pressed, &[VmReport { used: 0 }]);
    assert!((b.estimates()[0] - 20_000.0).abs() < 1e-6);
}

#[test]
fn small_changes_wait_unless_the_vm_is_starved() {
    let limits = [VmLimits {
        floor: 0,
        ceiling: 100_000,
    }];
    let host = HostReport {
        budget: 1_000_000,
        pressure: 1.0,
    };
    let mut b = Balancer::new(BalancerConfig::default(), &limits);
    assert_eq!(b.step(&host, &[VmReport { used: 50_000 }])[0], 50_000);
    // 100 pages more is below the 256-page step, but the VM uses more than it has.
    assert_eq!(b.step(&host, &[VmReport { used: 50_100 }])[0], 50_100);
    // 100 pages less waits.
    assert_eq!(b.step(&host, &[VmReport { used: 49_800 }])[0], 50_100);
}

#[test]
fn an_overcommitted_host_shares_what_is_above_the_floors() {
    let limits = [
        VmLimits {
            floor: 10_000,
            ceiling: 100_000,
        },
        VmLimits {
            floor: 10_000,
            ceiling: 100_000,
        },
    ];
    let host = HostReport {
        budget: 60_000,
        pressure: 1.0,
    };
    let mut b = Balancer::new(BalancerConfig::default(), &limits);
    // Needs of 90,000 and 30,000: 40,000 spare shared 80:20 above the floors.
    let t = b.step(
        &host,
        &[VmReport { used: 90_000 }, VmReport { used: 30_000 }],
    );
    assert_eq!(t, [10_000 + 32_000, 10_000 + 8_000]);
    // Floors above the budget: the floors.
    let tight = HostReport {
        budget: 5_000,
        ..host
    };
    let mut b = Balancer::new(BalancerConfig::default(), &limits);
    assert_eq!(
        b.step(
            &tight,
            &[VmReport { used: 90_000 }, VmReport { used: 30_000 }]
        ),
        [10_000, 10_000]
    );
}
