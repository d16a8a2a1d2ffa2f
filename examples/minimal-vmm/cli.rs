//! The command line of the minimal VMM: its options, their parsing and the usage text.

use std::error::Error;
use std::fs::File;
use std::time::Duration;

use vmcraft::devices::virtio::block::Disk;
use vmcraft_guest_kit::Guest;

pub const USAGE: &str = "usage: minimal-vmm --diagnose | [--guest NAME | --kernel PATH [--initrd PATH] [--cmdline TEXT]] [--disk PATH[,ro]]... [--console | --console-socket PATH] [--rng] [--balloon] [--ksm] [--net-tap NAME] [--pv | --xen] [--mem SIZE] [--vcpus N] [--timeout SECS] [--seccomp kill|trap|log|off] [--jail DIR | --no-jail] [--snapshot DIR] [--restore DIR] [--migrate-to ADDR | --migrate-from ADDR] [--migrate-secret-file PATH | --migrate-key PATH --migrate-peer PATH] [--migrate-bandwidth SIZE] [--migrate-tries N] [--migrate-keygen PATH] [--snapshot-key PATH]

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
                   --console-socket, waits for \"ping\" and answers \"got: ping\");
                   memcheck (rewrites and checks 16 MiB in 1000 rounds, printing each
                   round's sum: for snapshots and migrations); balloon (a virtio-balloon driver of its
                   own over all RAM above 16 MiB, using none of it: with --balloon)
  --disk PATH[,ro] a raw disk image as a virtio-blk device (virtio-mmio; for Linux the
                   virtio_mmio.device= parameters are added to the command line)
  --console        a virtio-console on stdout/stdin (stdin then feeds it, not COM1)
  --console-socket PATH
                   a virtio-console on a Unix socket: listens at PATH and waits for one
                   client before starting the VM
  --rng            a virtio-rng device fed from the host's getrandom
  --balloon        a virtio-balloon device, and the memory balancer on it: every second
                   it asks the guest for its statistics and lets it keep what it uses
                   plus headroom (at least an eighth of its RAM, and 16 MiB), taking
                   the rest back into the balloon; the report at the end says what
  --ksm            offer guest RAM to the host's same-page merging (KSM; merges only
                   while /sys/kernel/mm/ksm/run is 1)
  --pv             the PV backends (with --restore or --migrate-from: for a saved PV
                   guest); alone, run the PV demo guest: it prints through the PV console ring and
                   tests the first --disk as a PV block device (blkif over grants),
                   through hypercalls and event channels only
  --xen            present Xen to the --kernel (booted through its PVH entry: an ELF
                   vmlinux): Xen's CPUID leaves and hypercalls (through KVM's Xen
                   support, which the host kernel needs: CONFIG_KVM_XEN), event
                   channels with per-vCPU upcalls, grant tables; the guest uses its own
                   Xen drivers; the disks become xvda, xvdb, ... (xen-blkfront), and with
                   --console stdin goes to hvc0 (hvc_xen). No snapshots or migration yet
  --net-tap NAME   a virtio-net device on TAP interface NAME (created if missing; needs
                   CAP_NET_ADMIN or an interface owned by this user)
  --kernel PATH    a Linux bzImage or ELF vmlinux; ACPI tables describe the vCPUs, the
                   IOAPIC and every device to it, and its power-off stops the VM
  --initrd PATH    an initramfs for the kernel
  --cmdline TEXT   kernel command line (default: console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1)
  --mem SIZE       guest RAM, in MiB or with a K/M/G suffix (default 128M; at least 4M)
  --vcpus N        number of vCPUs, 1 to 254 (default 1)
  --timeout SECS   stop the VM after SECS seconds
  --seccomp MODE   what a VMM thread's system call outside its seccomp allowlist meets:
                   kill (the default: the process dies of SIGSYS), trap (SIGSYS to the
                   thread), log (allowed, and logged by the kernel as an audit record),
                   off (no filters, for debugging)
  --jail DIR       the VM runs in a jail (by default in a fresh directory under the
                   temporary directory, removed afterwards; DIR names another, empty,
                   one): new mount, PID and network namespaces, only /dev/kvm and the
                   files named above (opened before entering), no capabilities, limits
                   on descriptors and address space, and cgroup v2 CPU and memory
                   limits where the host has cgroup v2 (needs root, or unprivileged
                   user namespaces)
  --no-jail        run without the jail (for debugging, or where no namespaces can be
                   had)
  --snapshot DIR   on SIGUSR1, pause the VM, write a snapshot into DIR (its `state` and
                   `memory` files, opened at start; not the directory restored from,
                   whose memory file backs the guest) and go on; on SIGUSR2, the same,
                   then stop
  --snapshot-key PATH
                   sign snapshots written with the key in PATH (HMAC-SHA256 over the
                   state file and a digest of the memory), and with --restore refuse a
                   snapshot that is not signed with it
  --restore DIR    start from the snapshot in DIR instead of a guest or kernel: give the
                   same device options as the VM that was saved (its RAM size comes from
                   the snapshot); the guest goes on where it was paused
  --migrate-to ADDR
                   connect to the VMM receiving at ADDR (host:port) at start and
                   authenticate (the jail has no network), keep the session alive for
                   as long as the VM runs; on SIGUSR1 migrate the running VM there
                   (pre-copy while it runs, then a short stop) and exit 0. If it fails
                   before the hand-over, go on running; if the destination is lost after
                   it, the outcome is unknown: stay paused and say so (SIGUSR1 then
                   resumes the VM here, SIGUSR2 ends it)
  --migrate-from ADDR
                   instead of a guest or kernel, wait on ADDR (host:port) for a
                   migration and run what arrives: give the same --mem and device
                   options (disks on shared storage) as the source. A connection that
                   fails (a stranger, a wrong key) is dropped and the next one taken
  --migrate-tries N
                   with --migrate-from, give up after N failed connections (default 8)
  --migrate-secret-file PATH
                   authenticate the migration with the secret in PATH, at least 32
                   random bytes (head -c 32 /dev/urandom > PATH), the same at both ends
  --migrate-key PATH
                   authenticate with this VMM's key pair in PATH instead (made with
                   --migrate-keygen) ...
  --migrate-peer PATH
                   ... and accept only the peers whose public keys are in PATH (one per
                   line, 64 hexadecimal digits each)
  --migrate-keygen PATH
                   write a new key pair to PATH (mode 0600), print its public key and
                   exit
  --migrate-bandwidth SIZE
                   send at most SIZE bytes per second while the guest runs (K/M/G
                   suffixes)";

pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1";
pub const MIN_MEM: u64 = 4 << 20;

pub fn disk_read_only(o: &Options, index: usize) -> bool {
    o.disks.get(index).is_some_and(|d| d.1)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOption {
    Stdio,
    Socket(String),
}

#[derive(Debug)]
pub struct Options {
    pub diagnose: bool,
    pub guest: Option<Guest>,
    pub guest_param: u64,
    pub disks: Vec<(String, bool)>,
    pub console: Option<ConsoleOption>,
    pub rng: bool,
    /// A virtio-balloon with the balancer.
    pub balloon: bool,
    /// Guest RAM mergeable (KSM).
    pub ksm: bool,
    pub pv: bool,
    /// Present Xen to a Linux kernel.
    pub xen: bool,
    pub net_tap: Option<String>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: String,
    pub mem: u64,
    pub vcpus: u32,
    pub timeout: Option<Duration>,
    /// `None`: no filters.
    pub seccomp: Option<vmcraft::sandbox::Violation>,
    /// `None`: no jail; `Some(None)`: a fresh directory; `Some(Some(dir))`: `dir`.
    pub jail: Option<Option<String>>,
    /// Where SIGUSR1 and SIGUSR2 write snapshots.
    pub snapshot: Option<String>,
    /// The snapshot to start from.
    pub restore: Option<String>,
    /// Where SIGUSR1 migrates the VM.
    pub migrate_to: Option<String>,
    /// Where to receive a migration.
    pub migrate_from: Option<String>,
    /// The file holding the migration secret.
    pub migrate_secret: Option<String>,
    /// The file holding this VMM's migration key pair.
    pub migrate_key: Option<String>,
    /// The file holding the accepted peers' public keys.
    pub migrate_peer: Option<String>,
    /// Where to write a new key pair.
    pub migrate_keygen: Option<String>,
    /// Failed connections a destination takes before it gives up.
    pub migrate_tries: u32,
    /// The file holding the key that signs and checks snapshots.
    pub snapshot_key: Option<String>,
    /// Bytes per second while the guest runs.
    pub migrate_bandwidth: Option<u64>,
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

pub fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        diagnose: false,
        guest: None,
        guest_param: 0,
        disks: Vec::new(),
        console: None,
        rng: false,
        balloon: false,
        ksm: false,
        pv: false,
        xen: false,
        net_tap: None,
        kernel: None,
        initrd: None,
        cmdline: DEFAULT_CMDLINE.into(),
        mem: 128 << 20,
        vcpus: 1,
        timeout: None,
        seccomp: Some(vmcraft::sandbox::Violation::KillProcess),
        jail: Some(None),
        snapshot: None,
        restore: None,
        migrate_to: None,
        migrate_from: None,
        migrate_secret: None,
        migrate_key: None,
        migrate_peer: None,
        migrate_keygen: None,
        migrate_tries: 8,
        snapshot_key: None,
        migrate_bandwidth: None,
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
            "--snapshot" => o.snapshot = Some(value()?),
            "--restore" => o.restore = Some(value()?),
            "--migrate-to" => o.migrate_to = Some(value()?),
            "--migrate-from" => o.migrate_from = Some(value()?),
            "--migrate-secret-file" => o.migrate_secret = Some(value()?),
            "--migrate-key" => o.migrate_key = Some(value()?),
            "--migrate-peer" => o.migrate_peer = Some(value()?),
            "--migrate-keygen" => o.migrate_keygen = Some(value()?),
            "--snapshot-key" => o.snapshot_key = Some(value()?),
            "--migrate-tries" => {
                let v = value()?;
                o.migrate_tries = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or(format!("invalid --migrate-tries {v:?}"))?;
            }
            "--migrate-bandwidth" => {
                let v = value()?;
                // A size per second: the same suffixes as --mem, but plain numbers are bytes.
                let bytes = match v.chars().last() {
                    Some(c) if c.is_ascii_digit() => v.parse().ok(),
                    _ => parse_size(&v).ok(),
                };
                o.migrate_bandwidth = Some(
                    bytes
                        .filter(|b| *b > 0)
                        .ok_or(format!("invalid bandwidth {v:?}"))?,
                );
            }
            "--jail" => o.jail = Some(Some(value()?)),
            "--no-jail" => o.jail = None,
            "--seccomp" => {
                use vmcraft::sandbox::Violation;
                o.seccomp = match value()?.as_str() {
                    "kill" => Some(Violation::KillProcess),
                    "trap" => Some(Violation::Trap),
                    "log" => Some(Violation::Log),
                    "off" => None,
                    other => return Err(format!("--seccomp {other:?}: kill, trap, log or off")),
                }
            }
            "--guest" => {
                o.guest = Some(match value()?.as_str() {
                    "hello" => Guest::HELLO,
                    "exit" => Guest::REAL_MODE_EXIT,
                    "virtio-blk" => Guest::VIRTIO_BLK,
                    "virtio-console" => Guest::VIRTIO_CONSOLE,
                    "spin" => Guest::COUNTER,
                    "memcheck" => {
                        o.guest_param = 16 | 1000 << 16;
                        Guest::MEMCHECK
                    }
                    "blkcheck" => {
                        o.guest_param = 1 | 2000 << 16;
                        Guest::BLKCHECK
                    }
                    "pvcheck" => {
                        o.guest_param = 2000 << 16;
                        Guest::PVCHECK
                    }
                    // Its parameter, the pool, comes from --mem once all is parsed.
                    "balloon" => Guest::PHASED,
                    "virtio-blk-flush" => {
                        o.guest_param = 2;
                        Guest::VIRTIO_BLK
                    }
                    other => {
                        return Err(format!(
                    "unknown guest {other:?} (hello, exit, spin, memcheck, blkcheck, pvcheck, balloon, virtio-blk, virtio-blk-flush or virtio-console)"
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
            "--balloon" => o.balloon = true,
            "--ksm" => o.ksm = true,
            "--pv" => o.pv = true,
            "--xen" => o.xen = true,
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
        if o.kernel.is_some() || o.guest.is_some_and(|g| g != Guest::PVCHECK) {
            return Err(
                "--pv runs its own guest (or --guest pvcheck): no other --guest, no --kernel"
                    .into(),
            );
        }
        if o.disks.is_empty() {
            return Err("--pv needs a --disk PATH for its PV block device, a raw image the guest may overwrite (truncate -s 16M disk.img, then --pv --disk disk.img)".into());
        }
        // Restored or migrated, the PV guest comes with the state.
        if o.restore.is_none() && o.migrate_from.is_none() && o.guest.is_none() {
            o.guest = Some(Guest::PV_DEMO);
        }
    }
    if o.xen {
        if o.kernel.is_none() || o.pv {
            return Err("--xen presents Xen to a --kernel (not with --pv)".into());
        }
        if matches!(o.console, Some(ConsoleOption::Socket(_))) {
            return Err("--xen: the Xen console takes stdin (--console), not a socket".into());
        }
        if o.snapshot.is_some()
            || o.restore.is_some()
            || o.migrate_to.is_some()
            || o.migrate_from.is_some()
        {
            return Err(
                "--xen: snapshots and migration of a Xen guest are not supported yet".into(),
            );
        }
    }
    if o.guest == Some(Guest::PVCHECK) && !o.pv {
        return Err("--guest pvcheck needs --pv (and a --disk)".into());
    }
    if o.guest == Some(Guest::PHASED) {
        if !o.balloon || !o.disks.is_empty() || o.console.is_some() || o.rng || o.net_tap.is_some()
        {
            return Err("--guest balloon needs --balloon, and no other virtio device (its driver takes the first one)".into());
        }
        o.guest_param = vmcraft_guest_kit::Phased::pool_pages(o.mem);
    }
    if o.guest == Some(Guest::BLKCHECK) && o.disks.is_empty() {
        return Err("--guest blkcheck needs a --disk it may overwrite".into());
    }
    if o.guest == Some(Guest::VIRTIO_BLK) && o.disks.is_empty() {
        return Err("--guest virtio-blk needs a --disk to test".into());
    }
    if o.guest == Some(Guest::VIRTIO_CONSOLE) && (o.console.is_none() || !o.disks.is_empty()) {
        return Err(
            "--guest virtio-console needs --console or --console-socket, and no --disk".into(),
        );
    }
    if o.restore.is_some() && (o.guest.is_some() || o.kernel.is_some()) {
        return Err("--restore starts from its snapshot: no --guest or --kernel".into());
    }
    if o.migrate_to.is_some() && o.snapshot.is_some() {
        return Err("--migrate-to and --snapshot both answer SIGUSR1: give one".into());
    }
    if o.migrate_from.is_some()
        && (o.guest.is_some()
            || o.kernel.is_some()
            || o.restore.is_some()
            || o.migrate_to.is_some())
    {
        return Err(
            "--migrate-from runs what arrives: no --guest, --kernel, --restore or --migrate-to"
                .into(),
        );
    }
    let migrating = o.migrate_to.is_some() || o.migrate_from.is_some();
    let keys = o.migrate_key.is_some() || o.migrate_peer.is_some();
    if migrating != (o.migrate_secret.is_some() || keys) {
        return Err(
            "--migrate-to and --migrate-from need --migrate-secret-file or --migrate-key with --migrate-peer (and they need one of them)"
                .into(),
        );
    }
    if keys && (o.migrate_secret.is_some() || o.migrate_key.is_none() || o.migrate_peer.is_none()) {
        return Err(
            "--migrate-key and --migrate-peer go together, instead of --migrate-secret-file".into(),
        );
    }
    if o.snapshot_key.is_some() && o.snapshot.is_none() && o.restore.is_none() {
        return Err("--snapshot-key needs --snapshot or --restore".into());
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

pub fn open(what: &str, path: &str) -> Result<File, Box<dyn Error>> {
    File::open(path).map_err(|e| format!("cannot open {what} {path}: {e}").into())
}

pub fn open_disks(o: &Options) -> Result<Vec<Disk>, Box<dyn Error>> {
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
