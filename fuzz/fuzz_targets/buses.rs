//! The buses: any registrations and accesses; overlaps are refused, an access reaches a
//! device only inside its range, everything else reads as all ones.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vmcraft_devices::bus::IoBuses;
use vmcraft_devices::vm_device::bus::{
    MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset,
};
use vmcraft_devices::vm_device::{MutDeviceMmio, MutDevicePio};

/// Reads as zeros; records nothing.
struct Zero;
impl MutDevicePio for Zero {
    fn pio_read(&mut self, _: PioAddress, _: PioAddressOffset, d: &mut [u8]) {
        d.fill(0)
    }
    fn pio_write(&mut self, _: PioAddress, _: PioAddressOffset, _: &[u8]) {}
}
impl MutDeviceMmio for Zero {
    fn mmio_read(&mut self, _: MmioAddress, _: MmioAddressOffset, d: &mut [u8]) {
        d.fill(0)
    }
    fn mmio_write(&mut self, _: MmioAddress, _: MmioAddressOffset, _: &[u8]) {}
}

fuzz_target!(|data: &[u8]| {
    let mut buses = IoBuses::new();
    // The model works in u128 so ranges ending at the top of the address space (which
    // vm-device accepts: it checks the last address, base + size - 1) are exact.
    let mut pio: Vec<(u128, u128)> = Vec::new();
    let mut mmio: Vec<(u128, u128)> = Vec::new();
    let dev = Arc::new(Mutex::new(Zero));
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
    for op in data.chunks_exact(17) {
        let (a, b) = (word(&op[1..9]), word(&op[9..17]));
        let overlaps = |ranges: &[(u128, u128)], base: u128, size: u128| {
            ranges.iter().any(|&(s, n)| base < s + n && s < base + size)
        };
        let inside = |ranges: &[(u128, u128)], addr: u128, len: u128| {
            ranges
                .iter()
                .any(|&(s, n)| addr >= s && addr + len <= s + n)
        };
        match op[0] % 4 {
            0 => {
                let (base, size) = (a as u16, (b as u16) % 64);
                let ok = buses.register_pio(base, size, dev.clone()).is_ok();
                let valid = size > 0 && u32::from(base) + u32::from(size) <= 0x10000;
                assert_eq!(
                    ok,
                    valid && !overlaps(&pio, base.into(), size.into()),
                    "pio {base:#x}+{size:#x}"
                );
                if ok {
                    pio.push((base.into(), size.into()));
                }
            }
            1 => {
                let size = b % 0x10000;
                let ok = buses.register_mmio(a, size, dev.clone()).is_ok();
                let (base, len) = (u128::from(a), u128::from(size));
                let valid = size > 0 && base + len <= 1 << 64;
                assert_eq!(
                    ok,
                    valid && !overlaps(&mmio, base, len),
                    "mmio {a:#x}+{size:#x}"
                );
                if ok {
                    mmio.push((base, len));
                }
            }
            2 => {
                let mut buf = [0x5au8; 4];
                let len = (b % 4 + 1) as usize;
                buses.pio_read(a as u16, &mut buf[..len]);
                let claimed = inside(&pio, u128::from(a as u16), len as u128);
                assert!(
                    buf[..len]
                        .iter()
                        .all(|&x| x == if claimed { 0 } else { 0xff }),
                    "pio read {a:#x}/{len}"
                );
            }
            _ => {
                let mut buf = [0x5au8; 8];
                let len = (b % 8 + 1) as usize;
                buses.mmio_read(a, &mut buf[..len]);
                let claimed = inside(&mmio, u128::from(a), len as u128);
                assert!(
                    buf[..len]
                        .iter()
                        .all(|&x| x == if claimed { 0 } else { 0xff }),
                    "mmio read {a:#x}/{len}"
                );
            }
        }
    }
});
