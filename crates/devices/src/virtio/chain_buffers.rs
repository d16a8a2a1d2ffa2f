//! A descriptor chain's buffers, resolved to host memory once, for I/O straight between
//! a file and guest memory.
//!
//! virtio-queue's `Reader` and `Writer` copy through slices one call at a time and
//! allocate per chain. A block device wants the opposite: the whole data area of a
//! request as one vector of host buffers, handed to `preadv`/`pwritev` in one system
//! call, with no bounce buffer. [`ChainBuffers`] keeps that vector between requests
//! (no allocation once warm); [`ChainBuffers::load`] fills it from one chain and
//! returns a [`LoadedChain`] view that borrows guest memory, so the host addresses in
//! it are used only while the memory they point into is alive.
//!
//! The split follows virtio 1.2 §2.7.4.2 as virtio-queue's `Reader` and `Writer` do:
//! the device-readable bytes are the descriptors before the first device-writable one,
//! the device-writable bytes are every device-writable descriptor. Every buffer must lie
//! in guest memory (a buffer that spans two memory regions is split in two).
//!
//! ```
//! use vm_memory::{Bytes, GuestAddress};
//! use vmcraft_devices::virtio::chain_buffers::ChainBuffers;
//! use vmcraft_devices::virtio::virtio_queue::mock::MockSplitQueue;
//! use vmcraft_devices::virtio::virtio_queue::desc::{split::Descriptor, RawDescriptor};
//! use vmcraft_devices::virtio::virtio_queue::{Queue, QueueOwnedT};
//! use vmcraft_memory::{layout::MemoryLayout, GuestRam};
//!
//! let ram = GuestRam::new(&MemoryLayout::x86_64(16 << 20).unwrap()).unwrap();
//! let mem = ram.memory();
//! mem.write_slice(b"hello", GuestAddress(0x10_0000)).unwrap();
//! // One device-readable buffer of 5 bytes, then one device-writable of 8.
//! let descs = [
//!     RawDescriptor::from(Descriptor::new(0x10_0000, 5, 1, 1)),
//!     RawDescriptor::from(Descriptor::new(0x20_0000, 8, 2, 0)),
//! ];
//! let mock = MockSplitQueue::new(mem, 16);
//! mock.add_desc_chains(&descs, 0).unwrap();
//! let mut queue: Queue = mock.create_queue().unwrap();
//! let chain = queue.iter(mem).unwrap().next().unwrap();
//!
//! let mut buffers = ChainBuffers::default();
//! let loaded = buffers.load(mem, chain).unwrap();
//! assert_eq!((loaded.readable_len(), loaded.writable_len()), (5, 8));
//! let mut word = [0u8; 5];
//! loaded.read(0, &mut word).unwrap();
//! assert_eq!(&word, b"hello");
//! ```

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmcraft_memory::GuestMemory;

use super::queue::ProtocolError;

/// One contiguous piece of a chain's buffers: where it is in the guest, where that is
/// in this process, and its length. Within one memory region.
#[derive(Debug, Clone, Copy)]
struct Segment {
    guest: GuestAddress,
    /// The host address of `guest`, kept as an integer: it is only meaningful while the
    /// memory it was resolved from is borrowed by a [`LoadedChain`].
    host: usize,
    len: usize,
}

/// Reusable storage for one descriptor chain's resolved buffers (see the module
/// documentation). Keep one per device thread and [`load`](Self::load) each chain.
#[derive(Debug, Default)]
pub struct ChainBuffers {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    iov: Vec<libc::iovec>,
}

// SAFETY: the raw pointers in `iov` are scratch space: `load` clears it, and it is
// filled and used only within one call of `LoadedChain::{read_file, write_file}`, which
// borrows the guest memory they point into. Between calls they are never dereferenced,
// so moving the storage to another thread moves no live reference.
unsafe impl Send for ChainBuffers {}

/// One chain's buffers, resolved by [`ChainBuffers::load`]; borrows the guest memory.
#[derive(Debug)]
pub struct LoadedChain<'a> {
    mem: &'a GuestMemory,
    buffers: &'a mut ChainBuffers,
    readable_len: usize,
    writable_len: usize,
}

impl ChainBuffers {
    /// Resolve every buffer of `chain` in `mem`. The chain must already be known to
    /// end (see [`super::queue::check_chain`]); a buffer outside guest memory or
    /// lengths that overflow are a [`ProtocolError`].
    pub fn load<'a>(
        &'a mut self,
        mem: &'a GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
    ) -> Result<LoadedChain<'a>, ProtocolError> {
        self.readable.clear();
        self.writable.clear();
        self.iov.clear();
        let (mut readable_len, mut writable_len) = (0usize, 0usize);
        let mut seen_writable = false;
        for desc in chain {
            let (list, total) = if desc.is_write_only() {
                seen_writable = true;
                (&mut self.writable, &mut writable_len)
            } else if seen_writable {
                // A device-readable buffer after a writable one: not part of either
                // area (as virtio-queue's Reader and Writer see the chain).
                continue;
            } else {
                (&mut self.readable, &mut readable_len)
            };
            let len = desc.len() as usize;
            *total = total
                .checked_add(len)
                .ok_or(ProtocolError::LengthOverflow)?;
            resolve(mem, desc.addr(), len, list)?;
        }
        Ok(LoadedChain {
            mem,
            buffers: self,
            readable_len,
            writable_len,
        })
    }
}

/// Append the host segments of `len` bytes at `addr` to `list`.
fn resolve(
    mem: &GuestMemory,
    addr: GuestAddress,
    len: usize,
    list: &mut Vec<Segment>,
) -> Result<(), ProtocolError> {
    let mut guest = addr;
    let mut left = len;
    while left > 0 {
        let outside = || ProtocolError::BufferNotInMemory { addr: addr.0, len };
        let (region, at) = mem.to_region_addr(guest).ok_or_else(outside)?;
        let here = (region.len() - at.0).min(left as u64) as usize;
        let host = region.get_host_address(at).map_err(|_| outside())?;
        list.push(Segment {
            guest,
            host: host as usize,
            len: here,
        });
        left -= here;
        guest = GuestAddress(guest.0 + here as u64);
    }
    Ok(())
}

impl LoadedChain<'_> {
    /// Device-readable bytes in the chain.
    pub fn readable_len(&self) -> usize {
        self.readable_len
    }

    /// Device-writable bytes in the chain.
    pub fn writable_len(&self) -> usize {
        self.writable_len
    }

    /// Copy `buf.len()` device-readable bytes from `offset` (within the readable area)
    /// into `buf`.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        let mut done = 0;
        for_range(&self.buffers.readable, offset, buf.len(), |seg, at, n| {
            let got = self
                .mem
                .read_slice(&mut buf[done..done + n], offset_by(seg.guest, at))
                .map(|()| n);
            done += n;
            got
        })
    }

    /// Copy `bytes` into the device-writable area at `offset`.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), GuestMemoryError> {
        let mut done = 0;
        for_range(&self.buffers.writable, offset, bytes.len(), |seg, at, n| {
            let put = self
                .mem
                .write_slice(&bytes[done..done + n], offset_by(seg.guest, at))
                .map(|()| n);
            done += n;
            put
        })
    }

    /// Fill `len` device-writable bytes from `offset` (within the writable area) with
    /// the file's bytes at `file_offset`, straight into guest memory (`preadv`), and
    /// mark them dirty. A file shorter than that is an `UnexpectedEof` error.
    pub fn read_file(
        &mut self,
        file: &File,
        file_offset: u64,
        offset: usize,
        len: usize,
    ) -> io::Result<()> {
        self.vectors(true, offset, len)?;
        // SAFETY: every vector points into guest memory resolved by `load` from
        // `self.mem`, which this view borrows for the whole call.
        unsafe { read_vectors(file, &mut self.buffers.iov, file_offset) }?;
        self.mark_written(offset, len);
        Ok(())
    }

    /// Write `len` device-readable bytes from `offset` (within the readable area) to the
    /// file at `file_offset`, straight from guest memory (`pwritev`).
    pub fn write_file(
        &mut self,
        file: &File,
        file_offset: u64,
        offset: usize,
        len: usize,
    ) -> io::Result<()> {
        self.vectors(false, offset, len)?;
        transfer(&mut self.buffers.iov, file_offset, |v, at| {
            // SAFETY: as in `read_file`: every vector points into mapped guest memory
            // that `self.mem` keeps alive for the call; the kernel only reads it.
            unsafe { libc::pwritev(file.as_raw_fd(), v.as_ptr(), v.len() as i32, at) }
        })
    }

    /// Build the I/O vectors for `len` bytes at `offset` of one area.
    fn vectors(&mut self, writable: bool, offset: usize, len: usize) -> io::Result<()> {
        let ChainBuffers {
            readable,
            writable: wr,
            iov,
        } = &mut *self.buffers;
        let list = if writable { wr } else { readable };
        iov.clear();
        for_range(list, offset, len, |seg, at, n| {
            iov.push(libc::iovec {
                iov_base: (seg.host + at) as *mut libc::c_void,
                iov_len: n,
            });
            Ok::<_, io::Error>(n)
        })
    }

    /// Mark `len` writable bytes from `offset` dirty in the guest memory's bitmap.
    fn mark_written(&self, offset: usize, len: usize) {
        let _ = for_range(&self.buffers.writable, offset, len, |seg, at, n| {
            mark_dirty(self.mem, offset_by(seg.guest, at), n);
            Ok::<_, io::Error>(n)
        });
    }

    /// The guest address of the writable byte at `offset`.
    pub fn writable_address(&self, offset: usize) -> Option<GuestAddress> {
        let mut found = None;
        for_range(&self.buffers.writable, offset, 1, |seg, at, n| {
            found = Some(offset_by(seg.guest, at));
            Ok::<_, io::Error>(n)
        })
        .ok()?;
        found
    }

    /// Append the host vectors of `len` writable bytes from `offset` to `iov`, and the
    /// guest ranges they cover to `ranges`. The vectors point into the memory this view
    /// borrows: the caller must use them only while that memory is alive.
    pub(crate) fn append_writable(
        &self,
        offset: usize,
        len: usize,
        iov: &mut Vec<libc::iovec>,
        ranges: &mut Vec<(GuestAddress, usize)>,
    ) -> io::Result<()> {
        for_range(&self.buffers.writable, offset, len, |seg, at, n| {
            iov.push(libc::iovec {
                iov_base: (seg.host + at) as *mut libc::c_void,
                iov_len: n,
            });
            ranges.push((offset_by(seg.guest, at), n));
            Ok::<_, io::Error>(n)
        })
    }
}

/// Mark `len` bytes at `addr` (within one region) dirty in `mem`'s bitmap.
pub(crate) fn mark_dirty(mem: &GuestMemory, addr: GuestAddress, len: usize) {
    if let Some((region, MemoryRegionAddress(r))) = mem.to_region_addr(addr) {
        region.bitmap().mark_dirty(r as usize, len);
    }
}

/// Fill `iov` from `file` at `at`, to completion (`preadv`; see [`transfer`]).
///
/// # Safety
///
/// Every vector must point to memory that is valid for writes of its length for the
/// whole call and that nothing in this process holds a reference to (guest memory
/// that is mapped for as long as the call lasts).
pub(crate) unsafe fn read_vectors(file: &File, iov: &mut [libc::iovec], at: u64) -> io::Result<()> {
    transfer(iov, at, |v, at| {
        // SAFETY: the caller guarantees each vector is writable memory no reference
        // covers; `transfer` only narrows vectors within their bounds. The guest may
        // touch the same bytes concurrently: the kernel copies into them as into any
        // shared mapping.
        unsafe { libc::preadv(file.as_raw_fd(), v.as_ptr(), v.len() as i32, at) }
    })
}

fn offset_by(addr: GuestAddress, by: usize) -> GuestAddress {
    GuestAddress(addr.0 + by as u64)
}

/// Call `f(segment, offset in segment, bytes)` for the pieces of `list` that cover
/// `len` bytes from `offset`; an area shorter than that is an error.
fn for_range<E: PastEnd>(
    list: &[Segment],
    mut offset: usize,
    mut len: usize,
    mut f: impl FnMut(&Segment, usize, usize) -> Result<usize, E>,
) -> Result<(), E> {
    for seg in list {
        if len == 0 {
            break;
        }
        if offset >= seg.len {
            offset -= seg.len;
            continue;
        }
        let n = (seg.len - offset).min(len);
        f(seg, offset, n)?;
        len -= n;
        offset = 0;
    }
    if len > 0 {
        return Err(E::past_end());
    }
    Ok(())
}

/// The error for a byte range that extends past a chain's buffers.
trait PastEnd {
    fn past_end() -> Self;
}

impl PastEnd for io::Error {
    fn past_end() -> Self {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "range extends past the chain's buffers",
        )
    }
}

impl PastEnd for GuestMemoryError {
    fn past_end() -> Self {
        GuestMemoryError::IOError(io::Error::past_end())
    }
}

/// Run a vectored transfer to completion: `op(vectors, file offset)` is `preadv` or
/// `pwritev`; short transfers continue where they stopped, `EINTR` retries, and a
/// transfer of nothing (end of file) is an error.
fn transfer(
    iov: &mut [libc::iovec],
    mut at: u64,
    mut op: impl FnMut(&[libc::iovec], libc::off_t) -> isize,
) -> io::Result<()> {
    let mut start = 0;
    while start < iov.len() {
        let off =
            libc::off_t::try_from(at).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let end = iov.len().min(start + IOV_MAX);
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
        while n > 0 {
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

/// The most vectors one `preadv`/`pwritev` takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_util::desc;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vmcraft_memory::{layout::MemoryLayout, GuestRam};

    fn memory() -> GuestMemory {
        GuestRam::new(&MemoryLayout::x86_64(16 << 20).unwrap())
            .unwrap()
            .memory()
            .clone()
    }

    fn with_chain<R>(
        mem: &GuestMemory,
        descs: &[virtio_queue::desc::RawDescriptor],
        f: impl FnOnce(DescriptorChain<&GuestMemory>) -> R,
    ) -> R {
        let mock = MockSplitQueue::new(mem, 16);
        mock.add_desc_chains(descs, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let chain = queue.iter(mem).unwrap().next().unwrap();
        f(chain)
    }

    const W: u32 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    const N: u32 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;

    fn file_with(bytes: &[u8]) -> File {
        let file = vmm_sys_util::tempfile::TempFile::new_with_prefix("/tmp/vmcraft-chainbuf")
            .unwrap()
            .into_file();
        std::os::unix::fs::FileExt::write_all_at(&file, bytes, 0).unwrap();
        file
    }

    #[test]
    fn a_file_read_lands_across_scattered_buffers_and_marks_them_dirty() {
        let mem = memory();
        let pattern: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let file = file_with(&pattern);
        let descs = [
            desc(0x10_0000, 16, N, 1),
            desc(0x20_0000, 1000, W | N, 2),
            desc(0x30_0100, 2000, W | N, 3),
            desc(0x40_0000, 1, W, 0),
        ];
        let mut buffers = ChainBuffers::default();
        with_chain(&mem, &descs, |chain| {
            let mut loaded = buffers.load(&mem, chain).unwrap();
            assert_eq!((loaded.readable_len(), loaded.writable_len()), (16, 3001));
            loaded.read_file(&file, 0, 0, 3000).unwrap();
            loaded.write(3000, &[0xab]).unwrap();
        });
        let mut got = vec![0u8; 1000];
        mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(got, pattern[..1000]);
        let mut got = vec![0u8; 2000];
        mem.read_slice(&mut got, GuestAddress(0x30_0100)).unwrap();
        assert_eq!(got, pattern[1000..]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x40_0000)).unwrap(), 0xab);
        let region = mem.find_region(GuestAddress(0x30_0100)).unwrap();
        assert!(region.bitmap().dirty_at(0x30_0100 + 1999));
        assert!(!region.bitmap().dirty_at(0x50_0000), "and nothing else");
    }

    #[test]
    fn a_file_write_takes_the_readable_area_past_the_header() {
        let mem = memory();
        let file = file_with(&[0u8; 64]);
        mem.write_slice(&[1u8; 16], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(&[9u8; 32], GuestAddress(0x10_0010))
            .unwrap();
        let descs = [desc(0x10_0000, 48, N, 1), desc(0x40_0000, 1, W, 0)];
        let mut buffers = ChainBuffers::default();
        with_chain(&mem, &descs, |chain| {
            let mut loaded = buffers.load(&mem, chain).unwrap();
            loaded.write_file(&file, 8, 16, 32).unwrap();
        });
        let mut back = [0u8; 64];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 0).unwrap();
        assert_eq!(back[..8], [0; 8]);
        assert_eq!(back[8..40], [9; 32]);
        assert_eq!(back[40..], [0; 24]);
    }

    #[test]
    fn a_range_past_the_buffers_and_a_short_file_are_errors() {
        let mem = memory();
        let file = file_with(&[5u8; 100]);
        let descs = [desc(0x10_0000, 16, N, 1), desc(0x20_0000, 512, W, 0)];
        let mut buffers = ChainBuffers::default();
        with_chain(&mem, &descs, |chain| {
            let mut loaded = buffers.load(&mem, chain).unwrap();
            assert!(loaded.read_file(&file, 0, 0, 513).is_err());
            let err = loaded.read_file(&file, 0, 0, 512).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
            let mut header = [0u8; 17];
            assert!(loaded.read(0, &mut header).is_err());
        });
    }

    #[test]
    fn a_buffer_outside_memory_is_a_protocol_error_naming_it() {
        let mem = memory();
        let descs = [desc(0x10_0000, 16, N, 1), desc(0xfff_ff00, 0x200, W, 0)];
        let mut buffers = ChainBuffers::default();
        with_chain(&mem, &descs, |chain| match buffers.load(&mem, chain) {
            Err(ProtocolError::BufferNotInMemory { addr, len }) => {
                assert_eq!((addr, len), (0xfff_ff00, 0x200));
            }
            other => panic!("expected BufferNotInMemory, got {other:?}"),
        });
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
