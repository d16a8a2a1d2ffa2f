//! The ring protocol under loom, which runs every interleaving (and every reordering
//! the memory model allows) of a front end and a back end on two threads:
//! no request is lost or consumed twice, and a back end that goes to sleep after its
//! final check is always woken (no lost wakeup).
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p vmcraft-pv-hypercall --release loom
//! ```

use loom::cell::UnsafeCell;
use loom::sync::atomic::{fence, AtomicU32, Ordering};
use loom::sync::{Arc, Notify};

use super::*;

extern crate std;
use std::vec::Vec;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Req(u32);

impl Entry for Req {
    const SIZE: usize = 4;
    fn encode(&self, out: &mut [u8]) {
        out.copy_from_slice(&self.0.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Self {
        Req(u32::from_le_bytes(b.try_into().unwrap()))
    }
}

/// Ring memory whose indices are loom atomics and whose entries (one cell per slot)
/// loom checks for unsynchronised access.
struct LoomMemory {
    indices: [AtomicU32; 4],
    slots: [UnsafeCell<[u8; 4]>; 4],
}

#[derive(Clone)]
struct Shared(Arc<LoomMemory>);

impl Shared {
    fn new() -> Self {
        Shared(Arc::new(LoomMemory {
            indices: [0, 0, 0, 0].map(AtomicU32::new),
            slots: [0, 0, 0, 0].map(|_| UnsafeCell::new([0; 4])),
        }))
    }
}

impl RingMemory for Shared {
    fn size(&self) -> usize {
        HEADER_SIZE + 16
    }
    fn load_u32(&self, offset: usize) -> u32 {
        self.0.indices[offset / 4].load(Ordering::Acquire)
    }
    fn store_u32(&self, offset: usize, value: u32) {
        self.0.indices[offset / 4].store(value, Ordering::Release)
    }
    fn read(&self, offset: usize, buf: &mut [u8]) {
        let slot = (offset - HEADER_SIZE) / 4;
        // SAFETY: loom tracks this access; the ring protocol must order it after the
        // producer's write (loom fails the test if it does not).
        self.0.slots[slot].with(|p| buf.copy_from_slice(unsafe { &*p }));
    }
    fn write(&self, offset: usize, data: &[u8]) {
        if offset < HEADER_SIZE {
            // `init` zeroing the header: the indices are atomics already at 0.
            return;
        }
        let slot = (offset - HEADER_SIZE) / 4;
        // SAFETY: as for `read`.
        self.0.slots[slot].with_mut(|p| unsafe { (*p).copy_from_slice(data) });
    }
    fn full_fence(&self) {
        fence(Ordering::SeqCst);
    }
}

#[test]
fn loom_no_lost_wakeup_no_loss_no_duplicate() {
    loom::model(|| {
        let mem = Shared::new();
        let mut front = FrontRing::<_, Req, Req>::init(mem.clone()).unwrap();
        assert_eq!(front.entries(), 4);
        let doorbell = Arc::new(Notify::new());
        let back_bell = doorbell.clone();
        let back = loom::thread::spawn(move || {
            let mut back = BackRing::<_, Req, Req>::attach(mem).unwrap();
            let mut got = Vec::new();
            loop {
                while let Some(Req(v)) = back.pop_request().unwrap() {
                    got.push(v);
                }
                if got.len() == 2 {
                    break;
                }
                if !back.final_check_for_requests().unwrap() {
                    // Sleep until the front end rings; a lost wakeup deadlocks here,
                    // which loom reports.
                    back_bell.wait();
                }
            }
            assert_eq!(got, [0, 1], "each request once, in order");
        });
        for i in 0..2 {
            front.push_request(&Req(i)).unwrap();
            if front.publish_requests() {
                doorbell.notify();
            }
        }
        back.join().unwrap();
    });
}
