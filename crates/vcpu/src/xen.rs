//! Xen hypercalls through KVM's Xen support (`KVM_CAP_XEN_HVM`).
//!
//! A Linux that finds Xen's CPUID leaves makes hypercalls with `VMCALL` (Intel) or
//! `VMMCALL` (AMD) directly (since 6.13, and in stable kernels since the end of 2024;
//! older ones call through a hypercall page they ask for by writing an MSR). KVM
//! answers those instructions itself, as KVM hypercalls, unless the VM is configured
//! with `KVM_XEN_HVM_CONFIG` and its `INTERCEPT_HCALL` flag: then each one leaves
//! `KVM_RUN` as a `KVM_EXIT_XEN` that the VMM answers
//! ([`ExitHandler::xen_hypercall`](crate::ExitHandler::xen_hypercall)). With the
//! `HYPERCALL_MSR` flag, KVM also fills the hypercall page a guest asks for through
//! the MSR, with stubs that make the same instruction, so old and new guests reach the
//! same handler.
//!
//! KVM keeps a few calls when the guest makes them at CPL 0 and vmcraft has not told
//! it otherwise: `SCHEDOP_yield` and `SCHEDOP_poll` (as a yield), which it answers 0.
//! vmcraft configures none of KVM's own event-channel, shared-info or timer
//! acceleration: those live in vmcraft's structures, so every other call comes out.
//!
//! The support is a host kernel option (`CONFIG_KVM_XEN`): Debian's 6.12 kernel has it,
//! its 6.1 kernel does not, and neither does the KVM of this project's development
//! machines. [`enable_xen_hypercalls`] says so with [`XenSupportError`] instead of
//! leaving the guest to hang.

use kvm_bindings::{
    kvm_xen_hvm_config, KVM_CAP_XEN_HVM, KVM_XEN_HVM_CONFIG_HYPERCALL_MSR,
    KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL,
};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vmm_sys_util::ioctl::ioctl_with_ref;

mod ioctls {
    use kvm_bindings::kvm_xen_hvm_config;
    use vmm_sys_util::ioctl_iow_nr;

    const KVMIO: u32 = 0xae;
    ioctl_iow_nr!(KVM_XEN_HVM_CONFIG, KVMIO, 0x7a, kvm_xen_hvm_config);
    ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_bindings::kvm_msi);
    vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
}
use ioctls::{KVM_GET_TSC_KHZ, KVM_SIGNAL_MSI, KVM_XEN_HVM_CONFIG};

/// The TSC rate `vm`'s vCPUs get by default, kHz (`KVM_GET_TSC_KHZ` on the VM, Linux
/// 5.16 and later), if the host says. What Xen's CPUID leaf 3 and a guest without
/// kvmclock need.
pub fn vm_tsc_khz(vm: &VmFd) -> Option<u32> {
    // SAFETY: KVM_GET_TSC_KHZ takes no argument and returns the rate (or -1 with
    // errno); the VM fd is open.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl(vm, KVM_GET_TSC_KHZ()) };
    u32::try_from(ret).ok().filter(|khz| *khz > 0)
}

/// Sends interrupts to a VM's local APICs as MSIs (`KVM_SIGNAL_MSI`), from any
/// thread: what an HVM guest's per-vCPU upcall vector needs (one vector, one vCPU),
/// without a GSI route per vCPU. Holds its own handle on the VM.
#[derive(Debug)]
pub struct MsiSender {
    vm: std::fs::File,
}

impl MsiSender {
    /// A sender to `vm`'s guest.
    pub fn new(vm: &VmFd) -> std::io::Result<Self> {
        Ok(MsiSender {
            vm: crate::vm::dup_vm_fd(vm)?,
        })
    }

    /// Deliver `vector` to the local APIC whose ID is `apic_id` (fixed delivery,
    /// physical destination, edge). `Ok(false)` if KVM delivered it to no APIC.
    pub fn send(&self, apic_id: u8, vector: u8) -> std::io::Result<bool> {
        let msi = kvm_bindings::kvm_msi {
            address_lo: 0xfee0_0000 | u32::from(apic_id) << 12,
            address_hi: 0,
            data: u32::from(vector),
            ..Default::default()
        };
        // SAFETY: KVM_SIGNAL_MSI reads one kvm_msi, which `msi` is and which lives
        // across the call; the fd is a VM fd (duplicated from one); nothing is written
        // back.
        let ret = unsafe { ioctl_with_ref(&self.vm, KVM_SIGNAL_MSI(), &msi) };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ret > 0)
    }
}

/// The `KVM_XEN_HVM_CONFIG_*` flags vmcraft needs: user-space hypercalls and the
/// hypercall-page MSR.
pub const NEEDED_FLAGS: u32 = KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL | KVM_XEN_HVM_CONFIG_HYPERCALL_MSR;

/// Why Xen hypercalls cannot reach this VMM on this host.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum XenSupportError {
    /// The host's KVM lacks Xen support, or the part vmcraft needs.
    #[error(
        "this host's KVM cannot pass Xen hypercalls to user space: KVM_CAP_XEN_HVM reports \
         flags {flags:#x}, and vmcraft needs {needed:#x} (intercepted hypercalls and the \
         hypercall-page MSR); the host kernel needs CONFIG_KVM_XEN (Debian's 6.12 kernel \
         has it, its 6.1 kernel does not)"
    )]
    Unsupported {
        /// What `KVM_CHECK_EXTENSION(KVM_CAP_XEN_HVM)` returned.
        flags: u32,
        /// What vmcraft needs.
        needed: u32,
    },
    /// The MSR is outside the range KVM accepts for it.
    #[error("hypercall-page MSR {0:#x} is outside 0x40000000..=0x4fffffff, which KVM requires")]
    BadMsr(u32),
    /// `KVM_XEN_HVM_CONFIG` failed.
    #[error("KVM refused KVM_XEN_HVM_CONFIG with flags {flags:#x}, MSR {msr:#x}")]
    Config {
        /// The flags asked for.
        flags: u32,
        /// The MSR asked for.
        msr: u32,
        /// KVM's error.
        #[source]
        source: std::io::Error,
    },
}

/// The `KVM_XEN_HVM_CONFIG_*` flags this host's KVM supports for `vm` (0 without Xen
/// support).
pub fn xen_flags(vm: &VmFd) -> u32 {
    u32::try_from(vm.check_extension_raw(KVM_CAP_XEN_HVM.into())).unwrap_or(0)
}

/// Whether a VM with these supported `flags` can serve Xen hypercalls.
pub fn supports_xen_hypercalls(flags: u32) -> bool {
    flags & NEEDED_FLAGS == NEEDED_FLAGS
}

/// Make every Xen hypercall of `vm`'s guest a `KVM_EXIT_XEN`, and have KVM fill the
/// hypercall page a guest asks for by writing `msr` (Xen's is `0x40000000`, named in
/// its CPUID leaf base + 2). Call before the vCPUs run.
pub fn enable_xen_hypercalls(vm: &VmFd, msr: u32) -> Result<(), XenSupportError> {
    let flags = xen_flags(vm);
    if !supports_xen_hypercalls(flags) {
        return Err(XenSupportError::Unsupported {
            flags,
            needed: NEEDED_FLAGS,
        });
    }
    if !(0x4000_0000..=0x4fff_ffff).contains(&msr) {
        return Err(XenSupportError::BadMsr(msr));
    }
    let config = kvm_xen_hvm_config {
        flags: KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL,
        msr,
        ..Default::default()
    };
    // SAFETY: KVM_XEN_HVM_CONFIG reads one kvm_xen_hvm_config, which `config` is and
    // which lives across the call; the VM fd is open; KVM writes nothing back.
    let ret = unsafe { ioctl_with_ref(vm, KVM_XEN_HVM_CONFIG(), &config) };
    if ret < 0 {
        return Err(XenSupportError::Config {
            flags: config.flags,
            msr,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_errors_say_what_failed_and_with_which_value() {
        let unsupported = XenSupportError::Unsupported {
            flags: 0,
            needed: NEEDED_FLAGS,
        };
        assert!(unsupported.to_string().contains("flags 0x0"));
        assert!(unsupported.to_string().contains("CONFIG_KVM_XEN"));
        assert!(XenSupportError::BadMsr(0x10)
            .to_string()
            .contains("0x10 is outside"));
        let refused = XenSupportError::Config {
            flags: 2,
            msr: 0x4000_0000,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        };
        assert!(refused.to_string().contains("MSR 0x40000000"));
        assert!(std::error::Error::source(&refused).is_some());
    }

    #[test]
    fn both_flags_are_needed() {
        assert!(supports_xen_hypercalls(0x1ff));
        assert!(supports_xen_hypercalls(NEEDED_FLAGS));
        assert!(!supports_xen_hypercalls(KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL));
        assert!(!supports_xen_hypercalls(0));
    }

    #[test]
    fn the_config_ioctl_number_is_the_kernels() {
        // _IOW(0xae, 0x7a, struct kvm_xen_hvm_config) with a 56-byte struct.
        assert_eq!(KVM_XEN_HVM_CONFIG(), 0x4038_ae7a);
    }

    #[test]
    fn an_msi_reaches_a_local_apic_and_a_missing_one_none() {
        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create a VM");
        vm.create_irq_chip().expect("in-kernel IRQ chip");
        let vcpu = vm.create_vcpu(0).expect("a vCPU");
        // The APIC software-enabled (spurious-vector register bit 8), as a guest
        // kernel leaves it.
        let mut lapic = vcpu.get_lapic().expect("read the APIC");
        lapic.regs[0xf0] = -1; // 0xff
        lapic.regs[0xf1] = 0x01;
        vcpu.set_lapic(&lapic).expect("write the APIC");
        let sender = MsiSender::new(&vm).expect("a sender");
        assert!(sender.send(0, 0xf3).expect("KVM_SIGNAL_MSI"));
        assert!(!sender.send(9, 0xf3).expect("KVM_SIGNAL_MSI"), "no APIC 9");
    }

    #[test]
    fn the_vm_tsc_rate_is_the_vcpus() {
        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create a VM");
        let vcpu = vm.create_vcpu(0).expect("a vCPU");
        // Hosts before 5.16 have no VM-wide rate: then there is nothing to compare.
        if let Some(khz) = vm_tsc_khz(&vm) {
            assert_eq!(Some(khz), vcpu.get_tsc_khz().ok());
        }
    }

    #[test]
    fn a_host_without_xen_support_gets_a_clear_error() {
        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create a VM");
        let flags = xen_flags(&vm);
        match enable_xen_hypercalls(&vm, 0x4000_0000) {
            Ok(()) => assert!(supports_xen_hypercalls(flags)),
            Err(XenSupportError::Unsupported { flags: f, needed }) => {
                assert_eq!((f, needed), (flags, NEEDED_FLAGS));
                assert!(!supports_xen_hypercalls(flags));
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
        if supports_xen_hypercalls(flags) {
            let vm = kvm.create_vm().expect("create a VM");
            assert!(matches!(
                enable_xen_hypercalls(&vm, 0x1000),
                Err(XenSupportError::BadMsr(0x1000))
            ));
        }
    }
}
