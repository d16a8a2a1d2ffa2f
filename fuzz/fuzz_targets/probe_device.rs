//! The device both virtio transport fuzz targets put behind their transport: it
//! offers [`OFFERED`], has a 16- and a 256-entry queue, and checks what the transport
//! hands it on activation (only offered features, VERSION_1, ready queues of a
//! power-of-two size, one activation per reset).

use std::sync::{Arc, Mutex};

use vmcraft_devices::virtio::virtio_queue::QueueT;
use vmcraft_devices::virtio::{
    ActivateError, ActiveQueues, VirtioDevice, F_EVENT_IDX, F_VERSION_1,
};

pub const OFFERED: u64 = F_VERSION_1 | F_EVENT_IDX | 0b1011;

#[derive(Default)]
pub struct Events {
    activations_since_reset: u32,
}

pub struct Device(pub Arc<Mutex<Events>>);

impl VirtioDevice for Device {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 256]
    }
    fn features(&self) -> u64 {
        OFFERED
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn activate(&mut self, q: ActiveQueues) -> Result<(), ActivateError> {
        assert!(q.driver_features & F_VERSION_1 != 0);
        assert_eq!(q.driver_features & !OFFERED, 0);
        for queue in &q.queues {
            assert!(!queue.ready() || queue.size().is_power_of_two());
        }
        let mut e = self.0.lock().unwrap();
        e.activations_since_reset += 1;
        assert_eq!(
            e.activations_since_reset, 1,
            "activated twice without a reset"
        );
        Ok(())
    }
    fn reset(&mut self) {
        self.0.lock().unwrap().activations_since_reset = 0;
    }
}

