//! The minimal vmcraft VMM.
//!
//! With no arguments it runs the embedded demo guest, which greets through the
//! emulated 16550 (every byte trapped and emulated) and exits; then it prints the exit
//! statistics. With `--kernel` it boots Linux (bzImage or ELF vmlinux).
//!
//! ```text
//! cargo run --release --example minimal-vmm
//! cargo run --release --example minimal-vmm -- --kernel /boot/vmlinuz --mem 512M --vcpus 2
//! ```

use std::error::Error;
use std::fs::File;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmcraft::builder::MachineBuilder;
use vmcraft::devices::serial::SerialInput;
use vmcraft::devices::virtio::block::{Block, Disk};
use vmcraft::devices::virtio::console::Console;
use vmcraft::devices::virtio::net::Net;
use vmcraft::devices::virtio::rng::Rng;
use vmcraft::devices::virtio::tap::Tap;
use vmcraft::machine::HYPERCALL_PORT;
use vmcraft::memory::host_usage::ProcessMemory;
use vmcraft::pv::hypercall::HypercallTable;
use vmcraft::pv_machine::PvBackends;
use vmcraft::vcpu::{StopReason, VcpuConfig};
use vmcraft_guest_kit::Guest;

const USAGE: &str = "usage: minimal-vmm --diagnose | [--guest NAME | --kernel PATH [--initrd PATH] [--cmdline TEXT]] [--disk PATH[,ro]]... [--console | --console-socket PATH] [--rng] [--net-tap NAME] [--pv] [--mem SIZE] [--vcpus N] [--timeout SECS]

  --diagnose       probe what this host's KVM intercepts (CPUID at CPL 0 and CPL 3) and
                   what a port-I/O exit costs, print it and exit
  no --kernel      run an embedded guest (default: the demo, which greets through the emulated 16550)
  --guest NAME     the embedded guest: hello (the demo); exit (a few real-mode instructions
                   that write COM1 once and exit, for start-up measurements); spin (counts
                   forever at CPL 3: use with --timeout, for memory measurements); virtio-blk (a
                   driver that tests the first --disk: writes, reads back, flushes, batches);
                   virtio-blk-flush (the same, then 64 KiB written at sector 256, flushed,
                   \"flushed\" printed, and it waits to be killed: for durability tests);
                   virtio-console (a driver that greets on the --console or
                   --console-socket, waits for \"ping\" and answers \"got: ping\")
  --disk PATH[,ro] a raw disk image as a virtio-blk device (virtio-mmio; for Linux the
                   virtio_mmio.device= parameters are added to the command line)
  --console        a virtio-console on stdout/stdin (stdin then feeds it, not COM1)
  --console-socket PATH
                   a virtio-console on a Unix socket: listens at PATH and waits for one
                   client before starting the VM
  --rng            a virtio-rng device fed from the host's getrandom
  --pv             run the PV demo guest: it prints through the PV console ring and
                   tests the first --disk as a PV block device (blkif over grants),
                   through hypercalls and event channels only
  --net-tap NAME   a virtio-net device on TAP interface NAME (created if missing; needs
                   CAP_NET_ADMIN or an interface owned by this user)
  --kernel PATH    a Linux bzImage or ELF vmlinux; ACPI tables describe the vCPUs, the
                   IOAPIC and every device to it, and its power-off stops the VM
  --initrd PATH    an initramfs for the kernel
  --cmdline TEXT   kernel command line (default: console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1)
  --mem SIZE       guest RAM, in MiB or with a K/M/G suffix (default 128M; at least 4M)
  --vcpus N        number of vCPUs, 1 to 254 (default 1)
  --timeout SECS   stop the VM after SECS seconds";

const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1";
const MIN_MEM: u64 = 4 << 20;
/// IRQ of the PV event-channel upcall.
const PV_UPCALL_IRQ: u32 = 11;

fn disk_read_only(o: &Options, index: usize) -> bool {
    o.disks.get(index).is_some_and(|d| d.1)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ConsoleOption {
    Stdio,
    Socket(String),
}

#[derive(Debug)]
struct Options {
    diagnose: bool,
    guest: Option<Guest>,
    guest_param: u64,
    disks: Vec<(String, bool)>,
    console: Option<ConsoleOption>,
    rng: bool,
    pv: bool,
    net_tap: Option<String>,
    kernel: Option<String>,
    initrd: Option<String>,
    cmdline: String,
    mem: u64,
    vcpus: u32,
    timeout: Option<Duration>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1 << 20),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid memory size {s:?}"))
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        diagnose: false,
        guest: None,
        guest_param: 0,
        disks: Vec::new(),
        console: None,
        rng: false,
        pv: false,
        net_tap: None,
        kernel: None,
        initrd: None,
        cmdline: DEFAULT_CMDLINE.into(),
        mem: 128 << 20,
        vcpus: 1,
        timeout: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--diagnose" => o.diagnose = true,
            "--guest" => {
                o.guest = Some(match value()?.as_str() {
                    "hello" => Guest::HELLO,
                    "exit" => Guest::REAL_MODE_EXIT,
                    "virtio-blk" => Guest::VIRTIO_BLK,
                    "virtio-console" => Guest::VIRTIO_CONSOLE,
                    "spin" => Guest::COUNTER,
                    "virtio-blk-flush" => {
                        o.guest_param = 2;
                        Guest::VIRTIO_BLK
                    }
                    other => {
                        return Err(format!(
                    "unknown guest {other:?} (hello, exit, spin, virtio-blk, virtio-blk-flush or virtio-console)"
                ))
                    }
                })
            }
            "--disk" => {
                let v = value()?;
                let (path, read_only) = match v.rsplit_once(',') {
                    Some((path, "ro")) => (path.to_string(), true),
                    Some((path, "rw")) => (path.to_string(), false),
                    Some((_, flag)) => {
                        return Err(format!("unknown disk flag {flag:?} (ro or rw)"))
                    }
                    None => (v, false),
                };
                o.disks.push((path, read_only));
            }
            "--console" => o.console = Some(ConsoleOption::Stdio),
            "--console-socket" => o.console = Some(ConsoleOption::Socket(value()?)),
            "--rng" => o.rng = true,
            "--pv" => o.pv = true,
            "--net-tap" => o.net_tap = Some(value()?),
            "--kernel" => o.kernel = Some(value()?),
            "--initrd" => o.initrd = Some(value()?),
            "--cmdline" => o.cmdline = value()?,
            "--mem" => o.mem = parse_size(&value()?)?,
            "--vcpus" => {
                let v = value()?;
                o.vcpus = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=254).contains(n))
                    .ok_or(format!("invalid vCPU count {v:?} (1 to 254)"))?;
            }
            "--timeout" => {
                let v = value()?;
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s > 0.0)
                    .ok_or(format!("invalid timeout {v:?}"))?;
                o.timeout = Some(Duration::from_secs_f64(secs));
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if o.diagnose && args.len() > 1 {
        return Err("--diagnose runs its own probe VM and takes no other option".into());
    }
    if o.guest.is_some() && o.kernel.is_some() {
        return Err("--guest and --kernel exclude each other".into());
    }
    if o.pv {
        if o.guest.is_some() || o.kernel.is_some() {
            return Err("--pv runs its own guest: no --guest or --kernel with it".into());
        }
        if o.disks.is_empty() {
            return Err("--pv needs a --disk for its PV block device".into());
        }
        o.guest = Some(Guest::PV_DEMO);
    }
    if o.guest == Some(Guest::VIRTIO_BLK) && o.disks.is_empty() {
        return Err("--guest virtio-blk needs a --disk to test".into());
    }
    if o.guest == Some(Guest::VIRTIO_CONSOLE) && (o.console.is_none() || !o.disks.is_empty()) {
        return Err(
            "--guest virtio-console needs --console or --console-socket, and no --disk".into(),
        );
    }
    if o.initrd.is_some() && o.kernel.is_none() {
        return Err("--initrd needs --kernel".into());
    }
    if o.mem < MIN_MEM {
        return Err(format!(
            "--mem {} bytes is too little memory: at least {} MiB are needed",
            o.mem,
            MIN_MEM >> 20
        ));
    }
    Ok(o)
}

fn open(what: &str, path: &str) -> Result<File, Box<dyn Error>> {
    File::open(path).map_err(|e| format!("cannot open {what} {path}: {e}").into())
}

fn open_disks(o: &Options) -> Result<Vec<Disk>, Box<dyn Error>> {
    let mut disks = Vec::new();
    for (i, (path, read_only)) in o.disks.iter().enumerate() {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| format!("cannot open disk {path}: {e}"))?;
        disks.push(
            Disk::new(file, *read_only, &format!("vmcraft{i}"))
                .map_err(|e| format!("cannot use disk {path}: {e}"))?,
        );
    }
    Ok(disks)
}

/// `--diagnose`: the CPU, whether its kernel offers CPUID faulting, and what the probe
/// VM found.
fn diagnose() -> Result<ExitCode, Box<dyn Error>> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown", |(_, v)| v.trim())
    };
    let flags = field("flags");
    let has_flag = |f: &str| flags.split_whitespace().any(|x| x == f);
    println!(
        "minimal-vmm: host CPU: {} ({}); cpuid_fault: {}; hardware virtualization visible: {}",
        field("model name"),
        field("vendor_id"),
        if has_flag("cpuid_fault") { "yes" } else { "no" },
        if has_flag("vmx") || has_flag("svm") {
            "yes"
        } else {
            "no (nested KVM: CPL 0 is emulated)"
        }
    );
    let probe = vmcraft::vcpu::probe::probe_host()?;
    for line in probe.to_string().lines() {
        println!("minimal-vmm: {line}");
    }
    Ok(ExitCode::SUCCESS)
}

fn run(o: Options) -> Result<ExitCode, Box<dyn Error>> {
    if o.diagnose {
        return diagnose();
    }
    let started = Instant::now();
    let disks = open_disks(&o)?;
    let tap = o
        .net_tap
        .as_deref()
        .map(Tap::open)
        .transpose()
        .map_err(|e| format!("{e}{}", source_chain(&e)))?;
    let console = match &o.console {
        None => None,
        Some(ConsoleOption::Stdio) => Some(Console::new(
            Box::new(std::io::stdout()),
            Some(Box::new(std::io::stdin())),
            "vcon",
        )),
        Some(ConsoleOption::Socket(path)) => {
            let listener = std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| format!("cannot listen on console socket {path}: {e}"))?;
            eprintln!("minimal-vmm: waiting for a console client on {path}");
            let (stream, _) = listener
                .accept()
                .map_err(|e| format!("console socket {path}: {e}"))?;
            let output = stream.try_clone()?;
            Some(Console::new(
                Box::new(output),
                Some(Box::new(stream)),
                "vcon",
            ))
        }
    };
    let mut b = MachineBuilder::new(o.mem, Box::new(std::io::stdout()))?;
    b.reserve_irq(PV_UPCALL_IRQ)?;

    // Hypercalls (and, with --pv, event channels and the PV backends, which take the
    // first disk).
    let mut hypercalls = HypercallTable::new();
    let mut disks = disks.into_iter();
    let _pv = if o.pv {
        let upcall = Arc::new(vmm_sys_util::eventfd::EventFd::new(
            vmm_sys_util::eventfd::EFD_NONBLOCK,
        )?);
        b.vm().fd().register_irqfd(&upcall, PV_UPCALL_IRQ)?;
        let disk = disks.next().ok_or("--pv needs a --disk")?;
        let pv = PvBackends::start(
            b.memory().clone(),
            &vmcraft_guest_kit::PV_LAYOUT,
            &mut hypercalls,
            upcall,
            Box::new(std::io::stdout()),
            disk.into_file(),
            disk_read_only(&o, 0),
        )?;
        let (buses, vm) = b.buses_and_vm();
        pv.attach_doorbell(buses, vm.fd())?;
        Some(pv)
    } else {
        None
    };
    b.hypercalls(HYPERCALL_PORT, hypercalls);

    // virtio devices: disks, the console, the rng, the NIC; the builder gives each a
    // window, an interrupt line no legacy device owns, a command-line entry and an
    // ACPI description.
    for (i, disk) in disks.enumerate() {
        b.add_virtio(Box::new(Block::new(disk, &format!("vblk{i}"))))?;
    }
    if let Some(console) = console {
        b.add_virtio(Box::new(console))?;
    }
    if o.rng {
        b.add_virtio(Box::new(Rng::new("vrng")))?;
    }
    if let Some(tap) = tap {
        // A locally administered address.
        let mac = [0x02, 0x76, 0x6d, 0x63, 0, 1];
        b.add_virtio(Box::new(Net::new(Box::new(tap), mac, "vnet")))?;
    }

    let aps = (1..o.vcpus).map(|_| VcpuConfig::waiting_for_sipi());
    let vcpus: Vec<VcpuConfig> = match &o.kernel {
        None => {
            let guest = o.guest.unwrap_or(Guest::HELLO);
            guest.load(b.memory())?;
            // The virtio-blk guest negotiates EVENT_IDX with parameter bit 0.
            let event_idx = u64::from(guest == Guest::VIRTIO_BLK);
            let bsp = VcpuConfig::at(guest.entry(0, o.guest_param | event_idx));
            std::iter::once(bsp).chain(aps).collect()
        }
        Some(path) => {
            let mut kernel = open("kernel", path)?;
            let mut initrd = o.initrd.as_deref().map(|p| open("initrd", p)).transpose()?;
            let loaded = b
                .load_linux(&mut kernel, initrd.as_mut(), &o.cmdline, o.vcpus)
                .map_err(|e| format!("cannot load kernel {path}: {e}{}", source_chain(&e)))?;
            eprintln!(
                "minimal-vmm: loaded {path} as {:?}, entry {:?}",
                loaded.format, loaded.entry
            );
            // Feed stdin to COM1 so the guest console is interactive (unless the
            // virtio-console has it).
            if o.console != Some(ConsoleOption::Stdio) {
                let input = SerialInput::new(b.legacy().serial.clone(), std::io::stdin());
                std::thread::Builder::new()
                    .name("serial-input".into())
                    .spawn(move || {
                        let Ok(mut em) =
                            EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
                        else {
                            return;
                        };
                        em.add_subscriber(Arc::new(Mutex::new(input)));
                        while em.run().is_ok() {}
                    })?;
            }
            std::iter::once(VcpuConfig::at(loaded.entry))
                .chain(aps)
                .collect()
        }
    };

    let machine = b.start(&vcpus)?;
    let (running, buses) = (machine.running, machine.buses);
    let first_exit = started.elapsed();
    let stats: Vec<_>;
    let guest_resident;
    let outcome = {
        running.wait_stopped(o.timeout);
        stats = (0..running.vcpu_count())
            .map(|i| running.stats(i))
            .collect::<Result<_, _>>()?;
        guest_resident = running.vm().ram().resident_bytes()?;
        running.request_stop();
        running.wait()?
    };

    println!();
    println!("minimal-vmm: VM stopped: {:?} (vCPU {:?}), {:.1} ms after start (vCPUs running after {:.1} ms)",
        outcome.reason, outcome.vcpu, started.elapsed().as_secs_f64() * 1e3, first_exit.as_secs_f64() * 1e3);
    for (i, s) in stats.iter().enumerate() {
        println!(
            "minimal-vmm: exit statistics of vCPU {i} ({} exits):",
            s.total()
        );
        print!("{s}");
    }
    let memory = ProcessMemory::current()?;
    println!(
        "minimal-vmm: host memory: peak RSS {} KiB, guest RAM resident {} KiB, VMM overhead {} KiB",
        memory.peak_rss >> 10,
        guest_resident >> 10,
        memory.peak_rss.saturating_sub(guest_resident) >> 10
    );
    let u = buses.unclaimed();
    println!("minimal-vmm: unclaimed accesses: {} port reads, {} port writes, {} MMIO reads, {} MMIO writes",
        u.pio_reads, u.pio_writes, u.mmio_reads, u.mmio_writes);
    let ports = buses.unclaimed_ports();
    if !ports.is_empty() {
        let list: Vec<String> = ports
            .iter()
            .map(|p| format!("{:#x} ({}r/{}w)", p.port, p.reads, p.writes))
            .collect();
        println!("minimal-vmm: unclaimed ports: {}", list.join(", "));
    }
    Ok(match outcome.reason {
        StopReason::DebugExit(code) => ExitCode::from(code.min(255) as u8),
        StopReason::Reset | StopReason::PowerOff | StopReason::Requested => ExitCode::SUCCESS,
        // TripleFault, Crash, Halted, and whatever later versions add.
        _ => ExitCode::FAILURE,
    })
}

fn source_chain(e: &dyn Error) -> String {
    let mut s = String::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

/// Warnings from the library (a device that needs a reset, input that cannot be
/// used) go to stderr.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("minimal-vmm: {}: {}", record.level(), record.args());
        }
    }
    fn flush(&self) {}
}

fn main() -> ExitCode {
    static LOG: StderrLog = StderrLog;
    if log::set_logger(&LOG).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse(&args) {
        Ok(o) => o,
        Err(msg) if msg.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("minimal-vmm: {msg}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(options) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("minimal-vmm: error: {e}{}", source_chain(&*e));
            ExitCode::FAILURE
        }
    }
}
