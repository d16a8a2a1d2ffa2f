//! Devices for vmcraft virtual machine monitors.
//!
//! * [`bus`]: port and MMIO buses on rust-vmm's `vm-device`: address ranges to
//!   devices, overlaps rejected, unclaimed reads answered with all ones and counted.
//! * [`serial`]: the 16550 UART from `vm-superio`, its interrupt on an eventfd (for
//!   KVM's irqfd), output to any writer and input from any fd through `event-manager`.
//! * [`i8042`]: the i8042 keyboard controller and a keyboard, enough for Linux's
//!   drivers to probe them; its CPU reset stops the VM.
//! * [`irq`]: interrupt lines for new devices, away from the legacy devices' lines.
//! * [`rtc`]: a CMOS real-time clock good enough for Linux to read the date.
//! * [`acpi_pm`]: the sleep and reset registers of a hardware-reduced ACPI platform
//!   (power-off and reset from an unmodified guest).
//! * [`pci`]: a PCI root complex (configuration through 0xCF8/0xCFC and ECAM), BARs
//!   routed from the PCI windows, configuration spaces with writable masks, MSI-X.
//! * [`debug_exit`]: a port whose write stops the VM with an exit code (for tests).
//! * [`stop`]: how devices ask the VMM to stop the VM.
//! * [`state`]: how devices save and restore their state for snapshots.
//!
//! Devices never see a vCPU: they implement `vm-device`'s `DevicePio`/`DeviceMmio`, and
//! the embedding program (or the `vmcraft` crate's glue) routes exits to the buses.

pub mod acpi_pm;
pub mod ata;
pub mod boot_timer;
pub mod bus;
pub mod debug_exit;
pub mod i8042;
pub mod irq;
pub mod lifecycle;
pub mod pci;
pub mod rtc;
pub mod serial;
pub mod state;
pub mod stop;
pub mod virtio;

pub use vm_device;
