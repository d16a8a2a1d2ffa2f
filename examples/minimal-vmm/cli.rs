//! The command line of the minimal VMM, and the machine configuration it describes.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use vmcraft::config::{
    BootSource, ConsoleConfig, DeviceConfig, DiskConfig, MachineConfig, NetConfig, PvConfig,
    VirtioTransport, VsockConfig, PV_UPCALL_IRQ,
};
use vmcraft::pv::layout::PvLayout;
use vmcraft_guest_kit::Guest;

pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1";

/// A minimal VMM on vmcraft: with no option, the embedded demo guest greets through
/// the emulated 16550 and the exit statistics are printed.
#[derive(Debug, Parser)]
#[command(
    name = "minimal-vmm",
    version,
    max_term_width = 100,
    args_override_self = true
)]
pub struct Args {
    /// Probe what this host's KVM intercepts (CPUID at CPL 0 and CPL 3) and what a
    /// port-I/O exit costs, print it and exit
    #[arg(long, exclusive = true)]
    pub diagnose: bool,

    /// The machine as a JSON file (vmcraft::config::MachineConfig) instead of the
    /// machine options (--guest, --kernel, --disk, ...)
    #[arg(long, value_name = "FILE", conflicts_with_all = MACHINE_OPTIONS)]
    pub config: Option<PathBuf>,

    /// Serve Firecracker's API on a new Unix socket at PATH (what firecracker-go-sdk,
    /// firectl and Kata speak): the machine is what its requests describe, started by
    /// InstanceStart
    #[arg(long, value_name = "PATH", conflicts_with_all = MACHINE_OPTIONS, conflicts_with = "config")]
    pub api_sock: Option<PathBuf>,

    /// The machine as Firecracker's configuration file (its API's bodies in one JSON
    /// document), started at once (with --api-sock, the API is served on)
    #[arg(long, value_name = "FILE", conflicts_with_all = MACHINE_OPTIONS, conflicts_with = "config")]
    pub config_file: Option<PathBuf>,

    /// The one directory the API's requests may name files in once the machine runs
    /// (PUT /snapshot/create writes there, PATCH /drives opens there; paths relative
    /// to it, or absolute inside it) [default: the API socket's directory]
    #[arg(long, value_name = "DIR", requires = "api_sock")]
    pub api_dir: Option<PathBuf>,

    /// No API (Firecracker's flag: needs --config-file)
    #[arg(long, requires = "config_file", conflicts_with = "api_sock")]
    pub no_api: bool,

    /// The instance's id, as GET / reports it
    #[arg(long, value_name = "ID", default_value = "anonymous-instance")]
    pub id: String,

    /// Print the machine's configuration as JSON (what --config takes) and exit
    #[arg(long)]
    pub print_config: bool,

    /// An embedded guest instead of a kernel (default: hello, the demo)
    #[arg(long, value_enum, value_name = "NAME", conflicts_with = "kernel")]
    pub guest: Option<GuestName>,

    /// A Linux bzImage or ELF vmlinux; ACPI tables describe the vCPUs, the IOAPIC
    /// and every device to it, and its power-off stops the VM (where CPL 0 is
    /// emulated, on nested hosts, a bzImage decompresses slowly: boot its vmlinux)
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// An initramfs for the kernel
    #[arg(long, value_name = "PATH", requires = "kernel")]
    pub initrd: Option<PathBuf>,

    /// The kernel command line
    #[arg(long, value_name = "TEXT", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// A raw disk image: a virtio-blk device (queues=N: N request queues, each on
    /// its own thread; with --pv the first is the PV block device, with --xen each is
    /// a Xen vbd, xvda, xvdb, ...)
    #[arg(long = "disk", value_name = "PATH[,ro][,queues=N]", value_parser = parse_disk)]
    pub disks: Vec<DiskConfig>,

    /// A virtio-console on stdout and stdin (stdin then feeds it, not COM1); with
    /// --xen, stdin feeds hvc0
    #[arg(long)]
    pub console: bool,

    /// A virtio-console on a Unix socket: listen at PATH and wait for one client
    /// before starting the VM
    #[arg(long, value_name = "PATH", conflicts_with_all = ["console", "xen"])]
    pub console_socket: Option<PathBuf>,

    /// A virtio-rng device fed from the host's getrandom
    #[arg(long)]
    pub rng: bool,

    /// A virtio-balloon device, and the memory balancer on it: every second it
    /// asks the guest for its statistics and lets it keep what it uses plus
    /// headroom (at least an eighth of its RAM, and 16 MiB)
    #[arg(long)]
    pub balloon: bool,

    /// Offer guest RAM to the host's same-page merging (KSM)
    #[arg(long)]
    pub ksm: bool,

    /// How the virtio devices reach the guest: mmio (windows in the ACPI tables, an
    /// interrupt line each) or pci (functions on a PCI host bridge, an MSI-X vector
    /// per queue). Default: pci for a --kernel (without --xen), mmio for the embedded
    /// guests, --xen and the API's machines (as Firecracker's); a restore keeps the
    /// snapshot's. A migration destination names it as the source's machine has it
    #[arg(long, value_enum, value_name = "KIND")]
    pub transport: Option<TransportName>,

    /// A virtio-net device on TAP interface NAME (created if missing; needs
    /// CAP_NET_ADMIN or an interface owned by this user); queues=N opens N queues of a
    /// multi-queue TAP, a queue pair each (give a vCPU per pair)
    #[arg(long, value_name = "NAME[,queues=N]", value_parser = parse_net_tap)]
    pub net_tap: Option<NetConfig>,

    /// A virtio-vsock device for the guest with context id CID, its host side as
    /// Firecracker's: clients connect to the Unix socket PATH (created here, removed
    /// at the end) and write `CONNECT <port>`; the guest's connections to host port P
    /// go to `PATH_P`
    #[arg(long, value_name = "CID,PATH", value_parser = parse_vsock)]
    pub vsock: Option<VsockConfig>,

    /// A device served by a vhost-user backend listening on the Unix socket PATH
    /// (repeatable; guest RAM is then shared from a memory file the backend maps):
    /// KIND is blk (qemu-storage-daemon, vmcraft-vhost-user-backend; queues=N),
    /// fs (virtiofsd; tag=TAG, what the guest mounts), rng, vsock (vhost-device-*),
    /// or generic (type=N, the virtio device ID; queues=N; config=BYTES of
    /// configuration space from the backend); queue-size=N for any
    #[arg(long = "vhost-user", value_name = "KIND,PATH[,key=value...]", value_parser = parse_vhost_user)]
    pub vhost_user: Vec<DeviceConfig>,

    /// vmcraft's PV channel (event channels, grants, a PV console and the first
    /// --disk as a PV block device); alone, run the PV demo guest
    #[arg(long, conflicts_with_all = ["xen", "kernel"])]
    pub pv: bool,

    /// Present Xen to the --kernel, booted through its PVH entry (an ELF vmlinux):
    /// Xen's CPUID leaves and hypercalls (KVM's Xen support: CONFIG_KVM_XEN), event
    /// channels, grant tables, a xenstore; the guest uses its own Xen drivers
    #[arg(long)]
    pub xen: bool,

    /// Guest RAM, in MiB or with a K/M/G suffix [default: 128M; a restore: the
    /// snapshot's]
    #[arg(long, value_name = "SIZE", value_parser = parse_mem)]
    pub mem: Option<u64>,

    /// Number of vCPUs [default: 1; a restore: the snapshot's]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=254))]
    pub vcpus: Option<u32>,

    /// Stop the VM after SECS seconds
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<Duration>,

    /// What a VMM thread's system call outside its seccomp allowlist meets
    #[arg(long, value_enum, value_name = "MODE", default_value = "kill")]
    pub seccomp: SeccompMode,

    /// No seccomp filters (Firecracker's flag: the same as --seccomp off)
    #[arg(long, conflicts_with = "seccomp")]
    pub no_seccomp: bool,

    /// Firecracker's custom filter file: refused (its BPF describes Firecracker's
    /// threads; vmcraft's own allowlists apply, see --seccomp)
    #[arg(long, value_name = "FILE")]
    pub seccomp_filter: Option<PathBuf>,

    /// The log to this file or named pipe (which must exist), in Firecracker's form
    /// (as PUT /logger); without it, the log goes to stderr
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,

    /// The log's level: Error, Warning, Info, Debug, Trace or Off [default: Warning,
    /// or VMCRAFT_LOG]
    #[arg(long, value_name = "LEVEL")]
    pub level: Option<String>,

    /// Each log line says its level (with --log-path)
    #[arg(long, requires = "log_path")]
    pub show_level: bool,

    /// Each log line says its source file and line (with --log-path)
    #[arg(long, requires = "log_path")]
    pub show_log_origin: bool,

    /// Firecracker's boot timer: a guest that writes 123 to the byte at 0xd0000000
    /// (`devmem 0xd0000000 8 123`) gets its boot time logged (at Info) and reported
    #[arg(long)]
    pub boot_timer: bool,

    /// Metrics as JSON lines to this file or named pipe (which must exist), as PUT
    /// /metrics: every 60 s, on FlushMetrics and at the end
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,

    /// Run the VM in a jail at DIR (by default a fresh directory under the
    /// temporary directory): new mount, PID and network namespaces, only /dev/kvm
    /// and the files named (opened before entering), no capabilities, limits on
    /// descriptors, address space, CPU and memory
    #[arg(long, value_name = "DIR")]
    pub jail: Option<PathBuf>,

    /// Run without the jail
    #[arg(long, conflicts_with = "jail")]
    pub no_jail: bool,

    /// On SIGUSR1 pause the VM, write a snapshot into DIR (its state and memory
    /// files, opened at start) and go on; on SIGUSR2 the same, then stop
    #[arg(long, value_name = "DIR")]
    pub snapshot: Option<PathBuf>,

    /// Sign snapshots with the key in PATH (HMAC-SHA256), and with --restore (or the
    /// API's snapshot load) refuse one not signed with it
    #[arg(long, value_name = "PATH")]
    pub snapshot_key: Option<PathBuf>,

    /// Start from the snapshot in DIR: the machine comes from the snapshot (device
    /// options, if given, must describe the same machine and move its disks, TAP or
    /// socket to the paths given); the guest goes on where it was paused
    #[arg(long, value_name = "DIR", conflicts_with_all = ["guest", "kernel", "config"])]
    pub restore: Option<PathBuf>,

    /// Connect to the VMM receiving at ADDR (host:port) at start; on SIGUSR1
    /// migrate the running VM there and exit 0. If the hand-over's outcome is
    /// unknown, stay paused (SIGUSR1 resumes here, SIGUSR2 ends)
    #[arg(long, value_name = "ADDR", conflicts_with = "snapshot")]
    pub migrate_to: Option<String>,

    /// Wait on ADDR (host:port) for a migration and run what arrives: give the same
    /// --mem and devices (disks on shared storage) as the source
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["guest", "kernel", "restore", "migrate_to"])]
    pub migrate_from: Option<String>,

    /// With --migrate-from, give up after N failed connections
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub migrate_tries: u32,

    /// Authenticate the migration with the secret in PATH (at least 32 random
    /// bytes), the same at both ends
    #[arg(long = "migrate-secret-file", value_name = "PATH")]
    pub migrate_secret: Option<PathBuf>,

    /// Authenticate with this VMM's key pair in PATH (made with --migrate-keygen)
    #[arg(
        long,
        value_name = "PATH",
        requires = "migrate_peer",
        conflicts_with = "migrate_secret"
    )]
    pub migrate_key: Option<PathBuf>,

    /// Accept only the peers whose public keys are in PATH (64 hex digits a line)
    #[arg(long, value_name = "PATH", requires = "migrate_key")]
    pub migrate_peer: Option<PathBuf>,

    /// Write a new key pair to PATH (mode 0600), print its public key and exit
    #[arg(long, value_name = "PATH", exclusive = true)]
    pub migrate_keygen: Option<PathBuf>,

    /// Send at most SIZE bytes per second while the guest runs (K/M/G suffixes)
    #[arg(long, value_name = "SIZE", value_parser = parse_bandwidth)]
    pub migrate_bandwidth: Option<u64>,
}

/// The options that describe the machine (what --config replaces).
const MACHINE_OPTIONS: [&str; 16] = [
    "guest",
    "kernel",
    "initrd",
    "disks",
    "console",
    "console_socket",
    "rng",
    "balloon",
    "ksm",
    "transport",
    "net_tap",
    "vsock",
    "pv",
    "xen",
    "mem",
    "vcpus",
];

/// The virtio transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportName {
    /// virtio-mmio
    Mmio,
    /// virtio-pci with MSI-X
    Pci,
}

impl From<TransportName> for VirtioTransport {
    fn from(t: TransportName) -> Self {
        match t {
            TransportName::Mmio => VirtioTransport::Mmio,
            TransportName::Pci => VirtioTransport::Pci,
        }
    }
}

/// The embedded guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GuestName {
    /// The demo: greets through the emulated 16550
    Hello,
    /// A few real-mode instructions that write COM1 once and exit (start-up)
    Exit,
    /// Counts forever at CPL 3 (memory measurements, with --timeout)
    Spin,
    /// Rewrites and checks 16 MiB in 1000 rounds, printing each sum (snapshots,
    /// migrations)
    Memcheck,
    /// Writes and checks the first --disk for 2000 rounds
    Blkcheck,
    /// The PV block check, for 2000 rounds (with --pv)
    Pvcheck,
    /// A virtio-balloon driver of its own over all RAM above 16 MiB (with --balloon)
    Balloon,
    /// A driver that tests the first --disk: writes, reads back, flushes, batches
    VirtioBlk,
    /// The same, then 64 KiB flushed at sector 256, "flushed" printed, and it waits
    /// to be killed (durability)
    VirtioBlkFlush,
    /// Greets on the console, waits for "ping" and answers "got: ping"
    VirtioConsole,
    /// An agent on the --vsock: connects to host port 1234 (`PATH_1234`), echoes a
    /// counter through it forever, reconnects after a restore
    VsockAgent,
}

impl GuestName {
    fn name(self) -> &'static str {
        match self {
            GuestName::Hello => "hello",
            GuestName::Exit => "exit",
            GuestName::Spin => "spin",
            GuestName::Memcheck => "memcheck",
            GuestName::Blkcheck => "blkcheck",
            GuestName::Pvcheck => "pvcheck",
            GuestName::Balloon => "balloon",
            GuestName::VirtioBlk => "virtio-blk",
            GuestName::VirtioBlkFlush => "virtio-blk-flush",
            GuestName::VirtioConsole => "virtio-console",
            GuestName::VsockAgent => "vsock-agent",
        }
    }
}

/// An embedded guest named in a configuration, and its parameter: the image, and
/// the parameter its entry gets.
pub fn embedded_guest(name: &str, param: u64, mem: u64) -> Result<(Guest, u64), String> {
    Ok(match name {
        "hello" => (Guest::HELLO, param),
        "exit" => (Guest::REAL_MODE_EXIT, param),
        "spin" => (Guest::COUNTER, param),
        "memcheck" => (Guest::MEMCHECK, param),
        "blkcheck" => (Guest::BLKCHECK, param),
        "pvcheck" => (Guest::PVCHECK, param),
        "pv-demo" => (Guest::PV_DEMO, param),
        "balloon" => (Guest::PHASED, vmcraft_guest_kit::Phased::pool_pages(mem)),
        // The virtio-blk guest negotiates EVENT_IDX with parameter bit 0.
        "virtio-blk" | "virtio-blk-flush" => (Guest::VIRTIO_BLK, param | 1),
        "virtio-console" => (Guest::VIRTIO_CONSOLE, param),
        "vsock-agent" => (Guest::VIRTIO_VSOCK, 1),
        other => return Err(format!("unknown embedded guest {other:?}")),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SeccompMode {
    /// The process dies of SIGSYS
    Kill,
    /// SIGSYS to the thread
    Trap,
    /// Allowed, and logged by the kernel as an audit record
    Log,
    /// No filters (debugging)
    Off,
}

impl SeccompMode {
    pub fn violation(self) -> Option<vmcraft::sandbox::Violation> {
        use vmcraft::sandbox::Violation;
        match self {
            SeccompMode::Kill => Some(Violation::KillProcess),
            SeccompMode::Trap => Some(Violation::Trap),
            SeccompMode::Log => Some(Violation::Log),
            SeccompMode::Off => None,
        }
    }
}

fn parse_size(s: &str, plain: u64) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, plain),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("invalid size {s:?}"))
}

fn parse_mem(s: &str) -> Result<u64, String> {
    let bytes = parse_size(s, 1 << 20)?;
    if bytes % (1 << 20) != 0 {
        return Err(format!("{s}: guest RAM comes in whole MiB"));
    }
    Ok(bytes)
}

fn parse_bandwidth(s: &str) -> Result<u64, String> {
    parse_size(s, 1)
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0 && s.is_finite())
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("invalid timeout {s:?}"))
}

fn parse_net_tap(s: &str) -> Result<NetConfig, String> {
    let mut parts = s.split(',');
    let mut net = NetConfig {
        tap: parts.next().unwrap_or_default().to_string(),
        mac: None,
        queues: None,
    };
    for flag in parts {
        match flag.strip_prefix("queues=").map(str::parse::<u16>) {
            Some(Ok(n)) => net.queues = Some(n),
            Some(Err(e)) => return Err(format!("queues: {e}")),
            None => return Err(format!("unknown TAP flag {flag:?} (queues=N)")),
        }
    }
    Ok(net)
}

fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
    let (cid, path) = s
        .split_once(',')
        .ok_or_else(|| format!("{s:?} is not CID,PATH"))?;
    let guest_cid = cid
        .parse()
        .map_err(|e| format!("context id {cid:?}: {e}"))?;
    Ok(VsockConfig {
        guest_cid,
        uds_path: path.into(),
    })
}

fn parse_vhost_user(s: &str) -> Result<DeviceConfig, String> {
    use vmcraft::config::{VhostUserConfig, VhostUserFsConfig, VhostUserGenericConfig};
    let mut parts = s.split(',');
    let kind = parts.next().unwrap_or_default();
    let socket: std::path::PathBuf = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| format!("{s:?} is not KIND,PATH[,key=value...]"))?
        .into();
    let (mut tag, mut queues, mut queue_size, mut device_type, mut config_size) =
        (None, None, None, None, 0u32);
    for flag in parts {
        let (key, value) = flag
            .split_once('=')
            .ok_or_else(|| format!("{flag:?} is not key=value"))?;
        let number = |what: &str| {
            value
                .parse::<u32>()
                .map_err(|e| format!("{what} {value:?}: {e}"))
        };
        match key {
            "tag" => tag = Some(value.to_string()),
            "queues" => queues = Some(u16::try_from(number("queues")?).map_err(|e| e.to_string())?),
            "queue-size" => {
                queue_size = Some(u16::try_from(number("queue-size")?).map_err(|e| e.to_string())?)
            }
            "type" => device_type = Some(number("type")?),
            "config" => config_size = number("config")?,
            _ => {
                return Err(format!(
                    "unknown vhost-user flag {key:?} (tag, queues, queue-size, type, config)"
                ))
            }
        }
    }
    let known = |queues| VhostUserConfig {
        socket: socket.clone(),
        queues,
        queue_size,
    };
    let refuse = |what: &str| Err(format!("{what} is not a flag of a vhost-user {kind}"));
    match kind {
        "blk" => Ok(DeviceConfig::VhostUserBlk(known(queues))),
        "rng" | "vsock" if queues.is_some() => refuse("queues"),
        "rng" => Ok(DeviceConfig::VhostUserRng(known(None))),
        "vsock" => Ok(DeviceConfig::VhostUserVsock(known(None))),
        "fs" => Ok(DeviceConfig::VhostUserFs(VhostUserFsConfig {
            socket: socket.clone(),
            tag: tag.ok_or("a vhost-user fs needs tag=TAG")?,
            queues,
            queue_size,
        })),
        "generic" => Ok(DeviceConfig::VhostUser(VhostUserGenericConfig {
            socket: socket.clone(),
            device_type: device_type.ok_or("a generic vhost-user device needs type=N")?,
            queues: queues.unwrap_or(1),
            queue_size,
            config_size,
        })),
        _ => Err(format!(
            "vhost-user kind {kind:?} (blk, fs, rng, vsock or generic)"
        )),
    }
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let mut parts = s.split(',');
    let mut disk = DiskConfig::new(parts.next().unwrap_or_default());
    for flag in parts {
        match flag {
            "ro" => disk.read_only = true,
            "rw" => disk.read_only = false,
            _ => match flag.strip_prefix("queues=").map(str::parse::<u16>) {
                Some(Ok(n)) => disk.queues = Some(n),
                Some(Err(e)) => return Err(format!("queues: {e}")),
                None => return Err(format!("unknown disk flag {flag:?} (ro, rw or queues=N)")),
            },
        }
    }
    Ok(disk)
}

impl Args {
    /// Whether any option describing the machine's devices was given.
    pub fn names_devices(&self) -> bool {
        !self.disks.is_empty()
            || self.console
            || self.console_socket.is_some()
            || self.rng
            || self.balloon
            || self.net_tap.is_some()
            || self.vsock.is_some()
            || !self.vhost_user.is_empty()
            || self.pv
            || self.xen
    }

    /// The virtio transport: the one given, else a restored snapshot's, else virtio-pci
    /// for a Linux kernel booted without Xen (its own virtio_pci driver, a vector per
    /// queue) and virtio-mmio for everything else (the embedded guests drive MMIO;
    /// Xen guests boot PVH, with no PCI bus).
    pub fn transport(&self, saved: Option<&MachineConfig>) -> VirtioTransport {
        match (self.transport, saved) {
            (Some(t), _) => t.into(),
            (None, Some(saved)) => saved.transport,
            (None, None) if self.kernel.is_some() && !self.xen && self.migrate_from.is_none() => {
                VirtioTransport::Pci
            }
            (None, None) => VirtioTransport::Mmio,
        }
    }

    /// The machine these options describe; `saved` is a snapshot's (a restore),
    /// whose RAM and vCPUs are taken unless given.
    pub fn machine(&self, saved: Option<&MachineConfig>) -> Result<MachineConfig, String> {
        if let Some(path) = &self.config {
            return MachineConfig::from_file(path).map_err(|e| format!("{e}{}", crate::chain(&e)));
        }
        let memory_mib = self
            .mem
            .map(|b| b >> 20)
            .or(saved.map(|s| s.memory_mib))
            .unwrap_or(128);
        let vcpus = self.vcpus.or(saved.map(|s| s.vcpus)).unwrap_or(1);
        let arriving = self.restore.is_some() || self.migrate_from.is_some();
        let boot = match (&self.kernel, self.guest) {
            _ if arriving => None,
            (Some(kernel), _) => Some(BootSource::Linux {
                kernel: kernel.clone(),
                initrd: self.initrd.clone(),
                cmdline: self.cmdline.clone(),
            }),
            (None, guest) => {
                let name = match guest {
                    Some(g) => g.name(),
                    None if self.pv => "pv-demo",
                    None => "hello",
                };
                let param = match guest {
                    Some(GuestName::Memcheck) => 16 | 1000 << 16,
                    Some(GuestName::Blkcheck) => 1 | 2000 << 16,
                    Some(GuestName::Pvcheck) => 2000 << 16,
                    Some(GuestName::VirtioBlkFlush) => 2,
                    _ => 0,
                };
                Some(BootSource::Embedded {
                    name: name.into(),
                    param,
                })
            }
        };
        let mut devices = Vec::new();
        let mut disks = self.disks.iter().cloned();
        if self.pv {
            let disk = disks.next().ok_or(
                "--pv needs a --disk for its PV block device, a raw image the guest may overwrite (truncate -s 16M disk.img, then --pv --disk disk.img)",
            )?;
            devices.push(DeviceConfig::Pv(PvConfig {
                disk,
                upcall_irq: PV_UPCALL_IRQ,
                layout: PvLayout::STANDARD,
            }));
        }
        if self.xen {
            devices.extend(disks.map(DeviceConfig::XenDisk));
            if self.console {
                devices.push(DeviceConfig::XenConsole);
            }
        } else {
            devices.extend(disks.map(DeviceConfig::VirtioBlock));
            if self.console || self.console_socket.is_some() {
                devices.push(DeviceConfig::VirtioConsole(ConsoleConfig {
                    socket: self.console_socket.clone(),
                }));
            }
        }
        if self.rng {
            devices.push(DeviceConfig::VirtioRng);
        }
        if self.balloon {
            devices.push(DeviceConfig::VirtioBalloon);
        }
        if let Some(net) = &self.net_tap {
            devices.push(DeviceConfig::VirtioNet(net.clone()));
        }
        if let Some(vsock) = &self.vsock {
            devices.push(DeviceConfig::VirtioVsock(vsock.clone()));
        }
        devices.extend(self.vhost_user.iter().cloned());
        let config = MachineConfig {
            memory_mib,
            vcpus,
            boot,
            devices,
            xen: self.xen,
            ksm: self.ksm,
            transport: self.transport(saved),
            shared_memory: false,
        };
        self.check_guest(&config)?;
        Ok(config)
    }

    /// What the embedded test guests need of the machine.
    fn check_guest(&self, config: &MachineConfig) -> Result<(), String> {
        let has = |kind: &str| config.devices.iter().any(|d| d.kind() == kind);
        if config.xen && matches!(config.boot, Some(BootSource::Embedded { .. })) {
            return Err("--xen presents Xen to a --kernel (an ELF vmlinux), or to a guest restored or migrated".into());
        }
        let Some(guest) = self.guest else {
            return Ok(());
        };
        let virtio = config
            .devices
            .iter()
            .any(|d| d.kind().starts_with("virtio-") || d.kind().starts_with("vhost-user"));
        if config.transport == VirtioTransport::Pci && virtio {
            return Err(
                "the embedded guests drive virtio-mmio: --transport pci is for a --kernel".into(),
            );
        }
        let problem = match guest {
            GuestName::Pvcheck if !self.pv => "--guest pvcheck needs --pv (and a --disk)",
            g if self.pv && g != GuestName::Pvcheck => {
                "--pv runs its own guest (or --guest pvcheck): no other --guest"
            }
            GuestName::Blkcheck | GuestName::VirtioBlk | GuestName::VirtioBlkFlush
                if !has("virtio-block") && !has("vhost-user-blk") =>
            {
                "this guest needs a --disk (or a --vhost-user blk) it may overwrite"
            }
            GuestName::VirtioConsole if !has("virtio-console") || has("virtio-block") => {
                "--guest virtio-console needs --console or --console-socket, and no --disk"
            }
            GuestName::VsockAgent
                if !matches!(
                    config.devices.as_slice(),
                    [DeviceConfig::VirtioVsock(_) | DeviceConfig::VhostUserVsock(_)]
                ) =>
            {
                "--guest vsock-agent needs --vsock (or a --vhost-user vsock), and no other virtio device (its driver takes the first one)"
            }
            GuestName::Balloon if config.devices != [DeviceConfig::VirtioBalloon] => {
                "--guest balloon needs --balloon, and no other virtio device (its driver takes the first one)"
            }
            _ => return Ok(()),
        };
        Err(problem.into())
    }
}
