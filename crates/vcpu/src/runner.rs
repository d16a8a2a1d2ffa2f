//! Running a VM: one thread per vCPU, exit dispatch, pause/resume/kick/stop, and exit
//! statistics.
//!
//! A kick is race-free: the kicker marks the vCPU, then sends it [`kick_signal`]; the
//! signal handler sets `immediate_exit` in the vCPU's `kvm_run`, so a KVM_RUN that is
//! about to start returns at once and one in progress returns with EINTR. The vCPU
//! thread clears `immediate_exit` and only then looks at the marks, so no kick is lost.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_run, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use thiserror::Error;

use crate::cpu::{self, CpuError, HypervisorInfo};
use crate::exit::{dispatch, Exit, ExitAction, ExitError, ExitHandler, StopReason, VcpuRegisters};
use crate::mode::{self, Entry, ModeError};
use crate::run_page;
use crate::stats::{ExitKind, ExitStats, ExitStatsSnapshot};
use crate::vm::Vm;

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
}

/// Errors from starting or running a VM.
#[derive(Debug, Error)]
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
        /// The OS error.
        #[source]
        source: std::io::Error,
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
}

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmOutcome {
    /// Why it stopped.
    pub reason: StopReason,
    /// The vCPU whose exit stopped it (`None` when the embedding program did).
    pub vcpu: Option<u32>,
}

/// The signal used to kick vCPU threads (`SIGRTMIN`). An embedding program must not
/// use it for anything else.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// The kvm_run of the vCPU owned by this thread, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: KVM_RUN is set by a vCPU thread to its own kvm_run mapping and reset
        // to null before that mapping is dropped (see `VcpuThread::run`); the handler
        // runs on the thread that set it, so the mapping is live.
        unsafe { run_page::request_immediate_exit(run) };
    }
}

fn install_kick_handler() -> Result<(), VmError> {
    static INSTALL: Once = Once::new();
    static mut RESULT: Option<vmm_sys_util::errno::Error> = None;
    INSTALL.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            // SAFETY: written only here, inside `call_once`, which synchronizes with
            // every later reader below.
            unsafe { RESULT = Some(e) };
        }
    });
    // SAFETY: `call_once` has completed (on this or another thread), so the write
    // above, if any, happened before this read and no write can follow.
    match unsafe { RESULT } {
        Some(e) => Err(VmError::Signal(e)),
        None => Ok(()),
    }
}

/// Per-vCPU state shared between its thread and the embedding program.
#[derive(Debug, Default)]
struct VcpuShared {
    stats: ExitStats,
    kick_pending: AtomicBool,
    kicks_seen: AtomicU64,
    /// The thread while it runs; cleared by the thread before it ends, so a kicker
    /// holding this lock never signals a finished thread.
    thread: Mutex<Option<libc::pthread_t>>,
}

#[derive(Debug)]
struct Control {
    stop: Option<VmOutcome>,
    error: Option<VmError>,
    pause: bool,
    paused: usize,
    live: usize,
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
        let v = &self.vcpus[index];
        v.kick_pending.store(true, Ordering::SeqCst);
        let thread = v.thread.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = *thread {
            // SAFETY: `t` is a thread that registered itself under this lock and has not
            // yet deregistered (it does so under the same lock before ending), so it is
            // alive; a signal for which a handler is installed is harmless to it.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    fn kick_all(&self) {
        (0..self.vcpus.len()).for_each(|i| self.kick(i));
    }

    fn request_stop(&self, outcome: VmOutcome, error: Option<VmError>) {
        {
            let mut c = self.lock();
            if c.stop.is_none() {
                c.stop = Some(outcome);
                c.error = error;
            }
            self.attention.store(true, Ordering::SeqCst);
            self.changed.notify_all();
        }
        self.kick_all();
    }

    /// Called by a vCPU thread when `attention` is set: parks while paused. Returns
    /// false when the VM is stopping.
    fn checkpoint(&self) -> bool {
        let mut c = self.lock();
        loop {
            if c.stop.is_some() {
                return false;
            }
            if !c.pause {
                return true;
            }
            c.paused += 1;
            self.changed.notify_all();
            while c.pause && c.stop.is_none() {
                c = self.changed.wait(c).unwrap_or_else(|p| p.into_inner());
            }
            c.paused -= 1;
        }
    }
}

/// A running VM: its vCPU threads and the controls over them.
///
/// Dropping it stops the VM and joins its threads.
pub struct RunningVm {
    vm: Arc<Vm>,
    shared: Arc<Shared>,
    threads: Vec<(u32, JoinHandle<()>)>,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("vcpus", &self.shared.vcpus.len())
            .finish()
    }
}

struct FdRegisters<'a> {
    fd: &'a VcpuFd,
    index: u32,
}

impl VcpuRegisters for FdRegisters<'_> {
    fn vcpu_index(&self) -> u32 {
        self.index
    }
    fn regs(&self) -> Result<kvm_regs, kvm_ioctls::Error> {
        self.fd.get_regs()
    }
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), kvm_ioctls::Error> {
        self.fd.set_regs(regs)
    }
    fn sregs(&self) -> Result<kvm_sregs, kvm_ioctls::Error> {
        self.fd.get_sregs()
    }
}

fn describe_registers(fd: &VcpuFd) -> String {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} \
             cs={:#x}(dpl {}) cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, s.cs.selector, s.cs.dpl, s.cr0,
            s.cr3, s.cr4, s.efer
        ),
        (Err(e), _) | (_, Err(e)) => format!("unavailable ({e})"),
    }
}

/// The raw outcome of one KVM_RUN, before dispatch.
enum RawExit {
    Pio,
    MmioRead {
        addr: u64,
    },
    MmioWrite {
        addr: u64,
        data: [u8; 8],
        len: usize,
    },
    Hlt,
    Shutdown,
    SystemEvent(u32),
    Kicked,
    InternalError,
    FailEntry(u64),
    Unhandled(u32),
}

struct VcpuThread {
    index: u32,
    fd: VcpuFd,
    run_size: usize,
    shared: Arc<Shared>,
    handler: Arc<dyn ExitHandler>,
    /// Copy of the port I/O data of the current exit (at most one page).
    pio_buf: Box<[u8; 4096]>,
}

impl VcpuThread {
    fn me(&self) -> &VcpuShared {
        &self.shared.vcpus[self.index as usize]
    }

    fn run(mut self) {
        KVM_RUN.with(|c| c.set(self.fd.get_kvm_run() as *mut kvm_run));
        *self.me().thread.lock().unwrap_or_else(|p| p.into_inner()) =
            // SAFETY: pthread_self has no preconditions.
            Some(unsafe { libc::pthread_self() });
        if self.me().kick_pending.load(Ordering::SeqCst) {
            self.fd.set_kvm_immediate_exit(1);
        }
        let result = self.run_loop();
        *self.me().thread.lock().unwrap_or_else(|p| p.into_inner()) = None;
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        match result {
            Ok(Some(reason)) => self.shared.request_stop(
                VmOutcome {
                    reason,
                    vcpu: Some(self.index),
                },
                None,
            ),
            Ok(None) => {}
            Err(e) => self.shared.request_stop(
                VmOutcome {
                    reason: StopReason::Crash,
                    vcpu: Some(self.index),
                },
                Some(e),
            ),
        }
        let mut c = self.shared.lock();
        c.live -= 1;
        self.shared.changed.notify_all();
    }

    /// Runs until a stop; returns the stop reason this vCPU caused, if any.
    fn run_loop(&mut self) -> Result<Option<StopReason>, VmError> {
        loop {
            if self.shared.attention.load(Ordering::SeqCst) && !self.shared.checkpoint() {
                return Ok(None);
            }
            let raw = self.enter()?;
            let start = Instant::now();
            self.fd.set_kvm_immediate_exit(0);
            if self.me().kick_pending.swap(false, Ordering::SeqCst) {
                self.me().kicks_seen.fetch_add(1, Ordering::SeqCst);
            }
            let (kind, action) = self.handle(raw)?;
            self.me()
                .stats
                .record(kind, start.elapsed().as_nanos() as u64);
            if let ExitAction::Stop(reason) = action {
                return Ok(Some(reason));
            }
        }
    }

    fn enter(&mut self) -> Result<RawExit, VmError> {
        let index = self.index;
        let exit = match self.fd.run() {
            Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => RawExit::Pio,
            Ok(VcpuExit::MmioRead(addr, _)) => RawExit::MmioRead { addr },
            Ok(VcpuExit::MmioWrite(addr, bytes)) => {
                let mut data = [0u8; 8];
                let len = bytes.len().min(8);
                data[..len].copy_from_slice(&bytes[..len]);
                RawExit::MmioWrite { addr, data, len }
            }
            Ok(VcpuExit::Hlt) => RawExit::Hlt,
            Ok(VcpuExit::Shutdown) => RawExit::Shutdown,
            Ok(VcpuExit::SystemEvent(kind, _)) => RawExit::SystemEvent(kind),
            Ok(VcpuExit::Intr) => RawExit::Kicked,
            Ok(VcpuExit::InternalError) => RawExit::InternalError,
            Ok(VcpuExit::FailEntry(reason, _)) => RawExit::FailEntry(reason),
            Ok(_) => RawExit::Unhandled(self.fd.get_kvm_run().exit_reason),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => RawExit::Kicked,
            Err(source) => return Err(VmError::Run { index, source }),
        };
        Ok(exit)
    }

    fn fatal(&self, source: ExitError) -> VmError {
        VmError::FatalExit {
            index: self.index,
            source,
            registers: describe_registers(&self.fd),
        }
    }

    fn handle(&mut self, raw: RawExit) -> Result<(ExitKind, ExitAction), VmError> {
        let handler = &*self.handler;
        let mut regs = FdRegisters {
            fd: &self.fd,
            index: self.index,
        };
        let one = |exit: Exit<'_>, regs: &mut FdRegisters<'_>| dispatch(exit, handler, regs);
        let (kind, result) = match raw {
            RawExit::Pio => return self.handle_pio(),
            RawExit::MmioRead { addr } => {
                let mut data = [0xffu8; 8];
                let len = run_page::mmio_data(self.fd.get_kvm_run()).map_or(0, |d| d.len());
                let mut regs = FdRegisters {
                    fd: &self.fd,
                    index: self.index,
                };
                let action = dispatch(
                    Exit::MmioRead {
                        addr,
                        data: &mut data[..len],
                    },
                    handler,
                    &mut regs,
                );
                if let Some(out) = run_page::mmio_data(self.fd.get_kvm_run()) {
                    out.copy_from_slice(&data[..out.len()]);
                }
                (ExitKind::MmioRead, action)
            }
            RawExit::MmioWrite { addr, data, len } => (
                ExitKind::MmioWrite,
                one(
                    Exit::MmioWrite {
                        addr,
                        data: &data[..len],
                    },
                    &mut regs,
                ),
            ),
            RawExit::Hlt => (ExitKind::Hlt, one(Exit::Hlt, &mut regs)),
            RawExit::Shutdown => (ExitKind::Shutdown, one(Exit::Shutdown, &mut regs)),
            RawExit::SystemEvent(k) => {
                (ExitKind::SystemEvent, one(Exit::SystemEvent(k), &mut regs))
            }
            RawExit::Kicked => (ExitKind::Kicked, one(Exit::Kicked, &mut regs)),
            RawExit::InternalError => {
                let suberror = run_page::internal_suberror(self.fd.get_kvm_run());
                let mut regs = FdRegisters {
                    fd: &self.fd,
                    index: self.index,
                };
                (
                    ExitKind::Other,
                    dispatch(Exit::InternalError { suberror }, handler, &mut regs),
                )
            }
            RawExit::FailEntry(reason) => {
                (ExitKind::Other, one(Exit::FailEntry { reason }, &mut regs))
            }
            RawExit::Unhandled(r) => (ExitKind::Other, one(Exit::Unhandled(r), &mut regs)),
        };
        result.map(|a| (kind, a)).map_err(|e| self.fatal(e))
    }

    fn handle_pio(&mut self) -> Result<(ExitKind, ExitAction), VmError> {
        let Some((header, data)) = run_page::pio(self.fd.get_kvm_run(), self.run_size) else {
            return Err(self.fatal(ExitError::Unhandled(kvm_bindings::KVM_EXIT_IO)));
        };
        let len = data.len();
        self.pio_buf[..len].copy_from_slice(data);
        let mut regs = FdRegisters {
            fd: &self.fd,
            index: self.index,
        };
        let mut action = ExitAction::Continue;
        for chunk in self.pio_buf[..len].chunks_exact_mut(header.size) {
            let exit = if header.write {
                Exit::PioWrite {
                    port: header.port,
                    data: chunk,
                }
            } else {
                Exit::PioRead {
                    port: header.port,
                    data: chunk,
                }
            };
            action =
                dispatch(exit, &*self.handler, &mut regs).map_err(|source| VmError::FatalExit {
                    index: self.index,
                    source,
                    registers: describe_registers(&self.fd),
                })?;
            if action != ExitAction::Continue {
                break;
            }
        }
        if !header.write {
            if let Some((_, data)) = run_page::pio(self.fd.get_kvm_run(), self.run_size) {
                data.copy_from_slice(&self.pio_buf[..len]);
            }
        }
        let kind = if header.write {
            ExitKind::PioWrite
        } else {
            ExitKind::PioRead
        };
        Ok((kind, action))
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
        if vcpus.is_empty() {
            return Err(VmError::NoVcpus);
        }
        install_kick_handler()?;
        mode::write_boot_tables(vm.memory())
            .map_err(|source| VmError::Mode { index: 0, source })?;
        let count = vcpus.len() as u32;
        let run_size = vm
            .kvm()
            .get_vcpu_mmap_size()
            .map_err(|source| VmError::CreateVcpu { index: 0, source })?;
        let mut fds = Vec::with_capacity(vcpus.len());
        for (i, config) in vcpus.iter().enumerate() {
            let index = i as u32;
            let fd = vm
                .fd()
                .create_vcpu(i as u64)
                .map_err(|source| VmError::CreateVcpu { index, source })?;
            cpu::configure(vm.kvm(), &fd, index, count, info)
                .map_err(|source| VmError::Cpu { index, source })?;
            if let Some(entry) = config.entry {
                mode::enter(&fd, entry).map_err(|source| VmError::Mode { index, source })?;
                // KVM keeps application processors waiting for SIPI; this one starts now.
                let runnable = kvm_bindings::kvm_mp_state {
                    mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
                };
                fd.set_mp_state(runnable).map_err(|source| VmError::Mode {
                    index,
                    source: ModeError::Kvm("make the vCPU runnable", source),
                })?;
            }
            fds.push(fd);
        }
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                stop: None,
                error: None,
                pause: false,
                paused: 0,
                live: fds.len(),
            }),
            changed: Condvar::new(),
            attention: AtomicBool::new(false),
            vcpus: (0..fds.len()).map(|_| VcpuShared::default()).collect(),
        });
        let mut running = RunningVm {
            vm: Arc::new(vm),
            shared: shared.clone(),
            threads: Vec::new(),
        };
        for (i, fd) in fds.into_iter().enumerate() {
            let index = i as u32;
            let thread = VcpuThread {
                index,
                fd,
                run_size,
                shared: shared.clone(),
                handler: handler.clone(),
                pio_buf: Box::new([0; 4096]),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || thread.run());
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
