//! What the VMM does while its VM runs: wait for it to stop, for the deadline, or
//! for a signal that asks for a snapshot or a migration.

use std::error::Error;
use std::fs::File;
use std::path::Path;
use std::time::Instant;

use vmcraft::machine::Machine;
use vmcraft::migration::{MigrationError, MigrationOptions, MigrationSession};

use crate::chain;
use crate::snapshot_signals::{self, Request};

/// Where SIGUSR1 and SIGUSR2 send the VM.
pub enum OnSignal<'a> {
    /// Nowhere: signals end the VMM as by default.
    Nothing,
    /// A snapshot into these files, signed with the key if there is one.
    Snapshot {
        dir: &'a Path,
        files: (File, File),
        key: Option<&'a [u8]>,
    },
    /// A migration through this session.
    Migrate {
        to: &'a str,
        session: Option<Box<MigrationSession<std::net::TcpStream>>>,
        options: MigrationOptions,
    },
}

/// Serve `machine` until it stops, `deadline` passes, or a signal ends it, answering
/// the API's requests (if it has one) as they come.
pub fn serve(
    machine: &Machine,
    mut on_signal: OnSignal<'_>,
    deadline: Option<Instant>,
    mut api: Option<&mut crate::api::RunningApi>,
) -> Result<(), Box<dyn Error>> {
    loop {
        if let Some(api) = api.as_deref_mut() {
            if api.answer(machine, &mut on_signal, deadline) == Served::Migrated {
                return Ok(());
            }
        }
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let step = left.map_or(snapshot_signals::POLL, |l| l.min(snapshot_signals::POLL));
        if machine.wait_stopped(Some(step)).is_some() || left.is_some_and(|l| l.is_zero()) {
            return Ok(());
        }
        let request = snapshot_signals::take();
        match &mut on_signal {
            OnSignal::Nothing => {}
            OnSignal::Migrate { session, .. } if request.is_none() => {
                if let Some(Err(e)) = session.as_mut().map(|s| s.keep_alive()) {
                    eprintln!(
                        "minimal-vmm: the migration session is lost, the VM runs on here: {e}{}",
                        chain(&e)
                    );
                    *session = None;
                }
            }
            OnSignal::Migrate { .. } => match migrate(machine, &mut on_signal, deadline, None) {
                Migrated::Left => return Ok(()),
                Migrated::Uncertain(e) => {
                    eprintln!(
                        "minimal-vmm: error: {e}\nminimal-vmm: the VM is paused: SIGUSR1 resumes it here, SIGUSR2 ends it"
                    );
                    if !wait_for_operator(machine, deadline) {
                        return Ok(());
                    }
                    eprintln!("minimal-vmm: resumed here, as the operator asked");
                }
                Migrated::Failed(e) => eprintln!("minimal-vmm: {e}: the VM runs on here"),
            },
            OnSignal::Snapshot { dir, files, key } => {
                let Some(request) = request else {
                    continue;
                };
                let report = machine.snapshot_into_signed(&mut files.0, &files.1, *key)?;
                eprintln!(
                    "minimal-vmm: snapshot written to {}: {} of {} pages of memory, {} bytes of state; paused {:.2} ms, {:.2} ms in all",
                    dir.display(),
                    report.memory.written,
                    report.memory.pages,
                    report.state_bytes,
                    report.pause.as_secs_f64() * 1e3,
                    report.total.as_secs_f64() * 1e3
                );
                match request {
                    Request::Continue => machine.resume(),
                    Request::Stop => return Ok(()),
                }
            }
        }
    }
}

/// Whether the API's requests let the VMM go on serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Go on.
    GoOn,
    /// The VM migrated away: the VMM ends.
    Migrated,
}

/// How a migration ended.
pub enum Migrated {
    /// The destination runs the VM: this VMM ends.
    Left,
    /// It failed and the VM runs on here.
    Failed(String),
    /// The hand-over's outcome is unknown: the VM is paused here.
    Uncertain(String),
}

/// Migrate `machine` over the session `on_signal` holds (a SIGUSR1, or the API's
/// `PUT /vmcraft/migrate/send` with its bandwidth limit in bytes per second).
pub fn migrate(
    machine: &Machine,
    on_signal: &mut OnSignal<'_>,
    deadline: Option<Instant>,
    max_bandwidth: Option<u64>,
) -> Migrated {
    let OnSignal::Migrate {
        to,
        session,
        options,
    } = on_signal
    else {
        return Migrated::Failed(
            "no migration session: start the VMM with --migrate-to and its secret or keys".into(),
        );
    };
    let Some(session) = session.take() else {
        return Migrated::Failed("the migration session is spent".into());
    };
    let options = MigrationOptions {
        deadline,
        max_bandwidth: max_bandwidth.or(options.max_bandwidth),
        ..*options
    };
    match machine.migrate_over(*session, options) {
        Ok(r) => {
            eprintln!(
                "minimal-vmm: migrated to {to}: {} rounds, {} pages ({} MiB sent), downtime {:.2} ms, {:.2} ms in all",
                r.rounds.len(),
                r.pages_sent(),
                r.bytes_sent >> 20,
                r.downtime.as_secs_f64() * 1e3,
                r.total.as_secs_f64() * 1e3
            );
            Migrated::Left
        }
        Err(e @ MigrationError::Uncertain(_)) => Migrated::Uncertain(format!("{e}{}", chain(&e))),
        Err(e) => Migrated::Failed(format!("the migration failed: {e}{}", chain(&e))),
    }
}

/// After a hand-over whose outcome is unknown, the VM stays paused until the operator
/// decides: SIGUSR1 resumes it (returns `true`), SIGUSR2 or the deadline ends it.
fn wait_for_operator(machine: &Machine, deadline: Option<Instant>) -> bool {
    loop {
        match snapshot_signals::take() {
            Some(Request::Continue) => {
                machine.resume();
                return true;
            }
            Some(Request::Stop) => return false,
            None if deadline.is_some_and(|d| Instant::now() >= d) => return false,
            None => std::thread::sleep(snapshot_signals::POLL),
        }
    }
}

/// The `state` and `memory` files of snapshot directory `dir`, created if missing.
pub fn snapshot_files(dir: &Path) -> Result<(File, File), Box<dyn Error>> {
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
    use vmcraft::snapshot::{MEMORY_FILE, STATE_FILE};
    Ok((file(STATE_FILE)?, file(MEMORY_FILE)?))
}
