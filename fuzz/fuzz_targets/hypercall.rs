//! Hypercall dispatch with arbitrary numbers, arguments and guest memory, Xen's
//! `memory_op` (the PV balloon), `hvm_op` (HVM params, upcall vectors) and
//! `sched_op` (yield, shutdown) among the calls: the result is a non-negative value or one of -EPERM, -EFAULT, -EINVAL,
//! -ENOSYS, never a panic; the guest never gives up more pages than it has, never
//! changes a parameter but its callback, and never gets a vector below 0x10.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmcraft_memory::vm_memory::{Bytes, GuestAddress};
use vmcraft_memory::{layout::MemoryLayout, GuestRam};
use vmcraft_pv_hypercall::hvm::{param, Callback, HvmParams, UpcallRoute, HYPERVISOR_HVM_OP};
use vmcraft_pv_hypercall::hypercall::{
    HypercallArgs, HypercallContext, HypercallFault, HypercallTable,
};
use vmcraft_pv_hypercall::reservation::{Reservation, HYPERVISOR_MEMORY_OP};
use vmcraft_pv_hypercall::sched::{SchedOps, ShutdownReason, ShutdownSink, HYPERVISOR_SCHED_OP};

mod calls;

/// Shutdowns come with a reason Xen defines (decoding refused the rest).
struct Sink;

impl ShutdownSink for Sink {
    fn shutdown(&self, vcpu: u32, _reason: ShutdownReason) {
        assert_eq!(vcpu, 0);
    }
}

/// Checks what the guest asks of its upcalls.
struct Route;

impl UpcallRoute for Route {
    fn callback(&self, c: Callback) {
        if let Callback::Vector(v) = c {
            assert!(v >= 0x10);
        }
    }
    fn vcpu_vector(&self, vcpu: u32, vector: u8) {
        assert!(vcpu < 2 && vector >= 0x10);
    }
}

fn table() -> HypercallTable {
    let mut t = HypercallTable::new();
    // Copies rdx bytes (at most 4 KiB) from the address in rdi to the one in rsi.
    t.register(
        1,
        "copy",
        Arc::new(|ctx: &HypercallContext<'_>, a: &[u64; 5]| {
            if a[2] > 4096 {
                return Err(HypercallFault::Invalid {
                    index: 2,
                    value: a[2],
                });
            }
            let bytes = ctx.read(a[0], a[2] as usize)?;
            ctx.write(a[1], &bytes)?;
            Ok(a[2])
        }),
    )
    .unwrap();
    t.register(
        2,
        "sum",
        Arc::new(|_: &HypercallContext<'_>, a: &[u64; 5]| {
            Ok(a.iter().fold(0u64, |s, v| s.wrapping_add(*v)))
        }),
    )
    .unwrap();
    t
}

fuzz_target!(|data: &[u8]| {
    let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
    let mut table = table();
    let reservation = Arc::new(Reservation::new(ram.memory().clone()));
    reservation.register_hypercalls(&mut table).unwrap();
    let hvm = Arc::new(HvmParams::new(2, (0x100, 1), (0x101, 2), Arc::new(Route)));
    table.register_op(hvm.clone()).unwrap();
    table
        .register_op(Arc::new(SchedOps::new(Arc::new(Sink))))
        .unwrap();
    let ctx = HypercallContext::physical(0, ram.memory());
    for word in calls::calls(data, 6) {
        let word = |i: usize| word[i];
        // Small numbers and addresses are likelier to reach the handlers.
        let nr = [
            0,
            1,
            2,
            3,
            HYPERVISOR_MEMORY_OP,
            HYPERVISOR_HVM_OP,
            HYPERVISOR_SCHED_OP,
        ][(word(0) % 7) as usize];
        // memory_op's and hvm_op's first argument is a small command number.
        let a1 = if nr == HYPERVISOR_MEMORY_OP {
            word(1) % 8
        } else if nr == HYPERVISOR_HVM_OP {
            word(1) % 25
        } else if nr == HYPERVISOR_SCHED_OP {
            word(1) % 8
        } else {
            word(1) % (2 << 20)
        };
        let args = HypercallArgs::from_registers(
            nr,
            a1,
            word(2) % (2 << 20),
            word(3) % 8192,
            word(4),
            word(5),
        );
        let _ = ram
            .memory()
            .write_obj(word(5), GuestAddress(word(4) % (1 << 20)));
        let r = table.dispatch(&ctx, args);
        calls::assert_xen_result(r, &[], args);
        assert!(reservation.released_pages() <= (1 << 20) / 4096);
        assert_eq!(
            (hvm.get(param::STORE_PFN), hvm.get(param::CONSOLE_EVTCHN)),
            (Some(0x100), Some(2))
        );
    }
});
