//! Readers of the optional sections of a pipeline file: `mapping.inverse`,
//! `backfill`, `throttle`, `transport`, `verify` and `cutover`. Each fills in
//! defaults and reports every problem with its field path.

use super::reader::{Fields, Problems};
use super::{
    string_list, Backfill, Cutover, Kafka, Setting, TableName, Throttle, Transport, Verify,
};
use serde_yaml::Value;

/// `transport.kafka.idle_fetch_pause_ms` unless set: short next to the lag
/// an operator watches, long enough that a caught-up applier on a broker
/// that answers empty fetches at once does not fetch in a loop (see
/// `transport::kafka::idle`).
const DEFAULT_IDLE_FETCH_PAUSE_MS: u64 = 10;

/// `mapping.inverse`: source column → SQL expression over the new table's columns.
pub(super) fn inverse_field(f: &mut Fields, p: &mut Problems) -> Vec<(String, String)> {
    let path = f.path_of("inverse");
    match f.get("inverse") {
        None => Vec::new(),
        Some(Value::Mapping(m)) => m
            .iter()
            .filter_map(|(k, v)| match (k.as_str(), v.as_str()) {
                (Some(col), Some(expr)) if !col.is_empty() && !expr.trim().is_empty() => {
                    Some((col.to_string(), expr.to_string()))
                }
                _ => {
                    p.push(
                        format!("{path}.{}", k.as_str().unwrap_or("?")),
                        "must map a source column name to an SQL expression over the new table's columns",
                    );
                    None
                }
            })
            .collect(),
        Some(_) => {
            p.push(path, "must be a mapping of source column: SQL expression");
            Vec::new()
        }
    }
}

pub(super) fn verify_field(top: &mut Fields, p: &mut Problems) -> Verify {
    let mut v = Fields::new("verify", top.get("verify"), p);
    let verify = Verify {
        chunk_rows: v.integer("chunk_rows", 10, 1_000_000, p).unwrap_or(10_000) as u32,
        workers: v.integer("workers", 1, 16, p).unwrap_or(2) as u32,
        rechecks: v.integer("rechecks", 0, 100, p).unwrap_or(5) as u32,
    };
    v.finish(p);
    verify
}

pub(super) fn cutover_field(
    top: &mut Fields,
    source: Option<&TableName>,
    p: &mut Problems,
) -> Option<Cutover> {
    let mut c = Fields::new("cutover", top.get("cutover"), p);
    let old_table = match c.string("old_table", p) {
        Some(text) => match TableName::parse(&text) {
            Some(t) => Some(t),
            None => {
                p.push("cutover.old_table", format!("{text:?} is not a table name"));
                None
            }
        },
        None => source.map(|s| TableName {
            schema: s.schema.clone(),
            name: format!("{}_old", s.name),
        }),
    };
    if let (Some(old), Some(src)) = (&old_table, source) {
        if old.schema != src.schema {
            p.push(
                "cutover.old_table",
                format!(
                    "must be in the source table's schema {} (a rename cannot move it)",
                    src.schema
                ),
            );
        }
        if old == src {
            p.push("cutover.old_table", "must differ from source.table");
        }
    }
    let cutover = Cutover {
        old_table: old_table.unwrap_or_else(|| TableName {
            schema: String::new(),
            name: String::new(),
        }),
        lock_timeout_ms: c.integer("lock_timeout_ms", 1, 60_000, p).unwrap_or(200),
        lock_attempts: c.integer("lock_attempts", 1, 1_000, p).unwrap_or(10) as u32,
        backoff_max_ms: c.integer("backoff_max_ms", 1, 600_000, p).unwrap_or(2_000),
        max_lag_ms: c.integer("max_lag_ms", 1, 86_400_000, p).unwrap_or(1_000),
        verify_max_age_s: c
            .integer("verify_max_age_s", 1, 31_536_000, p)
            .unwrap_or(3_600),
        drain_timeout_ms: c
            .integer("drain_timeout_ms", 10, 600_000, p)
            .unwrap_or(10_000),
        carry_triggers: string_list(&mut c, "carry_triggers", p),
        reverse_window_s: c
            .integer("reverse_window_s", 0, 31_536_000, p)
            .unwrap_or(86_400),
    };
    c.finish(p);
    source.map(|_| cutover)
}

/// The backfill section, and `defer_indexes` as written (its default
/// depends on the transport).
pub(super) fn backfill_field(top: &mut Fields, p: &mut Problems) -> (Backfill, Option<bool>) {
    let mut b = Fields::new("backfill", top.get("backfill"), p);
    let chunk_rows = b.integer("chunk_rows", 1, 1_000_000, p).unwrap_or(5_000) as u32;
    let target_chunk_ms = b.integer("target_chunk_ms", 10, 600_000, p);
    let rate = b
        .integer("rate_limit_rows_per_s", 1, 100_000_000, p)
        .map(|n| n as u32);
    let workers = b.integer("workers", 1, 64, p).unwrap_or(1) as u32;
    let defer_indexes = b.boolean("defer_indexes", p);
    let hold_changes = b
        .integer("hold_changes", 0, 10_000_000, p)
        .unwrap_or(100_000) as u32;
    b.finish(p);
    let backfill = Backfill {
        chunk_rows,
        target_chunk_ms,
        rate_limit_rows_per_s: rate,
        workers,
        defer_indexes: false,
        hold_changes,
    };
    (backfill, defer_indexes)
}

pub(super) fn throttle_field(top: &mut Fields, p: &mut Problems) -> Throttle {
    let mut t = Fields::new("throttle", top.get("throttle"), p);
    let throttle = Throttle {
        max_slot_lag_bytes: t.bytes("max_slot_lag_bytes", p),
        max_retained_wal_bytes: t.bytes("max_retained_wal_bytes", p),
        max_replica_lag_ms: t.integer("max_replica_lag_ms", 1, 86_400_000, p),
        query: t.string("query", p),
        check_interval_ms: t
            .integer("check_interval_ms", 10, 60_000, p)
            .unwrap_or(1_000),
    };
    t.finish(p);
    throttle
}

pub(super) fn transport_field(top: &mut Fields, p: &mut Problems) -> Transport {
    let mut t = Fields::new("transport", top.get("transport"), p);
    let kind = t.string("kind", p).unwrap_or_else(|| "direct".into());
    let batch_events = t.integer("batch_events", 1, 1_000_000, p).unwrap_or(10_000) as usize;
    // Default for `direct`: one batch. A deeper queue lets the walsender run
    // ahead of the appliers, and once it has sent a large transaction it
    // decodes rowshift's own target writes meanwhile, taking a core the
    // appliers need (one 200k-row transaction, two connections: 1.57× the
    // built-in with one batch, 1.36× with eight; docs/benchmarks.md). The
    // kafka producer keeps eight: it applies nothing early, and a deeper
    // queue smooths its sends.
    let queue_default = if kind == "kafka" { 8 } else { 1 };
    let queue_batches = t
        .integer("queue_batches", 1, 1_024, p)
        .unwrap_or(queue_default) as usize;
    let linger_ms = t.integer("linger_ms", 0, 1_000, p).unwrap_or(5);
    // Default: half the cores, 2 to 4. A connection costs rowshift little
    // (its work runs on one thread); the database and the walsender, which
    // share the machine, are what the other cores are for. On 2 cores two
    // connections applied 200k single-row transactions at 51k tx/s, one at
    // 40k (docs/benchmarks.md).
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let apply_workers = t
        .integer("apply_workers", 1, 16, p)
        .map(|n| n as usize)
        .unwrap_or((cores / 2).clamp(2, 4));
    let kafka = match kind.as_str() {
        "direct" => {
            if t.get("kafka").is_some() {
                p.push(
                    "transport.kafka",
                    "is only read with kind: kafka".to_string(),
                );
            }
            None
        }
        "kafka" => Some(kafka_field(&mut t, p)),
        other => {
            p.push(
                "transport.kind",
                format!("{other:?} is not supported (supported: direct, kafka)"),
            );
            None
        }
    };
    t.finish(p);
    Transport {
        batch_events,
        queue_batches,
        linger_ms,
        apply_workers,
        kafka,
    }
}

/// `transport.kafka`.
fn kafka_field(t: &mut Fields, p: &mut Problems) -> Kafka {
    let mut k = Fields::new("transport.kafka", t.get("kafka"), p);
    if !k.present() {
        p.push("transport.kafka", "is required with kind: kafka");
    }
    let either = |k: &mut Fields, name: &str, p: &mut Problems| {
        let value = k.string(name, p);
        let env = k.string(&format!("{name}_env"), p);
        match (value, env) {
            (Some(v), None) => Setting::Value(v),
            (None, Some(e)) => Setting::Env(e),
            (Some(_), Some(_)) => {
                p.push(
                    k.path_of(name),
                    format!("give {name} or {name}_env, not both"),
                );
                Setting::Value(String::new())
            }
            (None, None) => {
                if k.present() {
                    p.push(k.path_of(name), format!("is required (or {name}_env)"));
                }
                Setting::Value(String::new())
            }
        }
    };
    let brokers = either(&mut k, "brokers", p);
    let registry_url = either(&mut k, "registry_url", p);
    let topic = k.string("topic", p);
    if let Some(t) = &topic {
        if t.len() > 249
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            p.push(
                "transport.kafka.topic",
                "a Kafka topic name is at most 249 characters of [a-zA-Z0-9._-]",
            );
        }
    }
    let partitions = k.integer("partitions", 1, 10_000, p).unwrap_or(6) as i32;
    let replication_factor = k.integer("replication_factor", 1, 16, p).unwrap_or(1) as i32;
    let group = k.string("group", p);
    let properties = k.string_map("properties", p);
    let secret_properties = k.string_map("secret_properties", p);
    for (key, _) in &properties {
        let lower = key.to_ascii_lowercase();
        if lower.contains("password") || lower.contains("secret") || lower.ends_with(".key") {
            p.push(
                format!("transport.kafka.properties.{key}"),
                "looks like a secret: name the environment variable that holds it under secret_properties instead",
            );
        }
    }
    for (key, _) in properties.iter().chain(&secret_properties) {
        if matches!(
            key.as_str(),
            "bootstrap.servers" | "enable.idempotence" | "acks" | "group.id" | "enable.auto.commit"
        ) {
            p.push(
                format!("transport.kafka.properties.{key}"),
                "is set by rowshift (it carries the delivery guarantees)",
            );
        }
    }
    let apply_in_run = k.boolean("apply_in_run", p).unwrap_or(true);
    let idle_fetch_pause_ms = k
        .integer("idle_fetch_pause_ms", 0, 1_000, p)
        .unwrap_or(DEFAULT_IDLE_FETCH_PAUSE_MS);
    k.finish(p);
    Kafka {
        brokers,
        registry_url,
        topic,
        partitions,
        replication_factor,
        group,
        properties,
        secret_properties,
        apply_in_run,
        idle_fetch_pause_ms,
    }
}
