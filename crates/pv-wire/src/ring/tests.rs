//! The ring protocol: layout, ordering, suppression, hostile indices, wrap-around.

use super::*;

extern crate std;
use std::boxed::Box;
use std::sync::Arc;
use std::vec;

/// A ring page on the heap that host threads share (clones share it), reached
/// through [`RawRingMemory`] as a guest reaches its own page.
#[derive(Clone)]
struct HostRingMemory {
    _page: Arc<Box<[u64]>>,
    raw: RawRingMemory,
}

// SAFETY: every access through `raw` is volatile or atomic (the ring protocol is
// made for two sides writing one page concurrently), and `_page` keeps the buffer
// alive for as long as any clone exists.
unsafe impl Send for HostRingMemory {}
// SAFETY: as for Send; `&HostRingMemory` only reaches the page through `raw`.
unsafe impl Sync for HostRingMemory {}

impl HostRingMemory {
    fn new(size: usize) -> Result<Self, RingError> {
        let page: Box<[u64]> = vec![0u64; size.div_ceil(8)].into_boxed_slice();
        // SAFETY: the buffer is 8-aligned, `size` bytes fit in it, and it lives as
        // long as this value's clones (the Arc); it is never reached another way.
        let raw = unsafe { RawRingMemory::new(page.as_ptr() as *mut u8, size) };
        Ok(HostRingMemory {
            _page: Arc::new(page),
            raw,
        })
    }
}

impl RingMemory for HostRingMemory {
    fn size(&self) -> usize {
        self.raw.size()
    }
    fn load_u32(&self, offset: usize) -> u32 {
        self.raw.load_u32(offset)
    }
    fn store_u32(&self, offset: usize, value: u32) {
        self.raw.store_u32(offset, value)
    }
    fn read(&self, offset: usize, buf: &mut [u8]) {
        self.raw.read(offset, buf)
    }
    fn write(&self, offset: usize, data: &[u8]) {
        self.raw.write(offset, data)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Req(u64);
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rsp(u32);

impl Entry for Req {
    const SIZE: usize = 8;
    fn encode(&self, out: &mut [u8]) {
        out.copy_from_slice(&self.0.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Self {
        Req(u64::from_le_bytes(b.try_into().unwrap()))
    }
}

impl Entry for Rsp {
    const SIZE: usize = 4;
    fn encode(&self, out: &mut [u8]) {
        out.copy_from_slice(&self.0.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Self {
        Rsp(u32::from_le_bytes(b.try_into().unwrap()))
    }
}

/// A blkif-sized request: 112 bytes.
struct Big;
impl Entry for Big {
    const SIZE: usize = 112;
    fn encode(&self, _: &mut [u8]) {}
    fn decode(_: &[u8]) -> Self {
        Big
    }
}

type Front = FrontRing<HostRingMemory, Req, Rsp>;
type Back = BackRing<HostRingMemory, Req, Rsp>;

fn pair(size: usize) -> (Front, Back, HostRingMemory) {
    let page = HostRingMemory::new(size).unwrap();
    let front = Front::init(page.clone()).unwrap();
    let back = Back::attach(page.clone()).unwrap();
    (front, back, page)
}

#[test]
fn layouts_match_ring_h() {
    assert_eq!(RingLayout::new::<Big, Big>(4096).unwrap().entries, 32);
    assert_eq!(RingLayout::new::<Req, Rsp>(4096).unwrap().entries, 256);
    assert_eq!(RingLayout::new::<Req, Rsp>(64 + 8).unwrap().entries, 1);
    assert!(RingLayout::new::<Req, Rsp>(64).is_err());
    assert!(RingLayout::new::<Big, Big>(100).is_err());
}

#[test]
fn requests_and_responses_flow_in_order() {
    let (mut f, mut b, _) = pair(4096);
    for i in 0..10 {
        f.push_request(&Req(i)).unwrap();
    }
    f.publish_requests();
    for i in 0..10 {
        let r = b.pop_request().unwrap().unwrap();
        assert_eq!(r, Req(i));
        b.push_response(&Rsp(i as u32 * 2)).unwrap();
    }
    assert_eq!(b.pop_request().unwrap(), None);
    b.publish_responses();
    for i in 0..10 {
        assert_eq!(f.pop_response().unwrap(), Some(Rsp(i * 2)));
    }
    assert_eq!(f.pop_response().unwrap(), None);
}

#[test]
fn notifications_are_suppressed_until_the_consumer_asks() {
    let (mut f, mut b, _) = pair(4096);
    f.push_request(&Req(1)).unwrap();
    assert!(
        f.publish_requests(),
        "req_event starts at 1: the first request notifies"
    );
    f.push_request(&Req(2)).unwrap();
    assert!(!f.publish_requests(), "the back end has not asked again");
    assert_eq!(b.pop_request().unwrap(), Some(Req(1)));
    assert_eq!(b.pop_request().unwrap(), Some(Req(2)));
    // Going to sleep: ask for the next one, nothing raced in.
    assert!(!b.final_check_for_requests().unwrap());
    f.push_request(&Req(3)).unwrap();
    assert!(f.publish_requests(), "asked for request 3");
    // The final check catches a request published between the check and the sleep.
    assert!(b.final_check_for_requests().unwrap());
    // Same on the response side.
    b.pop_request().unwrap();
    for i in 0..3 {
        b.push_response(&Rsp(i)).unwrap();
    }
    assert!(b.publish_responses(), "rsp_event starts at 1");
    for _ in 0..3 {
        f.pop_response().unwrap().unwrap();
    }
    assert!(!f.final_check_for_responses().unwrap());
}

#[test]
fn a_full_ring_refuses_and_responses_need_requests() {
    let (mut f, mut b, _) = pair(64 + 4 * 8);
    assert_eq!(f.entries(), 4);
    for i in 0..4 {
        f.push_request(&Req(i)).unwrap();
    }
    assert_eq!(f.push_request(&Req(9)), Err(RingError::Full));
    f.publish_requests();
    assert_eq!(b.push_response(&Rsp(0)), Err(RingError::NoRequestToAnswer));
    b.pop_request().unwrap();
    b.push_response(&Rsp(0)).unwrap();
    assert_eq!(b.push_response(&Rsp(0)), Err(RingError::NoRequestToAnswer));
    b.publish_responses();
    f.pop_response().unwrap();
    assert_eq!(f.free_requests(), 1);
}

#[test]
fn a_producer_index_claiming_too_much_is_rejected() {
    let (mut f, mut b, page) = pair(4096);
    f.push_request(&Req(1)).unwrap();
    f.publish_requests();
    // A hostile front end claims 257 requests in a 256-entry ring.
    page.store_u32(REQ_PROD, 257);
    assert_eq!(
        b.pop_request(),
        Err(RingError::ProducerOverflow {
            claimed: 257,
            entries: 256
        })
    );
    // Exactly a ring's worth is fine.
    page.store_u32(REQ_PROD, 256);
    assert_eq!(b.unconsumed_requests(), Ok(256));
    // And a back end claiming too many responses is caught by the front end.
    page.store_u32(RSP_PROD, 1000);
    assert!(matches!(
        f.pop_response(),
        Err(RingError::ProducerOverflow { .. })
    ));
}

#[test]
fn the_back_end_never_takes_more_requests_than_it_can_answer() {
    let (mut f, mut b, _) = pair(64 + 4 * 8);
    for round in 0..3u64 {
        for i in 0..4 {
            f.push_request(&Req(round * 4 + i)).unwrap();
        }
        f.publish_requests();
        for _ in 0..4 {
            assert!(b.pop_request().unwrap().is_some());
        }
        assert_eq!(b.unconsumed_requests(), Ok(0));
        for i in 0..4 {
            b.push_response(&Rsp(i)).unwrap();
        }
        b.publish_responses();
        while f.pop_response().unwrap().is_some() {}
    }
}

#[test]
fn random_batches_across_the_2_pow_32_wrap_keep_order_and_count() {
    for seed in 1..=200u64 {
        let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let size = 64 + 8 * (1usize << rng.u64(..6)); // 1 to 32 entries
        let page = HostRingMemory::new(size).unwrap();
        Front::init(page.clone()).unwrap();
        // Start just below the wrap of the free-running indices.
        let start = u32::MAX - rng.u64(..100) as u32;
        for off in [REQ_PROD, RSP_PROD] {
            page.store_u32(off, start);
        }
        page.store_u32(REQ_EVENT, start.wrapping_add(1));
        page.store_u32(RSP_EVENT, start.wrapping_add(1));
        let mut f = Front::attach(page.clone()).unwrap();
        let mut b = Back::attach(page.clone()).unwrap();
        let (mut sent, mut served, mut answered) = (0u64, 0u64, 0u64);
        let mut notifications = 0;
        for _ in 0..300 {
            let n = rng.u64(..u64::from(f.entries()) + 1);
            for _ in 0..n {
                if f.push_request(&Req(sent)).is_ok() {
                    sent += 1;
                }
            }
            if f.publish_requests() {
                notifications += 1;
            }
            let m = rng.u64(..u64::from(b.entries()) + 1);
            for _ in 0..m {
                match b.pop_request().unwrap() {
                    Some(Req(v)) => {
                        assert_eq!(
                            v, served,
                            "seed {seed}: requests in order, none lost or repeated"
                        );
                        served += 1;
                        b.push_response(&Rsp(v as u32)).unwrap();
                    }
                    None => {
                        b.final_check_for_requests().unwrap();
                        break;
                    }
                }
            }
            b.publish_responses();
            while let Some(Rsp(v)) = f.pop_response().unwrap() {
                assert_eq!(v, answered as u32, "seed {seed}: responses in order");
                answered += 1;
            }
            f.final_check_for_responses().unwrap();
        }
        assert!(sent > 0 && notifications > 0);
        assert!(served <= sent && answered <= served);
        // The indices wrapped.
        assert!(page.load_u32(REQ_PROD) < start || sent < u64::from(u32::MAX - start));
    }
}

#[test]
fn two_threads_lose_nothing() {
    let page = HostRingMemory::new(4096).unwrap();
    let mut f = Front::init(page.clone()).unwrap();
    const N: u64 = 200_000;
    let consumer = std::thread::spawn(move || {
        let mut b = Back::attach(page).unwrap();
        let mut next = 0u64;
        while next < N {
            match b.pop_request().unwrap() {
                Some(Req(v)) => {
                    assert_eq!(v, next);
                    next += 1;
                    b.push_response(&Rsp(v as u32)).unwrap();
                    b.publish_responses();
                }
                None => std::hint::spin_loop(),
            }
        }
    });
    let (mut sent, mut got) = (0u64, 0u64);
    while got < N {
        while sent < N && f.push_request(&Req(sent)).is_ok() {
            sent += 1;
        }
        f.publish_requests();
        while let Some(Rsp(v)) = f.pop_response().unwrap() {
            assert_eq!(v, got as u32);
            got += 1;
        }
    }
    consumer.join().unwrap();
}
