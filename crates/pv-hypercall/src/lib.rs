//! Paravirtual building blocks for vmcraft VMMs, after Xen's split-driver model.
//!
//! * [`ring`]: shared request/response rings, layout-compatible with Xen's
//!   `io/ring.h`, generic over the request and response types, with Xen's
//!   notification suppression; the protocol comes from the `no_std` crate
//!   [`vmcraft_pv_wire`], which guests compile too, and this crate adds the memories
//!   a host reaches a ring through.
//! * [`hypercall`]: hypercalls trapped through a port write, decoded from the
//!   guest's registers in Xen's x86-64 convention, dispatched through a table the
//!   embedding program extends.
//! * [`grant`]: grant tables v1: map, unmap and copy with checks on domid,
//!   the read-only flag and the in-use marks.
//! * [`blkif`]: the PV block backend (Xen's blkif protocol, granted pages, a
//!   raw file; flushes acknowledged once durable).
//! * [`console`]: the PV console backend on Xen's console page layout.
//! * [`layout`]: where a PV machine's shared pages are, and its doorbell port.
//! * [`evtchn`]: event channels, Xen's 2-level ABI, with upcalls through an
//!   irqfd and backends woken through eventfds.
//! * [`reservation`]: a guest's memory reservation (`XENMEM_decrease_reservation` and
//!   kin): the paravirtual balloon.
//! * [`hvm`]: `HYPERVISOR_hvm_op` as an HVM guest's Xen drivers use it: where the
//!   xenstore and console rings are, how upcalls are delivered.
//! * [`hvm_guest`]: the whole hypercall table of an HVM guest using its own Xen
//!   drivers, from the parts above.
//! * [`sched`]: `HYPERVISOR_sched_op`: yield, and shutdown with its reason.
//! * [`xen_cpuid`]: the CPUID leaves by which an HVM guest finds Xen, placed beside
//!   KVM's.
//! * [`xenstore`]: the xenstore protocol and store (Xen's `io/xs_wire.h`): the tree
//!   where split drivers meet, with permissions, watches, transactions and quotas.
pub mod blkif;
pub mod console;
pub mod evtchn;
pub mod grant;
pub mod hvm;
pub mod hvm_guest;
pub mod hypercall;
pub mod layout;
pub mod physmap;
pub mod reservation;
pub mod ring;
pub mod sched;
pub mod version;
pub mod xen_cpuid;
pub mod xenstore;
