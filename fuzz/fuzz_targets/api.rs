//! The API's request reading, routing and pre-boot dispatch under any bytes a client
//! sends: no panic, memory bounded by the head and body limits, every request read is
//! either routed to a typed request or refused with a status of 400 or 404, and the
//! routed requests applied in turn to the pre-boot machine (as the example VMM's
//! dispatch does, with the checks of the running machine's `PATCH /drives` and
//! snapshot paths) give a value or an error, and a machine put together from them is
//! one that validates.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmcraft::api_config::{snapshot_create_paths, PreBoot};
use vmcraft_api::http::{Connection, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use vmcraft_api::metrics::ApiRequestCounters;
use vmcraft_api::routes::{route, ApiRequest};

fuzz_target!(|data: &[u8]| {
    let mut conn = Connection::default();
    let mut stream = data;
    let mut out = Vec::new();
    let mut pre = PreBoot::default();
    let mut counters = ApiRequestCounters::default();
    let dir = Path::new("/run/vm");
    for _ in 0..16 {
        match conn.read_request(&mut stream, &mut out) {
            Ok(Some(req)) => {
                assert!(req.body.len() <= MAX_BODY_BYTES);
                assert!(req.path.len() <= MAX_HEAD_BYTES);
                match route(&req) {
                    Err(e) => {
                        assert!(matches!(e.status(), 400 | 404));
                        assert!(!e.to_string().is_empty());
                    }
                    Ok(request) => {
                        let ok = apply(&mut pre, dir, &request);
                        counters.record(&request, if ok { 204 } else { 400 });
                    }
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    if let Ok(config) = pre.machine_config() {
        config.validate().expect("a machine put together is valid");
    }
    let _ = pre.full();
});

/// A routed request applied as the example VMM's dispatch applies it; whether it
/// was taken.
fn apply(pre: &mut PreBoot, dir: &Path, request: &ApiRequest) -> bool {
    use ApiRequest as R;
    match request.clone() {
        R::PutMachineConfig(m) => pre.put_machine_config(m).is_ok(),
        R::PatchMachineConfig(m) => pre.patch_machine_config(m).is_ok(),
        R::PutBootSource(b) => pre.put_boot_source(b).is_ok(),
        R::PutDrive(d) => pre.put_drive(d).is_ok(),
        R::PutNetworkInterface(n) => pre.put_network_interface(n).is_ok(),
        R::PutBalloon(b) => pre.put_balloon(b).is_ok(),
        R::PatchDrive(p) => match pre.patch_drive(dir, &p) {
            Ok((_, relative)) => {
                assert!(relative.is_relative());
                assert!(!relative
                    .components()
                    .any(|c| c == std::path::Component::ParentDir));
                pre.drive_replaced(&p.drive_id, &dir.join(relative));
                true
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                false
            }
        },
        R::PutSnapshotCreate(p) => match snapshot_create_paths(dir, &p) {
            Ok((state, memory)) => {
                assert!(state.is_relative() && memory.is_relative() && state != memory);
                true
            }
            Err(_) => false,
        },
        R::PutSnapshotLoad(p) => pre.snapshot_load(&p).is_ok(),
        _ => true,
    }
}
