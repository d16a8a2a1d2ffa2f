//! A latch through which devices ask the VMM to stop (or reset) the VM.

use std::sync::Mutex;

/// Why a device asked the VM to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStop {
    /// The guest asked for a CPU reset (i8042 command 0xfe).
    Reset,
    /// The device stops the VM with a code of its own meaning (the debug-exit port:
    /// the status the guest wrote).
    Device {
        /// The device's name.
        device: &'static str,
        /// The device's code.
        code: u32,
    },
    /// The guest entered ACPI S5 (soft off).
    PowerOff,
    /// A device failed on the host's side and the VM cannot go on correctly; the value
    /// is the device's code (for virtio devices, the virtio device ID).
    DeviceFailed(u32),
}

/// Holds the first stop request made by any device until the VMM takes it.
///
/// ```
/// use vmcraft_devices::stop::{DeviceStop, StopLatch};
/// let latch = StopLatch::default();
/// let exit = DeviceStop::Device { device: "debug-exit", code: 3 };
/// latch.request(exit);
/// latch.request(DeviceStop::Reset); // the first request wins
/// assert_eq!(latch.peek(), Some(exit));
/// ```
#[derive(Debug, Default)]
pub struct StopLatch {
    request: Mutex<Option<DeviceStop>>,
}

impl StopLatch {
    /// Record `stop` unless a request is already pending.
    pub fn request(&self, stop: DeviceStop) {
        let mut r = self.request.lock().unwrap_or_else(|p| p.into_inner());
        r.get_or_insert(stop);
    }

    /// The pending request, if any, without clearing it.
    pub fn peek(&self) -> Option<DeviceStop> {
        *self.request.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take the pending request (for a VMM that resets and runs again).
    pub fn take(&self) -> Option<DeviceStop> {
        self.request
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_request_wins_until_it_is_taken() {
        let latch = StopLatch::default();
        assert_eq!(latch.peek(), None);
        latch.request(DeviceStop::PowerOff);
        latch.request(DeviceStop::DeviceFailed(2));
        assert_eq!(latch.peek(), Some(DeviceStop::PowerOff), "peek keeps it");
        assert_eq!(latch.take(), Some(DeviceStop::PowerOff));
        assert_eq!(latch.take(), None, "taken");
        latch.request(DeviceStop::DeviceFailed(2));
        assert_eq!(
            latch.peek(),
            Some(DeviceStop::DeviceFailed(2)),
            "a new request after a take"
        );
    }

    #[test]
    fn a_latch_poisoned_by_a_panicking_holder_still_works() {
        let latch = std::sync::Arc::new(StopLatch::default());
        let l = latch.clone();
        let _ = std::thread::spawn(move || {
            let _held = l.request.lock().unwrap();
            panic!("a device thread dies holding the latch");
        })
        .join();
        latch.request(DeviceStop::Reset);
        assert_eq!(latch.take(), Some(DeviceStop::Reset));
    }
}
