//! Rings in vm-memory: guest memory, or a private host mapping shared by threads.

use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmcraft_memory::GuestMemory;

use super::{RawRingMemory, RingError, RingMemory};

/// A ring in vm-memory: `size` bytes at `base` of a [`GuestMemoryMmap`] with bitmap
/// `B`, inside one of its regions.
///
/// The range is checked once, at creation; then every access goes straight to the
/// mapping through [`RawRingMemory`] (atomic indices, volatile entries, each access
/// bounds-checked against `size`), with no region lookup, and writes mark the
/// region's dirty bitmap directly. The value holds the region's mapping, which keeps
/// it alive.
///
/// Use it through [`GuestRingMemory`] (a ring in guest memory) or
/// [`HostRingMemory`] (a private mapping for two host threads).
#[derive(Debug, Clone)]
pub struct VmRingMemory<B: Bitmap> {
    /// The mapping that holds the ring, and its dirty bitmap.
    region: Arc<MmapRegion<B>>,
    /// The ring's offset within `region`.
    offset: usize,
    raw: RawRingMemory,
}

// SAFETY: `raw` points into the mapping `region` keeps alive (an `MmapRegion` unmaps
// only when the last `Arc` to it drops), and every access through it is atomic or
// volatile, which is how two sides share a ring page. The bitmaps used here (none, or
// vm-memory's AtomicBitmap) are Send and Sync.
unsafe impl<B: Bitmap + Send> Send for VmRingMemory<B> {}
// SAFETY: as for Send: `&VmRingMemory` only reaches the page through atomic and
// volatile accesses, and marks dirty pages through the bitmap's own `&self` methods.
unsafe impl<B: Bitmap + Sync> Sync for VmRingMemory<B> {}

/// A ring at a guest-physical address. Writes mark guest pages dirty, as every VMM
/// write to guest memory does.
pub type GuestRingMemory = VmRingMemory<vm_memory::bitmap::AtomicBitmap>;

/// A ring in a private host mapping, for two host threads (clones share it). The
/// mapping has no dirty bitmap: nothing migrates it.
pub type HostRingMemory = VmRingMemory<()>;

impl<B: Bitmap> VmRingMemory<B> {
    /// The `size` bytes at `base` of `mem`: 8-aligned, not empty, inside one region.
    fn attach(
        mem: &GuestMemoryMmap<B>,
        base: GuestAddress,
        size: usize,
    ) -> Result<Self, RingError> {
        let bad = RingError::BadLayout {
            size,
            entry_size: 0,
        };
        if !base.0.is_multiple_of(8) || size == 0 {
            return Err(bad);
        }
        let (region, at) = mem.to_region_addr(base).ok_or(bad)?;
        let offset = at.0 as usize;
        if (region.len() as usize).saturating_sub(offset) < size {
            return Err(bad);
        }
        let host = region.get_host_address(at).map_err(|_| bad)?;
        // SAFETY: `host` is 8-aligned (so is base; regions are page-aligned) and valid
        // for `size` bytes: they lie in one mapped region, whose mapping (stored beside
        // the pointer) stays mapped while this value or a clone lives.
        let raw = unsafe { RawRingMemory::new(host, size) };
        Ok(VmRingMemory {
            region: region.get_mmap(),
            offset,
            raw,
        })
    }

    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.region.bitmap().mark_dirty(self.offset + offset, len);
    }
}

impl GuestRingMemory {
    /// The `size` bytes at `base` (8-aligned, inside one region of guest memory).
    pub fn new(mem: GuestMemory, base: GuestAddress, size: usize) -> Result<Self, RingError> {
        Self::attach(&mem, base, size)
    }
}

impl HostRingMemory {
    /// A zeroed mapping of `size` bytes (rounded up to a page).
    pub fn new(size: usize) -> Result<Self, vm_memory::mmap::FromRangesError> {
        let mapped = size.max(1).div_ceil(4096) * 4096;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mapped)])?;
        Ok(Self::attach(&mem, GuestAddress(0), size.max(1))
            .expect("a fresh mapping holds its own range"))
    }
}

impl<B: Bitmap> RingMemory for VmRingMemory<B> {
    #[inline]
    fn size(&self) -> usize {
        self.raw.size()
    }
    #[inline]
    fn load_u32(&self, offset: usize) -> u32 {
        self.raw.load_u32(offset)
    }
    #[inline]
    fn store_u32(&self, offset: usize, value: u32) {
        self.raw.store_u32(offset, value);
        self.mark_dirty(offset, 4);
    }
    #[inline]
    fn read(&self, offset: usize, buf: &mut [u8]) {
        self.raw.read(offset, buf)
    }
    #[inline]
    fn write(&self, offset: usize, data: &[u8]) {
        self.raw.write(offset, data);
        self.mark_dirty(offset, data.len());
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;
    use vmcraft_memory::{layout::MemoryLayout, GuestRam};

    use super::*;
    use crate::ring::{BackRing, Entry, FrontRing};

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Word(u32);
    impl Entry for Word {
        const SIZE: usize = 4;
        fn encode(&self, out: &mut [u8]) {
            out.copy_from_slice(&self.0.to_le_bytes());
        }
        fn decode(b: &[u8]) -> Self {
            Word(u32::from_le_bytes(b.try_into().unwrap()))
        }
    }

    #[test]
    fn guest_memory_rings_are_bounds_checked() {
        let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
        let mem = ram.memory().clone();
        assert!(
            GuestRingMemory::new(mem.clone(), GuestAddress(0x1004), 4096).is_err(),
            "misaligned"
        );
        assert!(GuestRingMemory::new(mem.clone(), GuestAddress((1 << 20) - 100), 4096).is_err());
        assert!(GuestRingMemory::new(mem.clone(), GuestAddress(u64::MAX - 8), 4096).is_err());
        let ring = GuestRingMemory::new(mem, GuestAddress(0x1000), 4096).unwrap();
        let mut f = FrontRing::<_, Word, Word>::init(ring.clone()).unwrap();
        let mut b = BackRing::<_, Word, Word>::attach(ring).unwrap();
        f.push_request(&Word(5)).unwrap();
        f.publish_requests();
        assert_eq!(b.pop_request().unwrap(), Some(Word(5)));
    }

    #[test]
    fn ring_writes_mark_guest_pages_dirty_and_reads_do_not() {
        use std::ops::Deref;
        use vm_memory::GuestMemoryBackend;
        let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
        let mem = ram.memory().clone();
        let dirty = || {
            let region = mem.iter().next().unwrap();
            region.deref().bitmap().get_and_reset()[0]
        };
        // A two-page ring at 0x3000: the header in page 3, then 1024 entries of 4
        // bytes from offset 64, the last ones in page 4.
        let ring = GuestRingMemory::new(ram.memory().clone(), GuestAddress(0x3000), 8192).unwrap();
        let mut f = FrontRing::<_, Word, Word>::init(ring.clone()).unwrap();
        let mut b = BackRing::<_, Word, Word>::attach(ring).unwrap();
        dirty();
        f.push_request(&Word(1)).unwrap();
        assert_eq!(dirty(), 1 << 3, "the entry's page");
        f.publish_requests();
        assert_eq!(dirty(), 1 << 3, "the header's page");
        assert_eq!(b.pop_request().unwrap(), Some(Word(1)));
        assert_eq!(dirty(), 0, "reading dirties nothing");
        b.push_response(&Word(1)).unwrap();
        b.publish_responses();
        f.pop_response().unwrap();
        for i in 0..1100 {
            f.push_request(&Word(i)).unwrap();
            f.publish_requests();
            b.pop_request().unwrap();
            b.push_response(&Word(i)).unwrap();
            b.publish_responses();
            f.pop_response().unwrap();
        }
        assert_eq!(dirty(), (1 << 3) | (1 << 4), "entries in both pages");
    }

    #[test]
    fn host_rings_are_shared_by_their_clones() {
        let page = HostRingMemory::new(4096).unwrap();
        let mut f = FrontRing::<_, Word, Word>::init(page.clone()).unwrap();
        let mut b = BackRing::<_, Word, Word>::attach(page).unwrap();
        f.push_request(&Word(9)).unwrap();
        f.publish_requests();
        assert_eq!(b.pop_request().unwrap(), Some(Word(9)));
    }
}
