//! Guest memory for vmcraft virtual machine monitors.
//!
//! * [`layout`]: where RAM goes in the guest-physical address space on x86-64 (below
//!   the 32-bit MMIO gap, the rest above 4 GiB).
//! * [`GuestRam`]: the memory itself, built on `vm-memory` with its dirty bitmap
//!   backend, registered with KVM as memory slots, with dirty-page tracking that merges
//!   the guest's writes (KVM's log) with the VMM's own writes (vm-memory's bitmap).
//! * [`mmio`]: an allocator for guest-physical MMIO windows.
//! * [`discard`]: guest pages given back to the host (a balloon's, reported free ones).
//! * [`host_usage`]: the host memory the VMM process and its guest RAM use.
//! * [`poll`]: how long a device thread spins on a ring in guest memory before it
//!   sleeps (adaptive polling, shared by the virtio and PV back ends).
//! * [`snapshot`]: guest memory saved to a sparse file and mapped back copy-on-write.
//! * [`vectored`]: file I/O straight between a file and guest memory (`preadv` and
//!   `pwritev` over gathered guest ranges), the guest pages it fills marked dirty.
//!
//! ```
//! use vmcraft_memory::{GuestRam, layout::MemoryLayout};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let layout = MemoryLayout::x86_64(64 << 20).unwrap();
//! let ram = GuestRam::new(&layout).unwrap();
//! ram.memory().write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
//! assert_eq!(ram.memory().read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
//! ```

pub mod discard;
pub mod host_usage;
pub mod layout;
pub mod mmio;
pub mod poll;
mod ram;
pub mod report;
pub mod snapshot;
pub mod vectored;

pub use ram::{map_shared_regions, DirtyPages, GuestRam, MemoryError, SharedRegion, PAGE_SIZE};
pub use vm_memory;

/// The guest memory type every vmcraft crate shares: mmap-backed regions that track the
/// pages the VMM writes in an atomic bitmap.
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
