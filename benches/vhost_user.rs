//! virtio-blk in the VMM against virtio-blk in another process (vhost-user), the same
//! 4 KiB requests from the same guest in the same run: requests per second, host CPU
//! per request in each process, VMM exits per request.
//!
//! ```text
//! cargo bench --bench vhost_user
//! cargo bench --bench vhost_user -- "batch 32"   # only the rows whose name contains it
//! ```
//!
//! The guest (`virtio_blk_bench`, CPL 3, EVENT_IDX) keeps `batch` requests in flight
//! and polls the used ring, on virtio-mmio. The disk is served three ways:
//! * in the VMM: vmcraft's virtio-blk on its I/O thread (host CPU: that thread, and the
//!   vCPU's time in the VMM handling exits);
//! * by `vmcraft-vhost-user-backend` (jailed, filtered), the same serving code in
//!   another process: host CPU is the backend's (every thread of the jailed process)
//!   and the vCPU's exit handling;
//! * by qemu-storage-daemon's vhost-user-blk export (QEMU's own block layer, its
//!   libvhost-user server), counted the same way: the reference of the field.
//!
//! In both vhost-user rows the notifications go from KVM to the backend (ioeventfd)
//! and the completions' interrupts from the backend to KVM (the queue's irqfd): no VMM
//! exit and no VMM thread sees either.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmcraft::builder::MachineBuilder;
use vmcraft::config::{DeviceConfig, MachineConfig, VhostUserConfig};
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::vcpu::VcpuConfig;
use vmcraft_guest_kit::Guest;

const DISK_BYTES: u64 = 16 << 20;

/// Where the disk is served.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    InProcess,
    VmcraftBackend,
    QemuStorageDaemon,
}

impl Server {
    fn label(self) -> &'static str {
        match self {
            Server::InProcess => "in the VMM",
            Server::VmcraftBackend => "vhost-user, vmcraft-vhost-user-backend",
            Server::QemuStorageDaemon => "vhost-user, qemu-storage-daemon",
        }
    }
}

struct Run {
    requests: u64,
    elapsed: Duration,
    /// The VMM's CPU for the disk: the device or call thread, and exit handling.
    vmm_cpu_ns: u64,
    /// The backend process's CPU (zero in the VMM's own row).
    backend_cpu_ns: u64,
    exits: u64,
}

/// The CPU time (ns) of the live threads of process `pid` and of its descendants,
/// from each thread's schedstat.
fn process_tree_cpu_ns(pid: u32) -> u64 {
    let mut total = 0;
    let mut pending = vec![pid];
    while let Some(p) = pending.pop() {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for task in tasks.flatten() {
                let sched =
                    std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
                total += sched
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                let children =
                    std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                pending.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    total
}

/// The backend binary, built as this benchmark was (release).
fn vmcraft_backend() -> PathBuf {
    let exe = std::env::current_exe().expect("this benchmark's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "vmcraft-vhost-user-backend",
        ])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .arg("--target-dir")
        .arg(profile_dir.parent().expect("target directory"))
        .status()
        .expect("cargo");
    assert!(
        status.success(),
        "building vmcraft-vhost-user-backend failed"
    );
    profile_dir.join("vmcraft-vhost-user-backend")
}

/// Start a backend on `socket` and wait until it listens.
fn start_backend(server: Server, image: &Path, socket: &Path, vmcraft: &Path) -> Child {
    let mut command = match server {
        Server::VmcraftBackend => {
            let mut c = Command::new(vmcraft);
            c.arg("--socket")
                .arg(socket)
                .args(["blk", "--image"])
                .arg(image);
            c
        }
        Server::QemuStorageDaemon => {
            let mut c = Command::new("qemu-storage-daemon");
            c.arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=f0,filename={},cache.direct=off",
                    image.display()
                ))
                .args(["--blockdev", "driver=raw,node-name=d0,file=f0"])
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e0,addr.type=unix,addr.path={},node-name=d0,writable=on,num-queues=1",
                    socket.display()
                ));
            c
        }
        Server::InProcess => unreachable!("no backend"),
    };
    command.stdout(Stdio::null()).stderr(Stdio::inherit());
    let mut child = command.spawn().unwrap_or_else(|e| {
        panic!("cannot start {command:?} (qemu-storage-daemon is Debian's qemu-utils): {e}")
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{command:?} exited ({status}) before listening");
        }
        assert!(Instant::now() < deadline, "{command:?} never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn guest_run(
    server: Server,
    image: &common::Image,
    write: bool,
    batch: u64,
    requests: u64,
    vmcraft: &Path,
) -> Run {
    let dir = std::env::temp_dir().join(format!("vmcraft-bench-vu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("socket directory");
    let socket = dir.join("blk.sock");
    let _ = std::fs::remove_file(&socket);
    let mut backend =
        (server != Server::InProcess).then(|| start_backend(server, &image.path, &socket, vmcraft));
    let serial = SharedBuffer::new();
    let device = match server {
        Server::InProcess => {
            DeviceConfig::VirtioBlock(vmcraft::config::DiskConfig::new(&image.path))
        }
        _ => DeviceConfig::VhostUserBlk(VhostUserConfig {
            socket: socket.clone(),
            queues: None,
            queue_size: None,
        }),
    };
    let config = MachineConfig {
        memory_mib: 16,
        devices: vec![device],
        ..MachineConfig::default()
    };
    let mut b = MachineBuilder::for_config(&config, Box::new(serial.clone())).expect("machine");
    b.configure(&config, config.open().expect("open the disk"))
        .expect("configure");
    let guest = Guest::VIRTIO_BLK_BENCH;
    b.load(guest.image()).expect("load");
    let param = 1 | (u64::from(write) << 1) | (batch << 8) | (requests << 16);
    let backend_before = backend.as_ref().map_or(0, |c| process_tree_cpu_ns(c.id()));
    let start = Instant::now();
    let running = b
        .start(&[VcpuConfig::at(guest.entry(0, param))])
        .expect("start");
    let outcome = running
        .wait_stopped(Some(Duration::from_secs(600)))
        .expect("the guest finishes");
    let elapsed = start.elapsed();
    // The in-process device's I/O thread, or the vhost-user device's link thread
    // (which only watches the backend's socket).
    let vmm_threads = match server {
        Server::InProcess => common::threads_cpu_ns("vblk0-"),
        _ => common::threads_cpu_ns("vu-blk"),
    };
    let backend_cpu_ns = backend
        .as_ref()
        .map_or(0, |c| process_tree_cpu_ns(c.id()) - backend_before);
    let stats = running.total_stats();
    running.stop();
    running.wait().expect("stop");
    let console = String::from_utf8_lossy(&serial.contents()).into_owned();
    assert_eq!(
        outcome.reason,
        vmcraft_guest_kit::exited(0),
        "guest failed: {console}"
    );
    if let Some(child) = backend.as_mut() {
        // vmcraft's backend ends with its frontend; qemu-storage-daemon serves on.
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    // Exits made by the serial line reporting the kicks are not I/O.
    let serial_exits = 23 * 2;
    Run {
        requests,
        elapsed,
        vmm_cpu_ns: vmm_threads + stats.total_nanos(),
        backend_cpu_ns,
        exits: stats.total().saturating_sub(serial_exits),
    }
}

fn row(name: &str, r: &Run, reference: Option<&Run>) {
    let n = r.requests as f64;
    let rate = n / r.elapsed.as_secs_f64();
    let cpu = (r.vmm_cpu_ns + r.backend_cpu_ns) as f64 / n / 1e3;
    let ratio = reference.map_or(String::new(), |f| {
        format!(
            "{:.2}x",
            rate / (f.requests as f64 / f.elapsed.as_secs_f64())
        )
    });
    println!(
        "{:<62} {:>11.0} {:>7} {:>10.2} {:>10.2} {:>10.2} {:>9.4}",
        name,
        rate,
        ratio,
        r.vmm_cpu_ns as f64 / n / 1e3,
        r.backend_cpu_ns as f64 / n / 1e3,
        cpu,
        r.exits as f64 / n,
    );
}

fn main() {
    common::require_kvm("vhost_user");
    let image = common::Image::new("vhost-user", DISK_BYTES);
    let vmcraft = vmcraft_backend();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    println!("virtio-blk in the VMM and over vhost-user, 4 KiB requests from a CPL-3 guest on virtio-mmio (EVENT_IDX); host: {cpu}");
    println!(
        "{:<62} {:>11} {:>7} {:>10} {:>10} {:>10} {:>9}",
        "", "requests/s", "ratio", "VMM µs/req", "backend µs", "total µs", "exits/req"
    );
    let only = common::row_filter();
    for write in [false, true] {
        let op = if write { "write" } else { "read" };
        for (batch, requests) in [(1u64, 20_000u64), (32, 100_000)] {
            let mut reference = None;
            for server in [
                Server::InProcess,
                Server::VmcraftBackend,
                Server::QemuStorageDaemon,
            ] {
                let name = format!("{op}, batch {batch}, {}", server.label());
                if !only(&name) {
                    continue;
                }
                let run = guest_run(server, &image, write, batch, requests, &vmcraft);
                row(&name, &run, reference.as_ref());
                if server == Server::InProcess {
                    reference = Some(run);
                }
            }
        }
    }
    println!("ratio: requests/s against the in-VMM row of the same operation and batch, same run");
}
