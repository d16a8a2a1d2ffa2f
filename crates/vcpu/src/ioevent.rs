//! Notification addresses that move: ioeventfds assigned and deassigned from any
//! thread (a vCPU's, when the guest moves a PCI BAR) through a handle of their own on
//! the VM.

use kvm_bindings::kvm_ioeventfd;
use kvm_ioctls::VmFd;
use std::os::fd::AsRawFd;
use vmm_sys_util::eventfd::EventFd;

mod ioctls {
    use kvm_bindings::{kvm_ioeventfd, KVMIO};
    vmm_sys_util::ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
}

/// Deassign instead of assign.
const FLAG_DEASSIGN: u32 = 1 << 2;

/// A handle on the VM for MMIO ioeventfds that match any value and any width.
#[derive(Debug)]
pub struct IoEvents {
    vm: std::fs::File,
}

impl IoEvents {
    /// A handle on `vm`.
    pub fn new(vm: &VmFd) -> std::io::Result<Self> {
        Ok(IoEvents {
            vm: crate::vm::dup_vm_fd(vm)?,
        })
    }

    fn ioctl(&self, fd: &EventFd, addr: u64, flags: u32) -> std::io::Result<()> {
        let request = kvm_ioeventfd {
            addr,
            len: 0,
            fd: fd.as_raw_fd(),
            flags,
            ..Default::default()
        };
        // SAFETY: KVM_IOEVENTFD reads one kvm_ioeventfd, which `request` is and which
        // lives across the call; the fd is a VM fd; nothing is written back.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(&self.vm, ioctls::KVM_IOEVENTFD(), &request)
        };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Signal `fd` on a guest write of any width and value at MMIO address `addr`.
    pub fn assign(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.ioctl(fd, addr, 0)
    }

    /// Stop signalling `fd` for writes at `addr`.
    pub fn deassign(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.ioctl(fd, addr, FLAG_DEASSIGN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_assigned_once_and_deassigned_once() {
        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create a VM");
        let events = IoEvents::new(&vm).unwrap();
        let fd = EventFd::new(0).unwrap();
        events.assign(&fd, 0xe000_3000).unwrap();
        assert!(
            events.assign(&fd, 0xe000_3000).is_err(),
            "twice at one address"
        );
        events.deassign(&fd, 0xe000_3000).unwrap();
        assert!(
            events.deassign(&fd, 0xe000_3000).is_err(),
            "not assigned any more"
        );
        events.assign(&fd, 0xe001_3000).unwrap();
    }
}
