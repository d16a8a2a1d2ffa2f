//! virtio-rng requests on a guest-controlled queue: serving never panics, completes
//! only what was made available, and never reports more bytes than the cap.
#![no_main]

#[path = "guest_queue.rs"]
mod guest_queue;

use guest_queue::{guest_queue, used_idx, USED};
use libfuzzer_sys::fuzz_target;
use vmcraft_devices::virtio::rng::{serve_queue, MAX_BYTES_PER_REQUEST};
use vmcraft_devices::virtio::Interrupt;
use vmcraft_memory::vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (ram, mut queue) = guest_queue(&data[2..], data[0], data[1] & 1 != 0);
    let mem = ram.memory();
    let interrupt = Interrupt::new().unwrap();
    // Where a serving call that stops at its budget would ask to be called again.
    let requeue = vmcraft_devices::virtio::EventFd::new(0).unwrap();
    let mut scratch = vec![0u8; 4096];
    if let Ok(served) = serve_queue(&mut queue, mem, &interrupt, &requeue, &mut scratch) {
        assert_eq!(usize::from(used_idx(&ram)), served);
        // Only the last used entry is sure to be the device's: a writable buffer may
        // alias the used ring (guest memory is the guest's to lay out), so a later
        // request's random bytes can overwrite earlier entries.
        if served > 0 {
            let size = 1u64 << (data[0] % 5);
            let last = (served as u64 - 1) % size;
            let len: u32 = mem.read_obj(GuestAddress(USED + 8 + 8 * last)).unwrap();
            assert!(len as usize <= MAX_BYTES_PER_REQUEST, "used length {len}");
        }
    }
});
