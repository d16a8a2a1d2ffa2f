//! Giving guest pages back to the host: a balloon's inflated pages, pages a guest
//! reports free. The host frees them (`madvise(MADV_DONTNEED)`): an anonymous page
//! reads as zeros when the guest touches it again, a page of a copy-on-write snapshot
//! mapping as the snapshot had it. Shared RAM ([`GuestRam::new_shared`]) is freed in
//! its memory file (`MADV_REMOVE`: dropping one process's mapping of a shared page
//! would free nothing), and reads as zeros after, in every process that maps it.
//! Either way the page is marked dirty, so that a migration sends it again.
//!
//! [`GuestRam::new_shared`]: crate::GuestRam::new_shared

use std::ops::Deref;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::{GuestMemory, PAGE_SIZE};

/// Why a range could not be discarded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscardError {
    /// The range is not page-aligned, empty, or not inside one region of RAM.
    #[error("{len:#x} bytes at {addr:#x} are not whole pages inside guest RAM")]
    NotRam {
        /// Guest-physical start.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The host refused.
    #[error("the host would not free {len:#x} bytes at {addr:#x}")]
    Madvise {
        /// Guest-physical start.
        addr: u64,
        /// Length.
        len: u64,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
}

/// Free the host memory behind `[addr, addr + len)` of guest RAM (whole pages inside
/// one region) and mark the pages dirty.
pub fn discard(memory: &GuestMemory, addr: GuestAddress, len: u64) -> Result<(), DiscardError> {
    let not_ram = || DiscardError::NotRam { addr: addr.0, len };
    if len == 0 || !addr.0.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(not_ram());
    }
    let region = memory.find_region(addr).ok_or_else(not_ram)?;
    let offset = addr.0 - region.start_addr().0;
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(not_ram());
    }
    let host = region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|_| not_ram())?;
    // MADV_DONTNEED only drops the pages' contents: the mapping stays valid, and the
    // guest (or anyone reading guest memory) faults in fresh pages. A shared mapping's
    // pages belong to its file: MADV_REMOVE punches them out of it.
    let advice = if region.deref().flags() & libc::MAP_SHARED != 0 {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: `[host, host + len)` lies inside the region's live mapping (checked
    // above against its length; `memory` keeps it alive for the call).
    let rc = unsafe { libc::madvise(host.cast(), len as usize, advice) };
    if rc != 0 {
        return Err(DiscardError::Madvise {
            addr: addr.0,
            len,
            source: std::io::Error::last_os_error(),
        });
    }
    region
        .deref()
        .bitmap()
        .mark_dirty(offset as usize, len as usize);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MemoryLayout;
    use crate::GuestRam;
    use vm_memory::Bytes;

    #[test]
    fn discarded_pages_read_as_zero_and_are_marked_dirty() {
        let ram = GuestRam::new(&MemoryLayout::x86_64(4 << 20).unwrap()).unwrap();
        let m = ram.memory();
        m.write_obj(0xdead_beef_u64, GuestAddress(0x10_0000))
            .unwrap();
        m.write_obj(0xfeed_u64, GuestAddress(0x10_1000)).unwrap();
        let region = m.iter().next().unwrap();
        region.deref().bitmap().reset();
        discard(m, GuestAddress(0x10_0000), PAGE_SIZE).unwrap();
        assert_eq!(m.read_obj::<u64>(GuestAddress(0x10_0000)).unwrap(), 0);
        assert_eq!(m.read_obj::<u64>(GuestAddress(0x10_1000)).unwrap(), 0xfeed);
        assert!(region.bitmap().dirty_at(0x10_0000));
        assert!(!region.bitmap().dirty_at(0x10_1000));
        let resident = ram.resident_bytes().unwrap();
        assert!(resident < 4 << 20);
    }

    #[test]
    fn discarded_shared_pages_leave_the_memory_file() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new_shared(&MemoryLayout::x86_64(4 << 20).unwrap()).unwrap();
        let m = ram.memory();
        for page in 0..4u64 {
            m.write_obj(0x77u8, GuestAddress(0x10_0000 + page * PAGE_SIZE))
                .unwrap();
        }
        let file = m.iter().next().unwrap().file_offset().unwrap().file();
        let blocks = |f: &std::fs::File| {
            use std::os::unix::fs::MetadataExt;
            f.metadata().unwrap().blocks()
        };
        let before = blocks(file);
        discard(m, GuestAddress(0x10_0000), 3 * PAGE_SIZE).unwrap();
        // (Fewer blocks: exactly 24 fewer unless the host backs shared memory with
        // huge pages, which a partial hole splits.)
        assert!(
            blocks(file) < before,
            "{} blocks, {before} before",
            blocks(file)
        );
        // The file (what a backend maps) reads zeros there and holds fewer pages.
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, 0x10_0000).unwrap();
        assert_eq!(byte[0], 0);
        file.read_exact_at(&mut byte, 0x10_3000).unwrap();
        assert_eq!(byte[0], 0x77);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x10_1000)).unwrap(), 0);
    }

    #[test]
    fn ranges_outside_ram_or_not_whole_pages_are_refused() {
        let ram = GuestRam::new(&MemoryLayout::x86_64(4 << 20).unwrap()).unwrap();
        let m = ram.memory();
        for (addr, len) in [
            (0x1000, 0),
            (0x1001, 4096),
            (0x1000, 100),
            (4 << 20, 4096),
            ((4 << 20) - 4096, 8192),
            (!0xfff, 4096),
        ] {
            assert!(
                matches!(
                    discard(m, GuestAddress(addr), len),
                    Err(DiscardError::NotRam { .. })
                ),
                "{addr:#x} {len}"
            );
        }
    }
}
