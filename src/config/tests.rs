use super::*;

fn parse(json: &str) -> Result<MachineConfig, ConfigError> {
    MachineConfig::from_json(json)
}

fn field_of(e: ConfigError) -> String {
    match e {
        ConfigError::Invalid { field, .. } | ConfigError::Differs { field, .. } => field,
        other => panic!("not a field error: {other}"),
    }
}

#[test]
fn a_whole_configuration_reads_and_writes_back_the_same() {
    let config = parse(
        r#"{
        "memory_mib": 512, "vcpus": 2, "ksm": true,
        "boot": {"kind": "linux", "kernel": "/k", "initrd": "/i", "cmdline": "quiet"},
        "devices": [
            {"kind": "virtio-block", "path": "/a.img", "read_only": true},
            {"kind": "virtio-console", "socket": "/run/con"},
            {"kind": "virtio-rng"},
            {"kind": "virtio-balloon"},
            {"kind": "virtio-net", "tap": "tap0", "mac": "02:00:00:00:00:01"},
            {"kind": "pv", "disk": {"path": "/pv.img"}},
            {"kind": "ata", "path": "/ata.img"}
        ]}"#,
    )
    .unwrap();
    assert_eq!(config.devices.len(), 7);
    assert_eq!(
        config.devices[5],
        DeviceConfig::Pv(PvConfig {
            disk: DiskConfig::new("/pv.img"),
            upcall_irq: PV_UPCALL_IRQ,
            layout: PvLayout::STANDARD,
        })
    );
    assert_eq!(parse(&config.to_json()).unwrap(), config);
}

#[test]
fn defaults_make_a_small_machine() {
    let config = parse("{}").unwrap();
    assert_eq!(config, MachineConfig::default());
    assert_eq!(config.memory_bytes(), 128 << 20);
}

#[test]
fn unknown_fields_and_kinds_are_refused() {
    assert!(matches!(
        parse(r#"{"memory": 1}"#),
        Err(ConfigError::Parse(_))
    ));
    assert!(matches!(
        parse(r#"{"devices": [{"kind": "virtio-gpu"}]}"#),
        Err(ConfigError::Parse(_))
    ));
    assert!(matches!(
        parse(r#"{"devices": [{"kind": "virtio-block", "path": "/a", "size": 3}]}"#),
        Err(ConfigError::Parse(_))
    ));
}

#[test]
fn errors_name_the_field() {
    let cases = [
        (r#"{"memory_mib": 2}"#, "memory_mib"),
        (r#"{"memory_mib": 18446744073709551615}"#, "memory_mib"),
        (r#"{"vcpus": 0}"#, "vcpus"),
        (r#"{"vcpus": 255}"#, "vcpus"),
        (
            r#"{"boot": {"kind": "linux", "kernel": ""}}"#,
            "boot.kernel",
        ),
        (r#"{"boot": {"kind": "embedded", "name": ""}}"#, "boot.name"),
        (
            r#"{"devices": [{"kind": "virtio-rng"}, {"kind": "virtio-block", "path": ""}]}"#,
            "devices[1].path",
        ),
        (
            r#"{"devices": [{"kind": "virtio-balloon"}, {"kind": "virtio-balloon"}]}"#,
            "devices[1]",
        ),
        (
            r#"{"devices": [{"kind": "xen-disk", "path": "/x"}]}"#,
            "devices[0]",
        ),
        (
            r#"{"xen": true, "devices": [{"kind": "pv", "disk": {"path": "/x"}}]}"#,
            "devices[0]",
        ),
        (
            r#"{"devices": [{"kind": "pv", "disk": {"path": "/x"}, "upcall_irq": 4}]}"#,
            "devices[0].upcall_irq",
        ),
        (
            r#"{"devices": [{"kind": "virtio-net", "tap": "t", "mac": "01:00:00:00:00:00"}]}"#,
            "devices[0].mac",
        ),
        (
            r#"{"devices": [{"kind": "virtio-net", "tap": "t", "mac": "02:00:00:00:00"}]}"#,
            "devices[0].mac",
        ),
        (
            r#"{"devices": [{"kind": "virtio-net", "tap": "a-name-far-too-long"}]}"#,
            "devices[0].tap",
        ),
    ];
    for (json, field) in cases {
        assert_eq!(field_of(parse(json).unwrap_err()), field, "{json}");
    }
    // Several disks and NICs are fine.
    parse(r#"{"devices": [{"kind": "virtio-block", "path": "/a"}, {"kind": "virtio-block", "path": "/b"}]}"#)
        .unwrap();
}

#[test]
fn a_pv_layout_whose_pages_overlap_is_refused() {
    let mut layout = PvLayout::STANDARD;
    layout.blk_ring = layout.console_page;
    let config = MachineConfig {
        devices: vec![DeviceConfig::Pv(PvConfig {
            disk: DiskConfig::new("/x"),
            upcall_irq: PV_UPCALL_IRQ,
            layout,
        })],
        ..MachineConfig::default()
    };
    let e = config.validate().unwrap_err();
    assert_eq!(
        e.to_string(),
        "devices[0].layout: the console page and the blkif ring overlap"
    );
}

fn machine(devices: Vec<DeviceConfig>) -> MachineConfig {
    MachineConfig {
        devices,
        ..MachineConfig::default()
    }
}

#[test]
fn a_restore_may_move_host_resources_but_not_the_machine() {
    let saved = machine(vec![
        DeviceConfig::VirtioBlock(DiskConfig::new("/old.img")),
        DeviceConfig::VirtioNet(NetConfig {
            tap: "tap-old".into(),
            mac: None,
            queues: None,
        }),
    ]);
    let here = machine(vec![
        DeviceConfig::VirtioBlock(DiskConfig::new("/new.img")),
        DeviceConfig::VirtioNet(NetConfig {
            tap: "tap-new".into(),
            mac: None,
            queues: None,
        }),
    ]);
    here.check_same_machine(&saved).unwrap();
    let moved = saved.with_host_resources_of(&here).unwrap();
    assert_eq!(moved, here);

    let mut ro = here.clone();
    ro.devices[0] = DeviceConfig::VirtioBlock(DiskConfig {
        path: "/new.img".into(),
        read_only: true,
        queues: None,
    });
    assert_eq!(
        field_of(ro.check_same_machine(&saved).unwrap_err()),
        "devices[0]"
    );
    let mut swapped = here.clone();
    swapped.devices.swap(0, 1);
    assert_eq!(
        field_of(swapped.check_same_machine(&saved).unwrap_err()),
        "devices[0].kind"
    );
    let mut bigger = here.clone();
    bigger.memory_mib *= 2;
    assert_eq!(
        field_of(bigger.check_same_machine(&saved).unwrap_err()),
        "memory_mib"
    );
    let mut fewer = here;
    fewer.devices.pop();
    assert_eq!(
        field_of(fewer.check_same_machine(&saved).unwrap_err()),
        "devices"
    );
}

#[test]
fn opening_names_the_field_whose_file_is_missing() {
    let config = machine(vec![
        DeviceConfig::VirtioRng,
        DeviceConfig::VirtioBlock(DiskConfig::new("/nonexistent/vmcraft.img")),
    ]);
    let e = config.open().unwrap_err();
    assert!(
        e.to_string()
            .starts_with("devices[1].path: cannot open /nonexistent/vmcraft.img"),
        "{e}"
    );
}

#[test]
fn opening_gives_one_resource_per_device() {
    let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
    let config = machine(vec![
        DeviceConfig::VirtioRng,
        DeviceConfig::Ata(DiskConfig {
            path: image.as_path().to_owned(),
            read_only: true,
            queues: None,
        }),
    ]);
    let opened = config.open().unwrap();
    assert!(opened.kernel.is_none());
    assert!(matches!(
        opened.devices[..],
        [DeviceResource::None, DeviceResource::Disk(_)]
    ));
}

#[test]
fn a_large_or_missing_configuration_file_is_refused() {
    let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
    file.as_file().set_len(MAX_CONFIG_BYTES + 10).unwrap();
    assert!(matches!(
        MachineConfig::from_file(file.as_path()),
        Err(ConfigError::Read { .. })
    ));
    assert!(matches!(
        MachineConfig::from_file(Path::new("/nonexistent/vmcraft.json")),
        Err(ConfigError::Read { .. })
    ));
}

#[test]
fn queues_are_a_virtio_block_setting_within_its_bounds() {
    let with = |device: fn(DiskConfig) -> DeviceConfig, queues: u16| {
        let mut disk = DiskConfig::new("/d.img");
        disk.queues = Some(queues);
        machine(vec![device(disk)])
            .validate()
            .map_err(|e| e.to_string())
    };
    assert!(with(DeviceConfig::VirtioBlock, 4).is_ok());
    assert_eq!(
        with(DeviceConfig::VirtioBlock, 0),
        Err("devices[0].queues: 0 queues (1 to 16)".into())
    );
    assert_eq!(
        with(DeviceConfig::VirtioBlock, 17),
        Err("devices[0].queues: 17 queues (1 to 16)".into())
    );
    assert_eq!(
        with(DeviceConfig::Ata, 2),
        Err("devices[0].queues: ata devices have one queue".into())
    );
    // Absent by default, and then not written out.
    let plain = machine(vec![DeviceConfig::VirtioBlock(DiskConfig::new("/d.img"))]);
    assert!(!plain.to_json().contains("queues"));
    // The queue count is the guest's to see: a restore must keep it.
    let mut four = plain.clone();
    if let DeviceConfig::VirtioBlock(d) = &mut four.devices[0] {
        d.queues = Some(4);
    }
    assert!(four.check_same_machine(&plain).is_err());
}

#[test]
fn vhost_user_devices_are_checked_made_into_specs_and_share_memory() {
    let ok = parse(
        r#"{"devices": [
            {"kind": "vhost-user-blk", "socket": "/run/b.sock", "queues": 2, "queue_size": 128},
            {"kind": "vhost-user-fs", "socket": "/run/f.sock", "tag": "share"},
            {"kind": "vhost-user-rng", "socket": "/run/r.sock"},
            {"kind": "vhost-user-vsock", "socket": "/run/v.sock"},
            {"kind": "vhost-user", "socket": "/run/g.sock", "device_type": 3, "queues": 2, "config_size": 12}
        ]}"#,
    )
    .unwrap();
    assert!(ok.memory_is_shared());
    assert!(ok
        .unsavable()
        .unwrap()
        .contains("devices[0] (vhost-user-blk)"));
    let kinds: Vec<_> = ok.devices.iter().map(|d| d.kind()).collect();
    assert_eq!(
        kinds,
        [
            "vhost-user-blk",
            "vhost-user-fs",
            "vhost-user-rng",
            "vhost-user-vsock",
            "vhost-user"
        ]
    );
    let specs: Vec<_> = ok
        .devices
        .iter()
        .map(|d| d.vhost_user_spec().unwrap().unwrap())
        .collect();
    assert_eq!(specs[0].queue_sizes, [128, 128]);
    assert_eq!(specs[1].queue_sizes.len(), 2);
    assert_eq!(specs[2].device_type, 4);
    assert_eq!(specs[3].queue_sizes.len(), 3);
    assert_eq!((specs[4].device_type, specs[4].queue_sizes.len()), (3, 2));
    assert!(ok.devices.iter().all(|d| d.vhost_user_socket().is_some()));
    assert!(!MachineConfig::default().memory_is_shared());
    assert!(MachineConfig::default().unsavable().is_none());
    // Asked for without a vhost-user device.
    assert!(parse(r#"{"shared_memory": true}"#)
        .unwrap()
        .memory_is_shared());

    // Another host's sockets: the same machine; its sockets taken.
    let mut there = ok.clone();
    for d in &mut there.devices {
        if let Some(s) = d.vhost_user_socket_mut() {
            *s = "/elsewhere.sock".into();
        }
    }
    ok.check_same_machine(&there).unwrap();
    let moved = ok.with_host_resources_of(&there).unwrap();
    assert!(moved
        .devices
        .iter()
        .all(|d| d.vhost_user_socket() == Some(std::path::Path::new("/elsewhere.sock"))));
}

#[test]
fn bad_vhost_user_devices_are_refused_with_the_field() {
    for (json, field) in [
        (
            r#"{"kind": "vhost-user-blk", "socket": ""}"#,
            "devices[0].socket",
        ),
        (
            r#"{"kind": "vhost-user-blk", "socket": "/s", "queues": 17}"#,
            "devices[0].queues",
        ),
        (
            r#"{"kind": "vhost-user-rng", "socket": "/s", "queues": 2}"#,
            "devices[0].queues",
        ),
        (
            r#"{"kind": "vhost-user-vsock", "socket": "/s", "queue_size": 100}"#,
            "devices[0].queue_size",
        ),
        (
            r#"{"kind": "vhost-user-blk", "socket": "/s", "queue_size": 2048}"#,
            "devices[0].queue_size",
        ),
        (
            r#"{"kind": "vhost-user-fs", "socket": "/s", "tag": ""}"#,
            "devices[0].tag",
        ),
        (
            r#"{"kind": "vhost-user-fs", "socket": "/s", "tag": "t", "queues": 0}"#,
            "devices[0].queues",
        ),
        (
            r#"{"kind": "vhost-user", "socket": "/s", "device_type": 0, "queues": 1}"#,
            "devices[0].device_type",
        ),
        (
            r#"{"kind": "vhost-user", "socket": "/s", "device_type": 3, "queues": 0}"#,
            "devices[0].queues",
        ),
        (
            r#"{"kind": "vhost-user", "socket": "/s", "device_type": 3, "queues": 1, "config_size": 4096}"#,
            "devices[0].config_size",
        ),
        (
            r#"{"kind": "vhost-user", "socket": "", "device_type": 3, "queues": 1}"#,
            "devices[0].socket",
        ),
    ] {
        let err = parse(&format!(r#"{{"devices": [{json}]}}"#)).unwrap_err();
        assert_eq!(field_of(err), field, "{json}");
    }
}
