//! docs/vmcraft-api.json, the OpenAPI description of vmcraft's own API paths, against
//! the router and the types that serve them: every path and method it describes is
//! routed (with its example body), every one the router has under /vmcraft is
//! described, a body without a required field is refused, the examples are bodies
//! the VMM takes, and the schemas' properties are the fields the types write.

use std::collections::BTreeSet;

use serde_json::Value;
use vmcraft::api::http::{HttpRequest, Method};
use vmcraft::api::routes::{route, ApiRequest};

fn description() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/vmcraft-api.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn method(name: &str) -> Method {
    match name {
        "get" => Method::Get,
        "put" => Method::Put,
        "patch" => Method::Patch,
        other => panic!("a method the API does not have: {other}"),
    }
}

fn request(m: Method, path: &str, body: &Value) -> HttpRequest {
    HttpRequest {
        method: m,
        path: path.into(),
        body: if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        },
        close: false,
    }
}

/// The schema `$ref` points at.
fn schema<'a>(doc: &'a Value, reference: &Value) -> &'a Value {
    let name = reference["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
        .expect("a schema reference");
    &doc["components"]["schemas"][name]
}

#[test]
fn every_described_path_routes_and_refuses_what_it_requires() {
    let doc = description();
    assert_eq!(doc["openapi"], "3.0.3");
    let mut described = BTreeSet::new();
    for (path, operations) in doc["paths"].as_object().unwrap() {
        assert!(path.starts_with("/vmcraft/"), "{path}: outside the prefix");
        for (name, op) in operations.as_object().unwrap() {
            described.insert(format!("{name} {path}"));
            let m = method(name);
            let content = &op["requestBody"]["content"]["application/json"];
            let example = content["example"].clone();
            let routed = route(&request(m, path, &example));
            assert!(routed.is_ok(), "{name} {path} with its example: {routed:?}");
            for status in ["200", "204"] {
                if op["responses"][status].is_object() {
                    assert!(op["responses"]["400"].is_object(), "{name} {path}: no 400");
                }
            }
            // A body without a field the schema requires is refused (the machine's
            // fields are the VMM's to check, below).
            if !content.is_null() && path != "/vmcraft/machine" {
                let s = schema(&doc, &content["schema"]);
                for field in s["required"].as_array().into_iter().flatten() {
                    let mut body = example.clone();
                    body.as_object_mut()
                        .unwrap()
                        .remove(field.as_str().unwrap());
                    assert!(
                        route(&request(m, path, &body)).is_err(),
                        "{name} {path} without {field}"
                    );
                }
                let mut extra = example.clone();
                extra
                    .as_object_mut()
                    .unwrap()
                    .insert("unknown".into(), Value::Bool(true));
                assert!(
                    route(&request(m, path, &extra)).is_err(),
                    "{name} {path}: an unknown field"
                );
            }
            if op["requestBody"]["required"] == true {
                assert!(
                    route(&request(m, path, &Value::Null)).is_err(),
                    "{name} {path}: no body"
                );
            }
        }
    }
    // Everything the router has under the prefix is described.
    let routed: BTreeSet<String> = [
        ("get", "/vmcraft/machine"),
        ("put", "/vmcraft/machine"),
        ("put", "/vmcraft/migrate/send"),
        ("put", "/vmcraft/migrate/receive"),
        ("get", "/vmcraft/balancer"),
    ]
    .iter()
    .map(|(m, p)| format!("{m} {p}"))
    .collect();
    assert_eq!(described, routed);
    for candidate in [
        "/vmcraft/machine",
        "/vmcraft/migrate/send",
        "/vmcraft/migrate/receive",
        "/vmcraft/balancer",
    ] {
        for m in ["get", "put", "patch"] {
            let ok = !matches!(
                route(&request(
                    method(m),
                    candidate,
                    &Value::Object(Default::default())
                )),
                Err(vmcraft::api::routes::RouteError::Method { .. })
            );
            assert_eq!(
                ok,
                described.contains(&format!("{m} {candidate}")),
                "{m} {candidate}"
            );
        }
    }
}

#[test]
fn the_machine_example_is_a_machine_the_vmm_takes() {
    let doc = description();
    let example = &doc["paths"]["/vmcraft/machine"]["put"]["requestBody"]["content"]
        ["application/json"]["example"];
    let Ok(ApiRequest::PutVmcraftMachine(text)) =
        route(&request(Method::Put, "/vmcraft/machine", example))
    else {
        panic!("routed");
    };
    let config = vmcraft::config::MachineConfig::from_json(&text).unwrap();
    config.validate().unwrap();
    // The schema's properties are the configuration's fields, and its kinds the
    // device kinds.
    let written: Value = serde_json::from_str(&config.to_json()).unwrap();
    let fields: BTreeSet<&String> = written.as_object().unwrap().keys().collect();
    let s = &doc["components"]["schemas"]["MachineConfig"];
    let props: BTreeSet<&String> = s["properties"].as_object().unwrap().keys().collect();
    assert_eq!(fields, props);
    let kinds: BTreeSet<&str> = s["properties"]["devices"]["items"]["properties"]["kind"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    for kind in [
        "virtio-block",
        "virtio-net",
        "pv",
        "xen-disk",
        "xen-console",
        "ata",
    ] {
        assert!(kinds.contains(kind), "{kind}");
    }
}

#[test]
fn the_balancer_schema_is_what_the_status_writes() {
    let doc = description();
    let status = vmcraft::api::types::BalancerStatus {
        pressure: Some(0.5),
        keep_pages: Some(1),
        ..Default::default()
    };
    let written: Value = serde_json::to_value(&status).unwrap();
    let fields: BTreeSet<&String> = written.as_object().unwrap().keys().collect();
    let props: BTreeSet<&String> = doc["components"]["schemas"]["BalancerStatus"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(fields, props);
}
