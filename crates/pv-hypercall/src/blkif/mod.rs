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
use crate::ring::{BackRing, GuestRingMemory, RingError};

pub use vmcraft_pv_wire::blkif::*;

/// Errors that stop the backend.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
