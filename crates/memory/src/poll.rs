//! Adaptive polling of a ring in guest memory before its consumer thread sleeps.
//!
//! A device thread that has just served a ring often finds the guest's next request a
//! few microseconds later. Sleeping until the guest notifies costs a context switch each
//! way on the host and a notification (an exit) in the guest; spinning on the ring for
//! a short while costs neither when the request comes. [`AdaptivePoll`] decides how long
//! to spin, the way KVM's halt polling does:
//!
//! * the window starts at zero, so a device that is never busy never spins;
//! * when the thread wakes less than the maximum window after it went to sleep
//!   (polling would have caught that request), the window doubles, from
//!   [`AdaptivePoll::START`] up to the maximum;
//! * when a poll runs out its window without finding work, the window halves, and
//!   drops to zero below [`AdaptivePoll::START`].
//!
//! So spinning is bounded per sleep by the maximum window, and a guest that goes idle
//! costs at most one window before the thread sleeps for good. The policy is plain code
//! ([`AdaptivePoll::after_sleep`], [`AdaptivePoll::after_miss`]); the time comes in.
//!
//! ```
//! use std::time::Duration;
//! use vmcraft_memory::poll::AdaptivePoll;
//!
//! let mut poll = AdaptivePoll::new(Duration::from_micros(50));
//! assert_eq!(poll.window(), Duration::ZERO); // never busy yet: no spinning
//! poll.after_sleep(Duration::from_micros(3)); // woken soon after it slept
//! assert_eq!(poll.window(), AdaptivePoll::START);
//! let mut checks = 0;
//! assert!(poll.poll(|| { checks += 1; checks == 3 })); // work on the third check
//! ```

use std::time::{Duration, Instant};

/// The spin window of one ring consumer; see the [module](self) documentation.
#[derive(Debug, Clone)]
pub struct AdaptivePoll {
    window: Duration,
    max: Duration,
    slept_at: Option<Instant>,
    stats: PollStats,
}

/// What an [`AdaptivePoll`] did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollStats {
    /// Polls that found work within their window.
    pub hits: u64,
    /// Polls that ran out their window.
    pub misses: u64,
    /// Time spent spinning, found work or not.
    pub spun: Duration,
}

impl AdaptivePoll {
    /// The first non-zero window.
    pub const START: Duration = Duration::from_micros(2);
    /// The default maximum window, a little more than a sleep and wake-up cost the
    /// device threads on nested KVM (a few microseconds each way) and far below a
    /// scheduler tick.
    pub const DEFAULT_MAX: Duration = Duration::from_micros(50);

    /// A policy whose window never exceeds `max` (zero: never spin).
    pub fn new(max: Duration) -> Self {
        AdaptivePoll {
            window: Duration::ZERO,
            max,
            slept_at: None,
            stats: PollStats::default(),
        }
    }

    /// A policy that never spins.
    pub fn off() -> Self {
        Self::new(Duration::ZERO)
    }

    /// The current window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The maximum window.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// What this policy did so far.
    pub fn stats(&self) -> PollStats {
        self.stats
    }

    /// Spin until `ready` returns true (returns true) or the window passes (returns
    /// false, and the window shrinks). `ready` is called at least once unless the
    /// window is zero.
    pub fn poll(&mut self, mut ready: impl FnMut() -> bool) -> bool {
        if self.window.is_zero() {
            return false;
        }
        let start = Instant::now();
        loop {
            if ready() {
                self.stats.hits += 1;
                self.stats.spun += start.elapsed();
                return true;
            }
            let spun = start.elapsed();
            if spun >= self.window {
                self.stats.misses += 1;
                self.stats.spun += spun;
                self.after_miss();
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// The thread is about to sleep until the guest notifies it.
    pub fn sleeping(&mut self) {
        if !self.max.is_zero() {
            self.slept_at = Some(Instant::now());
        }
    }

    /// The thread woke up (call it first thing): adapts to how long it slept.
    pub fn woke(&mut self) {
        if let Some(at) = self.slept_at.take() {
            self.after_sleep(at.elapsed());
        }
    }

    /// The policy after sleeping for `slept`: grow if a window of the maximum would have
    /// caught the wake-up.
    pub fn after_sleep(&mut self, slept: Duration) {
        if slept < self.max {
            self.window = (self.window * 2).clamp(Self::START.min(self.max), self.max);
        }
    }

    /// The policy after a poll ran out its window.
    pub fn after_miss(&mut self) {
        self.window /= 2;
        if self.window < Self::START {
            self.window = Duration::ZERO;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(50);

    #[test]
    fn the_window_grows_on_short_sleeps_up_to_the_maximum() {
        let mut p = AdaptivePoll::new(MAX);
        let mut seen = Vec::new();
        for _ in 0..10 {
            p.after_sleep(Duration::from_micros(1));
            seen.push(p.window().as_micros());
        }
        assert_eq!(seen, [2, 4, 8, 16, 32, 50, 50, 50, 50, 50]);
    }

    #[test]
    fn long_sleeps_do_not_grow_it_and_misses_shrink_it_to_zero() {
        let mut p = AdaptivePoll::new(MAX);
        p.after_sleep(MAX);
        assert_eq!(p.window(), Duration::ZERO, "a sleep as long as the maximum");
        for _ in 0..6 {
            p.after_sleep(Duration::ZERO);
        }
        assert_eq!(p.window(), MAX);
        let mut seen = Vec::new();
        while !p.window().is_zero() {
            p.after_miss();
            seen.push(p.window().as_nanos());
        }
        assert_eq!(seen, [25_000, 12_500, 6_250, 3_125, 0]);
    }

    #[test]
    fn a_policy_that_is_off_never_spins_or_calls_ready() {
        let mut p = AdaptivePoll::off();
        p.sleeping();
        p.woke();
        p.after_sleep(Duration::ZERO);
        assert_eq!(p.window(), Duration::ZERO);
        assert!(!p.poll(|| panic!("ready must not be called")));
        assert_eq!(p.stats(), PollStats::default());
    }

    #[test]
    fn a_poll_returns_when_work_appears_and_counts_it() {
        let mut p = AdaptivePoll::new(Duration::from_secs(5));
        while p.window() < p.max() {
            p.after_sleep(Duration::ZERO);
        }
        let mut checks = 0;
        assert!(p.poll(|| {
            checks += 1;
            checks == 100
        }));
        assert_eq!(checks, 100);
        assert_eq!((p.stats().hits, p.stats().misses), (1, 0));
    }

    #[test]
    fn a_poll_without_work_spins_out_its_window_then_shrinks() {
        let mut p = AdaptivePoll::new(Duration::from_micros(200));
        for _ in 0..8 {
            p.after_sleep(Duration::ZERO);
        }
        let window = p.window();
        let start = Instant::now();
        assert!(!p.poll(|| false));
        assert!(start.elapsed() >= window, "it spun its whole window");
        assert!(p.stats().spun >= window);
        assert_eq!(p.window(), window / 2);
        assert_eq!(p.stats().misses, 1);
    }

    #[test]
    fn wake_after_sleep_adapts_by_the_time_slept() {
        let mut p = AdaptivePoll::new(Duration::from_secs(60));
        p.woke(); // never slept: nothing to adapt to
        assert_eq!(p.window(), Duration::ZERO);
        p.sleeping();
        p.woke();
        assert_eq!(
            p.window(),
            AdaptivePoll::START,
            "slept far less than a minute"
        );
    }
}
