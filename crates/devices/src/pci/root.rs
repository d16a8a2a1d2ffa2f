//! A PCI root complex with one bus: the functions on it, their configuration space
//! through both access mechanisms (the legacy ports 0xCF8/0xCFC and PCI Express's
//! memory-mapped ECAM), and their BARs' accesses routed from the PCI windows.
//!
//! [`PciRoot`] is shared (`Arc`) by the three bus devices that reach it:
//! [`PciConfigIo`] on ports 0xCF8-0xCFF, [`PciConfigMmio`] on the ECAM window, and
//! [`PciBarWindow`] on each window BARs are placed in. Every access from the guest is
//! decoded here; an access to no function reads all ones and writes nowhere.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmcraft_devices::pci::root::{ecam_offset, PciRoot};
//! let root = Arc::new(PciRoot::new());
//! // The host bridge is device 0: its vendor and device IDs through ECAM.
//! let mut id = [0u8; 4];
//! root.config_read(ecam_offset(0, 0, 0), &mut id);
//! assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
//! // Nothing at device 5.
//! root.config_read(ecam_offset(5, 0, 0), &mut id);
//! assert_eq!(id, [0xff; 4]);
//! ```

use std::sync::{Arc, Mutex, PoisonError, RwLock};

use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{MutDeviceMmio, MutDevicePio};

use super::config::{BarRange, PciConfiguration, PciHeader};

/// Devices on the bus (device numbers 0-31, function 0 each).
pub const SLOTS: usize = 32;
/// The first port of configuration mechanism #1 (CONFIG_ADDRESS).
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// Ports [`PciConfigIo`] takes: CONFIG_ADDRESS and CONFIG_DATA.
pub const CONFIG_PORTS: u16 = 8;
/// Bytes of ECAM for one bus (32 devices × 8 functions × 4 KiB).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// The ECAM offset of `register` of `device` (function 0 unless `function`) on bus 0.
pub fn ecam_offset(device: u8, function: u8, register: u16) -> u64 {
    u64::from(device & 31) << 15 | u64::from(function & 7) << 12 | u64::from(register & 0xfff)
}

/// One PCI function on the bus: its configuration space and its BARs.
pub trait PciFunction: Send {
    /// Its configuration space.
    fn configuration(&self) -> &PciConfiguration;

    /// A configuration read (1, 2 or 4 bytes at `offset` < 4096). By default the
    /// configuration space's bytes.
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.configuration().read(offset, data)
    }

    /// A configuration write (1, 2 or 4 bytes at `offset` < 4096): the function
    /// applies it to its configuration space and reacts (an enabled capability, say).
    fn config_write(&mut self, offset: usize, data: &[u8]);

    /// A read of `data.len()` bytes at `offset` into BAR `bar`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);

    /// A write of `data.len()` bytes at `offset` into BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// Its decoding BARs changed (the guest moved one, or turned decoding on or off):
    /// what it registered at the old addresses (ioeventfds) moves with them.
    fn bars_moved(&mut self, _before: &[BarRange], _after: &[BarRange]) {}
}

/// A function shared between the root and whoever else drives it.
pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// Why a function could not be put on the bus.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RootError {
    /// Every device number is taken.
    #[error("the PCI bus is full ({SLOTS} devices)")]
    Full,
}

/// The host bridge at device 0: identity only (the generic PCI Express host bridge's
/// IDs, class "host bridge").
#[derive(Debug)]
pub struct HostBridge(PciConfiguration);

impl HostBridge {
    /// The bridge.
    pub fn new() -> Self {
        HostBridge(PciConfiguration::new(PciHeader {
            vendor_id: 0x1b36,
            device_id: 0x0008,
            class: [0x06, 0x00, 0x00],
            ..PciHeader::default()
        }))
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciFunction for HostBridge {
    fn configuration(&self) -> &PciConfiguration {
        &self.0
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.0.write(offset, data)
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
}

/// The bus: its functions and where their BARs decode. See the
/// [module documentation](self).
pub struct PciRoot {
    slots: RwLock<Vec<Option<SharedFunction>>>,
    /// Each decoding BAR and its device number, kept current on every
    /// configuration write.
    decoding: RwLock<Vec<(BarRange, usize)>>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot")
            .field("devices", &self.functions().len())
            .finish_non_exhaustive()
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

fn lock(f: &SharedFunction) -> std::sync::MutexGuard<'_, dyn PciFunction + 'static> {
    f.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PciRoot {
    /// A bus with the host bridge at device 0.
    pub fn new() -> Self {
        let mut slots = vec![None; SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())) as SharedFunction);
        PciRoot {
            slots: RwLock::new(slots),
            decoding: RwLock::new(Vec::new()),
        }
    }

    fn slots(&self) -> std::sync::RwLockReadGuard<'_, Vec<Option<SharedFunction>>> {
        self.slots.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Put `function` at the lowest free device number, which is returned.
    pub fn add(&self, function: SharedFunction) -> Result<u8, RootError> {
        let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
        let slot = slots
            .iter()
            .position(Option::is_none)
            .ok_or(RootError::Full)?;
        let bars = lock(&function).configuration().decoding_bars();
        slots[slot] = Some(function);
        drop(slots);
        self.set_decoding(slot, &bars);
        Ok(slot as u8)
    }

    /// The function at device number `device`.
    pub fn function(&self, device: u8) -> Option<SharedFunction> {
        self.slots().get(usize::from(device)).cloned().flatten()
    }

    /// Every function with its device number.
    pub fn functions(&self) -> Vec<(u8, SharedFunction)> {
        self.slots()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.clone().map(|f| (i as u8, f)))
            .collect()
    }

    fn set_decoding(&self, slot: usize, bars: &[BarRange]) {
        let mut decoding = self
            .decoding
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        decoding.retain(|(_, s)| *s != slot);
        decoding.extend(bars.iter().map(|b| (*b, slot)));
    }

    /// Decode an ECAM offset on bus 0: the function and the register, if both exist.
    fn decode(&self, offset: u64) -> Option<(usize, SharedFunction, usize)> {
        if offset >= ECAM_BUS_SIZE || offset >> 12 & 7 != 0 {
            return None;
        }
        let slot = (offset >> 15) as usize & 31;
        let function = self.slots()[slot].clone()?;
        Some((slot, function, (offset & 0xfff) as usize))
    }

    /// A configuration read at ECAM `offset` (bus 0 only); all ones where nothing is.
    pub fn config_read(&self, offset: u64, data: &mut [u8]) {
        match self.decode(offset) {
            Some((_, f, register)) if register + data.len() <= 0x1000 => {
                lock(&f).config_read(register, data)
            }
            _ => data.fill(0xff),
        }
    }

    /// A configuration write at ECAM `offset` (bus 0 only); the BARs it moves are
    /// routed anew, and the function is told.
    pub fn config_write(&self, offset: u64, data: &[u8]) {
        let Some((slot, f, register)) = self.decode(offset) else {
            return;
        };
        if register + data.len() > 0x1000 {
            return;
        }
        let mut function = lock(&f);
        let before = function.configuration().decoding_bars();
        function.config_write(register, data);
        let after = function.configuration().decoding_bars();
        if before != after {
            self.set_decoding(slot, &after);
            function.bars_moved(&before, &after);
        }
    }

    /// Route device `device`'s BARs as its configuration space says now (after a
    /// restore put it back behind the root's back), telling the function if they
    /// moved.
    pub fn refresh(&self, device: u8) {
        let slot = usize::from(device);
        let Some(f) = self.function(device) else {
            return;
        };
        let mut function = lock(&f);
        let before: Vec<BarRange> = self
            .decoding
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, s)| *s == slot)
            .map(|(b, _)| *b)
            .collect();
        let after = function.configuration().decoding_bars();
        if before != after {
            self.set_decoding(slot, &after);
            function.bars_moved(&before, &after);
        }
    }

    /// The function and BAR that decode memory (or, with `io`, port) address `addr`.
    fn bar_at(&self, addr: u64, io: bool) -> Option<(SharedFunction, BarRange)> {
        let decoding = self.decoding.read().unwrap_or_else(PoisonError::into_inner);
        let (bar, slot) = decoding
            .iter()
            .find(|(b, _)| (b.kind == super::config::BarKind::Io) == io && b.contains(addr))?;
        Some((self.slots()[*slot].clone()?, *bar))
    }

    /// A guest read of memory at `addr` inside a PCI window: the BAR that decodes it
    /// answers, or all ones.
    pub fn bar_read(&self, addr: u64, io: bool, data: &mut [u8]) {
        match self.bar_at(addr, io) {
            Some((f, bar)) => lock(&f).bar_read(bar.index, addr - bar.address, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write of memory at `addr` inside a PCI window, to the BAR that decodes
    /// it (or nowhere).
    pub fn bar_write(&self, addr: u64, io: bool, data: &[u8]) {
        if let Some((f, bar)) = self.bar_at(addr, io) {
            lock(&f).bar_write(bar.index, addr - bar.address, data)
        }
    }
}

/// Configuration mechanism #1: CONFIG_ADDRESS at 0xCF8 (a dword: enable bit 31, bus
/// 23-16, device 15-11, function 10-8, register 7-2) and CONFIG_DATA at 0xCFC-0xCFF.
/// Only dword accesses reach CONFIG_ADDRESS; a byte at 0xCF9 (the PC's reset control
/// register) is ignored.
#[derive(Debug)]
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

impl PciConfigIo {
    /// Configuration ports for `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// The ECAM offset CONFIG_ADDRESS selects for a CONFIG_DATA access at byte
    /// `within` (0-3), if enabled and on bus 0.
    fn selected(&self, within: u64) -> Option<u64> {
        if self.address & 0x8000_0000 == 0 || self.address >> 16 & 0xff != 0 {
            return None;
        }
        let device_function = u64::from(self.address >> 8 & 0xff);
        let register = u64::from(self.address & 0xfc) + within;
        Some(device_function << 12 | register)
    }

    /// A read at `offset` from 0xCF8.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 if (offset - 4) as usize + data.len() <= 4 => match self.selected(offset - 4) {
                Some(at) => self.root.config_read(at, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    /// A write at `offset` from 0xCF8.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                    // Bits 1-0 are reserved (read as 0); 30-24 likewise.
                    self.address = u32::from_le_bytes(bytes) & 0x80ff_fffc;
                }
            }
            4..=7 if (offset - 4) as usize + data.len() <= 4 => {
                if let Some(at) = self.selected(offset - 4) {
                    self.root.config_write(at, data)
                }
            }
            _ => {}
        }
    }
}

impl MutDevicePio for PciConfigIo {
    fn pio_read(&mut self, _: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        self.read(u64::from(offset), data)
    }
    fn pio_write(&mut self, _: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        self.write(u64::from(offset), data)
    }
}

/// PCI Express's enhanced configuration access (ECAM, "MMCONFIG") for bus 0, on an
/// MMIO window of [`ECAM_BUS_SIZE`] bytes the ACPI MCFG table names.
#[derive(Debug)]
pub struct PciConfigMmio(pub Arc<PciRoot>);

impl MutDeviceMmio for PciConfigMmio {
    fn mmio_read(&mut self, _: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if matches!(data.len(), 1 | 2 | 4) && offset.is_multiple_of(data.len() as u64) {
            self.0.config_read(offset, data)
        } else {
            data.fill(0xff)
        }
    }
    fn mmio_write(&mut self, _: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if matches!(data.len(), 1 | 2 | 4) && offset.is_multiple_of(data.len() as u64) {
            self.0.config_write(offset, data)
        }
    }
}

/// A window BARs are placed in (the 32-bit window below 4 GiB, the 64-bit one above
/// RAM, or the I/O ports), put on the bus at `base`: an access goes to the BAR that
/// decodes its address.
#[derive(Debug)]
pub struct PciBarWindow {
    /// The root.
    pub root: Arc<PciRoot>,
    /// Where the window starts.
    pub base: u64,
    /// Whether it is port I/O.
    pub io: bool,
}

impl MutDeviceMmio for PciBarWindow {
    fn mmio_read(&mut self, _: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.root.bar_read(self.base + offset, self.io, data)
    }
    fn mmio_write(&mut self, _: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.root.bar_write(self.base + offset, self.io, data)
    }
}

impl MutDevicePio for PciBarWindow {
    fn pio_read(&mut self, _: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        self.root
            .bar_read(self.base + u64::from(offset), self.io, data)
    }
    fn pio_write(&mut self, _: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        self.root
            .bar_write(self.base + u64::from(offset), self.io, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{BarKind, COMMAND, COMMAND_MEMORY};

    /// A function with a 4 KiB memory BAR 0 that records BAR accesses and moves.
    struct Recorder {
        cfg: PciConfiguration,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl PciFunction for Recorder {
        fn configuration(&self) -> &PciConfiguration {
            &self.cfg
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.cfg.write(offset, data)
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            self.log
                .lock()
                .unwrap()
                .push(format!("read {bar} {offset:#x}"));
            data.fill(0xab);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.log
                .lock()
                .unwrap()
                .push(format!("write {bar} {offset:#x} {data:?}"));
        }
        fn bars_moved(&mut self, before: &[BarRange], after: &[BarRange]) {
            let at = |b: &[BarRange]| b.iter().map(|b| b.address).collect::<Vec<_>>();
            self.log
                .lock()
                .unwrap()
                .push(format!("moved {:x?} -> {:x?}", at(before), at(after)));
        }
    }

    fn root_with_recorder() -> (Arc<PciRoot>, Arc<Mutex<Vec<String>>>) {
        let mut cfg = PciConfiguration::new(PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            ..PciHeader::default()
        });
        cfg.add_bar(0, 0x1000, BarKind::Memory32).unwrap();
        cfg.place_bar(0, 0xc000_0000).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let root = PciRoot::new();
        let slot = root
            .add(Arc::new(Mutex::new(Recorder {
                cfg,
                log: log.clone(),
            })))
            .unwrap();
        assert_eq!(slot, 1);
        (Arc::new(root), log)
    }

    fn dword(read: impl FnOnce(&mut [u8])) -> u32 {
        let mut d = [0u8; 4];
        read(&mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn both_mechanisms_reach_the_same_registers() {
        let (root, _) = root_with_recorder();
        let mut io = PciConfigIo::new(root.clone());
        let ecam = PciConfigMmio(root.clone());
        // Device 1, register 0 through the ports.
        io.write(0, &(0x8000_0800u32).to_le_bytes());
        assert_eq!(dword(|d| io.read(0, d)), 0x8000_0800);
        assert_eq!(dword(|d| io.read(4, d)), 0x1041_1af4);
        // A word at 0xCFE is the device ID.
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1041);
        // The same through ECAM.
        let mut e = [0u8; 4];
        let mut ecam = ecam;
        ecam.mmio_read(MmioAddress(0), ecam_offset(1, 0, 0), &mut e);
        assert_eq!(u32::from_le_bytes(e), 0x1041_1af4);
        // Disabled, another bus, another function, an empty slot: all ones.
        for address in [0x0000_0800u32, 0x8001_0800, 0x8000_0900, 0x8000_1000] {
            io.write(0, &address.to_le_bytes());
            assert_eq!(dword(|d| io.read(4, d)), u32::MAX, "{address:#x}");
        }
        // Reserved bits of CONFIG_ADDRESS read 0; a byte at 0xCF9 changes nothing.
        io.write(0, &u32::MAX.to_le_bytes());
        assert_eq!(dword(|d| io.read(0, d)), 0x80ff_fffc);
        io.write(1, &[6]);
        assert_eq!(dword(|d| io.read(0, d)), 0x80ff_fffc);
        // Misaligned ECAM accesses read all ones.
        let mut e = [0u8; 4];
        ecam.mmio_read(MmioAddress(0), ecam_offset(1, 0, 2), &mut e);
        assert_eq!(e, [0xff; 4]);
    }

    #[test]
    fn bar_accesses_follow_the_bar_and_the_memory_enable() {
        let (root, log) = root_with_recorder();
        let mut d = [0u8; 4];
        root.bar_read(0xc000_0010, false, &mut d);
        assert_eq!(d, [0xff; 4], "memory decoding is off");
        root.config_write(
            ecam_offset(1, 0, COMMAND as u16),
            &COMMAND_MEMORY.to_le_bytes(),
        );
        root.bar_read(0xc000_0010, false, &mut d);
        assert_eq!(d, [0xab; 4]);
        root.bar_write(0xc000_0ffc, false, &[1, 2]);
        root.bar_read(0xc000_0010, true, &mut d);
        assert_eq!(d, [0xff; 4], "no I/O BAR there");
        // The guest moves the BAR: the old address no longer decodes.
        root.config_write(ecam_offset(1, 0, 0x10), &0xd000_0000u32.to_le_bytes());
        root.bar_read(0xc000_0010, false, &mut d);
        assert_eq!(d, [0xff; 4]);
        root.bar_write(0xd000_0004, false, &[9]);
        assert_eq!(
            *log.lock().unwrap(),
            [
                "moved [] -> [c0000000]",
                "read 0 0x10",
                "write 0 0xffc [1, 2]",
                "moved [c0000000] -> [d0000000]",
                "write 0 0x4 [9]",
            ]
        );
    }

    #[test]
    fn the_windows_and_ecam_reach_the_bars_and_registers_through_the_buses_traits() {
        let (root, log) = root_with_recorder();
        let mut ecam = PciConfigMmio(root.clone());
        let command = ecam_offset(1, 0, COMMAND as u16);
        ecam.mmio_write(MmioAddress(0), command, &COMMAND_MEMORY.to_le_bytes());
        // A misaligned ECAM write changes nothing.
        ecam.mmio_write(MmioAddress(0), command + 1, &[0, 0]);
        let mut w = [0u8; 2];
        ecam.mmio_read(MmioAddress(0), command, &mut w);
        assert_eq!(u16::from_le_bytes(w), COMMAND_MEMORY);
        let mut window = PciBarWindow {
            root: root.clone(),
            base: 0xc000_0000,
            io: false,
        };
        let mut d = [0u8; 4];
        window.mmio_read(MmioAddress(0xc000_0000), 8, &mut d);
        assert_eq!(d, [0xab; 4]);
        window.mmio_write(MmioAddress(0xc000_0000), 12, &[7]);
        // A port window: no I/O BAR decodes there.
        let mut ports = PciBarWindow {
            root: root.clone(),
            base: 0x6000,
            io: true,
        };
        ports.pio_read(PioAddress(0x6000), 8, &mut d);
        assert_eq!(d, [0xff; 4]);
        ports.pio_write(PioAddress(0x6000), 8, &[1]);
        // Through the port device's trait: CONFIG_ADDRESS and a data byte.
        let mut io = PciConfigIo::new(root.clone());
        io.pio_write(
            PioAddress(CONFIG_ADDRESS_PORT),
            0,
            &0x8000_083cu32.to_le_bytes(),
        );
        io.pio_write(PioAddress(CONFIG_ADDRESS_PORT), 4, &[11]);
        let mut b = [0u8; 1];
        io.pio_read(PioAddress(CONFIG_ADDRESS_PORT), 4, &mut b);
        assert_eq!(b, [11], "the interrupt line is read-write");
        // The host bridge has no BARs: nothing decodes for it, and its header
        // keeps its identity.
        let bridge = root.function(0).unwrap();
        let mut bridge = bridge.lock().unwrap();
        bridge.bar_read(0, 0, &mut d);
        assert_eq!(d, [0xff; 4]);
        bridge.bar_write(0, 0, &[1]);
        bridge.config_write(0x0b, &[0]);
        assert_eq!(bridge.configuration().read_u32(0x08) >> 24, 0x06);
        assert_eq!(
            *log.lock().unwrap(),
            ["moved [] -> [c0000000]", "read 0 0x8", "write 0 0xc [7]"]
        );
        assert!(format!("{root:?}").contains("devices: 2"));
    }

    #[test]
    fn the_bus_takes_31_functions_beside_the_bridge() {
        let root = PciRoot::new();
        for i in 1..SLOTS {
            let slot = root.add(Arc::new(Mutex::new(HostBridge::new()))).unwrap();
            assert_eq!(usize::from(slot), i);
        }
        assert_eq!(
            root.add(Arc::new(Mutex::new(HostBridge::new()))),
            Err(RootError::Full)
        );
        assert_eq!(root.functions().len(), SLOTS);
    }
}
