//! What the minimal VMM does on the host's side: its log, errors with their causes,
//! stdin for COM1, the memory balancer.

use std::error::Error;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmcraft::builder::MachineBuilder;
use vmcraft::devices::serial::SerialInput;

/// Warnings from the library go to stderr; with `VMCRAFT_LOG=info` (or `debug`, or
/// `trace`) more of what it does.
pub struct StderrLog;

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
