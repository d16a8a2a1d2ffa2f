//! Firecracker's boot timer (`--boot-timer`): a byte of MMIO the guest writes
//! [`BOOT_COMPLETE`] to once it has booted (Firecracker's own test images do it from
//! their init, `devmem 0xd0000000 8 123` does it from a shell), and the VMM logs how
//! long that took since it started, in wall and CPU time, in Firecracker's words.
//!
//! ```
//! use vmcraft_devices::boot_timer::{BootTimer, BOOT_COMPLETE};
//! use vm_device::{bus::MmioAddress, DeviceMmio};
//! let timer = BootTimer::new(std::time::Instant::now());
//! timer.mmio_write(MmioAddress(0xd000_0000), 0, &[BOOT_COMPLETE]);
//! assert!(timer.booted().is_some());
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::DeviceMmio;

/// Where Firecracker puts the device on x86 (the first MMIO address it allocates).
pub const ADDRESS: u64 = 0xd000_0000;
/// The byte that says the guest has booted.
pub const BOOT_COMPLETE: u8 = 123;

/// The boot timer.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    /// The first report: wall time, and the process's CPU time then.
    booted: Mutex<Option<(Duration, Duration)>>,
}

impl BootTimer {
    /// A timer counting from `start` (the VMM's start).
    pub fn new(start: Instant) -> Self {
        BootTimer {
            start,
            booted: Mutex::new(None),
        }
    }

    /// When the guest said it had booted (wall time from the start, and the
    /// process's CPU time then), if it has.
    pub fn booted(&self) -> Option<(Duration, Duration)> {
        *self.booted.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The CPU time this process has used so far (every thread, user and system).
pub fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer, which is valid.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl DeviceMmio for BootTimer {
    fn mmio_read(&self, _: MmioAddress, _: MmioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn mmio_write(&self, _: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        // As Firecracker: one byte at offset 0, the magic value; anything else is
        // ignored.
        if offset != 0 || data != [BOOT_COMPLETE] {
            return;
        }
        let (wall, cpu) = (self.start.elapsed(), process_cpu_time());
        log::info!(
            "Guest-boot-time = {:>6} us {} ms, {:>6} CPU us {} CPU ms",
            wall.as_micros(),
            wall.as_millis(),
            cpu.as_micros(),
            cpu.as_millis()
        );
        let mut booted = self.booted.lock().unwrap_or_else(|p| p.into_inner());
        booted.get_or_insert((wall, cpu));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_magic_byte_at_offset_zero_counts() {
        let t = BootTimer::new(Instant::now());
        let at = MmioAddress(ADDRESS);
        t.mmio_write(at, 1, &[BOOT_COMPLETE]);
        t.mmio_write(at, 0, &[BOOT_COMPLETE, 0]);
        t.mmio_write(at, 0, &[122]);
        assert_eq!(t.booted(), None);
        let mut b = [9u8; 4];
        t.mmio_read(at, 0, &mut b);
        assert_eq!(b, [0; 4]);
        t.mmio_write(at, 0, &[BOOT_COMPLETE]);
        let first = t.booted().unwrap();
        t.mmio_write(at, 0, &[BOOT_COMPLETE]);
        assert_eq!(t.booted(), Some(first), "the first report stays");
    }
}
