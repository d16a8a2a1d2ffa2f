//! vCPUs for vmcraft virtual machine monitors on KVM (x86-64).
//!
//! * [`Vm`]: the KVM VM with its in-kernel interrupt controller and guest RAM.
//! * [`cpu`]: CPUID (with a vmcraft hypervisor leaf), MSRs, FPU and local APIC setup.
//! * [`mode`]: entry modes: real mode, 64-bit long mode at CPL 0, or at CPL 3 with a
//!   chosen IOPL (what vmcraft's test guests use, because CPL-3 code runs natively on
//!   nested KVM), the Linux 64-bit boot protocol, and the PVH 32-bit entry.
//! * [`linux`]: loading a Linux bzImage or ELF vmlinux with `linux-loader`, with the zero
//!   page, e820 map, command line and initrd.
//! * [`exit`]: exits as plain values and the [`ExitHandler`] trait the embedding program
//!   implements; dispatch is plain code.
//! * [`runner`]: one thread per vCPU, pause/resume/kick/stop, exit statistics.
//! * [`vcpu`]: a vCPU any thread can run one exit at a time, and the kick that makes it
//!   leave the guest, for M:N runtimes.
//! * [`xen`]: Xen hypercalls as exits, through KVM's Xen support.
//! * [`probe`]: what this host's KVM intercepts (CPUID at CPL 0 and CPL 3) and what a
//!   port-I/O exit costs, measured in a throw-away VM.
//!
//! # Which guest instructions reach the VMM, and where
//!
//! A guest's instruction reaches an [`ExitHandler`] only if KVM intercepts it and
//! cannot finish it in the kernel. On hardware-assisted KVM that does not depend on
//! the privilege level. On nested KVM without hardware assistance (the development and
//! CI machines of this project: CPL-3 code runs natively, CPL 0 and real mode are
//! emulated) it does, and it differs between hosts of the same kind. What vmcraft and
//! its tests rely on is the first two rows; everything else a guest must do at CPL 0,
//! as a real kernel does.
//!
//! | instruction | hardware-assisted KVM | nested KVM, CPL 0 | nested KVM, CPL 3 |
//! |---|---|---|---|
//! | port I/O (`in`/`out`/`ins`/`outs`) | exits to the VMM | exits | exits, once the CPU's own IOPL / TSS-bitmap check passes (vmcraft's boot TSS allows every port) |
//! | access to an address no memory slot backs (MMIO) | exits to the VMM | exits | exits |
//! | `cpuid` | always intercepted; answered by KVM from the VMM's table | answered from the VMM's table | **only with CPUID faulting** (Intel hosts with `cpuid_fault` in /proc/cpuinfo); elsewhere (AMD EPYC seen) it runs natively and returns the outer host's leaves |
//! | `hlt` | handled in KVM with the in-kernel LAPIC (the vCPU sleeps there); exits only without it | the same | `#GP` (privileged): never reaches KVM |
//! | `rdmsr`/`wrmsr` | handled in KVM; exits only for MSRs a user-space MSR filter names | the same | `#GP` (privileged) |
//! | `rdtsc`/`rdtscp` | not intercepted: the TSC offset applies in hardware | the same | the same; `#GP` only with CR4.TSD |
//! | `xgetbv` | not intercepted | not intercepted | not intercepted (`#UD` without CR4.OSXSAVE) |
//! | `vmcall`/`vmmcall` | handled in KVM; only `KVM_HC_MAP_GPA_RANGE` reaches user space, and only with `KVM_CAP_EXIT_HYPERCALL` | the same | KVM refuses hypercalls from CPL 3 |
//!
//! So vmcraft's hypercalls trap through a port write, which exits from any CPL, and
//! guests discover the interface through CPUID from kernel mode (the test guests'
//! `GuestMode::Kernel64` in `vmcraft-guest-kit`). [`probe::probe_host`] tells which
//! kind of host a program is on; the example VMM prints it with `--diagnose`.

#[cfg(not(target_arch = "x86_64"))]
compile_error!("vmcraft-vcpu runs x86-64 guests on KVM and builds only for x86_64 Linux hosts");

pub mod cpu;
pub mod exit;
pub mod ioevent;
pub mod linux;
pub mod mode;
pub mod msi;
pub mod probe;
mod run_page;
pub mod runner;
pub mod state;
pub mod stats;
pub mod vcpu;
mod vm;
pub mod xen;

pub use exit::{
    Exit, ExitAction, ExitHandler, StopReason, VcpuFailure, VcpuRegisters, XenHypercall,
};
pub use runner::{RunningVm, VcpuConfig, VmError, VmOutcome};
pub use stats::{ExitKind, ExitStats, ExitStatsSnapshot};
pub use vm::{Vm, VmCreateError};
