//! vCPU exits as plain values, and the handler the embedding program implements.
//!
//! [`dispatch`] turns one [`Exit`] into calls on an [`ExitHandler`]; it needs no KVM, so
//! the whole policy (which exits stop the VM and why) is unit tested here.

use kvm_bindings::{kvm_regs, kvm_sregs};

/// Why a VM stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// A device stopped the VM with a code whose meaning is the device's own: the
    /// debug-exit port's is the status the guest wrote; an embedder's device can
    /// stop the VM the same way with codes of its own.
    Device {
        /// The device's name, as it gave it.
        device: &'static str,
        /// The device's code.
        code: u32,
    },
    /// The guest reset the machine (i8042 CPU reset, or a KVM reset event).
    Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// The guest powered off (KVM shutdown system event).
    PowerOff,
    /// The guest reported a crash (KVM crash system event).
    Crash,
    /// A vCPU halted with nothing to wake it and the handler chose to stop.
    Halted,
    /// The embedding program asked the VM to stop.
    Requested,
    /// A device could not go on for a reason on the host's side (it could not start
    /// its I/O thread, say); the value is the device's own code (for virtio devices,
    /// the virtio device ID). The VMM has logged what failed.
    DeviceFailed(u32),
    /// A vCPU could not go on: KVM failed it or reported an exit the VM cannot
    /// continue from. Not the guest's doing (that is [`StopReason::Crash`] or
    /// [`StopReason::TripleFault`]); `RunningVm::failure` has the whole error with
    /// the vCPU's registers.
    VcpuFailed(VcpuFailure),
}

/// What made a vCPU fail ([`StopReason::VcpuFailed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum VcpuFailure {
    /// KVM reported an internal error (`KVM_EXIT_INTERNAL_ERROR`): suberror 1 is an
    /// instruction KVM could not emulate.
    KvmInternalError {
        /// KVM's suberror.
        suberror: u32,
    },
    /// The hardware refused to enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    FailedEntry {
        /// The hardware's reason.
        reason: u64,
    },
    /// An exit reason vmcraft does not handle.
    UnhandledExit {
        /// KVM's exit reason.
        reason: u32,
    },
    /// `KVM_RUN` itself failed.
    RunFailed {
        /// Its errno.
        errno: i32,
    },
    /// Anything else on the host's side: the vCPU's state could not be saved, its
    /// thread panicked.
    Host,
}

impl core::fmt::Display for VcpuFailure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VcpuFailure::KvmInternalError { suberror: 1 } => {
                f.write_str("KVM internal error 1 (an instruction KVM could not emulate)")
            }
            VcpuFailure::KvmInternalError { suberror } => {
                write!(f, "KVM internal error {suberror}")
            }
            VcpuFailure::FailedEntry { reason } => {
                write!(f, "VM entry failed, hardware reason {reason:#x}")
            }
            VcpuFailure::UnhandledExit { reason } => write!(f, "unhandled KVM exit {reason}"),
            VcpuFailure::RunFailed { errno } => write!(f, "KVM_RUN failed, errno {errno}"),
            VcpuFailure::Host => f.write_str("a host-side failure"),
        }
    }
}

impl From<&ExitError> for VcpuFailure {
    fn from(e: &ExitError) -> Self {
        match *e {
            ExitError::InternalError(suberror) => VcpuFailure::KvmInternalError { suberror },
            ExitError::FailEntry(reason) => VcpuFailure::FailedEntry { reason },
            ExitError::Unhandled(reason) => VcpuFailure::UnhandledExit { reason },
        }
    }
}

/// A short phrase: "debug-exit (code 0)", "guest power-off".
impl core::fmt::Display for StopReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StopReason::Device { device, code } => write!(f, "{device} (code {code})"),
            StopReason::Reset => f.write_str("guest reset"),
            StopReason::TripleFault => f.write_str("triple fault"),
            StopReason::PowerOff => f.write_str("guest power-off"),
            StopReason::Crash => f.write_str("guest crash"),
            StopReason::Halted => f.write_str("every vCPU halted"),
            StopReason::Requested => f.write_str("stop requested by the embedding program"),
            StopReason::DeviceFailed(code) => write!(f, "host-side failure of device {code}"),
            StopReason::VcpuFailed(failure) => write!(f, "vCPU failed: {failure}"),
        }
    }
}

/// What the run loop does after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Continue,
    /// Stop the whole VM.
    Stop(StopReason),
}

/// One vCPU exit, with the data of the access it reports.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit<'a> {
    /// Port read of `data.len()` bytes (1, 2 or 4); the handler fills `data`.
    PioRead {
        /// I/O port.
        port: u16,
        /// Buffer to fill.
        data: &'a mut [u8],
    },
    /// Port write.
    PioWrite {
        /// I/O port.
        port: u16,
        /// Bytes written by the guest.
        data: &'a [u8],
    },
    /// MMIO read of `data.len()` bytes (1 to 8); the handler fills `data`.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Buffer to fill.
        data: &'a mut [u8],
    },
    /// MMIO write.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// Bytes written by the guest.
        data: &'a [u8],
    },
    /// The guest executed HLT and KVM returned to user space.
    Hlt,
    /// Triple fault.
    Shutdown,
    /// A KVM system event (`KVM_SYSTEM_EVENT_*`).
    SystemEvent(u32),
    /// The run was interrupted by a kick (signal or immediate exit).
    Kicked,
    /// KVM could not handle the exit itself (`KVM_EXIT_INTERNAL_ERROR`).
    InternalError {
        /// KVM's suberror code.
        suberror: u32,
    },
    /// VM entry failed.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// A Xen hypercall KVM passed out ([`crate::xen`]); the handler sets `result`
    /// (the guest's `rax`: a value, or a negative errno).
    XenHypercall {
        /// The call.
        call: XenHypercall,
        /// Its result.
        result: &'a mut i64,
    },
    /// An exit reason vmcraft does not handle (the raw `KVM_EXIT_*` value).
    Unhandled(u32),
}

/// A Xen hypercall as KVM reports it (`KVM_EXIT_XEN_HCALL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XenHypercall {
    /// The hypercall number (`rax`).
    pub nr: u64,
    /// The arguments: `rdi, rsi, rdx, r10, r8, r9` in 64-bit mode, `ebx, ecx, edx,
    /// esi, edi, ebp` in 32-bit mode.
    pub params: [u64; 6],
    /// Whether the guest was in 64-bit mode.
    pub longmode: bool,
    /// The privilege level it called from.
    pub cpl: u8,
}

/// `ENOSYS`, what an unserved Xen hypercall returns.
pub const XEN_ENOSYS: i64 = 38;

/// Access to the registers of the vCPU that exited, for handlers that need them
/// (hypercalls read arguments from and write results to registers).
pub trait VcpuRegisters {
    /// Index of the vCPU (0-based).
    fn vcpu_index(&self) -> u32;
    /// General-purpose registers.
    fn regs(&self) -> Result<kvm_regs, kvm_ioctls::Error>;
    /// Write the general-purpose registers.
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), kvm_ioctls::Error>;
    /// Segment and control registers.
    fn sregs(&self) -> Result<kvm_sregs, kvm_ioctls::Error>;
    /// The guest-physical address the guest-linear address `gva` maps to in the
    /// vCPU's current page tables (`KVM_TRANSLATE`), or `None` if nothing maps it.
    /// Hypercalls from paging guests pass linear addresses. The default, for test
    /// doubles of guests without paging, is the identity.
    fn translate(&self, gva: u64) -> Result<Option<u64>, kvm_ioctls::Error> {
        Ok(Some(gva))
    }
}

/// What the embedding program does with each exit. Shared by all vCPU threads, so the
/// methods take `&self`; devices keep their own locks.
///
/// Every method has a default, so a handler implements only what it serves: unclaimed
/// reads return all ones, unclaimed writes are dropped, HLT stops the VM.
pub trait ExitHandler: Send + Sync {
    /// A port read. Fill `data`.
    fn pio_read(&self, port: u16, data: &mut [u8], vcpu: &mut dyn VcpuRegisters) -> ExitAction {
        let _ = (port, vcpu);
        data.fill(0xff);
        ExitAction::Continue
    }
    /// A port write.
    fn pio_write(&self, port: u16, data: &[u8], vcpu: &mut dyn VcpuRegisters) -> ExitAction {
        let _ = (port, data, vcpu);
        ExitAction::Continue
    }
    /// An MMIO read. Fill `data`.
    fn mmio_read(&self, addr: u64, data: &mut [u8], vcpu: &mut dyn VcpuRegisters) -> ExitAction {
        let _ = (addr, vcpu);
        data.fill(0xff);
        ExitAction::Continue
    }
    /// An MMIO write.
    fn mmio_write(&self, addr: u64, data: &[u8], vcpu: &mut dyn VcpuRegisters) -> ExitAction {
        let _ = (addr, data, vcpu);
        ExitAction::Continue
    }
    /// The vCPU halted (only reaches user space without an in-kernel LAPIC).
    fn halted(&self, vcpu: &mut dyn VcpuRegisters) -> ExitAction {
        let _ = vcpu;
        ExitAction::Stop(StopReason::Halted)
    }
    /// The vCPU came out of the guest because it was kicked.
    fn kicked(&self, vcpu: &mut dyn VcpuRegisters) -> ExitAction {
        let _ = vcpu;
        ExitAction::Continue
    }
    /// A Xen hypercall ([`crate::xen`]): set `result` to what the guest's `rax` gets.
    /// Unserved calls get `-ENOSYS`.
    fn xen_hypercall(
        &self,
        call: &XenHypercall,
        result: &mut i64,
        vcpu: &mut dyn VcpuRegisters,
    ) -> ExitAction {
        let _ = (call, vcpu);
        *result = -XEN_ENOSYS;
        ExitAction::Continue
    }
}

/// A VM-fatal condition found while dispatching an exit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExitError {
    /// KVM reported an internal error.
    #[error("KVM internal error, suberror {0}")]
    InternalError(u32),
    /// VM entry failed.
    #[error("VM entry failed, hardware reason {0:#x}")]
    FailEntry(u64),
    /// An exit reason vmcraft does not handle.
    #[error("unhandled KVM exit reason {0}")]
    Unhandled(u32),
}

/// `KVM_SYSTEM_EVENT_SHUTDOWN`.
pub const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
/// `KVM_SYSTEM_EVENT_RESET`.
pub const SYSTEM_EVENT_RESET: u32 = 2;
/// `KVM_SYSTEM_EVENT_CRASH`.
pub const SYSTEM_EVENT_CRASH: u32 = 3;

/// A Xen hypercall exit through `handler`: the result for the guest's `rax` (`-ENOSYS`
/// unless the handler says otherwise) and what the run loop does.
pub(crate) fn xen_exit(
    call: XenHypercall,
    handler: &dyn ExitHandler,
    vcpu: &mut dyn VcpuRegisters,
) -> (i64, Result<ExitAction, ExitError>) {
    let mut result = -XEN_ENOSYS;
    let action = dispatch(
        Exit::XenHypercall {
            call,
            result: &mut result,
        },
        handler,
        vcpu,
    );
    (result, action)
}

/// Route one exit to `handler`, or decide it directly.
pub fn dispatch(
    exit: Exit<'_>,
    handler: &dyn ExitHandler,
    vcpu: &mut dyn VcpuRegisters,
) -> Result<ExitAction, ExitError> {
    Ok(match exit {
        Exit::PioRead { port, data } => handler.pio_read(port, data, vcpu),
        Exit::PioWrite { port, data } => handler.pio_write(port, data, vcpu),
        Exit::MmioRead { addr, data } => handler.mmio_read(addr, data, vcpu),
        Exit::MmioWrite { addr, data } => handler.mmio_write(addr, data, vcpu),
        Exit::Hlt => handler.halted(vcpu),
        Exit::Kicked => handler.kicked(vcpu),
        Exit::Shutdown => ExitAction::Stop(StopReason::TripleFault),
        Exit::SystemEvent(SYSTEM_EVENT_RESET) => ExitAction::Stop(StopReason::Reset),
        Exit::SystemEvent(SYSTEM_EVENT_CRASH) => ExitAction::Stop(StopReason::Crash),
        Exit::SystemEvent(_) => ExitAction::Stop(StopReason::PowerOff),
        Exit::InternalError { suberror } => return Err(ExitError::InternalError(suberror)),
        Exit::FailEntry { reason } => return Err(ExitError::FailEntry(reason)),
        Exit::XenHypercall { call, result } => handler.xen_hypercall(&call, result, vcpu),
        Exit::Unhandled(reason) => return Err(ExitError::Unhandled(reason)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct FakeRegs(kvm_regs);
    impl VcpuRegisters for FakeRegs {
        fn vcpu_index(&self) -> u32 {
            3
        }
        fn regs(&self) -> Result<kvm_regs, kvm_ioctls::Error> {
            Ok(self.0)
        }
        fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), kvm_ioctls::Error> {
            self.0 = *regs;
            Ok(())
        }
        fn sregs(&self) -> Result<kvm_sregs, kvm_ioctls::Error> {
            Ok(kvm_sregs::default())
        }
    }

    /// Records writes; port 0x10 reads 0x42; a write to port 0xf4 stops with its value;
    /// port 0x500 is a "hypercall": rax += rdi.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);
    impl ExitHandler for Recorder {
        fn pio_read(&self, port: u16, data: &mut [u8], _: &mut dyn VcpuRegisters) -> ExitAction {
            data.fill(if port == 0x10 { 0x42 } else { 0xff });
            ExitAction::Continue
        }
        fn pio_write(&self, port: u16, data: &[u8], vcpu: &mut dyn VcpuRegisters) -> ExitAction {
            self.0.lock().unwrap().push((port.into(), data.to_vec()));
            match port {
                0xf4 => ExitAction::Stop(StopReason::Device {
                    device: "test",
                    code: data[0].into(),
                }),
                0x500 => {
                    let mut r = vcpu.regs().unwrap();
                    r.rax += r.rdi;
                    vcpu.set_regs(&r).unwrap();
                    ExitAction::Continue
                }
                _ => ExitAction::Continue,
            }
        }
        fn mmio_write(&self, addr: u64, data: &[u8], _: &mut dyn VcpuRegisters) -> ExitAction {
            self.0.lock().unwrap().push((addr, data.to_vec()));
            ExitAction::Continue
        }
    }

    #[test]
    fn accesses_reach_the_handler_with_their_data() {
        let h = Recorder::default();
        let mut regs = FakeRegs(kvm_regs::default());
        let mut buf = [0u8; 2];
        let a = dispatch(
            Exit::PioRead {
                port: 0x10,
                data: &mut buf,
            },
            &h,
            &mut regs,
        );
        assert_eq!((a, buf), (Ok(ExitAction::Continue), [0x42, 0x42]));
        let a = dispatch(
            Exit::MmioWrite {
                addr: 0xd000_0000,
                data: &[1, 2, 3, 4, 5, 6, 7, 8],
            },
            &h,
            &mut regs,
        );
        assert_eq!(a, Ok(ExitAction::Continue));
        assert_eq!(
            h.0.lock().unwrap()[0],
            (0xd000_0000, vec![1, 2, 3, 4, 5, 6, 7, 8])
        );
        assert_eq!(
            dispatch(
                Exit::PioWrite {
                    port: 0xf4,
                    data: &[7]
                },
                &h,
                &mut regs
            ),
            Ok(ExitAction::Stop(StopReason::Device {
                device: "test",
                code: 7
            }))
        );
    }

    #[test]
    fn handler_reaches_registers() {
        let h = Recorder::default();
        let mut regs = FakeRegs(kvm_regs {
            rax: 5,
            rdi: 37,
            ..Default::default()
        });
        dispatch(
            Exit::PioWrite {
                port: 0x500,
                data: &[0; 4],
            },
            &h,
            &mut regs,
        )
        .unwrap();
        assert_eq!(regs.0.rax, 42);
    }

    #[test]
    fn defaults_read_all_ones_and_stop_on_halt() {
        struct Nothing;
        impl ExitHandler for Nothing {}
        let mut regs = FakeRegs(kvm_regs::default());
        let mut buf = [0u8; 8];
        dispatch(
            Exit::MmioRead {
                addr: 0,
                data: &mut buf,
            },
            &Nothing,
            &mut regs,
        )
        .unwrap();
        assert_eq!(buf, [0xff; 8]);
        assert_eq!(
            dispatch(Exit::Hlt, &Nothing, &mut regs),
            Ok(ExitAction::Stop(StopReason::Halted))
        );
        assert_eq!(
            dispatch(Exit::Kicked, &Nothing, &mut regs),
            Ok(ExitAction::Continue)
        );
    }

    #[test]
    fn an_unserved_xen_hypercall_gets_enosys_and_a_served_one_its_value() {
        struct Nothing;
        impl ExitHandler for Nothing {}
        struct Version;
        impl ExitHandler for Version {
            fn xen_hypercall(
                &self,
                call: &XenHypercall,
                result: &mut i64,
                _: &mut dyn VcpuRegisters,
            ) -> ExitAction {
                *result = if call.nr == 17 { 0x4_0011 } else { -1 };
                ExitAction::Continue
            }
        }
        let mut regs = FakeRegs(kvm_regs::default());
        let call = XenHypercall {
            nr: 17,
            params: [0; 6],
            longmode: true,
            cpl: 0,
        };
        let mut result = 0;
        let exit = Exit::XenHypercall {
            call,
            result: &mut result,
        };
        assert_eq!(
            dispatch(exit, &Nothing, &mut regs),
            Ok(ExitAction::Continue)
        );
        assert_eq!(result, -XEN_ENOSYS);
        let exit = Exit::XenHypercall {
            call,
            result: &mut result,
        };
        dispatch(exit, &Version, &mut regs).unwrap();
        assert_eq!(result, 0x4_0011);
        assert_eq!(
            xen_exit(call, &Version, &mut regs),
            (0x4_0011, Ok(ExitAction::Continue))
        );
        assert_eq!(xen_exit(call, &Nothing, &mut regs).0, -XEN_ENOSYS);
    }

    #[test]
    fn machine_events_stop_or_fail() {
        struct Nothing;
        impl ExitHandler for Nothing {}
        let mut r = FakeRegs(kvm_regs::default());
        let d = |e, r: &mut FakeRegs| dispatch(e, &Nothing, r);
        assert_eq!(
            d(Exit::Shutdown, &mut r),
            Ok(ExitAction::Stop(StopReason::TripleFault))
        );
        assert_eq!(
            d(Exit::SystemEvent(SYSTEM_EVENT_RESET), &mut r),
            Ok(ExitAction::Stop(StopReason::Reset))
        );
        assert_eq!(
            d(Exit::SystemEvent(SYSTEM_EVENT_SHUTDOWN), &mut r),
            Ok(ExitAction::Stop(StopReason::PowerOff))
        );
        assert_eq!(
            d(Exit::SystemEvent(SYSTEM_EVENT_CRASH), &mut r),
            Ok(ExitAction::Stop(StopReason::Crash))
        );
        assert_eq!(
            d(Exit::InternalError { suberror: 1 }, &mut r),
            Err(ExitError::InternalError(1))
        );
        assert_eq!(
            d(Exit::FailEntry { reason: 0x21 }, &mut r),
            Err(ExitError::FailEntry(0x21))
        );
        assert_eq!(
            d(Exit::Unhandled(99), &mut r),
            Err(ExitError::Unhandled(99))
        );
    }
}
