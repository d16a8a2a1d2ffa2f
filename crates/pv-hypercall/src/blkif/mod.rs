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

use std::sync::Arc;

use thiserror::Error;
use vm_memory::GuestAddress;
use vmcraft_block::{BlockImage, MergedReads, OutOfRange};
use vmcraft_memory::poll::AdaptivePoll;
use vmcraft_memory::report::ErrorChain;
use vmcraft_memory::vectored::{Gather, IoVecs};
use vmcraft_memory::GuestMemory;

use crate::grant::{GrantError, GrantTable, Mapping};
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

/// Why one request failed (it is answered `STATUS_ERROR`; the ring goes on).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RequestError {
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// No segments, or more than [`MAX_SEGMENTS`].
    #[error("{0} segments (1 to {max} allowed)", max = MAX_SEGMENTS)]
    SegmentCount(u8),
    /// A segment whose sectors are reversed or leave its page.
    #[error("segment sectors {first}..={last} are not inside one page")]
    BadSegment {
        /// First sector in the page.
        first: u8,
        /// Last sector in the page.
        last: u8,
    },
    /// Sectors past the end of the disk.
    #[error(transparent)]
    PastEnd(OutOfRange),
    /// A grant the guest did not give as the operation needs.
    #[error("grant {gref}")]
    Grant {
        /// The grant reference.
        gref: u32,
        /// What the grant table said.
        #[source]
        source: GrantError,
    },
    /// The disk file failed (a host-side error).
    #[error("disk I/O at byte {offset}")]
    Io {
        /// Offset in the disk file.
        offset: u64,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// The outcome of one [`BlkifBackend::process`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Processed {
    /// Requests answered.
    pub requests: usize,
    /// Whether the front end must be notified.
    pub notify: bool,
    /// [`BlkifBackend::process_polling`] stopped at its budget with requests left:
    /// call it again (after checking for a stop).
    pub more: bool,
}

/// The most requests one [`BlkifBackend::process_polling`] answers before it returns.
pub const PROCESS_BUDGET: usize = 1024;

/// A blkif backend over one ring.
#[derive(Debug)]
pub struct BlkifBackend {
    ring: BackRing<GuestRingMemory, Request, Response>,
    disk: Disk,
    /// The guest ranges of the requests in flight, for one `preadv`/`pwritev`.
    io: IoVecs,
    run: ReadRun,
}

/// What requests are served against: the granted guest memory and the image.
#[derive(Debug)]
struct Disk {
    memory: GuestMemory,
    grants: Arc<GrantTable>,
    image: Arc<BlockImage>,
}

/// Reads of adjacent sectors from consecutive requests, merged by the block engine
/// ([`MergedReads`]) with their grants mapped until the read returns; each request
/// still gets its own response.
#[derive(Debug, Default)]
struct ReadRun {
    /// The grants mapped for the requests held (and for the one being executed).
    mapped: Vec<Mapping>,
    /// The held reads, by request id.
    merged: MergedReads<u64>,
    /// The answers of a flush: (request id, status).
    answers: Vec<(u64, i16)>,
}

impl BlkifBackend {
    /// A backend for the ring page at `ring` (one page), granted data in `grants`,
    /// the disk in `image` (shared with whoever else holds it: a backend made anew
    /// when the front end reconnects serves the same image).
    pub fn new(
        memory: GuestMemory,
        ring: GuestAddress,
        grants: Arc<GrantTable>,
        image: Arc<BlockImage>,
    ) -> Result<Self, BlkifError> {
        let mem = GuestRingMemory::new(memory.clone(), ring, 4096).map_err(BlkifError::Ring)?;
        let ring = BackRing::attach(mem).map_err(BlkifError::Ring)?;
        Ok(BlkifBackend {
            ring,
            disk: Disk {
                memory,
                grants,
                image,
            },
            io: IoVecs::default(),
            run: ReadRun::default(),
        })
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.disk.image.sectors()
    }

    /// Answer every waiting request; then ask to be notified of the next one (and
    /// answer any that raced in).
    pub fn process(&mut self) -> Result<Processed, BlkifError> {
        let mut requests = 0;
        let mut notify = false;
        loop {
            requests += self.answer_waiting(usize::MAX)?;
            notify |= self.ring.publish_responses();
            if !self
                .ring
                .final_check_for_requests()
                .map_err(BlkifError::Ring)?
            {
                break;
            }
        }
        Ok(Processed {
            requests,
            notify,
            more: false,
        })
    }

    /// Like [`process`](Self::process), for a busy front end: after each batch the
    /// responses are published and `notify` is called if the front end asked for it;
    /// then, with the request event left behind (so the front end does not notify), the
    /// ring is polled for `poll`'s window before the final check. At most
    /// [`PROCESS_BUDGET`] requests per call; `more` says requests are left. The
    /// returned `notify` is always false: notifications were made along the way.
    pub fn process_polling(
        &mut self,
        poll: &mut AdaptivePoll,
        mut notify: impl FnMut(),
    ) -> Result<Processed, BlkifError> {
        poll.woke();
        let mut requests = 0;
        loop {
            requests += self.answer_waiting(PROCESS_BUDGET - requests)?;
            if self.ring.publish_responses() {
                notify();
            }
            if requests >= PROCESS_BUDGET {
                // Ask to be notified again (a caller that is stopping would otherwise
                // leave the front end waiting), and say whether requests are left.
                let more = self
                    .ring
                    .final_check_for_requests()
                    .map_err(BlkifError::Ring)?;
                poll.sleeping();
                return Ok(Processed {
                    requests,
                    notify: false,
                    more,
                });
            }
            let ring = &self.ring;
            // A ring that cannot be read counts as ready: serving it reports the error.
            if poll.poll(|| ring.unconsumed_requests().map_or(true, |n| n > 0)) {
                continue;
            }
            if !self
                .ring
                .final_check_for_requests()
                .map_err(BlkifError::Ring)?
            {
                poll.sleeping();
                return Ok(Processed {
                    requests,
                    notify: false,
                    more: false,
                });
            }
        }
    }

    /// Answer up to `limit` waiting requests (responses pushed, not published);
    /// returns how many. Reads of adjacent sectors are held and done together.
    fn answer_waiting(&mut self, limit: usize) -> Result<usize, BlkifError> {
        let BlkifBackend {
            ring,
            disk,
            io,
            run,
        } = self;
        let mut data = io.gather(&disk.memory);
        let mut answered = 0;
        let mut result = Ok(());
        while answered < limit {
            let req = match ring.pop_request() {
                Ok(Some(req)) => req,
                Ok(None) => break,
                Err(e) => {
                    result = Err(BlkifError::Ring(e));
                    break;
                }
            };
            answered += 1;
            if req.operation == OP_READ {
                if let Ok(offset) = disk.check(&req) {
                    if !run.continues(offset, &data) {
                        if let Err(e) = run.flush(ring, disk, &mut data) {
                            result = Err(e);
                            break;
                        }
                    }
                    match run.hold(&req, offset, disk, &mut data) {
                        Ok(()) => continue,
                        Err(e) => {
                            Self::report(&req, &e);
                            if let Err(e) = respond(ring, &req, STATUS_ERROR) {
                                result = Err(e);
                                break;
                            }
                            continue;
                        }
                    }
                }
            }
            // Anything else waits for the held reads: nothing overtakes them.
            let status = run
                .flush(ring, disk, &mut data)
                .map(|()| disk.execute(&req, &mut run.mapped, &mut data));
            if let Err(e) = status.and_then(|status| respond(ring, &req, status)) {
                result = Err(e);
                break;
            }
        }
        // Held reads are answered even when the ring broke: the front end is owed them.
        let flushed = run.flush(ring, disk, &mut data);
        result.and(flushed).map(|()| answered)
    }

    /// Log a failed request: host-side failures as warnings, the guest's own
    /// mistakes (which it can repeat at will) at debug level.
    fn report(req: &Request, e: &RequestError) {
        let chain = ErrorChain(e);
        match e {
            RequestError::Io { .. } => {
                log::warn!("pv-block: request {} failed on the host: {chain}", req.id)
            }
            _ => log::debug!("pv-block: request {} refused: {chain}", req.id),
        }
    }
}

/// Push the response to `req`.
fn respond(
    ring: &mut BackRing<GuestRingMemory, Request, Response>,
    req: &Request,
    status: i16,
) -> Result<(), BlkifError> {
    ring.push_response(&Response {
        id: req.id,
        operation: req.operation,
        status,
    })
    .map_err(BlkifError::Ring)
}

impl Disk {
    fn execute(&self, req: &Request, mapped: &mut Vec<Mapping>, data: &mut Gather<'_>) -> i16 {
        match req.operation {
            OP_READ | OP_WRITE | OP_WRITE_BARRIER => {
                let write = req.operation != OP_READ;
                let result = if write && self.image.read_only() {
                    Err(RequestError::ReadOnly)
                } else {
                    self.transfer(req, write, mapped, data).and_then(|()| {
                        if req.operation == OP_WRITE_BARRIER {
                            self.sync()
                        } else {
                            Ok(())
                        }
                    })
                };
                match result {
                    Ok(()) => STATUS_OKAY,
                    Err(e) => {
                        BlkifBackend::report(req, &e);
                        STATUS_ERROR
                    }
                }
            }
            OP_FLUSH_DISKCACHE => match self.sync() {
                Ok(()) => STATUS_OKAY,
                Err(e) => {
                    BlkifBackend::report(req, &e);
                    STATUS_ERROR
                }
            },
            _ => STATUS_EOPNOTSUPP,
        }
    }

    fn sync(&self) -> Result<(), RequestError> {
        self.image
            .flush()
            .map_err(|source| RequestError::Io { offset: 0, source })
    }

    /// Check a read or write's segments and range; returns its image offset.
    fn check(&self, req: &Request) -> Result<u64, RequestError> {
        let n = usize::from(req.nr_segments);
        if n == 0 || n > MAX_SEGMENTS {
            return Err(RequestError::SegmentCount(req.nr_segments));
        }
        let mut total = 0u64;
        for s in &req.seg[..n] {
            if s.first_sect > s.last_sect || s.last_sect > 7 {
                return Err(RequestError::BadSegment {
                    first: s.first_sect,
                    last: s.last_sect,
                });
            }
            total += u64::from(s.last_sect - s.first_sect) + 1;
        }
        self.image
            .range(req.sector_number, total)
            .map_err(RequestError::PastEnd)
    }

    /// Move the segments' sectors between the granted pages and the disk: the grants
    /// are mapped (marked in use), the data moves in one `preadv`/`pwritev` straight
    /// between the image and the granted pages, and the grants are released.
    fn transfer(
        &self,
        req: &Request,
        write: bool,
        mapped: &mut Vec<Mapping>,
        data: &mut Gather<'_>,
    ) -> Result<(), RequestError> {
        let offset = self.check(req)?;
        let segs = &req.seg[..usize::from(req.nr_segments)];
        let result = gather_segments(&self.grants, segs, write, mapped, data).and_then(|()| {
            let moved = if write {
                self.image.write(data, offset)
            } else {
                self.image.read(data, offset)
            };
            moved.map_err(|source| RequestError::Io { offset, source })
        });
        self.release(mapped, 0);
        data.clear();
        result
    }

    /// Release the grants in `mapped` from index `from` on.
    fn release(&self, mapped: &mut Vec<Mapping>, from: usize) {
        for mapping in mapped.drain(from..) {
            // Mapped by this backend and released once: cannot fail.
            let _ = self.grants.unmap(mapping);
        }
    }
}

impl ReadRun {
    /// Whether a read at image offset `offset` can join the run gathered in `data`.
    fn continues(&self, offset: u64, data: &Gather<'_>) -> bool {
        self.merged.continues(offset, data)
    }

    /// Map `req`'s grants and gather its segments (the caller checked it reads at
    /// `offset`); on a refused grant nothing of it stays mapped or gathered.
    fn hold(
        &mut self,
        req: &Request,
        offset: u64,
        disk: &Disk,
        data: &mut Gather<'_>,
    ) -> Result<(), RequestError> {
        let (first_mapped, first_range) = (self.mapped.len(), data.mark());
        let segs = &req.seg[..usize::from(req.nr_segments)];
        if let Err(e) = gather_segments(&disk.grants, segs, false, &mut self.mapped, data) {
            disk.release(&mut self.mapped, first_mapped);
            data.truncate(first_range);
            return Err(e);
        }
        let bytes = segs
            .iter()
            .map(|s| (u64::from(s.last_sect - s.first_sect) + 1) * SECTOR)
            .sum::<u64>();
        self.merged.hold(req.id, offset, bytes, data);
        Ok(())
    }

    /// Do the held reads, release their grants and push their responses.
    fn flush(
        &mut self,
        ring: &mut BackRing<GuestRingMemory, Request, Response>,
        disk: &Disk,
        data: &mut Gather<'_>,
    ) -> Result<(), BlkifError> {
        if self.merged.is_empty() {
            return Ok(());
        }
        let answers = &mut self.answers;
        self.merged.flush(&disk.image, data, |id, offset, result| {
            let status = match result {
                Ok(()) => STATUS_OKAY,
                Err(source) => {
                    log::warn!(
                        "pv-block: request {id} failed on the host: disk I/O at byte {offset}: {source}"
                    );
                    STATUS_ERROR
                }
            };
            answers.push((id, status));
        });
        disk.release(&mut self.mapped, 0);
        let mut pushed = Ok(());
        for (id, status) in self.answers.drain(..) {
            if pushed.is_ok() {
                pushed = ring
                    .push_response(&Response {
                        id,
                        operation: OP_READ,
                        status,
                    })
                    .map_err(BlkifError::Ring);
            }
        }
        pushed
    }
}

/// Map each segment's grant (writable for a read into it) into `mapped`, and gather
/// its sectors into `data`.
fn gather_segments(
    grants: &GrantTable,
    segs: &[Segment],
    write: bool,
    mapped: &mut Vec<Mapping>,
    data: &mut Gather<'_>,
) -> Result<(), RequestError> {
    for s in segs {
        let grant = |source| RequestError::Grant {
            gref: s.gref,
            source,
        };
        let mapping = grants.map(s.gref, !write).map_err(grant)?;
        mapped.push(mapping);
        let first = u64::from(s.first_sect) * SECTOR;
        let len = (u64::from(s.last_sect - s.first_sect) + 1) * SECTOR;
        data.push(GuestAddress(mapping.page.0 + first), len as usize)
            .map_err(|_| {
                grant(GrantError::BadFrame {
                    gref: s.gref,
                    frame: (mapping.page.0 / crate::grant::PAGE) as u32,
                })
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
