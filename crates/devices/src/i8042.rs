//! The i8042 keyboard controller from `vm-superio`; its CPU-reset command (0xfe on the
//! command port) asks the VMM to reset or stop the VM.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vm_superio::{I8042Device, Trigger};

use crate::stop::{DeviceStop, StopLatch};

/// First port of the i8042 (data port); the command port is at +4.
pub const I8042_BASE: u16 = 0x60;
/// Ports covered: 0x60 to 0x64.
pub const I8042_SIZE: u16 = 5;

/// Turns the i8042 reset into a [`DeviceStop::Reset`] request.
#[derive(Debug)]
pub struct ResetTrigger(Arc<StopLatch>);

impl Trigger for ResetTrigger {
    type E = Infallible;
    fn trigger(&self) -> Result<(), Infallible> {
        self.0.request(DeviceStop::Reset);
        Ok(())
    }
}

/// The i8042 on the port bus.
#[derive(Debug)]
pub struct I8042 {
    inner: Mutex<I8042Device<ResetTrigger>>,
}

impl I8042 {
    /// An i8042 that reports resets to `latch`.
    pub fn new(latch: Arc<StopLatch>) -> Self {
        I8042 {
            inner: Mutex::new(I8042Device::new(ResetTrigger(latch))),
        }
    }
}

impl DevicePio for I8042 {
    fn pio_read(&self, _: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
        if let [byte] = data {
            *byte = self
                .inner
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read(offset as u8);
        }
    }

    fn pio_write(&self, _: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        // The controller's registers are bytes; wider accesses are ignored.
        if let [byte] = data {
            let Ok(()) = self
                .inner
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write(offset as u8, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_a_reset() {
        let latch = Arc::new(StopLatch::default());
        let dev = I8042::new(latch.clone());
        dev.pio_write(PioAddress(0x60), 4, &[0x20]);
        dev.pio_write(PioAddress(0x60), 4, &[0xfe, 0]); // wrong width: ignored
        assert_eq!(latch.peek(), None);
        dev.pio_write(PioAddress(0x60), 0, &[0xfe]); // data port: not a command
        assert_eq!(latch.peek(), None);
        dev.pio_write(PioAddress(0x60), 4, &[0xfe]);
        assert_eq!(latch.peek(), Some(DeviceStop::Reset));
    }
}
