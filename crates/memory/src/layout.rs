//! Guest-physical memory layout for x86-64.
//!
//! RAM starts at 0 and runs up to the start of the 32-bit MMIO gap; whatever does not
//! fit below the gap continues at 4 GiB. The gap holds the local APIC, IOAPIC and the
//! windows handed out by [`crate::mmio::MmioAllocator`].

use thiserror::Error;

/// Start of the 32-bit MMIO gap (3 GiB).
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End (exclusive) of the 32-bit MMIO gap: 4 GiB.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The local APIC's default base, inside the gap and never handed out as a window.
pub const LAPIC_BASE: u64 = 0xFEE0_0000;
/// The IOAPIC's default base, inside the gap and never handed out as a window.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// The top of the gap reserved for the APICs, the TSS and the BIOS area.
pub const MMIO_GAP_RESERVED_START: u64 = 0xFE00_0000;
/// Smallest amount of RAM vmcraft builds a VM with: room for the boot structures,
/// page tables and a small guest.
pub const MIN_RAM: u64 = 1 << 20;
/// Largest amount of RAM accepted (1 TiB): a guard against unit mistakes.
pub const MAX_RAM: u64 = 1 << 40;
/// Guest page size.
const PAGE: u64 = 4096;

/// Why a layout cannot be built.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayoutError {
    /// Less RAM than [`MIN_RAM`].
    #[error("guest RAM of {0} bytes is too small: at least {min} bytes are needed", min = MIN_RAM)]
    TooSmall(u64),
    /// More RAM than [`MAX_RAM`].
    #[error("guest RAM of {0} bytes is larger than the supported {max} bytes", max = MAX_RAM)]
    TooLarge(u64),
    /// RAM size not a multiple of the page size.
    #[error("guest RAM of {0} bytes is not a multiple of the 4 KiB page size")]
    NotPageAligned(u64),
    /// A range to reserve is not inside guest RAM.
    #[error("{name} at {start:#x}..{end:#x} is not inside guest RAM")]
    OutsideRam {
        /// What the range is for.
        name: &'static str,
        /// First address.
        start: u64,
        /// One past the last address.
        end: u64,
    },
    /// A range to reserve overlaps one reserved before.
    #[error("{name} at {start:#x}..{end:#x} overlaps {other} at {other_start:#x}..{other_end:#x}")]
    Overlap {
        /// What the new range is for.
        name: &'static str,
        /// Its first address.
        start: u64,
        /// One past its last address.
        end: u64,
        /// What the range reserved before is for.
        other: &'static str,
        /// Its first address.
        other_start: u64,
        /// One past its last address.
        other_end: u64,
    },
}

/// A range of guest RAM that something owns: an image loaded there, the boot page
/// tables, the ACPI tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// What the range is for.
    pub name: &'static str,
    /// First guest-physical address.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
}

impl Reservation {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// One contiguous range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// First guest-physical address.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
}

impl RamRange {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Bytes to load into guest RAM at an address, with a name for errors and
/// reservations: a test guest, a firmware blob, a kernel image.
#[derive(Debug, Clone, Copy)]
pub struct Image<'a> {
    /// What it is.
    pub name: &'static str,
    /// Guest-physical load address.
    pub addr: u64,
    /// The bytes.
    pub bytes: &'a [u8],
}

/// Where RAM lives in the guest-physical address space, and which parts of it are
/// reserved (what loaded or wrote them, so that two owners of one range are an error
/// instead of a silently overwritten image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    ranges: Vec<RamRange>,
    reserved: Vec<Reservation>,
}

impl MemoryLayout {
    /// The x86-64 layout for `ram_bytes` of RAM: below [`MMIO_GAP_START`], and the
    /// remainder from 4 GiB up.
    pub fn x86_64(ram_bytes: u64) -> Result<Self, LayoutError> {
        if ram_bytes < MIN_RAM {
            return Err(LayoutError::TooSmall(ram_bytes));
        }
        if ram_bytes > MAX_RAM {
            return Err(LayoutError::TooLarge(ram_bytes));
        }
        if !ram_bytes.is_multiple_of(PAGE) {
            return Err(LayoutError::NotPageAligned(ram_bytes));
        }
        let low = ram_bytes.min(MMIO_GAP_START);
        let mut ranges = vec![RamRange {
            start: 0,
            size: low,
        }];
        if ram_bytes > low {
            ranges.push(RamRange {
                start: MMIO_GAP_END,
                size: ram_bytes - low,
            });
        }
        Ok(MemoryLayout {
            ranges,
            reserved: Vec::new(),
        })
    }

    /// Reserve `[start, start + size)` for `name`: it must lie in RAM and overlap no
    /// earlier reservation. An empty range reserves nothing.
    ///
    /// ```
    /// use vmcraft_memory::layout::{LayoutError, MemoryLayout};
    /// let mut l = MemoryLayout::x86_64(16 << 20).unwrap();
    /// l.reserve("kernel", 0x10_0000, 0x20_0000).unwrap();
    /// let e = l.reserve("initrd", 0x28_0000, 0x1000).unwrap_err();
    /// assert!(matches!(e, LayoutError::Overlap { other: "kernel", .. }));
    /// ```
    pub fn reserve(
        &mut self,
        name: &'static str,
        start: u64,
        size: u64,
    ) -> Result<(), LayoutError> {
        if size == 0 {
            return Ok(());
        }
        let end = start.saturating_add(size);
        if !self.contains(start, size) {
            return Err(LayoutError::OutsideRam { name, start, end });
        }
        if let Some(other) = self.reserved_overlap(start, size) {
            return Err(LayoutError::Overlap {
                name,
                start,
                end,
                other: other.name,
                other_start: other.start,
                other_end: other.end(),
            });
        }
        self.reserved.push(Reservation { name, start, size });
        Ok(())
    }

    /// The first reservation that `[start, start + size)` overlaps, if any.
    pub fn reserved_overlap(&self, start: u64, size: u64) -> Option<&Reservation> {
        let end = start.saturating_add(size);
        self.reserved
            .iter()
            .find(|r| size > 0 && start < r.end() && r.start < end)
    }

    /// The reservations, in the order they were made.
    pub fn reservations(&self) -> &[Reservation] {
        &self.reserved
    }

    /// The RAM ranges, in ascending address order.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Total RAM in bytes.
    pub fn total(&self) -> u64 {
        self.ranges.iter().map(|r| r.size).sum()
    }

    /// One past the highest RAM address below 4 GiB.
    pub fn low_ram_end(&self) -> u64 {
        self.ranges[0].end()
    }

    /// True if `[addr, addr + len)` lies inside one RAM range.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr.checked_add(len).is_some_and(|end| {
            self.ranges
                .iter()
                .any(|r| addr >= r.start && end <= r.end())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_must_be_in_ram_and_disjoint() {
        let mut l = MemoryLayout::x86_64(1 << 20).unwrap();
        l.reserve("tables", 0x500, 0x100).unwrap();
        l.reserve("image", 0x600, 0x1000).unwrap(); // touching is fine
        l.reserve("nothing", 0x550, 0).unwrap();
        assert_eq!(
            l.reserve("zero page", 0x5ff, 2),
            Err(LayoutError::Overlap {
                name: "zero page",
                start: 0x5ff,
                end: 0x601,
                other: "tables",
                other_start: 0x500,
                other_end: 0x600,
            })
        );
        assert!(matches!(
            l.reserve("big", 0xf_f000, 0x2000),
            Err(LayoutError::OutsideRam { name: "big", .. })
        ));
        assert!(matches!(
            l.reserve("wrap", u64::MAX - 1, 4),
            Err(LayoutError::OutsideRam { .. })
        ));
        assert_eq!(l.reservations().len(), 2);
        assert_eq!(l.reserved_overlap(0x1500, 0x200).unwrap().name, "image");
        assert!(l.reserved_overlap(0x1600, 0x200).is_none());
    }

    #[test]
    fn small_ram_is_one_range_below_the_gap() {
        let l = MemoryLayout::x86_64(256 << 20).unwrap();
        assert_eq!(
            l.ranges(),
            &[RamRange {
                start: 0,
                size: 256 << 20
            }]
        );
        assert_eq!(l.total(), 256 << 20);
        assert!(l.contains(0, 256 << 20));
        assert!(!l.contains(1, 256 << 20));
        assert!(!l.contains(u64::MAX, 2));
    }

    #[test]
    fn large_ram_is_split_around_the_gap() {
        let l = MemoryLayout::x86_64(4 << 30).unwrap();
        assert_eq!(
            l.ranges(),
            &[
                RamRange {
                    start: 0,
                    size: MMIO_GAP_START
                },
                RamRange {
                    start: MMIO_GAP_END,
                    size: (4 << 30) - MMIO_GAP_START
                },
            ]
        );
        assert_eq!(l.total(), 4 << 30);
        assert_eq!(l.low_ram_end(), MMIO_GAP_START);
        assert!(!l.contains(MMIO_GAP_START, 1));
    }

    #[test]
    fn bad_sizes_are_rejected_with_the_value() {
        assert_eq!(MemoryLayout::x86_64(4096), Err(LayoutError::TooSmall(4096)));
        assert_eq!(
            MemoryLayout::x86_64(MAX_RAM + PAGE),
            Err(LayoutError::TooLarge(MAX_RAM + PAGE))
        );
        assert_eq!(
            MemoryLayout::x86_64((2 << 20) + 1),
            Err(LayoutError::NotPageAligned((2 << 20) + 1))
        );
        assert!(LayoutError::TooSmall(4096).to_string().contains("4096"));
    }
}
