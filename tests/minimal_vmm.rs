//! The examples as a user runs them: the example VMM (the demo guest, clear errors for
//! bad input, its flags) and the custom-device example.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

fn minimal_vmm() -> PathBuf {
    example("minimal-vmm")
}

use common::example;

fn run(args: &[&str]) -> Output {
    Command::new(minimal_vmm()).args(args).output().unwrap()
}

#[test]
fn diagnose_reports_what_the_host_intercepts() {
    common::require_kvm();
    let out = run(&["--diagnose"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {:?}", out.stderr);
    assert!(stdout.contains("host CPU: "), "{stdout}");
    assert!(
        stdout.contains("CPUID at CPL 0: intercepted (the VMM's leaves)"),
        "{stdout}"
    );
    assert!(stdout.contains("CPUID at CPL 3: "), "{stdout}");
    assert!(stdout.contains("port-I/O exit round trip: "), "{stdout}");
    // The advice to boot a vmlinux comes exactly where kernel mode is emulated.
    assert_eq!(
        stdout.contains(
            "the guest's kernel mode is emulated here: boot a Linux kernel as its ELF vmlinux"
        ),
        vmcraft::vcpu::probe::kernel_mode_emulated() == Some(true),
        "{stdout}"
    );
    let out = run(&["--diagnose", "--rng"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("the argument '--diagnose' cannot be used with"));
}

#[test]
fn demo_guest_greets_prints_statistics_and_exits_zero() {
    common::require_kvm();
    let out = run(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status {:?}, stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("Hello from a vmcraft guest!"),
        "{stdout}"
    );
    assert!(
        stdout.contains("VM stopped: debug-exit (code 0)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("pio-write") && stdout.contains("pio-read"),
        "{stdout}"
    );
}

#[test]
fn smallest_guest_makes_two_exits_and_the_memory_report_adds_up() {
    common::require_kvm();
    let out = run(&["--guest", "exit", "--mem", "64M"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "status {:?}: {stdout}", out.status);
    // The guest's only output is the newline of its first exit.
    assert!(
        stdout.starts_with("\n\nminimal-vmm: VM stopped: debug-exit (code 0)"),
        "{stdout}"
    );
    assert!(stdout.contains("(2 exits)"), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains("host memory:"))
        .unwrap_or_else(|| panic!("no memory report in {stdout}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let [peak, guest, overhead] = numbers[..] else {
        panic!("three figures expected in {line:?}");
    };
    // Its code page at least (a real-mode entry needs no boot tables, so none are
    // written); far less than the 64 MiB.
    assert!((4..4096).contains(&guest), "{line}");
    assert_eq!(peak - guest, overhead, "{line}");
}

#[test]
fn the_virtio_blk_guest_tests_a_disk_image() {
    common::require_kvm();
    let image = common::ScratchImage::new("cli-disk", 1 << 20);
    let path = image.path();
    let disk = path.to_str().unwrap();
    let out = run(&["--guest", "virtio-blk", "--disk", disk, "--mem", "16M"]);
    let image = image.contents();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "status {:?}: {stdout}", out.status);
    assert!(stdout.contains("capacity 0x0000000000000800\n"), "{stdout}");
    assert!(stdout.contains("id vmcraft0\n"), "{stdout}");
    // The guest wrote sector 8 and sectors 64.. of the image.
    assert!(image[8 * 512..9 * 512].iter().any(|&b| b != 0));
    assert!(image[64 * 512..65 * 512].iter().any(|&b| b != 0));
}

/// Start the example VMM on the `virtio-blk-flush` guest with `image` as its disk and
/// `extra` flags; returns once the guest said "flushed" (its VMM then keeps running,
/// its vCPU and the disk's I/O thread alive, until killed).
fn flushed_vmm(image: &common::ScratchImage, extra: &[&str]) -> std::process::Child {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = Command::new(minimal_vmm())
        .args(["--guest", "virtio-blk-flush", "--mem", "16M", "--disk"])
        .arg(image.path())
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        match lines.next() {
            Some(Ok(line)) if line == "flushed" => return child,
            Some(Ok(line)) => seen.push(line),
            other => {
                let _ = child.kill();
                panic!("the guest never flushed ({other:?}); output: {seen:?}");
            }
        }
    }
}

/// The process that runs the VM: the example's jailed child when it jails itself (the
/// default), else the example itself.
fn vm_process(example: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{example}/task/{example}/children"))
        .ok()
        .and_then(|c| c.split_whitespace().next()?.parse().ok())
        .unwrap_or(example)
}

/// (name, seccomp mode, number of filters) of every thread of process `pid`, as the
/// kernel reports them in /proc.
fn thread_seccomp(pid: u32) -> Vec<(String, u32, u32)> {
    let field = |status: &str, name: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    };
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| {
            let dir = task.unwrap().path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap();
            let status = std::fs::read_to_string(dir.join("status")).unwrap();
            (
                comm.trim().to_owned(),
                field(&status, "Seccomp:"),
                field(&status, "Seccomp_filters:"),
            )
        })
        .collect()
}

/// The example VMM runs every thread under a seccomp filter by default: the kernel
/// reports filter mode (2) for its main thread, its vCPU and the disk's I/O thread,
/// which also carries the filters of the vCPU thread that started it. `--seccomp off`
/// runs with none.
#[test]
fn the_example_vmm_filters_every_thread_unless_told_not_to() {
    common::require_kvm();
    for (flags, mode) in [(&[][..], 2), (&["--seccomp", "off"][..], 0)] {
        let image = common::ScratchImage::new("seccomp-disk", 1 << 20);
        let mut child = flushed_vmm(&image, flags);
        let threads = thread_seccomp(vm_process(child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
        let of = |name: &str| {
            threads
                .iter()
                .find(|t| t.0 == name)
                .unwrap_or_else(|| panic!("no thread {name} in {threads:?}"))
                .clone()
        };
        // Built for coverage, the example leaves its main thread unfiltered so that it
        // can write its profile at exit.
        let main_mode = if cfg!(coverage) { 0 } else { mode };
        assert_eq!(of("minimal-vmm").1, main_mode, "{flags:?}: {threads:?}");
        for name in ["vcpu0", "vblk0-io"] {
            assert_eq!(of(name).1, mode, "{name} with {flags:?}: {threads:?}");
        }
        if mode == 2 {
            assert!(
                of("vblk0-io").2 > of("vcpu0").2,
                "the device thread stacks its own filters on its vCPU parent's: {threads:?}"
            );
        }
    }
}

/// `--jail DIR`: the VM runs (its disk opened before the jail, its flush reaching the
/// image), in a process whose root is DIR, PID 1 of its own PID namespace, with no
/// capabilities; the process that started it waits for it.
#[test]
fn the_example_vmm_runs_its_vm_in_a_jail() {
    common::require_kvm();
    let image = common::ScratchImage::new("jail-disk", 1 << 20);
    let root = std::env::temp_dir().join(format!("vmcraft-jail-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let mut outer = flushed_vmm(&image, &["--jail", root.to_str().unwrap()]);
    let jailed = vm_process(outer.id());
    assert_ne!(jailed, outer.id(), "the example forked its jailed VMM");
    // What the jailed process sees as its file system (through its root's magic link).
    let sees = |path: &str| std::path::Path::new(&format!("/proc/{jailed}/root{path}")).exists();
    // The host files: one everybody has, this test's own source, and the disk image
    // (open in the jailed VMM, but not visible by its path there).
    let this_test = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/minimal_vmm.rs");
    let disk_path = image.path().to_str().unwrap().to_owned();
    let seen = [
        "/dev/kvm",
        "/proc/1/status",
        "/etc/passwd",
        this_test,
        &disk_path,
    ]
    .map(sees);
    let status = std::fs::read_to_string(format!("/proc/{jailed}/status")).unwrap();
    let threads = thread_seccomp(jailed);
    outer.kill().unwrap();
    outer.wait().unwrap();
    assert_eq!(
        seen,
        [true, true, false, false, false],
        "the jailed VMM sees /dev/kvm and its own /proc (itself as PID 1), and none of the host's files"
    );
    // The jail's files were made in its own tmpfs, never on the host's disk.
    assert!(
        !root.join("dev/kvm").exists(),
        "the jail left its files in {root:?}"
    );
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    assert!(
        field("NSpid:").ends_with("\t1") || field("NSpid:").ends_with(" 1"),
        "{status}"
    );
    assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
    assert!(
        threads.iter().any(|t| t.0 == "vblk0-io" && t.1 == 2),
        "the VM's threads run, filtered, in the jail: {threads:?}"
    );
    // The flush reached the image through the descriptor opened before the jail.
    let image = image.contents();
    assert_ne!(image[256 * 512..257 * 512], [0u8; 512][..]);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_flushed_write_survives_sigkill_of_the_vmm() {
    common::require_kvm();
    let image = common::ScratchImage::new("kill-disk", 1 << 20);
    let mut child = flushed_vmm(&image, &[]);
    // The flush completed: kill the VMM at once, no chance to tidy up.
    child.kill().unwrap();
    child.wait().unwrap();
    let image = image.contents();
    for s in 0..16u32 {
        let seed = 7 + s;
        let at = (256 + 8 * s as usize) * 512;
        for (i, word) in image[at..at + 4096].chunks_exact(4).enumerate() {
            let want = seed.wrapping_mul(2_654_435_761) ^ (4 * i as u32);
            assert_eq!(
                u32::from_le_bytes(word.try_into().unwrap()),
                want,
                "request {s} word {i}"
            );
        }
    }
}

#[test]
fn the_pv_demo_uses_only_rings_event_channels_and_grants() {
    common::require_kvm();
    let image = common::ScratchImage::new("pv-disk", 1 << 20);
    let path = image.path();
    let out = run(&["--pv", "--mem", "16M", "--disk", path.to_str().unwrap()]);
    let image = image.contents();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "status {:?}: {stdout}", out.status);
    assert!(
        stdout.starts_with(
            "Hello from a paravirtual guest: this line crossed a shared ring.\n\
             pv block ok: wrote, read back and flushed a page through grants\n"
        ),
        "{stdout}"
    );
    // The page the guest wrote is at sector 8.
    for (i, word) in image[8 * 512..8 * 512 + 4096].chunks_exact(4).enumerate() {
        let want = 0x9e37_79b9u32.wrapping_mul(4 * i as u32 + 1);
        assert_eq!(
            u32::from_le_bytes(word.try_into().unwrap()),
            want,
            "word {i}"
        );
    }
    // No emulated device was read or written: the only exits to the VMM are port
    // writes (the final debug exit; event-channel sends go through the doorbell's
    // ioeventfd and stay in the kernel).
    let stats: Vec<&str> = stdout.lines().filter(|l| l.starts_with("  ")).collect();
    assert!(
        stats.len() == 1 && stats[0].trim_start().starts_with("pio-write"),
        "{stdout}"
    );
}

#[test]
fn bad_input_gets_clear_errors() {
    let cases: [(&[&str], &str); 16] = [
        (
            &["--kernel", "/nonexistent/vmlinuz"],
            "boot.kernel: cannot open /nonexistent/vmlinuz",
        ),
        (&["--kernel", "Cargo.toml"], "neither an ELF vmlinux"),
        (&["--mem", "1M"], "memory_mib: 1 MiB is outside 4 to"),
        (&["--mem", "1500K"], "guest RAM comes in whole MiB"),
        (&["--vcpus", "0"], "invalid value '0' for '--vcpus <N>'"),
        (&["--frobnicate"], "unexpected argument '--frobnicate'"),
        (
            &["--guest", "doom"],
            "invalid value 'doom' for '--guest <NAME>'",
        ),
        (
            &["--guest", "exit", "--kernel", "/boot/vmlinuz"],
            "'--guest <NAME>' cannot be used with '--kernel <PATH>'",
        ),
        (&["--guest", "virtio-blk"], "needs a --disk"),
        (
            &["--disk", "/nonexistent/disk.img"],
            "devices[0].path: cannot open /nonexistent/disk.img",
        ),
        (&["--disk", "disk.img,fast"], "unknown disk flag \"fast\""),
        (
            &["--net-tap", "a-name-far-too-long"],
            "devices[0].tap: \"a-name-far-too-long\" is not an interface name",
        ),
        (&["--pv"], "--pv needs a --disk"),
        (
            &["--restore", "/nonexistent"],
            "cannot open the snapshot state file /nonexistent/state",
        ),
        (
            &["--config", "/nonexistent/vm.json"],
            "cannot read the configuration file /nonexistent/vm.json",
        ),
        (
            &["--config", "Cargo.toml"],
            "the configuration is not a machine configuration",
        ),
    ];
    for (args, message) in cases {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(message),
            "{args:?}: expected {message:?} in {stderr}"
        );
    }
}

/// `--console-socket`: the VMM listens, waits for one client, and the virtio-console
/// test guest talks both ways through that socket.
#[test]
fn the_console_socket_carries_both_directions() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    common::require_kvm();
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix(
        std::env::temp_dir().join("vmcraft-console-socket"),
    )
    .unwrap();
    let path = dir.as_path().join("console.sock");
    let child = Command::new(minimal_vmm())
        .args(["--guest", "virtio-console", "--console-socket"])
        .arg(&path)
        .args(["--timeout", "30"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let stream = loop {
        match UnixStream::connect(&path) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("no console socket at {}: {e}", path.display()),
        }
    };
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut lines = BufReader::new(stream.try_clone().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "hello from virtio-console");
    (&stream).write_all(b"ping\n").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "got: ping");
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `examples/custom-device.rs`: a virtio device written with the crates' public API
/// only, driven by the virtio-console test guest both ways.
#[test]
fn a_device_written_outside_the_crates_serves_a_guest() {
    common::require_kvm();
    let out = Command::new(example("custom-device")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {:?}", out.stderr);
    assert!(
        stdout.contains("guest says: hello from virtio-console\n"),
        "{stdout}"
    );
    assert!(stdout.contains("guest says: got: ping\n"), "{stdout}");
    assert!(
        stdout.contains("VM stopped: debug-exit (code 0)"),
        "{stdout}"
    );
}

/// The example VMM, jailed and filtered as by default, writes a snapshot on SIGUSR1
/// (and goes on) and on SIGUSR2 (and stops); a new process restores the last one and
/// the guest goes on: its output before the snapshot and the new process's output
/// together are an undisturbed run's.
#[test]
fn a_snapshot_taken_on_a_signal_restores_in_a_new_process() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = std::env::temp_dir().join(format!("vmcraft-example-snapshot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut child = Command::new(minimal_vmm())
        .args(["--guest", "memcheck", "--snapshot"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut saved_run = String::new();
    // Three rounds, then a snapshot that goes on; two more, then one that stops.
    for (rounds, signal) in [(3, libc::SIGUSR1), (2, libc::SIGUSR2)] {
        for _ in 0..rounds {
            stdout.read_line(&mut saved_run).unwrap();
        }
        // SAFETY: kill only sends a signal to the child this test started.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    }
    std::io::Read::read_to_string(&mut stdout, &mut saved_run).unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status:?}: {stderr}");
    assert_eq!(
        stderr.matches("minimal-vmm: snapshot written to").count(),
        2,
        "{stderr}"
    );
    let restored = run(&["--restore", dir.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&restored.stdout);
    assert!(
        restored.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    assert_eq!(
        guest_output(&saved_run) + &guest_output(&stdout),
        memcheck_expected().to_owned(),
        "the output of the saved run, then of the restored one"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A destination example VMM waiting for a migration on an ephemeral port with
/// `secret`; returns it and the address it listens on.
fn migration_destination(
    secret: &std::path::Path,
    devices: &[&str],
) -> (std::process::Child, String, std::thread::JoinHandle<String>) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    // One try: a failed migration ends it (and the test) rather than waiting on.
    let mut child = Command::new(minimal_vmm())
        .args(["--migrate-tries", "1"])
        .args(["--migrate-from", "127.0.0.1:0", "--migrate-secret-file"])
        .arg(secret)
        .args(devices)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("minimal-vmm: waiting for a migration on ")
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();
    // Keep draining its stderr, so it never blocks on a full pipe.
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
        rest
    });
    (child, addr, rest)
}

/// What the guest wrote to COM1 in the example's `stdout`: everything before its
/// report (an empty line, then "minimal-vmm: VM stopped"). A guest stopped for a
/// snapshot or a migration may have been cut mid-line: the rest of the line comes from
/// the VM that goes on.
fn guest_output(stdout: &str) -> String {
    match stdout.find("\nminimal-vmm: VM stopped") {
        Some(end) => stdout[..end].to_string(),
        None => stdout.to_string(),
    }
}

/// What the example's `--guest memcheck` (16 MiB, 1000 rounds) prints undisturbed
/// (computed once).
fn memcheck_expected() -> &'static str {
    static EXPECTED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    EXPECTED.get_or_init(|| vmcraft_guest_kit::memcheck_output(16, 1000))
}

fn secret_file(name: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("vmcraft-{name}-{}", std::process::id()));
    std::fs::write(&p, b"the migration secret of this test").unwrap();
    p
}

/// A source example VMM running memcheck with `extra` flags, migrating to `addr` on
/// SIGUSR1 once it has printed `rounds` rounds (read from its stdout, which goes on
/// into the returned string once it ends).
fn migrating_source(
    addr: &str,
    secret: &std::path::Path,
    extra: &[&str],
    rounds: usize,
) -> (std::process::Child, std::thread::JoinHandle<String>) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = Command::new(minimal_vmm())
        .args([
            "--guest",
            "memcheck",
            "--migrate-to",
            addr,
            "--migrate-secret-file",
        ])
        .arg(secret)
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out = String::new();
    for _ in 0..rounds {
        out += &lines.next().unwrap().unwrap();
        out.push('\n');
    }
    // SAFETY: kill only sends a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) }, 0);
    let rest = std::thread::spawn(move || {
        for line in lines {
            out += &line.unwrap();
            out.push('\n');
        }
        out
    });
    (child, rest)
}

/// Two example VMMs, each jailed and filtered: the source migrates its running guest
/// on SIGUSR1 and exits; the guest goes on at the destination.
#[test]
fn a_running_guest_migrates_between_two_processes() {
    let secret = secret_file("migration-secret");
    let (mut dst, addr, dst_err) = migration_destination(&secret, &[]);
    let (mut src, src_out) = migrating_source(&addr, &secret, &["--guest", "memcheck"], 3);
    assert!(src.wait().unwrap().success());
    let dst_status = dst.wait().unwrap();
    let mut dst_out = String::new();
    std::io::Read::read_to_string(&mut dst.stdout.take().unwrap(), &mut dst_out).unwrap();
    let dst_err = dst_err.join().unwrap();
    assert!(dst_status.success(), "{dst_status:?}: {dst_out}{dst_err}");
    let whole = guest_output(&src_out.join().unwrap()) + &guest_output(&dst_out);
    assert_eq!(whole, memcheck_expected().to_owned());
    std::fs::remove_file(&secret).unwrap();
}

/// Killed mid-migration (the copy slowed to 4 MiB/s so that it is still going), the
/// destination leaves the source running: the guest ends there, every round printed
/// once.
#[test]
fn a_destination_killed_mid_migration_leaves_the_source_running() {
    let secret = secret_file("migration-secret-kill-dst");
    let (mut dst, addr, _) = migration_destination(&secret, &[]);
    let (mut src, src_out) = migrating_source(
        &addr,
        &secret,
        &["--guest", "memcheck", "--migrate-bandwidth", "4M"],
        2,
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    dst.kill().unwrap();
    dst.wait().unwrap();
    assert!(src.wait().unwrap().success());
    assert_eq!(
        guest_output(&src_out.join().unwrap()),
        memcheck_expected().to_owned()
    );
    std::fs::remove_file(&secret).unwrap();
}

/// Killed mid-migration, the source leaves the destination with nothing to run: it
/// says the connection failed and, its one try spent, exits with an error, having
/// started no guest.
#[test]
fn a_source_killed_mid_migration_leaves_nothing_at_the_destination() {
    let secret = secret_file("migration-secret-kill-src");
    let (mut dst, addr, dst_err) = migration_destination(&secret, &[]);
    let (mut src, _) = migrating_source(
        &addr,
        &secret,
        &["--guest", "memcheck", "--migrate-bandwidth", "4M"],
        2,
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    src.kill().unwrap();
    src.wait().unwrap();
    let status = dst.wait().unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut dst.stdout.take().unwrap(), &mut out).unwrap();
    let err = dst_err.join().unwrap();
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("the peer closed the migration connection")
            && err.contains("no migration came in 1 connections"),
        "{err}"
    );
    assert!(out.is_empty(), "the destination ran a guest: {out}");
    std::fs::remove_file(&secret).unwrap();
}

/// A guest with virtio-blk batches in flight, then one with PV blkif batches in flight
/// (grants, event channels), each migrated between two jailed example VMMs sharing its
/// disk image: every page is checked at both ends, and the output of the two together
/// is an undisturbed run's.
#[test]
fn guests_with_block_requests_in_flight_migrate_between_two_processes() {
    let secret = secret_file("migration-secret-blk");
    for (guest, pv) in [("blkcheck", false), ("pvcheck", true)] {
        let image = common::ScratchImage::new(&format!("migrate-{guest}"), 1 << 20);
        let disk = image.path().to_str().unwrap().to_string();
        let mut devices = vec!["--disk", disk.as_str()];
        if pv {
            devices.push("--pv");
        }
        let (mut dst, addr, dst_err) = migration_destination(&secret, &devices);
        let mut args = vec!["--guest", guest];
        args.extend(&devices);
        let (mut src, src_out) = migrating_source(&addr, &secret, &args, 20);
        assert!(src.wait().unwrap().success(), "{guest}");
        let dst_status = dst.wait().unwrap();
        let mut dst_out = String::new();
        std::io::Read::read_to_string(&mut dst.stdout.take().unwrap(), &mut dst_out).unwrap();
        let dst_err = dst_err.join().unwrap();
        assert!(
            dst_status.success(),
            "{guest}: {dst_status:?}: {dst_out}{dst_err}"
        );
        let src_out = guest_output(&src_out.join().unwrap());
        let expected = if pv {
            vmcraft_guest_kit::pvcheck_output(2000)
        } else {
            vmcraft_guest_kit::blkcheck_output(2000)
        };
        assert!(
            src_out.len() < expected.len(),
            "{guest} ended before the migration"
        );
        assert_eq!(src_out + &guest_output(&dst_out), expected, "{guest}");
    }
    std::fs::remove_file(&secret).unwrap();
}

/// A jailed VMM leaves nothing in the temporary directory, whether it ends on its own
/// or is killed; and `--snapshot` onto the directory `--restore` reads is refused.
#[test]
fn a_jailed_vmm_leaves_nothing_behind_even_when_killed() {
    let tmp = std::env::temp_dir().join(format!("vmcraft-jail-tmp-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let out = Command::new(minimal_vmm())
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = Command::new(minimal_vmm())
        .env("TMPDIR", &tmp)
        .args(["--guest", "spin"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Running: the jailed child exists.
    assert!(common::eventually(30, || vm_process_exists(child.id())));
    child.kill().unwrap();
    child.wait().unwrap();
    // The jailed child dies with its parent (PR_SET_PDEATHSIG, or, killed before
    // that was set, by the pipe it watches): no VMM of this test runs on.
    let marker = format!("TMPDIR={}", tmp.display());
    let orphans = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.unwrap().path().join("environ")).ok())
            .filter(|env| env.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
            .count()
    };
    assert!(
        common::eventually(10, || orphans() == 0),
        "a jailed VMM outlived its parent"
    );
    // Nothing stays on disk.
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    std::fs::remove_dir_all(&tmp).unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
    let err = run(&[
        "--restore",
        "/nonexistent-dir",
        "--snapshot",
        "/nonexistent-dir",
    ]);
    assert!(!err.status.success());
}

/// Whether the jailed VMM under the example process `pid` has started.
fn vm_process_exists(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .is_ok_and(|c| !c.trim().is_empty())
}

/// A snapshot carries its machine: `--restore DIR` alone rebuilds the disk and the
/// rng of a blkcheck run and the guest goes on; device options given with it move
/// the disk to another file, and options that describe another machine are refused
/// with the field named.
#[test]
fn a_restore_needs_no_device_options_and_refuses_another_machine() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    common::require_kvm();
    let dir = std::env::temp_dir().join(format!("vmcraft-example-restore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let image = common::ScratchImage::new("restore-disk", 1 << 20);
    let mut child = Command::new(minimal_vmm())
        .args(["--guest", "blkcheck", "--rng", "--mem", "32M", "--disk"])
        .arg(image.path())
        .arg("--snapshot")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut saved_run = String::new();
    for _ in 0..3 {
        stdout.read_line(&mut saved_run).unwrap();
    }
    // SAFETY: kill only sends a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGUSR2) }, 0);
    std::io::Read::read_to_string(&mut stdout, &mut saved_run).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let dir_arg = dir.to_str().unwrap();

    // Another machine: a read-only disk, a missing rng, a second disk.
    let path = image.path().to_str().unwrap();
    let ro = format!("{path},ro");
    for (extra, message) in [
        (vec!["--disk", &ro, "--rng"], "devices[0]: "),
        (vec!["--disk", path], "devices: "),
        (vec!["--disk", path, "--disk", path, "--rng"], "devices: "),
        (
            vec!["--vcpus", "2", "--disk", path, "--rng"],
            "vcpus: 1 when saved, 2 now",
        ),
    ] {
        let out = run(&[&["--restore", dir_arg][..], &extra].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} restored");
        assert!(
            stderr.contains(message),
            "{extra:?}: {message:?} not in {stderr}"
        );
    }

    // The disk moved: a copy of the image at the snapshot, restored onto.
    let moved = common::ScratchImage::new("restore-moved", 1 << 20);
    std::fs::copy(image.path(), moved.path()).unwrap();
    let before = image.contents();
    for extra in [
        vec![],
        vec!["--disk", moved.path().to_str().unwrap(), "--rng"],
    ] {
        let restored = run(&[&["--restore", dir_arg][..], &extra].concat());
        let stdout = String::from_utf8_lossy(&restored.stdout);
        assert!(
            restored.status.success(),
            "{extra:?}: {stdout}{}",
            String::from_utf8_lossy(&restored.stderr)
        );
        assert_eq!(
            guest_output(&saved_run) + &guest_output(&stdout),
            vmcraft_guest_kit::blkcheck_output(2000),
            "{extra:?}: the output of the saved run, then of the restored one"
        );
        if extra.is_empty() {
            // The first restore ran on the original image; put it back for the
            // second check, which must not touch it.
            std::fs::write(image.path(), &before).unwrap();
        }
    }
    assert_eq!(
        image.contents(),
        before,
        "the restore onto the copy wrote the original"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The README's command lines of the example use only options its `--help` lists
/// (the usage is clap's, from the options' own documentation: one place).
#[test]
fn the_readme_uses_only_options_the_help_lists() {
    let help = String::from_utf8(run(&["--help"]).stdout).unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut checked = 0;
    for line in readme.lines() {
        // What follows the example's name (after cargo's `--` if run through cargo).
        let Some(at) = line.find("minimal-vmm") else {
            continue;
        };
        let rest = &line[at + "minimal-vmm".len()..];
        let rest = rest.strip_prefix(" --").unwrap_or(rest);
        for word in rest.split(|c: char| c.is_whitespace() || c == '`') {
            let Some(name) = word.strip_prefix("--") else {
                continue;
            };
            let name: String = name
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '-')
                .collect();
            if name.is_empty() {
                continue;
            }
            assert!(
                help.contains(&format!("--{name}")),
                "the README's `--{name}` ({line}) is not in --help"
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} options found in the README");
}

/// A destination that names another machine (an rng the source does not have)
/// refuses the source's configuration before any memory comes: it says which field
/// differs, and the source, told why, runs its guest to the end.
#[test]
fn a_destination_of_another_machine_refuses_before_any_memory_comes() {
    let secret = secret_file("migration-secret-other-machine");
    let (mut dst, addr, dst_err) = migration_destination(&secret, &["--rng"]);
    let (mut src, src_out) = migrating_source(&addr, &secret, &["--guest", "memcheck"], 2);
    assert!(src.wait().unwrap().success());
    assert_eq!(
        guest_output(&src_out.join().unwrap()),
        memcheck_expected().to_owned()
    );
    let status = dst.wait().unwrap();
    let err = dst_err.join().unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("the source's machine: devices: \"0 devices\" when saved, \"1 devices\" now"),
        "{err}"
    );
    std::fs::remove_file(&secret).unwrap();
}

#[test]
fn a_kernel_gets_virtio_pci_unless_told_otherwise() {
    let transport = |args: &[&str]| {
        let out = run(&[args, &["--print-config"]].concat());
        assert!(out.status.success(), "{args:?}: {:?}", out);
        let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        config["transport"].as_str().unwrap().to_string()
    };
    // A Linux kernel binds its own virtio_pci: a vector per queue.
    assert_eq!(transport(&["--kernel", "/vmlinux", "--rng"]), "pci");
    assert_eq!(
        transport(&["--kernel", "/vmlinux", "--rng", "--transport", "mmio"]),
        "mmio"
    );
    // Xen guests boot PVH, with no PCI bus; the embedded guests drive virtio-mmio.
    assert_eq!(transport(&["--kernel", "/vmlinux", "--xen"]), "mmio");
    assert_eq!(transport(&["--guest", "hello"]), "mmio");
}

/// The example, jailed and filtered as by default, with a vsock and the agent guest:
/// its door connects from inside the jail to a listener beside the device's socket
/// (the directory is bound in), the agent's counter comes back through it, and the
/// socket is gone when the VMM ends.
#[test]
fn a_jailed_vmm_carries_a_vsock_agents_connection() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicU64, Ordering};
    common::require_kvm();
    let dir = std::env::temp_dir().join(format!("vmcraft-vsock-jail-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let listener = std::os::unix::net::UnixListener::bind(dir.join("v.sock_1234")).unwrap();
    let echoed = std::sync::Arc::new(AtomicU64::new(0));
    let counted = echoed.clone();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 || stream.write_all(&buf[..n]).is_err() {
                break;
            }
            counted.fetch_add(n as u64, Ordering::SeqCst);
        }
    });
    let vsock = format!("3,{}", uds.display());
    let out = run(&[
        "--guest",
        "vsock-agent",
        "--vsock",
        &vsock,
        "--timeout",
        "3",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        echoed.load(Ordering::SeqCst) >= 8 * 100,
        "the agent's counter went through the jailed door: {} bytes; {stderr}",
        echoed.load(Ordering::SeqCst)
    );
    assert!(!uds.exists(), "the device's socket is removed");
    // A relative socket path is refused for a jailed VMM, with the reason.
    let out = run(&["--guest", "vsock-agent", "--vsock", "3,v.sock"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("absolute path"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
