//! Full virtualization against paravirtualization, measured side by side: the same
//! guest workloads through three I/O paths on the same host.
//!
//! ```text
//! cargo run --release --example compare [-- --quick] [--out DIR]
//! ```
//!
//! Paths:
//! * emulated: the 16550 console and an ATA disk, every register access trapped and
//!   emulated (what an unmodified guest with no PV driver uses);
//! * virtio: virtio-console and virtio-blk (ioeventfd notifications, EVENT_IDX);
//! * pv: the Xen-style PV console ring and blkif over grants, notified by
//!   event-channel hypercalls.
//!
//! Workloads: 4 KiB reads and writes, sequential and random, one at a time; N bytes of
//! console output; and a CPU-bound loop at CPL 3 against the same loop on the host.
//! For each: throughput, VMM exits per operation, VMM host CPU per operation (time in
//! the VMM handling exits plus the device's I/O thread), the guest-visible latency
//! p50/p99 (the guest's TSC around each operation), and the ratio to the PV path.
//! The tables are printed and written as `comparison.md`, with a plot in
//! `comparison.svg`, into `--out` (default `docs/`).

use std::error::Error;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmcraft::builder::MachineBuilder;
use vmcraft::devices::ata::AtaDisk;
use vmcraft::devices::virtio::block::{Block, Disk};
use vmcraft::devices::virtio::console::Console;
use vmcraft::pv_machine::{PvDevices, PvUpcall};
use vmcraft::vcpu::VcpuConfig;
use vmcraft_guest_kit::{abi, peers, Guest};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const DISK_BYTES: u64 = 16 << 20;
const LATENCIES: u64 = abi::GUEST_HEAP + 0x80000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoPath {
    Emulated,
    Virtio,
    Pv,
}

impl IoPath {
    const ALL: [IoPath; 3] = [IoPath::Emulated, IoPath::Virtio, IoPath::Pv];
    fn name(self) -> &'static str {
        match self {
            IoPath::Emulated => "emulated (ATA, 16550)",
            IoPath::Virtio => "virtio",
            IoPath::Pv => "pv (rings, grants)",
        }
    }
}

/// One measured run.
struct Measure {
    ops: u64,
    elapsed: Duration,
    exits: u64,
    vmm_cpu_ns: u64,
    latencies_ns: Vec<f64>,
}

impl Measure {
    fn per_op(&self, v: f64) -> f64 {
        v / self.ops.max(1) as f64
    }
    fn percentile(&self, q: f64) -> f64 {
        let mut v = self.latencies_ns.clone();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * q).round() as usize]
    }
}

/// CPU time (ns) of this process's threads named in `names`, from schedstat.
fn threads_cpu_ns(names: &[&str]) -> u64 {
    let mut total = 0;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if names.contains(&comm.trim_end()) {
            if let Some(ns) = std::fs::read_to_string(dir.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            {
                total += ns;
            }
        }
    }
    total
}

/// Host TSC ticks per nanosecond (the guest's TSC runs at the same rate).
fn tsc_per_ns() -> f64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    let t0 = unsafe { core::arch::x86_64::_rdtsc() };
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    let t1 = unsafe { core::arch::x86_64::_rdtsc() };
    (t1 - t0) as f64 / start.elapsed().as_nanos() as f64
}

fn scratch_disk() -> Result<std::fs::File, Box<dyn Error>> {
    use std::os::unix::fs::FileExt;
    let path = std::env::temp_dir().join(format!("vmcraft-compare-{}.img", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..DISK_BYTES >> 20 {
        file.write_all_at(&chunk, i << 20)?;
    }
    Ok(file)
}

/// Build a VM for `path`, run `guest` with `param` to its exit, and measure.
fn run(
    path: IoPath,
    guest: Guest,
    param: u64,
    ops: u64,
    io_threads: &[&str],
    latency_slots: u64,
    tsc: f64,
) -> Result<Measure, Box<dyn Error>> {
    let mut b = MachineBuilder::new(32 << 20, Box::new(std::io::sink()))?;
    let disk = scratch_disk()?;
    let _pv = match path {
        IoPath::Emulated => {
            let ata = Arc::new(AtaDisk::new(disk, false)?);
            b.buses_mut()
                .register_pio(AtaDisk::COMMAND_BASE, 8, ata.clone())?;
            b.buses_mut().register_pio(AtaDisk::CONTROL_BASE, 1, ata)?;
            None
        }
        IoPath::Virtio => {
            let device: Box<dyn vmcraft::devices::virtio::VirtioDevice> =
                if guest == Guest::CONSOLE_BENCH {
                    Box::new(Console::new(Box::new(std::io::sink()), None, "vcon"))
                } else {
                    Box::new(Block::new(Disk::new(disk, false, "cmp")?, "vblk"))
                };
            b.add_virtio(device)?;
            None
        }
        IoPath::Pv => {
            let pv = PvDevices {
                layout: vmcraft_guest_kit::PV_LAYOUT,
                disk,
                read_only: false,
                console: Box::new(std::io::sink()),
            };
            let upcall = PvUpcall::Custom(Arc::new(EventFd::new(EFD_NONBLOCK)?));
            Some(b.add_pv(pv, upcall)?)
        }
    };
    b.load(guest.image())?;
    let memory = b.memory().clone();
    b.hypercall_table();
    let threads_before = threads_cpu_ns(io_threads);
    let start = Instant::now();
    let running = b.start(&[VcpuConfig::at(guest.entry(0, param))])?;
    let outcome = running
        .wait_stopped(Some(Duration::from_secs(900)))
        .ok_or("the guest did not finish")?;
    let elapsed = start.elapsed();
    let io_cpu = threads_cpu_ns(io_threads).saturating_sub(threads_before);
    let stats = running.total_stats();
    running.stop();
    running.wait()?;
    if outcome.reason != vmcraft_guest_kit::exited(0) {
        return Err(format!("{guest:?} on {path:?} stopped: {}", outcome.reason).into());
    }
    let latencies_ns = (0..latency_slots.min(65536))
        .map(|i| {
            memory
                .read_obj::<u64>(GuestAddress(LATENCIES + 8 * i))
                .map(|t| t as f64 / tsc)
        })
        .collect::<Result<_, _>>()?;
    Ok(Measure {
        ops,
        elapsed,
        exits: stats.total(),
        vmm_cpu_ns: stats.total_nanos() + io_cpu,
        latencies_ns,
    })
}

struct Row {
    path: IoPath,
    m: Measure,
}

struct Table {
    title: String,
    unit: &'static str,
    rows: Vec<Row>,
}

impl Table {
    fn pv(&self) -> Option<&Measure> {
        self.rows
            .iter()
            .find(|r| r.path == IoPath::Pv)
            .map(|r| &r.m)
    }

    fn markdown(&self) -> String {
        let mut s = format!(
            "### {}\n\n| path | {}/s | exits/op | VMM CPU µs/op | p50 µs | p99 µs | CPU vs PV | throughput vs PV |\n|---|---|---|---|---|---|---|---|\n",
            self.title, self.unit
        );
        let pv = self.pv();
        for r in &self.rows {
            let m = &r.m;
            let rate = m.ops as f64 / m.elapsed.as_secs_f64();
            let cpu = m.per_op(m.vmm_cpu_ns as f64) / 1e3;
            let (cpu_ratio, rate_ratio) = match pv {
                Some(p) => (
                    cpu / (p.per_op(p.vmm_cpu_ns as f64) / 1e3),
                    rate / (p.ops as f64 / p.elapsed.as_secs_f64()),
                ),
                None => (f64::NAN, f64::NAN),
            };
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.3} | {:.2} | {:.1} | {:.1} | {:.1}× | {:.3}× |",
                r.path.name(),
                rate,
                m.per_op(m.exits as f64),
                cpu,
                m.percentile(0.5) / 1e3,
                m.percentile(0.99) / 1e3,
                cpu_ratio,
                rate_ratio
            );
        }
        s
    }
}

/// The CPU-bound loop: guest progress per second at CPL 3 against the same machine
/// code on the host, each pinned to the same CPU and timed the same way (its counter
/// read 300 ms after the start and again 2 s later).
///
/// The host runs the counter guest's own bytes (`guests/counter.S`: `incq` on its
/// counter, `jmp` back) in a child process, with the counter's page mapped where the
/// guest has it, so neither the compiler nor the address (the memory-renaming some
/// CPUs give stack addresses) can make the reference a different loop.
fn cpu_ratio() -> Result<(f64, f64), Box<dyn Error>> {
    let cpu = last_allowed_cpu()?;
    let saved = pin_to(cpu)?;
    // The vCPU thread inherits this thread's affinity: both loops on `cpu`.
    let guest_rate = (|| -> Result<f64, Box<dyn Error>> {
        let mut b = MachineBuilder::new(16 << 20, Box::new(std::io::sink()))?;
        b.load(Guest::COUNTER.image())?;
        let memory = b.memory().clone();
        let running = b.start(&[VcpuConfig::at(Guest::COUNTER.entry(0, 0))])?;
        let counter = Guest::counter_addr(0);
        let rate = counter_rate(|| memory.read_obj::<u64>(counter).unwrap_or(0));
        running.stop();
        running.wait()?;
        Ok(rate)
    })();
    restore_affinity(&saved);
    Ok((guest_rate?, host_counter_rate(cpu)?))
}

/// Progress per second of a counter: read 300 ms in, then 2 s later.
fn counter_rate(read: impl Fn() -> u64) -> f64 {
    std::thread::sleep(Duration::from_millis(300));
    let c0 = read();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let c1 = read();
    c1.wrapping_sub(c0) as f64 / t0.elapsed().as_secs_f64()
}

fn last_allowed_cpu() -> Result<usize, Box<dyn Error>> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a cpu_set_t of the size passed, valid for the call.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: CPU_ISSET reads `set`, which is initialised.
    (0..libc::CPU_SETSIZE as usize)
        .rev()
        .find(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .ok_or_else(|| "no CPU in this thread's affinity".into())
}

/// Pin this thread to `cpu`; returns the affinity it had.
fn pin_to(cpu: usize) -> Result<libc::cpu_set_t, Box<dyn Error>> {
    // SAFETY: all-zero cpu_set_t values are valid empty sets; sched_getaffinity and
    // sched_setaffinity read or fill sets of the size passed; CPU_SET writes into one.
    unsafe {
        let mut saved: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of_val(&saved), &mut saved) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        if libc::sched_setaffinity(0, std::mem::size_of_val(&one), &one) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(saved)
    }
}

fn restore_affinity(saved: &libc::cpu_set_t) {
    // SAFETY: `saved` is a valid cpu_set_t of the size passed.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(saved), saved) };
}

/// The counter guest's machine code run on the host, in a child pinned to `cpu`, its
/// counter page shared with this process at the guest's address.
fn host_counter_rate(cpu: usize) -> Result<f64, Box<dyn Error>> {
    let code = Guest::COUNTER.code;
    // SAFETY: new anonymous mappings: the counter page at the fixed guest address
    // (MAP_FIXED_NOREPLACE fails rather than replace anything mapped there) shared
    // with the child, and a private page for the code; both unmapped below.
    let (page, text) = unsafe {
        let page = libc::mmap(
            abi::COUNTER_BASE as *mut libc::c_void,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        );
        let text = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        (page, text)
    };
    if page != abi::COUNTER_BASE as *mut libc::c_void
        || text == libc::MAP_FAILED
        || code.len() > 4096
    {
        return Err(format!(
            "cannot map the counter page at {:#x} for the host's loop: {}",
            abi::COUNTER_BASE,
            std::io::Error::last_os_error()
        )
        .into());
    }
    // SAFETY: `text` is a fresh 4 KiB mapping, `code` at most that long; then it is
    // made executable and no longer writable.
    unsafe {
        std::ptr::copy_nonoverlapping(code.as_ptr(), text.cast::<u8>(), code.len());
        libc::mprotect(text, 4096, libc::PROT_READ | libc::PROT_EXEC);
    }
    // SAFETY: the child only pins itself and jumps to the copied loop (rdi = vCPU 0,
    // as the VMM enters the guest), which never returns and touches only the counter
    // page; both calls are async-signal-safe, as a child of a threaded process needs.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: see above.
        unsafe {
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            libc::sched_setaffinity(0, std::mem::size_of_val(&one), &one);
            let entry: extern "C" fn(u64) -> ! = std::mem::transmute(text);
            entry(0)
        }
    }
    let counter = abi::COUNTER_BASE as *const u64;
    // SAFETY: the counter page is mapped (shared with the child) until munmap below.
    let rate = counter_rate(|| unsafe { std::ptr::read_volatile(counter) });
    // SAFETY: the child is ours; kill and reap it, then unmap both pages.
    unsafe {
        if child > 0 {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        libc::munmap(page, 4096);
        libc::munmap(text, 4096);
    }
    if child < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(rate)
}

/// Peak RSS minus resident guest RAM of each of `n` example VMMs running at once (a
/// spinning guest for 2 s), in KiB, as each reports it.
fn vmcraft_overhead(n: usize) -> Result<Vec<u64>, Box<dyn Error>> {
    let exe = std::env::current_exe()?;
    let vmm = exe.with_file_name("minimal-vmm");
    if !vmm.exists() {
        return Err(format!(
            "{} is missing: build the minimal-vmm example",
            vmm.display()
        )
        .into());
    }
    let children: Vec<_> = (0..n)
        .map(|_| {
            std::process::Command::new(&vmm)
                // Without the jail, as QEMU runs here without a sandbox.
                .args([
                    "--guest",
                    "spin",
                    "--timeout",
                    "2",
                    "--mem",
                    "64M",
                    "--no-jail",
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for c in children {
        let o = c.wait_with_output()?;
        let text = String::from_utf8_lossy(&o.stdout);
        let kib = text
            .lines()
            .find_map(|l| l.split("VMM overhead ").nth(1))
            .and_then(|v| v.trim_end_matches(" KiB").parse().ok())
            .ok_or("no memory report from minimal-vmm")?;
        out.push(kib);
    }
    Ok(out)
}

/// RSS of each of `n` QEMU microvm processes spinning in a one-instruction firmware,
/// in KiB, read while they run; `Err` says why there is no figure (QEMU not installed,
/// or it exited, with its stderr).
fn qemu_rss(n: usize) -> Result<Vec<u64>, String> {
    let Some(qemu) = peers::qemu() else {
        return Err("not installed".into());
    };
    let firmware = std::env::temp_dir().join(format!("vmcraft-spin-{}.bin", std::process::id()));
    peers::write_firmware(&[0xeb, 0xfe], &firmware).map_err(|e| e.to_string())?; // jmp $
    let command = || {
        let mut c = peers::qemu_microvm(&qemu, "64M", &firmware);
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        c
    };
    let mut children = Vec::new();
    for _ in 0..n {
        match command().spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                children.iter_mut().for_each(|c| {
                    let _ = c.kill();
                    let _ = c.wait();
                });
                return Err(format!("cannot start {}: {e}", qemu.display()));
            }
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    // The RSS of each QEMU still running; the first one that is not spoils the row.
    let mut rss = Vec::new();
    let mut exited = None;
    for (i, c) in children.iter_mut().enumerate() {
        let kib = std::fs::read_to_string(format!("/proc/{}/status", c.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            });
        match (c.try_wait(), kib) {
            (Ok(None), Some(kib)) => rss.push(kib),
            _ => {
                exited = Some(i);
                break;
            }
        }
    }
    let mut why = None;
    for (i, mut c) in children.into_iter().enumerate() {
        let _ = c.kill();
        if exited == Some(i) {
            why = Some(peers::exited_early(&command(), c, "its RSS was read").to_string());
        } else {
            let _ = c.wait();
        }
    }
    let _ = std::fs::remove_file(&firmware);
    why.map_or(Ok(rss), Err)
}

fn memory_table() -> Result<String, Box<dyn Error>> {
    let mut md = String::from(
        "### Host memory per VM\n\n\
         vmcraft: each example VMM's own report (peak RSS minus resident guest RAM). \
         QEMU microvm: VmRSS while it runs a one-instruction firmware (its guest RAM is \
         barely touched).\n\n\
         | VMs at once | vmcraft MiB per VM | QEMU microvm MiB per VM |\n|---|---|---|\n",
    );
    for n in [1usize, 2, 8] {
        let ours = vmcraft_overhead(n)?;
        let avg = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64 / 1024.0;
        let theirs = match qemu_rss(n) {
            Ok(v) => format!("{:.2}", avg(&v)),
            Err(why) => format!("not measured: {why}"),
        };
        let _ = writeln!(md, "| {n} | {:.2} | {theirs} |", avg(&ours));
    }
    Ok(md)
}

fn svg(tables: &[Table], path: &std::path::Path) -> Result<(), Box<dyn Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let names: Vec<&str> = tables.iter().map(|t| t.title.as_str()).collect();
    let max = tables
        .iter()
        .flat_map(|t| {
            t.rows
                .iter()
                .map(|r| r.m.per_op(r.m.vmm_cpu_ns as f64) / 1e3)
        })
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "VMM host CPU per operation (µs, log scale)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(90)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..(names.len() as f64), (0.01f64..max * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(names.len())
        .x_label_formatter(&|x| {
            names
                .get(x.floor() as usize)
                .map(|s| s.replace(", ", "\n"))
                .unwrap_or_default()
        })
        .y_desc("µs per operation")
        .draw()?;
    let colors = [RED, BLUE, GREEN];
    for (pi, p) in IoPath::ALL.iter().enumerate() {
        let color = colors[pi];
        chart
            .draw_series(tables.iter().enumerate().filter_map(|(i, t)| {
                let r = t.rows.iter().find(|r| r.path == *p)?;
                let v = (r.m.per_op(r.m.vmm_cpu_ns as f64) / 1e3).max(0.011);
                let x0 = i as f64 + 0.15 + 0.23 * pi as f64;
                Some(Rectangle::new([(x0, 0.01), (x0 + 0.2, v)], color.filled()))
            }))?
            .label(p.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map_or_else(
            || std::path::PathBuf::from("docs"),
            std::path::PathBuf::from,
        );
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("the comparison runs real guests and needs /dev/kvm: {e}"))?;
    let tsc = tsc_per_ns();
    // The emulated disk is slow (writes especially: every 16-bit word of `rep outsw`
    // is an exit), so it gets fewer operations; rates are per second either way.
    let (emu_reads, emu_writes, fast_ops) = if quick {
        (300u64, 30u64, 3_000u64)
    } else {
        (2_000, 200, 20_000)
    };
    let mut tables = Vec::new();
    for (title, write, random) in [
        ("4 KiB sequential reads", false, false),
        ("4 KiB sequential writes", true, false),
        ("4 KiB random reads", false, true),
        ("4 KiB random writes", true, true),
    ] {
        let mut rows = Vec::new();
        for path in IoPath::ALL {
            let ops = match (path, write) {
                (IoPath::Emulated, false) => emu_reads,
                (IoPath::Emulated, true) => emu_writes,
                _ => fast_ops,
            };
            let w = u64::from(write);
            let r = u64::from(random);
            let (guest, param, threads): (Guest, u64, &[&str]) = match path {
                IoPath::Emulated => (Guest::ATA_BENCH, w | r << 1 | ops << 16, &[]),
                IoPath::Virtio => (
                    Guest::VIRTIO_BLK_BENCH,
                    1 | w << 1 | r << 2 | 1 << 8 | ops << 16,
                    &["vblk-io"],
                ),
                IoPath::Pv => (
                    Guest::PV_BLK_BENCH,
                    w << 1 | r << 2 | 1 << 8 | ops << 16,
                    &["pv-block"],
                ),
            };
            eprintln!("compare: {title}, {}: {ops} operations", path.name());
            let m = run(path, guest, param, ops, threads, ops, tsc)?;
            rows.push(Row { path, m });
        }
        tables.push(Table {
            title: title.into(),
            unit: "ops",
            rows,
        });
    }
    let bytes: u64 = if quick { 64 << 10 } else { 256 << 10 };
    let mut rows = Vec::new();
    for (i, path) in IoPath::ALL.into_iter().enumerate() {
        let threads: &[&str] = match path {
            IoPath::Emulated => &[],
            IoPath::Virtio => &["vcon-io"],
            IoPath::Pv => &["pv-console"],
        };
        eprintln!("compare: console output, {}: {bytes} bytes", path.name());
        let m = run(
            path,
            Guest::CONSOLE_BENCH,
            i as u64 | bytes << 16,
            bytes / 4096,
            threads,
            bytes / 4096,
            tsc,
        )?;
        rows.push(Row { path, m });
    }
    tables.push(Table {
        title: format!("console output, {} KiB in 4 KiB writes", bytes >> 10),
        unit: "4 KiB writes",
        rows,
    });
    eprintln!("compare: CPU-bound loop");
    let (guest_rate, host_rate) = cpu_ratio()?;

    let mut md = String::from(
        "## Full virtualization vs paravirtualization\n\n\
         Generated by `cargo run --release --example compare`. One operation is one 4 KiB \
         request, issued one at a time by a CPL-3 guest. VMM CPU is the time the VMM spends \
         handling exits plus its device I/O thread; latency is the guest's own TSC around \
         each operation.\n\n",
    );
    for t in &tables {
        md += &t.markdown();
        md += "\n";
    }
    // The guest runs the host's own instructions on the same CPU: it cannot be
    // faster, past the two clocks' reading error. A ratio above that is a broken
    // reference, reported as such and never as a figure.
    let ratio = guest_rate / host_rate;
    if ratio > 1.02 {
        return Err(format!(
            "the CPL-3 loop measured at {:.1} % of native, above the physical bound: the reference is wrong (guest {guest_rate:.3e}/s, host {host_rate:.3e}/s)",
            100.0 * ratio
        )
        .into());
    }
    let _ = writeln!(
        md,
        "### CPU-bound loop at CPL 3\n\nThe counter guest's own machine code, in the guest and on the host, pinned to the same CPU and timed the same way: guest {:.3e} iterations/s, host {:.3e} iterations/s: **{:.1} %** of native (target ≥ 95 %).\n",
        guest_rate,
        host_rate,
        100.0 * ratio
    );
    eprintln!("compare: memory per VM");
    md += &memory_table()?;
    println!("{md}");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("comparison.md"), &md)?;
    svg(&tables, &out.join("comparison.svg"))?;
    eprintln!(
        "compare: wrote {} and {}",
        out.join("comparison.md").display(),
        out.join("comparison.svg").display()
    );
    Ok(())
}
