//! From an HTTP request to a typed [`ApiRequest`]: the path and method say which, the
//! body is parsed into that request's type, and an id in the path must be the body's.
//! What the API does not have is refused with the reason, as Firecracker words it
//! where its tooling matches on the words.
//!
//! ```
//! use vmcraft_api::http::{HttpRequest, Method};
//! use vmcraft_api::routes::{route, ApiRequest};
//! let req = HttpRequest {
//!     method: Method::Put,
//!     path: "/machine-config".into(),
//!     body: br#"{"vcpu_count":1,"mem_size_mib":128}"#.to_vec(),
//!     close: false,
//! };
//! assert!(matches!(route(&req), Ok(ApiRequest::PutMachineConfig(_))));
//! ```

use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::http::{HttpRequest, Method};
use crate::types::*;

/// A request of the API, its body parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // each variant is the path and method it names
pub enum ApiRequest {
    GetInstanceInfo,
    GetVersion,
    GetMachineConfig,
    GetVmConfig,
    GetBalloon,
    GetBalloonStats,
    PutMachineConfig(MachineConfiguration),
    PatchMachineConfig(MachineConfigurationUpdate),
    PutBootSource(BootSource),
    PutDrive(Drive),
    PatchDrive(PartialDrive),
    PutNetworkInterface(NetworkInterface),
    PatchNetworkInterface(PartialNetworkInterface),
    PutVsock(Vsock),
    PutBalloon(Balloon),
    PatchBalloon(BalloonUpdate),
    PatchBalloonStats(BalloonStatsUpdate),
    PutAction(InstanceActionInfo),
    PatchVm(Vm),
    PutSnapshotCreate(SnapshotCreateParams),
    PutSnapshotLoad(SnapshotLoadParams),
    PutLogger(Logger),
    PutMetrics(Metrics),
    /// `GET /vmcraft/machine`: the machine in vmcraft's own configuration format.
    GetVmcraftMachine,
    /// `PUT /vmcraft/machine`: the whole machine in vmcraft's own configuration
    /// format (the JSON text, an object; its fields are the embedding VMM's to check).
    PutVmcraftMachine(String),
    PutMigrateSend(MigrateSend),
    PutMigrateReceive(MigrateReceive),
    GetBalancer,
}

/// Why a request has no meaning for the API (answered with 400, or 404 for a path it
/// does not have).
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RouteError {
    /// No such path.
    #[error("invalid request: the path {0} is not part of the API")]
    NotFound(String),
    /// A path of Firecracker's API that vmcraft does not have at all.
    #[error("{path}: {what} is not supported by vmcraft")]
    Unsupported {
        /// The path.
        path: String,
        /// What it is.
        what: &'static str,
    },
    /// The path exists, not with this method.
    #[error("invalid request method {method:?} for {path} (it takes {allowed})")]
    Method {
        /// The method.
        method: Method,
        /// The path.
        path: String,
        /// The methods it takes.
        allowed: &'static str,
    },
    /// The body is not the request's type.
    #[error("an error occurred when deserializing the json body of a request: {0}")]
    Body(String),
    /// A request that takes a body came without one.
    #[error("empty body for {0}")]
    EmptyBody(String),
    /// The path's id and the body's differ.
    #[error("the id from the path ({path}) does not match the id from the body ({body})")]
    IdMismatch {
        /// The path's.
        path: String,
        /// The body's.
        body: String,
    },
}

impl RouteError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            RouteError::NotFound(_) => 404,
            _ => 400,
        }
    }
}

fn body<T: DeserializeOwned>(req: &HttpRequest) -> Result<T, RouteError> {
    if req.body.is_empty() {
        return Err(RouteError::EmptyBody(req.path.clone()));
    }
    serde_json::from_slice(&req.body).map_err(|e| RouteError::Body(e.to_string()))
}

fn same_id(path: &str, body: &str) -> Result<(), RouteError> {
    if path == body {
        Ok(())
    } else {
        Err(RouteError::IdMismatch {
            path: path.to_string(),
            body: body.to_string(),
        })
    }
}

/// The request `req` is. See the [module documentation](self).
pub fn route(req: &HttpRequest) -> Result<ApiRequest, RouteError> {
    use ApiRequest as R;
    use Method::{Get, Patch, Put};
    let path = req.path.trim_end_matches('/');
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    let unsupported = |what: &'static str| {
        Err(RouteError::Unsupported {
            path: req.path.clone(),
            what,
        })
    };
    let wrong = |allowed: &'static str| {
        Err(RouteError::Method {
            method: req.method,
            path: req.path.clone(),
            allowed,
        })
    };
    Ok(match (parts.as_slice(), req.method) {
        ([] | [""], Get) => R::GetInstanceInfo,
        ([] | [""], _) => return wrong("GET"),
        (["version"], Get) => R::GetVersion,
        (["machine-config"], Get) => R::GetMachineConfig,
        (["machine-config"], Put) => R::PutMachineConfig(body(req)?),
        (["machine-config"], Patch) => R::PatchMachineConfig(body(req)?),
        (["vm", "config"], Get) => R::GetVmConfig,
        (["boot-source"], Put) => R::PutBootSource(body(req)?),
        (["drives", id], Put) => {
            let d: Drive = body(req)?;
            same_id(id, &d.drive_id)?;
            R::PutDrive(d)
        }
        (["drives", id], Patch) => {
            let d: PartialDrive = body(req)?;
            same_id(id, &d.drive_id)?;
            R::PatchDrive(d)
        }
        (["network-interfaces", id], Put) => {
            let n: NetworkInterface = body(req)?;
            same_id(id, &n.iface_id)?;
            R::PutNetworkInterface(n)
        }
        (["network-interfaces", id], Patch) => {
            let n: PartialNetworkInterface = body(req)?;
            same_id(id, &n.iface_id)?;
            R::PatchNetworkInterface(n)
        }
        (["vsock"], Put) => R::PutVsock(body(req)?),
        (["balloon"], Get) => R::GetBalloon,
        (["balloon"], Put) => R::PutBalloon(body(req)?),
        (["balloon"], Patch) => R::PatchBalloon(body(req)?),
        (["balloon", "statistics"], Get) => R::GetBalloonStats,
        (["balloon", "statistics"], Patch) => R::PatchBalloonStats(body(req)?),
        (["actions"], Put) => R::PutAction(body(req)?),
        (["vm"], Patch) => R::PatchVm(body(req)?),
        (["snapshot", "create"], Put) => R::PutSnapshotCreate(body(req)?),
        (["snapshot", "load"], Put) => R::PutSnapshotLoad(body(req)?),
        (["logger"], Put) => R::PutLogger(body(req)?),
        (["metrics"], Put) => R::PutMetrics(body(req)?),
        // vmcraft's own, under its prefix.
        (["vmcraft", "machine"], Get) => R::GetVmcraftMachine,
        (["vmcraft", "machine"], Put) => {
            let machine: serde_json::Value = body(req)?;
            if !machine.is_object() {
                return Err(RouteError::Body(
                    "the machine is a JSON object (vmcraft's MachineConfig)".into(),
                ));
            }
            R::PutVmcraftMachine(machine.to_string())
        }
        (["vmcraft", "migrate", "send"], Put) => R::PutMigrateSend(match req.body.is_empty() {
            true => MigrateSend::default(),
            false => body(req)?,
        }),
        (["vmcraft", "migrate", "receive"], Put) => R::PutMigrateReceive(body(req)?),
        (["vmcraft", "balancer"], Get) => R::GetBalancer,
        (["vmcraft", "machine"], _) => return wrong("GET, PUT"),
        (["vmcraft", "migrate", "send" | "receive"], _) => return wrong("PUT"),
        (["vmcraft", "balancer"], _) => return wrong("GET"),
        // Known paths with another method.
        (["version"] | ["vm", "config"] | ["balloon", "statistics"], _) => return wrong("GET"),
        (
            ["boot-source"]
            | ["vsock"]
            | ["actions"]
            | ["snapshot", "create"]
            | ["snapshot", "load"]
            | ["logger"]
            | ["metrics"],
            _,
        ) => return wrong("PUT"),
        (["drives", _] | ["network-interfaces", _], _) => return wrong("PUT, PATCH"),
        (["vm"], _) => return wrong("PATCH"),
        // Firecracker's paths for what vmcraft does not have: a 400 that says so.
        (["mmds", ..], _) => return unsupported("the microVM metadata service (MMDS)"),
        (["entropy"], _) => {
            return unsupported("a rate-limited entropy device (--rng gives virtio-rng)")
        }
        (["cpu-config"], _) => return unsupported("a custom CPU template"),
        // Paths of Firecracker's API after v1.4.
        (["balloon", "hinting", ..], _) => {
            return unsupported("free page hinting (the balloon reports free pages instead)")
        }
        (["pmem", ..], _) => return unsupported("a virtio-pmem device"),
        (["serial"], _) => return unsupported("a serial output file (COM1 goes to stdout)"),
        (["hotplug", ..], _) => return unsupported("memory hotplug"),
        _ => return Err(RouteError::NotFound(req.path.clone())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, path: &str, body: &str) -> HttpRequest {
        HttpRequest {
            method,
            path: path.into(),
            body: body.as_bytes().to_vec(),
            close: false,
        }
    }

    #[test]
    fn the_sdk_boot_sequence_routes() {
        use Method::*;
        let seq = [
            req(Get, "/machine-config", ""),
            req(
                Put,
                "/logger",
                r#"{"log_path":"/tmp/fc.log","level":"Debug"}"#,
            ),
            req(Put, "/metrics", r#"{"metrics_path":"/tmp/fc.metrics"}"#),
            req(
                Put,
                "/machine-config",
                r#"{"vcpu_count":2,"mem_size_mib":256,"smt":false}"#,
            ),
            req(
                Put,
                "/boot-source",
                r#"{"kernel_image_path":"/k","boot_args":"console=ttyS0"}"#,
            ),
            req(
                Put,
                "/drives/rootfs",
                r#"{"drive_id":"rootfs","path_on_host":"/r","is_root_device":true,"is_read_only":false}"#,
            ),
            req(
                Put,
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#,
            ),
            req(Put, "/vsock", r#"{"guest_cid":3,"uds_path":"/tmp/v.sock"}"#),
            req(Put, "/actions", r#"{"action_type":"InstanceStart"}"#),
            req(Patch, "/vm", r#"{"state":"Paused"}"#),
            req(
                Put,
                "/snapshot/create",
                r#"{"snapshot_path":"/s","mem_file_path":"/m"}"#,
            ),
            req(
                Put,
                "/snapshot/load",
                r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"File","backend_path":"/m"},"resume_vm":true}"#,
            ),
            req(
                Patch,
                "/drives/rootfs",
                r#"{"drive_id":"rootfs","path_on_host":"/r2"}"#,
            ),
            req(
                Put,
                "/balloon",
                r#"{"amount_mib":64,"deflate_on_oom":true}"#,
            ),
            req(Get, "/balloon/statistics", ""),
            req(Get, "/version", ""),
            req(Get, "/", ""),
            req(Get, "/vm/config", ""),
        ];
        for r in &seq {
            assert!(
                route(r).is_ok(),
                "{} {}: {:?}",
                r.path,
                r.body.len(),
                route(r)
            );
        }
        assert_eq!(route(&seq[16]), Ok(ApiRequest::GetInstanceInfo));
    }

    #[test]
    fn refusals_name_their_cause() {
        use Method::*;
        assert_eq!(
            route(&req(
                Put,
                "/drives/a",
                r#"{"drive_id":"b","path_on_host":"/r","is_root_device":true,"is_read_only":false}"#
            )),
            Err(RouteError::IdMismatch {
                path: "a".into(),
                body: "b".into()
            })
        );
        assert_eq!(route(&req(Get, "/nope", "")).unwrap_err().status(), 404);
        // Firecracker's paths for what vmcraft lacks: 400, saying what.
        for (m, p) in [
            (Put, "/mmds"),
            (Get, "/mmds"),
            (Put, "/mmds/config"),
            (Put, "/entropy"),
            (Put, "/cpu-config"),
            (Patch, "/balloon/hinting/start"),
            (Put, "/pmem/p0"),
            (Put, "/serial"),
            (Get, "/hotplug/memory"),
        ] {
            let e = route(&req(m, p, "{}")).unwrap_err();
            assert_eq!(e.status(), 400, "{p}");
            assert!(e.to_string().contains("not supported by vmcraft"), "{e}");
        }
        let e = route(&req(Get, "/actions", "")).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("invalid request method"));
        let e = route(&req(Put, "/machine-config", "")).unwrap_err();
        assert_eq!(e, RouteError::EmptyBody("/machine-config".into()));
        let e = route(&req(
            Put,
            "/machine-config",
            r#"{"vcpu_count":"two","mem_size_mib":1}"#,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("deserializing"), "{e}");
        assert!(route(&req(Put, "/", "")).is_err());
        assert!(route(&req(Put, "/vm", r#"{"state":"Paused"}"#)).is_err());
        assert_eq!(
            route(&req(Get, "/machine-config/", "")),
            Ok(ApiRequest::GetMachineConfig),
            "a trailing slash"
        );
    }

    #[test]
    fn vmcrafts_own_paths_route_under_their_prefix() {
        use Method::*;
        assert_eq!(
            route(&req(Get, "/vmcraft/machine", "")),
            Ok(ApiRequest::GetVmcraftMachine)
        );
        assert_eq!(
            route(&req(Put, "/vmcraft/machine", r#"{"memory_mib": 64}"#)),
            Ok(ApiRequest::PutVmcraftMachine(r#"{"memory_mib":64}"#.into()))
        );
        assert!(route(&req(Put, "/vmcraft/machine", "[1]"))
            .unwrap_err()
            .to_string()
            .contains("JSON object"));
        assert_eq!(
            route(&req(Put, "/vmcraft/migrate/send", "")),
            Ok(ApiRequest::PutMigrateSend(MigrateSend::default()))
        );
        assert_eq!(
            route(&req(
                Put,
                "/vmcraft/migrate/send",
                r#"{"max_bandwidth_mib_s": 100}"#
            )),
            Ok(ApiRequest::PutMigrateSend(MigrateSend {
                max_bandwidth_mib_s: Some(100)
            }))
        );
        assert!(route(&req(Put, "/vmcraft/migrate/send", r#"{"to": "x"}"#)).is_err());
        assert_eq!(
            route(&req(
                Put,
                "/vmcraft/migrate/receive",
                r#"{"listen": "0.0.0.0:4444"}"#
            )),
            Ok(ApiRequest::PutMigrateReceive(MigrateReceive {
                listen: "0.0.0.0:4444".into()
            }))
        );
        assert_eq!(
            route(&req(Get, "/vmcraft/balancer", "")),
            Ok(ApiRequest::GetBalancer)
        );
        for (m, p) in [
            (Patch, "/vmcraft/machine"),
            (Get, "/vmcraft/migrate/send"),
            (Put, "/vmcraft/balancer"),
        ] {
            let e = route(&req(m, p, "{}")).unwrap_err();
            assert!(e.to_string().contains("invalid request method"), "{p}: {e}");
        }
        assert_eq!(
            route(&req(Get, "/vmcraft/other", "")).unwrap_err().status(),
            404
        );
    }
}
