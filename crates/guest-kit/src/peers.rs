//! Other VMMs, run as references in the same benchmark run: QEMU and Firecracker.
//!
//! Each is found on the `PATH` or named by an environment variable
//! ([`QEMU_ENV`], [`FIRECRACKER_ENV`]). A reference that is missing or fails to start
//! is reported as such, with its exit status and stderr ([`PeerError`]), never
//! measured as if it had run.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};

use thiserror::Error;

/// Names the QEMU binary to use instead of `qemu-system-x86_64` on the `PATH`.
pub const QEMU_ENV: &str = "VMCRAFT_QEMU";
/// Names the Firecracker binary to use instead of `firecracker` on the `PATH`.
pub const FIRECRACKER_ENV: &str = "VMCRAFT_FIRECRACKER";

/// QEMU's `-cpu` model for the KVM references. With plain `host`, QEMU writes
/// IA32_ARCH_CAPABILITIES (MSR 0x10a), which nested KVM on AMD hosts refuses, and QEMU
/// aborts at once; leaving that one feature out changes nothing the guests here use.
pub const QEMU_CPU: &str = "host,-arch-capabilities";

/// A reference VMM that did not run.
#[derive(Debug, Error)]
pub enum PeerError {
    /// It could not be started at all.
    #[error("cannot start {peer}")]
    Spawn {
        /// The command.
        peer: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited before producing what was expected of it.
    #[error("{peer} exited ({status}) before {expected}: {stderr}")]
    Exited {
        /// The command.
        peer: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it had not done yet.
        expected: &'static str,
        /// The end of what it wrote to stderr (and, for Firecracker, to its log).
        stderr: String,
    },
    /// Preparing its files (configuration, firmware) failed.
    #[error("cannot write {path} for the reference VMM")]
    Prepare {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The first executable file called `name` in a directory of the `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn named_or_in_path(env: &str, name: &str) -> Option<PathBuf> {
    match std::env::var_os(env) {
        Some(p) if !p.is_empty() => Some(p.into()),
        _ => find_in_path(name),
    }
}

/// QEMU for x86-64: `$VMCRAFT_QEMU`, else `qemu-system-x86_64` on the `PATH`.
pub fn qemu() -> Option<PathBuf> {
    named_or_in_path(QEMU_ENV, "qemu-system-x86_64")
}

/// Firecracker: `$VMCRAFT_FIRECRACKER`, else `firecracker` on the `PATH`.
pub fn firecracker() -> Option<PathBuf> {
    named_or_in_path(FIRECRACKER_ENV, "firecracker")
}

/// QEMU's microvm machine on KVM with `mem` of RAM (QEMU's syntax: `128M`), no default
/// devices and no display, running `firmware` as its BIOS. Add `-serial` and devices.
pub fn qemu_microvm(qemu: &Path, mem: &str, firmware: &Path) -> Command {
    let mut c = Command::new(qemu);
    c.args([
        "-M", "microvm", "-accel", "kvm", "-cpu", QEMU_CPU, "-m", mem,
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-bios",
    ])
    .arg(firmware);
    c
}

/// Write a 64 KiB firmware image to `path`: `code` at the reset vector (offset 0xfff0,
/// which the CPU runs as F000:FFF0) and `hlt` everywhere else. `code` must fit in the
/// 16 bytes before the end of the image.
pub fn write_firmware(code: &[u8], path: &Path) -> Result<(), PeerError> {
    assert!(
        code.len() <= 16,
        "code at the reset vector must fit in 16 bytes"
    );
    let mut image = vec![0xf4u8; 64 << 10];
    image[0xfff0..0xfff0 + code.len()].copy_from_slice(code);
    std::fs::write(path, image).map_err(|source| PeerError::Prepare {
        path: path.into(),
        source,
    })
}

/// Firecracker without its API socket, booting `kernel` (an ELF or bzImage) with one
/// vCPU and `mem_mib` of RAM. Its configuration and log go to `dir`; its stdout is the
/// guest's serial port only. [`firecracker_log`] reads the log back.
pub fn firecracker_command(
    firecracker: &Path,
    kernel: &Path,
    mem_mib: u32,
    dir: &Path,
) -> Result<Command, PeerError> {
    let config = dir.join("firecracker.json");
    let log = dir.join("firecracker.log");
    let json = format!(
        r#"{{
  "boot-source": {{ "kernel_image_path": "{}", "boot_args": "console=ttyS0" }},
  "drives": [],
  "machine-config": {{ "vcpu_count": 1, "mem_size_mib": {mem_mib} }}
}}
"#,
        kernel.display()
    );
    std::fs::write(&config, json).map_err(|source| PeerError::Prepare {
        path: config.clone(),
        source,
    })?;
    // Firecracker opens its log path for appending and does not create it.
    std::fs::write(&log, b"").map_err(|source| PeerError::Prepare {
        path: log.clone(),
        source,
    })?;
    let mut c = Command::new(firecracker);
    c.arg("--no-api")
        .arg("--config-file")
        .arg(&config)
        .arg("--log-path")
        .arg(&log)
        .args(["--level", "Warning"]);
    Ok(c)
}

/// The end of Firecracker's log in `dir` (see [`firecracker_command`]), for an error.
pub fn firecracker_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("firecracker.log"))
        .map(|s| tail(&s))
        .unwrap_or_default()
}

/// The last few lines of `text`, on one line.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" | ")
}

/// Wait for `child` (whose stderr was piped) and describe why it stopped before it
/// did what was `expected`.
pub fn exited_early(peer: &Command, mut child: Child, expected: &'static str) -> PeerError {
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    match child.wait() {
        Ok(status) => PeerError::Exited {
            peer: format!("{:?}", peer.get_program()),
            status,
            expected,
            stderr: tail(&stderr),
        },
        Err(source) => PeerError::Spawn {
            peer: format!("{:?}", peer.get_program()),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_firmware_puts_the_code_at_the_reset_vector() {
        let path = std::env::temp_dir().join(format!("vmcraft-fw-test-{}", std::process::id()));
        write_firmware(&[0xeb, 0xfe], &path).unwrap();
        let image = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(image.len(), 64 << 10);
        assert_eq!(&image[0xfff0..0xfff2], &[0xeb, 0xfe]);
        assert!(image[..0xfff0].iter().all(|&b| b == 0xf4));
    }

    #[test]
    fn a_peer_that_exits_at_once_is_an_error_with_its_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'failed to set MSR 0x10a' >&2; exit 3"])
            .stderr(std::process::Stdio::piped());
        let child = cmd.spawn().unwrap();
        let e = exited_early(&cmd, child, "its first output");
        let text = e.to_string();
        assert!(text.contains("failed to set MSR 0x10a"), "{text}");
        assert!(text.contains("before its first output"), "{text}");
        assert!(matches!(e, PeerError::Exited { status, .. } if status.code() == Some(3)));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\n\nb\nc\nd\ne\n"), "b | c | d | e");
        assert_eq!(tail(""), "");
    }
}
