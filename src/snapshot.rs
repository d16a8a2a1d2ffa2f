//! Snapshots of a running machine, and machines restored from them.
//!
//! A snapshot is a directory of two files:
//! - `state`: a [`vmcraft_snapshot`] file of typed, versioned sections: `machine`
//!   (RAM size, vCPU count, the devices' kinds), `config` (the [`MachineConfig`] it
//!   was built from, if it was), `vm` (the in-kernel PICs, IOAPIC, PIT and clock),
//!   `vcpu0`, `vcpu1`, ... (registers, XSAVE, LAPIC, MSRs, events, CPUID), and one
//!   section per [`SnapshotPart`]: `serial`, `i8042`, `rtc`, `virtio0`, `virtio1`, ...
//!   (each transport's registers and its device's state; its queues resume from the
//!   used index in guest memory, every chain the device took having been completed
//!   before the save), and `part-<name>` for the parts added by name (`part-pv`,
//!   `part-xen`, `part-ata`, an embedder's);
//! - `memory`: guest RAM, sparse (zero pages are holes), which a restore maps
//!   copy-on-write, so restoring reads nothing up front and takes the same time
//!   whatever the RAM size.
//!
//! Every device kind is saved the one way: [`SnapshotPart`] (pause at a safe point
//! and write its typed state, resume, restore from it).
//!
//! Taking one: [`Machine::snapshot`] pauses the vCPUs with
//! [`RunningVm::pause_for_snapshot`](vmcraft_vcpu::RunningVm::pause_for_snapshot)
//! (each completes its pending port or MMIO read first), pauses every part once it
//! has answered what it took, saves everything and leaves the machine paused:
//! [`Machine::resume`] it, or end it.
//!
//! Restoring: [`SavedMachine::read`] the state file, [`MachineBuilder::from_saved`]
//! on its memory file, [`MachineBuilder::configure`] with the configuration the
//! snapshot carries ([`SavedMachine::config`]; host resources may be moved with
//! [`MachineConfig::with_host_resources_of`]), then
//! [`MachineBuilder::start_restored`]: the guest goes on from the instruction it was
//! paused at. A snapshot of another format or component version, a truncated or
//! corrupted file, or a machine built differently from the one saved gives an error
//! that names the part, never a panic.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmcraft_memory::layout::MemoryLayout;
use vmcraft_memory::snapshot::{save_memory, SaveError, SavedMemory};
use vmcraft_memory::{GuestRam, MemoryError};
use vmcraft_snapshot::{Snapshot, SnapshotBuilder, SnapshotError, Versioned};
use vmcraft_vcpu::state::{StateError, VcpuState, VmState};
use vmcraft_vcpu::{RunningVm, VmError};

use crate::builder::{BuildError, MachineBuilder};
use crate::config::MachineConfig;
use crate::machine::Machine;
use crate::pv_machine::PvBackends;

/// The state file's name inside a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Errors from taking or restoring a snapshot.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MachineSnapshotError {
    /// The vCPUs could not be paused and saved.
    #[error("cannot pause the vCPUs and save their state")]
    Pause(#[source] VmError),
    /// KVM's VM-wide state could not be saved or restored.
    #[error("the VM's in-kernel devices")]
    Vm(#[source] StateError),
    /// A device's state could not be restored.
    #[error("device state")]
    Device(#[source] vmcraft_devices::state::StateError),
    /// The PV channel's state could not be restored.
    #[error("the PV channel's state")]
    Pv(#[source] crate::pv_machine::PvError),
    /// The Xen platform's state could not be restored.
    #[error("the Xen platform's state")]
    Xen(#[source] crate::xen_hvm::XenStateError),
    /// The state file could not be written, read or decoded.
    #[error("the snapshot's state file")]
    File(#[source] SnapshotError),
    /// Guest memory could not be saved.
    #[error("cannot save guest memory")]
    SaveMemory(#[source] SaveError),
    /// The memory file could not be created or opened.
    #[error("cannot open the memory file {path}")]
    MemoryFile {
        /// The file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot file (or a key file) could not be opened or examined.
    #[error("cannot open the {what} {path}")]
    Open {
        /// What it is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The snapshot directory could not be created.
    #[error("cannot create the snapshot directory {path}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The saved RAM size is not one the layout accepts.
    #[error("the snapshot's RAM of {0} bytes")]
    Layout(u64, #[source] vmcraft_memory::layout::LayoutError),
    /// Guest memory could not be mapped from the memory file.
    #[error("cannot map guest memory from the snapshot")]
    MapMemory(#[source] MemoryError),
    /// The machine has a part whose state cannot be saved.
    #[error("this machine cannot be saved: {0}")]
    Unsavable(String),
    /// The machine could not be built around the restored memory.
    #[error("cannot build the restored machine")]
    Build(#[source] BuildError),
    /// The machine being restored was not built like the one saved.
    #[error("the machine differs from the one saved: {0}")]
    Mismatch(String),
    /// A snapshot file that is not a regular file (a FIFO, a device, a directory).
    #[error("the {what} is not a regular file")]
    NotARegularFile {
        /// Which file.
        what: &'static str,
    },
    /// A snapshot about to be written over the file that backs the running guest's
    /// memory (the machine was restored from it).
    #[error("cannot write the {what} over the memory file the running guest was restored from (it backs the guest's memory): write it elsewhere")]
    OntoBackingFile {
        /// Which file.
        what: &'static str,
    },
    /// The guest memory does not match the digest in the signed state file.
    #[error("the snapshot's memory file does not match the signed state file: it was changed or belongs to another snapshot")]
    MemoryDigest,
    /// The restored vCPUs could not be started.
    #[error("cannot start the restored vCPUs")]
    Start(#[source] VmError),
    /// The configuration in the snapshot is refused, or differs from the machine
    /// built to restore it.
    #[error("the machine's configuration")]
    Config(#[source] crate::config::ConfigError),
}

/// One part of a machine as its snapshots and migrations carry it: every kind of
/// device implements it once (the legacy devices, each virtio transport, the PV
/// channel, the Xen platform, an ATA disk, and an embedder's own, registered with
/// [`MachineBuilder::add_snapshot_part`]), and the machine saves and restores them
/// all the same way, each as one typed, versioned section of the state file.
///
/// ```
/// use vmcraft::snapshot::{MachineSnapshotError, PartReader, PartWriter, SnapshotPart};
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Counter(u64);
/// impl vmcraft_snapshot::Versioned for Counter {
///     const VERSION: u32 = 1;
/// }
///
/// struct MyDevice(std::sync::atomic::AtomicU64);
/// impl SnapshotPart for MyDevice {
///     fn pause(&self, out: &mut PartWriter<'_>) -> Result<(), MachineSnapshotError> {
///         out.put(&Counter(self.0.load(std::sync::atomic::Ordering::SeqCst)))
///     }
///     fn resume(&self) {}
///     fn restore(&self, saved: &PartReader<'_>) -> Result<(), MachineSnapshotError> {
///         let Counter(n) = saved.load()?;
///         self.0.store(n, std::sync::atomic::Ordering::SeqCst);
///         Ok(())
///     }
/// }
/// ```
pub trait SnapshotPart: Send + Sync {
    /// Stop serving at a safe point (the vCPUs are paused) once everything taken
    /// from the guest is answered, and write the state into `out`.
    fn pause(&self, out: &mut PartWriter<'_>) -> Result<(), MachineSnapshotError>;
    /// Serve again after [`SnapshotPart::pause`].
    fn resume(&self);
    /// Put back the state [`SnapshotPart::pause`] wrote on the saved machine; the
    /// restored guest memory and interrupt controllers are in place, the vCPUs not
    /// yet running. The state came from outside: check it.
    fn restore(&self, saved: &PartReader<'_>) -> Result<(), MachineSnapshotError>;
    /// The restored machine's vCPUs have their state back (their local APICs among
    /// it): raise again an interrupt raised since [`SnapshotPart::restore`], which
    /// that state went over. The default does nothing.
    fn after_vcpus_restored(&self) {}
}

/// Where a [`SnapshotPart`] writes its state: its own section of the state file.
pub struct PartWriter<'a> {
    sections: &'a mut SnapshotBuilder,
    name: &'a str,
}

impl PartWriter<'_> {
    /// Save `value` as this part's state (the last one put counts).
    pub fn put<T: Versioned>(&mut self, value: &T) -> Result<(), MachineSnapshotError> {
        self.sections
            .put(self.name, value)
            .map(drop)
            .map_err(MachineSnapshotError::File)
    }
}

/// Where a [`SnapshotPart`] reads its saved state.
pub struct PartReader<'a> {
    snapshot: &'a Snapshot,
    name: &'a str,
}

impl PartReader<'_> {
    /// This part's saved state (an error names the section: missing, another
    /// version, not decodable).
    pub fn load<T: Versioned>(&self) -> Result<T, MachineSnapshotError> {
        self.snapshot
            .load(self.name)
            .map_err(MachineSnapshotError::File)
    }
}

/// The PV channel (section `part-pv`): its threads parked, its event-channel table
/// saved.
impl SnapshotPart for crate::pv_machine::PvBackends {
    fn pause(&self, out: &mut PartWriter<'_>) -> Result<(), MachineSnapshotError> {
        out.put(&PvBackends::pause(self))
    }
    fn resume(&self) {
        PvBackends::resume(self)
    }
    fn restore(&self, saved: &PartReader<'_>) -> Result<(), MachineSnapshotError> {
        PvBackends::restore(self, &saved.load()?).map_err(MachineSnapshotError::Pv)
    }
}

/// A Xen platform (section `part-xen`): its service threads parked between
/// requests, its event channels, placements, parameters and the store's state saved.
impl SnapshotPart for crate::xen_hvm::XenPlatform {
    fn pause(&self, out: &mut PartWriter<'_>) -> Result<(), MachineSnapshotError> {
        out.put(&crate::xen_hvm::XenPlatform::pause(self))
    }
    fn resume(&self) {
        crate::xen_hvm::XenPlatform::resume(self)
    }
    fn restore(&self, saved: &PartReader<'_>) -> Result<(), MachineSnapshotError> {
        crate::xen_hvm::XenPlatform::restore(self, &saved.load()?)
            .map_err(MachineSnapshotError::Xen)
    }
}

/// A device whose state is one value it saves and checks on restore
/// (`save_state`/`restore_state`), served on the vCPU threads, so that with them
/// paused it has nothing left to finish.
macro_rules! device_state_part {
    ($($(#[$doc:meta])* $device:ty;)*) => {$(
        $(#[$doc])*
        impl SnapshotPart for $device {
            fn pause(&self, out: &mut PartWriter<'_>) -> Result<(), MachineSnapshotError> {
                out.put(&self.save_state())
            }
            fn resume(&self) {}
            fn restore(&self, saved: &PartReader<'_>) -> Result<(), MachineSnapshotError> {
                self.restore_state(&saved.load()?)
                    .map_err(MachineSnapshotError::Device)
            }
        }
    )*};
}

device_state_part! {
    /// An emulated ATA disk on the port bus (section `part-ata`): its task file and
    /// a PIO transfer in progress.
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use vmcraft::devices::ata::AtaDisk;
    /// # fn f(b: &mut vmcraft::builder::MachineBuilder, image: std::fs::File) -> Result<(), Box<dyn std::error::Error>> {
    /// let ata = Arc::new(AtaDisk::new(image, false)?);
    /// b.buses_mut().register_pio(AtaDisk::COMMAND_BASE, 8, ata.clone())?;
    /// b.buses_mut().register_pio(AtaDisk::CONTROL_BASE, 1, ata.clone())?;
    /// b.add_snapshot_part("ata", ata);
    /// # Ok(()) }
    /// ```
    vmcraft_devices::ata::AtaDisk;
    /// COM1 (section `serial`): its registers and the input it holds.
    vmcraft_devices::serial::SerialDevice;
    /// The i8042 (section `i8042`).
    vmcraft_devices::i8042::I8042;
    /// The CMOS RTC (section `rtc`).
    vmcraft_devices::rtc::Rtc;
}

/// A virtio-mmio transport and its device (sections `virtio0`, `virtio1`, ...): the
/// device's I/O stopped once each chain it took is completed (its queues resume
/// from the used index in guest memory), the transport's registers and the
/// device's own state saved.
impl SnapshotPart for std::sync::Mutex<vmcraft_devices::virtio::mmio::MmioTransport> {
    fn pause(&self, out: &mut PartWriter<'_>) -> Result<(), MachineSnapshotError> {
        let state = self
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pause_for_snapshot();
        out.put(&state)
    }
    fn resume(&self) {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .resume_after_snapshot();
    }
    fn restore(&self, saved: &PartReader<'_>) -> Result<(), MachineSnapshotError> {
        let state = saved.load()?;
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore_state(&state)
            .map_err(MachineSnapshotError::Device)
    }
    fn after_vcpus_restored(&self) {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .interrupt()
            .raise_again();
    }
}

fn part_section(name: &str) -> String {
    format!("part-{name}")
}

/// Every part of a machine with the section it is saved as, in the order they are
/// paused and restored: the legacy devices, the virtio transports, then the parts
/// added by name.
pub(crate) fn machine_parts(
    legacy: &crate::machine::LegacyDevices,
    virtio: &[crate::builder::VirtioSlot],
    added: &[(String, Arc<dyn SnapshotPart>)],
) -> Vec<(String, Arc<dyn SnapshotPart>)> {
    let mut parts: Vec<(String, Arc<dyn SnapshotPart>)> = vec![
        ("serial".into(), legacy.serial.clone()),
        ("i8042".into(), legacy.i8042.clone()),
        ("rtc".into(), legacy.rtc.clone()),
    ];
    for (i, slot) in virtio.iter().enumerate() {
        parts.push((virtio_section(i), slot.transport.clone()));
    }
    for (name, part) in added {
        parts.push((part_section(name), part.clone()));
    }
    parts
}

/// The section that holds the machine's configuration, when it was built from one.
pub const CONFIG_SECTION: &str = "config";

/// The configuration as JSON: the one format a configuration has, in files, on the
/// wire and in snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ConfigSection(String);

impl Versioned for ConfigSection {
    const VERSION: u32 = 1;
}

/// What a snapshot says about the machine as a whole: what a restore must rebuild.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineInfo {
    /// Bytes of guest RAM.
    pub ram_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The virtio device type of each virtio-mmio window, in order.
    pub virtio_types: Vec<u32>,
    /// Whether the machine served hypercalls.
    pub hypercalls: bool,
    /// The names of the parts registered with
    /// [`MachineBuilder::add_snapshot_part`], in order.
    pub parts: Vec<String>,
}

impl Versioned for MachineInfo {
    const VERSION: u32 = 1;
}

/// What [`Machine::snapshot`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotReport {
    /// Guest memory: pages, and pages written (not zero).
    pub memory: SavedMemory,
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// How long the vCPUs took to pause and save their state.
    pub pause: Duration,
    /// The whole snapshot, pause included.
    pub total: Duration,
}

/// The section of a signed snapshot that holds the digest of its memory.
const MEMORY_DIGEST: &str = "memory-sha256";

/// SHA-256 over every page of guest memory that is not zero, each preceded by its
/// guest-physical address: what the memory file holds, whatever its holes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MemoryDigest([u8; 32]);

impl Versioned for MemoryDigest {
    const VERSION: u32 = 1;
}

fn memory_digest(memory: &vmcraft_memory::GuestMemory) -> MemoryDigest {
    use sha2::Digest;
    use vm_memory::{Bytes, GuestAddress};
    let mut hash = sha2::Sha256::new();
    let page = vmcraft_memory::PAGE_SIZE as usize;
    let mut chunk = vec![0u8; 256 * page];
    for region in memory.iter() {
        let base = region.start_addr().0;
        let mut at = 0;
        while at < region.len() {
            let n = ((region.len() - at) as usize).min(chunk.len());
            // The range lies inside the region: a read cannot fail.
            if memory
                .read_slice(&mut chunk[..n], GuestAddress(base + at))
                .is_err()
            {
                chunk[..n].fill(0xff);
            }
            for (i, p) in chunk[..n].chunks_exact(page).enumerate() {
                if !vmcraft_memory::snapshot::is_zero_page(p) {
                    hash.update((base + at + (i * page) as u64).to_le_bytes());
                    hash.update(p);
                }
            }
            at += n as u64;
        }
    }
    MemoryDigest(hash.finalize().into())
}

/// Write `sections` over the whole of `file`, signed with `key` if one is given, and
/// sync it. Returns the bytes written.
fn write_state(
    sections: &SnapshotBuilder,
    file: &mut File,
    key: Option<&[u8]>,
) -> Result<u64, MachineSnapshotError> {
    match key {
        None => sections.write_into(file),
        Some(key) => sections
            .to_signed_bytes(key)
            .and_then(|bytes| vmcraft_snapshot::write_bytes_into(&bytes, file)),
    }
    .map_err(MachineSnapshotError::File)
}

/// A file's (device, inode), refused unless it is a regular file. `fstat` on the
/// descriptor, which every thread's filter allows.
fn file_id(file: &File, what: &'static str) -> Result<(u64, u64), MachineSnapshotError> {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // The fstat system call itself (glibc's fstat may use newfstatat, which the
    // main thread's filter does not allow).
    // SAFETY: fstat writes a whole `stat` into the buffer it is given, which is
    // large enough and only read after fstat reports success.
    let rc = unsafe { libc::syscall(libc::SYS_fstat, file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(MachineSnapshotError::Open {
            what,
            path: PathBuf::from("(descriptor)"),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fstat succeeded, so it filled the struct.
    let st = unsafe { st.assume_init() };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(MachineSnapshotError::NotARegularFile { what });
    }
    Ok((st.st_dev, st.st_ino))
}

/// Open a snapshot file for reading without blocking on it (a FIFO put in its place
/// would hang a plain open) and refuse anything that is not a regular file.
pub fn open_snapshot_file(path: &Path, what: &'static str) -> Result<File, MachineSnapshotError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| MachineSnapshotError::Open {
            what,
            path: path.to_owned(),
            source,
        })?;
    file_id(&file, what)?;
    Ok(file)
}

fn vcpu_section(index: u32) -> String {
    format!("vcpu{index}")
}

fn virtio_section(index: usize) -> String {
    format!("virtio{index}")
}

impl Machine {
    fn info(&self) -> MachineInfo {
        let vm = self.running.vm();
        MachineInfo {
            ram_bytes: vm.memory().iter().map(|r| r.len()).sum(),
            vcpus: self.running.vcpu_count(),
            virtio_types: crate::builder::virtio_types(&self.virtio),
            hypercalls: self.hypercalls.is_some(),
            parts: self.parts.iter().map(|(n, _)| n.clone()).collect(),
        }
    }

    /// Pause the machine and save it into directory `dir` (created if missing; its
    /// `memory` and `state` files each written into a temporary file, then renamed
    /// over the old one, so a running guest restored from `dir` keeps its memory). The
    /// machine stays paused: [`Machine::resume`] it to go on, or drop it.
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotReport, MachineSnapshotError> {
        self.snapshot_signed(dir, None)
    }

    /// [`Machine::snapshot`], signed with `key` when one is given (see
    /// [`vmcraft_snapshot`]; the signed state file also holds a digest of the memory,
    /// so neither file can be changed or swapped unnoticed).
    pub fn snapshot_signed(
        &self,
        dir: &Path,
        key: Option<&[u8]>,
    ) -> Result<SnapshotReport, MachineSnapshotError> {
        self.check_savable()?;
        let start = Instant::now();
        std::fs::create_dir_all(dir).map_err(|source| MachineSnapshotError::Directory {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(MEMORY_FILE);
        let partial = dir.join(format!("{MEMORY_FILE}.partial"));
        let memory = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(|source| MachineSnapshotError::MemoryFile {
                path: partial.clone(),
                source,
            })?;
        let (state, mut report) = self.save(&memory, key)?;
        memory
            .sync_all()
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|source| MachineSnapshotError::MemoryFile { path, source })?;
        let bytes = match key {
            None => Ok(state.to_bytes()),
            Some(key) => state.to_signed_bytes(key),
        };
        report.state_bytes = bytes
            .and_then(|bytes| vmcraft_snapshot::write_bytes_file(&bytes, &dir.join(STATE_FILE)))
            .map_err(MachineSnapshotError::File)?;
        report.total = start.elapsed();
        Ok(report)
    }

    /// [`Machine::snapshot`] into files already open for writing (a VMM whose
    /// threads may no longer open files opens them beforehand). Both are overwritten;
    /// either being the file the running guest was restored from is refused.
    pub fn snapshot_into(
        &self,
        state: &mut File,
        memory: &File,
    ) -> Result<SnapshotReport, MachineSnapshotError> {
        self.snapshot_into_signed(state, memory, None)
    }

    /// [`Machine::snapshot_into`], signed with `key` when one is given.
    pub fn snapshot_into_signed(
        &self,
        state: &mut File,
        memory: &File,
        key: Option<&[u8]>,
    ) -> Result<SnapshotReport, MachineSnapshotError> {
        let start = Instant::now();
        let backing = self.backing_files();
        for (file, what) in [
            (&*state, "snapshot state file"),
            (memory, "snapshot memory file"),
        ] {
            let id = file_id(file, what)?;
            if backing.contains(&id) {
                return Err(MachineSnapshotError::OntoBackingFile { what });
            }
        }
        let (sections, mut report) = self.save(memory, key)?;
        report.state_bytes = write_state(&sections, state, key)?;
        report.total = start.elapsed();
        Ok(report)
    }

    /// The files guest memory is mapped from (a restored machine's memory file), as
    /// (device, inode).
    fn backing_files(&self) -> Vec<(u64, u64)> {
        self.running
            .vm()
            .memory()
            .iter()
            .filter_map(|r| r.file_offset())
            .filter_map(|f| file_id(f.file(), "memory").ok())
            .collect()
    }

    /// Pause, stop the devices, and save everything: the sections, and memory into
    /// `memory`.
    fn save(
        &self,
        memory: &File,
        key: Option<&[u8]>,
    ) -> Result<(SnapshotBuilder, SnapshotReport), MachineSnapshotError> {
        let start = Instant::now();
        let (mut b, pause) = self.pause_and_save_state()?;
        if key.is_some() {
            b.put(MEMORY_DIGEST, &memory_digest(self.running.vm().memory()))
                .map_err(MachineSnapshotError::File)?;
        }
        let memory = save_memory(self.running.vm().memory(), memory)
            .map_err(MachineSnapshotError::SaveMemory)?;
        Ok((
            b,
            SnapshotReport {
                memory,
                state_bytes: 0,
                pause,
                total: start.elapsed(),
            },
        ))
    }

    /// Pause the vCPUs, stop the devices, and save every section but memory. Returns
    /// the sections and how long the pause took. The machine stays paused, also on an
    /// error: [`Machine::resume`] it.
    pub(crate) fn pause_and_save_state(
        &self,
    ) -> Result<(SnapshotBuilder, Duration), MachineSnapshotError> {
        self.check_savable()?;
        let start = Instant::now();
        let vcpus = self
            .running
            .pause_for_snapshot()
            .map_err(MachineSnapshotError::Pause)?;
        // The devices stop after the vCPUs: nothing new reaches their queues while
        // they finish what they took. Each saves its own section.
        let mut b = SnapshotBuilder::new();
        self.devices_paused
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for (name, part) in machine_parts(&self.legacy, &self.virtio, &self.parts) {
            part.pause(&mut PartWriter {
                sections: &mut b,
                name: &name,
            })?;
        }
        let pause = start.elapsed();
        let file = MachineSnapshotError::File;
        b.put("machine", &self.info()).map_err(file)?;
        if let Some(config) = self.config() {
            b.put(CONFIG_SECTION, &ConfigSection(config.to_json()))
                .map_err(file)?;
        }
        let vm = VmState::save(self.running.vm().fd()).map_err(MachineSnapshotError::Vm)?;
        b.put("vm", &vm).map_err(file)?;
        for (i, state) in vcpus.iter().enumerate() {
            b.put(&vcpu_section(i as u32), state).map_err(file)?;
        }
        Ok((b, pause))
    }

    /// Refuse to save a machine that has a part whose state is not saved (a device
    /// served by a vhost-user backend), before anything is paused.
    pub fn check_savable(&self) -> Result<(), MachineSnapshotError> {
        match self.config().and_then(|c| c.unsavable()) {
            Some(why) => Err(MachineSnapshotError::Unsavable(why)),
            None => Ok(()),
        }
    }

    /// What a restore must rebuild: RAM, vCPUs, devices.
    pub(crate) fn machine_info(&self) -> MachineInfo {
        self.info()
    }
}

/// A snapshot being restored: its state file, read and verified.
#[derive(Debug)]
pub struct SavedMachine {
    snapshot: Snapshot,
    info: MachineInfo,
    /// Whether its signature was checked (then so is its memory's digest).
    verified: bool,
}

impl SavedMachine {
    /// A saved machine from a verified state file.
    pub(crate) fn from_snapshot(snapshot: Snapshot) -> Result<Self, MachineSnapshotError> {
        let info = snapshot
            .load("machine")
            .map_err(MachineSnapshotError::File)?;
        Ok(SavedMachine {
            snapshot,
            info,
            verified: false,
        })
    }

    /// Read a snapshot's state file (a regular file, read whole, bounded), refusing
    /// one not signed with `key` when one is given: what the machine was, before
    /// any of it is built ([`MachineBuilder::from_saved`]).
    pub fn read(state: File, key: Option<&[u8]>) -> Result<Self, MachineSnapshotError> {
        file_id(&state, "snapshot state file")?;
        let snapshot =
            Snapshot::read_from(state, STATE_FILE).map_err(MachineSnapshotError::File)?;
        if let Some(key) = key {
            snapshot.verify(key).map_err(MachineSnapshotError::File)?;
        }
        let mut saved = Self::from_snapshot(snapshot)?;
        saved.verified = key.is_some();
        Ok(saved)
    }

    /// What the snapshot says about the machine (build the same one to restore it).
    pub fn info(&self) -> &MachineInfo {
        &self.info
    }

    /// The whole state file, for sections an embedding program saved itself.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The configuration the saved machine was built from, if it was built from one:
    /// build it again from this ([`MachineBuilder::configure`]), with the host's
    /// resources moved where they are here if need be
    /// ([`MachineConfig::with_host_resources_of`]).
    pub fn config(&self) -> Result<Option<MachineConfig>, MachineSnapshotError> {
        if !self.snapshot.contains(CONFIG_SECTION) {
            return Ok(None);
        }
        let ConfigSection(json) = self
            .snapshot
            .load(CONFIG_SECTION)
            .map_err(MachineSnapshotError::File)?;
        MachineConfig::from_json(&json)
            .map(Some)
            .map_err(MachineSnapshotError::Config)
    }
}

impl MachineBuilder {
    /// Begin restoring the snapshot in `dir`: read and verify its state file, map its
    /// memory file copy-on-write as guest RAM, and set up the legacy devices with
    /// serial output to `serial_out`. Add the same devices as the saved machine had,
    /// in the same order, then call [`MachineBuilder::start_restored`].
    pub fn from_snapshot(
        dir: &Path,
        serial_out: Box<dyn std::io::Write + Send>,
    ) -> Result<(Self, SavedMachine), MachineSnapshotError> {
        Self::from_snapshot_signed(dir, None, serial_out)
    }

    /// [`MachineBuilder::from_snapshot`], refusing a snapshot not signed with `key`
    /// when one is given (its state file, and its memory against the signed digest).
    pub fn from_snapshot_signed(
        dir: &Path,
        key: Option<&[u8]>,
        serial_out: Box<dyn std::io::Write + Send>,
    ) -> Result<(Self, SavedMachine), MachineSnapshotError> {
        let state = open_snapshot_file(&dir.join(STATE_FILE), "snapshot state file")?;
        let memory = open_snapshot_file(&dir.join(MEMORY_FILE), "snapshot memory file")?;
        Self::from_snapshot_files_signed(state, &memory, key, serial_out)
    }

    /// [`MachineBuilder::from_snapshot`] from files already open: the state file
    /// (read whole) and the memory file (mapped; it may be closed afterwards). Both
    /// must be regular files.
    pub fn from_snapshot_files(
        state: File,
        memory: &File,
        serial_out: Box<dyn std::io::Write + Send>,
    ) -> Result<(Self, SavedMachine), MachineSnapshotError> {
        Self::from_snapshot_files_signed(state, memory, None, serial_out)
    }

    /// [`MachineBuilder::from_snapshot_files`], refusing a snapshot not signed with
    /// `key` when one is given.
    pub fn from_snapshot_files_signed(
        state: File,
        memory: &File,
        key: Option<&[u8]>,
        serial_out: Box<dyn std::io::Write + Send>,
    ) -> Result<(Self, SavedMachine), MachineSnapshotError> {
        let saved = SavedMachine::read(state, key)?;
        let builder = Self::from_saved(&saved, memory, serial_out)?;
        Ok((builder, saved))
    }

    /// Begin restoring `saved` (read with [`SavedMachine::read`]) on its memory file
    /// (mapped copy-on-write; it may be closed afterwards), checked against the
    /// signed digest if the state was signed and verified.
    pub fn from_saved(
        saved: &SavedMachine,
        memory: &File,
        serial_out: Box<dyn std::io::Write + Send>,
    ) -> Result<Self, MachineSnapshotError> {
        file_id(memory, "snapshot memory file")?;
        let bytes = saved.info.ram_bytes;
        let layout =
            MemoryLayout::x86_64(bytes).map_err(|e| MachineSnapshotError::Layout(bytes, e))?;
        let shared = saved.config()?.is_some_and(|c| c.memory_is_shared());
        let ram = if shared {
            GuestRam::shared_from_memory_file(&layout, memory)
        } else {
            GuestRam::from_memory_file(&layout, memory)
        }
        .map_err(MachineSnapshotError::MapMemory)?;
        if saved.verified {
            let signed: MemoryDigest = saved
                .snapshot
                .load(MEMORY_DIGEST)
                .map_err(MachineSnapshotError::File)?;
            if memory_digest(ram.memory()) != signed {
                return Err(MachineSnapshotError::MemoryDigest);
            }
        }
        MachineBuilder::with_ram(layout, ram, serial_out).map_err(MachineSnapshotError::Build)
    }

    /// Check that this machine was built like the one saved in `saved` (the same
    /// virtio devices in the same order, the same parts, hypercalls served or not),
    /// without changing anything: what [`MachineBuilder::start_restored`] checks first.
    pub fn check_restorable(&self, saved: &SavedMachine) -> Result<(), MachineSnapshotError> {
        if let (Some(now), Some(then)) = (&self.configured().config, saved.config()?) {
            now.check_same_machine(&then)
                .map_err(MachineSnapshotError::Config)?;
        }
        let types = self.virtio_types();
        if types != saved.info.virtio_types {
            return Err(MachineSnapshotError::Mismatch(format!(
                "virtio device types {:?} saved, {:?} built",
                saved.info.virtio_types, types
            )));
        }
        let parts: Vec<String> = self.snapshot_parts().map(str::to_owned).collect();
        if parts != saved.info.parts {
            return Err(MachineSnapshotError::Mismatch(format!(
                "parts {:?} saved, {:?} registered",
                saved.info.parts, parts
            )));
        }
        if self.serves_hypercalls() != saved.info.hypercalls {
            return Err(MachineSnapshotError::Mismatch(format!(
                "hypercalls {} when saved, {} now",
                if saved.info.hypercalls {
                    "served"
                } else {
                    "not served"
                },
                if self.serves_hypercalls() {
                    "served"
                } else {
                    "not served"
                },
            )));
        }
        // Every section a restore reads is there, and the vCPUs' and the VM's decode.
        let s = &saved.snapshot;
        let file = MachineSnapshotError::File;
        for i in 0..saved.info.vcpus {
            s.load::<VcpuState>(&vcpu_section(i)).map_err(file)?;
        }
        s.load::<VmState>("vm").map_err(file)?;
        for name in self.machine_parts().into_iter().map(|(name, _)| name) {
            if !s.contains(&name) {
                return Err(MachineSnapshotError::Mismatch(format!(
                    "no section {name:?} in the state"
                )));
            }
        }
        Ok(())
    }

    /// Finish restoring `saved`: check this machine was built like the one saved,
    /// put back the devices', the VM's and the vCPUs' state, and start the vCPUs from
    /// where they were paused.
    pub fn start_restored(self, saved: &SavedMachine) -> Result<Machine, MachineSnapshotError> {
        self.restore_and_start(saved, false)
    }

    /// [`MachineBuilder::start_restored`], the vCPUs parked before they run a guest
    /// instruction: the machine is paused until [`Machine::resume`].
    pub fn start_restored_paused(
        self,
        saved: &SavedMachine,
    ) -> Result<Machine, MachineSnapshotError> {
        self.restore_and_start(saved, true)
    }

    fn restore_and_start(
        self,
        saved: &SavedMachine,
        paused: bool,
    ) -> Result<Machine, MachineSnapshotError> {
        self.check_restorable(saved)?;
        let s = &saved.snapshot;
        let file = MachineSnapshotError::File;
        let vcpus = (0..saved.info.vcpus)
            .map(|i| s.load::<VcpuState>(&vcpu_section(i)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(file)?;
        let vm: VmState = s.load("vm").map_err(file)?;
        vm.restore(self.vm().fd())
            .map_err(MachineSnapshotError::Vm)?;
        // The devices come back after the interrupt controllers, so an interrupt
        // they raise is not lost under the restored state.
        for (name, part) in self.machine_parts() {
            part.restore(&PartReader {
                snapshot: s,
                name: &name,
            })?;
        }
        let machine = self
            .into_parts()
            .start_with(|vm, handler, _| match paused {
                false => RunningVm::start_restored(vm, &vcpus, handler),
                true => RunningVm::start_restored_paused(vm, &vcpus, handler),
            })
            .map_err(MachineSnapshotError::Start)?;
        // The vCPUs' state went over whatever the devices raised since their
        // restore: raised again.
        for (_, part) in machine_parts(&machine.legacy, &machine.virtio, &machine.parts) {
            part.after_vcpus_restored();
        }
        Ok(machine)
    }
}
