#![doc = include_str!("../README.md")]
// docs.rs (and `.ci/run`) build the docs with `--cfg docsrs` on nightly: each item
// behind a feature is marked with the feature it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(not(target_arch = "x86_64"))]
compile_error!("vmcraft runs x86-64 guests on KVM and builds only for x86_64 Linux hosts");

#[cfg(feature = "api")]
pub use vmcraft_api as api;
#[cfg(feature = "machine")]
pub use vmcraft_balancer as balancer;
#[cfg(feature = "devices")]
pub use vmcraft_block as block;
#[cfg(feature = "devices")]
pub use vmcraft_devices as devices;
#[cfg(feature = "memory")]
pub use vmcraft_memory as memory;
#[cfg(feature = "pv")]
pub use vmcraft_pv_hypercall as pv;
pub use vmcraft_sandbox as sandbox;
#[cfg(feature = "scheduler")]
pub use vmcraft_scheduler as scheduler;
#[cfg(feature = "vcpu")]
pub use vmcraft_vcpu as vcpu;

#[cfg(feature = "machine")]
pub mod acpi;
#[cfg(feature = "api")]
pub mod api_config;
#[cfg(feature = "machine")]
pub mod balancing;
#[cfg(feature = "machine")]
pub mod builder;
#[cfg(feature = "machine")]
pub mod config;
#[cfg(feature = "machine")]
pub mod configure;
#[cfg(feature = "machine")]
pub mod machine;
#[cfg(feature = "machine")]
pub mod migration;
#[cfg(feature = "machine")]
pub mod pci_machine;
#[cfg(feature = "machine")]
pub mod pv_machine;
#[cfg(feature = "machine")]
pub mod snapshot;
#[cfg(feature = "machine")]
pub mod xen_hvm;
