//! The virtio-mmio transport with an entropy device behind it, driven by structured
//! sequences: register reads and writes, guest-memory writes (descriptors, rings,
//! buffers anywhere in the first 64 KiB) and "the device serves its queue now". Checked
//! after every step:
//! - a QueueReady of 0 reads back 0 (virtio 1.2 §4.2.2.2);
//! - the device is served only while DRIVER_OK is set and the queue is ready;
//! - serving writes guest memory only inside the used ring and the device-writable
//!   buffers the descriptor table (and any indirect table) names;
//! - the used index moves by exactly the number of chains served;
//! - every byte serving changes lies in a page marked dirty in vm-memory's bitmap.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmcraft_devices::virtio::mmio::MmioTransport;
use vmcraft_devices::virtio::rng::serve_queue;
use vmcraft_devices::virtio::virtio_queue::{Queue, QueueT};
use vmcraft_devices::virtio::{
    ActivateError, ActiveQueues, VirtioDevice, F_EVENT_IDX, F_VERSION_1,
};
use vmcraft_memory::layout::MemoryLayout;
use vmcraft_memory::vm_memory::bitmap::Bitmap;
use vmcraft_memory::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmcraft_memory::{GuestMemory, GuestRam};

const MEM: usize = 1 << 20;
const WINDOW: u64 = 64 << 10;
const PAGE: usize = 4096;

#[derive(Debug, Arbitrary)]
enum Op {
    /// A 32-bit register write (offset = 4 * reg).
    Write { reg: u8, value: u32 },
    /// A 32-bit register read.
    Read { reg: u8 },
    /// Guest memory written by the driver.
    Memory { addr: u16, bytes: Vec<u8> },
    /// The device serves its queue (as its I/O thread would on a notification).
    Serve,
    /// A whole driver bring-up (virtio 1.2 §3.1.1) with these queue parameters, which
    /// may be wrong.
    BringUp {
        event_idx: bool,
        size: u8,
        desc: u16,
        avail: u16,
        used: u16,
    },
    /// Descriptor `index` of the table the last bring-up named.
    Descriptor {
        index: u8,
        addr: u16,
        len: u16,
        flags: u8,
        next: u8,
    },
    /// Publish `head` on the available ring the last bring-up named.
    Publish { head: u8 },
}

/// An entropy device whose queue the harness serves synchronously.
struct Device(Arc<Mutex<Option<(GuestMemory, Queue)>>>);

impl VirtioDevice for Device {
    fn device_type(&self) -> u32 {
        4
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_EVENT_IDX
    }
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, mut q: ActiveQueues) -> Result<(), ActivateError> {
        let [queue] = q.take_ready()?;
        *self.0.lock().unwrap() = Some((q.mem.clone(), queue));
        Ok(())
    }
    fn reset(&mut self) {
        *self.0.lock().unwrap() = None;
    }
}

/// The byte ranges serving may write: the used ring and every device-writable buffer
/// the descriptor table names, directly or through an indirect table.
fn writable(mem: &GuestMemory, q: &Queue) -> Vec<(u64, u64)> {
    let size = u64::from(q.size());
    let mut ranges = vec![(q.used_ring(), 6 + 8 * size)];
    let desc = |table: u64, i: u64| {
        let mut d = [0u8; 16];
        mem.read_slice(&mut d, GuestAddress(table + 16 * i)).ok()?;
        let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
        let len = u64::from(u32::from_le_bytes(d[8..12].try_into().unwrap()));
        let flags = u16::from_le_bytes([d[12], d[13]]);
        Some((addr, len, flags))
    };
    for i in 0..size {
        let Some((addr, len, flags)) = desc(q.desc_table(), i) else {
            continue;
        };
        if flags & 2 != 0 {
            ranges.push((addr, len));
        }
        if flags & 4 != 0 {
            for j in 0..(len / 16).min(4096) {
                if let Some((a, l, f)) = desc(addr, j) {
                    if f & 2 != 0 {
                        ranges.push((a, l));
                    }
                }
            }
        }
    }
    ranges
}

fuzz_target!(|ops: Vec<Op>| {
    let ram = GuestRam::new(&MemoryLayout::x86_64(MEM as u64).unwrap()).unwrap();
    let mem = ram.memory().clone();
    let active = Arc::new(Mutex::new(None));
    let mut t = MmioTransport::new(Box::new(Device(active.clone())), mem.clone()).unwrap();
    let mut scratch = vec![0u8; 4096];
    let requeue = vmcraft_devices::virtio::EventFd::new(0).unwrap();
    // What guest memory held after the last check (it starts zeroed).
    let mut shadow = vec![0u8; MEM];
    let mut serves = 0u32;
    // The driver's view: its rings (from the last bring-up) and next available index.
    let (mut desc_at, mut avail_at, mut avail_idx) = (0u64, 0u64, 0u16);
    let w = |t: &mut MmioTransport, offset: u64, value: u32| t.write(offset, &value.to_le_bytes());
    for op in ops.iter().take(256) {
        match op {
            Op::BringUp {
                event_idx,
                size,
                desc,
                avail,
                used,
            } => {
                w(&mut t, 0x70, 0);
                w(&mut t, 0x70, 1);
                w(&mut t, 0x70, 3);
                w(&mut t, 0x24, 0);
                w(&mut t, 0x20, if *event_idx { 1 << 29 } else { 0 });
                w(&mut t, 0x24, 1);
                w(&mut t, 0x20, 1);
                w(&mut t, 0x70, 11);
                w(&mut t, 0x30, 0);
                w(&mut t, 0x38, u32::from(*size));
                for (reg, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
                    w(&mut t, reg, u32::from(*addr));
                    w(&mut t, reg + 4, 0);
                }
                w(&mut t, 0x44, 1);
                w(&mut t, 0x70, 15);
                (desc_at, avail_at, avail_idx) = (u64::from(*desc), u64::from(*avail), 0);
                // A driver starts its rings at zero: the available index, and the used
                // index the device counts from (else a ring left from an earlier
                // bring-up at the same address keeps its old used index, which the
                // device, starting again at 0, does not move past).
                let _ = mem.write_obj(0u16, GuestAddress(avail_at + 2));
                let _ = mem.write_obj(0u16, GuestAddress(u64::from(*used) + 2));
            }
            Op::Descriptor {
                index,
                addr,
                len,
                flags,
                next,
            } => {
                let mut d = [0u8; 16];
                d[0..8].copy_from_slice(&u64::from(*addr).to_le_bytes());
                d[8..12].copy_from_slice(&u32::from(*len).to_le_bytes());
                d[12..14].copy_from_slice(&u16::from(*flags & 7).to_le_bytes());
                d[14..16].copy_from_slice(&u16::from(*next).to_le_bytes());
                let at = desc_at + 16 * u64::from(*index % 16);
                if at + 16 <= WINDOW {
                    mem.write_slice(&d, GuestAddress(at)).unwrap();
                }
            }
            Op::Publish { head } => {
                let slot = avail_at + 4 + 2 * u64::from(avail_idx % 16);
                if slot + 2 <= WINDOW && avail_at + 4 <= WINDOW {
                    mem.write_obj(u16::from(*head), GuestAddress(slot)).unwrap();
                    avail_idx = avail_idx.wrapping_add(1);
                    mem.write_obj(avail_idx, GuestAddress(avail_at + 2))
                        .unwrap();
                }
            }
            Op::Write { reg, value } => {
                let offset = u64::from(*reg) * 4;
                t.write(offset, &value.to_le_bytes());
                if offset == 0x44 && *value == 0 {
                    let mut ready = [0xffu8; 4];
                    t.read(0x44, &mut ready);
                    assert_eq!(ready, [0; 4], "QueueReady 0 did not read back");
                }
            }
            Op::Read { reg } => {
                let mut b = [0u8; 4];
                t.read(u64::from(*reg) * 4, &mut b);
            }
            Op::Memory { addr, bytes } => {
                let n = bytes.len().min((WINDOW - u64::from(*addr)) as usize);
                mem.write_slice(&bytes[..n], GuestAddress(u64::from(*addr)))
                    .unwrap();
            }
            Op::Serve => {
                let mut slot = active.lock().unwrap();
                let Some((qmem, queue)) = slot.as_mut() else {
                    continue;
                };
                assert_ne!(t.status() & 4, 0, "a queue is active without DRIVER_OK");
                let allowed = writable(qmem, queue);
                // The shadow catches up with the harness's own writes since the last
                // serve (vm-memory marked their pages), then the bitmap is cleared, so
                // after serving it names the pages the device wrote.
                let region = qmem.find_region(GuestAddress(0)).unwrap();
                for page in (0..MEM).step_by(PAGE) {
                    if region.bitmap().dirty_at(page) {
                        qmem.read_slice(&mut shadow[page..page + PAGE], GuestAddress(page as u64))
                            .unwrap();
                    }
                }
                std::ops::Deref::deref(region).bitmap().reset();
                let used_before: u16 = qmem
                    .read_obj(GuestAddress(queue.used_ring() + 2))
                    .unwrap_or(0);
                let served = serve_queue(queue, qmem, t.interrupt(), &requeue, &mut scratch);
                serves += 1;
                // Every eighth serve compares all of memory, which also checks that
                // each byte the device changed lies in a page it marked dirty (live
                // migration depends on that); the others compare the marked pages.
                let full = serves % 8 == 1;
                let mut page_now = vec![0u8; PAGE];
                for page in (0..MEM).step_by(PAGE) {
                    let dirty = region.bitmap().dirty_at(page);
                    if !dirty && !full {
                        continue;
                    }
                    qmem.read_slice(&mut page_now, GuestAddress(page as u64))
                        .unwrap();
                    for (i, (b, a)) in shadow[page..page + PAGE].iter().zip(&page_now).enumerate() {
                        if b != a {
                            let at = (page + i) as u64;
                            assert!(
                                dirty,
                                "the device wrote {at:#x} without marking its page dirty"
                            );
                            assert!(
                                allowed.iter().any(|&(s, l)| at >= s && at - s < l),
                                "the device wrote {at:#x}, outside the used ring and writable buffers"
                            );
                        }
                    }
                    shadow[page..page + PAGE].copy_from_slice(&page_now);
                }
                if let Ok(n) = served {
                    let used_after: u16 =
                        qmem.read_obj(GuestAddress(queue.used_ring() + 2)).unwrap();
                    // A writable buffer may alias the used ring (the guest lays out its
                    // memory), so only check the index when no buffer overlaps it.
                    let used = queue.used_ring();
                    let aliased = allowed[1..]
                        .iter()
                        .any(|&(s, l)| s < used + 4 && used + 2 < s.saturating_add(l));
                    if !aliased {
                        assert_eq!(used_after.wrapping_sub(used_before), n as u16);
                    }
                } else {
                    // A protocol error: the harness, like the I/O thread, stops serving
                    // until a reset.
                    t.interrupt().device_error();
                    *slot = None;
                }
            }
        }
    }
});
