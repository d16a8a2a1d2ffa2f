//! CPU configuration: CPUID, MSRs, FPU and local APIC.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use thiserror::Error;

/// First CPUID leaf of the hypervisor range, where vmcraft puts its signature.
pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;
/// vmcraft's signature in leaf 0x40000000 (ebx, ecx, edx).
pub const VMCRAFT_SIGNATURE: &[u8; 12] = b"vmcraftvmcra";
/// Where KVM's own paravirtual leaves are moved, so Linux still finds them by scanning.
pub const KVM_LEAF_RELOCATED: u32 = 0x4000_0100;

/// Errors from configuring a vCPU.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CpuError {
    /// A KVM call failed.
    #[error("KVM refused to {what} for vCPU {vcpu}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// vCPU index.
        vcpu: u32,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM set fewer MSRs than asked.
    #[error("KVM set only {set} of {wanted} boot MSRs for vCPU {vcpu}")]
    Msrs {
        /// vCPU index.
        vcpu: u32,
        /// MSRs set.
        set: usize,
        /// MSRs asked for.
        wanted: usize,
    },
}

/// What vmcraft publishes in its hypervisor leaves: the signature in 0x40000000 and
/// these values in 0x40000001.
///
/// ```
/// use vmcraft_vcpu::cpu::{HypervisorInfo, VMCRAFT_SIGNATURE};
///
/// let info = HypervisorInfo { hypercall_port: 0x98, ..HypervisorInfo::default() };
/// assert_eq!(&info.signature, VMCRAFT_SIGNATURE);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HypervisorInfo {
    /// ebx, ecx, edx of leaf 0x40000000: [`VMCRAFT_SIGNATURE`] unless the embedding
    /// program presents another interface.
    pub signature: [u8; 12],
    /// eax: interface version.
    pub version: u32,
    /// ebx: hypercall port (0 when there is none).
    pub hypercall_port: u16,
    /// ecx, edx: free for the embedding program.
    pub extra: [u32; 2],
    /// More leaves for the embedding program to present (another hypervisor's
    /// interface, such as Xen's, after vmcraft's and KVM's), the same for every vCPU.
    pub more_leaves: MoreLeaves,
}

/// Up to [`MoreLeaves::CAPACITY`] extra CPUID entries ([`HypervisorInfo::more_leaves`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MoreLeaves {
    entries: [Option<MoreLeaf>; MoreLeaves::CAPACITY],
}

/// One extra CPUID entry: `function` (and `index`, if `indexed`) to the four registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MoreLeaf {
    /// EAX in.
    pub function: u32,
    /// ECX in.
    pub index: u32,
    /// Whether ECX selects a sub-leaf.
    pub indexed: bool,
    /// EAX, EBX, ECX, EDX out.
    pub registers: [u32; 4],
}

impl MoreLeaves {
    /// How many fit.
    pub const CAPACITY: usize = 8;

    /// Add `leaf`; false if full.
    pub fn push(&mut self, leaf: MoreLeaf) -> bool {
        match self.entries.iter_mut().find(|e| e.is_none()) {
            Some(slot) => {
                *slot = Some(leaf);
                true
            }
            None => false,
        }
    }

    /// The leaves.
    pub fn iter(&self) -> impl Iterator<Item = &MoreLeaf> {
        self.entries.iter().flatten()
    }
}

/// The hypervisor leaves every VM's CPUID has before [`HypervisorInfo::more_leaves`]:
/// vmcraft's at 0x40000000 and KVM's at 0x40000100.
pub const TAKEN_HYPERVISOR_LEAVES: [u32; 2] = [HYPERVISOR_LEAF, KVM_LEAF_RELOCATED];

impl Default for HypervisorInfo {
    fn default() -> Self {
        HypervisorInfo {
            signature: *VMCRAFT_SIGNATURE,
            version: 0,
            hypercall_port: 0,
            extra: [0; 2],
            more_leaves: MoreLeaves::default(),
        }
    }
}

/// Build the CPUID table for vCPU `index` of `count`: KVM's supported set, with the
/// hypervisor bit, this vCPU's APIC ID and topology, and vmcraft's leaves at
/// 0x40000000 (KVM's moved to 0x40000100).
pub fn build_cpuid(
    kvm: &Kvm,
    index: u32,
    count: u32,
    info: HypervisorInfo,
) -> Result<CpuId, CpuError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| CpuError::Kvm {
            what: "report supported CPUID",
            vcpu: index,
            source,
        })?;
    let mut entries = supported.as_slice().to_vec();
    patch_cpuid(&mut entries, index, count, info);
    CpuId::from_entries(&entries).map_err(|_| CpuError::Kvm {
        what: "accept the CPUID table size",
        vcpu: index,
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })
}

/// The pure part of [`build_cpuid`], unit tested without KVM.
pub fn patch_cpuid(
    entries: &mut Vec<kvm_bindings::kvm_cpuid_entry2>,
    index: u32,
    count: u32,
    info: HypervisorInfo,
) {
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ecx |= 1 << 31; // hypervisor present
                e.ebx = (e.ebx & 0x0000_ffff) | (count.min(255) << 16) | (index << 24);
                e.edx |= 1 << 28; // HTT: the count above is meaningful
            }
            0xb | 0x1f => e.edx = index,
            f if (HYPERVISOR_LEAF..HYPERVISOR_LEAF + 0x100).contains(&f) => {
                e.function = f - HYPERVISOR_LEAF + KVM_LEAF_RELOCATED;
                if f == HYPERVISOR_LEAF {
                    e.eax = e.eax.max(HYPERVISOR_LEAF + 1) - HYPERVISOR_LEAF + KVM_LEAF_RELOCATED;
                }
            }
            _ => {}
        }
    }
    let sig = |i: usize| {
        let word = &info.signature[i * 4..i * 4 + 4];
        u32::from_le_bytes([word[0], word[1], word[2], word[3]])
    };
    entries.push(kvm_bindings::kvm_cpuid_entry2 {
        function: HYPERVISOR_LEAF,
        eax: HYPERVISOR_LEAF + 1,
        ebx: sig(0),
        ecx: sig(1),
        edx: sig(2),
        ..Default::default()
    });
    entries.push(kvm_bindings::kvm_cpuid_entry2 {
        function: HYPERVISOR_LEAF + 1,
        eax: info.version,
        ebx: info.hypercall_port.into(),
        ecx: info.extra[0],
        edx: info.extra[1],
        ..Default::default()
    });
    for leaf in info.more_leaves.iter() {
        let [eax, ebx, ecx, edx] = leaf.registers;
        entries.retain(|e| e.function != leaf.function || (leaf.indexed && e.index != leaf.index));
        entries.push(kvm_bindings::kvm_cpuid_entry2 {
            function: leaf.function,
            index: leaf.index,
            flags: if leaf.indexed {
                kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        });
    }
}

/// MSR numbers set at boot.
mod msr {
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const MISC_ENABLE_FAST_STRING: u64 = 1;
}

/// Configure vCPU `index` of `count`: CPUID, boot MSRs, FPU and local APIC (LINT0 as
/// ExtINT, LINT1 as NMI, as firmware leaves them for Linux).
pub fn configure(
    kvm: &Kvm,
    fd: &VcpuFd,
    index: u32,
    count: u32,
    info: HypervisorInfo,
) -> Result<(), CpuError> {
    let kvm_err = |what| {
        move |source| CpuError::Kvm {
            what,
            vcpu: index,
            source,
        }
    };
    let cpuid = build_cpuid(kvm, index, count, info)?;
    fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;

    let entries: Vec<kvm_msr_entry> = [
        (msr::IA32_SYSENTER_CS, 0),
        (msr::IA32_SYSENTER_ESP, 0),
        (msr::IA32_SYSENTER_EIP, 0),
        (msr::STAR, 0),
        (msr::CSTAR, 0),
        (msr::KERNEL_GS_BASE, 0),
        (msr::SYSCALL_MASK, 0),
        (msr::LSTAR, 0),
        (msr::IA32_TSC, 0),
        (msr::IA32_MISC_ENABLE, msr::MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let wanted = entries.len();
    let msrs = Msrs::from_entries(&entries).expect("10 MSR entries fit a KVM MSR list");
    let set = fd.set_msrs(&msrs).map_err(kvm_err("set boot MSRs"))?;
    if set != wanted {
        return Err(CpuError::Msrs {
            vcpu: index,
            set,
            wanted,
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(kvm_err("set the FPU state"))?;

    let mut lapic = fd.get_lapic().map_err(kvm_err("read the local APIC"))?;
    set_lvt_delivery_mode(&mut lapic.regs, APIC_LVT0, DELIVERY_EXTINT);
    set_lvt_delivery_mode(&mut lapic.regs, APIC_LVT1, DELIVERY_NMI);
    fd.set_lapic(&lapic)
        .map_err(kvm_err("set the local APIC"))?;
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const DELIVERY_NMI: u32 = 4;
const DELIVERY_EXTINT: u32 = 7;

fn set_lvt_delivery_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn cpuid_gets_topology_and_vmcraft_leaves() {
        let mut entries = vec![
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_0807,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0000,
                eax: 0x4000_0001,
                ebx: 0x4b4d_564b,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0001,
                eax: 0xabc,
                ..Default::default()
            },
        ];
        let info = HypervisorInfo {
            version: 1,
            hypercall_port: 0x5e0,
            ..HypervisorInfo::default()
        };
        patch_cpuid(&mut entries, 2, 4, info);
        assert_eq!(entries[0].ebx, 0x0204_0807);
        assert_ne!(entries[0].ecx & (1 << 31), 0);
        assert_eq!(
            (entries[1].function, entries[1].eax),
            (0x4000_0100, 0x4000_0101)
        );
        assert_eq!(entries[2].function, 0x4000_0101);
        let sig: Vec<u8> = [entries[3].ebx, entries[3].ecx, entries[3].edx]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(&sig, VMCRAFT_SIGNATURE);
        assert_eq!(
            (entries[4].function, entries[4].eax, entries[4].ebx),
            (0x4000_0001, 1, 0x5e0)
        );
    }

    #[test]
    fn more_leaves_go_after_vmcrafts_and_kvms() {
        let mut info = HypervisorInfo::default();
        for i in 0..MoreLeaves::CAPACITY as u32 {
            assert!(info.more_leaves.push(MoreLeaf {
                function: 0x4000_0200 + i,
                registers: [i, 1, 2, 3],
                ..MoreLeaf::default()
            }));
        }
        assert!(!info.more_leaves.push(MoreLeaf::default()), "full");
        let mut entries = vec![kvm_cpuid_entry2 {
            function: 0x4000_0000,
            ..Default::default()
        }];
        patch_cpuid(&mut entries, 0, 1, info);
        let functions: Vec<u32> = entries.iter().map(|e| e.function).collect();
        assert_eq!(&functions[..3], &[0x4000_0100, 0x4000_0000, 0x4000_0001]);
        assert_eq!(functions.len(), 3 + MoreLeaves::CAPACITY);
        assert_eq!(entries[4].function, 0x4000_0201);
        assert_eq!(entries[4].eax, 1);
        assert!(TAKEN_HYPERVISOR_LEAVES.contains(&0x4000_0100));
    }

    #[test]
    fn lvt_delivery_mode_is_replaced() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0 + 1] = 0x07; // mode bits already set to something
        regs[APIC_LVT0] = 0x30;
        set_lvt_delivery_mode(&mut regs, APIC_LVT0, DELIVERY_NMI);
        assert_eq!(
            (regs[APIC_LVT0] as u8, regs[APIC_LVT0 + 1] as u8),
            (0x30, 0x04)
        );
    }
}
