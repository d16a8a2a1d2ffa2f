//! The xenstore under any byte stream a guest writes into its request ring: the
//! framer cuts it into messages (or stops at a payload over the limit), every message
//! is answered as domain 1's (never a panic), each reply fits the wire's limit, every
//! node still has its parent, and the guest never owns more nodes than its quota nor
//! reads outside its permissions. Then the same bytes as the whole shared page
//! (rings and indices) served by the store ring: never a panic, never more written
//! than a ring holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcraft_pv_hypercall::ring::{HostRingMemory, RingMemory};
use vmcraft_pv_hypercall::xenstore::ring::{StoreRing, INTERFACE_LEN, RING_SIZE};
use vmcraft_pv_hypercall::xenstore::store::{Access, Perm};
use vmcraft_pv_hypercall::xenstore::wire::{Framer, HEADER_LEN, PAYLOAD_MAX};
use vmcraft_pv_hypercall::xenstore::Xenstore;

fuzz_target!(|data: &[u8]| {
    let mut xs = Xenstore::default();
    xs.store.write(0, 0, b"/secret", b"dom0 only").unwrap();
    xs.store.mkdir(0, 0, b"/local/domain/1").unwrap();
    xs.store
        .set_perms(
            0,
            0,
            b"/local/domain/1",
            &[Perm {
                dom: 1,
                access: Access::None,
            }],
        )
        .unwrap();
    let mut framer = Framer::default();
    // Any chunking: the first byte says how long the chunks are.
    let (chunk, stream) = data
        .split_first()
        .map_or((1, data), |(c, r)| (usize::from(*c).max(1), r));
    for piece in stream.chunks(chunk) {
        let Ok(msgs) = framer.push(piece) else {
            break;
        };
        for m in msgs {
            for r in xs.handle(1, &m) {
                assert!(r.payload.len() <= PAYLOAD_MAX);
                assert_eq!(r.to_bytes().len(), HEADER_LEN + r.payload.len());
                assert_ne!(r.payload, b"dom0 only");
            }
        }
    }
    let dump = xs.store.dump();
    let paths: std::collections::BTreeSet<&str> = dump.iter().map(|(p, _)| p.as_str()).collect();
    for p in &paths {
        if *p != "/" {
            let parent = match p.rfind('/') {
                Some(0) => "/",
                Some(i) => &p[..i],
                None => panic!("a relative path in the store: {p}"),
            };
            assert!(paths.contains(parent), "{p} without its parent");
        }
    }
    assert!(dump.len() <= 1000 + 4, "{} nodes", dump.len());
    assert_eq!(xs.store.read(0, 0, b"/secret").unwrap(), b"dom0 only");

    if data.is_empty() {
        return;
    }
    let page = HostRingMemory::new(4096).unwrap();
    let bytes: Vec<u8> = data.iter().copied().cycle().take(INTERFACE_LEN).collect();
    page.write(0, &bytes);
    let mut ring = StoreRing::new(page.clone(), 1).unwrap();
    for _ in 0..4 {
        let before = page.load_u32(2060);
        if ring.serve(&mut xs).is_err() {
            assert!(ring.broken().is_some());
            assert_ne!(page.load_u32(2072), 0);
            break;
        }
        assert!(page.load_u32(2060).wrapping_sub(before) <= RING_SIZE);
        // The guest consumes every reply.
        page.store_u32(2056, page.load_u32(2060));
    }
});
