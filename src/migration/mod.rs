//! Live migration of a running machine between two VMM processes over a byte stream
//! (TCP in practice), by iterative pre-copy, on an authenticated, encrypted channel,
//! with a hand-over that never leaves two live copies of the guest.
//!
//! # Who may be on the path
//!
//! Anyone between the two VMMs may read, change, drop, reorder, replay or inject bytes,
//! and anyone may connect to the destination. What they get:
//! - nothing of the guest: after the Noise handshake ([`channel`]) every message is
//!   encrypted (ChaCha20-Poly1305) under keys bound to both sides' fresh ephemeral
//!   keys, and authenticated, in order: a record changed, reordered, replayed, dropped
//!   or injected ends the migration ([`MigrationError::Tampered`]), before it is used;
//! - no way in without the secret or a key the destination accepts: the handshake
//!   fails, the destination waits for the next connection (a bounded number of tries)
//!   and the source runs on;
//! - no memory or time beyond the bounds: a handshake message is at most 256 bytes, the
//!   handshake ends within its time limit however the bytes trickle in, every record
//!   must arrive whole within the peer timeout, the RAM the source announces must be
//!   the RAM the destination was configured with, pages lie inside it, the state is
//!   bounded by what a machine of that size can hold ([`wire::state_limit`]);
//! - no words in our mouth: what a peer says (an abort's reason) is data, escaped
//!   before it is printed ([`wire::PeerText`]).
//!
//! What they can still do: cut the connection (the migration fails; see the hand-over
//! for when that leaves the source paused), and, with a shared secret, test guesses of
//! it, online against the destination one connection at a time or, as an active
//! attacker who poses as the destination to a source, offline against what the source
//! sent: so the secret must be random and at least [`channel::MIN_SECRET`] bytes
//! (shorter ones are refused). With [`MigrationAuth::Keys`] there is no secret to
//! guess.
//!
//! # The protocol
//!
//! ```text
//!  source                                              destination
//!  ──────                                              ───────────
//!  Noise handshake (3 messages) ─────────────────────▶ (listening; a peer that fails
//!                                ◀──────────── HELLO    it is dropped, the next tried)
//!  KEEPALIVE every 5 s while it waits to begin ──────▶
//!  INFO (RAM, vCPUs) ────────────────────────────────▶ RAM must be the configured size
//!  PAGES … (pre-copy rounds, guest running) ─────────▶
//!  pause; last PAGES, STATE, STATE_DATA … ───────────▶ verify everything, build
//!                                ◀──────────── READY    (or ABORT: the source resumes)
//!  COMMIT ───────────────────────────────────────────▶ restore, run the vCPUs
//!                                ◀──────────── STARTED  (or ABORT: nothing ran; the
//!  stop for good                                         source resumes)
//! ```
//!
//! The source's states, and what each loss does:
//!
//! ```text
//!   RUNNING ──(migrate)──▶ COPYING ──(pause)──▶ PAUSED ──(READY)──▶ COMMITTING
//!      ▲                      │                   │                    │
//!      └──── any error ───────┴──── any error ────┘        send COMMIT │
//!      ▲                                                               ▼
//!      └───────────────── ABORT from the destination ─────────────  COMMITTED
//!                                                                       │
//!                       STARTED ──▶ HANDED OVER (the source stops)      │
//!                       anything else (broken, timed out, forged) ──▶ UNCERTAIN
//! ```
//!
//! Before the source sends COMMIT, the destination has run nothing, so any failure
//! resumes the source: one live copy. After COMMIT, the destination runs the guest
//! (and says STARTED) or, if it cannot restore it, says ABORT without having run it:
//! either way one live copy. If the source cannot tell which (the connection broke or
//! timed out after COMMIT left), it stays **paused** and returns
//! [`MigrationError::Uncertain`]: the operator must find out whether the destination
//! runs the guest, then [`Machine::resume`] the source or end it. It never resumes on
//! its own then, because that could leave two live copies (with shared disks,
//! corruption). The destination never runs the guest without COMMIT.
//!
//! The source ([`Machine::migrate`]) turns on dirty logging, copies every page of RAM
//! that is not zero while the guest runs (round 0), then the pages dirtied during the
//! previous round (by the guest through KVM's log, or by the VMM itself), until a round
//! leaves at most [`MigrationOptions::stop_copy_pages`] or
//! [`MigrationOptions::max_rounds`] have passed; then it pauses the machine as for a
//! snapshot and sends the rest. The destination
//! ([`MachineBuilder::listen_for_migration`] or [`MachineBuilder::accept_migration`],
//! then [`IncomingMigration::start`]) keeps everything in memory until it runs; a
//! source that dies mid-way leaves nothing behind.

pub mod channel;
pub mod wire;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmcraft_memory::layout::MemoryLayout;
use vmcraft_memory::{GuestMemory, GuestRam, MemoryError, PAGE_SIZE};
use vmcraft_snapshot::Snapshot;

pub use channel::{Channel, Limits, MigrationAuth, PublicKey, StaticKey, Transport};
use wire::{Message, PeerText, MAX_RUN, STATE_CHUNK};

use crate::builder::MachineBuilder;
use crate::config::{ConfigError, MachineConfig};
use crate::machine::Machine;
use crate::snapshot::{MachineSnapshotError, SavedMachine};

/// How long either side waits for a record (or a write) before it gives up.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the handshake may take in all.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a source waiting to begin tells the destination it is still there.
pub const KEEPALIVE: Duration = Duration::from_secs(5);

/// Errors from migrating a machine.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// The source's machine is refused here (its configuration is not valid, or
    /// describes another machine than the destination's).
    #[error("the source's machine")]
    Config(#[source] ConfigError),
    /// The connection failed.
    #[error("the migration connection failed while {what}")]
    Connection {
        /// What was being done.
        what: &'static str,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection.
    #[error("the peer closed the migration connection during {0}")]
    Closed(&'static str),
    /// The peer took longer than its time limit.
    #[error("the peer did not answer in time during {0}")]
    TimedOut(&'static str),
    /// The peer did not prove it holds the shared secret (or the key it claims).
    #[error("the peer did not prove it holds the migration secret or key")]
    NotAuthenticated,
    /// The peer's key is not one of those accepted.
    #[error("the peer's public key {0} is not one this VMM accepts")]
    UnknownPeer(String),
    /// A shared secret too short to resist guessing.
    #[error("a migration secret of {0} bytes; at least 32 random bytes are needed (head -c 32 /dev/urandom)")]
    WeakSecret(usize),
    /// A key that cannot be used.
    #[error("migration key: {0}")]
    BadKey(&'static str),
    /// The Noise library refused an operation.
    #[error("the migration channel failed {what}: {error}")]
    Noise {
        /// What was being done.
        what: &'static str,
        /// What `snow` said.
        error: String,
    },
    /// A record failed authentication.
    #[error("record {record} from the peer failed authentication: it was changed, reordered, replayed or injected, or one before it dropped")]
    Tampered {
        /// Its position in the stream (0 is the first after the handshake).
        record: u64,
    },
    /// A message that does not decode.
    #[error("the peer sent a malformed message")]
    Wire(#[source] wire::WireError),
    /// The peer broke the protocol.
    #[error("the peer broke the migration protocol: {0}")]
    Protocol(String),
    /// The peer gave up, and said why.
    #[error("the peer aborted the migration, saying: {0}")]
    Aborted(PeerText),
    /// The source announced another RAM size than the destination's.
    #[error("the source announced {announced} bytes of RAM; this destination was configured with {configured}")]
    RamMismatch {
        /// What the source said.
        announced: u64,
        /// What the destination has.
        configured: u64,
    },
    /// The state announced is larger than a machine of this size can hold.
    #[error(
        "the source announced {len} bytes of state; a machine of this size holds at most {limit}"
    )]
    StateTooLarge {
        /// What the source announced.
        len: u64,
        /// The bound.
        limit: u64,
    },
    /// The destination gave up on every connection it was allowed.
    #[error("no migration came in {0} connections")]
    NoMigration(u32),
    /// The source committed to the hand-over, then lost the destination: the guest may
    /// run there or nowhere. The source stays paused; the operator must decide.
    #[error("the outcome of the hand-over is unknown (the source committed, then {0}): the guest may run at the destination or nowhere; it stays paused here: resume it only if it does not run at the destination")]
    Uncertain(#[source] Box<MigrationError>),
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

/// When the source stops copying while the guest runs, and how long it waits.
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
    /// How long one record (or write) may take.
    pub peer_timeout: Duration,
    /// How long the handshake may take in all.
    pub handshake_timeout: Duration,
    /// Nothing goes on past this instant (the migration fails, and the source resumes
    /// or, after it committed, stays paused).
    pub deadline: Option<Instant>,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            stop_copy_pages: 256,
            max_rounds: 30,
            max_bandwidth: None,
            peer_timeout: PEER_TIMEOUT,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            deadline: None,
        }
    }
}

impl MigrationOptions {
    /// After pre-copy round `round` (0 is the full copy) left `dirty` pages: go on
    /// copying while the guest runs (`true`), or stop it and copy the rest.
    pub fn keep_copying(&self, round: u32, dirty: u64) -> bool {
        dirty > self.stop_copy_pages && round + 1 < self.max_rounds
    }

    fn limits(&self) -> Limits {
        Limits {
            peer: self.peer_timeout,
            handshake: self.handshake_timeout,
            deadline: self.deadline,
        }
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
    /// Every byte sent, the channel's framing and tags included.
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

/// A source's authenticated session with a destination, made before the migration
/// begins (a VMM that may not open sockets once its guest runs connects first):
/// call [`MigrationSession::keep_alive`] at least every [`KEEPALIVE`] while it
/// waits, then [`Machine::migrate_over`] it. A destination drops a session that is
/// silent for its peer timeout.
pub struct MigrationSession<S: Transport> {
    channel: Channel<S>,
    last_sent: Instant,
}

impl<S: Transport> std::fmt::Debug for MigrationSession<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationSession")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl<S: Transport> MigrationSession<S> {
    /// Run the handshake with the destination at the other end of `stream`.
    pub fn connect(
        stream: S,
        auth: &MigrationAuth,
        options: &MigrationOptions,
    ) -> Result<Self, MigrationError> {
        Ok(MigrationSession {
            channel: Channel::initiate(stream, auth, options.limits())?,
            last_sent: Instant::now(),
        })
    }

    /// Tell the destination the session is still wanted, if [`KEEPALIVE`] has passed
    /// since the last message. An error means the session is lost.
    pub fn keep_alive(&mut self) -> Result<(), MigrationError> {
        if self.last_sent.elapsed() < KEEPALIVE {
            return Ok(());
        }
        self.channel.send(&Message::KeepAlive)?;
        self.channel.flush()?;
        self.last_sent = Instant::now();
        Ok(())
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

    /// Queue the page at `addr`; runs of adjacent pages go out as one message.
    fn page<S: Transport>(
        &mut self,
        channel: &mut Channel<S>,
        addr: u64,
    ) -> Result<(), MigrationError> {
        match self.run {
            Some((start, n)) if start + n as u64 * PAGE_SIZE == addr && n < MAX_RUN => {
                self.run = Some((start, n + 1));
            }
            Some(_) => {
                self.flush(channel)?;
                self.run = Some((addr, 1));
            }
            None => self.run = Some((addr, 1)),
        }
        Ok(())
    }

    fn flush<S: Transport>(&mut self, channel: &mut Channel<S>) -> Result<(), MigrationError> {
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
        channel.send(&Message::Pages {
            addr: start,
            data: bytes,
        })?;
        self.pages += n as u64;
        Ok(())
    }

    /// Every page of RAM that is not zero (read a run at a time).
    fn all_nonzero<S: Transport>(
        &mut self,
        channel: &mut Channel<S>,
    ) -> Result<(), MigrationError> {
        let page = PAGE_SIZE as usize;
        let mut chunk = vec![0u8; 64 * page];
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
                        self.page(channel, base + at + (i * page) as u64)?;
                    }
                }
                at += n as u64;
            }
        }
        self.flush(channel)
    }
}

impl Machine {
    /// Migrate this machine to the VMM at the other end of `stream`, which knows it
    /// by `auth` (see the [module documentation](self)). On success the machine has
    /// stopped (its outcome is a requested stop) and the guest runs at the
    /// destination; on [`MigrationError::Uncertain`] it stays paused; on any other
    /// error it runs here as before.
    pub fn migrate<S: Transport>(
        &self,
        stream: S,
        auth: &MigrationAuth,
        options: MigrationOptions,
    ) -> Result<MigrationReport, MigrationError> {
        let start = Instant::now();
        let session = MigrationSession::connect(stream, auth, &options)?;
        self.migrate_from(session, options, start)
    }

    /// [`Machine::migrate`] over a session made beforehand.
    pub fn migrate_over<S: Transport>(
        &self,
        session: MigrationSession<S>,
        options: MigrationOptions,
    ) -> Result<MigrationReport, MigrationError> {
        self.migrate_from(session, options, Instant::now())
    }

    fn migrate_from<S: Transport>(
        &self,
        session: MigrationSession<S>,
        options: MigrationOptions,
        start: Instant,
    ) -> Result<MigrationReport, MigrationError> {
        self.check_savable().map_err(MigrationError::State)?;
        let mut channel = session.channel;
        channel.set_peer_timeout(options.peer_timeout);
        channel.set_deadline(options.deadline);
        let ram = self.running.vm().ram();
        let fd = self.running.vm().fd();
        let info = self.machine_info();
        channel.send(&Message::Info {
            ram_bytes: info.ram_bytes,
            vcpus: info.vcpus,
        })?;
        if let Some(config) = self.config() {
            // The destination checks the machine before any memory comes.
            channel.send(&Message::Config(config.to_json().as_bytes()))?;
            channel.flush()?;
            match channel.recv()? {
                Message::Accepted => {}
                Message::Abort(text) => return Err(MigrationError::Aborted(PeerText::new(text))),
                other => {
                    return Err(MigrationError::Protocol(format!(
                        "{} where ACCEPTED was due",
                        other.kind()
                    )))
                }
            }
        }
        ram.set_dirty_logging(fd, true)
            .map_err(MigrationError::DirtyLog)?;
        let outcome = self.precopy_and_hand_over(&mut channel, options, start);
        match &outcome {
            Ok(_) | Err(MigrationError::Uncertain(_)) => {}
            Err(e) => {
                // Nothing runs at the destination: back to running here.
                self.resume();
                if !matches!(e, MigrationError::Aborted(_)) {
                    let reason = e.to_string();
                    let _ = channel.send(&Message::Abort(reason.as_bytes()));
                    let _ = channel.flush();
                }
            }
        }
        if let Err(e) = ram.set_dirty_logging(fd, false) {
            log::warn!("migration: cannot turn dirty logging off: {e}");
        }
        outcome
    }

    fn precopy_and_hand_over<S: Transport>(
        &self,
        channel: &mut Channel<S>,
        options: MigrationOptions,
        start: Instant,
    ) -> Result<MigrationReport, MigrationError> {
        let vm = self.running.vm();
        let (ram, fd, memory) = (vm.ram(), vm.fd(), vm.memory());
        let mut rounds = Vec::new();
        channel.throttle(options.max_bandwidth);
        let mut sender = PageSender::new(memory);
        let t = Instant::now();
        sender.all_nonzero(channel)?;
        channel.flush()?;
        rounds.push(Round {
            pages: sender.pages,
            time: t.elapsed(),
        });
        loop {
            let t = Instant::now();
            let dirty = ram.take_dirty_pages(fd).map_err(MigrationError::DirtyLog)?;
            if !options.keep_copying(rounds.len() as u32 - 1, dirty.count() as u64) {
                // What this round found goes in the final copy.
                return self.stop_and_copy(channel, dirty, rounds, start);
            }
            sender.pages = 0;
            for page in dirty.pages() {
                sender.page(channel, page.0)?;
            }
            sender.flush(channel)?;
            channel.flush()?;
            rounds.push(Round {
                pages: sender.pages,
                time: t.elapsed(),
            });
        }
    }

    fn stop_and_copy<S: Transport>(
        &self,
        channel: &mut Channel<S>,
        pending: vmcraft_memory::DirtyPages,
        rounds: Vec<Round>,
        start: Instant,
    ) -> Result<MigrationReport, MigrationError> {
        let vm = self.running.vm();
        let (ram, fd, memory) = (vm.ram(), vm.fd(), vm.memory());
        channel.throttle(None);
        let paused = Instant::now();
        let (state, _) = self.pause_and_save_state().map_err(MigrationError::State)?;
        // Whatever the guest and the devices wrote until they stopped.
        let last = ram.take_dirty_pages(fd).map_err(MigrationError::DirtyLog)?;
        let mut sender = PageSender::new(memory);
        let mut pages: Vec<u64> = pending.pages().chain(last.pages()).map(|a| a.0).collect();
        pages.sort_unstable();
        pages.dedup();
        for page in pages {
            sender.page(channel, page)?;
        }
        sender.flush(channel)?;
        let state = state.to_bytes();
        channel.send(&Message::State {
            len: state.len() as u64,
        })?;
        for chunk in state.chunks(STATE_CHUNK) {
            channel.send(&Message::StateData(chunk))?;
        }
        channel.flush()?;
        match channel.recv()? {
            Message::Ready => {}
            Message::Abort(text) => return Err(MigrationError::Aborted(PeerText::new(text))),
            other => {
                return Err(MigrationError::Protocol(format!(
                    "{} where READY was due",
                    other.kind()
                )))
            }
        }
        // The point of no return: from here the source never resumes on its own.
        let uncertain = |e| MigrationError::Uncertain(Box::new(e));
        channel.send(&Message::Commit).map_err(uncertain)?;
        channel.flush().map_err(uncertain)?;
        match channel.recv() {
            Ok(Message::Started) => {}
            // The destination says it could not restore the guest and ran nothing.
            Ok(Message::Abort(text)) => return Err(MigrationError::Aborted(PeerText::new(text))),
            Ok(other) => {
                return Err(uncertain(MigrationError::Protocol(format!(
                    "{} where STARTED was due",
                    other.kind()
                ))))
            }
            Err(e) => return Err(uncertain(e)),
        }
        let downtime = paused.elapsed();
        self.running.request_stop();
        Ok(MigrationReport {
            rounds,
            final_pages: sender.pages,
            state_bytes: state.len() as u64,
            bytes_sent: channel.sent,
            downtime,
            total: start.elapsed(),
        })
    }
}

/// What a destination expects, and how long it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingOptions {
    /// Bytes of guest RAM this destination was configured with: a source that
    /// announces another size is refused before anything is allocated.
    pub ram_bytes: u64,
    /// How long one record (or write) may take; a session waiting to begin must send
    /// a keep-alive within it.
    pub peer_timeout: Duration,
    /// How long a connection's handshake may take in all.
    pub handshake_timeout: Duration,
    /// How many connections [`MachineBuilder::listen_for_migration`] tries before it
    /// gives up.
    pub tries: u32,
    /// Nothing goes on past this instant.
    pub deadline: Option<Instant>,
    /// The machine this destination will build: a source whose configuration
    /// describes another is refused before any memory comes.
    pub config: Option<MachineConfig>,
}

impl IncomingOptions {
    /// The defaults for a destination of `ram_bytes` of RAM: [`PEER_TIMEOUT`],
    /// [`HANDSHAKE_TIMEOUT`], 8 tries, no deadline.
    pub fn new(ram_bytes: u64) -> Self {
        IncomingOptions {
            ram_bytes,
            peer_timeout: PEER_TIMEOUT,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            tries: 8,
            deadline: None,
            config: None,
        }
    }
}

/// The destination's side of the memory copy, as plain code over decoded messages:
/// pages go into guest memory, the state file is gathered within its bound.
pub struct Receiver {
    memory: GuestMemory,
    ram_bytes: u64,
    state_limit: u64,
    /// The state file: its announced length, and what has come of it.
    state: Option<(u64, Vec<u8>)>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("ram_bytes", &self.ram_bytes)
            .field("state_limit", &self.state_limit)
            .finish_non_exhaustive()
    }
}

/// What [`Receiver::take`] made of a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// More is due.
    More,
    /// The state file has come whole.
    State(Vec<u8>),
}

impl Receiver {
    /// A receiver into `memory`, of `ram_bytes` and `vcpus` as the source announced.
    pub fn new(memory: GuestMemory, ram_bytes: u64, vcpus: u32) -> Self {
        Receiver {
            memory,
            ram_bytes,
            state_limit: wire::state_limit(ram_bytes, vcpus),
            state: None,
        }
    }

    /// Take the next message of the copy.
    pub fn take(&mut self, message: Message<'_>) -> Result<Received, MigrationError> {
        match (message, &mut self.state) {
            (Message::Pages { addr, data }, None) => {
                store_pages(&self.memory, addr, data)?;
                Ok(Received::More)
            }
            (Message::State { len }, None) => {
                if len > self.state_limit {
                    return Err(MigrationError::StateTooLarge {
                        len,
                        limit: self.state_limit,
                    });
                }
                if len == 0 {
                    return Err(MigrationError::Protocol("an empty state file".into()));
                }
                // Grown as the data comes, never past `len`.
                self.state = Some((len, Vec::new()));
                Ok(Received::More)
            }
            (Message::StateData(data), Some((len, got))) => {
                if got.len() as u64 + data.len() as u64 > *len {
                    return Err(MigrationError::Protocol(format!(
                        "more state than the {len} bytes announced"
                    )));
                }
                got.extend_from_slice(data);
                if got.len() as u64 == *len {
                    return Ok(Received::State(std::mem::take(got)));
                }
                Ok(Received::More)
            }
            (Message::Abort(text), _) => Err(MigrationError::Aborted(PeerText::new(text))),
            (other, state) => Err(MigrationError::Protocol(format!(
                "{} {}",
                other.kind(),
                if state.is_some() {
                    "while the state file came"
                } else {
                    "during the memory copy"
                }
            ))),
        }
    }
}

/// A migration being received: the state has come; add the devices and
/// [`start`](IncomingMigration::start).
pub struct IncomingMigration<S: Transport = std::net::TcpStream> {
    channel: Channel<S>,
    saved: SavedMachine,
}

impl<S: Transport> std::fmt::Debug for IncomingMigration<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingMigration")
            .field("saved", &self.saved)
            .finish_non_exhaustive()
    }
}

impl<S: Transport> IncomingMigration<S> {
    /// What the source says about the machine (build the same one).
    pub fn saved(&self) -> &SavedMachine {
        &self.saved
    }

    /// Check the machine built on `builder` matches the one coming, tell the source
    /// so, wait for its COMMIT, then restore the machine and start it. Until COMMIT
    /// nothing runs here; if the machine cannot be restored after it, the source is
    /// told that nothing ran, and resumes.
    pub fn start(mut self, builder: MachineBuilder) -> Result<Machine, MigrationError> {
        if let Err(e) = builder.check_restorable(&self.saved) {
            self.abort(&e);
            return Err(MigrationError::State(e));
        }
        self.channel.send(&Message::Ready)?;
        self.channel.flush()?;
        match self.channel.recv()? {
            Message::Commit => {}
            Message::Abort(text) => return Err(MigrationError::Aborted(PeerText::new(text))),
            other => {
                return Err(MigrationError::Protocol(format!(
                    "{} where COMMIT was due",
                    other.kind()
                )))
            }
        }
        match builder.start_restored(&self.saved) {
            Ok(machine) => {
                // The guest runs here now, whether or not the source hears it.
                let said = self
                    .channel
                    .send(&Message::Started)
                    .and_then(|()| self.channel.flush());
                if let Err(e) = said {
                    log::warn!(
                        "migration: the guest runs here, but the source could not be told: {e}"
                    );
                }
                Ok(machine)
            }
            Err(e) => {
                self.abort(&e);
                Err(MigrationError::State(e))
            }
        }
    }

    fn abort(&mut self, e: &MachineSnapshotError) {
        let reason = format!("{e}{}", vmcraft_memory::report::ErrorChain(e));
        let _ = self.channel.send(&Message::Abort(reason.as_bytes()));
        let _ = self.channel.flush();
    }
}

impl MachineBuilder {
    /// Receive a migration on `stream` from a source known by `auth`: the handshake,
    /// memory, then the state. Returns the builder of the new machine (RAM filled,
    /// legacy devices with serial output to `serial_out`) once the state has come:
    /// add the same devices as the source's, then [`IncomingMigration::start`].
    pub fn accept_migration<S: Transport>(
        stream: S,
        auth: &MigrationAuth,
        options: &IncomingOptions,
        serial_out: Box<dyn std::io::Write + Send>,
    ) -> Result<(MachineBuilder, IncomingMigration<S>), MigrationError> {
        let limits = Limits {
            peer: options.peer_timeout,
            handshake: options.handshake_timeout,
            deadline: options.deadline,
        };
        let mut channel = Channel::respond(stream, auth, limits)?;
        match receive(&mut channel, options, serial_out) {
            Ok((builder, saved)) => Ok((builder, IncomingMigration { channel, saved })),
            Err(e) => {
                // Tell the source why (it resumes), unless it is the one that gave up.
                if !matches!(e, MigrationError::Aborted(_)) {
                    let reason = e.to_string();
                    let _ = channel.send(&Message::Abort(reason.as_bytes()));
                    let _ = channel.flush();
                }
                Err(e)
            }
        }
    }

    /// Wait on `listener` for a migration from a source known by `auth`, trying up
    /// to [`IncomingOptions::tries`] connections: one that fails (a stranger, a wrong
    /// secret, a source that gave up or went silent) is logged with its address and
    /// dropped, and the next one taken. `serial_out` makes the new machine's serial
    /// output (called once per try).
    pub fn listen_for_migration(
        listener: &TcpListener,
        auth: &MigrationAuth,
        options: &IncomingOptions,
        mut serial_out: impl FnMut() -> Box<dyn std::io::Write + Send>,
    ) -> Result<(MachineBuilder, IncomingMigration), MigrationError> {
        for attempt in 1..=options.tries {
            let (stream, peer) = listener.accept().map_err(connection("accepting"))?;
            let _ = stream.set_nodelay(true);
            match Self::accept_migration(stream, auth, options, serial_out()) {
                Ok(incoming) => return Ok(incoming),
                Err(e) => log::warn!(
                    "migration: connection {attempt} of {} from {peer} failed: {e}{}",
                    options.tries,
                    vmcraft_memory::report::ErrorChain(&e)
                ),
            }
        }
        Err(MigrationError::NoMigration(options.tries))
    }
}

/// The destination's side after the handshake: INFO, memory, the state.
fn receive<S: Transport>(
    channel: &mut Channel<S>,
    options: &IncomingOptions,
    serial_out: Box<dyn std::io::Write + Send>,
) -> Result<(MachineBuilder, SavedMachine), MigrationError> {
    let (ram_bytes, vcpus) = loop {
        match channel.recv()? {
            Message::KeepAlive => continue,
            Message::Info { ram_bytes, vcpus } => break (ram_bytes, vcpus),
            Message::Abort(text) => return Err(MigrationError::Aborted(PeerText::new(text))),
            other => {
                return Err(MigrationError::Protocol(format!(
                    "{} where INFO was due",
                    other.kind()
                )))
            }
        }
    };
    if ram_bytes != options.ram_bytes {
        return Err(MigrationError::RamMismatch {
            announced: ram_bytes,
            configured: options.ram_bytes,
        });
    }
    // The source's machine, if it was built from a configuration, checked against
    // this one's before any memory is allocated or comes.
    let mut first = channel.recv()?;
    let mut shared = options
        .config
        .as_ref()
        .is_some_and(|c| c.memory_is_shared());
    if let Message::Config(json) = first {
        let text = std::str::from_utf8(json)
            .map_err(|_| MigrationError::Protocol("a configuration that is not UTF-8".into()))?;
        let theirs = MachineConfig::from_json(text).map_err(MigrationError::Config)?;
        if let Some(ours) = &options.config {
            ours.check_same_machine(&theirs)
                .map_err(MigrationError::Config)?;
        }
        shared |= theirs.memory_is_shared();
        channel.send(&Message::Accepted)?;
        channel.flush()?;
        first = channel.recv()?;
    }
    let layout =
        MemoryLayout::x86_64(ram_bytes).map_err(|e| MigrationError::Ram(ram_bytes, e.into()))?;
    let ram = GuestRam::for_layout(&layout, shared)
        .map_err(|e| MigrationError::Ram(ram_bytes, e.into()))?;
    let mut receiver = Receiver::new(ram.memory().clone(), ram_bytes, vcpus);
    let mut message = first;
    let state = loop {
        if let Received::State(state) = receiver.take(message)? {
            break state;
        }
        message = channel.recv()?;
    };
    let saved = Snapshot::parse(state)
        .map_err(MachineSnapshotError::File)
        .and_then(SavedMachine::from_snapshot)
        .map_err(MigrationError::State)?;
    if saved.info().ram_bytes != ram_bytes || saved.info().vcpus != vcpus {
        return Err(MigrationError::Protocol(format!(
            "{ram_bytes} bytes of RAM and {vcpus} vCPUs announced, {} and {} in the state",
            saved.info().ram_bytes,
            saved.info().vcpus
        )));
    }
    let builder = MachineBuilder::with_ram(layout, ram, serial_out)
        .map_err(|e| MigrationError::State(MachineSnapshotError::Build(e)))?;
    Ok((builder, saved))
}

/// Write pages into `memory`: a page-aligned guest-physical address, then whole pages,
/// all inside RAM.
fn store_pages(memory: &GuestMemory, addr: u64, pages: &[u8]) -> Result<(), MigrationError> {
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
            ..MigrationOptions::default()
        };
        assert!(o.keep_copying(0, 101));
        assert!(!o.keep_copying(0, 100));
        assert!(o.keep_copying(3, 1_000_000));
        assert!(!o.keep_copying(4, 1_000_000), "the fifth round is the last");
    }

    fn small_ram() -> GuestRam {
        GuestRam::new(&MemoryLayout::x86_64(2 << 20).unwrap()).unwrap()
    }

    #[test]
    fn pages_outside_ram_or_misaligned_are_refused() {
        let ram = small_ram();
        let m = ram.memory();
        let page = |n: usize| vec![0xa5u8; n * PAGE_SIZE as usize];
        store_pages(m, 0x1000, &page(2)).unwrap();
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x2fff)).unwrap(), 0xa5);
        for (addr, bytes, what) in [
            (0x1001, page(1), "misaligned"),
            (2 << 20, page(1), "past the end"),
            ((2 << 20) - 4096, page(2), "straddling the end"),
            (0, page(0), "empty"),
            (0, vec![0; 4097], "not whole pages"),
        ] {
            assert!(
                matches!(
                    store_pages(m, addr, &bytes),
                    Err(MigrationError::Protocol(_))
                ),
                "{what}"
            );
        }
    }

    #[test]
    fn the_receiver_bounds_the_state_and_keeps_to_the_protocol() {
        let ram = small_ram();
        let mut r = Receiver::new(ram.memory().clone(), 2 << 20, 1);
        let page = vec![1u8; 4096];
        assert_eq!(
            r.take(Message::Pages {
                addr: 0,
                data: &page
            })
            .unwrap(),
            Received::More
        );
        // A state larger than a 2 MiB machine can hold is refused unallocated.
        let err = r.take(Message::State { len: 1 << 40 }).unwrap_err();
        assert!(matches!(err, MigrationError::StateTooLarge { .. }), "{err}");
        assert!(matches!(
            r.take(Message::StateData(b"x")),
            Err(MigrationError::Protocol(_))
        ));
        assert!(matches!(
            r.take(Message::Commit),
            Err(MigrationError::Protocol(_))
        ));
        r.take(Message::State { len: 5 }).unwrap();
        assert!(
            matches!(
                r.take(Message::Pages {
                    addr: 0,
                    data: &page
                }),
                Err(MigrationError::Protocol(_))
            ),
            "pages after the state began"
        );
        assert_eq!(r.take(Message::StateData(b"abc")).unwrap(), Received::More);
        assert!(
            r.take(Message::StateData(b"def")).is_err(),
            "past the length"
        );
        assert_eq!(
            r.take(Message::StateData(b"de")).unwrap(),
            Received::State(b"abcde".to_vec())
        );
        let err = r.take(Message::Abort(b"bye\x1b[2J")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the peer aborted the migration, saying: bye\\u{1b}[2J"
        );
    }
}
