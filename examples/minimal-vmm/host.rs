//! What the minimal VMM does on the host's side: its log, errors with their causes,
//! stdin for COM1, the memory balancer.

use std::error::Error;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmcraft::builder::MachineBuilder;
use vmcraft::devices::serial::SerialInput;

/// The VMM's log: warnings from the library go to stderr (with `VMCRAFT_LOG=info`, or
/// `debug`, or `trace`, more of what it does), or, once `PUT /logger` or `--log-path`
/// named one, to a file or named pipe in Firecracker's form: `TIME [ID:THREAD]
/// message`, with the level and the origin when asked for.
pub struct VmmLog {
    file: Mutex<Option<LogFile>>,
}

struct LogFile {
    file: std::fs::File,
    show_level: bool,
    show_origin: bool,
    /// Lines a full pipe refused since the last written.
    missed: u64,
}

/// The one log of the process.
pub static LOG: VmmLog = VmmLog {
    file: Mutex::new(None),
};

/// The instance's id, as the log file's lines carry it (`--id`).
pub static LOG_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();

impl log::Log for VmmLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let Some(out) = file.as_mut() else {
            eprintln!("minimal-vmm: {}: {}", record.level(), record.args());
            return;
        };
        let thread = std::thread::current();
        let mut tag = format!(
            "{}:{}",
            LOG_ID.get().map_or("anonymous-instance", |s| s.as_str()),
            thread.name().unwrap_or("?")
        );
        if out.show_level {
            tag += &format!(":{}", record.level());
        }
        if out.show_origin {
            tag += &format!(
                ":{}:{}",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            );
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let missed = match out.missed {
            0 => String::new(),
            n => format!(" ({n} lines before were lost: the log was full)"),
        };
        let line = format!(
            "{}.{:09} [{tag}] {}{missed}\n",
            now.as_secs(),
            now.subsec_nanos(),
            record.args()
        );
        use std::io::Write;
        match out.file.write_all(line.as_bytes()) {
            Ok(()) => out.missed = 0,
            Err(_) => out.missed += 1,
        }
    }
    fn flush(&self) {}
}

/// The log level Firecracker's `level` names (`Error`, `Warning`, `Info`, `Debug`,
/// `Trace`, `Off`; any case).
pub fn parse_level(level: &str) -> Result<log::LevelFilter, String> {
    Ok(match level.to_ascii_lowercase().as_str() {
        "off" => log::LevelFilter::Off,
        "error" => log::LevelFilter::Error,
        "warning" | "warn" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        other => {
            return Err(format!(
                "level {other:?}: not one of Error, Warning, Info, Debug, Trace, Off"
            ))
        }
    })
}

/// `PUT /logger` (or the flags that say the same): the log goes to `log_path` (which
/// must exist: a file, appended to, or a FIFO someone reads; the VMM never waits for
/// it) at `level`.
pub fn log_to_file(logger: &vmcraft::api::types::Logger) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let level = logger.level.as_deref().map(parse_level).transpose()?;
    let mut current = LOG.file.lock().unwrap_or_else(|p| p.into_inner());
    if current.is_some() {
        return Err("the logger is configured already".into());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(&logger.log_path)
        .map_err(|e| format!("cannot open the log file {}: {e}", logger.log_path))?;
    *current = Some(LogFile {
        file,
        show_level: logger.show_level,
        show_origin: logger.show_log_origin,
        missed: 0,
    });
    if let Some(level) = level {
        log::set_max_level(level);
    }
    Ok(())
}

/// `: cause: cause ...` for every source of `e`.
pub fn chain(e: &dyn Error) -> String {
    let mut s = String::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

/// Whether `a` and `b` name the same file (both exist, one device and inode).
pub fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// A thread feeding stdin to COM1.
pub fn serial_input(b: &MachineBuilder) -> std::io::Result<()> {
    let input = SerialInput::new(b.legacy().serial.clone(), std::io::stdin());
    std::thread::Builder::new()
        .name("serial-input".into())
        .spawn(move || {
            let Ok(mut em) = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            else {
                return;
            };
            em.add_subscriber(Arc::new(Mutex::new(input)));
            while em.run().is_ok() {}
        })
        .map(drop)
}

/// The memory balancer on this VM's balloon: a step a second, the whole RAM as the
/// host's budget (one VM), at least an eighth of it (and 16 MiB) kept.
pub fn start_balancer(
    control: Arc<vmcraft::devices::virtio::balloon::BalloonControl>,
    ram: u64,
) -> Result<vmcraft::balancing::Balancing, Box<dyn Error>> {
    use vmcraft::balancer::policy::{BalancerConfig, VmLimits};
    use vmcraft::balancing::{
        BalancedVm, Balancing, BalancingConfig, HostPressure, VirtioBalloonVm,
    };
    let pages = ram / 4096;
    let vm = Arc::new(VirtioBalloonVm::new(control, ram)) as Arc<dyn BalancedVm>;
    let limits = VmLimits {
        floor: (pages / 8).max(4096).min(pages),
        ceiling: pages,
    };
    Ok(Balancing::start(
        BalancingConfig {
            policy: BalancerConfig::default(),
            period: Duration::from_secs(1),
            budget_pages: pages,
            pressure: HostPressure::Psi,
        },
        vec![(vm, limits)],
    )?)
}
