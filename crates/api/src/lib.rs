//! The control API of a vmcraft VMM as Firecracker's tooling speaks it
//! (firecracker-go-sdk, firectl, Kata Containers, firecracker-containerd): HTTP/1.1
//! on a Unix socket, JSON bodies, 204 on success, 400 with `{"fault_message": ...}`
//! on error.
//!
//! * [`types`]: the request and response bodies (Firecracker's API v1.4.1).
//! * [`http`]: reading bounded requests off a stream, writing responses.
//! * [`routes`]: from path, method and body to a typed [`routes::ApiRequest`].
//! * [`metrics`]: the lines of the metrics file, in Firecracker's format.
//! * [`server`]: a Unix socket served by one thread, several clients in turn.
//! * [`client`]: one request and its answer, for programs that drive a VMM.
//!
//! A separate crate so that an embedder that wants the API takes it without the
//! machine, and one that does not pays nothing for it: it needs only serde,
//! serde_json and httparse (a request parser with no dependencies of its own), no
//! async runtime and no threads of its own. What a request does to a machine is the
//! embedding program's: the `vmcraft` crate's glue maps the pre-boot requests onto a
//! `MachineConfig`.

pub mod client;
pub mod http;
pub mod metrics;
pub mod routes;
pub mod server;
pub mod types;
