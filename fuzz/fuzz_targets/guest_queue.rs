//! Shared by the virtio fuzz targets: guest memory whose first bytes (descriptor table,
//! rings, buffers, packed into the first page) come from the fuzzer, and a queue of up
//! to 16 entries on it.
#![allow(dead_code)] // each target uses a different part

use vmcraft_devices::virtio::virtio_queue::{Queue, QueueT};
use vmcraft_memory::layout::MemoryLayout;
use vmcraft_memory::vm_memory::{Bytes, GuestAddress};
use vmcraft_memory::GuestRam;

const WINDOW: usize = 64 << 10;
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x100;
pub const USED: u64 = 0x180;

/// Guest RAM holding `contents`, and a ready queue of `1 << (size_bits % 5)` entries.
pub fn guest_queue(contents: &[u8], size_bits: u8, event_idx: bool) -> (GuestRam, Queue) {
    let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
    let mem = ram.memory();
    let n = contents.len().min(WINDOW);
    mem.write_slice(&contents[..n], GuestAddress(0)).unwrap();
    // The used ring belongs to the device; the driver starts it at zero.
    mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
    let mut queue = Queue::new(256).unwrap();
    queue.set_size(1u16 << (size_bits % 5));
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);
    queue.set_event_idx(event_idx);
    (ram, queue)
}

/// The used index the device published.
pub fn used_idx(ram: &GuestRam) -> u16 {
    ram.memory().read_obj(GuestAddress(USED + 2)).unwrap()
}
