//! Machines built from a [`MachineConfig`] through the library
//! ([`MachineBuilder::configure`]), on real KVM with vmcraft's own guests: each device
//! kind of the configuration does its job in a running guest, a snapshot carries the
//! configuration and a restore builds the machine again from it alone, a Linux kernel
//! named by the configuration boots, and resources that do not fit the configuration
//! are refused by field.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{eventually, finish, machine_builder, record_warnings, sandboxed, DiskGuest, TIMEOUT};
use vmcraft::builder::MachineBuilder;
use vmcraft::config::{
    BootSource, ConsoleConfig, DeviceConfig, DeviceResource, DiskConfig, HostResources,
    MachineConfig, PvConfig,
};
use vmcraft::configure::ConfigureError;
use vmcraft::devices::serial::SharedBuffer;
use vmcraft::vcpu::exit::StopReason;
use vmcraft::vcpu::VcpuConfig;
use vmcraft_guest_kit::Guest;

/// A directory of its own under the temporary directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let p =
            std::env::temp_dir().join(format!("vmcraft-configured-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn disk_image(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
}

/// A 32 MiB machine with `kind`'s disk device on `image` first, then a virtio-rng and
/// a virtio-balloon.
fn disk_machine(kind: DiskGuest, image: &Path) -> MachineConfig {
    let disk = DiskConfig::new(image);
    let first = match kind {
        DiskGuest::VirtioBlk => DeviceConfig::VirtioBlock(disk),
        DiskGuest::Pv => DeviceConfig::Pv(PvConfig {
            disk,
            upcall_irq: vmcraft::config::PV_UPCALL_IRQ,
            layout: vmcraft_guest_kit::PV_LAYOUT,
        }),
        DiskGuest::Ata => DeviceConfig::Ata(disk),
    };
    MachineConfig {
        memory_mib: 32,
        devices: vec![first, DeviceConfig::VirtioRng, DeviceConfig::VirtioBalloon],
        ..MachineConfig::default()
    }
}

fn disk_guest(kind: DiskGuest, rounds: u64) -> (Guest, u64) {
    match kind {
        DiskGuest::VirtioBlk => (Guest::BLKCHECK, 1 | rounds << 16),
        DiskGuest::Pv => (Guest::PVCHECK, rounds << 16),
        DiskGuest::Ata => (Guest::ATA_BENCH, 8 | rounds << 16),
    }
}

/// An error and its sources, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// A machine built from `config` on its own resources, serial output to `serial`.
fn configured(config: &MachineConfig, serial: &SharedBuffer) -> MachineBuilder {
    let mut b = machine_builder(config.memory_bytes(), Box::new(serial.clone()));
    b.configure(config, config.open().unwrap()).unwrap();
    b
}

/// Each disk device kind, configured with a virtio-rng and a virtio-balloon beside it,
/// serves its guest's checked disk rounds; a snapshot taken mid-run carries the
/// configuration, and the machine is built again from that configuration alone (its
/// image moved to the copy taken with the snapshot) and runs on to the end with the
/// output continuing exactly where the snapshot cut it. A machine configured
/// otherwise is refused the snapshot, by field.
fn a_configured_disk_machine_restores_from_the_configuration_it_saved(kind: DiskGuest) {
    record_warnings();
    let rounds = kind.rounds(200);
    let dir = Dir::new(&format!("{kind:?}"));
    let image = dir.join("disk");
    disk_image(&image);
    let config = disk_machine(kind, &image);
    let serial = SharedBuffer::new();
    let mut b = configured(&config, &serial);
    let (guest, param) = disk_guest(kind, rounds);
    b.load(guest.image()).unwrap();
    let m = b.start(&[VcpuConfig::at(guest.entry(0, param))]).unwrap();
    assert_eq!(m.config(), Some(config.clone()));
    assert!(m.balloon().is_some() && m.xen().is_none());
    assert_eq!(
        m.virtio().len(),
        2 + usize::from(kind == DiskGuest::VirtioBlk)
    );
    assert!(eventually(60, || serial.contents().len() > 40
        || m.stop_reason().is_some()));
    let snap = dir.join("snap");
    m.snapshot(&snap).unwrap();
    let moved = dir.join("disk-at-snapshot");
    std::fs::copy(&image, &moved).unwrap();
    let before = serial.contents();
    assert!(
        before.len() < kind.expected(rounds).len(),
        "the snapshot came after the end"
    );
    m.resume();
    finish(m, &serial, "the configured original");
    assert_eq!(
        String::from_utf8_lossy(&serial.contents()),
        kind.expected(rounds)
    );

    // A machine configured otherwise (no balloon) is refused the snapshot.
    sandboxed();
    let (mut other, saved) =
        MachineBuilder::from_snapshot(&snap, Box::new(std::io::sink())).unwrap();
    let mut fewer = disk_machine(kind, &moved);
    fewer.devices.pop();
    other.configure(&fewer, fewer.open().unwrap()).unwrap();
    let err = chain(&other.start_restored(&saved).unwrap_err());
    assert!(
        err.ends_with("devices: \"3 devices\" when saved, \"2 devices\" now"),
        "{err}"
    );

    // The configuration the snapshot carries, on the copied image.
    let after = SharedBuffer::new();
    let (mut b, saved) = MachineBuilder::from_snapshot(&snap, Box::new(after.clone())).unwrap();
    let carried = saved
        .config()
        .unwrap()
        .expect("the snapshot carries its configuration");
    assert_eq!(carried, config);
    let here = carried
        .with_host_resources_of(&disk_machine(kind, &moved))
        .unwrap();
    b.configure(&here, here.open().unwrap()).unwrap();
    let m = b.start_restored(&saved).unwrap();
    assert_eq!(m.config(), Some(here.clone()));
    finish(m, &after, "restored from its configuration");
    let mut whole = before;
    whole.extend(after.contents());
    assert_eq!(String::from_utf8_lossy(&whole), kind.expected(rounds));
}

#[test]
fn a_configured_virtio_blk_machine_restores_from_the_configuration_it_saved() {
    a_configured_disk_machine_restores_from_the_configuration_it_saved(DiskGuest::VirtioBlk);
}

#[test]
fn a_configured_pv_machine_restores_from_the_configuration_it_saved() {
    a_configured_disk_machine_restores_from_the_configuration_it_saved(DiskGuest::Pv);
}

#[test]
fn a_configured_ata_machine_restores_from_the_configuration_it_saved() {
    a_configured_disk_machine_restores_from_the_configuration_it_saved(DiskGuest::Ata);
}

/// A console on a socket: opening the configuration waits for the one client, and
/// the guest's console is that client's stream both ways.
#[test]
fn a_configured_console_socket_carries_the_guests_console_to_its_client() {
    use std::io::{Read, Write};
    let dir = Dir::new("console");
    let socket = dir.join("console.sock");
    let config = MachineConfig {
        memory_mib: 16,
        devices: vec![DeviceConfig::VirtioConsole(ConsoleConfig {
            socket: Some(socket.clone()),
        })],
        ..MachineConfig::default()
    };
    let client = std::thread::spawn(move || {
        let mut stream = loop {
            match std::os::unix::net::UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        stream.write_all(b"ping\n").unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut text = Vec::new();
        let mut buf = [0u8; 256];
        while !text.ends_with(b"got: ping\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.extend_from_slice(&buf[..n]),
            }
        }
        text
    });
    let serial = SharedBuffer::new();
    let mut b = configured(&config, &serial);
    let guest = Guest::VIRTIO_CONSOLE;
    b.load(guest.image()).unwrap();
    let m = b.start(&[VcpuConfig::at(guest.entry(0, 0))]).unwrap();
    let outcome = m.run_for(TIMEOUT).unwrap();
    let text = client.join().unwrap();
    assert_eq!(outcome.reason, vmcraft_guest_kit::exited(0));
    assert_eq!(
        String::from_utf8_lossy(&text),
        "hello from virtio-console\ngot: ping\n"
    );
}

/// A Linux kernel the configuration names (the tiny ELF kernel: a newline on COM1,
/// then a reset through the i8042) is loaded with the vCPUs the configuration gives:
/// the boot vCPU at its entry, the other waiting for its start-up IPI. Its boot files
/// are used once; a configuration without a kernel has none to load.
#[test]
fn a_linux_kernel_named_by_the_configuration_boots_on_its_vcpus() {
    let dir = Dir::new("linux");
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, vmcraft_guest_kit::ELF_RESET).unwrap();
    let config = MachineConfig {
        memory_mib: 32,
        vcpus: 2,
        boot: Some(BootSource::Linux {
            kernel,
            initrd: None,
            cmdline: "console=ttyS0".into(),
        }),
        ..MachineConfig::default()
    };
    let serial = SharedBuffer::new();
    let mut b = configured(&config, &serial);
    let (loaded, vcpus) = b.load_configured_linux().unwrap();
    assert_eq!(vcpus.len(), 2);
    assert_eq!(vcpus[0], VcpuConfig::at(loaded.entry));
    assert!(matches!(
        b.load_configured_linux(),
        Err(ConfigureError::NoKernel)
    ));
    let m = b.start(&vcpus).unwrap();
    assert_eq!(m.run_for(TIMEOUT).unwrap().reason, StopReason::Reset);
    assert_eq!(serial.contents(), b"\n");

    let mut b = configured(&MachineConfig::default(), &serial);
    assert!(matches!(
        b.load_configured_linux(),
        Err(ConfigureError::NoKernel)
    ));
}

/// Resources that do not fit the configuration are refused before anything runs,
/// and the error names the field: RAM other than the configuration's, a resource list
/// of another length, a resource of another kind, a configuration that is invalid.
#[test]
fn resources_that_do_not_fit_the_configuration_are_refused_by_field() {
    let dir = Dir::new("refused");
    let image = dir.join("disk");
    disk_image(&image);
    let rng = MachineConfig {
        memory_mib: 16,
        devices: vec![DeviceConfig::VirtioRng],
        ..MachineConfig::default()
    };
    let attempt = |bytes: u64, config: &MachineConfig, resources: HostResources| {
        let mut b = machine_builder(bytes, Box::new(std::io::sink()));
        b.configure(config, resources).unwrap_err().to_string()
    };
    let err = attempt(32 << 20, &rng, rng.open().unwrap());
    assert!(err.starts_with("memory_mib"), "{err}");
    let err = attempt(16 << 20, &rng, HostResources::default());
    assert_eq!(err, "devices: 1 devices, 0 opened");
    let disk_file = || std::fs::File::open(&image).unwrap();
    let wrong = HostResources {
        kernel: None,
        devices: vec![DeviceResource::Disk(disk_file())],
    };
    let err = attempt(16 << 20, &rng, wrong);
    assert_eq!(
        err,
        "devices[0]: the resource opened for it is not a virtio-rng's"
    );
    let pv = disk_machine(DiskGuest::Pv, &image);
    let wrong = HostResources {
        kernel: None,
        devices: vec![
            DeviceResource::None,
            DeviceResource::None,
            DeviceResource::None,
        ],
    };
    let err = attempt(32 << 20, &pv, wrong);
    assert_eq!(err, "devices[0]: the resource opened for it is not a pv's");
    // A resource of another kind for a console and for a NIC.
    let console = MachineConfig {
        memory_mib: 16,
        devices: vec![DeviceConfig::VirtioConsole(ConsoleConfig::default())],
        ..MachineConfig::default()
    };
    let wrong = HostResources {
        kernel: None,
        devices: vec![DeviceResource::Disk(disk_file())],
    };
    let err = attempt(16 << 20, &console, wrong);
    assert_eq!(
        err,
        "devices[0]: the resource opened for it is not a virtio-console's"
    );
    let net = MachineConfig {
        memory_mib: 16,
        devices: vec![DeviceConfig::VirtioNet(vmcraft::config::NetConfig {
            tap: "vmcraft-none".into(),
            mac: None,
            queues: None,
        })],
        ..MachineConfig::default()
    };
    let wrong = HostResources {
        kernel: None,
        devices: vec![DeviceResource::None],
    };
    let err = attempt(16 << 20, &net, wrong);
    assert_eq!(
        err,
        "devices[0]: the resource opened for it is not a virtio-net's"
    );
    // A disk that is no image (a pipe cannot seek to its end): the device named,
    // the cause kept.
    for (device, kind) in [
        (
            DeviceConfig::VirtioBlock(DiskConfig::new(&image)),
            "virtio-block",
        ),
        (DeviceConfig::Ata(DiskConfig::new(&image)), "ata"),
    ] {
        let config = MachineConfig {
            memory_mib: 16,
            devices: vec![device],
            ..MachineConfig::default()
        };
        let (reader, _writer) = std::io::pipe().unwrap();
        let pipe = std::fs::File::from(std::os::fd::OwnedFd::from(reader));
        let resources = HostResources {
            kernel: None,
            devices: vec![DeviceResource::Disk(pipe)],
        };
        let mut b = machine_builder(16 << 20, Box::new(std::io::sink()));
        let err = chain(&b.configure(&config, resources).unwrap_err());
        assert!(
            err.starts_with(&format!("devices[0] ({kind}): ")) && err.contains("seek"),
            "{err}"
        );
    }
    // A Xen disk without Xen is refused by the configuration's own check.
    let xen_disk = MachineConfig {
        memory_mib: 16,
        devices: vec![DeviceConfig::XenDisk(DiskConfig::new(&image))],
        ..MachineConfig::default()
    };
    let err = attempt(16 << 20, &xen_disk, xen_disk.open().unwrap());
    assert!(err.contains("devices[0]"), "{err}");
}

#[test]
fn a_vhost_user_device_on_private_ram_is_refused_with_the_reason() {
    use vmcraft::config::{
        DeviceConfig, DeviceResource, HostResources, MachineConfig, VhostUserConfig,
    };
    common::require_kvm();
    let config = MachineConfig {
        memory_mib: 16,
        devices: vec![DeviceConfig::VhostUserRng(VhostUserConfig {
            socket: "/nonexistent.sock".into(),
            queues: None,
            queue_size: None,
        })],
        ..MachineConfig::default()
    };
    let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    // Built as MachineBuilder::new does: private, anonymous RAM.
    let mut b = machine_builder(16 << 20, Box::new(std::io::sink()));
    let err = b
        .configure(
            &config,
            HostResources {
                kernel: None,
                devices: vec![DeviceResource::VhostUser(ours)],
            },
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shared_memory") && err.contains("vhost-user-rng"),
        "{err}"
    );
    // MachineBuilder::for_config makes it shared.
    let b =
        vmcraft::builder::MachineBuilder::for_config(&config, Box::new(std::io::sink())).unwrap();
    assert!(b.vm().ram().is_shared());
}
