//! The minimal vmcraft VMM: parse, configure, build, run.
//!
//! With no arguments it runs the embedded demo guest, which greets through the
//! emulated 16550 (every byte trapped and emulated) and exits; then it prints the exit
//! statistics. With `--kernel` it boots Linux (bzImage or ELF vmlinux); with
//! `--config FILE` the machine comes from a JSON configuration; `--restore DIR` needs
//! nothing else.
//!
//! ```text
//! cargo run --release --example minimal-vmm
//! cargo run --release --example minimal-vmm -- --kernel /boot/vmlinuz --mem 512M --vcpus 2
//! ```

use std::error::Error;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use vmcraft::builder::MachineBuilder;
use vmcraft::config::{BootSource, MachineConfig};
use vmcraft::devices::debug_exit;
use vmcraft::migration::{IncomingOptions, MigrationOptions, MigrationSession};
use vmcraft::snapshot::{open_snapshot_file, SavedMachine, MEMORY_FILE, STATE_FILE};
use vmcraft::vcpu::{StopReason, VcpuConfig};

mod api;
mod cli;
mod diagnose;
mod host;
mod jail;
mod keys;
mod metrics;
mod report;
mod serve;
mod snapshot_signals;

use cli::Args;
use host::{chain, same_file};
use serve::OnSignal;

/// Where the VM comes from.
enum Origin {
    /// Built here from a guest or a kernel.
    Fresh,
    /// A snapshot's state, and its memory file; paused until resumed, or running.
    Restore(SavedMachine, std::fs::File, bool),
    /// A migration, waited for on this listener.
    Migration(std::net::TcpListener),
}

fn run(args: Args) -> Result<ExitCode, Box<dyn Error>> {
    if args.diagnose {
        return diagnose::diagnose();
    }
    if let Some(path) = &args.migrate_keygen {
        return keys::keygen(path);
    }
    let started = Instant::now();
    if args.seccomp_filter.is_some() {
        return Err("--seccomp-filter: a Firecracker filter file describes Firecracker's threads and cannot be used here; vmcraft's own allowlists apply (--seccomp kill|trap|log|off, --no-seccomp)".into());
    }
    if let Some(level) = &args.level {
        log::set_max_level(host::parse_level(level)?);
    }
    if let Some(path) = &args.log_path {
        host::log_to_file(&vmcraft::api::types::Logger {
            log_path: path.display().to_string(),
            level: args.level.clone(),
            show_level: args.show_level,
            show_log_origin: args.show_log_origin,
        })?;
    }
    let _ = host::LOG_ID.set(args.id.clone());
    let snapshot_key = (args.snapshot_key.as_deref())
        .map(|path| keys::read_key_file(path, "snapshot key"))
        .transpose()?;
    if args.snapshot_key.is_some()
        && args.snapshot.is_none()
        && args.restore.is_none()
        && args.api_sock.is_none()
    {
        return Err("--snapshot-key needs --snapshot, --restore or --api-sock".into());
    }
    // Firecracker's way: the machine from its configuration file, or from the API's
    // requests (served here until InstanceStart, which opens what they name).
    let auth = keys::migration_auth(&args)?;
    let mut api_server = None;
    let mut api_listener = None;
    let mut preopened = None;
    let mut instance = None;
    let mut api_loaded = None;
    let mut api_files = None;
    if args.api_sock.is_some() || args.config_file.is_some() {
        let mut metrics = (args.metrics_path.as_deref())
            .map(metrics::MetricsFile::open)
            .transpose()?;
        let mut pre = match &args.config_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("--config-file {}: {e}", path.display()))?;
                let full: vmcraft::api::types::FullVmConfiguration = serde_json::from_str(&text)
                    .map_err(|e| format!("--config-file {}: {e}", path.display()))?;
                if let Some(logger) = &full.logger {
                    host::log_to_file(logger)
                        .map_err(|e| format!("--config-file {}: {e}", path.display()))?;
                }
                if let Some(m) = &full.metrics {
                    if metrics.is_some() {
                        return Err(format!(
                            "--config-file {}: metrics, and --metrics-path too",
                            path.display()
                        )
                        .into());
                    }
                    metrics = Some(metrics::MetricsFile::open(std::path::Path::new(
                        &m.metrics_path,
                    ))?);
                }
                vmcraft::api_config::PreBoot::from_full(full)
                    .map_err(|e| format!("--config-file {}: {e}{}", path.display(), chain(&e)))?
            }
            None => vmcraft::api_config::PreBoot::default(),
        };
        // The API's machines are Firecracker's: virtio-mmio unless told otherwise.
        if let Some(t) = args.transport {
            pre.transport = t.into();
        }
        let mut inst = api::Instance {
            id: args.id.clone(),
            pre,
            counters: Default::default(),
            metrics,
            startup: Default::default(),
            machine: None,
        };
        if let Some(path) = &args.api_sock {
            let mut server = vmcraft::api::server::ApiServer::bind(path)
                .map_err(|e| format!("--api-sock {}: {e}", path.display()))?;
            inst.startup = vmcraft::api::metrics::StartupMetrics {
                process_startup_time_us: started.elapsed().as_micros() as u64,
                process_startup_time_cpu_us: vmcraft::devices::boot_timer::process_cpu_time()
                    .as_micros() as u64,
            };
            // Opened now, before the jail and the filters: the one directory the
            // running machine's requests may name files in.
            let dir = match (&args.api_dir, path.parent()) {
                (Some(dir), _) => dir.clone(),
                (None, Some(parent)) if !parent.as_os_str().is_empty() => parent.to_owned(),
                (None, _) => std::path::PathBuf::from("."),
            };
            api_files = Some(api::ApiDir::open(&dir, snapshot_key.clone())?);
            if args.config_file.is_none() {
                let can_receive = auth.is_some();
                match api::until_start(
                    &mut server,
                    &mut inst,
                    snapshot_key.as_deref(),
                    can_receive,
                )? {
                    api::Start::Boot(config, resources) => preopened = Some((config, resources)),
                    api::Start::Receive(config, resources, listener) => {
                        preopened = Some((config, resources));
                        api_listener = Some(listener);
                    }
                    api::Start::Load(loaded) => {
                        let loaded = *loaded;
                        inst.pre = vmcraft::api_config::PreBoot::from_loaded(&loaded.config);
                        preopened = Some((loaded.config, loaded.resources));
                        api_loaded = Some((loaded.saved, loaded.memory, !loaded.resume));
                    }
                }
            }
            api_server = Some(server);
        }
        instance = Some(inst);
    }
    // The machine: the options', a file's, or the snapshot's (with the options' host
    // resources, if any are named).
    let (origin, config) = match (&args.restore, api_loaded) {
        (_, Some((saved, memory, paused))) => {
            let config = preopened
                .as_ref()
                .expect("a load opens its machine")
                .0
                .clone();
            (Origin::Restore(saved, memory, paused), config)
        }
        (Some(dir), None) => {
            let state = open_snapshot_file(&dir.join(STATE_FILE), "snapshot state file")?;
            let memory = open_snapshot_file(&dir.join(MEMORY_FILE), "snapshot memory file")?;
            let saved = SavedMachine::read(state, snapshot_key.as_deref())?;
            let saved_config = saved.config()?.ok_or(
                "the snapshot does not say what machine it holds (taken before vmcraft's snapshots carried their configuration)",
            )?;
            let config = if args.names_devices() {
                saved_config.with_host_resources_of(&args.machine(Some(&saved_config))?)?
            } else {
                saved_config
            };
            if let Some(to) = &args.snapshot {
                if same_file(&dir.join(MEMORY_FILE), &to.join(MEMORY_FILE)) {
                    return Err(format!("--snapshot {} would write over the memory file of --restore {}, which backs the restored guest: give another directory", to.display(), dir.display()).into());
                }
            }
            (Origin::Restore(saved, memory, false), config)
        }
        (None, None) => match (&preopened, &instance) {
            (Some((config, _)), _) => (Origin::Fresh, config.clone()),
            (None, Some(inst)) => (
                Origin::Fresh,
                (inst.pre)
                    .machine_config()
                    .map_err(|e| format!("{e}{}", chain(&e)))?,
            ),
            (None, None) => (Origin::Fresh, args.machine(None)?),
        },
    };
    config.validate()?;
    if !args.no_jail {
        // The jailed VMM resolves paths inside the jail.
        if let Some(v) = vsock_of(&config).filter(|v| v.uds_path.is_relative()) {
            return Err(format!(
                "vsock uds_path {}: give an absolute path (the jailed VMM resolves it inside its jail), or pass --no-jail",
                v.uds_path.display()
            )
            .into());
        }
    }
    if args.print_config {
        println!("{}", config.to_json());
        return Ok(ExitCode::SUCCESS);
    }
    // Every file comes from outside the jail, so everything is opened before it:
    // the machine's resources, the migration's connection (made and authenticated
    // now, in the host's network), the snapshot files.
    let resources = match preopened {
        Some((_, resources)) => resources,
        None => config.open().map_err(|e| format!("{e}{}", chain(&e)))?,
    };
    let migrating = args.migrate_to.is_some() || args.migrate_from.is_some();
    if migrating != auth.is_some() && !(auth.is_some() && args.api_sock.is_some()) {
        return Err("--migrate-to and --migrate-from need --migrate-secret-file or --migrate-key with --migrate-peer (and they need one of them, or --api-sock)".into());
    }
    let migration_options = MigrationOptions {
        max_bandwidth: args.migrate_bandwidth,
        ..MigrationOptions::default()
    };
    let on_signal = match (&args.migrate_to, &auth, &args.snapshot) {
        (Some(to), Some(auth), _) => {
            let stream = std::net::TcpStream::connect(to)
                .map_err(|e| format!("cannot connect to the migration destination {to}: {e}"))?;
            let _ = stream.set_nodelay(true);
            let session = MigrationSession::connect(stream, auth, &migration_options)
                .map_err(|e| format!("migration destination {to}: {e}{}", chain(&e)))?;
            eprintln!("minimal-vmm: migration session with {to} ready");
            OnSignal::Migrate {
                to,
                session: Some(Box::new(session)),
                options: migration_options,
            }
        }
        (_, _, Some(dir)) => OnSignal::Snapshot {
            dir,
            files: serve::snapshot_files(dir)?,
            key: snapshot_key.as_deref(),
        },
        _ => OnSignal::Nothing,
    };
    let origin = match (&args.migrate_from, origin) {
        (None, _) if api_listener.is_some() => {
            let listener = api_listener.take().expect("checked");
            eprintln!(
                "minimal-vmm: waiting for a migration on {}",
                listener.local_addr()?
            );
            Origin::Migration(listener)
        }
        (Some(addr), _) => {
            let listener = std::net::TcpListener::bind(addr)
                .map_err(|e| format!("cannot listen for a migration on {addr}: {e}"))?;
            eprintln!(
                "minimal-vmm: waiting for a migration on {}",
                listener.local_addr()?
            );
            Origin::Migration(listener)
        }
        (None, origin) => origin,
    };
    if !args.no_jail {
        // A vsock's host side connects to sockets beside its own (`<uds_path>_<port>`)
        // and removes its own at the end: that directory is seen inside.
        let shared: Vec<&std::path::Path> = vsock_of(&config)
            .and_then(|v| v.uds_path.parent())
            .into_iter()
            .collect();
        if let Some(code) = jail::enter(
            args.jail.as_deref(),
            config.memory_bytes(),
            config.vcpus,
            &shared,
        )? {
            return Ok(code);
        }
    }
    // Snapshot requests are recorded from now on (a signal before would end the VMM).
    if !matches!(on_signal, OnSignal::Nothing) {
        snapshot_signals::install()?;
    }
    // This process's own /proc (the jail's, if jailed), opened before the filters go
    // on: no thread opens a file after that.
    let status = std::fs::File::open("/proc/self/status")?;
    if let Some(on_violation) = args.seccomp.violation().filter(|_| !args.no_seccomp) {
        vmcraft::sandbox::enable(vmcraft::sandbox::Policy {
            on_violation,
            create_beneath: api_files.as_ref().map(|s: &api::ApiDir| s.dir.as_raw_fd()),
        })?;
    }

    let serial = || Box::new(std::io::stdout());
    let started_paused = match &origin {
        Origin::Restore(_, _, paused) => Some(*paused),
        _ => None,
    };
    let boot_timer = args
        .boot_timer
        .then(|| std::sync::Arc::new(vmcraft::devices::boot_timer::BootTimer::new(started)));
    let add_boot_timer = |b: &mut MachineBuilder| -> Result<(), Box<dyn Error>> {
        if let Some(timer) = &boot_timer {
            use vmcraft::devices::boot_timer::ADDRESS;
            b.buses_mut()
                .register_mmio(ADDRESS, 0x1000, timer.clone())
                .map_err(|e| format!("--boot-timer: {e}"))?;
        }
        Ok(())
    };
    let machine = match origin {
        Origin::Fresh => {
            let mut b = MachineBuilder::for_config(&config, serial())?;
            b.configure(&config, resources)?;
            add_boot_timer(&mut b)?;
            let vcpus = boot(&mut b, &config, &args)?;
            b.start(&vcpus)?
        }
        Origin::Restore(saved, memory, paused) => {
            let mut b = MachineBuilder::from_saved(&saved, &memory, serial())?;
            b.configure(&config, resources)?;
            let m = match paused {
                true => b.start_restored_paused(&saved)?,
                false => b.start_restored(&saved)?,
            };
            eprintln!(
                "minimal-vmm: restored {}{} ({} vCPUs, {} MiB) in {:.2} ms",
                match &args.restore {
                    Some(dir) => dir.display().to_string(),
                    None => "the snapshot the API named".into(),
                },
                if paused { ", paused" } else { "" },
                saved.info().vcpus,
                saved.info().ram_bytes >> 20,
                started.elapsed().as_secs_f64() * 1e3
            );
            m
        }
        Origin::Migration(listener) => {
            let auth = auth
                .as_ref()
                .ok_or("--migrate-from needs a secret or keys")?;
            let options = IncomingOptions {
                tries: args.migrate_tries,
                config: Some(config.clone()),
                ..IncomingOptions::new(config.memory_bytes())
            };
            let (mut b, incoming) =
                MachineBuilder::listen_for_migration(&listener, auth, &options, || serial())?;
            b.configure(&config, resources)?;
            let m = incoming.start(b)?;
            eprintln!("minimal-vmm: the migrated VM runs here");
            m
        }
    };
    // The balancer on the balloon (opening the host's pressure file before the
    // filters go on).
    let balancing = (machine.balloon())
        .map(|control| host::start_balancer(control.clone(), config.memory_bytes()))
        .transpose()?
        .map(std::sync::Arc::new);
    // The API from here on served by its own thread, under its own filter (started
    // before this thread's filter goes on: a thread inherits its parent's).
    let mut running_api = instance
        .map(|inst| {
            api::RunningApi::start(
                api_server,
                inst,
                matches!(started_paused, Some(true)),
                api_files,
            )
        })
        .transpose()?;
    if let (Some(api), Some(b)) = (running_api.as_mut(), &balancing) {
        api.set_balancing(b.clone());
    }
    // Everything is set up: this thread only waits and reports from here on. Built
    // for coverage (cargo-llvm-cov sets `cfg(coverage)`), it stays unfiltered: the
    // profile is written from this thread at exit, which opens and creates files.
    if !cfg!(coverage) {
        vmcraft::sandbox::enter(vmcraft::sandbox::ThreadKind::Main)?;
    }
    let first_exit = started.elapsed();
    serve::serve(
        &machine,
        on_signal,
        args.timeout.map(|t| Instant::now() + t),
        running_api.as_mut(),
    )?;
    if let Some(api) = running_api.as_mut() {
        api.finish(&machine);
    }
    drop(running_api);
    let mut extra = report::extra_lines(&machine, balancing.as_deref());
    if let Some((wall, cpu)) = boot_timer.as_ref().and_then(|t| t.booted()) {
        extra.push(format!(
            "minimal-vmm: guest boot time {:.2} ms ({:.2} ms of CPU), by the boot timer",
            wall.as_secs_f64() * 1e3,
            cpu.as_secs_f64() * 1e3
        ));
    }
    drop(balancing);
    let outcome = report::finish(machine, started, first_exit, &status)?;
    extra.iter().for_each(|line| println!("{line}"));
    Ok(match outcome {
        StopReason::Device {
            device: debug_exit::NAME,
            code,
        } => ExitCode::from(code.min(255) as u8),
        StopReason::Reset | StopReason::PowerOff | StopReason::Requested => ExitCode::SUCCESS,
        // TripleFault, Crash, Halted, and whatever later versions add.
        _ => ExitCode::FAILURE,
    })
}

/// The machine's vsock, if it has one (a machine has at most one).
fn vsock_of(config: &MachineConfig) -> Option<&vmcraft::config::VsockConfig> {
    config.devices.iter().find_map(|d| match d {
        vmcraft::config::DeviceConfig::VirtioVsock(v) => Some(v),
        _ => None,
    })
}

/// Load what the configuration boots; returns the vCPUs to start.
fn boot(
    b: &mut MachineBuilder,
    config: &MachineConfig,
    args: &Args,
) -> Result<Vec<VcpuConfig>, Box<dyn Error>> {
    match &config.boot {
        Some(BootSource::Linux { kernel, .. }) => {
            let (loaded, vcpus) = b.load_configured_linux().map_err(|e| {
                format!("cannot load kernel {}: {e}{}", kernel.display(), chain(&e))
            })?;
            eprintln!(
                "minimal-vmm: loaded {} as {:?}, entry {:?}",
                kernel.display(),
                loaded.format,
                loaded.entry
            );
            // stdin feeds COM1, so the guest console is interactive (unless a
            // console has it).
            if !args.console {
                host::serial_input(b)?;
            }
            Ok(vcpus)
        }
        Some(BootSource::Embedded { name, param }) => {
            let (guest, param) = cli::embedded_guest(name, *param, config.memory_bytes())?;
            b.load(guest.image())?;
            let aps = (1..config.vcpus).map(|_| VcpuConfig::waiting_for_sipi());
            Ok(std::iter::once(VcpuConfig::at(guest.entry(0, param)))
                .chain(aps)
                .collect())
        }
        None => Err("the configuration boots nothing (give a \"boot\", or --restore)".into()),
    }
}

fn main() -> ExitCode {
    if log::set_logger(&host::LOG).is_ok() {
        log::set_max_level(match std::env::var("VMCRAFT_LOG").as_deref() {
            Ok("info") => log::LevelFilter::Info,
            Ok("debug") => log::LevelFilter::Debug,
            Ok("trace") => log::LevelFilter::Trace,
            _ => log::LevelFilter::Warn,
        });
    }
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("minimal-vmm: error: {e}{}", chain(&*e));
            ExitCode::FAILURE
        }
    }
}
