//! virtio-blk request handling on a guest-controlled queue: the input is the first
//! bytes of guest memory (descriptor table, rings, headers, buffers, packed into the
//! first page so short inputs reach everything) plus the queue size, the EVENT_IDX flag
//! and read-only mode. Whatever the guest wrote, serving must return (Ok or a protocol
//! error), never panic, and publish exactly the chains it completed.
#![no_main]

#[path = "scratch.rs"]
mod scratch;

#[path = "guest_queue.rs"]
mod guest_queue;

use guest_queue::{guest_queue, used_idx};
use libfuzzer_sys::fuzz_target;
use vmcraft_devices::virtio::block::{serve_queue, Disk};
use vmcraft_devices::virtio::chain_buffers::ChainBuffers;
use vmcraft_devices::virtio::Interrupt;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (control, contents) = data.split_at(2);
    let (ram, mut queue) = guest_queue(contents, control[0], control[1] & 1 != 0);
    let mem = ram.memory();
    let disk = Disk::new(scratch::image(64), control[1] & 2 != 0, "fuzz").unwrap();
    let interrupt = Interrupt::new().unwrap();
    // Where a serving call that stops at its budget would ask to be called again.
    let requeue = vmcraft_devices::virtio::EventFd::new(0).unwrap();
    let mut buffers = ChainBuffers::default();
    if let Ok(served) = serve_queue(&mut queue, mem, &disk, &interrupt, &requeue, &mut buffers) {
        // No bound from the avail index read before: a read request may aim its data
        // at the avail ring and move the index itself. The last write to the index is the device's (request data may have been
        // aimed at the ring, but each completion rewrites the index after it).
        assert_eq!(usize::from(used_idx(&ram)), served);
    }
});
