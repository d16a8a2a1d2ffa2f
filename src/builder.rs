//! One way to put a VM together: guest RAM, the PC's legacy devices, virtio-mmio devices
//! with their windows, interrupt lines, Linux command-line entries and ACPI
//! descriptions, an optional hypercall table, and the vCPUs.
//!
//! ```no_run
//! use vmcraft::builder::MachineBuilder;
//! use vmcraft::devices::virtio::rng::Rng;
//! use vmcraft::vcpu::{mode::{Entry, Privilege}, VcpuConfig};
//!
//! let mut b = MachineBuilder::new(64 << 20, Box::new(std::io::stdout()))?;
//! let rng = b.add_virtio(Box::new(Rng::new("vrng")))?; // window, IRQ, cmdline, ACPI
//! println!("virtio-rng at {:#x}, IRQ {}", rng.base, rng.irq);
//! // ... load a guest with b.load(image) ...
//! let entry = Entry::LongMode { rip: 0x10_0000, rsp: 0x8_0000, privilege: Privilege::Kernel, args: [0, 0] };
//! let machine = b.start(&[VcpuConfig::at(entry)])?;
//! let outcome = machine.wait()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};
use vmcraft_devices::bus::IoBuses;
use vmcraft_devices::irq::{IrqAllocator, IrqError};
use vmcraft_devices::serial::{COM1_BASE, COM1_IRQ};
use vmcraft_devices::stop::StopLatch;
use vmcraft_devices::virtio::mmio::{MmioTransport, WINDOW_SIZE};
use vmcraft_devices::virtio::VirtioDevice;
use vmcraft_memory::layout::{Image, LayoutError, MemoryLayout, MMIO_GAP_RESERVED_START};
use vmcraft_memory::mmio::MmioAllocator;
use vmcraft_memory::{GuestMemory, GuestRam, MemoryError};
use vmcraft_pv_hypercall::hypercall::HypercallTable;
use vmcraft_vcpu::cpu::HypervisorInfo;
use vmcraft_vcpu::linux::{
    load_linux, BootImage, E820Entry, LinuxError, LoadedKernel, BOOT_PARAMS_RANGE, CMDLINE_ADDR,
};
use vmcraft_vcpu::mode::boot_table_ranges;
use vmcraft_vcpu::{ExitHandler, RunningVm, VcpuConfig, Vm, VmCreateError, VmError};

use crate::acpi::{AcpiDevice, AcpiError, MachineDescription, TABLES_ADDR};
use crate::machine::{
    attach_virtio_mmio, BusExitHandler, HypercallExitHandler, LegacyDeviceError, LegacyDevices,
    VirtioAttachError, HYPERCALL_PORT,
};
use crate::snapshot::SnapshotPart;

pub use crate::machine::{Machine, MachineParts};

/// Where the first virtio-mmio window goes; the next ones follow, one 4 KiB window
/// each (vmcraft's test guests expect device `n` at `VIRTIO_MMIO_BASE + n * 0x1000`).
pub const VIRTIO_MMIO_BASE: u64 = 0xd100_0000;

/// Errors from building or starting a machine.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The memory size was refused.
    #[error("cannot lay out {0} bytes of guest RAM")]
    Layout(u64, #[source] LayoutError),
    /// Guest RAM could not be mapped.
    #[error("cannot map guest RAM")]
    Memory(#[source] MemoryError),
    /// The KVM VM could not be created.
    #[error("cannot create the VM")]
    Vm(#[source] VmCreateError),
    /// The legacy devices could not be installed.
    #[error("cannot install the legacy devices")]
    Legacy(#[source] LegacyDeviceError),
    /// No interrupt line for a device, or a reserved one was taken.
    #[error("interrupt lines")]
    Irq(#[source] IrqError),
    /// A virtio device could not be attached.
    #[error("cannot attach virtio device {index} at {base:#x}")]
    Virtio {
        /// Its position among the virtio devices.
        index: usize,
        /// Its window.
        base: u64,
        /// What failed.
        #[source]
        source: VirtioAttachError,
    },
    /// The ACPI tables could not be built or written.
    #[error("ACPI tables")]
    Acpi(#[source] AcpiError),
    /// The kernel could not be loaded.
    #[error("cannot load the kernel")]
    Linux(#[source] LinuxError),
    /// Two owners claim one range of guest RAM (an image loaded over the boot
    /// tables, say), or a range is outside RAM.
    #[error("guest RAM")]
    Reserve(#[source] LayoutError),
    /// An image could not be written to guest memory.
    #[error("cannot load {name} at {addr:#x}")]
    Load {
        /// The image.
        name: &'static str,
        /// Its load address.
        addr: u64,
        /// What failed.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The vCPUs could not be started.
    #[error("cannot start the vCPUs")]
    Start(#[source] VmError),
    /// The ACPI tables describe another number of vCPUs than were started.
    #[error("the kernel was told of {described} vCPUs, {started} were started")]
    VcpuCount {
        /// In the ACPI tables ([`MachineBuilder::load_linux`]).
        described: u32,
        /// Given to [`MachineBuilder::start`].
        started: usize,
    },
    /// No guest-physical window is left (or the range is refused).
    #[error("MMIO windows")]
    Windows(#[source] vmcraft_memory::mmio::MmioAllocError),
    /// Two parts of the machine serve one hypercall number.
    #[error("hypercalls")]
    Hypercalls(#[source] vmcraft_pv_hypercall::hypercall::TableError),
    /// The PV backends could not be set up.
    #[error("the PV backends")]
    Pv(#[source] crate::pv_machine::PvError),
    /// A host resource a device needs (an eventfd, an interrupt route).
    #[error("cannot set up {what}")]
    Host {
        /// What was being set up.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Where [`MachineBuilder::add_virtio`] put a device.
#[derive(Debug, Clone)]
pub struct VirtioSlot {
    /// The window's guest-physical base.
    pub base: u64,
    /// Its interrupt line.
    pub irq: u32,
    /// The transport (status, negotiated features, errors).
    pub transport: Arc<Mutex<MmioTransport>>,
}

impl VirtioSlot {
    /// The transport, locked (a poisoned lock is taken over: the transport's state is
    /// consistent between register accesses).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, MmioTransport> {
        self.transport.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The virtio device type behind each of `slots`.
pub(crate) fn virtio_types(slots: &[VirtioSlot]) -> Vec<u32> {
    slots.iter().map(|s| s.lock().device_type()).collect()
}

/// A VM being assembled. See the [module documentation](self).
pub struct MachineBuilder {
    layout: MemoryLayout,
    vm: Vm,
    buses: IoBuses,
    stop: Arc<StopLatch>,
    legacy: LegacyDevices,
    irqs: IrqAllocator,
    /// Guest-physical windows for MMIO devices, from [`VIRTIO_MMIO_BASE`] to the
    /// IOAPIC's and LAPIC's pages.
    windows: MmioAllocator,
    virtio: Vec<VirtioSlot>,
    hypercalls: Option<HypercallTable>,
    /// Whether the table serves Xen hypercall exits (else the hypercall port).
    xen_hypercalls: bool,
    info: HypervisorInfo,
    parts: Vec<(String, Arc<dyn SnapshotPart>)>,
    e820_carved: Vec<E820Entry>,
    /// What [`configure`](Self::configure) built, carried into the machine.
    configured: Configured,
    /// The vCPUs the ACPI tables describe, once [`load_linux`](Self::load_linux)
    /// wrote them: [`start`](Self::start) must start as many.
    described_vcpus: Option<u32>,
    /// The PCI bus, once a function is on it.
    pci: Option<crate::pci_machine::PciBus>,
}

/// What a configured machine holds beyond its buses: its configuration (saved in
/// snapshots), the boot files, and the handles of devices that are driven from
/// outside (the balloon) or run services (Xen's).
#[derive(Default)]
pub(crate) struct Configured {
    pub(crate) config: Option<crate::config::MachineConfig>,
    pub(crate) boot_files: Option<(File, Option<File>)>,
    pub(crate) balloon: Option<Arc<vmcraft_devices::virtio::balloon::BalloonControl>>,
    pub(crate) xen: Option<Arc<crate::xen_hvm::XenPlatform>>,
    /// Every virtio device's name (its kind and number, `block0`) and interrupt,
    /// whose counters a metrics file reports.
    pub(crate) virtio_counters: Vec<(String, Arc<vmcraft_devices::virtio::Interrupt>)>,
    /// The virtio-blk disks, by their index in the configuration's devices, with
    /// the image each serves now (a replaced disk's differs from the configuration's).
    pub(crate) disks: Vec<ConfiguredDisk>,
}

/// A virtio-blk disk of a configured machine.
pub(crate) struct ConfiguredDisk {
    pub(crate) device: usize,
    pub(crate) slot: vmcraft_devices::virtio::block::DiskSlot,
    pub(crate) path: std::sync::Mutex<std::path::PathBuf>,
}

impl MachineBuilder {
    pub(crate) fn pci(&self) -> Option<&crate::pci_machine::PciBus> {
        self.pci.as_ref()
    }

    pub(crate) fn pci_mut(&mut self) -> &mut Option<crate::pci_machine::PciBus> {
        &mut self.pci
    }

    pub(crate) fn configured_mut(&mut self) -> &mut Configured {
        &mut self.configured
    }

    pub(crate) fn configured(&self) -> &Configured {
        &self.configured
    }
}

impl std::fmt::Debug for MachineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineBuilder")
            .field("layout", &self.layout)
            .field("virtio", &self.virtio.len())
            .field("hypercalls", &self.hypercalls.is_some())
            .finish_non_exhaustive()
    }
}

impl MachineBuilder {
    /// A VM with `memory_bytes` of RAM and the legacy devices (COM1 writing to
    /// `serial_out`, the i8042, the RTC, the ACPI power registers, the debug-exit
    /// port).
    pub fn new(memory_bytes: u64, serial_out: Box<dyn Write + Send>) -> Result<Self, BuildError> {
        let layout =
            MemoryLayout::x86_64(memory_bytes).map_err(|e| BuildError::Layout(memory_bytes, e))?;
        let ram = GuestRam::new(&layout).map_err(BuildError::Memory)?;
        Self::with_ram(layout, ram, serial_out)
    }

    /// [`MachineBuilder::new`] with the RAM `config` asks for: its size, shared from
    /// a memory file when it has vhost-user devices or asks for shared memory
    /// ([`MachineConfig::memory_is_shared`](crate::config::MachineConfig::memory_is_shared)).
    /// Then [`configure`](Self::configure) it with the same configuration.
    pub fn for_config(
        config: &crate::config::MachineConfig,
        serial_out: Box<dyn Write + Send>,
    ) -> Result<Self, BuildError> {
        let bytes = config.memory_bytes();
        let layout = MemoryLayout::x86_64(bytes).map_err(|e| BuildError::Layout(bytes, e))?;
        let ram =
            GuestRam::for_layout(&layout, config.memory_is_shared()).map_err(BuildError::Memory)?;
        Self::with_ram(layout, ram, serial_out)
    }

    /// [`MachineBuilder::new`] on guest RAM of the caller's making (restored from a
    /// snapshot, say), laid out as `layout`.
    pub fn with_ram(
        layout: MemoryLayout,
        ram: GuestRam,
        serial_out: Box<dyn Write + Send>,
    ) -> Result<Self, BuildError> {
        let vm = Vm::new(ram).map_err(BuildError::Vm)?;
        let stop = Arc::new(StopLatch::default());
        let mut buses = IoBuses::new();
        let legacy = LegacyDevices::install(&mut buses, vm.fd(), serial_out, stop.clone())
            .map_err(BuildError::Legacy)?;
        Ok(MachineBuilder {
            layout,
            vm,
            buses,
            stop,
            legacy,
            irqs: IrqAllocator::pc(),
            windows: MmioAllocator::new(
                VIRTIO_MMIO_BASE,
                MMIO_GAP_RESERVED_START - VIRTIO_MMIO_BASE,
            )
            .map_err(BuildError::Windows)?,
            virtio: Vec::new(),
            hypercalls: None,
            xen_hypercalls: false,
            info: HypervisorInfo::default(),
            parts: Vec::new(),
            e820_carved: Vec::new(),
            configured: Configured::default(),
            described_vcpus: None,
            pci: None,
        })
    }

    /// The latch through which devices (and hypercalls) ask the VM to stop.
    pub fn stop_latch(&self) -> Arc<StopLatch> {
        self.stop.clone()
    }

    /// The VM (its memory, its KVM file descriptor).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The VM, mutably (guest RAM's dirty logging).
    pub fn vm_mut(&mut self) -> &mut Vm {
        &mut self.vm
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        self.vm.memory()
    }

    /// The memory layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The legacy devices (COM1, for its input).
    pub fn legacy(&self) -> &LegacyDevices {
        &self.legacy
    }

    /// The buses, to attach devices of your own.
    pub fn buses_mut(&mut self) -> &mut IoBuses {
        &mut self.buses
    }

    /// The buses and the VM at once (a device that registers ioeventfds in KVM as it
    /// goes on the bus, such as `PvBackends::attach_doorbell`).
    pub fn buses_and_vm(&mut self) -> (&mut IoBuses, &Vm) {
        (&mut self.buses, &self.vm)
    }

    /// The virtio device type behind each window so far, in order.
    pub fn virtio_types(&self) -> Vec<u32> {
        virtio_types(&self.virtio)
    }

    /// Save and restore `part` with this machine in snapshots and migrations, as
    /// section `part-<name>` (the same name in the machine restored).
    pub fn add_snapshot_part(&mut self, name: &str, part: Arc<dyn SnapshotPart>) {
        self.parts.push((name.to_owned(), part));
    }

    /// The names of the parts added with [`MachineBuilder::add_snapshot_part`].
    pub fn snapshot_parts(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().map(|(n, _)| n.as_str())
    }

    /// Every part of the machine being built with its section
    /// ([`crate::snapshot::SnapshotPart`]).
    pub(crate) fn machine_parts(&self) -> Vec<(String, Arc<dyn SnapshotPart>)> {
        crate::snapshot::machine_parts(&self.legacy, &self.virtio, &self.parts)
    }

    /// The virtio devices added so far.
    pub fn virtio_slots(&self) -> &[VirtioSlot] {
        &self.virtio
    }

    /// Whether a hypercall table was given ([`MachineBuilder::hypercalls`]).
    pub fn serves_hypercalls(&self) -> bool {
        self.hypercalls.is_some()
    }

    /// A guest-physical window of `size` bytes aligned to `align` for an MMIO device
    /// of the embedder's, from the same allocator as the virtio windows (so they
    /// never overlap).
    pub fn allocate_mmio(&mut self, size: u64, align: u64) -> Result<u64, BuildError> {
        self.windows
            .allocate(size, align)
            .map_err(BuildError::Windows)
    }

    /// Keep interrupt line `irq` away from [`MachineBuilder::add_virtio`] (a device
    /// wired by hand).
    pub fn reserve_irq(&mut self, irq: u32) -> Result<(), BuildError> {
        self.irqs.reserve(irq).map_err(BuildError::Irq)
    }

    /// Attach `device` behind a virtio-mmio transport in the next free 4 KiB window
    /// from [`VIRTIO_MMIO_BASE`], on the next free interrupt line. Its Linux
    /// command-line entry and ACPI description come with it. If the device cannot
    /// start on the host's side, the VM stops with `StopReason::DeviceFailed`.
    pub fn add_virtio(&mut self, device: Box<dyn VirtioDevice>) -> Result<VirtioSlot, BuildError> {
        let index = self.virtio.len();
        let base = self.allocate_mmio(WINDOW_SIZE, WINDOW_SIZE)?;
        let irq = self.irqs.allocate().map_err(BuildError::Irq)?;
        let transport = attach_virtio_mmio(
            &mut self.buses,
            self.vm.fd(),
            self.vm.memory(),
            base,
            irq,
            device,
        )
        .map_err(|source| BuildError::Virtio {
            index,
            base,
            source,
        })?;
        transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop_vm_on_host_failure(self.stop.clone());
        let slot = VirtioSlot {
            base,
            irq,
            transport,
        };
        self.virtio.push(slot.clone());
        Ok(slot)
    }

    /// Serve hypercalls on `port` from `table` (together with those already
    /// registered, by [`add_pv`](Self::add_pv) say: a number served twice is an
    /// error), and advertise the port in the CPUID leaf 0x40000001 (one setting for
    /// both).
    pub fn hypercalls(&mut self, port: u16, table: HypercallTable) -> Result<(), BuildError> {
        self.info.hypercall_port = port;
        self.absorb_hypercalls(table)
    }

    /// Serve Xen hypercalls from `table` (with those already registered): the exits
    /// KVM's Xen support makes of them (see [`vmcraft_vcpu::xen`]; the caller has
    /// enabled it), with linear-address arguments. No hypercall port.
    pub fn xen_hypercalls(&mut self, table: HypercallTable) -> Result<(), BuildError> {
        self.info.hypercall_port = 0;
        self.xen_hypercalls = true;
        self.absorb_hypercalls(table)
    }

    /// The table of hypercalls this machine serves, to register more in: created
    /// empty on first use, served on [`HYPERCALL_PORT`] (advertised in CPUID) unless
    /// a port or Xen's hypercalls were chosen.
    pub fn hypercall_table(&mut self) -> &mut HypercallTable {
        if self.hypercalls.is_none() && !self.xen_hypercalls && self.info.hypercall_port == 0 {
            self.info.hypercall_port = HYPERCALL_PORT;
        }
        self.hypercalls.get_or_insert_with(HypercallTable::new)
    }

    fn absorb_hypercalls(&mut self, table: HypercallTable) -> Result<(), BuildError> {
        match &mut self.hypercalls {
            Some(served) => served.absorb(table).map_err(BuildError::Hypercalls),
            None => {
                self.hypercalls = Some(table);
                Ok(())
            }
        }
    }

    /// Give `[entry.addr, entry.addr + entry.size)` of guest RAM the e820 type
    /// `entry.kind` in the memory map [`load_linux`](Self::load_linux) passes (Linux
    /// then leaves it alone, or uses it as that type says), reserving it for `name`.
    pub fn carve_e820(&mut self, name: &'static str, entry: E820Entry) -> Result<(), BuildError> {
        self.reserve(name, entry.addr, entry.size)?;
        self.e820_carved.push(entry);
        Ok(())
    }

    /// What the hypervisor CPUID leaves say besides the hypercall port (the
    /// signature, the version).
    pub fn hypervisor_info(&mut self, info: HypervisorInfo) {
        let port = self.info.hypercall_port;
        self.info = HypervisorInfo {
            hypercall_port: port,
            ..info
        };
    }

    /// The kernel command-line entries of the virtio devices, for kernels built with
    /// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` (stock kernels find them in the DSDT).
    pub fn virtio_cmdline(&self) -> String {
        self.virtio
            .iter()
            .map(|s| format!(" virtio_mmio.device=4K@{:#x}:{}", s.base, s.irq))
            .collect()
    }

    /// The ACPI description of this machine with `vcpus` vCPUs.
    pub fn acpi(&self, vcpus: u32) -> MachineDescription {
        let mut devices = vec![
            AcpiDevice::Serial {
                port: COM1_BASE,
                irq: COM1_IRQ,
            },
            AcpiDevice::I8042,
            AcpiDevice::Rtc,
        ];
        devices.extend(self.virtio.iter().map(|s| AcpiDevice::VirtioMmio {
            base: s.base,
            size: WINDOW_SIZE,
            irq: s.irq,
        }));
        if let Some(pci) = &self.pci {
            devices.push(AcpiDevice::PciHostBridge {
                ecam: pci.ecam,
                window: pci.window,
                window_size: crate::pci_machine::BAR_WINDOW_SIZE,
            });
        }
        MachineDescription { vcpus, devices }
    }

    /// Load `image` into guest RAM, reserving its range first: an image that
    /// overlaps another, or the boot tables of [`start`](Self::start)'s entries, is
    /// an error ([`BuildError::Reserve`]) instead of one overwriting the other.
    ///
    /// Bytes written through [`memory`](Self::memory) directly are not checked.
    pub fn load(&mut self, image: Image<'_>) -> Result<(), BuildError> {
        self.reserve(image.name, image.addr, image.bytes.len() as u64)?;
        self.vm
            .memory()
            .write_slice(image.bytes, GuestAddress(image.addr))
            .map_err(|source| BuildError::Load {
                name: image.name,
                addr: image.addr,
                source,
            })
    }

    /// Reserve `[start, start + size)` of guest RAM for `name` (see
    /// [`MemoryLayout::reserve`]).
    pub fn reserve(&mut self, name: &'static str, start: u64, size: u64) -> Result<(), BuildError> {
        self.layout
            .reserve(name, start, size)
            .map_err(BuildError::Reserve)
    }

    /// Reserve the boot tables' ranges ([`boot_table_ranges`]), which vCPUs entering
    /// in protected or long mode need. [`start`](Self::start) does it when its entries
    /// need them; a program that runs the vCPUs itself (after
    /// [`into_parts`](Self::into_parts)) calls it before loading its images.
    pub fn reserve_boot_tables(&mut self) -> Result<(), BuildError> {
        for r in boot_table_ranges() {
            if self.layout.reservations().contains(&r) {
                continue;
            }
            self.reserve(r.name, r.start, r.size)?;
        }
        Ok(())
    }

    /// Load Linux for `vcpus` vCPUs: the ACPI tables, then the kernel, the initrd and
    /// `cmdline` with the virtio entries appended, each range reserved. Returns where
    /// the boot vCPU starts.
    pub fn load_linux<K: BootImage, I: BootImage>(
        &mut self,
        kernel: &mut K,
        initrd: Option<&mut I>,
        cmdline: &str,
        vcpus: u32,
    ) -> Result<LoadedKernel, BuildError> {
        let cmdline = format!("{cmdline}{}", self.virtio_cmdline());
        self.described_vcpus = Some(vcpus);
        let acpi = self
            .acpi(vcpus)
            .build(TABLES_ADDR)
            .map_err(BuildError::Acpi)?;
        self.load(Image {
            name: "ACPI tables",
            addr: TABLES_ADDR,
            bytes: &acpi,
        })?;
        self.reserve(
            "Linux boot parameters",
            BOOT_PARAMS_RANGE.start,
            BOOT_PARAMS_RANGE.end - BOOT_PARAMS_RANGE.start,
        )?;
        self.reserve(
            "kernel command line",
            CMDLINE_ADDR,
            cmdline.len() as u64 + 1,
        )?;
        let loaded = load_linux(
            self.vm.memory(),
            &self.layout,
            kernel,
            initrd,
            &cmdline,
            &self.e820_carved,
        )
        .map_err(BuildError::Linux)?;
        if loaded.format == vmcraft_vcpu::linux::KernelFormat::BzImage
            && vmcraft_vcpu::probe::kernel_mode_emulated() == Some(true)
        {
            log::warn!(
                "this host emulates the guest's kernel mode (no vmx or svm in /proc/cpuinfo): a bzImage decompresses itself there many times slower than its ELF vmlinux boots; give the vmlinux (extract it on the host: .ci/extract-vmlinux BZIMAGE OUT)"
            );
        }
        self.reserve(
            "kernel",
            loaded.kernel_start,
            loaded.kernel_end.saturating_sub(loaded.kernel_start),
        )?;
        if let Some((addr, size)) = loaded.initrd {
            self.reserve("initrd", addr, size)?;
        }
        Ok(loaded)
    }

    /// Finish building without starting vCPUs: the VM, the exit handler every vCPU
    /// should use, and the CPUID information, for an embedding program that runs the
    /// vCPUs itself (an M:N runtime with `vmcraft_vcpu::vcpu::create_vcpus`).
    pub fn into_parts(self) -> MachineParts {
        let buses = Arc::new(self.buses);
        let bus_handler = BusExitHandler::new(buses.clone(), self.stop.clone());
        let (handler, table): (Arc<dyn ExitHandler>, _) = match self.hypercalls {
            Some(table) if self.xen_hypercalls => {
                let table = Arc::new(table);
                let handler = HypercallExitHandler::xen(
                    table.clone(),
                    self.vm.memory().clone(),
                    self.stop.clone(),
                    bus_handler,
                );
                (Arc::new(handler), Some(table))
            }
            Some(table) => {
                let table = Arc::new(table);
                let handler = HypercallExitHandler::new(
                    self.info.hypercall_port,
                    table.clone(),
                    self.vm.memory().clone(),
                    bus_handler,
                );
                (Arc::new(handler), Some(table))
            }
            None => (Arc::new(bus_handler), None),
        };
        MachineParts {
            vm: self.vm,
            handler,
            info: self.info,
            virtio: self.virtio,
            buses,
            hypercalls: table,
            legacy: self.legacy,
            snapshot_parts: self.parts,
            configured: self.configured,
        }
    }

    /// Start one vCPU per entry of `vcpus`, each on a thread of its own. If an entry
    /// needs the boot tables, their ranges are reserved first: an image loaded
    /// over them is an error.
    pub fn start(mut self, vcpus: &[VcpuConfig]) -> Result<Machine, BuildError> {
        if let Some(described) = self.described_vcpus {
            if described as usize != vcpus.len() {
                return Err(BuildError::VcpuCount {
                    described,
                    started: vcpus.len(),
                });
            }
        }
        if vcpus.iter().any(VcpuConfig::needs_boot_tables) {
            self.reserve_boot_tables()?;
        }
        self.into_parts()
            .start_with(|vm, handler, info| RunningVm::start_with_info(vm, vcpus, handler, info))
            .map_err(BuildError::Start)
    }
}
