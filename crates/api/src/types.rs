//! The request and response bodies of Firecracker's API (the definitions of its
//! published `firecracker.yaml`, v1.4.1, the version firecracker-go-sdk and Kata
//! bundle), as serde types. A body with a field the API does not define is refused,
//! as Firecracker refuses it; optional fields default as the description says.
//!
//! ```
//! use vmcraft_api::types::MachineConfiguration;
//! let m: MachineConfiguration =
//!     serde_json::from_str(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#).unwrap();
//! assert_eq!((m.vcpu_count, m.mem_size_mib, m.smt), (2, 256, false));
//! assert!(serde_json::from_str::<MachineConfiguration>(r#"{"vcpu_count": 2}"#).is_err());
//! ```

use serde::{Deserialize, Serialize};

/// `PUT|GET /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    /// Number of vCPUs (1 to 32).
    pub vcpu_count: u8,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (not offered: false only).
    #[serde(default)]
    pub smt: bool,
    /// A CPU template (only "None").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Dirty page tracking for diff snapshots (accepted; vmcraft tracks dirty pages
    /// for migration whatever this says).
    #[serde(default)]
    pub track_dirty_pages: bool,
}

/// `PATCH /machine-config`: any field.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigurationUpdate {
    /// Number of vCPUs.
    pub vcpu_count: Option<u8>,
    /// Guest RAM in MiB.
    pub mem_size_mib: Option<u64>,
    /// Simultaneous multithreading.
    pub smt: Option<bool>,
    /// A CPU template.
    pub cpu_template: Option<String>,
    /// Dirty page tracking.
    pub track_dirty_pages: Option<bool>,
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// The kernel image on the host.
    pub kernel_image_path: String,
    /// An initrd on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// The kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// A token bucket of a rate limiter (accepted and refused unless empty: vmcraft
/// does not rate-limit yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Initial burst.
    #[serde(default)]
    pub one_time_burst: Option<u64>,
    /// Refill time in milliseconds.
    pub refill_time: u64,
    /// Bucket size.
    pub size: u64,
}

/// A rate limiter: bandwidth and operations.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's id (the same as the path's).
    pub drive_id: String,
    /// The image on the host.
    pub path_on_host: String,
    /// The root device (its partuuid, or /dev/vda, goes on the command line).
    pub is_root_device: bool,
    /// Read-only for the guest.
    pub is_read_only: bool,
    /// The root partition's UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// "Unsafe" (no flush offered) or "Writeback".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// A rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// "Sync" or "Async".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
}

/// `PATCH /drives/{drive_id}`: a new image (after start), or a new rate limiter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive's id.
    pub drive_id: String,
    /// A new image on the host.
    #[serde(default)]
    pub path_on_host: Option<String>,
    /// A new rate limiter.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's id (the same as the path's).
    pub iface_id: String,
    /// The TAP device on the host.
    pub host_dev_name: String,
    /// The guest's MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Receive rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// The interface's id.
    pub iface_id: String,
    /// Receive rate limiter.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit rate limiter.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /vsock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's context id (3 or more).
    pub guest_cid: u32,
    /// The Unix socket the host side listens on.
    pub uds_path: String,
    /// Deprecated, ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT|GET /balloon`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// The balloon's target in MiB.
    pub amount_mib: u32,
    /// Whether the guest may deflate it under memory pressure.
    pub deflate_on_oom: bool,
    /// Seconds between statistics (0: none).
    #[serde(default)]
    pub stats_polling_interval_s: u16,
}

/// `PATCH /balloon`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// The new target in MiB.
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// Seconds between statistics.
    pub stats_polling_interval_s: u16,
}

/// `GET /balloon/statistics`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BalloonStats {
    /// Pages the balloon aims to hold.
    pub target_pages: u32,
    /// Pages it holds.
    pub actual_pages: u32,
    /// MiB it aims to hold.
    pub target_mib: u32,
    /// MiB it holds.
    pub actual_mib: u32,
    /// Bytes swapped in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    /// Major faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// Minor faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Free bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    /// Total bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    /// Available bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    /// Disk cache bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
}

/// `PUT /actions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// What to do.
    pub action_type: ActionType,
}

/// The actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Flush the metrics.
    FlushMetrics,
    /// Build the machine from what was configured and start it.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the i8042 keyboard.
    SendCtrlAltDel,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// Paused or Resumed.
    pub state: VmState,
}

/// A state `PATCH /vm` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Pause the vCPUs and devices.
    Paused,
    /// Run again.
    Resumed,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// The VMM's name.
    pub app_name: String,
    /// The instance id (`--id`).
    pub id: String,
    /// "Not started", "Running" or "Paused".
    pub state: String,
    /// The VMM's version.
    pub vmm_version: String,
}

/// `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    /// The VMM's version.
    pub firecracker_version: String,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Where the machine's state goes.
    pub snapshot_path: String,
    /// Where guest memory goes.
    pub mem_file_path: String,
    /// "Full" (or "Diff", refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<String>,
    /// A target version (ignored by later Firecrackers; refused if given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// How a snapshot's memory is loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// "File" (or "Uffd", refused).
    pub backend_type: String,
    /// The memory file.
    pub backend_path: String,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The machine's state.
    pub snapshot_path: String,
    /// The memory file (deprecated form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    /// The memory file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemoryBackend>,
    /// Dirty page tracking after the load.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Resume the VM at once.
    #[serde(default)]
    pub resume_vm: bool,
}

/// `PUT /logger`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// The log file or named pipe.
    pub log_path: String,
    /// Error, Warning, Info or Debug.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Print the level.
    #[serde(default)]
    pub show_level: bool,
    /// Print the origin.
    #[serde(default)]
    pub show_log_origin: bool,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// The metrics file or named pipe.
    pub metrics_path: String,
}

/// The whole machine at once: `--config-file` and `GET /vm/config`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfiguration {
    /// The balloon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Balloon>,
    /// The drives.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// The kernel, initrd and command line.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// The logger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// vCPUs and RAM.
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfiguration>,
    /// The metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// The network interfaces.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// The vsock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
}

/// An error's body: `{"fault_message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// What went wrong.
    pub fault_message: String,
}

/// `PUT /vmcraft/migrate/send` (vmcraft's own): migrate the running machine over the
/// session the VMM opened at its start (`--migrate-to`, authenticated then).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateSend {
    /// A bandwidth limit for the memory rounds, in MiB/s (none: as fast as the
    /// connection goes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_mib_s: Option<u64>,
}

/// `PUT /vmcraft/migrate/receive` (vmcraft's own), before the start: instead of
/// booting, wait for a migration of the machine the requests described, from a
/// source authenticated with the secret or keys given on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateReceive {
    /// Where to listen (`host:port`).
    pub listen: String,
}

/// `GET /vmcraft/balancer` (vmcraft's own): the memory balancer on the balloon.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerStatus {
    /// Steps taken so far.
    pub steps: u64,
    /// The host's memory pressure the last step used (PSI, 0 to 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure: Option<f64>,
    /// The pages the last step let the VM keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_pages: Option<u64>,
    /// The balloon's target, in 4 KiB pages.
    pub balloon_target_pages: u32,
    /// The pages the guest holds in the balloon.
    pub balloon_actual_pages: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdks_bodies_parse_and_unknown_fields_are_refused() {
        // As firecracker-go-sdk sends them.
        let d: Drive = serde_json::from_str(
            r#"{"drive_id":"rootfs","path_on_host":"/img/root.ext4","is_root_device":true,"is_read_only":false}"#,
        )
        .unwrap();
        assert_eq!(d.drive_id, "rootfs");
        let n: NetworkInterface = serde_json::from_str(
            r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"AA:FC:00:00:00:01"}"#,
        )
        .unwrap();
        assert_eq!(n.guest_mac.as_deref(), Some("AA:FC:00:00:00:01"));
        let a: InstanceActionInfo =
            serde_json::from_str(r#"{"action_type":"InstanceStart"}"#).unwrap();
        assert_eq!(a.action_type, ActionType::InstanceStart);
        assert!(serde_json::from_str::<InstanceActionInfo>(r#"{"action_type":"Reboot"}"#).is_err());
        let e = serde_json::from_str::<BootSource>(
            r#"{"kernel_image_path":"/k","boot_args":"console=ttyS0","extra":1}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `extra`"), "{e}");
        let full: FullVmConfiguration = serde_json::from_str(
            r#"{"boot-source":{"kernel_image_path":"/k"},"machine-config":{"vcpu_count":1,"mem_size_mib":128},"drives":[],"network-interfaces":[]}"#,
        )
        .unwrap();
        assert_eq!(full.machine_config.unwrap().mem_size_mib, 128);
        let v: Vm = serde_json::from_str(r#"{"state":"Paused"}"#).unwrap();
        assert_eq!(v.state, VmState::Paused);
    }
}
