//! The independent driver: rcore-os's `virtio-drivers` crate, a virtio driver written
//! for other hypervisors and kernels, run as a vmcraft guest against vmcraft's devices
//! on the PCI transport (configuration space through ECAM, BARs sized by the driver)
//! or on virtio-mmio. Nothing here touches a device register: every access is the
//! crate's own. The guest only walks the checks and reports them on COM1.
//!
//! The host passes the address of an `abi::independent::Plan` as the parameter. Each check prints
//! `independent: ok <what>` or `independent: FAILED <what>: <why>`, the last line is
//! `independent: <passed>/<total> passed`, and the exit code is the number of failed
//! checks (99 if the driver panicked).
#![no_std]
#![allow(missing_docs)]

extern crate alloc;

#[path = "../../src/abi.rs"]
#[allow(dead_code)]
mod abi;

use alloc::vec;
use core::alloc::{GlobalAlloc, Layout};
use core::arch::asm;
use core::fmt::Write;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::device::net::VirtIONet;
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::pci::bus::{Cam, Command, DeviceFunction, MmioCam, PciRoot};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::{DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

use abi::independent::{
    disk_byte, written_byte, Plan, ETHERTYPE, GUEST_LINE, HOST_LINE, WRITE_AT, WRITE_SECTORS,
};

/// Heap for the crate's allocations and its DMA pages: identity-mapped guest RAM.
const HEAP_START: u64 = abi::GUEST_HEAP;
const HEAP_END: u64 = 0x100_0000;

struct Bump;

static NEXT: AtomicU64 = AtomicU64::new(HEAP_START);

// SAFETY: alloc hands out disjoint, aligned ranges of the heap (an atomic bump pointer
// that never goes back), within identity-mapped RAM the guest owns; dealloc never
// reuses memory, so nothing is handed out twice.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let align = layout.align().max(16) as u64;
        let mut at = NEXT.load(Ordering::Relaxed);
        loop {
            let start = (at + align - 1) & !(align - 1);
            let end = start + layout.size() as u64;
            if end > HEAP_END {
                return core::ptr::null_mut();
            }
            match NEXT.compare_exchange(at, end, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return start as *mut u8,
                Err(now) => at = now,
            }
        }
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

#[global_allocator]
static HEAP: Bump = Bump;

/// Guest-physical is guest-virtual (the first 4 GiB are identity mapped) and the
/// device sees all of guest RAM, so sharing is the identity.
struct Identity;

// SAFETY: dma_alloc returns fresh, zeroed, page-aligned memory of the size asked for
// that nothing else uses; physical and virtual addresses are the same here.
unsafe impl Hal for Identity {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap();
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        let p = NonNull::new(p).expect("the guest heap is exhausted");
        (p.as_ptr() as PhysAddr, p)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).unwrap()
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

struct Com1;

impl Write for Com1 {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            // SAFETY: a port write to the emulated 16550 (IOPL 3 lets CPL 3 do it).
            unsafe { asm!("out dx, al", in("dx") abi::COM1_PORT, in("al") b) };
        }
        Ok(())
    }
}

macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = write!(Com1, "independent: ");
        let _ = writeln!(Com1, $($arg)*);
    }};
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!("PANIC {info}");
    exit(99)
}

/// The host target's prebuilt `alloc` was compiled to unwind and names this; with
/// panic=abort nothing ever unwinds, so reaching it is a bug reported as exit 97.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    exit(97)
}

fn exit(code: u32) -> ! {
    // SAFETY: a port write to the debug-exit device; the VMM stops the VM.
    unsafe { asm!("out dx, eax", in("dx") abi::DEBUG_EXIT_PORT, in("eax") code) };
    loop {
        core::hint::spin_loop();
    }
}

/// The checks' tally.
#[derive(Default)]
struct Tally {
    passed: u32,
    failed: u32,
}

impl Tally {
    fn check(&mut self, what: &str, run: impl FnOnce() -> Result<(), alloc::string::String>) {
        match run() {
            Ok(()) => {
                self.passed += 1;
                say!("ok {what}");
            }
            Err(why) => {
                self.failed += 1;
                say!("FAILED {what}: {why}");
            }
        }
    }
}

macro_rules! fail {
    ($($arg:tt)*) => { Err(alloc::format!($($arg)*)) };
}

/// How many polls a check waits for the host before it gives up.
const PATIENCE: u64 = 200_000_000;

fn block<T: Transport>(plan: &Plan, tally: &mut Tally, mut make: impl FnMut() -> T) {
    let mut blk = match VirtIOBlk::<Identity, T>::new(make()) {
        Ok(b) => b,
        Err(e) => return tally.check("block: initialised", || fail!("{e:?}")),
    };
    tally.check("block: capacity and the host's sectors", || {
        if blk.capacity() != plan.disk_sectors {
            return fail!(
                "capacity {} sectors, the host made {}",
                blk.capacity(),
                plan.disk_sectors
            );
        }
        let mut buf = vec![0u8; 4 * SECTOR_SIZE];
        blk.read_blocks(0, &mut buf)
            .map_err(|e| alloc::format!("{e:?}"))?;
        let last = plan.disk_sectors as usize - 4;
        let mut tail = vec![0u8; 4 * SECTOR_SIZE];
        blk.read_blocks(last, &mut tail)
            .map_err(|e| alloc::format!("{e:?}"))?;
        for (first, data) in [(0, &buf), (last, &tail)] {
            for (i, b) in data.iter().enumerate() {
                let s = (first + i / SECTOR_SIZE) as u64;
                if *b != disk_byte(s, i % SECTOR_SIZE) {
                    return fail!("sector {s} byte {} is {b:#x}", i % SECTOR_SIZE);
                }
            }
        }
        Ok(())
    });
    let mut data = vec![0u8; WRITE_SECTORS * SECTOR_SIZE];
    for (i, b) in data.iter_mut().enumerate() {
        *b = written_byte((WRITE_AT + i / SECTOR_SIZE) as u64, i % SECTOR_SIZE);
    }
    tally.check("block: write, flush and read back", || {
        blk.write_blocks(WRITE_AT, &data)
            .map_err(|e| alloc::format!("write: {e:?}"))?;
        blk.flush().map_err(|e| alloc::format!("flush: {e:?}"))?;
        let mut back = vec![0u8; data.len()];
        blk.read_blocks(WRITE_AT, &mut back)
            .map_err(|e| alloc::format!("read: {e:?}"))?;
        if back != data {
            return fail!("read back differs");
        }
        Ok(())
    });
    tally.check("block: a read past the end is refused", || {
        let mut buf = vec![0u8; SECTOR_SIZE];
        match blk.read_blocks(plan.disk_sectors as usize, &mut buf) {
            Ok(()) => fail!("sector {} read", plan.disk_sectors),
            Err(_) => Ok(()),
        }
    });
    // Dropping the driver resets the device (status 0, waiting until it reads 0); a
    // new driver then brings it up from scratch.
    drop(blk);
    tally.check("block: reset and brought up again", || {
        let mut blk = VirtIOBlk::<Identity, T>::new(make()).map_err(|e| alloc::format!("{e:?}"))?;
        let mut back = vec![0u8; data.len()];
        blk.read_blocks(WRITE_AT, &mut back)
            .map_err(|e| alloc::format!("{e:?}"))?;
        if back != data {
            return fail!("the written sectors differ after the reset");
        }
        Ok(())
    });
}

fn rng<T: Transport>(tally: &mut Tally, transport: T) {
    tally.check("entropy: two requests, filled and different", || {
        let mut rng =
            VirtIORng::<Identity, T>::new(transport).map_err(|e| alloc::format!("{e:?}"))?;
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        let n = rng
            .request_entropy(&mut a)
            .map_err(|e| alloc::format!("{e:?}"))?;
        let m = rng
            .request_entropy(&mut b)
            .map_err(|e| alloc::format!("{e:?}"))?;
        if n != a.len() || m != b.len() {
            return fail!("{n} and {m} bytes of 64");
        }
        if a == [0; 64] || a == b {
            return fail!("the bytes are not random");
        }
        Ok(())
    });
}

fn console<T: Transport>(tally: &mut Tally, transport: T) {
    let mut con = match VirtIOConsole::<Identity, T>::new(transport) {
        Ok(c) => c,
        Err(e) => return tally.check("console: initialised", || fail!("{e:?}")),
    };
    tally.check("console: a line out", || {
        con.send_bytes(GUEST_LINE)
            .map_err(|e| alloc::format!("{e:?}"))
    });
    tally.check("console: the host's line in", || {
        let mut got = alloc::vec::Vec::new();
        let mut polls = 0u64;
        while got.len() < HOST_LINE.len() {
            match con.recv(true).map_err(|e| alloc::format!("{e:?}"))? {
                Some(c) => got.push(c),
                None => {
                    polls += 1;
                    if polls > PATIENCE {
                        return fail!("{} of {} bytes came", got.len(), HOST_LINE.len());
                    }
                }
            }
        }
        if got != HOST_LINE {
            return fail!("{got:?}");
        }
        Ok(())
    });
}

/// The frame the guest sends: broadcast, from its MAC, EtherType 0x88b5 (local
/// experimental), a numbered payload. The host sends it back with the payload reversed.
fn frame(mac: [u8; 6]) -> [u8; 64] {
    let mut f = [0u8; 64];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETHERTYPE);
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

fn net<T: Transport>(plan: &Plan, tally: &mut Tally, transport: T) {
    let mut net = match VirtIONet::<Identity, T, 16>::new(transport, 2048) {
        Ok(n) => n,
        Err(e) => return tally.check("net: initialised", || fail!("{e:?}")),
    };
    let mac = net.mac_address();
    tally.check("net: the MAC from the device's configuration", || {
        if plan.mac.to_le_bytes()[..6] == mac {
            Ok(())
        } else {
            fail!("{mac:02x?}")
        }
    });
    tally.check("net: a frame out and its echo in", || {
        let sent = frame(mac);
        let mut tx = net.new_tx_buffer(sent.len());
        tx.packet_mut().copy_from_slice(&sent);
        net.send(tx).map_err(|e| alloc::format!("send: {e:?}"))?;
        let mut polls = 0u64;
        let rx = loop {
            match net.receive() {
                Ok(rx) => break rx,
                Err(virtio_drivers::Error::NotReady) => {
                    polls += 1;
                    if polls > PATIENCE {
                        return fail!("no echo came");
                    }
                }
                Err(e) => return fail!("receive: {e:?}"),
            }
        };
        let mut want = sent;
        want[14..].reverse();
        let got = rx.packet();
        if got != want {
            return fail!("{} bytes, not the echo", got.len());
        }
        net.recycle_rx_buffer(rx)
            .map_err(|e| alloc::format!("recycle: {e:?}"))
    });
}

/// Every device kind the host gives the guest, as the crate names them.
const KINDS: [DeviceType; 4] = [
    DeviceType::Block,
    DeviceType::EntropySource,
    DeviceType::Console,
    DeviceType::Network,
];

fn drive<T: Transport>(plan: &Plan, tally: &mut Tally, kind: DeviceType, make: impl FnMut() -> T) {
    let mut make = make;
    match kind {
        DeviceType::Block => block(plan, tally, make),
        DeviceType::EntropySource => rng(tally, make()),
        DeviceType::Console => console(tally, make()),
        DeviceType::Network => net(plan, tally, make()),
        other => say!("{other:?} is not driven"),
    }
}

fn found(tally: &mut Tally, kinds: &[DeviceType]) {
    tally.check("every device found", || {
        if KINDS.iter().all(|k| kinds.contains(k)) && kinds.len() == KINDS.len() {
            Ok(())
        } else {
            fail!("{kinds:?}")
        }
    });
}

fn pci(plan: &Plan, tally: &mut Tally) {
    // SAFETY: `base` is the ECAM window of bus 0, identity mapped; only bus 0 is
    // enumerated, so only its first MiB is touched, and nothing else in this guest
    // accesses it.
    let cam = unsafe { MmioCam::new(plan.base as *mut u8, Cam::Ecam) };
    let mut root = PciRoot::new(cam);
    let mut functions: alloc::vec::Vec<(DeviceFunction, DeviceType)> = alloc::vec::Vec::new();
    for (function, info) in root.enumerate_bus(0) {
        say!(
            "{:02x}:{:02x}.{} {info}",
            function.bus,
            function.device,
            function.function
        );
        if let Some(kind) = virtio_device_type(&info) {
            // What firmware would have done (vmcraft has none; Linux does it in
            // pci_enable_device): the BARs are placed, decoding and bus mastering on.
            root.set_command(function, Command::MEMORY_SPACE | Command::BUS_MASTER);
            functions.push((function, kind));
        }
    }
    let kinds: alloc::vec::Vec<_> = functions.iter().map(|f| f.1).collect();
    found(tally, &kinds);
    for (function, kind) in functions {
        drive(plan, tally, kind, || {
            PciTransport::new::<Identity, _>(&mut root, function).expect("PciTransport::new")
        });
    }
}

fn mmio(plan: &Plan, tally: &mut Tally) {
    let windows = &plan.windows[..(plan.count as usize).min(plan.windows.len())];
    let open = |base: u64| {
        // SAFETY: `base` is a virtio-mmio window of `window_size` bytes, identity
        // mapped, and no other transport of this guest is open on it at the same time.
        unsafe {
            MmioTransport::new(
                NonNull::new(base as *mut VirtIOHeader).unwrap(),
                plan.window_size as usize,
            )
        }
        .expect("MmioTransport::new")
    };
    let kinds: alloc::vec::Vec<_> = windows.iter().map(|w| open(*w).device_type()).collect();
    found(tally, &kinds);
    for (w, kind) in windows.iter().zip(kinds) {
        drive(plan, tally, kind, || open(*w));
    }
}

#[no_mangle]
pub extern "C" fn guest_main(_vcpu: u64, param: u64) -> u32 {
    // SAFETY: the host wrote a Plan at `param`, in RAM the guest does not otherwise use.
    let plan = unsafe { &*(param as *const Plan) };
    if plan.magic != Plan::MAGIC {
        say!("no plan at {param:#x}");
        return 98;
    }
    let mut tally = Tally::default();
    match plan.transport {
        Plan::PCI => pci(plan, &mut tally),
        Plan::MMIO => mmio(plan, &mut tally),
        t => {
            say!("transport {t} is unknown");
            return 98;
        }
    }
    say!("{}/{} passed", tally.passed, tally.passed + tally.failed);
    tally.failed
}
