//! virtio-console transmit and receive on guest-controlled queues, with input bytes
//! from the fuzzer. Serving never panics and input is never lost: what is not in a
//! completed receive buffer is still pending.
#![no_main]

#[path = "guest_queue.rs"]
mod guest_queue;

use guest_queue::{guest_queue, used_idx};
use libfuzzer_sys::fuzz_target;
use vmcraft_devices::virtio::console::{transmit, Pending};
use vmcraft_devices::virtio::queue::serve_available;
use vmcraft_devices::virtio::Interrupt;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (control, rest) = data.split_at(3);
    let split = (usize::from(control[2]) * 16).min(rest.len());
    let (contents, input) = rest.split_at(split);
    let (ram, mut queue) = guest_queue(contents, control[0], control[1] & 1 != 0);
    let mem = ram.memory();
    let interrupt = Interrupt::new().unwrap();
    // Where a serving call that stops at its budget would ask to be called again.
    let requeue = vmcraft_devices::virtio::EventFd::new(0).unwrap();
    if control[1] & 2 == 0 {
        let mut out = Vec::new();
        if let Ok(served) = serve_available(&mut queue, mem, interrupt.queue(1), &requeue, |chain| {
            transmit(chain, mem, &mut out)
        }) {
            assert_eq!(usize::from(used_idx(&ram)), served);
        }
    } else {
        let mut pending = Pending::default();
        let queued = pending.push(input);
        let before = pending.len();
        if let Ok(completed) = pending.deliver(&mut queue, mem, &interrupt) {
            assert_eq!(usize::from(used_idx(&ram)), completed);
            assert!(pending.len() <= before && queued == before);
        }
    }
});
