//! The 16550 register model under any sequence of guest reads, writes and host input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcraft_devices::serial::{SerialDevice, SharedBuffer};
use vmcraft_devices::vm_device::bus::PioAddress;
use vmcraft_devices::vm_device::DevicePio;

fuzz_target!(|data: &[u8]| {
    let out = SharedBuffer::new();
    let serial = SerialDevice::new(Box::new(out.clone())).unwrap();
    let base = PioAddress(0x3f8);
    let mut written = 0usize;
    for op in data.chunks(3) {
        let [kind, offset, value] = [op[0], *op.get(1).unwrap_or(&0), *op.get(2).unwrap_or(&0)];
        // Offsets past the device's 8 ports and wide accesses come from a hostile guest too.
        let offset = u16::from(offset % 10);
        match kind % 4 {
            0 => {
                let width = usize::from(value % 4) + 1;
                let mut buf = vec![0u8; width];
                serial.pio_read(base, offset, &mut buf);
            }
            1 => {
                serial.pio_write(base, offset, &[value]);
                written += 1;
            }
            2 => serial.pio_write(base, offset, &[value, kind]),
            _ => {
                serial.enqueue_input(&op[1..]);
            }
        }
    }
    // Output never exceeds what the guest wrote.
    assert!(out.contents().len() <= written);
});
