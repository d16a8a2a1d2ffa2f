//! Where an HVM guest puts the hypervisor's pages, and its vCPUs' `vcpu_info`: the
//! `XENMEM_add_to_physmap` command of `memory_op` (12) and the
//! `VCPUOP_register_vcpu_info` command of `vcpu_op` (24), with Xen's argument layouts
//! (`public/memory.h`, `public/vcpu.h`).
//!
//! An HVM guest chooses the guest-physical frames of the shared-info page and of
//! each grant-table frame (Linux: a free page of its RAM for the first, frames of a
//! region the memory map marks unusable for the others). In Xen the hypervisor's page
//! then replaces the guest's frame; in vmcraft the structures live in guest memory,
//! so the frame becomes the structure, fresh ([`EventChannels::place_shared_info`],
//! [`GrantTable::place_frame`]).
//!
//! `memory_op` is one hypercall for two concerns: [`MemoryOp`] sends
//! `add_to_physmap` here and the reservation commands to [`Reservation`].

use std::sync::Arc;
use vmcraft_pv_wire::xen::{AddToPhysmap, RegisterVcpuInfo};

use vm_memory::GuestAddress;

use crate::evtchn::EventChannels;
use crate::grant::GrantTable;
use crate::hypercall::{HypercallContext, HypercallFault, OpHypercall};
use crate::reservation::{Reservation, HYPERVISOR_MEMORY_OP};

/// `XENMEM_add_to_physmap`.
pub const ADD_TO_PHYSMAP: u64 = 7;
/// `XENMAPSPACE_shared_info`.
pub const SPACE_SHARED_INFO: u32 = 0;
/// `XENMAPSPACE_grant_table`.
pub const SPACE_GRANT_TABLE: u32 = 1;
/// `XENMAPIDX_grant_table_status`: a v2 status frame, which vmcraft (v1) has not.
const GRANT_TABLE_STATUS: u64 = 1 << 31;
/// `DOMID_SELF`.
const DOMID_SELF: u16 = 0x7ff0;
const PAGE: u64 = 4096;

/// The guest-placed pages: the shared-info page and the grant-table frames.
#[derive(Debug, Clone)]
pub struct Physmap {
    channels: Arc<EventChannels>,
    grants: Arc<GrantTable>,
}

impl Physmap {
    /// Place into `channels` and `grants`.
    pub fn new(channels: Arc<EventChannels>, grants: Arc<GrantTable>) -> Self {
        Physmap { channels, grants }
    }

    /// `add_to_physmap`: `{ domid_t domid; uint16_t size; unsigned space; xen_ulong_t
    /// idx; xen_pfn_t gpfn; }` (24 bytes).
    pub fn add_to_physmap(
        &self,
        ctx: &HypercallContext<'_>,
        arg: u64,
    ) -> Result<u64, HypercallFault> {
        let AddToPhysmap {
            domid,
            space,
            idx,
            gpfn,
            ..
        } = ctx.read_obj(arg)?;
        if domid != DOMID_SELF {
            return Err(HypercallFault::NotPermitted(
                "add_to_physmap for another domain",
            ));
        }
        let invalid = |index, value| HypercallFault::Invalid { index, value };
        let at = gpfn
            .checked_mul(PAGE)
            .map(GuestAddress)
            .ok_or(invalid(1, gpfn))?;
        match space {
            SPACE_SHARED_INFO if idx == 0 => {
                self.channels
                    .place_shared_info(at)
                    .map_err(|_| invalid(1, gpfn))?;
            }
            SPACE_GRANT_TABLE if idx & GRANT_TABLE_STATUS == 0 => {
                let index = u32::try_from(idx).map_err(|_| invalid(1, idx))?;
                self.grants
                    .place_frame(index, at)
                    .map_err(|_| invalid(1, idx))?;
            }
            SPACE_SHARED_INFO | SPACE_GRANT_TABLE => return Err(invalid(1, idx)),
            other => return Err(HypercallFault::Unsupported(u64::from(other))),
        }
        log::debug!("add_to_physmap: space {space} index {idx:#x} at frame {gpfn:#x}");
        Ok(0)
    }
}

/// `memory_op`: `add_to_physmap` to a [`Physmap`], the reservation commands to a
/// [`Reservation`]; either may be absent (its commands are then `-ENOSYS`).
#[derive(Debug, Clone, Default)]
pub struct MemoryOp {
    /// The reservation commands.
    pub reservation: Option<Arc<Reservation>>,
    /// `add_to_physmap`.
    pub physmap: Option<Physmap>,
}

impl OpHypercall for MemoryOp {
    const NR: u64 = HYPERVISOR_MEMORY_OP;
    const NAME: &'static str = "memory_op";
    fn op(
        &self,
        ctx: &HypercallContext<'_>,
        command: u64,
        arg: u64,
    ) -> Result<u64, HypercallFault> {
        match (command, &self.physmap, &self.reservation) {
            (ADD_TO_PHYSMAP, Some(physmap), _) => physmap.add_to_physmap(ctx, arg),
            (ADD_TO_PHYSMAP, None, _) | (_, _, None) => Err(HypercallFault::Unsupported(command)),
            (_, _, Some(reservation)) => reservation.op(ctx, command, arg),
        }
    }
}

/// `HYPERVISOR_vcpu_op`.
pub const HYPERVISOR_VCPU_OP: u64 = 24;
/// `VCPUOP_register_vcpu_info`: `{ uint64_t mfn; uint32_t offset; uint32_t rsvd; }`.
pub const REGISTER_VCPU_INFO: u64 = 10;

/// `vcpu_op(cmd, vcpu, arg)`: `register_vcpu_info` for the guest's `vcpus` vCPUs.
/// Everything else (Xen's timers, runstate areas, up and down, which an HVM guest
/// does through its local APIC) is `-ENOSYS`.
#[derive(Debug, Clone)]
pub struct VcpuOp {
    channels: Arc<EventChannels>,
    vcpus: u32,
}

impl VcpuOp {
    /// Register into `channels`, for vCPUs `0..vcpus`.
    pub fn new(channels: Arc<EventChannels>, vcpus: u32) -> Self {
        VcpuOp { channels, vcpus }
    }
}

/// Registered under [`HYPERVISOR_VCPU_OP`] with
/// [`HypercallTable::register`](crate::hypercall::HypercallTable::register): its
/// second argument is the vCPU, the third the command's struct.
impl crate::hypercall::Hypercall for VcpuOp {
    fn call(&self, ctx: &HypercallContext<'_>, args: &[u64; 5]) -> Result<u64, HypercallFault> {
        let (command, vcpu, arg) = (args[0], args[1], args[2]);
        if command != REGISTER_VCPU_INFO {
            return Err(HypercallFault::Unsupported(command));
        }
        let vcpu = u32::try_from(vcpu).ok().filter(|v| *v < self.vcpus).ok_or(
            HypercallFault::Invalid {
                index: 1,
                value: vcpu,
            },
        )?;
        let RegisterVcpuInfo { mfn, offset, .. } = ctx.read_obj(arg)?;
        let offset = u64::from(offset);
        let invalid = HypercallFault::Invalid {
            index: 2,
            value: mfn,
        };
        if offset >= PAGE {
            return Err(invalid);
        }
        let at = mfn.checked_mul(PAGE).ok_or(invalid)? + offset;
        self.channels
            .register_vcpu_info(vcpu, GuestAddress(at))
            .map_err(|_| invalid)?;
        log::debug!("vCPU {vcpu}: vcpu_info at {at:#x}");
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evtchn::Upcall;
    use crate::hypercall::{errno, HypercallArgs, HypercallTable};
    use vm_memory::Bytes;
    use vmcraft_memory::{layout::MemoryLayout, GuestRam};

    struct NoUpcall;
    impl Upcall for NoUpcall {
        fn raise(&self, _: u32) {}
    }
    impl crate::hvm::UpcallRoute for NoUpcall {
        fn callback(&self, _: crate::hvm::Callback) {}
        fn vcpu_vector(&self, _: u32, _: u8) {}
    }

    struct Setup {
        ram: GuestRam,
        channels: Arc<EventChannels>,
        grants: Arc<GrantTable>,
        table: HypercallTable,
    }

    /// The whole HVM guest table, as a Linux guest meets these calls.
    fn setup() -> Setup {
        let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
        let channels = Arc::new(EventChannels::unplaced(
            ram.memory().clone(),
            Arc::new(NoUpcall),
        ));
        let grants = Arc::new(GrantTable::unplaced(ram.memory().clone(), 2, 0));
        let table = crate::hvm_guest::HvmGuestCalls {
            channels: channels.clone(),
            grants: grants.clone(),
            params: Arc::new(crate::hvm::HvmParams::new(
                2,
                (0, 0),
                (0, 0),
                Arc::new(NoUpcall),
            )),
            reservation: Some(Arc::new(Reservation::new(ram.memory().clone()))),
            shutdown: None,
            domid: 0,
            vcpus: 2,
        }
        .table()
        .unwrap();
        Setup {
            ram,
            channels,
            grants,
            table,
        }
    }

    fn add(s: &Setup, domid: u16, space: u32, idx: u64, gpfn: u64) -> i64 {
        let mut b = [0u8; 24];
        b[0..2].copy_from_slice(&domid.to_le_bytes());
        b[4..8].copy_from_slice(&space.to_le_bytes());
        b[8..16].copy_from_slice(&idx.to_le_bytes());
        b[16..24].copy_from_slice(&gpfn.to_le_bytes());
        s.ram
            .memory()
            .write_slice(&b, GuestAddress(0x1000))
            .unwrap();
        let ctx = HypercallContext::physical(0, s.ram.memory());
        s.table.dispatch(
            &ctx,
            HypercallArgs {
                nr: HYPERVISOR_MEMORY_OP,
                args: [ADD_TO_PHYSMAP, 0x1000, 0, 0, 0],
            },
        )
    }

    #[test]
    fn the_guest_places_shared_info_and_grant_frames() {
        let s = setup();
        assert_eq!(add(&s, DOMID_SELF, SPACE_SHARED_INFO, 0, 0x10), 0);
        assert_eq!(s.channels.shared_info(), Some(GuestAddress(0x10000)));
        assert_eq!(add(&s, DOMID_SELF, SPACE_GRANT_TABLE, 1, 0x21), 0);
        assert_eq!(add(&s, DOMID_SELF, SPACE_GRANT_TABLE, 0, 0x20), 0);
        assert_eq!(s.grants.frames_in_use(), 2);
        // Refused: another domain, a frame index past the table, a v2 status
        // frame, a second shared-info index, frames outside RAM, other spaces.
        assert_eq!(add(&s, 3, SPACE_SHARED_INFO, 0, 0x10), -errno::EPERM);
        assert_eq!(
            add(&s, DOMID_SELF, SPACE_GRANT_TABLE, 2, 0x22),
            -errno::EINVAL
        );
        assert_eq!(
            add(&s, DOMID_SELF, SPACE_GRANT_TABLE, 1 << 31, 0x22),
            -errno::EINVAL
        );
        assert_eq!(
            add(&s, DOMID_SELF, SPACE_SHARED_INFO, 1, 0x10),
            -errno::EINVAL
        );
        assert_eq!(
            add(&s, DOMID_SELF, SPACE_SHARED_INFO, 0, 1 << 40),
            -errno::EINVAL
        );
        assert_eq!(
            add(&s, DOMID_SELF, SPACE_SHARED_INFO, 0, u64::MAX),
            -errno::EINVAL
        );
        assert_eq!(add(&s, DOMID_SELF, 2, 0, 0x30), -errno::ENOSYS);
        // The reservation commands still reach the reservation.
        let ctx = HypercallContext::physical(0, s.ram.memory());
        let current = s.table.dispatch(
            &ctx,
            HypercallArgs {
                nr: HYPERVISOR_MEMORY_OP,
                args: [
                    crate::reservation::cmd::CURRENT_RESERVATION,
                    0x1000,
                    0,
                    0,
                    0,
                ],
            },
        );
        assert!(current > 0, "current_reservation answered {current}");
    }

    #[test]
    fn a_vcpu_registers_its_vcpu_info() {
        let s = setup();
        assert_eq!(add(&s, DOMID_SELF, SPACE_SHARED_INFO, 0, 0x10), 0);
        let ctx = HypercallContext::physical(0, s.ram.memory());
        let call = |cmd: u64, vcpu: u64, mfn: u64, offset: u32| {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&mfn.to_le_bytes());
            b[8..12].copy_from_slice(&offset.to_le_bytes());
            s.ram
                .memory()
                .write_slice(&b, GuestAddress(0x1000))
                .unwrap();
            s.table.dispatch(
                &ctx,
                HypercallArgs {
                    nr: HYPERVISOR_VCPU_OP,
                    args: [cmd, vcpu, 0x1000, 0, 0],
                },
            )
        };
        assert_eq!(call(REGISTER_VCPU_INFO, 1, 0x30, 0x40), 0);
        assert_eq!(
            s.ram
                .memory()
                .read_obj::<u64>(GuestAddress(0x30048))
                .unwrap(),
            u64::MAX,
            "every selector bit set in the new place"
        );
        assert_eq!(call(REGISTER_VCPU_INFO, 2, 0x30, 0), -errno::EINVAL);
        assert_eq!(call(REGISTER_VCPU_INFO, 0, 0x30, 4090), -errno::EINVAL);
        assert_eq!(call(REGISTER_VCPU_INFO, 0, 0x30, 4096), -errno::EINVAL);
        assert_eq!(call(REGISTER_VCPU_INFO, 0, u64::MAX, 0), -errno::EINVAL);
        assert_eq!(call(6, 0, 0, 0), -errno::ENOSYS, "set_periodic_timer");
    }
}
