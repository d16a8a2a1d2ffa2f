//! The PCI root complex, a function's configuration space and its MSI-X table under
//! any sequence of guest accesses (CONFIG_ADDRESS/CONFIG_DATA, ECAM, BAR windows, the
//! table and PBA, of any width and offset): no panic, and what the guest cannot
//! change stays as built (the IDs, the capability chain, BAR flags and sizes).
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vmcraft_devices::pci::config::{BarKind, BarRange, PciConfiguration, PciHeader, COMMAND};
use vmcraft_devices::pci::msix::{MsixTable, MsixVectors};
use vmcraft_devices::pci::root::{PciConfigIo, PciFunction, PciRoot};

/// A function with MSI-X: its table in BAR 0 at 0, its PBA at 0x800; BAR 2 64-bit.
struct Function {
    cfg: PciConfiguration,
    msix: MsixTable,
    cap: usize,
}

impl PciFunction for Function {
    fn configuration(&self) -> &PciConfiguration {
        &self.cfg
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.cfg.write(offset, data);
        let control = self.cfg.read_u16(self.cap + 2);
        self.msix.set_control(control);
        self.msix.set_bus_master(self.cfg.bus_master());
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match (bar, offset) {
            (0, o) if o < 0x800 => self.msix.read(o, data),
            (0, o) => self.msix.read_pba(o - 0x800, data),
            _ => data.fill(0),
        }
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == 0 && offset < 0x800 {
            for change in self.msix.write(offset, data) {
                let _ = change;
            }
        }
    }
    fn bars_moved(&mut self, _: &[BarRange], after: &[BarRange]) {
        for b in after {
            assert!(b.address % b.size == 0, "a BAR placed off its alignment: {b:?}");
        }
    }
}

fn function() -> Function {
    let mut cfg = PciConfiguration::new(PciHeader {
        vendor_id: 0x1af4,
        device_id: 0x1042,
        class: [1, 0, 0],
        interrupt_pin: 1,
        ..PciHeader::default()
    });
    cfg.add_bar(0, 0x1000, BarKind::Memory32).unwrap();
    cfg.place_bar(0, 0xc000_0000).unwrap();
    cfg.add_bar(2, 0x4000, BarKind::Memory64).unwrap();
    cfg.place_bar(2, 0x1_0000_0000).unwrap();
    cfg.add_bar(4, 0x20, BarKind::Io).unwrap();
    let vectors = Arc::new(MsixVectors::new(5).unwrap());
    let msix = MsixTable::new(vectors);
    let (body, writable) = msix.capability(0, 0, 0, 0x800);
    let cap = cfg.add_capability(0x11, &body, &writable).unwrap();
    Function { cfg, msix, cap }
}

fuzz_target!(|data: &[u8]| {
    let f = Arc::new(Mutex::new(function()));
    let root = PciRoot::new();
    root.add(f.clone()).unwrap();
    let root = Arc::new(root);
    let mut io = PciConfigIo::new(root.clone());
    for op in data.chunks(8) {
        let kind = op[0];
        let width = [1usize, 2, 4, 8, 3][usize::from(op.get(1).copied().unwrap_or(0) % 5)];
        let offset = u64::from(u32::from_le_bytes([
            op.get(2).copied().unwrap_or(0),
            op.get(3).copied().unwrap_or(0),
            op.get(4).copied().unwrap_or(0),
            0,
        ]));
        let value = [op.get(5).copied().unwrap_or(0xff); 8];
        let mut buf = [0u8; 8];
        match kind % 8 {
            0 => io.write(offset % 8, &value[..width]),
            1 => io.read(offset % 8, &mut buf[..width]),
            2 => root.config_write(offset, &value[..width]),
            3 => root.config_read(offset, &mut buf[..width]),
            4 => root.bar_write(0xc000_0000 + offset % 0x2000, false, &value[..width]),
            5 => root.bar_read(0xc000_0000 + offset % 0x2000, false, &mut buf[..width]),
            6 => f.lock().unwrap().msix.vectors().fire(offset as u16 % 8),
            _ => root.config_write(
                u64::from(op.get(2).copied().unwrap_or(0) % 32) << 15 | COMMAND as u64,
                &value[..2],
            ),
        }
    }
    let f = f.lock().unwrap();
    assert_eq!(f.cfg.read_u32(0), 0x1042_1af4);
    assert_eq!(f.cfg.read_u32(0x34) & 0xff, f.cap as u32);
    assert_eq!(f.cfg.read_u16(f.cap) & 0xff, 0x11);
    assert_eq!(f.cfg.read_u32(0x10) & 0xfff, 0);
    assert_eq!(f.cfg.read_u32(0x18) & 0x3fff, 0xc);
    assert_eq!(f.cfg.read_u32(0x20) & 0x1f, 1);
    assert_eq!(f.cfg.bar(2).map(|b| b.size), Some(0x4000));
});
