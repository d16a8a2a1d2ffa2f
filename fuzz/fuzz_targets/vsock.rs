//! virtio-vsock packets from a hostile guest: any bytes, read as a run of headers
//! each followed by the payload its chain holds, checked as the device checks them
//! and fed to one connection. Never a panic; the guest's bytes buffered never pass
//! the buffer the host advertised, nor the credit what it could be; a connection the
//! guest broke stays broken (the device resets it). And the same bytes as a host
//! client's hybrid-vsock command line, in pieces. And the same packets through a
//! whole device's connections (the muxer, on socket pairs for host streams, a few
//! host ports listened on): the bounds hold (connections, bytes held, resets owed),
//! every packet for the guest fits the buffer it was given and is addressed to the
//! guest.
#![no_main]

use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use vmcraft_devices::virtio::vsock::conn::{Connection, Received};
use vmcraft_devices::virtio::vsock::hybrid::{Command, CommandReader};
use vmcraft_devices::virtio::vsock::muxer::{HostConnector, Limits, Muxer};
use vmcraft_devices::virtio::vsock::wire::{PacketHeader, HEADER_SIZE, HOST_CID};

/// Host ports 0 to 3 are listened on (the far ends kept, never read: the guest's
/// bytes pile up against the bounds).
struct Host(Vec<UnixStream>);

impl HostConnector for Host {
    type Stream = UnixStream;
    fn connect(&mut self, port: u32) -> std::io::Result<UnixStream> {
        if port > 3 || self.0.len() >= 64 {
            return Err(std::io::ErrorKind::ConnectionRefused.into());
        }
        let (ours, theirs) = UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        self.0.push(theirs);
        Ok(ours)
    }
}

fn muxer_run(data: &[u8]) {
    let limits = Limits {
        max_connections: 4,
        buf_alloc: 4096,
        max_clients: 2,
    };
    let mut muxer: Muxer<UnixStream> = Muxer::new(GUEST, limits);
    let mut host = Host(Vec::new());
    let mut rest = data;
    let mut buf = [0u8; 512];
    while rest.len() >= HEADER_SIZE + 1 {
        let mut h = PacketHeader::parse(rest).expect("enough bytes");
        // Mostly well-addressed, small ports: the packets reach connections.
        h.src_cid = GUEST;
        h.dst_cid = HOST_CID;
        h.src_port %= 8;
        h.dst_port %= 8;
        let room = usize::from(rest[HEADER_SIZE]).min(rest.len() - HEADER_SIZE - 1);
        let payload = &rest[HEADER_SIZE + 1..HEADER_SIZE + 1 + room];
        rest = &rest[HEADER_SIZE + 1 + room..];
        match h.check_from_guest(GUEST, room) {
            Ok(()) => muxer.from_guest(&h, &payload[..h.len as usize], &mut host),
            Err(_) => muxer.refuse((h.dst_port, h.src_port)),
        }
        assert!(muxer.connections() <= limits.max_connections);
        assert!(muxer.buffered() <= limits.max_connections * limits.buf_alloc as usize);
        // The guest takes what the muxer has, into buffers of the size the bytes say.
        let size = usize::from(room as u8) % buf.len();
        let mut given = 0;
        while let Some((out, n)) = muxer.to_guest(&mut buf[..size]) {
            let (dst_cid, src_cid, len) = (out.dst_cid, out.src_cid, out.len);
            assert!(n <= size && len as usize == n);
            assert_eq!((dst_cid, src_cid), (GUEST, HOST_CID));
            given += 1;
            assert!(given <= 2 * 256 + 64, "the packets owed are bounded");
        }
        muxer.take_watch();
    }
}

const GUEST: u64 = 3;
const BUF: u32 = 4096;

fuzz_target!(|data: &[u8]| {
    // The same bytes as a host client's command line, in pieces of the sizes the
    // bytes say: a command whose port the bytes hold, or a refusal.
    let mut reader = CommandReader::default();
    let mut line = data;
    let mut fed = Vec::new();
    while let Some((&size, rest)) = line.split_first() {
        let n = usize::from(size % 8).min(rest.len());
        fed.extend_from_slice(&rest[..n]);
        match reader.feed(&rest[..n]) {
            Ok(Some(Command::Connect(port))) => {
                let text = String::from_utf8_lossy(&fed);
                assert!(text.starts_with("CONNECT "), "{text:?}");
                assert!(text.contains(&port.to_string()), "{text:?}: {port}");
                break;
            }
            Ok(None) => line = &rest[n..],
            Err(_) => break,
        }
    }
    muxer_run(data);
    let mut conn = if data.first().is_some_and(|b| b & 1 == 0) {
        Connection::accepted(1024, 52, BUF)
    } else {
        Connection::requested(1024, 52, BUF)
    };
    let mut rest = data.get(1..).unwrap_or(&[]);
    while rest.len() >= HEADER_SIZE + 1 {
        let h = PacketHeader::parse(rest).expect("enough bytes");
        // The payload room: the next byte says how much of what follows is the chain.
        let room = usize::from(rest[HEADER_SIZE]).min(rest.len() - HEADER_SIZE - 1);
        let payload = &rest[HEADER_SIZE + 1..HEADER_SIZE + 1 + room];
        rest = &rest[HEADER_SIZE + 1 + room..];
        if h.check_from_guest(GUEST, room).is_err() {
            continue;
        }
        match conn.receive(&h, payload) {
            Err(e) => {
                assert!(!e.to_string().is_empty());
                return;
            }
            Ok(Received::Reset) => return,
            Ok(Received::Data) => {
                // The host side takes half of what waits.
                let half = conn.pending() / 2;
                conn.forwarded(half);
            }
            Ok(_) => {}
        }
        assert!(conn.pending() <= BUF as usize);
        assert!(conn.credit() <= BUF);
        assert_eq!(conn.credit() as usize + conn.pending(), BUF as usize);
        let credit = conn.peer_credit();
        conn.sent(credit / 2);
    }
});
