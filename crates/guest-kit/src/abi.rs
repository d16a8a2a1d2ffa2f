// The contract between test guests and the host, shared by build.rs (which passes each
// constant to the assembler as -DNAME=value) and the library.

/// Port whose write stops the VM with the written value as exit code.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// First port of the COM1 16550 UART.
pub const COM1_PORT: u16 = 0x3f8;
/// i8042 command port (0xfe there resets the CPU).
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Port of the test device that records writes and answers reads with a pattern.
pub const TEST_PORT: u16 = 0x510;
/// Guest-physical address of the test device's MMIO window.
pub const TEST_MMIO: u64 = 0xd000_0000;
/// GDT selector of the 64-bit user code segment (RPL 3) that a guest entered at CPL 0
/// drops to; the same as `vmcraft_vcpu::mode::SEL_USER_CODE` (checked by a test).
pub const USER_CODE_SELECTOR: u16 = 0x2b;
/// GDT selector of the user data segment (RPL 3), `vmcraft_vcpu::mode::SEL_USER_DATA`.
pub const USER_DATA_SELECTOR: u16 = 0x23;
/// Where long-mode guests are loaded and entered.
pub const LOAD_ADDR: u64 = 0x10_0000;
/// Where real-mode guests are loaded and entered.
pub const REAL_MODE_LOAD_ADDR: u64 = 0x8000;
/// Per-vCPU progress counters (64 bytes apart) written by the `counter` guest.
pub const COUNTER_BASE: u64 = 0x20_0000;
/// Top of vCPU 0's stack; each further vCPU's stack is 0x1000 lower.
pub const STACK_TOP: u64 = 0x8_0000;
/// Guest-physical address of the first virtio-mmio device window; device `n` is at
/// `VIRTIO_MMIO_BASE + n * 0x1000`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd100_0000;
/// Scratch memory C guests use for rings and buffers (identity mapped, 4 MiB).
pub const GUEST_HEAP: u64 = 0x40_0000;
/// Port whose write traps a hypercall (number and arguments in registers, Xen's
/// x86-64 convention; result in rax). Below 0x100, so the guest can use the
/// immediate form of `out` and keep rdx for an argument.
pub const HYPERCALL_PORT: u16 = 0x98;
/// PV demo: the event-channel shared-info page.
pub const PV_SHARED_INFO: u64 = 0x30_0000;
/// PV demo: the console page (Xen's `xencons_interface`).
pub const PV_CONSOLE_PAGE: u64 = 0x30_1000;
/// PV demo: the blkif ring page.
pub const PV_BLK_RING: u64 = 0x30_2000;
/// PV demo: the grant table (64 v1 entries).
pub const PV_GRANT_TABLE: u64 = 0x30_3000;
/// PV demo: the console's event-channel port.
pub const PV_CONSOLE_PORT: u64 = 1;
/// PV demo: the block device's event-channel port.
pub const PV_BLK_PORT: u64 = 2;
/// PV demo: the event-channel doorbell. A 4-byte write of a port number sends on that
/// port; the VMM registers it as an ioeventfd per port, so the send never leaves the
/// kernel (the `EVTCHNOP_send` hypercall does the same the slow way).
pub const PV_DOORBELL_PORT: u16 = 0x9c;

/// What the independent driver guest (`Guest::INDEPENDENT`) and its host agree on.
pub mod independent {
    /// What the host tells the guest, written at the guest-physical address it passes
    /// as the parameter.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Plan {
        /// [`Plan::MAGIC`].
        pub magic: u64,
        /// [`Plan::PCI`] or [`Plan::MMIO`].
        pub transport: u64,
        /// On PCI, the ECAM window of bus 0.
        pub base: u64,
        /// On virtio-mmio, how many windows `windows` lists.
        pub count: u64,
        /// On virtio-mmio, the size of each window.
        pub window_size: u64,
        /// On virtio-mmio, the windows.
        pub windows: [u64; 8],
        /// The disk's size in sectors; byte `i` of sector `s` holds `disk_byte(s, i)`.
        pub disk_sectors: u64,
        /// The network device's MAC, in the low six bytes (little-endian order).
        pub mac: u64,
    }

    impl Plan {
        /// The value of `magic`.
        pub const MAGIC: u64 = 0x6e65_646e_6570_6564;
        /// The devices are virtio-pci functions on bus 0.
        pub const PCI: u64 = 1;
        /// The devices are virtio-mmio windows.
        pub const MMIO: u64 = 2;

        /// The plan as the guest reads it from memory.
        pub fn to_bytes(self) -> [u8; 15 * 8] {
            let words = [
                self.magic,
                self.transport,
                self.base,
                self.count,
                self.window_size,
                self.windows[0],
                self.windows[1],
                self.windows[2],
                self.windows[3],
                self.windows[4],
                self.windows[5],
                self.windows[6],
                self.windows[7],
                self.disk_sectors,
                self.mac,
            ];
            let mut out = [0u8; 15 * 8];
            for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
                chunk.copy_from_slice(&w.to_le_bytes());
            }
            out
        }
    }

    /// The byte the host puts at byte `i` of sector `s` of the disk.
    pub fn disk_byte(s: u64, i: usize) -> u8 {
        (s.wrapping_mul(31) as u8).wrapping_add(i as u8) ^ 0x5a
    }

    /// The byte the guest writes at byte `i` of sector `s`, in `WRITE_AT..WRITE_AT +
    /// WRITE_SECTORS`.
    pub fn written_byte(s: u64, i: usize) -> u8 {
        (s as u8).wrapping_mul(7).wrapping_add(i as u8) ^ 0xa5
    }

    /// The first sector the guest writes.
    pub const WRITE_AT: usize = 16;
    /// How many sectors the guest writes.
    pub const WRITE_SECTORS: usize = 8;
    /// The line the host sends the guest's console.
    pub const HOST_LINE: &[u8] = b"host to independent driver\n";
    /// The line the guest sends back.
    pub const GUEST_LINE: &[u8] = b"independent driver to host\n";
    /// The EtherType of the guest's frame (local experimental); the host echoes such
    /// a frame with its payload (past the 14-byte header) reversed.
    pub const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
}
