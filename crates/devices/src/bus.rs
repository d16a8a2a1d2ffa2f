//! Port and MMIO buses.
//!
//! [`IoBuses`] is `vm-device`'s `IoManager` (ranges to devices, overlaps rejected)
//! plus what a VMM facing a hostile guest needs: an access nobody claims, or one
//! that runs past the end of its device's range, reads as all ones, is dropped on
//! write, and is counted.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmcraft_devices::bus::IoBuses;
//! use vmcraft_devices::vm_device::bus::{PioAddress, PioAddressOffset, PioRange};
//! use vmcraft_devices::vm_device::MutDevicePio;
//!
//! struct Latch(u8);
//! impl MutDevicePio for Latch {
//!     fn pio_read(&mut self, _: PioAddress, _: PioAddressOffset, data: &mut [u8]) { data.fill(self.0) }
//!     fn pio_write(&mut self, _: PioAddress, _: PioAddressOffset, data: &[u8]) { self.0 = data[0] }
//! }
//!
//! let mut buses = IoBuses::new();
//! buses.register_pio(0x80, 1, Arc::new(Mutex::new(Latch(0)))).unwrap();
//! assert!(buses.register_pio(0x80, 1, Arc::new(Mutex::new(Latch(0)))).is_err()); // overlap
//! buses.pio_write(0x80, &[7]);
//! let mut b = [0u8];
//! buses.pio_read(0x80, &mut b);
//! assert_eq!(b, [7]);
//! buses.pio_read(0x81, &mut b);
//! assert_eq!((b, buses.unclaimed().pio_reads), ([0xff], 1));
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};

/// Errors from registering a device.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("invalid {bus} range {base:#x}+{size:#x}")]
    InvalidRange {
        /// "port" or "MMIO".
        bus: &'static str,
        /// First address.
        base: u64,
        /// Size.
        size: u64,
    },
    /// The range overlaps a registered device.
    #[error("{bus} range {base:#x}+{size:#x} overlaps a registered device")]
    Overlap {
        /// "port" or "MMIO".
        bus: &'static str,
        /// First address.
        base: u64,
        /// Size.
        size: u64,
        /// vm-device's error.
        #[source]
        source: vm_device::bus::Error,
    },
}

/// Counts of accesses no device claimed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnclaimedAccesses {
    /// Port reads.
    pub pio_reads: u64,
    /// Port writes.
    pub pio_writes: u64,
    /// MMIO reads.
    pub mmio_reads: u64,
    /// MMIO writes.
    pub mmio_writes: u64,
}

/// Unclaimed accesses to one port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnclaimedPort {
    /// The port.
    pub port: u16,
    /// Reads of it.
    pub reads: u64,
    /// Writes to it.
    pub writes: u64,
}

/// The port and MMIO buses of one VM.
#[derive(Default)]
pub struct IoBuses {
    manager: IoManager,
    unclaimed: [AtomicU64; 4],
    /// Per port, the unclaimed reads and writes (bounded by the 64 Ki ports; touched
    /// only on the unclaimed path).
    unclaimed_ports: std::sync::Mutex<std::collections::BTreeMap<u16, (u64, u64)>>,
}

impl std::fmt::Debug for IoBuses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuses")
            .field("unclaimed", &self.unclaimed())
            .finish()
    }
}

impl IoBuses {
    /// Empty buses.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attach `device` to ports `[base, base + size)`.
    pub fn register_pio(
        &mut self,
        base: u16,
        size: u16,
        device: Arc<dyn DevicePio + Send + Sync>,
    ) -> Result<(), BusError> {
        let invalid = BusError::InvalidRange {
            bus: "port",
            base: base.into(),
            size: size.into(),
        };
        let range = PioRange::new(PioAddress(base), size).map_err(|_| invalid)?;
        self.manager
            .register_pio(range, device)
            .map_err(|source| match source {
                vm_device::bus::Error::DeviceOverlap => BusError::Overlap {
                    bus: "port",
                    base: base.into(),
                    size: size.into(),
                    source,
                },
                _ => BusError::InvalidRange {
                    bus: "port",
                    base: base.into(),
                    size: size.into(),
                },
            })
    }

    /// Attach `device` to guest-physical `[base, base + size)`.
    pub fn register_mmio(
        &mut self,
        base: u64,
        size: u64,
        device: Arc<dyn DeviceMmio + Send + Sync>,
    ) -> Result<(), BusError> {
        let invalid = BusError::InvalidRange {
            bus: "MMIO",
            base,
            size,
        };
        let range = MmioRange::new(MmioAddress(base), size).map_err(|_| invalid)?;
        self.manager
            .register_mmio(range, device)
            .map_err(|source| match source {
                vm_device::bus::Error::DeviceOverlap => BusError::Overlap {
                    bus: "MMIO",
                    base,
                    size,
                    source,
                },
                _ => BusError::InvalidRange {
                    bus: "MMIO",
                    base,
                    size,
                },
            })
    }

    /// A port read: the device's answer, or all ones if nobody claims it.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.manager.pio_read(PioAddress(port), data).is_err() {
            data.fill(0xff);
            self.unclaimed[0].fetch_add(1, Ordering::Relaxed);
            self.count_port(port, true);
        }
    }

    /// A port write; dropped (and counted) if nobody claims it.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if self.manager.pio_write(PioAddress(port), data).is_err() {
            self.unclaimed[1].fetch_add(1, Ordering::Relaxed);
            self.count_port(port, false);
        }
    }

    /// An MMIO read: the device's answer, or all ones if nobody claims it.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if self.manager.mmio_read(MmioAddress(addr), data).is_err() {
            data.fill(0xff);
            self.unclaimed[2].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An MMIO write; dropped (and counted) if nobody claims it.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if self.manager.mmio_write(MmioAddress(addr), data).is_err() {
            self.unclaimed[3].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn count_port(&self, port: u16, read: bool) {
        let mut ports = self
            .unclaimed_ports
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let e = ports.entry(port).or_default();
        if read {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }

    /// The ports nobody claimed, with how often each was read and written, in port
    /// order (a guest probing for hardware the VM does not have shows up here).
    pub fn unclaimed_ports(&self) -> Vec<UnclaimedPort> {
        self.unclaimed_ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(&port, &(reads, writes))| UnclaimedPort {
                port,
                reads,
                writes,
            })
            .collect()
    }

    /// How many accesses nobody claimed so far.
    pub fn unclaimed(&self) -> UnclaimedAccesses {
        let n = |i: usize| self.unclaimed[i].load(Ordering::Relaxed);
        UnclaimedAccesses {
            pio_reads: n(0),
            pio_writes: n(1),
            mmio_reads: n(2),
            mmio_writes: n(3),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_device::bus::{MmioAddressOffset, PioAddressOffset};
    use vm_device::{MutDeviceMmio, MutDevicePio};

    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl MutDevicePio for Recorder {
        fn pio_read(&mut self, _: PioAddress, off: PioAddressOffset, data: &mut [u8]) {
            data.fill(off as u8);
        }
        fn pio_write(&mut self, _: PioAddress, off: PioAddressOffset, data: &[u8]) {
            self.0.push((off.into(), data.to_vec()));
        }
    }
    impl MutDeviceMmio for Recorder {
        fn mmio_read(&mut self, _: MmioAddress, off: MmioAddressOffset, data: &mut [u8]) {
            data.fill(off as u8);
        }
        fn mmio_write(&mut self, _: MmioAddress, off: MmioAddressOffset, data: &[u8]) {
            self.0.push((off, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_offset_and_counts_the_unclaimed() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut b = IoBuses::new();
        b.register_pio(0x3f8, 8, dev.clone()).unwrap();
        b.register_mmio(0xd000_0000, 0x1000, dev.clone()).unwrap();
        let mut buf = [0u8; 2];
        b.pio_read(0x3fa, &mut buf);
        assert_eq!(buf, [2, 2]);
        b.mmio_write(0xd000_0010, &[1, 2, 3, 4]);
        assert_eq!(dev.lock().unwrap().0, vec![(0x10, vec![1, 2, 3, 4])]);
        // Past the end of the range: unclaimed, even though it starts inside.
        b.pio_read(0x3ff, &mut buf);
        assert_eq!(buf, [0xff, 0xff]);
        b.pio_write(0x10, &[1]);
        let mut q = [0u8; 8];
        b.mmio_read(0xd000_1000, &mut q);
        b.mmio_write(0, &[0]);
        assert_eq!(q, [0xff; 8]);
        assert_eq!(
            b.unclaimed(),
            UnclaimedAccesses {
                pio_reads: 1,
                pio_writes: 1,
                mmio_reads: 1,
                mmio_writes: 1
            }
        );
        b.pio_write(0x10, &[2]);
        assert_eq!(
            b.unclaimed_ports(),
            vec![
                UnclaimedPort {
                    port: 0x10,
                    reads: 0,
                    writes: 2
                },
                UnclaimedPort {
                    port: 0x3ff,
                    reads: 1,
                    writes: 0
                }
            ]
        );
    }

    #[test]
    fn overlaps_and_empty_ranges_are_rejected() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut b = IoBuses::new();
        b.register_pio(0x60, 5, dev.clone()).unwrap();
        assert!(matches!(
            b.register_pio(0x64, 1, dev.clone()),
            Err(BusError::Overlap { base: 0x64, .. })
        ));
        assert!(matches!(
            b.register_pio(0x10, 0, dev.clone()),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            b.register_mmio(u64::MAX, 2, dev.clone()),
            Err(BusError::InvalidRange { .. })
        ));
        b.register_mmio(0x1000, 0x1000, dev.clone()).unwrap();
        let e = b.register_mmio(0x1fff, 1, dev).unwrap_err();
        assert!(e.to_string().contains("0x1fff"), "{e}");
    }
}
