//! File I/O straight between a file and guest memory: guest ranges gathered into I/O
//! vectors, moved by one `preadv`/`pwritev` with no bounce buffer, and the guest pages
//! a read filled marked dirty.
//!
//! [`IoVecs`] is the storage a device thread keeps (it allocates only while it grows);
//! [`IoVecs::gather`] borrows it together with the guest memory and returns a
//! [`Gather`], so the host addresses it holds are used only while that memory is
//! borrowed. This module is the one place that hands guest memory to the kernel.
//!
//! ```
//! use std::os::unix::fs::FileExt;
//! use vm_memory::{Bytes, GuestAddress};
//! use vmcraft_memory::{layout::MemoryLayout, vectored::IoVecs, GuestRam};
//!
//! let ram = GuestRam::new(&MemoryLayout::x86_64(16 << 20).unwrap()).unwrap();
//! let file = tempfile_with(b"0123456789");
//! let mut vecs = IoVecs::default();
//! let mut gather = vecs.gather(ram.memory());
//! gather.push(GuestAddress(0x1000), 4).unwrap();
//! gather.push(GuestAddress(0x2000), 6).unwrap();
//! gather.read_from(&file, 0).unwrap();
//! let mut got = [0u8; 6];
//! ram.memory().read_slice(&mut got, GuestAddress(0x2000)).unwrap();
//! assert_eq!(&got, b"456789");
//! # fn tempfile_with(b: &[u8]) -> std::fs::File {
//! #     let path = std::env::temp_dir().join(format!("vmcraft-vectored-doc-{}", std::process::id()));
//! #     let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
//! #     std::fs::remove_file(&path).unwrap();
//! #     file.write_all_at(b, 0).unwrap();
//! #     file
//! # }
//! ```

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use thiserror::Error;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::GuestMemory;

/// A guest range that is not wholly in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("{len} bytes at guest address {addr:#x} are not in guest memory")]
pub struct NotInMemory {
    /// The range's guest address.
    pub addr: u64,
    /// Its length.
    pub len: usize,
}

/// The most vectors one system call takes (Linux's `UIO_MAXIOV`); longer lists are
/// moved in several calls.
pub const MAX_VECTORS: usize = 1024;

/// Storage for gathered I/O vectors, kept from one request to the next.
#[derive(Debug, Default)]
pub struct IoVecs {
    iov: Vec<libc::iovec>,
    /// The guest ranges the vectors cover, in the same order (one each).
    ranges: Vec<GuestAddress>,
    /// A copy of a stretch of `iov` for a system call to narrow as it goes.
    work: Vec<libc::iovec>,
}

// SAFETY: the raw pointers in the vectors are only written by `Gather::push` and read by
// the `Gather` methods, and a `Gather` borrows the guest memory they point into for its
// whole life; `IoVecs::gather` empties the lists first. Outside a `Gather` the pointers
// are never dereferenced, so moving the storage to another thread moves no reference.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Start gathering ranges of `mem` (what was gathered before is dropped).
    pub fn gather<'a>(&'a mut self, mem: &'a GuestMemory) -> Gather<'a> {
        self.iov.clear();
        self.ranges.clear();
        Gather { mem, vecs: self }
    }
}

/// Guest ranges gathered for one transfer (see the module documentation).
#[derive(Debug)]
pub struct Gather<'a> {
    mem: &'a GuestMemory,
    vecs: &'a mut IoVecs,
}

/// A position in a [`Gather`]'s list (see [`Gather::mark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark(usize);

impl Gather<'_> {
    /// Append `len` bytes at `addr` (split where it crosses from one memory region to
    /// the next).
    pub fn push(&mut self, addr: GuestAddress, len: usize) -> Result<(), NotInMemory> {
        let whole = NotInMemory { addr: addr.0, len };
        let mut guest = addr;
        let mut left = len;
        while left > 0 {
            let (region, at) = self.mem.to_region_addr(guest).ok_or(whole)?;
            let here = (region.len() - at.0).min(left as u64) as usize;
            let host = region.get_host_address(at).map_err(|_| whole)?;
            self.vecs.iov.push(libc::iovec {
                iov_base: host.cast(),
                iov_len: here,
            });
            self.vecs.ranges.push(guest);
            left -= here;
            guest = GuestAddress(guest.0 + here as u64);
        }
        Ok(())
    }

    /// The current end of the list: a transfer of part of it runs between two marks.
    pub fn mark(&self) -> Mark {
        Mark(self.vecs.iov.len())
    }

    /// How many vectors are gathered.
    pub fn vectors(&self) -> usize {
        self.vecs.iov.len()
    }

    /// Drop what was gathered after `mark`.
    pub fn truncate(&mut self, mark: Mark) {
        self.vecs.iov.truncate(mark.0);
        self.vecs.ranges.truncate(mark.0);
    }

    /// Drop everything gathered.
    pub fn clear(&mut self) {
        self.vecs.iov.clear();
        self.vecs.ranges.clear();
    }

    /// Fill every gathered range, in order, from `file` at `offset`, and mark them
    /// dirty. A file that ends first is an `UnexpectedEof` error.
    pub fn read_from(&mut self, file: &File, offset: u64) -> io::Result<()> {
        let end = self.mark();
        self.read_part_from(Mark(0), end, file, offset)
    }

    /// [`read_from`](Self::read_from) for the ranges between two marks.
    pub fn read_part_from(
        &mut self,
        from: Mark,
        to: Mark,
        file: &File,
        offset: u64,
    ) -> io::Result<()> {
        self.load_work(from, to)?;
        // Every vector was resolved by `push` from `self.mem`, which this `Gather`
        // borrows: mapped guest RAM for the whole call (regions stay mapped while the
        // memory object lives); `transfer` only narrows vectors within their bounds.
        // No Rust reference covers guest RAM; the guest may touch the same bytes
        // concurrently, and the kernel copies into them as into any shared mapping.
        transfer(&mut self.vecs.work, offset, |v, at| {
            // SAFETY: the vectors are writable guest RAM no reference covers (above).
            unsafe { libc::preadv(file.as_raw_fd(), v.as_ptr(), v.len() as i32, at) }
        })?;
        for i in from.0..to.0 {
            self.mark_dirty(self.vecs.ranges[i], self.vecs.iov[i].iov_len);
        }
        Ok(())
    }

    /// Write every gathered range, in order, to `file` at `offset`.
    pub fn write_to(&mut self, file: &File, offset: u64) -> io::Result<()> {
        self.load_work(Mark(0), self.mark())?;
        transfer(&mut self.vecs.work, offset, |v, at| {
            // SAFETY: as in `read_part_from`; the kernel only reads the vectors.
            unsafe { libc::pwritev(file.as_raw_fd(), v.as_ptr(), v.len() as i32, at) }
        })
    }

    fn load_work(&mut self, from: Mark, to: Mark) -> io::Result<()> {
        let part = self
            .vecs
            .iov
            .get(from.0..to.0)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.vecs.work.clear();
        self.vecs.work.extend_from_slice(part);
        Ok(())
    }

    fn mark_dirty(&self, addr: GuestAddress, len: usize) {
        if let Some((region, MemoryRegionAddress(at))) = self.mem.to_region_addr(addr) {
            region.bitmap().mark_dirty(at as usize, len);
        }
    }
}

/// Run a vectored transfer to completion: `op(vectors, file offset)` is `preadv` or
/// `pwritev` and returns what the system call returned; short transfers continue where
/// they stopped, `EINTR` retries, a transfer of nothing (end of file) is an error, and
/// at most [`MAX_VECTORS`] go to one call.
fn transfer(
    iov: &mut [libc::iovec],
    mut at: u64,
    mut op: impl FnMut(&[libc::iovec], libc::off_t) -> isize,
) -> io::Result<()> {
    let mut start = 0;
    while start < iov.len() && iov[start].iov_len == 0 {
        start += 1;
    }
    while start < iov.len() {
        let off =
            libc::off_t::try_from(at).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let end = iov.len().min(start + MAX_VECTORS);
        let n = op(&iov[start..end], off);
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        at += n as u64;
        let mut n = n as usize;
        while n > 0 && start < iov.len() {
            let v = &mut iov[start];
            if n >= v.iov_len {
                n -= v.iov_len;
                start += 1;
            } else {
                v.iov_base = (v.iov_base as usize + n) as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
        while start < iov.len() && iov[start].iov_len == 0 {
            start += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MemoryLayout;
    use crate::GuestRam;
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;

    fn file_with(bytes: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!(
            "vmcraft-vectored-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.write_all_at(bytes, 0).unwrap();
        file
    }

    fn ram() -> GuestRam {
        GuestRam::new(&MemoryLayout::x86_64(16 << 20).unwrap()).unwrap()
    }

    #[test]
    fn reads_fill_the_ranges_in_order_and_mark_only_them_dirty() {
        let ram = ram();
        let mem = ram.memory();
        let pattern: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let file = file_with(&pattern);
        let mut vecs = IoVecs::default();
        let mut gather = vecs.gather(mem);
        gather.push(GuestAddress(0x20_0000), 1000).unwrap();
        gather.push(GuestAddress(0x30_0100), 2000).unwrap();
        gather.read_from(&file, 0).unwrap();
        let mut got = vec![0u8; 1000];
        mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(got, pattern[..1000]);
        let mut got = vec![0u8; 2000];
        mem.read_slice(&mut got, GuestAddress(0x30_0100)).unwrap();
        assert_eq!(got, pattern[1000..]);
        let region = mem.find_region(GuestAddress(0)).unwrap();
        assert!(region.bitmap().dirty_at(0x30_0100 + 1999));
        assert!(!region.bitmap().dirty_at(0x50_0000), "and nothing else");
    }

    #[test]
    fn a_part_between_marks_reads_alone() {
        let ram = ram();
        let mem = ram.memory();
        let file = file_with(&[7u8; 512]);
        let mut vecs = IoVecs::default();
        let mut gather = vecs.gather(mem);
        gather.push(GuestAddress(0x1000), 100).unwrap();
        let mid = gather.mark();
        gather.push(GuestAddress(0x2000), 100).unwrap();
        let end = gather.mark();
        gather.read_part_from(mid, end, &file, 0).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2063)).unwrap(), 7);
        assert!(gather.read_part_from(end, mid, &file, 0).is_err());
    }

    #[test]
    fn writes_take_the_ranges_in_order() {
        let ram = ram();
        let mem = ram.memory();
        mem.write_slice(&[1u8; 8], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[2u8; 8], GuestAddress(0x8000)).unwrap();
        let file = file_with(&[0u8; 32]);
        let mut vecs = IoVecs::default();
        let mut gather = vecs.gather(mem);
        gather.push(GuestAddress(0x1000), 8).unwrap();
        gather.push(GuestAddress(0x8000), 8).unwrap();
        gather.write_to(&file, 4).unwrap();
        let mut back = [0u8; 32];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back[..4], [0; 4]);
        assert_eq!(back[4..12], [1; 8]);
        assert_eq!(back[12..20], [2; 8]);
        assert_eq!(back[20..], [0; 12]);
    }

    #[test]
    fn a_range_outside_memory_and_a_short_file_are_errors() {
        let ram = ram();
        let file = file_with(&[5u8; 100]);
        let mut vecs = IoVecs::default();
        let mut gather = vecs.gather(ram.memory());
        assert_eq!(
            gather.push(GuestAddress(0xfff_ff00), 0x200),
            Err(NotInMemory {
                addr: 0xfff_ff00,
                len: 0x200
            })
        );
        gather.clear();
        gather.push(GuestAddress(0x1000), 512).unwrap();
        let err = gather.read_from(&file, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_short_transfer_continues_where_it_stopped() {
        let mut a = [0u8; 10];
        let mut b = [0u8; 10];
        let mut iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 10,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 10,
            },
        ];
        let mut calls = Vec::new();
        transfer(&mut iov, 100, |v, at| {
            calls.push((v.len(), v[0].iov_len, at));
            let left: usize = v.iter().map(|v| v.iov_len).sum();
            left.min(7) as isize
        })
        .unwrap();
        assert_eq!(calls, [(2, 10, 100), (2, 3, 107), (1, 6, 114)]);
    }
}
