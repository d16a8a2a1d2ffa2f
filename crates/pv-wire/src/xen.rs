//! The argument structures of the Xen hypercalls a guest makes, laid out as Xen's
//! public headers define them for x86-64 (`hvm/hvm_op.h`, `hvm/params.h`,
//! `memory.h`, `vcpu.h`, `event_channel.h`, `grant_table.h`, `sched.h`,
//! `version.h`): `#[repr(C)]`, little-endian, with the implicit padding of the C
//! layout written out as fields, so that every byte of each has a name and any bit
//! pattern is a valid value.
//!
//! With the `vm-memory` feature each implements `vm_memory::ByteValued`, which is how
//! the host reads them from guest memory.

/// `xen_hvm_param` (`HVMOP_set_param`, `HVMOP_get_param`): 16 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct HvmParam {
    /// The domain (`DOMID_SELF` from a guest).
    pub domid: u16,
    /// Padding.
    pub pad: u16,
    /// The parameter (`HVM_PARAM_*`).
    pub index: u32,
    /// Its value (in for set, out for get).
    pub value: u64,
}

/// `xen_hvm_evtchn_upcall_vector` (`HVMOP_set_evtchn_upcall_vector`): 8 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct HvmEvtchnUpcallVector {
    /// The vCPU.
    pub vcpu: u32,
    /// The interrupt vector its upcall comes on.
    pub vector: u8,
    /// Padding.
    pub pad: [u8; 3],
}

/// `xen_add_to_physmap` (`XENMEM_add_to_physmap`): 24 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct AddToPhysmap {
    /// The domain.
    pub domid: u16,
    /// Pages in a `XENMAPSPACE_gmfn_range` request.
    pub size: u16,
    /// What to map (`XENMAPSPACE_*`).
    pub space: u32,
    /// Which page of that space.
    pub idx: u64,
    /// The guest frame it goes to.
    pub gpfn: u64,
}

/// `xen_memory_reservation` (`XENMEM_increase_reservation`,
/// `XENMEM_decrease_reservation`): 32 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct MemoryReservation {
    /// Guest address of the array of frame numbers.
    pub extent_start: u64,
    /// How many extents.
    pub nr_extents: u64,
    /// Each extent is `2^extent_order` pages.
    pub extent_order: u32,
    /// `XENMEMF_*` flags.
    pub mem_flags: u32,
    /// The domain.
    pub domid: u16,
    /// Padding.
    pub pad: [u16; 3],
}

/// `vcpu_register_vcpu_info` (`VCPUOP_register_vcpu_info`): 16 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct RegisterVcpuInfo {
    /// The guest frame holding the `vcpu_info`.
    pub mfn: u64,
    /// Its offset in that frame.
    pub offset: u32,
    /// Reserved.
    pub rsvd: u32,
}

/// `evtchn_alloc_unbound` (`EVTCHNOP_alloc_unbound`): 8 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct EvtchnAllocUnbound {
    /// The domain allocating.
    pub dom: u16,
    /// The domain that may bind the other end.
    pub remote_dom: u16,
    /// Out: the port.
    pub port: u32,
}

/// `evtchn_bind_virq` (`EVTCHNOP_bind_virq`): 12 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct EvtchnBindVirq {
    /// The virtual IRQ (`VIRQ_*`).
    pub virq: u32,
    /// The vCPU it is delivered to.
    pub vcpu: u32,
    /// Out: the port.
    pub port: u32,
}

/// `evtchn_bind_ipi` (`EVTCHNOP_bind_ipi`): 8 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct EvtchnBindIpi {
    /// The vCPU it is delivered to.
    pub vcpu: u32,
    /// Out: the port.
    pub port: u32,
}

/// `evtchn_bind_vcpu` (`EVTCHNOP_bind_vcpu`): 8 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct EvtchnBindVcpu {
    /// The port.
    pub port: u32,
    /// The vCPU it is to be delivered to.
    pub vcpu: u32,
}

/// `evtchn_send`, `evtchn_close`, `evtchn_unmask`: one port, 4 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct EvtchnPort {
    /// The port.
    pub port: u32,
}

/// `evtchn_status` (`EVTCHNOP_status`): 24 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct EvtchnStatus {
    /// The domain.
    pub dom: u16,
    /// Padding.
    pub pad: u16,
    /// The port asked about.
    pub port: u32,
    /// Out: `EVTCHNSTAT_*`.
    pub status: u32,
    /// Out: the vCPU it is delivered to.
    pub vcpu: u32,
    /// Out: the union `u` (a remote domain, a VIRQ, a PIRQ), as one word.
    pub detail: u64,
}

/// `gnttab_query_size` (`GNTTABOP_query_size`): 16 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct GnttabQuerySize {
    /// The domain.
    pub dom: u16,
    /// Padding.
    pub pad: u16,
    /// Out: frames in use.
    pub nr_frames: u32,
    /// Out: the most frames the table may have.
    pub max_nr_frames: u32,
    /// Out: `GNTST_*`.
    pub status: i16,
    /// Padding.
    pub pad2: u16,
}

/// `gnttab_set_version` (`GNTTABOP_set_version`): 4 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct GnttabSetVersion {
    /// In: the version asked for; out: the version in force.
    pub version: u32,
}

/// `gnttab_get_version` (`GNTTABOP_get_version`): 8 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct GnttabGetVersion {
    /// The domain.
    pub dom: u16,
    /// Padding.
    pub pad: u16,
    /// Out: the version.
    pub version: u32,
}

/// `sched_shutdown` (`SCHEDOP_shutdown`, `SCHEDOP_shutdown_code`): 4 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct SchedShutdown {
    /// `SHUTDOWN_*`.
    pub reason: u32,
}

/// `xen_feature_info` (`XENVER_get_features`): 8 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct FeatureInfo {
    /// Which 32-feature word.
    pub submap_idx: u32,
    /// Out: the word.
    pub submap: u32,
}

/// A domain id alone (`XENMEM_current_reservation`, `XENMEM_maximum_reservation`
/// take a pointer to one): 2 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct DomId {
    /// The domain.
    pub domid: u16,
}

/// A guest frame number in an array of them (`xen_pfn_t`): 8 bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Pfn {
    /// The frame.
    pub pfn: u64,
}

macro_rules! wire_structs {
    ($($t:ident = $size:expr),* $(,)?) => {
        $(const _: () = assert!(core::mem::size_of::<$t>() == $size);)*
        #[cfg(feature = "vm-memory")]
        mod byte_valued {
            use super::*;
            $(
                // SAFETY: `#[repr(C)]` integers and integer arrays whose padding is
                // written out as fields (the size is asserted above to be the sum of
                // the fields): no padding bytes, and any bit pattern is a valid value.
                unsafe impl vm_memory::ByteValued for $t {}
            )*
        }
    };
}

wire_structs! {
    HvmParam = 16,
    HvmEvtchnUpcallVector = 8,
    AddToPhysmap = 24,
    MemoryReservation = 32,
    RegisterVcpuInfo = 16,
    EvtchnAllocUnbound = 8,
    EvtchnBindVirq = 12,
    EvtchnBindIpi = 8,
    EvtchnBindVcpu = 8,
    EvtchnPort = 4,
    EvtchnStatus = 24,
    GnttabQuerySize = 16,
    GnttabSetVersion = 4,
    GnttabGetVersion = 8,
    SchedShutdown = 4,
    FeatureInfo = 8,
    DomId = 2,
    Pfn = 8,
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    /// Field offsets as Xen's x86-64 headers put them (the ones a misread would move).
    #[test]
    fn fields_sit_where_xen_puts_them() {
        assert_eq!(offset_of!(HvmParam, index), 4);
        assert_eq!(offset_of!(HvmParam, value), 8);
        assert_eq!(offset_of!(HvmEvtchnUpcallVector, vector), 4);
        assert_eq!(offset_of!(AddToPhysmap, space), 4);
        assert_eq!(offset_of!(AddToPhysmap, idx), 8);
        assert_eq!(offset_of!(AddToPhysmap, gpfn), 16);
        assert_eq!(offset_of!(MemoryReservation, extent_order), 16);
        assert_eq!(offset_of!(MemoryReservation, domid), 24);
        assert_eq!(offset_of!(RegisterVcpuInfo, offset), 8);
        assert_eq!(offset_of!(EvtchnAllocUnbound, remote_dom), 2);
        assert_eq!(offset_of!(EvtchnAllocUnbound, port), 4);
        assert_eq!(offset_of!(EvtchnBindVirq, port), 8);
        assert_eq!(offset_of!(EvtchnStatus, port), 4);
        assert_eq!(offset_of!(EvtchnStatus, status), 8);
        assert_eq!(offset_of!(EvtchnStatus, vcpu), 12);
        assert_eq!(offset_of!(EvtchnStatus, detail), 16);
        assert_eq!(offset_of!(GnttabQuerySize, nr_frames), 4);
        assert_eq!(offset_of!(GnttabQuerySize, status), 12);
        assert_eq!(offset_of!(GnttabGetVersion, version), 4);
    }
}
