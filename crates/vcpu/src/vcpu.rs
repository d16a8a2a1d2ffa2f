//! A vCPU that any thread can run, one exit at a time, and the kick that makes a
//! running vCPU leave the guest.
//!
//! [`RunningVm`](crate::RunningVm) runs each [`Vcpu`] on a thread of its own; an M:N
//! runtime (a scheduler running many vCPUs on fewer threads) calls [`Vcpu::step`]
//! from its worker threads and preempts with a [`Kicker`].
//!
//! A kick is race-free: the kicker raises a flag, then sends the thread
//! [`kick_signal`]. `step` publishes the vCPU's `kvm_run` to the signal handler before
//! it looks at the flag, so a signal that comes after the look sets
//! `immediate_exit` (KVM_RUN then returns at once, or with EINTR if it was under
//! way), and a flag raised before the look stops the step before it enters.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use kvm_bindings::{kvm_regs, kvm_run, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::cpu::{self, HypervisorInfo};
use crate::exit::{
    dispatch, xen_exit, Exit, ExitAction, ExitError, ExitHandler, StopReason, VcpuRegisters,
    XenHypercall,
};
use crate::mode::{self, ModeError};
use crate::run_page;
use crate::runner::{VcpuConfig, VmError};
use crate::state::{StateError, VcpuState};
use crate::stats::{ExitKind, ExitStats};
use crate::vm::Vm;

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
        // SAFETY: non-null only while `Vcpu::step` runs on this thread with the
        // `Vcpu` (and so its kvm_run mapping) borrowed: the mapping is live.
        unsafe { run_page::request_immediate_exit(run) };
    }
}

pub(crate) fn install_kick_handler() -> Result<(), VmError> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler))
        .map_err(VmError::Signal)
}

/// Makes the vCPU a thread runs leave the guest: a flag plus a signal to the thread.
#[derive(Debug, Default)]
pub struct Kicker {
    pending: AtomicBool,
    /// The thread while it is attached; cleared (under this lock) before it goes
    /// away, so a kicker never signals a finished thread.
    thread: Mutex<Option<libc::pthread_t>>,
}

impl Kicker {
    /// Attach the calling thread: kicks are signalled to it from now on.
    pub fn attach_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(me);
    }

    /// Detach the thread (call before it ends).
    pub fn detach(&self) {
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Raise the flag and signal the attached thread, if any.
    pub fn kick(&self) {
        self.pending.store(true, Ordering::SeqCst);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = *thread {
            // SAFETY: `t` attached itself under this lock and detaches under it before
            // ending, so it is alive; the kick signal has a handler (installed before
            // any vCPU exists), so it is harmless to the thread.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Whether a kick is pending.
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }

    /// Clear the flag; returns whether a kick was pending.
    pub fn take(&self) -> bool {
        self.pending.swap(false, Ordering::SeqCst)
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
    fn translate(&self, gva: u64) -> Result<Option<u64>, kvm_ioctls::Error> {
        let t = self.fd.translate_gva(gva)?;
        Ok((t.valid != 0).then_some(t.physical_address))
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
    Xen(XenHypercall),
    Unhandled(u32),
}

/// What one [`Vcpu::step`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// An exit was handled; the guest can go on.
    Continue(ExitKind),
    /// A kick made the vCPU leave the guest (or kept it from entering).
    Kicked,
    /// The handler stopped the VM.
    Stop(StopReason),
}

/// A configured vCPU, runnable from any thread (one at a time).
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    run_size: usize,
    handler: Arc<dyn ExitHandler>,
    stats: Arc<ExitStats>,
    /// Copy of the port I/O data of the current exit (at most one page).
    pio_buf: Box<[u8; 4096]>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// Clears the signal handler's view of the vCPU when a step ends, however it ends.
struct RunPublished;

impl RunPublished {
    fn new(run: *mut kvm_run) -> Self {
        KVM_RUN.with(|c| c.set(run));
        RunPublished
    }
}

impl Drop for RunPublished {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// Create and configure one vCPU per entry of `configs` (CPUID with `info`, MSRs,
/// FPU, LAPIC, entry state), with every exit going to `handler`. Writes the boot
/// tables if an entry needs them ([`Entry::needs_boot_tables`](crate::mode::Entry::needs_boot_tables);
/// over [`boot_table_ranges`](crate::mode::boot_table_ranges), which the caller keeps
/// free) and installs the kick signal handler.
pub fn create_vcpus(
    vm: &Vm,
    configs: &[VcpuConfig],
    handler: Arc<dyn ExitHandler>,
    info: HypervisorInfo,
) -> Result<Vec<Vcpu>, VmError> {
    if configs.iter().any(VcpuConfig::needs_boot_tables) {
        mode::write_boot_tables(vm.memory())
            .map_err(|source| VmError::Mode { index: 0, source })?;
    }
    let count = configs.len() as u32;
    new_vcpus(vm, configs, handler, |index, fd, config| {
        cpu::configure(vm.kvm(), fd, index, count, info)
            .map_err(|source| VmError::Cpu { index, source })?;
        if let Some(entry) = config.entry {
            mode::enter(fd, entry).map_err(|source| VmError::Mode { index, source })?;
            // KVM keeps application processors waiting for SIPI; this one starts now.
            let runnable = kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            };
            fd.set_mp_state(runnable).map_err(|source| VmError::Mode {
                index,
                source: ModeError::Kvm("make the vCPU runnable", source),
            })?;
        }
        Ok(())
    })
}

/// Create one vCPU per state of `states` in `vm` and put each state back
/// ([`VcpuState::restore`]), with every exit going to `handler`; installs the kick
/// signal handler. The VM's memory and in-kernel devices are restored separately.
pub fn restore_vcpus(
    vm: &Vm,
    states: &[VcpuState],
    handler: Arc<dyn ExitHandler>,
) -> Result<Vec<Vcpu>, VmError> {
    new_vcpus(vm, states, handler, |index, fd, state| {
        state
            .restore(fd, index)
            .map_err(|source| VmError::Restore { index, source })
    })
}

/// One vCPU per item of `items` in `vm`, each set up by `setup` (its index, its fd,
/// its item), with every exit going to `handler`; installs the kick signal handler.
fn new_vcpus<T>(
    vm: &Vm,
    items: &[T],
    handler: Arc<dyn ExitHandler>,
    mut setup: impl FnMut(u32, &VcpuFd, &T) -> Result<(), VmError>,
) -> Result<Vec<Vcpu>, VmError> {
    if items.is_empty() {
        return Err(VmError::NoVcpus);
    }
    install_kick_handler()?;
    let run_size = vm
        .kvm()
        .get_vcpu_mmap_size()
        .map_err(|source| VmError::CreateVcpu { index: 0, source })?;
    let mut vcpus = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let index = i as u32;
        let fd = vm
            .fd()
            .create_vcpu(i as u64)
            .map_err(|source| VmError::CreateVcpu { index, source })?;
        setup(index, &fd, item)?;
        vcpus.push(Vcpu {
            index,
            fd,
            run_size,
            handler: handler.clone(),
            stats: Arc::new(ExitStats::default()),
            pio_buf: Box::new([0; 4096]),
        });
    }
    Ok(vcpus)
}

impl Vcpu {
    /// Its index in the VM.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Its exit statistics (shared: readable while another thread runs it).
    pub fn stats(&self) -> Arc<ExitStats> {
        self.stats.clone()
    }

    /// Whether the guest has halted (waiting for an interrupt inside KVM).
    pub fn halted(&self) -> bool {
        self.fd
            .get_mp_state()
            .is_ok_and(|s| s.mp_state == kvm_bindings::KVM_MP_STATE_HALTED)
    }

    /// Complete the port or MMIO read of the last exit without running the guest:
    /// KVM copies the data into the registers only on the next `KVM_RUN`, which
    /// (with `immediate_exit` set) then returns at once. Afterwards the registers are
    /// consistent and safe to save (KVM's API documentation asks for this before a
    /// migration).
    pub fn complete_pending_io(&mut self) -> Result<(), VmError> {
        self.fd.set_kvm_immediate_exit(1);
        let result = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match result {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            // With immediate_exit set KVM does not enter the guest, so nothing else
            // can come back; an exit here would be a KVM bug worth reporting.
            Ok(()) => Ok(()),
            Err(source) => Err(VmError::Run {
                index: self.index,
                source,
            }),
        }
    }

    /// This vCPU's state, with the MSRs of `msrs` it answers. Call
    /// [`Vcpu::complete_pending_io`] first if it has run.
    pub fn save_state(&self, msrs: &[u32]) -> Result<VcpuState, StateError> {
        VcpuState::save(&self.fd, self.index, msrs)
    }

    /// Enter the guest on the calling thread and handle the exit it comes back with.
    /// A kick of `kicker` (attached to this thread) makes it leave the guest.
    pub fn step(&mut self, kicker: &Kicker) -> Result<Step, VmError> {
        let raw = {
            let _published = RunPublished::new(self.fd.get_kvm_run() as *mut kvm_run);
            if kicker.pending() {
                RawExit::Kicked
            } else {
                self.enter()?
            }
        };
        let start = Instant::now();
        self.fd.set_kvm_immediate_exit(0);
        let (kind, action) = self.handle(raw)?;
        self.stats.record(kind, start.elapsed().as_nanos() as u64);
        Ok(match action {
            ExitAction::Stop(reason) => Step::Stop(reason),
            ExitAction::Continue if kind == ExitKind::Kicked => Step::Kicked,
            ExitAction::Continue => Step::Continue(kind),
        })
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
            Ok(_) => run_page::xen_or_reason(self.fd.get_kvm_run())
                .map_or_else(RawExit::Unhandled, RawExit::Xen),
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
            RawExit::Xen(call) => {
                let (result, action) = xen_exit(call, handler, &mut regs);
                run_page::set_xen_result(self.fd.get_kvm_run(), result);
                (ExitKind::Hypercall, action)
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
