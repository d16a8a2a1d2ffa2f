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
use std::os::unix::process::ExitStatusExt;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmcraft::builder::MachineBuilder;
use vmcraft::devices::debug_exit;
use vmcraft::devices::serial::SerialInput;
use vmcraft::devices::virtio::balloon::Balloon;
use vmcraft::devices::virtio::block::Block;
use vmcraft::devices::virtio::console::Console;
use vmcraft::devices::virtio::net::Net;
use vmcraft::devices::virtio::rng::Rng;
use vmcraft::devices::virtio::tap::Tap;
use vmcraft::migration::{
    IncomingOptions, MigrationAuth, MigrationError, MigrationOptions, MigrationSession, PublicKey,
    StaticKey,
};
use vmcraft::pv_machine::{PvDevices, PvUpcall};
use vmcraft::sandbox::jail::{CgroupLimits, Entered, Jail};
use vmcraft::snapshot::{open_snapshot_file, MEMORY_FILE, STATE_FILE};
use vmcraft::vcpu::{StopReason, VcpuConfig};
use vmcraft::xen_hvm::{XenDisk, XenHvm, XenServices};
use vmcraft_guest_kit::Guest;

mod cli;
mod diagnose;
mod report;
mod snapshot_signals;

use cli::{disk_read_only, open, open_disks, parse, ConsoleOption, Options, USAGE};

/// IRQ of the PV event-channel upcall.
const PV_UPCALL_IRQ: u32 = 11;

fn run(o: Options) -> Result<ExitCode, Box<dyn Error>> {
    if o.diagnose {
        return diagnose::diagnose();
    }
    if let Some(path) = &o.migrate_keygen {
        return keygen(path);
    }
    let started = Instant::now();
    // Every file comes from outside the jail, so everything is opened before it.
    let disks = open_disks(&o)?;
    let tap = o
        .net_tap
        .as_deref()
        .map(Tap::open)
        .transpose()
        .map_err(|e| format!("{e}{}", source_chain(&e)))?;
    // The console's socket is a host path too: listen and take the client now.
    // `None`: no console; `Some(None)`: stdio; `Some(Some(stream))`: the socket's client.
    let console_stream = match &o.console {
        None => None,
        Some(ConsoleOption::Stdio) => Some(None),
        Some(ConsoleOption::Socket(path)) => {
            let listener = std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| format!("cannot listen on console socket {path}: {e}"))?;
            eprintln!("minimal-vmm: waiting for a console client on {path}");
            let (stream, _) = listener
                .accept()
                .map_err(|e| format!("console socket {path}: {e}"))?;
            Some(Some(stream))
        }
    };
    let mut kernel = o.kernel.as_deref().map(|p| open("kernel", p)).transpose()?;
    // Migration: how the peers know each other, and the connection (made and
    // authenticated now, in the host's network: the jail has none, and the filters
    // allow no new sockets).
    let auth = migration_auth(&o)?;
    let migration_options = MigrationOptions {
        max_bandwidth: o.migrate_bandwidth,
        ..MigrationOptions::default()
    };
    let mut session = match (&o.migrate_to, &auth) {
        (Some(addr), Some(auth)) => {
            let stream = std::net::TcpStream::connect(addr)
                .map_err(|e| format!("cannot connect to the migration destination {addr}: {e}"))?;
            let _ = stream.set_nodelay(true);
            let session = MigrationSession::connect(stream, auth, &migration_options)
                .map_err(|e| format!("migration destination {addr}: {e}{}", source_chain(&e)))?;
            eprintln!("minimal-vmm: migration session with {addr} ready");
            Some(session)
        }
        _ => None,
    };
    let incoming_listener = o
        .migrate_from
        .as_deref()
        .map(|addr| -> Result<std::net::TcpListener, Box<dyn Error>> {
            let listener = std::net::TcpListener::bind(addr)
                .map_err(|e| format!("cannot listen for a migration on {addr}: {e}"))?;
            // The address bound (a port 0 becomes the one the system chose).
            let bound = listener.local_addr()?;
            eprintln!("minimal-vmm: waiting for a migration on {bound}");
            Ok(listener)
        })
        .transpose()?;
    // Snapshot files are host paths too: open (or create) them now.
    let mut snapshot_files = o.snapshot.as_deref().map(snapshot_files).transpose()?;
    if let (Some(from), Some(to)) = (&o.restore, &o.snapshot) {
        if same_file(
            &std::path::Path::new(from).join(MEMORY_FILE),
            &std::path::Path::new(to).join(MEMORY_FILE),
        ) {
            return Err(format!(
                "--snapshot {to} would write over the memory file of --restore {from}, which backs the restored guest: give another directory"
            )
            .into());
        }
    }
    let snapshot_key = o
        .snapshot_key
        .as_deref()
        .map(|path| read_key_file(path, "snapshot key"))
        .transpose()?;
    let restore_files = o
        .restore
        .as_deref()
        .map(|dir| -> Result<_, Box<dyn Error>> {
            let dir = std::path::Path::new(dir);
            let state = open_snapshot_file(&dir.join(STATE_FILE), "snapshot state file")?;
            let memory = open_snapshot_file(&dir.join(MEMORY_FILE), "snapshot memory file")?;
            Ok((state, memory))
        })
        .transpose()?;
    let mut initrd = o.initrd.as_deref().map(|p| open("initrd", p)).transpose()?;
    if let Some(dir) = &o.jail {
        // A fresh directory unless one was named; this process removes it afterwards.
        let fresh = dir.is_none();
        let root = match dir {
            Some(dir) => std::path::PathBuf::from(dir),
            None => std::env::temp_dir().join(format!("minimal-vmm-jail-{}", std::process::id())),
        };
        let entered = jail(&root, &o)?.enter().map_err(|e| {
            format!(
                "{e}{} (run as root or with user namespaces, or pass --no-jail)",
                source_chain(&e)
            )
        })?;
        if let Entered::Outside(status) = entered {
            // The jail removes its directory itself once inside; this is for a child
            // that failed before that.
            if fresh {
                match std::fs::remove_dir_all(&root) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        eprintln!("minimal-vmm: cannot remove the jail {root:?}: {e}")
                    }
                    _ => {}
                }
            }
            // The jailed VMM has run and reported; end as it did.
            return Ok(match (status.code(), status.signal()) {
                (Some(code), _) => ExitCode::from(code.clamp(0, 255) as u8),
                (None, Some(signal)) => ExitCode::from((128 + signal).min(255) as u8),
                _ => ExitCode::FAILURE,
            });
        }
    }
    // Snapshot requests are recorded from now on (a signal before would end the VMM).
    if o.snapshot.is_some() || o.migrate_to.is_some() {
        snapshot_signals::install()?;
    }
    // This process's own /proc (the jail's, if jailed), opened before the filters go
    // on: no thread opens a file after that.
    let status = std::fs::File::open("/proc/self/status")?;
    if let Some(on_violation) = o.seccomp {
        vmcraft::sandbox::enable(vmcraft::sandbox::Policy { on_violation })?;
    }
    let console = match console_stream {
        // A Xen guest's console is hvc_xen's ring (stdin goes to it).
        _ if o.xen => None,
        None => None,
        Some(None) => Some(Console::new(
            Box::new(std::io::stdout()),
            Some(Box::new(std::io::stdin())),
            "vcon",
        )),
        Some(Some(stream)) => {
            let output = stream.try_clone()?;
            Some(Console::new(
                Box::new(output),
                Some(Box::new(stream)),
                "vcon",
            ))
        }
    };
    let (mut b, origin) = match (restore_files, incoming_listener) {
        (Some((state, memory)), _) => {
            let (b, saved) = MachineBuilder::from_snapshot_files_signed(
                state,
                &memory,
                snapshot_key.as_deref(),
                Box::new(std::io::stdout()),
            )?;
            (b, Origin::Restore(saved))
        }
        (None, Some(listener)) => {
            let auth = auth
                .as_ref()
                .ok_or("--migrate-from needs a secret or keys")?;
            let options = IncomingOptions {
                tries: o.migrate_tries,
                ..IncomingOptions::new(o.mem)
            };
            let (b, incoming) =
                MachineBuilder::listen_for_migration(&listener, auth, &options, || {
                    Box::new(std::io::stdout())
                })?;
            (b, Origin::Migration(Box::new(incoming)))
        }
        (None, None) => (
            MachineBuilder::new(o.mem, Box::new(std::io::stdout()))?,
            Origin::Fresh,
        ),
    };
    // With --pv, event channels and the PV backends, which take the first disk.
    let mut disks = disks.into_iter();
    if o.pv {
        let disk = disks.next().ok_or("--pv needs a --disk")?;
        let pv = PvDevices {
            layout: vmcraft_guest_kit::PV_LAYOUT,
            disk: disk.into_file(),
            read_only: disk_read_only(&o, 0),
            console: Box::new(std::io::stdout()),
        };
        b.add_pv(pv, PvUpcall::Irq(PV_UPCALL_IRQ))?;
    } else {
        b.reserve_irq(PV_UPCALL_IRQ)?;
    }
    // With --xen the guest gets Xen's hypercalls instead of vmcraft's port, and the
    // disks as Xen vbds (xvda, xvdb, ...) served through the xenstore.
    let mut xen_services = None;
    let xen = if o.xen {
        let xen = XenHvm::install(&mut b, o.vcpus)
            .map_err(|e| format!("--xen: {e}{}", source_chain(&e)))?;
        eprintln!(
            "minimal-vmm: Xen {}.{} at CPUID {:#x}, domain {}",
            xen.cpuid.version.0, xen.cpuid.version.1, xen.cpuid.base, xen.cpuid.domid
        );
        // With --console, stdin goes to hvc0 (the PV console) instead of COM1.
        let xen_console_input = match o.console {
            Some(ConsoleOption::Stdio) => {
                use std::os::fd::AsFd;
                Some(std::fs::File::from(
                    std::io::stdin().as_fd().try_clone_to_owned()?,
                ))
            }
            _ => None,
        };
        let xen_disks = disks
            .by_ref()
            .enumerate()
            .map(|(i, disk)| XenDisk {
                file: disk.into_file(),
                read_only: disk_read_only(&o, i),
            })
            .collect();
        xen_services = Some(
            XenServices::start(
                &xen,
                b.memory().clone(),
                xen_disks,
                Box::new(std::io::stdout()),
                xen_console_input,
            )
            .map_err(|e| format!("--xen: {e}{}", source_chain(&e)))?,
        );
        Some(xen)
    } else {
        b.hypercall_table();
        None
    };

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
    let balloon = if o.balloon {
        let (balloon, control) = Balloon::new("vballoon")?;
        b.add_virtio(Box::new(balloon))?;
        Some(control)
    } else {
        None
    };
    if o.ksm {
        b.vm().ram().set_mergeable(true)?;
    }
    if let Some(tap) = tap {
        // A locally administered address.
        let mac = [0x02, 0x76, 0x6d, 0x63, 0, 1];
        b.add_virtio(Box::new(Net::new(Box::new(tap), mac, "vnet")))?;
    }

    let aps = (1..o.vcpus).map(|_| VcpuConfig::waiting_for_sipi());
    let vcpus: Vec<VcpuConfig> = match &o.kernel {
        // The vCPUs come from the snapshot or the migration.
        None if !matches!(origin, Origin::Fresh) => Vec::new(),
        None => {
            let guest = o.guest.unwrap_or(Guest::HELLO);
            b.load(guest.image())?;
            // The virtio-blk guest negotiates EVENT_IDX with parameter bit 0.
            let event_idx = u64::from(guest == Guest::VIRTIO_BLK);
            let bsp = VcpuConfig::at(guest.entry(0, o.guest_param | event_idx));
            std::iter::once(bsp).chain(aps).collect()
        }
        Some(path) => {
            let kernel = kernel.as_mut().ok_or("the kernel was opened")?;
            let cmdline = match &xen {
                Some(xen) => format!("{}{}", o.cmdline, xen.linux_cmdline()),
                None => o.cmdline.clone(),
            };
            let loaded = b
                .load_linux(kernel, initrd.as_mut(), &cmdline, o.vcpus)
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

    let machine = match origin {
        Origin::Restore(saved) => {
            let m = b.start_restored(&saved)?;
            eprintln!(
                "minimal-vmm: restored {} ({} vCPUs, {} MiB) in {:.2} ms",
                o.restore.as_deref().unwrap_or_default(),
                saved.info().vcpus,
                saved.info().ram_bytes >> 20,
                started.elapsed().as_secs_f64() * 1e3
            );
            m
        }
        Origin::Migration(incoming) => {
            let m = incoming.start(b)?;
            eprintln!("minimal-vmm: the migrated VM runs here");
            m
        }
        Origin::Fresh => b.start(&vcpus)?,
    };
    // The balancer on the balloon (opening the host's pressure file before the
    // filters go on).
    let balancing = match &balloon {
        Some(control) => {
            use vm_memory::GuestMemoryBackend;
            let ram = machine
                .running
                .vm()
                .memory()
                .iter()
                .map(vm_memory::GuestMemoryRegion::len)
                .sum();
            Some(start_balancer(control.clone(), ram)?)
        }
        None => None,
    };
    // Everything is set up: this thread only waits and reports from here on. Built
    // for coverage (cargo-llvm-cov sets `cfg(coverage)`), it stays unfiltered: the
    // profile is written from this thread at exit, which opens and creates files.
    if !cfg!(coverage) {
        vmcraft::sandbox::enter(vmcraft::sandbox::ThreadKind::Main)?;
    }
    let first_exit = started.elapsed();
    let deadline = o.timeout.map(|t| Instant::now() + t);
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let step = left.map_or(snapshot_signals::POLL, |l| l.min(snapshot_signals::POLL));
        if machine.running.wait_stopped(Some(step)).is_some() || left.is_some_and(|l| l.is_zero()) {
            break;
        }
        let Some(request) = snapshot_signals::take() else {
            if let Some(Err(e)) = session.as_mut().map(MigrationSession::keep_alive) {
                eprintln!(
                    "minimal-vmm: the migration session is lost, the VM runs on here: {e}{}",
                    source_chain(&e)
                );
                session = None;
            }
            continue;
        };
        if o.migrate_to.is_some() {
            let Some(session) = session.take() else {
                eprintln!("minimal-vmm: the migration session is spent: the VM runs on here");
                continue;
            };
            let options = MigrationOptions {
                deadline,
                ..migration_options
            };
            match machine.migrate_over(session, options) {
                Ok(r) => {
                    eprintln!(
                        "minimal-vmm: migrated to {}: {} rounds, {} pages ({} MiB sent), downtime {:.2} ms, {:.2} ms in all",
                        o.migrate_to.as_deref().unwrap_or_default(),
                        r.rounds.len(),
                        r.pages_sent(),
                        r.bytes_sent >> 20,
                        r.downtime.as_secs_f64() * 1e3,
                        r.total.as_secs_f64() * 1e3
                    );
                    break;
                }
                Err(e @ MigrationError::Uncertain(_)) => {
                    eprintln!(
                        "minimal-vmm: error: {e}{}\nminimal-vmm: the VM is paused: SIGUSR1 resumes it here, SIGUSR2 ends it",
                        source_chain(&e)
                    );
                    if !wait_for_operator(&machine, deadline) {
                        break;
                    }
                    eprintln!("minimal-vmm: resumed here, as the operator asked");
                }
                Err(e) => eprintln!(
                    "minimal-vmm: the migration failed, the VM runs on here: {e}{}",
                    source_chain(&e)
                ),
            }
            continue;
        }
        let (state, memory) = snapshot_files
            .as_mut()
            .ok_or("a snapshot without --snapshot")?;
        let report = machine.snapshot_into_signed(state, memory, snapshot_key.as_deref())?;
        eprintln!(
            "minimal-vmm: snapshot written to {}: {} of {} pages of memory, {} bytes of state; paused {:.2} ms, {:.2} ms in all",
            o.snapshot.as_deref().unwrap_or_default(),
            report.memory.written,
            report.memory.pages,
            report.state_bytes,
            report.pause.as_secs_f64() * 1e3,
            report.total.as_secs_f64() * 1e3
        );
        match request {
            snapshot_signals::Request::Continue => machine.resume(),
            snapshot_signals::Request::Stop => break,
        }
    }
    let xen_report = xen.as_ref().map(|xen| {
        let table = machine.hypercalls.as_deref();
        let count = |nr| table.map_or(0, |t| t.count(nr));
        format!(
            "minimal-vmm: xen: shared info at {:#x}, {} grant frames in use, vCPU 0 upcall vector {:#x}; hypercalls: xen_version {}, memory_op {}, hvm_op {}, event_channel_op {}, grant_table_op {}, vcpu_op {}, sched_op {}, unknown {}",
            xen.channels.shared_info().map_or(0, |a| a.0),
            xen.grants.frames_in_use(),
            xen.upcalls.vector(0),
            count(17),
            count(12),
            count(34),
            count(32),
            count(20),
            count(24),
            count(29),
            table.map_or(0, |t| t.unknown_calls()),
        )
    });
    let (running, buses) = (machine.running, machine.buses);
    drop(xen_services);
    let stats: Vec<_> = (0..running.vcpu_count())
        .map(|i| running.stats(i))
        .collect::<Result<_, _>>()?;
    let guest_resident = running.vm().ram().resident_bytes()?;
    let balloon_report = balloon.as_ref().map(|control| {
        format!(
            "minimal-vmm: balloon: target {} MiB, the guest holds {} MiB in it ({} MiB freed on the host; {} MiB of free pages reported), {} balancer steps, the last: {:?}",
            control.target() >> 8,
            control.actual() >> 8,
            control.inflated_pages() >> 8,
            control.reported_pages() >> 8,
            balancing.as_ref().map_or(0, |b| b.steps()),
            balancing.as_ref().and_then(|b| b.last_step()),
        )
    });
    drop(balancing);
    running.request_stop();
    let outcome = running.wait()?;

    report::print(&report::Report {
        outcome,
        started,
        first_exit,
        stats: &stats,
        guest_resident,
        buses: &buses,
        status: &status,
    })?;
    if let Some(line) = balloon_report {
        println!("{line}");
    }
    if let Some(line) = xen_report {
        println!("{line}");
    }
    Ok(match outcome.reason {
        StopReason::Device {
            device: debug_exit::NAME,
            code,
        } => ExitCode::from(code.min(255) as u8),
        StopReason::Reset | StopReason::PowerOff | StopReason::Requested => ExitCode::SUCCESS,
        // TripleFault, Crash, Halted, and whatever later versions add.
        _ => ExitCode::FAILURE,
    })
}

/// The jail the VM runs in (unless `--no-jail`): /dev/kvm inside, every file already open, no
/// capabilities, 1024 descriptors, guest RAM plus 4 GiB of address space, and when the
/// host has cgroup v2, a cgroup of its own with guest RAM plus 256 MiB of memory and
/// one CPU per vCPU.
fn jail(root: &std::path::Path, o: &Options) -> Result<Jail, Box<dyn Error>> {
    let mut jail = Jail::new(root)
        .bind("/dev/kvm", "/dev/kvm", true)
        .open_files(1024)
        .address_space(o.mem + (4 << 30))
        // A TAP opened above stays in the host's network; nothing else needs one.
        .new_network(true)
        // Snapshot requests, sent to the process outside.
        .forward_signals(&[libc::SIGUSR1, libc::SIGUSR2]);
    // Built for coverage (cargo-llvm-cov sets `cfg(coverage)`), the jailed VMM writes
    // its profile where the instrumentation says: that directory is bound in too.
    if cfg!(coverage) {
        if let Some(dir) = std::env::var_os("LLVM_PROFILE_FILE")
            .map(std::path::PathBuf::from)
            .and_then(|file| file.parent().map(|d| d.to_path_buf()))
        {
            jail = jail.bind(&dir, &dir, true);
        }
    }
    let hierarchy = std::path::Path::new("/sys/fs/cgroup");
    if hierarchy.join("cgroup.controllers").exists() {
        jail = jail.cgroup(CgroupLimits {
            path: hierarchy
                .join("vmcraft")
                .join(format!("minimal-vmm-{}", std::process::id())),
            cpu_max: Some((100_000 * u64::from(o.vcpus), 100_000)),
            memory_max: Some(o.mem + (256 << 20)),
        });
    } else {
        eprintln!("minimal-vmm: no cgroup v2 on this host: the jail sets no CPU or memory limit");
    }
    Ok(jail)
}

/// After a hand-over whose outcome is unknown, the VM stays paused until the operator
/// decides: SIGUSR1 resumes it (returns `true`), SIGUSR2 or the deadline ends it.
fn wait_for_operator(machine: &vmcraft::builder::Machine, deadline: Option<Instant>) -> bool {
    loop {
        match snapshot_signals::take() {
            Some(snapshot_signals::Request::Continue) => {
                machine.resume();
                return true;
            }
            Some(snapshot_signals::Request::Stop) => return false,
            None if deadline.is_some_and(|d| Instant::now() >= d) => return false,
            None => std::thread::sleep(snapshot_signals::POLL),
        }
    }
}

/// How the two ends of a migration know each other, from the files named.
fn migration_auth(o: &Options) -> Result<Option<MigrationAuth>, Box<dyn Error>> {
    if let Some(path) = &o.migrate_secret {
        let secret = read_key_file(path, "migration secret")?;
        return Ok(Some(
            MigrationAuth::shared_secret(secret).map_err(|e| format!("{path}: {e}"))?,
        ));
    }
    let (Some(key), Some(peer)) = (&o.migrate_key, &o.migrate_peer) else {
        return Ok(None);
    };
    let text = |path: &str, what: &str| -> Result<String, String> {
        String::from_utf8(read_key_file(path, what)?)
            .map_err(|_| format!("{what} {path} is not text"))
    };
    let local = StaticKey::from_file_text(&text(key, "migration key")?)
        .map_err(|e| format!("{key}: {e}"))?;
    let peers = text(peer, "migration peer keys")?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(PublicKey::from_hex)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{peer}: {e}"))?;
    Ok(Some(MigrationAuth::Keys { local, peers }))
}

/// The contents of a secret or key file: a regular file of at most 64 KiB (a device or
/// a FIFO named there is refused rather than read without end).
fn read_key_file(path: &str, what: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    const MAX: u64 = 64 << 10;
    let file = open_snapshot_file(std::path::Path::new(path), "key file")
        .map_err(|e| format!("cannot read {what} {path}: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {what} {path}: {e}"))?;
    if bytes.len() as u64 > MAX {
        return Err(format!("{what} {path} is larger than {MAX} bytes"));
    }
    Ok(bytes)
}

/// Write a new migration key pair to `path` (which must not exist), readable by its
/// owner only, and print its public key.
fn keygen(path: &str) -> Result<ExitCode, Box<dyn Error>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = StaticKey::generate()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create key file {path}: {e}"))?;
    file.write_all(key.to_file_text().as_bytes())?;
    println!("{}", key.public());
    Ok(ExitCode::SUCCESS)
}

/// Where the VM comes from.
enum Origin {
    /// Built here from a guest or a kernel.
    Fresh,
    /// A snapshot.
    Restore(vmcraft::snapshot::SavedMachine),
    /// A migration, whose state has arrived.
    Migration(Box<vmcraft::migration::IncomingMigration>),
}

/// Whether `a` and `b` name the same file (both exist, one device and inode).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The `state` and `memory` files of snapshot directory `dir`, created if missing.
fn snapshot_files(dir: &str) -> Result<(std::fs::File, std::fs::File), Box<dyn Error>> {
    let dir = std::path::Path::new(dir);
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create snapshot directory {}: {e}", dir.display()))?;
    let file = |name: &str| {
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("cannot open snapshot file {}: {e}", path.display()))
    };
    Ok((file(STATE_FILE)?, file(MEMORY_FILE)?))
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
/// used) go to stderr; with `VMCRAFT_LOG=info` (or `debug`, or `trace`) more of what
/// it does (the balancer's steps; with `trace`, every Xen hypercall).
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
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
        log::set_max_level(match std::env::var("VMCRAFT_LOG").as_deref() {
            Ok("info") => log::LevelFilter::Info,
            Ok("debug") => log::LevelFilter::Debug,
            Ok("trace") => log::LevelFilter::Trace,
            _ => log::LevelFilter::Warn,
        });
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

/// The memory balancer on this VM's balloon: a step a second, the whole RAM as the
/// host's budget (one VM), at least an eighth of it (and 16 MiB) kept.
fn start_balancer(
    control: Arc<vmcraft::devices::virtio::balloon::BalloonControl>,
    ram: u64,
) -> Result<vmcraft::balancing::Balancing, Box<dyn Error>> {
    use vmcraft::balancer::policy::{BalancerConfig, VmLimits};
    use vmcraft::balancing::{
        BalancedVm, Balancing, BalancingConfig, HostPressure, VirtioBalloonVm,
    };
    let pages = ram / 4096;
    let vm = Arc::new(VirtioBalloonVm::new(control, ram)) as Arc<dyn BalancedVm>;
    Ok(Balancing::start(
        BalancingConfig {
            policy: BalancerConfig::default(),
            period: Duration::from_secs(1),
            budget_pages: pages,
            pressure: HostPressure::Psi,
        },
        vec![(
            vm,
            VmLimits {
                floor: (pages / 8).max(4096).min(pages),
                ceiling: pages,
            },
        )],
    )?)
}
