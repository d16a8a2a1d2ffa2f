//! Per-vCPU exit statistics: how many exits of each kind, and how long the VMM spent
//! handling them. Updated by the vCPU thread, readable at any time by the embedding
//! program.

use std::sync::atomic::{AtomicU64, Ordering};

/// The kinds of exit counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitKind {
    /// Port read.
    PioRead,
    /// Port write.
    PioWrite,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// HLT.
    Hlt,
    /// Kick (signal or immediate exit).
    Kicked,
    /// Triple fault.
    Shutdown,
    /// KVM system event.
    SystemEvent,
    /// A hypercall KVM passed out (Xen's, `KVM_EXIT_XEN`).
    Hypercall,
    /// Anything else (internal errors, failed entries, unhandled reasons).
    Other,
}

impl ExitKind {
    /// Every kind, in display order.
    pub const ALL: [ExitKind; 10] = [
        ExitKind::PioRead,
        ExitKind::PioWrite,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Hlt,
        ExitKind::Kicked,
        ExitKind::Shutdown,
        ExitKind::SystemEvent,
        ExitKind::Hypercall,
        ExitKind::Other,
    ];

    /// A short name for printing.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::PioRead => "pio-read",
            ExitKind::PioWrite => "pio-write",
            ExitKind::MmioRead => "mmio-read",
            ExitKind::MmioWrite => "mmio-write",
            ExitKind::Hlt => "hlt",
            ExitKind::Kicked => "kicked",
            ExitKind::Shutdown => "shutdown",
            ExitKind::SystemEvent => "system-event",
            ExitKind::Hypercall => "hypercall",
            ExitKind::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const KINDS: usize = ExitKind::ALL.len();

/// Live counters of one vCPU.
#[derive(Debug, Default)]
pub struct ExitStats {
    count: [AtomicU64; KINDS],
    nanos: [AtomicU64; KINDS],
}

impl ExitStats {
    /// Record one exit of `kind` that took `nanos` nanoseconds in the VMM.
    pub fn record(&self, kind: ExitKind, nanos: u64) {
        self.count[kind.index()].fetch_add(1, Ordering::Relaxed);
        self.nanos[kind.index()].fetch_add(nanos, Ordering::Relaxed);
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> ExitStatsSnapshot {
        ExitStatsSnapshot {
            count: std::array::from_fn(|i| self.count[i].load(Ordering::Relaxed)),
            nanos: std::array::from_fn(|i| self.nanos[i].load(Ordering::Relaxed)),
        }
    }
}

/// Exit counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitStatsSnapshot {
    count: [u64; KINDS],
    nanos: [u64; KINDS],
}

impl ExitStatsSnapshot {
    /// Number of exits of `kind`.
    pub fn count(&self, kind: ExitKind) -> u64 {
        self.count[kind.index()]
    }

    /// Nanoseconds spent in the VMM handling exits of `kind`.
    pub fn nanos(&self, kind: ExitKind) -> u64 {
        self.nanos[kind.index()]
    }

    /// Total exits.
    pub fn total(&self) -> u64 {
        self.count.iter().sum()
    }

    /// Total nanoseconds spent in the VMM handling exits.
    pub fn total_nanos(&self) -> u64 {
        self.nanos.iter().sum()
    }

    /// Field-wise sum, to aggregate vCPUs.
    pub fn merged(&self, other: &ExitStatsSnapshot) -> ExitStatsSnapshot {
        ExitStatsSnapshot {
            count: std::array::from_fn(|i| self.count[i] + other.count[i]),
            nanos: std::array::from_fn(|i| self.nanos[i] + other.nanos[i]),
        }
    }
}

impl std::fmt::Display for ExitStatsSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for kind in ExitKind::ALL {
            let n = self.count(kind);
            if let Some(avg) = self.nanos(kind).checked_div(n) {
                writeln!(
                    f,
                    "  {:<13} {:>9} exits  {:>7} ns avg in VMM",
                    kind.name(),
                    n,
                    avg
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_times_add_up() {
        let s = ExitStats::default();
        s.record(ExitKind::PioWrite, 100);
        s.record(ExitKind::PioWrite, 300);
        s.record(ExitKind::Kicked, 5);
        let snap = s.snapshot();
        assert_eq!(snap.count(ExitKind::PioWrite), 2);
        assert_eq!(snap.nanos(ExitKind::PioWrite), 400);
        assert_eq!(snap.total(), 3);
        assert_eq!(snap.merged(&snap).count(ExitKind::Kicked), 2);
        let text = snap.to_string();
        assert!(
            text.contains("pio-write") && text.contains("200 ns avg"),
            "{text}"
        );
        assert!(!text.contains("mmio-read"));
    }
}
