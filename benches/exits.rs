//! Exit round trip: the cost of one trapped port write and one trapped MMIO write,
//! through the vmcraft run loop and device bus, as a ratio to a bare kvm-ioctls loop
//! that does nothing but count, measured in the same run on the same guest.
//!
//! ```text
//! cargo bench --bench exits
//! ```
//!
//! The guests (`pio_loop`, `mmio_loop`) run at CPL 3 and write the test device N
//! times. Each configuration runs at two loop counts; the cost per exit is the slope
//! between them, so VM creation and thread start cancel out. The rounds alternate
//! between the two loops and the median is reported. Target: ratio ≤ 1.05.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use vmcraft::devices::bus::IoBuses;
use vmcraft::devices::debug_exit::DebugExit;
use vmcraft::devices::stop::StopLatch;
use vmcraft::devices::vm_device::bus::{
    MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset,
};
use vmcraft::devices::vm_device::{DeviceMmio, DevicePio};
use vmcraft::machine::BusExitHandler;
use vmcraft::memory::{layout::MemoryLayout, GuestRam};
use vmcraft::vcpu::cpu::{self, HypervisorInfo};
use vmcraft::vcpu::mode;
use vmcraft::vcpu::{RunningVm, VcpuConfig, Vm};
use vmcraft_guest_kit::{abi, Guest};

const SHORT: u64 = 2_000;
const LONG: u64 = 22_000;
const ROUNDS: usize = 7;

/// Counts the writes it receives.
#[derive(Default)]
struct Counter(AtomicU64);

impl DevicePio for Counter {
    fn pio_read(&self, _: PioAddress, _: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }
    fn pio_write(&self, _: PioAddress, _: PioAddressOffset, _: &[u8]) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl DeviceMmio for Counter {
    fn mmio_read(&self, _: MmioAddress, _: MmioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }
    fn mmio_write(&self, _: MmioAddress, _: MmioAddressOffset, _: &[u8]) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn new_vm(guest: Guest) -> Vm {
    let layout = MemoryLayout::x86_64(16 << 20).expect("layout");
    let vm = Vm::new(GuestRam::new(&layout).expect("guest RAM")).expect("VM");
    guest.load(vm.memory()).expect("load guest");
    vm
}

/// The whole run of `guest` with `n` iterations through vmcraft: start to stop.
fn vmcraft_run(guest: Guest, n: u64) -> Duration {
    let vm = new_vm(guest);
    let stop = Arc::new(StopLatch::default());
    let counter = Arc::new(Counter::default());
    let mut buses = IoBuses::new();
    buses
        .register_pio(abi::TEST_PORT, 8, counter.clone())
        .expect("test port");
    buses
        .register_mmio(abi::TEST_MMIO, 0x1000, counter.clone())
        .expect("test MMIO");
    buses
        .register_pio(
            abi::DEBUG_EXIT_PORT,
            4,
            Arc::new(DebugExit::new(stop.clone())),
        )
        .expect("debug exit");
    let handler = Arc::new(BusExitHandler::new(Arc::new(buses), stop));
    let start = Instant::now();
    let running =
        RunningVm::start(vm, &[VcpuConfig::at(guest.entry(0, n))], handler).expect("start the VM");
    let outcome = running.wait().expect("VM run");
    let elapsed = start.elapsed();
    assert_eq!(outcome.reason, vmcraft_guest_kit::exited(0));
    assert_eq!(counter.0.load(Ordering::Relaxed), n, "every write arrives");
    elapsed
}

/// The same run on a bare kvm-ioctls loop: vCPU creation to the debug exit.
fn bare_run(guest: Guest, n: u64) -> Duration {
    let vm = new_vm(guest);
    mode::write_boot_tables(vm.memory()).expect("boot tables");
    let start = Instant::now();
    let mut vcpu = vm.fd().create_vcpu(0).expect("vCPU");
    cpu::configure(vm.kvm(), &vcpu, 0, 1, HypervisorInfo::default()).expect("CPUID");
    mode::enter(&vcpu, guest.entry(0, n)).expect("entry");
    let mut count = 0u64;
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(abi::TEST_PORT, _) | VcpuExit::MmioWrite(abi::TEST_MMIO, _) => {
                count += 1
            }
            VcpuExit::IoOut(abi::DEBUG_EXIT_PORT, _) => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(count, n);
    elapsed
}

fn per_exit_ns(run: impl Fn(Guest, u64) -> Duration, guest: Guest) -> f64 {
    let short = run(guest, SHORT);
    let long = run(guest, LONG);
    (long.as_nanos() as f64 - short.as_nanos() as f64) / (LONG - SHORT) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    common::require_kvm("exits");
    // `cargo bench` passes `--bench`; there are no other options.
    println!("exit round trip, ns per exit (median of {ROUNDS} rounds; slope between {SHORT} and {LONG} exits)");
    println!(
        "{:<6} {:>12} {:>12} {:>8}   target ≤ 1.05",
        "exit", "bare KVM", "vmcraft", "ratio"
    );
    for (name, guest) in [("pio", Guest::PIO_LOOP), ("mmio", Guest::MMIO_LOOP)] {
        let (mut bare, mut ours, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            // Alternate the order so drift in the host does not favour one side.
            let (b, v) = if round % 2 == 0 {
                let b = per_exit_ns(bare_run, guest);
                (b, per_exit_ns(vmcraft_run, guest))
            } else {
                let v = per_exit_ns(vmcraft_run, guest);
                (per_exit_ns(bare_run, guest), v)
            };
            bare.push(b);
            ours.push(v);
            ratios.push(v / b);
        }
        println!(
            "{:<6} {:>12.0} {:>12.0} {:>8.3}",
            name,
            median(bare),
            median(ours),
            median(ratios)
        );
    }
}
