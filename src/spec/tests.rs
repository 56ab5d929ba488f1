use super::*;

const GOOD: &str = r#"
name: orders_v2
source: { dsn_env: SRC_DSN, table: public.orders }
target:
  table: public.orders_v2
  ddl: "CREATE TABLE public.orders_v2 (id bigint primary key, cents bigint)"
mapping:
  columns:
    - id
    - { target: cents, expr: "(amount * 100)::bigint" }
    - { target: state, from: status }
  drop: [legacy]
backfill: { chunk_rows: 1000, workers: 2, rate_limit_rows_per_s: 500 }
throttle: { max_slot_lag_bytes: 1GB }
"#;

fn problems(text: &str) -> Vec<(String, String)> {
    match parse(Path::new("p.yaml"), text) {
        Ok(_) => Vec::new(),
        Err(e) => e
            .problems
            .into_iter()
            .map(|p| (p.field, p.reason))
            .collect(),
    }
}

#[test]
fn a_good_file_compiles() {
    let p = parse(Path::new("p.yaml"), GOOD).unwrap();
    assert_eq!(p.name, "orders_v2");
    assert_eq!(
        p.source_table,
        TableName {
            schema: "public".into(),
            name: "orders".into()
        }
    );
    assert_eq!(p.mapping.len(), 3);
    assert_eq!(p.mapping[0].source, Source::Column("id".into()));
    assert_eq!(
        p.mapping[1].source,
        Source::Expr("(amount * 100)::bigint".into())
    );
    assert_eq!(p.mapping[2].source, Source::Column("status".into()));
    assert_eq!(p.dropped, vec!["legacy".to_string()]);
    assert_eq!(p.backfill.workers, 2);
    assert_eq!(p.backfill.rate_limit_rows_per_s, Some(500));
    assert_eq!(p.throttle.max_slot_lag_bytes, Some(1 << 30));
    assert_eq!(p.slot_name(), "rowshift_orders_v2");
    // direct keeps one batch queued; an explicit setting wins.
    assert_eq!(p.transport.queue_batches, 1);
    let deeper = parse(
        Path::new("p.yaml"),
        &format!("{GOOD}transport: {{ queue_batches: 4 }}\n"),
    )
    .unwrap();
    assert_eq!(deeper.transport.queue_batches, 4);
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
name: Bad-Name
source: { table: "a.b.c", colour: blue }
target: { table: public.t }
mapping:
  columns:
    - { target: x, from: a, expr: "1" }
    - 42
    - { target: y }
    - { target: y }
backfill: { chunk_rows: 0, workers: many }
throttle: { max_slot_lag_bytes: lots }
transport: { kind: carrier_pigeon }
extra: 1
"#;
    let found = problems(text);
    let fields: Vec<&str> = found.iter().map(|(f, _)| f.as_str()).collect();
    for expected in [
        "name",
        "source.dsn_env",
        "source.table",
        "source.colour",
        "target.ddl",
        "mapping.columns[0]",
        "mapping.columns[1]",
        "mapping.columns[3].target",
        "backfill.chunk_rows",
        "backfill.workers",
        "throttle.max_slot_lag_bytes",
        "transport.kind",
        "extra",
    ] {
        assert!(
            fields.contains(&expected),
            "missing {expected} in {found:#?}"
        );
    }
    let unknown = found.iter().find(|(f, _)| f == "source.colour").unwrap();
    assert!(unknown.1.contains("unknown field"), "{unknown:?}");
}

#[test]
fn missing_sections_and_same_table() {
    let found = problems("name: x\n");
    let fields: Vec<&str> = found.iter().map(|(f, _)| f.as_str()).collect();
    assert!(fields.contains(&"source"));
    assert!(fields.contains(&"target"));
    assert!(fields.contains(&"mapping"));

    let same = GOOD.replace("public.orders_v2\n", "public.orders\n");
    let found = problems(&same);
    assert!(found.iter().any(|(f, _)| f == "target.table"), "{found:?}");
}

#[test]
fn dropped_and_mapped_is_an_error_and_yaml_errors_have_a_position() {
    let text = GOOD.replace("drop: [legacy]", "drop: [status]");
    let found = problems(&text);
    assert!(
        found
            .iter()
            .any(|(f, r)| f == "mapping.drop" && r.contains("status")),
        "{found:?}"
    );

    let found = problems("name: [unclosed\n");
    assert!(found[0].0.starts_with("(line"), "{found:?}");
}

#[test]
fn error_display_names_file_field_and_reason() {
    let err = parse(Path::new("pipelines/x.yaml"), "name: x\n").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("pipelines/x.yaml: source: is required"),
        "{text}"
    );
}

#[test]
fn cutover_and_verify_sections_have_defaults_and_checks() {
    let p = parse(Path::new("p.yaml"), GOOD).unwrap();
    assert_eq!(p.cutover.old_table.to_string(), "public.orders_old");
    assert_eq!(p.cutover.lock_timeout_ms, 200);
    assert_eq!(p.verify.chunk_rows, 10_000);
    assert!(p.inverse.is_empty());
    assert_eq!(p.reverse_slot_name(), "rowshift_orders_v2_rev");

    let text = GOOD.replace(
        "  drop: [legacy]\n",
        "  drop: [legacy]\n  inverse:\n    amount: \"cents / 100.0\"\n    bad: 3\n",
    ) + "verify: { chunk_rows: 5, colour: red }\n"
        + "cutover: { old_table: other.orders_old, lock_attempts: 0, carry_triggers: [audit] }\n";
    let found = problems(&text);
    let fields: Vec<&str> = found.iter().map(|(f, _)| f.as_str()).collect();
    for expected in [
        "mapping.inverse.bad",
        "verify.chunk_rows",
        "verify.colour",
        "cutover.old_table",
        "cutover.lock_attempts",
    ] {
        assert!(
            fields.contains(&expected),
            "missing {expected} in {found:#?}"
        );
    }
}

#[test]
fn the_kafka_section_has_defaults_and_checks() {
    let good = format!(
        "{GOOD}transport: {{ kind: kafka, kafka: {{ brokers_env: KAFKA, registry_url: \"http://r:8081\" }} }}\n"
    );
    let p = parse(Path::new("p.yaml"), &good).unwrap();
    let k = p.transport.kafka.clone().expect("a kafka section");
    assert_eq!(k.brokers, Setting::Env("KAFKA".into()));
    assert_eq!(k.registry_url, Setting::Value("http://r:8081".into()));
    assert_eq!((k.partitions, k.replication_factor), (6, 1));
    assert!(k.apply_in_run);
    assert_eq!(k.idle_fetch_pause_ms, 10);
    assert_eq!(p.transport.queue_batches, 8);
    assert_eq!(p.kafka_topic(), "rowshift.orders_v2");

    let bad = format!(
        "{GOOD}transport:\n  kind: kafka\n  kafka:\n    brokers: b:9092\n    brokers_env: B\n    \
         topic: \"no spaces\"\n    partitions: 0\n    idle_fetch_pause_ms: 5000\n    \
         properties: {{ sasl.password: x, acks: \"1\" }}\n"
    );
    let got = problems(&bad);
    let fields: Vec<&str> = got.iter().map(|(f, _)| f.as_str()).collect();
    for want in [
        "transport.kafka.brokers",
        "transport.kafka.registry_url",
        "transport.kafka.topic",
        "transport.kafka.partitions",
        "transport.kafka.idle_fetch_pause_ms",
        "transport.kafka.properties.sasl.password",
        "transport.kafka.properties.acks",
    ] {
        assert!(fields.contains(&want), "{want} missing from {got:?}");
    }
    let direct = format!("{GOOD}transport: {{ kind: direct, kafka: {{ brokers: b }} }}\n");
    assert_eq!(
        problems(&direct),
        vec![(
            "transport.kafka".to_string(),
            "is only read with kind: kafka".to_string()
        )]
    );
}

#[test]
fn indexes_are_deferred_on_direct_and_refused_on_kafka() {
    let p = parse(Path::new("p.yaml"), GOOD).unwrap();
    assert!(p.backfill.defer_indexes);
    assert_eq!(p.backfill.hold_changes, 100_000);
    let kafka = "transport: { kind: kafka, kafka: { brokers_env: KAFKA, registry_url: \"http://r:8081\" } }\n";
    let on_kafka = parse(Path::new("p.yaml"), &format!("{GOOD}{kafka}")).unwrap();
    assert!(!on_kafka.backfill.defer_indexes);
    let with = GOOD.replace(
        "rate_limit_rows_per_s: 500 }",
        "rate_limit_rows_per_s: 500, defer_indexes: true, hold_changes: 20000000 }",
    );
    let fields: Vec<String> = problems(&format!("{with}{kafka}"))
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    assert_eq!(
        fields,
        vec!["backfill.hold_changes", "backfill.defer_indexes"],
        "both problems, at once"
    );
    let off = GOOD.replace(
        "rate_limit_rows_per_s: 500 }",
        "rate_limit_rows_per_s: 500, defer_indexes: false, hold_changes: 0 }",
    );
    let p = parse(Path::new("p.yaml"), &off).unwrap();
    assert!(!p.backfill.defer_indexes);
    assert_eq!(p.backfill.hold_changes, 0);
}
