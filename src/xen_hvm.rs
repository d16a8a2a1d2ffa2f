//! vmcraft as Xen, to an unmodified guest kernel that uses its own Xen support: Linux
//! booted through its PVH entry finds Xen's CPUID leaves, makes Xen hypercalls
//! (`VMCALL`/`VMMCALL`, which KVM's Xen support turns into exits: see
//! [`vmcraft_vcpu::xen`]), places its shared-info page, `vcpu_info`s and grant
//! frames, and takes event-channel upcalls on the vector it registers per vCPU.
//!
//! What serves each hypercall (Xen's argument layouts throughout), put together by
//! [`HvmGuestCalls`]:
//!
//! | hypercall | served by | what |
//! |---|---|---|
//! | `xen_version` (17) | [`XenVersion`](vmcraft_pv_hypercall::version::XenVersion) | version 4.17, the HVM features vmcraft serves |
//! | `memory_op` (12) | [`MemoryOp`](vmcraft_pv_hypercall::physmap::MemoryOp) | `add_to_physmap` of the shared-info page and grant frames; the reservation |
//! | `hvm_op` (34) | [`HvmParams`] | `set_param(CALLBACK_IRQ)`, `get_param` (store, console), `set_evtchn_upcall_vector` |
//! | `event_channel_op` (32) | [`EventChannels`] | 2-level: alloc_unbound, bind_virq, bind_ipi, bind_vcpu, send, close, unmask, status; FIFO refused |
//! | `grant_table_op` (20) | [`GrantTableOp`](vmcraft_pv_hypercall::grant::op::GrantTableOp) | query_size, set_version (1), get_version |
//! | `vcpu_op` (24) | [`VcpuOp`](vmcraft_pv_hypercall::physmap::VcpuOp) | register_vcpu_info; Xen's timers refused |
//! | `sched_op` (29) | [`SchedOps`](vmcraft_pv_hypercall::sched::SchedOps) | shutdown stops the VM with its reason (yield and poll stay in KVM) |
//!
//! Anything else is `-ENOSYS`, counted in the table.
//!
//! Which structure lives where: vmcraft keeps event channels, the shared-info page,
//! `vcpu_info`s and grant frames in guest memory, as its own PV guests have them, and
//! uses none of KVM's Xen acceleration (its shared-info, `vcpu_info`, timer and
//! event-channel attributes): one implementation for every guest, and nothing that
//! depends on the host kernel beyond the hypercall exit. Upcalls are MSIs to the
//! vCPU's local APIC on the vector the guest registered
//! (`HVMOP_set_evtchn_upcall_vector`, which the CPUID leaves announce), so the guest
//! acknowledges them at its APIC as Linux does for that vector.
//!
//! Memory the guest is shown: the frames a PVH Linux maps grant frames (and other
//! foreign pages) into come from ranges the memory map calls unusable; vmcraft marks
//! [`GRANT_REGION`] so, backed by guest RAM. The xenstore and console rings go in
//! reserved pages ([`STORE_PAGE`], [`CONSOLE_PAGE`]).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use thiserror::Error;
use vmcraft_devices::stop::{DeviceStop, StopLatch};
use vmcraft_pv_hypercall::evtchn::{EventChannels, Upcall, MAX_VCPUS};
use vmcraft_pv_hypercall::grant::{GrantTable, PAGE};
use vmcraft_pv_hypercall::hvm::{Callback, HvmParams, UpcallRoute};
use vmcraft_pv_hypercall::hvm_guest::HvmGuestCalls;
use vmcraft_pv_hypercall::hypercall::TableError;
use vmcraft_pv_hypercall::reservation::Reservation;
use vmcraft_pv_hypercall::sched::{ShutdownReason, ShutdownSink};
use vmcraft_pv_hypercall::xen_cpuid::{XenCpuid, HVM_VCPU_ID_PRESENT, HYPERCALL_PAGE_MSR};
use vmcraft_vcpu::cpu::{HypervisorInfo, MoreLeaf, TAKEN_HYPERVISOR_LEAVES};
use vmcraft_vcpu::linux::{E820Entry, E820_RESERVED, E820_UNUSABLE};
use vmcraft_vcpu::xen::{enable_xen_hypercalls, vm_tsc_khz, MsiSender, XenSupportError};

use crate::builder::{BuildError, MachineBuilder};

mod services;
pub use services::{XenDisk, XenServiceError, XenServices, XVDA};

/// The guest's domain id.
pub const DOMID: u16 = 1;
/// Frames of the grant table (512 grants each).
pub const GRANT_FRAMES: u32 = 32;
/// Where the frames a PVH guest may map foreign pages into are (e820 unusable,
/// backed by guest RAM): room for the grant table.
pub const GRANT_REGION: u64 = 0x7_0000;
/// The xenstore ring's page (e820 reserved).
pub const STORE_PAGE: u64 = GRANT_REGION + GRANT_FRAMES as u64 * PAGE;
/// The PV console ring's page (e820 reserved).
pub const CONSOLE_PAGE: u64 = STORE_PAGE + PAGE;

/// Why the Xen platform could not be set up.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum XenHvmError {
    /// The host's KVM cannot pass Xen hypercalls out.
    #[error("no Xen hypercalls on this host")]
    Support(#[source] XenSupportError),
    /// A range of guest memory could not be set aside.
    #[error("cannot set guest memory aside for Xen's pages")]
    Memory(#[source] BuildError),
    /// The MSI sender for upcalls could not be made.
    #[error("cannot open the VM for upcall MSIs")]
    Msi(#[source] std::io::Error),
    /// The hypercall table could not be built.
    #[error("cannot build the Xen hypercall table")]
    Table(#[source] TableError),
    /// No room for Xen's CPUID leaves.
    #[error("no room for Xen's CPUID leaves")]
    Cpuid,
    /// The machine serves a hypercall number of Xen's already.
    #[error("cannot serve Xen's hypercalls")]
    Hypercalls(#[source] BuildError),
}

/// Event-channel upcalls as MSIs on the vector each vCPU registered. A vCPU that has
/// none gets none: the guest asked for no interrupt (Linux registers before it binds
/// a port). The global callback (`HVM_PARAM_CALLBACK_IRQ`) is recorded but not
/// delivered: a vector through the APIC without the guest's acknowledgment would
/// block lower interrupts, and the CPUID leaves steer Linux to per-vCPU vectors.
#[derive(Debug)]
pub struct UpcallVectors {
    msi: MsiSender,
    vectors: Vec<AtomicU8>,
    /// Upcalls no local APIC took (a guest raises events before it enables its
    /// APIC): raised again with the vCPU's next event.
    owed: Vec<AtomicBool>,
}

impl UpcallVectors {
    /// Upcalls through `msi` for `vcpus` vCPUs (local APIC ID = vCPU index).
    pub fn new(msi: MsiSender, vcpus: u32) -> Self {
        UpcallVectors {
            msi,
            vectors: (0..vcpus.min(MAX_VCPUS))
                .map(|_| AtomicU8::new(0))
                .collect(),
            owed: (0..vcpus.min(MAX_VCPUS))
                .map(|_| AtomicBool::new(false))
                .collect(),
        }
    }

    /// The vector `vcpu` registered (0: none).
    pub fn vector(&self, vcpu: u32) -> u8 {
        self.vectors
            .get(vcpu as usize)
            .map_or(0, |v| v.load(Ordering::SeqCst))
    }
}

impl Upcall for UpcallVectors {
    fn raise(&self, vcpu: u32) {
        let vector = self.vector(vcpu);
        if vector == 0 {
            return;
        }
        let taken = match self.msi.send(vcpu as u8, vector) {
            Ok(true) => {
                log::trace!("upcall to vCPU {vcpu} on vector {vector:#x}");
                true
            }
            Ok(false) => {
                log::debug!(
                    "upcall to vCPU {vcpu}: its local APIC took no MSI (not enabled yet): owed"
                );
                false
            }
            Err(e) => {
                log::error!("upcall to vCPU {vcpu}: KVM_SIGNAL_MSI failed: {e}");
                false
            }
        };
        if let Some(owed) = self.owed.get(vcpu as usize) {
            owed.store(!taken, Ordering::SeqCst);
        }
    }
    fn owed(&self, vcpu: u32) -> bool {
        self.owed
            .get(vcpu as usize)
            .is_some_and(|o| o.load(Ordering::SeqCst))
    }
}

/// What the guest's `hvm_op` sets: the upcall vectors, and, as in Xen, an upcall
/// at once for a vCPU whose events were flagged before it had a vector.
struct UpcallRouting {
    vectors: Arc<UpcallVectors>,
    channels: Arc<EventChannels>,
}

impl UpcallRoute for UpcallRouting {
    fn callback(&self, callback: Callback) {
        log::debug!("global event-channel callback {callback:?} (upcalls go per vCPU)");
    }
    fn vcpu_vector(&self, vcpu: u32, vector: u8) {
        if let Some(v) = self.vectors.vectors.get(vcpu as usize) {
            v.store(vector, Ordering::SeqCst);
            log::debug!("vCPU {vcpu}: event-channel upcall on vector {vector:#x}");
            self.channels.kick(vcpu);
        }
    }
}

/// `SCHEDOP_shutdown` stops the VM: power-off as a power-off, reboot as a reset,
/// anything else as device "xen shutdown" with Xen's reason code.
#[derive(Debug)]
struct StopOnShutdown(Arc<StopLatch>);

impl ShutdownSink for StopOnShutdown {
    fn shutdown(&self, vcpu: u32, reason: ShutdownReason) {
        log::info!("vCPU {vcpu}: the guest shut down: {reason:?}");
        self.0.request(match reason {
            ShutdownReason::PowerOff => DeviceStop::PowerOff,
            ShutdownReason::Reboot => DeviceStop::Reset,
            other => DeviceStop::Device {
                device: "xen shutdown",
                code: other as u32,
            },
        });
    }
}

/// The Xen platform of one VM.
#[derive(Debug)]
pub struct XenHvm {
    /// The event channels.
    pub channels: Arc<EventChannels>,
    /// The grant table.
    pub grants: Arc<GrantTable>,
    /// The HVM parameters.
    pub params: Arc<HvmParams>,
    /// The upcall vectors.
    pub upcalls: Arc<UpcallVectors>,
    /// Xen's CPUID leaves.
    pub cpuid: XenCpuid,
}

/// Why a saved Xen platform could not be put back.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum XenStateError {
    /// The event channels' table or placement.
    #[error("event channels")]
    Evtchn(#[source] vmcraft_pv_hypercall::evtchn::EvtchnError),
    /// The grant frames.
    #[error("grant frames")]
    Grant(#[source] vmcraft_pv_hypercall::grant::GrantError),
    /// The HVM parameters.
    #[error("HVM parameters")]
    Params(#[source] vmcraft_pv_hypercall::hypercall::HypercallFault),
    /// An upcall vector out of range, or more vCPUs than the machine has.
    #[error("upcall vectors {0:?} for {1} vCPUs")]
    Vectors(Vec<u8>, u32),
    /// The services (store, vbds).
    #[error("the Xen services")]
    Services(#[source] XenServiceError),
}

/// A Xen platform in a snapshot or a migration: where the guest placed its pages,
/// its event channels, HVM parameters and upcall vectors, and the services' state.
/// Pages the guest owns (shared info, `vcpu_info`s, grant frames, rings) are guest
/// memory and travel with it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct XenState {
    channels: vmcraft_pv_hypercall::evtchn::ChannelsState,
    placement: vmcraft_pv_hypercall::evtchn::Placement,
    grant_frames: Vec<Option<u64>>,
    params: Vec<u64>,
    vectors: Vec<u8>,
    services: services::XenServicesState,
}

impl vmcraft_snapshot::Versioned for XenState {
    const VERSION: u32 = 1;
}

/// A machine's Xen platform with its services running (the xenstore, the console,
/// the vbds): what [`MachineBuilder::configure`] makes of a configuration with
/// `xen`. Dropping it stops the services.
#[derive(Debug)]
pub struct XenPlatform {
    /// The platform.
    pub hvm: XenHvm,
    /// Its services.
    pub services: XenServices,
}

impl XenPlatform {
    /// Park the services between requests and save the whole platform.
    pub fn pause(&self) -> XenState {
        let services = self.services.pause();
        let hvm = &self.hvm;
        XenState {
            channels: hvm.channels.save_state(),
            placement: hvm.channels.placement(),
            grant_frames: hvm.grants.placed_frames(),
            params: hvm.params.values(),
            vectors: (0..hvm.upcalls.vectors.len() as u32)
                .map(|v| hvm.upcalls.vector(v))
                .collect(),
            services,
        }
    }

    /// Serve again after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.services.resume();
    }

    /// Put `state` back into a platform set up (the same way) on the restored
    /// memory, before the guest runs. Every value is checked; the grant frames,
    /// placement and parameters go back first, then the services (which bind the
    /// connected vbds' ports again), then the event-channel table.
    pub fn restore(&self, state: &XenState) -> Result<(), XenStateError> {
        let hvm = &self.hvm;
        let vcpus = hvm.upcalls.vectors.len();
        if state.vectors.len() != vcpus || state.vectors.iter().any(|&v| v != 0 && v < 0x10) {
            return Err(XenStateError::Vectors(state.vectors.clone(), vcpus as u32));
        }
        hvm.grants
            .restore_frames(&state.grant_frames)
            .map_err(XenStateError::Grant)?;
        hvm.channels
            .restore_placement(&state.placement)
            .map_err(XenStateError::Evtchn)?;
        hvm.params
            .restore(&state.params)
            .map_err(XenStateError::Params)?;
        for (slot, &vector) in hvm.upcalls.vectors.iter().zip(&state.vectors) {
            slot.store(vector, Ordering::SeqCst);
        }
        self.services
            .restore(&state.services)
            .map_err(XenStateError::Services)?;
        hvm.channels
            .restore_state(&state.channels)
            .map_err(XenStateError::Evtchn)
    }
}

impl XenHvm {
    /// What a Linux guest's command line needs on this platform: the TSC rate
    /// (`tsc_early_khz`). Linux under Xen learns it from Xen's pvclock only, which
    /// vmcraft does not offer (it keeps Linux on its own local APIC timer and clock);
    /// AMD CPUs have no CPUID leaf for it, and calibrating against the PIT fails
    /// where the guest's kernel mode is emulated (nested), leaving the TSC unusable
    /// and the boot waiting. Empty if KVM does not say the rate.
    pub fn linux_cmdline(&self) -> String {
        match self.cpuid.tsc_khz {
            0 => String::new(),
            khz => format!(" tsc_early_khz={khz}"),
        }
    }
}

impl XenHvm {
    /// Make `builder`'s VM a Xen HVM platform for `vcpus` vCPUs: Xen hypercalls on
    /// (an error on a host whose KVM cannot), Xen's CPUID leaves, the grant region and
    /// ring pages set aside in the memory map, the hypercall table installed.
    /// `SCHEDOP_shutdown` stops the VM.
    pub fn install(builder: &mut MachineBuilder, vcpus: u32) -> Result<Self, XenHvmError> {
        enable_xen_hypercalls(builder.vm().fd(), HYPERCALL_PAGE_MSR)
            .map_err(XenHvmError::Support)?;
        Self::assemble(builder, vcpus)
    }

    /// Everything [`install`](Self::install) does but switching on KVM's Xen
    /// hypercall exits (tests on hosts without them).
    fn assemble(builder: &mut MachineBuilder, vcpus: u32) -> Result<Self, XenHvmError> {
        let stop = builder.stop_latch();
        builder
            .carve_e820(
                "Xen grant frames",
                E820Entry {
                    addr: GRANT_REGION,
                    size: u64::from(GRANT_FRAMES) * PAGE,
                    kind: E820_UNUSABLE,
                },
            )
            .and_then(|()| {
                builder.carve_e820(
                    "Xen store and console rings",
                    E820Entry {
                        addr: STORE_PAGE,
                        size: 2 * PAGE,
                        kind: E820_RESERVED,
                    },
                )
            })
            .map_err(XenHvmError::Memory)?;
        let memory = builder.memory().clone();
        let msi = MsiSender::new(builder.vm().fd()).map_err(XenHvmError::Msi)?;
        let upcalls = Arc::new(UpcallVectors::new(msi, vcpus));
        let channels = Arc::new(EventChannels::unplaced(memory.clone(), upcalls.clone()));
        let grants = Arc::new(GrantTable::unplaced(memory.clone(), GRANT_FRAMES, 0));
        // No xenstore or console yet: their parameters read 0, which Linux takes as
        // "none" and boots without.
        let routing = Arc::new(UpcallRouting {
            vectors: upcalls.clone(),
            channels: channels.clone(),
        });
        let params = Arc::new(HvmParams::new(vcpus, (0, 0), (0, 0), routing));

        let table = HvmGuestCalls {
            channels: channels.clone(),
            grants: grants.clone(),
            params: params.clone(),
            reservation: Some(Arc::new(Reservation::new(memory.clone()))),
            shutdown: Some(Arc::new(StopOnShutdown(stop))),
            domid: DOMID,
            vcpus,
        }
        .table()
        .map_err(XenHvmError::Table)?;
        builder
            .xen_hypercalls(table)
            .map_err(XenHvmError::Hypercalls)?;

        let tsc_khz = vm_tsc_khz(builder.vm().fd()).unwrap_or(0);
        let cpuid =
            XenCpuid::place(&TAKEN_HYPERVISOR_LEAVES, DOMID, tsc_khz).ok_or(XenHvmError::Cpuid)?;
        let mut info = HypervisorInfo::default();
        for leaf in cpuid.leaves(0) {
            let mut registers = [leaf.eax, leaf.ebx, leaf.ecx, leaf.edx];
            if leaf.function == cpuid.base + 4 {
                // The same leaves go to every vCPU: no vCPU id in them (Linux then
                // numbers vCPUs as it numbers CPUs, which is vmcraft's order).
                registers[0] &= !HVM_VCPU_ID_PRESENT;
                registers[1] = 0;
            }
            let pushed = info.more_leaves.push(MoreLeaf {
                function: leaf.function,
                index: leaf.index,
                indexed: leaf.indexed,
                registers,
            });
            if !pushed {
                return Err(XenHvmError::Cpuid);
            }
        }
        builder.hypervisor_info(info);
        Ok(XenHvm {
            channels,
            grants,
            params,
            upcalls,
            cpuid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};
    use vmcraft_pv_hypercall::hypercall::{HypercallArgs, HypercallContext};
    use vmcraft_vcpu::xen::xen_flags;

    fn builder() -> MachineBuilder {
        MachineBuilder::new(64 << 20, Box::new(std::io::sink())).expect("a VM")
    }

    #[test]
    fn install_says_when_the_host_cannot_pass_xen_hypercalls() {
        let mut b = builder();
        let supported = vmcraft_vcpu::xen::supports_xen_hypercalls(xen_flags(b.vm().fd()));
        match XenHvm::install(&mut b, 1) {
            Ok(_) => assert!(supported),
            Err(XenHvmError::Support(XenSupportError::Unsupported { .. })) => assert!(!supported),
            Err(e) => panic!("unexpected: {e}"),
        }
    }

    #[test]
    fn the_platform_has_xens_leaves_pages_and_hypercalls() {
        let mut b = builder();
        let xen = XenHvm::assemble(&mut b, 2).unwrap();
        assert_eq!(
            xen.cpuid.base, 0x4000_0200,
            "after vmcraft's and KVM's leaves"
        );
        let tsc = vm_tsc_khz(b.vm().fd()).unwrap_or(0);
        assert_eq!(
            xen.linux_cmdline(),
            if tsc == 0 {
                String::new()
            } else {
                format!(" tsc_early_khz={tsc}")
            }
        );
        // The grant region and the ring pages are set aside.
        assert!(b.reserve("overlap", GRANT_REGION, PAGE).is_err());
        assert!(b.reserve("overlap", STORE_PAGE, PAGE).is_err());
        assert!(XenHvm::assemble(&mut b, 2).is_err(), "the pages are taken");
        // The table answers Linux's first call, through the builder's parts.
        let parts = b.into_parts();
        let table = parts.hypercalls.expect("a table");
        let memory = parts.vm.memory();
        memory.write_obj(0u32, GuestAddress(0x1000)).unwrap();
        let ctx = HypercallContext::physical(0, memory);
        let call = |nr, a0, a1| {
            table.dispatch(
                &ctx,
                HypercallArgs {
                    nr,
                    args: [a0, a1, 0, 0, 0],
                },
            )
        };
        assert_eq!(call(17, 0, 0), 0x4_0011);
        assert_eq!(call(17, 6, 0x1000), 0);
        assert_ne!(memory.read_obj::<u32>(GuestAddress(0x1004)).unwrap(), 0);
        assert_eq!(call(99, 0, 0), -38);
        for nr in [12, 20, 24, 29, 32, 34] {
            assert!(
                table.count(nr) == 0 && call(nr, 999, 0x1000) < 0,
                "{nr} answers"
            );
            assert_eq!(table.count(nr), 1, "{nr} is registered");
        }
    }

    #[test]
    fn upcalls_go_per_vcpu_and_one_the_apic_refused_is_owed() {
        let mut b = builder();
        let xen = XenHvm::assemble(&mut b, 1).unwrap();
        // No vector yet: nothing to send, nothing owed.
        xen.upcalls.raise(0);
        assert!(!xen.upcalls.owed(0));
        // A vector, but no vCPU (hence no local APIC) to take it: owed.
        let routing = UpcallRouting {
            vectors: xen.upcalls.clone(),
            channels: xen.channels.clone(),
        };
        routing.vcpu_vector(0, 0xf3);
        routing.vcpu_vector(7, 0xf3); // no such vCPU: ignored
        routing.callback(Callback::Vector(0xf3));
        assert_eq!(xen.upcalls.vector(0), 0xf3);
        assert_eq!(xen.upcalls.vector(7), 0);
        xen.upcalls.raise(0);
        assert!(xen.upcalls.owed(0));
        assert!(!xen.upcalls.owed(7));
    }

    #[test]
    fn a_guest_shutdown_stops_the_vm_with_its_reason() {
        for (reason, stop) in [
            (ShutdownReason::PowerOff, DeviceStop::PowerOff),
            (ShutdownReason::Reboot, DeviceStop::Reset),
            (
                ShutdownReason::Crash,
                DeviceStop::Device {
                    device: "xen shutdown",
                    code: 3,
                },
            ),
        ] {
            let latch = Arc::new(StopLatch::default());
            StopOnShutdown(latch.clone()).shutdown(0, reason);
            assert_eq!(latch.peek(), Some(stop));
        }
    }
}
