//! Grant operations against a grant table the guest controls (and rewrites between
//! operations): never a panic, in-use marks only while mapped, copies inside a page.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcraft_memory::vm_memory::{Bytes, GuestAddress};
use vmcraft_memory::{layout::MemoryLayout, GuestRam};
use vmcraft_pv_hypercall::grant::{CopyDirection, GrantTable, PAGE};

fuzz_target!(|data: &[u8]| {
    let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
    let table_at = GuestAddress(0x1000);
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (ops, contents) = rest.split_at((usize::from(n) * 8).min(rest.len()));
    ram.memory()
        .write_slice(&contents[..contents.len().min(128)], table_at)
        .unwrap();
    let table = GrantTable::new(ram.memory().clone(), table_at, 16, 0).unwrap();
    let mut mapped = Vec::new();
    for op in ops.chunks_exact(8) {
        let gref = u32::from(op[1] % 20);
        match op[0] % 5 {
            0 | 1 => {
                if let Ok(m) = table.map(gref, op[0] % 5 == 1) {
                    assert!(m.page.0 % PAGE == 0);
                    mapped.push(m);
                }
            }
            2 => {
                if let Some(m) = mapped.pop() {
                    table.unmap(m).unwrap();
                }
            }
            3 => {
                let offset = u64::from(u16::from_le_bytes([op[2], op[3]]));
                let mut buf = vec![0u8; usize::from(op[4])];
                let dir = if op[5] & 1 == 0 {
                    CopyDirection::FromGuest
                } else {
                    CopyDirection::ToGuest
                };
                let r = table.copy(gref, offset, &mut buf, dir);
                if offset + buf.len() as u64 > PAGE {
                    assert!(r.is_err());
                }
            }
            _ => {
                // The guest rewrites an entry.
                let at = GuestAddress(0x1000 + 8 * u64::from(op[1] % 16));
                let _ = ram.memory().write_slice(&op[2..8], at);
            }
        }
    }
    for m in mapped {
        table.unmap(m).unwrap();
    }
});
