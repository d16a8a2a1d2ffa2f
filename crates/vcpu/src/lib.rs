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

pub mod cpu;
pub mod exit;
pub mod linux;
pub mod mode;
mod run_page;
pub mod runner;
pub mod stats;
pub mod vcpu;
mod vm;

pub use exit::{Exit, ExitAction, ExitHandler, StopReason, VcpuRegisters};
pub use runner::{RunningVm, VcpuConfig, VmError, VmOutcome};
pub use stats::{ExitKind, ExitStats, ExitStatsSnapshot};
pub use vm::{Vm, VmCreateError};
