//! The balloon against a driver of our own making on mock queues.

use super::*;
use crate::virtio::test_util::{desc as d, used_lens};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::mock::MockSplitQueue;
use vmcraft_memory::{layout::MemoryLayout, GuestRam};

const RAM: u64 = 8 << 20;
/// Where the test driver keeps its buffers.
const BUF: u64 = 0x10_0000;

fn ram() -> GuestRam {
    GuestRam::new(&MemoryLayout::x86_64(RAM).unwrap()).unwrap()
}

/// A server over `mem` for a driver that accepted `features`, with empty ready queues.
fn serving(mem: &GuestMemory, features: u64, balloon: &Balloon) -> BalloonServer {
    let queues = (0..4)
        .map(|_| {
            let mut q = Queue::new(QUEUE_SIZE).unwrap();
            q.set_ready(true);
            q
        })
        .collect();
    BalloonServer::new(
        balloon,
        mem.clone(),
        Arc::new(Interrupt::new().unwrap()),
        features,
        queues,
    )
    .unwrap()
}

/// Post one chain of `pfns` (one readable descriptor) on `mock` and return its queue.
fn pfn_queue<'a>(
    mem: &'a GuestMemory,
    mock: &MockSplitQueue<'a, GuestMemory>,
    pfns: &[u32],
) -> Queue {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    mock.add_desc_chains(&[d(BUF, bytes.len() as u32, 0, 0)], 0)
        .unwrap();
    mock.create_queue().unwrap()
}

fn balloon() -> (Balloon, Arc<BalloonControl>) {
    Balloon::new("test").unwrap()
}

#[test]
fn inflated_pages_are_freed_and_counted_and_deflated_ones_given_back() {
    let ram = ram();
    let mem = ram.memory();
    let (b, ctl) = balloon();
    let mut s = serving(mem, 0, &b);
    let page = 0x300u32; // 3 MiB
    mem.write_obj(0x5a5a_u64, GuestAddress(u64::from(page) << 12))
        .unwrap();
    let mock = MockSplitQueue::new(mem, 16);
    // A page, the same page again, a page past RAM, another page.
    s.queues.inflate = pfn_queue(mem, &mock, &[page, page, 0xff_ffff, page + 1]);
    s.serve(Token::Queue(0)).unwrap();
    assert_eq!(used_lens(mem, &mock), [0]);
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(u64::from(page) << 12))
            .unwrap(),
        0
    );
    assert_eq!(
        (
            ctl.inflated_pages(),
            ctl.redundant_pages(),
            ctl.pages_outside_ram()
        ),
        (2, 1, 1)
    );
    // Deflate one inflated page and one that never was.
    let mock = MockSplitQueue::new(mem, 16);
    s.queues.deflate = pfn_queue(mem, &mock, &[page, 0x400]);
    s.serve(Token::Queue(1)).unwrap();
    assert_eq!((ctl.inflated_pages(), ctl.redundant_pages()), (1, 2));
}

#[test]
fn a_chain_with_too_many_page_numbers_is_a_protocol_error() {
    let ram = ram();
    let mem = ram.memory();
    let (b, ctl) = balloon();
    let mut s = serving(mem, 0, &b);
    let mock = MockSplitQueue::new(mem, 16);
    let mut pfns = vec![0x200u32; MAX_PFNS_PER_CHAIN];
    pfns.push(0x201);
    s.queues.inflate = pfn_queue(mem, &mock, &pfns);
    assert!(matches!(
        s.serve(Token::Queue(0)),
        Err(ProtocolError::LengthOverflow)
    ));
    assert_eq!(
        ctl.inflated_pages(),
        0,
        "nothing of a refused chain is applied"
    );
}

#[test]
fn statistics_are_kept_and_the_buffer_held_until_fresh_ones_are_wanted() {
    let ram = ram();
    let mem = ram.memory();
    let (b, ctl) = balloon();
    let mut s = serving(mem, F_STATS_VQ, &b);
    let mut buf = Vec::new();
    for (tag, value) in [(tag::FREE_MEMORY, 1u64 << 30), (tag::TOTAL_MEMORY, 2 << 30)] {
        buf.extend(tag.to_le_bytes());
        buf.extend(value.to_le_bytes());
    }
    mem.write_slice(&buf, GuestAddress(BUF)).unwrap();
    let mock = MockSplitQueue::new(mem, 16);
    mock.add_desc_chains(&[d(BUF, buf.len() as u32, 0, 0)], 0)
        .unwrap();
    s.queues.stats = Some(mock.create_queue().unwrap());
    // The driver says its balloon holds 12 pages.
    let mut b = b;
    b.write_config(4, &12u32.to_le_bytes());
    // The stats queue is the third when STATS_VQ is negotiated.
    s.serve(Token::Queue(2)).unwrap();
    let stats = ctl.stats().unwrap();
    // The first buffer, counted with the balloon as it was.
    assert_eq!((stats.sequence, stats.ballooned), (1, 12));
    assert_eq!(stats.get(tag::FREE_MEMORY), Some(1 << 30));
    assert_eq!(stats.get(tag::TOTAL_MEMORY), Some(2 << 30));
    assert_eq!(stats.get(tag::SWAP_IN), None);
    assert!(used_lens(mem, &mock).is_empty(), "held until asked");
    ctl.request_stats();
    s.serve(Token::Fd(0)).unwrap();
    assert_eq!(used_lens(mem, &mock), [0]);
}

#[test]
fn a_statistics_buffer_too_long_is_refused() {
    assert!(parse_stats(&vec![0u8; 10 * MAX_STATS]).is_ok());
    assert!(matches!(
        parse_stats(&vec![0u8; 10 * (MAX_STATS + 1)]),
        Err(ProtocolError::LengthOverflow)
    ));
    // A partial entry at the end is ignored.
    assert_eq!(
        parse_stats(&[1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 9])
            .unwrap()
            .entries,
        [(1, 2)]
    );
}

#[test]
fn reported_free_pages_are_freed_rounded_inward_and_counted() {
    let ram = ram();
    let mem = ram.memory();
    let (b, ctl) = balloon();
    let mut s = serving(mem, F_STATS_VQ | F_PAGE_REPORTING, &b);
    for p in 0..4u64 {
        mem.write_obj(0x77u8, GuestAddress(0x40_0000 + p * 4096))
            .unwrap();
    }
    let mock = MockSplitQueue::new(mem, 16);
    // 0x40_0800 .. 0x40_3800 covers whole pages 0x401000..0x403000; then a range
    // outside RAM.
    mock.add_desc_chains(
        &[
            d(0x40_0800, 0x3000, VRING_DESC_F_NEXT, 1),
            d(RAM + 0x1000, 0x2000, 0, 0),
        ],
        0,
    )
    .unwrap();
    s.queues.reporting = Some(mock.create_queue().unwrap());
    // With STATS_VQ negotiated the reporting queue is the fourth.
    s.serve(Token::Queue(3)).unwrap();
    assert_eq!(used_lens(mem, &mock), [0]);
    assert_eq!((ctl.reported_pages(), ctl.pages_outside_ram()), (2, 2));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x40_0000)).unwrap(), 0x77);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x40_1000)).unwrap(), 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x40_2000)).unwrap(), 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x40_3000)).unwrap(), 0x77);
    // A buffer at the top of the address space (found by the fuzzer: rounding its
    // start up to a page overflowed) frees nothing.
    let mock = MockSplitQueue::new(mem, 16);
    mock.add_desc_chains(&[d(u64::MAX - 100, 0x2000, 0, 0)], 0)
        .unwrap();
    s.queues.reporting = Some(mock.create_queue().unwrap());
    s.serve(Token::Queue(3)).unwrap();
    assert_eq!(used_lens(mem, &mock), [0]);
    assert_eq!(ctl.reported_pages(), 2);
    // A write-only descriptor (the wrong direction) is skipped.
    let mock = MockSplitQueue::new(mem, 16);
    mock.add_desc_chains(&[d(0x40_3000, 0x1000, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    s.queues.reporting = Some(mock.create_queue().unwrap());
    s.serve(Token::Queue(3)).unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x40_3000)).unwrap(), 0x77);
}

#[test]
fn a_driver_that_leaves_a_negotiated_queue_unready_is_refused() {
    let ram = ram();
    let (b, _) = balloon();
    let queues = (0..4).map(|_| Queue::new(QUEUE_SIZE).unwrap()).collect();
    assert!(matches!(
        BalloonServer::new(
            &b,
            ram.memory().clone(),
            Arc::new(Interrupt::new().unwrap()),
            0,
            queues
        ),
        Err(ActivateError::QueueNotReady(0))
    ));
}

#[test]
fn queues_are_numbered_over_the_negotiated_features() {
    assert_eq!(queue_role(2, 0), None);
    assert_eq!(queue_role(2, F_PAGE_REPORTING), Some("reporting"));
    assert_eq!(queue_role(2, F_STATS_VQ | F_PAGE_REPORTING), Some("stats"));
    assert_eq!(
        queue_role(3, F_STATS_VQ | F_PAGE_REPORTING),
        Some("reporting")
    );
    assert_eq!(queue_role(1, 0), Some("deflate"));
}

#[test]
fn the_config_space_carries_the_target_and_the_drivers_actual() {
    let (mut b, ctl) = Balloon::new("cfg").unwrap();
    ctl.set_target(1234);
    let mut cfg = [0u8; 8];
    b.read_config(0, &mut cfg);
    assert_eq!(cfg[..4], 1234u32.to_le_bytes());
    b.write_config(4, &77u32.to_le_bytes());
    assert_eq!(ctl.actual(), 77);
    // The driver may not write the target, nor `actual` with another width.
    b.write_config(0, &9u32.to_le_bytes());
    b.write_config(4, &[1, 2]);
    assert_eq!((ctl.target(), ctl.actual()), (1234, 77));
}

/// A snapshot keeps which pages are inflated: the restored balloon deflates them as
/// its own (nothing redundant), and refuses a state naming a page that is not RAM.
#[test]
fn the_inflated_pages_survive_a_snapshot_and_a_bad_state_is_refused() {
    let ram = ram();
    let mem = ram.memory();
    let (b, ctl) = balloon();
    let mut s = serving(mem, 0, &b);
    let mock = MockSplitQueue::new(mem, 16);
    s.queues.inflate = pfn_queue(mem, &mock, &[0x300, 0x301, 0x3ff]);
    s.serve(Token::Queue(0)).unwrap();
    ctl.set_target(7);
    let saved = ctl.save_state();
    assert_eq!((saved.target, saved.inflated.len()), (7, 0x400 / 64));

    let (b2, ctl2) = balloon();
    ctl2.restore_state(&saved, mem).unwrap();
    assert_eq!((ctl2.inflated_pages(), ctl2.target()), (3, 7));
    let mut s2 = serving(mem, 0, &b2);
    let mock = MockSplitQueue::new(mem, 16);
    s2.queues.deflate = pfn_queue(mem, &mock, &[0x300, 0x301, 0x3ff]);
    s2.serve(Token::Queue(1)).unwrap();
    assert_eq!((ctl2.inflated_pages(), ctl2.redundant_pages()), (0, 0));

    // A page past the 8 MiB of RAM.
    let mut bad = saved.clone();
    bad.inflated.resize(0x1000 / 64, 0);
    bad.inflated[0xfff / 64] |= 1 << (0xfff % 64);
    let (_, ctl3) = balloon();
    let err = ctl3.restore_state(&bad, mem).unwrap_err();
    assert!(err.to_string().contains("0xfff"), "{err}");
    assert_eq!(ctl3.inflated_pages(), 0);
}

/// With EVENT_IDX the device asks to hear of the driver's next statistics buffer (the
/// used ring's avail event moves past the one it took): Linux's driver posts each
/// later buffer only if asked so.
#[test]
fn with_event_idx_the_next_statistics_buffer_is_asked_for() {
    let ram = ram();
    let mem = ram.memory();
    let (b, ctl) = balloon();
    let mut s = serving(mem, F_STATS_VQ | F_EVENT_IDX, &b);
    let mut buf = Vec::new();
    buf.extend(tag::FREE_MEMORY.to_le_bytes());
    buf.extend(7u64.to_le_bytes());
    mem.write_slice(&buf, GuestAddress(BUF)).unwrap();
    let mock = MockSplitQueue::new(mem, 16);
    mock.add_desc_chains(&[d(BUF, buf.len() as u32, 0, 0)], 0)
        .unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    q.set_event_idx(true);
    s.queues.stats = Some(q);
    s.serve(Token::Queue(2)).unwrap();
    assert_eq!(ctl.stats().unwrap().get(tag::FREE_MEMORY), Some(7));
    // avail_event: after the used ring's 16 elements.
    let avail_event: u16 = mem
        .read_obj(GuestAddress(mock.used_addr().0 + 4 + 8 * 16))
        .unwrap();
    assert_eq!(avail_event, 1);
}

/// A statistics queue whose available index runs more than a queue ahead is a
/// protocol error, not a device thread spinning for ever (the fuzzer's finding: the
/// empty pop and the "more available" check agreed to loop).
#[test]
fn a_statistics_queue_with_a_runaway_available_index_is_an_error() {
    let ram = ram();
    let mem = ram.memory();
    let (b, _ctl) = balloon();
    for event_idx in [false, true] {
        let mut s = serving(
            mem,
            F_STATS_VQ | if event_idx { F_EVENT_IDX } else { 0 },
            &b,
        );
        let mock = MockSplitQueue::new(mem, 16);
        let mut q: Queue = mock.create_queue().unwrap();
        q.set_event_idx(event_idx);
        // avail->idx = 1000 with 16 entries.
        mem.write_obj(1000u16, GuestAddress(mock.avail_addr().0 + 2))
            .unwrap();
        s.queues.stats = Some(q);
        assert!(matches!(
            s.serve(Token::Queue(2)),
            Err(ProtocolError::Ring(_))
        ));
    }
}

/// A driver that posts more inflate chains than one turn serves gets the rest on the
/// server's requeue token: the thread looks at its other work in between.
#[test]
fn a_turn_is_bounded_and_the_rest_served_on_the_requeue_token() {
    use crate::virtio::queue::SERVE_BUDGET;
    let ram = ram();
    let mem = ram.memory();
    let (b, ctl) = balloon();
    let mut s = serving(mem, 0, &b);
    let chains = SERVE_BUDGET as u32 + 5;
    let mock = MockSplitQueue::new(mem, 2048);
    // One page per chain, each its own: 0x200.. (2 MiB on).
    let descs: Vec<_> = (0..chains)
        .map(|i| {
            let at = BUF + 4 * u64::from(i);
            mem.write_obj(0x200 + i, GuestAddress(at)).unwrap();
            d(at, 4, 0, 0)
        })
        .collect();
    mock.add_desc_chains(&descs, 0).unwrap();
    let mut inflate: Queue = mock.create_queue().unwrap();
    // The mock lays a 2048-entry used ring over its available ring: put it apart.
    inflate.set_used_ring_address(Some(0x70_0000), Some(0));
    s.queues.inflate = inflate;
    let empty = MockSplitQueue::create(mem, GuestAddress(0x78_0000), 16);
    s.queues.deflate = empty.create_queue().unwrap();
    s.serve(Token::Queue(0)).unwrap();
    assert_eq!(ctl.inflated_pages(), SERVE_BUDGET as u64);
    assert!(readable(s.again_fd()), "the requeue fd was not signalled");
    s.serve(BalloonServer::AGAIN).unwrap();
    assert_eq!(ctl.inflated_pages(), u64::from(chains));
    assert_eq!(ctl.redundant_pages(), 0);
    assert!(!readable(s.again_fd()), "read back to zero");
}

/// Whether `fd` is readable now.
fn readable(fd: std::os::fd::RawFd) -> bool {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let epoll = Epoll::new().unwrap();
    epoll
        .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
        .unwrap();
    let mut ev = [EpollEvent::default()];
    epoll.wait(0, &mut ev).unwrap() == 1
}
