//! The credit scheduler's M:N runtime on real KVM: four CPU-bound vCPUs at CPL 3 with
//! weights 1:1:2:4 on two worker threads each get their weighted share, measured by
//! the guests' own progress counters.

mod common;

use std::time::Duration;

use common::*;
use vm_memory::Bytes;
use vmcraft::guest_kit::Guest;
use vmcraft::scheduler::credit::{Credit, CreditParams};
use vmcraft::scheduler::runtime::Runtime;
use vmcraft::vcpu::cpu::HypervisorInfo;
use vmcraft::vcpu::vcpu::create_vcpus;
use vmcraft::vcpu::VcpuConfig;

const WEIGHTS: [u32; 4] = [256, 256, 512, 1024];
/// The ideal share of one pCPU for each (2 pCPUs, weights 1:1:2:4).
const IDEAL: [f64; 4] = [0.25, 0.25, 0.5, 1.0];
/// Allowed error of the guest-measured share, as a fraction of the ideal. The host is
/// itself a 2-core VM whose two cores do not run guest code at the same speed (its
/// own host shares them): guest progress per unit of CPU time differs between the
/// worker that runs the weight-4 vCPU and the other by up to 8 % here, while the CPU
/// time the runtime hands out stays within 1 % of the ideal (asserted below at 5 %).
const TOLERANCE: f64 = 0.15;
/// Allowed error of the CPU time the runtime gave each vCPU.
const RUN_TIME_TOLERANCE: f64 = 0.05;

fn counters(vm: &vmcraft::vcpu::Vm) -> [u64; 4] {
    std::array::from_fn(|i| {
        vm.memory()
            .read_obj::<u64>(Guest::counter_addr(i as u32))
            .unwrap()
    })
}

#[test]
fn weighted_shares_on_two_workers_match_the_guests_progress() {
    let test_vm = TestVm::new(Guest::COUNTER);
    let configs: Vec<VcpuConfig> = (0..4)
        .map(|i| VcpuConfig::at(Guest::COUNTER.entry(i, 0)))
        .collect();
    let handler = test_vm.handler.clone();
    let vcpus = create_vcpus(&test_vm.vm, &configs, handler, HypervisorInfo::default()).unwrap();
    let policy = Box::new(Credit::new(CreditParams::default(), 2));
    let runtime = Runtime::start_weighted(policy, vcpus, &WEIGHTS).unwrap();

    // Let accounting settle, then measure over 3 s.
    std::thread::sleep(Duration::from_millis(500));
    let before = counters(&test_vm.vm);
    let run_before = runtime.run_time();
    std::thread::sleep(Duration::from_secs(3));
    let after = counters(&test_vm.vm);
    let run_after = runtime.run_time();
    let stopped = runtime.stop().unwrap();
    assert_eq!(stopped.vcpus.len(), 4, "every vCPU comes back");
    assert!(stopped.outcome.is_none());

    let progress: Vec<f64> = (0..4).map(|i| (after[i] - before[i]) as f64).collect();
    let total: f64 = progress.iter().sum();
    // Shares of the two pCPUs, by the guests' own progress.
    let shares: Vec<f64> = progress.iter().map(|p| 2.0 * p / total).collect();
    let host: Vec<f64> = (0..4)
        .map(|i| (run_after[i] - run_before[i]).as_secs_f64() / 3.0)
        .collect();
    eprintln!("guest-measured shares {shares:.3?}, host-measured run time shares {host:.3?}");
    for i in 0..4 {
        assert!(progress[i] > 0.0, "vCPU {i} made no progress");
        assert!(
            (host[i] - IDEAL[i]).abs() <= RUN_TIME_TOLERANCE * IDEAL[i],
            "vCPU {i}: given {:.3} of a pCPU, ideal {} (all: {host:.3?})",
            host[i],
            IDEAL[i]
        );
        assert!(
            (shares[i] - IDEAL[i]).abs() <= TOLERANCE * IDEAL[i],
            "vCPU {i}: share {:.3}, ideal {} (all: {shares:.3?})",
            shares[i],
            IDEAL[i]
        );
    }
}
