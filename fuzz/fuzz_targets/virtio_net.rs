//! virtio-net transmit, receive and control chain handling on guest-controlled queues.
//! Frames received come from the input too. Serving never panics, publishes exactly
//! the chains it completed, a frame is either delivered or still held, and the control
//! queue leaves the number of queue pairs in use within 1 to the device's.
#![no_main]

#[path = "guest_queue.rs"]
mod guest_queue;

use std::os::unix::net::UnixDatagram;

use guest_queue::{guest_queue, used_idx};
use libfuzzer_sys::fuzz_target;
use std::sync::atomic::{AtomicU16, Ordering};

use vmcraft_devices::virtio::net::{
    control_command, transmit, FrameIo, RxPath, HEADER_SIZE, MAX_FRAME,
};
use vmcraft_devices::virtio::queue::serve_available;
use vmcraft_devices::virtio::Interrupt;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (control, rest) = data.split_at(4);
    let split = (usize::from(control[2]) * 16).min(rest.len());
    let (contents, frames) = rest.split_at(split);
    let (ram, mut queue) = guest_queue(contents, control[0], control[1] & 1 != 0);
    let mem = ram.memory();
    let interrupt = Interrupt::new().unwrap();
    // Where a serving call that stops at its budget would ask to be called again.
    let requeue = vmcraft_devices::virtio::EventFd::new(0).unwrap();
    let (ours, theirs) = UnixDatagram::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    let mut backend: Box<dyn FrameIo> = Box::new(ours);
    if control[1] & 4 != 0 {
        // The control queue of a device with up to four queue pairs.
        const PAIRS: u16 = 4;
        let active = AtomicU16::new(1);
        if let Ok(served) =
            serve_available(&mut queue, mem, interrupt.queue(2), &requeue, |chain| {
                control_command(chain, mem, PAIRS, &active)
            })
        {
            assert_eq!(usize::from(used_idx(&ram)), served);
        }
        assert!((1..=PAIRS).contains(&active.load(Ordering::SeqCst)));
    } else if control[1] & 2 == 0 {
        let mut buf = vec![0u8; HEADER_SIZE + MAX_FRAME];
        if let Ok(served) =
            serve_available(&mut queue, mem, interrupt.queue(1), &requeue, |chain| {
                transmit(chain, mem, &mut *backend, &mut buf)
            })
        {
            assert_eq!(usize::from(used_idx(&ram)), served);
        }
    } else {
        let mut sent = 0;
        for frame in frames.chunks(usize::from(control[3]).max(1)).take(4) {
            if theirs.send(frame).is_ok() {
                sent += 1;
            }
        }
        let mut path = RxPath::default();
        if let Ok(delivered) =
            path.pump(&mut queue, mem, &mut *backend, interrupt.queue(0), &requeue)
        {
            assert!(delivered <= sent);
            assert!(usize::from(used_idx(&ram)) >= delivered);
        }
    }
});
