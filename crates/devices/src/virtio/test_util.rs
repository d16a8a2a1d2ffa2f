//! Helpers for the virtio devices' host-side tests.

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmcraft_memory::GuestMemory;

/// A split-ring descriptor.
pub(crate) fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// The `len` of every used element the device published.
pub(crate) fn used_lens(mem: &GuestMemory, mock: &MockSplitQueue<'_, GuestMemory>) -> Vec<u32> {
    let at = mock.used_addr().0;
    let idx: u16 = mem.read_obj(GuestAddress(at + 2)).unwrap();
    (0..u64::from(idx))
        .map(|i| mem.read_obj(GuestAddress(at + 8 + 8 * i)).unwrap())
        .collect()
}
