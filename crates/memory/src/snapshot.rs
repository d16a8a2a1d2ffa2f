//! Guest memory in a snapshot: one file holding the RAM regions back to back in
//! guest-physical order, written sparsely (pages of zeros are holes, which cost no disk
//! and read back as zeros), and mapped back copy-on-write by
//! [`GuestRam::from_memory_file`](crate::GuestRam::from_memory_file), so a restore
//! reads nothing until the guest touches a page and takes the same time whatever the
//! RAM size.
//!
//! ```
//! use vmcraft_memory::{layout::MemoryLayout, snapshot, GuestRam};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let layout = MemoryLayout::x86_64(4 << 20).unwrap();
//! let ram = GuestRam::new(&layout).unwrap();
//! ram.memory().write_obj(0x1234_5678u32, GuestAddress(0x20_0000)).unwrap();
//! let file = tempfile();
//! let saved = snapshot::save_memory(ram.memory(), &file).unwrap();
//! assert_eq!((saved.pages, saved.written), (1024, 1));
//!
//! let restored = GuestRam::from_memory_file(&layout, &file).unwrap();
//! assert_eq!(restored.memory().read_obj::<u32>(GuestAddress(0x20_0000)).unwrap(), 0x1234_5678);
//! # fn tempfile() -> std::fs::File {
//! #     let p = std::env::temp_dir().join(format!("vmcraft-doc-mem-{}", std::process::id()));
//! #     let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
//! #     std::fs::remove_file(&p).unwrap();
//! #     f
//! # }
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::{GuestMemory, PAGE_SIZE};

/// Bytes read from guest memory per step while saving.
const CHUNK: usize = 1 << 20;

/// Errors from saving guest memory.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SaveError {
    /// The memory file could not be sized or written.
    #[error("cannot write the guest memory file at offset {offset}")]
    Write {
        /// Where in the file.
        offset: u64,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// Guest memory could not be read.
    #[error("cannot read guest memory at {addr:#x}")]
    Read {
        /// The guest-physical address.
        addr: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// What [`save_memory`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SavedMemory {
    /// Pages of RAM.
    pub pages: u64,
    /// Pages written (the rest were zero and left as holes).
    pub written: u64,
}

/// A page of zeros to compare against (a slice comparison is one `bcmp`, fast even
/// in unoptimised builds).
static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// Whether `page` (at most a page) holds only zeros.
pub fn is_zero_page(page: &[u8]) -> bool {
    page == &ZERO_PAGE[..page.len()]
}

/// Write all of `memory` into `file` (truncated first), regions back to back, pages of
/// zeros skipped. The guest must not run meanwhile (pause it first).
pub fn save_memory(memory: &GuestMemory, file: &File) -> Result<SavedMemory, SaveError> {
    let total: u64 = memory.iter().map(|r| r.len()).sum();
    let sized = |source| SaveError::Write { offset: 0, source };
    file.set_len(0).map_err(sized)?;
    file.set_len(total).map_err(sized)?;
    let mut buf = vec![0u8; CHUNK];
    let mut saved = SavedMemory::default();
    let mut file_base = 0;
    for region in memory.iter() {
        let start = region.start_addr().0;
        let mut done = 0;
        while done < region.len() {
            let n = (region.len() - done).min(CHUNK as u64) as usize;
            let addr = start + done;
            memory
                .read_slice(&mut buf[..n], GuestAddress(addr))
                .map_err(|source| SaveError::Read { addr, source })?;
            // Write each run of non-zero pages with one call.
            let mut run: Option<usize> = None;
            let page = PAGE_SIZE as usize;
            for at in (0..=n).step_by(page) {
                let zero = at == n || is_zero_page(&buf[at..at + page]);
                match (run, zero) {
                    (None, false) => run = Some(at),
                    (Some(from), true) => {
                        let offset = file_base + done + from as u64;
                        file.write_all_at(&buf[from..at], offset)
                            .map_err(|source| SaveError::Write { offset, source })?;
                        saved.written += ((at - from) / page) as u64;
                        run = None;
                    }
                    _ => {}
                }
            }
            done += n as u64;
        }
        saved.pages += region.len() / PAGE_SIZE;
        file_base += region.len();
    }
    Ok(saved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MemoryLayout;
    use crate::{GuestRam, MemoryError};
    use std::os::unix::fs::MetadataExt;

    fn scratch(name: &str) -> File {
        let p = std::env::temp_dir().join(format!("vmcraft-mem-{name}-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    }

    #[test]
    fn memory_round_trips_through_a_sparse_file_mapped_copy_on_write() {
        // Above 3 GiB the layout splits RAM around the MMIO gap: two regions.
        let layout = MemoryLayout::x86_64((3 << 30) + (8 << 20)).unwrap();
        assert_eq!(layout.ranges().len(), 2);
        let ram = GuestRam::new(&layout).unwrap();
        let m = ram.memory();
        let marks = [
            0u64,
            0x1000,
            0x10_0fff,
            0x7fff_f000,
            1 << 32,
            (1 << 32) + (8 << 20) - 8,
        ];
        let marks: Vec<u64> = marks
            .into_iter()
            .filter(|a| m.address_in_range(GuestAddress(*a)))
            .collect();
        assert!(marks.len() >= 5);
        for (i, a) in marks.iter().enumerate() {
            m.write_obj(0xa5a5_0000_0000_0000u64 | i as u64, GuestAddress(*a))
                .unwrap_or_else(|_| m.write_obj(0xa5u8, GuestAddress(*a)).unwrap());
        }
        let file = scratch("roundtrip");
        let saved = save_memory(m, &file).unwrap();
        assert_eq!(saved.pages, layout.total() / PAGE_SIZE);
        // Six marks, one of them straddling into the next page.
        assert!((5..=7).contains(&saved.written), "{saved:?}");
        // The zero pages are holes: the file occupies about what was written.
        let on_disk = file.metadata().unwrap().blocks() * 512;
        assert!(on_disk <= 64 * PAGE_SIZE, "{on_disk} bytes on disk");

        let restored = GuestRam::from_memory_file(&layout, &file).unwrap();
        let r = restored.memory();
        for (i, a) in marks.iter().enumerate() {
            let mut want = vec![0u8; 16];
            let mut got = vec![0u8; 16];
            let len = (16).min(
                m.iter()
                    .find(|g| g.start_addr().0 <= *a && *a < g.start_addr().0 + g.len())
                    .map(|g| g.start_addr().0 + g.len() - a)
                    .unwrap(),
            ) as usize;
            m.read_slice(&mut want[..len], GuestAddress(*a)).unwrap();
            r.read_slice(&mut got[..len], GuestAddress(*a)).unwrap();
            assert_eq!(got, want, "mark {i} at {a:#x}");
        }
        // A write to the restored memory stays in this process: the file keeps the
        // snapshot, and a second restore sees the original.
        r.write_obj(0u64, GuestAddress(marks[1])).unwrap();
        let again = GuestRam::from_memory_file(&layout, &file).unwrap();
        assert_eq!(
            again
                .memory()
                .read_obj::<u64>(GuestAddress(marks[1]))
                .unwrap(),
            0xa5a5_0000_0000_0001
        );
    }

    #[test]
    fn a_memory_file_of_the_wrong_size_is_refused() {
        let layout = MemoryLayout::x86_64(4 << 20).unwrap();
        let file = scratch("size");
        file.set_len(2 << 20).unwrap();
        let err = GuestRam::from_memory_file(&layout, &file).unwrap_err();
        assert!(matches!(
            err,
            MemoryError::MemoryFileSize {
                file: 0x20_0000,
                ram: 0x40_0000
            }
        ));
        assert_eq!(
            err.to_string(),
            "the guest memory file holds 2097152 bytes, but the RAM is 4194304 bytes"
        );
    }
}
