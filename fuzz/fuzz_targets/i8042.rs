//! The i8042 model: only the reset command (0xfe on the command port) may request a
//! stop, and the output buffer never holds more than its capacity.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmcraft_devices::i8042::{Controller, I8042, OUTPUT_CAPACITY, STATUS_OBF};
use vmcraft_devices::stop::{DeviceStop, StopLatch};
use vmcraft_devices::vm_device::bus::PioAddress;
use vmcraft_devices::vm_device::DevicePio;

fuzz_target!(|data: &[u8]| {
    let latch = Arc::new(StopLatch::default());
    let dev = I8042::new(latch.clone(), None);
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

    // The bare controller: draining the output buffer takes at most its capacity.
    let mut c = Controller::default();
    for op in data.chunks(2) {
        c.write(u16::from(op[0] & 4), *op.get(1).unwrap_or(&0));
    }
    let mut drained = 0;
    while c.status() & STATUS_OBF != 0 {
        c.read(0);
        drained += 1;
        assert!(drained <= OUTPUT_CAPACITY);
    }
});
