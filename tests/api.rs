//! The example VMM driven as an orchestrator drives Firecracker: HTTP/1.1 requests on
//! its `--api-sock`, in firecracker-go-sdk's boot order, a kernel named by
//! `PUT /boot-source` and started by `InstanceStart`; and the same machine from a
//! Firecracker `--config-file`. The kernel is the tiny ELF (a newline on COM1, then a
//! reset through the i8042), so the run ends by itself.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).unwrap();
        assert_ne!(
            n,
            0,
            "the VMM closed the connection after {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(at) = text.find("\r\n\r\n") {
            let len: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= at + 4 + len {
                let status = text[9..12].parse().unwrap();
                return (status, text[at + 4..].to_string());
            }
        }
    }
}

fn connect(path: &Path, vmm: &mut Child) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            return s;
        }
        assert!(
            vmm.try_wait().unwrap().is_none(),
            "the VMM exited before serving its API"
        );
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
    let mut vmm = Command::new(minimal_vmm())
        .args(["--no-jail", "--id", "vm-7", "--api-sock"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
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
    assert_eq!(
        call(
            &mut api,
            "PUT",
            "/vsock",
            r#"{"guest_cid":3,"uds_path":"/tmp/v.sock"}"#
        )
        .0,
        400
    );
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
    let out = vmm.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.starts_with('\n'),
        "the guest's newline on COM1: {stdout:?}"
    );
    assert!(
        stdout.contains("minimal-vmm: VM stopped: guest reset"),
        "{stdout}"
    );
    assert!(!sock.exists(), "the API socket is removed with the VMM");
}

#[test]
fn a_firecracker_config_file_boots_without_an_api() {
    common::require_kvm();
    let dir = Scratch::new("config-file");
    let kernel = dir.0.join("vmlinux");
    std::fs::write(&kernel, vmcraft_guest_kit::ELF_RESET).unwrap();
    let config = dir.0.join("vm.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}},
                "machine-config": {{"vcpu_count": 2, "mem_size_mib": 64}},
                "drives": [], "network-interfaces": []}}"#,
            kernel.display()
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
    let mut vmm = Command::new(minimal_vmm())
        .args(["--no-jail", "--api-sock"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
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
    let out = vmm.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("\ncad"),
        "the guest saw the keys: {stdout:?}"
    );
    assert!(
        stdout.contains("minimal-vmm: VM stopped: guest reset"),
        "{stdout}"
    );
}
