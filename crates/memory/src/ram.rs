//! Guest RAM: creation from a layout, KVM memory slots and dirty-page tracking.

use std::ops::Deref;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::layout::MemoryLayout;
use crate::GuestMemory;

/// Guest page size used for dirty tracking.
pub const PAGE_SIZE: u64 = 4096;

/// Errors from building or registering guest memory.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// The host refused to map a RAM range.
    #[error("cannot map {size:#x} bytes of guest RAM at {start:#x}")]
    Map {
        /// Guest-physical start of the range.
        start: u64,
        /// Size of the range.
        size: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// The regions could not be collected into one guest memory.
    #[error("guest RAM ranges are invalid")]
    Collect(#[source] vm_memory::GuestRegionCollectionError),
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot} ({size:#x} bytes at {guest_addr:#x})")]
    SetSlot {
        /// Slot number.
        slot: u32,
        /// Guest-physical address.
        guest_addr: u64,
        /// Size in bytes.
        size: u64,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM could not return the dirty log of a slot.
    #[error("KVM could not return the dirty log of slot {slot}")]
    DirtyLog {
        /// Slot number.
        slot: u32,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Dirty pages were requested but logging was never turned on.
    #[error("dirty logging is off: call GuestRam::set_dirty_logging(vm, true) first")]
    DirtyLoggingOff,
    /// The memory file of a snapshot could not be read.
    #[error("cannot read the guest memory file")]
    MemoryFile(#[source] std::io::Error),
    /// The memory file is not as long as the RAM it should hold.
    #[error("the guest memory file holds {file} bytes, but the RAM is {ram} bytes")]
    MemoryFileSize {
        /// The file's length.
        file: u64,
        /// The layout's RAM.
        ram: u64,
    },
    /// The host refused to map a range of the memory file.
    #[error("cannot map {size:#x} bytes of the guest memory file at {start:#x}")]
    MapFile {
        /// Guest-physical start of the range.
        start: u64,
        /// Size of the range.
        size: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The host could not make the memory file of shared guest RAM.
    #[error("cannot make a {size:#x}-byte memory file for shared guest RAM")]
    SharedFile {
        /// The RAM's size.
        size: u64,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// A memory file given for a region of shared guest memory does not cover it.
    #[error("the memory file of the {size:#x}-byte region at {start:#x} holds {file_len} bytes, short of offset {offset:#x} plus the region")]
    SharedRegionOutsideFile {
        /// Guest-physical start of the region.
        start: u64,
        /// Its size.
        size: u64,
        /// Where the region starts in the file.
        offset: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The memory has not been registered with a VM.
    #[error("guest RAM is not registered with a VM: call GuestRam::register first")]
    NotRegistered,
    /// The host refused to mark a range of RAM (un)mergeable.
    #[error("the host refused to mark {size:#x} bytes of guest RAM at {start:#x} {}", if *.mergeable { "mergeable (is the kernel built with CONFIG_KSM?)" } else { "unmergeable" })]
    Mergeable {
        /// Guest-physical start of the range.
        start: u64,
        /// Size of the range.
        size: u64,
        /// What was asked.
        mergeable: bool,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
}

/// One KVM memory slot backing one RAM region.
#[derive(Debug, Clone, Copy)]
struct Slot {
    slot: u32,
    guest_addr: u64,
    size: u64,
    host_addr: u64,
}

/// Guest RAM built from a [`MemoryLayout`], with KVM slot registration and dirty-page
/// tracking.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemory,
    slots: Vec<Slot>,
    registered: bool,
    /// Whether KVM logs the guest's writes (switched while vCPUs run, by the thread
    /// migrating the VM).
    dirty_logging: std::sync::atomic::AtomicBool,
}

/// Pages dirtied since the previous call to [`GuestRam::take_dirty_pages`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyPages {
    /// Per region: its guest-physical start and a bitmap, one bit per 4 KiB page.
    regions: Vec<(u64, Vec<u64>)>,
}

impl DirtyPages {
    /// Guest-physical addresses of the dirty pages, ascending.
    pub fn pages(&self) -> impl Iterator<Item = GuestAddress> + '_ {
        self.regions.iter().flat_map(|(start, bits)| {
            bits.iter().enumerate().flat_map(move |(word_idx, &word)| {
                (0..64)
                    .filter(move |bit| word & (1u64 << bit) != 0)
                    .map(move |bit| GuestAddress(start + (word_idx as u64 * 64 + bit) * PAGE_SIZE))
            })
        })
    }

    /// Number of dirty pages.
    pub fn count(&self) -> usize {
        self.regions
            .iter()
            .flat_map(|(_, bits)| bits.iter())
            .map(|w| w.count_ones() as usize)
            .sum()
    }

    /// True if the page holding `addr` is dirty.
    pub fn contains(&self, addr: GuestAddress) -> bool {
        self.regions.iter().any(|(start, bits)| {
            let Some(offset) = addr.0.checked_sub(*start) else {
                return false;
            };
            let page = (offset / PAGE_SIZE) as usize;
            bits.get(page / 64)
                .is_some_and(|w| w & (1 << (page % 64)) != 0)
        })
    }
}

impl GuestRam {
    /// Map anonymous memory for every range of `layout`.
    pub fn new(layout: &MemoryLayout) -> Result<Self, MemoryError> {
        let mut regions = Vec::with_capacity(layout.ranges().len());
        for r in layout.ranges() {
            let region = GuestRegionMmap::from_range(GuestAddress(r.start), r.size as usize, None)
                .map_err(|source| MemoryError::Map {
                    start: r.start,
                    size: r.size,
                    source,
                })?;
            regions.push(region);
        }
        Self::from_regions(regions)
    }

    /// Guest RAM that another process can map: every range of `layout` mapped shared
    /// from one memory file (`memfd_create`), back to back in guest-physical order.
    /// Each region's [`file_offset`](vm_memory::GuestMemoryRegion::file_offset) names
    /// the file and where the region starts in it: what a vhost-user backend is
    /// given (`SET_MEM_TABLE`) to reach guest memory itself. The file's size is
    /// sealed, so a process holding it cannot shrink it under the VM (a mapping past
    /// a file's end faults).
    ///
    /// ```
    /// use vmcraft_memory::{GuestRam, layout::MemoryLayout};
    /// use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    ///
    /// let ram = GuestRam::new_shared(&MemoryLayout::x86_64(16 << 20).unwrap()).unwrap();
    /// assert!(ram.is_shared());
    /// assert!(ram.memory().iter().all(|r| r.file_offset().is_some()));
    /// ```
    pub fn new_shared(layout: &MemoryLayout) -> Result<Self, MemoryError> {
        let file = shared_memory_file(layout.total())?;
        Self::map_file(layout, &file, libc::MAP_SHARED)
    }

    /// Guest RAM for `layout`, shared ([`new_shared`](Self::new_shared)) or anonymous
    /// ([`new`](Self::new)).
    pub fn for_layout(layout: &MemoryLayout, shared: bool) -> Result<Self, MemoryError> {
        if shared {
            Self::new_shared(layout)
        } else {
            Self::new(layout)
        }
    }

    /// Shared guest RAM ([`new_shared`](Self::new_shared)) holding what `file` holds:
    /// a memory file as [`save_memory`](crate::snapshot::save_memory) wrote it (the
    /// ranges back to back), which must be exactly as long as the layout's RAM. Unlike
    /// [`from_memory_file`](Self::from_memory_file) the pages are read now (another
    /// process cannot map a copy-on-write mapping); only the file's data extents are
    /// copied, its holes stay unallocated.
    pub fn shared_from_memory_file(
        layout: &MemoryLayout,
        file: &std::fs::File,
    ) -> Result<Self, MemoryError> {
        use std::os::unix::fs::FileExt;
        let len = memory_file_len(layout, file)?;
        let ram = Self::new_shared(layout)?;
        let shared = ram
            .memory
            .iter()
            .next()
            .and_then(|r| r.file_offset())
            .map(|f| f.file().try_clone())
            .ok_or(MemoryError::NotRegistered)?
            .map_err(MemoryError::MemoryFile)?;
        let mut buffer = vec![0u8; 1 << 20];
        let mut offset = 0u64;
        while let Some((start, end)) = next_data_extent(file, offset, len)? {
            let mut at = start;
            while at < end {
                let n = buffer.len().min((end - at) as usize);
                file.read_exact_at(&mut buffer[..n], at)
                    .and_then(|()| shared.write_all_at(&buffer[..n], at))
                    .map_err(MemoryError::MemoryFile)?;
                at += n as u64;
            }
            offset = end;
        }
        Ok(ram)
    }

    /// Whether this RAM is mapped shared from a memory file another process can map
    /// ([`new_shared`](Self::new_shared)).
    pub fn is_shared(&self) -> bool {
        is_shared(&self.memory)
    }

    /// Map every range of `layout` privately (copy-on-write) from `file`, the ranges
    /// back to back in guest-physical order: what
    /// [`save_memory`](crate::snapshot::save_memory) wrote. Nothing is read now; each
    /// page comes from the file when first touched, and the guest's writes stay in
    /// this process. The file must be exactly as long as the layout's RAM.
    pub fn from_memory_file(
        layout: &MemoryLayout,
        file: &std::fs::File,
    ) -> Result<Self, MemoryError> {
        Self::map_file(layout, file, libc::MAP_PRIVATE | libc::MAP_NORESERVE)
    }

    /// Map every range of `layout` from `file` with `flags`, back to back.
    fn map_file(
        layout: &MemoryLayout,
        file: &std::fs::File,
        flags: i32,
    ) -> Result<Self, MemoryError> {
        use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
        use vm_memory::mmap::MmapRegionBuilder;
        use vm_memory::FileOffset;
        memory_file_len(layout, file)?;
        let mut regions = Vec::with_capacity(layout.ranges().len());
        let mut offset = 0;
        for r in layout.ranges() {
            let file = file.try_clone().map_err(MemoryError::MemoryFile)?;
            let map = MmapRegionBuilder::new_with_bitmap(
                r.size as usize,
                AtomicBitmap::with_len(r.size as usize),
            )
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_file_offset(FileOffset::new(file, offset))
            .build()
            .map_err(|source| MemoryError::MapFile {
                start: r.start,
                size: r.size,
                source,
            })?;
            let region =
                GuestRegionMmap::new(map, GuestAddress(r.start)).ok_or(MemoryError::Map {
                    start: r.start,
                    size: r.size,
                    source: vm_memory::mmap::FromRangesError::InvalidGuestRegion,
                })?;
            regions.push(region);
            offset += r.size;
        }
        Self::from_regions(regions)
    }

    fn from_regions(
        regions: Vec<GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>>,
    ) -> Result<Self, MemoryError> {
        let memory = GuestMemory::from_regions(regions).map_err(MemoryError::Collect)?;
        let slots = memory
            .iter()
            .enumerate()
            .map(|(i, region)| Slot {
                slot: i as u32,
                guest_addr: region.start_addr().0,
                size: region.len(),
                host_addr: region.deref().as_ptr() as u64,
            })
            .collect();
        Ok(GuestRam {
            memory,
            slots,
            registered: false,
            dirty_logging: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The memory, for reading and writing guest RAM (cheap to clone and share).
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Bytes of this RAM resident in host memory now (pages the guest or the VMM have
    /// touched), from mincore(2).
    pub fn resident_bytes(&self) -> std::io::Result<u64> {
        let mut total = 0;
        for region in self.memory.iter() {
            // SAFETY: the region's mapping lives as long as `self.memory`, which this
            // borrow keeps alive for the call.
            total += unsafe {
                crate::host_usage::resident_bytes_of(
                    region.deref().as_ptr(),
                    region.len() as usize,
                )?
            };
        }
        Ok(total)
    }

    /// Offer this RAM's pages to the host's same-page merging (KSM,
    /// `madvise(MADV_MERGEABLE)`), or withdraw them (`false`: merged pages are copied
    /// back). The kernel's `ksmd` merges identical pages only while
    /// `/sys/kernel/mm/ksm/run` is 1, which is the host administrator's choice.
    /// Merging trades memory for CPU (ksmd scans) and for a side channel between
    /// guests (a write to a merged page takes longer), so it is off unless asked.
    pub fn set_mergeable(&self, mergeable: bool) -> Result<(), MemoryError> {
        let advice = if mergeable {
            libc::MADV_MERGEABLE
        } else {
            libc::MADV_UNMERGEABLE
        };
        for region in self.memory.iter() {
            let ptr = region.deref().as_ptr();
            let len = region.len() as usize;
            // SAFETY: `[ptr, ptr + len)` is the region's whole live mapping (`self`
            // keeps it alive for the call); KSM advice changes no contents.
            let rc = unsafe { libc::madvise(ptr.cast(), len, advice) };
            if rc != 0 {
                return Err(MemoryError::Mergeable {
                    start: region.start_addr().0,
                    size: region.len(),
                    mergeable,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// Number of KVM memory slots this RAM uses (slots `0..n`).
    pub fn slot_count(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Register every region with `vm` as a KVM memory slot.
    pub fn register(&mut self, vm: &VmFd) -> Result<(), MemoryError> {
        self.set_slots(vm, self.logging())?;
        self.registered = true;
        Ok(())
    }

    /// Turn KVM dirty logging on or off for every slot. Turning it on also clears
    /// the VMM-side bitmap, so the next [`GuestRam::take_dirty_pages`] reports only
    /// writes made from now on.
    pub fn set_dirty_logging(&self, vm: &VmFd, on: bool) -> Result<(), MemoryError> {
        if !self.registered {
            return Err(MemoryError::NotRegistered);
        }
        self.set_slots(vm, on)?;
        self.dirty_logging
            .store(on, std::sync::atomic::Ordering::SeqCst);
        if on {
            for region in self.memory.iter() {
                region.deref().bitmap().reset();
            }
        }
        Ok(())
    }

    /// The pages written since the previous call (or since logging was turned on), by
    /// the guest (KVM's log) or by the VMM through this memory (vm-memory's bitmap).
    /// Both logs are cleared.
    pub fn take_dirty_pages(&self, vm: &VmFd) -> Result<DirtyPages, MemoryError> {
        if !self.logging() {
            return Err(MemoryError::DirtyLoggingOff);
        }
        let mut regions = Vec::with_capacity(self.slots.len());
        for (slot, region) in self.slots.iter().zip(self.memory.iter()) {
            let mut bits = vm
                .get_dirty_log(slot.slot, slot.size as usize)
                .map_err(|source| MemoryError::DirtyLog {
                    slot: slot.slot,
                    source,
                })?;
            let vmm_bits = region.deref().bitmap().get_and_reset();
            for (k, v) in bits.iter_mut().zip(vmm_bits) {
                *k |= v;
            }
            regions.push((slot.guest_addr, bits));
        }
        Ok(DirtyPages { regions })
    }

    fn logging(&self) -> bool {
        self.dirty_logging.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set_slots(&self, vm: &VmFd, log_dirty: bool) -> Result<(), MemoryError> {
        for s in &self.slots {
            let region = kvm_userspace_memory_region {
                slot: s.slot,
                flags: if log_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: s.guest_addr,
                memory_size: s.size,
                userspace_addr: s.host_addr,
            };
            // The ranges come from a validated layout and do not overlap. KVM uses the
            // mapping only while the VM exists, and every vmcraft holder of the VM also
            // holds a clone of this memory.
            // SAFETY: the address and size describe a live mapping owned by
            // `self.memory` (shared through an `Arc`), which outlives the slot.
            unsafe { vm.set_user_memory_region(region) }.map_err(|source| {
                MemoryError::SetSlot {
                    slot: s.slot,
                    guest_addr: s.guest_addr,
                    size: s.size,
                    source,
                }
            })?;
        }
        Ok(())
    }
}

/// One region of guest memory that another process shares through a memory file:
/// what a vhost-user backend is given (`SET_MEM_TABLE`).
#[derive(Debug, Clone, Copy)]
pub struct SharedRegion<'a> {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// The memory file.
    pub file: &'a std::fs::File,
    /// Where the region starts in the file.
    pub offset: u64,
}

/// Map `regions` of another process's guest memory shared into this one, as vmcraft's
/// [`GuestMemory`] (a vhost-user backend serving the guest with vmcraft's device
/// code). Each file must cover its region: a region past a file's end would fault
/// when touched.
pub fn map_shared_regions(regions: &[SharedRegion<'_>]) -> Result<GuestMemory, MemoryError> {
    use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::FileOffset;
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        let file_len = r.file.metadata().map_err(MemoryError::MemoryFile)?.len();
        let outside = MemoryError::SharedRegionOutsideFile {
            start: r.guest_addr,
            size: r.size,
            offset: r.offset,
            file_len,
        };
        if r.size == 0
            || usize::try_from(r.size).is_err()
            || r.offset
                .checked_add(r.size)
                .is_none_or(|end| end > file_len)
        {
            return Err(outside);
        }
        let file = r.file.try_clone().map_err(MemoryError::MemoryFile)?;
        let map = MmapRegionBuilder::new_with_bitmap(
            r.size as usize,
            AtomicBitmap::with_len(r.size as usize),
        )
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
        .with_file_offset(FileOffset::new(file, r.offset))
        .build()
        .map_err(|source| MemoryError::MapFile {
            start: r.guest_addr,
            size: r.size,
            source,
        })?;
        let region = GuestRegionMmap::new(map, GuestAddress(r.guest_addr)).ok_or(outside)?;
        mapped.push(region);
    }
    GuestMemory::from_regions(mapped).map_err(MemoryError::Collect)
}

/// Whether `memory`'s regions are mapped shared from a file
/// ([`GuestRam::new_shared`]).
pub(crate) fn is_shared(memory: &GuestMemory) -> bool {
    memory
        .iter()
        .all(|r| r.deref().flags() & libc::MAP_SHARED != 0 && r.file_offset().is_some())
}

/// The length of memory file `file`, which must be exactly the layout's RAM.
fn memory_file_len(layout: &MemoryLayout, file: &std::fs::File) -> Result<u64, MemoryError> {
    let len = file.metadata().map_err(MemoryError::MemoryFile)?.len();
    if len != layout.total() {
        return Err(MemoryError::MemoryFileSize {
            file: len,
            ram: layout.total(),
        });
    }
    Ok(len)
}

/// The next extent of data in `file` at or after `offset` (before `len`), as
/// `(start, end)`: `lseek`'s `SEEK_DATA` and `SEEK_HOLE`.
fn next_data_extent(
    file: &std::fs::File,
    offset: u64,
    len: u64,
) -> Result<Option<(u64, u64)>, MemoryError> {
    use std::os::fd::AsRawFd;
    if offset >= len {
        return Ok(None);
    }
    let seek = |from: u64, whence: i32| -> Result<Option<u64>, MemoryError> {
        // SAFETY: lseek on a descriptor `file` owns; it moves only the file position.
        let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
        if at < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data past `from`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(MemoryError::MemoryFile(e))
            };
        }
        Ok(Some(at as u64))
    };
    let Some(start) = seek(offset, libc::SEEK_DATA)? else {
        return Ok(None);
    };
    let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
    Ok((start < end).then_some((start, end)))
}

/// A memory file of `size` bytes for shared guest RAM, its size sealed.
fn shared_memory_file(size: u64) -> Result<std::fs::File, MemoryError> {
    use std::os::fd::FromRawFd;
    let failed = |source| MemoryError::SharedFile { size, source };
    // SAFETY: the name is a NUL-terminated string that outlives the call; the flags
    // are memfd_create's.
    let fd = unsafe {
        libc::memfd_create(
            c"vmcraft-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size).map_err(failed)?;
    // Seal its size: a backend given the file cannot truncate it under the VM's
    // mappings (where the VMM's own accesses would fault) or grow it.
    // SAFETY: fcntl on a file this function owns, with an integer argument.
    let rc = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    };
    if rc != 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn shared_ram_is_one_sealed_file_another_mapping_sees() {
        use std::os::unix::fs::FileExt;
        let layout = MemoryLayout::x86_64(8 << 20).unwrap();
        let ram = GuestRam::new_shared(&layout).unwrap();
        assert!(ram.is_shared());
        assert!(!GuestRam::new(&layout).unwrap().is_shared());
        let region = ram.memory().iter().next().unwrap();
        let file = region.file_offset().unwrap();
        assert_eq!(file.start(), 0);
        assert_eq!(file.file().metadata().unwrap().len(), 8 << 20);
        // What the guest's memory holds, the file holds: another process mapping it
        // (a vhost-user backend) sees the same bytes, both ways.
        ram.memory()
            .write_obj(0x1234_5678u32, GuestAddress(0x2000))
            .unwrap();
        let mut word = [0u8; 4];
        file.file().read_exact_at(&mut word, 0x2000).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0x1234_5678);
        file.file().write_all_at(&[0xab], 0x3000).unwrap();
        assert_eq!(
            ram.memory().read_obj::<u8>(GuestAddress(0x3000)).unwrap(),
            0xab
        );
        // Its size is sealed.
        assert!(file.file().set_len(4096).is_err());
        assert!(file.file().set_len(16 << 20).is_err());
    }

    #[test]
    fn shared_ram_from_a_sparse_memory_file_holds_its_data_and_leaves_its_holes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let layout = MemoryLayout::x86_64(8 << 20).unwrap();
        let dir = std::env::temp_dir().join(format!("vmcraft-shared-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        file.set_len(8 << 20).unwrap();
        file.write_all_at(b"first", 0x1000).unwrap();
        file.write_all_at(b"last", (8 << 20) - 4).unwrap();
        let ram = GuestRam::shared_from_memory_file(&layout, &file).unwrap();
        assert!(ram.is_shared());
        let mut got = [0u8; 5];
        ram.memory()
            .read_slice(&mut got, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(&got, b"first");
        let mut got = [0u8; 4];
        ram.memory()
            .read_slice(&mut got, GuestAddress((8 << 20) - 4))
            .unwrap();
        assert_eq!(&got, b"last");
        // Only the file's data was copied: a few pages, not 8 MiB.
        let shared = ram.memory().iter().next().unwrap().file_offset().unwrap();
        assert!(shared.file().metadata().unwrap().blocks() * 512 < 1 << 20);
        // A file of another length is refused.
        file.set_len(4 << 20).unwrap();
        assert!(matches!(
            GuestRam::shared_from_memory_file(&layout, &file),
            Err(MemoryError::MemoryFileSize { .. })
        ));
    }

    #[test]
    fn another_process_maps_shared_regions_and_sees_the_same_bytes() {
        let layout = MemoryLayout::x86_64(8 << 20).unwrap();
        let ram = GuestRam::new_shared(&layout).unwrap();
        let region = ram.memory().iter().next().unwrap();
        let file = region.file_offset().unwrap();
        let mapped = map_shared_regions(&[SharedRegion {
            guest_addr: 0,
            size: 8 << 20,
            file: file.file(),
            offset: 0,
        }])
        .unwrap();
        mapped.write_obj(0xfeedu16, GuestAddress(0x7000)).unwrap();
        assert_eq!(
            ram.memory().read_obj::<u16>(GuestAddress(0x7000)).unwrap(),
            0xfeed
        );
        // A region the file does not cover is refused, not mapped to fault later.
        for (size, offset) in [(16 << 20, 0), (8 << 20, 4096), (0, 0), (4096, u64::MAX)] {
            assert!(matches!(
                map_shared_regions(&[SharedRegion {
                    guest_addr: 0,
                    size,
                    file: file.file(),
                    offset,
                }]),
                Err(MemoryError::SharedRegionOutsideFile { .. })
            ));
        }
    }

    #[test]
    fn dirty_pages_decode_bitmaps() {
        let d = DirtyPages {
            regions: vec![(0, vec![0b101, 1 << 63]), (1 << 32, vec![1])],
        };
        let pages: Vec<u64> = d.pages().map(|a| a.0).collect();
        assert_eq!(pages, vec![0, 0x2000, 127 * 4096, 1 << 32]);
        assert_eq!(d.count(), 4);
        assert!(d.contains(GuestAddress(0x2fff)));
        assert!(!d.contains(GuestAddress(0x1000)));
    }

    #[test]
    fn vmm_writes_land_in_the_vm_memory_bitmap() {
        let ram = GuestRam::new(&MemoryLayout::x86_64(2 << 20).unwrap()).unwrap();
        ram.memory().write_obj(7u64, GuestAddress(0x5008)).unwrap();
        let region = ram.memory().iter().next().unwrap();
        let bits = region.deref().bitmap().get_and_reset();
        assert_eq!(bits[0], 1 << 5);
    }

    #[test]
    fn resident_bytes_follow_the_pages_touched() {
        let ram = GuestRam::new(&MemoryLayout::x86_64(8 << 20).unwrap()).unwrap();
        assert_eq!(ram.resident_bytes().unwrap(), 0);
        for page in 0..5u64 {
            ram.memory()
                .write_obj(1u8, GuestAddress(0x10_0000 + page * PAGE_SIZE))
                .unwrap();
        }
        // Transparent huge pages may back more than was touched, never less.
        let resident = ram.resident_bytes().unwrap();
        assert!((5 * PAGE_SIZE..=8 << 20).contains(&resident), "{resident}");
    }

    #[test]
    fn ram_is_offered_to_page_merging_where_the_host_has_it() {
        let ram = GuestRam::new(&MemoryLayout::x86_64(8 << 20).unwrap()).unwrap();
        ram.memory().write_obj(7u64, GuestAddress(0x1000)).unwrap();
        let has_ksm = std::path::Path::new("/sys/kernel/mm/ksm").exists();
        for on in [true, false] {
            match ram.set_mergeable(on) {
                Ok(()) => assert!(has_ksm, "KSM advice taken by a kernel without KSM"),
                Err(e) => {
                    assert!(!has_ksm, "{e}");
                    assert!(
                        matches!(e, MemoryError::Mergeable { mergeable, .. } if mergeable == on)
                    );
                }
            }
        }
        // The advice changes no contents.
        assert_eq!(
            ram.memory().read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
            7
        );
    }

    #[test]
    fn dirty_pages_need_logging_on() {
        let ram = GuestRam::new(&MemoryLayout::x86_64(2 << 20).unwrap()).unwrap();
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm (open failed)");
        let vm = kvm.create_vm().unwrap();
        assert!(matches!(
            ram.take_dirty_pages(&vm),
            Err(MemoryError::DirtyLoggingOff)
        ));
    }
}
