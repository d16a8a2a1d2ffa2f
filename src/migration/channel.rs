//! The migration's channel: a Noise handshake (`snow`), then every message in one
//! authenticated, encrypted record.
//!
//! - **Shared secret**: `Noise_XXpsk3_25519_ChaChaPoly_SHA256`, with a fresh X25519
//!   key pair on each side and the secret as the pre-shared key, mixed in after the
//!   Diffie-Hellman exchanges: someone who only watches the connection learns nothing
//!   to test guesses of the secret against.
//! - **Keys**: `Noise_XX_25519_ChaChaPoly_SHA256`, each side with a static X25519 key
//!   pair of its own; each refuses a peer whose public key it was not given.
//!
//! The source is the initiator. After the three handshake messages the destination
//! sends [`Message::Hello`] in the first record, which proves to the source that it
//! derived the same keys. Each record is a big-endian `u16` length and a Noise
//! transport message (at most 65,535 bytes, a 16-byte Poly1305 tag included) whose
//! nonce is its position in the stream: a changed, reordered, replayed, dropped or
//! injected record fails to decrypt, and the migration ends with
//! [`MigrationError::Tampered`] naming the record.
//!
//! Every read has a deadline: each record must arrive whole within the peer timeout
//! (a peer trickling bytes gains nothing), the handshake as a whole within the
//! handshake timeout, and everything within the caller's overall deadline.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use snow::{HandshakeState, TransportState};

use super::wire::{Message, MAX_MESSAGE};
use super::MigrationError;

const PROLOGUE: &[u8] = b"vmcraft-migration/2";
const PATTERN_PSK: &str = "Noise_XXpsk3_25519_ChaChaPoly_SHA256";
const PATTERN_KEYS: &str = "Noise_XX_25519_ChaChaPoly_SHA256";
/// Bytes of a Poly1305 tag.
const TAG: usize = 16;
/// Bytes of a record on the wire at most (its length prefix aside).
const MAX_RECORD: usize = 65_535;
/// Bytes of a handshake record at most (X25519 keys, tags and short payloads).
const MAX_HANDSHAKE_RECORD: usize = 256;
/// Bytes gathered before they are written out.
const WRITE_BUFFER: usize = 1 << 20;
/// The shortest shared secret accepted.
pub const MIN_SECRET: usize = 32;

/// A byte stream a migration runs over, whose reads and writes can be given a time
/// limit: TCP in practice, a Unix socket in tests.
pub trait Transport: Read + Write + Send {
    /// Limit the next reads to `timeout` (`None`: none).
    fn set_read_limit(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Limit the next writes to `timeout` (`None`: none).
    fn set_write_limit(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Transport for std::net::TcpStream {
    fn set_read_limit(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
    fn set_write_limit(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(timeout)
    }
}

impl Transport for UnixStream {
    fn set_read_limit(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
    fn set_write_limit(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(timeout)
    }
}

/// A static X25519 key pair: this VMM's identity in [`MigrationAuth::Keys`].
#[derive(Clone)]
pub struct StaticKey {
    private: [u8; 32],
    public: PublicKey,
}

impl std::fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// An X25519 public key: a peer's identity.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

fn from_hex(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl PublicKey {
    /// A public key from its 64 hexadecimal digits (surrounding white space ignored).
    pub fn from_hex(text: &str) -> Result<Self, MigrationError> {
        from_hex(text).map(PublicKey).ok_or(MigrationError::BadKey(
            "a public key is 64 hexadecimal digits",
        ))
    }
}

impl StaticKey {
    /// A new key pair from the system's random source.
    pub fn generate() -> Result<Self, MigrationError> {
        let builder = builder(PATTERN_KEYS);
        let pair = builder
            .generate_keypair()
            .map_err(noise("generating a key"))?;
        let mut private = [0u8; 32];
        private.copy_from_slice(&pair.private);
        let mut public = [0u8; 32];
        public.copy_from_slice(&pair.public);
        Ok(StaticKey {
            private,
            public: PublicKey(public),
        })
    }

    /// This key's public half, to give to the peers.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The key as a file holds it: the private key's 64 hexadecimal digits on the
    /// first line, the public key's on the second.
    pub fn to_file_text(&self) -> String {
        let mut private = String::new();
        for b in self.private {
            private += &format!("{b:02x}");
        }
        format!("{private}\n{}\n", self.public)
    }

    /// A key from [`StaticKey::to_file_text`]'s form.
    pub fn from_file_text(text: &str) -> Result<Self, MigrationError> {
        let mut lines = text.lines();
        let bad = || MigrationError::BadKey("a key file holds two lines of 64 hexadecimal digits");
        let private = lines.next().and_then(from_hex).ok_or_else(bad)?;
        let public = lines.next().and_then(from_hex).ok_or_else(bad)?;
        Ok(StaticKey {
            private,
            public: PublicKey(public),
        })
    }
}

/// How the two VMMs of a migration know each other.
#[derive(Clone)]
pub enum MigrationAuth {
    /// A secret both were given, at least [`MIN_SECRET`] bytes from a random source
    /// (`head -c 32 /dev/urandom > secret`): simple set-ups.
    SharedSecret(Vec<u8>),
    /// Each VMM's own key pair, and the public keys of the peers it accepts.
    Keys {
        /// This VMM's key pair.
        local: StaticKey,
        /// The peers' public keys.
        peers: Vec<PublicKey>,
    },
}

impl std::fmt::Debug for MigrationAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationAuth::SharedSecret(s) => write!(f, "SharedSecret({} bytes)", s.len()),
            MigrationAuth::Keys { local, peers } => f
                .debug_struct("Keys")
                .field("local", local)
                .field("peers", peers)
                .finish(),
        }
    }
}

impl MigrationAuth {
    /// A shared secret, refused when shorter than [`MIN_SECRET`] bytes.
    pub fn shared_secret(secret: impl Into<Vec<u8>>) -> Result<Self, MigrationError> {
        let secret = secret.into();
        if secret.len() < MIN_SECRET {
            return Err(MigrationError::WeakSecret(secret.len()));
        }
        Ok(MigrationAuth::SharedSecret(secret))
    }

    fn check(&self) -> Result<(), MigrationError> {
        match self {
            MigrationAuth::SharedSecret(s) if s.len() < MIN_SECRET => {
                Err(MigrationError::WeakSecret(s.len()))
            }
            MigrationAuth::Keys { peers, .. } if peers.is_empty() => {
                Err(MigrationError::BadKey("no peer public key was given"))
            }
            _ => Ok(()),
        }
    }

    fn handshake(&self, initiator: bool) -> Result<HandshakeState, MigrationError> {
        self.check()?;
        let setup = noise("setting up the handshake");
        let state = match self {
            MigrationAuth::SharedSecret(secret) => {
                use sha2::Digest;
                let psk: [u8; 32] = sha2::Sha256::new()
                    .chain_update(b"vmcraft-migration psk ")
                    .chain_update(secret)
                    .finalize()
                    .into();
                // A fresh static key per session: the secret is what authenticates.
                let pair = builder(PATTERN_PSK)
                    .generate_keypair()
                    .map_err(noise("generating a key"))?;
                let psk_builder = builder(PATTERN_PSK)
                    .prologue(PROLOGUE)
                    .map_err(setup)?
                    .local_private_key(&pair.private)
                    .map_err(noise("setting the key"))?
                    .psk(3, &psk)
                    .map_err(noise("setting the secret"))?;
                if initiator {
                    psk_builder.build_initiator()
                } else {
                    psk_builder.build_responder()
                }
            }
            MigrationAuth::Keys { local, .. } => {
                let keys_builder = builder(PATTERN_KEYS)
                    .prologue(PROLOGUE)
                    .map_err(setup)?
                    .local_private_key(&local.private)
                    .map_err(noise("setting the key"))?;
                if initiator {
                    keys_builder.build_initiator()
                } else {
                    keys_builder.build_responder()
                }
            }
        };
        state.map_err(noise("starting the handshake"))
    }

    /// Whether `remote` (the peer's static key, from the handshake) is one accepted.
    fn accepts(&self, remote: &[u8]) -> bool {
        match self {
            MigrationAuth::SharedSecret(_) => true,
            MigrationAuth::Keys { peers, .. } => peers.iter().any(|p| p.0.as_slice() == remote),
        }
    }
}

/// The kernel's random source through the getrandom system call. The `getrandom`
/// crate, in a statically linked build, falls back to opening `/dev/urandom`, which a
/// jailed VMM does not have.
struct SyscallRng;

impl snow::types::Random for SyscallRng {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        let mut filled = 0;
        while filled < dest.len() {
            let rest = &mut dest[filled..];
            // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
            let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if got < 0 {
                if std::io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(snow::Error::Rng);
            }
            filled += got as usize;
        }
        Ok(())
    }
}

/// [`SyscallRng`] for randomness, `snow`'s own implementations for the rest.
struct Resolver;

impl snow::resolvers::CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
        Some(Box::new(SyscallRng))
    }
    fn resolve_dh(&self, _: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
        None
    }
    fn resolve_hash(&self, _: &snow::params::HashChoice) -> Option<Box<dyn snow::types::Hash>> {
        None
    }
    fn resolve_cipher(
        &self,
        _: &snow::params::CipherChoice,
    ) -> Option<Box<dyn snow::types::Cipher>> {
        None
    }
}

fn builder<'a>(pattern: &str) -> snow::Builder<'a> {
    snow::Builder::with_resolver(
        params(pattern),
        Box::new(snow::resolvers::FallbackResolver::new(
            Box::new(Resolver),
            Box::new(snow::resolvers::DefaultResolver),
        )),
    )
}

fn params(pattern: &str) -> snow::params::NoiseParams {
    // The two patterns are constants this module names; both parse.
    pattern
        .parse()
        .unwrap_or_else(|_| unreachable!("{pattern}"))
}

fn noise(what: &'static str) -> impl FnOnce(snow::Error) -> MigrationError {
    move |e| MigrationError::Noise {
        what,
        error: e.to_string(),
    }
}

/// Time limits of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long one record may take to arrive whole, or to be written.
    pub peer: Duration,
    /// How long the whole handshake may take.
    pub handshake: Duration,
    /// Nothing goes on past this instant.
    pub deadline: Option<Instant>,
}

/// An authenticated, encrypted channel over `S`.
pub struct Channel<S: Transport> {
    stream: S,
    noise: TransportState,
    /// Records read from the stream, not yet decrypted: `rbuf[rpos..rend]`.
    rbuf: Box<[u8]>,
    rpos: usize,
    rend: usize,
    /// The last record's plaintext.
    plain: Box<[u8]>,
    /// Encrypted records not yet written.
    wbuf: Vec<u8>,
    /// The message being encoded.
    scratch: Vec<u8>,
    limits: Limits,
    records_in: u64,
    /// Bytes written to the stream.
    pub(super) sent: u64,
    /// Bytes per second, since when, and `sent` then.
    throttle: Option<(u64, Instant, u64)>,
}

impl<S: Transport> std::fmt::Debug for Channel<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("records_in", &self.records_in)
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

/// Reads and writes with deadlines.
struct Io<'a, S: Transport> {
    stream: &'a mut S,
}

impl<S: Transport> Io<'_, S> {
    fn left(until: Instant, what: &'static str) -> Result<Duration, MigrationError> {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MigrationError::TimedOut(what));
        }
        Ok(left)
    }

    /// Fill `buf` whole by `until`: each read is limited to the time left, so
    /// bytes that trickle in do not stretch it.
    fn read_exact(
        &mut self,
        buf: &mut [u8],
        until: Instant,
        what: &'static str,
    ) -> Result<(), MigrationError> {
        let n = buf.len();
        self.read_some(buf, n, until, what).map(|_| ())
    }

    /// Read at least `min` and at most `buf.len()` bytes by `until`; returns how
    /// many.
    fn read_some(
        &mut self,
        buf: &mut [u8],
        min: usize,
        until: Instant,
        what: &'static str,
    ) -> Result<usize, MigrationError> {
        let mut got = 0;
        while got < min {
            let left = Self::left(until, what)?;
            self.stream
                .set_read_limit(Some(left))
                .map_err(super::connection("setting a time limit"))?;
            match self.stream.read(&mut buf[got..]) {
                Ok(0) => return Err(MigrationError::Closed(what)),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(MigrationError::TimedOut(what))
                }
                Err(e) => return Err(super::connection(what)(e)),
            }
        }
        Ok(got)
    }

    fn write_all(
        &mut self,
        bytes: &[u8],
        until: Instant,
        what: &'static str,
    ) -> Result<(), MigrationError> {
        let left = Self::left(until, what)?;
        self.stream
            .set_write_limit(Some(left))
            .map_err(super::connection("setting a time limit"))?;
        self.stream.write_all(bytes).map_err(|e| {
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                MigrationError::TimedOut(what)
            } else {
                super::connection(what)(e)
            }
        })?;
        self.stream.flush().map_err(super::connection(what))
    }
}

fn earliest(a: Instant, b: Option<Instant>) -> Instant {
    b.map_or(a, |b| a.min(b))
}

fn handshake_record<S: Transport>(
    io: &mut Io<'_, S>,
    until: Instant,
) -> Result<Vec<u8>, MigrationError> {
    let mut len = [0u8; 2];
    io.read_exact(&mut len, until, "the handshake")?;
    let len = u16::from_be_bytes(len) as usize;
    if len > MAX_HANDSHAKE_RECORD {
        return Err(MigrationError::Protocol(format!(
            "a handshake message of {len} bytes (at most {MAX_HANDSHAKE_RECORD})"
        )));
    }
    let mut msg = vec![0u8; len];
    io.read_exact(&mut msg, until, "the handshake")?;
    Ok(msg)
}

fn send_handshake<S: Transport>(
    io: &mut Io<'_, S>,
    hs: &mut HandshakeState,
    until: Instant,
) -> Result<(), MigrationError> {
    let mut buf = [0u8; MAX_HANDSHAKE_RECORD + 2];
    let n = hs
        .write_message(&[], &mut buf[2..])
        .map_err(noise("writing a handshake message"))?;
    buf[..2].copy_from_slice(&(n as u16).to_be_bytes());
    io.write_all(&buf[..2 + n], until, "the handshake")
}

fn read_handshake<S: Transport>(
    io: &mut Io<'_, S>,
    hs: &mut HandshakeState,
    until: Instant,
) -> Result<(), MigrationError> {
    let msg = handshake_record(io, until)?;
    let mut payload = [0u8; MAX_HANDSHAKE_RECORD];
    hs.read_message(&msg, &mut payload)
        .map(|_| ())
        .map_err(|_| MigrationError::NotAuthenticated)
}

impl<S: Transport> Channel<S> {
    fn new(stream: S, noise: TransportState, limits: Limits) -> Self {
        Channel {
            stream,
            noise,
            rbuf: vec![0u8; 4 * (MAX_RECORD + 2)].into_boxed_slice(),
            rpos: 0,
            rend: 0,
            plain: vec![0u8; MAX_RECORD].into_boxed_slice(),
            wbuf: Vec::with_capacity(WRITE_BUFFER + MAX_RECORD + 2),
            scratch: Vec::with_capacity(MAX_RECORD),
            limits,
            records_in: 0,
            sent: 0,
            throttle: None,
        }
    }

    /// Run the three messages of the XX handshake on `stream` as the initiator (the
    /// source) or the responder, refusing a peer whose static key `auth` does not
    /// accept as soon as its key is known. Returns the channel, and when the
    /// handshake's time runs out.
    fn handshake(
        mut stream: S,
        auth: &MigrationAuth,
        limits: Limits,
        initiator: bool,
    ) -> Result<(Self, Instant), MigrationError> {
        let until = earliest(Instant::now() + limits.handshake, limits.deadline);
        let mut hs = auth.handshake(initiator)?;
        let mut io = Io {
            stream: &mut stream,
        };
        while !hs.is_handshake_finished() {
            if hs.is_my_turn() {
                send_handshake(&mut io, &mut hs, until)?;
            } else {
                read_handshake(&mut io, &mut hs, until)?;
                if let Some(remote) = hs.get_remote_static() {
                    if !auth.accepts(remote) {
                        return Err(MigrationError::UnknownPeer(key_text(remote)));
                    }
                }
            }
        }
        let noise = hs
            .into_transport_mode()
            .map_err(noise("finishing the handshake"))?;
        Ok((Channel::new(stream, noise, limits), until))
    }

    /// The source's side: run the handshake on `stream` and wait for the
    /// destination's [`Message::Hello`].
    pub fn initiate(
        stream: S,
        auth: &MigrationAuth,
        limits: Limits,
    ) -> Result<Self, MigrationError> {
        let (mut channel, until) = Self::handshake(stream, auth, limits, true)?;
        // The destination's first record proves it holds the same keys.
        match channel.recv_until(until) {
            Ok(Message::Hello {
                version: super::wire::PROTOCOL_VERSION,
            }) => Ok(channel),
            Ok(Message::Hello { version }) => Err(MigrationError::Protocol(format!(
                "the destination speaks protocol version {version}, this VMM {}",
                super::wire::PROTOCOL_VERSION
            ))),
            Ok(Message::Abort(text)) => {
                Err(MigrationError::Aborted(super::wire::PeerText::new(text)))
            }
            Ok(other) => Err(MigrationError::Protocol(format!(
                "{} where HELLO was due",
                other.kind()
            ))),
            Err(MigrationError::Tampered { .. }) => Err(MigrationError::NotAuthenticated),
            Err(e) => Err(e),
        }
    }

    /// The destination's side: run the handshake on `stream` and send
    /// [`Message::Hello`].
    pub fn respond(
        stream: S,
        auth: &MigrationAuth,
        limits: Limits,
    ) -> Result<Self, MigrationError> {
        let (mut channel, _) = Self::handshake(stream, auth, limits, false)?;
        channel.send(&Message::Hello {
            version: super::wire::PROTOCOL_VERSION,
        })?;
        channel.flush()?;
        Ok(channel)
    }

    /// Change the overall deadline.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.limits.deadline = deadline;
    }

    /// Change how long one record may take.
    pub fn set_peer_timeout(&mut self, peer: Duration) {
        self.limits.peer = peer;
    }

    fn record_deadline(&self) -> Instant {
        earliest(Instant::now() + self.limits.peer, self.limits.deadline)
    }

    /// Queue `message` as one record (written when enough has gathered, or on
    /// [`Channel::flush`]).
    pub fn send(&mut self, message: &Message<'_>) -> Result<(), MigrationError> {
        self.scratch.clear();
        message.encode(&mut self.scratch);
        debug_assert!(self.scratch.len() <= MAX_MESSAGE);
        let at = self.wbuf.len();
        self.wbuf.resize(at + 2 + self.scratch.len() + TAG, 0);
        let n = self
            .noise
            .write_message(&self.scratch, &mut self.wbuf[at + 2..])
            .map_err(noise("encrypting a record"))?;
        self.wbuf[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
        self.wbuf.truncate(at + 2 + n);
        if self.wbuf.len() >= WRITE_BUFFER {
            self.flush()?;
        }
        Ok(())
    }

    /// Write out every queued record, then wait as the throttle asks.
    pub fn flush(&mut self) -> Result<(), MigrationError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let until = self.record_deadline();
        Io {
            stream: &mut self.stream,
        }
        .write_all(&self.wbuf, until, "sending")?;
        self.sent += self.wbuf.len() as u64;
        self.wbuf.clear();
        if let Some((rate, since, base)) = self.throttle {
            let due = Duration::from_secs_f64((self.sent - base) as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(since.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }

    /// Send at most `rate` bytes per second from now on (`None`: no limit).
    pub fn throttle(&mut self, rate: Option<u64>) {
        self.throttle = rate
            .filter(|r| *r > 0)
            .map(|r| (r, Instant::now(), self.sent));
    }

    /// The next message, which must arrive whole within the peer timeout.
    pub fn recv(&mut self) -> Result<Message<'_>, MigrationError> {
        let until = self.record_deadline();
        self.recv_until(until)
    }

    /// The next message, which must arrive whole by `until`.
    pub fn recv_until(&mut self, until: Instant) -> Result<Message<'_>, MigrationError> {
        let until = earliest(until, self.limits.deadline);
        let len = {
            self.fill(2, until)?;
            let len = u16::from_be_bytes([self.rbuf[self.rpos], self.rbuf[self.rpos + 1]]) as usize;
            if len <= TAG {
                return Err(MigrationError::Protocol(format!(
                    "record {} of {len} bytes, shorter than its tag",
                    self.records_in
                )));
            }
            len
        };
        self.fill(2 + len, until)?;
        let record = &self.rbuf[self.rpos + 2..self.rpos + 2 + len];
        let n = self
            .noise
            .read_message(record, &mut self.plain)
            .map_err(|_| MigrationError::Tampered {
                record: self.records_in,
            })?;
        self.rpos += 2 + len;
        self.records_in += 1;
        Message::decode(&self.plain[..n]).map_err(MigrationError::Wire)
    }

    /// Have at least `n` unread bytes in the read buffer.
    fn fill(&mut self, n: usize, until: Instant) -> Result<(), MigrationError> {
        if self.rend - self.rpos >= n {
            return Ok(());
        }
        if self.rpos + n > self.rbuf.len() {
            self.rbuf.copy_within(self.rpos..self.rend, 0);
            self.rend -= self.rpos;
            self.rpos = 0;
        }
        let need = n - (self.rend - self.rpos);
        let got = Io {
            stream: &mut self.stream,
        }
        .read_some(&mut self.rbuf[self.rend..], need, until, "receiving")?;
        self.rend += got;
        Ok(())
    }
}

fn key_text(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            peer: Duration::from_secs(5),
            handshake: Duration::from_secs(5),
            deadline: None,
        }
    }

    fn pair(
        a: MigrationAuth,
        b: MigrationAuth,
    ) -> (
        Result<Channel<UnixStream>, MigrationError>,
        Result<Channel<UnixStream>, MigrationError>,
    ) {
        let (x, y) = UnixStream::pair().unwrap();
        let dst = std::thread::spawn(move || Channel::respond(y, &b, limits()));
        let src = Channel::initiate(x, &a, limits());
        (src, dst.join().unwrap())
    }

    fn secret(s: &[u8]) -> MigrationAuth {
        MigrationAuth::shared_secret(s.repeat(32 / s.len() + 1)).unwrap()
    }

    #[test]
    fn one_secret_makes_a_channel_that_carries_messages_both_ways() {
        let (src, dst) = pair(secret(b"k"), secret(b"k"));
        let (mut src, mut dst) = (src.unwrap(), dst.unwrap());
        let page = vec![0x5au8; 4096 * 15];
        src.send(&Message::Pages {
            addr: 0x2000,
            data: &page,
        })
        .unwrap();
        src.send(&Message::Commit).unwrap();
        src.flush().unwrap();
        assert_eq!(
            dst.recv().unwrap(),
            Message::Pages {
                addr: 0x2000,
                data: &page
            }
        );
        assert_eq!(dst.recv().unwrap(), Message::Commit);
        dst.send(&Message::Started).unwrap();
        dst.flush().unwrap();
        assert_eq!(src.recv().unwrap(), Message::Started);
    }

    #[test]
    fn another_secret_is_refused_on_both_sides() {
        let (src, dst) = pair(secret(b"k"), secret(b"j"));
        assert!(src.is_err());
        assert!(
            matches!(dst, Err(MigrationError::NotAuthenticated)),
            "{dst:?}"
        );
    }

    #[test]
    fn a_short_secret_is_refused_before_anything_is_sent() {
        assert!(matches!(
            MigrationAuth::shared_secret(b"short".to_vec()),
            Err(MigrationError::WeakSecret(5))
        ));
    }

    #[test]
    fn keys_admit_only_the_peers_named() {
        let (a, b, c) = (
            StaticKey::generate().unwrap(),
            StaticKey::generate().unwrap(),
            StaticKey::generate().unwrap(),
        );
        let auth = |local: &StaticKey, peer: &StaticKey| MigrationAuth::Keys {
            local: local.clone(),
            peers: vec![peer.public()],
        };
        let (src, dst) = pair(auth(&a, &b), auth(&b, &a));
        assert!(src.is_ok() && dst.is_ok());
        // c poses as the destination: the source refuses it.
        let (src, _) = pair(auth(&a, &b), auth(&c, &a));
        assert!(
            matches!(src, Err(MigrationError::UnknownPeer(_))),
            "{src:?}"
        );
        // c poses as the source: the destination refuses it.
        let (_, dst) = pair(auth(&c, &b), auth(&b, &a));
        assert!(
            matches!(dst, Err(MigrationError::UnknownPeer(_))),
            "{dst:?}"
        );
        let text = a.to_file_text();
        let back = StaticKey::from_file_text(&text).unwrap();
        assert_eq!(back.public(), a.public());
        assert_eq!(
            PublicKey::from_hex(&a.public().to_string()).unwrap(),
            a.public()
        );
        assert!(StaticKey::from_file_text("12\n34\n").is_err());
    }

    #[test]
    fn a_trickling_peer_does_not_stretch_the_handshake() {
        let (x, mut y) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            // A 64-byte handshake message announced, then one byte of it every
            // 100 ms (until the other side goes).
            let _ = y.write_all(&[0, 64]);
            for _ in 0..100 {
                if y.write_all(&[0]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let start = Instant::now();
        let l = Limits {
            peer: Duration::from_secs(30),
            handshake: Duration::from_millis(500),
            deadline: None,
        };
        let err = Channel::respond(x, &secret(b"k"), l).unwrap_err();
        assert!(matches!(err, MigrationError::TimedOut(_)), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
        drop(t);
    }

    #[test]
    fn a_handshake_message_past_its_bound_is_refused_unread() {
        let (x, mut y) = UnixStream::pair().unwrap();
        y.write_all(&[0xff, 0xff]).unwrap();
        let err = Channel::respond(x, &secret(b"k"), limits()).unwrap_err();
        assert!(matches!(err, MigrationError::Protocol(_)), "{err}");
    }
}
