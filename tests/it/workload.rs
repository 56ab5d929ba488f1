//! Source tables of many types and a random concurrent writer.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use tokio_postgres::Client;

use crate::support::TestDb;

/// `items`: bigint key, TOASTed text (STORAGE EXTERNAL, > 4 kB for some rows),
/// NULLs, jsonb, numeric, timestamptz, int[], bytea. `pairs`: a composite key
/// with a text column first.
pub async fn create_tables(c: &Client, items: i64, pairs: i64) {
    c.batch_execute(&format!(
        "CREATE TABLE items (
            id bigint PRIMARY KEY, small int, price numeric(10,2), body text, doc jsonb,
            tags int[], blob bytea, seen timestamptz, legacy text);
         ALTER TABLE items ALTER COLUMN body SET STORAGE EXTERNAL;
         INSERT INTO items
         SELECT g, g % 1000, (g % 997) * 1.25,
                CASE WHEN g % 20 = 0 THEN repeat(md5(g::text), 150) WHEN g % 7 = 0 THEN NULL ELSE 'short ' || g END,
                CASE WHEN g % 5 = 0 THEN NULL ELSE jsonb_build_object('k', g, 'nested', jsonb_build_array(g, 'x')) END,
                ARRAY[g % 3, g % 5], decode(md5(g::text), 'hex'),
                '2024-01-01 00:00:00+00'::timestamptz + g * interval '1 minute', 'old'
         FROM generate_series(1, {items}) g;
         CREATE TABLE pairs (region text, seq int, val text, payload jsonb, PRIMARY KEY (region, seq));
         INSERT INTO pairs SELECT (ARRAY['eu', 'us', 'apac', 'o''brien'])[1 + g % 4], g, 'v' || g, jsonb_build_object('n', g)
         FROM generate_series(1, {pairs}) g;
         ANALYZE items; ANALYZE pairs;"
    ))
    .await
    .expect("create tables");
}

pub fn items_pipeline(name: &str, chunk_rows: u32, rate: u32, workers: u32) -> String {
    items_pipeline_with(name, chunk_rows, rate, workers, "")
}

/// The items pipeline with more backfill settings (`extra`, e.g.
/// `", hold_changes: 50"`). Its target has a primary key, a unique
/// constraint and a plain index.
pub fn items_pipeline_with(
    name: &str,
    chunk_rows: u32,
    rate: u32,
    workers: u32,
    extra: &str,
) -> String {
    format!(
        r#"
name: {name}
source: {{ dsn_env: ROWSHIFT_SOURCE_DSN, table: public.items }}
target:
  table: public.{name}
  ddl:
    - |
      CREATE TABLE public.{name} (
        id bigint PRIMARY KEY, small int, price_cents bigint, body text, body_len int,
        summary text NOT NULL, doc jsonb, tags int[], blob bytea, seen_at timestamptz,
        CONSTRAINT {name}_small_id UNIQUE (small, id))
    - CREATE INDEX {name}_seen ON public.{name} (seen_at)
mapping:
  columns:
    - id
    - small
    - {{ target: price_cents, expr: "(price * 100)::bigint" }}
    - body
    - {{ target: body_len, expr: "length(body)" }}
    - {{ target: summary, expr: "coalesce(small::text, '-') || ':' || coalesce(left(body, 8), '')" }}
    - doc
    - tags
    - blob
    - {{ target: seen_at, from: seen }}
  drop: [price, legacy]
backfill: {{ chunk_rows: {chunk_rows}, rate_limit_rows_per_s: {rate}, workers: {workers}{extra} }}
"#
    )
}

/// (indexes the target has, indexes recorded as deferred) for a pipeline.
pub async fn index_state(c: &Client, name: &str) -> (i64, i64) {
    let r = c
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM pg_index WHERE indrelid = 'public.{name}'::regclass), \
                        (SELECT count(*) FROM rowshift.deferred_indexes WHERE pipeline = $1)"
            ),
            &[&name],
        )
        .await
        .expect("index state");
    (r.get(0), r.get(1))
}

/// The items target ends with all three of its indexes, valid, and no
/// deferred record left; returns the audit detail of their build, if they
/// were deferred.
pub async fn assert_items_indexes(c: &Client, name: &str) -> Option<String> {
    assert_eq!(
        index_state(c, name).await,
        (3, 0),
        "{name}: indexes after the copy"
    );
    let r = c
        .query_one(
            &format!(
                "SELECT bool_and(indisvalid), bool_or(indisprimary), \
                        (SELECT count(*) FROM pg_constraint WHERE conrelid = 'public.{name}'::regclass AND contype IN ('p', 'u')) \
                 FROM pg_index WHERE indrelid = 'public.{name}'::regclass"
            ),
            &[],
        )
        .await
        .expect("index validity");
    assert!(
        r.get::<_, bool>(0) && r.get::<_, bool>(1),
        "{name}: a valid primary key"
    );
    assert_eq!(
        r.get::<_, i64>(2),
        2,
        "{name}: the primary key and the unique constraint"
    );
    c.query_opt(
        "SELECT detail FROM rowshift.audit_log WHERE pipeline = $1 AND event = 'indexes built'",
        &[&name],
    )
    .await
    .expect("audit")
    .map(|r| r.get(0))
}

/// The `items` source mapped the way `items_pipeline` maps it.
pub const ITEMS_MAPPED: &str = "SELECT id, small, (price * 100)::bigint, body, length(body), \
    coalesce(small::text, '-') || ':' || coalesce(left(body, 8), ''), doc, tags, blob, seen FROM items";

pub fn pairs_pipeline(name: &str) -> String {
    format!(
        r#"
name: {name}
source: {{ dsn_env: ROWSHIFT_SOURCE_DSN, table: public.pairs }}
target:
  table: public.{name}
  ddl: "CREATE TABLE public.{name} (region text, seq int, value text, payload jsonb, PRIMARY KEY (region, seq))"
mapping:
  columns: [region, seq, {{ target: value, from: val }}, payload]
backfill: {{ chunk_rows: 300, rate_limit_rows_per_s: 3000 }}
"#
    )
}

pub const PAIRS_MAPPED: &str = "SELECT region, seq, val, payload FROM pairs";

/// Random inserts, updates (some touching only non-TOAST columns), key
/// updates and deletes until `stop` is set. Returns the statements that ran.
pub async fn write_randomly(
    c: Client,
    seed: u64,
    stop: Arc<AtomicBool>,
    next_id: Arc<AtomicI64>,
    max_id: i64,
) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut done = 0;
    while !stop.load(Ordering::Relaxed) {
        let id = rng.gen_range(1..max_id);
        let sql = match rng.gen_range(0..100) {
            0..=19 => {
                let new = next_id.fetch_add(1, Ordering::Relaxed);
                let body = if rng.gen_bool(0.3) { format!("repeat(md5('{new}'), 140)") } else { "NULL".into() };
                format!("INSERT INTO items VALUES ({new}, {}, 9.99, {body}, '{{\"new\": true}}', ARRAY[1], '\\x00ff', now(), 'n')", new % 100)
            }
            20..=49 => format!("UPDATE items SET small = small + 1 WHERE id = {id}"),
            50..=59 => format!("UPDATE items SET body = repeat(md5(random()::text), 130) WHERE id = {id}"),
            60..=69 => format!("UPDATE items SET price = price + 1, doc = NULL, tags = tags || 7, blob = NULL WHERE id = {id}"),
            70..=77 => {
                let new = next_id.fetch_add(1, Ordering::Relaxed);
                format!("UPDATE items SET id = {new} WHERE id = {id}")
            }
            78..=89 => format!("DELETE FROM items WHERE id = {id}"),
            90..=94 => format!("UPDATE pairs SET val = val || '!' WHERE seq = {}", id % 2000),
            95..=97 => format!("DELETE FROM pairs WHERE seq = {}", id % 2000),
            _ => format!("UPDATE pairs SET seq = seq + 100000 WHERE seq = {}", id % 2000),
        };
        // Transactions of one or two statements; conflicts are fine.
        let sql = if rng.gen_bool(0.2) {
            format!(
                "BEGIN; {sql}; UPDATE items SET small = 0 WHERE id = {}; COMMIT",
                id + 1
            )
        } else {
            sql
        };
        if c.batch_execute(&sql).await.is_err() {
            let _ = c.batch_execute("ROLLBACK").await;
        }
        done += 1;
    }
    done
}

/// `n` random writers on `items` (keys below `max_id`; new keys from a
/// range of their own per seed), until stopped.
pub struct Writers {
    stop: Arc<AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<u64>>,
}

pub async fn start_writers(db: &TestDb, seed: u64, n: u64, max_id: i64) -> Writers {
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicI64::new(10_000_000 + seed as i64 * 1_000_000));
    let mut handles = Vec::new();
    for i in 0..n {
        let c = db.client().await;
        handles.push(tokio::spawn(write_randomly(
            c,
            seed * 100 + i,
            stop.clone(),
            next.clone(),
            max_id,
        )));
    }
    Writers { stop, handles }
}

impl Writers {
    /// Stops the writers; returns the statements they ran.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for h in self.handles {
            total += h.await.expect("writer");
        }
        total
    }
}
