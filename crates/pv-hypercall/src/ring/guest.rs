//! Rings in vm-memory: guest memory, or a private host mapping shared by threads.

use core::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmcraft_memory::GuestMemory;

use super::{RingError, RingMemory};

/// A ring at a guest-physical address. Every access is bounds-checked against the
/// range validated at creation; should the memory vanish, loads read 0 and stores are
/// dropped rather than panic.
#[derive(Debug, Clone)]
pub struct GuestRingMemory {
    mem: GuestMemory,
    base: GuestAddress,
    size: usize,
}

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
        Ok(GuestRingMemory { mem, base, size })
    }

    fn at(&self, offset: usize) -> GuestAddress {
        GuestAddress(self.base.0 + offset as u64)
    }
}

impl RingMemory for GuestRingMemory {
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

/// A ring in a private host mapping, for two host threads (clones share it). The
/// mapping has no dirty bitmap: nothing migrates it.
#[derive(Debug, Clone)]
pub struct HostRingMemory {
    mem: vm_memory::GuestMemoryMmap<()>,
    size: usize,
}

impl HostRingMemory {
    /// A zeroed mapping of `size` bytes (rounded up to a page).
    pub fn new(size: usize) -> Result<Self, vm_memory::mmap::FromRangesError> {
        let mapped = size.max(1).div_ceil(4096) * 4096;
        let mem = vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mapped)])?;
        Ok(HostRingMemory { mem, size })
    }
}

impl RingMemory for HostRingMemory {
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
            .load::<u32>(GuestAddress(offset as u64), Ordering::Acquire)
            .unwrap_or(0)
    }
    #[inline]
    fn store_u32(&self, offset: usize, value: u32) {
        if offset + 4 <= self.size {
            let _ = self
                .mem
                .store(value, GuestAddress(offset as u64), Ordering::Release);
        }
    }
    #[inline]
    fn read(&self, offset: usize, buf: &mut [u8]) {
        if offset + buf.len() > self.size
            || self
                .mem
                .read_slice(buf, GuestAddress(offset as u64))
                .is_err()
        {
            buf.fill(0);
        }
    }
    #[inline]
    fn write(&self, offset: usize, data: &[u8]) {
        if offset + data.len() <= self.size {
            let _ = self.mem.write_slice(data, GuestAddress(offset as u64));
        }
    }
}
