//! The memory balancer at work on running VMs: a thread that, every period, asks each
//! VM for a fresh report of its use, reads the host's memory pressure, steps the
//! [`Balancer`] policy and tells each VM how many pages it may keep.
//!
//! A VM takes part through [`BalancedVm`]; [`VirtioBalloonVm`] is one behind a
//! virtio-balloon device: its report comes from the balloon statistics, and what it
//! may keep becomes the balloon's target (its RAM minus what it keeps).
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use vmcraft::balancer::policy::{BalancerConfig, VmLimits};
//! use vmcraft::balancing::{Balancing, BalancingConfig, HostPressure, VirtioBalloonVm};
//! use vmcraft::devices::virtio::balloon::Balloon;
//!
//! let (balloon, control) = Balloon::new("vballoon").unwrap();
//! // ... add `balloon` to a machine of 256 MiB with `MachineBuilder::add_virtio` ...
//! let vm = Arc::new(VirtioBalloonVm::new(control, 256 << 20));
//! let balancing = Balancing::start(
//!     BalancingConfig {
//!         policy: BalancerConfig::default(),
//!         period: Duration::from_millis(500),
//!         budget_pages: 65_536,
//!         pressure: HostPressure::Psi,
//!     },
//!     vec![(vm, VmLimits { floor: 16_384, ceiling: 65_536 })],
//! )
//! .unwrap();
//! // ... the VMs run; dropping `balancing` stops the thread.
//! # drop(balancing);
//! ```
//!
//! A PV guest would take part the same way, its report and target carried by the
//! xenstore (`memory/target`, as Xen's own balloon driver reads it) and its pages given
//! back through `XENMEM_decrease_reservation` ([`crate::pv::reservation`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmcraft_devices::lifecycle::{epoll_over, next_ready_within, Gate, Leave, GATE, STOP};

use vmcraft_balancer::policy::{Balancer, BalancerConfig, HostReport, VmLimits, VmReport};
use vmcraft_balancer::psi::Pressure;
use vmcraft_devices::virtio::balloon::{tag, BalloonControl, BalloonStats};
use vmcraft_memory::PAGE_SIZE;
use vmcraft_sandbox::{Thread, ThreadKind};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const PSI_PATH: &str = "/proc/pressure/memory";

/// A VM the balancer manages.
pub trait BalancedVm: Send + Sync {
    /// Ask the VM for a fresh report (answered by the next [`BalancedVm::report`], or
    /// a later one).
    fn request_report(&self);
    /// The latest report, if the VM has made one.
    fn report(&self) -> Option<VmReport>;
    /// Let the VM keep `pages` pages of its RAM and ask the rest back.
    fn keep(&self, pages: u64);
}

/// A VM behind a virtio-balloon device. Its report is its latest statistics, once:
/// figures already reported are not a new report (a slow driver leaves its VM as it
/// was rather than having old figures read against a balloon that has moved since).
#[derive(Debug)]
pub struct VirtioBalloonVm {
    control: Arc<BalloonControl>,
    ram_pages: u64,
    reported: std::sync::atomic::AtomicU64,
}

impl VirtioBalloonVm {
    /// The VM with `ram` bytes of RAM whose balloon `control` drives.
    pub fn new(control: Arc<BalloonControl>, ram: u64) -> Self {
        VirtioBalloonVm {
            control,
            ram_pages: ram / PAGE_SIZE,
            reported: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

/// A guest's use from its balloon statistics, in pages: its RAM less the balloon and
/// less what it reports available (or, without that, free). That holds whether the
/// guest counts the balloon's pages in its total (Linux does with
/// `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`: they are pages it allocated, so not available)
/// or takes them out of it (without), and it counts what the guest's kernel reserved
/// at boot and left out of its total (50 MiB of 256 for Debian's kernel) as used, which
/// it is. `ballooned` must be the balloon as it was when the guest counted: figures
/// read against a balloon that has grown since would understate the use by the
/// difference, and a balancer acting on them would inflate without end. `None`
/// without a figure of what is available.
pub fn used_from_stats(stats: &BalloonStats, ram_pages: u64, ballooned: u64) -> Option<u64> {
    let available = stats
        .get(tag::AVAILABLE_MEMORY)
        .or_else(|| stats.get(tag::FREE_MEMORY))?
        / PAGE_SIZE;
    Some(
        ram_pages
            .saturating_sub(ballooned)
            .saturating_sub(available),
    )
}

/// The balloon target (pages the guest gives up) for a VM of `ram_pages` that may
/// keep `keep` pages.
pub fn balloon_target(ram_pages: u64, keep: u64) -> u32 {
    u32::try_from(ram_pages.saturating_sub(keep)).unwrap_or(u32::MAX)
}

impl BalancedVm for VirtioBalloonVm {
    fn request_report(&self) {
        self.control.request_stats();
    }

    fn report(&self) -> Option<VmReport> {
        let stats = self.control.stats()?;
        let seen = self
            .reported
            .swap(stats.sequence, std::sync::atomic::Ordering::SeqCst);
        if seen == stats.sequence {
            return None;
        }
        // The balloon as it was when the guest counted, not as it is now.
        let used = used_from_stats(&stats, self.ram_pages, u64::from(stats.ballooned))?;
        Some(VmReport { used })
    }

    fn keep(&self, pages: u64) {
        let target = balloon_target(self.ram_pages, pages);
        if target != self.control.target() {
            self.control.set_target(target);
        }
    }
}

/// Where the host's memory pressure comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HostPressure {
    /// `/proc/pressure/memory` (a host without it counts as without pressure, said
    /// once in the log).
    Psi,
    /// A fixed level, 0 to 1 (tests, simulations).
    Fixed(f64),
}

/// How the balancer runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalancingConfig {
    /// The policy's knobs.
    pub policy: BalancerConfig,
    /// Time between steps.
    pub period: Duration,
    /// Pages the host gives the VMs in all.
    pub budget_pages: u64,
    /// The host's memory pressure.
    pub pressure: HostPressure,
}

/// One step the balancer took.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// When, from the start.
    pub at: Duration,
    /// The host's pressure level it used.
    pub pressure: f64,
    /// Each VM's report (`None`: it has not reported yet).
    pub reports: Vec<Option<VmReport>>,
    /// Pages each VM may keep.
    pub targets: Vec<u64>,
}

/// Errors starting the balancer.
#[derive(Debug, thiserror::Error)]
pub enum BalancingError {
    /// A host resource could not be made.
    #[error("the balancer could not {what}")]
    Host {
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Its thread could not start under its sandbox.
    #[error("the balancer's thread could not start")]
    Thread(#[source] vmcraft_sandbox::SandboxError),
}

/// The balancer's thread; dropping it stops it.
pub struct Balancing {
    stop: Arc<EventFd>,
    gate: Arc<Gate>,
    thread: Option<Thread<()>>,
    last: Arc<Mutex<Option<Step>>>,
    steps: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Balancing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancing")
            .field("steps", &self.steps())
            .finish_non_exhaustive()
    }
}

impl Balancing {
    /// Start balancing `vms` (each with its floor and ceiling, in pages) as `config`
    /// says. The first step comes one period after the start, once the VMs have had
    /// the time to answer the first request for a report.
    pub fn start(
        config: BalancingConfig,
        vms: Vec<(Arc<dyn BalancedVm>, VmLimits)>,
    ) -> Result<Balancing, BalancingError> {
        let stop = Arc::new(
            EventFd::new(EFD_NONBLOCK).map_err(|source| BalancingError::Host {
                what: "make its stop eventfd",
                source,
            })?,
        );
        let last = Arc::new(Mutex::new(None));
        let steps = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let limits: Vec<VmLimits> = vms.iter().map(|(_, l)| *l).collect();
        let mut balancer = Balancer::new(config.policy, &limits);
        // Opened here, before any sandbox the caller's thread installs later; the
        // balancer's own thread only reads it again.
        let psi = match config.pressure {
            HostPressure::Psi => match std::fs::File::open(PSI_PATH) {
                Ok(f) => Some(f),
                Err(e) => {
                    log::warn!("balancer: no host pressure ({PSI_PATH}: {e}), taken as none");
                    None
                }
            },
            HostPressure::Fixed(_) => None,
        };
        let (last_t, steps_t) = (last.clone(), steps.clone());
        let gate = Arc::new(Gate::new().map_err(|source| BalancingError::Host {
            what: "make its pause eventfd",
            source,
        })?);
        let epoll = epoll_over(&[(&*stop, STOP), (&gate.wake, GATE)]).map_err(|source| {
            BalancingError::Host {
                what: "make its epoll set",
                source,
            }
        })?;
        let gate_t = gate.clone();
        gate.enter();
        let spawned = vmcraft_sandbox::spawn(ThreadKind::Main, "balancer", move || {
            let _leave = Leave(&gate_t);
            let start = Instant::now();
            let mut psi_failed_said = false;
            for (vm, _) in &vms {
                vm.request_report();
            }
            // A step each period; a stop ends it, a pause parks it between steps.
            while next_ready_within(&epoll, &gate_t, "balancer", Some(config.period)).is_some() {
                let pressure = match (config.pressure, &psi) {
                    (HostPressure::Fixed(level), _) => level,
                    (HostPressure::Psi, None) => 0.0,
                    (HostPressure::Psi, Some(f)) => match Pressure::read_from(f) {
                        Ok(p) => p.level(),
                        Err(e) => {
                            if !psi_failed_said {
                                log::warn!(
                                    "balancer: host pressure unreadable, taken as none: {e}"
                                );
                                psi_failed_said = true;
                            }
                            0.0
                        }
                    },
                };
                let reports: Vec<Option<VmReport>> =
                    vms.iter().map(|(vm, _)| vm.report()).collect();
                let step = balancer.step_some(
                    &HostReport {
                        budget: config.budget_pages,
                        pressure,
                    },
                    &reports,
                );
                for (i, (((vm, _), keep), report)) in
                    vms.iter().zip(&step).zip(&reports).enumerate()
                {
                    if let Some(r) = report {
                        log::debug!("balancer: VM {i} uses {} pages, may keep {keep}", r.used);
                    }
                    vm.keep(*keep);
                    vm.request_report();
                }
                *last_t.lock().unwrap_or_else(|p| p.into_inner()) = Some(Step {
                    at: start.elapsed(),
                    pressure,
                    reports,
                    targets: step,
                });
                steps_t.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let thread = match spawned {
            Ok(thread) => thread,
            Err(e) => {
                gate.leave();
                return Err(BalancingError::Thread(e));
            }
        };
        Ok(Balancing {
            stop,
            gate,
            thread: Some(thread),
            last,
            steps,
        })
    }

    /// Hold the balancer between steps (no balloon target changes while a snapshot
    /// or a migration saves the machine); returns once it is held.
    pub fn pause(&self) {
        self.gate.pause_all();
    }

    /// Let it go on after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.gate.resume_all();
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The last step taken, if any.
    pub fn last_step(&self) -> Option<Step> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Balancing {
    fn drop(&mut self) {
        // Saturation means a stop is pending already.
        let _ = self.stop.write(1);
        // Held by a pause, it goes back to its loop and sees the stop.
        self.gate.resume_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests;
