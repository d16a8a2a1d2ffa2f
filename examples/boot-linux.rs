//! Boot Linux with a disk: what an embedder of vmcraft writes, whole.
//!
//! ```text
//! cargo run --release --example boot-linux -- --kernel vmlinux --initrd initrd.img \
//!     --disk root.img --cmdline "console=ttyS0 root=/dev/vda"
//! ```
//!
//! The machine is a [`MachineConfig`]: validated, its files opened, configured onto a
//! builder, the kernel loaded, the vCPUs started. COM1 goes to stdout and is kept in
//! a [`SharedBuffer`] too, to say at the end how much the guest printed.

use std::error::Error;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use vmcraft::builder::MachineBuilder;
use vmcraft::config::{BootSource, DeviceConfig, DiskConfig, MachineConfig};
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::vcpu::StopReason;

/// Boot a Linux kernel (an ELF vmlinux boots fastest; a bzImage works too).
#[derive(Parser)]
struct Args {
    /// The kernel
    #[arg(long)]
    kernel: PathBuf,
    /// An initramfs
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// A raw disk image, as virtio-blk (/dev/vda)
    #[arg(long)]
    disk: Option<PathBuf>,
    /// The kernel command line
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
    cmdline: String,
    /// Guest RAM in MiB
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// vCPUs
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Stop the VM after this many seconds
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

/// COM1's output, to stdout as it comes and into a buffer.
struct Tee(SharedBuffer);

impl Write for Tee {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        std::io::stdout().write_all(bytes)?;
        self.0.write(bytes)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    let mut devices = vec![DeviceConfig::VirtioRng];
    if let Some(disk) = args.disk {
        devices.insert(0, DeviceConfig::VirtioBlock(DiskConfig::new(disk)));
    }
    let config = MachineConfig {
        memory_mib: args.mem,
        vcpus: args.vcpus,
        boot: Some(BootSource::Linux {
            kernel: args.kernel,
            initrd: args.initrd,
            cmdline: args.cmdline,
        }),
        devices,
        ..MachineConfig::default()
    };
    config.validate()?;
    let resources = config.open()?;

    let serial = SharedBuffer::new();
    let mut builder = MachineBuilder::for_config(&config, Box::new(Tee(serial.clone())))?;
    builder.configure(&config, resources)?;
    let (loaded, vcpus) = builder.load_configured_linux()?;
    eprintln!(
        "boot-linux: {:?} kernel, entry {:?}",
        loaded.format, loaded.entry
    );
    let machine = builder.start(&vcpus)?;

    let stats = |m: &vmcraft::machine::Machine| m.total_stats();
    while machine
        .wait_stopped(Some(Duration::from_secs(args.timeout)))
        .is_none()
    {
        machine.stop();
    }
    let total = stats(&machine);
    let failure = machine.failure();
    let outcome = machine.wait();
    eprintln!(
        "boot-linux: the guest printed {} bytes on COM1; exits of all vCPUs:\n{total}",
        serial.contents().len()
    );
    match (outcome, failure) {
        (Ok(o), _) if o.reason == StopReason::PowerOff => {
            eprintln!("boot-linux: VM stopped: {}", o.reason);
            Ok(())
        }
        (Ok(o), _) => Err(format!("VM stopped: {}", o.reason).into()),
        // The failure has the cause and the registers; the error, the registers.
        (Err(e), failure) => Err(failure.unwrap_or_else(|| e.to_string()).into()),
    }
}
