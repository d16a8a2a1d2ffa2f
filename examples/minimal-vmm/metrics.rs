//! The metrics file (`PUT /metrics`, `--metrics-path`): a JSON line of the VMM's
//! counters every [`PERIOD`], on `FlushMetrics`, and when the VMM ends, as
//! Firecracker writes its own (`vmcraft::api::metrics`).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use vmcraft::api::metrics::{DeviceMetrics, MetricsLine, VcpuMetrics};
use vmcraft::devices::virtio::DeviceCounters;
use vmcraft::machine::Machine;
use vmcraft::vcpu::stats::ExitKind;

/// How often a line is written while the VMM runs (Firecracker's period).
pub const PERIOD: Duration = Duration::from_secs(60);

/// An open metrics file or named pipe.
pub struct MetricsFile {
    file: File,
    path: PathBuf,
    /// Lines not written since the last that was.
    missed: u64,
    last: Instant,
}

impl MetricsFile {
    /// Open `path`, which must exist (a file, or a FIFO someone reads): appended to,
    /// never blocking the VMM.
    pub fn open(path: &Path) -> Result<Self, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            // Read too, so that opening a FIFO nobody reads yet does not fail.
            .read(true)
            .append(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(path)
            .map_err(|e| format!("cannot open the metrics file {}: {e}", path.display()))?;
        Ok(MetricsFile {
            file,
            path: path.to_owned(),
            missed: 0,
            last: Instant::now(),
        })
    }

    /// Whether a periodic line is due.
    pub fn due(&self) -> bool {
        self.last.elapsed() >= PERIOD
    }

    /// Write `line` (its `missed_lines` filled in here). A pipe that is full loses
    /// the line, counted in the next; the VMM never waits for a reader.
    pub fn write(&mut self, mut line: MetricsLine) -> Result<(), String> {
        self.last = Instant::now();
        line.missed_lines = self.missed;
        match self.file.write_all(line.to_json_line().as_bytes()) {
            Ok(()) => {
                self.missed = 0;
                Ok(())
            }
            Err(e) => {
                self.missed += 1;
                Err(format!(
                    "cannot write to the metrics file {}: {e}",
                    self.path.display()
                ))
            }
        }
    }
}

/// What `machine` (if it runs) has done: its vCPUs' exits and its devices' counters.
pub fn machine_line(machine: Option<&Machine>) -> MetricsLine {
    let utc_timestamp_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut line = MetricsLine {
        utc_timestamp_ms,
        ..MetricsLine::default()
    };
    let Some(machine) = machine else {
        return line;
    };
    let exits = machine.total_stats();
    line.vcpu = VcpuMetrics {
        exit_io_in: exits.count(ExitKind::PioRead),
        exit_io_out: exits.count(ExitKind::PioWrite),
        exit_mmio_read: exits.count(ExitKind::MmioRead),
        exit_mmio_write: exits.count(ExitKind::MmioWrite),
        exit_hlt: exits.count(ExitKind::Hlt),
        failures: u64::from(machine.failure().is_some()),
    };
    line.devices = machine
        .device_counters()
        .map(|(name, c)| {
            let m = DeviceMetrics {
                queue_event_count: DeviceCounters::get(&c.notifications),
                event_fails: DeviceCounters::get(&c.protocol_errors),
                completed_count: DeviceCounters::get(&c.chains),
                interrupt_count: DeviceCounters::get(&c.interrupts),
            };
            (name.to_string(), m)
        })
        .collect();
    line
}
