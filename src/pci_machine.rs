//! PCI on a machine: the root complex reached through ports 0xCF8-0xCFF and an ECAM
//! window, a 32-bit window BARs are placed in, and virtio devices as PCI functions
//! ([`MachineBuilder::add_virtio_pci`]) with MSI-X: each vector a GSI whose KVM route
//! follows the guest's table entry and whose irqfd the device's threads signal, each
//! queue's notification caught by a KVM ioeventfd that follows BAR 0. The ACPI
//! tables describe the bridge (`PCI0` in the DSDT, the MCFG table) once the first
//! function is added.
//!
//! ```no_run
//! # fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use vmcraft::builder::MachineBuilder;
//! use vmcraft::devices::virtio::rng::Rng;
//! let mut b = MachineBuilder::new(64 << 20, Box::new(std::io::stdout()))?;
//! let slot = b.add_virtio_pci(Box::new(Rng::new("rng")))?;
//! assert_eq!(slot.device, 1); // device 0 is the host bridge
//! # Ok(()) }
//! ```

use std::sync::{Arc, Mutex, PoisonError};

use vmcraft_devices::pci::msix::MsiMessage;
use vmcraft_devices::pci::root::{
    PciBarWindow, PciConfigIo, PciConfigMmio, PciRoot, CONFIG_ADDRESS_PORT, CONFIG_PORTS,
    ECAM_BUS_SIZE,
};
use vmcraft_devices::virtio::pci::{
    MsiRoutes, NotifyWindow, PciTransport, PciTransportState, BAR_SIZE, NOTIFY_MULTIPLIER,
};
use vmcraft_devices::virtio::{EventFd, VirtioDevice};
use vmcraft_memory::mmio::MmioAllocator;
use vmcraft_vcpu::ioevent::IoEvents;
use vmcraft_vcpu::msi::GsiRoutes;

use crate::builder::{BuildError, MachineBuilder};
use crate::snapshot::{MachineSnapshotError, PartReader, PartWriter, SnapshotPart};

/// Bytes of the window BARs are placed in (below 4 GiB).
pub const BAR_WINDOW_SIZE: u64 = 32 << 20;

/// The PCI side of a machine being built.
pub(crate) struct PciBus {
    pub(crate) root: Arc<PciRoot>,
    /// Where the ECAM window (bus 0) is.
    pub(crate) ecam: u64,
    /// Where the BAR window is ([`BAR_WINDOW_SIZE`] bytes).
    pub(crate) window: u64,
    bars: MmioAllocator,
    routes: Arc<GsiRoutes>,
    pub(crate) functions: Vec<PciSlot>,
}

/// A virtio device on the PCI bus.
#[derive(Clone)]
pub struct PciSlot {
    /// Its device number on bus 0.
    pub device: u8,
    /// Where BAR 0 was placed.
    pub bar: u64,
    /// Its first MSI GSI (vector `v` is GSI `first_gsi + v`).
    pub first_gsi: u32,
    /// The transport (its status and errors, for the embedding program).
    pub transport: Arc<Mutex<PciTransport>>,
}

impl std::fmt::Debug for PciSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciSlot")
            .field("device", &self.device)
            .field("bar", &format_args!("{:#x}", self.bar))
            .field("first_gsi", &self.first_gsi)
            .finish_non_exhaustive()
    }
}

/// A function's vectors as KVM routes from its first GSI.
struct FunctionRoutes {
    routes: Arc<GsiRoutes>,
    first_gsi: u32,
    device: u8,
}

impl MsiRoutes for FunctionRoutes {
    fn set_route(&self, vector: u16, message: MsiMessage) {
        let gsi = self.first_gsi + u32::from(vector);
        if let Err(e) = self.routes.set_msi(gsi, message.address, message.data) {
            log::warn!(
                "pci device {}: vector {vector} ({:#x}, {:#x}) has no route: {}",
                self.device,
                message.address,
                message.data,
                vmcraft_memory::report::ErrorChain(&e)
            );
        }
    }
}

/// A function's notification area as KVM ioeventfds.
struct KvmNotifyWindow {
    events: IoEvents,
    device: u8,
}

impl NotifyWindow for KvmNotifyWindow {
    fn moved(&mut self, notifiers: &[EventFd], from: Option<u64>, to: Option<u64>) {
        for (q, fd) in notifiers.iter().enumerate() {
            let at = |area: u64| area + q as u64 * u64::from(NOTIFY_MULTIPLIER);
            if let Some(area) = from {
                if let Err(e) = self.events.deassign(fd, at(area)) {
                    log::warn!(
                        "pci device {}: queue {q}'s notification at {:#x} stays: {e}",
                        self.device,
                        at(area)
                    );
                }
            }
            if let Some(area) = to {
                // Without it the notification still arrives, through an exit.
                if let Err(e) = self.events.assign(fd, at(area)) {
                    log::warn!(
                        "pci device {}: queue {q}'s notification at {:#x} exits: {e}",
                        self.device,
                        at(area)
                    );
                }
            }
        }
    }
}

/// One virtio-pci function in snapshots (section `part-pci<device>`): the device
/// paused as on virtio-mmio, its configuration space, MSI-X table and vectors saved;
/// on restore the routes and the notification area are set up again.
struct PciPart {
    transport: Arc<Mutex<PciTransport>>,
    root: Arc<PciRoot>,
    device: u8,
}

impl SnapshotPart for PciPart {
    fn pause(&self, out: &mut PartWriter<'_>) -> Result<(), MachineSnapshotError> {
        let state = self
            .transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pause_for_snapshot();
        out.put(&state)
    }
    fn resume(&self) {
        self.transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .resume_after_snapshot();
    }
    fn restore(&self, saved: &PartReader<'_>) -> Result<(), MachineSnapshotError> {
        let state: PciTransportState = saved.load()?;
        self.transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .restore_state(&state)
            .map_err(MachineSnapshotError::Device)?;
        self.root.refresh(self.device);
        Ok(())
    }
    fn after_vcpus_restored(&self) {
        self.transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .interrupt()
            .raise_again();
    }
}

impl MachineBuilder {
    /// The PCI bus, put on the machine on first use: its configuration ports, its
    /// ECAM window and its BAR window.
    fn pci_bus(&mut self) -> Result<&mut PciBus, BuildError> {
        if self.pci().is_none() {
            let ecam = self.allocate_mmio(ECAM_BUS_SIZE, ECAM_BUS_SIZE)?;
            let window = self.allocate_mmio(BAR_WINDOW_SIZE, BAR_WINDOW_SIZE)?;
            let root = Arc::new(PciRoot::new());
            let routes = GsiRoutes::new(self.vm().fd()).map_err(|source| BuildError::Host {
                what: "the MSI routes",
                source,
            })?;
            let bars = MmioAllocator::new(window, BAR_WINDOW_SIZE).map_err(BuildError::Windows)?;
            let bus_error = |what: &'static str| {
                move |e: vmcraft_devices::bus::BusError| BuildError::Host {
                    what,
                    source: std::io::Error::other(e),
                }
            };
            let buses = self.buses_mut();
            buses
                .register_pio(
                    CONFIG_ADDRESS_PORT,
                    CONFIG_PORTS,
                    Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
                )
                .map_err(bus_error("the PCI configuration ports"))?;
            buses
                .register_mmio(
                    ecam,
                    ECAM_BUS_SIZE,
                    Arc::new(Mutex::new(PciConfigMmio(root.clone()))),
                )
                .map_err(bus_error("the PCI ECAM window"))?;
            buses
                .register_mmio(
                    window,
                    BAR_WINDOW_SIZE,
                    Arc::new(Mutex::new(PciBarWindow {
                        root: root.clone(),
                        base: window,
                        io: false,
                    })),
                )
                .map_err(bus_error("the PCI BAR window"))?;
            *self.pci_mut() = Some(PciBus {
                root,
                ecam,
                window,
                bars,
                routes: Arc::new(routes),
                functions: Vec::new(),
            });
        }
        Ok(self.pci_mut().as_mut().expect("set above"))
    }

    /// Attach `device` as a virtio-pci function on the next free device number, its
    /// BAR 0 placed in the BAR window, a GSI per MSI-X vector, its queue
    /// notifications caught by ioeventfds once the guest turns memory decoding on.
    /// Saved and restored with the machine as part `pci<device>`.
    pub fn add_virtio_pci(&mut self, device: Box<dyn VirtioDevice>) -> Result<PciSlot, BuildError> {
        let memory = self.memory().clone();
        let stop = self.stop_latch();
        let events = IoEvents::new(self.vm().fd()).map_err(|source| BuildError::Host {
            what: "the notification ioeventfds",
            source,
        })?;
        let host =
            |what: &'static str| move |source: std::io::Error| BuildError::Host { what, source };
        let mut transport =
            PciTransport::new(device, memory).map_err(host("a virtio-pci transport"))?;
        transport.stop_vm_on_host_failure(stop);
        let bus = self.pci_bus()?;
        let bar = bus
            .bars
            .allocate(BAR_SIZE, BAR_SIZE)
            .map_err(BuildError::Windows)?;
        transport.place(bar).map_err(|e| BuildError::Host {
            what: "BAR 0 of a virtio-pci function",
            source: std::io::Error::other(e),
        })?;
        let vectors = transport.vectors().clone();
        let first_gsi = bus
            .routes
            .allocate(u32::from(vectors.count()))
            .map_err(|e| BuildError::Host {
                what: "MSI routes",
                source: std::io::Error::other(e),
            })?;
        let routes = bus.routes.clone();
        let root = bus.root.clone();
        let transport = Arc::new(Mutex::new(transport));
        let device = root.add(transport.clone()).map_err(|e| BuildError::Host {
            what: "a PCI device number",
            source: std::io::Error::other(e),
        })?;
        {
            let mut t = transport.lock().unwrap_or_else(PoisonError::into_inner);
            t.set_msi_routes(Arc::new(FunctionRoutes {
                routes,
                first_gsi,
                device,
            }));
            t.set_notify_window(Box::new(KvmNotifyWindow { events, device }));
        }
        for v in 0..vectors.count() {
            let fd = vectors.irqfd(v).expect("a vector of the function");
            let gsi = first_gsi + u32::from(v);
            self.vm()
                .fd()
                .register_irqfd(fd, gsi)
                .map_err(|e| BuildError::Host {
                    what: "an MSI-X irqfd",
                    source: std::io::Error::from_raw_os_error(e.errno()),
                })?;
        }
        let slot = PciSlot {
            device,
            bar,
            first_gsi,
            transport: transport.clone(),
        };
        let bus = self.pci_mut().as_mut().expect("the bus is there");
        bus.functions.push(slot.clone());
        let part = PciPart {
            transport,
            root: bus.root.clone(),
            device,
        };
        self.add_snapshot_part(&format!("pci{device}"), Arc::new(part));
        Ok(slot)
    }

    /// The virtio-pci functions added so far.
    pub fn pci_slots(&self) -> &[PciSlot] {
        self.pci().map_or(&[], |b| b.functions.as_slice())
    }
}
