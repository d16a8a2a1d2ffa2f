//! ACPI tables that describe a vmcraft machine to an unmodified guest: RSDP, XSDT,
//! FADT, MADT and a DSDT, built with rust-vmm's `acpi_tables` and written into the
//! BIOS area of guest memory, where Linux's scan of 0xE0000–0xFFFFF finds them.
//!
//! - The MADT lists one local APIC per vCPU (APIC ID = vCPU index, as vmcraft's CPUID
//!   says), KVM's in-kernel IOAPIC at [`IOAPIC_ADDR`] with GSIs 0–23, the ISA override
//!   of IRQ 0 to GSI 2 (where KVM's PIT arrives), and LINT1 as NMI.
//! - The FADT declares a hardware-reduced ACPI platform, as Firecracker and Cloud
//!   Hypervisor do: no SCI, no PM timer, sleep and reset through the registers of
//!   [`vmcraft_devices::acpi_pm::AcpiPm`]. With `_S5_` in the DSDT, Linux's `poweroff`
//!   writes SLP_TYP 5 there and the VM stops with `StopReason::PowerOff`.
//! - The DSDT describes each device with its resources: a 16550 (`PNP0501`), the
//!   i8042 keyboard controller (`PNP0303`), the CMOS RTC (`PNP0B00`) and each
//!   virtio-mmio window as Linux's virtio-mmio ACPI device (`LNRO0005`) with its
//!   memory range and interrupt. Stock kernels built without
//!   `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` (Debian's) find virtio devices this way.
//!
//! ```
//! use vmcraft::acpi::{AcpiDevice, MachineDescription, TABLES_ADDR};
//! let machine = MachineDescription {
//!     vcpus: 2,
//!     devices: vec![
//!         AcpiDevice::Serial { port: 0x3f8, irq: 4 },
//!         AcpiDevice::VirtioMmio { base: 0xd100_0000, size: 0x1000, irq: 16 },
//!     ],
//! };
//! let blob = machine.build(TABLES_ADDR)?;
//! assert_eq!(&blob[..8], b"RSD PTR ");
//! # Ok::<(), vmcraft::acpi::AcpiError>(())
//! ```

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};
use vmcraft_devices::acpi_pm::{RESET_PORT, RESET_VALUE, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT};
use vmcraft_memory::GuestMemory;

/// Where the tables go: the start of the BIOS read-only area, where Linux looks for the
/// RSDP when the boot protocol does not name it.
pub const TABLES_ADDR: u64 = 0xe_0000;
/// End (exclusive) of the area the tables may use.
pub const TABLES_END: u64 = 0x10_0000;
/// KVM's in-kernel IOAPIC.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APIC.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Pins of KVM's in-kernel IOAPIC (GSIs 0 to 23).
pub const IOAPIC_PINS: u32 = 24;

const OEM_ID: [u8; 6] = *b"VMCRFT";
const OEM_TABLE_ID: [u8; 8] = *b"VMCRAFT ";
const OEM_REVISION: u32 = 1;
/// MADT flag: the machine also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1;
/// FADT IA-PC boot architecture flag: an 8042 (or equivalent) is present.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// FADT IA-PC boot architecture flag: do not probe for VGA.
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;

/// A device the DSDT describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcpiDevice {
    /// A 16550-compatible UART: 8 ports from `port`, ISA IRQ `irq`.
    Serial {
        /// First port.
        port: u16,
        /// ISA IRQ.
        irq: u32,
    },
    /// The i8042 keyboard controller at ports 0x60 and 0x64, keyboard IRQ 1.
    I8042,
    /// The CMOS RTC at ports 0x70–0x71, IRQ 8.
    Rtc,
    /// A virtio-mmio window and its interrupt (edge-triggered, active high: the
    /// interrupt is an irqfd pulse).
    VirtioMmio {
        /// Guest-physical base (below 4 GiB).
        base: u64,
        /// Window size.
        size: u64,
        /// GSI.
        irq: u32,
    },
    /// A PCI host bridge for bus 0 (`PCI0`, PNP0A08): configuration through ports
    /// 0xCF8-0xCFF and the ECAM window at `ecam` (in the MCFG table, and reserved as
    /// a motherboard resource), BARs in `[window, window + window_size)`. Its
    /// functions interrupt through MSI-X only (no INTx, so no `_PRT`).
    PciHostBridge {
        /// The ECAM window of bus 0 (1 MiB).
        ecam: u64,
        /// The memory window BARs are placed in (below 4 GiB).
        window: u64,
        /// Its size.
        window_size: u64,
    },
}

/// What the tables say about a machine.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MachineDescription {
    /// Number of vCPUs (APIC IDs 0 to `vcpus - 1`).
    pub vcpus: u32,
    /// The devices, in the order the DSDT lists them.
    pub devices: Vec<AcpiDevice>,
}

/// Errors from building or writing the tables.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AcpiError {
    /// No vCPU, or more than xAPIC IDs can name.
    #[error("{0} vCPUs cannot be described (1 to 255, xAPIC IDs)")]
    VcpuCount(u32),
    /// An interrupt outside the IOAPIC's pins.
    #[error("IRQ {irq} of {device} is not an IOAPIC pin (0 to 23)")]
    Irq {
        /// The device.
        device: &'static str,
        /// The IRQ.
        irq: u32,
    },
    /// A virtio-mmio window that a 32-bit memory descriptor cannot hold.
    #[error("virtio-mmio window {base:#x} (+{size:#x}) is not below 4 GiB")]
    WindowAbove4G {
        /// Base.
        base: u64,
        /// Size.
        size: u64,
    },
    /// The tables do not fit the BIOS area.
    #[error("the ACPI tables take {len} bytes, more than the {room} bytes from {addr:#x}")]
    TooLarge {
        /// Their size.
        len: usize,
        /// Where they were to go.
        addr: u64,
        /// Room there.
        room: u64,
    },
    /// Guest memory refused the write.
    #[error("cannot write the ACPI tables at {addr:#x}")]
    Write {
        /// Where.
        addr: u64,
        /// What vm-memory said.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// A PNP device (`hid`, and `_UID` if given) with fixed port ranges (first port,
/// length) and one edge-triggered interrupt, as AML.
fn isa_device(
    name: &str,
    hid: &str,
    uid: Option<u32>,
    ports: &[(u16, u8)],
    irq: u32,
    sink: &mut Vec<u8>,
) {
    let ios: Vec<aml::IO> = ports
        .iter()
        .map(|&(port, len)| aml::IO::new(port, port, 1, len))
        .collect();
    let interrupt = aml::Interrupt::new(true, true, false, false, irq);
    let mut resources: Vec<&dyn Aml> = ios.iter().map(|io| io as &dyn Aml).collect();
    resources.push(&interrupt);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new(hid));
    let uid = uid.map(|u| aml::Name::new("_UID".into(), &u));
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(resources));
    let mut children: Vec<&dyn Aml> = vec![&hid];
    children.extend(uid.as_ref().map(|u| u as &dyn Aml));
    children.push(&crs);
    aml::Device::new(name.into(), children).to_aml_bytes(sink);
}

/// Bytes of ECAM for bus 0.
const ECAM_SIZE: u64 = 1 << 20;

/// `PCI0`: a PCI Express root bridge for bus 0 with its configuration ports and its
/// memory window; and `MRES`, the ECAM window as a motherboard resource, which Linux
/// wants before it trusts the MCFG table.
fn pci_host_bridge(ecam: u64, window: u64, window_size: u64, sink: &mut Vec<u8>) {
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let memory = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        window as u32,
        (window + window_size - 1) as u32,
        None,
    );
    aml::Device::new(
        "PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new("_CCA".into(), &aml::ONE),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&bus, &ports, &memory]),
            ),
        ],
    )
    .to_aml_bytes(sink);
    aml::Device::new(
        "MRES".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Memory32Fixed::new(
                    false,
                    ecam as u32,
                    ECAM_SIZE as u32,
                )]),
            ),
        ],
    )
    .to_aml_bytes(sink);
}

/// AML already encoded, as a child of a scope.
struct EncodedAml(Vec<u8>);

impl Aml for EncodedAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn align16(n: usize) -> usize {
    (n + 15) & !15
}

fn check_irq(device: &'static str, irq: u32) -> Result<(), AcpiError> {
    if irq >= IOAPIC_PINS {
        return Err(AcpiError::Irq { device, irq });
    }
    Ok(())
}

impl MachineDescription {
    fn validate(&self) -> Result<(), AcpiError> {
        if !(1..=255).contains(&self.vcpus) {
            return Err(AcpiError::VcpuCount(self.vcpus));
        }
        for d in &self.devices {
            match *d {
                AcpiDevice::Serial { irq, .. } => check_irq("the serial port", irq)?,
                AcpiDevice::VirtioMmio { base, size, irq } => {
                    check_irq("a virtio-mmio device", irq)?;
                    if base.checked_add(size).is_none_or(|end| end > 1 << 32) {
                        return Err(AcpiError::WindowAbove4G { base, size });
                    }
                }
                AcpiDevice::PciHostBridge {
                    ecam,
                    window,
                    window_size,
                } => {
                    for (base, size) in [(ecam, ECAM_SIZE), (window, window_size)] {
                        if size == 0 || base.checked_add(size).is_none_or(|end| end > 1 << 32) {
                            return Err(AcpiError::WindowAbove4G { base, size });
                        }
                    }
                }
                AcpiDevice::I8042 | AcpiDevice::Rtc => {}
            }
        }
        Ok(())
    }

    /// The MADT: local APICs, the IOAPIC, the IRQ 0 override and LINT1 as NMI.
    fn madt(&self) -> Sdt {
        let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        madt.write_u32(36, LAPIC_ADDR);
        madt.write_u32(40, MADT_PCAT_COMPAT);
        let mut entries = Vec::new();
        for i in 0..self.vcpus {
            // Processor local APIC: type 0, length 8, UID, APIC ID, flags (enabled).
            entries.extend_from_slice(&[0, 8, i as u8, i as u8, 1, 0, 0, 0]);
        }
        // IOAPIC: type 1, length 12, ID (0, what KVM's IOAPIC ID register holds),
        // reserved, address, GSI base.
        entries.extend_from_slice(&[1, 12, 0, 0]);
        entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
        entries.extend_from_slice(&0u32.to_le_bytes());
        // Interrupt source override: ISA bus, IRQ 0 -> GSI 2, conforming polarity and
        // trigger (KVM routes the PIT's GSI 0 to IOAPIC pin 2).
        entries.extend_from_slice(&[2, 10, 0, 0]);
        entries.extend_from_slice(&2u32.to_le_bytes());
        entries.extend_from_slice(&0u16.to_le_bytes());
        // Local APIC NMI: every processor (UID 0xff), LINT1.
        entries.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
        madt.append_slice(&entries);
        madt
    }

    fn dsdt(&self) -> Sdt {
        let mut body: Vec<u8> = Vec::new();
        let mut virtio_uid = 0u32;
        let mut serial_uid = 0u32;
        let mut devices: Vec<EncodedAml> = Vec::new();
        for d in &self.devices {
            let mut bytes = Vec::new();
            match *d {
                AcpiDevice::Serial { port, irq } => {
                    let name = format!("COM{}", serial_uid + 1);
                    let uid = Some(serial_uid);
                    isa_device(&name, "PNP0501", uid, &[(port, 8)], irq, &mut bytes);
                    serial_uid += 1;
                }
                // The i8042 and the RTC at their fixed ISA ports and lines.
                AcpiDevice::I8042 => isa_device(
                    "PS2K",
                    "PNP0303",
                    None,
                    &[(0x60, 1), (0x64, 1)],
                    1,
                    &mut bytes,
                ),
                AcpiDevice::Rtc => isa_device("RTC_", "PNP0B00", None, &[(0x70, 2)], 8, &mut bytes),
                AcpiDevice::VirtioMmio { base, size, irq } => {
                    let name = format!("V{virtio_uid:03X}");
                    aml::Device::new(
                        name.as_str().into(),
                        vec![
                            &aml::Name::new("_HID".into(), &"LNRO0005"),
                            &aml::Name::new("_UID".into(), &virtio_uid),
                            &aml::Name::new("_CCA".into(), &aml::ONE),
                            &aml::Name::new(
                                "_CRS".into(),
                                &aml::ResourceTemplate::new(vec![
                                    &aml::Memory32Fixed::new(true, base as u32, size as u32),
                                    &aml::Interrupt::new(true, true, false, false, irq),
                                ]),
                            ),
                        ],
                    )
                    .to_aml_bytes(&mut bytes);
                    virtio_uid += 1;
                }
                AcpiDevice::PciHostBridge {
                    ecam,
                    window,
                    window_size,
                } => pci_host_bridge(ecam, window, window_size, &mut bytes),
            }
            devices.push(EncodedAml(bytes));
        }
        let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
        aml::Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut body);
        // S5 (soft off): SLP_TYP 5, which the sleep-control register turns into a
        // power-off.
        aml::Name::new(
            "_S5_".into(),
            &aml::Package::new(vec![&5u8, &0u8, &0u8, &0u8]),
        )
        .to_aml_bytes(&mut body);
        let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        dsdt.append_slice(&body);
        dsdt
    }

    fn fadt(&self, dsdt_addr: u64) -> Vec<u8> {
        let io8 = |port: u16| {
            GAS::new(
                AddressSpace::SystemIo,
                8,
                0,
                AccessSize::ByteAccess,
                port.into(),
            )
        };
        let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
            .dsdt_64(dsdt_addr)
            .flag(Flags::HwReducedAcpi)
            .flag(Flags::ResetRegSup)
            .flag(Flags::PwrButton)
            .flag(Flags::SlpButton);
        let mut boot_arch = IAPC_BOOT_ARCH_NO_VGA;
        if self.devices.contains(&AcpiDevice::I8042) {
            boot_arch |= IAPC_BOOT_ARCH_8042;
        }
        fadt.iapc_boot_arch = boot_arch.into();
        fadt.sleep_control_reg = io8(SLEEP_CONTROL_PORT);
        fadt.sleep_status_reg = io8(SLEEP_STATUS_PORT);
        fadt.reset_reg = io8(RESET_PORT);
        fadt.reset_value = RESET_VALUE;
        let mut bytes = Vec::new();
        fadt.finalize().to_aml_bytes(&mut bytes);
        bytes
    }

    /// The MCFG table (ECAM of bus 0) if the machine has a PCI host bridge, else
    /// nothing.
    fn mcfg(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        for d in &self.devices {
            if let AcpiDevice::PciHostBridge { ecam, .. } = *d {
                let mut mcfg = acpi_tables::mcfg::MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
                mcfg.add_ecam(ecam, 0, 0, 0);
                mcfg.to_aml_bytes(&mut bytes);
            }
        }
        bytes
    }

    /// The tables as one blob to be placed at guest-physical `addr`: the RSDP first,
    /// then the DSDT, MADT, FADT, MCFG (with PCI) and XSDT, each 16-byte aligned.
    /// Pure: unit tested.
    pub fn build(&self, addr: u64) -> Result<Vec<u8>, AcpiError> {
        self.validate()?;
        let rsdp_len = align16(std::mem::size_of::<Rsdp>());
        let dsdt = self.dsdt();
        let madt = self.madt();
        let dsdt_off = rsdp_len;
        let madt_off = align16(dsdt_off + dsdt.len());
        let fadt_off = align16(madt_off + madt.len());
        let fadt = self.fadt(addr + dsdt_off as u64);
        let mcfg = self.mcfg();
        let mcfg_off = align16(fadt_off + fadt.len());
        let xsdt_off = align16(mcfg_off + mcfg.len());
        let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        xsdt.add_entry(addr + fadt_off as u64);
        xsdt.add_entry(addr + madt_off as u64);
        if !mcfg.is_empty() {
            xsdt.add_entry(addr + mcfg_off as u64);
        }
        let mut xsdt_bytes = Vec::new();
        xsdt.to_aml_bytes(&mut xsdt_bytes);
        let mut rsdp = Vec::new();
        Rsdp::new(OEM_ID, addr + xsdt_off as u64).to_aml_bytes(&mut rsdp);

        let mut blob = vec![0u8; xsdt_off + xsdt_bytes.len()];
        for (off, bytes) in [
            (0, rsdp.as_slice()),
            (dsdt_off, dsdt.as_slice()),
            (madt_off, madt.as_slice()),
            (fadt_off, fadt.as_slice()),
            (mcfg_off, mcfg.as_slice()),
            (xsdt_off, xsdt_bytes.as_slice()),
        ] {
            blob[off..off + bytes.len()].copy_from_slice(bytes);
        }
        let room = TABLES_END.saturating_sub(addr);
        if blob.len() as u64 > room {
            return Err(AcpiError::TooLarge {
                len: blob.len(),
                addr,
                room,
            });
        }
        Ok(blob)
    }

    /// Build the tables and write them at [`TABLES_ADDR`]; returns the RSDP's address.
    pub fn write(&self, mem: &GuestMemory) -> Result<u64, AcpiError> {
        let blob = self.build(TABLES_ADDR)?;
        mem.write_slice(&blob, GuestAddress(TABLES_ADDR))
            .map_err(|source| AcpiError::Write {
                addr: TABLES_ADDR,
                source,
            })?;
        Ok(TABLES_ADDR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> MachineDescription {
        MachineDescription {
            vcpus: 4,
            devices: vec![
                AcpiDevice::Serial {
                    port: 0x3f8,
                    irq: 4,
                },
                AcpiDevice::I8042,
                AcpiDevice::Rtc,
                AcpiDevice::VirtioMmio {
                    base: 0xd100_0000,
                    size: 0x1000,
                    irq: 16,
                },
                AcpiDevice::VirtioMmio {
                    base: 0xd100_1000,
                    size: 0x1000,
                    irq: 17,
                },
            ],
        }
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    /// The table at guest address `addr` inside `blob` (placed at `base`), checked:
    /// its signature, and that its bytes sum to zero.
    fn table<'a>(blob: &'a [u8], base: u64, addr: u64, sig: &[u8; 4]) -> &'a [u8] {
        let off = (addr - base) as usize;
        assert_eq!(&blob[off..off + 4], sig);
        let len = u32_at(blob, off + 4) as usize;
        let t = &blob[off..off + len];
        assert_eq!(sum(t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    #[test]
    fn the_tables_chain_from_the_rsdp_with_valid_checksums() {
        let base = TABLES_ADDR;
        let blob = machine().build(base).unwrap();
        assert_eq!(&blob[..8], b"RSD PTR ");
        assert_eq!(sum(&blob[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(&blob[..36]), 0, "extended checksum");
        assert_eq!(blob[15], 2, "revision 2: the XSDT is used");
        let xsdt = table(&blob, base, u64_at(&blob, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        let fadt = table(&blob, base, u64_at(xsdt, 36), b"FACP");
        let madt = table(&blob, base, u64_at(xsdt, 44), b"APIC");
        // FADT: X_DSDT at 140, flags at 112, boot arch at 109, sleep control at 244.
        let dsdt = table(&blob, base, u64_at(fadt, 140), b"DSDT");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced ACPI");
        assert_ne!(flags & (1 << 10), 0, "reset register supported");
        assert_eq!(
            u16::from_le_bytes([fadt[109], fadt[110]]),
            IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_NO_VGA
        );
        assert_eq!(&fadt[244..248], &[1, 8, 0, 1], "sleep control: I/O, 8 bits");
        assert_eq!(u64_at(fadt, 248), u64::from(SLEEP_CONTROL_PORT));
        assert_eq!(u64_at(fadt, 120), u64::from(RESET_PORT));
        assert_eq!(fadt[128], RESET_VALUE);

        // MADT: 4 local APICs with IDs 0..3, then the IOAPIC, the override, the NMI.
        assert_eq!(u32_at(madt, 36), LAPIC_ADDR);
        assert_eq!(u32_at(madt, 40), MADT_PCAT_COMPAT);
        let mut off = 44;
        let mut lapics = Vec::new();
        let mut ioapic = None;
        let mut overrides = Vec::new();
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            match kind {
                0 => lapics.push((madt[off + 3], u32_at(madt, off + 4))),
                1 => ioapic = Some((u32_at(madt, off + 4), u32_at(madt, off + 8))),
                2 => overrides.push((madt[off + 3], u32_at(madt, off + 4))),
                _ => {}
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapics, vec![(0, 1), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(ioapic, Some((IOAPIC_ADDR, 0)));
        assert_eq!(overrides, vec![(0, 2)]);

        // DSDT: the devices and _S5_.
        let find = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"LNRO0005\0"));
        assert!(find(b"V000") && find(b"V001"));
        assert!(find(b"_S5_"));
        // The i8042 (PNP0303 as an EISA id) with both its ports, the RTC with two ports.
        assert!(find(b"PS2K") && find(b"RTC_"));
        assert!(
            find(&[0x47, 1, 0x60, 0, 0x60, 0, 1, 1]) && find(&[0x47, 1, 0x64, 0, 0x64, 0, 1, 1])
        );
        assert!(find(&[0x47, 1, 0x70, 0, 0x70, 0, 1, 2]));
        assert!(find(&[0x0c, 0x41, 0xd0, 0x03, 0x03]), "EisaId(\"PNP0303\")");
        // Memory32Fixed descriptor (0x86) of the second window: read-write, base, size.
        let mut mem32 = vec![0x86, 9, 0, 1];
        mem32.extend_from_slice(&0xd100_1000u32.to_le_bytes());
        mem32.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(find(&mem32));
        // Extended interrupt descriptor (0x89) for GSI 17: consumer, edge, active high.
        let mut irq = vec![0x89, 6, 0, 0b0011, 1];
        irq.extend_from_slice(&17u32.to_le_bytes());
        assert!(find(&irq));
    }

    #[test]
    fn a_pci_host_bridge_gets_an_mcfg_table_a_pci0_device_and_its_ecam_reserved() {
        let base = TABLES_ADDR;
        let mut m = machine();
        m.devices.push(AcpiDevice::PciHostBridge {
            ecam: 0xd000_0000,
            window: 0xd200_0000,
            window_size: 0x200_0000,
        });
        let blob = m.build(base).unwrap();
        let xsdt = table(&blob, base, u64_at(&blob, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 24, "FADT, MADT and MCFG");
        let mcfg = table(&blob, base, u64_at(xsdt, 52), b"MCFG");
        // One allocation: base, segment 0, buses 0 to 0.
        assert_eq!(mcfg.len(), 44 + 16);
        assert_eq!(u64_at(mcfg, 44), 0xd000_0000);
        assert_eq!(&mcfg[52..56], &[0, 0, 0, 0]);
        let fadt = table(&blob, base, u64_at(xsdt, 36), b"FACP");
        let dsdt = table(&blob, base, u64_at(fadt, 140), b"DSDT");
        let find = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"PCI0") && find(b"MRES") && find(b"_BBN") && find(b"_SEG"));
        // PNP0A08 and PNP0C02 as EISA ids.
        for id in ["PNP0A08", "PNP0A03", "PNP0C02"] {
            let mut bytes = Vec::new();
            aml::EISAName::new(id).to_aml_bytes(&mut bytes);
            assert!(find(&bytes), "{id}");
        }
        // The ECAM window as a fixed memory range, the BAR window's bounds.
        assert!(find(&0xd000_0000u32.to_le_bytes()));
        assert!(find(&0xd200_0000u32.to_le_bytes()) && find(&0xd3ff_ffffu32.to_le_bytes()));
        // Without PCI, no MCFG.
        let blob = machine().build(base).unwrap();
        let xsdt = table(&blob, base, u64_at(&blob, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        // A window above 4 GiB is refused.
        m.devices.push(AcpiDevice::PciHostBridge {
            ecam: 0xffff_0000,
            window: 0xd200_0000,
            window_size: 0x200_0000,
        });
        assert!(matches!(
            m.build(base),
            Err(AcpiError::WindowAbove4G { .. })
        ));
    }

    #[test]
    fn bad_descriptions_are_refused_with_the_value() {
        let mut m = machine();
        m.vcpus = 0;
        assert!(matches!(m.build(TABLES_ADDR), Err(AcpiError::VcpuCount(0))));
        m.vcpus = 256;
        assert!(matches!(
            m.build(TABLES_ADDR),
            Err(AcpiError::VcpuCount(256))
        ));
        let mut m = machine();
        m.devices.push(AcpiDevice::VirtioMmio {
            base: 0xd100_2000,
            size: 0x1000,
            irq: 24,
        });
        assert!(matches!(
            m.build(TABLES_ADDR),
            Err(AcpiError::Irq {
                device: "a virtio-mmio device",
                irq: 24
            })
        ));
        let mut m = machine();
        m.devices.push(AcpiDevice::VirtioMmio {
            base: 0xffff_f800,
            size: 0x1000,
            irq: 20,
        });
        assert!(matches!(
            m.build(TABLES_ADDR),
            Err(AcpiError::WindowAbove4G { .. })
        ));
        assert!(matches!(
            machine().build(TABLES_END - 64),
            Err(AcpiError::TooLarge { .. })
        ));
    }

    #[test]
    fn the_largest_machine_fits() {
        let m = MachineDescription {
            vcpus: 255,
            devices: (0..8)
                .map(|i| AcpiDevice::VirtioMmio {
                    base: 0xd100_0000 + i * 0x1000,
                    size: 0x1000,
                    irq: 16 + i as u32,
                })
                .collect(),
        };
        let blob = m.build(TABLES_ADDR).unwrap();
        assert!(blob.len() < 8192, "{} bytes", blob.len());
    }
}
