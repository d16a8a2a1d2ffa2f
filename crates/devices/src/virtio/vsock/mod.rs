//! virtio-vsock (virtio 1.2 §5.10), in parts: [`wire`], the packet format and the
//! checks every header from the guest passes; [`conn`], one stream's state and credit
//! both ways, plain code; [`hybrid`], Firecracker's host side on Unix sockets (its
//! command line read, bounded). The device on its queues builds on them.

pub mod conn;
pub mod hybrid;
pub mod muxer;
pub mod wire;
