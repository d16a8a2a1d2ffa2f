//! A PV guest's memory reservation: `HYPERVISOR_memory_op` (12) with Xen's
//! `XENMEM_decrease_reservation`, `XENMEM_increase_reservation`,
//! `XENMEM_current_reservation` and `XENMEM_maximum_reservation`, in Xen's argument
//! layout (`public/memory.h`): the paravirtual balloon.
//!
//! `struct xen_memory_reservation` on x86-64: `extent_start` (a guest pointer to an
//! array of `xen_pfn_t`, u64) at 0, `nr_extents` (u64) at 8, `extent_order` (u32) at
//! 16, `mem_flags` (u32) at 20, `domid` (u16) at 24.
//!
//! A decrease gives pages to the host (freed with [`vmcraft_memory::discard`] and
//! counted); an increase takes them back (the guest's RAM stays mapped: a page comes
//! back as a fresh one when touched). As in Xen, each call does at most
//! [`MAX_EXTENTS_PER_CALL`] extents and returns how many it did; a guest asks again for
//! the rest (Linux's balloon driver does). Only 4 KiB extents (order 0) are taken, for
//! the calling domain (`DOMID_SELF`, or domain 0, which the guest is here). A frame
//! outside RAM, or one given twice, ends the call at that extent: the count says how
//! far it got.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vmcraft_pv_wire::xen::{DomId, MemoryReservation, Pfn};

use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmcraft_memory::{discard::discard, GuestMemory, PAGE_SIZE};

use crate::hypercall::{HypercallContext, HypercallFault, HypercallTable, TableError};

/// `HYPERVISOR_memory_op`.
pub const HYPERVISOR_MEMORY_OP: u64 = 12;
/// The most extents one call does.
pub const MAX_EXTENTS_PER_CALL: u64 = 512;

/// `XENMEM_*` commands served.
pub mod cmd {
    /// Take pages back.
    pub const INCREASE_RESERVATION: u64 = 0;
    /// Give pages up.
    pub const DECREASE_RESERVATION: u64 = 1;
    /// The pages the guest holds now.
    pub const CURRENT_RESERVATION: u64 = 3;
    /// The most pages the guest may hold.
    pub const MAXIMUM_RESERVATION: u64 = 4;
}

/// `DOMID_SELF`.
const DOMID_SELF: u16 = 0x7ff0;

/// A guest's reservation: which of its pages it has given up.
#[derive(Debug)]
pub struct Reservation {
    memory: GuestMemory,
    total_pages: u64,
    /// One bit per page: given up.
    given: Mutex<Vec<u64>>,
    released: AtomicU64,
}

impl Reservation {
    /// The reservation of a guest whose RAM is `memory`: all of it, to begin with.
    pub fn new(memory: GuestMemory) -> Self {
        let total_pages = memory
            .iter()
            .map(vm_memory::GuestMemoryRegion::len)
            .sum::<u64>()
            / PAGE_SIZE;
        Reservation {
            memory,
            total_pages,
            given: Mutex::new(Vec::new()),
            released: AtomicU64::new(0),
        }
    }

    /// Pages the guest has given up and not taken back.
    pub fn released_pages(&self) -> u64 {
        self.released.load(Ordering::SeqCst)
    }

    /// Pages the guest holds.
    pub fn current_pages(&self) -> u64 {
        self.total_pages - self.released_pages()
    }

    /// Register `HYPERVISOR_memory_op` in `table`.
    pub fn register_hypercalls(
        self: &Arc<Self>,
        table: &mut HypercallTable,
    ) -> Result<(), TableError> {
        table.register_op(self.clone())
    }

    fn hypercall(
        &self,
        ctx: &HypercallContext<'_>,
        command: u64,
        arg: u64,
    ) -> Result<u64, HypercallFault> {
        let domid_ok = |d: u16| d == DOMID_SELF || d == 0;
        match command {
            cmd::CURRENT_RESERVATION | cmd::MAXIMUM_RESERVATION => {
                let DomId { domid } = ctx.read_obj(arg)?;
                if !domid_ok(domid) {
                    return Err(HypercallFault::Invalid {
                        index: 1,
                        value: u64::from(domid),
                    });
                }
                Ok(if command == cmd::CURRENT_RESERVATION {
                    self.current_pages()
                } else {
                    self.total_pages
                })
            }
            cmd::INCREASE_RESERVATION | cmd::DECREASE_RESERVATION => {
                let MemoryReservation {
                    extent_start: extents,
                    nr_extents: count,
                    extent_order: order,
                    domid,
                    ..
                } = ctx.read_obj(arg)?;
                if order != 0 {
                    return Err(HypercallFault::Invalid {
                        index: 1,
                        value: u64::from(order),
                    });
                }
                if !domid_ok(domid) {
                    return Err(HypercallFault::Invalid {
                        index: 1,
                        value: u64::from(domid),
                    });
                }
                let give = command == cmd::DECREASE_RESERVATION;
                let mut done = 0;
                for i in 0..count.min(MAX_EXTENTS_PER_CALL) {
                    let Pfn { pfn: frame } = ctx.read_obj(extents.wrapping_add(8 * i))?;
                    if !self.change(frame, give) {
                        break;
                    }
                    done += 1;
                }
                Ok(done)
            }
            other => Err(HypercallFault::Invalid {
                index: 0,
                value: other,
            }),
        }
    }

    /// Give up (`give`) or take back frame `frame`: false if it is not RAM or is
    /// already in that state.
    fn change(&self, frame: u64, give: bool) -> bool {
        let Some(addr) = frame.checked_mul(PAGE_SIZE) else {
            return false;
        };
        if !self
            .memory
            .check_range(GuestAddress(addr), PAGE_SIZE as usize)
        {
            return false;
        }
        let mut bits = self.given.lock().unwrap_or_else(|p| p.into_inner());
        let (word, bit) = ((frame / 64) as usize, 1u64 << (frame % 64));
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        if (bits[word] & bit != 0) == give {
            return false;
        }
        if give {
            if let Err(e) = discard(&self.memory, GuestAddress(addr), PAGE_SIZE) {
                log::warn!("memory_op: cannot free page {frame:#x}: {e}");
            }
            bits[word] |= bit;
            self.released.fetch_add(1, Ordering::SeqCst);
        } else {
            bits[word] &= !bit;
            self.released.fetch_sub(1, Ordering::SeqCst);
        }
        true
    }
}

impl crate::hypercall::OpHypercall for Reservation {
    const NR: u64 = HYPERVISOR_MEMORY_OP;
    const NAME: &'static str = "memory_op";
    fn op(
        &self,
        ctx: &crate::hypercall::HypercallContext<'_>,
        command: u64,
        arg: u64,
    ) -> Result<u64, crate::hypercall::HypercallFault> {
        self.hypercall(ctx, command, arg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;
    use vmcraft_memory::{layout::MemoryLayout, GuestRam};

    const ARG: u64 = 0x1000;
    const FRAMES: u64 = 0x2000;

    fn call(
        table: &HypercallTable,
        ram: &GuestRam,
        command: u64,
        frames: &[u64],
        domid: u16,
        order: u32,
    ) -> i64 {
        let m = ram.memory();
        for (i, f) in frames.iter().enumerate() {
            m.write_obj(*f, GuestAddress(FRAMES + 8 * i as u64))
                .unwrap();
        }
        let mut arg = [0u8; 32];
        arg[0..8].copy_from_slice(&FRAMES.to_le_bytes());
        arg[8..16].copy_from_slice(&(frames.len() as u64).to_le_bytes());
        arg[16..20].copy_from_slice(&order.to_le_bytes());
        arg[24..26].copy_from_slice(&domid.to_le_bytes());
        m.write_slice(&arg, GuestAddress(ARG)).unwrap();
        let ctx = HypercallContext::physical(0, m);
        table.dispatch(
            &ctx,
            crate::hypercall::HypercallArgs {
                nr: HYPERVISOR_MEMORY_OP,
                args: [command, ARG, 0, 0, 0],
            },
        )
    }

    fn setup() -> (GuestRam, Arc<Reservation>, HypercallTable) {
        let ram = GuestRam::new(&MemoryLayout::x86_64(8 << 20).unwrap()).unwrap();
        let r = Arc::new(Reservation::new(ram.memory().clone()));
        let mut t = HypercallTable::new();
        r.register_hypercalls(&mut t).unwrap();
        (ram, r, t)
    }

    #[test]
    fn pages_given_up_are_freed_counted_and_taken_back() {
        let (ram, r, t) = setup();
        ram.memory()
            .write_obj(0x1234u64, GuestAddress(0x30_0000))
            .unwrap();
        assert_eq!(
            call(
                &t,
                &ram,
                cmd::DECREASE_RESERVATION,
                &[0x300, 0x301],
                DOMID_SELF,
                0
            ),
            2
        );
        assert_eq!(
            ram.memory()
                .read_obj::<u64>(GuestAddress(0x30_0000))
                .unwrap(),
            0
        );
        assert_eq!((r.released_pages(), r.current_pages()), (2, 2048 - 2));
        // The current and maximum reservations, as Xen reports them.
        ram.memory()
            .write_obj(DOMID_SELF, GuestAddress(ARG))
            .unwrap();
        let ctx = HypercallContext::physical(0, ram.memory());
        let query = |c| {
            t.dispatch(
                &ctx,
                crate::hypercall::HypercallArgs {
                    nr: HYPERVISOR_MEMORY_OP,
                    args: [c, ARG, 0, 0, 0],
                },
            )
        };
        assert_eq!(
            (
                query(cmd::CURRENT_RESERVATION),
                query(cmd::MAXIMUM_RESERVATION)
            ),
            (2046, 2048)
        );
        assert_eq!(call(&t, &ram, cmd::INCREASE_RESERVATION, &[0x300], 0, 0), 1);
        assert_eq!(r.released_pages(), 1);
    }

    #[test]
    fn a_call_stops_at_the_first_frame_it_cannot_take_and_says_how_far_it_got() {
        let (ram, r, t) = setup();
        // The second frame is past RAM; the third never reached.
        assert_eq!(
            call(
                &t,
                &ram,
                cmd::DECREASE_RESERVATION,
                &[0x200, 0x10_0000, 0x201],
                0,
                0
            ),
            1
        );
        // A frame given twice.
        assert_eq!(call(&t, &ram, cmd::DECREASE_RESERVATION, &[0x200], 0, 0), 0);
        // Taking back one that was never given.
        assert_eq!(call(&t, &ram, cmd::INCREASE_RESERVATION, &[0x250], 0, 0), 0);
        // A frame whose address overflows.
        assert_eq!(
            call(&t, &ram, cmd::DECREASE_RESERVATION, &[u64::MAX], 0, 0),
            0
        );
        assert_eq!(r.released_pages(), 1);
        // At most MAX_EXTENTS_PER_CALL extents per call.
        let many: Vec<u64> = (0x400..0x400 + MAX_EXTENTS_PER_CALL + 10).collect();
        assert_eq!(
            call(&t, &ram, cmd::DECREASE_RESERVATION, &many, 0, 0),
            MAX_EXTENTS_PER_CALL as i64
        );
    }

    #[test]
    fn other_domains_orders_and_commands_are_refused() {
        let (ram, r, t) = setup();
        let einval = -crate::hypercall::errno::EINVAL;
        assert_eq!(
            call(&t, &ram, cmd::DECREASE_RESERVATION, &[0x200], 7, 0),
            einval
        );
        assert_eq!(
            call(&t, &ram, cmd::DECREASE_RESERVATION, &[0x200], 0, 9),
            einval
        );
        assert_eq!(call(&t, &ram, 6, &[0x200], 0, 0), einval);
        assert_eq!(r.released_pages(), 0);
        // A reservation struct outside RAM.
        let ctx = HypercallContext::physical(0, ram.memory());
        let at = crate::hypercall::HypercallArgs {
            nr: HYPERVISOR_MEMORY_OP,
            args: [cmd::DECREASE_RESERVATION, 8 << 20, 0, 0, 0],
        };
        assert_eq!(t.dispatch(&ctx, at), -crate::hypercall::errno::EFAULT);
    }
}
