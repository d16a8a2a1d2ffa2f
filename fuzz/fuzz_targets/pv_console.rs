//! The PV console backend on a console page the guest controls: draining output and
//! feeding input never panic, never move more than a ring, and leave consistent
//! indices behind.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcraft_memory::vm_memory::{Bytes, GuestAddress};
use vmcraft_memory::{layout::MemoryLayout, GuestRam};
use vmcraft_pv_hypercall::console::{ConsoleBackend, IN_SIZE, OUT_SIZE};

fuzz_target!(|data: &[u8]| {
    let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
    let page = GuestAddress(0x3000);
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (input, contents) = rest.split_at((usize::from(n) * 8).min(rest.len()));
    ram.memory()
        .write_slice(&contents[..contents.len().min(4096)], page)
        .unwrap();
    let console = ConsoleBackend::new(ram.memory().clone(), page).unwrap();
    let mut out = Vec::new();
    if let Ok(moved) = console.drain_output(&mut out) {
        assert!(moved <= OUT_SIZE as usize && moved == out.len());
    }
    if let Ok(taken) = console.feed_input(input) {
        assert!(taken <= input.len() && taken <= IN_SIZE as usize);
    }
});
