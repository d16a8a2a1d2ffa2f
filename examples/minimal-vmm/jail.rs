//! The jail the VM runs in (unless `--no-jail`).

use std::error::Error;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitCode;

use vmcraft::sandbox::jail::{CgroupLimits, Entered, Jail};

use crate::chain;

/// Enter the jail at `dir` (a fresh directory under the temporary directory if
/// none), with the host directories `shared` visible (writable) at their own paths:
/// `None` inside, where the VM is to be run; outside, once the jailed VMM has
/// ended, how this process ends.
pub fn enter(
    dir: Option<&Path>,
    mem: u64,
    vcpus: u32,
    shared: &[&Path],
) -> Result<Option<ExitCode>, Box<dyn Error>> {
    // A fresh directory unless one was named; this process removes it afterwards.
    let root = match dir {
        Some(dir) => dir.to_owned(),
        None => std::env::temp_dir().join(format!("minimal-vmm-jail-{}", std::process::id())),
    };
    let mut jail = jail(&root, mem, vcpus)?;
    for dir in shared {
        jail = jail.bind(*dir, *dir, true);
    }
    let entered = jail.enter().map_err(|e| {
        format!(
            "{e}{} (run as root or with user namespaces, or pass --no-jail)",
            chain(&e)
        )
    })?;
    let Entered::Outside(status) = entered else {
        return Ok(None);
    };
    // The jail removes its directory itself once inside; this is for a child that
    // failed before that.
    if dir.is_none() {
        match std::fs::remove_dir_all(&root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                eprintln!("minimal-vmm: cannot remove the jail {root:?}: {e}")
            }
            _ => {}
        }
    }
    // The jailed VMM has run and reported; end as it did.
    Ok(Some(match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code.clamp(0, 255) as u8),
        (None, Some(signal)) => ExitCode::from((128 + signal).min(255) as u8),
        _ => ExitCode::FAILURE,
    }))
}

/// /dev/kvm inside, every file already open, no capabilities, 1024 descriptors, guest
/// RAM plus 4 GiB of address space, and when the host has cgroup v2, a cgroup of its
/// own with guest RAM plus 256 MiB of memory and one CPU per vCPU.
fn jail(root: &Path, mem: u64, vcpus: u32) -> Result<Jail, Box<dyn Error>> {
    let mut jail = Jail::new(root)
        .bind("/dev/kvm", "/dev/kvm", true)
        .open_files(1024)
        .address_space(mem + (4 << 30))
        // A TAP opened before stays in the host's network; nothing else needs one.
        .new_network(true)
        // Snapshot requests, sent to the process outside.
        .forward_signals(&[libc::SIGUSR1, libc::SIGUSR2]);
    // Built for coverage (cargo-llvm-cov sets `cfg(coverage)`), the jailed VMM writes
    // its profile where the instrumentation says: that directory is bound in too.
    if cfg!(coverage) {
        if let Some(dir) = std::env::var_os("LLVM_PROFILE_FILE")
            .map(std::path::PathBuf::from)
            .and_then(|file| file.parent().map(|d| d.to_path_buf()))
        {
            jail = jail.bind(&dir, &dir, true);
        }
    }
    let hierarchy = Path::new("/sys/fs/cgroup");
    if hierarchy.join("cgroup.controllers").exists() {
        jail = jail.cgroup(CgroupLimits {
            path: hierarchy
                .join("vmcraft")
                .join(format!("minimal-vmm-{}", std::process::id())),
            cpu_max: Some((100_000 * u64::from(vcpus), 100_000)),
            memory_max: Some(mem + (256 << 20)),
        });
    } else {
        eprintln!("minimal-vmm: no cgroup v2 on this host: the jail sets no CPU or memory limit");
    }
    Ok(jail)
}
