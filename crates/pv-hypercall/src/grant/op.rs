//! `HYPERVISOR_grant_table_op` (20) for a guest that owns its grant table and lets
//! the VMM (the backend domain) map its grants: the table's size, and its version.
//! Argument layouts from Xen's `public/grant_table.h`:
//!
//! * `GNTTABOP_query_size`: `{ domid_t dom; uint32_t nr_frames (out); uint32_t
//!   max_nr_frames (out); int16_t status (out); }`, 16 bytes;
//! * `GNTTABOP_set_version`: `{ uint32_t version; }` in and out: version 1 only (an
//!   ask for 2 gets `-EINVAL` with 1 written back, so a guest keeps 1);
//! * `GNTTABOP_get_version`: `{ domid_t dom; uint16_t pad; uint32_t version (out); }`.
//!
//! The guest maps the frames itself with `XENMEM_add_to_physmap` (see
//! [`crate::physmap`]). Operations on other domains' grants (`map_grant_ref`,
//! `copy`, ...) are a backend domain's, and this guest is none: `-ENOSYS`, as for
//! every command not listed. Each call does one operation: a `count` other than 1 is
//! `-EINVAL`, so a guest cannot make the VMM loop.

use std::sync::Arc;
use vmcraft_pv_wire::xen::{GnttabGetVersion, GnttabQuerySize, GnttabSetVersion};

use super::GrantTable;
use crate::hypercall::{HypercallContext, HypercallFault};

/// Xen's hypercall number.
pub const HYPERVISOR_GRANT_TABLE_OP: u64 = 20;

/// The commands served.
pub mod cmd {
    /// `GNTTABOP_query_size`.
    pub const QUERY_SIZE: u64 = 6;
    /// `GNTTABOP_set_version`.
    pub const SET_VERSION: u64 = 8;
    /// `GNTTABOP_get_version`.
    pub const GET_VERSION: u64 = 10;
}

/// `DOMID_SELF`.
const DOMID_SELF: u16 = 0x7ff0;
/// `GNTST_okay`.
const GNTST_OKAY: i16 = 0;
/// `GNTST_bad_domain`.
const GNTST_BAD_DOMAIN: i16 = -2;

/// The guest's `grant_table_op`, on its own table.
#[derive(Debug, Clone)]
pub struct GrantTableOp {
    table: Arc<GrantTable>,
    /// The guest's own domain id (its `dom` may name itself either way).
    domid: u16,
}

impl GrantTableOp {
    /// Serve the guest `domid` whose table is `table`.
    pub fn new(table: Arc<GrantTable>, domid: u16) -> Self {
        GrantTableOp { table, domid }
    }

    fn one(
        &self,
        ctx: &HypercallContext<'_>,
        command: u64,
        arg: u64,
    ) -> Result<u64, HypercallFault> {
        match command {
            cmd::QUERY_SIZE => {
                let mut q: GnttabQuerySize = ctx.read_obj(arg)?;
                q.status = if q.dom == DOMID_SELF || q.dom == self.domid {
                    q.nr_frames = self.table.frames_in_use();
                    q.max_nr_frames = self.table.max_frames();
                    GNTST_OKAY
                } else {
                    GNTST_BAD_DOMAIN
                };
                ctx.write_obj(arg, &q)?;
                Ok(0)
            }
            cmd::SET_VERSION => {
                let GnttabSetVersion { version: asked } = ctx.read_obj(arg)?;
                ctx.write_obj(arg, &GnttabSetVersion { version: 1 })?;
                if asked == 1 {
                    Ok(0)
                } else {
                    Err(HypercallFault::Invalid {
                        index: 1,
                        value: u64::from(asked),
                    })
                }
            }
            cmd::GET_VERSION => {
                let mut v: GnttabGetVersion = ctx.read_obj(arg)?;
                if v.dom != DOMID_SELF && v.dom != self.domid {
                    return Err(HypercallFault::NotPermitted(
                        "get_version of another domain's table",
                    ));
                }
                v.version = 1;
                ctx.write_obj(arg, &v)?;
                Ok(0)
            }
            other => Err(HypercallFault::Unsupported(other)),
        }
    }
}

/// Registered with [`HypercallTable::register`](crate::hypercall::HypercallTable::register)
/// under [`HYPERVISOR_GRANT_TABLE_OP`]: unlike the other `*_op` calls it has a third
/// argument, the count.
impl crate::hypercall::Hypercall for GrantTableOp {
    fn call(&self, ctx: &HypercallContext<'_>, args: &[u64; 5]) -> Result<u64, HypercallFault> {
        let (command, arg, count) = (args[0], args[1], args[2]);
        if count != 1 {
            return Err(HypercallFault::Invalid {
                index: 2,
                value: count,
            });
        }
        self.one(ctx, command, arg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypercall::{errno, Hypercall, HypercallArgs, HypercallTable};
    use vm_memory::{Bytes, GuestAddress};
    use vmcraft_memory::GuestMemory;

    fn setup() -> (GuestMemory, Arc<GrantTable>, HypercallTable) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let table = Arc::new(GrantTable::unplaced(mem.clone(), 4, 0));
        let mut calls = HypercallTable::new();
        calls
            .register(
                HYPERVISOR_GRANT_TABLE_OP,
                "grant_table_op",
                Arc::new(GrantTableOp::new(table.clone(), 1)),
            )
            .unwrap();
        (mem, table, calls)
    }

    fn call(mem: &GuestMemory, calls: &HypercallTable, command: u64, arg: u64, count: u64) -> i64 {
        let ctx = HypercallContext::physical(0, mem);
        calls.dispatch(
            &ctx,
            HypercallArgs {
                nr: HYPERVISOR_GRANT_TABLE_OP,
                args: [command, arg, count, 0, 0],
            },
        )
    }

    #[test]
    fn the_guest_learns_the_size_and_keeps_version_1() {
        let (mem, table, calls) = setup();
        let arg = 0x1000;
        mem.write_obj(DOMID_SELF, GuestAddress(arg)).unwrap();
        assert_eq!(call(&mem, &calls, cmd::QUERY_SIZE, arg, 1), 0);
        let read = |at: u64| mem.read_obj::<u32>(GuestAddress(at)).unwrap();
        assert_eq!((read(arg + 4), read(arg + 8)), (0, 4));
        // Frames placed from the last down, as Linux does: in use from the first.
        table.place_frame(1, GuestAddress(0x8000)).unwrap();
        assert_eq!(call(&mem, &calls, cmd::QUERY_SIZE, arg, 1), 0);
        assert_eq!(read(arg + 4), 2);
        mem.write_obj(7u16, GuestAddress(arg)).unwrap();
        assert_eq!(call(&mem, &calls, cmd::QUERY_SIZE, arg, 1), 0);
        assert_eq!(
            mem.read_obj::<i16>(GuestAddress(arg + 12)).unwrap(),
            GNTST_BAD_DOMAIN
        );
        mem.write_obj(1u32, GuestAddress(arg)).unwrap();
        assert_eq!(call(&mem, &calls, cmd::SET_VERSION, arg, 1), 0);
        mem.write_obj(2u32, GuestAddress(arg)).unwrap();
        assert_eq!(call(&mem, &calls, cmd::SET_VERSION, arg, 1), -errno::EINVAL);
        assert_eq!(read(arg), 1, "the version in force is written back");
        mem.write_obj(DOMID_SELF, GuestAddress(arg)).unwrap();
        assert_eq!(call(&mem, &calls, cmd::GET_VERSION, arg, 1), 0);
        assert_eq!(read(arg + 4), 1);
    }

    #[test]
    fn other_commands_counts_and_pointers_are_refused() {
        let (mem, _, calls) = setup();
        assert_eq!(
            call(&mem, &calls, 0, 0x1000, 1),
            -errno::ENOSYS,
            "map_grant_ref"
        );
        assert_eq!(
            call(&mem, &calls, cmd::QUERY_SIZE, 0x1000, 1000),
            -errno::EINVAL
        );
        assert_eq!(
            call(&mem, &calls, cmd::QUERY_SIZE, 1 << 40, 1),
            -errno::EFAULT
        );
        let op = GrantTableOp::new(Arc::new(GrantTable::unplaced(mem.clone(), 1, 0)), 1);
        let ctx = HypercallContext::physical(0, &mem);
        mem.write_obj(9u16, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            op.call(&ctx, &[cmd::GET_VERSION, 0x1000, 1, 0, 0]),
            Err(HypercallFault::NotPermitted(
                "get_version of another domain's table"
            ))
        );
    }

    #[test]
    fn grants_live_in_the_frames_the_guest_placed() {
        use crate::grant::{GrantError, GTF_PERMIT_ACCESS};
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let table = GrantTable::unplaced(mem.clone(), 2, 0);
        // Entry 513 is the second entry of frame 1: not a grant until frame 1 is placed.
        assert_eq!(table.map(513, false), Err(GrantError::BadRef(513)));
        mem.write_obj(0xffu64, GuestAddress(0x9008)).unwrap();
        table.place_frame(1, GuestAddress(0x9000)).unwrap();
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x9008)).unwrap(),
            0,
            "fresh"
        );
        mem.write_obj(0x20u32, GuestAddress(0x900c)).unwrap(); // frame 0x20
        mem.write_obj(GTF_PERMIT_ACCESS, GuestAddress(0x9008))
            .unwrap();
        let m = table.map(513, true).unwrap();
        assert_eq!(m.page, GuestAddress(0x20000));
        table.unmap(m).unwrap();
        for (index, at) in [(2, 0xa000), (0, 0xa001), (0, 1 << 40)] {
            assert_eq!(
                table.place_frame(index, GuestAddress(at)),
                Err(GrantError::BadFrameSlot {
                    index,
                    addr: at,
                    frames: 2
                })
            );
        }
        assert_eq!(table.map(2 * 512, false), Err(GrantError::BadRef(1024)));
    }
}
