//! The block engine behind every vmcraft disk: virtio-blk, Xen's blkif backend and
//! the ATA disk serve their requests through one [`BlockImage`] (a raw image, its
//! size in sectors, reads and writes straight between the image and guest memory,
//! flush, zeroing and discard, the error each gets) and, for queued transports,
//! [`MergedReads`] (reads of adjacent sectors from consecutive requests done as one
//! `preadv`, each request still answered alone).
//!
//! A transport keeps its own wire format and its own answers; what it asks of the
//! image is the same everywhere, and lives here once.
//!
//! ```
//! use std::os::unix::fs::FileExt;
//! use vmcraft_block::{BlockImage, SECTOR_SIZE};
//!
//! let file = tempfile(4 * SECTOR_SIZE);
//! let image = BlockImage::open(file, false).unwrap();
//! assert_eq!(image.sectors(), 4);
//! let offset = image.range(3, 1).unwrap();           // the last sector: fine
//! assert!(image.range(3, 2).is_err());                // past the end: refused
//! image.write_at(&[7; 512], offset).unwrap();
//! let mut back = [0u8; 512];
//! image.read_at(&mut back, offset).unwrap();
//! assert_eq!(back, [7; 512]);
//! # fn tempfile(len: u64) -> std::fs::File {
//! #     let path = std::env::temp_dir().join(format!("vmcraft-block-doc-{}", std::process::id()));
//! #     let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
//! #     std::fs::remove_file(&path).unwrap();
//! #     file.set_len(len).unwrap();
//! #     file
//! # }
//! ```

mod merged;

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use thiserror::Error;
use vmcraft_memory::vectored::Gather;

pub use merged::MergedReads;

/// The unit of every block address and length here.
pub const SECTOR_SIZE: u64 = 512;

/// A request for sectors outside the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("sectors from {start} ({count} of them) run past the disk's {sectors}")]
pub struct OutOfRange {
    /// The first sector asked for.
    pub start: u64,
    /// How many.
    pub count: u64,
    /// The image's size in sectors.
    pub sectors: u64,
}

/// A raw disk image and what may be done with it.
///
/// Sized once, when opened, by seeking to its end: that sizes block devices too
/// (their metadata says 0 bytes), and a device thread under the sandbox may seek
/// where it may not `stat`. Reads and writes go at offsets (`pread`/`pwrite` and
/// their vectored forms), so one image serves several threads.
#[derive(Debug)]
pub struct BlockImage {
    file: File,
    sectors: u64,
    read_only: bool,
    /// Make every completed write stable before it is answered.
    write_through: AtomicBool,
    /// How many times the image was synced.
    syncs: AtomicU64,
}

impl BlockImage {
    /// The image in `file`: its length, rounded down to whole sectors, is its size.
    pub fn open(file: File, read_only: bool) -> io::Result<BlockImage> {
        let len = (&file).seek(SeekFrom::End(0))?;
        Ok(BlockImage {
            file,
            sectors: len / SECTOR_SIZE,
            read_only,
            write_through: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
        })
    }

    /// The image's size in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The image file (for I/O a transport moves itself, such as a chain of guest
    /// buffers; its writes then go through [`BlockImage::completed_write`]).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Give the image file back.
    pub fn into_file(self) -> File {
        self.file
    }

    /// The byte offset of `count` sectors from `start`, if they lie within the image.
    pub fn range(&self, start: u64, count: u64) -> Result<u64, OutOfRange> {
        match start.checked_add(count) {
            // The product cannot overflow: `start` < `sectors`, which came from a
            // byte length divided by the sector size.
            Some(end) if end <= self.sectors => Ok(start * SECTOR_SIZE),
            _ => Err(OutOfRange {
                start,
                count,
                sectors: self.sectors,
            }),
        }
    }

    /// Sync every completed write before it is answered (`true`), or only on
    /// [`flush`](Self::flush). A transport sets this when its driver cannot ask for a
    /// flush (virtio-blk without VIRTIO_BLK_F_FLUSH).
    pub fn set_write_through(&self, on: bool) {
        self.write_through.store(on, Ordering::Relaxed);
    }

    /// How many times the image has been synced.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Make every completed write durable (`fdatasync`).
    pub fn flush(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.file.sync_data()
    }

    /// After a write the transport moved itself: the write's result, synced first
    /// in write-through mode.
    pub fn completed_write(&self, written: io::Result<()>) -> io::Result<()> {
        written?;
        if self.write_through.load(Ordering::Relaxed) {
            self.flush()?;
        }
        Ok(())
    }

    /// Read the image at byte `offset` into the guest ranges gathered in `data`.
    pub fn read(&self, data: &mut Gather<'_>, offset: u64) -> io::Result<()> {
        data.read_from(&self.file, offset)
    }

    /// Write the guest ranges gathered in `data` to the image at byte `offset`.
    pub fn write(&self, data: &mut Gather<'_>, offset: u64) -> io::Result<()> {
        self.writable()?;
        let written = data.write_to(&self.file, offset);
        self.completed_write(written)
    }

    /// Read `buf.len()` bytes of the image at byte `offset` (a device that moves data
    /// through a buffer of its own, as ATA's PIO does).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Write `buf` to the image at byte `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writable()?;
        let written = self.file.write_all_at(buf, offset);
        self.completed_write(written)
    }

    /// Make `len` bytes at `offset` read as zeroes: the file system does it where it
    /// can, else zeroes are written.
    pub fn write_zeroes(&self, mut offset: u64, mut len: u64) -> io::Result<()> {
        self.writable()?;
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if fallocate(&self.file, mode, offset, len).is_err() {
            let zeroes = vec![0u8; len.min(64 << 10) as usize];
            while len > 0 {
                let n = len.min(zeroes.len() as u64) as usize;
                self.file.write_all_at(&zeroes[..n], offset)?;
                offset += n as u64;
                len -= n as u64;
            }
        }
        self.completed_write(Ok(()))
    }

    /// Let the host drop `len` bytes at `offset` (a hole punched). A hint: on a file
    /// system that cannot punch holes the data stays, and that is not an error.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if let Err(e) = fallocate(&self.file, mode, offset, len) {
            log::debug!("block: discard of {len} bytes at {offset} kept the data: {e}");
        }
        self.completed_write(Ok(()))
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the disk is read-only",
            ))
        } else {
            Ok(())
        }
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate only reads its integer arguments; the descriptor is open for as
    // long as `file` is borrowed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests;
