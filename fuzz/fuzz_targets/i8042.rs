//! The i8042 model: only the reset command (0xfe on the command port) may request a stop.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmcraft_devices::i8042::I8042;
use vmcraft_devices::stop::{DeviceStop, StopLatch};
use vmcraft_devices::vm_device::bus::PioAddress;
use vmcraft_devices::vm_device::DevicePio;

fuzz_target!(|data: &[u8]| {
    let latch = Arc::new(StopLatch::default());
    let dev = I8042::new(latch.clone());
    let mut reset_sent = false;
    for op in data.chunks(3) {
        let offset = u16::from(*op.get(1).unwrap_or(&0) % 6);
        let value = *op.get(2).unwrap_or(&0);
        match op[0] % 3 {
            0 => {
                let mut b = [0u8; 1];
                dev.pio_read(PioAddress(0x60), offset, &mut b);
            }
            1 => {
                dev.pio_write(PioAddress(0x60), offset, &[value]);
                reset_sent |= offset == 4 && value == 0xfe;
            }
            _ => dev.pio_write(PioAddress(0x60), offset, &[value, value]),
        }
    }
    assert_eq!(latch.peek() == Some(DeviceStop::Reset), reset_sent);
});
