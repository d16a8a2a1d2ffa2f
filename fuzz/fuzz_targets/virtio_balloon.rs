//! virtio-balloon on guest-controlled queues: page numbers, statistics buffers and
//! free page reports from the fuzzer, on the queue the first byte picks (inflate,
//! deflate, statistics, reporting), for a driver with the features the second byte
//! picks. Serving never panics and never counts more pages inflated than RAM has.
#![no_main]

#[path = "guest_queue.rs"]
mod guest_queue;

use guest_queue::guest_queue;
use libfuzzer_sys::fuzz_target;
use vmcraft_devices::virtio::balloon::{Balloon, BalloonServer, F_PAGE_REPORTING, F_STATS_VQ};
use vmcraft_devices::virtio::virtio_queue::{Queue, QueueT};
use vmcraft_devices::virtio::worker::Token;
use vmcraft_devices::virtio::Interrupt;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let features = match data[1] % 4 {
        0 => 0,
        1 => F_STATS_VQ,
        2 => F_PAGE_REPORTING,
        _ => F_STATS_VQ | F_PAGE_REPORTING,
    };
    let roles =
        2 + usize::from(features & F_STATS_VQ != 0) + usize::from(features & F_PAGE_REPORTING != 0);
    let role = usize::from(data[0]) % roles;
    let (ram, fuzzed) = guest_queue(&data[4..], data[2], data[3] & 1 != 0);
    let mut queues: Vec<Queue> = (0..4)
        .map(|_| {
            let mut q = Queue::new(16).unwrap();
            q.set_ready(true);
            q
        })
        .collect();
    queues[role] = fuzzed;
    let (balloon, control) = Balloon::new("fuzz").unwrap();
    let interrupt = std::sync::Arc::new(Interrupt::new().unwrap());
    let Ok(mut server) =
        BalloonServer::new(&balloon, ram.memory().clone(), interrupt, features, queues)
    else {
        return;
    };
    let _ = server.serve(Token::Queue(role));
    // Twice: a statistics buffer held, then returned on request.
    control.request_stats();
    let _ = server.serve(Token::Fd(0));
    let _ = server.serve(Token::Queue(role));
    // Each page counts once however often the guest names it.
    assert!(control.inflated_pages() <= (1 << 20) / 4096);
});
