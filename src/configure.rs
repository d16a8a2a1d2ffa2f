//! A [`MachineConfig`] made into devices on a [`MachineBuilder`]: the one place
//! where each device kind of the configuration is wired (window, interrupt line,
//! hypercalls, threads, snapshot part), whatever the machine's origin: booted fresh,
//! restored from a snapshot, or arriving by migration.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use vmcraft_devices::ata::AtaDisk;
use vmcraft_devices::virtio::balloon::Balloon;
use vmcraft_devices::virtio::block::{Block, Disk};
use vmcraft_devices::virtio::console::Console;
use vmcraft_devices::virtio::net::Net;
use vmcraft_devices::virtio::rng::Rng;
use vmcraft_devices::virtio::vhost_user::VhostUser;
use vmcraft_devices::virtio::vsock::device::Vsock;
use vmcraft_devices::virtio::vsock::door::Door;
use vmcraft_devices::virtio::vsock::muxer::Limits as VsockLimits;
use vmcraft_vcpu::linux::LoadedKernel;
use vmcraft_vcpu::VcpuConfig;

use crate::builder::{BuildError, MachineBuilder};
use crate::config::{
    parse_mac, BootSource, ConfigError, DeviceConfig, DeviceResource, HostResources, MachineConfig,
    VirtioTransport,
};
use crate::pv_machine::{PvDevices, PvUpcall};
use crate::xen_hvm::{XenDisk, XenHvm, XenPlatform, XenServices};

/// Why a configuration could not be made into a machine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigureError {
    /// The configuration itself is refused, or its resources do not fit it.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A device could not be put on the machine.
    #[error("devices[{index}] ({kind})")]
    Device {
        /// Its position in the configuration.
        index: usize,
        /// Its kind.
        kind: &'static str,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The Xen platform could not be set up.
    #[error("the Xen platform")]
    Xen(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The machine could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The configuration has no Linux kernel to boot.
    #[error("the configuration boots no Linux kernel")]
    NoKernel,
}

fn stdout() -> Box<dyn Write + Send> {
    Box::new(std::io::stdout())
}

impl MachineBuilder {
    /// Put on this machine every device `config` lists, on the host resources
    /// `resources` opened for it ([`MachineConfig::open`]): virtio devices in order
    /// (each its window and interrupt line), the PV channel, the Xen platform and its
    /// vbds and console, the ATA disk, each with its threads, hypercalls and snapshot
    /// part. The configuration goes with the machine into its snapshots.
    ///
    /// Consoles and the PV and Xen consoles that the configuration puts on the VMM's
    /// stdio write to its stdout and read its stdin.
    pub fn configure(
        &mut self,
        config: &MachineConfig,
        resources: HostResources,
    ) -> Result<(), ConfigureError> {
        config.validate()?;
        let memory_bytes = ram_bytes(self.memory());
        if memory_bytes != config.memory_bytes() {
            return Err(ConfigError::Differs {
                field: "memory_mib".into(),
                saved: format!("{} MiB of RAM in this machine", memory_bytes >> 20),
                now: format!("{} MiB", config.memory_mib),
            }
            .into());
        }
        if resources.devices.len() != config.devices.len() {
            return Err(ConfigError::Invalid {
                field: "devices".into(),
                problem: format!(
                    "{} devices, {} opened",
                    config.devices.len(),
                    resources.devices.len()
                ),
            }
            .into());
        }
        if config.memory_is_shared() && !self.vm().ram().is_shared() {
            return Err(ConfigError::Invalid {
                field: "shared_memory".into(),
                problem: match config.devices.iter().find(|d| d.vhost_user_socket().is_some()) {
                    Some(d) => format!(
                        "a {} needs guest RAM another process can map, and this machine's is private (build it with MachineBuilder::for_config)",
                        d.kind()
                    ),
                    None => "asked for, and this machine's RAM is private (build it with MachineBuilder::for_config)".into(),
                },
            }
            .into());
        }
        if config.ksm {
            self.vm()
                .ram()
                .set_mergeable(true)
                .map_err(|e| BuildError::Host {
                    what: "KSM for guest RAM",
                    source: std::io::Error::other(e),
                })?;
        }
        // The PV channel first: its interrupt line is named in the configuration,
        // and the virtio devices' lines, allocated in order, must not take it.
        let HostResources {
            kernel: boot_files,
            devices: resources,
        } = resources;
        let mut resources: Vec<Option<DeviceResource>> = resources.into_iter().map(Some).collect();
        for (index, device) in config.devices.iter().enumerate() {
            let DeviceConfig::Pv(pv) = device else {
                continue;
            };
            let Some(DeviceResource::Disk(disk)) = resources[index].take() else {
                return Err(ConfigError::Invalid {
                    field: format!("devices[{index}]"),
                    problem: "the resource opened for it is not a pv's".into(),
                }
                .into());
            };
            let devices = PvDevices {
                layout: pv.layout,
                disk,
                read_only: pv.disk.read_only,
                console: stdout(),
            };
            self.add_pv(devices, PvUpcall::Irq(pv.upcall_irq))?;
        }
        let mut xen_disks = Vec::new();
        let mut xen_console = false;
        let (mut blocks, mut nets) = (0, 0);
        for (index, (device, resource)) in config.devices.iter().zip(resources).enumerate() {
            let Some(resource) = resource else {
                continue;
            };
            let kind = device.kind();
            let failed =
                |source: Box<dyn std::error::Error + Send + Sync>| ConfigureError::Device {
                    index,
                    kind,
                    source,
                };
            let mismatch = || {
                ConfigureError::Config(ConfigError::Invalid {
                    field: format!("devices[{index}]"),
                    problem: format!("the resource opened for it is not a {kind}'s"),
                })
            };
            match (device, resource) {
                (DeviceConfig::VirtioBlock(config_disk), DeviceResource::Disk(file)) => {
                    let n = blocks;
                    blocks += 1;
                    let disk = Disk::new(file, config_disk.read_only, &format!("vmcraft{n}"))
                        .map_err(|e| failed(Box::new(e)))?;
                    let block = Block::new(disk, &format!("vblk{n}"))
                        .with_queues(config_disk.queues.unwrap_or(1));
                    self.configured_mut()
                        .disks
                        .push(crate::builder::ConfiguredDisk {
                            device: index,
                            slot: block.disk_slot(),
                            path: config_disk.path.clone().into(),
                        });
                    self.add_virtio_on(config.transport, Box::new(block))?;
                }
                (DeviceConfig::VirtioConsole(_), resource) => {
                    let console = match resource {
                        DeviceResource::Socket(stream) => {
                            let output = stream.try_clone().map_err(|e| failed(Box::new(e)))?;
                            Console::new(Box::new(output), Some(Box::new(stream)), "vcon")
                        }
                        DeviceResource::None => {
                            Console::new(stdout(), Some(Box::new(std::io::stdin())), "vcon")
                        }
                        _ => return Err(mismatch()),
                    };
                    self.add_virtio_on(config.transport, Box::new(console))?;
                }
                (DeviceConfig::VirtioRng, DeviceResource::None) => {
                    self.add_virtio_on(config.transport, Box::new(Rng::new("vrng")))?;
                }
                (DeviceConfig::VirtioBalloon, DeviceResource::None) => {
                    let (balloon, control) =
                        Balloon::new("vballoon").map_err(|e| failed(Box::new(e)))?;
                    self.add_virtio_on(config.transport, Box::new(balloon))?;
                    self.configured_mut().balloon = Some(control);
                }
                (DeviceConfig::VirtioNet(net), DeviceResource::Tap(taps)) => {
                    let mac = match &net.mac {
                        Some(text) => parse_mac(text).map_err(|e| failed(e.into()))?,
                        // A locally administered address, one per device.
                        None => [0x02, 0x76, 0x6d, 0x63, 0, 1 + nets],
                    };
                    nets = nets.wrapping_add(1);
                    let queues = taps
                        .into_iter()
                        .map(|t| Box::new(t) as Box<dyn vmcraft_devices::virtio::net::FrameIo>)
                        .collect();
                    let nic = Net::with_queue_pairs(queues, mac, "vnet")
                        .map_err(|e| failed(Box::new(e)))?;
                    self.add_virtio_on(config.transport, Box::new(nic))?;
                }
                (DeviceConfig::VirtioVsock(vsock), DeviceResource::Vsock(socket)) => {
                    let door = Door::open(socket).map_err(|e| failed(Box::new(e)))?;
                    let device = Vsock::new(
                        vsock.guest_cid,
                        Arc::new(door),
                        VsockLimits::default(),
                        "vsock",
                    )
                    .map_err(|e| failed(Box::new(e)))?;
                    self.add_virtio_on(config.transport, Box::new(device))?;
                }
                (d, DeviceResource::VhostUser(stream)) => {
                    let Some(spec) = d.vhost_user_spec() else {
                        return Err(mismatch());
                    };
                    let spec = spec.map_err(|e| failed(e.into()))?;
                    // vu-blk0, vu-fs1, ...: its threads' names are cut at 15 bytes.
                    let short = kind
                        .trim_start_matches("vhost-user")
                        .trim_start_matches('-');
                    let name = format!("vu-{short}{index}");
                    // Connected again at the same path if the backend restarts.
                    let path = d.vhost_user_socket().map(Path::to_path_buf);
                    let device = VhostUser::new(stream, path, spec, &name)
                        .map_err(|e| failed(Box::new(e)))?;
                    self.add_virtio_on(config.transport, Box::new(device))?;
                }
                (DeviceConfig::XenDisk(disk), DeviceResource::Disk(file)) => {
                    xen_disks.push(XenDisk {
                        file,
                        read_only: disk.read_only,
                    });
                }
                (DeviceConfig::XenConsole, DeviceResource::None) => xen_console = true,
                (DeviceConfig::Ata(_), DeviceResource::Disk(file)) => {
                    let ata = Arc::new(
                        AtaDisk::new(file, device.disk().is_some_and(|d| d.read_only))
                            .map_err(|e| failed(Box::new(e)))?,
                    );
                    let buses = self.buses_mut();
                    buses
                        .register_pio(AtaDisk::COMMAND_BASE, 8, ata.clone())
                        .and_then(|()| buses.register_pio(AtaDisk::CONTROL_BASE, 1, ata.clone()))
                        .map_err(|e| failed(Box::new(e)))?;
                    self.add_snapshot_part("ata", ata);
                }
                _ => return Err(mismatch()),
            }
        }
        if config.xen {
            let xen = XenHvm::install(self, config.vcpus)
                .map_err(|e| ConfigureError::Xen(Box::new(e)))?;
            let input = if xen_console {
                use std::os::fd::AsFd;
                let stdin = std::io::stdin()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| ConfigureError::Xen(Box::new(e)))?;
                Some(std::fs::File::from(stdin))
            } else {
                None
            };
            let memory = self.memory().clone();
            let services = XenServices::start(&xen, memory, xen_disks, stdout(), input)
                .map_err(|e| ConfigureError::Xen(Box::new(e)))?;
            let platform = Arc::new(XenPlatform { hvm: xen, services });
            // Saved and restored with the machine (snapshots, migrations).
            self.add_snapshot_part("xen", platform.clone());
            self.configured_mut().xen = Some(platform);
        } else {
            // vmcraft's hypercall port, served whether or not the PV channel is.
            self.hypercall_table();
        }
        let configured = self.configured_mut();
        configured.boot_files = boot_files;
        configured.config = Some(config.clone());
        Ok(())
    }

    /// Attach a virtio device on `transport`.
    fn add_virtio_on(
        &mut self,
        transport: VirtioTransport,
        device: Box<dyn vmcraft_devices::virtio::VirtioDevice>,
    ) -> Result<(), BuildError> {
        let kind = match device.device_type() {
            1 => "net",
            2 => "block",
            3 => "console",
            4 => "rng",
            5 => "balloon",
            19 => "vsock",
            26 => "fs",
            _ => "virtio",
        };
        let interrupt = match transport {
            VirtioTransport::Mmio => self.add_virtio(device)?.lock().interrupt().clone(),
            VirtioTransport::Pci => self
                .add_virtio_pci(device)?
                .transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .interrupt()
                .clone(),
        };
        let counters = &mut self.configured_mut().virtio_counters;
        let number = counters.iter().filter(|(n, _)| n.starts_with(kind)).count();
        counters.push((format!("{kind}{number}"), interrupt));
        Ok(())
    }

    /// Load the configuration's Linux kernel ([`BootSource::Linux`], opened by
    /// [`MachineConfig::open`]) with its initrd and command line (plus what Xen
    /// needs on it), and return where it was put and the vCPUs to start: the boot
    /// vCPU at the kernel's entry, the others waiting for their start-up IPI.
    pub fn load_configured_linux(
        &mut self,
    ) -> Result<(LoadedKernel, Vec<VcpuConfig>), ConfigureError> {
        let config = self
            .configured()
            .config
            .clone()
            .ok_or(ConfigureError::NoKernel)?;
        let Some(BootSource::Linux { cmdline, .. }) = &config.boot else {
            return Err(ConfigureError::NoKernel);
        };
        let (mut kernel, mut initrd) = self
            .configured_mut()
            .boot_files
            .take()
            .ok_or(ConfigureError::NoKernel)?;
        let cmdline = match &self.configured().xen {
            Some(xen) => format!("{cmdline}{}", xen.hvm.linux_cmdline()),
            None => cmdline.clone(),
        };
        let loaded = self.load_linux(&mut kernel, initrd.as_mut(), &cmdline, config.vcpus)?;
        let vcpus = std::iter::once(VcpuConfig::at(loaded.entry))
            .chain((1..config.vcpus).map(|_| VcpuConfig::waiting_for_sipi()))
            .collect();
        Ok((loaded, vcpus))
    }
}

/// Bytes of guest RAM.
pub(crate) fn ram_bytes(memory: &vmcraft_memory::GuestMemory) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    memory.iter().map(|r| r.len()).sum()
}
