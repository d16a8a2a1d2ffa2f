//! The event-channel raise path against a guest's upcall handler, under loom: every
//! event a backend raises is handled (no lost wakeup), whatever the interleaving.
//!
//! The guest handler is Linux's: clear `upcall_pending`, take the selector with an
//! exchange, take each flagged word's unmasked pending bits, and go round again while
//! `upcall_pending` is set.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p vmcraft-pv-hypercall --release loom
//! ```

use loom::sync::atomic::{AtomicU64, AtomicU8, Ordering::SeqCst};
use loom::sync::{Arc, Notify};

use super::protocol::{raise, Words};

/// One vCPU, two words of ports.
struct Page {
    pending: [AtomicU64; 2],
    mask: [AtomicU64; 2],
    selector: AtomicU64,
    upcall_pending: AtomicU8,
    upcall: Notify,
}

impl Words for Page {
    fn pending_fetch_or(&self, word: u32, mask: u64) -> u64 {
        self.pending[word as usize].fetch_or(mask, SeqCst)
    }
    fn mask_load(&self, word: u32) -> u64 {
        self.mask[word as usize].load(SeqCst)
    }
    fn selector_fetch_or(&self, _vcpu: u32, mask: u64) -> u64 {
        self.selector.fetch_or(mask, SeqCst)
    }
    fn set_upcall_pending(&self, _vcpu: u32) {
        self.upcall_pending.store(1, SeqCst);
    }
    fn upcall_masked(&self, _vcpu: u32) -> bool {
        false
    }
}

fn page() -> Arc<Page> {
    Arc::new(Page {
        pending: [AtomicU64::new(0), AtomicU64::new(0)],
        mask: [AtomicU64::new(0), AtomicU64::new(0)],
        selector: AtomicU64::new(0),
        upcall_pending: AtomicU8::new(0),
        upcall: Notify::new(),
    })
}

/// The guest's handler: returns the ports it took, after one upcall.
fn handle(p: &Page) -> Vec<u32> {
    let mut ports = Vec::new();
    loop {
        p.upcall_pending.store(0, SeqCst);
        let sel = p.selector.swap(0, SeqCst);
        for word in 0..2u32 {
            if sel & (1 << word) == 0 {
                continue;
            }
            let bits = p.pending[word as usize].load(SeqCst) & !p.mask[word as usize].load(SeqCst);
            p.pending[word as usize].fetch_and(!bits, SeqCst);
            for b in 0..64 {
                if bits & (1 << b) != 0 {
                    ports.push(64 * word + b);
                }
            }
        }
        if p.upcall_pending.load(SeqCst) == 0 {
            return ports;
        }
    }
}

#[test]
fn loom_every_raised_event_is_handled() {
    loom::model(|| {
        let p = page();
        let guest_page = p.clone();
        let guest = loom::thread::spawn(move || {
            let mut seen = Vec::new();
            // Ports 1 and 70 (two words), each raised once.
            while seen.len() < 2 {
                guest_page.upcall.wait();
                seen.extend(handle(&guest_page));
            }
            seen.sort();
            assert_eq!(seen, [1, 70], "each event handled once");
        });
        for port in [1, 70] {
            if raise(&*p, port, 0) {
                p.upcall.notify();
            }
        }
        guest.join().unwrap();
    });
}

#[test]
fn loom_an_event_raised_while_the_guest_handles_another_is_not_lost() {
    loom::model(|| {
        let p = page();
        let guest_page = p.clone();
        let guest = loom::thread::spawn(move || {
            let mut seen = 0;
            // The same port twice: the guest may take both in one pass or need two
            // upcalls; either way it must not wait forever.
            while seen < 1 {
                guest_page.upcall.wait();
                seen += handle(&guest_page).len();
            }
        });
        if raise(&*p, 5, 0) {
            p.upcall.notify();
        }
        if raise(&*p, 5, 0) {
            p.upcall.notify();
        }
        guest.join().unwrap();
        // Whatever the guest did not take is still pending and flagged, so the next
        // upcall delivers it: a bit pending without its selector flag would be lost.
        let pending = p.pending[0].load(SeqCst) & (1 << 5) != 0;
        let flagged = p.selector.load(SeqCst) & 1 != 0;
        assert!(
            !pending || flagged,
            "a pending event whose word is not flagged"
        );
    });
}
