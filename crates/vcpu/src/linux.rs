//! Loading Linux: a bzImage (64-bit entry), an ELF vmlinux, or an ELF with a PVH note
//! (PVH entry), with `linux-loader`; the zero page (or PVH start info) with an e820
//! map built from the memory layout, the command line, and an initrd placed high.

use std::io::{Read, Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader, KernelLoaderResult};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, ReadVolatile};
use vmcraft_memory::layout::MemoryLayout;
use vmcraft_memory::GuestMemory;

use crate::mode::Entry;

/// Guest-physical address of `boot_params` (the zero page).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Guest-physical address of `hvm_start_info` for PVH.
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
/// The guest RAM the boot parameters take: from [`PVH_START_INFO_ADDR`] (the PVH
/// start info, its memory map and module list) to the end of the zero page.
pub const BOOT_PARAMS_RANGE: core::ops::Range<u64> = PVH_START_INFO_ADDR..ZERO_PAGE_ADDR + 0x1000;
const PVH_MEMMAP_ADDR: u64 = 0x6100;
const PVH_MODLIST_ADDR: u64 = 0x6800;
/// Guest-physical address of the kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line accepted, including the terminating NUL.
pub const CMDLINE_MAX: usize = 4096;
/// Where the kernel is loaded: 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// End of conventional memory below the EBDA.
const EBDA_START: u64 = 0x9_fc00;
/// Highest initrd end when the kernel does not say (the protocol's old default).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const E820_RAM: u32 = 1;
/// e820 type of a range the firmware keeps.
pub const E820_RESERVED: u32 = 2;
/// e820 type of a range that is not usable memory (Xen's guests find the frames they
/// may map foreign pages into there).
pub const E820_UNUSABLE: u32 = 5;
const PVH_MAGIC: u32 = 0x336e_c578;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
const LOADER_UNDEFINED: u8 = 0xff;
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// What kind of kernel image was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A bzImage, entered at its 64-bit entry point.
    BzImage,
    /// An ELF vmlinux, entered at its 64-bit entry point.
    Elf,
    /// An ELF vmlinux with a PVH note, entered through PVH.
    ElfPvh,
}

/// A loaded kernel: where to start and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// The boot vCPU's entry.
    pub entry: Entry,
    /// The image format found.
    pub format: KernelFormat,
    /// Where the kernel was loaded (a bzImage's protected-mode code; an ELF
    /// kernel's entry, the start of its text).
    pub kernel_start: u64,
    /// One past the last byte of the kernel in guest memory.
    pub kernel_end: u64,
    /// Guest-physical address and size of the initrd, if one was loaded.
    pub initrd: Option<(u64, u64)>,
}

/// Errors from loading Linux.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LinuxError {
    /// The image is neither a valid ELF nor a valid bzImage.
    #[error("the kernel image is neither an ELF vmlinux ({elf:?}) nor a bzImage")]
    NotAKernel {
        /// Why the ELF loader refused it.
        elf: linux_loader::loader::elf::Error,
        /// Why the bzImage loader refused it.
        #[source]
        bzimage: linux_loader::loader::Error,
    },
    /// The ELF loader rejected an image with a valid ELF header.
    #[error("invalid ELF kernel")]
    Elf(#[source] linux_loader::loader::Error),
    /// The kernel file could not be read.
    #[error("cannot read the kernel image")]
    Read(#[source] std::io::Error),
    /// The command line is invalid or too long.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line could not be written.
    #[error("cannot write the kernel command line")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// The initrd could not be read or placed.
    #[error("cannot read the initrd")]
    ReadInitrd(#[source] std::io::Error),
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error(
        "initrd of {size} bytes does not fit between the kernel end {kernel_end:#x} and {limit:#x}"
    )]
    InitrdTooLarge {
        /// Size of the initrd.
        size: u64,
        /// End of the kernel.
        kernel_end: u64,
        /// Highest address the initrd may end at.
        limit: u64,
    },
    /// The initrd could not be copied into guest memory.
    #[error("cannot copy the initrd into guest memory at {0:#x}")]
    CopyInitrd(u64, #[source] vm_memory::GuestMemoryError),
    /// The zero page or PVH start info could not be written.
    #[error("cannot write the boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
}

/// One range of the memory map a Linux guest is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// e820 type: RAM (1), [`E820_RESERVED`], [`E820_UNUSABLE`], ...
    pub kind: u32,
}

/// The e820 map for `layout` ([`e820_map`]) with each of `carved` cut out of the RAM
/// range holding it and given its own type. A carved range that is not inside one RAM
/// range is left out. Sorted by address. Pure: unit tested.
pub fn e820_entries(layout: &MemoryLayout, carved: &[E820Entry]) -> Vec<E820Entry> {
    let mut map: Vec<E820Entry> = e820_map(layout)
        .into_iter()
        .map(|(addr, size)| E820Entry {
            addr,
            size,
            kind: E820_RAM,
        })
        .collect();
    for c in carved {
        let Some(end) = c.addr.checked_add(c.size) else {
            continue;
        };
        let Some(i) = map
            .iter()
            .position(|e| e.kind == E820_RAM && e.addr <= c.addr && end <= e.addr + e.size)
        else {
            continue;
        };
        let ram = map.remove(i);
        let pieces = [
            (ram.addr, c.addr - ram.addr, E820_RAM),
            (c.addr, c.size, c.kind),
            (end, ram.addr + ram.size - end, E820_RAM),
        ];
        for (at, (addr, size, kind)) in (i..).zip(pieces.into_iter().filter(|p| p.1 > 0)) {
            map.insert(at, E820Entry { addr, size, kind });
        }
    }
    map
}

/// The e820 map for `layout`: conventional memory below the EBDA, then every RAM range
/// from 1 MiB up. Pure: unit tested.
pub fn e820_map(layout: &MemoryLayout) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    for r in layout.ranges() {
        let start = r.start.max(HIMEM_START);
        if r.end() > start {
            map.push((start, r.end() - start));
        }
    }
    map
}

/// Where an initrd of `size` bytes goes: as high as possible below `limit`, page
/// aligned, above `kernel_end`. Pure: unit tested.
pub fn initrd_address(size: u64, kernel_end: u64, limit: u64) -> Result<u64, LinuxError> {
    let too_large = LinuxError::InitrdTooLarge {
        size,
        kernel_end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or(too_large)? & !0xfff;
    if addr < kernel_end {
        return Err(LinuxError::InitrdTooLarge {
            size,
            kernel_end,
            limit,
        });
    }
    Ok(addr)
}

/// Where a kernel or an initrd is read from: a file, or bytes in memory
/// (`std::io::Cursor<&[u8]>`), anything that reads and seeks.
pub trait BootImage: Read + ReadVolatile + Seek {}

impl<T: Read + ReadVolatile + Seek> BootImage for T {}

fn load_image<K: BootImage>(
    mem: &GuestMemory,
    kernel: &mut K,
) -> Result<(KernelLoaderResult, KernelFormat), LinuxError> {
    use linux_loader::loader::elf::Error as ElfError;
    let high = Some(GuestAddress(HIMEM_START));
    match Elf::load(mem, None, kernel, high) {
        Ok(r) => {
            let format = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(_) => KernelFormat::ElfPvh,
                _ => KernelFormat::Elf,
            };
            Ok((r, format))
        }
        Err(linux_loader::loader::Error::Elf(elf @ ElfError::InvalidElfMagicNumber)) => {
            kernel.seek(SeekFrom::Start(0)).map_err(LinuxError::Read)?;
            BzImage::load(mem, None, kernel, high)
                .map(|r| (r, KernelFormat::BzImage))
                .map_err(|bzimage| LinuxError::NotAKernel { elf, bzimage })
        }
        Err(e) => Err(LinuxError::Elf(e)),
    }
}

/// Load `kernel` (and `initrd`) into `mem` laid out as `layout`, with `cmdline`, and
/// return the boot vCPU's entry.
pub fn load_linux<K: BootImage, I: BootImage>(
    mem: &GuestMemory,
    layout: &MemoryLayout,
    kernel: &mut K,
    initrd: Option<&mut I>,
    cmdline: &str,
    carved: &[E820Entry],
) -> Result<LoadedKernel, LinuxError> {
    let (loaded, format) = load_image(mem, kernel)?;
    let kernel_end = loaded.kernel_end;

    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(LinuxError::Cmdline)?;
    cl.insert_str(cmdline).map_err(LinuxError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl).map_err(LinuxError::WriteCmdline)?;
    let cmdline_len = cmdline.len() as u32 + 1;

    let initrd = match initrd {
        None => None,
        Some(file) => {
            let size = file
                .seek(SeekFrom::End(0))
                .and_then(|size| file.seek(SeekFrom::Start(0)).map(|_| size))
                .map_err(LinuxError::ReadInitrd)?;
            let max_end = loaded
                .setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|&m| m != 0)
                .unwrap_or(DEFAULT_INITRD_ADDR_MAX)
                .saturating_add(1)
                .min(layout.low_ram_end());
            let addr = initrd_address(size, kernel_end, max_end)?;
            mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize)
                .map_err(|e| LinuxError::CopyInitrd(addr, e))?;
            Some((addr, size))
        }
    };

    let e820 = e820_entries(layout, carved);
    let entry = match (format, loaded.pvh_boot_cap) {
        (KernelFormat::ElfPvh, PvhBootCapability::PvhEntryPresent(eip)) => {
            let memmap: Vec<hvm_memmap_table_entry> = e820
                .iter()
                .map(|e| hvm_memmap_table_entry {
                    addr: e.addr,
                    size: e.size,
                    type_: e.kind,
                    reserved: 0,
                })
                .collect();
            let start_info = hvm_start_info {
                magic: PVH_MAGIC,
                version: 1,
                cmdline_paddr: CMDLINE_ADDR,
                memmap_paddr: PVH_MEMMAP_ADDR,
                memmap_entries: memmap.len() as u32,
                nr_modules: u32::from(initrd.is_some()),
                modlist_paddr: if initrd.is_some() {
                    PVH_MODLIST_ADDR
                } else {
                    0
                },
                ..Default::default()
            };
            let mut params = BootParams::new(&start_info, GuestAddress(PVH_START_INFO_ADDR));
            params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
            if let Some((paddr, size)) = initrd {
                let module = hvm_modlist_entry {
                    paddr,
                    size,
                    ..Default::default()
                };
                params.set_modules(&[module], GuestAddress(PVH_MODLIST_ADDR));
            }
            PvhBootConfigurator::write_bootparams(&params, mem).map_err(LinuxError::BootParams)?;
            Entry::Pvh {
                eip: eip.0,
                start_info: PVH_START_INFO_ADDR,
            }
        }
        _ => {
            let mut params = boot_params::default();
            if let Some(h) = loaded.setup_header {
                params.hdr = h;
            }
            params.hdr.type_of_loader = LOADER_UNDEFINED;
            params.hdr.boot_flag = BOOT_FLAG_MAGIC;
            params.hdr.header = HDRS_MAGIC;
            params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
            params.hdr.cmdline_size = cmdline_len;
            if let Some((addr, size)) = initrd {
                params.hdr.ramdisk_image = addr as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            for (slot, e) in params.e820_table.iter_mut().zip(&e820) {
                *slot = boot_e820_entry {
                    addr: e.addr,
                    size: e.size,
                    r#type: e.kind,
                };
            }
            params.e820_entries = e820.len() as u8;
            LinuxBootConfigurator::write_bootparams(
                &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
                mem,
            )
            .map_err(LinuxError::BootParams)?;
            let rip = match format {
                KernelFormat::BzImage => loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                _ => loaded.kernel_load.0,
            };
            Entry::Linux64 {
                rip,
                zero_page: ZERO_PAGE_ADDR,
            }
        }
    };
    Ok(LoadedKernel {
        entry,
        format,
        kernel_start: loaded.kernel_load.0,
        kernel_end,
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Cursor;

    /// A kernel and an initrd in memory load as from files.
    #[test]
    fn images_in_memory_load_as_files_do() {
        let (ram, layout) = memory();
        let (kernel, initrd) = (elf(false), vec![0x22u8; 3000]);
        let loaded = load_linux(
            ram.memory(),
            &layout,
            &mut Cursor::new(&kernel[..]),
            Some(&mut Cursor::new(&initrd[..])),
            "console=ttyS0",
            &[],
        )
        .unwrap();
        let (addr, size) = loaded.initrd.unwrap();
        assert_eq!(size, 3000);
        let mut back = vec![0u8; 3000];
        ram.memory()
            .read_slice(&mut back, GuestAddress(addr))
            .unwrap();
        assert_eq!(back, initrd);
        let from_file = load_linux(
            memory().0.memory(),
            &layout,
            &mut file_with(&kernel),
            None::<&mut File>,
            "console=ttyS0",
            &[],
        )
        .unwrap();
        assert_eq!(from_file.entry, loaded.entry);
    }

    #[test]
    fn e820_covers_ram_around_the_hole() {
        let l = MemoryLayout::x86_64(4 << 30).unwrap();
        assert_eq!(
            e820_map(&l),
            vec![
                (0, EBDA_START),
                (HIMEM_START, 0xC000_0000 - HIMEM_START),
                (1 << 32, (4 << 30) - 0xC000_0000)
            ]
        );
    }

    #[test]
    fn carved_ranges_split_the_ram_they_are_in() {
        let l = MemoryLayout::x86_64(64 << 20).unwrap();
        let ram = |addr, size| E820Entry {
            addr,
            size,
            kind: E820_RAM,
        };
        let carved = [
            E820Entry {
                addr: 0x70000,
                size: 0x20000,
                kind: E820_UNUSABLE,
            },
            E820Entry {
                addr: 0x90000,
                size: 0x2000,
                kind: E820_RESERVED,
            },
            // Not inside one RAM range: left out.
            E820Entry {
                addr: 0x9f000,
                size: 0x2000,
                kind: E820_RESERVED,
            },
        ];
        assert_eq!(
            e820_entries(&l, &carved),
            vec![
                ram(0, 0x70000),
                carved[0],
                carved[1],
                ram(0x92000, EBDA_START - 0x92000),
                ram(HIMEM_START, (64 << 20) - HIMEM_START),
            ]
        );
        assert_eq!(e820_entries(&l, &[]).len(), e820_map(&l).len());
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        assert_eq!(
            initrd_address(0x1800, 0x20_0000, 0x100_0000).unwrap(),
            0xff_e000
        );
        assert!(matches!(
            initrd_address(0x100_0000, 0x20_0000, 0x100_0000),
            Err(LinuxError::InitrdTooLarge { .. })
        ));
        assert!(initrd_address(u64::MAX, 0, 10).is_err());
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let mem = vmcraft_memory::GuestRam::new(&MemoryLayout::x86_64(32 << 20).unwrap()).unwrap();
        let path =
            std::env::temp_dir().join(format!("vmcraft-not-a-kernel-{}", std::process::id()));
        std::fs::write(&path, vec![0x5au8; 8192]).unwrap();
        let mut f = File::open(&path).unwrap();
        let err = load_linux(
            mem.memory(),
            &MemoryLayout::x86_64(32 << 20).unwrap(),
            &mut f,
            None::<&mut File>,
            "",
            &[],
        )
        .unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, LinuxError::NotAKernel { .. }), "{err:?}");
    }

    /// A file holding `bytes`, its name already gone.
    fn file_with(bytes: &[u8]) -> File {
        use std::io::Write;
        let mut f = vmm_sys_util::tempfile::TempFile::new_with_prefix("/tmp/vmcraft-kernel")
            .unwrap()
            .into_file();
        f.write_all(bytes).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f
    }

    fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
        buf[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// A minimal ELF64 executable for x86-64: 16 bytes of code loaded at 1 MiB, entry
    /// there; with `pvh`, a Xen PHYS32_ENTRY note (type 18) naming 1 MiB + 0x10.
    fn elf(pvh: bool) -> Vec<u8> {
        let mut f = vec![0u8; 0x1100];
        let phnum: u16 = if pvh { 2 } else { 1 };
        put(&mut f, 0, &[0x7f, b'E', b'L', b'F', 2, 1, 1]);
        put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
        put(&mut f, 18, &62u16.to_le_bytes()); // EM_X86_64
        put(&mut f, 20, &1u32.to_le_bytes());
        put(&mut f, 24, &HIMEM_START.to_le_bytes()); // e_entry
        put(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
        put(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
        put(&mut f, 54, &56u16.to_le_bytes()); // e_phentsize
        put(&mut f, 56, &phnum.to_le_bytes());
        put(&mut f, 58, &64u16.to_le_bytes()); // e_shentsize
                                               // PT_LOAD: 16 bytes at file offset 0x1000 to 1 MiB.
        let load = 64;
        put(&mut f, load, &1u32.to_le_bytes());
        put(&mut f, load + 4, &5u32.to_le_bytes());
        put(&mut f, load + 8, &0x1000u64.to_le_bytes());
        put(&mut f, load + 16, &HIMEM_START.to_le_bytes());
        put(&mut f, load + 24, &HIMEM_START.to_le_bytes());
        put(&mut f, load + 32, &16u64.to_le_bytes());
        put(&mut f, load + 40, &16u64.to_le_bytes());
        put(&mut f, load + 48, &0x1000u64.to_le_bytes());
        put(&mut f, 0x1000, &[0xf4; 16]);
        if pvh {
            // PT_NOTE at 0x800: namesz 4, descsz 4, type 18, "Xen\0", the entry.
            let note = 64 + 56;
            put(&mut f, note, &4u32.to_le_bytes());
            put(&mut f, note + 8, &0x800u64.to_le_bytes());
            put(&mut f, note + 32, &20u64.to_le_bytes());
            put(&mut f, note + 40, &20u64.to_le_bytes());
            put(&mut f, note + 48, &4u64.to_le_bytes());
            put(&mut f, 0x800, &4u32.to_le_bytes());
            put(&mut f, 0x804, &4u32.to_le_bytes());
            put(&mut f, 0x808, &18u32.to_le_bytes());
            put(&mut f, 0x80c, b"Xen\0");
            put(&mut f, 0x810, &((HIMEM_START + 0x10) as u32).to_le_bytes());
        }
        f
    }

    /// A minimal bzImage: one setup sector after the boot sector, the "HdrS" header
    /// (protocol 2.12, loaded high, initrd_addr_max 16 MiB - 1), then 4 KiB of
    /// protected-mode code.
    fn bzimage() -> Vec<u8> {
        let mut f = vec![0u8; 2 * 512 + 4096];
        f[0x1f1] = 1; // setup_sects
        put(&mut f, 0x1fe, &BOOT_FLAG_MAGIC.to_le_bytes());
        put(&mut f, 0x202, &HDRS_MAGIC.to_le_bytes());
        put(&mut f, 0x206, &0x020cu16.to_le_bytes());
        f[0x211] = 1; // loadflags: LOADED_HIGH
        put(&mut f, 0x214, &(HIMEM_START as u32).to_le_bytes()); // code32_start
        put(&mut f, 0x22c, &0x00ff_ffffu32.to_le_bytes()); // initrd_addr_max
        put(&mut f, 2 * 512, &[0x90; 4096]);
        f
    }

    fn memory() -> (vmcraft_memory::GuestRam, MemoryLayout) {
        let layout = MemoryLayout::x86_64(32 << 20).unwrap();
        (vmcraft_memory::GuestRam::new(&layout).unwrap(), layout)
    }

    #[test]
    fn an_elf_vmlinux_gets_boot_params_and_the_64_bit_entry() {
        let (ram, layout) = memory();
        let mem = ram.memory();
        let mut initrd = file_with(&[0x11; 5000]);
        let loaded = load_linux(
            mem,
            &layout,
            &mut file_with(&elf(false)),
            Some(&mut initrd),
            "console=ttyS0",
            &[],
        )
        .unwrap();
        assert_eq!(loaded.format, KernelFormat::Elf);
        assert_eq!(
            loaded.entry,
            Entry::Linux64 {
                rip: HIMEM_START,
                zero_page: ZERO_PAGE_ADDR
            }
        );
        let (addr, size) = loaded.initrd.unwrap();
        assert_eq!(size, 5000);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(addr + 4999)).unwrap(), 0x11);
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let hdr = params.hdr;
        assert_eq!(
            (
                hdr.boot_flag,
                hdr.header,
                hdr.cmd_line_ptr,
                hdr.cmdline_size
            ),
            (BOOT_FLAG_MAGIC, HDRS_MAGIC, CMDLINE_ADDR as u32, 14)
        );
        assert_eq!((hdr.ramdisk_image, hdr.ramdisk_size), (addr as u32, 5000));
        assert_eq!(params.e820_entries as usize, e820_map(&layout).len());
        let mut cmdline = [0u8; 14];
        mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&cmdline, b"console=ttyS0\0");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(HIMEM_START)).unwrap(), 0xf4);
    }

    #[test]
    fn an_elf_with_a_pvh_note_boots_through_start_info() {
        let (ram, layout) = memory();
        let mem = ram.memory();
        let mut initrd = file_with(&[0x22; 100]);
        let loaded = load_linux(
            mem,
            &layout,
            &mut file_with(&elf(true)),
            Some(&mut initrd),
            "",
            &[],
        )
        .unwrap();
        assert_eq!(loaded.format, KernelFormat::ElfPvh);
        assert_eq!(
            loaded.entry,
            Entry::Pvh {
                eip: HIMEM_START + 0x10,
                start_info: PVH_START_INFO_ADDR
            }
        );
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, PVH_MAGIC);
        assert_eq!(info.memmap_entries as usize, e820_map(&layout).len());
        assert_eq!((info.nr_modules, info.modlist_paddr), (1, PVH_MODLIST_ADDR));
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        assert_eq!((module.paddr, module.size), (loaded.initrd.unwrap().0, 100));
    }

    #[test]
    fn a_bzimage_enters_at_its_64_bit_entry_and_keeps_its_initrd_limit() {
        let (ram, layout) = memory();
        let mem = ram.memory();
        let mut initrd = file_with(&[0x33; 8192]);
        let loaded = load_linux(
            mem,
            &layout,
            &mut file_with(&bzimage()),
            Some(&mut initrd),
            "quiet",
            &[],
        )
        .unwrap();
        assert_eq!(loaded.format, KernelFormat::BzImage);
        assert_eq!(
            loaded.entry,
            Entry::Linux64 {
                rip: HIMEM_START + BZIMAGE_64BIT_ENTRY_OFFSET,
                zero_page: ZERO_PAGE_ADDR
            }
        );
        // The initrd ends below the kernel's initrd_addr_max (16 MiB), page aligned.
        let (addr, size) = loaded.initrd.unwrap();
        assert_eq!(addr + size.next_multiple_of(4096), 16 << 20);
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let version = params.hdr.version;
        assert_eq!(version, 0x020c, "the kernel's own header is kept");
        assert_eq!(params.hdr.type_of_loader, LOADER_UNDEFINED);
    }

    #[test]
    fn a_command_line_too_long_and_an_initrd_too_large_are_errors() {
        let (ram, layout) = memory();
        let mem = ram.memory();
        let long = "x".repeat(CMDLINE_MAX + 1);
        let err = load_linux(
            mem,
            &layout,
            &mut file_with(&elf(false)),
            None::<&mut File>,
            &long,
            &[],
        )
        .unwrap_err();
        assert!(matches!(err, LinuxError::Cmdline(_)), "{err:?}");
        let mut huge = file_with(&[]);
        huge.set_len(64 << 20).unwrap();
        let err = load_linux(
            mem,
            &layout,
            &mut file_with(&elf(false)),
            Some(&mut huge),
            "",
            &[],
        )
        .unwrap_err();
        assert!(matches!(err, LinuxError::InitrdTooLarge { .. }), "{err:?}");
    }
}
