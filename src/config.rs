//! What a machine is, as data: [`MachineConfig`], the one description that the
//! builder consumes ([`MachineBuilder::configure`](crate::builder::MachineBuilder::configure)),
//! that a snapshot carries (section `config`) and that a restore rebuilds from.
//!
//! A configuration is plain serde data (JSON in files and on the wire, as
//! Firecracker's and Cloud Hypervisor's are) and is checked as a whole by
//! [`MachineConfig::validate`], whose errors name the field (`devices[2].path`).
//! Host-side resources are named in it (an image's path, a TAP's name, a socket) and
//! opened in one step, [`MachineConfig::open`], before anything else runs: a VMM
//! that then enters a jail or turns its filters on opens nothing afterwards.
//!
//! ```
//! use vmcraft::config::{DeviceConfig, DiskConfig, MachineConfig};
//!
//! let config: MachineConfig = serde_json::from_str(r#"{
//!     "memory_mib": 256,
//!     "vcpus": 2,
//!     "boot": { "kind": "linux", "kernel": "/boot/vmlinux", "cmdline": "console=ttyS0" },
//!     "devices": [
//!         { "kind": "virtio-block", "path": "/var/lib/vm/root.img" },
//!         { "kind": "virtio-rng" }
//!     ]
//! }"#)?;
//! config.validate()?;
//! assert_eq!(config.devices[0], DeviceConfig::VirtioBlock(DiskConfig::new("/var/lib/vm/root.img")));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmcraft_pv_hypercall::layout::PvLayout;

/// The fewest MiB of guest RAM a machine has.
pub const MIN_MEMORY_MIB: u64 = 4;
/// The most MiB of guest RAM a configuration may ask for (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// The most vCPUs (the IOAPIC's and the MADT's xAPIC ids).
pub const MAX_VCPUS: u32 = 254;
/// The largest configuration file read (a configuration is a few hundred bytes).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A whole machine. See the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Guest RAM in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// How many vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// What runs first; none for a machine whose state comes from a snapshot or a
    /// migration.
    #[serde(default)]
    pub boot: Option<BootSource>,
    /// The devices besides the PC's own (COM1, the i8042, the RTC, the ACPI power
    /// registers), in order: virtio devices get their windows and interrupt lines
    /// in this order.
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    /// Present Xen to the guest: Xen's CPUID leaves, its hypercalls (through KVM's
    /// Xen support), event channels, grant tables and a xenstore; `xen-disk`
    /// devices need it. Linux boots through its PVH entry (an ELF vmlinux).
    #[serde(default)]
    pub xen: bool,
    /// Offer guest RAM to the host's same-page merging (KSM).
    #[serde(default)]
    pub ksm: bool,
    /// How the virtio devices reach the guest.
    #[serde(default)]
    pub transport: VirtioTransport,
    /// Map guest RAM shared from a memory file that other processes can map (a
    /// vhost-user backend reads and writes guest memory itself). Implied by any
    /// vhost-user device; see [`MachineConfig::shared_memory`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_memory: bool,
}

/// The transport of a machine's virtio devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VirtioTransport {
    /// virtio-mmio windows described in the DSDT (and on the command line): the
    /// smallest machine, one interrupt line per device.
    #[default]
    Mmio,
    /// virtio-pci functions on a PCI host bridge, with an MSI-X vector per queue.
    Pci,
}

fn default_memory_mib() -> u64 {
    128
}

fn default_vcpus() -> u32 {
    1
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            memory_mib: default_memory_mib(),
            vcpus: default_vcpus(),
            boot: None,
            devices: Vec::new(),
            xen: false,
            ksm: false,
            transport: VirtioTransport::Mmio,
            shared_memory: false,
        }
    }
}

/// What a machine runs first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum BootSource {
    /// A Linux kernel (bzImage or ELF vmlinux), ACPI tables describing the machine.
    Linux {
        /// The kernel image.
        kernel: PathBuf,
        /// An initramfs.
        #[serde(default)]
        initrd: Option<PathBuf>,
        /// The command line (the virtio devices' entries are added to it).
        #[serde(default)]
        cmdline: String,
    },
    /// An image the embedding program has built in, by name, with a parameter for
    /// it: the program loads it and says where it starts.
    Embedded {
        /// Its name.
        name: String,
        /// Its parameter.
        #[serde(default)]
        param: u64,
    },
}

/// A disk image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The raw image (a file or a block device).
    pub path: PathBuf,
    /// Whether the guest may only read it.
    #[serde(default)]
    pub read_only: bool,
    /// Request queues (virtio-block only; 1 to 16, each served on its own thread;
    /// useful with the PCI transport, which gives each its own interrupt). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
}

impl DiskConfig {
    /// A read-write disk on `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: path.into(),
            read_only: false,
            queues: None,
        }
    }
}

/// Where a console's bytes go and come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// A Unix socket to listen on for one client; none: the VMM's stdout and stdin.
    #[serde(default)]
    pub socket: Option<PathBuf>,
}

/// One device of a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DeviceConfig {
    /// virtio-blk on a raw image.
    VirtioBlock(DiskConfig),
    /// virtio-console.
    VirtioConsole(ConsoleConfig),
    /// virtio-rng, fed from the host's getrandom.
    VirtioRng,
    /// virtio-balloon.
    VirtioBalloon,
    /// virtio-net on a TAP interface.
    VirtioNet(NetConfig),
    /// vmcraft's PV channel: event channels, grants, the PV console (on stdout) and
    /// the PV block device on a disk.
    Pv(PvConfig),
    /// A Xen virtual block device (xvda, xvdb, ... in order), served to the guest's
    /// xen-blkfront; needs `xen`.
    XenDisk(DiskConfig),
    /// The VMM's stdin fed to the Xen console (hvc0 under Linux; its output goes to
    /// stdout whether or not this device is given); needs `xen`.
    XenConsole,
    /// An ATA disk on the primary channel's ports (PIO, LBA28), the fully emulated
    /// path.
    Ata(DiskConfig),
    /// virtio-vsock with Firecracker's host side on Unix sockets.
    VirtioVsock(VsockConfig),
    /// virtio-blk served by a vhost-user backend (qemu-storage-daemon's
    /// `vhost-user-blk` export, vmcraft's own backend); its capacity and the rest of
    /// its configuration come from the backend.
    VhostUserBlk(VhostUserConfig),
    /// virtio-fs served by a vhost-user backend (virtiofsd).
    VhostUserFs(VhostUserFsConfig),
    /// virtio-rng served by a vhost-user backend (vhost-device-rng).
    VhostUserRng(VhostUserConfig),
    /// virtio-vsock served by a vhost-user backend (vhost-device-vsock); the guest's
    /// CID comes from the backend.
    VhostUserVsock(VhostUserConfig),
    /// Any virtio device type served by a vhost-user backend, its configuration
    /// space read from the backend.
    VhostUser(VhostUserGenericConfig),
}

/// A vhost-user device of a known type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostUserConfig {
    /// The backend's Unix socket (it listens; the VMM connects when it opens the
    /// machine's resources).
    pub socket: PathBuf,
    /// Request queues (virtio-blk only: 1 to 16). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
    /// Each queue's size (a power of two, 2 to 1024). Default 256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
}

/// A virtio-fs device on a vhost-user backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostUserFsConfig {
    /// The backend's Unix socket.
    pub socket: PathBuf,
    /// The tag the guest mounts (`mount -t virtiofs TAG DIR`): 1 to 36 bytes.
    pub tag: String,
    /// Request queues (1 to 16; the high-priority queue comes with them). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
    /// Each queue's size (a power of two, 2 to 1024). Default 256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
}

/// A vhost-user device of any type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostUserGenericConfig {
    /// The backend's Unix socket.
    pub socket: PathBuf,
    /// The virtio device ID (1 to 63).
    pub device_type: u32,
    /// How many queues (1 to 64).
    pub queues: u16,
    /// Each queue's size (a power of two, 2 to 1024). Default 256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
    /// Bytes of configuration space read from the backend (0: none; at most 256).
    #[serde(default)]
    pub config_size: u32,
}

impl VhostUserGenericConfig {
    /// The most bytes of configuration space read from a backend.
    pub const MAX_CONFIG_SIZE: u32 = 256;
}

/// A virtio-vsock device: host-guest stream sockets, reached from the host as
/// Firecracker's are ("hybrid vsock"): a host client connects to `uds_path` and
/// writes `CONNECT <port>\n`; a guest connecting to host port `P` reaches whoever
/// listens on `<uds_path>_P`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 to 2^32 - 2).
    pub guest_cid: u64,
    /// The device's Unix socket, created by the VMM (it must not exist) and removed
    /// when the machine ends.
    pub uds_path: PathBuf,
}

/// A virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The TAP interface (created if missing: needs CAP_NET_ADMIN, or an interface
    /// owned by this user).
    pub tap: String,
    /// The MAC address, `aa:bb:cc:dd:ee:ff`; by default a locally administered
    /// address from the device's position.
    #[serde(default)]
    pub mac: Option<String>,
    /// Queue pairs (1 to 16): a queue of a multi-queue TAP, a thread and, on PCI, a
    /// vector per queue each, with a control queue for the driver to choose how many
    /// it uses. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
}

/// vmcraft's PV channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PvConfig {
    /// The PV block device's image.
    pub disk: DiskConfig,
    /// The interrupt line of the event-channel upcall.
    #[serde(default = "default_pv_irq")]
    pub upcall_irq: u32,
    /// Where the shared pages are (the guest is built to agree).
    #[serde(default = "default_pv_layout")]
    pub layout: PvLayout,
}

fn default_pv_layout() -> PvLayout {
    PvLayout::STANDARD
}

/// The PV upcall's default interrupt line.
pub const PV_UPCALL_IRQ: u32 = 11;

fn default_pv_irq() -> u32 {
    PV_UPCALL_IRQ
}

impl DeviceConfig {
    /// The device's kind, as the configuration names it.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceConfig::VirtioBlock(_) => "virtio-block",
            DeviceConfig::VirtioConsole(_) => "virtio-console",
            DeviceConfig::VirtioRng => "virtio-rng",
            DeviceConfig::VirtioBalloon => "virtio-balloon",
            DeviceConfig::VirtioNet(_) => "virtio-net",
            DeviceConfig::Pv(_) => "pv",
            DeviceConfig::XenDisk(_) => "xen-disk",
            DeviceConfig::XenConsole => "xen-console",
            DeviceConfig::Ata(_) => "ata",
            DeviceConfig::VirtioVsock(_) => "virtio-vsock",
            DeviceConfig::VhostUserBlk(_) => "vhost-user-blk",
            DeviceConfig::VhostUserFs(_) => "vhost-user-fs",
            DeviceConfig::VhostUserRng(_) => "vhost-user-rng",
            DeviceConfig::VhostUserVsock(_) => "vhost-user-vsock",
            DeviceConfig::VhostUser(_) => "vhost-user",
        }
    }

    /// The backend socket of a vhost-user device.
    pub fn vhost_user_socket(&self) -> Option<&Path> {
        match self {
            DeviceConfig::VhostUserBlk(c)
            | DeviceConfig::VhostUserRng(c)
            | DeviceConfig::VhostUserVsock(c) => Some(&c.socket),
            DeviceConfig::VhostUserFs(c) => Some(&c.socket),
            DeviceConfig::VhostUser(c) => Some(&c.socket),
            _ => None,
        }
    }

    fn vhost_user_socket_mut(&mut self) -> Option<&mut PathBuf> {
        match self {
            DeviceConfig::VhostUserBlk(c)
            | DeviceConfig::VhostUserRng(c)
            | DeviceConfig::VhostUserVsock(c) => Some(&mut c.socket),
            DeviceConfig::VhostUserFs(c) => Some(&mut c.socket),
            DeviceConfig::VhostUser(c) => Some(&mut c.socket),
            _ => None,
        }
    }

    /// The device as a vhost-user frontend asks its backend for it (type, queues,
    /// configuration space), for a vhost-user device.
    pub fn vhost_user_spec(
        &self,
    ) -> Option<Result<vmcraft_devices::virtio::vhost_user::VhostUserSpec, String>> {
        use vmcraft_devices::virtio::vhost_user::{ConfigSpace, VhostUserSpec};
        let sized = |mut spec: VhostUserSpec, size: Option<u16>| {
            if let Some(size) = size {
                spec.queue_sizes.iter_mut().for_each(|s| *s = size);
            }
            spec
        };
        let spec = match self {
            DeviceConfig::VhostUserBlk(c) => Ok(sized(
                VhostUserSpec::block(c.queues.unwrap_or(1)),
                c.queue_size,
            )),
            DeviceConfig::VhostUserRng(c) => Ok(sized(VhostUserSpec::rng(), c.queue_size)),
            DeviceConfig::VhostUserVsock(c) => Ok(sized(VhostUserSpec::vsock(), c.queue_size)),
            DeviceConfig::VhostUserFs(c) => VhostUserSpec::fs(&c.tag, c.queues.unwrap_or(1))
                .map(|spec| sized(spec, c.queue_size))
                .map_err(|e| e.to_string()),
            DeviceConfig::VhostUser(c) => Ok(VhostUserSpec {
                device_type: c.device_type,
                queue_sizes: vec![
                    c.queue_size.unwrap_or(
                        vmcraft_devices::virtio::vhost_user::DEFAULT_QUEUE_SIZE
                    );
                    usize::from(c.queues)
                ],
                config: match c.config_size {
                    0 => ConfigSpace::None,
                    n => ConfigSpace::FromBackend(n),
                },
            }),
            _ => return None,
        };
        Some(spec)
    }

    /// The disk this device serves, if it serves one.
    pub fn disk(&self) -> Option<&DiskConfig> {
        match self {
            DeviceConfig::VirtioBlock(d) | DeviceConfig::XenDisk(d) | DeviceConfig::Ata(d) => {
                Some(d)
            }
            DeviceConfig::Pv(pv) => Some(&pv.disk),
            _ => None,
        }
    }

    pub(crate) fn disk_mut(&mut self) -> Option<&mut DiskConfig> {
        match self {
            DeviceConfig::VirtioBlock(d) | DeviceConfig::XenDisk(d) | DeviceConfig::Ata(d) => {
                Some(d)
            }
            DeviceConfig::Pv(pv) => Some(&mut pv.disk),
            _ => None,
        }
    }
}

/// A configuration refused, or a resource it names that could not be had.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A field's value is refused.
    #[error("{field}: {problem}")]
    Invalid {
        /// The field, as a path (`devices[1].mac`).
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The configuration is not valid JSON of this shape.
    #[error("the configuration is not a machine configuration")]
    Parse(#[source] serde_json::Error),
    /// A configuration file could not be read.
    #[error("cannot read the configuration file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A host resource named by a field could not be opened.
    #[error("{field}: cannot open {what}")]
    Open {
        /// The field that names it.
        field: String,
        /// What it is (a path, an interface).
        what: String,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A restore's configuration differs from the saved machine's where the guest
    /// would notice.
    #[error("{field}: {saved} when saved, {now} now")]
    Differs {
        /// The field.
        field: String,
        /// Its value in the snapshot.
        saved: String,
        /// Its value now.
        now: String,
    },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

impl MachineConfig {
    /// Read a configuration from JSON text and [validate](Self::validate) it.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let config: MachineConfig = serde_json::from_str(text).map_err(ConfigError::Parse)?;
        config.validate()?;
        Ok(config)
    }

    /// Read a configuration file (JSON, at most [`MAX_CONFIG_BYTES`]).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        let read = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let mut text = String::new();
        File::open(path)
            .map_err(read)?
            .take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(read(std::io::Error::other(format!(
                "larger than {MAX_CONFIG_BYTES} bytes"
            ))));
        }
        Self::from_json(&text)
    }

    /// The configuration as JSON.
    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib.saturating_mul(1 << 20)
    }

    /// Check the configuration as a whole: sizes in range, at most one of the
    /// devices a machine has one of, each device's needs met. The error names the
    /// first field refused.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(invalid(
                "memory_mib",
                format!(
                    "{} MiB is outside {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}",
                    self.memory_mib
                ),
            ));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(invalid(
                "vcpus",
                format!("{} is outside 1 to {MAX_VCPUS}", self.vcpus),
            ));
        }
        match &self.boot {
            Some(BootSource::Linux { kernel, initrd, .. }) => {
                if kernel.as_os_str().is_empty() {
                    return Err(invalid("boot.kernel", "no path"));
                }
                if initrd.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                    return Err(invalid("boot.initrd", "no path"));
                }
            }
            Some(BootSource::Embedded { name, .. }) if name.is_empty() => {
                return Err(invalid("boot.name", "no name"));
            }
            _ => {}
        }
        let mut first: std::collections::HashMap<&str, usize> = Default::default();
        for (i, device) in self.devices.iter().enumerate() {
            let field = |name: &str| format!("devices[{i}]{name}");
            let kind = device.kind();
            let one_only = matches!(
                device,
                DeviceConfig::VirtioConsole(_)
                    | DeviceConfig::VirtioBalloon
                    | DeviceConfig::Pv(_)
                    | DeviceConfig::Ata(_)
                    | DeviceConfig::XenConsole
                    | DeviceConfig::VirtioVsock(_)
            );
            if let Some(j) = first.insert(kind, i) {
                if one_only {
                    return Err(invalid(
                        field(""),
                        format!("a second {kind} (devices[{j}] is one): a machine has one"),
                    ));
                }
                first.insert(kind, j);
            }
            if let Some(disk) = device.disk() {
                if disk.path.as_os_str().is_empty() {
                    return Err(invalid(field(".path"), "no path"));
                }
                match (device, disk.queues) {
                    (_, None) => {}
                    (DeviceConfig::VirtioBlock(_), Some(n))
                        if (1..=vmcraft_devices::virtio::block::MAX_QUEUES).contains(&n) => {}
                    (DeviceConfig::VirtioBlock(_), Some(n)) => {
                        return Err(invalid(
                            field(".queues"),
                            format!(
                                "{n} queues (1 to {})",
                                vmcraft_devices::virtio::block::MAX_QUEUES
                            ),
                        ));
                    }
                    (_, Some(_)) => {
                        return Err(invalid(
                            field(".queues"),
                            format!("{kind} devices have one queue"),
                        ));
                    }
                }
            }
            match device {
                DeviceConfig::VirtioNet(NetConfig {
                    queues: Some(n), ..
                }) if !(1..=vmcraft_devices::virtio::net::MAX_QUEUE_PAIRS).contains(n) => {
                    return Err(invalid(
                        field(".queues"),
                        format!(
                            "{n} queue pairs (1 to {})",
                            vmcraft_devices::virtio::net::MAX_QUEUE_PAIRS
                        ),
                    ));
                }
                DeviceConfig::XenDisk(_) | DeviceConfig::XenConsole if !self.xen => {
                    return Err(invalid(field(""), format!("a {kind} needs \"xen\": true")));
                }
                DeviceConfig::Pv(pv) => {
                    if self.xen {
                        return Err(invalid(
                            field(""),
                            "vmcraft's PV channel and Xen's exclude each other",
                        ));
                    }
                    if !(3..24).contains(&pv.upcall_irq) || pv.upcall_irq == 4 {
                        return Err(invalid(
                            field(".upcall_irq"),
                            format!("{} is not a free IOAPIC line", pv.upcall_irq),
                        ));
                    }
                    if let Some((a, b)) = pv.layout.pages_overlap() {
                        return Err(invalid(
                            field(".layout"),
                            format!("the {a} and the {b} overlap"),
                        ));
                    }
                }
                DeviceConfig::VirtioNet(net) => {
                    if net.tap.is_empty() || net.tap.len() >= libc::IFNAMSIZ {
                        return Err(invalid(
                            field(".tap"),
                            format!("{:?} is not an interface name", net.tap),
                        ));
                    }
                    if let Some(mac) = &net.mac {
                        parse_mac(mac).map_err(|p| invalid(field(".mac"), p))?;
                    }
                }
                DeviceConfig::VirtioConsole(ConsoleConfig { socket: Some(path) })
                    if path.as_os_str().is_empty() =>
                {
                    return Err(invalid(field(".socket"), "no path"));
                }
                DeviceConfig::VhostUserBlk(c)
                | DeviceConfig::VhostUserRng(c)
                | DeviceConfig::VhostUserVsock(c) => {
                    let blk = matches!(device, DeviceConfig::VhostUserBlk(_));
                    match c.queues {
                        Some(n) if blk && !(1..=16).contains(&n) => {
                            return Err(invalid(field(".queues"), format!("{n} queues (1 to 16)")))
                        }
                        Some(n) if !blk => {
                            return Err(invalid(
                                field(".queues"),
                                format!("{n} queues: a {kind} has a fixed set"),
                            ))
                        }
                        _ => {}
                    }
                    check_vhost_user(&c.socket, c.queue_size, &field)?;
                }
                DeviceConfig::VhostUserFs(c) => {
                    if let Some(n) = c.queues.filter(|n| !(1..=16).contains(n)) {
                        return Err(invalid(field(".queues"), format!("{n} queues (1 to 16)")));
                    }
                    check_vhost_user(&c.socket, c.queue_size, &field)?;
                    if let Some(Err(problem)) = device.vhost_user_spec() {
                        return Err(invalid(field(".tag"), problem));
                    }
                }
                DeviceConfig::VhostUser(c) => {
                    check_vhost_user(&c.socket, c.queue_size, &field)?;
                    if !(1..64).contains(&c.device_type) {
                        return Err(invalid(
                            field(".device_type"),
                            format!("{} is not a virtio device ID (1 to 63)", c.device_type),
                        ));
                    }
                    let max = vmcraft_devices::virtio::vhost_user::MAX_QUEUES;
                    if !(1..=max).contains(&usize::from(c.queues)) {
                        return Err(invalid(
                            field(".queues"),
                            format!("{} queues (1 to {max})", c.queues),
                        ));
                    }
                    if c.config_size > VhostUserGenericConfig::MAX_CONFIG_SIZE {
                        return Err(invalid(
                            field(".config_size"),
                            format!(
                                "{} bytes (at most {})",
                                c.config_size,
                                VhostUserGenericConfig::MAX_CONFIG_SIZE
                            ),
                        ));
                    }
                }
                DeviceConfig::VirtioVsock(vsock) => {
                    if !vmcraft_devices::virtio::vsock::wire::valid_guest_cid(vsock.guest_cid) {
                        return Err(invalid(
                            field(".guest_cid"),
                            format!(
                                "{} is reserved (a guest's is 3 to 4294967294)",
                                vsock.guest_cid
                            ),
                        ));
                    }
                    if vsock.uds_path.as_os_str().is_empty() {
                        return Err(invalid(field(".uds_path"), "no path"));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether guest RAM is mapped shared from a memory file: asked for, or needed by
    /// a vhost-user device.
    pub fn memory_is_shared(&self) -> bool {
        self.shared_memory || self.devices.iter().any(|d| d.vhost_user_socket().is_some())
    }

    /// Why this machine cannot be saved (snapshots, migration), if it cannot: a
    /// device whose state lives in another process (a vhost-user backend's).
    pub fn unsavable(&self) -> Option<String> {
        self.devices
            .iter()
            .enumerate()
            .find(|(_, d)| d.vhost_user_socket().is_some())
            .map(|(i, d)| {
                format!(
                    "devices[{i}] ({}) is served by a vhost-user backend, whose state is not saved",
                    d.kind()
                )
            })
    }

    /// Check that a machine built from `self` can take the state of one built from
    /// `saved` (a restore or a migration): the same RAM, vCPUs, platform and devices
    /// in the same order, each of the same kind and the same guest-visible settings.
    /// Host-side resources (an image's path, a TAP's name, a socket) may differ.
    pub fn check_same_machine(&self, saved: &MachineConfig) -> Result<(), ConfigError> {
        let differs = |field: &str, saved: &dyn std::fmt::Debug, now: &dyn std::fmt::Debug| {
            ConfigError::Differs {
                field: field.into(),
                saved: format!("{saved:?}"),
                now: format!("{now:?}"),
            }
        };
        if self.memory_mib != saved.memory_mib {
            return Err(differs("memory_mib", &saved.memory_mib, &self.memory_mib));
        }
        if self.vcpus != saved.vcpus {
            return Err(differs("vcpus", &saved.vcpus, &self.vcpus));
        }
        if self.xen != saved.xen {
            return Err(differs("xen", &saved.xen, &self.xen));
        }
        if self.transport != saved.transport {
            return Err(differs("transport", &saved.transport, &self.transport));
        }
        if self.devices.len() != saved.devices.len() {
            return Err(differs(
                "devices",
                &format!("{} devices", saved.devices.len()),
                &format!("{} devices", self.devices.len()),
            ));
        }
        for (i, (now, then)) in self.devices.iter().zip(&saved.devices).enumerate() {
            if now.kind() != then.kind() {
                return Err(differs(
                    &format!("devices[{i}].kind"),
                    &then.kind(),
                    &now.kind(),
                ));
            }
            let (mut a, mut b) = (now.clone(), then.clone());
            // The host's side may change: the image's path, the TAP, the socket.
            for d in [&mut a, &mut b] {
                if let Some(disk) = d.disk_mut() {
                    disk.path = PathBuf::new();
                }
                match d {
                    DeviceConfig::VirtioNet(net) => net.tap.clear(),
                    DeviceConfig::VirtioConsole(c) => c.socket = None,
                    d if d.vhost_user_socket().is_some() => {
                        if let Some(socket) = d.vhost_user_socket_mut() {
                            *socket = PathBuf::new();
                        }
                    }
                    // A clone may get a new context id: the guest reads it again at
                    // the transport reset a restored vsock sends.
                    DeviceConfig::VirtioVsock(v) => {
                        v.uds_path = PathBuf::new();
                        v.guest_cid = 0;
                    }
                    _ => {}
                }
            }
            if a != b {
                return Err(differs(&format!("devices[{i}]"), then, now));
            }
        }
        Ok(())
    }

    /// This configuration with the host-side resources of `host` (paths, TAPs,
    /// sockets) put in place of its own, device by device: `host` must describe the
    /// same machine ([`check_same_machine`](Self::check_same_machine)). How a restore
    /// or a migration destination moves a saved machine onto this host's files.
    pub fn with_host_resources_of(&self, host: &MachineConfig) -> Result<Self, ConfigError> {
        host.check_same_machine(self)?;
        let mut out = self.clone();
        for (d, h) in out.devices.iter_mut().zip(&host.devices) {
            match (d, h) {
                (DeviceConfig::VirtioNet(n), DeviceConfig::VirtioNet(hn)) => n.tap = hn.tap.clone(),
                (DeviceConfig::VirtioConsole(c), DeviceConfig::VirtioConsole(hc)) => {
                    c.socket = hc.socket.clone()
                }
                (DeviceConfig::VirtioVsock(v), DeviceConfig::VirtioVsock(hv)) => {
                    *v = hv.clone();
                }
                (d, h) if h.vhost_user_socket().is_some() => {
                    if let (Some(socket), Some(hs)) =
                        (d.vhost_user_socket_mut(), h.vhost_user_socket())
                    {
                        *socket = hs.to_path_buf();
                    }
                }
                (d, h) => {
                    if let (Some(disk), Some(hd)) = (d.disk_mut(), h.disk()) {
                        disk.path = hd.path.clone();
                    }
                }
            }
        }
        Ok(out)
    }
}

/// A vhost-user device's socket and queue size checked.
fn check_vhost_user(
    socket: &Path,
    queue_size: Option<u16>,
    field: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    if socket.as_os_str().is_empty() {
        return Err(invalid(field(".socket"), "no path"));
    }
    if let Some(size) = queue_size.filter(|s| !(2..=1024).contains(s) || !s.is_power_of_two()) {
        return Err(invalid(
            field(".queue_size"),
            format!("{size} (a power of two, 2 to 1024)"),
        ));
    }
    Ok(())
}

/// A MAC address from `aa:bb:cc:dd:ee:ff`; a multicast address is refused.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2);
        *byte = part
            .and_then(|p| u8::from_str_radix(p, 16).ok())
            .ok_or_else(|| format!("{text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
    }
    if parts.next().is_some() {
        return Err(format!("{text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{text:?} is a multicast address"));
    }
    Ok(mac)
}

/// The host-side resources a configuration names, opened: what the machine is then
/// built from, with no file opened after.
#[derive(Debug, Default)]
pub struct HostResources {
    /// The kernel and the initrd of a Linux boot.
    pub kernel: Option<(File, Option<File>)>,
    /// One entry per device of the configuration, in order.
    pub devices: Vec<DeviceResource>,
}

/// A device's host-side resource.
#[derive(Debug)]
#[non_exhaustive]
pub enum DeviceResource {
    /// The device needs none (or the VMM's stdio).
    None,
    /// A disk image, opened for reading (and writing unless read-only).
    Disk(File),
    /// A console's connected client.
    Socket(std::os::unix::net::UnixStream),
    /// A TAP interface's queues (one per queue pair).
    Tap(Vec<vmcraft_devices::virtio::tap::Tap>),
    /// A vsock device's socket, bound at its path (which the device removes).
    Vsock(vmcraft_devices::virtio::vsock::door::BoundSocket),
    /// A vhost-user backend's socket, connected.
    VhostUser(std::os::unix::net::UnixStream),
}

impl MachineConfig {
    /// Open every host resource the configuration names: the kernel and initrd,
    /// each disk (read-write unless read-only), each TAP; a console socket is
    /// listened on and its one client waited for. Errors name the field.
    pub fn open(&self) -> Result<HostResources, ConfigError> {
        let open_err = |field: String, what: &Path, e: std::io::Error| ConfigError::Open {
            field,
            what: what.display().to_string(),
            source: Box::new(e),
        };
        let kernel = match &self.boot {
            Some(BootSource::Linux { kernel, initrd, .. }) => {
                let k =
                    File::open(kernel).map_err(|e| open_err("boot.kernel".into(), kernel, e))?;
                let i = initrd
                    .as_ref()
                    .map(|p| File::open(p).map_err(|e| open_err("boot.initrd".into(), p, e)))
                    .transpose()?;
                Some((k, i))
            }
            _ => None,
        };
        let mut devices = Vec::with_capacity(self.devices.len());
        for (i, device) in self.devices.iter().enumerate() {
            let field = |name: &str| format!("devices[{i}]{name}");
            let resource = match device {
                DeviceConfig::VirtioNet(net) => DeviceResource::Tap(
                    vmcraft_devices::virtio::tap::Tap::open_queues(
                        &net.tap,
                        net.queues.unwrap_or(1),
                    )
                    .map_err(|e| ConfigError::Open {
                        field: field(".tap"),
                        what: format!("TAP interface {}", net.tap),
                        source: Box::new(e),
                    })?,
                ),
                DeviceConfig::VirtioConsole(ConsoleConfig { socket: Some(path) }) => {
                    let listener = std::os::unix::net::UnixListener::bind(path)
                        .map_err(|e| open_err(field(".socket"), path, e))?;
                    log::info!("waiting for a console client on {}", path.display());
                    let (stream, _) = listener
                        .accept()
                        .map_err(|e| open_err(field(".socket"), path, e))?;
                    DeviceResource::Socket(stream)
                }
                d if d.vhost_user_socket().is_some() => {
                    let path = d.vhost_user_socket().unwrap_or(Path::new(""));
                    DeviceResource::VhostUser(
                        std::os::unix::net::UnixStream::connect(path)
                            .map_err(|e| open_err(field(".socket"), path, e))?,
                    )
                }
                DeviceConfig::VirtioVsock(vsock) => DeviceResource::Vsock(
                    vmcraft_devices::virtio::vsock::door::BoundSocket::bind(&vsock.uds_path)
                        .map_err(|e| open_err(field(".uds_path"), &vsock.uds_path, e))?,
                ),
                d => match d.disk() {
                    Some(disk) => DeviceResource::Disk(
                        std::fs::OpenOptions::new()
                            .read(true)
                            .write(!disk.read_only)
                            .open(&disk.path)
                            .map_err(|e| open_err(field(".path"), &disk.path, e))?,
                    ),
                    None => DeviceResource::None,
                },
            };
            devices.push(resource);
        }
        Ok(HostResources { kernel, devices })
    }
}

#[cfg(test)]
mod tests;
