//! The example VMM as a user runs it: the demo guest, and clear errors for bad input.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

fn minimal_vmm() -> PathBuf {
    // Integration tests live in target/<profile>/deps; cargo test builds examples into
    // target/<profile>/examples.
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let exe = deps.parent().unwrap().join("examples").join("minimal-vmm");
    if !exe.exists() {
        // `cargo test --test minimal_vmm` alone does not build examples.
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--example",
                "minimal-vmm",
                "--manifest-path",
                concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
            ])
            .status()
            .unwrap();
        assert!(status.success(), "building the example failed");
    }
    exe
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
fn bad_input_gets_clear_errors() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["--kernel", "/nonexistent/vmlinuz"],
            "cannot open kernel /nonexistent/vmlinuz",
        ),
        (&["--kernel", "Cargo.toml"], "neither an ELF vmlinux"),
        (&["--mem", "1M"], "too little memory"),
        (&["--vcpus", "0"], "invalid vCPU count"),
        (&["--frobnicate"], "unknown option"),
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
