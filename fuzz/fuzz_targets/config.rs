//! A machine configuration from outside (a `--config` file, a migration source's
//! CONFIG, a snapshot's `config` section, later an API client's body): whatever the
//! bytes, reading it, checking it against another machine and moving its host
//! resources give a value or a clear error, never a panic; what is accepted writes
//! back as itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcraft::config::{DeviceConfig, DiskConfig, MachineConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = MachineConfig::from_json(text) else {
        return;
    };
    assert_eq!(MachineConfig::from_json(&config.to_json()).unwrap(), config);
    let other = MachineConfig {
        devices: vec![DeviceConfig::VirtioBlock(DiskConfig::new("/elsewhere"))],
        ..MachineConfig::default()
    };
    let _ = config.check_same_machine(&other);
    let _ = other.check_same_machine(&config);
    if let Ok(moved) = config.with_host_resources_of(&config) {
        assert_eq!(moved, config);
    }
});
