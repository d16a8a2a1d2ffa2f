//! The connections of one vsock device and their host streams: what the guest's
//! packets do to them, what the guest is owed, and the bounds that keep a guest (or a
//! host client) from growing the VMM.
//!
//! No queues and no event loop here: the device hands in each checked packet from
//! the tx queue ([`Muxer::from_guest`]), asks for the next packet for the rx queue
//! ([`Muxer::to_guest`]), and says which host stream became readable or writable;
//! the muxer reads and writes the (non-blocking) streams itself. Bounds:
//! [`Limits::max_connections`] streams at once (a REQUEST past it is reset), at most
//! [`Limits::buf_alloc`] bytes of the guest's buffered per connection (the credit the
//! host advertises, which a guest that overruns it loses the connection for), and at
//! most [`Limits::max_clients`] host clients that have not finished their `CONNECT`
//! line. Control packets owed to the guest are bounded by the connections (one
//! RESPONSE, REQUEST, CREDIT_UPDATE, SHUTDOWN or RST each at a time) plus the resets
//! of packets that name no connection, which are dropped past
//! [`MAX_RESETS_WAITING`] (a guest that sends them faster than it takes its rx
//! buffers loses replies; the VMM no memory).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use super::conn::{Connection, Received, State};
use super::hybrid::{ok_line, Command, CommandReader};
use super::wire::{op, PacketHeader, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// The bounds of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections at once.
    pub max_connections: usize,
    /// The host's receive buffer per connection, advertised to the guest: the most
    /// of the guest's bytes the VMM holds for one connection.
    pub buf_alloc: u32,
    /// Host clients still sending their command line.
    pub max_clients: usize,
}

impl Default for Limits {
    /// 256 connections of 256 KiB: at most 64 MiB of the guest's bytes held.
    fn default() -> Self {
        Limits {
            max_connections: 256,
            buf_alloc: 256 << 10,
            max_clients: 64,
        }
    }
}

/// A host stream of a connection: a Unix socket, non-blocking.
pub trait HostStream: Read + Write + AsRawFd + Send {
    /// No more bytes will be written to it (the guest shut down its sending side).
    fn shutdown_write(&self) -> io::Result<()>;
}

impl HostStream for UnixStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// How the host side is reached when the guest connects.
pub trait HostConnector {
    /// The streams it gives.
    type Stream: HostStream;
    /// A stream to whoever listens for the guest's connections to host port
    /// `port` (non-blocking), or why there is none.
    fn connect(&mut self, port: u32) -> io::Result<Self::Stream>;
}

/// A connection and its host stream.
#[derive(Debug)]
struct Entry<S> {
    conn: Connection,
    stream: S,
    /// The host side has closed its sending side (read gave 0): SHUTDOWN sent.
    host_eof: bool,
    /// A control packet for this connection is queued (one at a time).
    owed: Option<u16>,
    /// The connection is in the readable queue (at most once).
    queued: bool,
}

/// What the muxer tells the device about host streams, so that its event loop
/// watches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// Start watching this descriptor.
    Add(RawFd),
    /// Stop (the stream is closed after this).
    Remove(RawFd),
}

/// The connections of one device. See the [module documentation](self).
#[derive(Debug)]
pub struct Muxer<S> {
    guest_cid: u64,
    limits: Limits,
    conns: HashMap<(u32, u32), Entry<S>>,
    /// Which connection a host stream belongs to.
    by_fd: HashMap<RawFd, (u32, u32)>,
    /// Connections owed a control packet, in order.
    owed: VecDeque<(u32, u32)>,
    /// Resets for packets that name no connection: (host port, guest port).
    resets: VecDeque<(u32, u32)>,
    /// Connections whose host stream may have bytes for the guest.
    readable: VecDeque<(u32, u32)>,
    /// Host clients writing their command line.
    clients: HashMap<RawFd, (S, CommandReader)>,
    next_port: u32,
    watch: Vec<Watch>,
}

/// Resets for packets that name no connection, waiting for the guest's rx buffers:
/// past this many, more are dropped.
pub const MAX_RESETS_WAITING: usize = 256;

/// The first host port given to host-initiated connections (as Firecracker: high,
/// out of the way of services).
pub const FIRST_HOST_PORT: u32 = 1 << 30;

impl<S: HostStream> Muxer<S> {
    /// The connections of the guest with context id `guest_cid`.
    pub fn new(guest_cid: u64, limits: Limits) -> Self {
        Muxer {
            guest_cid,
            limits,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            owed: VecDeque::new(),
            resets: VecDeque::new(),
            readable: VecDeque::new(),
            clients: HashMap::new(),
            next_port: FIRST_HOST_PORT,
            watch: Vec::new(),
        }
    }

    /// Connections open.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The guest's bytes held for the host side, over every connection.
    pub fn buffered(&self) -> usize {
        self.conns.values().map(|e| e.conn.pending()).sum()
    }

    /// Descriptors to start or stop watching since the last call.
    pub fn take_watch(&mut self) -> Vec<Watch> {
        std::mem::take(&mut self.watch)
    }

    /// Whether a packet for the guest may be waiting (control packets, or host
    /// streams that were readable).
    pub fn has_work(&self) -> bool {
        !self.owed.is_empty() || !self.resets.is_empty() || !self.readable.is_empty()
    }

    fn insert(&mut self, conn: Connection, stream: S) {
        let key = (conn.host_port(), conn.guest_port());
        let fd = stream.as_raw_fd();
        self.by_fd.insert(fd, key);
        self.watch.push(Watch::Add(fd));
        self.conns.insert(
            key,
            Entry {
                conn,
                stream,
                host_eof: false,
                owed: None,
                queued: false,
            },
        );
    }

    fn remove(&mut self, key: (u32, u32)) -> Option<Entry<S>> {
        let e = self.conns.remove(&key)?;
        let fd = e.stream.as_raw_fd();
        self.by_fd.remove(&fd);
        self.watch.push(Watch::Remove(fd));
        Some(e)
    }

    fn owe(&mut self, key: (u32, u32), operation: u16) {
        if let Some(e) = self.conns.get_mut(&key) {
            // A reset or a shutdown replaces a credit update still waiting.
            let replace = e.owed.is_none_or(|o| o == op::CREDIT_UPDATE);
            if replace {
                if e.owed.is_none() {
                    self.owed.push_back(key);
                }
                e.owed = Some(operation);
            }
        }
    }

    /// Queue `key` for [`to_guest`](Self::to_guest) to read its host stream, once.
    fn mark_readable(&mut self, key: (u32, u32)) {
        if let Some(e) = self.conns.get_mut(&key) {
            if !std::mem::replace(&mut e.queued, true) {
                self.readable.push_back(key);
            }
        }
    }

    /// Refuse a packet from the guest that names (host port, guest port) `key`: its
    /// connection, if any, is dropped and the guest gets a reset.
    pub fn refuse(&mut self, key: (u32, u32)) {
        self.reset(key);
    }

    fn reset(&mut self, key: (u32, u32)) {
        if self.remove(key).is_some() || self.resets.len() < MAX_RESETS_WAITING {
            self.resets.push_back(key);
        }
    }

    /// A packet from the guest's tx queue, its header checked
    /// ([`PacketHeader::check_from_guest`]) and `payload` its `len` bytes.
    pub fn from_guest(
        &mut self,
        h: &PacketHeader,
        payload: &[u8],
        host: &mut impl HostConnector<Stream = S>,
    ) {
        let key = (h.dst_port, h.src_port);
        let operation = h.op;
        let Some(entry) = self.conns.get_mut(&key) else {
            match operation {
                op::REQUEST => self.guest_connects(key, h, payload, host),
                op::RST => {}
                _ => self.reset(key),
            }
            return;
        };
        match entry.conn.receive(h, payload) {
            Err(e) => {
                log::warn!(
                    "vsock: guest port {} to host port {}: {e}: reset",
                    key.1,
                    key.0
                );
                self.reset(key);
            }
            Ok(Received::Reset) => {
                self.remove(key);
            }
            Ok(Received::Accepted) => {
                let line = ok_line(key.0);
                // The client waits for this line before it writes: the socket has
                // room for 20 bytes, or the client is gone.
                if entry.stream.write_all(line.as_bytes()).is_err() {
                    self.reset(key);
                } else {
                    self.mark_readable(key);
                }
            }
            Ok(Received::Data) => {
                self.flush(key);
                // Its header carried the guest's credit: a guest that sends as much
                // as it reads (Linux) tells its credit this way, not with updates.
                self.mark_readable(key);
            }
            Ok(Received::Shutdown(flags)) => {
                if flags == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    // Both ways: the guest waits for our reset to finish.
                    self.flush(key);
                    self.reset(key);
                } else if flags & SHUTDOWN_SEND != 0 {
                    self.flush(key);
                    self.finish_if_done(key);
                }
            }
            Ok(Received::CreditRequested) => self.owe(key, op::CREDIT_UPDATE),
            Ok(Received::Nothing) => {
                // More credit may let a stream's bytes go.
                self.mark_readable(key);
            }
        }
    }

    /// The guest's REQUEST to host port `key.0` from its port `key.1`.
    fn guest_connects(
        &mut self,
        key: (u32, u32),
        h: &PacketHeader,
        payload: &[u8],
        host: &mut impl HostConnector<Stream = S>,
    ) {
        if self.conns.len() >= self.limits.max_connections {
            log::warn!(
                "vsock: the guest has {} connections, the most it may: port {} refused",
                self.conns.len(),
                key.0
            );
            return self.reset(key);
        }
        match host.connect(key.0) {
            Ok(stream) => {
                let mut conn = Connection::accepted(key.1, key.0, self.limits.buf_alloc);
                // The REQUEST carries the guest's credit.
                let _ = conn.receive(
                    &PacketHeader {
                        op: op::CREDIT_UPDATE,
                        ..*h
                    },
                    payload,
                );
                self.insert(conn, stream);
                self.owe(key, op::RESPONSE);
            }
            Err(e) => {
                log::debug!("vsock: nobody listens for host port {}: {e}", key.0);
                self.reset(key);
            }
        }
    }

    /// Write what the guest sent on `key` to its host stream, as far as it takes;
    /// tell the guest of the room made when it should hear; shut the stream's
    /// writing side once the guest has sent its last byte.
    fn flush(&mut self, key: (u32, u32)) {
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        loop {
            let (a, _) = e.conn.pending_slices();
            if a.is_empty() {
                break;
            }
            match e.stream.write(a) {
                Ok(0) => break,
                Ok(n) => e.conn.forwarded(n),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) => {
                    log::debug!("vsock: host port {}: {err}: reset", key.0);
                    return self.reset(key);
                }
            }
        }
        let (drained, shut) = (e.conn.pending() == 0, e.conn.guest_shutdown());
        if drained && shut & SHUTDOWN_SEND != 0 {
            let _ = e.stream.shutdown_write();
        }
        if e.conn.owes_credit_update() {
            self.owe(key, op::CREDIT_UPDATE);
        }
    }

    /// A connection both sides have finished sending on (the host's stream ended,
    /// the guest shut down its sending side and all it sent was written) is over:
    /// the guest gets RST, as a TCP close ends with both FINs. Returns whether it
    /// was.
    fn finish_if_done(&mut self, key: (u32, u32)) -> bool {
        let done = self.conns.get(&key).is_some_and(|e| {
            e.host_eof && e.conn.guest_shutdown() & SHUTDOWN_SEND != 0 && e.conn.pending() == 0
        });
        if done {
            self.reset(key);
        }
        done
    }

    /// The host stream `fd` can be written: what waits for it goes.
    pub fn host_writable(&mut self, fd: RawFd) {
        if let Some(&key) = self.by_fd.get(&fd) {
            self.flush(key);
        }
    }

    /// The host stream `fd` has bytes (or its end): they go to the guest as its
    /// credit and rx buffers allow.
    pub fn host_readable(&mut self, fd: RawFd) {
        if let Some(&key) = self.by_fd.get(&fd) {
            self.mark_readable(key);
        } else if self.clients.contains_key(&fd) {
            self.client_readable(fd);
        }
    }

    /// A new host client on the device's socket (non-blocking): it must send its
    /// command line; past [`Limits::max_clients`] waiting, it is closed.
    pub fn new_client(&mut self, stream: S) {
        if self.clients.len() >= self.limits.max_clients {
            log::warn!(
                "vsock: {} host clients have not sent their command yet: one more refused",
                self.clients.len()
            );
            return;
        }
        let fd = stream.as_raw_fd();
        self.watch.push(Watch::Add(fd));
        self.clients.insert(fd, (stream, CommandReader::default()));
        self.client_readable(fd);
    }

    fn client_readable(&mut self, fd: RawFd) {
        let Some((stream, reader)) = self.clients.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; 64];
        let outcome = loop {
            match stream.read(&mut buf) {
                Ok(0) => break Err("closed before its command".to_string()),
                Ok(n) => match reader.feed(&buf[..n]) {
                    Ok(None) => continue,
                    Ok(Some(command)) => break Ok(command),
                    Err(e) => break Err(e.to_string()),
                },
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => break Err(e.to_string()),
            }
        };
        let (stream, _) = self.clients.remove(&fd).expect("looked up");
        self.watch.push(Watch::Remove(fd));
        match outcome {
            Ok(Command::Connect(port)) => self.host_connects(stream, port),
            Err(e) => log::debug!("vsock: a host client refused: {e}"),
        }
    }

    /// A host client asked for the guest's port `guest_port`.
    fn host_connects(&mut self, stream: S, guest_port: u32) {
        if self.conns.len() >= self.limits.max_connections {
            log::warn!(
                "vsock: {} connections open: a host client refused",
                self.conns.len()
            );
            return;
        }
        // A free host port (the guest's port may repeat across clients).
        let mut port = self.next_port;
        while self.conns.contains_key(&(port, guest_port)) {
            port = port.wrapping_add(1).max(FIRST_HOST_PORT);
        }
        self.next_port = port.wrapping_add(1).max(FIRST_HOST_PORT);
        let conn = Connection::requested(guest_port, port, self.limits.buf_alloc);
        self.insert(conn, stream);
        self.owe((port, guest_port), op::REQUEST);
    }

    /// The next packet for the guest's rx queue: its header, and its payload written
    /// into `buf` (whose length is the room the guest's buffer has after the header);
    /// returns the payload's length. `None`: nothing to send now.
    pub fn to_guest(&mut self, buf: &mut [u8]) -> Option<(PacketHeader, usize)> {
        if let Some(key) = self.resets.pop_front() {
            let h = PacketHeader::to_guest(self.guest_cid, key.0, key.1, op::RST);
            return Some((h, 0));
        }
        while let Some(key) = self.owed.pop_front() {
            let cid = self.guest_cid;
            let Some(e) = self.conns.get_mut(&key) else {
                continue;
            };
            let Some(operation) = e.owed.take() else {
                continue;
            };
            let mut h = e.conn.header(cid, operation);
            if operation == op::SHUTDOWN {
                // The host side's stream ended (a read gave 0): it sends no more. It
                // may still take the guest's bytes (a half-close); if it is gone
                // altogether, the next write fails and the guest gets RST.
                h.flags = SHUTDOWN_SEND;
            }
            return Some((h, 0));
        }
        while let Some(key) = self.readable.pop_front() {
            let cid = self.guest_cid;
            let Some(e) = self.conns.get_mut(&key) else {
                continue;
            };
            e.queued = false;
            if e.host_eof || e.conn.state() != State::Established {
                continue;
            }
            let room = (e.conn.peer_credit() as usize).min(buf.len());
            if room == 0 {
                // The guest's buffer is full: it sends a credit update when it has
                // read, which makes the stream readable here again.
                continue;
            }
            match e.stream.read(&mut buf[..room]) {
                Ok(0) => {
                    e.host_eof = true;
                    if !self.finish_if_done(key) {
                        self.owe(key, op::SHUTDOWN);
                    }
                    return self.to_guest(buf);
                }
                Ok(n) => {
                    e.conn.sent(n as u32);
                    let mut h = e.conn.header(cid, op::RW);
                    h.len = n as u32;
                    // More may wait: look again after the others.
                    self.mark_readable(key);
                    return Some((h, n));
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {
                    e.queued = true;
                    self.readable.push_front(key);
                    continue;
                }
                Err(err) => {
                    log::debug!("vsock: host port {}: {err}: reset", key.0);
                    self.reset(key);
                    return self.to_guest(buf);
                }
            }
        }
        None
    }

    /// Every connection and waiting client dropped (their streams closed), nothing
    /// owed: what a transport reset leaves (a restore, a migration), with the guest
    /// told by the event queue.
    pub fn reset_all(&mut self) {
        for fd in self.by_fd.keys().chain(self.clients.keys()) {
            self.watch.push(Watch::Remove(*fd));
        }
        self.conns.clear();
        self.by_fd.clear();
        self.clients.clear();
        self.owed.clear();
        self.resets.clear();
        self.readable.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::wire::{HOST_CID, TYPE_STREAM};
    use std::collections::HashMap;

    const GUEST: u64 = 3;

    /// Host listeners by port: each connect gives the test the other end.
    #[derive(Default)]
    struct Host {
        listening: HashMap<u32, Vec<UnixStream>>,
    }

    impl Host {
        fn listen(&mut self, port: u32) {
            self.listening.entry(port).or_default();
        }
        fn accepted(&mut self, port: u32) -> UnixStream {
            self.listening.get_mut(&port).unwrap().remove(0)
        }
    }

    impl HostConnector for Host {
        type Stream = UnixStream;
        fn connect(&mut self, port: u32) -> io::Result<UnixStream> {
            let peers = self
                .listening
                .get_mut(&port)
                .ok_or_else(|| io::Error::from(io::ErrorKind::ConnectionRefused))?;
            let (ours, theirs) = UnixStream::pair()?;
            ours.set_nonblocking(true)?;
            theirs
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            peers.push(theirs);
            Ok(ours)
        }
    }

    fn guest(operation: u16, guest_port: u32, host_port: u32, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            len,
            kind: TYPE_STREAM,
            op: operation,
            flags: 0,
            buf_alloc: 1 << 16,
            fwd_cnt: 0,
        }
    }

    fn next(m: &mut Muxer<UnixStream>) -> Option<(PacketHeader, Vec<u8>)> {
        let mut buf = vec![0u8; 4096];
        m.to_guest(&mut buf).map(|(h, n)| (h, buf[..n].to_vec()))
    }

    fn op_of(p: &Option<(PacketHeader, Vec<u8>)>) -> Option<u16> {
        p.as_ref().map(|(h, _)| h.op)
    }

    #[test]
    fn a_guest_connection_to_a_listened_port_carries_bytes_both_ways() {
        let mut host = Host::default();
        host.listen(52);
        let mut m = Muxer::new(GUEST, Limits::default());
        m.from_guest(&guest(op::REQUEST, 1024, 52, 0), &[], &mut host);
        let response = next(&mut m).unwrap().0;
        let (o, dp, sp) = (response.op, response.dst_port, response.src_port);
        assert_eq!((o, dp, sp), (op::RESPONSE, 1024, 52));
        assert_eq!(m.take_watch().len(), 1);
        let mut peer = host.accepted(52);
        m.from_guest(&guest(op::RW, 1024, 52, 5), b"hello", &mut host);
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        peer.write_all(b"world").unwrap();
        let fd = m.by_fd.keys().copied().next().unwrap();
        m.host_readable(fd);
        let (h, data) = next(&mut m).unwrap();
        let (o, l) = (h.op, h.len);
        assert_eq!((o, l, data.as_slice()), (op::RW, 5, &b"world"[..]));
        assert!(next(&mut m).is_none());
        // The host closes its sending side: the guest hears SHUTDOWN (send), and may
        // still send; then it resets.
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        m.host_readable(fd);
        let shut = next(&mut m).unwrap().0;
        let (o, f) = (shut.op, shut.flags);
        assert_eq!((o, f), (op::SHUTDOWN, SHUTDOWN_SEND));
        m.from_guest(&guest(op::RW, 1024, 52, 4), b"more", &mut host);
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(
            &got, b"more",
            "a half-closed host side still takes the guest's bytes"
        );
        // The guest shuts down its side too: both are done, the guest gets RST and
        // the host stream ends.
        let mut shut = guest(op::SHUTDOWN, 1024, 52, 0);
        shut.flags = SHUTDOWN_SEND;
        m.from_guest(&shut, &[], &mut host);
        assert_eq!(op_of(&next(&mut m)), Some(op::RST));
        assert_eq!(m.connections(), 0);
        assert_eq!(m.take_watch(), vec![Watch::Remove(fd)]);
        let mut end = [0u8; 1];
        assert_eq!(peer.read(&mut end).unwrap(), 0, "the host stream ends");
    }

    #[test]
    fn nobody_listening_and_unknown_connections_get_a_reset() {
        let mut host = Host::default();
        let mut m = Muxer::new(GUEST, Limits::default());
        m.from_guest(&guest(op::REQUEST, 1024, 99, 0), &[], &mut host);
        let rst = next(&mut m).unwrap().0;
        let (o, sp, dp) = (rst.op, rst.src_port, rst.dst_port);
        assert_eq!((o, sp, dp), (op::RST, 99, 1024));
        m.from_guest(&guest(op::RW, 1024, 99, 1), &[1], &mut host);
        assert_eq!(op_of(&next(&mut m)), Some(op::RST));
        m.from_guest(&guest(op::RST, 1024, 99, 0), &[], &mut host);
        assert!(next(&mut m).is_none(), "a reset is never answered");
    }

    #[test]
    fn the_bounds_hold_against_a_flooding_guest() {
        let mut host = Host::default();
        host.listen(52);
        let limits = Limits {
            max_connections: 4,
            buf_alloc: 1024,
            max_clients: 2,
        };
        let mut m = Muxer::new(GUEST, limits);
        for port in 0..10 {
            m.from_guest(&guest(op::REQUEST, 2000 + port, 52, 0), &[], &mut host);
        }
        assert_eq!(m.connections(), 4);
        let mut answers = HashMap::new();
        while let Some((h, _)) = next(&mut m) {
            *answers.entry(h.op).or_insert(0) += 1;
        }
        assert_eq!(answers[&op::RESPONSE], 4);
        assert_eq!(answers[&op::RST], 6);
        // A host that never reads: the guest fills its credit, and an overrun
        // loses the connection; the VMM holds at most buf_alloc per connection.
        let _peers: Vec<UnixStream> = (0..4).map(|_| host.accepted(52)).collect();
        let chunk = vec![0xa5u8; 512];
        let mut sent = 0;
        while sent < 1 << 20 {
            m.from_guest(&guest(op::RW, 2000, 52, 512), &chunk, &mut host);
            sent += 512;
            assert!(m.buffered() <= 4 * 1024);
            if m.connections() < 4 {
                break;
            }
        }
        assert_eq!(m.connections(), 3, "the overrunning connection was reset");
        // Packets that name no connection, faster than the guest takes replies: the
        // resets owed stay bounded.
        for port in 0..1000 {
            m.from_guest(&guest(op::RW, 9000 + port, 7, 1), &[1], &mut host);
        }
        assert_eq!(m.resets.len(), MAX_RESETS_WAITING);
    }

    #[test]
    fn a_host_client_connects_to_the_guest_with_firecrackers_lines() {
        let mut host = Host::default();
        let mut m = Muxer::new(GUEST, Limits::default());
        let (ours, mut client) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        client.write_all(b"CONNECT 1234\n").unwrap();
        m.new_client(ours);
        let (req, _) = next(&mut m).unwrap();
        let (o, dp, sp) = (req.op, req.dst_port, req.src_port);
        assert_eq!((o, dp), (op::REQUEST, 1234));
        assert_eq!(sp, FIRST_HOST_PORT);
        // The guest accepts: the client reads OK and its port, then talks.
        let mut response = guest(op::RESPONSE, 1234, sp, 0);
        response.buf_alloc = 4096;
        m.from_guest(&response, &[], &mut host);
        let mut line = [0u8; 14];
        client.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
        client.write_all(b"ping").unwrap();
        let fd = m.by_fd.keys().copied().next().unwrap();
        m.host_readable(fd);
        let (h, data) = next(&mut m).unwrap();
        assert_eq!((h.op, data.as_slice()), (op::RW, &b"ping"[..]));
        // A client with a bad line is closed; one the guest refuses too.
        let (ours, mut bad) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        bad.write_all(b"HELLO\n").unwrap();
        m.new_client(ours);
        let mut b = [0u8; 1];
        assert_eq!(bad.read(&mut b).unwrap(), 0, "closed");
        let (ours, mut refused) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        refused.write_all(b"CONNECT 77\n").unwrap();
        m.new_client(ours);
        let (req, _) = next(&mut m).unwrap();
        let sp = req.src_port;
        m.from_guest(&guest(op::RST, 77, sp, 0), &[], &mut host);
        assert_eq!(refused.read(&mut b).unwrap(), 0, "closed");
    }

    #[test]
    fn bytes_for_the_guest_wait_for_its_credit() {
        let mut host = Host::default();
        host.listen(52);
        let mut m = Muxer::new(GUEST, Limits::default());
        let mut request = guest(op::REQUEST, 1024, 52, 0);
        request.buf_alloc = 3;
        m.from_guest(&request, &[], &mut host);
        next(&mut m).unwrap();
        let mut peer = host.accepted(52);
        peer.write_all(b"abcdef").unwrap();
        let fd = m.by_fd.keys().copied().next().unwrap();
        m.host_readable(fd);
        let (_, data) = next(&mut m).unwrap();
        assert_eq!(data, b"abc", "three bytes of credit");
        assert!(next(&mut m).is_none(), "no credit left");
        let mut update = guest(op::CREDIT_UPDATE, 1024, 52, 0);
        update.buf_alloc = 3;
        update.fwd_cnt = 3;
        m.from_guest(&update, &[], &mut host);
        let (_, data) = next(&mut m).unwrap();
        assert_eq!(data, b"def");
        // Credit given in the header of the guest's own data (as Linux does when it
        // sends while it reads) lets waiting bytes go too.
        peer.write_all(b"ghi").unwrap();
        m.host_readable(fd);
        assert!(next(&mut m).is_none(), "no credit left");
        let mut data_with_credit = guest(op::RW, 1024, 52, 1);
        data_with_credit.buf_alloc = 3;
        data_with_credit.fwd_cnt = 6;
        m.from_guest(&data_with_credit, b"x", &mut host);
        let (_, data) = next(&mut m).unwrap();
        assert_eq!(data, b"ghi");
    }

    #[test]
    fn a_transport_reset_drops_everything() {
        let mut host = Host::default();
        host.listen(52);
        let mut m = Muxer::new(GUEST, Limits::default());
        m.from_guest(&guest(op::REQUEST, 1024, 52, 0), &[], &mut host);
        let mut peer = host.accepted(52);
        m.take_watch();
        m.reset_all();
        assert_eq!(m.connections(), 0);
        assert!(next(&mut m).is_none());
        assert_eq!(m.take_watch().len(), 1);
        let mut b = [0u8; 1];
        assert_eq!(peer.read(&mut b).unwrap(), 0, "the host side sees the end");
    }
}
