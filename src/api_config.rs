//! Firecracker's pre-boot requests made into a [`MachineConfig`]: what
//! `PUT /machine-config`, `/boot-source`, `/drives/{id}`, `/network-interfaces/{id}`,
//! `/vsock` and `/balloon` (or a `--config-file` with the same bodies) describe, checked as each
//! arrives and put together at `InstanceStart`. Plain code: unit tested without KVM.
//!
//! As in Firecracker: a drive or interface `PUT` again with the same id replaces it;
//! drives keep the order they were first put in, the root device goes first (it is
//! `/dev/vda`); `root=/dev/vda` (or `root=PARTUUID=...`) and `ro` or `rw` go on the
//! command line for the root device; without a `boot_args`, the command line is
//! Firecracker's default. What vmcraft does not have is refused with the reason (a
//! CPU template, SMT, a rate limiter, UFFD snapshots).
//!
//! ```
//! use vmcraft::api_config::PreBoot;
//! use vmcraft::api::types::{BootSource, MachineConfiguration};
//! let mut vm = PreBoot::default();
//! vm.put_machine_config(MachineConfiguration {
//!     vcpu_count: 2, mem_size_mib: 256, smt: false, cpu_template: None, track_dirty_pages: false,
//! })?;
//! vm.put_boot_source(BootSource {
//!     kernel_image_path: "/vmlinux".into(), initrd_path: None, boot_args: Some("console=ttyS0".into()),
//! })?;
//! let config = vm.machine_config()?;
//! assert_eq!((config.vcpus, config.memory_mib), (2, 256));
//! # Ok::<(), vmcraft::api_config::ApiConfigError>(())
//! ```

use std::path::{Component, Path, PathBuf};

use thiserror::Error;
use vmcraft_api::types::{
    Balloon, BootSource as ApiBootSource, Drive, FullVmConfiguration, MachineConfiguration,
    MachineConfigurationUpdate, NetworkInterface, PartialDrive, RateLimiter, SnapshotCreateParams,
    SnapshotLoadParams, Vsock,
};

use crate::config::{
    BootSource, ConfigError, DeviceConfig, DiskConfig, MachineConfig, NetConfig, VirtioTransport,
    VsockConfig,
};

/// Firecracker's command line when `boot_args` is not given.
pub const DEFAULT_BOOT_ARGS: &str = "reboot=k panic=1 pci=off nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// A pre-boot request refused; answered with 400 and the message.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ApiConfigError {
    /// A value vmcraft cannot take.
    #[error("{0}")]
    Unsupported(String),
    /// A value out of range or inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// `InstanceStart` before `PUT /boot-source`.
    #[error("cannot start the microVM: no boot source (PUT /boot-source first)")]
    NoBootSource,
    /// The configuration put together is refused.
    #[error("the machine configuration")]
    Config(#[source] ConfigError),
}

/// What the pre-boot requests have described so far. See the [module
/// documentation](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreBoot {
    /// vCPUs and RAM.
    pub machine: MachineConfiguration,
    /// The kernel, initrd and command line.
    pub boot: Option<ApiBootSource>,
    /// The drives, in the order first put.
    pub drives: Vec<Drive>,
    /// The network interfaces, in the order first put.
    pub interfaces: Vec<NetworkInterface>,
    /// The balloon.
    pub balloon: Option<Balloon>,
    /// The vsock.
    pub vsock: Option<Vsock>,
    /// The transport of the virtio devices.
    pub transport: VirtioTransport,
}

impl Default for PreBoot {
    fn default() -> Self {
        PreBoot {
            // Firecracker's defaults.
            machine: MachineConfiguration {
                vcpu_count: 1,
                mem_size_mib: 128,
                smt: false,
                cpu_template: None,
                track_dirty_pages: false,
            },
            boot: None,
            drives: Vec::new(),
            interfaces: Vec::new(),
            balloon: None,
            vsock: None,
            transport: VirtioTransport::Mmio,
        }
    }
}

fn no_rate_limiter(what: &str, limiter: &Option<RateLimiter>) -> Result<(), ApiConfigError> {
    match limiter {
        Some(l) if l.bandwidth.is_some() || l.ops.is_some() => Err(ApiConfigError::Unsupported(
            format!("{what}: rate limiters are not supported by this VMM"),
        )),
        _ => Ok(()),
    }
}

impl PreBoot {
    /// `PUT /machine-config`.
    pub fn put_machine_config(&mut self, m: MachineConfiguration) -> Result<(), ApiConfigError> {
        if !(1..=32).contains(&m.vcpu_count) {
            return Err(ApiConfigError::Invalid(format!(
                "invalid vcpu_count {}: 1 to 32",
                m.vcpu_count
            )));
        }
        if m.mem_size_mib == 0 {
            return Err(ApiConfigError::Invalid(
                "mem_size_mib must be above 0".into(),
            ));
        }
        if m.smt {
            return Err(ApiConfigError::Unsupported(
                "smt: simultaneous multithreading is not supported by this VMM".into(),
            ));
        }
        if m.cpu_template.as_deref().is_some_and(|t| t != "None") {
            return Err(ApiConfigError::Unsupported(format!(
                "cpu_template {:?}: CPU templates are not supported by this VMM",
                m.cpu_template.unwrap_or_default()
            )));
        }
        self.machine = m;
        Ok(())
    }

    /// `PATCH /machine-config`.
    pub fn patch_machine_config(
        &mut self,
        u: MachineConfigurationUpdate,
    ) -> Result<(), ApiConfigError> {
        let m = &self.machine;
        self.put_machine_config(MachineConfiguration {
            vcpu_count: u.vcpu_count.unwrap_or(m.vcpu_count),
            mem_size_mib: u.mem_size_mib.unwrap_or(m.mem_size_mib),
            smt: u.smt.unwrap_or(m.smt),
            cpu_template: u.cpu_template.or_else(|| m.cpu_template.clone()),
            track_dirty_pages: u.track_dirty_pages.unwrap_or(m.track_dirty_pages),
        })
    }

    /// `PUT /boot-source`.
    pub fn put_boot_source(&mut self, b: ApiBootSource) -> Result<(), ApiConfigError> {
        if b.kernel_image_path.is_empty() {
            return Err(ApiConfigError::Invalid("kernel_image_path is empty".into()));
        }
        self.boot = Some(b);
        Ok(())
    }

    /// `PUT /drives/{id}`: a new drive, or the one with that id replaced.
    pub fn put_drive(&mut self, d: Drive) -> Result<(), ApiConfigError> {
        no_rate_limiter(&format!("drive {}", d.drive_id), &d.rate_limiter)?;
        if d.io_engine.as_deref().is_some_and(|e| e != "Sync") {
            return Err(ApiConfigError::Unsupported(format!(
                "drive {}: io_engine {:?} (only Sync)",
                d.drive_id,
                d.io_engine.clone().unwrap_or_default()
            )));
        }
        if d.is_root_device
            && self
                .drives
                .iter()
                .any(|o| o.is_root_device && o.drive_id != d.drive_id)
        {
            return Err(ApiConfigError::Invalid(
                "a root block device already exists".into(),
            ));
        }
        match self.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
            Some(slot) => *slot = d,
            None => self.drives.push(d),
        }
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`.
    pub fn put_network_interface(&mut self, n: NetworkInterface) -> Result<(), ApiConfigError> {
        no_rate_limiter(&format!("interface {}", n.iface_id), &n.rx_rate_limiter)?;
        no_rate_limiter(&format!("interface {}", n.iface_id), &n.tx_rate_limiter)?;
        if let Some(mac) = &n.guest_mac {
            crate::config::parse_mac(mac)
                .map_err(|e| ApiConfigError::Invalid(format!("guest_mac {mac}: {e}")))?;
        }
        if self
            .interfaces
            .iter()
            .any(|o| o.host_dev_name == n.host_dev_name && o.iface_id != n.iface_id)
        {
            return Err(ApiConfigError::Invalid(format!(
                "the TAP {} is another interface's",
                n.host_dev_name
            )));
        }
        match self
            .interfaces
            .iter_mut()
            .find(|o| o.iface_id == n.iface_id)
        {
            Some(slot) => *slot = n,
            None => self.interfaces.push(n),
        }
        Ok(())
    }

    /// `PUT /balloon`.
    pub fn put_balloon(&mut self, b: Balloon) -> Result<(), ApiConfigError> {
        if u64::from(b.amount_mib) > self.machine.mem_size_mib {
            return Err(ApiConfigError::Invalid(format!(
                "amount_mib {} is more than the machine's {} MiB",
                b.amount_mib, self.machine.mem_size_mib
            )));
        }
        self.balloon = Some(b);
        Ok(())
    }

    /// `PUT /vsock`: the guest's context id and the host side's socket (created at
    /// `InstanceStart`; it must not exist). A second `PUT` replaces the first.
    pub fn put_vsock(&mut self, v: Vsock) -> Result<(), ApiConfigError> {
        if !vmcraft_devices::virtio::vsock::wire::valid_guest_cid(u64::from(v.guest_cid)) {
            return Err(ApiConfigError::Invalid(format!(
                "guest_cid {}: reserved (a guest's is 3 to 4294967294)",
                v.guest_cid
            )));
        }
        if v.uds_path.is_empty() {
            return Err(ApiConfigError::Invalid("uds_path is empty".into()));
        }
        self.vsock = Some(v);
        Ok(())
    }

    /// Everything at once, from `--config-file` (Firecracker's format): applied in
    /// the order Firecracker applies it, each part checked as its request would be.
    pub fn from_full(full: FullVmConfiguration) -> Result<Self, ApiConfigError> {
        let mut vm = PreBoot::default();
        if let Some(m) = full.machine_config {
            vm.put_machine_config(m)?;
        }
        if let Some(b) = full.boot_source {
            vm.put_boot_source(b)?;
        }
        for d in full.drives {
            vm.put_drive(d)?;
        }
        for n in full.network_interfaces {
            vm.put_network_interface(n)?;
        }
        if let Some(b) = full.balloon {
            vm.put_balloon(b)?;
        }
        if let Some(v) = full.vsock {
            vm.put_vsock(v)?;
        }
        Ok(vm)
    }

    /// The machine described: RAM, vCPUs, the Linux boot with its command line (the
    /// root device's entries added), the drives as virtio-blk (root first), the
    /// interfaces as virtio-net, the balloon. Checked as any configuration is.
    pub fn machine_config(&self) -> Result<MachineConfig, ApiConfigError> {
        let boot = self.boot.as_ref().ok_or(ApiConfigError::NoBootSource)?;
        let mut cmdline = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string());
        let drives = self.ordered_drives();
        if let Some(root) = drives.first().filter(|d| d.is_root_device) {
            let device = match &root.partuuid {
                Some(uuid) => format!("PARTUUID={uuid}"),
                None => "/dev/vda".to_string(),
            };
            let mode = if root.is_read_only { "ro" } else { "rw" };
            cmdline.push_str(&format!(" root={device} {mode}"));
        }
        let mut devices: Vec<DeviceConfig> = drives
            .iter()
            .map(|d| {
                DeviceConfig::VirtioBlock(DiskConfig {
                    path: d.path_on_host.clone().into(),
                    read_only: d.is_read_only,
                    queues: None,
                })
            })
            .collect();
        devices.extend(self.interfaces.iter().map(|n| {
            DeviceConfig::VirtioNet(NetConfig {
                tap: n.host_dev_name.clone(),
                mac: n.guest_mac.clone(),
                queues: None,
            })
        }));
        if self.balloon.is_some() {
            devices.push(DeviceConfig::VirtioBalloon);
        }
        if let Some(v) = &self.vsock {
            devices.push(DeviceConfig::VirtioVsock(VsockConfig {
                guest_cid: u64::from(v.guest_cid),
                uds_path: v.uds_path.clone().into(),
            }));
        }
        let config = MachineConfig {
            memory_mib: self.machine.mem_size_mib,
            vcpus: u32::from(self.machine.vcpu_count),
            boot: Some(BootSource::Linux {
                kernel: boot.kernel_image_path.clone().into(),
                initrd: boot.initrd_path.clone().map(Into::into),
                cmdline,
            }),
            devices,
            transport: self.transport,
            ..MachineConfig::default()
        };
        config.validate().map_err(ApiConfigError::Config)?;
        Ok(config)
    }

    /// The drives in device order: the root device first, then the others as put.
    fn ordered_drives(&self) -> Vec<&Drive> {
        let mut drives: Vec<&Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        drives.extend(self.drives.iter().filter(|d| !d.is_root_device));
        drives
    }

    /// `PATCH /drives/{id}` on a running machine, checked: a new `path_on_host` for
    /// a drive that exists (no rate limiter), taken relative to `dir` (the one
    /// directory the running VMM opens files in). Returns the drive's index among
    /// the machine's devices and the path relative to `dir`; [`PreBoot::drives`]
    /// names the new image from now on (the caller applies it first).
    pub fn patch_drive(
        &self,
        dir: &Path,
        p: &PartialDrive,
    ) -> Result<(usize, PathBuf), ApiConfigError> {
        no_rate_limiter(&format!("drive {}", p.drive_id), &p.rate_limiter)?;
        let device = self
            .ordered_drives()
            .iter()
            .position(|d| d.drive_id == p.drive_id)
            .ok_or_else(|| {
                ApiConfigError::Invalid(format!("drive {}: no such drive", p.drive_id))
            })?;
        let path = p.path_on_host.as_deref().ok_or_else(|| {
            ApiConfigError::Invalid(format!(
                "drive {}: nothing to change (give path_on_host)",
                p.drive_id
            ))
        })?;
        Ok((device, path_beneath(dir, "path_on_host", path)?))
    }

    /// Record that drive `id` is the image at `path` now.
    pub fn drive_replaced(&mut self, id: &str, path: &Path) {
        if let Some(d) = self.drives.iter_mut().find(|d| d.drive_id == id) {
            d.path_on_host = path.display().to_string();
        }
    }

    /// Whether anything was put that a snapshot load would replace (Firecracker
    /// refuses `PUT /snapshot/load` then).
    pub fn is_configured(&self) -> bool {
        *self
            != PreBoot {
                transport: self.transport,
                ..PreBoot::default()
            }
    }

    /// `PUT /snapshot/load`, checked: before anything is configured, one memory file
    /// (`mem_backend` of type `File`, or the older `mem_file_path`), no diff
    /// snapshots.
    pub fn snapshot_load(&self, p: &SnapshotLoadParams) -> Result<SnapshotToLoad, ApiConfigError> {
        if self.is_configured() {
            return Err(ApiConfigError::Invalid(
                "loading a snapshot is not allowed after configuring boot-specific resources"
                    .into(),
            ));
        }
        if p.enable_diff_snapshots {
            return Err(ApiConfigError::Unsupported(
                "enable_diff_snapshots: diff snapshots are not supported by this VMM".into(),
            ));
        }
        let memory = match (&p.mem_file_path, &p.mem_backend) {
            (Some(path), None) => path.clone(),
            (None, Some(b)) if b.backend_type == "File" => b.backend_path.clone(),
            (None, Some(b)) => {
                return Err(ApiConfigError::Unsupported(format!(
                    "mem_backend: backend_type {:?} is not supported by this VMM (only File)",
                    b.backend_type
                )))
            }
            (Some(_), Some(_)) => {
                return Err(ApiConfigError::Invalid(
                    "give either mem_file_path or mem_backend, not both".into(),
                ))
            }
            (None, None) => {
                return Err(ApiConfigError::Invalid(
                    "missing the memory file: give mem_backend (or mem_file_path)".into(),
                ))
            }
        };
        for (field, path) in [
            ("snapshot_path", &p.snapshot_path),
            ("memory file", &memory),
        ] {
            if path.is_empty() {
                return Err(ApiConfigError::Invalid(format!("{field} is empty")));
            }
        }
        Ok(SnapshotToLoad {
            state: p.snapshot_path.clone().into(),
            memory: memory.into(),
            resume: p.resume_vm,
        })
    }

    /// The pre-boot view of a machine loaded from a snapshot (its vCPUs, RAM, boot
    /// source and balloon), for the requests that read or bound by it afterwards.
    pub fn from_loaded(config: &MachineConfig) -> PreBoot {
        let boot = match &config.boot {
            Some(BootSource::Linux {
                kernel,
                initrd,
                cmdline,
            }) => Some(ApiBootSource {
                kernel_image_path: kernel.display().to_string(),
                initrd_path: initrd.as_ref().map(|i| i.display().to_string()),
                boot_args: Some(cmdline.clone()),
            }),
            _ => None,
        };
        let balloon = config
            .devices
            .iter()
            .any(|d| matches!(d, DeviceConfig::VirtioBalloon))
            .then_some(Balloon {
                amount_mib: 0,
                deflate_on_oom: true,
                stats_polling_interval_s: 0,
            });
        PreBoot {
            machine: MachineConfiguration {
                vcpu_count: config.vcpus.min(u32::from(u8::MAX)) as u8,
                mem_size_mib: config.memory_mib,
                smt: false,
                cpu_template: None,
                track_dirty_pages: false,
            },
            boot,
            balloon,
            vsock: config.devices.iter().find_map(|d| match d {
                DeviceConfig::VirtioVsock(v) => Some(Vsock {
                    guest_cid: v.guest_cid.min(u64::from(u32::MAX)) as u32,
                    uds_path: v.uds_path.display().to_string(),
                    vsock_id: None,
                }),
                _ => None,
            }),
            transport: config.transport,
            ..PreBoot::default()
        }
    }

    /// `GET /vm/config`: what was put, in Firecracker's format.
    pub fn full(&self) -> FullVmConfiguration {
        FullVmConfiguration {
            balloon: self.balloon.clone(),
            drives: self.drives.clone(),
            boot_source: self.boot.clone(),
            machine_config: Some(self.machine.clone()),
            network_interfaces: self.interfaces.clone(),
            vsock: self.vsock.clone(),
            ..FullVmConfiguration::default()
        }
    }
}

/// A snapshot `PUT /snapshot/load` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotToLoad {
    /// The state file.
    pub state: PathBuf,
    /// The memory file.
    pub memory: PathBuf,
    /// Whether the machine runs at once (`resume_vm`), or waits paused.
    pub resume: bool,
}

/// Where `PUT /snapshot/create` writes: the state and memory files, each relative to
/// the directory `dir` a VMM lets its running machine write in (an absolute path must
/// lie in `dir`; `..` is refused). Only full snapshots; a target `version` is refused.
pub fn snapshot_create_paths(
    dir: &Path,
    p: &SnapshotCreateParams,
) -> Result<(PathBuf, PathBuf), ApiConfigError> {
    match p.snapshot_type.as_deref() {
        None | Some("Full") => {}
        Some(other) => {
            return Err(ApiConfigError::Unsupported(format!(
                "snapshot_type {other:?} is not supported by this VMM (only Full)"
            )))
        }
    }
    if let Some(v) = &p.version {
        return Err(ApiConfigError::Unsupported(format!(
            "version {v:?}: snapshots are written in this VMM's own format only"
        )));
    }
    let state = path_beneath(dir, "snapshot_path", &p.snapshot_path)?;
    let memory = path_beneath(dir, "mem_file_path", &p.mem_file_path)?;
    if state == memory {
        return Err(ApiConfigError::Invalid(format!(
            "snapshot_path and mem_file_path are the same file ({})",
            p.snapshot_path
        )));
    }
    Ok((state, memory))
}

/// `path` (a request's `field`) relative to `dir`, the one directory a running VMM
/// opens files in: a relative path as it is, an absolute one inside `dir` made
/// relative; `..` is refused.
pub fn path_beneath(dir: &Path, field: &str, path: &str) -> Result<PathBuf, ApiConfigError> {
    let outside = || {
        ApiConfigError::Invalid(format!(
            "{field} {path:?} is outside {}, the only directory this VMM opens files in once the microVM runs",
            dir.display()
        ))
    };
    let given = Path::new(path);
    let relative = if given.is_absolute() {
        given.strip_prefix(dir).map_err(|_| outside())?
    } else {
        given
    };
    let mut clean = PathBuf::new();
    for c in relative.components() {
        match c {
            Component::Normal(name) => clean.push(name),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(outside())
            }
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(ApiConfigError::Invalid(format!(
            "{field} {path:?} names no file"
        )));
    }
    Ok(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(id: &str, root: bool) -> Drive {
        Drive {
            drive_id: id.into(),
            path_on_host: format!("/img/{id}"),
            is_root_device: root,
            is_read_only: false,
            partuuid: None,
            cache_type: None,
            rate_limiter: None,
            io_engine: None,
        }
    }

    fn booted() -> PreBoot {
        let mut vm = PreBoot::default();
        vm.put_boot_source(ApiBootSource {
            kernel_image_path: "/vmlinux".into(),
            initrd_path: Some("/initrd".into()),
            boot_args: Some("console=ttyS0".into()),
        })
        .unwrap();
        vm
    }

    #[test]
    fn the_root_drive_goes_first_and_on_the_command_line() {
        let mut vm = booted();
        vm.put_drive(drive("data", false)).unwrap();
        vm.put_drive(drive("rootfs", true)).unwrap();
        let config = vm.machine_config().unwrap();
        let paths: Vec<_> = config
            .devices
            .iter()
            .filter_map(|d| d.disk().map(|d| d.path.display().to_string()))
            .collect();
        assert_eq!(paths, ["/img/rootfs", "/img/data"]);
        let Some(BootSource::Linux {
            cmdline, initrd, ..
        }) = &config.boot
        else {
            panic!("a Linux boot");
        };
        assert_eq!(cmdline, "console=ttyS0 root=/dev/vda rw");
        assert_eq!(initrd.as_deref(), Some(std::path::Path::new("/initrd")));
        // The same id again replaces; a second root is refused.
        let mut ro = drive("rootfs", true);
        ro.is_read_only = true;
        ro.partuuid = Some("0eaa91a0-01".into());
        vm.put_drive(ro).unwrap();
        let config = vm.machine_config().unwrap();
        assert_eq!(config.devices.len(), 2);
        let Some(BootSource::Linux { cmdline, .. }) = &config.boot else {
            panic!("a Linux boot");
        };
        assert!(cmdline.ends_with("root=PARTUUID=0eaa91a0-01 ro"));
        let e = vm.put_drive(drive("other", true)).unwrap_err();
        assert_eq!(e.to_string(), "a root block device already exists");
    }

    #[test]
    fn what_this_vmm_lacks_is_refused_by_name() {
        let mut vm = booted();
        let mut m = vm.machine.clone();
        m.smt = true;
        assert!(vm
            .put_machine_config(m.clone())
            .unwrap_err()
            .to_string()
            .contains("smt"));
        m.smt = false;
        m.cpu_template = Some("T2".into());
        assert!(vm
            .put_machine_config(m.clone())
            .unwrap_err()
            .to_string()
            .contains("CPU templates"));
        m.cpu_template = Some("None".into());
        m.vcpu_count = 0;
        assert!(vm
            .put_machine_config(m)
            .unwrap_err()
            .to_string()
            .contains("vcpu_count 0"));
        let mut d = drive("limited", false);
        d.rate_limiter = Some(RateLimiter {
            bandwidth: Some(vmcraft_api::types::TokenBucket {
                one_time_burst: None,
                refill_time: 100,
                size: 1 << 20,
            }),
            ops: None,
        });
        assert!(vm
            .put_drive(d)
            .unwrap_err()
            .to_string()
            .contains("rate limiters"));
        let mut d = drive("async", false);
        d.io_engine = Some("Async".into());
        assert!(vm.put_drive(d).is_err());
        let bad_mac = NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some("01:00:00:00:00:01".into()),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        assert!(vm
            .put_network_interface(bad_mac)
            .unwrap_err()
            .to_string()
            .contains("guest_mac"));
        assert!(matches!(
            PreBoot::default().machine_config(),
            Err(ApiConfigError::NoBootSource)
        ));
        let e = vm
            .put_balloon(Balloon {
                amount_mib: 4096,
                deflate_on_oom: true,
                stats_polling_interval_s: 0,
            })
            .unwrap_err();
        assert!(e.to_string().contains("more than the machine's 128 MiB"));
    }

    #[test]
    fn a_config_file_is_the_requests_at_once_and_reads_back() {
        let full: FullVmConfiguration = serde_json::from_str(
            r#"{
              "boot-source": {"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0"},
              "drives": [{"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true, "is_read_only": false}],
              "machine-config": {"vcpu_count": 2, "mem_size_mib": 512},
              "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "AA:FC:00:00:00:01"}],
              "balloon": {"amount_mib": 0, "deflate_on_oom": true}
            }"#,
        )
        .unwrap();
        let vm = PreBoot::from_full(full.clone()).unwrap();
        let config = vm.machine_config().unwrap();
        assert_eq!((config.vcpus, config.memory_mib), (2, 512));
        let kinds: Vec<_> = config.devices.iter().map(|d| d.kind()).collect();
        assert_eq!(kinds, ["virtio-block", "virtio-net", "virtio-balloon"]);
        assert_eq!(vm.full(), full);
        let mut with_vsock = full;
        with_vsock.vsock = Some(vmcraft_api::types::Vsock {
            guest_cid: 3,
            uds_path: "/v.sock".into(),
            vsock_id: None,
        });
        let vm = PreBoot::from_full(with_vsock.clone()).unwrap();
        let config = vm.machine_config().unwrap();
        assert_eq!(
            config.devices.last(),
            Some(&DeviceConfig::VirtioVsock(VsockConfig {
                guest_cid: 3,
                uds_path: "/v.sock".into()
            }))
        );
        assert_eq!(vm.full(), with_vsock);
        assert_eq!(PreBoot::from_loaded(&config).vsock, with_vsock.vsock);
        for (cid, path) in [(2, "/v.sock"), (u32::MAX, "/v.sock"), (3, "")] {
            let mut bad = with_vsock.clone();
            bad.vsock = Some(vmcraft_api::types::Vsock {
                guest_cid: cid,
                uds_path: path.into(),
                vsock_id: None,
            });
            assert!(PreBoot::from_full(bad).is_err(), "{cid} {path:?}");
        }
    }

    #[test]
    fn a_patch_changes_only_what_it_names() {
        let mut vm = booted();
        vm.patch_machine_config(MachineConfigurationUpdate {
            mem_size_mib: Some(1024),
            ..MachineConfigurationUpdate::default()
        })
        .unwrap();
        assert_eq!((vm.machine.vcpu_count, vm.machine.mem_size_mib), (1, 1024));
    }

    fn create(state: &str, memory: &str) -> SnapshotCreateParams {
        SnapshotCreateParams {
            snapshot_path: state.into(),
            mem_file_path: memory.into(),
            snapshot_type: None,
            version: None,
        }
    }

    #[test]
    fn snapshot_files_are_taken_beneath_the_directory_only() {
        let dir = Path::new("/run/vm");
        assert_eq!(
            snapshot_create_paths(dir, &create("/run/vm/snap/state", "mem")).unwrap(),
            (PathBuf::from("snap/state"), PathBuf::from("mem"))
        );
        for (state, memory, says) in [
            ("/etc/passwd", "mem", "outside /run/vm"),
            ("../state", "mem", "outside"),
            ("a/../../state", "mem", "outside"),
            ("/run/vmx/state", "mem", "outside"),
            ("/run/vm", "mem", "names no file"),
            ("state", "./state", "the same file"),
        ] {
            let e = snapshot_create_paths(dir, &create(state, memory))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{state} {memory}: {e}");
        }
        let mut diff = create("s", "m");
        diff.snapshot_type = Some("Diff".into());
        assert!(snapshot_create_paths(dir, &diff)
            .unwrap_err()
            .to_string()
            .contains("Diff"));
    }

    #[test]
    fn a_snapshot_loads_only_into_an_unconfigured_vmm_with_one_memory_file() {
        use vmcraft_api::types::MemoryBackend;
        let load =
            |mem_file_path: Option<&str>, backend: Option<(&str, &str)>| SnapshotLoadParams {
                snapshot_path: "/s/state".into(),
                mem_file_path: mem_file_path.map(Into::into),
                mem_backend: backend.map(|(t, p)| MemoryBackend {
                    backend_type: t.into(),
                    backend_path: p.into(),
                }),
                enable_diff_snapshots: false,
                resume_vm: true,
            };
        let fresh = PreBoot::default();
        assert_eq!(
            fresh
                .snapshot_load(&load(None, Some(("File", "/s/mem"))))
                .unwrap(),
            SnapshotToLoad {
                state: "/s/state".into(),
                memory: "/s/mem".into(),
                resume: true
            }
        );
        assert_eq!(
            fresh
                .snapshot_load(&load(Some("/s/m"), None))
                .unwrap()
                .memory,
            PathBuf::from("/s/m")
        );
        for (params, says) in [
            (load(None, None), "missing the memory file"),
            (load(Some("/a"), Some(("File", "/b"))), "not both"),
            (load(None, Some(("Uffd", "/sock"))), "Uffd"),
        ] {
            let e = fresh.snapshot_load(&params).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
        let mut configured = PreBoot::default();
        configured
            .put_machine_config(MachineConfiguration {
                vcpu_count: 2,
                mem_size_mib: 64,
                smt: false,
                cpu_template: None,
                track_dirty_pages: false,
            })
            .unwrap();
        assert!(configured
            .snapshot_load(&load(Some("/m"), None))
            .unwrap_err()
            .to_string()
            .contains("after configuring"));
    }

    #[test]
    fn a_loaded_machine_reads_back_as_its_configuration() {
        let config = MachineConfig {
            memory_mib: 96,
            vcpus: 2,
            devices: vec![DeviceConfig::VirtioBalloon],
            ..MachineConfig::default()
        };
        let pre = PreBoot::from_loaded(&config);
        assert_eq!((pre.machine.vcpu_count, pre.machine.mem_size_mib), (2, 96));
        assert!(pre.balloon.is_some() && pre.is_configured());
    }

    #[test]
    fn a_drive_patched_after_the_start_is_found_in_device_order() {
        let mut vm = PreBoot::default();
        vm.put_drive(drive("data", false)).unwrap();
        vm.put_drive(drive("rootfs", true)).unwrap();
        let patch = |id: &str, path: Option<&str>| PartialDrive {
            drive_id: id.into(),
            path_on_host: path.map(Into::into),
            rate_limiter: None,
        };
        let dir = Path::new("/run/vm");
        assert_eq!(
            vm.patch_drive(dir, &patch("data", Some("/run/vm/new.img")))
                .unwrap(),
            (1, PathBuf::from("new.img")),
            "the root drive is device 0"
        );
        for (p, says) in [
            (patch("nope", Some("x")), "no such drive"),
            (patch("data", None), "nothing to change"),
            (patch("data", Some("/dev/sdb")), "outside /run/vm"),
        ] {
            let e = vm.patch_drive(dir, &p).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
        vm.drive_replaced("data", Path::new("/run/vm/new.img"));
        assert_eq!(vm.full().drives[0].path_on_host, "/run/vm/new.img");
    }
}
