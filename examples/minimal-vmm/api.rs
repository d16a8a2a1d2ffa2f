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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;

use vmcraft::api::http::Response;
use vmcraft::api::routes::ApiRequest;
use vmcraft::api::server::ApiServer;
use vmcraft::api::types::{
    ActionType, BalloonStats, FirecrackerVersion, InstanceActionInfo, InstanceInfo, VmState,
};
use vmcraft::api_config::PreBoot;
use vmcraft::config::{HostResources, MachineConfig};
use vmcraft::machine::Machine;

use crate::chain;

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

fn not_yet(what: &str) -> Response {
    Response::error(400, &format!("{what} is not supported by this VMM yet"))
}

fn applied<E: std::fmt::Display>(r: Result<(), E>) -> Response {
    match r {
        Ok(()) => Response::no_content(),
        Err(e) => Response::error(400, &e.to_string()),
    }
}

/// A pre-boot request.
fn preboot(pre: &mut PreBoot, id: &str, request: ApiRequest) -> Response {
    use ApiRequest as R;
    match request {
        R::GetInstanceInfo => info(id, "Not started"),
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
        R::PutVsock(_) => not_yet("vsock"),
        R::PutLogger(_) => {
            not_yet("a log file (the log goes to stderr, VMCRAFT_LOG sets its level)")
        }
        R::PutMetrics(_) => not_yet("a metrics file"),
        R::PutSnapshotLoad(_) => not_yet("loading a snapshot through the API (--restore DIR does)"),
        R::PatchDrive(_)
        | R::PatchNetworkInterface(_)
        | R::PatchBalloon(_)
        | R::PatchBalloonStats(_)
        | R::GetBalloonStats
        | R::PatchVm(_)
        | R::PutSnapshotCreate(_)
        | R::PutAction(_) => Response::error(400, "the microVM is not started yet"),
    }
}

/// Serve `server` on this thread until an `InstanceStart` whose configuration is
/// valid and whose files open; returns them.
pub fn until_start(
    server: &mut ApiServer,
    id: &str,
    pre: &mut PreBoot,
) -> Result<(MachineConfig, HostResources), Box<dyn Error>> {
    let started: RefCell<Option<(MachineConfig, HostResources)>> = RefCell::new(None);
    eprintln!("minimal-vmm: API on {}", server.path().display());
    server.serve(
        |request| match request {
            ApiRequest::PutAction(InstanceActionInfo {
                action_type: ActionType::InstanceStart,
            }) => {
                let opened = pre
                    .machine_config()
                    .map_err(|e| format!("{e}{}", chain(&e)))
                    .and_then(|c| {
                        c.open()
                            .map(|r| (c, r))
                            .map_err(|e| format!("{e}{}", chain(&e)))
                    });
                match opened {
                    Ok(ready) => {
                        *started.borrow_mut() = Some(ready);
                        Response::no_content()
                    }
                    Err(e) => Response::error(400, &format!("cannot start the microVM: {e}")),
                }
            }
            other => preboot(pre, id, other),
        },
        || started.borrow().is_some(),
    )?;
    Ok(started.into_inner().expect("served until started"))
}

/// A request on its way from the API thread to the machine, and where the answer goes.
pub type Call = (ApiRequest, SyncSender<Response>);

/// The API served while the machine runs.
pub struct RunningApi {
    calls: Receiver<Call>,
    stop: Arc<AtomicBool>,
    thread: Option<vmcraft::sandbox::Thread<()>>,
    id: String,
    pre: PreBoot,
    paused: bool,
}

impl RunningApi {
    /// Serve `server` on a thread of its own (the API filter), handing requests to
    /// [`RunningApi::answer`].
    pub fn start(mut server: ApiServer, id: String, pre: PreBoot) -> Result<Self, Box<dyn Error>> {
        let (tx, calls) = mpsc::sync_channel::<Call>(1);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_thread = stop.clone();
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
            id,
            pre,
            paused: false,
        })
    }

    /// Answer every request waiting, against `machine`.
    pub fn answer(&mut self, machine: &Machine) {
        while let Ok((request, reply)) = self.calls.try_recv() {
            let _ = reply.send(self.handle(machine, request));
        }
    }

    fn handle(&mut self, machine: &Machine, request: ApiRequest) -> Response {
        use ApiRequest as R;
        match request {
            R::GetInstanceInfo => info(&self.id, if self.paused { "Paused" } else { "Running" }),
            R::PatchVm(vm) => {
                match vm.state {
                    VmState::Paused => machine.pause(),
                    VmState::Resumed => machine.resume(),
                }
                self.paused = vm.state == VmState::Paused;
                Response::no_content()
            }
            R::GetBalloon => match (machine.balloon(), &self.pre.balloon) {
                (Some(control), Some(b)) => {
                    let mut b = b.clone();
                    b.amount_mib = control.target() / 256;
                    Response::ok(&b)
                }
                _ => Response::error(400, "no balloon device is configured"),
            },
            R::PatchBalloon(update) => match machine.balloon() {
                Some(control) if u64::from(update.amount_mib) <= self.pre.machine.mem_size_mib => {
                    control.set_target(update.amount_mib.saturating_mul(256));
                    if let Some(b) = self.pre.balloon.as_mut() {
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
            }) => not_yet("a metrics file"),
            R::PutSnapshotCreate(_) => {
                not_yet("a snapshot through the API (--snapshot DIR and SIGUSR1 do)")
            }
            // Reads, and what is refused whenever it comes, answer as before the start.
            same @ (R::GetVersion
            | R::GetMachineConfig
            | R::GetVmConfig
            | R::PutVsock(_)
            | R::PutLogger(_)
            | R::PutMetrics(_)
            | R::PutSnapshotLoad(_)) => preboot(&mut self.pre, &self.id, same),
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
