//! The API's request reading and routing under any bytes a client sends: no panic,
//! memory bounded by the head and body limits, and every request read is either
//! routed to a typed request or refused with a status of 400 or 404.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcraft_api::http::{Connection, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use vmcraft_api::routes::route;

fuzz_target!(|data: &[u8]| {
    let mut conn = Connection::default();
    let mut stream = data;
    let mut out = Vec::new();
    for _ in 0..16 {
        match conn.read_request(&mut stream, &mut out) {
            Ok(Some(req)) => {
                assert!(req.body.len() <= MAX_BODY_BYTES);
                assert!(req.path.len() <= MAX_HEAD_BYTES);
                if let Err(e) = route(&req) {
                    assert!(matches!(e.status(), 400 | 404));
                    assert!(!e.to_string().is_empty());
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
});
