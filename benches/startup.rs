//! Start-up cost of the example VMM against QEMU's microvm machine and Firecracker,
//! in the same run.
//!
//! ```text
//! cargo bench --bench startup
//! ```
//!
//! Two pairs, each running one guest under both VMMs:
//!
//! * against QEMU, the 13-byte real-mode guest (`Guest::REAL_MODE_EXIT`): its first exit
//!   writes a newline to the COM1 16550, its second exits through the debug-exit port.
//!   The example VMM loads it at 0x8000 (`--guest exit`); QEMU gets it at the reset
//!   vector of a 64 KiB firmware image (`-bios`);
//! * against Firecracker, the tiny ELF kernel `vmcraft_guest_kit::ELF_RESET`, booted by
//!   both as a Linux vmlinux (long mode, CPL 0): it writes a newline to COM1, then resets
//!   through the i8042, which ends both VMMs. Firecracker runs without its API socket,
//!   from a configuration file, its log in a file.
//!
//! Figures per run:
//!
//! * first exit: from just before `spawn` to the guest's newline arriving on the pipe
//!   (the process has started, built the VM and run the guest up to its first exit);
//! * whole run: to the process being reaped (VM teardown included);
//! * CPU: the process's user and system time, from `wait4`;
//! * peak RSS and VMM overhead: the example reports its own peak RSS (`VmHWM`) and the
//!   guest RAM resident in it (mincore); overhead is the difference. For the others the
//!   peak RSS is `ru_maxrss` from `wait4` (which also counts this benchmark's own RSS at
//!   spawn time, about 2 MiB), guest RAM included: the guests touch a few pages.
//!
//! Targets: at least 5× faster first exit than QEMU, at most 2 MiB VMM overhead, at
//! most 0.5× Firecracker's CPU and peak RSS. A reference that is not installed or fails
//! to start gets a row saying so, with its stderr, never a figure. QEMU is
//! `qemu-system-x86_64` on the PATH or `$VMCRAFT_QEMU`; Firecracker is `firecracker` on
//! the PATH or `$VMCRAFT_FIRECRACKER`. `VMCRAFT_VMM=path` measures another build of the
//! example, for instance a statically linked one, which does not map glibc's shared
//! pages:
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --example minimal-vmm \
//!     --target x86_64-unknown-linux-gnu --target-dir target/static
//! VMCRAFT_VMM=target/static/x86_64-unknown-linux-gnu/release/examples/minimal-vmm \
//!     cargo bench --bench startup
//! ```

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmcraft::memory::report::ErrorChain;
use vmcraft_guest_kit::peers::{self, PeerError};
use vmcraft_guest_kit::{Guest, ELF_RESET};

const ROUNDS: usize = 21;
const GUEST_MEM_MIB: u32 = 128;

struct Sample {
    first_exit: Duration,
    whole: Duration,
    cpu: Duration,
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

fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

/// Run `cmd` once: it must print the guest's newline first.
/// The child is reaped with `wait4`, which also returns its rusage.
fn measure(cmd: &mut Command) -> Result<Sample, PeerError> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| PeerError::Spawn {
            peer: format!("{cmd:?}"),
            source,
        })?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut first = [0u8; 1];
    if stdout.read_exact(&mut first).is_err() {
        return Err(peers::exited_early(cmd, child, "the guest's first output"));
    }
    let first_exit = start.elapsed();
    assert_eq!(first[0], b'\n', "{cmd:?}: the guest's first byte");
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).expect("drain stdout");
    let (cpu, max_rss_kib) = reap(&child);
    let whole = start.elapsed();
    let reported = reported_memory(&String::from_utf8_lossy(&rest));
    Ok(Sample {
        first_exit,
        whole,
        cpu,
        peak_rss_kib: reported.map_or(max_rss_kib, |r| r.0),
        overhead_kib: reported.map(|r| r.1),
    })
}

/// One run through the API, as an orchestrator starts a VM: spawn, wait for the
/// socket to answer `GET /`, describe the machine, `InstanceStart`, wait for the
/// guest's first output.
struct ApiSample {
    /// From just before `spawn` to the first answer on the socket.
    socket_ready: Duration,
    /// From sending `InstanceStart` to the guest's newline on the pipe.
    start_to_first_exit: Duration,
    cpu: Duration,
}

/// Send one request on `stream`, read its answer: the status code.
fn api_call(
    stream: &mut std::os::unix::net::UnixStream,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<u16> {
    vmcraft::api::client::call(stream, method, path, body).map(|(status, _)| status)
}

/// Run `cmd` (a VMM with its API on `sock`) once through the API, booting `kernel`.
fn measure_api(cmd: &mut Command, sock: &Path, kernel: &Path) -> Result<ApiSample, PeerError> {
    let _ = std::fs::remove_file(sock);
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| PeerError::Spawn {
            peer: format!("{cmd:?}"),
            source,
        })?;
    let failed = |cmd: &Command, child, what| Err(peers::exited_early(cmd, child, what));
    let mut stream = loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_micros(50))
            }
            Err(_) => {
                let _ = child.kill();
                return failed(cmd, child, "its API socket");
            }
        }
    };
    if api_call(&mut stream, "GET", "/", "").ok() != Some(200) {
        let _ = child.kill();
        return failed(cmd, child, "an answer to GET /");
    }
    let socket_ready = start.elapsed();
    let machine = format!(r#"{{"vcpu_count": 1, "mem_size_mib": {GUEST_MEM_MIB}}}"#);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    );
    for (path, body) in [
        ("/machine-config", machine.as_str()),
        ("/boot-source", &boot),
    ] {
        if api_call(&mut stream, "PUT", path, body).ok() != Some(204) {
            let _ = child.kill();
            return failed(cmd, child, "its machine described");
        }
    }
    let sent = Instant::now();
    // The answer may come after the guest's first output (the guest may end the VMM
    // first): the newline is what counts.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut request = stream.try_clone().expect("a second handle");
    std::thread::spawn(move || {
        let _ = api_call(
            &mut request,
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
        );
    });
    let mut first = [0u8; 1];
    if stdout.read_exact(&mut first).is_err() {
        return failed(cmd, child, "the guest's first output");
    }
    let start_to_first_exit = sent.elapsed();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).expect("drain stdout");
    let (cpu, _) = reap(&child);
    Ok(ApiSample {
        socket_ready,
        start_to_first_exit,
        cpu,
    })
}

/// Reap `child` (std never waited on it) with `wait4`: the CPU time it used, user
/// and system, and its peak RSS in KiB.
fn reap(child: &std::process::Child) -> (Duration, u64) {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain old data, for which all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet reaped; `status` and `usage` are valid for
    // writes for the duration of the call.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(reaped, pid, "wait4: {}", std::io::Error::last_os_error());
    (
        timeval(usage.ru_utime) + timeval(usage.ru_stime),
        usage.ru_maxrss as u64,
    )
}

fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

struct Summary {
    first_exit: Duration,
    whole: Duration,
    cpu: Duration,
    peak_rss_kib: u64,
    overhead_kib: Option<u64>,
}

fn summarize(samples: &[Sample]) -> Summary {
    let overheads: Option<Vec<u64>> = samples.iter().map(|s| s.overhead_kib).collect();
    Summary {
        first_exit: median(samples.iter().map(|s| s.first_exit).collect()),
        whole: median(samples.iter().map(|s| s.whole).collect()),
        cpu: median(samples.iter().map(|s| s.cpu).collect()),
        peak_rss_kib: median(samples.iter().map(|s| s.peak_rss_kib).collect()),
        overhead_kib: overheads.map(median),
    }
}

fn mib(kib: u64) -> String {
    format!("{:.2}", kib as f64 / 1024.0)
}

/// One VMM running one guest, measured [`ROUNDS`] times unless it fails.
struct Contender<'a> {
    name: &'static str,
    command: Box<dyn Fn() -> Result<Command, PeerError> + 'a>,
    /// Why it is not measured: not installed, or it failed to run.
    missing: Option<String>,
    samples: Vec<Sample>,
}

impl<'a> Contender<'a> {
    fn new(name: &'static str, command: impl Fn() -> Result<Command, PeerError> + 'a) -> Self {
        Contender {
            name,
            command: Box::new(command),
            missing: None,
            samples: Vec::new(),
        }
    }

    fn not_installed(name: &'static str, why: &str) -> Self {
        let mut c = Contender::new(name, || unreachable!("not installed"));
        c.missing = Some(why.into());
        c
    }

    fn run_once(&mut self) {
        if self.missing.is_some() {
            return;
        }
        match (self.command)().and_then(|mut c| measure(&mut c)) {
            Ok(s) => self.samples.push(s),
            Err(e) => self.missing = Some(ErrorChain(&e).to_string()),
        }
    }

    fn summary(&self) -> Option<Summary> {
        (self.missing.is_none() && !self.samples.is_empty()).then(|| summarize(&self.samples))
    }

    fn print(&self) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        match (&self.missing, self.summary()) {
            (None, Some(s)) => println!(
                "{:<34} {:>13.2} {:>13.2} {:>10.2} {:>13} {:>13}",
                self.name,
                ms(s.first_exit),
                ms(s.whole),
                ms(s.cpu),
                mib(s.peak_rss_kib),
                s.overhead_kib.map_or("-".into(), mib)
            ),
            (why, _) => println!(
                "{:<34} not measured: {}",
                self.name,
                why.as_deref().unwrap_or("no runs")
            ),
        }
    }
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

/// Set in the environment of this benchmark's own executable to make it the floor: the
/// least a VMM must do for the ELF guest, on a bare kvm-ioctls VM, then exit.
const BARE_KVM_ENV: &str = "VMCRAFT_STARTUP_BARE_KVM";

/// The floor under any VMM on this host: the same KVM objects both VMMs create (VM, TSS,
/// in-kernel irqchip and PIT, a 128 MiB memory slot, one vCPU with the supported CPUID
/// and a long-mode entry, with vmcraft's register setup), the ELF's one segment copied
/// in, the vCPU run on the main thread until the i8042 reset. No threads, no devices, no
/// parsing: what is left is the host kernel's cost of a VM.
fn bare_kvm(kernel: &[u8]) -> ! {
    use kvm_ioctls::{Kvm, VcpuExit};
    use vm_memory::Bytes;
    use vmcraft::memory::{layout::MemoryLayout, GuestRam};
    use vmcraft::vcpu::cpu::{self, HypervisorInfo};
    use vmcraft::vcpu::mode::{self, Entry, Privilege};
    use vmcraft_guest_kit::abi;
    let le64 = |at: usize| u64::from_le_bytes(kernel[at..at + 8].try_into().expect("8 bytes"));
    // ELF64: e_entry at 0x18, e_phoff at 0x20; the first program header's p_offset,
    // p_paddr and p_filesz at 0x08, 0x18 and 0x20 into it.
    let (entry, ph) = (le64(0x18), le64(0x20) as usize);
    let (offset, paddr, size) = (le64(ph + 8) as usize, le64(ph + 0x18), le64(ph + 0x20));
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    // Memory first: a slot added once the irqchip exists costs this host's kernel
    // milliseconds of waiting (Firecracker adds it after its vCPU: 7.6 ms in
    // KVM_SET_USER_MEMORY_REGION under strace -T); vmcraft adds it first, as here.
    let mut ram =
        GuestRam::new(&MemoryLayout::x86_64(u64::from(GUEST_MEM_MIB) << 20).expect("layout"))
            .expect("guest RAM");
    ram.register(&vm).expect("memory slot");
    vm.set_tss_address(0xfffb_d000).expect("TSS");
    vm.create_irq_chip().expect("irqchip");
    vm.create_pit2(kvm_bindings::kvm_pit_config::default())
        .expect("PIT");
    ram.memory()
        .write_slice(
            &kernel[offset..offset + size as usize],
            vm_memory::GuestAddress(paddr),
        )
        .expect("load the segment");
    mode::write_boot_tables(ram.memory()).expect("boot tables");
    let mut vcpu = vm.create_vcpu(0).expect("vCPU");
    cpu::configure(&kvm, &vcpu, 0, 1, HypervisorInfo::default()).expect("CPUID");
    let entry = Entry::LongMode {
        rip: entry,
        rsp: 0,
        privilege: Privilege::Kernel,
        args: [0, 0],
    };
    mode::enter(&vcpu, entry).expect("entry");
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(abi::COM1_PORT, _) => {
                std::io::Write::write_all(&mut std::io::stdout(), b"\n").expect("stdout")
            }
            VcpuExit::IoOut(abi::I8042_COMMAND_PORT, _) => std::process::exit(0),
            other => panic!("unexpected exit {other:?}"),
        }
    }
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}x", a / b)
}

fn main() {
    if let Some(kernel) = std::env::var_os(BARE_KVM_ENV) {
        bare_kvm(&std::fs::read(kernel).expect("read the ELF guest"));
    }
    common::require_kvm("startup");
    let vmm = example_vmm();
    let dir = std::env::temp_dir().join(format!("vmcraft-startup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the benchmark's directory");
    let firmware = dir.join("firmware.bin");
    peers::write_firmware(Guest::REAL_MODE_EXIT.code, &firmware).expect("firmware image");
    let kernel = dir.join("reset.elf");
    std::fs::write(&kernel, ELF_RESET).expect("write the ELF guest");
    let mem = format!("{GUEST_MEM_MIB}M");
    // The commands borrow these; the `move` closures below take the references.
    let (mem, firmware, kernel, dir) = (&mem, &firmware, &kernel, &dir);

    // Without the jail, as Firecracker runs here without its jailer; both run their
    // seccomp filters.
    let vmcraft = |guest: &[&str]| {
        let mut c = Command::new(&vmm);
        c.args(guest).args(["--mem", mem, "--no-jail"]);
        c
    };
    let mut contenders = vec![
        Contender::new("vmcraft, real-mode guest", || {
            Ok(vmcraft(&["--guest", "exit"]))
        }),
        match peers::qemu() {
            Some(q) => Contender::new("QEMU microvm, real-mode guest", move || {
                let mut c = peers::qemu_microvm(&q, mem, firmware);
                c.args(["-serial", "stdio"])
                    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
                Ok(c)
            }),
            None => Contender::not_installed(
                "QEMU microvm, real-mode guest",
                "qemu-system-x86_64 is not on the PATH (Debian: apt-get install qemu-system-x86)",
            ),
        },
        Contender::new("vmcraft, ELF kernel", || {
            Ok(vmcraft(&["--kernel", kernel.to_str().expect("UTF-8 path")]))
        }),
        Contender::new("floor: bare KVM, ELF kernel", || {
            let mut c = Command::new(std::env::current_exe().expect("own path"));
            c.env(BARE_KVM_ENV, kernel);
            Ok(c)
        }),
        match peers::firecracker() {
            Some(f) => Contender::new("Firecracker, ELF kernel", move || {
                peers::firecracker_command(&f, kernel, GUEST_MEM_MIB, dir)
            }),
            None => Contender::not_installed(
                "Firecracker, ELF kernel",
                "no firecracker on the PATH and VMCRAFT_FIRECRACKER is not set",
            ),
        },
    ];

    for round in 0..ROUNDS {
        // Rotate the order so that no one always runs first, on a cold cache.
        let n = contenders.len();
        for i in 0..n {
            contenders[(round + i) % n].run_once();
        }
    }
    for ours in [&contenders[0], &contenders[2], &contenders[3]] {
        if let Some(why) = &ours.missing {
            panic!("{}: {why}", ours.name);
        }
    }
    let firecracker_log = peers::firecracker_log(dir);

    println!(
        "start-up, median of {ROUNDS} runs, guest memory {GUEST_MEM_MIB} MiB (touched: a few pages)"
    );
    println!(
        "{:<34} {:>13} {:>13} {:>10} {:>13} {:>13}",
        "", "first exit ms", "whole run ms", "CPU ms", "peak RSS MiB", "overhead MiB"
    );
    for c in &contenders {
        c.print();
    }
    let s: Vec<Option<Summary>> = contenders.iter().map(Contender::summary).collect();
    let ours = s[0].as_ref().expect("measured above");
    println!(
        "vmcraft VMM overhead: {} MiB (target <= 2 MiB)",
        ours.overhead_kib.map_or("not reported".into(), mib)
    );
    if let Some(q) = &s[1] {
        println!(
            "QEMU / vmcraft: first exit {} (target >= 5x), peak RSS {}",
            ratio(q.first_exit.as_secs_f64(), ours.first_exit.as_secs_f64()),
            ratio(q.peak_rss_kib as f64, ours.peak_rss_kib as f64),
        );
    }
    let floor = s[3].as_ref().expect("measured above");
    if let (Some(v), Some(f)) = (&s[2], &s[4]) {
        println!(
            "vmcraft / Firecracker: CPU {} (target <= 0.5x), peak RSS {} (target <= 0.5x), first exit {}, whole run {}",
            ratio(v.cpu.as_secs_f64(), f.cpu.as_secs_f64()),
            ratio(v.peak_rss_kib as f64, f.peak_rss_kib as f64),
            ratio(v.first_exit.as_secs_f64(), f.first_exit.as_secs_f64()),
            ratio(v.whole.as_secs_f64(), f.whole.as_secs_f64()),
        );
        println!(
            "floor / Firecracker: CPU {}, peak RSS {} (what no VMM on this host can go below)",
            ratio(floor.cpu.as_secs_f64(), f.cpu.as_secs_f64()),
            ratio(floor.peak_rss_kib as f64, f.peak_rss_kib as f64),
        );
    } else if contenders[4].missing.is_some() && !firecracker_log.is_empty() {
        println!("Firecracker's log: {firecracker_log}");
    }
    api_startup(&vmm, kernel, dir);
    let _ = std::fs::remove_dir_all(dir);
}

/// The start-up through the API, as an orchestrator sees it, for the example and
/// Firecracker (if found), interleaved.
fn api_startup(vmm: &Path, kernel: &Path, dir: &Path) {
    const API_ROUNDS: usize = 11;
    let sock = dir.join("api.sock");
    let mut ours: Vec<ApiSample> = Vec::new();
    let mut theirs: Result<Vec<ApiSample>, String> = match peers::firecracker() {
        Some(_) => Ok(Vec::new()),
        None => Err("no firecracker on the PATH and VMCRAFT_FIRECRACKER is not set".into()),
    };
    for _ in 0..API_ROUNDS {
        let mut c = Command::new(vmm);
        c.args(["--no-jail", "--api-sock"]).arg(&sock);
        match measure_api(&mut c, &sock, kernel) {
            Ok(s) => ours.push(s),
            Err(e) => panic!("vmcraft through the API: {}", ErrorChain(&e)),
        }
        if let (Ok(samples), Some(f)) = (&mut theirs, peers::firecracker()) {
            let mut c = Command::new(f);
            c.arg("--api-sock").arg(&sock);
            match measure_api(&mut c, &sock, kernel) {
                Ok(s) => samples.push(s),
                Err(e) => theirs = Err(ErrorChain(&e).to_string()),
            }
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let row = |name: &str, v: &[ApiSample]| {
        let ready = median(v.iter().map(|s| s.socket_ready).collect());
        let first = median(v.iter().map(|s| s.start_to_first_exit).collect());
        let cpu = median(v.iter().map(|s| s.cpu).collect());
        println!(
            "{name:<34} {:>15.2} {:>22.2} {:>10.2}",
            ms(ready),
            ms(first),
            ms(cpu)
        );
        (ready, first, cpu)
    };
    println!("through the API, median of {API_ROUNDS} runs (spawn, GET / answered, machine-config, boot-source, InstanceStart)");
    println!(
        "{:<34} {:>15} {:>22} {:>10}",
        "", "socket ready ms", "InstanceStart->exit ms", "CPU ms"
    );
    let (r, f, c) = row("vmcraft, ELF kernel", &ours);
    match &theirs {
        Ok(v) if !v.is_empty() => {
            let (fr, ff, fc) = row("Firecracker, ELF kernel", v);
            println!(
                "vmcraft / Firecracker through the API: socket ready {}, InstanceStart to first exit {}, CPU {}",
                ratio(r.as_secs_f64(), fr.as_secs_f64()),
                ratio(f.as_secs_f64(), ff.as_secs_f64()),
                ratio(c.as_secs_f64(), fc.as_secs_f64())
            );
        }
        Ok(_) => {}
        Err(why) => println!("{:<34} not measured: {why}", "Firecracker, ELF kernel"),
    }
}
