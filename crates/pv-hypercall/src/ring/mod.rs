//! Shared request/response rings, layout-compatible with Xen's `io/ring.h`: the
//! protocol from [`vmcraft_pv_wire::ring`] (re-exported here), and the memories a
//! host reaches a ring through: guest memory, or a private mapping two host threads
//! share.
//!
//! ```
//! use vmcraft_pv_hypercall::ring::{BackRing, Entry, FrontRing, HostRingMemory};
//!
//! #[derive(Debug, Clone, Copy, PartialEq)]
//! struct Ping(u64);
//! impl Entry for Ping {
//!     const SIZE: usize = 8;
//!     fn encode(&self, out: &mut [u8]) { out[..8].copy_from_slice(&self.0.to_le_bytes()) }
//!     fn decode(b: &[u8]) -> Self { Ping(u64::from_le_bytes(b[..8].try_into().unwrap())) }
//! }
//!
//! let page = HostRingMemory::new(4096).unwrap();
//! let mut front = FrontRing::<_, Ping, Ping>::init(page.clone()).unwrap();
//! let mut back = BackRing::<_, Ping, Ping>::attach(page).unwrap();
//! front.push_request(&Ping(7)).unwrap();
//! front.publish_requests();
//! let req = back.pop_request().unwrap().unwrap();
//! back.push_response(&Ping(req.0 * 6)).unwrap();
//! back.publish_responses();
//! assert_eq!(front.pop_response().unwrap(), Some(Ping(42)));
//! ```

pub use vmcraft_pv_wire::ring::*;

mod guest;
pub use guest::{GuestRingMemory, HostRingMemory, VmRingMemory};
