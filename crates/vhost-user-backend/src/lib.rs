//! vmcraft's virtio devices served to another VMM (QEMU, Cloud Hypervisor, crosvm,
//! vmcraft's own [`VhostUser`](vmcraft_devices::virtio::vhost_user::VhostUser)
//! frontend) as vhost-user backends, on rust-vmm's `vhost-user-backend` crate.
//!
//! [`Backend`] is the vhost-user side of any [`ServedDevice`]: the protocol, the
//! vrings and the frontend's memory table are the crate's; each queue is served by
//! the same code that serves it inside vmcraft's VMM
//! ([`vmcraft_devices::virtio::block::serve_queue`],
//! [`vmcraft_devices::virtio::rng::serve_queue`]), on guest memory mapped from the
//! frontend's memory files ([`vmcraft_memory::map_shared_regions`], which refuses a
//! region its file does not cover). A queue whose driver breaks the virtio protocol
//! stops being served (logged); the others go on.
//!
//! Devices: [`devices::BlockDevice`], [`devices::RngDevice`], [`devices::ConsoleDevice`].
//!
//! The `vmcraft-vhost-user-backend` binary runs one device for one frontend, jailed
//! and under its seccomp filter.

pub mod backend;
pub mod devices;

pub use backend::{Backend, ServedDevice};
