//! A hostile-guest soak: for `VMCRAFT_SOAK_SECONDS` (default 60), a CPL-3 guest writes
//! random values to every I/O port and to the registers of its four virtio-mmio
//! windows (virtio-blk, virtio-console, virtio-rng, and an empty one), makes random
//! hypercalls, and writes random bytes over its virtqueues and its PV pages (event
//! channels, console ring, blkif ring, grant table); whenever it ends (a reset it
//! asked for, a device writing over its code, its action count done) another starts.
//! Meanwhile well-behaved VMs in the same process do checked virtio-blk I/O, one after
//! another. Afterwards: nothing panicked, every well-behaved VM passed, and the broken
//! devices said why they stopped (warnings through `log`).
//!
//! Its own test binary: the panic hook and the logger are process-wide.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use vmcraft::devices::virtio::block::{Block, Disk};
use vmcraft::devices::virtio::console::Console;
use vmcraft::devices::virtio::rng::Rng;
use vmcraft::vcpu::StopReason;
use vmcraft_guest_kit::Guest;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Random actions per soak guest before it exits by itself.
const ACTIONS: u64 = 5_000_000;
/// The longest one soak guest runs before the host stops it and starts the next.
const SOAK_VM_MAX: Duration = Duration::from_secs(5);
/// IRQ of the PV event-channel upcall.
const PV_UPCALL_IRQ: u32 = 11;

static PANICS: AtomicU64 = AtomicU64::new(0);

fn soak_seconds() -> u64 {
    std::env::var("VMCRAFT_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

/// One soak guest with every device the machine has, seeded with `seed`; runs until
/// it stops or `SOAK_VM_MAX` passes. Returns how it ended.
fn soak_vm(seed: u64) -> StopReason {
    let mut m = HypercallRig::new(16);
    m.builder.reserve_irq(PV_UPCALL_IRQ).unwrap();
    let upcall = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    m.builder
        .vm()
        .fd()
        .register_irqfd(&upcall, PV_UPCALL_IRQ)
        .unwrap();
    let pv_disk = ScratchImage::new("soak-pv", 1 << 20);
    let backends = m.pv_backends(pv_disk.file(), Box::new(std::io::sink()), upcall);
    let blk_disk = ScratchImage::new("soak-blk", 1 << 20);
    let disk = Disk::new(blk_disk.file(), false, "soak").unwrap();
    m.builder
        .add_virtio(Box::new(Block::new(disk, "soak-blk")))
        .unwrap();
    m.builder
        .add_virtio(Box::new(Console::new(
            Box::new(std::io::sink()),
            None,
            "soak-con",
        )))
        .unwrap();
    m.builder
        .add_virtio(Box::new(Rng::new("soak-rng")))
        .unwrap();
    let (running, _) = m.start(Guest::SOAK, (seed & 0xffff) | ACTIONS << 16);
    let reason = running.wait_stopped(Some(SOAK_VM_MAX)).map(|o| o.reason);
    running.stop();
    let outcome = running.wait().expect("the soak VM's threads end");
    drop(backends);
    reason.unwrap_or(outcome.reason)
}

/// A well-behaved VM: the virtio-blk guest's checked writes, reads, flushes and batch.
fn good_vm(round: u64) {
    let image = ScratchImage::new(&format!("soak-good-{round}"), 1 << 20);
    let disk = Disk::new(image.file(), false, "good").unwrap();
    let vm = start_virtio_vm(
        Guest::VIRTIO_BLK,
        1,
        vec![Box::new(Block::new(disk, "good-blk"))],
    );
    let outcome = vm.running.run_for(Duration::from_secs(120)).unwrap();
    assert_eq!(
        outcome.reason,
        vmcraft_guest_kit::exited(0),
        "well-behaved VM {round} during the soak: {}",
        String::from_utf8_lossy(&vm.serial.contents())
    );
}

#[test]
fn a_hostile_guest_breaks_nothing_but_its_own_devices() {
    require_kvm();
    record_warnings();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let deadline = Instant::now() + Duration::from_secs(soak_seconds());

    let good = std::thread::spawn(move || {
        let mut rounds = 0;
        while Instant::now() < deadline || rounds == 0 {
            good_vm(rounds);
            rounds += 1;
        }
        rounds
    });
    let mut endings: Vec<String> = Vec::new();
    let mut seed = 0;
    while Instant::now() < deadline || seed == 0 {
        endings.push(format!("{:?}", soak_vm(seed)));
        seed += 1;
    }
    let good_rounds = good.join().expect("every well-behaved VM passed");

    let logged = logged_warnings();
    endings.sort();
    endings.dedup();
    eprintln!(
        "soak: {seed} hostile VMs (ended by {endings:?}), {good_rounds} well-behaved VMs, {} warnings logged, e.g. {:?}",
        logged.len(),
        logged.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
    assert!(good_rounds >= 1);
    assert!(
        !logged.is_empty(),
        "the hostile guest broke devices, and none said why"
    );
}
