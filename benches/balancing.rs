//! Memory balancing, measured:
//!
//! 1. Eight VMs of 256 MiB whose working sets rise and fall out of phase (each between
//!    16 and 192 MiB of its 240 MiB pool, a raised cosine with a 20 s period, VM i an
//!    eighth of a period behind VM i - 1), run twice in the same run: with static
//!    allocation (each VM keeps every page it ever touched, as a VM without a balloon
//!    does), then with the balancer (`vmcraft::balancing`, its default policy, a step
//!    every 250 ms, the host's real memory pressure). Prints the host RSS of this
//!    process over time for both, the mean and peak of each, the ratio, and what the
//!    guests paid (pages they had to take back from their balloon at once because the
//!    balancer had left them too little), and draws both curves and the guests' need
//!    in `docs/balancing.svg`.
//! 2. The time for memory one VM gives back to reach the host (and so be usable by
//!    another): the balloon's own speed (a target set at once, inflated by the guest's
//!    driver, freed by the device), and the balancer's (a VM's working set falls from
//!    192 to 16 MiB: until 90 % of what it freed is off the host), beside the policy's
//!    time constant at that period.
//! 3. Page sharing (KSM): four identical guests of 128 MiB with RAM marked mergeable,
//!    96 MiB written by each: what `ksmd` saves once it has merged them (its
//!    `pages_sharing`, beside the host's available memory before and after; the host's
//!    KSM switched on for the measurement and put back after; not measured without root
//!    or KSM).
//!
//! ```text
//! cargo bench --bench balancing
//! ```

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmcraft::balancer::policy::{BalancerConfig, VmLimits};
use vmcraft::balancing::{BalancedVm, Balancing, BalancingConfig, HostPressure, VirtioBalloonVm};
use vmcraft::builder::MachineBuilder;
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::devices::virtio::balloon::{Balloon, BalloonControl};
use vmcraft::machine::Machine;
use vmcraft::vcpu::VcpuConfig;
use vmcraft_guest_kit::{Guest, Phased};

const MIB_PAGES: u64 = 256;
const VMS: usize = 8;
const RAM: u64 = 256 << 20;
const LOW: u64 = 16 * MIB_PAGES;
const HIGH: u64 = 192 * MIB_PAGES;
const PERIOD: Duration = Duration::from_secs(20);
const STEP: Duration = Duration::from_millis(250);

/// One phased VM with a balloon.
struct PhasedVm {
    machine: Machine,
    control: Arc<BalloonControl>,
}

impl PhasedVm {
    fn start(ram: u64) -> PhasedVm {
        let serial = SharedBuffer::new();
        let mut b = MachineBuilder::new(ram, Box::new(serial.clone())).expect("machine");
        let (balloon, control) = Balloon::new("vballoon").expect("balloon");
        b.add_virtio(Box::new(balloon)).expect("add the balloon");
        let guest = Guest::PHASED;
        b.load(guest.image()).expect("load");
        let machine = b
            .start(&[VcpuConfig::at(guest.entry(0, Phased::pool_pages(ram)))])
            .expect("start");
        let start = Instant::now();
        while !String::from_utf8_lossy(&serial.contents()).contains("ready") {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the guest never started"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        PhasedVm { machine, control }
    }

    fn want(&self, pages: u64) {
        Phased::want(self.machine.vm().memory(), pages as u32).expect("mailbox");
    }

    fn status(&self) -> vmcraft_guest_kit::PhasedStatus {
        Phased::status(self.machine.vm().memory()).expect("mailbox")
    }

    fn resident(&self) -> u64 {
        self.machine.vm().ram().resident_bytes().expect("mincore")
    }
}

/// This process's resident set, in bytes.
fn process_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// VM `i`'s wanted working set at `t`, in pages.
fn working_set(i: usize, t: Duration) -> u64 {
    let phase = t.as_secs_f64() / PERIOD.as_secs_f64() - i as f64 / VMS as f64;
    let level = (1.0 - (2.0 * std::f64::consts::PI * phase).cos()) / 2.0;
    LOW + ((HIGH - LOW) as f64 * level) as u64
}

/// One run of the eight VMs over two periods; returns (seconds, host RSS MiB, need
/// MiB) samples and the pages the guests took back on OOM.
fn run(balanced: bool) -> (Vec<(f64, f64, f64)>, u64) {
    let vms: Vec<PhasedVm> = (0..VMS).map(|_| PhasedVm::start(RAM)).collect();
    for (i, vm) in vms.iter().enumerate() {
        vm.want(working_set(i, Duration::ZERO));
    }
    let balancing = balanced.then(|| {
        let managed = vms
            .iter()
            .map(|vm| {
                (
                    Arc::new(VirtioBalloonVm::new(vm.control.clone(), RAM)) as Arc<dyn BalancedVm>,
                    VmLimits {
                        floor: 4 * MIB_PAGES,
                        ceiling: RAM / 4096,
                    },
                )
            })
            .collect();
        Balancing::start(
            BalancingConfig {
                policy: BalancerConfig::default(),
                period: STEP,
                budget_pages: VMS as u64 * RAM / 4096,
                pressure: HostPressure::Psi,
            },
            managed,
        )
        .expect("balancer")
    });
    let mut samples = Vec::new();
    let start = Instant::now();
    let mut next_sample = Duration::ZERO;
    while start.elapsed() < 2 * PERIOD {
        let t = start.elapsed();
        let mut need = 0;
        for (i, vm) in vms.iter().enumerate() {
            let w = working_set(i, t);
            vm.want(w);
            // The guest's kernel (the 16 MiB below its pool) is in use too.
            need += w + 16 * MIB_PAGES;
        }
        if t >= next_sample {
            samples.push((
                t.as_secs_f64(),
                process_rss() as f64 / f64::from(1 << 20),
                need as f64 / MIB_PAGES as f64,
            ));
            next_sample += STEP;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(balancing);
    let oom: u64 = vms
        .iter()
        .map(|vm| u64::from(vm.status().deflated_on_oom))
        .sum();
    for vm in &vms {
        assert!(
            vm.machine.stop_reason().is_none(),
            "a guest stopped: {:?}",
            vm.machine.stop_reason()
        );
    }
    (samples, oom)
}

fn stats(samples: &[(f64, f64, f64)]) -> (f64, f64) {
    // The first period's rise is the same for both; the second period is the steady
    // state.
    let steady: Vec<f64> = samples
        .iter()
        .filter(|s| s.0 >= PERIOD.as_secs_f64())
        .map(|s| s.1)
        .collect();
    let mean = steady.iter().sum::<f64>() / steady.len().max(1) as f64;
    let peak = steady.iter().copied().fold(0.0, f64::max);
    (mean, peak)
}

fn plot(
    static_run: &[(f64, f64, f64)],
    balanced: &[(f64, f64, f64)],
    path: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = static_run
        .iter()
        .chain(balanced)
        .map(|s| s.1.max(s.2))
        .fold(0.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Host RSS of 8 VMs × 256 MiB, working sets out of phase",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..(2.0 * PERIOD.as_secs_f64()), 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("MiB")
        .draw()?;
    for (name, data, color, value) in [
        ("static allocation", static_run, RED, 1usize),
        ("balancer", balanced, BLUE, 1),
        ("what the guests use", balanced, BLACK, 2),
    ] {
        let points: Vec<(f64, f64)> = data
            .iter()
            .map(|s| (s.0, if value == 1 { s.1 } else { s.2 }))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}

fn out_of_phase() {
    println!(
        "8 VMs x 256 MiB, working sets 16..192 MiB out of phase (period {} s), host RSS",
        PERIOD.as_secs()
    );
    let (static_run, static_oom) = run(false);
    let (balanced, balanced_oom) = run(true);
    println!(
        "{:>6} {:>10} {:>12} {:>12}",
        "t s", "need MiB", "static MiB", "balanced MiB"
    );
    for (s, b) in static_run.iter().zip(&balanced).step_by(8) {
        println!("{:>6.1} {:>10.0} {:>12.0} {:>12.0}", s.0, b.2, s.1, b.1);
    }
    let (s_mean, s_peak) = stats(&static_run);
    let (b_mean, b_peak) = stats(&balanced);
    let need: Vec<f64> = balanced
        .iter()
        .filter(|s| s.0 >= PERIOD.as_secs_f64())
        .map(|s| s.2)
        .collect();
    let need_mean = need.iter().sum::<f64>() / need.len().max(1) as f64;
    println!("second period (steady state):");
    println!(
        "{:>22} {:>10} {:>10} {:>14} {:>16}",
        "", "mean MiB", "peak MiB", "of all RAM", "OOM deflates"
    );
    let all = (VMS as u64 * (RAM >> 20)) as f64;
    println!(
        "{:>22} {:>10.0} {:>10.0} {:>13.0}% {:>16}",
        "static allocation",
        s_mean,
        s_peak,
        100.0 * s_mean / all,
        static_oom
    );
    println!(
        "{:>22} {:>10.0} {:>10.0} {:>13.0}% {:>16}",
        "balancer",
        b_mean,
        b_peak,
        100.0 * b_mean / all,
        balanced_oom
    );
    println!(
        "{:>22} {:>10.0} {:>10} {:>13.0}%",
        "guests' use",
        need_mean,
        "",
        100.0 * need_mean / all
    );
    println!(
        "balancer / static: mean {:.2}, peak {:.2}",
        b_mean / s_mean,
        b_peak / s_peak
    );
    let svg = std::path::Path::new("docs/balancing.svg");
    match plot(&static_run, &balanced, svg) {
        Ok(()) => println!("plot: {}", svg.display()),
        Err(e) => println!("plot not drawn: {e}"),
    }
}

/// Wait until `done` or `limit`; the time it took.
fn time_until(limit: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn give_back() {
    println!("memory given back, 176 MiB freed by a 256 MiB VM");
    let vm = PhasedVm::start(RAM);
    vm.want(HIGH);
    time_until(Duration::from_secs(60), || {
        u64::from(vm.status().working_set) == HIGH
    })
    .expect("the working set never rose");
    let full = vm.resident();
    let freed = (HIGH - LOW) * 4096;
    // The balloon alone: the target set at once.
    vm.want(LOW);
    time_until(Duration::from_secs(10), || {
        u64::from(vm.status().working_set) == LOW
    })
    .expect("the working set never fell");
    vm.control
        .set_target((Phased::pool_pages(RAM) - LOW) as u32);
    let mechanism = time_until(Duration::from_secs(60), || {
        vm.resident() + freed * 9 / 10 <= full
    });
    match mechanism {
        Some(t) => println!(
            "{:>40}: {:>8.0} ms ({:.0} MiB/s)",
            "balloon, target set at once",
            t.as_secs_f64() * 1e3,
            freed as f64 * 0.9 / f64::from(1 << 20) / t.as_secs_f64()
        ),
        None => println!(
            "{:>40}: not within 60 s ({:?}, actual {}, inflated {}, resident {} of {} MiB)",
            "balloon, target set at once",
            vm.status(),
            vm.control.actual(),
            vm.control.inflated_pages(),
            vm.resident() >> 20,
            full >> 20
        ),
    }
    // Back up, then the balancer.
    vm.control.set_target(0);
    vm.want(HIGH);
    time_until(Duration::from_secs(60), || {
        u64::from(vm.status().working_set) == HIGH && vm.status().ballooned == 0
    })
    .expect("the working set never rose again");
    let full = vm.resident();
    let managed = Arc::new(VirtioBalloonVm::new(vm.control.clone(), RAM));
    let balancing = Balancing::start(
        BalancingConfig {
            policy: BalancerConfig::default(),
            period: STEP,
            budget_pages: RAM / 4096,
            pressure: HostPressure::Fixed(0.0),
        },
        vec![(
            managed as Arc<dyn BalancedVm>,
            VmLimits {
                floor: 4 * MIB_PAGES,
                ceiling: RAM / 4096,
            },
        )],
    )
    .expect("balancer");
    // Let it settle on the high working set first.
    std::thread::sleep(4 * STEP);
    vm.want(LOW);
    let policy = time_until(Duration::from_secs(60), || {
        vm.resident() + freed * 9 / 10 <= full
    });
    drop(balancing);
    let decay = BalancerConfig::default().decay;
    // Steps for the estimate to close 90 % of a fall: (1 - decay)^n = 0.1.
    let steps = (0.1f64.ln() / (1.0 - decay).ln()).ceil();
    match policy {
        Some(t) => println!(
            "{:>40}: {:>8.0} ms (the policy's 90 % time: {} steps of {} ms = {:.0} ms)",
            "balancer, working set falls",
            t.as_secs_f64() * 1e3,
            steps,
            STEP.as_millis(),
            steps * STEP.as_secs_f64() * 1e3
        ),
        None => println!("{:>40}: not within 60 s", "balancer, working set falls"),
    }
}

/// A KSM setting to put back.
struct KsmSetting(&'static str, String);

impl Drop for KsmSetting {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("/sys/kernel/mm/ksm/{}", self.0), &self.1);
    }
}

fn ksm_read(name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/sys/kernel/mm/ksm/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn ksm_set(name: &'static str, value: &str) -> Result<KsmSetting, String> {
    let path = format!("/sys/kernel/mm/ksm/{name}");
    let old = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    std::fs::write(&path, value).map_err(|e| format!("{path}: {e}"))?;
    Ok(KsmSetting(name, old.trim().to_string()))
}

fn page_sharing() {
    const N: usize = 4;
    const KSM_RAM: u64 = 128 << 20;
    println!("page sharing (KSM), {N} identical guests of 128 MiB, 96 MiB written each");
    let settings = match (|| -> Result<Vec<KsmSetting>, String> {
        Ok(vec![
            ksm_set("pages_to_scan", "20000")?,
            ksm_set("sleep_millisecs", "10")?,
            ksm_set("run", "1")?,
        ])
    })() {
        Ok(s) => s,
        Err(e) => {
            println!("not measured: the host's KSM cannot be switched on ({e})");
            return;
        }
    };
    let vms: Vec<PhasedVm> = (0..N).map(|_| PhasedVm::start(KSM_RAM)).collect();
    for vm in &vms {
        vm.machine
            .vm()
            .ram()
            .set_mergeable(true)
            .expect("mergeable");
        vm.want(96 * MIB_PAGES);
    }
    time_until(Duration::from_secs(60), || {
        vms.iter()
            .all(|vm| u64::from(vm.status().working_set) == 96 * MIB_PAGES)
    })
    .expect("the working sets never rose");
    // A process's RSS counts a merged page in every mapping that has it, so the
    // saving is the kernel's own count (pages_sharing: the mappings of a shared page
    // beyond the one kept), cross-checked with the host's available memory.
    let available_before = mem_available();
    let sharing_before = ksm_read("pages_sharing").unwrap_or(0);
    // Until ksmd has gone over everything twice and the sharing stops growing.
    let scans = ksm_read("full_scans").unwrap_or(0);
    let start = Instant::now();
    let mut last = 0;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let sharing = ksm_read("pages_sharing").unwrap_or(0);
        let done = ksm_read("full_scans").unwrap_or(0) >= scans + 2 && sharing == last;
        last = sharing;
        if done || start.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
    let merged = start.elapsed();
    let gained = mem_available().saturating_sub(available_before);
    let written = (N as u64 * 96) as f64;
    let saved = last.saturating_sub(sharing_before) as f64 * 4096.0 / f64::from(1 << 20);
    println!(
        "{:>16} {:>14} {:>18} {:>10} {:>10}",
        "written MiB", "ksm saved MiB", "host available +MiB", "saved", "time s"
    );
    println!(
        "{:>16.0} {:>14.0} {:>18.0} {:>9.0}% {:>10.1}",
        written,
        saved,
        gained as f64 / f64::from(1 << 20),
        100.0 * saved / written,
        merged.as_secs_f64()
    );
    println!(
        "(identical guests: at best {:.0}% of what they wrote, all copies but one)",
        100.0 * (N - 1) as f64 / N as f64
    );
    drop(vms);
    drop(settings);
}

/// The host's MemAvailable, in bytes.
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn main() {
    common::require_kvm("balancing");
    let only = common::row_filter();
    if only("out of phase") {
        out_of_phase();
    }
    if only("give back") {
        give_back();
    }
    if only("page sharing") {
        page_sharing();
    }
}
