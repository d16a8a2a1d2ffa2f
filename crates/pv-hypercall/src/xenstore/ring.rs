//! The store ring: the page a guest and the store share (`struct
//! xenstore_domain_interface`): a 1 KiB request ring, a 1 KiB reply ring, their
//! indices, and the server's features, connection state and error word.
//!
//! The guest's indices are hostile: a producer more than a ring ahead of its consumer
//! sets `error` to `XENSTORE_ERROR_RINGIDX` and the ring is served no more; a payload
//! over the limit sets `XENSTORE_ERROR_PROTO`. Replies wait in a bounded queue while
//! the guest does not consume them, and no new request is read meanwhile.

use std::collections::VecDeque;

use crate::ring::RingMemory;

use super::store::DomId;
use super::wire::{Framer, HEADER_LEN, PAYLOAD_MAX};
use super::Xenstore;

/// Bytes in each ring (`XENSTORE_RING_SIZE`).
pub const RING_SIZE: u32 = 1024;
const REQ: usize = 0;
const RSP: usize = 1024;
const REQ_CONS: usize = 2048;
const REQ_PROD: usize = 2052;
const RSP_CONS: usize = 2056;
const RSP_PROD: usize = 2060;
const SERVER_FEATURES: usize = 2064;
const CONNECTION: usize = 2068;
const ERROR: usize = 2072;
/// Bytes of the interface the page must hold.
pub const INTERFACE_LEN: usize = 2076;

/// `XENSTORE_ERROR_RINGIDX`.
pub const ERROR_RINGIDX: u32 = 2;
/// `XENSTORE_ERROR_PROTO`.
pub const ERROR_PROTO: u32 = 3;
/// `XENSTORE_SERVER_FEATURE_ERROR`: the server reports errors in `error`.
pub const FEATURE_ERROR: u32 = 2;

/// Why the ring is served no more.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize,
)]
pub enum StoreRingError {
    /// The guest's request producer ran more than a ring ahead.
    #[error("the guest's xenstore request index {prod} is more than a ring past {cons}")]
    RequestIndex {
        /// Its producer.
        prod: u32,
        /// Our consumer.
        cons: u32,
    },
    /// The guest's reply consumer is past our producer, or a ring behind.
    #[error("the guest's xenstore reply index {cons} does not fit our producer {prod}")]
    ReplyIndex {
        /// Its consumer.
        cons: u32,
        /// Our producer.
        prod: u32,
    },
    /// The guest's byte stream broke the protocol.
    #[error("the guest broke the xenstore protocol")]
    Protocol(#[source] super::wire::WireError),
}

/// What one [`StoreRing::serve`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    /// Requests answered.
    pub requests: usize,
    /// Reply bytes written to the ring.
    pub reply_bytes: usize,
}

impl Served {
    /// Whether the guest should be notified (it has replies, or room for requests).
    pub fn notify(&self) -> bool {
        self.requests > 0 || self.reply_bytes > 0
    }
}

/// The store side of a ring in a snapshot ([`StoreRing::save`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreRingState {
    /// A request cut in the middle.
    pub partial: Vec<u8>,
    /// Replies waiting for room in the ring.
    pub out: Vec<u8>,
    /// Why the ring is served no more, if it is not.
    pub broken: Option<StoreRingError>,
}

/// The store side of a guest's store ring.
#[derive(Debug)]
pub struct StoreRing<M> {
    mem: M,
    dom: DomId,
    framer: Framer,
    out: VecDeque<u8>,
    broken: Option<StoreRingError>,
}

/// Replies waiting for room, at most: two whole messages.
const OUT_LIMIT: usize = 2 * (HEADER_LEN + PAYLOAD_MAX);

impl<M: RingMemory> StoreRing<M> {
    /// Serve domain `dom`'s ring in `mem` (at least [`INTERFACE_LEN`] bytes): say the
    /// server reports errors, and connected.
    pub fn new(mem: M, dom: DomId) -> Option<Self> {
        if mem.size() < INTERFACE_LEN {
            return None;
        }
        mem.store_u32(SERVER_FEATURES, FEATURE_ERROR);
        mem.store_u32(CONNECTION, 0);
        Some(StoreRing {
            mem,
            dom,
            framer: Framer::default(),
            out: VecDeque::new(),
            broken: None,
        })
    }

    /// Why the ring is served no more, if it is not.
    pub fn broken(&self) -> Option<StoreRingError> {
        self.broken
    }

    /// What the store's side holds of the ring (a snapshot's part; the ring itself
    /// is guest memory): a request cut in the middle, replies waiting for room, and
    /// whether the ring is broken.
    pub fn save(&self) -> StoreRingState {
        StoreRingState {
            partial: self.framer.partial().to_vec(),
            out: self.out.iter().copied().collect(),
            broken: self.broken,
        }
    }

    /// Put back what [`save`](Self::save) gave, on a ring in the restored memory.
    /// Checked as outside data: a partial request must be one message's start, the
    /// replies at most what the store side ever holds.
    pub fn restore(&mut self, state: &StoreRingState) -> Result<(), StoreRingError> {
        let framer =
            Framer::with_partial(state.partial.clone()).map_err(StoreRingError::Protocol)?;
        if state.out.len() > OUT_LIMIT + HEADER_LEN + PAYLOAD_MAX {
            return Err(StoreRingError::Protocol(
                super::wire::WireError::PayloadTooLong(state.out.len() as u32),
            ));
        }
        self.framer = framer;
        self.out = state.out.iter().copied().collect();
        self.broken = state.broken;
        Ok(())
    }

    /// Read the guest's requests, answer them from `xs`, write what fits of the
    /// replies (and of the watch events for this domain). Bounded: at most one ring of
    /// requests and one of replies per call. Call again on the next notification.
    pub fn serve(&mut self, xs: &mut Xenstore) -> Result<Served, StoreRingError> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        let result = self.serve_once(xs);
        if let Err(e) = result {
            self.broken = Some(e);
            let code = match e {
                StoreRingError::Protocol(_) => ERROR_PROTO,
                _ => ERROR_RINGIDX,
            };
            self.mem.store_u32(ERROR, code);
        }
        result
    }

    fn serve_once(&mut self, xs: &mut Xenstore) -> Result<Served, StoreRingError> {
        let mut served = Served::default();
        served.reply_bytes += self.flush()?;
        // New requests only while the replies keep up.
        if self.out.len() < HEADER_LEN + PAYLOAD_MAX {
            let cons = self.mem.load_u32(REQ_CONS);
            let prod = self.mem.load_u32(REQ_PROD);
            let avail = prod.wrapping_sub(cons);
            if avail > RING_SIZE {
                return Err(StoreRingError::RequestIndex { prod, cons });
            }
            let mut bytes = vec![0u8; avail as usize];
            let start = (cons % RING_SIZE) as usize;
            let first = bytes.len().min(RING_SIZE as usize - start);
            self.mem.read(REQ + start, &mut bytes[..first]);
            self.mem.read(REQ, &mut bytes[first..]);
            self.mem.full_fence();
            self.mem.store_u32(REQ_CONS, prod);
            for m in self.framer.push(&bytes).map_err(StoreRingError::Protocol)? {
                for reply in xs.handle(self.dom, &m) {
                    self.out.extend(reply.to_bytes());
                }
                served.requests += 1;
            }
        }
        // Watch events raised by others' changes.
        if self.out.len() < OUT_LIMIT {
            for e in xs.events(self.dom) {
                self.out.extend(e.to_bytes());
            }
        }
        served.reply_bytes += self.flush()?;
        Ok(served)
    }

    /// Write what fits of the waiting replies; returns the bytes written.
    fn flush(&mut self) -> Result<usize, StoreRingError> {
        let cons = self.mem.load_u32(RSP_CONS);
        let prod = self.mem.load_u32(RSP_PROD);
        let used = prod.wrapping_sub(cons);
        if used > RING_SIZE {
            return Err(StoreRingError::ReplyIndex { cons, prod });
        }
        let room = (RING_SIZE - used) as usize;
        let n = room.min(self.out.len());
        if n == 0 {
            return Ok(0);
        }
        let bytes: Vec<u8> = self.out.drain(..n).collect();
        let start = (prod % RING_SIZE) as usize;
        let first = n.min(RING_SIZE as usize - start);
        self.mem.write(RSP + start, &bytes[..first]);
        self.mem.write(RSP, &bytes[first..]);
        self.mem.full_fence();
        self.mem.store_u32(RSP_PROD, prod.wrapping_add(n as u32));
        Ok(n)
    }
}
