//! Paravirtual building blocks for vmcraft VMMs, after Xen's split-driver model.
//!
//! * [`ring`]: shared request/response rings, layout-compatible with Xen's
//!   `io/ring.h`, generic over the request and response types, with Xen's
//!   notification suppression. The front end and the ring core are `no_std` (build
//!   without the default `std` feature), so guest code can use them too.
//! * [`hypercall`] (std): hypercalls trapped through a port write, decoded from the
//!   guest's registers in Xen's x86-64 convention, dispatched through a table the
//!   embedding program extends.
//! * [`grant`] (std): grant tables v1: map, unmap and copy with checks on domid,
//!   the read-only flag and the in-use marks.
//! * [`blkif`] (std): the PV block backend (Xen's blkif protocol, granted pages, a
//!   raw file; flushes acknowledged once durable).
//! * [`console`] (std): the PV console backend on Xen's console page layout.
//! * [`layout`]: where a PV machine's shared pages are, and its doorbell port.
//! * [`evtchn`] (std): event channels, Xen's 2-level ABI, with upcalls through an
//!   irqfd and backends woken through eventfds.
#![cfg_attr(not(feature = "std"), no_std)]

#[cfg(feature = "std")]
pub mod blkif;
#[cfg(feature = "std")]
pub mod console;
#[cfg(feature = "std")]
pub mod evtchn;
#[cfg(feature = "std")]
pub mod grant;
#[cfg(feature = "std")]
pub mod hypercall;
pub mod layout;
pub mod ring;
