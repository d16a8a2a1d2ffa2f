//! virtio-vsock packets from a hostile guest: any bytes, read as a run of headers
//! each followed by the payload its chain holds, checked as the device checks them
//! and fed to one connection. Never a panic; the guest's bytes buffered never pass
//! the buffer the host advertised, nor the credit what it could be; a connection the
//! guest broke stays broken (the device resets it). And the same bytes as a host
//! client's hybrid-vsock command line, in pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcraft_devices::virtio::vsock::conn::{Connection, Received};
use vmcraft_devices::virtio::vsock::hybrid::{Command, CommandReader};
use vmcraft_devices::virtio::vsock::wire::{PacketHeader, HEADER_SIZE};

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
