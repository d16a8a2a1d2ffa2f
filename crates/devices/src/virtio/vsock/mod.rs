//! virtio-vsock (virtio 1.2 §5.10), in parts: [`wire`], the packet format and the
//! checks every header from the guest passes; [`conn`], one stream's state and credit
//! both ways, plain code. The device on its queues and Firecracker's host side on
//! Unix sockets build on them.

pub mod conn;
pub mod wire;
