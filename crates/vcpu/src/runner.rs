//! Running a VM: one thread per vCPU, exit dispatch, pause/resume/kick/stop, and exit
//! statistics.
//!
//! A kick is race-free: the kicker marks the vCPU, then sends it [`kick_signal`]; the
//! signal handler sets `immediate_exit` in the vCPU's `kvm_run`, so a KVM_RUN that is
//! about to start returns at once and one in progress returns with EINTR. The vCPU
//! thread clears `immediate_exit` and only then looks at the marks, so no kick is lost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmcraft_sandbox::{Thread, ThreadKind};

use thiserror::Error;

use crate::cpu::{CpuError, HypervisorInfo};
use crate::exit::{ExitError, ExitHandler, StopReason, VcpuFailure};
use crate::mode::{Entry, ModeError};
use crate::state::{saveable_msrs, VcpuState};
use crate::stats::{ExitStats, ExitStatsSnapshot};
use crate::vcpu::{create_vcpus, restore_vcpus, Kicker, Step, Vcpu};
use crate::vm::Vm;

pub use crate::vcpu::kick_signal;

/// How one vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuConfig {
    /// Entry mode and address. `None` leaves an application processor in KVM's reset
    /// state, waiting for INIT/SIPI from the boot vCPU (what an SMP Linux guest wants).
    pub entry: Option<Entry>,
}

impl VcpuConfig {
    /// A vCPU that starts running at `entry`.
    pub fn at(entry: Entry) -> Self {
        VcpuConfig { entry: Some(entry) }
    }

    /// An application processor that waits for INIT/SIPI.
    pub fn waiting_for_sipi() -> Self {
        VcpuConfig { entry: None }
    }

    /// Whether this vCPU starts on the boot tables
    /// ([`Entry::needs_boot_tables`](crate::mode::Entry::needs_boot_tables)).
    pub fn needs_boot_tables(&self) -> bool {
        self.entry.is_some_and(|e| e.needs_boot_tables())
    }
}

/// Errors from starting or running a VM.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum VmError {
    /// No vCPUs were asked for.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// KVM refused to create a vCPU.
    #[error("KVM refused to create vCPU {index}")]
    CreateVcpu {
        /// vCPU index.
        index: u32,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// CPU configuration failed.
    #[error("cannot configure vCPU {index}")]
    Cpu {
        /// vCPU index.
        index: u32,
        /// What failed.
        #[source]
        source: CpuError,
    },
    /// Entry-mode setup failed.
    #[error("cannot set up the entry state of vCPU {index}")]
    Mode {
        /// vCPU index.
        index: u32,
        /// What failed.
        #[source]
        source: ModeError,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// A vCPU thread could not be spawned.
    #[error("cannot spawn the thread of vCPU {index}")]
    Spawn {
        /// vCPU index.
        index: u32,
        /// Why it could not be started (or filtered).
        #[source]
        source: vmcraft_sandbox::SandboxError,
    },
    /// KVM_RUN failed.
    #[error("KVM_RUN failed on vCPU {index}")]
    Run {
        /// vCPU index.
        index: u32,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An exit the VM cannot continue from (internal error, failed entry, unknown
    /// reason); the registers are included for diagnosis.
    #[error("vCPU {index} stopped on a fatal exit; registers: {registers}")]
    FatalExit {
        /// vCPU index.
        index: u32,
        /// What happened.
        #[source]
        source: ExitError,
        /// The vCPU's registers at the exit.
        registers: String,
    },
    /// A vCPU index out of range.
    #[error("there is no vCPU {index} (the VM has {count})")]
    NoSuchVcpu {
        /// Requested index.
        index: u32,
        /// Number of vCPUs.
        count: u32,
    },
    /// A vCPU thread panicked.
    #[error("the thread of vCPU {0} panicked")]
    Panicked(u32),
    /// A vCPU's state could not be saved.
    #[error("cannot save the state of vCPU {index}")]
    Save {
        /// vCPU index.
        index: u32,
        /// What failed.
        #[source]
        source: crate::state::StateError,
    },
    /// A vCPU's saved state could not be put back.
    #[error("cannot restore the state of vCPU {index}")]
    Restore {
        /// vCPU index.
        index: u32,
        /// What failed.
        #[source]
        source: crate::state::StateError,
    },
    /// The VM has stopped (or is stopping), so it cannot be paused for a snapshot.
    #[error("the VM has stopped ({0:?})")]
    Stopped(StopReason),
}

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmOutcome {
    /// Why it stopped.
    pub reason: StopReason,
    /// The vCPU whose exit stopped it (`None` when the embedding program did).
    pub vcpu: Option<u32>,
}

/// Per-vCPU state shared between its thread and the embedding program.
#[derive(Debug)]
struct VcpuShared {
    stats: Arc<ExitStats>,
    kicker: Kicker,
    kicks_seen: AtomicU64,
}

#[derive(Debug)]
struct Control {
    stop: Option<VmOutcome>,
    error: Option<VmError>,
    /// The error, as text with its causes (it stays for [`RunningVm::failure`] when
    /// the error itself goes to [`RunningVm::wait`]).
    failure: Option<String>,
    pause: bool,
    paused: usize,
    live: usize,
    /// While a snapshot is being taken: the MSRs to save, and each vCPU's state once
    /// it has saved it.
    snapshot: Option<Arc<Vec<u32>>>,
    saved: Vec<Option<Result<VcpuState, VmError>>>,
}

#[derive(Debug)]
struct Shared {
    control: Mutex<Control>,
    changed: Condvar,
    /// Set whenever a vCPU must look at `control` (pause or stop requested).
    attention: AtomicBool,
    vcpus: Vec<VcpuShared>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kick(&self, index: usize) {
        self.vcpus[index].kicker.kick();
    }

    fn kick_all(&self) {
        (0..self.vcpus.len()).for_each(|i| self.kick(i));
    }

    fn request_stop(&self, outcome: VmOutcome, error: Option<VmError>) {
        {
            let mut c = self.lock();
            if c.stop.is_none() {
                c.stop = Some(outcome);
                c.failure = error.as_ref().map(|e| {
                    let mut text = e.to_string();
                    let mut cause = std::error::Error::source(e);
                    while let Some(c) = cause {
                        text += &format!(": {c}");
                        cause = c.source();
                    }
                    text
                });
                c.error = error;
            }
            self.attention.store(true, Ordering::SeqCst);
            self.changed.notify_all();
        }
        self.kick_all();
    }

    /// Called by vCPU `index`'s thread when `attention` is set: parks while paused,
    /// after saving its state with `save` if a snapshot asks for it. Returns false when
    /// the VM is stopping.
    fn checkpoint(
        &self,
        index: usize,
        save: &mut dyn FnMut(&[u32]) -> Result<VcpuState, VmError>,
    ) -> bool {
        let mut c = self.lock();
        loop {
            if c.stop.is_some() {
                return false;
            }
            if !c.pause {
                return true;
            }
            if let Some(msrs) = c.snapshot.clone() {
                if c.saved[index].is_none() {
                    drop(c);
                    let state = save(&msrs);
                    c = self.lock();
                    c.saved[index] = Some(state);
                }
            }
            c.paused += 1;
            self.changed.notify_all();
            while c.pause && c.stop.is_none() && !(c.snapshot.is_some() && c.saved[index].is_none())
            {
                c = self.changed.wait(c).unwrap_or_else(|p| p.into_inner());
            }
            c.paused -= 1;
        }
    }
}

/// A running VM: its vCPU threads and the controls over them.
///
/// Dropping it stops the VM and joins its threads. It keeps the exit handler (and so
/// the devices behind it) alive as long as it lives, so device state stays readable
/// after the vCPUs have stopped.
pub struct RunningVm {
    vm: Arc<Vm>,
    shared: Arc<Shared>,
    threads: Vec<(u32, Thread<()>)>,
    _handler: Arc<dyn ExitHandler>,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("vcpus", &self.shared.vcpus.len())
            .finish()
    }
}

/// The thread of one vCPU under [`RunningVm`].
struct VcpuThread {
    vcpu: Vcpu,
    shared: Arc<Shared>,
}

impl VcpuThread {
    fn me(&self) -> &VcpuShared {
        &self.shared.vcpus[self.vcpu.index() as usize]
    }

    fn run(mut self) {
        let index = self.vcpu.index();
        self.me().kicker.attach_current_thread();
        let result = self.run_loop();
        self.me().kicker.detach();
        match result {
            Ok(Some(reason)) => self.shared.request_stop(
                VmOutcome {
                    reason,
                    vcpu: Some(index),
                },
                None,
            ),
            Ok(None) => {}
            Err(e) => {
                let failure = match &e {
                    VmError::FatalExit { source, .. } => VcpuFailure::from(source),
                    VmError::Run { source, .. } => VcpuFailure::RunFailed {
                        errno: source.errno(),
                    },
                    _ => VcpuFailure::Host,
                };
                self.shared.request_stop(
                    VmOutcome {
                        reason: StopReason::VcpuFailed(failure),
                        vcpu: Some(index),
                    },
                    Some(e),
                )
            }
        }
        let mut c = self.shared.lock();
        c.live -= 1;
        self.shared.changed.notify_all();
    }

    /// Runs until a stop; returns the stop reason this vCPU caused, if any.
    fn run_loop(&mut self) -> Result<Option<StopReason>, VmError> {
        loop {
            if self.shared.attention.load(Ordering::SeqCst) {
                let index = self.vcpu.index();
                let vcpu = &mut self.vcpu;
                let mut save = |msrs: &[u32]| {
                    vcpu.complete_pending_io()?;
                    vcpu.save_state(msrs)
                        .map_err(|source| VmError::Save { index, source })
                };
                if !self.shared.checkpoint(index as usize, &mut save) {
                    return Ok(None);
                }
            }
            let shared = self.shared.clone();
            let me = &shared.vcpus[self.vcpu.index() as usize];
            let step = self.vcpu.step(&me.kicker)?;
            if me.kicker.take() {
                me.kicks_seen.fetch_add(1, Ordering::SeqCst);
            }
            if let Step::Stop(reason) = step {
                return Ok(Some(reason));
            }
        }
    }
}

impl RunningVm {
    /// Create, configure and start one thread per entry of `vcpus`, with every exit
    /// going to `handler`.
    pub fn start(
        vm: Vm,
        vcpus: &[VcpuConfig],
        handler: Arc<dyn ExitHandler>,
    ) -> Result<Self, VmError> {
        Self::start_with_info(vm, vcpus, handler, HypervisorInfo::default())
    }

    /// [`RunningVm::start`], publishing `info` in the vmcraft CPUID leaf 0x40000001.
    pub fn start_with_info(
        vm: Vm,
        vcpus: &[VcpuConfig],
        handler: Arc<dyn ExitHandler>,
        info: HypervisorInfo,
    ) -> Result<Self, VmError> {
        let cores = create_vcpus(&vm, vcpus, handler.clone(), info)?;
        Self::start_cores(vm, cores, handler, false)
    }

    /// Start a VM from a snapshot: one thread per saved vCPU state, put back into a
    /// new vCPU of `vm` (whose memory and in-kernel devices the caller has restored:
    /// [`VmState::restore`](crate::state::VmState::restore)), with every exit going to
    /// `handler`. The guest goes on from the instruction it was paused at.
    pub fn start_restored(
        vm: Vm,
        states: &[VcpuState],
        handler: Arc<dyn ExitHandler>,
    ) -> Result<Self, VmError> {
        Self::restore_and_start(vm, states, handler, false)
    }

    /// [`RunningVm::start_restored`], its vCPUs parked before they enter the guest:
    /// nothing of the guest runs until [`RunningVm::resume`] (a snapshot loaded to be
    /// resumed later, as Firecracker's `PUT /snapshot/load` without `resume_vm`).
    pub fn start_restored_paused(
        vm: Vm,
        states: &[VcpuState],
        handler: Arc<dyn ExitHandler>,
    ) -> Result<Self, VmError> {
        Self::restore_and_start(vm, states, handler, true)
    }

    fn restore_and_start(
        vm: Vm,
        states: &[VcpuState],
        handler: Arc<dyn ExitHandler>,
        paused: bool,
    ) -> Result<Self, VmError> {
        let cores = restore_vcpus(&vm, states, handler.clone())?;
        Self::start_cores(vm, cores, handler, paused)
    }

    fn start_cores(
        vm: Vm,
        cores: Vec<Vcpu>,
        handler: Arc<dyn ExitHandler>,
        paused: bool,
    ) -> Result<Self, VmError> {
        let count = cores.len() as u32;
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                stop: None,
                error: None,
                failure: None,
                pause: paused,
                paused: 0,
                live: cores.len(),
                snapshot: None,
                saved: Vec::new(),
            }),
            changed: Condvar::new(),
            // A vCPU looks at the controls before its first entry.
            attention: AtomicBool::new(paused),
            vcpus: cores
                .iter()
                .map(|c| VcpuShared {
                    stats: c.stats(),
                    kicker: Kicker::default(),
                    kicks_seen: AtomicU64::new(0),
                })
                .collect(),
        });
        let mut running = RunningVm {
            vm: Arc::new(vm),
            shared: shared.clone(),
            threads: Vec::new(),
            _handler: handler,
        };
        for (i, vcpu) in cores.into_iter().enumerate() {
            let index = i as u32;
            let thread = VcpuThread {
                vcpu,
                shared: shared.clone(),
            };
            let spawned =
                vmcraft_sandbox::spawn(ThreadKind::Vcpu, &format!("vcpu{i}"), move || thread.run());
            match spawned {
                Ok(h) => running.threads.push((index, h)),
                Err(source) => {
                    // Threads not spawned will never decrement `live`.
                    running.shared.lock().live -= count as usize - i;
                    running.shared.request_stop(
                        VmOutcome {
                            reason: StopReason::Requested,
                            vcpu: None,
                        },
                        None,
                    );
                    return Err(VmError::Spawn { index, source });
                }
            }
        }
        Ok(running)
    }

    /// The VM (for its file descriptor and memory).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u32 {
        self.shared.vcpus.len() as u32
    }

    fn check_index(&self, index: u32) -> Result<usize, VmError> {
        if (index as usize) < self.shared.vcpus.len() {
            Ok(index as usize)
        } else {
            Err(VmError::NoSuchVcpu {
                index,
                count: self.vcpu_count(),
            })
        }
    }

    /// Make vCPU `index` leave the guest once (its handler's `kicked` runs).
    pub fn kick(&self, index: u32) -> Result<(), VmError> {
        let i = self.check_index(index)?;
        self.shared.kick(i);
        Ok(())
    }

    /// Kicks vCPU `index` has noticed so far.
    pub fn kicks_seen(&self, index: u32) -> Result<u64, VmError> {
        let i = self.check_index(index)?;
        Ok(self.shared.vcpus[i].kicks_seen.load(Ordering::SeqCst))
    }

    /// Stop every vCPU outside the guest; returns once all have stopped (or the VM
    /// has ended). Guest state does not change until [`RunningVm::resume`].
    pub fn pause(&self) {
        {
            let mut c = self.shared.lock();
            c.pause = true;
            self.shared.attention.store(true, Ordering::SeqCst);
        }
        self.shared.kick_all();
        let mut c = self.shared.lock();
        while c.paused < c.live && c.stop.is_none() {
            c = self
                .shared
                .changed
                .wait(c)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Let paused vCPUs run again.
    pub fn resume(&self) {
        let mut c = self.shared.lock();
        c.pause = false;
        self.shared
            .attention
            .store(c.stop.is_some(), Ordering::SeqCst);
        self.shared.changed.notify_all();
    }

    /// Pause every vCPU for a snapshot and return their states, in vCPU order.
    ///
    /// The contract: when this returns, no vCPU is inside `KVM_RUN`; each has
    /// completed the port or MMIO read of its last exit (re-entering `KVM_RUN` with
    /// `immediate_exit` set, so no guest instruction ran), so its registers hold the
    /// value read; and each exit handled so far has had its effect on the devices.
    /// Device and VM state saved from now until [`RunningVm::resume`] is consistent
    /// with these vCPU states. Resume to go on, or drop the VM to end it.
    pub fn pause_for_snapshot(&self) -> Result<Vec<VcpuState>, VmError> {
        let msrs = Arc::new(
            saveable_msrs(self.vm.kvm()).map_err(|source| VmError::Save { index: 0, source })?,
        );
        {
            let mut c = self.shared.lock();
            if let Some(stop) = c.stop {
                return Err(VmError::Stopped(stop.reason));
            }
            c.snapshot = Some(msrs);
            c.saved = (0..self.shared.vcpus.len()).map(|_| None).collect();
            c.pause = true;
            self.shared.attention.store(true, Ordering::SeqCst);
            // vCPUs parked by an earlier pause wake, save and park again.
            self.shared.changed.notify_all();
        }
        self.shared.kick_all();
        let mut c = self.shared.lock();
        while c.stop.is_none() && !(c.paused == c.live && c.saved.iter().all(Option::is_some)) {
            c = self
                .shared
                .changed
                .wait(c)
                .unwrap_or_else(|p| p.into_inner());
        }
        c.snapshot = None;
        let saved = std::mem::take(&mut c.saved);
        if let Some(stop) = c.stop {
            return Err(VmError::Stopped(stop.reason));
        }
        saved
            .into_iter()
            .map(|s| s.unwrap_or(Err(VmError::Stopped(StopReason::Requested))))
            .collect()
    }

    /// Ask the VM to stop (the outcome is [`StopReason::Requested`] unless it had
    /// already stopped for another reason).
    pub fn request_stop(&self) {
        self.shared.request_stop(
            VmOutcome {
                reason: StopReason::Requested,
                vcpu: None,
            },
            None,
        );
    }

    /// Whether the VM has stopped or is stopping, and why.
    pub fn stop_reason(&self) -> Option<VmOutcome> {
        self.shared.lock().stop
    }

    /// When a vCPU failed ([`StopReason::VcpuFailed`]): the whole error, with its
    /// causes and the vCPU's registers where the exit gave them.
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().failure.clone()
    }

    /// Exit statistics of vCPU `index`.
    pub fn stats(&self, index: u32) -> Result<ExitStatsSnapshot, VmError> {
        let i = self.check_index(index)?;
        Ok(self.shared.vcpus[i].stats.snapshot())
    }

    /// Exit statistics summed over all vCPUs.
    pub fn total_stats(&self) -> ExitStatsSnapshot {
        self.shared
            .vcpus
            .iter()
            .fold(ExitStatsSnapshot::default(), |acc, v| {
                acc.merged(&v.stats.snapshot())
            })
    }

    /// Block until a stop has been requested (by a vCPU exit, a device or
    /// [`RunningVm::request_stop`]) or `timeout` passes; returns the stop, if any. The
    /// statistics stay readable afterwards, until [`RunningVm::wait`].
    pub fn wait_stopped(&self, timeout: Option<Duration>) -> Option<VmOutcome> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut c = self.shared.lock();
        while c.stop.is_none() && c.live > 0 {
            c = match deadline {
                None => self
                    .shared
                    .changed
                    .wait(c)
                    .unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break;
                    }
                    self.shared
                        .changed
                        .wait_timeout(c, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
        c.stop
    }

    /// Wait for the VM to stop, join every vCPU thread, and report why it stopped.
    pub fn wait(mut self) -> Result<VmOutcome, VmError> {
        self.join_all()
    }

    /// Like [`RunningVm::wait`], but stop the VM first if it is still running after
    /// `timeout`.
    pub fn wait_timeout(mut self, timeout: Duration) -> Result<VmOutcome, VmError> {
        let deadline = Instant::now() + timeout;
        {
            let mut c = self.shared.lock();
            while c.live > 0 {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                c = self
                    .shared
                    .changed
                    .wait_timeout(c, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        self.request_stop();
        self.join_all()
    }

    fn join_all(&mut self) -> Result<VmOutcome, VmError> {
        let mut panicked = None;
        for (index, handle) in self.threads.drain(..) {
            if handle.join().is_err() {
                panicked.get_or_insert(index);
            }
        }
        let mut c = self.shared.lock();
        if let Some(e) = c.error.take() {
            return Err(e);
        }
        if let Some(index) = panicked {
            return Err(VmError::Panicked(index));
        }
        Ok(c.stop.unwrap_or(VmOutcome {
            reason: StopReason::Requested,
            vcpu: None,
        }))
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.request_stop();
            let _ = self.join_all();
        }
    }
}
