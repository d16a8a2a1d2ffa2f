//! A descriptor chain's buffers, resolved to host memory once, for I/O straight between
//! a file and guest memory.
//!
//! virtio-queue's `Reader` and `Writer` copy through slices one call at a time and
//! allocate per chain. A block device wants the opposite: the whole data area of a
//! request as one vector of host buffers, handed to `preadv`/`pwritev` in one system
//! call, with no bounce buffer. [`ChainBuffers`] keeps that vector between requests
//! (no allocation once warm); [`ChainBuffers::load`] fills it from one chain and
//! returns a [`LoadedChain`] view that borrows guest memory. The system calls go
//! through [`vmcraft_memory::vectored`].
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

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion};
use vmcraft_memory::vectored::{Gather, IoVecs, NotInMemory};
use vmcraft_memory::GuestMemory;

use super::queue::ProtocolError;

/// One contiguous piece of a chain's buffers, within one memory region.
#[derive(Debug, Clone, Copy)]
struct Segment {
    guest: GuestAddress,
    len: usize,
}

/// Reusable storage for one descriptor chain's resolved buffers (see the module
/// documentation). Keep one per device thread and [`load`](Self::load) each chain.
#[derive(Debug, Default)]
pub struct ChainBuffers {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    io: IoVecs,
}

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

/// Append the pieces of `len` bytes at `addr`, one per memory region, to `list`.
fn resolve(
    mem: &GuestMemory,
    addr: GuestAddress,
    len: usize,
    list: &mut Vec<Segment>,
) -> Result<(), ProtocolError> {
    let mut guest = addr;
    let mut left = len;
    while left > 0 {
        let (region, at) = mem
            .to_region_addr(guest)
            .ok_or(ProtocolError::BufferNotInMemory { addr: addr.0, len })?;
        let here = (region.len() - at.0).min(left as u64) as usize;
        list.push(Segment { guest, len: here });
        left -= here;
        guest = offset_by(guest, here);
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
        for_range(&self.buffers.readable, offset, buf.len(), |at, n| {
            self.mem.read_slice(&mut buf[done..done + n], at)?;
            done += n;
            Ok(())
        })
    }

    /// Copy `bytes` into the device-writable area at `offset`.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), GuestMemoryError> {
        let mut done = 0;
        for_range(&self.buffers.writable, offset, bytes.len(), |at, n| {
            self.mem.write_slice(&bytes[done..done + n], at)?;
            done += n;
            Ok(())
        })
    }

    /// The guest address of the writable byte at `offset`.
    pub fn writable_address(&self, offset: usize) -> Option<GuestAddress> {
        let mut found = None;
        for_range(&self.buffers.writable, offset, 1, |at, _| {
            found = Some(at);
            Ok::<_, io::Error>(())
        })
        .ok()?;
        found
    }

    /// Append `len` writable bytes from `offset` (within the writable area) to
    /// `gather`, for a read into them.
    pub fn gather_writable(
        &self,
        offset: usize,
        len: usize,
        gather: &mut Gather<'_>,
    ) -> io::Result<()> {
        for_range(&self.buffers.writable, offset, len, |at, n| {
            gather.push(at, n).map_err(not_in_memory)
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
        self.transfer(true, offset, len, |gather| {
            gather.read_from(file, file_offset)
        })
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
        self.transfer(false, offset, len, |gather| {
            gather.write_to(file, file_offset)
        })
    }

    /// Gather `len` bytes from `offset` of the writable (or readable) area and run `io`
    /// on them.
    fn transfer(
        &mut self,
        writable: bool,
        offset: usize,
        len: usize,
        io: impl FnOnce(&mut Gather<'_>) -> io::Result<()>,
    ) -> io::Result<()> {
        let ChainBuffers {
            readable,
            writable: wr,
            io: vecs,
        } = &mut *self.buffers;
        let area = if writable { wr } else { readable };
        let mut gather = vecs.gather(self.mem);
        for_range(area, offset, len, |at, n| {
            gather.push(at, n).map_err(not_in_memory)
        })?;
        io(&mut gather)
    }
}

fn not_in_memory(e: NotInMemory) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

fn offset_by(addr: GuestAddress, by: usize) -> GuestAddress {
    GuestAddress(addr.0 + by as u64)
}

/// Call `f(guest address, bytes)` for the pieces of `list` that cover `len` bytes from
/// `offset`; an area shorter than that is an error.
fn for_range<E: PastEnd>(
    list: &[Segment],
    mut offset: usize,
    mut len: usize,
    mut f: impl FnMut(GuestAddress, usize) -> Result<(), E>,
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
        f(offset_by(seg.guest, offset), n)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_util::desc;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::bitmap::Bitmap as _;
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
}
