//! Assembles every guest in `guests/` into a flat binary in OUT_DIR.

use std::path::Path;
use std::process::Command;

mod abi {
    #![allow(dead_code)]
    include!("src/abi.rs");
}

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (gcc and binutils are needed to build the test guests)")
    });
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = std::env::var("OUT_DIR").unwrap();
    let defines = [
        ("DEBUG_EXIT_PORT", u64::from(abi::DEBUG_EXIT_PORT)),
        ("COM1_PORT", u64::from(abi::COM1_PORT)),
        ("I8042_COMMAND_PORT", u64::from(abi::I8042_COMMAND_PORT)),
        ("TEST_PORT", u64::from(abi::TEST_PORT)),
        ("USER_CODE_SELECTOR", u64::from(abi::USER_CODE_SELECTOR)),
        ("USER_DATA_SELECTOR", u64::from(abi::USER_DATA_SELECTOR)),
        ("TEST_MMIO", abi::TEST_MMIO),
        ("COUNTER_BASE", abi::COUNTER_BASE),
        ("VIRTIO_MMIO_BASE", abi::VIRTIO_MMIO_BASE),
        ("GUEST_HEAP", abi::GUEST_HEAP),
        ("HYPERCALL_PORT", u64::from(abi::HYPERCALL_PORT)),
        ("PV_SHARED_INFO", abi::PV_SHARED_INFO),
        ("PV_CONSOLE_PAGE", abi::PV_CONSOLE_PAGE),
        ("PV_BLK_RING", abi::PV_BLK_RING),
        ("PV_GRANT_TABLE", abi::PV_GRANT_TABLE),
        ("PV_CONSOLE_PORT", abi::PV_CONSOLE_PORT),
        ("PV_BLK_PORT", abi::PV_BLK_PORT),
        ("PV_DOORBELL_PORT", u64::from(abi::PV_DOORBELL_PORT)),
    ];
    println!("cargo:rerun-if-changed=guests");
    println!("cargo:rerun-if-changed=src/abi.rs");
    let mut names: Vec<_> = std::fs::read_dir("guests")
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for src in names
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "S"))
    {
        let stem = src.file_stem().unwrap().to_str().unwrap();
        let real_mode = stem.starts_with("rm_");
        let base = if real_mode {
            abi::REAL_MODE_LOAD_ADDR
        } else {
            abi::LOAD_ADDR
        };
        let obj = Path::new(&out).join(format!("{stem}.o"));
        let bin = Path::new(&out).join(format!("{stem}.bin"));
        let mut gcc = Command::new("gcc");
        gcc.args(["-c", "-nostdlib", "-o"]).arg(&obj).arg(src);
        for (name, value) in defines {
            gcc.arg(format!("-D{name}={value:#x}"));
        }
        run(&mut gcc);
        if let Some(name) = stem.strip_prefix("elf_") {
            // An ELF file for VMMs that load kernels, linked where Linux's would be.
            run(Command::new("ld")
                .args(["-nostdlib", "-N", "-e", "_start", "-Ttext=0x100000", "-o"])
                .arg(Path::new(&out).join(format!("{name}.elf")))
                .arg(&obj));
            continue;
        }
        run(Command::new("ld")
            .args(["-nostdlib", "-N", "-e", "_start", "--oformat", "binary"])
            .arg(format!("-Ttext={base:#x}"))
            .arg("-o")
            .arg(&bin)
            .arg(&obj));
    }

    build_c_guests(&out, &defines, &names);
    build_rust_guests(&out);
}

/// Rust guests (`guests/rust/*.rs`): `no_std` static libraries compiled for the host
/// target with panic=abort, linked after the same entry stub as the C guests. Their
/// one dependency, `vmcraft-pv-wire` (the ring and blkif wire formats the VMM's back
/// ends use), is compiled first as a crate of its own and passed with `--extern`,
/// as cargo would; the guests are not cargo packages because they link with our own
/// script and runtime.
fn build_rust_guests(out: &str) {
    let out = Path::new(out);
    let wire_src = Path::new("../pv-wire/src");
    println!("cargo:rerun-if-changed={}", wire_src.display());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = std::env::var("TARGET").unwrap();
    let codegen = [
        "-C",
        "panic=abort",
        "-C",
        "opt-level=2",
        "-C",
        "relocation-model=static",
        "-C",
        "debuginfo=0",
    ];
    let wire = out.join("libvmcraft_pv_wire.rlib");
    run(Command::new(&rustc)
        .args(["--edition", "2021", "--crate-type", "rlib"])
        .args(["--crate-name", "vmcraft_pv_wire"])
        .args(codegen)
        .args(["--target", &target, "-o"])
        .arg(&wire)
        .arg(wire_src.join("lib.rs")));
    let mut srcs: Vec<_> = std::fs::read_dir("guests/rust")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    srcs.sort();
    for src in srcs {
        let stem = src.file_stem().unwrap().to_str().unwrap();
        let lib = out.join(format!("lib{stem}.a"));
        run(Command::new(&rustc)
            .args(["--edition", "2021", "--crate-type", "staticlib"])
            .args(["--crate-name", stem])
            .args(codegen)
            .arg("--extern")
            .arg(format!("vmcraft_pv_wire={}", wire.display()))
            .args(["--target", &target, "-o"])
            .arg(&lib)
            .arg(&src));
        link_rust_guest(out, stem, &lib);
    }
    build_independent_driver(out, &target);
}

/// Link the static library `lib` of a Rust guest after the entry stub into
/// `<stem>.bin`. An ELF is linked first and its loadable bytes extracted: `ld
/// --oformat binary` lays out the archive's sections differently from the ELF link.
fn link_rust_guest(out: &Path, stem: &str, lib: &Path) {
    let elf = out.join(format!("{stem}.elf"));
    run(Command::new("ld")
        .args(["-nostdlib", "-N", "--gc-sections", "-T"])
        .arg(out.join("guest.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(out.join("rt_start.o"))
        .arg(lib)
        .arg(out.join("rt_lib.o")));
    run(Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(out.join(format!("{stem}.bin"))));
}

/// The independent driver (`guests/independent`): a cargo package of its own, since
/// it depends on a published crate (`virtio-drivers`, at the version its lock file
/// pins), built with the cargo that runs this script into a target directory beside
/// the workspace's (shared by every profile and by `cargo test`, `clippy` and `doc`,
/// so it compiles once), then linked like the other Rust guests.
///
/// The outer build's flags are not passed on: coverage instrumentation or a wrapper
/// meant for the workspace would break a freestanding guest.
fn build_independent_driver(out: &Path, target: &str) {
    let manifest = Path::new("guests/independent/Cargo.toml");
    // OUT_DIR is <target dir>/[<triple>/]<profile>/build/<package>-<hash>/out.
    let target_dir = out
        .ancestors()
        .nth(4)
        .expect("OUT_DIR is inside a target directory")
        .join("guest-kit-independent-driver");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--locked",
        "--quiet",
        "--manifest-path",
    ])
    .arg(manifest)
    .args(["--target", target, "--target-dir"])
    .arg(&target_dir);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let keep = name == "CARGO_HOME" || name == "CARGO_MAKEFLAGS";
        if (name.starts_with("CARGO_") && !keep)
            || name.starts_with("RUSTC_")
            || name == "RUSTFLAGS"
            || name == "RUSTDOCFLAGS"
            || name == "LLVM_PROFILE_FILE"
        {
            cmd.env_remove(&*name);
        }
    }
    run(&mut cmd);
    let lib = target_dir
        .join(target)
        .join("release")
        .join("libindependent_driver.a");
    link_rust_guest(out, "independent", &lib);
}

/// C guests (`guests/*.c`): freestanding, no SSE, linked after the runtime in
/// `guests/rt` (entry stub, libc bits) by a script that puts the entry first.
fn build_c_guests(out: &str, defines: &[(&str, u64)], names: &[std::path::PathBuf]) {
    let out = Path::new(out);
    println!("cargo:rerun-if-changed=guests/rt");
    let script = out.join("guest.ld");
    std::fs::write(
        &script,
        format!(
            "ENTRY(_start)\nSECTIONS {{\n  . = {:#x};\n  .text : {{ KEEP(*(.entry)) *(.text .text.*) }}\n  \
             .rodata : {{ *(.rodata .rodata.*) }}\n  .data : {{ *(.data .data.* .data.rel.ro*) *(.got .got.*) }}\n  \
             .bss : {{ *(.bss .bss.* COMMON) }}\n  /DISCARD/ : {{ *(.note.*) *(.comment) *(.eh_frame*) }}\n}}\n",
            abi::LOAD_ADDR
        ),
    )
    .unwrap();
    let compile = |src: &Path, obj: &Path| {
        let mut gcc = Command::new("gcc");
        gcc.args([
            "-c",
            "-O2",
            "-std=gnu11",
            "-Wall",
            "-Werror",
            "-ffreestanding",
            "-fno-builtin",
            "-nostdlib",
            "-fno-pic",
            "-fno-pie",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-fcf-protection=none",
            "-Iguests/rt",
            "-o",
        ])
        .arg(obj)
        .arg(src);
        for (name, value) in defines {
            gcc.arg(format!("-D{name}={value:#x}"));
        }
        run(&mut gcc);
    };
    let start = out.join("rt_start.o");
    compile(Path::new("guests/rt/start.S"), &start);
    let lib = out.join("rt_lib.o");
    compile(Path::new("guests/rt/lib.c"), &lib);
    for src in names
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
    {
        let stem = src.file_stem().unwrap().to_str().unwrap();
        let obj = out.join(format!("{stem}.o"));
        compile(src, &obj);
        run(Command::new("ld")
            .args(["-nostdlib", "-N", "--oformat", "binary", "-T"])
            .arg(&script)
            .arg("-o")
            .arg(out.join(format!("{stem}.bin")))
            .arg(&start)
            .arg(&obj)
            .arg(&lib));
    }
}
