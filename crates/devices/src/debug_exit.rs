//! A debug-exit port: a write stops the VM with the written value as its exit code
//! (as QEMU's isa-debug-exit, without the shift). Tests use it to report results.

use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

use crate::stop::{DeviceStop, StopLatch};

/// The name the debug-exit device gives when it stops the VM
/// ([`DeviceStop::Device`]'s `device`).
pub const NAME: &str = "debug-exit";

/// The debug-exit device.
#[derive(Debug)]
pub struct DebugExit {
    latch: Arc<StopLatch>,
}

impl DebugExit {
    /// A device that reports exits to `latch`.
    pub fn new(latch: Arc<StopLatch>) -> Self {
        DebugExit { latch }
    }

    /// The exit code a write of `data` (1 to 4 bytes, little endian) means.
    pub fn code(data: &[u8]) -> u32 {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        u32::from_le_bytes(b)
    }
}

impl DevicePio for DebugExit {
    fn pio_read(&self, _: PioAddress, _: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn pio_write(&self, _: PioAddress, _: PioAddressOffset, data: &[u8]) {
        self.latch.request(DeviceStop::Device {
            device: NAME,
            code: Self::code(data),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_width_gives_its_code() {
        assert_eq!(DebugExit::code(&[7]), 7);
        assert_eq!(DebugExit::code(&[1, 2]), 0x201);
        assert_eq!(DebugExit::code(&[1, 2, 3, 4, 5]), 0x0403_0201);
        let latch = Arc::new(StopLatch::default());
        let d = DebugExit::new(latch.clone());
        d.pio_write(PioAddress(0xf4), 0, &[0x2a, 0, 0, 0]);
        assert_eq!(
            latch.peek(),
            Some(DeviceStop::Device {
                device: NAME,
                code: 42
            })
        );
    }
}
