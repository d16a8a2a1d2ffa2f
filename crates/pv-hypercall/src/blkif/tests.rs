//! blkif from the front end's side: a Rust front end on the same guest memory grants
//! pages, queues requests and checks the answers and the image.

use super::*;
use crate::grant::{ENTRY_SIZE, GTF_PERMIT_ACCESS, GTF_READONLY};
use crate::ring::{Entry, FrontRing};
use std::os::unix::fs::FileExt;
use vm_memory::Bytes;
use vmcraft_memory::{layout::MemoryLayout, GuestRam};

const RING: u64 = 0x1000;
const GRANTS: u64 = 0x2000;
const DISK_SECTORS: u64 = 128;

struct Rig {
    ram: GuestRam,
    front: FrontRing<GuestRingMemory, Request, Response>,
    back: BlkifBackend,
}

fn rig(read_only: bool) -> Rig {
    let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
    let mem = ram.memory().clone();
    let ring_mem = GuestRingMemory::new(mem.clone(), GuestAddress(RING), 4096).unwrap();
    let front = FrontRing::init(ring_mem).unwrap();
    let grants = Arc::new(GrantTable::new(mem.clone(), GuestAddress(GRANTS), 32, 0).unwrap());
    // Anonymous: the name is removed before the backend gets the file.
    let file = vmm_sys_util::tempfile::TempFile::new_with_prefix("/tmp/vmcraft-blkif")
        .unwrap()
        .into_file();
    file.set_len(DISK_SECTORS * SECTOR).unwrap();
    let back = BlkifBackend::new(
        mem,
        GuestAddress(RING),
        grants,
        Arc::new(vmcraft_block::BlockImage::open(file, read_only).unwrap()),
    )
    .unwrap();
    Rig { ram, front, back }
}

impl Rig {
    /// Grant guest page `frame` as `gref`.
    fn grant(&self, gref: u32, frame: u32, flags: u16) {
        let at = GRANTS + u64::from(gref) * ENTRY_SIZE;
        let m = self.ram.memory();
        m.write_obj(0u16, GuestAddress(at + 2)).unwrap();
        m.write_obj(frame, GuestAddress(at + 4)).unwrap();
        m.write_obj(flags, GuestAddress(at)).unwrap();
    }

    fn request(&mut self, req: Request) -> Response {
        self.front.push_request(&req).unwrap();
        self.front.publish_requests();
        let done = self.back.process().unwrap();
        assert_eq!(done.requests, 1);
        self.front.pop_response().unwrap().expect("a response")
    }
}

fn seg(gref: u32, first: u8, last: u8) -> Segment {
    Segment {
        gref,
        first_sect: first,
        last_sect: last,
    }
}

fn rw(op: u8, id: u64, sector: u64, segs: &[Segment]) -> Request {
    let mut r = Request {
        operation: op,
        nr_segments: segs.len() as u8,
        handle: 0,
        id,
        sector_number: sector,
        seg: [Segment::default(); MAX_SEGMENTS],
    };
    r.seg[..segs.len()].copy_from_slice(segs);
    r
}

#[test]
fn the_wire_layout_is_blkif_h() {
    let r = rw(OP_WRITE, 0x1122, 0x3344, &[seg(7, 1, 6)]);
    let mut b = [0u8; 112];
    r.encode(&mut b);
    assert_eq!((b[0], b[1]), (1, 1));
    assert_eq!(&b[8..10], &[0x22, 0x11]);
    assert_eq!(&b[16..18], &[0x44, 0x33]);
    assert_eq!((b[24], b[28], b[29]), (7, 1, 6));
    assert_eq!(Request::decode(&b), r);
    let mut rb = [0u8; 16];
    Response {
        id: 9,
        operation: 1,
        status: -1,
    }
    .encode(&mut rb);
    assert_eq!(&rb[8..12], &[1, 0, 0xff, 0xff]);
}

#[test]
fn writes_and_reads_through_granted_pages() {
    let mut r = rig(false);
    let m = r.ram.memory().clone();
    // Data in guest pages 0x10 (8 sectors) and 0x11 (sectors 2..=3).
    let a: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..1024).map(|i| (i % 13) as u8 + 100).collect();
    m.write_slice(&a, GuestAddress(0x10_000)).unwrap();
    m.write_slice(&b, GuestAddress(0x11_000 + 1024)).unwrap();
    r.grant(1, 0x10, GTF_PERMIT_ACCESS | GTF_READONLY);
    r.grant(2, 0x11, GTF_PERMIT_ACCESS | GTF_READONLY);
    let rsp = r.request(rw(OP_WRITE, 42, 16, &[seg(1, 0, 7), seg(2, 2, 3)]));
    assert_eq!(
        (rsp.id, rsp.operation, rsp.status),
        (42, OP_WRITE, STATUS_OKAY)
    );
    // On disk at sector 16: a, then b.
    let mut disk = vec![0u8; 5120];
    r.back.disk.image.read_at(&mut disk, 16 * SECTOR).unwrap();
    assert_eq!(&disk[..4096], &a[..]);
    assert_eq!(&disk[4096..], &b[..]);
    // Read it back into page 0x12 (granted writable).
    r.grant(3, 0x12, GTF_PERMIT_ACCESS);
    let rsp = r.request(rw(OP_READ, 43, 16, &[seg(3, 0, 7)]));
    assert_eq!(rsp.status, STATUS_OKAY);
    let mut back = vec![0u8; 4096];
    m.read_slice(&mut back, GuestAddress(0x12_000)).unwrap();
    assert_eq!(back, a);
    // Flush and barrier.
    assert_eq!(
        r.request(rw(OP_FLUSH_DISKCACHE, 44, 0, &[])).status,
        STATUS_OKAY
    );
    assert_eq!(
        r.request(rw(OP_WRITE_BARRIER, 45, 0, &[seg(1, 0, 0)]))
            .status,
        STATUS_OKAY
    );
}

/// A request whose later segment is refused releases the grants it had mapped for
/// the earlier ones, and moves no data.
#[test]
fn a_refused_segment_releases_the_grants_already_mapped() {
    use crate::grant::{GTF_READING, GTF_WRITING};
    let mut r = rig(false);
    let m = r.ram.memory().clone();
    r.back
        .disk
        .image
        .file()
        .write_all_at(&[0x5a; 4096], 0)
        .unwrap();
    r.grant(1, 0x10, GTF_PERMIT_ACCESS);
    let rsp = r.request(rw(OP_READ, 7, 0, &[seg(1, 0, 3), seg(9, 4, 7)]));
    assert_eq!(rsp.status, STATUS_ERROR);
    let flags: u16 = m.read_obj(GuestAddress(GRANTS + ENTRY_SIZE)).unwrap();
    assert_eq!(flags & (GTF_READING | GTF_WRITING), 0, "grant 1 released");
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(0x10_000)).unwrap(),
        0,
        "no data moved"
    );
    // The same grant serves the next request.
    let rsp = r.request(rw(OP_READ, 8, 0, &[seg(1, 0, 3)]));
    assert_eq!(rsp.status, STATUS_OKAY);
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(0x10_000 + 2047)).unwrap(),
        0x5a
    );
    let flags: u16 = m.read_obj(GuestAddress(GRANTS + ENTRY_SIZE)).unwrap();
    assert_eq!(flags & (GTF_READING | GTF_WRITING), 0, "released after use");
}

#[test]
fn bad_requests_get_error_and_the_ring_goes_on() {
    let mut r = rig(false);
    r.grant(1, 0x10, GTF_PERMIT_ACCESS);
    r.grant(2, 0x10, GTF_PERMIT_ACCESS | GTF_READONLY);
    let too_many = [seg(1, 0, 0); MAX_SEGMENTS];
    let mut twelve = rw(OP_WRITE, 1, 0, &too_many);
    twelve.nr_segments = 12;
    for (req, what) in [
        (rw(OP_WRITE, 1, 0, &[]), "no segments"),
        (twelve, "12 segments"),
        (rw(OP_WRITE, 1, 0, &[seg(1, 3, 2)]), "first after last"),
        (
            rw(OP_WRITE, 1, 0, &[seg(1, 0, 8)]),
            "a segment past the page",
        ),
        (
            rw(OP_WRITE, 1, DISK_SECTORS, &[seg(1, 0, 0)]),
            "past the end",
        ),
        (
            rw(OP_WRITE, 1, u64::MAX, &[seg(1, 0, 1)]),
            "sector overflow",
        ),
        (rw(OP_WRITE, 1, 0, &[seg(9, 0, 0)]), "an ungranted page"),
        (
            rw(OP_WRITE, 1, 0, &[seg(1000, 0, 0)]),
            "a reference past the table",
        ),
        (
            rw(OP_READ, 1, 0, &[seg(2, 0, 0)]),
            "reading into a read-only grant",
        ),
    ] {
        assert_eq!(r.request(req).status, STATUS_ERROR, "{what}");
    }
    assert_eq!(
        r.request(rw(5, 1, 0, &[])).status,
        STATUS_EOPNOTSUPP,
        "discard"
    );
    assert_eq!(
        r.request(rw(OP_WRITE, 2, 0, &[seg(1, 0, 7)])).status,
        STATUS_OKAY
    );
}

#[test]
fn a_read_only_disk_refuses_writes() {
    let mut r = rig(true);
    r.grant(1, 0x10, GTF_PERMIT_ACCESS);
    assert_eq!(
        r.request(rw(OP_WRITE, 1, 0, &[seg(1, 0, 0)])).status,
        STATUS_ERROR
    );
    assert_eq!(
        r.request(rw(OP_READ, 2, 0, &[seg(1, 0, 0)])).status,
        STATUS_OKAY
    );
}

#[test]
fn a_broken_ring_stops_the_backend() {
    let mut r = rig(false);
    r.ram
        .memory()
        .write_obj(1000u32, GuestAddress(RING))
        .unwrap();
    assert!(matches!(
        r.back.process(),
        Err(BlkifError::Ring(RingError::ProducerOverflow { .. }))
    ));
}

fn flush(id: u64) -> Request {
    rw(OP_FLUSH_DISKCACHE, id, 0, &[])
}

#[test]
fn polling_keeps_up_with_a_busy_front_end_and_returns_at_its_budget() {
    let Rig { ram, front, back } = rig(false);
    let mut back = back;
    let total = PROCESS_BUDGET as u64 + 76;
    // A front end on its own thread keeps the 32-slot ring full and never waits for a
    // notification: only polling lets the backend see its requests after the first.
    let mut front = front;
    let driver = std::thread::spawn(move || {
        let (mut sent, mut answered) = (0u64, 0u64);
        while answered < total {
            while sent < total && front.free_requests() > 0 {
                front.push_request(&flush(sent)).unwrap();
                sent += 1;
            }
            front.publish_requests();
            while let Some(rsp) = front.pop_response().unwrap() {
                assert_eq!((rsp.id, rsp.status), (answered, STATUS_OKAY));
                answered += 1;
            }
            std::thread::yield_now();
        }
    });
    let mut poll = AdaptivePoll::new(std::time::Duration::from_secs(1));
    while poll.window() < poll.max() {
        poll.after_sleep(std::time::Duration::ZERO);
    }
    // Wait for the front end's first requests, as a notification would.
    while back.ring.unconsumed_requests().unwrap() == 0 {
        std::thread::yield_now();
    }
    let mut notified = 0;
    let first = back.process_polling(&mut poll, || notified += 1).unwrap();
    assert_eq!(
        first.requests, PROCESS_BUDGET,
        "one call answers at most its budget"
    );
    // `first.more` depends on whether the front end refilled the ring by then.
    let second = back.process_polling(&mut poll, || notified += 1).unwrap();
    assert_eq!(second.requests, 76);
    assert!(!second.more);
    driver.join().unwrap();
    assert!(notified > 0, "the front end was told about its responses");
    drop(ram);
}

#[test]
fn a_polling_backend_stops_at_a_broken_ring() {
    let mut r = rig(false);
    r.ram
        .memory()
        .write_obj(1000u32, GuestAddress(RING))
        .unwrap();
    let mut poll = AdaptivePoll::new(std::time::Duration::from_secs(1));
    poll.after_sleep(std::time::Duration::ZERO);
    assert!(matches!(
        r.back.process_polling(&mut poll, || {}),
        Err(BlkifError::Ring(RingError::ProducerOverflow { .. }))
    ));
}

impl Rig {
    /// Queue every request, serve them in one call, and return the responses sorted
    /// by id.
    fn batch(&mut self, reqs: &[Request]) -> Vec<(u64, u8, i16)> {
        for req in reqs {
            self.front.push_request(req).unwrap();
        }
        self.front.publish_requests();
        let done = self.back.process().unwrap();
        assert_eq!(done.requests, reqs.len());
        let mut out = Vec::new();
        while let Some(rsp) = self.front.pop_response().unwrap() {
            out.push((rsp.id, rsp.operation, rsp.status));
        }
        out.sort();
        out
    }
}

/// Reads of adjacent sectors are one read of the image; a write between them is not
/// overtaken, nor does it overtake; a read whose grant is refused is answered ERROR
/// alone, the others complete.
#[test]
fn adjacent_reads_are_merged_and_nothing_overtakes() {
    let mut r = rig(false);
    let m = r.ram.memory().clone();
    let old: Vec<u8> = (0..16 * 512).map(|i| (i % 241) as u8).collect();
    r.back.disk.image.file().write_all_at(&old, 0).unwrap();
    for (gref, frame) in [(1, 0x10), (2, 0x11), (3, 0x12), (4, 0x13)] {
        r.grant(gref, frame, GTF_PERMIT_ACCESS);
    }
    m.write_slice(&[0xee; 512], GuestAddress(0x14_000)).unwrap();
    r.grant(5, 0x14, GTF_PERMIT_ACCESS | GTF_READONLY);
    let answers = r.batch(&[
        rw(OP_READ, 1, 0, &[seg(1, 0, 7)]),
        rw(OP_READ, 2, 8, &[seg(2, 0, 3), seg(3, 4, 7)]),
        rw(OP_READ, 3, 16, &[seg(9, 0, 7)]), // never granted
        rw(OP_WRITE, 4, 8, &[seg(5, 0, 0)]),
        rw(OP_READ, 5, 8, &[seg(4, 0, 1)]),
    ]);
    assert_eq!(
        answers,
        [
            (1, OP_READ, STATUS_OKAY),
            (2, OP_READ, STATUS_OKAY),
            (3, OP_READ, STATUS_ERROR),
            (4, OP_WRITE, STATUS_OKAY),
            (5, OP_READ, STATUS_OKAY),
        ]
    );
    assert_eq!(
        r.back.run.merged.reads(),
        2,
        "requests 1 and 2 in one read, 5 alone"
    );
    let page = |frame: u64, from: usize, len: usize| {
        let mut b = vec![0u8; len];
        m.read_slice(&mut b, GuestAddress(frame * 4096 + from as u64))
            .unwrap();
        b
    };
    assert_eq!(page(0x10, 0, 4096), old[..4096]);
    assert_eq!(
        page(0x11, 0, 2048),
        old[4096..6144],
        "read before the write"
    );
    assert_eq!(page(0x12, 2048, 2048), old[6144..8192]);
    let mut after = vec![0xee; 512];
    after.extend_from_slice(&old[4608..5120]);
    assert_eq!(page(0x13, 0, 1024), after, "read after the write");
    // Every grant is released.
    for gref in 1..=5u64 {
        let flags: u16 = m
            .read_obj(GuestAddress(GRANTS + gref * ENTRY_SIZE))
            .unwrap();
        assert_eq!(
            flags & (crate::grant::GTF_READING | crate::grant::GTF_WRITING),
            0
        );
    }
}

/// When a merged read fails (the image shrank under the backend), each request is
/// read again alone and answered for itself.
#[test]
fn a_failed_merged_read_answers_each_request_for_itself() {
    let mut r = rig(false);
    let m = r.ram.memory().clone();
    r.back
        .disk
        .image
        .file()
        .write_all_at(&[0x33; 4096], 0)
        .unwrap();
    r.grant(1, 0x10, GTF_PERMIT_ACCESS);
    r.grant(2, 0x11, GTF_PERMIT_ACCESS);
    r.back.disk.image.file().set_len(4096).unwrap();
    let answers = r.batch(&[
        rw(OP_READ, 1, 0, &[seg(1, 0, 7)]),
        rw(OP_READ, 2, 8, &[seg(2, 0, 7)]),
    ]);
    assert_eq!(
        answers,
        [(1, OP_READ, STATUS_OKAY), (2, OP_READ, STATUS_ERROR)]
    );
    assert_eq!(
        r.back.run.merged.reads(),
        3,
        "the merged read, then each alone"
    );
    assert_eq!(m.read_obj::<u8>(GuestAddress(0x10_fff)).unwrap(), 0x33);
}
