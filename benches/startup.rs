//! Start-up cost of the example VMM against QEMU's microvm machine, in the same run.
//!
//! ```text
//! cargo bench --bench startup
//! ```
//!
//! Both run the same 13-byte real-mode guest (`Guest::REAL_MODE_EXIT`): its first exit
//! writes a newline to the COM1 16550, its second exits through the debug-exit port.
//! The example VMM loads it at 0x8000 (`--guest exit`); QEMU gets it at the reset
//! vector of a 64 KiB firmware image (`-bios`). Figures per run:
//!
//! * first exit: from just before `spawn` to the guest's newline arriving on the pipe
//!   (the process has started, built the VM and run the guest up to its first exit);
//! * whole run: to the process being reaped (VM teardown included);
//! * peak RSS and VMM overhead: the example reports its own peak RSS (`VmHWM`) and the
//!   guest RAM resident in it (mincore); overhead is the difference. For QEMU the peak
//!   RSS is `ru_maxrss` from `wait4` (which also counts this benchmark's own RSS at
//!   spawn time, about 2 MiB, far below QEMU's), and its guest RAM is counted in it:
//!   the guest touches only a few pages either way.
//!
//! Targets: at least 5× faster first exit than QEMU, at most 2 MiB VMM overhead.
//! `VMCRAFT_VMM=path` measures another build of the example, for instance a statically
//! linked one, which does not map glibc's shared pages:
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --example minimal-vmm \
//!     --target x86_64-unknown-linux-gnu --target-dir target/static
//! VMCRAFT_VMM=target/static/x86_64-unknown-linux-gnu/release/examples/minimal-vmm \
//!     cargo bench --bench startup
//! ```
//!
//! Without `qemu-system-x86_64` on the PATH only vmcraft is measured.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmcraft_guest_kit::Guest;

const ROUNDS: usize = 21;
const GUEST_MEM: &str = "128M";

struct Sample {
    first_exit: Duration,
    whole: Duration,
    peak_rss_kib: u64,
    /// Peak RSS minus resident guest RAM, when the VMM reports it.
    overhead_kib: Option<u64>,
}

/// The example's `host memory: peak RSS A KiB, guest RAM resident B KiB, VMM overhead
/// C KiB` line: (A, C).
fn reported_memory(output: &str) -> Option<(u64, u64)> {
    let line = output
        .lines()
        .find(|l| l.contains("host memory: peak RSS"))?;
    let number_before = |unit_after: &str| -> Option<u64> {
        let head = &line[..line.find(unit_after)?];
        head.rsplit(' ').next()?.parse().ok()
    };
    let peak = number_before(" KiB, guest RAM")?;
    let overhead = line
        .rsplit("VMM overhead ")
        .next()?
        .strip_suffix(" KiB")?
        .parse()
        .ok()?;
    Some((peak, overhead))
}

/// Run `cmd` once: it must print the guest's newline first.
#[expect(
    clippy::zombie_processes,
    reason = "reaped with wait4 below, which also returns its rusage"
)]
fn measure(cmd: &mut Command) -> Sample {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut first = [0u8; 1];
    stdout
        .read_exact(&mut first)
        .unwrap_or_else(|e| panic!("{cmd:?} printed nothing: {e}"));
    let first_exit = start.elapsed();
    assert_eq!(first[0], b'\n', "{cmd:?}: the guest's first byte");
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).expect("drain stdout");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain old data, for which all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet reaped (std never waited on it); `status` and
    // `usage` are valid for writes for the duration of the call.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(reaped, pid, "wait4: {}", std::io::Error::last_os_error());
    let whole = start.elapsed();
    let reported = reported_memory(&String::from_utf8_lossy(&rest));
    Sample {
        first_exit,
        whole,
        peak_rss_kib: reported.map_or(usage.ru_maxrss as u64, |r| r.0),
        overhead_kib: reported.map(|r| r.1),
    }
}

fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

struct Summary {
    first_exit: Duration,
    whole: Duration,
    peak_rss_kib: u64,
    overhead_kib: Option<u64>,
}

fn summarize(samples: Vec<Sample>) -> Summary {
    let overheads: Option<Vec<u64>> = samples.iter().map(|s| s.overhead_kib).collect();
    Summary {
        first_exit: median(samples.iter().map(|s| s.first_exit).collect()),
        whole: median(samples.iter().map(|s| s.whole).collect()),
        peak_rss_kib: median(samples.iter().map(|s| s.peak_rss_kib).collect()),
        overhead_kib: overheads.map(median),
    }
}

fn mib(kib: u64) -> String {
    format!("{:.2}", kib as f64 / 1024.0)
}

fn print_row(name: &str, s: &Summary) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{:<28} {:>14.2} {:>14.2} {:>14} {:>14}",
        name,
        ms(s.first_exit),
        ms(s.whole),
        mib(s.peak_rss_kib),
        s.overhead_kib.map_or("-".into(), mib)
    );
}

/// The example VMM, built (or found up to date) by cargo in the release profile.
fn example_vmm() -> PathBuf {
    if let Some(p) = std::env::var_os("VMCRAFT_VMM") {
        return p.into();
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--release", "--example", "minimal-vmm"])
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the example VMM failed");
    let exe = std::env::current_exe().expect("own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("bench binaries live in <target>/<profile>/deps");
    profile_dir.join("examples").join("minimal-vmm")
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A 64 KiB firmware image with the guest at the reset vector (offset 0xfff0, which
/// the CPU runs as F000:FFF0) and `hlt` everywhere else.
fn firmware_image(dir: &Path) -> PathBuf {
    let code = Guest::REAL_MODE_EXIT.code;
    assert!(
        code.len() <= 16,
        "the guest must fit before the end of the image"
    );
    let mut image = vec![0xf4u8; 64 << 10];
    image[0xfff0..0xfff0 + code.len()].copy_from_slice(code);
    let path = dir.join(format!(
        "vmcraft-startup-firmware-{}.bin",
        std::process::id()
    ));
    std::fs::write(&path, image).expect("write the firmware image");
    path
}

fn main() {
    common::require_kvm("startup");
    let vmm = example_vmm();
    let qemu = find_in_path("qemu-system-x86_64");
    let firmware = firmware_image(&std::env::temp_dir());

    let vmcraft_cmd = || {
        let mut c = Command::new(&vmm);
        c.args(["--guest", "exit", "--mem", GUEST_MEM]);
        c
    };
    let qemu_cmd = |qemu: &Path| {
        let mut c = Command::new(qemu);
        c.args([
            "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", GUEST_MEM,
        ])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-bios"])
        .arg(&firmware)
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
        c
    };

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Alternate the order so that neither side always runs on a warm cache.
        if round % 2 == 0 {
            ours.push(measure(&mut vmcraft_cmd()));
        }
        if let Some(q) = &qemu {
            theirs.push(measure(&mut qemu_cmd(q)));
        }
        if round % 2 == 1 {
            ours.push(measure(&mut vmcraft_cmd()));
        }
    }
    let _ = std::fs::remove_file(&firmware);

    println!("start-up, median of {ROUNDS} runs, guest memory {GUEST_MEM} (touched: a few pages)");
    println!(
        "{:<28} {:>14} {:>14} {:>14} {:>14}",
        "", "first exit ms", "whole run ms", "peak RSS MiB", "overhead MiB"
    );
    let ours = summarize(ours);
    print_row("vmcraft minimal-vmm", &ours);
    let theirs = (!theirs.is_empty()).then(|| summarize(theirs));
    if let Some(t) = &theirs {
        print_row("qemu-system-x86_64 microvm", t);
    }
    println!(
        "vmcraft VMM overhead: {} MiB (target <= 2 MiB)",
        ours.overhead_kib.map_or("not reported".into(), mib)
    );
    match &theirs {
        Some(t) => println!(
            "QEMU / vmcraft: first exit {:.1}x (target >= 5x), peak RSS {:.1}x",
            t.first_exit.as_secs_f64() / ours.first_exit.as_secs_f64(),
            t.peak_rss_kib as f64 / ours.peak_rss_kib as f64,
        ),
        None => println!(
            "qemu-system-x86_64 is not on the PATH (Debian: apt-get install qemu-system-x86): no comparison"
        ),
    }
}
