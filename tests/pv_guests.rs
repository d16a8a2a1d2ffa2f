//! The paravirtual channel driven by real guests on real KVM.

mod common;

use std::sync::Arc;

use common::*;
use vmcraft::devices::bus::IoBuses;
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::devices::stop::StopLatch;
use vmcraft::guest_kit::{abi, Guest};
use vmcraft::machine::{BusExitHandler, HypercallExitHandler, LegacyDevices};
use vmcraft::memory::{layout::MemoryLayout, GuestRam};
use vmcraft::pv::hypercall::{HypercallContext, HypercallFault, HypercallTable};
use vmcraft::vcpu::cpu::HypervisorInfo;
use vmcraft::vcpu::{RunningVm, StopReason, VcpuConfig, Vm};

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
    require_kvm();
    let vm = Vm::new(GuestRam::new(&MemoryLayout::x86_64(16 << 20).unwrap()).unwrap()).unwrap();
    let stop = Arc::new(StopLatch::default());
    let serial = SharedBuffer::new();
    let mut buses = IoBuses::new();
    LegacyDevices::install(&mut buses, vm.fd(), Box::new(serial.clone()), stop.clone()).unwrap();
    Guest::HYPERCALLS.load(vm.memory()).unwrap();
    let table = Arc::new(table());
    let handler = Arc::new(HypercallExitHandler::new(
        abi::HYPERCALL_PORT,
        table.clone(),
        vm.memory().clone(),
        BusExitHandler::new(Arc::new(buses), stop),
    ));
    let info = HypervisorInfo {
        hypercall_port: abi::HYPERCALL_PORT,
        ..HypervisorInfo::default()
    };
    let running = RunningVm::start_with_info(
        vm,
        &[VcpuConfig::at(Guest::HYPERCALLS.entry(0, 0))],
        handler,
        info,
    )
    .unwrap();
    let outcome = running.wait_timeout(TIMEOUT).unwrap();
    assert_eq!(
        outcome.reason,
        StopReason::DebugExit(0),
        "console: {:?}",
        String::from_utf8_lossy(&serial.contents())
    );
    assert_eq!(serial.contents(), b"hypercalls ok\n");
    assert_eq!((table.count(1), table.count(2), table.count(3)), (1, 2, 2));
    assert_eq!(table.unknown_calls(), 1);
}
