//! What this host's KVM intercepts, found by running a tiny guest.
//!
//! Hosts of the same nominal kind differ in what reaches the VMM (see the crate
//! documentation's table): on nested KVM without hardware assistance, CPUID executed at
//! CPL 3 is intercepted only where the host kernel can use CPUID faulting (Intel's
//! `cpuid_fault`); elsewhere it runs natively and returns the outer host's leaves. And a
//! port-I/O exit to user space costs 1–2 µs on bare-metal KVM, 8 µs on some nested
//! hosts and 66 µs on others. [`probe_host`] measures both in a throw-away VM in a few
//! milliseconds (plus the exits), so such a difference is a one-line finding.
//!
//! ```no_run
//! let probe = vmcraft_vcpu::probe::probe_host()?;
//! println!("{probe}");
//! if !probe.cpuid_traps_at_cpl3 {
//!     // Discover the hypervisor from kernel mode, as real kernels do.
//! }
//! # Ok::<(), vmcraft_vcpu::probe::ProbeError>(())
//! ```

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};
use vmcraft_memory::layout::{LayoutError, MemoryLayout};
use vmcraft_memory::{GuestRam, MemoryError};

use crate::cpu::HypervisorInfo;
use crate::exit::{ExitAction, ExitHandler, StopReason, VcpuRegisters};
use crate::mode::{Entry, Privilege, SEL_USER_CODE, SEL_USER_DATA};
use crate::runner::{RunningVm, VcpuConfig, VmError};
use crate::vm::{Vm, VmCreateError};

/// The signature the probe VM publishes in leaf 0x40000000; its first word ("trap") is
/// what the guest reports, and what no outer host's leaf begins with.
pub const PROBE_SIGNATURE: &[u8; 12] = b"trapprobe@vm";

/// Port-I/O exits the probe times.
pub const TIMED_EXITS: u32 = 1000;

/// Where the probe guest is loaded, and the top of its stack.
const CODE_ADDR: u64 = 0x1_0000;
const STACK_TOP: u64 = 0x2_0000;
/// The ports the probe guest reports on.
const PORT_CPL0_CPUID: u16 = 0x80;
const PORT_CPL3_CPUID: u16 = 0x81;
const PORT_TIMED: u16 = 0x82;
const PORT_DONE: u16 = 0x83;
/// The name the probe's own exit handler stops its VM with.
const PROBE_DEVICE: &str = "probe";
const TIMEOUT: Duration = Duration::from_secs(30);

/// The probe guest, entered at CPL 0 with rdi = the number of timed exits:
///
/// ```text
///  0: b8 00 00 00 40     mov    $0x40000000,%eax
///  5: 31 c9              xor    %ecx,%ecx
///  7: 0f a2              cpuid                        # at CPL 0
///  9: 89 d8              mov    %ebx,%eax
///  b: e7 80              out    %eax,$0x80            # report ebx
///  d: 48 89 e0           mov    %rsp,%rax
/// 10: 6a 23              push   $0x23                 # ss: SEL_USER_DATA
/// 12: 50                 push   %rax                  # rsp
/// 13: 68 02 30 00 00     push   $0x3002               # rflags: IOPL 3
/// 18: 6a 2b              push   $0x2b                 # cs: SEL_USER_CODE
/// 1a: 48 8d 05 03 00 00 00  lea 0x3(%rip),%rax        # 0x24
/// 21: 50                 push   %rax
/// 22: 48 cf              iretq                        # to CPL 3
/// 24: b8 00 00 00 40     mov    $0x40000000,%eax
/// 29: 31 c9              xor    %ecx,%ecx
/// 2b: 0f a2              cpuid                        # at CPL 3
/// 2d: 89 d8              mov    %ebx,%eax
/// 2f: e7 81              out    %eax,$0x81            # report ebx
/// 31: 89 f9              mov    %edi,%ecx
/// 33: e6 82              out    %al,$0x82             # timed exits
/// 35: ff c9              dec    %ecx
/// 37: 75 fa              jne    0x33
/// 39: e6 83              out    %al,$0x83             # done
/// 3b: eb fe              jmp    0x3b
/// ```
const PROBE_CODE: [u8; 61] = [
    0xb8, 0x00, 0x00, 0x00, 0x40, 0x31, 0xc9, 0x0f, 0xa2, 0x89, 0xd8, 0xe7, 0x80, 0x48, 0x89, 0xe0,
    0x6a, 0x23, 0x50, 0x68, 0x02, 0x30, 0x00, 0x00, 0x6a, 0x2b, 0x48, 0x8d, 0x05, 0x03, 0x00, 0x00,
    0x00, 0x50, 0x48, 0xcf, 0xb8, 0x00, 0x00, 0x00, 0x40, 0x31, 0xc9, 0x0f, 0xa2, 0x89, 0xd8, 0xe7,
    0x81, 0x89, 0xf9, 0xe6, 0x82, 0xff, 0xc9, 0x75, 0xfa, 0xe6, 0x83, 0xeb, 0xfe,
];
const _: () = assert!(PROBE_CODE[0x11] as u16 == SEL_USER_DATA);
const _: () = assert!(PROBE_CODE[0x19] as u16 == SEL_USER_CODE);

/// Errors from probing the host.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// The probe VM's memory layout was refused.
    #[error("cannot lay out the probe VM's memory")]
    Layout(#[source] LayoutError),
    /// The probe VM's memory could not be mapped.
    #[error("cannot map the probe VM's memory")]
    Memory(#[source] MemoryError),
    /// The probe VM could not be created.
    #[error("cannot create the probe VM")]
    Vm(#[source] VmCreateError),
    /// The probe guest could not be written.
    #[error("cannot write the probe guest at {CODE_ADDR:#x}")]
    Load(#[source] vm_memory::GuestMemoryError),
    /// Running the probe VM failed.
    #[error("the probe VM failed")]
    Run(#[source] VmError),
    /// The probe guest stopped without reporting everything.
    #[error("the probe guest stopped ({reason:?}) before reporting {missing}")]
    Incomplete {
        /// Why it stopped.
        reason: StopReason,
        /// What it had not reported.
        missing: &'static str,
    },
}

/// What the probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostProbe {
    /// CPUID at CPL 0 returned the VMM's leaf (true on every KVM; false would mean the
    /// VMM's CPUID table is not in effect at all).
    pub cpuid_traps_at_cpl0: bool,
    /// CPUID at CPL 3 returned the VMM's leaf: true on hardware-assisted KVM and on
    /// nested hosts with CPUID faulting; false where CPL-3 CPUID runs natively.
    pub cpuid_traps_at_cpl3: bool,
    /// ebx of leaf 0x40000000 as CPL-3 code saw it (the host's own leaf where CPUID
    /// at CPL 3 is not intercepted).
    pub cpl3_leaf_ebx: u32,
    /// Mean round trip of one port-I/O exit from CPL 3 through this VMM's run loop.
    pub pio_exit: Duration,
}

/// What the probe guest reported, before interpretation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Reports {
    cpl0_ebx: Option<u32>,
    cpl3_ebx: Option<u32>,
    timed: u32,
    first_timed: Option<Instant>,
    last_timed: Option<Instant>,
}

impl Reports {
    /// Interpret the reports; `reason` is why the VM stopped, for the error.
    fn interpret(&self, reason: StopReason) -> Result<HostProbe, ProbeError> {
        let missing = |missing| ProbeError::Incomplete { reason, missing };
        let expected = signature_word(PROBE_SIGNATURE);
        let cpl0 = self.cpl0_ebx.ok_or(missing("CPUID at CPL 0"))?;
        let cpl3 = self.cpl3_ebx.ok_or(missing("CPUID at CPL 3"))?;
        let (Some(first), Some(last)) = (self.first_timed, self.last_timed) else {
            return Err(missing("its timed exits"));
        };
        if self.timed != TIMED_EXITS {
            return Err(missing("all its timed exits"));
        }
        Ok(HostProbe {
            cpuid_traps_at_cpl0: cpl0 == expected,
            cpuid_traps_at_cpl3: cpl3 == expected,
            cpl3_leaf_ebx: cpl3,
            pio_exit: last.duration_since(first) / (TIMED_EXITS - 1),
        })
    }
}

fn signature_word(sig: &[u8; 12]) -> u32 {
    u32::from_le_bytes([sig[0], sig[1], sig[2], sig[3]])
}

#[derive(Default)]
struct ProbeHandler(Mutex<Reports>);

impl ExitHandler for ProbeHandler {
    fn pio_write(&self, port: u16, data: &[u8], _: &mut dyn VcpuRegisters) -> ExitAction {
        let mut r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let word = || {
            let mut w = [0u8; 4];
            let n = data.len().min(4);
            w[..n].copy_from_slice(&data[..n]);
            u32::from_le_bytes(w)
        };
        match port {
            PORT_CPL0_CPUID => r.cpl0_ebx = Some(word()),
            PORT_CPL3_CPUID => r.cpl3_ebx = Some(word()),
            PORT_TIMED => {
                let now = Instant::now();
                r.first_timed.get_or_insert(now);
                r.last_timed = Some(now);
                r.timed += 1;
            }
            PORT_DONE => {
                return ExitAction::Stop(StopReason::Device {
                    device: PROBE_DEVICE,
                    code: 0,
                })
            }
            _ => {}
        }
        ExitAction::Continue
    }
}

/// Whether this host's KVM emulates the guest's kernel mode in software: KVM works
/// but the CPU shows no hardware virtualization (`vmx` or `svm` in `/proc/cpuinfo`),
/// as on nested hosts without hardware assistance. There every privileged
/// instruction a guest kernel runs costs an exit, so a bzImage, which decompresses
/// its kernel at CPL 0, boots many times slower than the ELF vmlinux inside it.
/// `None` if `/proc/cpuinfo` cannot be read.
pub fn kernel_mode_emulated() -> Option<bool> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    Some(cpuinfo_lacks_virtualization(&cpuinfo))
}

fn cpuinfo_lacks_virtualization(cpuinfo: &str) -> bool {
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map_or("", |(_, v)| v);
    !flags.split_whitespace().any(|f| f == "vmx" || f == "svm")
}

/// Run the probe guest in a VM of its own and report what this host intercepts.
/// Takes a few milliseconds plus [`TIMED_EXITS`] port-I/O exits.
pub fn probe_host() -> Result<HostProbe, ProbeError> {
    let layout = MemoryLayout::x86_64(2 << 20).map_err(ProbeError::Layout)?;
    let vm =
        Vm::new(GuestRam::new(&layout).map_err(ProbeError::Memory)?).map_err(ProbeError::Vm)?;
    vm.memory()
        .write_slice(&PROBE_CODE, GuestAddress(CODE_ADDR))
        .map_err(ProbeError::Load)?;
    let handler = Arc::new(ProbeHandler::default());
    let entry = Entry::LongMode {
        rip: CODE_ADDR,
        rsp: STACK_TOP,
        privilege: Privilege::Kernel,
        args: [u64::from(TIMED_EXITS), 0],
    };
    let info = HypervisorInfo {
        signature: *PROBE_SIGNATURE,
        ..HypervisorInfo::default()
    };
    let running = RunningVm::start_with_info(vm, &[VcpuConfig::at(entry)], handler.clone(), info)
        .map_err(ProbeError::Run)?;
    let outcome = running.wait_timeout(TIMEOUT).map_err(ProbeError::Run)?;
    let reports = *handler.0.lock().unwrap_or_else(|p| p.into_inner());
    reports.interpret(outcome.reason)
}

impl fmt::Display for HostProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let said = |traps| {
            if traps {
                "intercepted (the VMM's leaves)"
            } else {
                "NOT intercepted (runs natively)"
            }
        };
        writeln!(f, "CPUID at CPL 0: {}", said(self.cpuid_traps_at_cpl0))?;
        write!(f, "CPUID at CPL 3: {}", said(self.cpuid_traps_at_cpl3))?;
        if !self.cpuid_traps_at_cpl3 {
            let ebx = self.cpl3_leaf_ebx.to_le_bytes();
            write!(
                f,
                "; leaf 0x40000000 there begins {:?}, the outer host's",
                String::from_utf8_lossy(&ebx)
            )?;
        }
        writeln!(f)?;
        write!(
            f,
            "port-I/O exit round trip: {:.1} µs (mean of {} from CPL 3)",
            self.pio_exit.as_secs_f64() * 1e6,
            TIMED_EXITS - 1
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_mode_is_emulated_where_the_cpu_shows_no_virtualization() {
        let with = |flags: &str| format!("processor\t: 0\nflags\t\t: {flags}\nbugs\t: x\n");
        assert!(!cpuinfo_lacks_virtualization(&with("fpu vme svm npt")));
        assert!(!cpuinfo_lacks_virtualization(&with("fpu vmx ept")));
        assert!(cpuinfo_lacks_virtualization(&with("fpu vme hypervisor")));
        assert!(cpuinfo_lacks_virtualization("no flags at all"));
    }

    fn timed(reports: &mut Reports, start: Instant, span: Duration) {
        reports.first_timed = Some(start);
        reports.last_timed = Some(start + span);
        reports.timed = TIMED_EXITS;
    }

    #[test]
    fn reports_are_read_against_the_probe_signature() {
        let now = Instant::now();
        let mut r = Reports {
            cpl0_ebx: Some(u32::from_le_bytes(*b"trap")),
            cpl3_ebx: Some(u32::from_le_bytes(*b"KVMK")),
            ..Reports::default()
        };
        timed(&mut r, now, Duration::from_micros(66 * 999));
        let p = r
            .interpret(StopReason::Device {
                device: PROBE_DEVICE,
                code: 0,
            })
            .unwrap();
        assert!(p.cpuid_traps_at_cpl0);
        assert!(!p.cpuid_traps_at_cpl3);
        assert_eq!(p.pio_exit, Duration::from_micros(66));
        let text = p.to_string();
        assert!(text.contains("CPL 3: NOT intercepted"), "{text}");
        assert!(text.contains("\"KVMK\""), "{text}");
        assert!(text.contains("66.0 µs"), "{text}");

        r.cpl3_ebx = r.cpl0_ebx;
        let p = r
            .interpret(StopReason::Device {
                device: PROBE_DEVICE,
                code: 0,
            })
            .unwrap();
        assert!(p.cpuid_traps_at_cpl3);
        assert!(p.to_string().contains("CPL 3: intercepted"));
    }

    #[test]
    fn a_guest_that_stops_early_is_an_error_naming_what_is_missing() {
        let r = Reports {
            cpl0_ebx: Some(1),
            ..Reports::default()
        };
        let e = r.interpret(StopReason::TripleFault).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the probe guest stopped (TripleFault) before reporting CPUID at CPL 3"
        );
        let mut r = Reports {
            cpl0_ebx: Some(1),
            cpl3_ebx: Some(1),
            ..Reports::default()
        };
        timed(&mut r, Instant::now(), Duration::ZERO);
        r.timed = 3;
        assert!(matches!(
            r.interpret(StopReason::Requested),
            Err(ProbeError::Incomplete {
                missing: "all its timed exits",
                ..
            })
        ));
    }

    #[test]
    fn the_probe_code_reports_on_its_ports() {
        // The immediate operands of the four `out` instructions.
        assert_eq!(PROBE_CODE[0x0c], PORT_CPL0_CPUID as u8);
        assert_eq!(PROBE_CODE[0x30], PORT_CPL3_CPUID as u8);
        assert_eq!(PROBE_CODE[0x34], PORT_TIMED as u8);
        assert_eq!(PROBE_CODE[0x3a], PORT_DONE as u8);
    }
}
