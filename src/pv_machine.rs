//! The paravirtual glue: event channels and a hypercall table for a guest, and the
//! PV console and PV block backends, each on an I/O thread woken by its
//! event-channel port.
//!
//! Where the shared pages are is the embedding program's choice, a
//! [`PvLayout`]: the shared-info page, the console page, the blkif ring page and the
//! grant table, and the doorbell port. The console gets event-channel port 1 and the
//! block device port 2 ([`PvBackends::console_port`], [`PvBackends::blk_port`]).

use std::io::Write;
use std::sync::Arc;
use vmcraft_memory::poll::AdaptivePoll;
use vmcraft_memory::report::ErrorChain;
use vmcraft_sandbox::{Thread, ThreadKind};

use crate::builder::{BuildError, MachineBuilder};
use thiserror::Error;
use vm_memory::GuestAddress;
use vmcraft_block::BlockImage;
use vmcraft_devices::lifecycle::{epoll_for, wait, Gate, Leave};
use vmcraft_memory::GuestMemory;
use vmcraft_pv_hypercall::blkif::{BlkifBackend, BlkifError};
use vmcraft_pv_hypercall::console::{ConsoleBackend, ConsoleError};
use vmcraft_pv_hypercall::evtchn::{EventChannels, EvtchnError, Upcall};
use vmcraft_pv_hypercall::grant::{GrantError, GrantTable};
use vmcraft_pv_hypercall::hypercall::{HypercallTable, TableError};
use vmcraft_pv_hypercall::layout::PvLayout;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors from setting up the PV backends.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PvError {
    /// Event channels.
    #[error("event channels")]
    Evtchn(#[source] EvtchnError),
    /// The grant table.
    #[error("grant table")]
    Grant(#[source] GrantError),
    /// The console page.
    #[error("PV console")]
    Console(#[source] ConsoleError),
    /// The block ring.
    #[error("PV block")]
    Block(#[source] BlkifError),
    /// The hypercall table.
    #[error("hypercall table")]
    Table(#[source] TableError),
    /// A host resource (eventfd, epoll, thread).
    #[error("cannot start a PV backend thread")]
    Host(#[source] std::io::Error),
    /// A backend thread could not be started (or filtered).
    #[error("cannot start a PV backend thread")]
    Thread(#[source] vmcraft_sandbox::SandboxError),
    /// The doorbell port could not be put on the bus.
    #[error("cannot put the PV doorbell on the port bus")]
    Doorbell(#[source] vmcraft_devices::bus::BusError),
    /// Two regions of the layout overlap.
    #[error("the PV layout's {0} and {1} overlap")]
    Layout(&'static str, &'static str),
}

/// Running PV backends; dropping them stops and joins their threads.
pub struct PvBackends {
    stop: EventFd,
    gate: Arc<Gate>,
    threads: Vec<Thread<()>>,
    /// Each backend's event-channel port and the eventfd a send signals.
    doorbells: Vec<(u32, EventFd)>,
    doorbell_port: u16,
    ports: (u32, u32),
    /// The guest's event channels (for the upcall and status).
    pub channels: Arc<EventChannels>,
}

impl std::fmt::Debug for PvBackends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PvBackends")
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

impl PvBackends {
    /// Set up event channels, a grant table, a console and a block device in
    /// `memory` as `devices` says, register the event-channel hypercall in `table`,
    /// and start the backend threads. Upcalls go to `upcall`. A machine gets them
    /// with [`MachineBuilder::add_pv`], which wires the rest.
    pub fn start(
        memory: GuestMemory,
        table: &mut HypercallTable,
        upcall: Arc<dyn Upcall>,
        devices: PvDevices,
    ) -> Result<PvBackends, PvError> {
        let PvDevices {
            layout,
            disk,
            read_only,
            console: mut console_out,
        } = devices;
        if let Some((a, b)) = layout.pages_overlap() {
            return Err(PvError::Layout(a, b));
        }
        let channels = Arc::new(
            EventChannels::new(memory.clone(), GuestAddress(layout.shared_info), upcall)
                .map_err(PvError::Evtchn)?,
        );
        channels
            .register_hypercalls(table)
            .map_err(PvError::Table)?;
        let console_port = channels.alloc_unbound(0).map_err(PvError::Evtchn)?;
        let blk_port = channels.alloc_unbound(0).map_err(PvError::Evtchn)?;
        let console_end = channels
            .bind_backend(console_port, 0, 0)
            .map_err(PvError::Evtchn)?;
        let blk_end = channels
            .bind_backend(blk_port, 1, 0)
            .map_err(PvError::Evtchn)?;
        let console = ConsoleBackend::new(memory.clone(), GuestAddress(layout.console_page))
            .map_err(PvError::Console)?;
        let grants = Arc::new(
            GrantTable::new(
                memory.clone(),
                GuestAddress(layout.grant_table),
                layout.grant_entries,
                0,
            )
            .map_err(PvError::Grant)?,
        );
        let mut blk = BlkifBackend::new(
            memory,
            GuestAddress(layout.blk_ring),
            grants,
            Arc::new(BlockImage::open(disk, read_only).map_err(PvError::Host)?),
        )
        .map_err(PvError::Block)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(PvError::Host)?;
        let gate = Arc::new(Gate::new().map_err(PvError::Host)?);
        let mut threads = Vec::new();
        let doorbells = vec![
            (
                console_end.port,
                console_end.notified.try_clone().map_err(PvError::Host)?,
            ),
            (
                blk_end.port,
                blk_end.notified.try_clone().map_err(PvError::Host)?,
            ),
        ];

        let ch_c = channels.clone();
        let epoll_c = epoll_for(&console_end.notified, &stop, &gate.wake).map_err(PvError::Host)?;
        let gate_c = gate.clone();
        gate.enter();
        threads.push(
            vmcraft_sandbox::spawn(ThreadKind::PvBackend, "pv-console", move || {
                let _leave = Leave(&gate_c);
                let mut serving = true;
                while serving && wait(&epoll_c, &console_end.notified, &gate_c) {
                    serving = drain_console(&console, &mut *console_out, &ch_c, console_end.port);
                }
                // Stopping: what the guest wrote before it stopped still goes out
                // (a guest that prints and then powers off says its last line).
                if serving {
                    drain_console(&console, &mut *console_out, &ch_c, console_end.port);
                }
            })
            .map_err(PvError::Thread)?,
        );

        let ch_b = channels.clone();
        let epoll_b = epoll_for(&blk_end.notified, &stop, &gate.wake).map_err(PvError::Host)?;
        let gate_b = gate.clone();
        gate.enter();
        threads.push(
            vmcraft_sandbox::spawn(ThreadKind::PvBackend, "pv-block", move || {
                let _leave = Leave(&gate_b);
                let mut poll = AdaptivePoll::new(AdaptivePoll::DEFAULT_MAX);
                while wait(&epoll_b, &blk_end.notified, &gate_b) {
                    let notify = || {
                        let _ = ch_b.notify_guest(blk_end.port);
                    };
                    match blk.process_polling(&mut poll, notify) {
                        Ok(done) => {
                            if done.more {
                                // Come back after checking for a stop. A failed
                                // write means the counter is full: it wakes anyway.
                                let _ = blk_end.notified.write(1);
                            }
                        }
                        // A broken ring: stop serving this device.
                        Err(e) => {
                            log::warn!("pv-block: stops serving the guest: {}", ErrorChain(&e));
                            return;
                        }
                    }
                }
            })
            .map_err(PvError::Thread)?,
        );
        Ok(PvBackends {
            stop,
            gate,
            threads,
            doorbells,
            doorbell_port: layout.doorbell_port,
            ports: (console_port, blk_port),
            channels,
        })
    }

    /// The console's event-channel port.
    pub fn console_port(&self) -> u32 {
        self.ports.0
    }

    /// The block device's event-channel port.
    pub fn blk_port(&self) -> u32 {
        self.ports.1
    }

    /// Bind the layout's doorbell port to each backend in KVM: a
    /// 4-byte write of a backend's port number signals its eventfd without leaving the
    /// kernel.
    pub fn register_doorbells(&self, vm: &kvm_ioctls::VmFd) -> Result<(), PvError> {
        for (port, fd) in &self.doorbells {
            vm.register_ioevent(
                fd,
                &kvm_ioctls::IoEventAddress::Pio(u64::from(self.doorbell_port)),
                *port,
            )
            .map_err(|e| PvError::Host(std::io::Error::from_raw_os_error(e.errno())))?;
        }
        Ok(())
    }

    /// Put the doorbell on `buses` (the slow path) and bind it in KVM (the fast path).
    pub fn attach_doorbell(
        &self,
        buses: &mut vmcraft_devices::bus::IoBuses,
        vm: &kvm_ioctls::VmFd,
    ) -> Result<(), PvError> {
        buses
            .register_pio(self.doorbell_port, 4, self.doorbell_device()?)
            .map_err(PvError::Doorbell)?;
        self.register_doorbells(vm)
    }

    /// The doorbell as a port device, for when it is not bound in KVM (or a write
    /// does not match a port): it signals the named backend the slow way.
    pub fn doorbell_device(&self) -> Result<Arc<Doorbell>, PvError> {
        let fds = self
            .doorbells
            .iter()
            .map(|(p, fd)| Ok((*p, fd.try_clone()?)))
            .collect::<std::io::Result<_>>()
            .map_err(PvError::Host)?;
        Ok(Arc::new(Doorbell(fds)))
    }
}

/// The PV channel's state in a snapshot: the event-channel table (the rings, the
/// grant table and the shared-info page are guest memory).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PvState {
    /// The event-channel ports.
    pub channels: vmcraft_pv_hypercall::evtchn::ChannelsState,
}

impl vmcraft_snapshot::Versioned for PvState {
    const VERSION: u32 = 1;
}

impl PvBackends {
    /// Park the backend threads once each has answered what it took from its ring
    /// (so a ring resumes from its published responses), and return the state.
    pub fn pause(&self) -> PvState {
        self.gate.pause_all();
        PvState {
            channels: self.channels.save_state(),
        }
    }

    /// Let the backend threads serve again after [`PvBackends::pause`].
    pub fn resume(&self) {
        self.gate.resume_all();
    }

    /// Put back a saved state into backends started (by the same set-up) on the
    /// restored memory: the rings go on from their published responses, and each
    /// backend looks at its ring once, since a notification the guest sent before
    /// the snapshot (or one a backend sent itself to come back to a long ring) was
    /// an eventfd count of the old process, not guest memory.
    pub fn restore(&self, state: &PvState) -> Result<(), PvError> {
        self.channels
            .restore_state(&state.channels)
            .map_err(PvError::Evtchn)?;
        for (_, notified) in &self.doorbells {
            // Saturation means a look is pending already.
            let _ = notified.write(1);
        }
        Ok(())
    }
}

/// The doorbell port as a device on the port bus.
#[derive(Debug)]
pub struct Doorbell(Vec<(u32, EventFd)>);

impl vmcraft_devices::vm_device::DevicePio for Doorbell {
    fn pio_read(
        &self,
        _: vmcraft_devices::vm_device::bus::PioAddress,
        _: vmcraft_devices::vm_device::bus::PioAddressOffset,
        data: &mut [u8],
    ) {
        data.fill(0xff);
    }
    fn pio_write(
        &self,
        _: vmcraft_devices::vm_device::bus::PioAddress,
        _: vmcraft_devices::vm_device::bus::PioAddressOffset,
        data: &[u8],
    ) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let port = u32::from_le_bytes(bytes);
        if let Some((_, fd)) = self.0.iter().find(|(p, _)| *p == port) {
            // Saturation means the backend has a notification pending already.
            let _ = fd.write(1);
        }
    }
}

impl Drop for PvBackends {
    fn drop(&mut self) {
        // Saturation means a stop is pending already.
        let _ = self.stop.write(1);
        // Threads parked for a snapshot go back to their loops, and see the stop.
        self.resume();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Move the PV console's output to `out` and tell the guest; false (after a warning)
/// if the page is hostile and the console stops serving.
fn drain_console(
    console: &ConsoleBackend,
    out: &mut dyn Write,
    channels: &EventChannels,
    port: u32,
) -> bool {
    match console.drain_output(out) {
        Ok(n) => {
            if n > 0 {
                let _ = channels.notify_guest(port);
            }
            true
        }
        Err(e) => {
            log::warn!("pv-console: stops serving the guest: {}", ErrorChain(&e));
            false
        }
    }
}

/// How the PV backends' upcall reaches the guest.
pub enum PvUpcall {
    /// As this interrupt line of the IOAPIC (an irqfd; the line is reserved).
    Irq(u32),
    /// Through the embedding program's own [`Upcall`].
    Custom(Arc<dyn Upcall>),
}

impl std::fmt::Debug for PvUpcall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PvUpcall::Irq(irq) => f.debug_tuple("Irq").field(irq).finish(),
            PvUpcall::Custom(_) => f.write_str("Custom"),
        }
    }
}

/// The PV devices: what [`MachineBuilder::add_pv`] (or [`PvBackends::start`]) sets
/// up.
pub struct PvDevices {
    /// Where the shared pages are and which port is the doorbell.
    pub layout: PvLayout,
    /// The block device's image.
    pub disk: std::fs::File,
    /// Whether its writes are refused.
    pub read_only: bool,
    /// Where the PV console's output goes.
    pub console: Box<dyn Write + Send>,
}

impl std::fmt::Debug for PvDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PvDevices")
            .field("layout", &self.layout)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl MachineBuilder {
    /// Put the PV backends on this machine, the one way to do it: event channels
    /// (their hypercall in the machine's table, [`hypercall_table`]), a grant table,
    /// the PV console and the PV block device where `devices.layout` says, their doorbell
    /// on the port bus and bound in KVM, the upcall wired, and the whole saved with
    /// the machine in snapshots and migrations (part `pv`). The returned handle is
    /// the machine's too; keep it to look at the channels.
    ///
    /// [`hypercall_table`]: MachineBuilder::hypercall_table
    pub fn add_pv(
        &mut self,
        devices: PvDevices,
        upcall: PvUpcall,
    ) -> Result<Arc<PvBackends>, BuildError> {
        let upcall: Arc<dyn Upcall> = match upcall {
            PvUpcall::Custom(upcall) => upcall,
            PvUpcall::Irq(irq) => {
                self.reserve_irq(irq)?;
                let host = |source| BuildError::Host {
                    what: "the PV upcall's interrupt",
                    source,
                };
                let fd = EventFd::new(EFD_NONBLOCK).map_err(host)?;
                self.vm()
                    .fd()
                    .register_irqfd(&fd, irq)
                    .map_err(|e| host(std::io::Error::from_raw_os_error(e.errno())))?;
                Arc::new(fd)
            }
        };
        let memory = self.memory().clone();
        let backends = PvBackends::start(memory, self.hypercall_table(), upcall, devices)
            .map_err(BuildError::Pv)?;
        let (buses, vm) = self.buses_and_vm();
        backends
            .attach_doorbell(buses, vm.fd())
            .map_err(BuildError::Pv)?;
        let backends = Arc::new(backends);
        self.add_snapshot_part("pv", backends.clone());
        Ok(backends)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    struct Sink(std::sync::mpsc::Sender<Vec<u8>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.send(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn backends(memory: &GuestMemory, out: std::sync::mpsc::Sender<Vec<u8>>) -> PvBackends {
        let disk = tempfile_disk();
        PvBackends::start(
            memory.clone(),
            &mut HypercallTable::new(),
            Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            PvDevices {
                layout: vmcraft_guest_kit::PV_LAYOUT,
                disk,
                read_only: false,
                console: Box::new(Sink(out)),
            },
        )
        .unwrap()
    }

    fn tempfile_disk() -> std::fs::File {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        f.set_len(1 << 20).unwrap();
        f
    }

    /// Output the guest published before a snapshot, whose notification the old
    /// process had counted but not served, is served by the restored backends
    /// without a new notification.
    #[test]
    fn restored_backends_serve_what_was_published_before_the_snapshot() {
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let old = backends(&memory, tx.clone());
        let saved = old.pause();
        drop(old);
        // The console page (xencons_interface): out[] at 1024, out_prod at 3084.
        let page = vmcraft_guest_kit::PV_LAYOUT.console_page;
        memory
            .write_slice(b"before", GuestAddress(page + 1024))
            .unwrap();
        memory.write_obj(6u32, GuestAddress(page + 3084)).unwrap();
        let new = backends(&memory, tx);
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "a backend served without being asked"
        );
        new.restore(&saved).unwrap();
        let got = rx.recv_timeout(std::time::Duration::from_secs(20)).unwrap();
        assert_eq!(got, b"before");
    }
}
