//! Tiny test guests for vmcraft, assembled from `guests/*.S` at build time (gcc and
//! binutils; no prebuilt binaries), and helpers to load and start them.
//!
//! Long-mode guests do their work at CPL 3 with IOPL 3: on nested KVM without hardware
//! assistance CPL-3 code runs natively while CPL 0 is emulated, so the guests do their
//! work, port I/O included, in user mode. A guest that needs an instruction to reach the
//! hypervisor (CPUID for discovery) is entered at CPL 0 instead ([`GuestMode::Kernel64`]):
//! it does that part in kernel mode, as a real kernel would, then drops to CPL 3. Only
//! port I/O and MMIO are relied on to exit from CPL 3; see `vmcraft_vcpu`'s notes on
//! which instructions trap where. Each vCPU gets its index in `rdi` and a parameter in
//! `rsi`. The contract with the host (ports, addresses) is in [`abi`].
//!
//! ```
//! use vmcraft_guest_kit::{abi, Guest};
//! use vmcraft_memory::{layout::MemoryLayout, GuestRam};
//! use vmcraft_vcpu::mode::Entry;
//!
//! let ram = GuestRam::new(&MemoryLayout::x86_64(16 << 20).unwrap()).unwrap();
//! Guest::EXIT_CODE.load(ram.memory()).unwrap();
//! let entry = Guest::EXIT_CODE.entry(0, 7); // vCPU 0; the guest exits with code 7
//! assert!(matches!(entry, Entry::LongMode { rip: abi::LOAD_ADDR, args: [0, 7], .. }));
//! ```

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};
use vmcraft_memory::GuestMemory;
use vmcraft_vcpu::mode::{Entry, Privilege};

/// Ports and addresses shared by the guests and the host.
pub mod abi {
    include!("abi.rs");
}

pub mod peers;

/// An ELF "kernel" (`guests/elf_reset.S`) for comparing start-up with VMMs that boot
/// kernels: linked at 1 MiB and entered in long mode at CPL 0 as the Linux 64-bit boot
/// protocol enters a vmlinux. Its first exit writes a newline to COM1, its second
/// resets the machine through the i8042. Write it to a file and pass it as the kernel.
pub const ELF_RESET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/reset.elf"));
/// An ELF "kernel" (`guests/elf_ctrl_alt_del.S`) that writes a newline to COM1, then
/// polls the i8042 until Ctrl+Alt+Del comes (set-1 scancodes, as the controller
/// translates them), writes `cad` to COM1 and resets the machine through the i8042:
/// what Linux's keyboard driver does with `reboot=k`.
pub const ELF_CTRL_ALT_DEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ctrl_alt_del.elf"));
/// An ELF "kernel" (`guests/elf_ticker.S`) that writes `tick N` lines to COM1 (N in
/// eight hex digits, counting from 1 in a register) while it polls the i8042 as
/// [`ELF_CTRL_ALT_DEL`] does, and resets the machine on Ctrl+Alt+Del: a machine
/// restored from a snapshot goes on from the count it was saved at.
pub const ELF_TICKER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ticker.elf"));

/// How a VM stops when its guest writes `code` to the debug-exit port
/// ([`abi`]'s `DEBUG_EXIT_PORT`), the test guests' way out: exit codes are theirs.
pub const fn exited(code: u32) -> vmcraft_vcpu::exit::StopReason {
    vmcraft_vcpu::exit::StopReason::Device {
        device: "debug-exit",
        code,
    }
}

/// The PV demo's layout ([`abi`]'s `PV_*` pages, a 64-entry grant table, the
/// doorbell port), for `vmcraft::pv_machine::PvBackends`.
pub const PV_LAYOUT: vmcraft_pv_hypercall::layout::PvLayout =
    vmcraft_pv_hypercall::layout::PvLayout {
        shared_info: abi::PV_SHARED_INFO,
        console_page: abi::PV_CONSOLE_PAGE,
        blk_ring: abi::PV_BLK_RING,
        grant_table: abi::PV_GRANT_TABLE,
        grant_entries: 64,
        doorbell_port: abi::PV_DOORBELL_PORT,
    };

// The guests are built to the layout a configuration's PV device gets by default.
const _: () = {
    let (a, b) = (PV_LAYOUT, vmcraft_pv_hypercall::layout::PvLayout::STANDARD);
    assert!(a.shared_info == b.shared_info && a.console_page == b.console_page);
    assert!(a.blk_ring == b.blk_ring && a.grant_table == b.grant_table);
    assert!(a.grant_entries == b.grant_entries && a.doorbell_port == b.doorbell_port);
};

/// How a guest is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestMode {
    /// 64-bit long mode at CPL 3, IOPL 3, loaded at [`abi::LOAD_ADDR`].
    User64,
    /// 64-bit long mode entered at CPL 0, loaded at [`abi::LOAD_ADDR`]: the C runtime
    /// runs the guest's `kernel_init` in kernel mode (where CPUID and the other
    /// intercepted instructions reach the hypervisor on every host), then drops to
    /// CPL 3 with IOPL 3 on the same stack and runs `guest_main` as a
    /// [`GuestMode::User64`] guest would.
    Kernel64,
    /// 16-bit real mode, loaded at [`abi::REAL_MODE_LOAD_ADDR`].
    Real,
}

/// What word `i` (8 bytes) of the [`Guest::MEMCHECK`] span holds in round `r`
/// (splitmix64, as the guest computes it).
pub fn memcheck_word(r: u64, i: u64) -> u64 {
    let mut x = (r << 40) ^ i ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The COM1 output of a [`Guest::MEMCHECK`] run of `rounds` rounds over `mib` MiB that
/// nothing disturbed.
pub fn memcheck_output(mib: u64, rounds: u64) -> String {
    let words = mib << 17;
    let mut out = String::new();
    for r in 0..rounds {
        let sum = (0..words).fold(0u64, |s, i| s.wrapping_add(memcheck_word(r, i)));
        out += &format!("round {r:#018x} sum {sum:#018x}\n");
    }
    out + "memcheck done\n"
}

/// The COM1 output of an undisturbed [`Guest::BLKCHECK`] run of `rounds` rounds.
pub fn blkcheck_output(rounds: u64) -> String {
    rounds_ok(rounds) + "blkcheck done\n"
}

/// The COM1 output of an undisturbed [`Guest::ATA_BENCH`] run of `rounds` check
/// rounds (parameter bit 3).
pub fn atacheck_output(rounds: u64) -> String {
    rounds_ok(rounds) + "atacheck done\n"
}

/// The COM1 output of an undisturbed [`Guest::PVCHECK`] run of `rounds` rounds.
pub fn pvcheck_output(rounds: u64) -> String {
    rounds_ok(rounds) + "pvcheck done\n"
}

fn rounds_ok(rounds: u64) -> String {
    (0..rounds)
        .map(|r| format!("round {r:#018x} ok\n"))
        .collect()
}

/// The host's side of a [`Guest::PHASED`] guest: its mailbox in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct Phased;

/// What a [`Guest::PHASED`] guest reports, in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhasedStatus {
    /// The working set in place.
    pub working_set: u32,
    /// Pages held in the balloon.
    pub ballooned: u32,
    /// Pages taken back from the balloon because the working set needed them.
    pub deflated_on_oom: u32,
}

impl Phased {
    /// The mailbox: the wanted working set (u32), then the [`PhasedStatus`] fields.
    pub const MAILBOX: u64 = abi::GUEST_HEAP + 0x3_0000;
    /// Where the pool starts; the pages below count as the guest's kernel.
    pub const POOL: u64 = 16 << 20;

    /// The pool of a guest in `ram` bytes of RAM (its parameter).
    pub fn pool_pages(ram: u64) -> u64 {
        ram.saturating_sub(Self::POOL) / 4096
    }

    /// Ask for a working set of `pages` pages.
    pub fn want<M: Bytes<GuestAddress>>(memory: &M, pages: u32) -> Result<(), M::E> {
        memory.write_obj(pages, GuestAddress(Self::MAILBOX))
    }

    /// What the guest reports.
    pub fn status<M: Bytes<GuestAddress>>(memory: &M) -> Result<PhasedStatus, M::E> {
        let word = |i: u64| memory.read_obj::<u32>(GuestAddress(Self::MAILBOX + 4 * i));
        Ok(PhasedStatus {
            working_set: word(1)?,
            ballooned: word(2)?,
            deflated_on_oom: word(3)?,
        })
    }
}

/// A test guest program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guest {
    /// Its name (the source file's stem).
    pub name: &'static str,
    /// The flat binary.
    pub code: &'static [u8],
    /// How it is entered.
    pub mode: GuestMode,
}

macro_rules! guest {
    ($name:literal, $mode:expr) => {
        Guest {
            name: $name,
            code: include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".bin")),
            mode: $mode,
        }
    };
}

/// Errors from loading a guest.
#[derive(Debug, Error)]
pub enum GuestError {
    /// Guest memory is too small or the write failed.
    #[error("cannot load guest {name} ({len} bytes) at {addr:#x}")]
    Load {
        /// Guest name.
        name: &'static str,
        /// Load address.
        addr: u64,
        /// Size of the code.
        len: usize,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

impl Guest {
    /// Greets through the 16550 byte by byte, then exits with code 0.
    pub const HELLO: Guest = guest!("hello", GuestMode::User64);
    /// Port and MMIO accesses of widths 1, 2, 4 (and 8 for MMIO) and string I/O against
    /// the test device; exit code 0 when every read returned the expected pattern.
    pub const PIO_MMIO: Guest = guest!("pio_mmio", GuestMode::User64);
    /// Increments its progress counter forever without exiting.
    pub const COUNTER: Guest = guest!("counter", GuestMode::User64);
    /// Exits with the code passed as its parameter.
    pub const EXIT_CODE: Guest = guest!("exit_code", GuestMode::User64);
    /// Reads 4 bytes from the port passed as its parameter and exits with them as its
    /// code.
    pub const IN_EXIT: Guest = guest!("in_exit", GuestMode::User64);
    /// Resets the machine through the i8042.
    pub const I8042_RESET: Guest = guest!("i8042_reset", GuestMode::User64);
    /// Triple-faults.
    pub const TRIPLE_FAULT: Guest = guest!("triple_fault", GuestMode::User64);
    /// Writes the test port `param` times, then exits with code 0.
    pub const PIO_LOOP: Guest = guest!("pio_loop", GuestMode::User64);
    /// Writes the test MMIO window `param` times, then exits with code 0.
    pub const MMIO_LOOP: Guest = guest!("mmio_loop", GuestMode::User64);
    /// Real mode: writes "real mode\n" to COM1 and exits with code 0x42.
    pub const REAL_MODE_HELLO: Guest = guest!("rm_hello", GuestMode::Real);
    /// A C guest driving the virtio-blk device at [`abi::VIRTIO_MMIO_BASE`]: writes,
    /// reads, flush, get-id, an out-of-range read that must fail and a batch of 16
    /// requests per notification; prints `capacity`, `id` and its notification count to
    /// COM1 and exits 0 when every check passed. Parameter bit 0: use EVENT_IDX.
    pub const VIRTIO_BLK: Guest = guest!("virtio_blk", GuestMode::User64);
    /// A C guest driving the virtio-console at [`abi::VIRTIO_MMIO_BASE`]: sends
    /// `hello from virtio-console`, waits for `ping` and answers `got: ping`. Parameter
    /// bit 0: first give the virtio-blk device in the next window an invalid queue and
    /// check that it reports NEEDS_RESET.
    pub const VIRTIO_CONSOLE: Guest = guest!("virtio_console", GuestMode::User64);
    /// A C guest driving the virtio-net device at [`abi::VIRTIO_MMIO_BASE`]: sends the
    /// UDP datagram `hello from a vmcraft guest` from 10.0.2.2:4000 to 10.0.2.1:5000
    /// (MAC 02:00:00:00:00:01), then waits for `pong` back and exits 0.
    pub const VIRTIO_NET: Guest = guest!("virtio_net", GuestMode::User64);
    /// A C guest driving the virtio-rng device at [`abi::VIRTIO_MMIO_BASE`]: two
    /// 64-byte requests come back full and different, a 128 KiB one is cut to the
    /// 64 KiB cap; prints `rng ok` and exits 0.
    pub const VIRTIO_RNG: Guest = guest!("virtio_rng", GuestMode::User64);
    /// A C guest driving the virtio-vsock device at [`abi::VIRTIO_MMIO_BASE`] as its
    /// own small driver. Parameter 0: a session against a host echo listener on
    /// port 1234 (256 KiB each way through a 16 KiB window given back only when used
    /// up), a reset from port 4321 where nobody listens, 32 connections at once, then
    /// the host's connection to its port 5000 accepted (`listening` printed first)
    /// and echoed; prints `vsock ok` and exits 0. Parameter 1: an agent that echoes a
    /// counter through port 1234 forever and reconnects whenever its connection goes
    /// (a transport reset after a restore); exits 70 if a reconnect is refused, 71 if
    /// an echo comes back wrong. Its count of connections made is the `u64` at
    /// `GUEST_HEAP + 0x7f000`.
    pub const VIRTIO_VSOCK: Guest = guest!("virtio_vsock", GuestMode::User64);
    /// A C guest that finds the vmcraft interface through CPUID at CPL 0 (it scans
    /// the hypervisor range in steps of 0x100 for the signature, then reads the
    /// hypercall port from the next leaf), then makes hypercalls at CPL 3 through
    /// [`abi::HYPERCALL_PORT`]: 1 = sum of five arguments, 2 = copy 8 bytes between
    /// guest pointers, 3 = echo an argument up to 100, and an unknown number. Prints
    /// `hypercalls ok`, exits 0; exit 10 means no vmcraft signature was found, 11 that
    /// the leaf after it named another port.
    pub const HYPERCALLS: Guest = guest!("hypercalls", GuestMode::Kernel64);
    /// The PV demo: prints through the PV console ring, writes a page to the PV block
    /// device through a grant, reads it back, flushes, checks a refused request, and
    /// exits 0. Uses only hypercalls, rings, event channels and grants (pages and ports
    /// in [`abi`]: `PV_*`).
    pub const PV_DEMO: Guest = guest!("pv_demo", GuestMode::User64);
    /// A PV block load generator: 4 KiB reads or writes in batches behind one publish
    /// each, through granted pages. Parameter: bit 1 write, bit 2 random offsets,
    /// bits 8..15 batch (1 to 32), bits 16..47 the number of requests. Prints
    /// `notifications <hex>` on the PV console; per-batch latencies go to
    /// `GUEST_HEAP + 0x80000`.
    pub const PV_BLK_BENCH: Guest = guest!("pv_blk_bench", GuestMode::User64);
    /// A Rust guest whose PV block front end is vmcraft's own `no_std` ring and blkif
    /// wire code: writes a granted page, reads it back, flushes, checks a refused
    /// segment; prints `rust front end ok` on COM1 and exits 0.
    pub const PV_RING_FRONT: Guest = guest!("pv_ring_front", GuestMode::User64);
    /// The independent driver: rcore-os's `virtio-drivers` crate (0.13, pinned by
    /// `guests/independent/Cargo.lock`) drives every device the host describes in an
    /// [`abi::independent::Plan`] (the parameter is its address) on virtio-pci through
    /// ECAM, or on virtio-mmio: a disk, an entropy source, a console and a network
    /// device. Each check prints `independent: ok ...` or `independent: FAILED ...` on
    /// COM1, then `independent: <passed>/<total> passed`; exits with the number of
    /// failed checks (99 if the driver panicked, 98 without a plan).
    pub const INDEPENDENT: Guest = guest!("independent", GuestMode::User64);
    /// Drives the emulated ATA disk as an unmodified guest would (task file, status
    /// polling, `rep insw`/`rep outsw`): 4 KiB operations, reads or writes, sequential
    /// or random, latencies in TSC ticks at `GUEST_HEAP + 0x80000`. Parameter: bit 0
    /// write, bit 1 random, bit 2 verify (round trip a pattern, check an out-of-range
    /// error, print `ata ok`), bit 3 check rounds (write, read back and compare 8 KiB
    /// per round, output as [`atacheck_output`]; exit code 3 for data that did not come
    /// back), bits 16..47 count (of operations, or of check rounds).
    pub const ATA_BENCH: Guest = guest!("ata_bench", GuestMode::User64);
    /// Console output load through the 16550 (path 0), virtio-console (1) or the PV
    /// console ring (2), in 4 KiB chunks with per-chunk latencies at `LATENCIES`.
    /// Parameter: bits 0..1 path, bits 16..47 byte count.
    pub const CONSOLE_BENCH: Guest = guest!("console_bench", GuestMode::User64);
    /// A virtio-blk load generator: 4 KiB reads or writes in batches behind one
    /// notification each. Parameter: bit 0 EVENT_IDX, bit 1 write, bit 2 random
    /// offsets, bit 3 a polled queue (no interrupts wanted, as Linux's virtio-blk poll
    /// queues ask), bits 8..15 batch (1 to 32), bits 16..47 the number of requests. Prints
    /// `kicks <hex>` to COM1; per-batch latencies go to `GUEST_HEAP + 0x80000`.
    pub const VIRTIO_BLK_BENCH: Guest = guest!("virtio_blk_bench", GuestMode::User64);
    /// A hostile virtio-blk driver: one kind of abuse (parameter bits 0..7: 1 chains
    /// naming nearly 4 GiB, 2 looping chains, 3 an available index a ring ahead, 4 a
    /// notification storm, 5 oversized requests in guest memory) repeated `rounds`
    /// times (bits 8..31), then a checked round trip. Exits 0 when the device answered
    /// each as it must (NEEDS_RESET for 1 to 3, error statuses for 5); prints
    /// `flood <kind> done <rounds>`.
    pub const VIRTIO_FLOOD: Guest = guest!("virtio_flood", GuestMode::User64);
    /// A hostile PV guest: one kind of flood (parameter bits 0..7: 1 the blkif
    /// request producer a ring ahead, 2 a hypercall storm of unknown calls, empty
    /// sends, port allocations, bad pointers and status queries, 3 a doorbell storm)
    /// repeated `rounds` times (bits 8..31). Exits 0 when every answer was the ABI's
    /// and (after 2 and 3) a page still round-trips through the block ring; prints
    /// `flood <kind> done <rounds>` (and `ports <allocated>` after 2) on COM1 and
    /// `pv console still served` on the PV console.
    pub const PV_FLOOD: Guest = guest!("pv_flood", GuestMode::User64);
    /// Rewrites and checks guest memory, for snapshot and migration tests: `rounds`
    /// rounds (parameter bits 16..47) over `mib` MiB from 16 MiB (bits 0..15; the VM
    /// needs 16 + `mib` MiB). Round r writes word i of the span as
    /// [`memcheck_word`]`(r, i)`, reads it all back and checks it, then prints
    /// `round <r> sum <sum of the words>` on COM1; `memcheck done` at the end and exit
    /// code 0, or `mismatch at <address>` and exit code 1.
    pub const MEMCHECK: Guest = guest!("memcheck", GuestMode::User64);
    /// Keeps virtio-blk requests in flight, for snapshot and migration tests:
    /// `rounds` rounds (parameter bits 16..47; bit 0 negotiates EVENT_IDX), each a
    /// batch of 16 page writes behind one notification, then a batch reading them
    /// back, checked byte for byte; prints `round <r> ok` on COM1 after each and
    /// `blkcheck done` at the end, exit code 0 (2 for a failed request, 3 for data
    /// that did not read back).
    pub const BLKCHECK: Guest = guest!("blkcheck", GuestMode::User64);
    /// Dirties guest memory at a steady rate, for migration benchmarks: parameter
    /// bits 0..23 pages per second, bits 24..39 the span in MiB from 16 MiB, bits
    /// 40..63 the TSC frequency in MHz. Writes every page of the span first and prints
    /// `filled` on COM1, then one page per 1/rate of a second, forever.
    pub const DIRTIER: Guest = guest!("dirtier", GuestMode::User64);
    /// Keeps PV block requests in flight, for snapshot and migration tests: `rounds`
    /// rounds (parameter bits 16..47), each a batch of 8 granted page writes behind
    /// one event-channel notification, then a batch reading them back through other
    /// grants, checked byte for byte; prints `round <r> ok` on COM1 after each and
    /// `pvcheck done` at the end (the same lines as [`blkcheck_output`] but the last),
    /// exit code 0 (2 for a failed request, 3 for data that did not come back).
    pub const PVCHECK: Guest = guest!("pvcheck", GuestMode::User64);
    /// A virtio-balloon driver: writes a 16 MiB pool at 16 MiB, prints `ready`, then
    /// follows the device's target forever (inflating from the top of the pool,
    /// deflating and checking the pages it gets back), printing `inflated <n>` and
    /// `deflated ok <n>` when it reaches one; exit code 1 if a page did not read back.
    pub const BALLOON: Guest = guest!("balloon", GuestMode::User64);
    /// A working set that rises and falls as the host says, with a virtio-balloon
    /// driver of its own (inflate, deflate, statistics, deflate on OOM), for the
    /// memory balancer: see [`Phased`]. Parameter: the pool's pages from 16 MiB (the
    /// VM needs 16 MiB + 4 KiB × pool); prints `ready` on COM1 once its driver runs,
    /// and `bad page <index>` then exits 1 if a page of its working set lost its
    /// contents.
    pub const PHASED: Guest = guest!("phased", GuestMode::User64);
    /// A hostile guest for soak tests: random port writes and reads, random
    /// hypercalls, random writes to the first four virtio-mmio windows' registers, and
    /// random bytes over its heap (where virtqueues live) and the PV pages. Parameter:
    /// bits 0..15 the seed, bits 16..47 the number of actions; exits 0 after them,
    /// unless an action ends the VM first (a reset, a power-off, a device overwriting
    /// its code).
    pub const SOAK: Guest = guest!("soak", GuestMode::User64);
    /// Real mode, the smallest useful guest (for start-up measurements): its first exit
    /// writes a newline to COM1, its second exits with code 0. Position independent and
    /// at most 16 bytes, so it also fits at the reset vector of a firmware image.
    pub const REAL_MODE_EXIT: Guest = guest!("rm_exit", GuestMode::Real);

    /// Where the guest is loaded.
    pub fn load_addr(&self) -> u64 {
        match self.mode {
            GuestMode::User64 | GuestMode::Kernel64 => abi::LOAD_ADDR,
            GuestMode::Real => abi::REAL_MODE_LOAD_ADDR,
        }
    }

    /// The guest as an image to load (with `vmcraft::builder::MachineBuilder::load`,
    /// which checks it against the boot tables and other images).
    pub fn image(&self) -> vmcraft_memory::layout::Image<'static> {
        vmcraft_memory::layout::Image {
            name: self.name,
            addr: self.load_addr(),
            bytes: self.code,
        }
    }

    /// Write the guest's code into `mem` directly, unchecked (for a bare `Vm`).
    pub fn load(&self, mem: &GuestMemory) -> Result<(), GuestError> {
        let addr = self.load_addr();
        mem.write_slice(self.code, GuestAddress(addr))
            .map_err(|source| GuestError::Load {
                name: self.name,
                addr,
                len: self.code.len(),
                source,
            })
    }

    /// The entry for vCPU `vcpu_index`, with `param` in `rsi`.
    pub fn entry(&self, vcpu_index: u32, param: u64) -> Entry {
        match self.mode {
            GuestMode::User64 | GuestMode::Kernel64 => Entry::LongMode {
                rip: abi::LOAD_ADDR,
                rsp: abi::STACK_TOP - u64::from(vcpu_index) * 0x1000,
                privilege: if self.mode == GuestMode::Kernel64 {
                    Privilege::Kernel
                } else {
                    Privilege::User { iopl: 3 }
                },
                args: [u64::from(vcpu_index), param],
            },
            GuestMode::Real => Entry::RealMode {
                addr: abi::REAL_MODE_LOAD_ADDR,
            },
        }
    }

    /// Guest-physical address of vCPU `vcpu_index`'s progress counter (see
    /// [`Guest::COUNTER`]).
    pub fn counter_addr(vcpu_index: u32) -> GuestAddress {
        GuestAddress(abi::COUNTER_BASE + 64 * u64::from(vcpu_index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guests_are_assembled_and_small() {
        for g in [
            Guest::HELLO,
            Guest::PIO_MMIO,
            Guest::COUNTER,
            Guest::EXIT_CODE,
            Guest::IN_EXIT,
            Guest::REAL_MODE_HELLO,
        ] {
            assert!(
                !g.code.is_empty() && g.code.len() < 4096,
                "{} is {} bytes",
                g.name,
                g.code.len()
            );
        }
        // `counter` is: shl $6,%rdi; lea COUNTER_BASE(%rdi),%rbx; incq (%rbx); jmp
        assert_eq!(&Guest::COUNTER.code[..4], &[0x48, 0xc1, 0xe7, 0x06]);
        assert!(Guest::HELLO.code.windows(5).any(|w| w == b"Hello"));
        assert!(Guest::REAL_MODE_EXIT.code.len() <= 16);
    }

    #[test]
    fn the_runtime_drops_to_the_selectors_the_boot_gdt_defines() {
        use vmcraft_vcpu::mode::{SEL_USER_CODE, SEL_USER_DATA};
        assert_eq!(abi::USER_CODE_SELECTOR, SEL_USER_CODE);
        assert_eq!(abi::USER_DATA_SELECTOR, SEL_USER_DATA);
        assert!(matches!(
            Guest::HYPERCALLS.entry(0, 0),
            Entry::LongMode {
                privilege: Privilege::Kernel,
                ..
            }
        ));
    }
}
