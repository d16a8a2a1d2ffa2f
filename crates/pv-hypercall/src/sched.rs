//! `HYPERVISOR_sched_op` (29), Xen's `public/sched.h`: a guest yields, and shuts
//! itself down with a reason (power-off, reboot, crash, ...), which ends the VM.
//! `SCHEDOP_shutdown_code` latches a reason for a later shutdown, as Linux's kexec and
//! crash paths use it. Blocking and polling wait on event channels and come with the
//! event-channel upcall; until then they, like the toolstack's calls, get `-ENOSYS`.
//!
//! `struct sched_shutdown`: `reason` (u32) at 0.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use vmcraft_pv_wire::xen::SchedShutdown;

use crate::hypercall::{HypercallContext, HypercallFault, OpHypercall};

/// `HYPERVISOR_sched_op`.
pub const HYPERVISOR_SCHED_OP: u64 = 29;

/// `SCHEDOP_*` commands.
pub mod op {
    /// Give up the CPU.
    pub const YIELD: u64 = 0;
    /// Wait for an event.
    pub const BLOCK: u64 = 1;
    /// Shut the domain down.
    pub const SHUTDOWN: u64 = 2;
    /// Wait for one of some ports.
    pub const POLL: u64 = 3;
    /// Latch a reason for a later shutdown.
    pub const SHUTDOWN_CODE: u64 = 5;
}

/// Why a guest shut down (`SHUTDOWN_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReason {
    /// 0: it exited normally.
    PowerOff,
    /// 1: restart it.
    Reboot,
    /// 2: save it.
    Suspend,
    /// 3: it crashed.
    Crash,
    /// 4: its watchdog expired.
    Watchdog,
    /// 5: soft reset.
    SoftReset,
}

impl ShutdownReason {
    /// The reason numbered `n`.
    pub fn from_u32(n: u32) -> Option<ShutdownReason> {
        use ShutdownReason::*;
        Some(match n {
            0 => PowerOff,
            1 => Reboot,
            2 => Suspend,
            3 => Crash,
            4 => Watchdog,
            5 => SoftReset,
            _ => return None,
        })
    }
}

/// Where a guest's shutdown goes (the VMM stops the VM).
pub trait ShutdownSink: Send + Sync {
    /// The guest shut down for `reason` (from vCPU `vcpu`).
    fn shutdown(&self, vcpu: u32, reason: ShutdownReason);
}

/// The guest's scheduler operations.
pub struct SchedOps {
    sink: Arc<dyn ShutdownSink>,
    /// A latched reason (`u32::MAX`: none).
    latched: AtomicU32,
}

impl std::fmt::Debug for SchedOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedOps")
            .field("latched", &self.latched.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl SchedOps {
    /// Shutdowns go to `sink`.
    pub fn new(sink: Arc<dyn ShutdownSink>) -> Self {
        SchedOps {
            sink,
            latched: AtomicU32::new(u32::MAX),
        }
    }
}

impl OpHypercall for SchedOps {
    const NR: u64 = HYPERVISOR_SCHED_OP;
    const NAME: &'static str = "sched_op";

    /// One `sched_op` call.
    fn op(
        &self,
        ctx: &HypercallContext<'_>,
        command: u64,
        arg: u64,
    ) -> Result<u64, HypercallFault> {
        match command {
            op::YIELD => {
                std::thread::yield_now();
                Ok(0)
            }
            op::SHUTDOWN | op::SHUTDOWN_CODE => {
                let SchedShutdown { reason: n } = ctx.read_obj(arg)?;
                let reason = ShutdownReason::from_u32(n).ok_or(HypercallFault::Invalid {
                    index: 1,
                    value: u64::from(n),
                })?;
                if command == op::SHUTDOWN_CODE {
                    self.latched.store(n, Ordering::SeqCst);
                } else {
                    // A latched code wins over the one given now, as in Xen.
                    let latched = ShutdownReason::from_u32(self.latched.load(Ordering::SeqCst));
                    self.sink.shutdown(ctx.vcpu, latched.unwrap_or(reason));
                }
                Ok(0)
            }
            other => Err(HypercallFault::Unsupported(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress};
    use vmcraft_memory::GuestMemory;

    #[derive(Default)]
    struct Sink(Mutex<Vec<(u32, ShutdownReason)>>);

    impl ShutdownSink for Sink {
        fn shutdown(&self, vcpu: u32, reason: ShutdownReason) {
            self.0.lock().unwrap().push((vcpu, reason));
        }
    }

    #[test]
    fn a_guest_shuts_down_with_its_reason_or_the_one_it_latched() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let sink = Arc::new(Sink::default());
        let s = SchedOps::new(sink.clone());
        let ctx = HypercallContext::physical(1, &mem);
        assert_eq!(s.op(&ctx, op::YIELD, 0), Ok(0));
        mem.write_obj(0u32, GuestAddress(0x100)).unwrap();
        assert_eq!(s.op(&ctx, op::SHUTDOWN, 0x100), Ok(0));
        mem.write_obj(3u32, GuestAddress(0x104)).unwrap();
        assert_eq!(s.op(&ctx, op::SHUTDOWN_CODE, 0x104), Ok(0));
        assert_eq!(s.op(&ctx, op::SHUTDOWN, 0x100), Ok(0));
        assert_eq!(
            *sink.0.lock().unwrap(),
            [(1, ShutdownReason::PowerOff), (1, ShutdownReason::Crash)]
        );
        // An unknown reason, a bad pointer, what is not served yet.
        mem.write_obj(9u32, GuestAddress(0x108)).unwrap();
        let errno = |r: Result<u64, HypercallFault>| r.unwrap_err().errno();
        assert_eq!(errno(s.op(&ctx, op::SHUTDOWN, 0x108)), 22);
        assert_eq!(errno(s.op(&ctx, op::SHUTDOWN, 1 << 40)), 14);
        assert_eq!(errno(s.op(&ctx, op::BLOCK, 0)), 38);
        assert_eq!(errno(s.op(&ctx, op::POLL, 0)), 38);
        assert_eq!(sink.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn the_table_dispatches_sched_op_here() {
        use crate::hypercall::{HypercallArgs, HypercallTable, TableError};
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let sink = Arc::new(Sink::default());
        let s = Arc::new(SchedOps::new(sink.clone()));
        let mut table = HypercallTable::new();
        table.register_op(s.clone()).unwrap();
        assert!(matches!(
            table.register_op(s.clone()),
            Err(TableError::Taken { nr: 29, .. })
        ));
        let ctx = HypercallContext::physical(0, &mem);
        mem.write_obj(1u32, GuestAddress(0x100)).unwrap();
        let call = |cmd, arg| HypercallArgs::from_registers(HYPERVISOR_SCHED_OP, cmd, arg, 0, 0, 0);
        assert_eq!(table.dispatch(&ctx, call(op::SHUTDOWN, 0x100)), 0);
        assert_eq!(table.dispatch(&ctx, call(op::BLOCK, 0)), -38);
        assert_eq!(*sink.0.lock().unwrap(), [(0, ShutdownReason::Reboot)]);
    }
}
