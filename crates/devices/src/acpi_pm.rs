//! The power-management registers of a hardware-reduced ACPI platform: the sleep
//! control and status registers and the reset register that a FADT points at (see the
//! `vmcraft` crate's `acpi` module). A guest entering S5 (soft off) asks the VMM to
//! power the VM off; a write of [`RESET_VALUE`] to the reset register asks for a reset.

use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

use crate::stop::{DeviceStop, StopLatch};

/// The sleep control register (one byte).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// The sleep status register (one byte; reads 0: the platform never wakes).
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// The reset register (one byte).
pub const RESET_PORT: u16 = 0x602;
/// First port of the device and the number it covers.
pub const ACPI_PM_BASE: u16 = SLEEP_CONTROL_PORT;
/// Ports covered: sleep control, sleep status, reset.
pub const ACPI_PM_SIZE: u16 = 3;
/// The value the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 1;
/// Sleep control: SLP_EN (ACPI 6.5 §4.8.3.7).
const SLP_EN: u8 = 1 << 5;
/// The sleep type the DSDT's `_S5_` object names.
pub const SLEEP_TYPE_S5: u8 = 5;

/// What a write to the device means, decided without side effects (unit tested).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmRequest {
    /// Enter S5: power off.
    PowerOff,
    /// Reset the machine.
    Reset,
    /// A sleep state other than S5 (the platform does not sleep: ignored).
    Sleep(u8),
    /// Anything else: ignored.
    None,
}

/// Decode a write of `value` at `offset` from [`ACPI_PM_BASE`].
pub fn decode(offset: PioAddressOffset, value: u8) -> PmRequest {
    match offset {
        0 if value & SLP_EN != 0 => match (value >> 2) & 7 {
            SLEEP_TYPE_S5 => PmRequest::PowerOff,
            t => PmRequest::Sleep(t),
        },
        2 if value == RESET_VALUE => PmRequest::Reset,
        _ => PmRequest::None,
    }
}

/// The device on the port bus.
#[derive(Debug)]
pub struct AcpiPm {
    latch: Arc<StopLatch>,
}

impl AcpiPm {
    /// A device that reports power-off and reset to `latch`.
    pub fn new(latch: Arc<StopLatch>) -> Self {
        AcpiPm { latch }
    }
}

impl DevicePio for AcpiPm {
    fn pio_read(&self, _: PioAddress, _: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&self, _: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let [value] = data else {
            return; // the registers are bytes
        };
        match decode(offset, *value) {
            PmRequest::PowerOff => self.latch.request(DeviceStop::PowerOff),
            PmRequest::Reset => self.latch.request(DeviceStop::Reset),
            PmRequest::Sleep(t) => {
                eprintln!("vmcraft: acpi-pm: sleep type {t} requested; only S5 (off) is supported")
            }
            PmRequest::None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte the guest can write at every offset (the whole input space, so no
    /// fuzz target is needed): only S5 with SLP_EN powers off, only RESET_VALUE at the
    /// reset register resets.
    #[test]
    fn every_write_decodes_as_the_registers_say() {
        for offset in 0..=ACPI_PM_SIZE + 1 {
            for value in 0..=u8::MAX {
                let want = match (offset, value) {
                    (0, v) if v & SLP_EN != 0 && (v >> 2) & 7 == 5 => PmRequest::PowerOff,
                    (0, v) if v & SLP_EN != 0 => PmRequest::Sleep((v >> 2) & 7),
                    (2, RESET_VALUE) => PmRequest::Reset,
                    _ => PmRequest::None,
                };
                assert_eq!(
                    decode(offset, value),
                    want,
                    "offset {offset}, value {value:#x}"
                );
            }
        }
    }

    #[test]
    fn s5_powers_off_and_the_reset_value_resets() {
        // Linux writes (SLP_TYP << 2) | SLP_EN to the sleep control register.
        assert_eq!(decode(0, (5 << 2) | 0x20), PmRequest::PowerOff);
        assert_eq!(decode(0, 5 << 2), PmRequest::None, "no SLP_EN");
        assert_eq!(decode(0, (3 << 2) | 0x20), PmRequest::Sleep(3));
        assert_eq!(decode(2, RESET_VALUE), PmRequest::Reset);
        assert_eq!(decode(2, 7), PmRequest::None);
        assert_eq!(decode(1, 0xff), PmRequest::None);

        let latch = Arc::new(StopLatch::default());
        let dev = AcpiPm::new(latch.clone());
        dev.pio_write(PioAddress(ACPI_PM_BASE), 0, &[0x34, 0]); // wrong width
        assert_eq!(latch.peek(), None);
        dev.pio_write(PioAddress(ACPI_PM_BASE), 0, &[0x34]);
        assert_eq!(latch.peek(), Some(DeviceStop::PowerOff));
        let mut status = [0xff];
        dev.pio_read(PioAddress(ACPI_PM_BASE), 1, &mut status);
        assert_eq!(status, [0]);
    }
}
