//! Rings in vm-memory: guest memory, or a private host mapping shared by threads.

use core::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmcraft_memory::GuestMemory;

use super::{RingError, RingMemory};

/// A ring in vm-memory: `size` bytes at `base` of `M`. Every access is
/// bounds-checked against the range validated at creation; should the memory vanish,
/// loads read 0 and stores are dropped rather than panic.
///
/// Use it through [`GuestRingMemory`] (a ring in guest memory) or
/// [`HostRingMemory`] (a private mapping for two host threads).
#[derive(Debug, Clone)]
pub struct VmRingMemory<M> {
    mem: M,
    base: GuestAddress,
    size: usize,
}

/// A ring at a guest-physical address. Writes mark guest pages dirty, as every VMM
/// write to guest memory does.
pub type GuestRingMemory = VmRingMemory<GuestMemory>;

/// A ring in a private host mapping, for two host threads (clones share it). The
/// mapping has no dirty bitmap: nothing migrates it.
pub type HostRingMemory = VmRingMemory<vm_memory::GuestMemoryMmap<()>>;

impl GuestRingMemory {
    /// The `size` bytes at `base` (8-aligned, inside guest memory).
    pub fn new(mem: GuestMemory, base: GuestAddress, size: usize) -> Result<Self, RingError> {
        let bad = RingError::BadLayout {
            size,
            entry_size: 0,
        };
        if !base.0.is_multiple_of(8) || size == 0 {
            return Err(bad);
        }
        let last = base.0.checked_add(size as u64 - 1).ok_or(bad)?;
        if !mem.check_range(base, size) || !mem.address_in_range(GuestAddress(last)) {
            return Err(bad);
        }
        Ok(VmRingMemory { mem, base, size })
    }
}

impl HostRingMemory {
    /// A zeroed mapping of `size` bytes (rounded up to a page).
    pub fn new(size: usize) -> Result<Self, vm_memory::mmap::FromRangesError> {
        let mapped = size.max(1).div_ceil(4096) * 4096;
        let mem = vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mapped)])?;
        Ok(VmRingMemory {
            mem,
            base: GuestAddress(0),
            size,
        })
    }
}

impl<M> VmRingMemory<M> {
    fn at(&self, offset: usize) -> GuestAddress {
        GuestAddress(self.base.0 + offset as u64)
    }
}

impl<M: GuestMemoryBackend> RingMemory for VmRingMemory<M> {
    #[inline]
    fn size(&self) -> usize {
        self.size
    }
    #[inline]
    fn load_u32(&self, offset: usize) -> u32 {
        if offset + 4 > self.size {
            return 0;
        }
        self.mem
            .load::<u32>(self.at(offset), Ordering::Acquire)
            .unwrap_or(0)
    }
    #[inline]
    fn store_u32(&self, offset: usize, value: u32) {
        if offset + 4 <= self.size {
            let _ = self.mem.store(value, self.at(offset), Ordering::Release);
        }
    }
    #[inline]
    fn read(&self, offset: usize, buf: &mut [u8]) {
        if offset + buf.len() > self.size || self.mem.read_slice(buf, self.at(offset)).is_err() {
            buf.fill(0);
        }
    }
    #[inline]
    fn write(&self, offset: usize, data: &[u8]) {
        if offset + data.len() <= self.size {
            let _ = self.mem.write_slice(data, self.at(offset));
        }
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
    fn host_rings_are_shared_by_their_clones() {
        let page = HostRingMemory::new(4096).unwrap();
        let mut f = FrontRing::<_, Word, Word>::init(page.clone()).unwrap();
        let mut b = BackRing::<_, Word, Word>::attach(page).unwrap();
        f.push_request(&Word(9)).unwrap();
        f.publish_requests();
        assert_eq!(b.pop_request().unwrap(), Some(Word(9)));
    }
}
