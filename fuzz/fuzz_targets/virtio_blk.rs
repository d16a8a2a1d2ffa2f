//! virtio-blk request handling on a guest-controlled queue: the input is the first
//! bytes of guest memory (descriptor table, rings, headers, buffers, packed into the
//! first page so short inputs reach everything) plus the queue size, the EVENT_IDX flag
//! and read-only mode. Whatever the guest wrote, serving must return (Ok or a
//! protocol error), never panic, and never complete more chains than the driver made
//! available.
#![no_main]

use std::fs::File;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmcraft_devices::virtio::block::{serve_queue, Disk};
use vmcraft_devices::virtio::virtio_queue::{Queue, QueueT};
use vmcraft_devices::virtio::Interrupt;
use vmcraft_memory::layout::MemoryLayout;
use vmcraft_memory::vm_memory::{Bytes, GuestAddress};
use vmcraft_memory::GuestRam;

const WINDOW: usize = 64 << 10;
// For queues of up to 16 entries: 256 bytes of descriptors, then the rings.
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x180;

fn image() -> File {
    static IMAGE: OnceLock<File> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let path = std::env::temp_dir().join(format!("vmcraft-fuzz-blk-{}.img", std::process::id()));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            std::fs::remove_file(&path).unwrap();
            f.set_len(64 * 512).unwrap();
            f
        })
        .try_clone()
        .unwrap()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (control, contents) = data.split_at(2);
    let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
    let mem = ram.memory();
    let n = contents.len().min(WINDOW);
    mem.write_slice(&contents[..n], GuestAddress(0)).unwrap();
    // The used ring belongs to the device; the driver starts it at zero.
    mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
    let size = 1u16 << (control[0] % 5); // 1..=16
    let mut queue = Queue::new(256).unwrap();
    queue.set_size(size);
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);
    queue.set_event_idx(control[1] & 1 != 0);
    let disk = Disk::new(image(), control[1] & 2 != 0, "fuzz").unwrap();
    let interrupt = Interrupt::new().unwrap();
    let mut scratch = vec![0u8; 4096];
    let avail_idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
    if let Ok(served) = serve_queue(&mut queue, mem, &disk, &interrupt, &mut scratch) {
        // Only chains the driver made available (at most a queue's worth at once).
        assert!(served <= usize::from(avail_idx).min(usize::from(size)));
        let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        // The last write to it is the device's index update (request data may have
        // been aimed at the ring, but each completion rewrites the index after it).
        assert_eq!(usize::from(used_idx), served);
    }
});
