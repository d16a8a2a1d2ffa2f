//! The snapshot reader under any bytes: parsing never panics, and whatever sections
//! verify are decoded as every state a restore reads (vCPU, VM, 16550, i8042, RTC,
//! virtio-mmio transport, balloon, ATA disk) and, for the devices, restored into live
//! devices, which must either accept the state or refuse it with an error; an ATA disk
//! that accepts one then serves its data port.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcraft_devices::ata::{AtaDisk, AtaState};
use vmcraft_devices::i8042::{Controller, I8042};
use vmcraft_devices::rtc::{Rtc, RtcSaved};
use vmcraft_devices::serial::{SerialDevice, SerialState};
use vmcraft_devices::stop::StopLatch;
use vmcraft_devices::virtio::balloon::{Balloon, BalloonState};
use vmcraft_devices::virtio::mmio::{MmioTransport, TransportState};
use vmcraft_devices::virtio::rng::Rng;
use vmcraft_devices::vm_device::bus::PioAddress;
use vmcraft_devices::vm_device::DevicePio;
use vmcraft_memory::layout::MemoryLayout;
use vmcraft_memory::GuestRam;
use vmcraft_snapshot::Snapshot;
use vmcraft_vcpu::state::{VcpuState, VmState};

mod scratch;

fuzz_target!(|data: &[u8]| {
    let Ok(snapshot) = Snapshot::parse(data.to_vec()) else {
        return;
    };
    let names: Vec<String> = snapshot.names().map(str::to_owned).collect();
    for name in &names {
        let _ = snapshot.load::<VcpuState>(name);
        let _ = snapshot.load::<VmState>(name);
        if let Ok(s) = snapshot.load::<SerialState>(name) {
            let serial = SerialDevice::new(Box::new(std::io::sink())).unwrap();
            let _ = serial.restore_state(&s);
        }
        if let Ok(s) = snapshot.load::<Controller>(name) {
            let i8042 = I8042::new(std::sync::Arc::new(StopLatch::default()), None);
            if i8042.restore_state(&s).is_ok() {
                assert_eq!(i8042.save_state(), s);
            }
        }
        if let Ok(s) = snapshot.load::<RtcSaved>(name) {
            let rtc = Rtc::with_clock(|| 0);
            if rtc.restore_state(&s).is_ok() {
                assert_eq!(rtc.save_state(), s);
            }
        }
        if let Ok(s) = snapshot.load::<BalloonState>(name) {
            let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
            let (_, control) = Balloon::new("fuzz").unwrap();
            if control.restore_state(&s, ram.memory()).is_ok() {
                let ones: u64 = s.inflated.iter().map(|w| u64::from(w.count_ones())).sum();
                assert_eq!(control.inflated_pages(), ones);
            } else {
                assert_eq!(control.inflated_pages(), 0);
            }
        }
        if let Ok(s) = snapshot.load::<AtaState>(name) {
            let ata = AtaDisk::new(scratch::image(64), false).unwrap();
            if ata.restore_state(&s).is_ok() {
                assert_eq!(ata.save_state(), s);
                let port = PioAddress(AtaDisk::COMMAND_BASE);
                let mut word = [0u8; 2];
                for _ in 0..600 {
                    ata.pio_read(port, 0, &mut word);
                    ata.pio_write(port, 0, &word);
                }
            }
        }
        if let Ok(s) = snapshot.load::<TransportState>(name) {
            let ram = GuestRam::new(&MemoryLayout::x86_64(1 << 20).unwrap()).unwrap();
            let mut t =
                MmioTransport::new(Box::new(Rng::new("fuzz")), ram.memory().clone()).unwrap();
            let _ = t.restore_state(&s);
        }
    }
});
