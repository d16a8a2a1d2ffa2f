//! `HYPERVISOR_xen_version` (17): which Xen this is and what it offers an HVM guest
//! (Xen's `public/version.h` and `public/features.h`).
//!
//! The features are what Xen announces to an HVM or PVH guest less what vmcraft does
//! not serve: the guest's physical map is translated by the hypervisor
//! (`auto_translated_physmap`, `writable_page_tables`), and event-channel upcalls come
//! as an interrupt vector (`hvm_callback_vector`). `hvm_safe_pvclock` is left out, so
//! Linux keeps its local APIC timer and its own clock instead of Xen's timers
//! (which `vcpu_op` does not serve); `hvm_pirqs` is left out, so device interrupts
//! stay interrupts.
//!
//! Commands (the result is the return value, or the struct written at the
//! argument): `version` (major << 16 | minor), `extraversion` (16 bytes),
//! `compile_info`, `capabilities`, `changeset`, `get_features` (`{ submap_idx;
//! submap (out) }`), `pagesize`, `guest_handle` (16 bytes). `commandline` and
//! `build_id` are a privileged domain's: `-EPERM`. Others: `-ENOSYS`.

use crate::hypercall::{HypercallContext, HypercallFault, OpHypercall};
use vmcraft_pv_wire::xen::FeatureInfo;

/// Xen's hypercall number.
pub const HYPERVISOR_XEN_VERSION: u64 = 17;

/// The `XENVER_*` commands.
pub mod cmd {
    /// Major << 16 | minor.
    pub const VERSION: u64 = 0;
    /// `char[16]`.
    pub const EXTRAVERSION: u64 = 1;
    /// `{ char compiler[64]; char compile_by[16]; char compile_domain[32]; char
    /// compile_date[32]; }`.
    pub const COMPILE_INFO: u64 = 2;
    /// `char[1024]`.
    pub const CAPABILITIES: u64 = 3;
    /// `char[64]`.
    pub const CHANGESET: u64 = 4;
    /// `{ unsigned submap_idx; uint32_t submap (out); }`.
    pub const GET_FEATURES: u64 = 6;
    /// Returns the page size.
    pub const PAGESIZE: u64 = 7;
    /// `xen_domain_handle_t` (16 bytes).
    pub const GUEST_HANDLE: u64 = 8;
    /// Xen's command line: privileged.
    pub const COMMANDLINE: u64 = 9;
    /// Xen's build id: privileged.
    pub const BUILD_ID: u64 = 10;
}

/// The `XENFEAT_*` bits of submap 0.
pub mod feature {
    /// `XENFEAT_writable_page_tables`.
    pub const WRITABLE_PAGE_TABLES: u32 = 1 << 0;
    /// `XENFEAT_auto_translated_physmap`.
    pub const AUTO_TRANSLATED_PHYSMAP: u32 = 1 << 2;
    /// `XENFEAT_hvm_callback_vector`.
    pub const HVM_CALLBACK_VECTOR: u32 = 1 << 8;
    /// `XENFEAT_hvm_safe_pvclock` (not offered).
    pub const HVM_SAFE_PVCLOCK: u32 = 1 << 9;
    /// `XENFEAT_hvm_pirqs` (not offered).
    pub const HVM_PIRQS: u32 = 1 << 10;
}

/// What `xen_version` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XenVersion {
    /// Major, minor.
    pub version: (u16, u16),
    /// The feature bits of submap 0.
    pub features: u32,
}

impl Default for XenVersion {
    /// Xen 4.17 (the headers vmcraft's layouts are checked against), with the HVM
    /// features vmcraft serves.
    fn default() -> Self {
        XenVersion {
            version: (4, 17),
            features: feature::WRITABLE_PAGE_TABLES
                | feature::AUTO_TRANSLATED_PHYSMAP
                | feature::HVM_CALLBACK_VECTOR,
        }
    }
}

/// `s` as a NUL-padded field of `len` bytes.
fn field(s: &str, len: usize) -> Vec<u8> {
    let mut b = s.as_bytes()[..s.len().min(len - 1)].to_vec();
    b.resize(len, 0);
    b
}

impl OpHypercall for XenVersion {
    const NR: u64 = HYPERVISOR_XEN_VERSION;
    const NAME: &'static str = "xen_version";

    fn op(
        &self,
        ctx: &HypercallContext<'_>,
        command: u64,
        arg: u64,
    ) -> Result<u64, HypercallFault> {
        let (major, minor) = self.version;
        match command {
            cmd::VERSION => Ok(u64::from(major) << 16 | u64::from(minor)),
            cmd::EXTRAVERSION => ctx.write(arg, &field(".0-vmcraft", 16)).map(|_| 0),
            cmd::COMPILE_INFO => {
                let mut info = field("rustc", 64);
                info.extend(field("vmcraft", 16));
                info.extend(field("vmcraft", 32));
                info.extend(field("", 32));
                ctx.write(arg, &info).map(|_| 0)
            }
            cmd::CAPABILITIES => ctx.write(arg, &field("hvm-3.0-x86_64", 1024)).map(|_| 0),
            cmd::CHANGESET => ctx.write(arg, &field("vmcraft", 64)).map(|_| 0),
            cmd::GET_FEATURES => {
                let mut info: FeatureInfo = ctx.read_obj(arg)?;
                if info.submap_idx != 0 {
                    return Err(HypercallFault::Invalid {
                        index: 1,
                        value: u64::from(info.submap_idx),
                    });
                }
                info.submap = self.features;
                ctx.write_obj(arg, &info).map(|_| 0)
            }
            cmd::PAGESIZE => Ok(4096),
            cmd::GUEST_HANDLE => ctx.write(arg, &[0u8; 16]).map(|_| 0),
            cmd::COMMANDLINE | cmd::BUILD_ID => Err(HypercallFault::NotPermitted(
                "Xen's command line and build id are for a privileged domain",
            )),
            other => Err(HypercallFault::Unsupported(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypercall::errno;
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};
    use vmcraft_memory::GuestMemory;

    #[test]
    fn a_guest_learns_the_version_and_the_hvm_features() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut table = crate::hypercall::HypercallTable::new();
        table.register_op(Arc::new(XenVersion::default())).unwrap();
        let ctx = HypercallContext::physical(0, &mem);
        let call = |command: u64, arg: u64| {
            table.dispatch(
                &ctx,
                crate::hypercall::HypercallArgs {
                    nr: HYPERVISOR_XEN_VERSION,
                    args: [command, arg, 0, 0, 0],
                },
            )
        };
        assert_eq!(call(cmd::VERSION, 0), 0x4_0011);
        assert_eq!(call(cmd::PAGESIZE, 0), 4096);
        mem.write_obj(0u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(call(cmd::GET_FEATURES, 0x1000), 0);
        let features: u32 = mem.read_obj(GuestAddress(0x1004)).unwrap();
        assert_ne!(features & feature::AUTO_TRANSLATED_PHYSMAP, 0);
        assert_ne!(features & feature::HVM_CALLBACK_VECTOR, 0);
        assert_eq!(
            features & (feature::HVM_SAFE_PVCLOCK | feature::HVM_PIRQS),
            0
        );
        mem.write_obj(1u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(call(cmd::GET_FEATURES, 0x1000), -errno::EINVAL);
        assert_eq!(call(cmd::EXTRAVERSION, 0x2000), 0);
        let mut extra = [0u8; 16];
        mem.read_slice(&mut extra, GuestAddress(0x2000)).unwrap();
        assert_eq!(&extra[..11], b".0-vmcraft\0");
        assert_eq!(call(cmd::CAPABILITIES, 0x3000), 0);
        assert_eq!(call(cmd::COMPILE_INFO, 0x3000), 0);
        assert_eq!(call(cmd::CHANGESET, 0x3000), 0);
        assert_eq!(call(cmd::GUEST_HANDLE, 0x3000), 0);
        assert_eq!(call(cmd::EXTRAVERSION, 1 << 40), -errno::EFAULT);
        assert_eq!(call(cmd::COMMANDLINE, 0x3000), -errno::EPERM);
        assert_eq!(call(99, 0x3000), -errno::ENOSYS);
    }
}
