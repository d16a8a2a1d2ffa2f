//! A back end on a shared ring whose every byte (indices, events, entries) the guest
//! controls, and keeps changing between operations. Popping and answering never
//! panics, never yields more requests than a ring holds without an error, and
//! answers only requests it took.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcraft_memory::vm_memory::{Bytes, GuestAddress};
use vmcraft_memory::{layout::MemoryLayout, GuestRam};
use vmcraft_pv_hypercall::ring::{BackRing, Entry, GuestRingMemory, RingError};

/// A blkif-sized request (112 bytes), a small response.
struct Req([u8; 112]);
struct Rsp(u64);

impl Entry for Req {
    const SIZE: usize = 112;
    fn encode(&self, out: &mut [u8]) {
        out.copy_from_slice(&self.0);
    }
    fn decode(b: &[u8]) -> Self {
        Req(b.try_into().unwrap())
    }
}

impl Entry for Rsp {
    const SIZE: usize = 16;
    fn encode(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.0.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Self {
        Rsp(u64::from_le_bytes(b[..8].try_into().unwrap()))
    }
}

fuzz_target!(|data: &[u8]| {
    let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
    let mem = ram.memory().clone();
    let page = GuestAddress(0x1000);
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    // The first byte says how many 5-byte operations come first; the rest is the
    // initial content of the ring page (header, then entries).
    let (ops, contents) = rest.split_at((usize::from(n) * 5).min(rest.len()));
    mem.write_slice(&contents[..contents.len().min(4096)], page)
        .unwrap();
    let ring = GuestRingMemory::new(mem.clone(), page, 4096).unwrap();
    let mut back = BackRing::<_, Req, Rsp>::attach(ring).unwrap();
    let entries = back.entries();
    let mut taken = 0u64;
    let mut answered = 0u64;
    for op in ops.chunks(5) {
        match op[0] % 4 {
            0 => match back.pop_request() {
                Ok(Some(_)) => taken += 1,
                Ok(None) => {}
                Err(RingError::ProducerOverflow {
                    claimed,
                    entries: e,
                }) => {
                    assert!(claimed > e && e == entries)
                }
                Err(e) => panic!("unexpected {e}"),
            },
            1 => match back.push_response(&Rsp(answered)) {
                Ok(()) => answered += 1,
                Err(RingError::NoRequestToAnswer) => assert_eq!(answered, taken),
                Err(e) => panic!("unexpected {e}"),
            },
            2 => {
                back.publish_responses();
                let _ = back.final_check_for_requests();
            }
            _ => {
                // The guest rewrites a header word behind the back end's back.
                if op.len() == 5 {
                    let word = u32::from_le_bytes([op[1], op[2], op[3], op[4]]);
                    let at = u64::from(op[1] % 4) * 4;
                    mem.write_obj(word, GuestAddress(page.0 + at)).unwrap();
                }
            }
        }
        assert!(answered <= taken);
    }
});
