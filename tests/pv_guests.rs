//! The paravirtual channel driven by real guests on real KVM.

mod common;

use std::sync::Arc;

use common::*;
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::memory::{layout::MemoryLayout, GuestRam};
use vmcraft::pv::hypercall::{HypercallContext, HypercallFault, HypercallTable};
use vmcraft_guest_kit::{abi, Guest};

fn table() -> HypercallTable {
    let mut t = HypercallTable::new();
    t.register(
        1,
        "sum",
        Arc::new(|_: &HypercallContext<'_>, a: &[u64; 5]| Ok(a.iter().sum())),
    )
    .unwrap();
    t.register(
        2,
        "copy",
        Arc::new(|ctx: &HypercallContext<'_>, a: &[u64; 5]| {
            let bytes = ctx.read(a[0], 8)?;
            ctx.write(a[1], &bytes)?;
            Ok(8)
        }),
    )
    .unwrap();
    t.register(
        3,
        "echo",
        Arc::new(|_: &HypercallContext<'_>, a: &[u64; 5]| {
            if a[0] > 100 {
                return Err(HypercallFault::Invalid {
                    index: 0,
                    value: a[0],
                });
            }
            Ok(a[0])
        }),
    )
    .unwrap();
    t
}

#[test]
fn a_guest_discovers_the_interface_and_makes_hypercalls() {
    let mut m = HypercallRig::new(16);
    m.hypercalls = table();
    let serial = m.serial.clone();
    let (running, table) = m.start(Guest::HYPERCALLS, 0);
    let outcome = running.run_for(TIMEOUT).unwrap();
    assert_eq!(
        outcome.reason,
        vmcraft_guest_kit::exited(0),
        "console: {:?}",
        String::from_utf8_lossy(&serial.contents())
    );
    assert_eq!(serial.contents(), b"hypercalls ok\n");
    assert_eq!((table.count(1), table.count(2), table.count(3)), (1, 2, 2));
    assert_eq!(table.unknown_calls(), 1);
}

/// The discovery above is strict: a guest shown a wrong signature, or a leaf that names
/// another port, stops before its first hypercall, on every host (discovery runs at
/// CPL 0, where CPUID always reaches KVM).
#[test]
fn discovery_fails_when_the_cpuid_leaves_are_wrong() {
    let cases = [
        (*b"XenVMMXenVMM", abi::HYPERCALL_PORT, 10),
        (*b"vmcraftvmcrb", abi::HYPERCALL_PORT, 10),
        (
            *vmcraft::vcpu::cpu::VMCRAFT_SIGNATURE,
            abi::HYPERCALL_PORT + 1,
            11,
        ),
    ];
    for (signature, port, code) in cases {
        let mut m = HypercallRig::new(16);
        m.hypercalls = table();
        m.cpuid.signature = signature;
        m.cpuid.hypercall_port = port;
        let (running, table) = m.start(Guest::HYPERCALLS, 0);
        let outcome = running.run_for(TIMEOUT).unwrap();
        let sig = String::from_utf8_lossy(&signature);
        assert_eq!(
            outcome.reason,
            vmcraft_guest_kit::exited(code),
            "signature {sig}, port {port:#x}"
        );
        assert_eq!(table.unknown_calls() + table.count(1), 0, "signature {sig}");
    }
}

#[test]
fn a_broken_block_ring_leaves_the_console_working() {
    use vm_memory::{Bytes, GuestAddress};
    use vmcraft::pv::evtchn::Upcall;
    use vmcraft::pv_machine::{PvBackends, PvDevices};

    struct NoUpcall;
    impl Upcall for NoUpcall {
        fn raise(&self, _: u32) {}
    }
    let ram = GuestRam::new(&MemoryLayout::x86_64(16 << 20).unwrap()).unwrap();
    let mem = ram.memory().clone();
    let disk = ScratchImage::new("pv-broken", 1 << 20).file();
    let console = SharedBuffer::new();
    let mut table = HypercallTable::new();
    let backends = PvBackends::start(
        mem.clone(),
        &mut table,
        Arc::new(NoUpcall),
        PvDevices {
            layout: vmcraft_guest_kit::PV_LAYOUT,
            disk,
            read_only: false,
            console: Box::new(console.clone()),
        },
    )
    .unwrap();
    // The ports the guests are built to use.
    assert_eq!(u64::from(backends.console_port()), abi::PV_CONSOLE_PORT);
    assert_eq!(u64::from(backends.blk_port()), abi::PV_BLK_PORT);
    // An overlapping layout is refused with the regions named.
    let overlapping = vmcraft::pv::layout::PvLayout {
        blk_ring: abi::PV_CONSOLE_PAGE,
        ..vmcraft_guest_kit::PV_LAYOUT
    };
    let refused = PvBackends::start(
        mem.clone(),
        &mut HypercallTable::new(),
        Arc::new(NoUpcall),
        PvDevices {
            layout: overlapping,
            disk: ScratchImage::new("pv-overlap", 4096).file(),
            read_only: false,
            console: Box::new(SharedBuffer::new()),
        },
    );
    assert_eq!(
        refused.unwrap_err().to_string(),
        "the PV layout's console page and blkif ring overlap"
    );
    // The guest claims 1000 requests in a 32-entry ring and rings the block port.
    mem.write_obj(1000u32, GuestAddress(abi::PV_BLK_RING))
        .unwrap();
    backends.channels.send(abi::PV_BLK_PORT as u32).unwrap();
    // Then writes to the console and rings its port.
    let text = b"still here\n";
    for (i, b) in text.iter().enumerate() {
        mem.write_obj(*b, GuestAddress(abi::PV_CONSOLE_PAGE + 1024 + i as u64))
            .unwrap();
    }
    mem.write_obj(text.len() as u32, GuestAddress(abi::PV_CONSOLE_PAGE + 3084))
        .unwrap();
    backends.channels.send(abi::PV_CONSOLE_PORT as u32).unwrap();
    assert!(
        eventually(10, || console.contents() == text),
        "console output: {:?}",
        console.contents()
    );
    drop(backends);
}

#[test]
fn a_rust_guest_uses_the_same_no_std_ring_code_as_the_backend() {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let image = ScratchImage::new("rust-front", 1 << 20);
    let mut m = HypercallRig::new(16);
    let backends = m.pv_backends(
        image.file(),
        Box::new(std::io::sink()),
        Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
    );
    let serial = m.serial.clone();
    let (running, _) = m.start(Guest::PV_RING_FRONT, 0);
    let outcome = running.run_for(TIMEOUT).unwrap();
    drop(backends);
    assert_eq!(
        outcome.reason,
        vmcraft_guest_kit::exited(0),
        "{:?}",
        String::from_utf8_lossy(&serial.contents())
    );
    assert_eq!(serial.contents(), b"rust front end ok\n");
    let image = image.contents();
    for (i, word) in image[16 * 512..16 * 512 + 4096].chunks_exact(4).enumerate() {
        let want = (i as u32).wrapping_mul(0x0101_0101) ^ 0x5eed;
        assert_eq!(
            u32::from_le_bytes(word.try_into().unwrap()),
            want,
            "word {i}"
        );
    }
}
