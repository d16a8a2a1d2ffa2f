//! `--api-sock` and `--config-file`: the VMM driven as Firecracker is, by an
//! orchestrator's requests (vmcraft_api).
//!
//! Before the machine starts, the main thread serves the socket itself: it is the
//! thread that may still open files, and the pre-boot requests name them. Each request
//! fills a `PreBoot`; `InstanceStart` makes it a configuration, opens everything it
//! names (an error there is the request's 400, and the API goes on) and answers 204.
//! From then on the socket is served by a thread of its own under the API filter (no
//! file opened, no ioctl), which passes each request to the main thread, where the
//! machine is, and the answer back.

use std::cell::RefCell;
use std::error::Error;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;

use vmcraft::api::http::Response;
use vmcraft::api::metrics::{ApiRequestCounters, StartupMetrics};
use vmcraft::api::routes::ApiRequest;
use vmcraft::api::server::ApiServer;
use vmcraft::api::types::{
    ActionType, BalancerStatus, BalloonStats, FirecrackerVersion, InstanceActionInfo, InstanceInfo,
    MigrateSend, PartialDrive, SnapshotCreateParams, SnapshotLoadParams, VmState,
};
use vmcraft::api_config::{snapshot_create_paths, PreBoot};
use vmcraft::config::{HostResources, MachineConfig};
use vmcraft::machine::Machine;
use vmcraft::sandbox::Beneath;
use vmcraft::snapshot::{open_snapshot_file, SavedMachine};

use crate::chain;
use crate::metrics::MetricsFile;
use crate::serve::{Migrated, OnSignal, Served};

/// The VMM's name and version, as `GET /` and `GET /version` say them.
const APP_NAME: &str = "vmcraft";
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn info(id: &str, state: &str) -> Response {
    Response::ok(&InstanceInfo {
        app_name: APP_NAME.into(),
        id: id.into(),
        state: state.into(),
        vmm_version: VERSION.into(),
    })
}

fn applied<E: std::fmt::Display>(r: Result<(), E>) -> Response {
    match r {
        Ok(()) => Response::no_content(),
        Err(e) => Response::error(400, &e.to_string()),
    }
}

/// What the API keeps over the VMM's life, before the start and after: the instance's
/// id, what the requests described, the requests counted, the metrics file.
pub struct Instance {
    /// `--id`.
    pub id: String,
    /// The machine the requests described (or the loaded one's view).
    pub pre: PreBoot,
    /// Requests answered.
    pub counters: ApiRequestCounters,
    /// The metrics file, once `PUT /metrics` (or `--metrics-path`) named one.
    pub metrics: Option<MetricsFile>,
    /// From the process's start to the API socket ready.
    pub startup: StartupMetrics,
    /// The whole machine in vmcraft's format (`PUT /vmcraft/machine`), instead of
    /// what Firecracker's requests describe.
    pub machine: Option<MachineConfig>,
}

impl Instance {
    /// The machine to start: vmcraft's if one was put whole, else the one
    /// Firecracker's requests describe.
    pub fn config(&self) -> Result<MachineConfig, String> {
        match &self.machine {
            Some(config) => Ok(config.clone()),
            None => self.pre.machine_config().map_err(|e| error_chain(&e)),
        }
    }

    /// Write a metrics line now (if there is a file), with `machine`'s figures if it
    /// runs. A line that cannot be written is logged and counted in the next.
    pub fn flush_metrics(&mut self, machine: Option<&Machine>) -> Result<(), String> {
        let Some(file) = self.metrics.as_mut() else {
            return Err("no metrics file is configured (PUT /metrics)".into());
        };
        let mut line = crate::metrics::machine_line(machine);
        line.api = self.counters.clone();
        line.api_server = self.startup;
        file.write(line).inspect_err(|e| log::warn!("{e}"))
    }

    /// Answer `request` with `dispatch` and count it.
    fn counted(
        &mut self,
        request: ApiRequest,
        dispatch: impl FnOnce(&mut Self, ApiRequest) -> Response,
    ) -> Response {
        let seen = request.clone();
        let response = dispatch(self, request);
        self.counters.record(&seen, response.status);
        response
    }
}

/// Whether `request` describes part of the machine Firecracker's way.
fn describes_machine(request: &ApiRequest) -> bool {
    use ApiRequest as R;
    matches!(
        request,
        R::PutMachineConfig(_)
            | R::PatchMachineConfig(_)
            | R::PutBootSource(_)
            | R::PutDrive(_)
            | R::PutNetworkInterface(_)
            | R::PutBalloon(_)
    )
}

/// A request before the start, and those answered the same way after it.
fn preboot(instance: &mut Instance, request: ApiRequest) -> Response {
    use ApiRequest as R;
    if instance.machine.is_some() && describes_machine(&request) {
        return Response::error(
            400,
            "the machine was put whole (PUT /vmcraft/machine): change it there",
        );
    }
    let pre = &mut instance.pre;
    match request {
        R::GetVmcraftMachine => match &instance.machine {
            Some(config) => Response::ok(config),
            None => match pre.machine_config() {
                Ok(config) => Response::ok(&config),
                Err(e) => Response::error(400, &error_chain(&e)),
            },
        },
        R::PutVmcraftMachine(_) if pre.is_configured() => Response::error(
            400,
            "Firecracker's requests have described the machine already: put it whole before any of them",
        ),
        R::PutVmcraftMachine(text) => {
            match MachineConfig::from_json(&text).and_then(|c| c.validate().map(|()| c)) {
                Ok(config) => {
                    instance.machine = Some(config);
                    Response::no_content()
                }
                Err(e) => Response::error(400, &error_chain(&e)),
            }
        }
        R::GetInstanceInfo => info(&instance.id, "Not started"),
        R::GetVersion => Response::ok(&FirecrackerVersion {
            firecracker_version: VERSION.into(),
        }),
        R::GetMachineConfig => Response::ok(&pre.machine),
        R::GetVmConfig => Response::ok(&pre.full()),
        R::PutMachineConfig(m) => applied(pre.put_machine_config(m)),
        R::PatchMachineConfig(m) => applied(pre.patch_machine_config(m)),
        R::PutBootSource(b) => applied(pre.put_boot_source(b)),
        R::PutDrive(d) => applied(pre.put_drive(d)),
        R::PutNetworkInterface(n) => applied(pre.put_network_interface(n)),
        R::PutBalloon(b) => applied(pre.put_balloon(b)),
        R::GetBalloon => match &pre.balloon {
            Some(b) => Response::ok(b),
            None => Response::error(400, "no balloon device is configured"),
        },
        R::PutVsock(v) => applied(pre.put_vsock(v)),
        R::PutLogger(logger) => match crate::host::log_to_file(&logger) {
            Ok(()) => Response::no_content(),
            Err(e) => Response::error(400, &e),
        },
        R::PutMetrics(_) if instance.metrics.is_some() => {
            Response::error(400, "the metrics file is configured already")
        }
        R::PutMetrics(m) => match MetricsFile::open(Path::new(&m.metrics_path)) {
            Ok(file) => {
                instance.metrics = Some(file);
                Response::no_content()
            }
            Err(e) => Response::error(400, &e),
        },
        R::PutSnapshotLoad(_) => Response::error(
            400,
            "loading a snapshot is only allowed before the microVM starts",
        ),
        R::PutMigrateReceive(_) => Response::error(
            400,
            "waiting for a migration is only possible before the microVM starts",
        ),
        R::GetBalancer
        | R::PutMigrateSend(_)
        | R::PatchDrive(_)
        | R::PatchNetworkInterface(_)
        | R::PatchBalloon(_)
        | R::PatchBalloonStats(_)
        | R::GetBalloonStats
        | R::PatchVm(_)
        | R::PutSnapshotCreate(_)
        | R::PutAction(_) => Response::error(400, "the microVM is not started yet"),
    }
}

/// How the API's machine begins.
pub enum Start {
    /// `InstanceStart`: the configuration the requests described, its files open.
    Boot(MachineConfig, HostResources),
    /// `PUT /snapshot/load`: a snapshot's machine, its files open.
    Load(Box<Loaded>),
    /// `PUT /vmcraft/migrate/receive`: the machine described, its files open, and
    /// where a migration of it is awaited.
    Receive(MachineConfig, HostResources, std::net::TcpListener),
}

/// A snapshot `PUT /snapshot/load` opened.
pub struct Loaded {
    /// Its state.
    pub saved: SavedMachine,
    /// Its memory file.
    pub memory: File,
    /// The machine it holds.
    pub config: MachineConfig,
    /// That machine's host resources, opened where the snapshot names them.
    pub resources: HostResources,
    /// Whether it runs at once (`resume_vm`) or waits paused for `PATCH /vm`.
    pub resume: bool,
}

fn error_chain(e: &dyn Error) -> String {
    format!("{e}{}", chain(e))
}

/// Open what `PUT /snapshot/load` names: the state (checked, and against `key` if
/// snapshots are signed), the machine it holds and that machine's files, the memory.
fn load(pre: &PreBoot, params: &SnapshotLoadParams, key: Option<&[u8]>) -> Result<Loaded, String> {
    let named = pre.snapshot_load(params).map_err(|e| e.to_string())?;
    let state =
        open_snapshot_file(&named.state, "snapshot state file").map_err(|e| error_chain(&e))?;
    let memory =
        open_snapshot_file(&named.memory, "snapshot memory file").map_err(|e| error_chain(&e))?;
    let saved = SavedMachine::read(state, key).map_err(|e| error_chain(&e))?;
    let config = saved
        .config()
        .map_err(|e| error_chain(&e))?
        .ok_or("the snapshot does not say what machine it holds")?;
    let resources = config.open().map_err(|e| error_chain(&e))?;
    Ok(Loaded {
        saved,
        memory,
        config,
        resources,
        resume: named.resume,
    })
}

/// Serve `server` on this thread until an `InstanceStart` whose configuration is
/// valid and whose files open, or a snapshot load whose files open; returns what
/// begins. `key` checks loaded snapshots (`--snapshot-key`).
pub fn until_start(
    server: &mut ApiServer,
    instance: &mut Instance,
    key: Option<&[u8]>,
    can_receive: bool,
) -> Result<Start, Box<dyn Error>> {
    let started: RefCell<Option<Start>> = RefCell::new(None);
    eprintln!("minimal-vmm: API on {}", server.path().display());
    server.serve(
        |request| {
            instance.counted(request, |instance, request| {
                let (response, start) = before_start(instance, request, key, can_receive);
                if start.is_some() {
                    *started.borrow_mut() = start;
                }
                response
            })
        },
        || started.borrow().is_some(),
    )?;
    Ok(started.into_inner().expect("served until started"))
}

/// `config`'s files opened (an error names what failed).
fn opened(config: Result<MachineConfig, String>) -> Result<(MachineConfig, HostResources), String> {
    config.and_then(|c| c.open().map(|r| (c, r)).map_err(|e| error_chain(&e)))
}

/// A request before the start, and how the machine begins if it says.
fn before_start(
    instance: &mut Instance,
    request: ApiRequest,
    key: Option<&[u8]>,
    can_receive: bool,
) -> (Response, Option<Start>) {
    let refused = |what: &str, e: String| (Response::error(400, &format!("{what}: {e}")), None);
    match request {
        ApiRequest::PutAction(InstanceActionInfo {
            action_type: ActionType::InstanceStart,
        }) => match opened(instance.config()) {
            Ok((config, resources)) => {
                (Response::no_content(), Some(Start::Boot(config, resources)))
            }
            Err(e) => refused("cannot start the microVM", e),
        },
        ApiRequest::PutSnapshotLoad(params) => match load(&instance.pre, &params, key) {
            Ok(loaded) => (Response::no_content(), Some(Start::Load(Box::new(loaded)))),
            Err(e) => refused("cannot load the snapshot", e),
        },
        ApiRequest::PutMigrateReceive(_) if !can_receive => refused(
            "cannot wait for a migration",
            "this VMM has no migration secret or keys: start it with --migrate-secret-file, or --migrate-key and --migrate-peer".into(),
        ),
        ApiRequest::PutMigrateReceive(receive) => {
            let ready = opened(instance.config()).and_then(|(c, r)| {
                std::net::TcpListener::bind(&receive.listen)
                    .map(|l| (c, r, l))
                    .map_err(|e| format!("cannot listen on {}: {e}", receive.listen))
            });
            match ready {
                Ok((config, resources, listener)) => (
                    Response::no_content(),
                    Some(Start::Receive(config, resources, listener)),
                ),
                Err(e) => refused("cannot wait for a migration", e),
            }
        }
        ApiRequest::PutAction(InstanceActionInfo {
            action_type: ActionType::FlushMetrics,
        }) => match instance.flush_metrics(None) {
            Ok(()) => (Response::no_content(), None),
            Err(e) => refused("FlushMetrics", e),
        },
        other => (preboot(instance, other), None),
    }
}

/// The one directory the main thread may still open files in once the machine runs
/// (opened before the jail and the filters: `--api-dir`, else the API socket's
/// directory): `PUT /snapshot/create` writes there, `PATCH /drives` opens there. And
/// the key that signs snapshots.
pub struct ApiDir {
    /// The directory as the requests name it.
    pub path: PathBuf,
    /// The directory, open.
    pub dir: File,
    /// `--snapshot-key`'s key.
    pub key: Option<Vec<u8>>,
}

impl ApiDir {
    /// Open `path`.
    pub fn open(path: &Path, key: Option<Vec<u8>>) -> Result<Self, Box<dyn Error>> {
        let path = std::fs::canonicalize(path)
            .map_err(|e| format!("the API's directory {}: {e}", path.display()))?;
        let dir = File::open(&path)
            .map_err(|e| format!("the API's directory {}: {e}", path.display()))?;
        Ok(ApiDir { path, dir, key })
    }

    /// `PUT /snapshot/create` on the paused `machine`.
    fn create(&self, machine: &Machine, params: &SnapshotCreateParams) -> Result<String, String> {
        let (state, memory) =
            snapshot_create_paths(&self.path, params).map_err(|e| e.to_string())?;
        let open = |relative: &Path| {
            vmcraft::sandbox::open_beneath(&self.dir, relative, Beneath::Create)
                .map_err(|e| format!("cannot create {}: {e}", self.path.join(relative).display()))
        };
        let (mut state_file, memory_file) = (open(&state)?, open(&memory)?);
        let report = machine
            .snapshot_into_signed(&mut state_file, &memory_file, self.key.as_deref())
            .map_err(|e| {
                format!(
                    "{} (the files at {} and {} are incomplete)",
                    error_chain(&e),
                    params.snapshot_path,
                    params.mem_file_path
                )
            })?;
        Ok(format!(
            "snapshot written to {} and {}: {} of {} pages of memory, {} bytes of state, in {:.2} ms",
            params.snapshot_path,
            params.mem_file_path,
            report.memory.written,
            report.memory.pages,
            report.state_bytes,
            report.total.as_secs_f64() * 1e3
        ))
    }

    /// `PATCH /drives/{id}` on the running `machine`: the drive served from the new
    /// image (opened here, read-only if the drive is); `pre` records it.
    fn patch_drive(
        &self,
        machine: &Machine,
        pre: &mut PreBoot,
        patch: &PartialDrive,
    ) -> Result<(), String> {
        let (device, relative) = pre
            .patch_drive(&self.path, patch)
            .map_err(|e| e.to_string())?;
        let read_only = pre
            .drives
            .iter()
            .any(|d| d.drive_id == patch.drive_id && d.is_read_only);
        let how = if read_only {
            Beneath::Read
        } else {
            Beneath::ReadWrite
        };
        let path = self.path.join(&relative);
        let file = vmcraft::sandbox::open_beneath(&self.dir, &relative, how)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        machine
            .replace_disk(device, &path, file)
            .map_err(|e| error_chain(&e))?;
        pre.drive_replaced(&patch.drive_id, &path);
        Ok(())
    }
}

/// A request on its way from the API thread to the machine, and where the answer goes.
pub type Call = (ApiRequest, SyncSender<Response>);

/// The API served while the machine runs.
pub struct RunningApi {
    calls: Receiver<Call>,
    stop: Arc<AtomicBool>,
    thread: Option<vmcraft::sandbox::Thread<()>>,
    instance: Instance,
    paused: bool,
    files: Option<ApiDir>,
    balancing: Option<std::sync::Arc<vmcraft::balancing::Balancing>>,
}

impl RunningApi {
    /// Serve `server` (if there is one) on a thread of its own (the API filter), handing requests to
    /// [`RunningApi::answer`]; the machine is `paused` (a snapshot loaded without
    /// `resume_vm`) or runs; the files its requests name are in `files`, if given.
    pub fn start(
        server: Option<ApiServer>,
        instance: Instance,
        paused: bool,
        files: Option<ApiDir>,
    ) -> Result<Self, Box<dyn Error>> {
        let (tx, calls) = mpsc::sync_channel::<Call>(1);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_thread = stop.clone();
        // Without a socket (--no-api) only the metrics are kept.
        let Some(mut server) = server else {
            return Ok(RunningApi {
                calls,
                stop,
                thread: None,
                instance,
                paused,
                files,
                balancing: None,
            });
        };
        let thread =
            vmcraft::sandbox::spawn(vmcraft::sandbox::ThreadKind::Api, "api", move || {
                let served = server.serve(
                    |request| {
                        let (reply, answer) = mpsc::sync_channel(1);
                        if tx.send((request, reply)).is_err() {
                            return Response::error(500, "the VMM is stopping");
                        }
                        answer
                            .recv()
                            .unwrap_or_else(|_| Response::error(500, "the VMM is stopping"))
                    },
                    || stop_thread.load(Ordering::SeqCst),
                );
                if let Err(e) = served {
                    log::error!("the API stopped serving: {e}");
                }
            })?;
        Ok(RunningApi {
            calls,
            stop,
            thread: Some(thread),
            instance,
            paused,
            files,
            balancing: None,
        })
    }

    /// Answer every request waiting, against `machine` (a migration goes over
    /// `on_signal`'s session); write the periodic metrics line when it is due.
    pub fn answer(
        &mut self,
        machine: &Machine,
        on_signal: &mut OnSignal<'_>,
        deadline: Option<std::time::Instant>,
    ) -> Served {
        while let Ok((request, reply)) = self.calls.try_recv() {
            let seen = request.clone();
            let (response, served) = match request {
                ApiRequest::PutMigrateSend(send) => {
                    self.migrate(machine, on_signal, deadline, &send)
                }
                other => (self.handle(machine, other), Served::GoOn),
            };
            self.instance.counters.record(&seen, response.status);
            let _ = reply.send(response);
            if served == Served::Migrated {
                return served;
            }
        }
        if self.instance.metrics.as_ref().is_some_and(|m| m.due()) {
            let _ = self.instance.flush_metrics(Some(machine));
        }
        Served::GoOn
    }

    /// `PUT /vmcraft/migrate/send`.
    fn migrate(
        &mut self,
        machine: &Machine,
        on_signal: &mut OnSignal<'_>,
        deadline: Option<std::time::Instant>,
        send: &MigrateSend,
    ) -> (Response, Served) {
        let limit = send.max_bandwidth_mib_s.map(|m| m.saturating_mul(1 << 20));
        match crate::serve::migrate(machine, on_signal, deadline, limit) {
            Migrated::Left => (Response::no_content(), Served::Migrated),
            Migrated::Failed(e) => (
                Response::error(400, &format!("{e}: the microVM runs on here")),
                Served::GoOn,
            ),
            Migrated::Uncertain(e) => {
                self.paused = true;
                (
                    Response::error(
                        400,
                        &format!(
                            "{e}: the microVM is paused here (PATCH /vm Resumed resumes it here)"
                        ),
                    ),
                    Served::GoOn,
                )
            }
        }
    }

    /// The balancer, for `GET /vmcraft/balancer`.
    pub fn set_balancing(&mut self, balancing: std::sync::Arc<vmcraft::balancing::Balancing>) {
        self.balancing = Some(balancing);
    }

    /// The last metrics line, as the VMM ends.
    pub fn finish(&mut self, machine: &Machine) {
        if self.instance.metrics.is_some() {
            let _ = self.instance.flush_metrics(Some(machine));
        }
    }

    fn handle(&mut self, machine: &Machine, request: ApiRequest) -> Response {
        use ApiRequest as R;
        match request {
            R::GetInstanceInfo => info(
                &self.instance.id,
                if self.paused { "Paused" } else { "Running" },
            ),
            R::PatchVm(vm) => {
                match vm.state {
                    VmState::Paused => machine.pause(),
                    VmState::Resumed => machine.resume(),
                }
                self.paused = vm.state == VmState::Paused;
                Response::no_content()
            }
            R::GetBalloon => match (machine.balloon(), &self.instance.pre.balloon) {
                (Some(control), Some(b)) => {
                    let mut b = b.clone();
                    b.amount_mib = control.target() / 256;
                    Response::ok(&b)
                }
                _ => Response::error(400, "no balloon device is configured"),
            },
            R::PatchBalloon(update) => match machine.balloon() {
                Some(control) if u64::from(update.amount_mib) <= self.instance.pre.machine.mem_size_mib => {
                    control.set_target(update.amount_mib.saturating_mul(256));
                    if let Some(b) = self.instance.pre.balloon.as_mut() {
                        b.amount_mib = update.amount_mib;
                    }
                    Response::no_content()
                }
                Some(_) => Response::error(400, "amount_mib is more than the machine's memory"),
                None => Response::error(400, "no balloon device is configured"),
            },
            R::GetBalloonStats => match machine.balloon() {
                Some(control) => {
                    let (target, actual) = (control.target(), control.actual());
                    let mut stats = BalloonStats {
                        target_pages: target,
                        actual_pages: actual,
                        target_mib: target / 256,
                        actual_mib: actual / 256,
                        ..BalloonStats::default()
                    };
                    // The guest's figures by their virtio tags (virtio 1.2 §5.5.6.3).
                    if let Some(s) = control.stats() {
                        stats.swap_in = s.get(0);
                        stats.swap_out = s.get(1);
                        stats.major_faults = s.get(2);
                        stats.minor_faults = s.get(3);
                        stats.free_memory = s.get(4);
                        stats.total_memory = s.get(5);
                        stats.available_memory = s.get(6);
                        stats.disk_caches = s.get(7);
                    }
                    Response::ok(&stats)
                }
                None => Response::error(400, "no balloon device is configured"),
            },
            R::PutAction(InstanceActionInfo {
                action_type: ActionType::InstanceStart,
            }) => Response::error(400, "the microVM is running already"),
            R::PutAction(InstanceActionInfo {
                action_type: ActionType::SendCtrlAltDel,
            }) => match machine.legacy().i8042.send_ctrl_alt_del() {
                Ok(()) => Response::no_content(),
                Err(e) => Response::error(400, &format!("SendCtrlAltDel: {e}")),
            },
            R::PutAction(InstanceActionInfo {
                action_type: ActionType::FlushMetrics,
            }) => match self.instance.flush_metrics(Some(machine)) {
                Ok(()) => Response::no_content(),
                Err(e) => Response::error(400, &e),
            },
            R::GetVmcraftMachine => match machine.config() {
                Some(config) => Response::ok(&config),
                None => Response::error(400, "the machine was not built from a configuration"),
            },
            R::GetBalancer => match (machine.balloon(), &self.balancing) {
                (Some(control), Some(b)) => {
                    let last = b.last_step();
                    Response::ok(&BalancerStatus {
                        steps: b.steps(),
                        pressure: last.as_ref().map(|s| s.pressure),
                        keep_pages: last.as_ref().and_then(|s| s.targets.first().copied()),
                        balloon_target_pages: control.target(),
                        balloon_actual_pages: control.actual(),
                    })
                }
                _ => Response::error(400, "no balancer runs: the machine has no balloon"),
            },
            R::PutSnapshotCreate(_) if !self.paused => Response::error(
                400,
                "create snapshot: the microVM must be paused first (PATCH /vm {\"state\": \"Paused\"})",
            ),
            R::PatchDrive(patch) => match &self.files {
                Some(dir) => match dir.patch_drive(machine, &mut self.instance.pre, &patch) {
                    Ok(()) => Response::no_content(),
                    Err(e) => {
                        log::error!("PATCH /drives/{}: {e}", patch.drive_id);
                        Response::error(400, &format!("drive {}: {e}", patch.drive_id))
                    }
                },
                None => Response::error(400, "this VMM opens no files once the microVM runs"),
            },
            R::PutSnapshotCreate(params) => match &self.files {
                Some(dir) => match dir.create(machine, &params) {
                    Ok(report) => {
                        eprintln!("minimal-vmm: {report}");
                        Response::no_content()
                    }
                    Err(e) => {
                        log::error!("PUT /snapshot/create: {e}");
                        Response::error(400, &format!("create snapshot: {e}"))
                    }
                },
                None => Response::error(400, "create snapshot: this VMM has no snapshot directory"),
            },
            // Reads, and what is refused whenever it comes, answer as before the start.
            same @ (R::GetVersion
            | R::GetMachineConfig
            | R::GetVmConfig
            | R::PutSnapshotLoad(_)) => preboot(&mut self.instance, same),
            _ => Response::error(
                400,
                "the microVM is running: this can only be set before it starts",
            ),
        }
    }
}

impl Drop for RunningApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
