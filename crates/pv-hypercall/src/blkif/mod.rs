//! The PV block backend: Xen's blkif protocol (`io/blkif.h`) on a shared ring, data in
//! granted pages, a raw file behind it.
//!
//! Requests are 112 bytes: `operation, nr_segments, handle, id, sector_number` and up
//! to 11 segments `{gref, first_sect, last_sect}` (512-byte sectors inside one granted
//! page, so `first_sect <= last_sect <= 7`). Responses are `{id, operation, status}`
//! with status `OKAY` (0), `ERROR` (-1) or `EOPNOTSUPP` (-2). Operations: read,
//! write, write barrier (the writes, then a flush), flush. A flush (or barrier) is
//! answered only after `fdatasync` returns, so an acknowledged flush is durable.
//!
//! Every request is copied out of the ring once, then validated: a bad segment, a
//! sector past the end, a grant the guest did not give (or gave read-only for a read)
//! all answer `ERROR` and the ring goes on. A broken ring (a producer index claiming
//! more than a ring) is an `Err`: the backend stops serving that ring.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use thiserror::Error;
use vm_memory::GuestAddress;
use vmcraft_memory::GuestMemory;

use crate::grant::{CopyDirection, GrantTable};
use crate::ring::{BackRing, Entry, GuestRingMemory, RingError};

/// Read sectors into granted pages.
pub const OP_READ: u8 = 0;
/// Write sectors from granted pages.
pub const OP_WRITE: u8 = 1;
/// Write, then make everything durable.
pub const OP_WRITE_BARRIER: u8 = 2;
/// Make everything written so far durable.
pub const OP_FLUSH_DISKCACHE: u8 = 3;
/// Most segments in a direct request.
pub const MAX_SEGMENTS: usize = 11;
/// Sector size.
pub const SECTOR: u64 = 512;
/// Success.
pub const STATUS_OKAY: i16 = 0;
/// Failure.
pub const STATUS_ERROR: i16 = -1;
/// Unsupported operation.
pub const STATUS_EOPNOTSUPP: i16 = -2;

/// One segment of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    /// The granted page.
    pub gref: u32,
    /// First sector in the page (0..=7).
    pub first_sect: u8,
    /// Last sector in the page (first_sect..=7).
    pub last_sect: u8,
}

/// `blkif_request` (112 bytes on x86-64).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Request {
    /// `OP_*`.
    pub operation: u8,
    /// Segments used.
    pub nr_segments: u8,
    /// Virtual device handle.
    pub handle: u16,
    /// Echoed in the response.
    pub id: u64,
    /// First sector on the disk.
    pub sector_number: u64,
    /// The segments (the first `nr_segments` count).
    pub seg: [Segment; MAX_SEGMENTS],
}

impl Entry for Request {
    const SIZE: usize = 112;
    fn encode(&self, out: &mut [u8]) {
        out.fill(0);
        out[0] = self.operation;
        out[1] = self.nr_segments;
        out[2..4].copy_from_slice(&self.handle.to_le_bytes());
        out[8..16].copy_from_slice(&self.id.to_le_bytes());
        out[16..24].copy_from_slice(&self.sector_number.to_le_bytes());
        for (i, s) in self.seg.iter().enumerate() {
            let at = 24 + 8 * i;
            out[at..at + 4].copy_from_slice(&s.gref.to_le_bytes());
            out[at + 4] = s.first_sect;
            out[at + 5] = s.last_sect;
        }
    }
    fn decode(b: &[u8]) -> Self {
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
        let mut seg = [Segment::default(); MAX_SEGMENTS];
        for (i, s) in seg.iter_mut().enumerate() {
            let at = 24 + 8 * i;
            *s = Segment {
                gref: u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4])),
                first_sect: b[at + 4],
                last_sect: b[at + 5],
            };
        }
        Request {
            operation: b[0],
            nr_segments: b[1],
            handle: u16::from_le_bytes([b[2], b[3]]),
            id: u64_at(8),
            sector_number: u64_at(16),
            seg,
        }
    }
}

/// `blkif_response` (16 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// The request's operation.
    pub operation: u8,
    /// `STATUS_*`.
    pub status: i16,
}

impl Entry for Response {
    const SIZE: usize = 16;
    fn encode(&self, out: &mut [u8]) {
        out.fill(0);
        out[..8].copy_from_slice(&self.id.to_le_bytes());
        out[8] = self.operation;
        out[10..12].copy_from_slice(&self.status.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Self {
        Response {
            id: u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8])),
            operation: b[8],
            status: i16::from_le_bytes([b[10], b[11]]),
        }
    }
}

/// Errors that stop the backend.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BlkifError {
    /// The shared ring is broken.
    #[error("the blkif ring is broken")]
    Ring(#[source] RingError),
}

/// The outcome of one [`BlkifBackend::process`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Processed {
    /// Requests answered.
    pub requests: usize,
    /// Whether the front end must be notified.
    pub notify: bool,
}

/// A blkif backend over one ring.
#[derive(Debug)]
pub struct BlkifBackend {
    ring: BackRing<GuestRingMemory, Request, Response>,
    grants: Arc<GrantTable>,
    file: File,
    sectors: u64,
    read_only: bool,
}

impl BlkifBackend {
    /// A backend for the ring page at `ring` (one page), granted data in `grants`,
    /// the disk in `file`.
    pub fn new(
        memory: GuestMemory,
        ring: GuestAddress,
        grants: Arc<GrantTable>,
        file: File,
        read_only: bool,
    ) -> Result<Self, BlkifError> {
        let mem = GuestRingMemory::new(memory, ring, 4096).map_err(BlkifError::Ring)?;
        let ring = BackRing::attach(mem).map_err(BlkifError::Ring)?;
        let sectors = file.metadata().map(|m| m.len() / SECTOR).unwrap_or(0);
        Ok(BlkifBackend {
            ring,
            grants,
            file,
            sectors,
            read_only,
        })
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Answer every waiting request; then ask to be notified of the next one (and
    /// answer any that raced in).
    pub fn process(&mut self) -> Result<Processed, BlkifError> {
        let mut requests = 0;
        let mut notify = false;
        loop {
            while let Some(req) = self.ring.pop_request().map_err(BlkifError::Ring)? {
                let status = self.execute(&req);
                self.ring
                    .push_response(&Response {
                        id: req.id,
                        operation: req.operation,
                        status,
                    })
                    .map_err(BlkifError::Ring)?;
                requests += 1;
            }
            notify |= self.ring.publish_responses();
            if !self
                .ring
                .final_check_for_requests()
                .map_err(BlkifError::Ring)?
            {
                break;
            }
        }
        Ok(Processed { requests, notify })
    }

    fn execute(&self, req: &Request) -> i16 {
        match req.operation {
            OP_READ | OP_WRITE | OP_WRITE_BARRIER => {
                let write = req.operation != OP_READ;
                if write && self.read_only {
                    return STATUS_ERROR;
                }
                if self.transfer(req, write).is_err() {
                    return STATUS_ERROR;
                }
                if req.operation == OP_WRITE_BARRIER && self.file.sync_data().is_err() {
                    return STATUS_ERROR;
                }
                STATUS_OKAY
            }
            OP_FLUSH_DISKCACHE => match self.file.sync_data() {
                Ok(()) => STATUS_OKAY,
                Err(_) => STATUS_ERROR,
            },
            _ => STATUS_EOPNOTSUPP,
        }
    }

    /// Move the segments' sectors between the granted pages and the disk.
    fn transfer(&self, req: &Request, write: bool) -> Result<(), ()> {
        let n = usize::from(req.nr_segments);
        if n == 0 || n > MAX_SEGMENTS {
            return Err(());
        }
        let segs = &req.seg[..n];
        let mut total = 0u64;
        for s in segs {
            if s.first_sect > s.last_sect || s.last_sect > 7 {
                return Err(());
            }
            total += u64::from(s.last_sect - s.first_sect) + 1;
        }
        let end = req.sector_number.checked_add(total).ok_or(())?;
        if end > self.sectors {
            return Err(());
        }
        let mut sector = req.sector_number;
        let mut buf = [0u8; 4096];
        for s in segs {
            let count = u64::from(s.last_sect - s.first_sect) + 1;
            let len = (count * SECTOR) as usize;
            let page_off = u64::from(s.first_sect) * SECTOR;
            let disk_off = sector * SECTOR;
            if write {
                self.grants
                    .copy(s.gref, page_off, &mut buf[..len], CopyDirection::FromGuest)
                    .map_err(|_| ())?;
                self.file
                    .write_all_at(&buf[..len], disk_off)
                    .map_err(|_| ())?;
            } else {
                self.file
                    .read_exact_at(&mut buf[..len], disk_off)
                    .map_err(|_| ())?;
                self.grants
                    .copy(s.gref, page_off, &mut buf[..len], CopyDirection::ToGuest)
                    .map_err(|_| ())?;
            }
            sector += count;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
