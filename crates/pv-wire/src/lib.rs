//! The wire formats a paravirtual guest and its host share, in `no_std` Rust with no
//! dependencies, so that a guest kernel compiles the same source the VMM's back ends
//! run:
//!
//! * [`ring`]: shared request/response rings, layout-compatible with Xen's
//!   `io/ring.h`, generic over the entry types, with ring.h's notification
//!   suppression; both ends check the other's indices.
//! * [`blkif`]: Xen's block protocol (`io/blkif.h`): requests, segments, responses,
//!   operation and status codes.
//! * [`xen`]: the argument structures of the Xen hypercalls a guest makes.
//!
//! The host side (rings in guest memory, the blkif back end, grants, event channels)
//! is `vmcraft-pv-hypercall`, which re-exports these modules.
#![no_std]

pub mod blkif;
pub mod ring;
pub mod xen;
