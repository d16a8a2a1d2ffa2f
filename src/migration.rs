//! Live migration of a running machine between two VMM processes over a byte stream
//! (TCP in practice), by iterative pre-copy.
//!
//! The source ([`Machine::migrate`]):
//! 1. proves to the destination, and has it prove back, that both hold the shared
//!    secret (HMAC-SHA256 over a fresh nonce from each side), before any guest byte
//!    leaves;
//! 2. turns on dirty logging, then copies every page of RAM that is not zero while the
//!    guest runs (round 0);
//! 3. copies the pages dirtied during the previous round, by the guest (KVM's log) or
//!    by the VMM itself (vm-memory's bitmap: device writes, completed requests), round
//!    after round, until a round leaves at most
//!    [`MigrationOptions::stop_copy_pages`] dirty or
//!    [`MigrationOptions::max_rounds`] have passed;
//! 4. stops the machine as for a snapshot (the vCPUs complete their pending reads,
//!    the devices what they took), sends the last dirty pages and the state sections;
//! 5. ends once the destination says it runs.
//!
//! If anything fails before that (the connection breaks, the destination refuses or
//! cannot start), the source resumes: the guest goes on as if nothing happened. The
//! destination ([`MachineBuilder::accept_migration`], then
//! [`IncomingMigration::start`]) keeps everything in memory until the state has come
//! and the machine starts; a source that dies mid-way leaves nothing behind.
//!
//! Everything the destination receives is checked: frame lengths are bounded before
//! anything is allocated, pages must lie inside the RAM the source announced, the
//! state is a verified snapshot file.

use std::io::{BufWriter, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmcraft_memory::layout::MemoryLayout;
use vmcraft_memory::{GuestMemory, GuestRam, MemoryError, PAGE_SIZE};
use vmcraft_snapshot::Snapshot;

use crate::builder::{Machine, MachineBuilder};
use crate::snapshot::{MachineSnapshotError, SavedMachine};

/// Pages per `PAGES` frame at most.
pub const MAX_RUN: usize = 64;
/// Bytes of each side's nonce.
const NONCE: usize = 32;
/// Bytes of an HMAC-SHA256.
const MAC: usize = 32;
/// How long either side waits for the other before it gives up.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Frame tags.
mod tag {
    pub const CHALLENGE: u8 = 1;
    pub const PROOF: u8 = 2;
    pub const INFO: u8 = 3;
    pub const PAGES: u8 = 4;
    pub const STATE: u8 = 5;
    pub const STARTED: u8 = 6;
    pub const ABORT: u8 = 7;
}

/// Errors from migrating a machine.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// The connection failed (broken, closed, timed out).
    #[error("the migration connection failed while {what}")]
    Connection {
        /// What was being done.
        what: &'static str,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The peer did not prove it holds the shared secret.
    #[error("the peer did not prove it holds the migration secret")]
    NotAuthenticated,
    /// No secret was given.
    #[error("a migration needs a non-empty shared secret")]
    NoSecret,
    /// The peer broke the protocol.
    #[error("the peer broke the migration protocol: {0}")]
    Protocol(String),
    /// The destination gave up, and said why.
    #[error("the destination aborted the migration: {0}")]
    Aborted(String),
    /// Dirty logging could not be switched, or the dirty log read.
    #[error("dirty-page tracking")]
    DirtyLog(#[source] MemoryError),
    /// Guest memory could not be read or written.
    #[error("guest memory at {addr:#x}")]
    Memory {
        /// The guest-physical address.
        addr: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Guest RAM could not be created on the destination.
    #[error("cannot create guest RAM of {0} bytes")]
    Ram(u64, #[source] Box<dyn std::error::Error + Send + Sync>),
    /// Saving or restoring the machine's state failed.
    #[error("the machine's state")]
    State(#[source] MachineSnapshotError),
}

fn connection(what: &'static str) -> impl FnOnce(std::io::Error) -> MigrationError {
    move |source| MigrationError::Connection { what, source }
}

/// When the source stops copying while the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationOptions {
    /// Stop and copy once a round leaves at most this many dirty pages (the downtime
    /// copies them with the guest stopped).
    pub stop_copy_pages: u64,
    /// Stop and copy after this many rounds of pre-copy whatever is left (a guest that
    /// dirties faster than the link carries never converges).
    pub max_rounds: u32,
    /// Send at most this many bytes per second while the guest runs (`None`: as fast
    /// as the connection goes), to leave the link to the guests; the stop-and-copy
    /// is never throttled.
    pub max_bandwidth: Option<u64>,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            stop_copy_pages: 256,
            max_rounds: 30,
            max_bandwidth: None,
        }
    }
}

impl MigrationOptions {
    /// After pre-copy round `round` (0 is the full copy) left `dirty` pages: go on
    /// copying while the guest runs (`true`), or stop it and copy the rest.
    pub fn keep_copying(&self, round: u32, dirty: u64) -> bool {
        dirty > self.stop_copy_pages && round + 1 < self.max_rounds
    }
}

/// One pre-copy round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Pages sent.
    pub pages: u64,
    /// How long it took.
    pub time: Duration,
}

/// What [`Machine::migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// The rounds while the guest ran (round 0 is the full copy).
    pub rounds: Vec<Round>,
    /// Pages sent with the guest stopped.
    pub final_pages: u64,
    /// Bytes of state sent with the guest stopped.
    pub state_bytes: u64,
    /// Every byte sent.
    pub bytes_sent: u64,
    /// From the guest's pause to the destination saying it runs.
    pub downtime: Duration,
    /// From the start to the end.
    pub total: Duration,
}

impl MigrationReport {
    /// Pages sent in all.
    pub fn pages_sent(&self) -> u64 {
        self.rounds.iter().map(|r| r.pages).sum::<u64>() + self.final_pages
    }
}

type HmacSha256 = Hmac<Sha256>;

fn proof(secret: &[u8], role: &[u8], nonce: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(b"vmcraft-migration ");
    mac.update(role);
    mac.update(nonce);
    mac
}

fn nonce() -> Result<[u8; NONCE], MigrationError> {
    let mut n = [0u8; NONCE];
    let mut filled = 0;
    while filled < NONCE {
        // SAFETY: getrandom writes at most the given length into the buffer.
        let got = unsafe { libc::getrandom(n[filled..].as_mut_ptr().cast(), NONCE - filled, 0) };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(connection("drawing a nonce")(e));
            }
            continue;
        }
        filled += got as usize;
    }
    Ok(n)
}

/// Frames on a byte stream: a tag byte, a 32-bit little-endian length, the payload.
struct Frames<S: Read + Write> {
    reader: S,
    writer: BufWriter<S>,
    sent: u64,
    /// Bytes per second, and since when.
    throttle: Option<(u64, Instant, u64)>,
}

impl Frames<TcpStream> {
    fn new(stream: TcpStream) -> Result<Self, MigrationError> {
        stream
            .set_read_timeout(Some(PEER_TIMEOUT))
            .map_err(connection("setting a timeout"))?;
        stream
            .set_write_timeout(Some(PEER_TIMEOUT))
            .map_err(connection("setting a timeout"))?;
        let _ = stream.set_nodelay(true);
        let writer = stream
            .try_clone()
            .map_err(connection("duplicating the socket"))?;
        Ok(Frames {
            reader: stream,
            writer: BufWriter::with_capacity(1 << 20, writer),
            sent: 0,
            throttle: None,
        })
    }
}

impl<S: Read + Write> Frames<S> {
    fn send(&mut self, tag: u8, parts: &[&[u8]]) -> Result<(), MigrationError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut header = [0u8; 5];
        header[0] = tag;
        header[1..].copy_from_slice(&(len as u32).to_le_bytes());
        self.writer
            .write_all(&header)
            .map_err(connection("sending"))?;
        for p in parts {
            self.writer.write_all(p).map_err(connection("sending"))?;
        }
        self.sent += 5 + len as u64;
        if let Some((rate, since, base)) = self.throttle {
            // Sleep until the bytes sent since `since` fit the rate.
            let due = Duration::from_secs_f64((self.sent - base) as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(since.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }

    /// Send at most `rate` bytes per second from now on (`None`: no limit).
    fn throttle(&mut self, rate: Option<u64>) {
        self.throttle = rate
            .filter(|r| *r > 0)
            .map(|r| (r, Instant::now(), self.sent));
    }

    fn flush(&mut self) -> Result<(), MigrationError> {
        self.writer.flush().map_err(connection("sending"))
    }

    /// The next frame, whose payload may be at most `max` bytes (checked before
    /// anything is allocated).
    fn recv(&mut self, max: usize) -> Result<(u8, Vec<u8>), MigrationError> {
        let mut header = [0u8; 5];
        self.reader
            .read_exact(&mut header)
            .map_err(connection("receiving"))?;
        let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > max {
            return Err(MigrationError::Protocol(format!(
                "a frame of {len} bytes (tag {}) where at most {max} may come",
                header[0]
            )));
        }
        let mut payload = vec![0u8; len];
        self.reader
            .read_exact(&mut payload)
            .map_err(connection("receiving"))?;
        Ok((header[0], payload))
    }

    /// The next frame, which must be `want` (an ABORT from the peer is its error).
    fn expect(&mut self, want: u8, max: usize) -> Result<Vec<u8>, MigrationError> {
        let (tag, payload) = self.recv(max.max(4096))?;
        if tag == tag::ABORT {
            return Err(MigrationError::Aborted(
                String::from_utf8_lossy(&payload).into_owned(),
            ));
        }
        if tag != want || payload.len() > max {
            return Err(MigrationError::Protocol(format!(
                "frame tag {tag} ({} bytes) where tag {want} was due",
                payload.len()
            )));
        }
        Ok(payload)
    }
}

/// Sends runs of pages read from guest memory.
struct PageSender<'a> {
    memory: &'a GuestMemory,
    buf: Vec<u8>,
    /// The run being gathered: its first address and page count.
    run: Option<(u64, usize)>,
    pages: u64,
}

impl<'a> PageSender<'a> {
    fn new(memory: &'a GuestMemory) -> Self {
        PageSender {
            memory,
            buf: vec![0u8; MAX_RUN * PAGE_SIZE as usize],
            run: None,
            pages: 0,
        }
    }

    /// Queue the page at `addr`; runs of adjacent pages go out as one frame.
    fn page<S: Read + Write>(
        &mut self,
        frames: &mut Frames<S>,
        addr: u64,
    ) -> Result<(), MigrationError> {
        match self.run {
            Some((start, n)) if start + n as u64 * PAGE_SIZE == addr && n < MAX_RUN => {
                self.run = Some((start, n + 1));
            }
            Some(_) => {
                self.flush(frames)?;
                self.run = Some((addr, 1));
            }
            None => self.run = Some((addr, 1)),
        }
        Ok(())
    }

    fn flush<S: Read + Write>(&mut self, frames: &mut Frames<S>) -> Result<(), MigrationError> {
        let Some((start, n)) = self.run.take() else {
            return Ok(());
        };
        let bytes = &mut self.buf[..n * PAGE_SIZE as usize];
        self.memory
            .read_slice(bytes, GuestAddress(start))
            .map_err(|source| MigrationError::Memory {
                addr: start,
                source,
            })?;
        frames.send(tag::PAGES, &[&start.to_le_bytes(), bytes])?;
        self.pages += n as u64;
        Ok(())
    }

    /// Every page of RAM that is not zero (read a run at a time).
    fn all_nonzero<S: Read + Write>(
        &mut self,
        frames: &mut Frames<S>,
    ) -> Result<(), MigrationError> {
        let page = PAGE_SIZE as usize;
        let mut chunk = vec![0u8; MAX_RUN * page];
        for region in self.memory.iter() {
            let base = region.start_addr().0;
            let mut at = 0;
            while at < region.len() {
                let n = ((region.len() - at) as usize).min(chunk.len());
                self.memory
                    .read_slice(&mut chunk[..n], GuestAddress(base + at))
                    .map_err(|source| MigrationError::Memory {
                        addr: base + at,
                        source,
                    })?;
                for (i, p) in chunk[..n].chunks_exact(page).enumerate() {
                    if !vmcraft_memory::snapshot::is_zero_page(p) {
                        self.page(frames, base + at + (i * page) as u64)?;
                    }
                }
                at += n as u64;
            }
        }
        self.flush(frames)
    }
}

impl Machine {
    /// Migrate this machine to the VMM at the other end of `stream`, which holds
    /// `secret` too (see the [module documentation](self)). On success the machine
    /// has stopped (its outcome is a requested stop) and the guest runs at the
    /// destination; on an error it runs here as before.
    pub fn migrate(
        &self,
        stream: TcpStream,
        secret: &[u8],
        options: MigrationOptions,
    ) -> Result<MigrationReport, MigrationError> {
        if secret.is_empty() {
            return Err(MigrationError::NoSecret);
        }
        let start = Instant::now();
        let mut frames = Frames::new(stream)?;
        let ram = self.running.vm().ram();
        let fd = self.running.vm().fd();
        // Who is there?
        let challenge = frames.expect(tag::CHALLENGE, NONCE)?;
        let mine = nonce()?;
        let answer = proof(secret, b"source", &challenge).finalize().into_bytes();
        frames.send(tag::PROOF, &[&answer, &mine])?;
        frames.flush()?;
        let theirs = frames.expect(tag::PROOF, MAC)?;
        proof(secret, b"destination", &mine)
            .verify_slice(&theirs)
            .map_err(|_| MigrationError::NotAuthenticated)?;

        let info = self.machine_info();
        frames.send(tag::INFO, &[&info.ram_bytes.to_le_bytes()])?;
        ram.set_dirty_logging(fd, true)
            .map_err(MigrationError::DirtyLog)?;
        let outcome = self.precopy_and_hand_over(&mut frames, options, start);
        if outcome.is_err() {
            // Back to running here, whatever happened.
            self.resume();
        }
        if let Err(e) = ram.set_dirty_logging(fd, false) {
            log::warn!("migration: cannot turn dirty logging off: {e}");
        }
        if let Err(e) = &outcome {
            let reason = e.to_string();
            let _ = frames.send(tag::ABORT, &[reason.as_bytes()]);
            let _ = frames.flush();
        }
        outcome
    }

    fn precopy_and_hand_over(
        &self,
        frames: &mut Frames<TcpStream>,
        options: MigrationOptions,
        start: Instant,
    ) -> Result<MigrationReport, MigrationError> {
        let vm = self.running.vm();
        let (ram, fd, memory) = (vm.ram(), vm.fd(), vm.memory());
        let mut rounds = Vec::new();
        frames.throttle(options.max_bandwidth);
        let mut sender = PageSender::new(memory);
        let t = Instant::now();
        sender.all_nonzero(frames)?;
        frames.flush()?;
        rounds.push(Round {
            pages: sender.pages,
            time: t.elapsed(),
        });
        loop {
            let t = Instant::now();
            let dirty = ram.take_dirty_pages(fd).map_err(MigrationError::DirtyLog)?;
            if !options.keep_copying(rounds.len() as u32 - 1, dirty.count() as u64) {
                // What this round found goes in the final copy.
                return self.stop_and_copy(frames, dirty, rounds, start);
            }
            sender.pages = 0;
            for page in dirty.pages() {
                sender.page(frames, page.0)?;
            }
            sender.flush(frames)?;
            frames.flush()?;
            rounds.push(Round {
                pages: sender.pages,
                time: t.elapsed(),
            });
        }
    }

    fn stop_and_copy(
        &self,
        frames: &mut Frames<TcpStream>,
        pending: vmcraft_memory::DirtyPages,
        rounds: Vec<Round>,
        start: Instant,
    ) -> Result<MigrationReport, MigrationError> {
        let vm = self.running.vm();
        let (ram, fd, memory) = (vm.ram(), vm.fd(), vm.memory());
        frames.throttle(None);
        let paused = Instant::now();
        let (state, _) = self.pause_and_save_state().map_err(MigrationError::State)?;
        // Whatever the guest and the devices wrote until they stopped.
        let last = ram.take_dirty_pages(fd).map_err(MigrationError::DirtyLog)?;
        let mut sender = PageSender::new(memory);
        let mut pages: Vec<u64> = pending.pages().chain(last.pages()).map(|a| a.0).collect();
        pages.sort_unstable();
        pages.dedup();
        for page in pages {
            sender.page(frames, page)?;
        }
        sender.flush(frames)?;
        let state = state.to_bytes();
        frames.send(tag::STATE, &[&state])?;
        frames.flush()?;
        frames.expect(tag::STARTED, 0)?;
        let downtime = paused.elapsed();
        self.running.request_stop();
        Ok(MigrationReport {
            rounds,
            final_pages: sender.pages,
            state_bytes: state.len() as u64,
            bytes_sent: frames.sent,
            downtime,
            total: start.elapsed(),
        })
    }
}

/// A migration being received: the state has come; add the devices and
/// [`start`](IncomingMigration::start).
pub struct IncomingMigration {
    frames: Frames<TcpStream>,
    saved: SavedMachine,
}

impl std::fmt::Debug for IncomingMigration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingMigration")
            .field("saved", &self.saved)
            .finish_non_exhaustive()
    }
}

impl IncomingMigration {
    /// What the source says about the machine (build the same one).
    pub fn saved(&self) -> &SavedMachine {
        &self.saved
    }

    /// Restore the machine built on `builder` and start it; the source then ends.
    /// If it cannot start, the source is told why and goes on.
    pub fn start(mut self, builder: MachineBuilder) -> Result<Machine, MigrationError> {
        match builder.start_restored(&self.saved) {
            Ok(machine) => {
                self.frames.send(tag::STARTED, &[])?;
                self.frames.flush()?;
                Ok(machine)
            }
            Err(e) => {
                let reason = format!("{e}{}", vmcraft_memory::report::ErrorChain(&e));
                let _ = self.frames.send(tag::ABORT, &[reason.as_bytes()]);
                let _ = self.frames.flush();
                Err(MigrationError::State(e))
            }
        }
    }
}

impl MachineBuilder {
    /// Receive a migration on `stream` from a source holding `secret`: memory, then
    /// the state. Returns the builder of the new machine (RAM filled, legacy devices
    /// with serial output to `serial_out`) once the state has come: add the same
    /// devices as the source's, then [`IncomingMigration::start`].
    pub fn accept_migration(
        stream: TcpStream,
        secret: &[u8],
        serial_out: Box<dyn Write + Send>,
    ) -> Result<(MachineBuilder, IncomingMigration), MigrationError> {
        if secret.is_empty() {
            return Err(MigrationError::NoSecret);
        }
        let mut frames = Frames::new(stream)?;
        let mine = nonce()?;
        frames.send(tag::CHALLENGE, &[&mine])?;
        frames.flush()?;
        let answer = frames.expect(tag::PROOF, MAC + NONCE)?;
        if answer.len() != MAC + NONCE {
            return Err(MigrationError::NotAuthenticated);
        }
        proof(secret, b"source", &mine)
            .verify_slice(&answer[..MAC])
            .map_err(|_| MigrationError::NotAuthenticated)?;
        let reply = proof(secret, b"destination", &answer[MAC..])
            .finalize()
            .into_bytes();
        frames.send(tag::PROOF, &[&reply])?;
        frames.flush()?;

        let info = frames.expect(tag::INFO, 8)?;
        let ram_bytes = u64::from_le_bytes(
            info.as_slice()
                .try_into()
                .map_err(|_| MigrationError::Protocol("a short INFO frame".into()))?,
        );
        let layout = MemoryLayout::x86_64(ram_bytes)
            .map_err(|e| MigrationError::Ram(ram_bytes, e.into()))?;
        let ram = GuestRam::new(&layout).map_err(|e| MigrationError::Ram(ram_bytes, e.into()))?;
        let memory = ram.memory().clone();
        let max_pages = 8 + MAX_RUN * PAGE_SIZE as usize;
        let state = loop {
            let (tag, payload) = frames.recv(max_pages.max(vmcraft_snapshot::MAX_FILE as usize))?;
            match tag {
                tag::PAGES => store_pages(&memory, &payload)?,
                tag::STATE => break payload,
                tag::ABORT => {
                    return Err(MigrationError::Aborted(
                        String::from_utf8_lossy(&payload).into_owned(),
                    ))
                }
                other => {
                    return Err(MigrationError::Protocol(format!(
                        "frame tag {other} during the memory copy"
                    )))
                }
            }
        };
        let saved = Snapshot::parse(state)
            .map_err(MachineSnapshotError::File)
            .and_then(SavedMachine::from_snapshot)
            .map_err(MigrationError::State)?;
        if saved.info().ram_bytes != ram_bytes {
            return Err(MigrationError::Protocol(format!(
                "{} bytes of RAM announced, {} in the state",
                ram_bytes,
                saved.info().ram_bytes
            )));
        }
        let builder = MachineBuilder::with_ram(layout, ram, serial_out)
            .map_err(|e| MigrationError::State(MachineSnapshotError::Build(e)))?;
        Ok((builder, IncomingMigration { frames, saved }))
    }
}

/// Write a `PAGES` frame's pages into `memory`: a page-aligned guest-physical address,
/// then whole pages, all inside RAM.
fn store_pages(memory: &GuestMemory, payload: &[u8]) -> Result<(), MigrationError> {
    let (addr, pages) = payload
        .split_at_checked(8)
        .ok_or_else(|| MigrationError::Protocol("a PAGES frame shorter than its address".into()))?;
    let addr = u64::from_le_bytes(addr.try_into().expect("8 bytes"));
    if !addr.is_multiple_of(PAGE_SIZE)
        || pages.is_empty()
        || !(pages.len() as u64).is_multiple_of(PAGE_SIZE)
    {
        return Err(MigrationError::Protocol(format!(
            "{} bytes of pages at {addr:#x}: not whole pages at a page boundary",
            pages.len()
        )));
    }
    if !memory.check_range(GuestAddress(addr), pages.len()) {
        return Err(MigrationError::Protocol(format!(
            "{} pages at {addr:#x}, outside guest RAM",
            pages.len() as u64 / PAGE_SIZE
        )));
    }
    memory
        .write_slice(pages, GuestAddress(addr))
        .map_err(|source| MigrationError::Memory { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precopy_stops_when_few_pages_are_dirty_or_rounds_run_out() {
        let o = MigrationOptions {
            stop_copy_pages: 100,
            max_rounds: 5,
            max_bandwidth: None,
        };
        assert!(o.keep_copying(0, 101));
        assert!(!o.keep_copying(0, 100));
        assert!(o.keep_copying(3, 1_000_000));
        assert!(!o.keep_copying(4, 1_000_000), "the fifth round is the last");
    }

    #[test]
    fn proofs_bind_the_secret_the_role_and_the_nonce() {
        let p = |s: &[u8], r: &[u8], n: &[u8]| proof(s, r, n).finalize().into_bytes();
        let base = p(b"secret", b"source", b"n1");
        assert_eq!(base, p(b"secret", b"source", b"n1"));
        assert_ne!(base, p(b"secreT", b"source", b"n1"));
        assert_ne!(base, p(b"secret", b"destination", b"n1"));
        assert_ne!(base, p(b"secret", b"source", b"n2"));
    }

    #[test]
    fn pages_outside_ram_or_misaligned_are_refused() {
        let ram = GuestRam::new(&MemoryLayout::x86_64(2 << 20).unwrap()).unwrap();
        let m = ram.memory();
        let frame = |addr: u64, pages: usize| {
            let mut f = addr.to_le_bytes().to_vec();
            f.extend(vec![0xa5u8; pages * PAGE_SIZE as usize]);
            f
        };
        store_pages(m, &frame(0x1000, 2)).unwrap();
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x2fff)).unwrap(), 0xa5);
        for (bad, what) in [
            (frame(0x1001, 1), "misaligned"),
            (frame(2 << 20, 1), "past the end"),
            (frame((2 << 20) - 4096, 2), "straddling the end"),
            (frame(0, 0), "empty"),
            (vec![0; 7], "short"),
        ] {
            assert!(
                matches!(store_pages(m, &bad), Err(MigrationError::Protocol(_))),
                "{what}"
            );
        }
        let mut odd = frame(0, 1);
        odd.push(0);
        assert!(store_pages(m, &odd).is_err(), "not whole pages");
    }
}
