//! A hostile vhost-user backend: any bytes as its side of the conversation (what
//! it answers to the frontend's negotiation, then the socket closed), for each kind
//! of device. Never a panic or a hang: the device is made or refused with an error;
//! a device made offers the driver VERSION_1 and only what the transport carries, and
//! its configuration space reads (any offset, any length) stay inside what it has.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use vmcraft_devices::virtio::vhost_user::{VhostUser, VhostUserSpec};
use vmcraft_devices::virtio::VirtioDevice;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, replies)) = data.split_first() else {
        return;
    };
    let spec = match kind % 4 {
        0 => VhostUserSpec::block(1 + u16::from(kind >> 6)),
        1 => VhostUserSpec::rng(),
        2 => VhostUserSpec::vsock(),
        _ => VhostUserSpec::fs("fuzz", 1).expect("a valid tag"),
    };
    let (ours, mut theirs) = UnixStream::pair().expect("a socket pair");
    // The backend's side, all of it, then its end: every wait for a reply ends.
    let _ = theirs.write_all(replies);
    let _ = theirs.shutdown(std::net::Shutdown::Write);
    let Ok(device) = VhostUser::new(ours, None, spec, "fuzz") else {
        return;
    };
    let features = device.features();
    assert_ne!(features & (1 << 32), 0, "VERSION_1 offered: {features:#x}");
    assert_eq!(
        features & (1 << 30),
        0,
        "the protocol-features bit is not the driver's"
    );
    assert_eq!(features & (1 << 34), 0, "no packed rings here");
    for (offset, len) in [(0u64, 8usize), (34, 2), (u64::MAX, 4), (200, 300)] {
        let mut buf = vec![0xa5u8; len];
        device.read_config(offset, &mut buf);
    }
    drop(theirs);
});
