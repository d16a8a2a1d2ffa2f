//! PCI: a root complex with one bus ([`root`]), each function's configuration space
//! ([`config`]) and MSI-X ([`msix`]).
//!
//! The configuration-space model is vmcraft's own: the published crates for it are
//! either parts of a VMM's tree that are not released on their own (Cloud
//! Hypervisor's `pci`, crosvm's `devices::pci`), or tied to another stack of
//! rust-vmm crate versions (Dragonball's `dbs-pci`, not on the registry this project
//! builds from); none is a small, kept crate on this workspace's `vm-device` and
//! `vm-memory`. What is here is plain data with a writable mask per bit, unit tested
//! and fuzzed without KVM.

pub mod config;
pub mod msix;
pub mod root;
