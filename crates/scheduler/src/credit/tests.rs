//! The credit policy on its own, and in the simulator's scenarios.

use super::*;
use crate::sim::{DomainSpec, Scenario, Workload};

fn credit(pcpus: u32) -> Credit {
    Credit::new(CreditParams::default(), pcpus)
}

#[test]
fn a_lone_vcpu_runs_and_blocks() {
    let mut s = credit(1);
    s.add_domain(DomainId(0), 256, 0).unwrap();
    s.add_vcpu(VcpuId(7), DomainId(0), Affinity::any()).unwrap();
    assert_eq!(s.wake(VcpuId(7), 0), Ok(Some(PcpuId(0))));
    let d = s.schedule(PcpuId(0), 0);
    assert_eq!(d.vcpu, Some(VcpuId(7)));
    assert_eq!(d.until, 10 * MS, "the next tick");
    assert_eq!(s.block(VcpuId(7), 5 * MS), Ok(PcpuId(0)));
    assert_eq!(s.schedule(PcpuId(0), 5 * MS).vcpu, None);
    s.check_invariants().unwrap();
}

#[test]
fn configuration_errors_are_reported() {
    let mut s = credit(2);
    assert_eq!(
        s.add_domain(DomainId(0), 0, 0),
        Err(SchedError::BadWeight(0))
    );
    assert_eq!(
        s.add_domain(DomainId(0), 70000, 0),
        Err(SchedError::BadWeight(70000))
    );
    s.add_domain(DomainId(0), 256, 0).unwrap();
    assert_eq!(
        s.add_domain(DomainId(0), 256, 0),
        Err(SchedError::DomainExists(DomainId(0)))
    );
    assert_eq!(
        s.add_vcpu(VcpuId(0), DomainId(9), Affinity::any()),
        Err(SchedError::NoDomain(DomainId(9)))
    );
    assert_eq!(
        s.add_vcpu(VcpuId(0), DomainId(0), Affinity::only(&[PcpuId(5)])),
        Err(SchedError::NoAllowedPcpu(VcpuId(0)))
    );
    s.add_vcpu(VcpuId(0), DomainId(0), Affinity::any()).unwrap();
    assert!(matches!(
        s.block(VcpuId(0), 0),
        Err(SchedError::BadState { op: "block", .. })
    ));
    s.wake(VcpuId(0), 0).unwrap();
    assert!(matches!(
        s.wake(VcpuId(0), 0),
        Err(SchedError::BadState { op: "wake", .. })
    ));
    assert_eq!(s.wake(VcpuId(3), 0), Err(SchedError::NoVcpu(VcpuId(3))));
}

#[test]
fn a_waking_vcpu_with_credit_is_boosted_and_preempts_a_hog_after_the_rate_limit() {
    let mut s = credit(1);
    s.add_domain(DomainId(0), 256, 0).unwrap();
    s.add_vcpu(VcpuId(0), DomainId(0), Affinity::any()).unwrap();
    s.add_vcpu(VcpuId(1), DomainId(0), Affinity::any()).unwrap();
    s.wake(VcpuId(0), 0).unwrap();
    assert_eq!(s.schedule(PcpuId(0), 0).vcpu, Some(VcpuId(0)));
    // Accounting at 30 ms gives both credit; vCPU 1 is blocked.
    let mut t = 0;
    while t < 40 * MS {
        t = s.schedule(PcpuId(0), t).until;
    }
    let (credit1, _) = s.credit(VcpuId(1)).unwrap();
    assert!(credit1 > 0, "the sleeper earned credit: {credit1}");
    // It wakes 0.5 ms into the hog's slice: BOOST, but the hog keeps the CPU until
    // the rate limit.
    let slice_start = t;
    s.schedule(PcpuId(0), slice_start);
    assert_eq!(s.wake(VcpuId(1), slice_start + MS / 2), Ok(Some(PcpuId(0))));
    assert_eq!(s.credit(VcpuId(1)).unwrap().1, Priority::Boost);
    let d = s.schedule(PcpuId(0), slice_start + MS / 2);
    s.check_invariants().unwrap();
    if d.vcpu == Some(VcpuId(0)) {
        assert!(d.until <= slice_start + MS, "{d:?}");
        assert_eq!(s.schedule(PcpuId(0), d.until).vcpu, Some(VcpuId(1)));
    }
    s.check_invariants().unwrap();
}

#[test]
fn affinity_is_hard() {
    let mut s = credit(2);
    s.add_domain(DomainId(0), 256, 0).unwrap();
    for v in 0..3 {
        s.add_vcpu(VcpuId(v), DomainId(0), Affinity::only(&[PcpuId(1)]))
            .unwrap();
        s.wake(VcpuId(v), 0).unwrap();
    }
    let mut t = 0;
    for _ in 0..100 {
        let d0 = s.schedule(PcpuId(0), t);
        assert_eq!(d0.vcpu, None, "pCPU 0 may never run them");
        let d1 = s.schedule(PcpuId(1), t);
        assert!(d1.vcpu.is_some());
        s.check_invariants().unwrap();
        t = d1.until.min(d0.until);
    }
}

fn shares(report: &crate::sim::Report) -> Vec<f64> {
    report.vcpus.iter().map(|v| v.share).collect()
}

#[test]
fn weights_1_2_4_on_one_pcpu() {
    let scenario = Scenario::new(1, 10_000 * MS)
        .domain(DomainSpec::new(100).hogs(1))
        .domain(DomainSpec::new(200).hogs(1))
        .domain(DomainSpec::new(400).hogs(1));
    let report = scenario.run(&mut credit(1)).unwrap();
    for v in &report.vcpus {
        assert!(
            (v.share - v.ideal).abs() <= 0.02 * v.ideal,
            "{:?}: share {} ideal {}",
            v.vcpu,
            v.share,
            v.ideal
        );
        // Per 1 s window, within 2 % of a pCPU (a window holds only 33 slices).
        for w in &v.window_shares {
            assert!(
                (w - v.ideal).abs() <= 0.02,
                "{:?} windows {:?}",
                v.vcpu,
                v.window_shares
            );
        }
    }
    // Round robin ignores weights.
    let rr = scenario
        .run(&mut crate::round_robin::RoundRobin::xen_slice(1))
        .unwrap();
    let s = shares(&rr);
    assert!((s[0] - s[2]).abs() < 0.02, "{s:?}");
}

#[test]
fn weights_on_two_pcpus() {
    let scenario = Scenario::new(2, 10_000 * MS)
        .domain(DomainSpec::new(256).hogs(1))
        .domain(DomainSpec::new(256).hogs(1))
        .domain(DomainSpec::new(512).hogs(1))
        .domain(DomainSpec::new(1024).hogs(1));
    let report = scenario.run(&mut credit(2)).unwrap();
    let ideal: Vec<f64> = report.vcpus.iter().map(|v| v.ideal).collect();
    assert_eq!(ideal, vec![0.25, 0.25, 0.5, 1.0]);
    for v in &report.vcpus {
        assert!(
            (v.share - v.ideal).abs() <= 0.01,
            "{:?}: {} vs {} ({:?})",
            v.vcpu,
            v.share,
            v.ideal,
            report.vcpus.iter().map(|v| v.share).collect::<Vec<_>>()
        );
    }
}

#[test]
fn a_cap_of_50_percent_holds_even_on_an_idle_machine() {
    let scenario = Scenario::new(1, 10_000 * MS).domain(DomainSpec::new(256).cap(50).hogs(1));
    let report = scenario.run(&mut credit(1)).unwrap();
    let v = &report.vcpus[0];
    assert_eq!(v.ideal, 0.5);
    assert!((v.share - 0.5).abs() <= 0.02 * 0.5, "share {}", v.share);
}

#[test]
fn a_tick_dodger_gets_no_free_cpu() {
    let scenario = Scenario::new(1, 10_000 * MS)
        .domain(DomainSpec::new(256).hogs(1))
        .domain(DomainSpec::new(256).vcpu(Workload::TickDodger {
            tick: 10 * MS,
            margin: 100_000,
        }));
    let report = scenario.run(&mut credit(1)).unwrap();
    let dodger = &report.vcpus[1];
    assert!(
        dodger.share <= 0.5 * 1.02,
        "the dodger got {}",
        dodger.share
    );
    assert!(
        report.vcpus[0].share >= 0.5 * 0.98,
        "{}",
        report.vcpus[0].share
    );
}

#[test]
fn boost_keeps_an_io_bound_vcpu_responsive_among_hogs() {
    // Three hogs on two pCPUs hover around zero credit, UNDER part of the time:
    // without BOOST the waking vCPU queues behind them.
    let scenario = Scenario::new(2, 10_000 * MS)
        .domain(DomainSpec::new(256).hogs(3))
        .domain(DomainSpec::new(256).vcpu(Workload::IoBound {
            run: MS / 2,
            sleep: 9 * MS,
        }));
    let params = CreditParams::default();
    let with = scenario.run(&mut Credit::new(params, 2)).unwrap();
    let without = scenario
        .run(&mut Credit::new(
            CreditParams {
                boost: false,
                ..params
            },
            2,
        ))
        .unwrap();
    let io_with = with.vcpus[3].wake_latency;
    let io_without = without.vcpus[3].wake_latency;
    assert!(
        io_with.p99 <= params.ratelimit + MS,
        "with boost: {io_with:?}"
    );
    assert!(
        io_without.p99 > params.ratelimit + MS,
        "without boost: {io_without:?}"
    );
    // And it gets all the CPU it asks for.
    assert!((with.vcpus[3].share - with.vcpus[3].ideal).abs() <= 0.02 * with.vcpus[3].ideal);
}

#[test]
fn random_operation_sequences_keep_the_invariants() {
    for seed in 1..=300u64 {
        let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let pcpus = 1 + rng.u64(..4) as u32;
        let params = CreditParams {
            boost: rng.u64(..2) == 0,
            ..CreditParams::default()
        };
        let mut s = Credit::new(params, pcpus);
        let domains = 1 + rng.u64(..4) as u32;
        for d in 0..domains {
            let cap = if rng.u64(..3) == 0 {
                10 + rng.u64(..150) as u32
            } else {
                0
            };
            // Weights within a factor of 10, so that every vCPU's fair share is large
            // enough to show up in the liveness window below.
            s.add_domain(DomainId(d), 100 + rng.u64(..901) as u32, cap)
                .unwrap();
        }
        let vcpus = 1 + rng.u64(..12) as u32;
        for v in 0..vcpus {
            let affinity = if rng.u64(..3) == 0 {
                Affinity::only(&[PcpuId(rng.u64(..u64::from(pcpus)) as u32)])
            } else {
                Affinity::any()
            };
            s.add_vcpu(
                VcpuId(v),
                DomainId(rng.u64(..u64::from(domains)) as u32),
                affinity,
            )
            .unwrap();
        }
        let mut now: Nanos = 0;
        for step in 0..400 {
            now += rng.u64(..4 * MS);
            let v = VcpuId(rng.u64(..u64::from(vcpus)) as u32);
            let result = match rng.u64(..4) {
                0 => s.wake(v, now).map(|_| ()),
                1 => s.block(v, now).map(|_| ()),
                2 => s.yield_now(v, now).map(|_| ()),
                _ => {
                    let p = PcpuId(rng.u64(..u64::from(pcpus)) as u32);
                    let d = s.schedule(p, now);
                    assert!(d.until > now, "seed {seed} step {step}: {d:?} at {now}");
                    if let Some(r) = d.vcpu {
                        assert_eq!(s.current(p), Some(r));
                    }
                    Ok(())
                }
            };
            // Operations on the wrong state are refused, never half done.
            if let Err(e) = result {
                assert!(matches!(e, SchedError::BadState { .. }), "seed {seed}: {e}");
            }
            if let Err(e) = s.check_invariants() {
                panic!("seed {seed} step {step}: {e}");
            }
        }
        // Liveness: with no more wakes or blocks, every runnable vCPU that is not
        // parked by its cap gets to run (its fair share is at least 1/111 of a pCPU).
        let mut ran = std::collections::HashSet::new();
        let end = now + 20_000 * MS;
        let mut until = vec![now; pcpus as usize];
        while now < end {
            for p in 0..pcpus {
                if until[p as usize] <= now {
                    let d = s.schedule(PcpuId(p), now);
                    until[p as usize] = d.until;
                    ran.extend(d.vcpu);
                }
            }
            now = *until.iter().min().unwrap();
            s.check_invariants().unwrap();
        }
        for v in 0..vcpus {
            let id = VcpuId(v);
            let idx = s.vcpu_index[&id];
            let state = s.vcpus[idx].state;
            if matches!(state, State::Queued(_) | State::Running(_)) {
                assert!(
                    ran.contains(&id),
                    "seed {seed}: {id:?} ({state:?}) starved; {:#?} {:?}",
                    s.vcpus,
                    s.pcpus
                );
            }
        }
    }
}
