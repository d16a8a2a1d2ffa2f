//! The example VMM as a user runs it: the demo guest, and clear errors for bad input.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

fn minimal_vmm() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    // Integration tests live in target/<profile>/deps, examples in
    // target/<profile>/examples.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    // `cargo test` builds examples, but `cargo test --test minimal_vmm` alone does not,
    // and a stale binary would test old code: let cargo bring it up to date.
    BUILT.call_once(|| {
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args([
                "build",
                "--quiet",
                "--example",
                "minimal-vmm",
                "--manifest-path",
            ])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
        if profile_dir.ends_with("release") {
            cargo.arg("--release");
        }
        assert!(
            cargo.status().unwrap().success(),
            "building the example failed"
        );
    });
    profile_dir.join("examples").join("minimal-vmm")
}

fn run(args: &[&str]) -> Output {
    Command::new(minimal_vmm()).args(args).output().unwrap()
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
    assert!(stdout.contains("VM stopped: DebugExit(0)"), "{stdout}");
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
        stdout.starts_with("\n\nminimal-vmm: VM stopped: DebugExit(0)"),
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
    // The boot tables and the code page at least; far less than the 64 MiB.
    assert!((8..4096).contains(&guest), "{line}");
    assert_eq!(peak - guest, overhead, "{line}");
}

#[test]
fn bad_input_gets_clear_errors() {
    let cases: [(&[&str], &str); 7] = [
        (
            &["--kernel", "/nonexistent/vmlinuz"],
            "cannot open kernel /nonexistent/vmlinuz",
        ),
        (&["--kernel", "Cargo.toml"], "neither an ELF vmlinux"),
        (&["--mem", "1M"], "too little memory"),
        (&["--vcpus", "0"], "invalid vCPU count"),
        (&["--frobnicate"], "unknown option"),
        (&["--guest", "doom"], "unknown guest \"doom\""),
        (
            &["--guest", "exit", "--kernel", "/boot/vmlinuz"],
            "exclude each other",
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
