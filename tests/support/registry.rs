//! TEST FIXTURE, not part of the product: a minimal schema registry that
//! speaks the Confluent REST API, because no real Confluent-compatible
//! registry can be installed on the test machines (see TESTING.md). Users
//! run the real Confluent Schema Registry (docker-compose.yml).
//!
//! Endpoints: `POST /subjects/{s}/versions` (register; the same schema gets
//! its existing id; a schema that cannot read the latest version's data is
//! refused with 409 under BACKWARD), `POST /subjects/{s}` (look up),
//! `GET /schemas/ids/{id}`, `GET /subjects/{s}/versions`,
//! `GET /subjects/{s}/versions/{v|latest}`, `PUT /config/{s}`.

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct State {
    /// id → schema text
    schemas: Vec<String>,
    /// subject → ids of its versions, in order
    subjects: BTreeMap<String, Vec<usize>>,
}

/// A running fixture registry; stops when dropped.
pub struct Registry {
    pub url: String,
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Registry {
    pub fn start() -> Registry {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("bind registry"));
        let port = server.server_addr().to_ip().expect("ip").port();
        let state = Arc::new(Mutex::new(State::default()));
        let s = server.clone();
        let thread = std::thread::spawn(move || {
            for mut req in s.incoming_requests() {
                let mut body = String::new();
                let _ = req.as_reader().read_to_string(&mut body);
                let (status, reply) = {
                    let mut st = state.lock().expect("registry state");
                    handle(&mut st, req.method().as_str(), req.url(), &body)
                };
                let header = tiny_http::Header::from_bytes(
                    &b"Content-Type"[..],
                    &b"application/vnd.schemaregistry.v1+json"[..],
                )
                .expect("header");
                let _ = req.respond(
                    tiny_http::Response::from_string(reply.to_string())
                        .with_status_code(status)
                        .with_header(header),
                );
            }
        });
        Registry {
            url: format!("http://127.0.0.1:{port}"),
            server,
            thread: Some(thread),
        }
    }
}

fn error(status: u16, code: u32, message: &str) -> (u16, Value) {
    (status, json!({"error_code": code, "message": message}))
}

/// apache-avro 0.21's compatibility check rejects a decimal inside a union
/// even against itself; the fixture compares decimals as their `bytes`
/// representation instead (precision and scale are not checked).
fn without_decimals(schema: &str) -> Schema {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(map) => {
                if map.get("logicalType") == Some(&json!("decimal")) {
                    map.remove("logicalType");
                    map.remove("precision");
                    map.remove("scale");
                }
                map.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v: Value = serde_json::from_str(schema).expect("stored schema is JSON");
    strip(&mut v);
    Schema::parse(&v).expect("stored schema parses")
}

fn same(a: &str, b: &str) -> bool {
    match (Schema::parse_str(a), Schema::parse_str(b)) {
        (Ok(x), Ok(y)) => x.canonical_form() == y.canonical_form(),
        _ => a == b,
    }
}

fn handle(st: &mut State, method: &str, url: &str, body: &str) -> (u16, Value) {
    let path = url.split('?').next().unwrap_or(url);
    let parts: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(|p| p.replace("%2F", "/"))
        .collect();
    let parts: Vec<&str> = parts.iter().map(|s| s.as_str()).collect();
    let schema_of = |body: &str| -> Option<String> {
        serde_json::from_str::<Value>(body)
            .ok()?
            .get("schema")?
            .as_str()
            .map(String::from)
    };
    match (method, parts.as_slice()) {
        ("POST", ["subjects", subject, "versions"]) => {
            let Some(schema) = schema_of(body) else {
                return error(422, 42201, "invalid schema");
            };
            if let Err(e) = Schema::parse_str(&schema) {
                return error(422, 42201, &format!("invalid schema: {e}"));
            }
            let versions = st.subjects.entry(subject.to_string()).or_default().clone();
            if let Some(&id) = versions
                .iter()
                .find(|&&id| same(&st.schemas[id - 1], &schema))
            {
                return (200, json!({"id": id}));
            }
            if let Some(&latest) = versions.last() {
                let writer = without_decimals(&st.schemas[latest - 1]);
                let reader = without_decimals(&schema);
                if let Err(e) = SchemaCompatibility::can_read(&writer, &reader) {
                    return error(409, 409, &format!("schema is not BACKWARD compatible: {e}"));
                }
            }
            st.schemas.push(schema);
            let id = st.schemas.len();
            st.subjects.entry(subject.to_string()).or_default().push(id);
            (200, json!({"id": id}))
        }
        ("POST", ["subjects", subject]) => {
            let Some(schema) = schema_of(body) else {
                return error(422, 42201, "invalid schema");
            };
            let versions = st.subjects.get(*subject).cloned().unwrap_or_default();
            match versions
                .iter()
                .position(|&id| same(&st.schemas[id - 1], &schema))
            {
                Some(i) => (
                    200,
                    json!({"subject": subject, "version": i + 1, "id": versions[i], "schema": schema}),
                ),
                None => error(404, 40403, "schema not found"),
            }
        }
        ("GET", ["schemas", "ids", id]) => match id
            .parse::<usize>()
            .ok()
            .and_then(|i| st.schemas.get(i.wrapping_sub(1)))
        {
            Some(s) => (200, json!({"schema": s})),
            None => error(404, 40403, "schema not found"),
        },
        ("GET", ["subjects", subject, "versions"]) => match st.subjects.get(*subject) {
            Some(v) => (200, json!((1..=v.len()).collect::<Vec<_>>())),
            None => error(404, 40401, "subject not found"),
        },
        ("GET", ["subjects", subject, "versions", version]) => {
            let Some(v) = st.subjects.get(*subject) else {
                return error(404, 40401, "subject not found");
            };
            let index = if *version == "latest" {
                v.len()
            } else {
                version.parse().unwrap_or(0)
            };
            match index.checked_sub(1).and_then(|i| v.get(i)) {
                Some(&id) => (
                    200,
                    json!({"subject": subject, "version": index, "id": id, "schema": st.schemas[id - 1]}),
                ),
                None => error(404, 40402, "version not found"),
            }
        }
        ("PUT", ["config", _]) | ("PUT", ["config"]) => {
            let level = serde_json::from_str::<Value>(body)
                .ok()
                .and_then(|v| v.get("compatibility").cloned())
                .unwrap_or(json!("BACKWARD"));
            (200, json!({"compatibility": level}))
        }
        ("GET", ["config"]) | ("GET", ["config", _]) => {
            (200, json!({"compatibilityLevel": "BACKWARD"}))
        }
        _ => error(404, 404, "not found"),
    }
}
