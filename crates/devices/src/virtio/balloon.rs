//! virtio-balloon (virtio 1.2 §5.5): the host asks the guest for memory back, and gets
//! the pages the guest gives up.
//!
//! - **Inflate and deflate queues.** The driver sends arrays of 32-bit page frame
//!   numbers (4 KiB pages). An inflated page is freed on the host
//!   ([`vmcraft_memory::discard`]) and counted; a deflated one is the guest's again (it
//!   faults in a fresh page when touched).
//! - **Statistics queue** (`VIRTIO_BALLOON_F_STATS_VQ`). The driver posts a buffer of
//!   `{u16 tag; u64 value}` entries; the device keeps the latest and holds the buffer
//!   until [`BalloonControl::request_stats`] asks for fresh ones.
//! - **Free page reporting** (`VIRTIO_BALLOON_F_PAGE_REPORTING`). The driver sends
//!   ranges of free pages, which the device frees on the host; unlike inflated pages,
//!   the guest may use them again at any time.
//! - **The target** is the config space's `num_pages` ([`BalloonControl::set_target`],
//!   which raises a configuration interrupt); the driver reports `actual`.
//!
//! A guest is hostile here as everywhere:
//! - page numbers outside RAM are skipped and counted;
//! - an inflate of a page already inflated, or a deflate of one not inflated, changes
//!   nothing and is counted;
//! - a chain longer than [`MAX_PFNS_PER_CHAIN`] page numbers, or a statistics buffer
//!   longer than [`MAX_STATS`] entries, is a protocol error (NEEDS_RESET).
//!
//! The queues' order is the spec's, compacted over the features the driver accepted
//! (as Linux numbers them): inflate, deflate, then statistics if negotiated, then
//! reporting if negotiated.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmcraft_memory::{discard::discard, GuestMemory, PAGE_SIZE};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::{check_chain, serve_available, ProtocolError};
use super::worker::{spawn_device, Token, Worker};
use super::{
    ActivateError, ActiveQueues, Interrupt, VirtioDevice, F_EVENT_IDX, F_VERSION_1, INT_CONFIG,
};

/// The virtio device ID of a memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Feature bit: the driver reports statistics on the third queue.
pub const F_STATS_VQ: u64 = 1 << 1;
/// Feature bit: the driver may deflate when the guest runs out of memory.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// Feature bit: the driver reports free pages.
pub const F_PAGE_REPORTING: u64 = 1 << 5;
/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 128;
/// The most page frame numbers one inflate or deflate chain may carry (Linux sends at
/// most 256).
pub const MAX_PFNS_PER_CHAIN: usize = 4096;
/// The most statistics entries one buffer may carry (the spec defines 10 tags).
pub const MAX_STATS: usize = 64;
/// The most bytes one free page report may cover.
pub const MAX_REPORT_BYTES: u64 = 1 << 30;

/// Statistics tags (virtio 1.2 §5.5.6.3).
pub mod tag {
    /// Pages swapped in.
    pub const SWAP_IN: u16 = 0;
    /// Pages swapped out.
    pub const SWAP_OUT: u16 = 1;
    /// Major faults.
    pub const MAJOR_FAULTS: u16 = 2;
    /// Minor faults.
    pub const MINOR_FAULTS: u16 = 3;
    /// Free memory, bytes.
    pub const FREE_MEMORY: u16 = 4;
    /// Total memory, bytes.
    pub const TOTAL_MEMORY: u16 = 5;
    /// Available memory (as /proc/meminfo's MemAvailable), bytes.
    pub const AVAILABLE_MEMORY: u16 = 6;
    /// Disk caches, bytes.
    pub const DISK_CACHES: u16 = 7;
}

/// The latest statistics the driver reported: each tag it sent and its value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BalloonStats {
    /// `(tag, value)` in the order sent (a tag sent twice: the last value wins in
    /// [`BalloonStats::get`]).
    pub entries: Vec<(u16, u64)>,
    /// The balloon's `actual` (pages) when they arrived: the figures describe the
    /// guest with that balloon, whatever it holds by the time they are read.
    pub ballooned: u32,
    /// How many statistics buffers had arrived, this one included (1 for the first):
    /// a reader tells fresh figures from ones it has seen.
    pub sequence: u64,
}

impl BalloonStats {
    /// The value reported for `tag`.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.entries
            .iter()
            .rev()
            .find(|(t, _)| *t == tag)
            .map(|(_, v)| *v)
    }
}

/// Counters of what the driver did.
#[derive(Debug, Default)]
struct Counters {
    inflated: AtomicU64,
    reported: AtomicU64,
    outside_ram: AtomicU64,
    redundant: AtomicU64,
}

/// The host's side of a balloon, shared with the device: set the target, read what
/// the guest gave.
#[derive(Debug)]
pub struct BalloonControl {
    target: AtomicU32,
    actual: AtomicU32,
    counters: Counters,
    stats: Mutex<Option<BalloonStats>>,
    interrupt: Mutex<Option<Arc<Interrupt>>>,
    stats_wanted: EventFd,
    /// One bit per guest page: inflated.
    bits: Mutex<Vec<u64>>,
}

impl BalloonControl {
    /// Ask the guest to hold `pages` pages in the balloon (give them up); raises a
    /// configuration interrupt if the driver is running.
    pub fn set_target(&self, pages: u32) {
        self.target.store(pages, Ordering::SeqCst);
        if let Some(i) = self
            .interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            i.raise(INT_CONFIG);
        }
    }

    /// The pages asked for.
    pub fn target(&self) -> u32 {
        self.target.load(Ordering::SeqCst)
    }

    /// The pages the driver says the balloon holds (its `actual`).
    pub fn actual(&self) -> u32 {
        self.actual.load(Ordering::SeqCst)
    }

    /// Pages inflated and not deflated: freed on the host.
    pub fn inflated_pages(&self) -> u64 {
        self.counters.inflated.load(Ordering::SeqCst)
    }

    /// Free pages the guest has reported (and the host freed), in all.
    pub fn reported_pages(&self) -> u64 {
        self.counters.reported.load(Ordering::SeqCst)
    }

    /// Page numbers the driver sent that are not guest RAM.
    pub fn pages_outside_ram(&self) -> u64 {
        self.counters.outside_ram.load(Ordering::SeqCst)
    }

    /// Inflates of pages already inflated and deflates of pages that were not.
    pub fn redundant_pages(&self) -> u64 {
        self.counters.redundant.load(Ordering::SeqCst)
    }

    /// The latest statistics, if the driver has sent any.
    pub fn stats(&self) -> Option<BalloonStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Ask the driver for fresh statistics (the device returns the buffer it holds).
    pub fn request_stats(&self) {
        // Saturation means a request is pending already.
        let _ = self.stats_wanted.write(1);
    }
}

/// A balloon's state in a snapshot: the target, what the driver says it holds, which
/// pages are inflated (freed on the host: zero in the snapshot's memory) and the
/// counters. The rest (queues) is the transport's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonState {
    /// Pages asked for.
    pub target: u32,
    /// Pages the driver says the balloon holds.
    pub actual: u32,
    /// One bit per guest page frame: inflated.
    pub inflated: Vec<u64>,
    /// Free pages reported in all.
    pub reported: u64,
    /// Page numbers sent that were not RAM.
    pub outside_ram: u64,
    /// Redundant inflates and deflates.
    pub redundant: u64,
}

impl vmcraft_snapshot::Versioned for BalloonState {
    const VERSION: u32 = 1;
}

impl BalloonControl {
    /// The state to save (with the device paused, so no chain changes it).
    pub fn save_state(&self) -> BalloonState {
        let c = &self.counters;
        let mut inflated = self.bits.lock().unwrap_or_else(|p| p.into_inner()).clone();
        while inflated.last() == Some(&0) {
            inflated.pop();
        }
        BalloonState {
            target: self.target(),
            actual: self.actual(),
            inflated,
            reported: c.reported.load(Ordering::SeqCst),
            outside_ram: c.outside_ram.load(Ordering::SeqCst),
            redundant: c.redundant.load(Ordering::SeqCst),
        }
    }

    /// Put back `state` into the balloon of a VM whose RAM is `memory`, before its
    /// driver runs: every inflated page must be RAM.
    pub fn restore_state(
        &self,
        state: &BalloonState,
        memory: &GuestMemory,
    ) -> Result<(), crate::state::StateError> {
        let mut inflated = 0u64;
        for (w, &word) in state.inflated.iter().enumerate() {
            if word == 0 {
                continue;
            }
            let first = w as u64 * 64;
            for bit in (0..64).filter(|b| word & (1 << b) != 0) {
                let pfn = first + bit;
                if !memory.check_range(GuestAddress(pfn * PAGE_SIZE), PAGE_SIZE as usize) {
                    return Err(crate::state::StateError::new(
                        "virtio-balloon",
                        format!("inflated page {pfn:#x} is not guest RAM"),
                    ));
                }
            }
            inflated += u64::from(word.count_ones());
        }
        *self.bits.lock().unwrap_or_else(|p| p.into_inner()) = state.inflated.clone();
        let c = &self.counters;
        c.inflated.store(inflated, Ordering::SeqCst);
        c.reported.store(state.reported, Ordering::SeqCst);
        c.outside_ram.store(state.outside_ram, Ordering::SeqCst);
        c.redundant.store(state.redundant, Ordering::SeqCst);
        self.target.store(state.target, Ordering::SeqCst);
        self.actual.store(state.actual, Ordering::SeqCst);
        Ok(())
    }
}

/// The virtio-balloon device.
#[derive(Debug)]
pub struct Balloon {
    control: Arc<BalloonControl>,
    worker: Option<Worker>,
    name: String,
}

impl Balloon {
    /// A new balloon; `name` names its I/O thread. Returns the device and its control.
    pub fn new(name: &str) -> std::io::Result<(Balloon, Arc<BalloonControl>)> {
        let control = Arc::new(BalloonControl {
            target: AtomicU32::new(0),
            actual: AtomicU32::new(0),
            counters: Counters::default(),
            stats: Mutex::new(None),
            interrupt: Mutex::new(None),
            stats_wanted: EventFd::new(EFD_NONBLOCK)?,
            bits: Mutex::new(Vec::new()),
        });
        Ok((
            Balloon {
                control: control.clone(),
                worker: None,
                name: name.to_string(),
            },
            control,
        ))
    }
}

/// What an inflate or deflate chain does to a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Inflate,
    Deflate,
}

/// Guest pages and what the driver did with them (shared by the I/O thread and the
/// device, so that a pause for a snapshot keeps it).
#[derive(Debug)]
struct Pages {
    mem: GuestMemory,
    control: Arc<BalloonControl>,
}

impl Pages {
    /// Inflate or deflate every page of `chain`; returns the used length (0).
    fn apply(
        &self,
        chain: DescriptorChain<&GuestMemory>,
        direction: Direction,
    ) -> Result<u32, ProtocolError> {
        check_chain(&chain)?;
        let pfns = read_pfns(&chain, &self.mem)?;
        let mut bits = self.control.bits.lock().unwrap_or_else(|p| p.into_inner());
        let c = &self.control.counters;
        for pfn in pfns {
            let addr = u64::from(pfn) * PAGE_SIZE;
            if !self.mem.check_range(GuestAddress(addr), PAGE_SIZE as usize) {
                c.outside_ram.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            let (word, bit) = (pfn as usize / 64, 1u64 << (pfn % 64));
            if bits.len() <= word {
                bits.resize(word + 1, 0);
            }
            match (direction, bits[word] & bit != 0) {
                (Direction::Inflate, false) => {
                    if let Err(e) = discard(&self.mem, GuestAddress(addr), PAGE_SIZE) {
                        log::warn!("virtio-balloon: cannot free inflated page {pfn:#x}: {e}");
                    }
                    bits[word] |= bit;
                    c.inflated.fetch_add(1, Ordering::SeqCst);
                }
                (Direction::Deflate, true) => {
                    bits[word] &= !bit;
                    c.inflated.fetch_sub(1, Ordering::SeqCst);
                }
                _ => {
                    c.redundant.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        Ok(0)
    }

    /// Free the pages a free-page report names (its driver-readable buffers, each
    /// rounded inward to whole pages); returns the used length (0).
    fn report(&self, chain: DescriptorChain<&GuestMemory>) -> Result<u32, ProtocolError> {
        check_chain(&chain)?;
        let mut total = 0u64;
        for d in chain.clone().filter(|d| !d.is_write_only()) {
            total += u64::from(d.len());
            if total > MAX_REPORT_BYTES {
                return Err(ProtocolError::LengthOverflow);
            }
            // A buffer at the very top of the address space has no whole page (and is
            // not RAM): nothing to free.
            let Some(start) = d.addr().0.checked_next_multiple_of(PAGE_SIZE) else {
                continue;
            };
            let end = (d.addr().0.saturating_add(u64::from(d.len()))) / PAGE_SIZE * PAGE_SIZE;
            if end <= start {
                continue;
            }
            match discard(&self.mem, GuestAddress(start), end - start) {
                Ok(()) => {
                    self.control
                        .counters
                        .reported
                        .fetch_add((end - start) / PAGE_SIZE, Ordering::SeqCst);
                }
                Err(_) => {
                    self.control
                        .counters
                        .outside_ram
                        .fetch_add((end - start) / PAGE_SIZE, Ordering::SeqCst);
                }
            }
        }
        Ok(0)
    }
}

/// Parse a statistics buffer: `{u16 tag; u64 value}` entries, packed, little-endian.
pub fn parse_stats(bytes: &[u8]) -> Result<BalloonStats, ProtocolError> {
    if bytes.len() / 10 > MAX_STATS {
        return Err(ProtocolError::LengthOverflow);
    }
    Ok(BalloonStats {
        entries: bytes
            .chunks_exact(10)
            .map(|e| {
                let mut v = [0u8; 8];
                v.copy_from_slice(&e[2..]);
                (u16::from_le_bytes([e[0], e[1]]), u64::from_le_bytes(v))
            })
            .collect(),
        ballooned: 0,
        sequence: 0,
    })
}

/// The statistics in a chain's driver-readable buffers (at most [`MAX_STATS`] + 1
/// entries read: one more is a protocol error).
fn read_stats(
    chain: &DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
) -> Result<BalloonStats, ProtocolError> {
    check_chain(chain)?;
    let mut bytes = Vec::new();
    for d in chain.clone().filter(|d| !d.is_write_only()) {
        let len = (d.len() as usize).min((MAX_STATS + 1) * 10 - bytes.len());
        let mut part = vec![0u8; len];
        mem.read_slice(&mut part, d.addr())
            .map_err(|_| ProtocolError::BufferNotInMemory {
                addr: d.addr().0,
                len: d.len() as usize,
            })?;
        bytes.extend(part);
    }
    parse_stats(&bytes)
}

/// The page frame numbers in a chain's driver-readable buffers (little-endian u32s;
/// at most [`MAX_PFNS_PER_CHAIN`]).
fn read_pfns(
    chain: &DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
) -> Result<Vec<u32>, ProtocolError> {
    let mut pfns = Vec::new();
    for d in chain.clone().filter(|d| !d.is_write_only()) {
        let n = d.len() as usize / 4;
        let not_in_memory = ProtocolError::BufferNotInMemory {
            addr: d.addr().0,
            len: d.len() as usize,
        };
        if pfns.len() + n > MAX_PFNS_PER_CHAIN {
            return Err(ProtocolError::LengthOverflow);
        }
        let mut bytes = vec![0u8; n * 4];
        mem.read_slice(&mut bytes, d.addr())
            .map_err(|_| not_in_memory)?;
        pfns.extend(
            bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    Ok(pfns)
}

/// The queues as the driver's features lay them out.
struct Queues {
    inflate: Queue,
    deflate: Queue,
    stats: Option<Queue>,
    reporting: Option<Queue>,
    /// The statistics and reporting queues' indices (the queues the driver set up
    /// are numbered in order: inflate 0, deflate 1, then those it negotiated).
    stats_index: u16,
    reporting_index: u16,
}

/// Which queue a notification index names, for `features`.
fn queue_role(index: usize, features: u64) -> Option<&'static str> {
    let stats = features & F_STATS_VQ != 0;
    let reporting = features & F_PAGE_REPORTING != 0;
    match (index, stats, reporting) {
        (0, ..) => Some("inflate"),
        (1, ..) => Some("deflate"),
        (2, true, _) => Some("stats"),
        (2, false, true) | (3, true, true) => Some("reporting"),
        _ => None,
    }
}

/// The balloon's queues served as its I/O thread serves them (public for fuzzing and
/// for embedders that run devices their own way): [`BalloonServer::serve`] on each
/// notification.
pub struct BalloonServer {
    pages: Pages,
    interrupt: Arc<Interrupt>,
    queues: Queues,
    features: u64,
    /// The statistics buffer held until fresh statistics are wanted.
    held_stats: Option<u16>,
    /// Signalled when serving a queue stops at its budget with chains left: its event
    /// loop then serves every queue again ([`BalloonServer::AGAIN`]).
    again: EventFd,
}

impl BalloonServer {
    /// Serve `queues` (every queue of the device, as configured) over `mem` for a
    /// driver that accepted `features`: the inflate, deflate, statistics (if
    /// negotiated) and reporting (if negotiated) queues in that order must be ready.
    /// Pages inflated before (by an earlier server of the same balloon) are in
    /// `balloon`'s record.
    pub fn new(
        balloon: &Balloon,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        features: u64,
        queues: Vec<Queue>,
    ) -> Result<Self, ActivateError> {
        let mut queues = queues.into_iter().enumerate();
        let mut next = |role: &str| -> Result<Queue, ActivateError> {
            let (i, q) = queues.next().ok_or(ActivateError::QueueNotReady(4))?;
            if !q.ready() {
                log::warn!("virtio-balloon: the driver left its {role} queue ({i}) unready");
                return Err(ActivateError::QueueNotReady(i));
            }
            Ok(q)
        };
        let inflate = next("inflate")?;
        let deflate = next("deflate")?;
        let stats = (features & F_STATS_VQ != 0)
            .then(|| next("stats"))
            .transpose()?;
        let reporting = (features & F_PAGE_REPORTING != 0)
            .then(|| next("reporting"))
            .transpose()?;
        Ok(BalloonServer {
            pages: Pages {
                mem,
                control: balloon.control.clone(),
            },
            interrupt,
            queues: Queues {
                inflate,
                deflate,
                stats_index: 2,
                reporting_index: 2 + u16::from(stats.is_some()),
                stats,
                reporting,
            },
            features,
            held_stats: None,
            again: EventFd::new(EFD_NONBLOCK).map_err(|source| ActivateError::Host {
                what: "create the balloon's requeue eventfd",
                source,
            })?,
        })
    }

    /// The extra fd whose token is [`BalloonServer::AGAIN`] (after the statistics
    /// request's, `Token::Fd(0)`).
    pub fn again_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.again.as_raw_fd()
    }

    /// The token of [`BalloonServer::again_fd`]: serve every page queue again, after one
    /// stopped at its budget.
    pub const AGAIN: Token = Token::Fd(1);

    /// Serve what `token` names: a queue's notification, (`Token::Fd(0)`) a request
    /// for fresh statistics, or ([`BalloonServer::AGAIN`]) the page queues again.
    pub fn serve(&mut self, token: Token) -> Result<(), ProtocolError> {
        match token {
            Token::Queue(i) => match queue_role(i, self.features) {
                Some("stats") => self.take_stats(),
                Some(role) => self.serve_pages(role),
                None => Ok(()),
            },
            Self::AGAIN => {
                let _ = self.again.read();
                ["inflate", "deflate", "reporting"]
                    .into_iter()
                    .try_for_each(|role| self.serve_pages(role))
            }
            // Fresh statistics wanted: give the held buffer back.
            Token::Fd(_) => {
                let _ = self.pages.control.stats_wanted.read();
                self.return_stats()
            }
        }
    }

    /// Serve the page queue `role` names (inflate, deflate or reporting).
    fn serve_pages(&mut self, role: &str) -> Result<(), ProtocolError> {
        let (mem, interrupt, pages) = (&self.pages.mem, &*self.interrupt, &self.pages);
        let again = &self.again;
        match role {
            "inflate" => serve_available(
                &mut self.queues.inflate,
                mem,
                interrupt.queue(0),
                again,
                |c| pages.apply(c, Direction::Inflate),
            ),
            "deflate" => serve_available(
                &mut self.queues.deflate,
                mem,
                interrupt.queue(1),
                again,
                |c| pages.apply(c, Direction::Deflate),
            ),
            "reporting" => match self.queues.reporting.as_mut() {
                Some(q) => {
                    let signal = interrupt.queue(self.queues.reporting_index);
                    serve_available(q, mem, signal, again, |c| pages.report(c))
                }
                None => Ok(0),
            },
            _ => Ok(0),
        }
        .map(drop)
    }

    /// Take every statistics buffer the driver posted: keep the values of the last,
    /// hold it, return any earlier one. With EVENT_IDX the device asks to hear of the
    /// next buffer (the avail event), as for any queue: without that, a driver such as
    /// Linux's would post its next statistics without a notification.
    fn take_stats(&mut self) -> Result<(), ProtocolError> {
        let Some(q) = self.queues.stats.as_mut() else {
            return Ok(());
        };
        let mem = &self.pages.mem;
        loop {
            if q.event_idx_enabled() {
                q.disable_notification(mem).map_err(ProtocolError::Ring)?;
            }
            let mut took = false;
            // `iter`, not `pop_descriptor_chain`: a broken available index is an error
            // here, not an empty queue (which, with the notification check below
            // saying "more", would loop for ever).
            while let Some(chain) = q.iter(mem).map_err(ProtocolError::Ring)?.next() {
                took = true;
                let head = chain.head_index();
                let stats = read_stats(&chain, mem)?;
                let control = &self.pages.control;
                let mut latest = control.stats.lock().unwrap_or_else(|p| p.into_inner());
                let sequence = latest.as_ref().map_or(0, |s| s.sequence) + 1;
                *latest = Some(BalloonStats {
                    ballooned: control.actual(),
                    sequence,
                    ..stats
                });
                drop(latest);
                if let Some(old) = self.held_stats.replace(head) {
                    q.add_used(mem, old, 0).map_err(ProtocolError::Ring)?;
                    if q.needs_notification(mem).map_err(ProtocolError::Ring)? {
                        self.interrupt.signal_queue(self.queues.stats_index);
                    }
                }
            }
            if !q.event_idx_enabled()
                || !q.enable_notification(mem).map_err(ProtocolError::Ring)?
                || !took
            {
                return Ok(());
            }
        }
    }

    fn return_stats(&mut self) -> Result<(), ProtocolError> {
        let (Some(q), Some(head)) = (self.queues.stats.as_mut(), self.held_stats.take()) else {
            return Ok(());
        };
        q.add_used(&self.pages.mem, head, 0)
            .map_err(ProtocolError::Ring)?;
        if q.needs_notification(&self.pages.mem)
            .map_err(ProtocolError::Ring)?
        {
            self.interrupt.signal_queue(self.queues.stats_index);
        }
        Ok(())
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 4]
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_EVENT_IDX | F_STATS_VQ | F_DEFLATE_ON_OOM | F_PAGE_REPORTING
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 16];
        config[..4].copy_from_slice(&self.control.target().to_le_bytes());
        config[4..8].copy_from_slice(&self.control.actual().to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4, 4 bytes) is the driver's to write.
        if let (4, Ok(bytes)) = (offset, <[u8; 4]>::try_from(data)) {
            self.control
                .actual
                .store(u32::from_le_bytes(bytes), Ordering::SeqCst);
        }
    }
    fn activate(&mut self, mut active: ActiveQueues) -> Result<(), ActivateError> {
        let queues = std::mem::take(&mut active.queues);
        let mut server = BalloonServer::new(
            self,
            active.mem.clone(),
            active.interrupt.clone(),
            active.driver_features,
            queues,
        )?;
        *self
            .control
            .interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(active.interrupt.clone());
        let stats_fd = {
            use std::os::fd::AsRawFd;
            self.control.stats_wanted.as_raw_fd()
        };
        let fds = vec![stats_fd, server.again_fd()];
        let worker = spawn_device(&self.name, active, fds, move |_, token| server.serve(token))?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) {
        self.worker = None;
        // A reset balloon holds nothing: the guest has all its pages again.
        self.control
            .bits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.control.counters.inflated.store(0, Ordering::SeqCst);
        self.control.actual.store(0, Ordering::SeqCst);
    }
    fn workers(&self) -> &[Worker] {
        // Parked for a snapshot, it keeps what is inflated (the snapshot goes on
        // from it).
        self.worker.as_slice()
    }
    fn save_state(&self) -> Vec<u8> {
        let mut b = vmcraft_snapshot::SnapshotBuilder::new();
        match b.put("balloon", &self.control.save_state()) {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                // Encoding plain integers does not fail; if it did, the restored
                // balloon would start empty (its pages counted again as inflated).
                log::error!("virtio-balloon: cannot encode its state: {e}");
                Vec::new()
            }
        }
    }
    fn restore_state(
        &mut self,
        state: &[u8],
        mem: &GuestMemory,
    ) -> Result<(), crate::state::StateError> {
        let bad = |e: vmcraft_snapshot::SnapshotError| {
            crate::state::StateError::new("virtio-balloon", e.to_string())
        };
        let s = vmcraft_snapshot::Snapshot::parse(state.to_vec()).map_err(bad)?;
        let saved = s.load("balloon").map_err(bad)?;
        self.control.restore_state(&saved, mem)
    }
}

#[cfg(test)]
mod tests;
