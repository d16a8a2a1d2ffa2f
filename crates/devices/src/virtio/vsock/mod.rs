//! virtio-vsock (virtio 1.2 §5.10) with Firecracker's host side ("hybrid vsock":
//! connections as Unix socket streams), in parts: [`wire`], the packet format and the
//! checks every header from the guest passes; [`conn`], one stream's state and credit
//! both ways, plain code; [`hybrid`], the host side's command line (read bounded) and
//! its client; [`muxer`], the connections of one device and their bounds; [`door`],
//! the one thread that makes sockets; [`device`], the device on its queues.
//!
//! ```no_run
//! use std::sync::Arc;
//! use vmcraft_devices::virtio::vsock::{device::Vsock, door::{BoundSocket, Door}, muxer::Limits};
//!
//! let uds = std::path::Path::new("/run/vm1/v.sock");
//! let door = Arc::new(Door::open(BoundSocket::bind(uds)?)?);
//! let device = Vsock::new(3, door, Limits::default(), "vsock")?;
//! // Put `device` on a transport; then the host reaches the guest's port 52 with
//! let (stream, host_port) = vmcraft_devices::virtio::vsock::hybrid::connect(uds, 52)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod conn;
pub mod device;
pub mod door;
pub mod hybrid;
pub mod muxer;
pub mod wire;
