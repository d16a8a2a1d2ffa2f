//! Memory balancing across VMs, as the thesis this project grew from describes it: watch
//! each VM's use, predict its need, and give the rest back to the host, within each
//! VM's floor and ceiling.
//!
//! * [`policy`]: the balancer, pure and deterministic: from each VM's reported use and
//!   the host's memory pressure it computes balloon targets (the pages each VM may
//!   keep). The model: an asymmetric working-set estimate (it follows a rise at once,
//!   a fall slowly) plus headroom that shrinks as the host's pressure grows; targets
//!   within each VM's floor and ceiling, scaled to the host's budget, changed only
//!   when the change is worth a balloon operation.
//! * [`psi`]: the host's memory pressure, from `/proc/pressure/memory`.
//! * [`sim`]: a simulator of VMs whose working sets rise and fall, to measure what the
//!   policy saves against static allocation and what it costs the guests.
//!
//! ```
//! use vmcraft_balancer::policy::{Balancer, BalancerConfig, HostReport, VmLimits, VmReport};
//!
//! let limits = [VmLimits { floor: 8_192, ceiling: 65_536 }; 2];
//! let mut b = Balancer::new(BalancerConfig::default(), &limits);
//! let host = HostReport { budget: 131_072, pressure: 0.0 };
//! // One VM uses 10,000 pages, the other 40,000: each keeps its use plus headroom.
//! let targets = b.step(&host, &[VmReport { used: 10_000 }, VmReport { used: 40_000 }]);
//! assert!(targets[0] >= 10_000 && targets[0] < 16_000);
//! assert!(targets[1] >= 40_000 && targets[1] < 50_000);
//! ```

pub mod policy;
pub mod psi;
pub mod sim;
