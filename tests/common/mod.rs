//! Helpers shared by the KVM integration tests.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmcraft::builder::MachineBuilder;
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::devices::vm_device::bus::{
    MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset,
};
use vmcraft::devices::vm_device::{MutDeviceMmio, MutDevicePio};
use vmcraft::machine::Machine;
use vmcraft::pv_machine::PvUpcall;
use vmcraft::vcpu::VcpuConfig;
use vmcraft_guest_kit::{abi, Guest};

/// Run every thread vmcraft starts from here on under its seccomp filter, with the
/// policy the example VMM uses (a forbidden call kills the test process with SIGSYS).
/// `VMCRAFT_SECCOMP=log` allows and logs such calls instead (the kernel log shows them
/// as audit records of type 1326), for finding what an allowlist misses.
pub fn sandboxed() {
    let on_violation = match std::env::var("VMCRAFT_SECCOMP").as_deref() {
        Ok("log") => vmcraft::sandbox::Violation::Log,
        _ => vmcraft::sandbox::Violation::KillProcess,
    };
    vmcraft::sandbox::enable(vmcraft::sandbox::Policy {
        on_violation,
        ..Default::default()
    })
    .expect("the seccomp filters install");
}

/// A machine builder with `bytes` of RAM and its serial output to `out`, its threads
/// under the seccomp filters ([`sandboxed`]).
pub fn machine_builder(bytes: u64, out: Box<dyn std::io::Write + Send>) -> MachineBuilder {
    sandboxed();
    MachineBuilder::new(bytes, out).unwrap()
}

/// Fail with a clear message when /dev/kvm is missing or inaccessible.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test runs real guests and needs /dev/kvm (read-write): {e}");
    }
}

/// Records every write (address, bytes) and answers byte i of a w-byte read with
/// 0x10*w + i + 1.
#[derive(Default)]
pub struct TestDevice {
    pub writes: Vec<(u64, Vec<u8>)>,
}

fn pattern(data: &mut [u8]) {
    let w = data.len() as u8;
    for (i, b) in data.iter_mut().enumerate() {
        *b = 0x10 * w + i as u8 + 1;
    }
}

impl MutDevicePio for TestDevice {
    fn pio_read(&mut self, _: PioAddress, _: PioAddressOffset, data: &mut [u8]) {
        pattern(data)
    }
    fn pio_write(&mut self, base: PioAddress, off: PioAddressOffset, data: &[u8]) {
        self.writes.push((u64::from(base.0 + off), data.to_vec()));
    }
}

impl MutDeviceMmio for TestDevice {
    fn mmio_read(&mut self, _: MmioAddress, _: MmioAddressOffset, data: &mut [u8]) {
        pattern(data)
    }
    fn mmio_write(&mut self, base: MmioAddress, off: MmioAddressOffset, data: &[u8]) {
        self.writes.push((base.0 + off, data.to_vec()));
    }
}

/// A VM with the legacy devices and the test device, ready to start.
pub struct TestVm {
    pub builder: MachineBuilder,
    pub serial: SharedBuffer,
    pub test_device: Arc<Mutex<TestDevice>>,
}

impl TestVm {
    pub fn new(guest: Guest) -> TestVm {
        require_kvm();
        let serial = SharedBuffer::new();
        let mut builder = machine_builder(16 << 20, Box::new(serial.clone()));
        let test_device = Arc::new(Mutex::new(TestDevice::default()));
        let buses = builder.buses_mut();
        buses
            .register_pio(abi::TEST_PORT, 8, test_device.clone())
            .unwrap();
        buses
            .register_mmio(abi::TEST_MMIO, 0x1000, test_device.clone())
            .unwrap();
        if guest.entry(0, 0).needs_boot_tables() {
            builder.reserve_boot_tables().unwrap();
        }
        builder.load(guest.image()).unwrap();
        TestVm {
            builder,
            serial,
            test_device,
        }
    }

    pub fn start(self, entries: &[VcpuConfig]) -> (Machine, SharedBuffer, Arc<Mutex<TestDevice>>) {
        let machine = self.builder.start(entries).unwrap();
        (machine, self.serial, self.test_device)
    }
}

pub fn one(guest: Guest, param: u64) -> Vec<VcpuConfig> {
    vec![VcpuConfig::at(guest.entry(0, param))]
}

/// Poll `f` until it is true or `secs` pass.
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    f()
}

pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A hypercall test rig: a VM being assembled (guest RAM, the legacy devices, COM1
/// into `serial`) with an empty hypercall table and the CPUID leaves to announce it;
/// add hypercalls to `hypercalls`, then [`HypercallRig::start`].
pub struct HypercallRig {
    pub builder: MachineBuilder,
    pub hypercalls: vmcraft::pv::hypercall::HypercallTable,
    /// What the hypervisor CPUID leaves say: vmcraft's signature and the hypercall port.
    pub cpuid: vmcraft::vcpu::cpu::HypervisorInfo,
    pub serial: SharedBuffer,
}

impl HypercallRig {
    pub fn new(mem_mib: u64) -> HypercallRig {
        require_kvm();
        let serial = SharedBuffer::new();
        HypercallRig {
            builder: machine_builder(mem_mib << 20, Box::new(serial.clone())),
            hypercalls: vmcraft::pv::hypercall::HypercallTable::new(),
            cpuid: vmcraft::vcpu::cpu::HypervisorInfo {
                hypercall_port: abi::HYPERCALL_PORT,
                ..Default::default()
            },
            serial,
        }
    }

    pub fn memory(&self) -> &vmcraft::memory::GuestMemory {
        self.builder.memory()
    }

    /// Start the PV backends on this machine's memory and hypercall table (layout
    /// [`vmcraft_guest_kit::PV_LAYOUT`]): console output into `console`, block device
    /// on `disk`, upcalls through `upcall`, and the doorbell port on the machine's
    /// buses. Keep the result alive while the guest runs.
    pub fn pv_backends(
        &mut self,
        disk: std::fs::File,
        console: Box<dyn std::io::Write + Send>,
        upcall: Arc<dyn vmcraft::pv::evtchn::Upcall>,
    ) -> Arc<vmcraft::pv_machine::PvBackends> {
        self.builder
            .add_pv(pv_devices(disk, console), PvUpcall::Custom(upcall))
            .unwrap()
    }

    /// Load `guest` and start it on one vCPU with `param`, hypercalls served on the
    /// port `cpuid` names (and advertised there). The table comes back so its
    /// counters can be read.
    pub fn start(
        self,
        guest: Guest,
        param: u64,
    ) -> (Machine, Arc<vmcraft::pv::hypercall::HypercallTable>) {
        let mut builder = self.builder;
        builder.load(guest.image()).unwrap();
        builder
            .hypercalls(self.cpuid.hypercall_port, self.hypercalls)
            .unwrap();
        builder.hypervisor_info(self.cpuid);
        let machine = builder
            .start(&[VcpuConfig::at(guest.entry(0, param))])
            .unwrap();
        let table = machine.hypercalls().unwrap();
        (machine, table)
    }
}

/// A scratch disk image of `bytes` under a unique name, removed on drop.
pub struct ScratchImage(vmm_sys_util::tempfile::TempFile);

impl ScratchImage {
    pub fn new(name: &str, bytes: u64) -> ScratchImage {
        let prefix = std::env::temp_dir().join(format!("vmcraft-{name}"));
        let image = vmm_sys_util::tempfile::TempFile::new_with_prefix(prefix).unwrap();
        image.as_file().set_len(bytes).unwrap();
        ScratchImage(image)
    }

    pub fn path(&self) -> &std::path::Path {
        self.0.as_path()
    }

    /// Another read-write handle to the image.
    pub fn file(&self) -> std::fs::File {
        self.0.as_file().try_clone().unwrap()
    }

    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(self.path()).unwrap()
    }
}

/// A VM running `guest` (parameter `param`) with COM1 output in the returned buffer
/// and `devices` behind virtio-mmio windows 0, 1, ... (the builder's order).
pub struct VirtioVm {
    pub running: Machine,
    pub serial: SharedBuffer,
    pub transports: Vec<Arc<Mutex<vmcraft::devices::virtio::mmio::MmioTransport>>>,
}

pub fn start_virtio_vm(
    guest: Guest,
    param: u64,
    devices: Vec<Box<dyn vmcraft::devices::virtio::VirtioDevice>>,
) -> VirtioVm {
    require_kvm();
    let serial = SharedBuffer::new();
    let mut builder = machine_builder(16 << 20, Box::new(serial.clone()));
    for device in devices {
        builder.add_virtio(device).unwrap();
    }
    builder.load(guest.image()).unwrap();
    let machine = builder
        .start(&[VcpuConfig::at(guest.entry(0, param))])
        .unwrap();
    VirtioVm {
        transports: machine
            .virtio()
            .iter()
            .map(|s| s.transport.clone())
            .collect(),
        running: machine,
        serial,
    }
}

/// Keeps every warning and error the library logs (the first 100,000).
struct WarningRecorder(Mutex<Vec<String>>);

impl log::Log for WarningRecorder {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let mut lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if lines.len() < 100_000 {
                lines.push(format!("{}: {}", record.level(), record.args()));
            }
        }
    }
    fn flush(&self) {}
}

static WARNINGS: WarningRecorder = WarningRecorder(Mutex::new(Vec::new()));

/// From now on, keep the warnings and errors logged anywhere in this test process
/// (the logger is process-wide: a test binary that reads them should hold one test,
/// or read only lines its own test causes).
pub fn record_warnings() {
    let _ = log::set_logger(&WARNINGS);
    log::set_max_level(log::LevelFilter::Warn);
}

/// The warnings and errors logged since [`record_warnings`], as `LEVEL: message`.
pub fn logged_warnings() -> Vec<String> {
    WARNINGS.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Put the PV backends (layout [`vmcraft_guest_kit::PV_LAYOUT`], block device on
/// `disk`, console output to `console`) on `b`, with their hypercall table and
/// doorbell, saved with the machine in snapshots and migrations as part `pv`.
pub fn add_pv(
    b: &mut MachineBuilder,
    disk: std::fs::File,
    console: Box<dyn std::io::Write + Send>,
) -> Arc<vmcraft::pv_machine::PvBackends> {
    let upcall = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    b.add_pv(
        pv_devices(disk, console),
        PvUpcall::Custom(Arc::new(upcall)),
    )
    .unwrap()
}

/// The PV devices of vmcraft's PV guests (layout [`vmcraft_guest_kit::PV_LAYOUT`]).
pub fn pv_devices(
    disk: std::fs::File,
    console: Box<dyn std::io::Write + Send>,
) -> vmcraft::pv_machine::PvDevices {
    vmcraft::pv_machine::PvDevices {
        layout: vmcraft_guest_kit::PV_LAYOUT,
        disk,
        read_only: false,
        console,
    }
}

/// Start the memcheck guest over `mib` MiB for `rounds` rounds, COM1 into `serial`,
/// in a VM with 32 MiB to spare.
pub fn start_memcheck(serial: &SharedBuffer, mib: u64, rounds: u64) -> Machine {
    let mut b = machine_builder((mib + 32) << 20, Box::new(serial.clone()));
    let guest = Guest::MEMCHECK;
    b.load(guest.image()).unwrap();
    b.start(&[VcpuConfig::at(guest.entry(0, mib | rounds << 16))])
        .unwrap()
}

/// Wait (at most two minutes) for `m`'s guest to exit with code 0; the failure says
/// what COM1 (`serial`) and the library's warnings said.
pub fn finish(m: Machine, serial: &SharedBuffer, what: &str) {
    let outcome = m.run_for(Duration::from_secs(120)).unwrap();
    assert_eq!(
        outcome.reason,
        vmcraft_guest_kit::exited(0),
        "{what}: {}\nwarnings: {:?}",
        String::from_utf8_lossy(&serial.contents()),
        logged_warnings()
    );
}

/// The file at `path`, open for reading and writing.
pub fn open_rw(path: &std::path::Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

/// A guest that keeps block requests in flight on a disk, for snapshot and migration
/// tests: blkcheck on virtio-blk, pvcheck on the PV channel, or ata_bench's check
/// rounds on the emulated ATA disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskGuest {
    /// Batches of virtio-blk requests.
    VirtioBlk,
    /// Batches of blkif requests through grants and event channels.
    Pv,
    /// Sectors through the emulated ATA disk's task file and data port.
    Ata,
}

impl DiskGuest {
    /// `rounds` of a virtio or PV guest, as rounds of this one: an ATA round moves its
    /// 8 KiB a word per port access, and takes about as long as 20 of theirs.
    pub fn rounds(self, rounds: u64) -> u64 {
        match self {
            DiskGuest::Ata => rounds.div_ceil(20),
            _ => rounds,
        }
    }

    /// The output of an undisturbed run of `rounds` rounds.
    pub fn expected(self, rounds: u64) -> String {
        match self {
            DiskGuest::VirtioBlk => vmcraft_guest_kit::blkcheck_output(rounds),
            DiskGuest::Pv => vmcraft_guest_kit::pvcheck_output(rounds),
            DiskGuest::Ata => vmcraft_guest_kit::atacheck_output(rounds),
        }
    }

    /// Put its disk device, on the image at `path`, on `b` (the PV backends as the
    /// snapshot part `pv`).
    pub fn attach(self, b: &mut MachineBuilder, path: &std::path::Path) {
        match self {
            DiskGuest::VirtioBlk => {
                let disk = vmcraft::devices::virtio::block::Disk::new(open_rw(path), false, "test")
                    .unwrap();
                b.add_virtio(Box::new(vmcraft::devices::virtio::block::Block::new(
                    disk, "vblk0",
                )))
                .unwrap();
            }
            DiskGuest::Pv => {
                add_pv(b, open_rw(path), Box::new(std::io::sink()));
            }
            DiskGuest::Ata => {
                use vmcraft::devices::ata::AtaDisk;
                let ata = Arc::new(AtaDisk::new(open_rw(path), false).unwrap());
                b.buses_mut()
                    .register_pio(AtaDisk::COMMAND_BASE, 8, ata.clone())
                    .unwrap();
                b.buses_mut()
                    .register_pio(AtaDisk::CONTROL_BASE, 1, ata.clone())
                    .unwrap();
                b.add_snapshot_part("ata", ata);
            }
        }
    }

    /// Start it for `rounds` rounds on the image at `path` in a 32 MiB VM, COM1 into
    /// `serial`.
    pub fn start(self, serial: &SharedBuffer, path: &std::path::Path, rounds: u64) -> Machine {
        let mut b = machine_builder(32 << 20, Box::new(serial.clone()));
        self.attach(&mut b, path);
        let (guest, param) = match self {
            DiskGuest::VirtioBlk => (Guest::BLKCHECK, 1 | rounds << 16),
            DiskGuest::Pv => (Guest::PVCHECK, rounds << 16),
            DiskGuest::Ata => (Guest::ATA_BENCH, 8 | rounds << 16),
        };
        b.load(guest.image()).unwrap();
        b.start(&[VcpuConfig::at(guest.entry(0, param))]).unwrap()
    }
}

/// The path of example `name`, built (with the other examples) on first use.
pub fn example(name: &str) -> std::path::PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let profile_dir = BUILT_WITH.profile_dir();
    // `cargo test` builds examples, but `cargo test --test NAME` alone does not,
    // and a stale binary would test old code: let cargo bring it up to date.
    BUILT.call_once(|| cargo_build(&["--example", "minimal-vmm", "--example", "custom-device"]));
    profile_dir.join("examples").join(name)
}

/// The path of the vhost-user backend binary (`vmcraft-vhost-user-backend`, a
/// package of the workspace), built on first use as this test was.
pub fn vhost_user_backend() -> std::path::PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        cargo_build(&[
            "--package",
            "vmcraft-vhost-user-backend",
            "--bin",
            "vmcraft-vhost-user-backend",
        ])
    });
    BUILT_WITH.profile_dir().join("vmcraft-vhost-user-backend")
}

/// Where and how this test was built.
struct BuiltWith;

const BUILT_WITH: BuiltWith = BuiltWith;

impl BuiltWith {
    /// `<target dir>[/<triple>]/<profile>`.
    fn profile_dir(&self) -> std::path::PathBuf {
        // Integration tests live in <target dir>[/<triple>]/<profile>/deps, examples in
        // <profile>/examples beside them. The target directory is wherever this test was
        // built (cargo-llvm-cov, for one, builds into its own), so the examples are built
        // there too, with the same profile and triple.
        let exe = std::env::current_exe().unwrap();
        exe.parent().unwrap().parent().unwrap().to_path_buf()
    }

    /// The target directory and the triple, if one was given.
    fn target(&self) -> (std::path::PathBuf, Option<String>) {
        let profile_dir = self.profile_dir();
        let above = profile_dir.parent().unwrap();
        // A target directory is marked by the CACHEDIR.TAG cargo writes into it.
        if above.join("CACHEDIR.TAG").exists() {
            (above.to_path_buf(), None)
        } else {
            let triple = above.file_name().unwrap().to_str().unwrap().to_owned();
            (above.parent().unwrap().to_path_buf(), Some(triple))
        }
    }
}

/// `cargo build --quiet ARGS` into the target directory, profile and triple this test
/// was built with.
fn cargo_build(args: &[&str]) {
    let profile_dir = BUILT_WITH.profile_dir();
    let profile = profile_dir
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let (target_dir, triple) = BUILT_WITH.target();
    let mut cargo = std::process::Command::new(env!("CARGO"));
    cargo
        .args(["build", "--quiet"])
        .args(args)
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cargo.arg("--release");
        }
        other => {
            cargo.args(["--profile", other]);
        }
    }
    if let Some(triple) = &triple {
        cargo.args(["--target", triple]);
    }
    assert!(
        cargo.status().unwrap().success(),
        "cargo build {args:?} failed"
    );
}
