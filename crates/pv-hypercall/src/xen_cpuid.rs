//! The CPUID leaves by which an HVM guest finds Xen (Xen's
//! `public/arch-x86/cpuid.h`): the `XenVMMXenVMM` signature, the version, the
//! hypercall-page MSR, and the HVM features (vCPU id, domain id, per-vCPU upcall
//! vectors).
//!
//! Xen's leaves may sit at `0x40000000` or at any later multiple of `0x100` up to
//! `0x40010000`: a guest scans for the signature (Linux's `xen_cpuid_base`). KVM's own
//! leaves are at `0x40000000`; with both, Xen's go to `0x40000100`, where Xen itself puts
//! them beside Viridian's. Linux then takes Xen: its hypervisor detection keeps the
//! candidate whose detection returns the highest value, and Xen's returns its base.

/// The first hypervisor leaf.
pub const FIRST_LEAF: u32 = 0x4000_0000;
/// `XEN_CPUID_SIGNATURE_EBX`: "XenV".
pub const SIGNATURE_EBX: u32 = 0x566e_6558;
/// `XEN_CPUID_SIGNATURE_ECX`: "MMXe".
pub const SIGNATURE_ECX: u32 = 0x6558_4d4d;
/// `XEN_CPUID_SIGNATURE_EDX`: "nVMM".
pub const SIGNATURE_EDX: u32 = 0x4d4d_566e;
/// `XEN_HVM_CPUID_X2APIC_VIRT`.
pub const HVM_X2APIC_VIRT: u32 = 1 << 1;
/// `XEN_HVM_CPUID_VCPU_ID_PRESENT`: EBX of leaf 5 is the vCPU id.
pub const HVM_VCPU_ID_PRESENT: u32 = 1 << 3;
/// `XEN_HVM_CPUID_DOMID_PRESENT`: ECX of leaf 5 is the domain id.
pub const HVM_DOMID_PRESENT: u32 = 1 << 4;
/// `XEN_HVM_CPUID_UPCALL_VECTOR`: `HVMOP_set_evtchn_upcall_vector` is served.
pub const HVM_UPCALL_VECTOR: u32 = 1 << 6;
/// Where Xen's MSRs start (leaf 3's EBX): writing a guest page's address to this MSR
/// asks for the hypercall page there.
pub const HYPERCALL_PAGE_MSR: u32 = 0x4000_0000;

/// One CPUID entry (as KVM's `kvm_cpuid_entry2` carries it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// EAX in: the leaf.
    pub function: u32,
    /// ECX in: the sub-leaf.
    pub index: u32,
    /// Whether the sub-leaf matters (`KVM_CPUID_FLAG_SIGNIFCANT_INDEX`).
    pub indexed: bool,
    /// EAX out.
    pub eax: u32,
    /// EBX out.
    pub ebx: u32,
    /// ECX out.
    pub ecx: u32,
    /// EDX out.
    pub edx: u32,
}

/// What Xen's leaves say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XenCpuid {
    /// Where they start.
    pub base: u32,
    /// The Xen version announced (major, minor).
    pub version: (u16, u16),
    /// The guest's domain id.
    pub domid: u16,
    /// The guest's TSC rate, kHz (leaf 4).
    pub tsc_khz: u32,
}

impl XenCpuid {
    /// Xen's leaves for domain `domid`, placed after the hypervisor leaves already in
    /// `taken` (the functions of the VM's other CPUID entries): at `0x40000000` if free,
    /// else at the first free multiple of `0x100` past them. `None` if none is free.
    pub fn place(taken: &[u32], domid: u16, tsc_khz: u32) -> Option<XenCpuid> {
        let base = (0..0x100u32)
            .map(|i| FIRST_LEAF + 0x100 * i)
            .find(|b| !taken.iter().any(|f| (*b..*b + 0x100).contains(f)))?;
        Some(XenCpuid {
            base,
            version: (4, 17),
            domid,
            tsc_khz,
        })
    }

    /// The leaves, for vCPU `vcpu`: six, from the signature to the PV leaf.
    pub fn leaves(&self, vcpu: u32) -> Vec<Leaf> {
        let b = self.base;
        let leaf = |function, eax, ebx, ecx, edx| Leaf {
            function,
            index: 0,
            indexed: false,
            eax,
            ebx,
            ecx,
            edx,
        };
        vec![
            leaf(b, b + 5, SIGNATURE_EBX, SIGNATURE_ECX, SIGNATURE_EDX),
            leaf(
                b + 1,
                u32::from(self.version.0) << 16 | u32::from(self.version.1),
                0,
                0,
                0,
            ),
            // One hypercall page, Xen's MSRs from 0x40000000, no extra features.
            leaf(b + 2, 1, HYPERCALL_PAGE_MSR, 0, 0),
            // TSC: not emulated, reliable; its rate.
            Leaf {
                indexed: true,
                ..leaf(b + 3, 1 << 1, 2, self.tsc_khz, 0)
            },
            Leaf {
                indexed: true,
                ..leaf(
                    b + 4,
                    HVM_X2APIC_VIRT | HVM_VCPU_ID_PRESENT | HVM_DOMID_PRESENT | HVM_UPCALL_VECTOR,
                    vcpu,
                    u32::from(self.domid),
                    0,
                )
            },
            Leaf {
                indexed: true,
                ..leaf(b + 5, 0, 0, 0, 0)
            },
        ]
    }

    /// Whether `function` is one of these leaves.
    pub fn covers(&self, function: u32) -> bool {
        (self.base..=self.base + 5).contains(&function)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_reads_xenvmmxenvmm() {
        let l = XenCpuid::place(&[], 1, 2_000_000).unwrap().leaves(0)[0];
        let mut sig = Vec::new();
        for r in [l.ebx, l.ecx, l.edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(sig, b"XenVMMXenVMM");
        assert_eq!(l.eax, FIRST_LEAF + 5);
    }

    #[test]
    fn beside_kvms_leaves_xen_takes_the_next_block() {
        // KVM's signature and features leaves.
        let x = XenCpuid::place(&[0x4000_0000, 0x4000_0001], 1, 1).unwrap();
        assert_eq!(x.base, 0x4000_0100);
        let leaves = x.leaves(3);
        assert_eq!(leaves[0].function, 0x4000_0100);
        assert_eq!(leaves[0].eax, 0x4000_0105);
        assert!(leaves.iter().all(|l| x.covers(l.function)));
        // Leaf 5: vCPU and domain ids present.
        let hvm = leaves[4];
        assert_eq!((hvm.ebx, hvm.ecx), (3, 1));
        assert_ne!(hvm.eax & HVM_VCPU_ID_PRESENT, 0);
        assert_ne!(hvm.eax & HVM_DOMID_PRESENT, 0);
        assert_eq!(leaves[1].eax, 0x0004_0011);
        // Every block taken: nowhere to go.
        let all: Vec<u32> = (0..0x100).map(|i| FIRST_LEAF + 0x100 * i).collect();
        assert_eq!(XenCpuid::place(&all, 1, 1), None);
    }
}
