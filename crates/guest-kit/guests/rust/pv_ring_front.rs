//! A Rust guest whose blkif front end is vmcraft's own `no_std` ring code and blkif
//! wire format (the `vmcraft-pv-wire` crate the VMM's back end uses too), driving the PV block
//! backend at CPL 3: grants two pages, writes one to sector 16, reads it back into
//! the other, flushes, checks that a segment past its page is refused, and reports
//! on COM1. Exits 0 when all of it held.
#![no_std]
#![no_main]
#![allow(dead_code, missing_docs)]

#[path = "../../src/abi.rs"]
mod abi;

use core::arch::asm;

use vmcraft_pv_wire::blkif::{
    Request, Response, Segment, MAX_SEGMENTS, OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE,
};
use vmcraft_pv_wire::ring::{FrontRing, RawRingMemory};

const PAGE_A: u64 = abi::GUEST_HEAP + 0x20_0000;
const PAGE_B: u64 = PAGE_A + 0x1000;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    exit(99)
}

fn exit(code: u32) -> ! {
    // SAFETY: a port write to the debug-exit device; the VMM stops the VM.
    unsafe { asm!("out dx, eax", in("dx") abi::DEBUG_EXIT_PORT, in("eax") code) };
    loop {}
}

fn com1(s: &str) {
    for b in s.bytes() {
        // SAFETY: a port write to the emulated 16550 (IOPL 3 lets CPL 3 do it).
        unsafe { asm!("out dx, al", in("dx") abi::COM1_PORT, in("al") b) };
    }
}

/// Xen's hypercall convention through the vmcraft hypercall port.
fn hypercall(nr: u64, a1: u64, a2: u64) -> i64 {
    let ret: i64;
    // SAFETY: the port write traps to the VMM, which reads the registers and puts
    // the result in rax; nothing else changes.
    unsafe {
        asm!("out {port}, al", port = const abi::HYPERCALL_PORT,
             inout("rax") nr as i64 => ret, in("rdi") a1, in("rsi") a2,
             in("rdx") 0u64, in("r10") 0u64, in("r8") 0u64)
    };
    ret
}

fn notify_backend() {
    static mut PORT: u32 = abi::PV_BLK_PORT as u32;
    // EVTCHNOP_send { port } (HYPERVISOR_event_channel_op is 32, send is 4).
    hypercall(32, 4, &raw const PORT as u64);
}

fn grant(gref: u64, page: u64, readonly: bool) {
    let entry = (abi::PV_GRANT_TABLE + 8 * gref) as *mut u16;
    // SAFETY: the grant table is guest memory this guest owns (identity mapped):
    // domid and frame, then the flags that publish them.
    unsafe {
        core::ptr::write_volatile(entry.add(1), 0);
        core::ptr::write_volatile(entry.add(2) as *mut u32, (page >> 12) as u32);
        core::sync::atomic::fence(core::sync::atomic::Ordering::Release);
        core::ptr::write_volatile(entry, 1 | if readonly { 1 << 2 } else { 0 });
    }
}

struct Front(FrontRing<RawRingMemory, Request, Response>);

impl Front {
    fn io(&mut self, operation: u8, sector: u64, seg: Option<Segment>) -> i16 {
        let mut segs = [Segment::default(); MAX_SEGMENTS];
        let nr = match seg {
            Some(s) => {
                segs[0] = s;
                1
            }
            None => 0,
        };
        let req = Request {
            operation,
            nr_segments: nr,
            handle: 0,
            id: sector,
            sector_number: sector,
            seg: segs,
        };
        if self.0.push_request(&req).is_err() {
            exit(40);
        }
        if self.0.publish_requests() {
            notify_backend();
        }
        loop {
            match self.0.pop_response() {
                Ok(Some(r)) => return r.status,
                Ok(None) => core::hint::spin_loop(),
                Err(_) => exit(41),
            }
        }
    }
}

#[no_mangle]
pub extern "C" fn guest_main(_vcpu: u64, _param: u64) -> u32 {
    // SAFETY: the ring page is guest memory this guest owns, page aligned, shared
    // only with the backend, which accesses it atomically or by copying.
    let mem = unsafe { RawRingMemory::new(abi::PV_BLK_RING as *mut u8, 4096) };
    let Ok(ring) = FrontRing::init(mem) else {
        return 10;
    };
    let mut front = Front(ring);
    // SAFETY: the two data pages are guest memory this guest owns.
    let (a, b) = unsafe {
        (
            core::slice::from_raw_parts_mut(PAGE_A as *mut u32, 1024),
            core::slice::from_raw_parts_mut(PAGE_B as *mut u32, 1024),
        )
    };
    for (i, w) in a.iter_mut().enumerate() {
        *w = (i as u32).wrapping_mul(0x0101_0101) ^ 0x5eed;
    }
    b.fill(0);
    grant(0, PAGE_A, true);
    grant(1, PAGE_B, false);
    let whole = |gref| Some(Segment { gref, first_sect: 0, last_sect: 7 });
    if front.io(OP_WRITE, 16, whole(0)) != 0 {
        return 20;
    }
    if front.io(OP_READ, 16, whole(1)) != 0 {
        return 21;
    }
    if a != b {
        return 22;
    }
    if front.io(OP_FLUSH_DISKCACHE, 0, None) != 0 {
        return 23;
    }
    let past = Some(Segment { gref: 1, first_sect: 0, last_sect: 8 });
    if front.io(OP_READ, 0, past) != -1 {
        return 24;
    }
    com1("rust front end ok\n");
    0
}
