//! `vmcraft-vhost-user-backend`: one of vmcraft's devices served to one vhost-user
//! frontend (QEMU's `vhost-user-blk-pci`, Cloud Hypervisor, vmcraft's own).
//!
//! ```text
//! vmcraft-vhost-user-backend --socket /run/disk.sock blk --image disk.img [--read-only] [--queues N]
//! vmcraft-vhost-user-backend --socket /run/rng.sock rng
//! vmcraft-vhost-user-backend --socket /run/con.sock console   # guest output on stdout, input from stdin
//! ```
//!
//! It binds the socket, opens what the device needs, enters its jail (a new mount,
//! PID and network namespace with nothing inside, unless `--no-jail`) and its seccomp
//! filter (`ThreadKind::VhostUserBackend`), then serves the first frontend that
//! connects until it goes away, and exits. The socket file is removed at the end
//! (by the waiting parent when jailed, also if the jailed backend was killed).

use std::error::Error;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vmcraft_devices::virtio::block::Disk;
use vmcraft_sandbox::jail::{Entered, Jail};
use vmcraft_sandbox::{Policy, ThreadKind, Violation};
use vmcraft_vhost_user_backend::devices::{BlockDevice, ConsoleDevice, RngDevice};
use vmcraft_vhost_user_backend::{Backend, ServedDevice};

#[derive(Debug, Parser)]
#[command(version, about = "vmcraft's virtio devices as vhost-user backends")]
struct Args {
    /// The Unix socket to listen on (created; it must not exist)
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    /// Run without the jail (mount, PID and network namespaces)
    #[arg(long)]
    no_jail: bool,

    /// The seccomp filter: kill (the process, on a call outside the allowlist), log
    /// (allow and have the kernel log it), off
    #[arg(long, value_enum, default_value = "kill")]
    seccomp: Seccomp,

    #[command(subcommand)]
    device: DeviceArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Seccomp {
    Kill,
    Log,
    Off,
}

#[derive(Debug, Subcommand)]
enum DeviceArgs {
    /// virtio-blk on a raw image
    Blk {
        /// The image (a file or a block device)
        #[arg(long, value_name = "PATH")]
        image: PathBuf,
        /// Serve it read-only
        #[arg(long)]
        read_only: bool,
        /// Request queues (1 to 16)
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
        queues: u16,
    },
    /// virtio-rng from the host's getrandom
    Rng,
    /// virtio-console with one port: the guest's output on stdout, its input from
    /// stdin
    Console,
}

/// A logger on stderr, level from `VMCRAFT_LOG` (default: info).
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "vmcraft-vhost-user-backend: {}: {}",
                record.level(),
                record.args()
            );
        }
    }
    fn flush(&self) {}
}

static LOG: StderrLog = StderrLog;

/// Set once this process has bound its socket (the file is then its to remove).
static BOUND: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Listen on `path`, which must not exist, and remember that the file is ours.
fn listen(path: &Path) -> Result<Listener, String> {
    let listener =
        Listener::new(path, false).map_err(|e| format!("cannot listen on {path:?}: {e}"))?;
    BOUND.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(listener)
}

/// The error and its sources, one per line.
fn chain(e: &dyn Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}

fn main() -> ExitCode {
    if log::set_logger(&LOG).is_ok() {
        log::set_max_level(match std::env::var("VMCRAFT_LOG").as_deref() {
            Ok("debug") => log::LevelFilter::Debug,
            Ok("trace") => log::LevelFilter::Trace,
            Ok("warn") => log::LevelFilter::Warn,
            Ok("error") => log::LevelFilter::Error,
            _ => log::LevelFilter::Info,
        });
    }
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmcraft-vhost-user-backend: {}", chain(e.as_ref()));
            if BOUND.load(std::sync::atomic::Ordering::SeqCst) {
                remove_socket(&args.socket);
            }
            ExitCode::FAILURE
        }
    }
}

fn remove_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            eprintln!("vmcraft-vhost-user-backend: cannot remove {path:?}: {e}")
        }
        _ => {}
    }
}

fn run(args: &Args) -> Result<ExitCode, Box<dyn Error>> {
    if args.socket.exists() {
        return Err(format!(
            "{:?} exists: remove it, or name another socket",
            args.socket
        )
        .into());
    }
    // Everything from outside is opened before the jail and the filter.
    let device: Box<dyn FnOnce() -> Result<(), Box<dyn Error>>> = match &args.device {
        DeviceArgs::Blk {
            image,
            read_only,
            queues,
        } => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(image)
                .map_err(|e| format!("cannot open the image {image:?}: {e}"))?;
            let disk = Disk::new(file, *read_only, "vmcraft-vhost")
                .map_err(|e| format!("the image {image:?}: {e}"))?;
            let device = BlockDevice::new(disk, *queues);
            let socket = args.socket.clone();
            let seccomp = args.seccomp;
            let mut listener = listen(&args.socket)?;
            Box::new(move || serve(device, &mut listener, &socket, seccomp))
        }
        DeviceArgs::Rng => {
            let socket = args.socket.clone();
            let seccomp = args.seccomp;
            let mut listener = listen(&args.socket)?;
            Box::new(move || serve(RngDevice::default(), &mut listener, &socket, seccomp))
        }
        DeviceArgs::Console => {
            use std::os::fd::AsFd;
            let socket = args.socket.clone();
            let seccomp = args.seccomp;
            let stdin = std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("cannot take stdin: {e}"))?;
            let device = ConsoleDevice::new(
                Box::new(std::io::stdout()),
                Some(std::fs::File::from(stdin)),
            )
            .map_err(|e| format!("the console's input: {e}"))?;
            let mut listener = listen(&args.socket)?;
            Box::new(move || serve(device, &mut listener, &socket, seccomp))
        }
    };
    if !args.no_jail {
        let root = std::env::temp_dir().join(format!(
            "vmcraft-vhost-user-backend-jail-{}",
            std::process::id()
        ));
        let mut jail = Jail::new(&root)
            .open_files(1024)
            .new_network(true)
            .forward_signals(&[libc::SIGTERM, libc::SIGINT]);
        // Built for coverage (cargo-llvm-cov sets `cfg(coverage)`), the jailed backend
        // writes its profile where the instrumentation says: that directory comes in.
        if cfg!(coverage) {
            if let Some(dir) = std::env::var_os("LLVM_PROFILE_FILE")
                .map(PathBuf::from)
                .and_then(|file| file.parent().map(Path::to_path_buf))
            {
                jail = jail.bind(&dir, &dir, true);
            }
        }
        let entered = jail.enter().map_err(|e| {
            format!(
                "{} (run as root or with user namespaces, or pass --no-jail)",
                chain(&e)
            )
        })?;
        if let Entered::Outside(status) = entered {
            // The jailed backend has ended (or was killed): its socket goes with it.
            remove_socket(&args.socket);
            let _ = std::fs::remove_dir_all(&root);
            return Ok(match (status.code(), status.signal()) {
                (Some(code), _) => ExitCode::from(code.clamp(0, 255) as u8),
                (None, Some(signal)) => ExitCode::from((128 + signal).min(255) as u8),
                _ => ExitCode::FAILURE,
            });
        }
    }
    device()?;
    Ok(ExitCode::SUCCESS)
}

/// Serve `device` to the first frontend that connects on `listener`, under the
/// filter, until the frontend goes away.
fn serve<D: ServedDevice>(
    device: D,
    listener: &mut Listener,
    socket: &Path,
    seccomp: Seccomp,
) -> Result<(), Box<dyn Error>> {
    let on_violation = match seccomp {
        // Built for coverage, the profile is written at exit, by the filtered threads:
        // the filter stays off (the example VMM's main thread does the same).
        _ if cfg!(coverage) => None,
        Seccomp::Kill => Some(Violation::KillProcess),
        Seccomp::Log => Some(Violation::Log),
        Seccomp::Off => None,
    };
    if let Some(on_violation) = on_violation {
        vmcraft_sandbox::enable(Policy {
            on_violation,
            create_beneath: None,
        })?;
        // Every thread started from now on (the daemon's) inherits it.
        vmcraft_sandbox::enter(ThreadKind::VhostUserBackend)?;
    }
    let backend = Arc::new(Backend::new(device)?);
    let mem = vm_memory::GuestMemoryAtomic::new(vm_memory::GuestMemoryMmap::new());
    let mut daemon =
        VhostUserDaemon::new("vmcraft-vhost-user-backend".into(), backend.clone(), mem)
            .map_err(|e| format!("cannot start the daemon: {e}"))?;
    // Every queue is served on the daemon's first (and only) vring thread.
    if let Some(handler) = daemon.get_epoll_handlers().first() {
        for (fd, events, id) in backend.listeners() {
            handler.register_listener(fd, events, id)?;
        }
    }
    log::info!(
        "{} listening on {}",
        backend.device().name(),
        socket.display()
    );
    daemon
        .start(listener)
        .map_err(|e| format!("cannot accept a frontend: {e}"))?;
    let result = daemon.wait();
    backend.request_exit();
    remove_socket(socket);
    use vhost::vhost_user::Error as Protocol;
    match result {
        // The frontend closed the connection: how a session ends.
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            Protocol::Disconnected | Protocol::PartialMessage,
        )) => {
            log::info!("the frontend has gone; exiting");
            Ok(())
        }
        Err(e) => Err(format!("serving the frontend: {e}").into()),
    }
}
