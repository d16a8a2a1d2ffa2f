//! The example VMM driven as an orchestrator drives Firecracker: HTTP/1.1 requests on
//! its `--api-sock`, in firecracker-go-sdk's boot order, a kernel named by
//! `PUT /boot-source` and started by `InstanceStart`; and the same machine from a
//! Firecracker `--config-file`. The kernel is the tiny ELF (a newline on COM1, then a
//! reset through the i8042), so the run ends by itself.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn minimal_vmm() -> PathBuf {
    common::example("minimal-vmm")
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("vmcraft-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Send one request, read one response: (status, body).
fn call(stream: &mut UnixStream, method: &str, path: &str, body: &str) -> (u16, String) {
    vmcraft::api::client::call(stream, method, path, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// A VMM under test, its output collected as it comes; killed if the test ends
/// first (a failed assertion must not leave a VMM running).
struct Vmm {
    child: Option<Child>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    /// The stdout pipe, for [`Vmm::drained_stdout`].
    stdout_pipe: std::fs::File,
}

fn set_nonblocking(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL and F_SETFL on a descriptor this process owns, no pointers.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

/// Append what `pipe` holds now to `into`; whether its writer may write more.
fn read_available(mut pipe: &std::fs::File, into: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => into.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

impl Vmm {
    /// The example with `args` and its API on `sock`, stdin closed.
    fn with_api(args: &[&str], sock: &Path) -> Vmm {
        let mut child = Command::new(minimal_vmm())
            .args(args)
            .arg("--api-sock")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Each pipe is read non-blocking, a reader holding the buffer's lock while it
        // reads: whoever holds the lock has every byte that was in the pipe when it
        // took it, so `drained` is exact however late the reader runs.
        let collect = |from: std::os::fd::OwnedFd, into: Arc<Mutex<Vec<u8>>>| {
            let from = std::fs::File::from(from);
            set_nonblocking(&from);
            std::thread::spawn(move || loop {
                let open = read_available(&from, &mut into.lock().unwrap());
                if !open {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            })
        };
        let (stdout, stderr) = (Arc::default(), Arc::default());
        let out = std::os::fd::OwnedFd::from(child.stdout.take().unwrap());
        let out_copy = out.try_clone().unwrap();
        let readers = vec![
            collect(out, Arc::clone(&stdout)),
            collect(
                std::os::fd::OwnedFd::from(child.stderr.take().unwrap()),
                Arc::clone(&stderr),
            ),
        ];
        Vmm {
            child: Some(child),
            stdout,
            stderr,
            readers,
            stdout_pipe: std::fs::File::from(out_copy),
        }
    }

    /// Everything it has written to stdout so far, the pipe drained.
    fn drained_stdout(&self) -> String {
        let mut out = self.stdout.lock().unwrap();
        read_available(&self.stdout_pipe, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn running(&mut self) -> bool {
        let child = self.child.as_mut().expect("not waited for yet");
        child.try_wait().unwrap().is_none()
    }

    /// What it wrote to stdout so far.
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// What it wrote to stderr so far.
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Wait for it to end: its status, stdout and stderr.
    fn finish(mut self) -> (ExitStatus, String, String) {
        let status = self.child.take().unwrap().wait().unwrap();
        for r in self.readers.drain(..) {
            r.join().unwrap();
        }
        let err = String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned();
        (status, self.stdout(), err)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn connect(path: &Path, vmm: &mut Vmm) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            return s;
        }
        assert!(vmm.running(), "the VMM exited before serving its API");
        assert!(
            Instant::now() < deadline,
            "no API socket at {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_orchestrator_boots_a_kernel_through_the_api() {
    common::require_kvm();
    let dir = Scratch::new("boot");
    let kernel = dir.0.join("vmlinux");
    std::fs::write(&kernel, vmcraft_guest_kit::ELF_RESET).unwrap();
    let sock = dir.0.join("api.sock");
    let mut vmm = Vmm::with_api(&["--no-jail", "--id", "vm-7"], &sock);
    let mut api = connect(&sock, &mut vmm);
    // firecracker-go-sdk's order: wait for the socket with GET /machine-config ...
    let (status, body) = call(&mut api, "GET", "/machine-config", "");
    assert_eq!(
        (status, body.as_str()),
        (
            200,
            r#"{"vcpu_count":1,"mem_size_mib":128,"smt":false,"track_dirty_pages":false}"#
        )
    );
    let (status, body) = call(&mut api, "GET", "/", "");
    assert_eq!(status, 200);
    assert!(
        body.contains(r#""id":"vm-7""#) && body.contains(r#""state":"Not started""#),
        "{body}"
    );
    // ... the machine, refused values say why ...
    let (status, body) = call(
        &mut api,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":64,"smt":true}"#,
    );
    assert_eq!(status, 400);
    assert!(
        body.contains("fault_message") && body.contains("smt"),
        "{body}"
    );
    assert_eq!(
        call(
            &mut api,
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":64}"#
        )
        .0,
        204
    );
    // ... InstanceStart before a boot source is refused, and the API goes on ...
    let (status, body) = call(
        &mut api,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
    );
    assert_eq!(status, 400);
    assert!(body.contains("no boot source"), "{body}");
    // ... a kernel that is not there: refused at InstanceStart with the path.
    let body = r#"{"kernel_image_path":"/nonexistent/vmlinux","boot_args":"console=ttyS0"}"#;
    assert_eq!(call(&mut api, "PUT", "/boot-source", body).0, 204);
    let (status, body) = call(
        &mut api,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
    );
    assert_eq!(status, 400);
    assert!(body.contains("/nonexistent/vmlinux"), "{body}");
    let body = format!(
        r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0"}}"#,
        kernel.display()
    );
    assert_eq!(call(&mut api, "PUT", "/boot-source", &body).0, 204);
    // A vsock: a reserved context id is refused by name; its socket is made at the
    // start and removed with the VMM.
    let (status, body) = call(
        &mut api,
        "PUT",
        "/vsock",
        r#"{"guest_cid":2,"uds_path":"/tmp/v.sock"}"#,
    );
    assert_eq!(status, 400);
    assert!(body.contains("guest_cid 2"), "{body}");
    let vsock = dir.0.join("v.sock");
    let body = format!(r#"{{"guest_cid":3,"uds_path":"{}"}}"#, vsock.display());
    assert_eq!(call(&mut api, "PUT", "/vsock", &body).0, 204);
    let (status, body) = call(&mut api, "GET", "/vm/config", "");
    assert_eq!(status, 200);
    assert!(body.contains(r#""vsock":{"guest_cid":3"#), "{body}");
    assert_eq!(call(&mut api, "GET", "/nowhere", "").0, 404);
    assert_eq!(
        call(
            &mut api,
            "PUT",
            "/actions",
            r#"{"action_type":"InstanceStart"}"#
        )
        .0,
        204
    );
    // The guest resets at once: the VMM ends by itself, the socket with it.
    let (status, stdout, stderr) = vmm.finish();
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.starts_with('\n'),
        "the guest's newline on COM1: {stdout:?}"
    );
    assert!(
        stdout.contains("minimal-vmm: VM stopped: guest reset"),
        "{stdout}"
    );
    assert!(!sock.exists(), "the API socket is removed with the VMM");
    assert!(
        !vsock.exists(),
        "the vsock's socket is removed with the VMM"
    );
}

#[test]
fn a_firecracker_config_file_boots_without_an_api() {
    common::require_kvm();
    let dir = Scratch::new("config-file");
    let kernel = dir.0.join("vmlinux");
    std::fs::write(&kernel, vmcraft_guest_kit::ELF_RESET).unwrap();
    let config = dir.0.join("vm.json");
    let metrics = dir.0.join("metrics.json");
    std::fs::write(&metrics, "").unwrap();
    std::fs::write(
        &config,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}},
                "machine-config": {{"vcpu_count": 2, "mem_size_mib": 64}},
                "metrics": {{"metrics_path": "{}"}},
                "drives": [], "network-interfaces": []}}"#,
            kernel.display(),
            metrics.display()
        ),
    )
    .unwrap();
    let out = Command::new(minimal_vmm())
        .args(["--no-jail", "--no-api", "--config-file"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("minimal-vmm: VM stopped: guest reset"),
        "{stdout}"
    );
    assert!(
        stdout.contains("exit statistics of vCPU 1"),
        "two vCPUs: {stdout}"
    );
    // Without an API, the metrics file still gets its line as the VMM ends.
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&metrics).unwrap().trim_end()).unwrap();
    assert!(line["vcpu"]["exit_io_out"].as_u64().unwrap() >= 1, "{line}");
    // A file with a field Firecracker does not have is refused, by name.
    std::fs::write(
        &config,
        r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "vcpus": 3}}"#,
    )
    .unwrap();
    let out = Command::new(minimal_vmm())
        .args(["--no-jail", "--config-file"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `vcpus`"));
}

/// `SendCtrlAltDel` presses the keys on the i8042 keyboard: the guest (an ELF kernel
/// that waits for them, as Linux's keyboard driver does with `reboot=k`) reads the
/// scancodes and resets the machine, which ends the VMM. Before the start, the action
/// is refused.
#[test]
fn send_ctrl_alt_del_reaches_the_guest_through_its_keyboard() {
    common::require_kvm();
    let dir = Scratch::new("cad");
    let kernel = dir.0.join("vmlinux");
    std::fs::write(&kernel, vmcraft_guest_kit::ELF_CTRL_ALT_DEL).unwrap();
    let sock = dir.0.join("api.sock");
    let mut vmm = Vmm::with_api(&["--no-jail"], &sock);
    let mut api = connect(&sock, &mut vmm);
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    let (status, body) = call(&mut api, "PUT", "/actions", cad);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not started"), "{body}");
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    );
    assert_eq!(call(&mut api, "PUT", "/boot-source", &boot).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", start).0, 204);
    let (status, body) = call(&mut api, "GET", "/", "");
    assert_eq!(status, 200);
    assert!(body.contains(r#""state":"Running""#), "{body}");
    assert_eq!(call(&mut api, "PUT", "/actions", cad).0, 204);
    let (status, stdout, stderr) = vmm.finish();
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("\ncad"),
        "the guest saw the keys: {stdout:?}"
    );
    assert!(
        stdout.contains("minimal-vmm: VM stopped: guest reset"),
        "{stdout}"
    );
}

/// The `tick N` lines complete in `out`, in order.
fn ticks(out: &str) -> Vec<u32> {
    out.lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter(|n| n.len() == 8)
        .filter_map(|n| u32::from_str_radix(n, 16).ok())
        .collect()
}

/// Wait until `vmm` has printed at least `n` ticks; returns them.
fn wait_for_ticks(vmm: &mut Vmm, n: usize) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = ticks(&vmm.stdout());
        if seen.len() >= n {
            return seen;
        }
        assert!(vmm.running(), "the VMM ended: {}", vmm.stdout());
        assert!(Instant::now() < deadline, "{} ticks: {seen:?}", seen.len());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Firecracker's snapshot cycle as its tooling drives it: pause, `PUT
/// /snapshot/create`, then in a new VMM `PUT /snapshot/load` and resume. The guest
/// counts in a register (the ticker): the loaded machine goes on from the count it was
/// saved at, and stays still until it is resumed. The requests the state forbids are
/// refused (a snapshot of a running machine, a file outside the VMM's directory, a
/// load after the start), and the first VMM resumes and ends cleanly too.
#[test]
fn a_snapshot_created_through_the_api_loads_in_a_new_vmm_and_goes_on() {
    common::require_kvm();
    let dir = Scratch::new("snapshot");
    let kernel = dir.0.join("vmlinux");
    std::fs::write(&kernel, vmcraft_guest_kit::ELF_TICKER).unwrap();
    // Jailed, as a VMM runs by default: its snapshot directory was opened before.
    let sock = dir.0.join("first.sock");
    let mut first = Vmm::with_api(&[], &sock);
    let mut api = connect(&sock, &mut first);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    );
    assert_eq!(call(&mut api, "PUT", "/boot-source", &boot).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", start).0, 204);
    wait_for_ticks(&mut first, 3);
    let state = dir.0.join("vm.state");
    let create = format!(
        r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "vm.mem"}}"#,
        state.display()
    );
    let (status, body) = call(&mut api, "PUT", "/snapshot/create", &create);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("must be paused"), "{body}");
    let pause = r#"{"state": "Paused"}"#;
    assert_eq!(call(&mut api, "PATCH", "/vm", pause).0, 204);
    let (status, body) = call(
        &mut api,
        "PUT",
        "/snapshot/create",
        r#"{"snapshot_path": "/etc/vm.state", "mem_file_path": "vm.mem"}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("outside"), "{body}");
    let (status, body) = call(&mut api, "PUT", "/snapshot/create", &create);
    assert_eq!(status, 204, "{body}");
    // Paused: every complete line it printed is in the pipe (a line it was in the
    // middle of comes out complete after the resume).
    let saved_at = *ticks(&first.drained_stdout()).last().unwrap();
    assert!(saved_at >= 3, "{saved_at}");
    assert!(std::fs::metadata(&state).unwrap().len() > 0);
    assert!(std::fs::metadata(dir.0.join("vm.mem")).unwrap().len() > 0);
    let load = r#"{"snapshot_path": "vm.state", "mem_backend": {"backend_type": "File", "backend_path": "vm.mem"}}"#;
    let (status, body) = call(&mut api, "PUT", "/snapshot/load", load);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("before the microVM starts"), "{body}");
    let resume = r#"{"state": "Resumed"}"#;
    assert_eq!(call(&mut api, "PATCH", "/vm", resume).0, 204);
    let go_on = saved_at as usize + 3;
    assert!(wait_for_ticks(&mut first, go_on).starts_with(&[1, 2, 3]));
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", cad).0, 204);
    let (status, stdout, stderr) = first.finish();
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("cad"), "{stdout}");

    // A new VMM loads it, paused until told.
    let sock = dir.0.join("second.sock");
    let mut second = Vmm::with_api(&["--no-jail"], &sock);
    let mut api = connect(&sock, &mut second);
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": false}}"#,
        state.display(),
        dir.0.join("vm.mem").display()
    );
    let (status, body) = call(&mut api, "PUT", "/snapshot/load", &load);
    assert_eq!(status, 204, "{body}");
    let (status, body) = call(&mut api, "GET", "/", "");
    assert_eq!(status, 200);
    assert!(body.contains(r#""state":"Paused""#), "{body}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(ticks(&second.stdout()), Vec::<u32>::new(), "paused");
    assert_eq!(call(&mut api, "PATCH", "/vm", resume).0, 204);
    let went_on = wait_for_ticks(&mut second, 3);
    assert!(
        went_on[0] == saved_at + 1 || went_on[0] == saved_at + 2,
        "saved at tick {saved_at}, the loaded machine went on at {went_on:?}"
    );
    assert!(went_on.windows(2).all(|w| w[1] == w[0] + 1), "{went_on:?}");
    assert_eq!(call(&mut api, "PUT", "/actions", cad).0, 204);
    let (status, stdout, stderr) = second.finish();
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("cad") && stdout.contains("minimal-vmm: VM stopped: guest reset"),
        "{stdout}"
    );
}

/// `PATCH /drives/{id}` as Kata uses it for hotplug: a placeholder drive put before
/// the start gets its real image after it. The image must be in the VMM's directory
/// (the socket's), the drive must exist, and before the start the request is refused;
/// `GET /vm/config` names the new image afterwards.
#[test]
fn a_drive_patched_after_the_start_names_its_new_image() {
    common::require_kvm();
    let dir = Scratch::new("patch");
    let kernel = dir.0.join("vmlinux");
    std::fs::write(&kernel, vmcraft_guest_kit::ELF_TICKER).unwrap();
    let placeholder = dir.0.join("placeholder.img");
    std::fs::write(&placeholder, [0u8; 512]).unwrap();
    let real = dir.0.join("real.img");
    std::fs::write(&real, vec![7u8; 1 << 20]).unwrap();
    let sock = dir.0.join("api.sock");
    let mut vmm = Vmm::with_api(&["--no-jail"], &sock);
    let mut api = connect(&sock, &mut vmm);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    );
    assert_eq!(call(&mut api, "PUT", "/boot-source", &boot).0, 204);
    let drive = format!(
        r#"{{"drive_id": "hot", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
        placeholder.display()
    );
    assert_eq!(call(&mut api, "PUT", "/drives/hot", &drive).0, 204);
    let patch = format!(
        r#"{{"drive_id": "hot", "path_on_host": "{}"}}"#,
        real.display()
    );
    let (status, body) = call(&mut api, "PATCH", "/drives/hot", &patch);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not started"), "{body}");
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", start).0, 204);
    wait_for_ticks(&mut vmm, 1);
    for (path, body, says) in [
        (
            "/drives/cold",
            r#"{"drive_id": "cold", "path_on_host": "real.img"}"#,
            "no such drive",
        ),
        (
            "/drives/hot",
            r#"{"drive_id": "hot", "path_on_host": "/etc/hostname"}"#,
            "outside",
        ),
        (
            "/drives/hot",
            r#"{"drive_id": "hot", "path_on_host": "missing.img"}"#,
            "cannot open",
        ),
        ("/drives/hot", r#"{"drive_id": "hot"}"#, "nothing to change"),
    ] {
        let (status, answer) = call(&mut api, "PATCH", path, body);
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer.contains(says), "{body}: {answer}");
    }
    let (status, body) = call(&mut api, "PATCH", "/drives/hot", &patch);
    assert_eq!(status, 204, "{body}");
    let (status, body) = call(&mut api, "GET", "/vm/config", "");
    assert_eq!(status, 200);
    assert!(
        body.contains(&format!(r#""path_on_host":"{}""#, real.display())),
        "{body}"
    );
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", cad).0, 204);
    let (status, stdout, stderr) = vmm.finish();
    assert!(status.success(), "{stdout}{stderr}");
}

/// `PUT /logger` and `PUT /metrics` before the start, as firecracker-go-sdk sends
/// them: the log file gets the VMM's log in Firecracker's form (the level shown), the
/// metrics file a JSON line on `FlushMetrics` and another as the VMM ends, with the
/// requests counted under Firecracker's names and the vCPUs' exits. Both are refused
/// once set, and after the start.
#[test]
fn the_log_and_the_metrics_go_to_the_files_the_api_names() {
    common::require_kvm();
    let dir = Scratch::new("metrics");
    let kernel = dir.0.join("vmlinux");
    std::fs::write(&kernel, vmcraft_guest_kit::ELF_TICKER).unwrap();
    let (log, metrics) = (dir.0.join("vmm.log"), dir.0.join("metrics.json"));
    std::fs::write(&log, "").unwrap();
    std::fs::write(&metrics, "").unwrap();
    let sock = dir.0.join("api.sock");
    let mut vmm = Vmm::with_api(&["--no-jail", "--id", "logged"], &sock);
    let mut api = connect(&sock, &mut vmm);
    let logger = format!(
        r#"{{"log_path": "{}", "level": "Info", "show_level": true, "show_log_origin": false}}"#,
        log.display()
    );
    assert_eq!(call(&mut api, "PUT", "/logger", &logger).0, 204);
    let (status, body) = call(&mut api, "PUT", "/logger", &logger);
    assert_eq!(status, 400, "{body}");
    let put_metrics = format!(r#"{{"metrics_path": "{}"}}"#, metrics.display());
    let (status, body) = call(
        &mut api,
        "PUT",
        "/metrics",
        r#"{"metrics_path": "/nonexistent/metrics"}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("/nonexistent/metrics"), "{body}");
    assert_eq!(call(&mut api, "PUT", "/metrics", &put_metrics).0, 204);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    );
    assert_eq!(call(&mut api, "PUT", "/boot-source", &boot).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", start).0, 204);
    wait_for_ticks(&mut vmm, 2);
    // A refused request is logged.
    let patch = r#"{"drive_id": "nope", "path_on_host": "x.img"}"#;
    assert_eq!(call(&mut api, "PATCH", "/drives/nope", patch).0, 400);
    let (status, body) = call(&mut api, "PUT", "/metrics", &put_metrics);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("before it starts"), "{body}");
    let flush = r#"{"action_type": "FlushMetrics"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", flush).0, 204);
    let lines = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(lines.lines().count(), 1, "{lines}");
    let line: serde_json::Value = serde_json::from_str(lines.trim_end()).unwrap();
    // InstanceStart; the flush counts itself after its line.
    assert_eq!(line["put_api_requests"]["actions_count"], 1, "{line}");
    assert_eq!(line["put_api_requests"]["metrics_fails"], 2, "{line}");
    assert_eq!(line["patch_api_requests"]["drive_fails"], 1, "{line}");
    assert!(
        line["vcpu"]["exit_io_in"].as_u64().unwrap() >= 256,
        "{line}"
    );
    assert!(
        line["vcpu"]["exit_io_out"].as_u64().unwrap() >= 28,
        "{line}"
    );
    assert!(
        line["api_server"]["process_startup_time_us"]
            .as_u64()
            .unwrap()
            > 0
    );
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", cad).0, 204);
    let (status, stdout, stderr) = vmm.finish();
    assert!(status.success(), "{stdout}{stderr}");
    let lines = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(lines.lines().count(), 2, "a last line at the end: {lines}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("[logged:main:ERROR] PATCH /drives/nope")),
        "{log}"
    );
}

/// vmcraft's own paths: the whole machine in vmcraft's configuration format (here the
/// embedded demo guest, which Firecracker's requests cannot describe), read back,
/// started; Firecracker's requests that describe the machine refused once it is put
/// whole, and the whole machine refused after them.
#[test]
fn a_machine_put_whole_in_vmcrafts_format_starts() {
    common::require_kvm();
    let dir = Scratch::new("vmcraft-machine");
    let sock = dir.0.join("api.sock");
    let mut vmm = Vmm::with_api(&["--no-jail"], &sock);
    let mut api = connect(&sock, &mut vmm);
    let machine = r#"{"memory_mib": 64, "vcpus": 1, "boot": {"kind": "embedded", "name": "hello", "param": 0}, "devices": []}"#;
    let (status, body) = call(
        &mut api,
        "PUT",
        "/vmcraft/machine",
        r#"{"memory_mib": 64, "vcpus": 0}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("vcpus"), "{body}");
    assert_eq!(call(&mut api, "PUT", "/vmcraft/machine", machine).0, 204);
    let (status, body) = call(&mut api, "GET", "/vmcraft/machine", "");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(r#""memory_mib":64"#) && body.contains("hello"),
        "{body}"
    );
    let (status, body) = call(
        &mut api,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 128}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("put whole"), "{body}");
    let (status, body) = call(&mut api, "PUT", "/vmcraft/migrate/send", "");
    assert_eq!(status, 400, "{body}");
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(call(&mut api, "PUT", "/actions", start).0, 204);
    let (status, stdout, stderr) = vmm.finish();
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("Hello from a vmcraft guest"), "{stdout}");

    // Firecracker's requests first: the whole machine is refused after them.
    let sock = dir.0.join("api2.sock");
    let mut vmm = Vmm::with_api(&["--no-jail"], &sock);
    let mut api = connect(&sock, &mut vmm);
    let fc = r#"{"vcpu_count": 1, "mem_size_mib": 64}"#;
    assert_eq!(call(&mut api, "PUT", "/machine-config", fc).0, 204);
    let (status, body) = call(&mut api, "PUT", "/vmcraft/machine", machine);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("described the machine already"), "{body}");
}

/// A migration through vmcraft's paths: the destination, started with the secret,
/// is told `PUT /vmcraft/migrate/receive` after the requests that describe its
/// machine; the source, started with `--migrate-to` and the same secret, boots
/// through the API and is told `PUT /vmcraft/migrate/send`: it answers 204 and ends,
/// and the ticker goes on counting on the destination from where it was.
#[test]
fn a_machine_migrates_through_vmcrafts_paths() {
    common::require_kvm();
    let dir = Scratch::new("migrate");
    let kernel = dir.0.join("vmlinux");
    std::fs::write(&kernel, vmcraft_guest_kit::ELF_TICKER).unwrap();
    let secret = dir.0.join("secret");
    std::fs::write(&secret, b"the secret of the API's migration test").unwrap();
    let secret_arg = secret.to_str().unwrap();
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    );
    let start = r#"{"action_type": "InstanceStart"}"#;

    let dest_sock = dir.0.join("dest.sock");
    let mut dest = Vmm::with_api(
        &["--no-jail", "--migrate-secret-file", secret_arg],
        &dest_sock,
    );
    let mut dest_api = connect(&dest_sock, &mut dest);
    assert_eq!(call(&mut dest_api, "PUT", "/boot-source", &boot).0, 204);
    let receive = r#"{"listen": "127.0.0.1:0"}"#;
    assert_eq!(
        call(&mut dest_api, "PUT", "/vmcraft/migrate/receive", receive).0,
        204
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        let err = dest.stderr();
        if let Some(at) = err.find("waiting for a migration on ") {
            let rest = &err[at + "waiting for a migration on ".len()..];
            if let Some(end) = rest.find('\n') {
                break rest[..end].to_string();
            }
        }
        assert!(dest.running() && Instant::now() < deadline, "{err}");
        std::thread::sleep(Duration::from_millis(10));
    };

    let src_sock = dir.0.join("src.sock");
    let mut src = Vmm::with_api(
        &[
            "--no-jail",
            "--migrate-secret-file",
            secret_arg,
            "--migrate-to",
            &addr,
        ],
        &src_sock,
    );
    let mut src_api = connect(&src_sock, &mut src);
    assert_eq!(call(&mut src_api, "PUT", "/boot-source", &boot).0, 204);
    assert_eq!(call(&mut src_api, "PUT", "/actions", start).0, 204);
    wait_for_ticks(&mut src, 3);
    let (status, body) = call(&mut src_api, "PUT", "/vmcraft/migrate/send", "{}");
    assert_eq!(status, 204, "{body}");
    let (status, stdout, stderr) = src.finish();
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("minimal-vmm: migrated to"), "{stderr}");
    let left_at = *ticks(&stdout).last().unwrap();
    let went_on = wait_for_ticks(&mut dest, 2);
    assert!(
        went_on[0] == left_at + 1 || went_on[0] == left_at + 2,
        "left at tick {left_at}, went on at {went_on:?}"
    );
    let (status, body) = call(&mut dest_api, "GET", "/", "");
    assert_eq!(status, 200);
    assert!(body.contains(r#""state":"Running""#), "{body}");
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    assert_eq!(call(&mut dest_api, "PUT", "/actions", cad).0, 204);
    let (status, stdout, stderr) = dest.finish();
    assert!(status.success(), "{stdout}{stderr}");
}

/// `GET /vmcraft/balancer`: with a balloon, the balancer that runs on it says what it
/// did; without one, a 400 that says why.
#[test]
fn the_balancer_answers_for_its_balloon() {
    common::require_kvm();
    let dir = Scratch::new("balancer");
    let kernel = dir.0.join("vmlinux");
    std::fs::write(&kernel, vmcraft_guest_kit::ELF_TICKER).unwrap();
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    );
    let start = r#"{"action_type": "InstanceStart"}"#;
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    for balloon in [true, false] {
        let sock = dir.0.join(format!("api-{balloon}.sock"));
        let mut vmm = Vmm::with_api(&["--no-jail"], &sock);
        let mut api = connect(&sock, &mut vmm);
        assert_eq!(call(&mut api, "PUT", "/boot-source", &boot).0, 204);
        if balloon {
            let b = r#"{"amount_mib": 0, "deflate_on_oom": true}"#;
            assert_eq!(call(&mut api, "PUT", "/balloon", b).0, 204);
        }
        let (status, _) = call(&mut api, "GET", "/vmcraft/balancer", "");
        assert_eq!(status, 400, "not started");
        assert_eq!(call(&mut api, "PUT", "/actions", start).0, 204);
        let (status, body) = call(&mut api, "GET", "/vmcraft/balancer", "");
        if balloon {
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(
                v["steps"].is_u64() && v["balloon_actual_pages"] == 0,
                "{body}"
            );
        } else {
            assert_eq!(status, 400, "{body}");
            assert!(body.contains("no balloon"), "{body}");
        }
        assert_eq!(call(&mut api, "PUT", "/actions", cad).0, 204);
        let (status, stdout, stderr) = vmm.finish();
        assert!(status.success(), "{stdout}{stderr}");
    }
}
