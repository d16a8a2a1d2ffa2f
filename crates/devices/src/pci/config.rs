//! One PCI function's configuration space: the type 0 header, its base address
//! registers and a capability list, as plain data with a writable mask per bit.
//!
//! What the guest may change is exactly what a mask allows: the command register's
//! I/O, memory, bus-master and INTx-disable bits, the cache line size, the interrupt
//! line, a BAR's address bits (so sizing by writing all ones reads the size back) and
//! the bits a capability declares writable. Every other write is ignored, as PCI
//! requires of registers a function does not implement; reads of unimplemented
//! registers return 0, and the extended space (0x100 up) holds no capability.
//!
//! ```
//! use vmcraft_devices::pci::config::{BarKind, PciConfiguration, PciHeader};
//! let mut cfg = PciConfiguration::new(PciHeader {
//!     vendor_id: 0x1af4,
//!     device_id: 0x1042,
//!     ..PciHeader::default()
//! });
//! cfg.add_bar(0, 0x4000, BarKind::Memory64).unwrap();
//! cfg.place_bar(0, 0x1_0000_0000).unwrap();
//! // Sizing: all ones in, the size's mask out (low half: flags 0b1100, 64-bit prefetchable).
//! cfg.write(0x10, &[0xff; 4]);
//! assert_eq!(cfg.read_u32(0x10), 0xffff_c00c);
//! ```

/// Bytes of a function's configuration space (PCI Express: 4 KiB, the first 256 bytes
/// conventional PCI's).
pub const CONFIG_SIZE: usize = 4096;
/// The command register.
pub const COMMAND: usize = 0x04;
/// The status register.
pub const STATUS: usize = 0x06;
/// The first base address register.
pub const BAR0: usize = 0x10;
/// The capabilities pointer.
pub const CAPABILITIES_POINTER: usize = 0x34;
/// The interrupt line register.
pub const INTERRUPT_LINE: usize = 0x3c;
/// Where capabilities may start (after the type 0 header).
pub const FIRST_CAPABILITY: usize = 0x40;
/// Number of base address registers of a type 0 header.
pub const BARS: usize = 6;

/// Command register: I/O space decoding.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: the function may master the bus (DMA, MSI).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: the function has a capability list.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;

/// What a base address register decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BarKind {
    /// I/O space.
    Io,
    /// 32-bit memory space.
    Memory32,
    /// 64-bit memory space (this register and the next), prefetchable.
    Memory64,
}

/// The identity registers of a type 0 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code: base class, subclass, programming interface.
    pub class: [u8; 3],
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// The interrupt pin (0: none, 1-4: INTA-INTD).
    pub interrupt_pin: u8,
}

/// A BAR refused by [`PciConfiguration::add_bar`] or [`PciConfiguration::place_bar`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BarError {
    /// The index is past the last BAR, or a 64-bit BAR would take the last one's
    /// upper half past it.
    #[error("BAR {0}: no such register (a 64-bit BAR takes two)")]
    Index(usize),
    /// The register is taken already.
    #[error("BAR {0}: taken already")]
    Taken(usize),
    /// The size is not a power of two at least the minimum (16 bytes of memory, 4 of
    /// I/O), or too large for the kind.
    #[error(
        "BAR {index}: size {size:#x} is not a power of two within what a {kind:?} BAR decodes"
    )]
    Size {
        /// The BAR.
        index: usize,
        /// The size asked for.
        size: u64,
        /// Its kind.
        kind: BarKind,
    },
    /// The address is not aligned to the size, or out of the kind's reach.
    #[error("BAR {index}: address {address:#x} is not aligned to its size or out of reach")]
    Address {
        /// The BAR.
        index: usize,
        /// The address.
        address: u64,
    },
    /// There is no BAR there.
    #[error("BAR {0}: not implemented")]
    Absent(usize),
}

/// A capability refused by [`PciConfiguration::add_capability`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a capability of {len} bytes (id {id:#x}) does not fit in the configuration space")]
pub struct CapabilityError {
    /// The capability id.
    pub id: u8,
    /// Its length, header included.
    pub len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Bar {
    kind: BarKind,
    size: u64,
}

/// Where a BAR decodes, when it decodes at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarRange {
    /// The BAR's index.
    pub index: usize,
    /// Its kind.
    pub kind: BarKind,
    /// Its guest-physical (or port) address.
    pub address: u64,
    /// Its size.
    pub size: u64,
}

impl BarRange {
    /// Whether `address` falls inside it.
    pub fn contains(&self, address: u64) -> bool {
        address >= self.address && address - self.address < self.size
    }
}

/// A function's configuration space. See the [module documentation](self).
#[derive(Clone)]
pub struct PciConfiguration {
    bytes: Box<[u8; CONFIG_SIZE]>,
    writable: Box<[u8; CONFIG_SIZE]>,
    bars: [Option<Bar>; BARS],
    /// Where the next capability goes.
    next_capability: usize,
    /// The last capability's "next" byte.
    last_link: usize,
}

impl std::fmt::Debug for PciConfiguration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfiguration")
            .field("vendor", &format_args!("{:#06x}", self.read_u16(0)))
            .field("device", &format_args!("{:#06x}", self.read_u16(2)))
            .field("command", &format_args!("{:#06x}", self.command()))
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

/// The registers of a [`PciConfiguration`] that a guest can change, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConfigurationState {
    /// Every writable byte's offset and value that differs from the function as built.
    pub changed: Vec<(u16, u8)>,
}

impl PciConfiguration {
    /// A function with `header`'s identity, no BARs and no capabilities.
    pub fn new(header: PciHeader) -> Self {
        let mut c = PciConfiguration {
            bytes: Box::new([0; CONFIG_SIZE]),
            writable: Box::new([0; CONFIG_SIZE]),
            bars: [None; BARS],
            next_capability: FIRST_CAPABILITY,
            last_link: CAPABILITIES_POINTER,
        };
        c.set_u16(0x00, header.vendor_id);
        c.set_u16(0x02, header.device_id);
        c.bytes[0x08] = header.revision;
        c.bytes[0x09] = header.class[2];
        c.bytes[0x0a] = header.class[1];
        c.bytes[0x0b] = header.class[0];
        // Header type 0, single function.
        c.bytes[0x0e] = 0;
        c.set_u16(0x2c, header.subsystem_vendor_id);
        c.set_u16(0x2e, header.subsystem_id);
        c.bytes[0x3d] = header.interrupt_pin;
        let command = COMMAND_IO
            | COMMAND_MEMORY
            | COMMAND_BUS_MASTER
            | if header.interrupt_pin != 0 {
                COMMAND_INTX_DISABLE
            } else {
                0
            };
        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&command.to_le_bytes());
        // Cache line size and the interrupt line are plain read-write registers.
        c.writable[0x0c] = 0xff;
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    /// Give BAR `index` `size` bytes of `kind` (a 64-bit BAR also takes `index + 1`),
    /// at address 0 until [`place_bar`](Self::place_bar).
    pub fn add_bar(&mut self, index: usize, size: u64, kind: BarKind) -> Result<(), BarError> {
        let span = if kind == BarKind::Memory64 { 2 } else { 1 };
        if index + span > BARS {
            return Err(BarError::Index(index));
        }
        if (index..index + span).any(|i| self.bar_taken(i)) {
            return Err(BarError::Taken(index));
        }
        let (min, max) = match kind {
            BarKind::Io => (4, 256),
            BarKind::Memory32 => (16, 1 << 31),
            BarKind::Memory64 => (16, 1 << 63),
        };
        if !size.is_power_of_two() || !(min..=max).contains(&size) {
            return Err(BarError::Size { index, size, kind });
        }
        self.bars[index] = Some(Bar { kind, size });
        let flags: u32 = match kind {
            BarKind::Io => 0b01,
            BarKind::Memory32 => 0,
            BarKind::Memory64 => 0b1100,
        };
        let mask = !(size - 1);
        let at = BAR0 + 4 * index;
        self.set_u32(at, flags);
        // The flag bits (the low two of an I/O BAR, four of a memory BAR) are read-only.
        let address_bits = match kind {
            BarKind::Io => (mask as u32) & !0x3,
            _ => (mask as u32) & !0xf,
        };
        self.writable[at..at + 4].copy_from_slice(&address_bits.to_le_bytes());
        if kind == BarKind::Memory64 {
            self.writable[at + 4..at + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        Ok(())
    }

    fn bar_taken(&self, index: usize) -> bool {
        self.bars[index].is_some()
            || index > 0 && self.bars[index - 1].is_some_and(|b| b.kind == BarKind::Memory64)
    }

    /// Put BAR `index` at `address` (what firmware does before the guest runs).
    pub fn place_bar(&mut self, index: usize, address: u64) -> Result<(), BarError> {
        let bar = self
            .bars
            .get(index)
            .copied()
            .flatten()
            .ok_or(BarError::Absent(index))?;
        let reach = match bar.kind {
            BarKind::Io => 1 << 16,
            BarKind::Memory32 => 1 << 32,
            BarKind::Memory64 => u64::MAX,
        };
        if !address.is_multiple_of(bar.size) || address > reach - bar.size {
            return Err(BarError::Address { index, address });
        }
        let at = BAR0 + 4 * index;
        let flags = self.read_u32(at) & if bar.kind == BarKind::Io { 0x3 } else { 0xf };
        self.set_u32(at, address as u32 | flags);
        if bar.kind == BarKind::Memory64 {
            self.set_u32(at + 4, (address >> 32) as u32);
        }
        Ok(())
    }

    /// BAR `index` as programmed (whether or not decoding is enabled).
    pub fn bar(&self, index: usize) -> Option<BarRange> {
        let bar = self.bars.get(index).copied().flatten()?;
        let at = BAR0 + 4 * index;
        let low = u64::from(self.read_u32(at));
        let address = match bar.kind {
            BarKind::Io => low & !0x3,
            BarKind::Memory32 => low & !0xf,
            BarKind::Memory64 => (low & !0xf) | u64::from(self.read_u32(at + 4)) << 32,
        };
        Some(BarRange {
            index,
            kind: bar.kind,
            address,
            size: bar.size,
        })
    }

    /// The BARs that decode now: memory BARs while memory decoding is on, I/O BARs
    /// while I/O decoding is on, each with an address (0 is unassigned).
    pub fn decoding_bars(&self) -> Vec<BarRange> {
        let command = self.command();
        (0..BARS)
            .filter_map(|i| self.bar(i))
            .filter(|b| {
                let on = match b.kind {
                    BarKind::Io => command & COMMAND_IO != 0,
                    _ => command & COMMAND_MEMORY != 0,
                };
                on && b.address != 0
            })
            .collect()
    }

    /// Append a capability with id `id` and `body` (the bytes after its id and next
    /// pointer), whose bits in `writable` (as long as `body`, or shorter: the rest
    /// read-only) the guest may change. Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, CapabilityError> {
        let len = 2 + body.len();
        let at = self.next_capability;
        if at + len > 0x100 || writable.len() > body.len() {
            return Err(CapabilityError { id, len });
        }
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.bytes[at + 2..at + len].copy_from_slice(body);
        self.writable[at + 2..at + 2 + writable.len()].copy_from_slice(writable);
        self.bytes[self.last_link] = at as u8;
        self.last_link = at + 1;
        // Dword-aligned, as the capability pointer's low two bits are reserved.
        self.next_capability = (at + len).next_multiple_of(4);
        let status = self.read_u16(STATUS) | STATUS_CAPABILITIES;
        self.set_u16(STATUS, status);
        Ok(at)
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    /// Whether the function may master the bus (DMA and MSI writes).
    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// A configuration read of `data.len()` bytes (1, 2 or 4) at `offset`; a read
    /// past the space or of another width reads all ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        match self.bytes.get(offset..offset + data.len()) {
            Some(bytes) if matches!(data.len(), 1 | 2 | 4) => data.copy_from_slice(bytes),
            _ => data.fill(0xff),
        }
    }

    /// A configuration write of `data.len()` bytes (1, 2 or 4) at `offset`: only the
    /// writable bits change; anything else is ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        if !matches!(data.len(), 1 | 2 | 4) || offset + data.len() > CONFIG_SIZE {
            return;
        }
        for (i, &b) in data.iter().enumerate() {
            let at = offset + i;
            let mask = self.writable[at];
            self.bytes[at] = (self.bytes[at] & !mask) | (b & mask);
        }
    }

    /// The dword at `offset` (aligned down to 4).
    pub fn read_u32(&self, offset: usize) -> u32 {
        let at = offset & !3 & (CONFIG_SIZE - 1);
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().expect("4 bytes"))
    }

    /// The word at `offset`.
    pub fn read_u16(&self, offset: usize) -> u16 {
        let at = offset & !1 & (CONFIG_SIZE - 1);
        u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    /// Set the word at `offset` whatever the mask (the function's own registers).
    pub fn set_u16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    /// Set the dword at `offset` whatever the mask (the function's own registers).
    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    /// The guest's changes, for a snapshot: every writable byte that differs from
    /// `built` (the same function as built, before the guest ran).
    pub fn save(&self, built: &PciConfiguration) -> ConfigurationState {
        ConfigurationState {
            changed: (0..CONFIG_SIZE)
                .filter(|&i| self.writable[i] != 0 && self.bytes[i] != built.bytes[i])
                .map(|i| (i as u16, self.bytes[i]))
                .collect(),
        }
    }

    /// Put back a snapshot's changes into this function as built: each must be a
    /// byte the guest could have written (the bits it could not keep their built
    /// values). The offending offset is named.
    pub fn restore(&mut self, state: &ConfigurationState) -> Result<(), String> {
        if state.changed.len() > CONFIG_SIZE {
            return Err(format!("{} changed bytes", state.changed.len()));
        }
        for &(offset, value) in &state.changed {
            let at = usize::from(offset);
            let mask = *self
                .writable
                .get(at)
                .ok_or_else(|| format!("offset {at:#x} is past the configuration space"))?;
            if mask == 0 {
                return Err(format!("offset {at:#x} is not writable"));
            }
            if (value ^ self.bytes[at]) & !mask != 0 {
                return Err(format!(
                    "offset {at:#x}: {value:#04x} changes bits a guest cannot write"
                ));
            }
            self.bytes[at] = value;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function() -> PciConfiguration {
        PciConfiguration::new(PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class: [0x01, 0x80, 0x00],
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
            interrupt_pin: 0,
        })
    }

    #[test]
    fn identity_registers_read_back_and_cannot_be_written() {
        let mut c = function();
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        assert_eq!(c.read_u32(0x08), 0x0180_0001);
        assert_eq!(c.read_u32(0x2c), 0x0040_1af4);
        c.write(0, &[0, 0, 0, 0]);
        c.write(0x08, &[0xff; 4]);
        c.write(0x2c, &[0; 4]);
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        assert_eq!(c.read_u32(0x08), 0x0180_0001);
        assert_eq!(c.read_u32(0x2c), 0x0040_1af4);
        // Header type 0; no expansion ROM; nothing in the extended space.
        assert_eq!(c.read_u32(0x0c) >> 16 & 0xff, 0);
        c.write(0x30, &[0xff; 4]);
        assert_eq!(c.read_u32(0x30), 0);
        assert_eq!(c.read_u32(0x100), 0);
    }

    #[test]
    fn only_the_commands_a_function_has_are_kept() {
        let mut c = function();
        c.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(
            c.command(),
            COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER,
            "no INTx pin: INTx disable is not implemented"
        );
        assert!(c.bus_master());
        // The status register is read-only here.
        c.write(STATUS, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_u16(STATUS), 0);
        let mut intx = PciConfiguration::new(PciHeader {
            interrupt_pin: 1,
            ..PciHeader::default()
        });
        intx.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(intx.command() & COMMAND_INTX_DISABLE, COMMAND_INTX_DISABLE);
        assert_eq!(
            intx.read_u32(0x3c),
            0x0000_0100,
            "pin INTA, line unassigned"
        );
    }

    #[test]
    fn bars_size_and_move_as_the_guest_writes_them() {
        let mut c = function();
        c.add_bar(0, 0x4000, BarKind::Memory64).unwrap();
        c.add_bar(2, 0x1000, BarKind::Memory32).unwrap();
        c.add_bar(3, 0x20, BarKind::Io).unwrap();
        c.place_bar(0, 0x80_0000_0000).unwrap();
        c.place_bar(2, 0xc000_0000).unwrap();
        c.place_bar(3, 0x6000).unwrap();
        assert_eq!(c.read_u32(0x10), 0x0000_000c);
        assert_eq!(c.read_u32(0x14), 0x80);
        // Sizing each: write ones, read the mask, put the address back.
        for (bar, expect) in [
            (0x10, 0xffff_c00c),
            (0x14, 0xffff_ffff),
            (0x18, 0xffff_f000),
            (0x1c, 0xffff_ffe1),
            (0x20, 0),
            (0x24, 0),
        ] {
            let saved = c.read_u32(bar);
            c.write(bar, &[0xff; 4]);
            assert_eq!(c.read_u32(bar), expect, "BAR at {bar:#x}");
            c.write(bar, &saved.to_le_bytes());
            assert_eq!(c.read_u32(bar), saved);
        }
        assert!(c.decoding_bars().is_empty(), "decoding is off");
        c.write(COMMAND, &(COMMAND_MEMORY).to_le_bytes());
        let on: Vec<_> = c
            .decoding_bars()
            .iter()
            .map(|b| (b.index, b.address))
            .collect();
        assert_eq!(on, [(0, 0x80_0000_0000), (2, 0xc000_0000)]);
        // The guest moves BAR 2, byte by byte.
        c.write(0x1b, &[0xd0]);
        assert_eq!(c.bar(2).unwrap().address, 0xd000_0000);
        c.write(COMMAND, &(COMMAND_IO | COMMAND_MEMORY).to_le_bytes());
        assert_eq!(c.decoding_bars().len(), 3);
        assert!(c.bar(3).unwrap().contains(0x601f));
        assert!(!c.bar(3).unwrap().contains(0x6020));
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = function();
        assert_eq!(
            c.add_bar(5, 0x1000, BarKind::Memory64),
            Err(BarError::Index(5))
        );
        assert_eq!(
            c.add_bar(6, 0x1000, BarKind::Memory32),
            Err(BarError::Index(6))
        );
        assert!(matches!(
            c.add_bar(0, 0x1800, BarKind::Memory32),
            Err(BarError::Size { .. })
        ));
        assert!(matches!(
            c.add_bar(0, 8, BarKind::Memory32),
            Err(BarError::Size { .. })
        ));
        assert!(matches!(
            c.add_bar(0, 512, BarKind::Io),
            Err(BarError::Size { .. })
        ));
        c.add_bar(0, 0x1000, BarKind::Memory64).unwrap();
        assert_eq!(
            c.add_bar(1, 0x1000, BarKind::Memory32),
            Err(BarError::Taken(1))
        );
        assert_eq!(
            c.add_bar(0, 0x1000, BarKind::Memory32),
            Err(BarError::Taken(0))
        );
        assert!(matches!(
            c.place_bar(0, 0x1800),
            Err(BarError::Address { .. })
        ));
        assert_eq!(c.place_bar(2, 0x1000), Err(BarError::Absent(2)));
        c.add_bar(2, 0x1000, BarKind::Memory32).unwrap();
        assert!(matches!(
            c.place_bar(2, 0x1_0000_0000),
            Err(BarError::Address { .. })
        ));
    }

    #[test]
    fn capabilities_chain_and_keep_their_read_only_bits() {
        let mut c = function();
        let a = c
            .add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[0, 0xc0])
            .unwrap();
        let b = c.add_capability(0x09, &[0; 14], &[]).unwrap();
        assert_eq!((a, b), (0x40, 0x4c));
        assert_eq!(
            c.read_u16(STATUS) & STATUS_CAPABILITIES,
            STATUS_CAPABILITIES
        );
        assert_eq!(c.read_u32(CAPABILITIES_POINTER) & 0xff, 0x40);
        assert_eq!(c.read_u16(0x40), 0x4c11);
        assert_eq!(c.read_u16(0x4c), 0x0009);
        c.write(0x42, &[0xff, 0xff]);
        assert_eq!(c.read_u16(0x42), 0xc201);
        c.write(0x40, &[0, 0]);
        assert_eq!(c.read_u16(0x40), 0x4c11);
        assert!(c.add_capability(0x09, &[0; 200], &[]).is_err());
    }

    #[test]
    fn odd_widths_and_offsets_past_the_space_are_ignored_or_all_ones() {
        let mut c = function();
        let mut three = [0u8; 3];
        c.read(0, &mut three);
        assert_eq!(three, [0xff; 3]);
        let mut four = [0u8; 4];
        c.read(CONFIG_SIZE - 2, &mut four);
        assert_eq!(four, [0xff; 4]);
        c.write(CONFIG_SIZE - 2, &[0xff; 4]);
        c.write(0x3c, &[1, 2, 3]);
        assert_eq!(c.read_u32(0x3c) & 0xff, 0);
        c.write(0x3c, &[9]);
        assert_eq!(c.read_u32(0x3c) & 0xff, 9);
    }

    #[test]
    fn a_saved_configuration_restores_and_a_forged_one_is_refused() {
        let built = {
            let mut c = function();
            c.add_bar(0, 0x1000, BarKind::Memory32).unwrap();
            c
        };
        let mut c = built.clone();
        c.write(
            COMMAND,
            &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes(),
        );
        c.write(0x10, &0xe000_0000u32.to_le_bytes());
        c.write(INTERRUPT_LINE, &[5]);
        let state = c.save(&built);
        let mut again = built.clone();
        again.restore(&state).unwrap();
        assert_eq!(again.bytes, c.bytes);
        let mut forged = state.clone();
        forged.changed.push((0, 0x12));
        assert_eq!(
            built.clone().restore(&forged),
            Err("offset 0x0 is not writable".into())
        );
        let forged = ConfigurationState {
            changed: vec![(0x11, 0x0f)],
        };
        assert!(built
            .clone()
            .restore(&forged)
            .unwrap_err()
            .contains("cannot write"));
        let forged = ConfigurationState {
            changed: vec![(0x2000, 1)],
        };
        assert!(built.clone().restore(&forged).unwrap_err().contains("past"));
    }
}
