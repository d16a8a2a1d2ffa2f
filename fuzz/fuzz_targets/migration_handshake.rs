//! The migration destination's handshake under any bytes from a would-be source: it
//! must refuse them (no stranger gets through without the secret) without panicking,
//! reading past what it announced, or waiting on bytes that never come.
#![no_main]

use std::io::{Read, Write};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vmcraft::migration::{Channel, Limits, MigrationAuth, Transport};

/// A peer whose bytes are the fuzzer's; what we send goes nowhere.
struct Peer<'a>(&'a [u8]);

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Transport for Peer<'_> {
    fn set_read_limit(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
    fn set_write_limit(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let auth = MigrationAuth::shared_secret(vec![0x42; 32]).unwrap();
    let limits = Limits {
        peer: Duration::from_secs(1),
        handshake: Duration::from_secs(1),
        deadline: None,
    };
    // Random bytes cannot complete a Noise handshake under a secret they lack.
    assert!(Channel::respond(Peer(data), &auth, limits).is_err());
});
