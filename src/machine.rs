//! The glue between vCPUs and devices: an [`ExitHandler`] that routes exits to the
//! port and MMIO buses and turns device stop requests (i8042 reset, debug exit) into
//! VM stops, and [`LegacyDevices`], the PC devices a minimal VM needs.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use thiserror::Error;
use vmcraft_devices::acpi_pm::{AcpiPm, ACPI_PM_BASE, ACPI_PM_SIZE};
use vmcraft_devices::bus::{BusError, IoBuses};
use vmcraft_devices::debug_exit::DebugExit;
use vmcraft_devices::i8042::{I8042, I8042_BASE, I8042_KBD_IRQ, I8042_SIZE};
use vmcraft_devices::rtc::{Rtc, RTC_BASE, RTC_SIZE};
use vmcraft_devices::serial::{SerialDevice, COM1_BASE, COM1_IRQ, SERIAL_SIZE};
use vmcraft_devices::stop::{DeviceStop, StopLatch};
use vmcraft_devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET, WINDOW_SIZE};
use vmcraft_devices::virtio::VirtioDevice;
use vmcraft_pv_hypercall::hypercall::{HypercallArgs, HypercallContext, HypercallTable};
use vmcraft_vcpu::cpu::HypervisorInfo;
use vmcraft_vcpu::{
    ExitAction, ExitHandler, ExitStatsSnapshot, RunningVm, StopReason, VcpuRegisters, Vm, VmError,
    VmOutcome, XenHypercall,
};

use crate::builder::{Configured, VirtioSlot};
use crate::snapshot::SnapshotPart;
use std::time::Duration;

/// The debug-exit port (QEMU's isa-debug-exit port; the test guests use it too).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Routes every port and MMIO exit to [`IoBuses`].
#[derive(Debug)]
pub struct BusExitHandler {
    buses: Arc<IoBuses>,
    stop: Arc<StopLatch>,
}

impl BusExitHandler {
    /// A handler over `buses`, stopping the VM when a device requests it on `stop`.
    pub fn new(buses: Arc<IoBuses>, stop: Arc<StopLatch>) -> Self {
        BusExitHandler { buses, stop }
    }

    /// The buses.
    pub fn buses(&self) -> &IoBuses {
        &self.buses
    }

    fn after_write(&self) -> ExitAction {
        stop_requested(&self.stop)
    }
}

/// What the run loop does once a device may have asked for a stop on `latch`:
/// stop the VM for the pending request's reason, or go on.
pub fn stop_requested(latch: &StopLatch) -> ExitAction {
    match latch.peek() {
        None => ExitAction::Continue,
        Some(DeviceStop::Reset) => ExitAction::Stop(StopReason::Reset),
        Some(DeviceStop::Device { device, code }) => {
            ExitAction::Stop(StopReason::Device { device, code })
        }
        Some(DeviceStop::PowerOff) => ExitAction::Stop(StopReason::PowerOff),
        Some(DeviceStop::DeviceFailed(code)) => ExitAction::Stop(StopReason::DeviceFailed(code)),
    }
}

impl ExitHandler for BusExitHandler {
    fn pio_read(&self, port: u16, data: &mut [u8], _: &mut dyn VcpuRegisters) -> ExitAction {
        self.buses.pio_read(port, data);
        ExitAction::Continue
    }
    fn pio_write(&self, port: u16, data: &[u8], _: &mut dyn VcpuRegisters) -> ExitAction {
        self.buses.pio_write(port, data);
        self.after_write()
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8], _: &mut dyn VcpuRegisters) -> ExitAction {
        self.buses.mmio_read(addr, data);
        ExitAction::Continue
    }
    fn mmio_write(&self, addr: u64, data: &[u8], _: &mut dyn VcpuRegisters) -> ExitAction {
        self.buses.mmio_write(addr, data);
        self.after_write()
    }
}

/// Errors from installing the legacy devices.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LegacyDeviceError {
    /// A device could not be put on the bus.
    #[error("cannot attach {0}")]
    Bus(&'static str, #[source] BusError),
    /// The UART could not be created.
    #[error("cannot create the 16550 UART")]
    Serial(#[source] std::io::Error),
    /// An interrupt eventfd could not be created.
    #[error("cannot create the eventfd of IRQ {irq}")]
    Eventfd {
        /// The IRQ.
        irq: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused the UART's irqfd.
    #[error("KVM refused the irqfd for IRQ {irq}")]
    Irqfd {
        /// The IRQ.
        irq: u32,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The PC devices of a minimal VM: COM1 (16550, IRQ 4 by irqfd), the i8042 (keyboard
/// interrupt on IRQ 1), the CMOS
/// RTC, the ACPI power-management registers (power-off and reset) and the debug-exit
/// port.
#[derive(Debug, Clone)]
pub struct LegacyDevices {
    /// COM1.
    pub serial: Arc<SerialDevice>,
    /// The i8042.
    pub i8042: Arc<I8042>,
    /// The RTC.
    pub rtc: Arc<Rtc>,
}

impl LegacyDevices {
    /// Create the devices, attach them to `buses`, and wire COM1's interrupt into `vm`.
    /// Serial output goes to `serial_out`; stop requests go to `stop`.
    pub fn install(
        buses: &mut IoBuses,
        vm: &VmFd,
        serial_out: Box<dyn Write + Send>,
        stop: Arc<StopLatch>,
    ) -> Result<Self, LegacyDeviceError> {
        let serial = Arc::new(SerialDevice::new(serial_out).map_err(LegacyDeviceError::Serial)?);
        vm.register_irqfd(serial.irq_eventfd(), COM1_IRQ)
            .map_err(|source| LegacyDeviceError::Irqfd {
                irq: COM1_IRQ,
                source,
            })?;
        let kbd_irq = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
            .map_err(|source| LegacyDeviceError::Eventfd {
                irq: I8042_KBD_IRQ,
                source,
            })?;
        vm.register_irqfd(&kbd_irq, I8042_KBD_IRQ)
            .map_err(|source| LegacyDeviceError::Irqfd {
                irq: I8042_KBD_IRQ,
                source,
            })?;
        let i8042 = Arc::new(I8042::new(stop.clone(), Some(kbd_irq)));
        let rtc = Arc::new(Rtc::new());
        buses
            .register_pio(COM1_BASE, SERIAL_SIZE, serial.clone())
            .map_err(|e| LegacyDeviceError::Bus("the 16550 UART", e))?;
        buses
            .register_pio(I8042_BASE, I8042_SIZE, i8042.clone())
            .map_err(|e| LegacyDeviceError::Bus("the i8042", e))?;
        buses
            .register_pio(RTC_BASE, RTC_SIZE, rtc.clone())
            .map_err(|e| LegacyDeviceError::Bus("the RTC", e))?;
        buses
            .register_pio(
                ACPI_PM_BASE,
                ACPI_PM_SIZE,
                Arc::new(AcpiPm::new(stop.clone())),
            )
            .map_err(|e| LegacyDeviceError::Bus("the ACPI power-management registers", e))?;
        buses
            .register_pio(DEBUG_EXIT_PORT, 4, Arc::new(DebugExit::new(stop)))
            .map_err(|e| LegacyDeviceError::Bus("the debug-exit port", e))?;
        Ok(LegacyDevices { serial, i8042, rtc })
    }
}

/// Errors from attaching a virtio-mmio device.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum VirtioAttachError {
    /// The transport's eventfds could not be created.
    #[error("cannot create the virtio-mmio transport")]
    Transport(#[source] std::io::Error),
    /// KVM refused a queue's ioeventfd.
    #[error("KVM refused the ioeventfd of queue {queue} at {addr:#x}")]
    Ioeventfd {
        /// Queue index.
        queue: u32,
        /// Guest-physical address of QueueNotify.
        addr: u64,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused the irqfd.
    #[error("KVM refused the irqfd for IRQ {irq}")]
    Irqfd {
        /// The IRQ.
        irq: u32,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The window is taken on the MMIO bus.
    #[error("cannot put the virtio-mmio window on the bus")]
    Bus(#[source] BusError),
}

/// Put `device` behind a virtio-mmio transport at `base` (a 4 KiB window): queue
/// notifications go to KVM ioeventfds (no exit to the VMM), interrupts to `irq` through
/// an irqfd. Returns the transport, whose status and errors the embedding program can
/// inspect. The Linux command line for it is `virtio_mmio.device=4K@<base>:<irq>`.
pub fn attach_virtio_mmio(
    buses: &mut IoBuses,
    vm: &VmFd,
    memory: &vmcraft_memory::GuestMemory,
    base: u64,
    irq: u32,
    device: Box<dyn VirtioDevice>,
) -> Result<Arc<Mutex<MmioTransport>>, VirtioAttachError> {
    let transport =
        MmioTransport::new(device, memory.clone()).map_err(VirtioAttachError::Transport)?;
    let addr = base + QUEUE_NOTIFY_OFFSET;
    for (queue, fd) in transport.notifiers().iter().enumerate() {
        let queue = queue as u32;
        vm.register_ioevent(fd, &IoEventAddress::Mmio(addr), queue)
            .map_err(|source| VirtioAttachError::Ioeventfd {
                queue,
                addr,
                source,
            })?;
    }
    vm.register_irqfd(transport.interrupt().irq_eventfd(), irq)
        .map_err(|source| VirtioAttachError::Irqfd { irq, source })?;
    let transport = Arc::new(Mutex::new(transport));
    buses
        .register_mmio(base, WINDOW_SIZE, transport.clone())
        .map_err(VirtioAttachError::Bus)?;
    Ok(transport)
}

/// The port vmcraft's guests trap hypercalls through by default (advertise it in CPUID
/// leaf 0x40000001, ebx). Below 0x100, so a guest can use the immediate form of `out`
/// and keep rdx for an argument.
pub const HYPERCALL_PORT: u16 = 0x98;

/// Routes a write to the hypercall port to a [`HypercallTable`] (number and
/// arguments from the guest's registers, result into `rax`) and every other exit to
/// `inner`. If the registers cannot be read or written the VM stops with a crash
/// rather than run on with a wrong result.
pub struct HypercallExitHandler<H> {
    /// The hypercall port, if hypercalls come that way.
    port: Option<u16>,
    /// Whether Xen hypercall exits (`KVM_EXIT_XEN`) go to the table, and the latch
    /// their handlers may ask a stop on (`SCHEDOP_shutdown`).
    xen: Option<Arc<StopLatch>>,
    table: Arc<HypercallTable>,
    memory: vmcraft_memory::GuestMemory,
    inner: H,
}

impl<H: std::fmt::Debug> std::fmt::Debug for HypercallExitHandler<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HypercallExitHandler")
            .field("port", &self.port)
            .field("table", &self.table)
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<H: ExitHandler> HypercallExitHandler<H> {
    /// Hypercalls on `port` go to `table` (pointer arguments resolve in `memory`).
    pub fn new(
        port: u16,
        table: Arc<HypercallTable>,
        memory: vmcraft_memory::GuestMemory,
        inner: H,
    ) -> Self {
        HypercallExitHandler {
            port: Some(port),
            xen: None,
            table,
            memory,
            inner,
        }
    }

    /// Xen hypercalls (the exits of [`vmcraft_vcpu::xen`], from a guest that found
    /// Xen's CPUID leaves) go to `table`; their pointer arguments are linear
    /// addresses of the calling vCPU, translated through its page tables. Calls from
    /// guest user mode get `-EPERM`, as in Xen. No hypercall port. After each call,
    /// a stop requested on `stop` stops the VM.
    pub fn xen(
        table: Arc<HypercallTable>,
        memory: vmcraft_memory::GuestMemory,
        stop: Arc<StopLatch>,
        inner: H,
    ) -> Self {
        HypercallExitHandler {
            port: None,
            xen: Some(stop),
            table,
            memory,
            inner,
        }
    }

    /// The table (for its counters).
    pub fn table(&self) -> &HypercallTable {
        &self.table
    }

    /// The handler every other exit goes to.
    pub fn inner(&self) -> &H {
        &self.inner
    }

    fn hypercall(&self, vcpu: &mut dyn VcpuRegisters) -> ExitAction {
        let Ok(mut regs) = vcpu.regs() else {
            return ExitAction::Stop(StopReason::Crash);
        };
        let call = HypercallArgs::from_registers(
            regs.rax, regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8,
        );
        let ctx = HypercallContext::physical(vcpu.vcpu_index(), &self.memory);
        regs.rax = self.table.dispatch(&ctx, call) as u64;
        match vcpu.set_regs(&regs) {
            Ok(()) => ExitAction::Continue,
            Err(e) => {
                log::error!(
                    "vCPU {}: cannot return hypercall {} result, stopping the VM: {e}",
                    vcpu.vcpu_index(),
                    call.nr
                );
                ExitAction::Stop(StopReason::Crash)
            }
        }
    }
}

impl<H: ExitHandler> ExitHandler for HypercallExitHandler<H> {
    fn pio_read(&self, port: u16, data: &mut [u8], vcpu: &mut dyn VcpuRegisters) -> ExitAction {
        self.inner.pio_read(port, data, vcpu)
    }
    fn pio_write(&self, port: u16, data: &[u8], vcpu: &mut dyn VcpuRegisters) -> ExitAction {
        if Some(port) == self.port {
            return self.hypercall(vcpu);
        }
        self.inner.pio_write(port, data, vcpu)
    }
    fn xen_hypercall(
        &self,
        call: &XenHypercall,
        result: &mut i64,
        vcpu: &mut dyn VcpuRegisters,
    ) -> ExitAction {
        let Some(stop) = &self.xen else {
            return self.inner.xen_hypercall(call, result, vcpu);
        };
        if call.cpl != 0 {
            *result = -vmcraft_pv_hypercall::hypercall::errno::EPERM;
            return ExitAction::Continue;
        }
        let translate = |gva: u64| vcpu.translate(gva).ok().flatten();
        let ctx = HypercallContext::linear(vcpu.vcpu_index(), &self.memory, &translate);
        let [a0, a1, a2, a3, a4, _] = call.params;
        *result = self.table.dispatch(
            &ctx,
            HypercallArgs {
                nr: call.nr,
                args: [a0, a1, a2, a3, a4],
            },
        );
        log::trace!(
            "vCPU {}: Xen hypercall {} ({a0:#x}, {a1:#x}, {a2:#x}) = {}",
            vcpu.vcpu_index(),
            call.nr,
            *result
        );
        if *result < 0 {
            log::debug!(
                "vCPU {}: Xen hypercall {} ({:#x}, {:#x}, {:#x}) failed: {}",
                vcpu.vcpu_index(),
                call.nr,
                a0,
                a1,
                a2,
                *result
            );
        }
        stop_requested(stop)
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8], vcpu: &mut dyn VcpuRegisters) -> ExitAction {
        self.inner.mmio_read(addr, data, vcpu)
    }
    fn mmio_write(&self, addr: u64, data: &[u8], vcpu: &mut dyn VcpuRegisters) -> ExitAction {
        self.inner.mmio_write(addr, data, vcpu)
    }
    fn halted(&self, vcpu: &mut dyn VcpuRegisters) -> ExitAction {
        self.inner.halted(vcpu)
    }
    fn kicked(&self, vcpu: &mut dyn VcpuRegisters) -> ExitAction {
        self.inner.kicked(vcpu)
    }
}

/// A built machine whose vCPUs the embedding program runs itself.
pub struct MachineParts {
    /// The VM.
    pub vm: Vm,
    /// The exit handler for every vCPU.
    pub handler: Arc<dyn ExitHandler>,
    /// The hypervisor CPUID information for every vCPU.
    pub info: HypervisorInfo,
    /// The virtio devices.
    pub virtio: Vec<VirtioSlot>,
    /// The buses.
    pub buses: Arc<IoBuses>,
    /// The hypercall table, if any.
    pub hypercalls: Option<Arc<HypercallTable>>,
    /// The legacy devices.
    pub legacy: LegacyDevices,
    /// The parts saved with the machine in snapshots.
    pub snapshot_parts: Vec<(String, Arc<dyn SnapshotPart>)>,
    pub(crate) configured: Configured,
}

impl MachineParts {
    /// Start the vCPUs with `start` (given the VM, the exit handler and the CPUID
    /// information) and put the machine together.
    pub fn start_with<E>(
        self,
        start: impl FnOnce(Vm, Arc<dyn ExitHandler>, HypervisorInfo) -> Result<RunningVm, E>,
    ) -> Result<Machine, E> {
        Ok(Machine {
            running: start(self.vm, self.handler, self.info)?,
            virtio: self.virtio,
            buses: self.buses,
            hypercalls: self.hypercalls,
            legacy: self.legacy,
            parts: self.snapshot_parts,
            configured: self.configured,
            devices_paused: false.into(),
        })
    }
}

impl std::fmt::Debug for MachineParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineParts")
            .field("vm", &self.vm)
            .field("virtio", &self.virtio.len())
            .finish_non_exhaustive()
    }
}

/// A running machine: its vCPUs, its devices, and the lifecycle of the whole.
///
/// ```no_run
/// # fn f(machine: vmcraft::machine::Machine) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// machine.pause();                       // the vCPUs stop where they are
/// machine.resume();
/// let report = machine.snapshot(std::path::Path::new("/tmp/snap"))?; // paused after
/// machine.resume();
/// let outcome = machine.run_for(Duration::from_secs(10))?; // stopped if still running
/// println!("stopped: {}", outcome.reason);
/// # Ok(()) }
/// ```
pub struct Machine {
    pub(crate) running: RunningVm,
    pub(crate) virtio: Vec<VirtioSlot>,
    pub(crate) buses: Arc<IoBuses>,
    pub(crate) hypercalls: Option<Arc<HypercallTable>>,
    pub(crate) legacy: LegacyDevices,
    pub(crate) parts: Vec<(String, Arc<dyn SnapshotPart>)>,
    pub(crate) configured: Configured,
    /// Whether the devices were stopped for a snapshot (and are to be resumed).
    pub(crate) devices_paused: std::sync::atomic::AtomicBool,
}

impl Machine {
    /// Stop the vCPUs where they are (each completes the port or MMIO read it is in
    /// first); the devices finish what they have. [`resume`](Self::resume) goes on.
    pub fn pause(&self) {
        self.running.pause();
    }

    /// Go on after [`pause`](Self::pause) or a [snapshot](Self::snapshot): the
    /// devices serve again if a snapshot stopped them, then the vCPUs run.
    pub fn resume(&self) {
        if self
            .devices_paused
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            for (_, part) in crate::snapshot::machine_parts(&self.legacy, &self.virtio, &self.parts)
            {
                part.resume();
            }
        }
        self.running.resume();
    }

    /// Ask the VM to stop ([`StopReason::Requested`] unless it is stopping already).
    pub fn stop(&self) {
        self.running.request_stop();
    }

    /// Whether the VM has stopped or is stopping, and why.
    pub fn stop_reason(&self) -> Option<VmOutcome> {
        self.running.stop_reason()
    }

    /// When a vCPU failed ([`StopReason::VcpuFailed`]): the whole error, with the
    /// vCPU's registers where the exit gave them.
    pub fn failure(&self) -> Option<String> {
        self.running.failure()
    }

    /// Wait up to `timeout` (forever with `None`) for the VM to stop; `None` if it
    /// still runs. The machine stays usable (its statistics, its devices).
    pub fn wait_stopped(&self, timeout: Option<Duration>) -> Option<VmOutcome> {
        self.running.wait_stopped(timeout)
    }

    /// Wait for the VM to stop, join its vCPU threads and say why it stopped (an
    /// error if a vCPU failed: with its registers).
    pub fn wait(self) -> Result<VmOutcome, VmError> {
        self.running.wait()
    }

    /// Run for at most `timeout`: stop the VM if it still runs then (the outcome
    /// says [`StopReason::Requested`]), join its vCPUs, and say why it stopped.
    pub fn run_for(self, timeout: Duration) -> Result<VmOutcome, VmError> {
        self.running.wait_timeout(timeout)
    }

    /// The VM: its memory, its KVM file descriptor.
    pub fn vm(&self) -> &Vm {
        self.running.vm()
    }

    /// How many vCPUs it has.
    pub fn vcpu_count(&self) -> u32 {
        self.running.vcpu_count()
    }

    /// Exit statistics of vCPU `index`, each kind of exit by name.
    pub fn stats(&self, index: u32) -> Result<ExitStatsSnapshot, VmError> {
        self.running.stats(index)
    }

    /// Exit statistics of every vCPU together.
    pub fn total_stats(&self) -> ExitStatsSnapshot {
        self.running.total_stats()
    }

    /// Interrupt vCPU `index` out of the guest once (an exit with nothing to do).
    pub fn kick(&self, index: u32) -> Result<(), VmError> {
        self.running.kick(index)
    }

    /// The virtio devices, in the order they were added.
    pub fn virtio(&self) -> &[VirtioSlot] {
        &self.virtio
    }

    /// The buses (for their unclaimed-access counts).
    pub fn buses(&self) -> &IoBuses {
        &self.buses
    }

    /// The hypercall table, if the machine serves hypercalls (for its counters,
    /// which stay readable after the machine has ended).
    pub fn hypercalls(&self) -> Option<Arc<HypercallTable>> {
        self.hypercalls.clone()
    }

    /// How many kicks vCPU `index` has seen.
    pub fn kicks_seen(&self, index: u32) -> Result<u64, VmError> {
        self.running.kicks_seen(index)
    }

    /// The legacy devices (COM1, the i8042, the RTC).
    pub fn legacy(&self) -> &LegacyDevices {
        &self.legacy
    }

    /// The names of the parts saved with the machine in snapshots.
    pub fn snapshot_parts(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().map(|(n, _)| n.as_str())
    }

    /// The configuration the machine was built from, if it was built from one
    /// ([`MachineBuilder::configure`](crate::builder::MachineBuilder::configure)): what its snapshots carry.
    pub fn config(&self) -> Option<crate::config::MachineConfig> {
        let mut config = self.configured.config.clone()?;
        for disk in &self.configured.disks {
            if let Some(d) = config
                .devices
                .get_mut(disk.device)
                .and_then(|d| d.disk_mut())
            {
                d.path = disk.path.lock().unwrap_or_else(|p| p.into_inner()).clone();
            }
        }
        Some(config)
    }

    /// Serve the virtio-blk disk `device` (its index in the configuration's
    /// devices) from `file`, the image at `path`, from now on: Firecracker's
    /// `PATCH /drives/{id}`. The driver is told the disk changed (a configuration
    /// interrupt; the capacity is the new image's); requests in flight finish on the
    /// old image. [`Machine::config`], and so snapshots and migrations, name `path`
    /// from now on. The image must be read-only exactly when the disk is.
    pub fn replace_disk(
        &self,
        device: usize,
        path: &std::path::Path,
        file: File,
    ) -> Result<(), ReplaceDiskError> {
        let disk = (self.configured.disks.iter())
            .find(|d| d.device == device)
            .ok_or(ReplaceDiskError::NoSuchDisk(device))?;
        let read_only = disk.slot.current().read_only();
        let image = vmcraft_block::BlockImage::open(file, read_only).map_err(|source| {
            ReplaceDiskError::Image {
                path: path.to_owned(),
                source,
            }
        })?;
        disk.slot
            .replace(image)
            .map_err(|source| ReplaceDiskError::Replace {
                path: path.to_owned(),
                source,
            })?;
        *disk.path.lock().unwrap_or_else(|p| p.into_inner()) = path.to_owned();
        log::info!("devices[{device}]: the disk is {} now", path.display());
        Ok(())
    }

    /// The balloon's control, if the configuration has a virtio-balloon.
    pub fn balloon(&self) -> Option<&Arc<vmcraft_devices::virtio::balloon::BalloonControl>> {
        self.configured.balloon.as_ref()
    }

    /// Each configured virtio device's name (its kind and number among that kind:
    /// `block0`, `net1`) and counters, in the configuration's order.
    pub fn device_counters(
        &self,
    ) -> impl Iterator<Item = (&str, &vmcraft_devices::virtio::DeviceCounters)> {
        (self.configured.virtio_counters.iter()).map(|(name, i)| (name.as_str(), i.counters()))
    }

    /// The Xen platform and its services, if the configuration presents Xen.
    pub fn xen(&self) -> Option<&crate::xen_hvm::XenPlatform> {
        self.configured.xen.as_deref()
    }
}

/// A disk could not be replaced ([`Machine::replace_disk`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplaceDiskError {
    /// The configuration has no virtio-blk disk at that index.
    #[error("devices[{0}] is not a virtio-blk disk of this machine")]
    NoSuchDisk(usize),
    /// The new image cannot be served.
    #[error("the image {path}")]
    Image {
        /// The image.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The device refused it.
    #[error("the image {path}")]
    Replace {
        /// The image.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: vmcraft_devices::virtio::block::ReplaceError,
    },
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("running", &self.running)
            .field("virtio", &self.virtio.len())
            .field(
                "parts",
                &self.parts.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_regs, kvm_sregs};
    use std::sync::Mutex as StdMutex;

    /// Registers in memory; `broken` makes reading or writing them fail.
    #[derive(Default)]
    struct FakeVcpu {
        regs: kvm_regs,
        fail_get: bool,
        fail_set: bool,
    }

    impl VcpuRegisters for FakeVcpu {
        fn vcpu_index(&self) -> u32 {
            3
        }
        fn regs(&self) -> Result<kvm_regs, kvm_ioctls::Error> {
            if self.fail_get {
                return Err(kvm_ioctls::Error::new(libc::EIO));
            }
            Ok(self.regs)
        }
        fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), kvm_ioctls::Error> {
            if self.fail_set {
                return Err(kvm_ioctls::Error::new(libc::EIO));
            }
            self.regs = *regs;
            Ok(())
        }
        fn sregs(&self) -> Result<kvm_sregs, kvm_ioctls::Error> {
            Ok(kvm_sregs::default())
        }
    }

    /// Records which exits reached it.
    #[derive(Default, Debug)]
    struct Recorder(StdMutex<Vec<&'static str>>);

    impl Recorder {
        fn saw(&self, what: &'static str) -> ExitAction {
            self.0.lock().unwrap().push(what);
            ExitAction::Continue
        }
    }

    impl ExitHandler for Recorder {
        fn pio_read(&self, _: u16, _: &mut [u8], _: &mut dyn VcpuRegisters) -> ExitAction {
            self.saw("pio_read")
        }
        fn pio_write(&self, _: u16, _: &[u8], _: &mut dyn VcpuRegisters) -> ExitAction {
            self.saw("pio_write")
        }
        fn mmio_read(&self, _: u64, _: &mut [u8], _: &mut dyn VcpuRegisters) -> ExitAction {
            self.saw("mmio_read")
        }
        fn mmio_write(&self, _: u64, _: &[u8], _: &mut dyn VcpuRegisters) -> ExitAction {
            self.saw("mmio_write")
        }
        fn halted(&self, _: &mut dyn VcpuRegisters) -> ExitAction {
            self.saw("halted")
        }
        fn kicked(&self, _: &mut dyn VcpuRegisters) -> ExitAction {
            self.saw("kicked")
        }
    }

    fn handler() -> HypercallExitHandler<Recorder> {
        let mut table = HypercallTable::new();
        // Hypercall 5 adds its first two arguments; it sees the calling vCPU.
        table
            .register(
                5,
                "add",
                Arc::new(
                    |ctx: &vmcraft_pv_hypercall::hypercall::HypercallContext<'_>, a: &[u64; 5]| {
                        assert_eq!(ctx.vcpu, 3);
                        Ok(a[0] + a[1])
                    },
                ),
            )
            .unwrap();
        let memory = vmcraft_memory::GuestRam::new(
            &vmcraft_memory::layout::MemoryLayout::x86_64(1 << 20).unwrap(),
        )
        .unwrap()
        .memory()
        .clone();
        HypercallExitHandler::new(HYPERCALL_PORT, Arc::new(table), memory, Recorder::default())
    }

    #[test]
    fn a_write_to_the_hypercall_port_dispatches_with_the_registers() {
        let h = handler();
        let mut vcpu = FakeVcpu::default();
        vcpu.regs.rax = 5;
        vcpu.regs.rdi = 40;
        vcpu.regs.rsi = 2;
        assert!(matches!(
            h.pio_write(HYPERCALL_PORT, &[0], &mut vcpu),
            ExitAction::Continue
        ));
        assert_eq!(vcpu.regs.rax, 42, "the result is in rax");
        vcpu.regs.rax = 99;
        h.pio_write(HYPERCALL_PORT, &[0], &mut vcpu);
        assert_eq!(vcpu.regs.rax as i64, -38, "an unknown number: -ENOSYS");
        assert_eq!((h.table().count(5), h.table().unknown_calls()), (1, 1));
        assert!(
            h.inner().0.lock().unwrap().is_empty(),
            "no hypercall reached the inner handler"
        );
    }

    #[test]
    fn xen_hypercalls_dispatch_with_linear_arguments_and_stop_on_a_shutdown() {
        let plain = handler();
        let stop = Arc::new(StopLatch::default());
        let h = HypercallExitHandler::xen(
            plain.table.clone(),
            plain.memory.clone(),
            stop.clone(),
            Recorder::default(),
        );
        let mut vcpu = FakeVcpu::default();
        let call = |nr| XenHypercall {
            nr,
            params: [40, 2, 0, 0, 0, 0],
            longmode: true,
            cpl: 0,
        };
        let mut result = 0;
        assert_eq!(
            h.xen_hypercall(&call(5), &mut result, &mut vcpu),
            ExitAction::Continue
        );
        assert_eq!(result, 42);
        h.xen_hypercall(&call(99), &mut result, &mut vcpu);
        assert_eq!(result, -38, "an unknown number: -ENOSYS");
        // From guest user mode: refused, and nothing is dispatched.
        let user = XenHypercall { cpl: 3, ..call(5) };
        h.xen_hypercall(&user, &mut result, &mut vcpu);
        assert_eq!(result, -1, "-EPERM");
        assert_eq!(h.table().count(5), 1);
        // No hypercall port on a Xen machine: a write there is an ordinary exit.
        h.pio_write(HYPERCALL_PORT, &[0], &mut vcpu);
        assert_eq!(h.inner().0.lock().unwrap().as_slice(), ["pio_write"]);
        // A stop asked during a call ends the run.
        stop.request(DeviceStop::PowerOff);
        assert_eq!(
            h.xen_hypercall(&call(5), &mut result, &mut vcpu),
            ExitAction::Stop(StopReason::PowerOff)
        );
        // A handler without Xen passes Xen exits to its inner handler.
        plain.xen_hypercall(&call(5), &mut result, &mut vcpu);
        assert_eq!(result, -38, "the default: -ENOSYS");
    }

    #[test]
    fn every_other_exit_goes_to_the_inner_handler() {
        let h = handler();
        let mut vcpu = FakeVcpu::default();
        let mut byte = [0u8];
        h.pio_read(HYPERCALL_PORT, &mut byte, &mut vcpu);
        h.pio_write(HYPERCALL_PORT + 1, &[0], &mut vcpu);
        h.mmio_read(0xd000_0000, &mut byte, &mut vcpu);
        h.mmio_write(0xd000_0000, &[0], &mut vcpu);
        h.halted(&mut vcpu);
        h.kicked(&mut vcpu);
        assert_eq!(
            *h.inner().0.lock().unwrap(),
            [
                "pio_read",
                "pio_write",
                "mmio_read",
                "mmio_write",
                "halted",
                "kicked"
            ]
        );
        assert!(format!("{h:?}").contains("HypercallExitHandler"));
    }

    #[test]
    fn registers_that_cannot_be_read_or_written_stop_the_vm() {
        let h = handler();
        for (fail_get, fail_set) in [(true, false), (false, true)] {
            let mut vcpu = FakeVcpu {
                fail_get,
                fail_set,
                ..Default::default()
            };
            vcpu.regs.rax = 5;
            assert!(matches!(
                h.pio_write(HYPERCALL_PORT, &[0], &mut vcpu),
                ExitAction::Stop(StopReason::Crash)
            ));
        }
    }

    /// The test guests are built against the same ports.
    #[test]
    fn the_guests_abi_matches_the_machine_ports() {
        use vmcraft_guest_kit::abi;
        assert_eq!(super::DEBUG_EXIT_PORT, abi::DEBUG_EXIT_PORT);
        assert_eq!(super::HYPERCALL_PORT, abi::HYPERCALL_PORT);
        assert_eq!(crate::builder::VIRTIO_MMIO_BASE, abi::VIRTIO_MMIO_BASE);
    }
}
