//! The ATA register model under arbitrary port traffic: never a panic, never a byte
//! outside the disk, and the status register always shows a coherent state (DRQ only
//! with a transfer under way, ERR always with an error code).
#![no_main]

#[path = "scratch.rs"]
mod scratch;

use libfuzzer_sys::fuzz_target;
use vmcraft_devices::ata::{AtaDisk, DRQ, ERR};
use vmcraft_devices::vm_device::bus::PioAddress;
use vmcraft_devices::vm_device::DevicePio;

fuzz_target!(|data: &[u8]| {
    let disk = AtaDisk::new(scratch::image(32), data.first().is_some_and(|b| b & 1 != 0)).unwrap();
    for op in data.chunks(3) {
        if op.len() < 3 {
            break;
        }
        let control = op[0] & 0x80 != 0;
        let base = PioAddress(if control {
            AtaDisk::CONTROL_BASE
        } else {
            AtaDisk::COMMAND_BASE
        });
        let offset = if control { 0 } else { u16::from(op[1] % 8) };
        let width = [1usize, 2, 4][usize::from(op[0] % 3)];
        if op[0] & 0x40 != 0 {
            let mut buf = [0u8; 4];
            disk.pio_read(base, offset, &mut buf[..width]);
        } else {
            let bytes = [op[2], op[1], op[2], op[1]];
            disk.pio_write(base, offset, &bytes[..width]);
        }
        let mut status = [0u8];
        disk.pio_read(PioAddress(AtaDisk::COMMAND_BASE), 7, &mut status);
        let mut error = [0u8];
        disk.pio_read(PioAddress(AtaDisk::COMMAND_BASE), 1, &mut error);
        if status[0] & ERR != 0 {
            assert_ne!(error[0], 0, "ERR without an error code");
            assert_eq!(status[0] & DRQ, 0, "ERR with DRQ");
        }
    }
});
