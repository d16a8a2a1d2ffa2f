//! The KVM virtual machine: `/dev/kvm`, the VM file descriptor, the in-kernel
//! interrupt controller and PIT, and guest RAM registered as memory slots.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vmcraft_memory::{GuestMemory, GuestRam, MemoryError};

/// Guest-physical address of the 3-page region KVM needs for the TSS on Intel hosts;
/// inside the reserved top of the 32-bit MMIO gap.
pub const KVM_TSS_ADDRESS: usize = 0xFFFB_D000;

/// Errors from creating a VM.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum VmCreateError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm (is KVM available, and may this user open it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The KVM API version is not the stable one (12).
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    /// A required KVM capability is missing.
    #[error("KVM lacks the required capability {0}")]
    MissingCapability(&'static str),
    /// A KVM ioctl needed to set the VM up failed.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest RAM could not be registered.
    #[error("cannot register guest RAM with KVM")]
    Memory(#[source] MemoryError),
}

/// The error for a KVM ioctl that refused to do `what`.
fn refused(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmCreateError {
    move |source| VmCreateError::Kvm { what, source }
}

/// A KVM virtual machine with its guest RAM.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    ram: GuestRam,
}

impl Vm {
    /// Open `/dev/kvm`, create a VM with an in-kernel IRQ chip and PIT, and register
    /// `ram` as its memory slots.
    pub fn new(mut ram: GuestRam) -> Result<Self, VmCreateError> {
        let kvm = Kvm::new().map_err(VmCreateError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmCreateError::ApiVersion(version));
        }
        for (cap, name) in [
            (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (kvm_ioctls::Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmCreateError::MissingCapability(name));
            }
        }
        let fd = kvm.create_vm().map_err(refused("create a VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(refused("set the TSS address"))?;
        // Memory slots go in before the IRQ chip: once it exists, every slot change
        // waits for an SRCU grace period (about 5 ms here, most of VM creation).
        ram.register(&fd).map_err(VmCreateError::Memory)?;
        fd.create_irq_chip()
            .map_err(refused("create the in-kernel IRQ chip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(refused("create the in-kernel PIT"))?;
        Ok(Vm { kvm, fd, ram })
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor (for irqfd, ioeventfd, dirty logs, ...).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest memory (cheap to clone).
    pub fn memory(&self) -> &GuestMemory {
        self.ram.memory()
    }

    /// Guest RAM with its slots, for dirty-page tracking.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Guest RAM, mutably (to switch dirty logging on or off).
    pub fn ram_mut(&mut self) -> (&mut GuestRam, &VmFd) {
        (&mut self.ram, &self.fd)
    }
}

/// A handle of its own on the VM behind `vm` (a duplicated file descriptor), for a
/// helper that issues VM ioctls from other threads after the `VmFd` has moved on.
pub(crate) fn dup_vm_fd(vm: &VmFd) -> std::io::Result<std::fs::File> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: the VM fd is open for as long as `vm` is borrowed, which covers the
    // duplication below; the borrowed fd is not kept.
    let fd = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) };
    Ok(std::fs::File::from(fd.try_clone_to_owned()?))
}
