//! The hypercall table of an unmodified HVM guest using its own Xen drivers (Linux's
//! `arch/x86/xen` and `drivers/xen`): every call such a guest makes, each served by the
//! part of this crate that owns it.
//!
//! ```
//! # use std::sync::Arc;
//! # use vmcraft_pv_hypercall::evtchn::{EventChannels, Upcall};
//! # use vmcraft_pv_hypercall::grant::GrantTable;
//! # use vmcraft_pv_hypercall::hvm::{Callback, HvmParams, UpcallRoute};
//! # use vmcraft_pv_hypercall::hvm_guest::HvmGuestCalls;
//! # use vmcraft_pv_hypercall::hypercall::{HypercallArgs, HypercallContext};
//! # use vmcraft_memory::{layout::MemoryLayout, GuestRam};
//! # struct Quiet;
//! # impl Upcall for Quiet { fn raise(&self, _: u32) {} }
//! # impl UpcallRoute for Quiet {
//! #     fn callback(&self, _: Callback) {}
//! #     fn vcpu_vector(&self, _: u32, _: u8) {}
//! # }
//! let ram = GuestRam::new(&MemoryLayout::x86_64(16 << 20)?)?;
//! let channels = Arc::new(EventChannels::unplaced(ram.memory().clone(), Arc::new(Quiet)));
//! let table = HvmGuestCalls {
//!     channels,
//!     grants: Arc::new(GrantTable::unplaced(ram.memory().clone(), 4, 0)),
//!     params: Arc::new(HvmParams::new(1, (0, 0), (0, 0), Arc::new(Quiet))),
//!     reservation: None,
//!     shutdown: None,
//!     domid: 1,
//!     vcpus: 1,
//! }
//! .table()?;
//! // xen_version(XENVER_version): Xen 4.17.
//! let call = HypercallArgs::from_registers(17, 0, 0, 0, 0, 0);
//! let ctx = HypercallContext::physical(0, ram.memory());
//! assert_eq!(table.dispatch(&ctx, call), 4 << 16 | 17);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::Arc;

use crate::evtchn::EventChannels;
use crate::grant::op::{GrantTableOp, HYPERVISOR_GRANT_TABLE_OP};
use crate::grant::GrantTable;
use crate::hvm::HvmParams;
use crate::hypercall::{HypercallTable, TableError};
use crate::physmap::{MemoryOp, Physmap, VcpuOp, HYPERVISOR_VCPU_OP};
use crate::reservation::Reservation;
use crate::sched::{SchedOps, ShutdownSink};
use crate::version::XenVersion;

/// The parts that serve an HVM guest's Xen hypercalls.
pub struct HvmGuestCalls {
    /// Event channels: `event_channel_op`, the shared-info page `memory_op` places and
    /// the `vcpu_info` areas `vcpu_op` registers.
    pub channels: Arc<EventChannels>,
    /// The grant table: `grant_table_op`, and the frames `memory_op` places.
    pub grants: Arc<GrantTable>,
    /// The HVM parameters and upcall vectors: `hvm_op`.
    pub params: Arc<HvmParams>,
    /// The reservation `memory_op`'s balloon calls change, if served.
    pub reservation: Option<Arc<Reservation>>,
    /// Where `sched_op`'s shutdowns go; without one `sched_op` is not served.
    pub shutdown: Option<Arc<dyn ShutdownSink>>,
    /// The guest's domain id (what `grant_table_op` answers it is).
    pub domid: u16,
    /// Its number of vCPUs (`vcpu_op` refuses the others).
    pub vcpus: u32,
}

impl HvmGuestCalls {
    /// The table: `xen_version`, `memory_op`, `hvm_op`, `event_channel_op`,
    /// `grant_table_op`, `vcpu_op`, and `sched_op` when shutdowns have a sink.
    pub fn table(self) -> Result<HypercallTable, TableError> {
        let mut table = HypercallTable::new();
        table.register_op(Arc::new(XenVersion::default()))?;
        table.register_op(Arc::new(MemoryOp {
            reservation: self.reservation,
            physmap: Some(Physmap::new(self.channels.clone(), self.grants.clone())),
        }))?;
        table.register_op(self.params)?;
        table.register_op(self.channels.clone())?;
        table.register(
            HYPERVISOR_GRANT_TABLE_OP,
            "grant_table_op",
            Arc::new(GrantTableOp::new(self.grants, self.domid)),
        )?;
        table.register(
            HYPERVISOR_VCPU_OP,
            "vcpu_op",
            Arc::new(VcpuOp::new(self.channels, self.vcpus)),
        )?;
        if let Some(sink) = self.shutdown {
            table.register_op(Arc::new(SchedOps::new(sink)))?;
        }
        Ok(table)
    }
}
