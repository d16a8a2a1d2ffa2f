//! Shared-ring throughput between two host threads, against rtrb (a well-kept
//! single-producer/single-consumer ring) in the same run, at batch 1 and 32.
//!
//! ```text
//! cargo bench -p vmcraft-pv-hypercall --bench ring
//! ```
//!
//! Our ring carries 8-byte requests one way and 8-byte responses back (a Xen ring
//! slot is free again only once its response is consumed), on a 4 KiB page: in plain
//! host memory (`RawRingMemory`) and through vm-memory (`HostRingMemory`, the guest
//! memory path). rtrb is measured twice: carrying the items one way with 256 slots
//! (the plain SPSC job, which a Xen ring cannot do with less traffic than a round
//! trip), and as a pair of 256-slot rings doing the same request/response job, with
//! at most 256 requests outstanding as on our ring. A batch is how many items a side
//! handles between publishing its index.
//!
//! The reference is Xen's own C: `benches/ring_h.c` does the same job with the
//! `io/ring.h` macros and Xen's x86-64 barriers, built with `gcc -O2` when Debian's
//! libxen-dev is installed (`.ci/ring-bench` installs it and runs this bench). Each
//! figure is the median of three runs; with each batch size the bench reports the
//! round trip of one cache line between the two threads (a ping-pong probe), since
//! where the scheduler puts the two threads changes every figure.
//!
//! Targets: ≥ 1.0× ring.h at batch 1 and 32 on a host page; the vm-memory ring (the
//! guest-memory path) ≥ 0.8× the host-page ring.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use vmcraft_pv_hypercall::ring::{
    BackRing, Entry, FrontRing, HostRingMemory, RawRingMemory, RingMemory,
};

const ITEMS: u64 = 20_000_000;

#[derive(Clone, Copy)]
struct Item(u64);

impl Entry for Item {
    const SIZE: usize = 8;
    fn encode(&self, out: &mut [u8]) {
        out.copy_from_slice(&self.0.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Self {
        Item(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }
}

fn ours<M: RingMemory + Send + Clone + 'static>(mem: M, batch: u64) -> f64 {
    let mut front = FrontRing::<_, Item, Item>::init(mem.clone()).unwrap();
    let start = Instant::now();
    let consumer = std::thread::spawn(move || {
        let mut back = BackRing::<_, Item, Item>::attach(mem).unwrap();
        let mut next = 0u64;
        while next < ITEMS {
            let mut n = 0;
            while n < batch {
                match back.pop_request().unwrap() {
                    Some(Item(v)) => {
                        assert_eq!(v, next);
                        next += 1;
                        n += 1;
                        back.push_response(&Item(v)).unwrap();
                    }
                    None => break,
                }
            }
            if n > 0 {
                back.publish_responses();
            } else {
                std::hint::spin_loop();
            }
        }
    });
    let (mut sent, mut done) = (0u64, 0u64);
    while done < ITEMS {
        let mut n = 0;
        while n < batch && sent < ITEMS && front.push_request(&Item(sent)).is_ok() {
            sent += 1;
            n += 1;
        }
        if n > 0 {
            front.publish_requests();
        }
        while front.pop_response().unwrap().is_some() {
            done += 1;
        }
    }
    consumer.join().unwrap();
    ITEMS as f64 / start.elapsed().as_secs_f64()
}

fn rtrb_run(batch: u64) -> f64 {
    let (mut tx, mut rx) = rtrb::RingBuffer::<u64>::new(256);
    let start = Instant::now();
    let consumer = std::thread::spawn(move || {
        let mut next = 0u64;
        while next < ITEMS {
            let available = rx.slots().min(batch as usize);
            if available == 0 {
                std::hint::spin_loop();
                continue;
            }
            let chunk = rx.read_chunk(available).unwrap();
            for v in chunk.into_iter() {
                assert_eq!(v, next);
                next += 1;
            }
        }
    });
    let mut sent = 0u64;
    while sent < ITEMS {
        let free = tx.slots().min(batch as usize).min((ITEMS - sent) as usize);
        if free == 0 {
            std::hint::spin_loop();
            continue;
        }
        let chunk = tx.write_chunk_uninit(free).unwrap();
        let n = chunk.fill_from_iter(sent..sent + free as u64);
        sent += n as u64;
    }
    consumer.join().unwrap();
    ITEMS as f64 / start.elapsed().as_secs_f64()
}

/// rtrb doing the ring's job: requests one way, a response back for each, at most
/// 256 requests outstanding.
fn rtrb_pair_run(batch: u64) -> f64 {
    let (mut req_tx, mut req_rx) = rtrb::RingBuffer::<u64>::new(256);
    let (mut rsp_tx, mut rsp_rx) = rtrb::RingBuffer::<u64>::new(256);
    let start = Instant::now();
    let back = std::thread::spawn(move || {
        let mut next = 0u64;
        while next < ITEMS {
            let n = req_rx.slots().min(rsp_tx.slots()).min(batch as usize);
            if n == 0 {
                std::hint::spin_loop();
                continue;
            }
            let requests = req_rx.read_chunk(n).unwrap();
            let responses = rsp_tx.write_chunk_uninit(n).unwrap();
            let mut bad = None;
            let answered = responses.fill_from_iter(requests.into_iter().inspect(|&v| {
                if v != next && bad.is_none() {
                    bad = Some(v);
                }
                next += 1;
            }));
            assert_eq!((bad, answered), (None, n), "request order");
        }
    });
    let (mut sent, mut done) = (0u64, 0u64);
    while done < ITEMS {
        let outstanding = (sent - done) as usize;
        let n = req_tx
            .slots()
            .min(256 - outstanding)
            .min(batch as usize)
            .min((ITEMS - sent) as usize);
        if n > 0 {
            let chunk = req_tx.write_chunk_uninit(n).unwrap();
            sent += chunk.fill_from_iter(sent..sent + n as u64) as u64;
        }
        let ready = rsp_rx.slots();
        if ready > 0 {
            for v in rsp_rx.read_chunk(ready).unwrap().into_iter() {
                assert_eq!(v, done);
                done += 1;
            }
        }
    }
    back.join().unwrap();
    ITEMS as f64 / start.elapsed().as_secs_f64()
}

/// A page-aligned 4 KiB page in host memory for `RawRingMemory`.
#[repr(C, align(4096))]
struct Page([u8; 4096]);

#[derive(Clone, Copy)]
struct SendRaw(RawRingMemory);
// SAFETY: the page lives (leaked) for the whole program and every access through
// RawRingMemory is atomic or volatile, which is how two sides share a ring page.
unsafe impl Send for SendRaw {}

impl RingMemory for SendRaw {
    #[inline]
    fn size(&self) -> usize {
        self.0.size()
    }
    #[inline]
    fn load_u32(&self, offset: usize) -> u32 {
        self.0.load_u32(offset)
    }
    #[inline]
    fn store_u32(&self, offset: usize, value: u32) {
        self.0.store_u32(offset, value)
    }
    #[inline]
    fn read(&self, offset: usize, buf: &mut [u8]) {
        self.0.read(offset, buf)
    }
    #[inline]
    fn write(&self, offset: usize, data: &[u8]) {
        self.0.write(offset, data)
    }
}

fn raw_page() -> SendRaw {
    let page: &'static mut Page = Box::leak(Box::new(Page([0; 4096])));
    // SAFETY: the page is leaked (valid forever), 4096-aligned and 4096 bytes long.
    SendRaw(unsafe { RawRingMemory::new(page.0.as_mut_ptr(), 4096) })
}

/// The C reference, built once; `None` (with the reason printed) when it cannot be.
fn ring_h_binary() -> Option<&'static PathBuf> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        if !std::path::Path::new("/usr/include/xen/io/ring.h").exists() {
            println!("ring.h reference: not built, Xen's headers are missing (apt-get install libxen-dev)");
            return None;
        }
        let source = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/ring_h.c");
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ring_h");
        let status = Command::new("gcc")
            .args(["-O2", "-Wall", "-o"])
            .arg(&out)
            .arg(source)
            .arg("-lpthread")
            .status();
        match status {
            Ok(s) if s.success() => Some(out),
            other => {
                println!("ring.h reference: gcc failed ({other:?})");
                None
            }
        }
    })
    .as_ref()
}

fn ring_h_run(batch: u64) -> Option<f64> {
    let out = Command::new(ring_h_binary()?)
        .args([ITEMS.to_string(), batch.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        println!(
            "ring.h reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Nanoseconds for one cache line to go from one thread to the other and back.
fn ping_pong_ns() -> f64 {
    #[repr(align(128))]
    struct Line(AtomicU64);
    const ROUNDS: u64 = 200_000;
    let line = Arc::new(Line(AtomicU64::new(0)));
    let other = line.clone();
    let peer = std::thread::spawn(move || {
        for i in 0..ROUNDS {
            while other.0.load(Ordering::Acquire) != 2 * i + 1 {
                std::hint::spin_loop();
            }
            other.0.store(2 * i + 2, Ordering::Release);
        }
    });
    let start = Instant::now();
    for i in 0..ROUNDS {
        line.0.store(2 * i + 1, Ordering::Release);
        while line.0.load(Ordering::Acquire) != 2 * i + 2 {
            std::hint::spin_loop();
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / ROUNDS as f64;
    peer.join().unwrap();
    ns
}

fn median(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

fn median_of_3(f: impl Fn() -> f64) -> f64 {
    median((0..3).map(|_| f()).collect())
}

fn main() {
    println!(
        "{ITEMS} 8-byte items between two busy-polling threads on a 4 KiB ring page, \
         million items/s, median of 3"
    );
    for batch in [1u64, 32] {
        let ping = ping_pong_ns();
        let c = (0..3)
            .map(|_| ring_h_run(batch))
            .collect::<Option<Vec<f64>>>()
            .map(median);
        let one_way = median_of_3(|| rtrb_run(batch));
        let pair = median_of_3(|| rtrb_pair_run(batch));
        let raw = median_of_3(|| ours(raw_page(), batch));
        let vm = median_of_3(|| ours(HostRingMemory::new(4096).unwrap(), batch));
        println!("batch {batch:>2} (cache-line round trip {ping:.0} ns):");
        match c {
            Some(c) => println!("  C on ring.h              {:>7.1}", c / 1e6),
            None => println!("  C on ring.h              (not measured)"),
        }
        println!("  rtrb one-way             {:>7.1}", one_way / 1e6);
        println!("  rtrb request+response    {:>7.1}", pair / 1e6);
        for (name, v) in [("ring, host page", raw), ("ring, vm-memory", vm)] {
            let vs_c = c.map_or("-".into(), |c| format!("{:.2}x", v / c));
            println!(
                "  {name:<24} {:>7.1}   / ring.h {vs_c}   / rtrb pair {:.2}x",
                v / 1e6,
                v / pair
            );
        }
        println!("  vm-memory / host page    {:.2}x", vm / raw);
    }
    println!(
        "targets: ring, host page >= 1.0x ring.h at batch 1 and 32; vm-memory >= 0.8x host page"
    );
}
