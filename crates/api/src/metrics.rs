//! The metrics file, as Firecracker writes it: one JSON object per line, flushed
//! periodically and on the `FlushMetrics` action, each line holding the counters since
//! the process started. The figures vmcraft has go under Firecracker's names (its
//! `vcpu` exits, its `*_api_requests` groups with `<path>_count` and `<path>_fails`,
//! the devices' `queue_event_count` and `event_fails`); what it adds is named in its
//! own words (`completed_count`, `interrupt_count`, the per-device `devices` map).
//!
//! ```
//! use vmcraft_api::http::{HttpRequest, Method};
//! use vmcraft_api::metrics::{ApiRequestCounters, MetricsLine};
//! use vmcraft_api::routes::route;
//! let req = HttpRequest { method: Method::Get, path: "/".into(), body: vec![], close: false };
//! let mut api = ApiRequestCounters::default();
//! api.record(&route(&req).unwrap(), 200);
//! let line = MetricsLine { api: api.clone(), ..MetricsLine::default() };
//! assert!(line.to_json_line().contains(r#""get_api_requests":{"instance_info_count":1}"#));
//! ```

use std::collections::BTreeMap;

use serde::Serialize;

use crate::routes::ApiRequest;

/// Requests answered, by Firecracker's groups and names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiRequestCounters {
    get: BTreeMap<&'static str, u64>,
    put: BTreeMap<&'static str, u64>,
    patch: BTreeMap<&'static str, u64>,
}

/// Which group a request counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Get,
    Put,
    Patch,
}

/// The group and Firecracker's `_count` and `_fails` names of `request`.
fn names(request: &ApiRequest) -> (Group, &'static str, &'static str) {
    use ApiRequest as R;
    use Group::*;
    match request {
        R::GetInstanceInfo => (Get, "instance_info_count", "instance_info_fails"),
        R::GetVersion => (Get, "vmm_version_count", "vmm_version_fails"),
        R::GetMachineConfig => (Get, "machine_cfg_count", "machine_cfg_fails"),
        R::GetVmConfig => (Get, "vm_config_count", "vm_config_fails"),
        R::GetBalloon => (Get, "balloon_count", "balloon_fails"),
        R::GetBalloonStats => (Get, "balloon_stats_count", "balloon_stats_fails"),
        R::PutMachineConfig(_) => (Put, "machine_cfg_count", "machine_cfg_fails"),
        R::PatchMachineConfig(_) => (Patch, "machine_cfg_count", "machine_cfg_fails"),
        R::PutBootSource(_) => (Put, "boot_source_count", "boot_source_fails"),
        R::PutDrive(_) => (Put, "drive_count", "drive_fails"),
        R::PatchDrive(_) => (Patch, "drive_count", "drive_fails"),
        R::PutNetworkInterface(_) => (Put, "network_count", "network_fails"),
        R::PatchNetworkInterface(_) => (Patch, "network_count", "network_fails"),
        R::PutVsock(_) => (Put, "vsock_count", "vsock_fails"),
        R::PutBalloon(_) => (Put, "balloon_count", "balloon_fails"),
        R::PatchBalloon(_) => (Patch, "balloon_count", "balloon_fails"),
        R::PatchBalloonStats(_) => (Patch, "balloon_stats_count", "balloon_stats_fails"),
        R::PutAction(_) => (Put, "actions_count", "actions_fails"),
        R::PatchVm(_) => (Patch, "vm_count", "vm_fails"),
        R::PutSnapshotCreate(_) => (Put, "snapshot_create_count", "snapshot_create_fails"),
        R::PutSnapshotLoad(_) => (Put, "snapshot_load_count", "snapshot_load_fails"),
        R::PutLogger(_) => (Put, "logger_count", "logger_fails"),
        R::PutMetrics(_) => (Put, "metrics_count", "metrics_fails"),
        R::GetVmcraftMachine => (Get, "vmcraft_machine_count", "vmcraft_machine_fails"),
        R::PutVmcraftMachine(_) => (Put, "vmcraft_machine_count", "vmcraft_machine_fails"),
        R::PutMigrateSend(_) => (Put, "migrate_send_count", "migrate_send_fails"),
        R::PutMigrateReceive(_) => (Put, "migrate_receive_count", "migrate_receive_fails"),
        R::GetBalancer => (Get, "balancer_count", "balancer_fails"),
    }
}

impl ApiRequestCounters {
    /// Count `request`, answered with `status` (400 and above: a failure too).
    pub fn record(&mut self, request: &ApiRequest, status: u16) {
        let (group, count, fails) = names(request);
        let map = match group {
            Group::Get => &mut self.get,
            Group::Put => &mut self.put,
            Group::Patch => &mut self.patch,
        };
        *map.entry(count).or_default() += 1;
        if status >= 400 {
            *map.entry(fails).or_default() += 1;
        }
    }
}

/// A vCPU's exits, summed over the vCPUs (Firecracker's `vcpu` group).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VcpuMetrics {
    /// Port reads.
    pub exit_io_in: u64,
    /// Port writes.
    pub exit_io_out: u64,
    /// MMIO reads.
    pub exit_mmio_read: u64,
    /// MMIO writes.
    pub exit_mmio_write: u64,
    /// Exits of any other kind that failed the vCPU (internal errors, failed entries).
    pub failures: u64,
    /// HLT exits (vmcraft's).
    pub exit_hlt: u64,
}

/// What one device did (or the devices of one kind together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeviceMetrics {
    /// Wake-ups for a queue notification (Firecracker's name).
    pub queue_event_count: u64,
    /// Protocol errors that stopped the device until a reset (Firecracker's name).
    pub event_fails: u64,
    /// Descriptor chains completed: requests, packets, buffers.
    pub completed_count: u64,
    /// Queue interrupts sent to the driver.
    pub interrupt_count: u64,
}

impl std::ops::AddAssign for DeviceMetrics {
    fn add_assign(&mut self, o: DeviceMetrics) {
        self.queue_event_count += o.queue_event_count;
        self.event_fails += o.event_fails;
        self.completed_count += o.completed_count;
        self.interrupt_count += o.interrupt_count;
    }
}

/// Start-up figures (Firecracker's `api_server` group).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StartupMetrics {
    /// Wall time from the VMM's start (its `main`) to the API socket ready, in µs.
    pub process_startup_time_us: u64,
    /// CPU time the process had used when the socket was ready (exec and loading
    /// included), in µs.
    pub process_startup_time_cpu_us: u64,
}

/// One line of the metrics file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsLine {
    /// When it was written, in ms since the Unix epoch.
    pub utc_timestamp_ms: u64,
    /// Start-up figures.
    pub api_server: StartupMetrics,
    /// The API's requests.
    pub api: ApiRequestCounters,
    /// The vCPUs' exits.
    pub vcpu: VcpuMetrics,
    /// Each device by name (`block0`, `net1`, ...); the line also sums them by kind
    /// under the part before the number (`block`, `net`), as Firecracker's groups.
    pub devices: BTreeMap<String, DeviceMetrics>,
    /// Lines that could not be written since the last that was (a full pipe).
    pub missed_lines: u64,
}

#[derive(Serialize)]
struct Wire<'a> {
    utc_timestamp_ms: u64,
    api_server: StartupMetrics,
    get_api_requests: &'a BTreeMap<&'static str, u64>,
    put_api_requests: &'a BTreeMap<&'static str, u64>,
    patch_api_requests: &'a BTreeMap<&'static str, u64>,
    vcpu: &'a VcpuMetrics,
    #[serde(flatten)]
    kinds: BTreeMap<&'a str, DeviceMetrics>,
    devices: &'a BTreeMap<String, DeviceMetrics>,
    missed_lines: u64,
}

impl MetricsLine {
    /// The line as written: one JSON object and a newline.
    pub fn to_json_line(&self) -> String {
        let mut kinds: BTreeMap<&str, DeviceMetrics> = BTreeMap::new();
        for (name, m) in &self.devices {
            let kind = name.trim_end_matches(|c: char| c.is_ascii_digit());
            *kinds.entry(kind).or_default() += *m;
        }
        let wire = Wire {
            utc_timestamp_ms: self.utc_timestamp_ms,
            api_server: self.api_server,
            get_api_requests: &self.api.get,
            put_api_requests: &self.api.put,
            patch_api_requests: &self.api.patch,
            vcpu: &self.vcpu,
            kinds,
            devices: &self.devices,
            missed_lines: self.missed_lines,
        };
        // Maps with string keys and plain numbers: serialising cannot fail.
        let mut line = serde_json::to_string(&wire).unwrap_or_default();
        line.push('\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{HttpRequest, Method};
    use crate::routes::route;

    fn request(method: Method, path: &str, body: &str) -> ApiRequest {
        route(&HttpRequest {
            method,
            path: path.into(),
            body: body.as_bytes().to_vec(),
            close: false,
        })
        .unwrap()
    }

    #[test]
    fn requests_count_under_firecrackers_names_and_failures_twice() {
        let mut api = ApiRequestCounters::default();
        let start = request(
            Method::Put,
            "/actions",
            r#"{"action_type":"InstanceStart"}"#,
        );
        api.record(&start, 400);
        api.record(&start, 204);
        let patch = request(
            Method::Patch,
            "/drives/d",
            r#"{"drive_id":"d","path_on_host":"x"}"#,
        );
        api.record(&patch, 204);
        let line = MetricsLine {
            utc_timestamp_ms: 5,
            api,
            ..MetricsLine::default()
        }
        .to_json_line();
        assert!(line.ends_with("}\n") && line.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["put_api_requests"]["actions_count"], 2);
        assert_eq!(v["put_api_requests"]["actions_fails"], 1);
        assert_eq!(v["patch_api_requests"]["drive_count"], 1);
        assert!(v["patch_api_requests"].get("drive_fails").is_none());
        assert_eq!(v["utc_timestamp_ms"], 5);
    }

    #[test]
    fn devices_are_summed_by_kind_beside_their_own_figures() {
        let m = |n| DeviceMetrics {
            queue_event_count: n,
            event_fails: 0,
            completed_count: 2 * n,
            interrupt_count: n,
        };
        let line = MetricsLine {
            devices: [
                ("block0".to_string(), m(1)),
                ("block1".into(), m(2)),
                ("net0".into(), m(7)),
            ]
            .into_iter()
            .collect(),
            ..MetricsLine::default()
        }
        .to_json_line();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["block"]["queue_event_count"], 3);
        assert_eq!(v["block"]["completed_count"], 6);
        assert_eq!(v["net"]["interrupt_count"], 7);
        assert_eq!(v["devices"]["block1"]["completed_count"], 4);
        assert_eq!(v["vcpu"]["exit_io_in"], 0);
    }
}
