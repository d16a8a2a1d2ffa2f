//! The PV console backend, on Xen's console page layout (`io/console.h`):
//!
//! ```text
//! struct xencons_interface {
//!     char in[1024];            // host -> guest
//!     char out[2048];           // guest -> host
//!     uint32_t in_cons, in_prod;
//!     uint32_t out_cons, out_prod;
//! };
//! ```
//!
//! Indices are free-running; the slot is the index modulo the ring size. The backend
//! reads `out` from `out_cons` to `out_prod` and advances `out_cons`; it writes input
//! at `in_prod` while there is room and advances `in_prod`. It never trusts the
//! guest's indices: a producer index more than a ring ahead of the consumer is an
//! error, and nothing is read or written then.

use std::io::Write;
use std::sync::atomic::Ordering;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmcraft_memory::GuestMemory;

/// Size of the input ring (host to guest).
pub const IN_SIZE: u32 = 1024;
/// Size of the output ring (guest to host).
pub const OUT_SIZE: u32 = 2048;
const OFF_IN: u64 = 0;
const OFF_OUT: u64 = 1024;
const OFF_IN_CONS: u64 = 3072;
const OFF_IN_PROD: u64 = 3076;
const OFF_OUT_CONS: u64 = 3080;
const OFF_OUT_PROD: u64 = 3084;

/// Errors from the console backend.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConsoleError {
    /// The page is not in guest memory.
    #[error("the console page at {0:#x} is outside guest memory")]
    BadPage(u64),
    /// The guest's output producer claims more than a ring of bytes.
    #[error("the guest claims {claimed} bytes of output in a {OUT_SIZE}-byte ring")]
    OutputOverflow {
        /// Bytes claimed.
        claimed: u32,
    },
    /// The guest's input consumer is ahead of the producer or more than a ring behind.
    #[error("the guest's input consumer index is inconsistent ({claimed} bytes outstanding)")]
    InputOverflow {
        /// Bytes the indices say are outstanding.
        claimed: u32,
    },
}

/// The backend of one PV console page.
#[derive(Debug, Clone)]
pub struct ConsoleBackend {
    memory: GuestMemory,
    page: GuestAddress,
}

impl ConsoleBackend {
    /// The console page at `page` (4 KiB, inside guest memory).
    pub fn new(memory: GuestMemory, page: GuestAddress) -> Result<Self, ConsoleError> {
        if !page.0.is_multiple_of(4096) || !memory.check_range(page, 4096) {
            return Err(ConsoleError::BadPage(page.0));
        }
        Ok(ConsoleBackend { memory, page })
    }

    fn load(&self, off: u64) -> u32 {
        self.memory
            .load(GuestAddress(self.page.0 + off), Ordering::Acquire)
            .unwrap_or(0)
    }

    fn store(&self, off: u64, v: u32) {
        let _ = self
            .memory
            .store(v, GuestAddress(self.page.0 + off), Ordering::Release);
    }

    /// Move the guest's pending output to `out`; returns the bytes moved (0 if none).
    /// The guest should be notified afterwards if anything was moved (it may be
    /// waiting for room).
    pub fn drain_output(&self, out: &mut dyn Write) -> Result<usize, ConsoleError> {
        let cons = self.load(OFF_OUT_CONS);
        let prod = self.load(OFF_OUT_PROD);
        let claimed = prod.wrapping_sub(cons);
        if claimed > OUT_SIZE {
            return Err(ConsoleError::OutputOverflow { claimed });
        }
        let mut buf = vec![0u8; claimed as usize];
        // Up to two pieces: to the end of the ring, then from its start.
        let start = cons % OUT_SIZE;
        let first = (OUT_SIZE - start).min(claimed) as usize;
        let base = self.page.0 + OFF_OUT;
        let ok = self
            .memory
            .read_slice(&mut buf[..first], GuestAddress(base + u64::from(start)))
            .is_ok()
            && self
                .memory
                .read_slice(&mut buf[first..], GuestAddress(base))
                .is_ok();
        if !ok {
            return Err(ConsoleError::BadPage(self.page.0));
        }
        // The bytes are copied out before the consumer index tells the guest the
        // space is free.
        self.store(OFF_OUT_CONS, prod);
        // A failing writer (a closed socket) loses console output, not the guest.
        let _ = out.write_all(&buf);
        let _ = out.flush();
        Ok(buf.len())
    }

    /// Put as much of `input` as fits into the guest's input ring; returns how many
    /// bytes were taken (the rest should be offered again later).
    pub fn feed_input(&self, input: &[u8]) -> Result<usize, ConsoleError> {
        let cons = self.load(OFF_IN_CONS);
        let prod = self.load(OFF_IN_PROD);
        let used = prod.wrapping_sub(cons);
        if used > IN_SIZE {
            return Err(ConsoleError::InputOverflow { claimed: used });
        }
        let n = ((IN_SIZE - used) as usize).min(input.len());
        let base = self.page.0 + OFF_IN;
        for (i, b) in input[..n].iter().enumerate() {
            let slot = prod.wrapping_add(i as u32) % IN_SIZE;
            if self
                .memory
                .write_obj(*b, GuestAddress(base + u64::from(slot)))
                .is_err()
            {
                return Err(ConsoleError::BadPage(self.page.0));
            }
        }
        // The bytes are in place before the producer index shows them.
        self.store(OFF_IN_PROD, prod.wrapping_add(n as u32));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmcraft_memory::{layout::MemoryLayout, GuestRam};

    const PAGE: u64 = 0x3000;

    fn setup() -> (GuestRam, ConsoleBackend) {
        let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
        let c = ConsoleBackend::new(ram.memory().clone(), GuestAddress(PAGE)).unwrap();
        (ram, c)
    }

    /// The guest's side: write `text` at out_prod and publish.
    fn guest_write(ram: &GuestRam, text: &[u8]) {
        let m = ram.memory();
        let prod: u32 = m.read_obj(GuestAddress(PAGE + OFF_OUT_PROD)).unwrap();
        for (i, b) in text.iter().enumerate() {
            let slot = prod.wrapping_add(i as u32) % OUT_SIZE;
            m.write_obj(*b, GuestAddress(PAGE + OFF_OUT + u64::from(slot)))
                .unwrap();
        }
        m.write_obj(
            prod.wrapping_add(text.len() as u32),
            GuestAddress(PAGE + OFF_OUT_PROD),
        )
        .unwrap();
    }

    #[test]
    fn output_flows_and_wraps() {
        let (ram, c) = setup();
        let mut out = Vec::new();
        assert_eq!(c.drain_output(&mut out), Ok(0));
        // Start near the end of the ring and of the index space.
        let start = u32::MAX - 5;
        ram.memory()
            .write_obj(start, GuestAddress(PAGE + OFF_OUT_CONS))
            .unwrap();
        ram.memory()
            .write_obj(start, GuestAddress(PAGE + OFF_OUT_PROD))
            .unwrap();
        guest_write(&ram, b"hello, wrapped world\n");
        assert_eq!(c.drain_output(&mut out), Ok(21));
        assert_eq!(out, b"hello, wrapped world\n");
        let cons: u32 = ram
            .memory()
            .read_obj(GuestAddress(PAGE + OFF_OUT_CONS))
            .unwrap();
        assert_eq!(cons, start.wrapping_add(21));
    }

    #[test]
    fn input_fills_the_room_there_is() {
        let (ram, c) = setup();
        assert_eq!(c.feed_input(&[7u8; 1000]), Ok(1000));
        assert_eq!(
            c.feed_input(&[8u8; 100]),
            Ok(24),
            "1024 bytes of room in all"
        );
        assert_eq!(c.feed_input(b"x"), Ok(0));
        // The guest consumes 50 bytes.
        ram.memory()
            .write_obj(50u32, GuestAddress(PAGE + OFF_IN_CONS))
            .unwrap();
        assert_eq!(c.feed_input(&[9u8; 100]), Ok(50));
        let wrapped: u8 = ram
            .memory()
            .read_obj(GuestAddress(PAGE + OFF_IN + 49))
            .unwrap();
        assert_eq!(wrapped, 9);
    }

    #[test]
    fn hostile_indices_are_refused() {
        let (ram, c) = setup();
        ram.memory()
            .write_obj(OUT_SIZE + 1, GuestAddress(PAGE + OFF_OUT_PROD))
            .unwrap();
        let mut out = Vec::new();
        assert_eq!(
            c.drain_output(&mut out),
            Err(ConsoleError::OutputOverflow {
                claimed: OUT_SIZE + 1
            })
        );
        assert!(out.is_empty());
        ram.memory()
            .write_obj(5u32, GuestAddress(PAGE + OFF_IN_CONS))
            .unwrap();
        assert!(matches!(
            c.feed_input(b"a"),
            Err(ConsoleError::InputOverflow { .. })
        ));
        assert!(ConsoleBackend::new(ram.memory().clone(), GuestAddress(0x3001)).is_err());
        assert!(ConsoleBackend::new(ram.memory().clone(), GuestAddress(1 << 30)).is_err());
    }
}
