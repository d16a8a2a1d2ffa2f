//! A VM in the jail (`vmcraft::sandbox::jail`): the jailed process is PID 1 of its own
//! namespace, sees only the files it was given (not the host's), has no capabilities
//! and the descriptor limit it was given, and still runs a guest through /dev/kvm.
//!
//! The jail forks, which only a single-threaded process may do, so this test has no
//! harness (`harness = false`): `main` is the test.

mod common;

use std::process::ExitCode;

use vmcraft::sandbox::jail::{Entered, Jail};
use vmcraft_guest_kit::Guest;

const OPEN_FILES: u64 = 128;

fn main() -> ExitCode {
    let root = std::env::temp_dir().join(format!("vmcraft-jail-test-{}", std::process::id()));
    // A host file made for the test: the jail must hide it.
    let probe = std::env::temp_dir().join(format!("vmcraft-jail-probe-{}", std::process::id()));
    std::fs::write(&probe, b"host").unwrap();
    let mut jail = Jail::new(&root)
        .bind("/dev/kvm", "/dev/kvm", true)
        .open_files(OPEN_FILES);
    // Under cargo-llvm-cov the jailed process writes its coverage profile where the
    // instrumentation says: that directory (and only it) is bound in too.
    if let Some(dir) = std::env::var_os("LLVM_PROFILE_FILE")
        .map(std::path::PathBuf::from)
        .and_then(|file| file.parent().map(|d| d.to_path_buf()))
    {
        jail = jail.bind(&dir, &dir, true);
    }
    match jail.enter() {
        Err(e) => {
            eprintln!("jail: cannot enter: {e}");
            ExitCode::FAILURE
        }
        Ok(Entered::Outside(status)) => {
            // The process that waited stayed outside: the host's files are its own.
            let outside = probe.exists();
            let _ = std::fs::remove_dir_all(&root);
            let _ = std::fs::remove_file(&probe);
            if !outside {
                eprintln!("jail: the waiting process was moved into the jail too");
                return ExitCode::FAILURE;
            }
            if status.success() {
                println!("jail: a guest ran in the jail, which hid the host's files");
                ExitCode::SUCCESS
            } else {
                eprintln!("jail: the jailed process failed: {status}");
                ExitCode::FAILURE
            }
        }
        Ok(Entered::Jailed) => match inside(&probe) {
            Ok(()) => ExitCode::SUCCESS,
            Err(why) => {
                eprintln!("jail: {why}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The checks made inside the jail.
fn inside(probe: &std::path::Path) -> Result<(), String> {
    // The host's files are not there, whatever the path.
    let this_crate = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
    let etc = std::path::Path::new("/etc/passwd");
    let via_proc = std::path::Path::new("/proc/1/root/etc/passwd");
    for host_file in [etc, via_proc, this_crate, probe] {
        if host_file.exists() {
            return Err(format!("{host_file:?} is visible in the jail"));
        }
    }
    if std::process::id() != 1 {
        return Err(format!("pid {} in the jail, not 1", std::process::id()));
    }
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("?")
            .to_owned()
    };
    for caps in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:"] {
        if field(caps) != "0000000000000000" {
            return Err(format!("{caps} {} in the jail", field(caps)));
        }
    }
    if field("NoNewPrivs:") != "1" {
        return Err("no_new_privs is not set".into());
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct through a valid pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if limit.rlim_cur != OPEN_FILES {
        return Err(format!("RLIMIT_NOFILE {} in the jail", limit.rlim_cur));
    }
    // And a guest runs, with its threads under the seccomp filters as well.
    let (vm, serial, _) = common::TestVm::new(Guest::HELLO).start(&common::one(Guest::HELLO, 0));
    let outcome = vm
        .run_for(std::time::Duration::from_secs(60))
        .map_err(|e| format!("the guest did not stop: {e}"))?;
    let out = String::from_utf8_lossy(&serial.contents()).into_owned();
    if outcome.reason != vmcraft_guest_kit::exited(0) || out.is_empty() {
        return Err(format!(
            "the guest stopped with {:?}: {out:?}",
            outcome.reason
        ));
    }
    Ok(())
}
