//! The state of a vCPU and of a VM's in-kernel devices, as KVM reports it: what a
//! snapshot saves and a restore puts back.
//!
//! [`VcpuState`] holds per vCPU the general and special registers, the FPU and
//! extended state (XSAVE), the XCRs, the debug registers, the local APIC, every MSR
//! KVM lists as saveable that the vCPU answers (the TSC and kvmclock's among them),
//! the multiprocessing state, the pending events (exceptions, interrupts, NMIs, SMIs)
//! and the CPUID the vCPU was given. [`VmState`] holds the in-kernel PIC pair and
//! IOAPIC, the PIT and the KVM clock.
//!
//! Order matters to KVM, and is kept here (as Firecracker and Cloud Hypervisor found):
//! saving reads the MP state first (reading it lets the APIC accept pending INIT/SIPI
//! events, which changes the rest) and the pending events last; restoring writes the
//! CPUID first (it decides which MSRs and XSAVE features exist), the TSC before the
//! TSC deadline, and the events last.
//!
//! Saving is only sound on a vCPU that is outside `KVM_RUN` and has completed the
//! port or MMIO read of its last exit (see
//! [`RunningVm::pause_for_snapshot`](crate::RunningVm::pause_for_snapshot)): the
//! data of such a read reaches the registers only on the next entry.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The version of [`VcpuState`]'s layout in a snapshot.
pub const VCPU_STATE_VERSION: u32 = 1;
/// The version of [`VmState`]'s layout in a snapshot.
pub const VM_STATE_VERSION: u32 = 1;

/// `IA32_TSC`.
const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_TSC_DEADLINE`: restored after the TSC it counts against.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// At most this many CPUID entries are read back from a vCPU.
const MAX_CPUID_ENTRIES: usize = 256;

/// A KVM call that failed while saving or restoring state.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StateError {
    /// KVM refused `what` on vCPU `vcpu` (or the VM, when `vcpu` is `None`).
    #[error("KVM refused to {what}{}", vcpu.map(|v| format!(" on vCPU {v}")).unwrap_or_default())]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The vCPU, if any.
        vcpu: Option<u32>,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM set only some of the MSRs.
    #[error("KVM set {set} of {total} MSRs on vCPU {vcpu}; it refused MSR {msr:#x}")]
    Msr {
        /// The vCPU.
        vcpu: u32,
        /// How many were set.
        set: usize,
        /// How many there were.
        total: usize,
        /// The first one refused.
        msr: u32,
    },
    /// A list too long for KVM's fixed-size arrays (a corrupted or foreign state).
    #[error("{what}: {len} entries is more than KVM takes")]
    TooMany {
        /// Which list.
        what: &'static str,
        /// Its length.
        len: usize,
    },
}

fn kvm(what: &'static str, vcpu: Option<u32>) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, vcpu, source }
}

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID table the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Running, halted, waiting for SIPI, ...
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (the legacy 4 KiB XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Every saveable MSR the vCPU answered, in the order they are restored.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs and SMIs, and the interrupt shadow.
    pub events: kvm_vcpu_events,
    /// The guest TSC frequency, where KVM reports one.
    pub tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .field("cpuid", &self.cpuid.len())
            .finish_non_exhaustive()
    }
}

/// The MSRs worth saving: every index KVM lists as saveable (KVM_GET_MSR_INDEX_LIST),
/// read once per VMM (the list is the host's).
pub fn saveable_msrs(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(self::kvm("list the saveable MSRs", None))?;
    let mut msrs: Vec<u32> = list.as_slice().to_vec();
    // The TSC first, its deadline last.
    msrs.sort_by_key(|&m| match m {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    Ok(msrs)
}

/// Read the MSRs of `indices` that the vCPU answers: KVM stops a read at the first
/// MSR it refuses (one this vCPU's CPUID does not have), which is skipped.
fn read_msrs(fd: &VcpuFd, index: u32, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut start = 0;
    while start < indices.len() {
        let end = (start + kvm_bindings::KVM_MAX_MSR_ENTRIES).min(indices.len());
        let entries: Vec<kvm_msr_entry> = indices[start..end]
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::TooMany {
            what: "MSRs",
            len: entries.len(),
        })?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(kvm("read the MSRs", Some(index)))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        start += read;
        if start < end {
            // KVM refused indices[start]: skip it.
            start += 1;
        }
    }
    Ok(out)
}

impl VcpuState {
    /// Read vCPU `index`'s state from `fd` (see the module documentation for when this
    /// is sound), with the MSRs of `msrs` ([`saveable_msrs`]) that it answers.
    pub fn save(fd: &VcpuFd, index: u32, msrs: &[u32]) -> Result<Self, StateError> {
        let v = Some(index);
        let mp_state = fd.get_mp_state().map_err(kvm("read the MP state", v))?;
        let regs = fd.get_regs().map_err(kvm("read the registers", v))?;
        let sregs = fd
            .get_sregs()
            .map_err(kvm("read the special registers", v))?;
        let xsave = fd.get_xsave().map_err(kvm("read the XSAVE area", v))?;
        let xcrs = fd.get_xcrs().map_err(kvm("read the XCRs", v))?;
        let debug_regs = fd
            .get_debug_regs()
            .map_err(kvm("read the debug registers", v))?;
        let lapic = fd.get_lapic().map_err(kvm("read the local APIC", v))?;
        let tsc_khz = fd.get_tsc_khz().ok();
        let cpuid = fd
            .get_cpuid2(MAX_CPUID_ENTRIES)
            .map_err(kvm("read the CPUID table", v))?
            .as_slice()
            .to_vec();
        let msrs = read_msrs(fd, index, msrs)?;
        let events = fd
            .get_vcpu_events()
            .map_err(kvm("read the pending events", v))?;
        Ok(VcpuState {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
            tsc_khz,
        })
    }

    /// Put this state into vCPU `index` (`fd`), freshly created in a VM whose memory
    /// and in-kernel devices are being restored with it.
    pub fn restore(&self, fd: &VcpuFd, index: u32) -> Result<(), StateError> {
        let v = Some(index);
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| StateError::TooMany {
            what: "CPUID entries",
            len: self.cpuid.len(),
        })?;
        fd.set_cpuid2(&cpuid)
            .map_err(kvm("set the CPUID table", v))?;
        if let Some(khz) = self.tsc_khz {
            // A host whose TSC runs at another rate may refuse to scale: the guest then
            // sees the host's rate, as it would after a migration without scaling.
            if let Err(e) = fd.set_tsc_khz(khz) {
                log::warn!("vCPU {index}: KVM would not set the TSC to {khz} kHz: {e}");
            }
        }
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("set the MP state", v))?;
        fd.set_regs(&self.regs)
            .map_err(kvm("set the registers", v))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm("set the special registers", v))?;
        // SAFETY: `kvm_xsave` is the legacy 4 KiB area, which KVM_SET_XSAVE reads
        // whole and no further; its contents came from KVM_GET_XSAVE on a vCPU with
        // the CPUID just set, and KVM checks the header's feature bits against it.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("set the XSAVE area", v))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("set the XCRs", v))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(kvm("set the debug registers", v))?;
        fd.set_lapic(&self.lapic)
            .map_err(kvm("set the local APIC", v))?;
        for chunk in self.msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| StateError::TooMany {
                what: "MSRs",
                len: chunk.len(),
            })?;
            let set = fd.set_msrs(&msrs).map_err(kvm("set the MSRs", v))?;
            if set != chunk.len() {
                return Err(StateError::Msr {
                    vcpu: index,
                    set,
                    total: chunk.len(),
                    msr: chunk[set].index,
                });
            }
        }
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("set the pending events", v))?;
        Ok(())
    }
}

impl vmcraft_snapshot::Versioned for VcpuState {
    const VERSION: u32 = VCPU_STATE_VERSION;
}

impl vmcraft_snapshot::Versioned for VmState {
    const VERSION: u32 = VM_STATE_VERSION;
}

/// The VM-wide state KVM holds: its in-kernel interrupt controllers, PIT and clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The master and slave PICs and the IOAPIC, in that order.
    pub irqchips: Vec<kvm_irqchip>,
    /// The PIT's channels.
    pub pit: kvm_pit_state2,
    /// The KVM clock (kvmclock's base).
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl VmState {
    /// Read the VM's in-kernel device state (with every vCPU paused).
    pub fn save(vm: &VmFd) -> Result<Self, StateError> {
        let mut irqchips = Vec::with_capacity(CHIPS.len());
        for chip_id in CHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(kvm("read the interrupt controllers", None))?;
            irqchips.push(chip);
        }
        Ok(VmState {
            irqchips,
            pit: vm.get_pit2().map_err(kvm("read the PIT", None))?,
            clock: vm.get_clock().map_err(kvm("read the KVM clock", None))?,
        })
    }

    /// Put this state into `vm` (created with its irqchip and PIT, vCPUs not yet
    /// running).
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        if self.irqchips.len() != CHIPS.len()
            || self
                .irqchips
                .iter()
                .zip(CHIPS)
                .any(|(c, id)| c.chip_id != id)
        {
            return Err(StateError::TooMany {
                what: "interrupt controllers (PIC master, PIC slave, IOAPIC expected)",
                len: self.irqchips.len(),
            });
        }
        for chip in &self.irqchips {
            vm.set_irqchip(chip)
                .map_err(kvm("set the interrupt controllers", None))?;
        }
        vm.set_pit2(&self.pit).map_err(kvm("set the PIT", None))?;
        // Only the clock's value: the host TSC and real-time stamps it was read with
        // belong to the host it was read on.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(kvm("set the KVM clock", None))?;
        Ok(())
    }
}
