//! Reads of adjacent sectors from consecutive requests, done as one `preadv`.

use std::io;

use vmcraft_memory::vectored::{Gather, Mark, MAX_VECTORS};

use crate::BlockImage;

/// Reads of adjacent sectors from consecutive requests, done as one `preadv` (as
/// QEMU merges virtio-blk requests): a driver reading sequentially with 32 requests
/// in flight costs one system call per batch instead of 32. Each request is still
/// answered alone: if the merged read fails, each is read again by itself, so one
/// bad sector fails only the request that holds it.
///
/// The transport gathers a request's guest ranges into the [`Gather`] it serves
/// from, then [`hold`](Self::hold)s the request with a tag of its own (a chain's
/// head, a ring request's id); [`flush`](Self::flush) does the held reads and hands
/// each tag back with its result, in order. A request that is not a read continuing
/// the run waits for a flush first, so nothing overtakes a read that came before it.
#[derive(Debug)]
pub struct MergedReads<T> {
    held: Vec<Held<T>>,
    /// Image offsets of the run's first byte and of one past its last.
    start: u64,
    end: u64,
    /// How many reads of the image the runs took.
    reads: u64,
}

#[derive(Debug)]
struct Held<T> {
    tag: T,
    bytes: u64,
    /// Where its ranges end in the gathered list.
    end: Mark,
}

impl<T> Default for MergedReads<T> {
    fn default() -> Self {
        MergedReads {
            held: Vec::new(),
            start: 0,
            end: 0,
            reads: 0,
        }
    }
}

impl<T> MergedReads<T> {
    /// Whether a read at image byte `offset` can join the run gathered in `data`
    /// (else [`flush`](Self::flush) first).
    pub fn continues(&self, offset: u64, data: &Gather<'_>) -> bool {
        self.held.is_empty() || (offset == self.end && data.vectors() < MAX_VECTORS)
    }

    /// Whether no read is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// How many reads of the image the runs have taken (one per merged run, one
    /// more per request read again alone).
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Hold a read of `bytes` bytes at image byte `offset`, whose guest ranges the
    /// caller has just gathered into `data`. The caller checked the range against the
    /// image and that the read [`continues`](Self::continues) the run.
    pub fn hold(&mut self, tag: T, offset: u64, bytes: u64, data: &Gather<'_>) {
        debug_assert!(self.held.is_empty() || offset == self.end);
        if self.held.is_empty() {
            self.start = offset;
        }
        self.end = offset + bytes;
        self.held.push(Held {
            tag,
            bytes,
            end: data.mark(),
        });
    }

    /// Do the held reads from `image` and hand each tag to `answer` with its image
    /// offset and result, in the order they were held; `data` is emptied.
    pub fn flush(
        &mut self,
        image: &BlockImage,
        data: &mut Gather<'_>,
        mut answer: impl FnMut(T, u64, io::Result<()>),
    ) {
        if self.held.is_empty() {
            return;
        }
        let merged = image.read(data, self.start);
        self.reads += 1;
        if let Err(e) = &merged {
            log::warn!(
                "block: merged read of {} requests at byte {} failed ({e}); reading each alone",
                self.held.len(),
                self.start
            );
        }
        let (mut from, mut offset) = (Mark::default(), self.start);
        for held in self.held.drain(..) {
            let result = match merged {
                Ok(()) => Ok(()),
                Err(_) => {
                    self.reads += 1;
                    data.read_part_from(from, held.end, image.file(), offset)
                }
            };
            answer(held.tag, offset, result);
            from = held.end;
            offset += held.bytes;
        }
        data.clear();
    }
}
