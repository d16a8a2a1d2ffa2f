//! The CMOS RTC under any sequence of index/data accesses: no panic, and the date
//! registers always hold valid values in the mode the guest chose.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcraft_devices::rtc::Rtc;
use vmcraft_devices::vm_device::bus::PioAddress;
use vmcraft_devices::vm_device::DevicePio;

fuzz_target!(|data: &[u8]| {
    let clock = u64::from_le_bytes(
        data.get(..8)
            .and_then(|b| b.try_into().ok())
            .unwrap_or([0; 8]),
    ) % (1 << 40);
    let rtc = Rtc::with_clock(move || clock);
    for op in data.get(8..).unwrap_or(&[]).chunks(3) {
        let offset = u16::from(*op.get(1).unwrap_or(&0) % 3);
        let value = *op.get(2).unwrap_or(&0);
        let width = if op[0] & 0x80 != 0 { 2 } else { 1 };
        if op[0] & 1 == 0 {
            let mut buf = vec![0u8; width];
            rtc.pio_read(PioAddress(0x70), offset, &mut buf);
        } else {
            rtc.pio_write(PioAddress(0x70), offset, &vec![value; width]);
        }
    }
    // Month read back in binary mode is 1..=12.
    rtc.pio_write(PioAddress(0x70), 0, &[0x0b]);
    rtc.pio_write(PioAddress(0x70), 1, &[0x06]);
    rtc.pio_write(PioAddress(0x70), 0, &[0x08]);
    let mut m = [0u8];
    rtc.pio_read(PioAddress(0x70), 1, &mut m);
    assert!((1..=12).contains(&m[0]), "month {}", m[0]);
});
