//! The blkif backend on a ring page, grant table and granted pages the guest controls:
//! decoding and validating whatever requests it finds never panics, and every request
//! it takes gets exactly one response.
#![no_main]

#[path = "scratch.rs"]
mod scratch;

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmcraft_memory::vm_memory::{Bytes, GuestAddress};
use vmcraft_memory::{layout::MemoryLayout, GuestRam};
use vmcraft_pv_hypercall::blkif::BlkifBackend;
use vmcraft_pv_hypercall::grant::GrantTable;

fuzz_target!(|data: &[u8]| {
    let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
    let mem = ram.memory().clone();
    // Ring page at 0x1000 (header + 32 requests), grant table at 0x2000 (16 entries,
    // pointing at low frames the input also fills).
    let (ring, rest) = data.split_at(data.len().min(64 + 4 * 112));
    let (grants, pages) = rest.split_at(rest.len().min(128));
    mem.write_slice(ring, GuestAddress(0x1000)).unwrap();
    mem.write_slice(grants, GuestAddress(0x2000)).unwrap();
    mem.write_slice(&pages[..pages.len().min(8192)], GuestAddress(0x10_000))
        .unwrap();
    let table = Arc::new(GrantTable::new(mem.clone(), GuestAddress(0x2000), 16, 0).unwrap());
    let Ok(mut back) = BlkifBackend::new(
        mem.clone(),
        GuestAddress(0x1000),
        table,
        Arc::new(vmcraft_block::BlockImage::open(scratch::image(64), false).unwrap()),
    ) else {
        return;
    };
    let before: u32 = mem.read_obj(GuestAddress(0x1008)).unwrap(); // rsp_prod
    if let Ok(done) = back.process() {
        let after: u32 = mem.read_obj(GuestAddress(0x1008)).unwrap();
        assert_eq!(after.wrapping_sub(before) as usize, done.requests);
        assert!(done.requests <= 32);
    }
});
