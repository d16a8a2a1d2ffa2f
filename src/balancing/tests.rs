use super::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// A VM that reports a fixed use (or none) and records what it may keep.
struct Fake {
    used: Option<u64>,
    requests: AtomicU64,
    kept: AtomicU64,
}

impl Fake {
    fn new(used: Option<u64>) -> Arc<Fake> {
        Arc::new(Fake {
            used,
            requests: AtomicU64::new(0),
            kept: AtomicU64::new(u64::MAX),
        })
    }
}

impl BalancedVm for Fake {
    fn request_report(&self) {
        self.requests.fetch_add(1, Ordering::SeqCst);
    }
    fn report(&self) -> Option<VmReport> {
        Some(VmReport { used: self.used? })
    }
    fn keep(&self, pages: u64) {
        self.kept.store(pages, Ordering::SeqCst);
    }
}

fn stats(entries: &[(u16, u64)]) -> BalloonStats {
    BalloonStats {
        entries: entries.to_vec(),
        ..BalloonStats::default()
    }
}

#[test]
fn use_is_ram_less_the_balloon_and_what_is_available() {
    let mib = 1 << 20;
    // 256 MiB of RAM, 64 MiB in the balloon, 100 MiB available (20 free): 92 MiB used,
    // whatever the guest says its total is.
    for total in [240 * mib, 176 * mib] {
        let s = stats(&[
            (tag::FREE_MEMORY, 20 * mib),
            (tag::TOTAL_MEMORY, total),
            (tag::AVAILABLE_MEMORY, 100 * mib),
        ]);
        assert_eq!(used_from_stats(&s, 65_536, 16_384), Some(92 * 256));
    }
    // Without an available figure, free memory counts.
    let s = stats(&[(tag::FREE_MEMORY, 20 * mib)]);
    assert_eq!(used_from_stats(&s, 65_536, 16_384), Some(172 * 256));
    // Without either, no report; figures past the RAM give 0, not an underflow.
    assert_eq!(
        used_from_stats(&stats(&[(tag::TOTAL_MEMORY, mib)]), 65_536, 0),
        None
    );
    let s = stats(&[(tag::AVAILABLE_MEMORY, u64::MAX)]);
    assert_eq!(used_from_stats(&s, 65_536, 70_000), Some(0));
}

#[test]
fn the_balloon_holds_what_the_vm_may_not_keep() {
    assert_eq!(balloon_target(65_536, 16_384), 49_152);
    assert_eq!(balloon_target(65_536, 65_536), 0);
    assert_eq!(balloon_target(65_536, 100_000), 0);
    assert_eq!(balloon_target(u64::MAX, 0), u32::MAX);
}

#[test]
fn the_runtime_sets_each_vm_to_its_use_plus_headroom_and_stops_when_dropped() {
    let small = Fake::new(Some(10_000));
    let large = Fake::new(Some(40_000));
    let silent = Fake::new(None);
    let limits = VmLimits {
        floor: 4_096,
        ceiling: 65_536,
    };
    let balancing = Balancing::start(
        BalancingConfig {
            policy: BalancerConfig::default(),
            period: Duration::from_millis(5),
            budget_pages: 3 * 65_536,
            pressure: HostPressure::Fixed(0.0),
        },
        vec![
            (small.clone() as Arc<dyn BalancedVm>, limits),
            (large.clone(), limits),
            (silent.clone(), limits),
        ],
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while balancing.steps() < 3 {
        assert!(Instant::now() < deadline, "the balancer did not step");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Use plus 20 % headroom; a VM that never reported keeps all it has.
    assert_eq!(small.kept.load(Ordering::SeqCst), 12_000);
    assert_eq!(large.kept.load(Ordering::SeqCst), 48_000);
    assert_eq!(silent.kept.load(Ordering::SeqCst), 65_536);
    let last = balancing.last_step().unwrap();
    assert_eq!(last.targets, [12_000, 48_000, 65_536]);
    assert_eq!(last.reports[2], None);
    // Every VM was asked for a report before each step.
    assert!(small.requests.load(Ordering::SeqCst) > balancing.steps());
    // Held, it takes no step; let go, it steps again.
    balancing.pause();
    let held = balancing.steps();
    std::thread::sleep(Duration::from_millis(40));
    assert_eq!(balancing.steps(), held, "a step while paused");
    balancing.resume();
    let deadline = Instant::now() + Duration::from_secs(20);
    while balancing.steps() == held {
        assert!(Instant::now() < deadline, "no step after the resume");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Dropped while paused, it still stops.
    balancing.pause();
    drop(balancing);
    let after = small.requests.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(small.requests.load(Ordering::SeqCst), after);
}
