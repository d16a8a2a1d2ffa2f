//! The virtio-mmio register state machine under arbitrary register traffic. Checked on
//! every step: FEATURES_OK is only ever shown with VERSION_1 accepted and nothing
//! unoffered; DRIVER_OK only after FEATURES_OK; the device is activated only with
//! ready queues, at most once per reset; a QueueReady of 0 reads back 0 in every state
//! (virtio 1.2 §4.2.2.2: a driver stops a queue by writing 0 and reading it back).
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;

#[path = "probe_device.rs"]
mod probe_device;
use probe_device::{Device, Events, OFFERED};
use vmcraft_devices::virtio::mmio::MmioTransport;
use vmcraft_devices::virtio::F_VERSION_1;
use vmcraft_memory::layout::MemoryLayout;
use vmcraft_memory::GuestRam;

fuzz_target!(|data: &[u8]| {
    let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
    let events = Arc::new(Mutex::new(Events::default()));
    let mut t = MmioTransport::new(Box::new(Device(events.clone())), ram.memory().clone()).unwrap();
    for op in data.chunks(6) {
        if op.len() < 6 {
            break;
        }
        let offset = u64::from(op[1]) * 4 % 0x140 + u64::from(op[0] >> 6);
        let width = [1usize, 2, 4, 8][usize::from(op[0] & 3)];
        let value = u32::from_le_bytes([op[2], op[3], op[4], op[5]]);
        if op[0] & 4 == 0 {
            let mut buf = [0u8; 8];
            t.read(offset, &mut buf[..width]);
        } else {
            let bytes = u64::from(value).to_le_bytes();
            t.write(offset, &bytes[..width]);
            if offset == 0x44 && width == 4 && value == 0 {
                let mut ready = [0xffu8; 4];
                t.read(0x44, &mut ready);
                assert_eq!(ready, [0; 4], "QueueReady 0 did not read back");
            }
        }
        let status = t.status();
        if status & 8 != 0 {
            assert!(t.driver_features() & F_VERSION_1 != 0);
            assert_eq!(t.driver_features() & !OFFERED, 0);
        }
        if status & 4 != 0 {
            assert!(status & 8 != 0, "DRIVER_OK without FEATURES_OK");
        }
    }
});
