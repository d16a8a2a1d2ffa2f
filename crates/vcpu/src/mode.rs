//! Entry modes: the register and memory state a vCPU starts in.
//!
//! Long-mode entries share one set of boot structures written into low guest memory by
//! [`write_boot_tables`]: a GDT, an empty IDT, a 64-bit TSS and page tables that
//! identity-map the first 4 GiB with 2 MiB user-accessible pages (so CPL-3 code can
//! reach RAM, MMIO windows and shared rings).
//!
//! | address | contents |
//! |---|---|
//! | [`GDT_ADDR`] | GDT (selectors below) |
//! | [`IDT_ADDR`] | empty IDT (an exception triple-faults, which the VMM reports) |
//! | [`TSS_ADDR`] | 64-bit TSS with an all-zero I/O permission bitmap: CPL-3 code may use every port |
//! | [`PML4_ADDR`] .. +0x6000 | PML4, PDPT, 4 page directories |

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};
use vmcraft_memory::layout::Reservation;
use vmcraft_memory::GuestMemory;

/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Guest-physical address of the (empty) IDT.
pub const IDT_ADDR: u64 = 0x580;
/// Guest-physical address of the TSS.
pub const TSS_ADDR: u64 = 0x600;
/// Guest-physical address of the PML4; PDPT and page directories follow it.
pub const PML4_ADDR: u64 = 0x9000;
/// End (exclusive) of the boot structures.
pub const BOOT_TABLES_END: u64 = PML4_ADDR + 6 * 0x1000;
const _: () = assert!(
    BOOT_TABLES_END <= 0x10000,
    "boot tables must stay below 64 KiB"
);

/// GDT selector of the 32-bit flat code segment (PVH entry).
pub const SEL_CODE32: u16 = 0x08;
/// GDT selector of the 64-bit kernel code segment (`__BOOT_CS` of the Linux protocol).
pub const SEL_KERNEL_CODE: u16 = 0x10;
/// GDT selector of the kernel data segment (`__BOOT_DS`).
pub const SEL_KERNEL_DATA: u16 = 0x18;
/// GDT selector of the user data segment (RPL 3).
pub const SEL_USER_DATA: u16 = 0x20 | 3;
/// GDT selector of the 64-bit user code segment (RPL 3).
pub const SEL_USER_CODE: u16 = 0x28 | 3;
/// GDT selector of the TSS.
pub const SEL_TSS: u16 = 0x30;

/// GDT access/flags words: bits 0-7 access byte, bits 12-15 flags (G, D/B, L, AVL).
const GDT_FLAGS: [u16; 6] = [
    0,      // null
    0xc09b, // code32: G, D, present, DPL 0, execute/read
    0xa09b, // code64: G, L, present, DPL 0
    0xc093, // data: G, B, present, DPL 0, read/write
    0xc0f3, // user data: DPL 3
    0xa0fb, // user code64: DPL 3
];
const TSS_FLAGS: u16 = 0x008b; // present, 64-bit busy TSS
/// Size of the TSS proper; the I/O permission bitmap follows it.
const TSS_BASE_SIZE: u32 = 0x68;
/// The I/O permission bitmap: one bit per port, plus the terminating 0xff byte.
const IO_BITMAP_SIZE: u32 = 65536 / 8 + 1;
const TSS_LIMIT: u32 = TSS_BASE_SIZE + IO_BITMAP_SIZE - 1;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;

/// Privilege the code entered in long mode runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    /// CPL 0. Emulated, and so slow, on nested KVM without hardware assistance.
    Kernel,
    /// CPL 3 with the given I/O privilege level (3 lets the code use IN/OUT).
    User {
        /// IOPL, 0 to 3.
        iopl: u8,
    },
}

/// Where and how a vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 16-bit real mode at a linear address below 1 MiB (CS = address >> 4).
    RealMode {
        /// Linear address of the first instruction.
        addr: u64,
    },
    /// 64-bit long mode with the shared identity-mapped page tables.
    LongMode {
        /// First instruction.
        rip: u64,
        /// Initial stack pointer.
        rsp: u64,
        /// CPL 0, or CPL 3 with an IOPL.
        privilege: Privilege,
        /// Initial rdi and rsi (test guests get their vCPU index and a parameter).
        args: [u64; 2],
    },
    /// The Linux 64-bit boot protocol: CPL 0, `rsi` = zero page.
    Linux64 {
        /// The kernel's 64-bit entry point.
        rip: u64,
        /// Guest-physical address of `boot_params`.
        zero_page: u64,
    },
    /// The PVH entry: 32-bit protected mode, paging off, `rbx` = `hvm_start_info`.
    Pvh {
        /// The PVH entry point from the kernel's ELF note.
        eip: u64,
        /// Guest-physical address of `hvm_start_info`.
        start_info: u64,
    },
}

impl Entry {
    /// Whether this entry runs on the boot tables ([`write_boot_tables`]): every
    /// protected- and long-mode entry does (their GDT, TSS and page tables are there);
    /// real mode does not.
    pub fn needs_boot_tables(&self) -> bool {
        !matches!(self, Entry::RealMode { .. })
    }
}

/// The guest RAM the boot tables occupy, as reservations for
/// [`MemoryLayout::reserve`](vmcraft_memory::layout::MemoryLayout::reserve): the
/// GDT, IDT and TSS (with its I/O bitmap) from [`GDT_ADDR`], and the page tables
/// from [`PML4_ADDR`] to [`BOOT_TABLES_END`]. The pages between them are free (the
/// Linux loader puts the zero page there).
pub fn boot_table_ranges() -> Vec<Reservation> {
    let names = ["boot GDT", "boot TSS", "boot page tables"];
    let mut ranges: Vec<Reservation> = boot_tables()
        .into_iter()
        .zip(names)
        .map(|((start, bytes), name)| Reservation {
            name,
            start,
            size: bytes.len() as u64,
        })
        .collect();
    // The IDT (empty, limit 0) sits between the GDT and the TSS: one range for the
    // three descriptor tables.
    let tss_end = ranges[1].end();
    ranges[0].size = tss_end - GDT_ADDR;
    ranges[0].name = "boot GDT, IDT and TSS";
    ranges.remove(1);
    ranges
}

/// Errors from setting up an entry mode.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ModeError {
    /// The boot tables do not fit in guest memory.
    #[error("cannot write the boot tables into guest memory at {addr:#x}")]
    Memory {
        /// Address being written.
        addr: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A real-mode entry above 1 MiB.
    #[error("real-mode entry {0:#x} is not below 1 MiB")]
    RealModeAddress(u64),
    /// IOPL above 3.
    #[error("IOPL {0} is not in 0..=3")]
    Iopl(u8),
    /// A KVM call failed.
    #[error("KVM refused to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0xffff)
}

/// The KVM segment for a GDT descriptor word set, at `selector`.
fn segment(flags: u16, base: u64, limit: u32, selector: u16) -> kvm_segment {
    let g = (flags >> 15) & 1;
    kvm_segment {
        base,
        // KVM wants the byte-granular limit.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: g as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn gdt_segment(selector: u16) -> kvm_segment {
    segment(GDT_FLAGS[usize::from(selector >> 3)], 0, 0xfffff, selector)
}

fn tss_segment() -> kvm_segment {
    segment(TSS_FLAGS, TSS_ADDR, TSS_LIMIT, SEL_TSS)
}

/// The bytes of the boot structures, for [`write_boot_tables`]: GDT, TSS and page
/// tables, as (guest address, bytes).
fn boot_tables() -> Vec<(u64, Vec<u8>)> {
    let mut gdt: Vec<u64> = GDT_FLAGS
        .iter()
        .map(|&f| if f == 0 { 0 } else { gdt_entry(f, 0, 0xfffff) })
        .collect();
    gdt.push(gdt_entry(TSS_FLAGS, TSS_ADDR as u32, TSS_LIMIT));
    gdt.push(TSS_ADDR >> 32);
    let gdt_bytes = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();

    // An all-zero I/O permission bitmap right after the TSS lets CPL-3 code use every
    // port whatever its IOPL (some nested KVMs do not preserve a guest IOPL of 3).
    let mut tss = vec![0u8; TSS_LIMIT as usize + 1];
    tss[0x66..0x68].copy_from_slice(&(TSS_BASE_SIZE as u16).to_le_bytes());
    tss[TSS_LIMIT as usize] = 0xff;

    const PRESENT_RW_USER: u64 = 0x7;
    const PAGE_2M: u64 = 0x80;
    let pdpt_addr = PML4_ADDR + 0x1000;
    let pd_addr = PML4_ADDR + 0x2000;
    let mut tables = vec![0u64; 6 * 512];
    tables[0] = pdpt_addr | PRESENT_RW_USER;
    for i in 0..4u64 {
        tables[512 + i as usize] = (pd_addr + i * 0x1000) | PRESENT_RW_USER;
    }
    for i in 0..4 * 512u64 {
        tables[1024 + i as usize] = (i << 21) | PRESENT_RW_USER | PAGE_2M;
    }
    let table_bytes = tables.iter().flat_map(|e| e.to_le_bytes()).collect();
    vec![
        (GDT_ADDR, gdt_bytes),
        (TSS_ADDR, tss),
        (PML4_ADDR, table_bytes),
    ]
}

/// Write the GDT, TSS and page tables shared by all long-mode and PVH entries.
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), ModeError> {
    for (addr, bytes) in boot_tables() {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|source| ModeError::Memory { addr, source })?;
    }
    Ok(())
}

/// Load the shared GDT and TSS, with flat segments: `code` in CS, `data` in the others.
fn flat_segments(sregs: &mut kvm_sregs, code: u16, data: u16) {
    sregs.cs = gdt_segment(code);
    let d = gdt_segment(data);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (d, d, d, d, d);
    sregs.tr = tss_segment();
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT_FLAGS.len() as u16 + 2) * 8 - 1;
}

/// The register state for `entry`, starting from the vCPU's reset state `sregs`.
/// Pure: unit tested without KVM.
pub fn entry_state(entry: Entry, mut sregs: kvm_sregs) -> Result<(kvm_regs, kvm_sregs), ModeError> {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    let long_mode = |sregs: &mut kvm_sregs, code: u16, data: u16| {
        flat_segments(sregs, code, data);
        sregs.idt.base = IDT_ADDR;
        sregs.idt.limit = 0;
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        sregs.efer = EFER_LME | EFER_LMA;
    };
    match entry {
        Entry::RealMode { addr } => {
            if addr >= 0x10_0000 {
                return Err(ModeError::RealModeAddress(addr));
            }
            let selector = ((addr >> 4) & 0xf000) as u16;
            sregs.cs.selector = selector;
            sregs.cs.base = u64::from(selector) << 4;
            regs.rip = addr - sregs.cs.base;
            for seg in [
                &mut sregs.ds,
                &mut sregs.es,
                &mut sregs.ss,
                &mut sregs.fs,
                &mut sregs.gs,
            ] {
                seg.selector = 0;
                seg.base = 0;
            }
        }
        Entry::LongMode {
            rip,
            rsp,
            privilege,
            args,
        } => {
            match privilege {
                Privilege::Kernel => long_mode(&mut sregs, SEL_KERNEL_CODE, SEL_KERNEL_DATA),
                Privilege::User { iopl } => {
                    if iopl > 3 {
                        return Err(ModeError::Iopl(iopl));
                    }
                    long_mode(&mut sregs, SEL_USER_CODE, SEL_USER_DATA);
                    regs.rflags |= u64::from(iopl) << 12;
                }
            }
            regs.rip = rip;
            regs.rsp = rsp;
            regs.rdi = args[0];
            regs.rsi = args[1];
        }
        Entry::Linux64 { rip, zero_page } => {
            long_mode(&mut sregs, SEL_KERNEL_CODE, SEL_KERNEL_DATA);
            regs.rip = rip;
            regs.rsi = zero_page;
        }
        Entry::Pvh { eip, start_info } => {
            flat_segments(&mut sregs, SEL_CODE32, SEL_KERNEL_DATA);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = eip;
            regs.rbx = start_info;
        }
    }
    Ok((regs, sregs))
}

/// Put `fd` into the state for `entry` (boot tables must already be written).
pub fn enter(fd: &VcpuFd, entry: Entry) -> Result<(), ModeError> {
    let sregs = fd
        .get_sregs()
        .map_err(|e| ModeError::Kvm("read segment registers", e))?;
    let (regs, sregs) = entry_state(entry, sregs)?;
    fd.set_sregs(&sregs)
        .map_err(|e| ModeError::Kvm("set segment registers", e))?;
    fd.set_regs(&regs)
        .map_err(|e| ModeError::Kvm("set general registers", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_table_ranges_cover_every_table_and_leave_the_zero_page_free() {
        let ranges = boot_table_ranges();
        for (addr, bytes) in boot_tables() {
            assert!(
                ranges
                    .iter()
                    .any(|r| addr >= r.start && addr + bytes.len() as u64 <= r.end()),
                "{addr:#x}"
            );
        }
        assert!(ranges.iter().all(|r| r.end() <= BOOT_TABLES_END));
        assert!(ranges
            .iter()
            .all(|r| r.end() <= 0x6000 || r.start >= 0x8000));
        assert!(ranges[0].start <= IDT_ADDR && IDT_ADDR < ranges[0].end());
        assert!(!Entry::RealMode { addr: 0x7c00 }.needs_boot_tables());
        assert!(Entry::Pvh {
            eip: 0x100_0000,
            start_info: 0x6000
        }
        .needs_boot_tables());
    }

    #[test]
    fn gdt_entries_encode_like_the_manual() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x008b, 0x1234_5678, 0x67), 0x1200_8b34_5678_0067);
    }

    #[test]
    fn user_entry_runs_at_cpl3_with_iopl() {
        let e = Entry::LongMode {
            rip: 0x10_0000,
            rsp: 0x8_0000,
            privilege: Privilege::User { iopl: 3 },
            args: [1, 2],
        };
        let (regs, sregs) = entry_state(e, kvm_sregs::default()).unwrap();
        assert_eq!(
            (sregs.cs.dpl, sregs.cs.l, sregs.cs.selector),
            (3, 1, SEL_USER_CODE)
        );
        assert_eq!((sregs.ss.dpl, sregs.ss.selector), (3, SEL_USER_DATA));
        assert_eq!(regs.rflags, 0x3002);
        assert_eq!(
            (regs.rip, regs.rsp, regs.rdi, regs.rsi),
            (0x10_0000, 0x8_0000, 1, 2)
        );
        assert_eq!(sregs.efer & EFER_LMA, EFER_LMA);
        assert_eq!(sregs.tr.type_, 0xb);
        assert!(matches!(
            entry_state(
                Entry::LongMode {
                    rip: 0,
                    rsp: 0,
                    privilege: Privilege::User { iopl: 4 },
                    args: [0; 2]
                },
                kvm_sregs::default()
            ),
            Err(ModeError::Iopl(4))
        ));
    }

    #[test]
    fn kernel_and_linux_entries_use_boot_cs() {
        let (regs, sregs) = entry_state(
            Entry::Linux64 {
                rip: 0x100200,
                zero_page: 0x7000,
            },
            kvm_sregs::default(),
        )
        .unwrap();
        assert_eq!(
            (sregs.cs.selector, sregs.cs.dpl, sregs.ds.selector),
            (0x10, 0, 0x18)
        );
        assert_eq!((regs.rip, regs.rsi), (0x100200, 0x7000));
        assert_eq!(sregs.cs.limit, 0xffff_ffff);
    }

    #[test]
    fn real_and_pvh_entries() {
        let (regs, sregs) =
            entry_state(Entry::RealMode { addr: 0x1_2345 }, kvm_sregs::default()).unwrap();
        assert_eq!(
            (sregs.cs.selector, sregs.cs.base, regs.rip),
            (0x1000, 0x1_0000, 0x2345)
        );
        assert!(entry_state(Entry::RealMode { addr: 0x10_0000 }, kvm_sregs::default()).is_err());
        let (regs, sregs) = entry_state(
            Entry::Pvh {
                eip: 0x100_0000,
                start_info: 0x6000,
            },
            kvm_sregs::default(),
        )
        .unwrap();
        assert_eq!((sregs.cs.db, sregs.cs.l, sregs.cr0 & CR0_PG), (1, 0, 0));
        assert_eq!((regs.rip, regs.rbx), (0x100_0000, 0x6000));
    }

    #[test]
    fn page_tables_identity_map_4g_for_user() {
        let tables = boot_tables();
        let pt = &tables[2].1;
        let entry = |i: usize| u64::from_le_bytes(pt[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(entry(0), (PML4_ADDR + 0x1000) | 7);
        assert_eq!(entry(512 + 3), (PML4_ADDR + 0x5000) | 7);
        assert_eq!(entry(1024 + 2047), (2047 << 21) | 0x87);
        let tss = &tables[1].1;
        assert!(TSS_ADDR + tss.len() as u64 <= crate::linux::PVH_START_INFO_ADDR);
        assert_eq!(u16::from_le_bytes([tss[0x66], tss[0x67]]), 0x68);
        assert_eq!(tss[tss.len() - 1], 0xff);
    }
}
