//! vhost-user on real KVM: vmcraft's frontend with vmcraft's own backend process
//! (`vmcraft-vhost-user-backend`, jailed and filtered) and with qemu-storage-daemon's
//! `vhost-user-blk` export, driven by the test guests; a backend killed in the middle
//! of the guest's I/O.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vmcraft::builder::MachineBuilder;
use vmcraft::config::{DeviceConfig, MachineConfig, VhostUserConfig};
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::machine::Machine;
use vmcraft::vcpu::VcpuConfig;
use vmcraft_guest_kit::Guest;

/// A directory of its own for a test's sockets, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("vmcraft-vu-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A backend process, killed if still running at the end.
struct BackendProcess {
    child: Child,
}

impl BackendProcess {
    /// Start `command` and wait (10 s at most) for it to listen on `socket`.
    fn start(mut command: Command, socket: &Path) -> BackendProcess {
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("{command:?} exited ({status}) before listening: {err}");
            }
            assert!(
                Instant::now() < deadline,
                "{command:?} never listened on {socket:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        BackendProcess { child }
    }

    /// vmcraft's backend serving `args` on `socket`, jailed and filtered.
    fn vmcraft(socket: &Path, args: &[&str]) -> BackendProcess {
        let mut command = Command::new(vhost_user_backend());
        command.arg("--socket").arg(socket).args(args);
        BackendProcess::start(command, socket)
    }

    /// Its exit, once the frontend has gone (10 s at most).
    fn wait(mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the backend did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A machine of `memory_mib` with `devices`, running `guest` with `param`.
fn start(devices: Vec<DeviceConfig>, guest: Guest, param: u64) -> (Machine, SharedBuffer) {
    require_kvm();
    // Every thread under its filter, as the example VMM runs them: the link thread
    // connecting to a restarted backend among them.
    sandboxed();
    let config = MachineConfig {
        memory_mib: 32,
        devices,
        ..MachineConfig::default()
    };
    assert!(config.memory_is_shared());
    let serial = SharedBuffer::new();
    let mut b = MachineBuilder::for_config(&config, Box::new(serial.clone())).unwrap();
    assert!(b.vm().ram().is_shared());
    b.configure(&config, config.open().unwrap()).unwrap();
    b.load(guest.image()).unwrap();
    let machine = b.start(&[VcpuConfig::at(guest.entry(0, param))]).unwrap();
    (machine, serial)
}

fn blk(socket: &Path) -> DeviceConfig {
    DeviceConfig::VhostUserBlk(VhostUserConfig {
        socket: socket.to_path_buf(),
        queues: None,
        queue_size: None,
    })
}

#[test]
fn the_blk_guest_drives_vmcrafts_own_backend_process() {
    let dir = Dir::new("blk");
    let socket = dir.0.join("blk.sock");
    let image = ScratchImage::new("vu-blk", 16 << 20);
    let backend =
        BackendProcess::vmcraft(&socket, &["blk", "--image", image.path().to_str().unwrap()]);
    // EVENT_IDX on: writes, reads back, flush, get-id, an out-of-range read.
    let (machine, serial) = start(vec![blk(&socket)], Guest::VIRTIO_BLK, 1);
    let outcome = machine.run_for(TIMEOUT).unwrap();
    let out = String::from_utf8_lossy(&serial.contents()).into_owned();
    assert_eq!(outcome.reason, vmcraft_guest_kit::exited(0), "{out}");
    assert!(out.contains("capacity 0x0000000000008000"), "{out}");
    assert!(out.contains("id vmcraft-vhost"), "{out}");
    // What the guest wrote is in the image the other process serves.
    assert!(image.contents()[0x1000..0x2000].iter().any(|&b| b != 0));
    // The frontend gone, the backend ends cleanly and its socket with it.
    let status = backend.wait();
    assert!(status.success(), "{status}");
    assert!(!socket.exists());
}

#[test]
fn the_rng_guest_drives_vmcrafts_own_backend_process() {
    let dir = Dir::new("rng");
    let socket = dir.0.join("rng.sock");
    let backend = BackendProcess::vmcraft(&socket, &["rng"]);
    let (machine, serial) = start(
        vec![DeviceConfig::VhostUserRng(VhostUserConfig {
            socket: socket.clone(),
            queues: None,
            queue_size: None,
        })],
        Guest::VIRTIO_RNG,
        0,
    );
    let outcome = machine.run_for(TIMEOUT).unwrap();
    let out = String::from_utf8_lossy(&serial.contents()).into_owned();
    assert_eq!(outcome.reason, vmcraft_guest_kit::exited(0), "{out}");
    assert!(out.contains("rng ok"), "{out}");
    assert!(backend.wait().success());
}

#[test]
fn the_console_guest_talks_through_vmcrafts_backend_process_as_a_generic_device() {
    use std::io::{Read, Write};
    let dir = Dir::new("console");
    let socket = dir.0.join("con.sock");
    let mut command = Command::new(vhost_user_backend());
    command
        .arg("--socket")
        .arg(&socket)
        .arg("console")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = command.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    assert!(
        eventually(10, || socket.exists()),
        "the backend never listened"
    );
    let backend = BackendProcess { child };
    // What the guest writes comes out on the backend's stdout.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    // virtio-console by the generic kind: its type, two queues, 12 bytes of
    // configuration from the backend.
    let (machine, serial) = start(
        vec![DeviceConfig::VhostUser(
            vmcraft::config::VhostUserGenericConfig {
                socket: socket.clone(),
                device_type: 3,
                queues: 2,
                queue_size: Some(64),
                config_size: 12,
            },
        )],
        Guest::VIRTIO_CONSOLE,
        0,
    );
    let mut out = Vec::new();
    let wait_for = |text: &str, out: &mut Vec<u8>| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !String::from_utf8_lossy(out).contains(text) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(bytes) => out.extend(bytes),
                Err(_) => panic!(
                    "no {text:?} from the guest: {:?}",
                    String::from_utf8_lossy(out)
                ),
            }
        }
    };
    wait_for("hello from virtio-console", &mut out);
    // The backend's stdin reaches the guest.
    stdin.write_all(b"ping\n").unwrap();
    wait_for("got: ping", &mut out);
    let outcome = machine.run_for(TIMEOUT).unwrap();
    assert_eq!(
        outcome.reason,
        vmcraft_guest_kit::exited(0),
        "{}",
        String::from_utf8_lossy(&serial.contents())
    );
    drop(stdin);
    assert!(backend.wait().success());
}

#[test]
fn a_backend_killed_mid_io_leaves_the_vm_running_with_the_device_needing_a_reset() {
    let dir = Dir::new("kill");
    let socket = dir.0.join("blk.sock");
    let image = ScratchImage::new("vu-kill", 16 << 20);
    let mut backend =
        BackendProcess::vmcraft(&socket, &["blk", "--image", image.path().to_str().unwrap()]);
    // Rounds of checked writes and reads, far more than the test waits for.
    let (machine, serial) = start(vec![blk(&socket)], Guest::BLKCHECK, 1 | 1_000_000 << 16);
    let transport = machine.virtio()[0].transport.clone();
    let interrupt = transport.lock().unwrap().interrupt().clone();
    // The guest is in the middle of its I/O.
    let text = || String::from_utf8_lossy(&serial.contents()).into_owned();
    assert!(
        eventually(20, || text().contains("round 0x0000000000000014 ok")),
        "the guest's rounds never got going: {}",
        text()
    );
    assert!(!interrupt.needs_reset());
    // The backend crashes: the jailed process itself (the child of the one started).
    let jailed = children(backend.child.id());
    assert_eq!(jailed.len(), 1, "the jail's child: {jailed:?}");
    // SAFETY: kill with a pid read from /proc and a signal number.
    assert_eq!(unsafe { libc::kill(jailed[0], libc::SIGKILL) }, 0);
    // The device waits for a backend to come back (RECONNECT_WINDOW), then gives up.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !interrupt.needs_reset(),
        "marked before its reconnect window"
    );
    let window = vmcraft::devices::virtio::vhost_user::RECONNECT_WINDOW.as_secs();
    assert!(
        eventually(window + 30, || interrupt.needs_reset()),
        "the device was not marked NEEDS_RESET"
    );
    // The jail's parent reports the kill and removes the socket.
    let status = backend.child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGKILL), "{status:?}");
    assert!(!socket.exists());
    // The VM ran on until stopped: nothing failed, the VMM did not hang.
    let started = Instant::now();
    let outcome = machine.run_for(Duration::from_secs(1)).unwrap();
    assert_eq!(outcome.reason, vmcraft::vcpu::exit::StopReason::Requested);
    assert!(started.elapsed() < Duration::from_secs(10));
    let _ = backend.child.kill();
    let _ = backend.child.wait().map(|s| s.signal());
}

#[test]
fn a_restarted_backend_takes_over_the_running_rings_and_the_guest_sees_nothing() {
    let dir = Dir::new("restart");
    let socket = dir.0.join("blk.sock");
    let image = ScratchImage::new("vu-restart", 16 << 20);
    let args = ["blk", "--image", image.path().to_str().unwrap()];
    let mut first = BackendProcess::vmcraft(&socket, &args);
    // Rounds of 16 page writes and the 16 reads that check them, byte for byte.
    // More rounds than any host finishes in the test's time: the guest is always in
    // the middle of them.
    let (machine, serial) = start(vec![blk(&socket)], Guest::BLKCHECK, 1 | 1_000_000 << 16);
    let interrupt = machine.virtio()[0]
        .transport
        .lock()
        .unwrap()
        .interrupt()
        .clone();
    let text = || String::from_utf8_lossy(&serial.contents()).into_owned();
    let rounds = || text().matches(" ok").count();
    assert!(eventually(20, || rounds() >= 20), "{}", text());
    // The backend crashes in the middle of the guest's rounds, and is started again on
    // the same socket and image.
    let jailed = children(first.child.id());
    assert_eq!(jailed.len(), 1, "the jail's child: {jailed:?}");
    // SAFETY: kill with a pid read from /proc and a signal number.
    assert_eq!(unsafe { libc::kill(jailed[0], libc::SIGKILL) }, 0);
    let status = first.child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGKILL), "{status:?}");
    let rounds_at_kill = rounds();
    let second = BackendProcess::vmcraft(&socket, &args);
    // 200 more rounds, each checked byte for byte by the guest (which stops the VM
    // with code 2 or 3 on a failed request or a block that did not read back): the
    // new backend did again what the old one had taken and not completed.
    assert!(
        eventually(60, || rounds() >= rounds_at_kill + 200),
        "the rounds did not go on after the restart: {}",
        &text()[text().len().saturating_sub(400)..]
    );
    // The VM ran on until stopped here, and the driver was never told to reset.
    let outcome = machine.run_for(Duration::from_millis(100)).unwrap();
    assert_eq!(
        outcome.reason,
        vmcraft::vcpu::exit::StopReason::Requested,
        "{}",
        &text()[text().len().saturating_sub(400)..]
    );
    assert!(!interrupt.needs_reset());
    assert!(second.wait().success());
}

#[test]
fn the_backend_refuses_what_it_cannot_serve_and_says_why() {
    let dir = Dir::new("refuse");
    let run = |args: &[&str]| {
        let out = Command::new(vhost_user_backend())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A socket path that exists is not taken over (nor removed).
    let taken = dir.0.join("taken.sock");
    std::fs::write(&taken, b"").unwrap();
    let (status, err) = run(&["--socket", taken.to_str().unwrap(), "rng"]);
    assert!(
        !status.success() && err.contains("exists"),
        "{status} {err}"
    );
    assert!(taken.exists());
    // An image that cannot be opened, named; no socket left behind.
    let socket = dir.0.join("blk.sock");
    let missing = dir.0.join("no-such.img");
    let (status, err) = run(&[
        "--socket",
        socket.to_str().unwrap(),
        "blk",
        "--image",
        missing.to_str().unwrap(),
    ]);
    assert!(
        !status.success() && err.contains("cannot open the image") && err.contains("no-such.img"),
        "{status} {err}"
    );
    assert!(!socket.exists());
    // Queues out of range, and a device it does not have.
    let (status, _) = run(&[
        "--socket",
        socket.to_str().unwrap(),
        "blk",
        "--image",
        "x",
        "--queues",
        "17",
    ]);
    assert!(!status.success());
    let (status, _) = run(&["--socket", socket.to_str().unwrap(), "gpu"]);
    assert!(!status.success());
    assert!(!socket.exists());
}

/// The children of process `pid`.
fn children(pid: u32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn the_blk_guest_drives_qemu_storage_daemons_vhost_user_blk_export() {
    let qsd = vmcraft_guest_kit::peers::find_in_path("qemu-storage-daemon")
        .expect("this test needs qemu-storage-daemon (Debian's qemu-utils; .ci/run installs it)");
    let dir = Dir::new("qsd");
    let socket = dir.0.join("qsd.sock");
    let image = ScratchImage::new("vu-qsd", 16 << 20);
    let mut command = Command::new(qsd);
    command
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            image.path().display()
        ))
        .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,addr.type=unix,addr.path={},node-name=disk0,writable=on,num-queues=1",
            socket.display()
        ));
    let _qsd = BackendProcess::start(command, &socket);
    let (machine, serial) = start(vec![blk(&socket)], Guest::VIRTIO_BLK, 1);
    let outcome = machine.run_for(TIMEOUT).unwrap();
    let out = String::from_utf8_lossy(&serial.contents()).into_owned();
    assert_eq!(outcome.reason, vmcraft_guest_kit::exited(0), "{out}");
    assert!(out.contains("capacity 0x0000000000008000"), "{out}");
    assert!(image.contents()[0x1000..0x2000].iter().any(|&b| b != 0));
}

#[test]
fn machines_with_vhost_user_devices_refuse_snapshots_and_name_the_device() {
    let dir = Dir::new("snap");
    let socket = dir.0.join("rng.sock");
    let _backend = BackendProcess::vmcraft(&socket, &["rng"]);
    let (machine, _serial) = start(
        vec![DeviceConfig::VhostUserRng(VhostUserConfig {
            socket: socket.clone(),
            queues: None,
            queue_size: None,
        })],
        Guest::VIRTIO_RNG,
        0,
    );
    let err = machine.snapshot(&dir.0.join("snap")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("devices[0] (vhost-user-rng)") && text.contains("vhost-user backend"),
        "{text}"
    );
    // Refused before anything was paused or written.
    assert!(!dir.0.join("snap").join("state").exists());
}
