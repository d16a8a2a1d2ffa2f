//! The credit scheduler's M:N runtime against one thread per vCPU on the Linux
//! scheduler with the same weights (nice values), in the same run.
//!
//! ```text
//! cargo bench --bench scheduler_runtime
//! ```
//!
//! Four CPU-bound vCPUs at CPL 3 (the `counter` guest) with weights 1:1:2:4: under the
//! runtime on 2 worker threads, and as 4 vCPU threads at nice 0, 0, -3, -6 (CFS
//! weights 1024, 1024, 1991, 3906, the nearest to 1:1:2:4) on this machine's CPUs.
//! Printed: each vCPU's share of the machine by its own progress counter against the
//! ideal, and the total guest progress (the runtime's overhead shows there).

mod common;

use std::time::Duration;

use vm_memory::Bytes;
use vmcraft::builder::{MachineBuilder, MachineParts};
use vmcraft::vcpu::vcpu::create_vcpus;
use vmcraft::vcpu::{RunningVm, VcpuConfig, Vm};
use vmcraft_guest_kit::Guest;
use vmcraft_scheduler::credit::{Credit, CreditParams};
use vmcraft_scheduler::runtime::Runtime;

const WEIGHTS: [u32; 4] = [256, 256, 512, 1024];
const NICE: [i32; 4] = [0, 0, -3, -6];
const MEASURE: Duration = Duration::from_secs(3);

fn new_vm() -> MachineParts {
    let mut b = MachineBuilder::new(16 << 20, Box::new(std::io::sink())).unwrap();
    b.reserve_boot_tables().unwrap(); // the runtime's vCPUs enter in long mode
    b.load(Guest::COUNTER.image()).unwrap();
    b.into_parts()
}

fn configs() -> Vec<VcpuConfig> {
    (0..4)
        .map(|i| VcpuConfig::at(Guest::COUNTER.entry(i, 0)))
        .collect()
}

fn counters(vm: &Vm) -> [u64; 4] {
    std::array::from_fn(|i| {
        vm.memory()
            .read_obj::<u64>(Guest::counter_addr(i as u32))
            .unwrap()
    })
}

/// Guest progress of each vCPU over [`MEASURE`], after half a second to settle.
fn measure(vm: &Vm) -> [f64; 4] {
    std::thread::sleep(Duration::from_millis(500));
    let before = counters(vm);
    std::thread::sleep(MEASURE);
    let after = counters(vm);
    std::array::from_fn(|i| (after[i] - before[i]) as f64 / MEASURE.as_secs_f64())
}

fn runtime_run(workers: u32) -> ([f64; 4], Vec<Duration>) {
    let MachineParts {
        vm, handler, info, ..
    } = new_vm();
    let vcpus = create_vcpus(&vm, &configs(), handler, info).unwrap();
    let policy = Box::new(Credit::new(CreditParams::default(), workers));
    let runtime = Runtime::start_weighted(policy, vcpus, &WEIGHTS).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (before, given_before) = (counters(&vm), runtime.run_time());
    std::thread::sleep(MEASURE);
    let (after, given_after) = (counters(&vm), runtime.run_time());
    runtime.stop().unwrap();
    let progress = std::array::from_fn(|i| (after[i] - before[i]) as f64 / MEASURE.as_secs_f64());
    let given = (0..4).map(|i| given_after[i] - given_before[i]).collect();
    (progress, given)
}

/// Thread ids of this process's threads named `vcpu0`..`vcpu3`.
fn vcpu_tids() -> [Option<i32>; 4] {
    let mut tids = [None; 4];
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
            continue;
        };
        if let Some(i) = comm
            .trim()
            .strip_prefix("vcpu")
            .and_then(|n| n.parse::<usize>().ok())
        {
            if i < 4 {
                tids[i] = task.file_name().to_str().and_then(|t| t.parse().ok());
            }
        }
    }
    tids
}

fn linux_run() -> Result<[f64; 4], String> {
    let parts = new_vm();
    let running = RunningVm::start(parts.vm, &configs(), parts.handler).unwrap();
    // The threads name themselves as they start.
    let mut tids = vcpu_tids();
    for _ in 0..100 {
        if tids.iter().all(Option::is_some) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        tids = vcpu_tids();
    }
    for (i, tid) in tids.iter().enumerate() {
        let tid = tid.ok_or(format!("no thread vcpu{i}"))?;
        // SAFETY: setpriority only reads its integer arguments.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, NICE[i]) };
        if rc != 0 {
            running.request_stop();
            return Err(format!(
                "cannot set nice {} on vcpu{i}: {} (negative nice needs CAP_SYS_NICE)",
                NICE[i],
                std::io::Error::last_os_error()
            ));
        }
    }
    let progress = measure(running.vm());
    running.request_stop();
    running.wait().unwrap();
    Ok(progress)
}

fn row(name: &str, progress: [f64; 4], cpus: f64) {
    let total: f64 = progress.iter().sum();
    let ideal_weights: f64 = WEIGHTS.iter().map(|&w| f64::from(w)).sum();
    let mut cells = Vec::new();
    let mut worst: f64 = 0.0;
    for i in 0..4 {
        let share = cpus * progress[i] / total;
        let ideal = (cpus * f64::from(WEIGHTS[i]) / ideal_weights).min(1.0);
        worst = worst.max((share - ideal).abs() / ideal);
        cells.push(format!("{share:.3}/{ideal:.3}"));
    }
    println!(
        "{:<40} {}   worst error {:>5.1} %   total progress {:.3e}/s",
        name,
        cells.join(" "),
        100.0 * worst,
        total
    );
}

fn main() {
    common::require_kvm("scheduler_runtime");
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as u32;
    println!("4 CPU-bound vCPUs, weights 1:1:2:4; share of the machine by guest progress / ideal");
    let (ours, given) = runtime_run(cpus);
    row(
        &format!("credit runtime, {cpus} worker threads"),
        ours,
        f64::from(cpus),
    );
    let given: Vec<String> = given
        .iter()
        .map(|d| format!("{:.3}", d.as_secs_f64() / MEASURE.as_secs_f64()))
        .collect();
    println!(
        "  CPU time the runtime gave each vCPU, in pCPUs: {}",
        given.join(" ")
    );
    match linux_run() {
        Ok(theirs) => {
            row(
                "thread per vCPU, Linux CFS, nice 0 0 -3 -6",
                theirs,
                f64::from(cpus),
            );
            let ratio = ours.iter().sum::<f64>() / theirs.iter().sum::<f64>();
            println!("total guest progress, runtime / Linux: {ratio:.3}");
        }
        Err(e) => println!("Linux comparison skipped: {e}"),
    }
}
