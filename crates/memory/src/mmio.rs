//! Allocation of guest-physical MMIO windows.
//!
//! ```
//! use vmcraft_memory::mmio::MmioAllocator;
//!
//! let mut windows = MmioAllocator::new(0xD000_0000, 0x1000_0000).unwrap();
//! let a = windows.allocate(0x1000, 0x1000).unwrap();
//! let b = windows.allocate(0x200, 0x1000).unwrap();
//! assert_eq!((a, b), (0xD000_0000, 0xD000_1000));
//! assert!(windows.allocate_at(0xD000_0800, 0x1000).is_err()); // overlaps `a`
//! ```

use std::collections::BTreeMap;
use thiserror::Error;

/// Why a window cannot be allocated.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum MmioAllocError {
    /// A zero-sized window was requested.
    #[error("an MMIO window cannot be empty")]
    ZeroSize,
    /// The alignment is not a power of two.
    #[error("alignment {0:#x} is not a power of two")]
    BadAlignment(u64),
    /// The requested address is not aligned as required.
    #[error("MMIO window at {addr:#x} is not aligned to {align:#x}")]
    Misaligned {
        /// Requested base.
        addr: u64,
        /// Required alignment.
        align: u64,
    },
    /// The window does not fit in the allocator's range.
    #[error("MMIO window {addr:#x}+{size:#x} lies outside {start:#x}..{end:#x}")]
    OutOfRange {
        /// Requested base.
        addr: u64,
        /// Requested size.
        size: u64,
        /// Start of the managed range.
        start: u64,
        /// End (exclusive) of the managed range.
        end: u64,
    },
    /// The window overlaps one already handed out.
    #[error("MMIO window {addr:#x}+{size:#x} overlaps {other:#x}+{other_size:#x}")]
    Overlap {
        /// Requested base.
        addr: u64,
        /// Requested size.
        size: u64,
        /// Base of the window it overlaps.
        other: u64,
        /// Size of the window it overlaps.
        other_size: u64,
    },
    /// No free space of that size and alignment is left.
    #[error("no free MMIO space for {size:#x} bytes aligned to {align:#x}")]
    Exhausted {
        /// Requested size.
        size: u64,
        /// Requested alignment.
        align: u64,
    },
}

/// Hands out non-overlapping windows from one guest-physical range.
#[derive(Debug, Clone)]
pub struct MmioAllocator {
    start: u64,
    end: u64,
    /// base -> size of every window handed out.
    used: BTreeMap<u64, u64>,
}

impl MmioAllocator {
    /// Manage `[start, start + size)`.
    pub fn new(start: u64, size: u64) -> Result<Self, MmioAllocError> {
        if size == 0 {
            return Err(MmioAllocError::ZeroSize);
        }
        let end = start.checked_add(size).ok_or(MmioAllocError::OutOfRange {
            addr: start,
            size,
            start: 0,
            end: u64::MAX,
        })?;
        Ok(MmioAllocator {
            start,
            end,
            used: BTreeMap::new(),
        })
    }

    /// The allocator for the free part of the x86-64 32-bit MMIO gap.
    pub fn x86_64_gap() -> Self {
        use crate::layout::{MMIO_GAP_RESERVED_START, MMIO_GAP_START};
        MmioAllocator {
            start: MMIO_GAP_START,
            end: MMIO_GAP_RESERVED_START,
            used: BTreeMap::new(),
        }
    }

    /// Reserve exactly `[addr, addr + size)`.
    pub fn allocate_at(&mut self, addr: u64, size: u64) -> Result<u64, MmioAllocError> {
        if size == 0 {
            return Err(MmioAllocError::ZeroSize);
        }
        let out_of_range = MmioAllocError::OutOfRange {
            addr,
            size,
            start: self.start,
            end: self.end,
        };
        let end = addr.checked_add(size).ok_or(out_of_range.clone())?;
        if addr < self.start || end > self.end {
            return Err(out_of_range);
        }
        // The only windows that can overlap: the last one starting below `end`.
        if let Some((&other, &other_size)) = self.used.range(..end).next_back() {
            if other + other_size > addr {
                return Err(MmioAllocError::Overlap {
                    addr,
                    size,
                    other,
                    other_size,
                });
            }
        }
        self.used.insert(addr, size);
        Ok(addr)
    }

    /// Reserve the lowest free window of `size` bytes aligned to `align`.
    pub fn allocate(&mut self, size: u64, align: u64) -> Result<u64, MmioAllocError> {
        if size == 0 {
            return Err(MmioAllocError::ZeroSize);
        }
        if !align.is_power_of_two() {
            return Err(MmioAllocError::BadAlignment(align));
        }
        let mut candidate = align_up(self.start, align);
        for (&base, &len) in &self.used {
            match candidate {
                Some(c) if c.checked_add(size).is_some_and(|e| e <= base) => break,
                Some(c) => candidate = align_up((base + len).max(c), align),
                None => break,
            }
        }
        match candidate {
            Some(c) if c.checked_add(size).is_some_and(|e| e <= self.end) => {
                self.used.insert(c, size);
                Ok(c)
            }
            _ => Err(MmioAllocError::Exhausted { size, align }),
        }
    }

    /// Reserve `[addr, addr + size)`, also checking that `addr` is aligned to `align`.
    pub fn allocate_aligned_at(
        &mut self,
        addr: u64,
        size: u64,
        align: u64,
    ) -> Result<u64, MmioAllocError> {
        if !align.is_power_of_two() {
            return Err(MmioAllocError::BadAlignment(align));
        }
        if addr & (align - 1) != 0 {
            return Err(MmioAllocError::Misaligned { addr, align });
        }
        self.allocate_at(addr, size)
    }

    /// Give back the window starting at `addr`; returns its size if there was one.
    pub fn free(&mut self, addr: u64) -> Option<u64> {
        self.used.remove(&addr)
    }
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|x| x & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_aligned_and_disjoint() {
        let mut a = MmioAllocator::new(0x1000, 0x10000).unwrap();
        let x = a.allocate(0x100, 0x1000).unwrap();
        let y = a.allocate(0x100, 0x1000).unwrap();
        let z = a.allocate(0x10, 0x10).unwrap();
        assert_eq!((x, y, z), (0x1000, 0x2000, 0x1100));
        assert_eq!(a.free(0x2000), Some(0x100));
        assert_eq!(a.allocate(0x1000, 0x1000).unwrap(), 0x2000);
    }

    #[test]
    fn bad_requests_get_clear_errors() {
        let mut a = MmioAllocator::new(0x1000, 0x2000).unwrap();
        assert_eq!(a.allocate(0, 1), Err(MmioAllocError::ZeroSize));
        assert_eq!(a.allocate(1, 3), Err(MmioAllocError::BadAlignment(3)));
        assert_eq!(
            a.allocate_aligned_at(0x1010, 0x10, 0x100),
            Err(MmioAllocError::Misaligned {
                addr: 0x1010,
                align: 0x100
            })
        );
        assert!(matches!(
            a.allocate_at(0x800, 0x1000),
            Err(MmioAllocError::OutOfRange { .. })
        ));
        assert!(matches!(
            a.allocate_at(0x2800, 0x1000),
            Err(MmioAllocError::OutOfRange { .. })
        ));
        assert!(matches!(
            a.allocate_at(u64::MAX, 2),
            Err(MmioAllocError::OutOfRange { .. })
        ));
        a.allocate_at(0x1800, 0x100).unwrap();
        assert_eq!(
            a.allocate_at(0x1000, 0x900),
            Err(MmioAllocError::Overlap {
                addr: 0x1000,
                size: 0x900,
                other: 0x1800,
                other_size: 0x100
            })
        );
        assert_eq!(a.allocate_at(0x1000, 0x800).unwrap(), 0x1000);
        assert_eq!(a.allocate(0x700, 0x100).unwrap(), 0x1900);
        assert_eq!(a.allocate(0x1000, 0x1000).unwrap(), 0x2000);
        assert_eq!(
            a.allocate(0x1000, 0x1000),
            Err(MmioAllocError::Exhausted {
                size: 0x1000,
                align: 0x1000
            })
        );
        assert!(MmioAllocator::new(u64::MAX, 2).is_err());
    }

    #[test]
    fn gap_allocator_stays_clear_of_the_apics() {
        let mut a = MmioAllocator::x86_64_gap();
        assert!(a.allocate_at(crate::layout::LAPIC_BASE, 0x1000).is_err());
        assert_eq!(
            a.allocate(0x1000, 0x1000).unwrap(),
            crate::layout::MMIO_GAP_START
        );
    }
}
