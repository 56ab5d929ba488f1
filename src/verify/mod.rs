//! Verification: row counts and chunked checksums of the source (through
//! the mapping) and the target, along the key, while the stream keeps
//! applying changes.
//!
//! # Reading both sides "at the same moment"
//!
//! Source and target live in the same database, so each chunk is read on
//! both sides inside **one** `REPEATABLE READ` snapshot. The target in that
//! snapshot reflects the source up to the applier's last committed batch
//! (batches commit atomically with their checkpoint), the source reflects
//! every commit up to the snapshot. The two differ only if (a) the target is
//! wrong, or (b) a change to the chunk committed in the lag window between
//! the two. To tell them apart, a differing chunk is read again once the
//! stream has applied past the WAL position of the previous read (so every
//! change the source side saw is then in the target), up to `rechecks`
//! times. A chunk that still differs (a hot one: the newest keys of a table
//! under insert load change in every window) is then compared row by row:
//! the keys whose rows differ are read again after the stream passed each
//! read, and only keys that differed in *every* read count. A row that was
//! merely behind is current in the next read; a wrong row differs in all of
//! them. So lag is never reported as a mismatch.
//!
//! # Repair
//!
//! The apply loop is the only writer of the target (the backfill's
//! correctness argument depends on it). So `--repair` does not write the
//! target itself: it queues the key range in `rowshift.repairs`, and the
//! running pipeline re-copies it between two batches, exactly like a backfill
//! chunk (delete target rows the source lacks, upsert every source row).
//! Then the range is checked again.

mod sql;

use crate::error::{Error, Result};
use crate::model::{Key, Lsn};
use crate::preflight;
use crate::sink::postgres::{PgSink, Role};
use crate::source::postgres::connect;
use crate::spec::Pipeline;
use crate::state::{self, key_to_array};
use crate::transform::Mapping;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Mutex};
use tokio_postgres::{Client, Statement};

/// What `rowshift verify` does besides checking.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Re-copy chunks that still differ, then check them again.
    pub repair: bool,
}

/// A key range `lo < key <= hi` (either end open).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyRange {
    pub lo: Option<Vec<Option<String>>>,
    pub hi: Option<Vec<Option<String>>>,
}

impl KeyRange {
    fn new(lo: &Option<Key>, hi: &Option<Key>) -> KeyRange {
        KeyRange {
            lo: key_to_array(lo),
            hi: key_to_array(hi),
        }
    }

    fn keys(&self) -> (Option<Key>, Option<Key>) {
        (self.lo.clone().map(Key), self.hi.clone().map(Key))
    }
}

impl std::fmt::Display for KeyRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |k: &Option<Vec<Option<String>>>, open: &str| match k {
            None => open.to_string(),
            Some(v) => format!(
                "({})",
                v.iter()
                    .map(|c| c.as_deref().unwrap_or("NULL"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        write!(
            f,
            "{} < key <= {}",
            show(&self.lo, "-inf"),
            show(&self.hi, "+inf")
        )
    }
}

/// One chunk that still differed after its rechecks.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    pub range: KeyRange,
    pub source_rows: i64,
    pub target_rows: i64,
    /// Keys that differed in every key-level re-read.
    pub differing_keys: usize,
    pub repaired: bool,
}

/// The stored outcome of one verification.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub id: i64,
    pub chunks: i64,
    pub rows_source: i64,
    pub rows_target: i64,
    /// Chunks that differed at first and matched on a recheck (lag).
    pub rechecked: i64,
    pub mismatches: Vec<Mismatch>,
    pub repaired: i64,
    pub duration_ms: i64,
    pub rows_per_s: f64,
}

impl Report {
    /// Mismatches that are still there (not repaired).
    pub fn unresolved(&self) -> usize {
        self.mismatches.iter().filter(|m| !m.repaired).count()
    }
}

/// One chunk read on both sides in one snapshot.
#[derive(Debug, Clone)]
struct Reading {
    range: KeyRange,
    source: (i64, i64),
    target: (i64, i64),
    /// The WAL position when the snapshot was taken.
    wal: Lsn,
}

impl Reading {
    fn equal(&self) -> bool {
        self.source == self.target
    }
}

/// Reads chunks on one connection.
struct Checker {
    client: Client,
    mapping: Arc<Mapping>,
    p: Pipeline,
    statements: HashMap<(u8, bool, bool), Statement>,
}

type RowHashes = HashMap<Vec<Option<String>>, i64>;

impl Checker {
    async fn connect(dsn: &str, mapping: Arc<Mapping>, p: &Pipeline) -> Result<Checker> {
        let client = connect(dsn, "verify").await?;
        client
            .batch_execute("SET work_mem = '64MB'; SET random_page_cost = 1.1")
            .await
            .map_err(Error::db("prepare verify session"))?;
        Ok(Checker {
            client,
            mapping,
            p: p.clone(),
            statements: Default::default(),
        })
    }

    /// Kinds: 0/1 source/target checksum, 2/3 source/target row hashes.
    async fn statement(&mut self, kind: u8, lo: bool, hi: bool) -> Result<Statement> {
        if let Some(s) = self.statements.get(&(kind, lo, hi)) {
            return Ok(s.clone());
        }
        let (m, p) = (&self.mapping, &self.p);
        let text = match kind {
            0 => sql::source_checksum(m, &p.source_table, lo, hi),
            1 => sql::target_checksum(m, &p.target_table, lo, hi),
            2 => sql::source_rows(m, &p.source_table, lo, hi),
            _ => sql::target_rows(m, &p.target_table, lo, hi),
        };
        let s = self
            .client
            .prepare(&text)
            .await
            .map_err(Error::db("prepare checksum"))?;
        self.statements.insert((kind, lo, hi), s.clone());
        Ok(s)
    }

    /// Runs statement kinds `src` and `tgt` over `range` in one snapshot;
    /// returns both results and the WAL position of the snapshot.
    async fn both_sides(
        &mut self,
        (src, tgt): (u8, u8),
        range: &KeyRange,
    ) -> Result<(Vec<tokio_postgres::Row>, Vec<tokio_postgres::Row>, Lsn)> {
        let (lo, hi) = range.keys();
        let src = self.statement(src, lo.is_some(), hi.is_some()).await?;
        let tgt = self.statement(tgt, lo.is_some(), hi.is_some()).await?;
        let params = Key::range_params(lo.as_ref(), hi.as_ref());
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p as _).collect();
        let tx = self
            .client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(Error::db("begin verification snapshot"))?;
        let wal: String = tx
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(Error::db("read WAL position"))?
            .get(0);
        let s = tx
            .query(&src, &refs)
            .await
            .map_err(Error::db("read source chunk"))?;
        let t = tx
            .query(&tgt, &refs)
            .await
            .map_err(Error::db("read target chunk"))?;
        tx.commit()
            .await
            .map_err(Error::db("end verification snapshot"))?;
        Ok((s, t, Lsn::parse(&wal).unwrap_or(Lsn::ZERO)))
    }

    /// Count and checksum of the chunk on both sides.
    async fn read(&mut self, range: KeyRange) -> Result<Reading> {
        let (s, t, wal) = self.both_sides((0, 1), &range).await?;
        let pair = |rows: &[tokio_postgres::Row]| -> Result<(i64, i64)> {
            let r = rows
                .first()
                .ok_or_else(|| Error::State("a checksum query returned no row".into()))?;
            Ok((r.get(0), r.get(1)))
        };
        Ok(Reading {
            source: pair(&s)?,
            target: pair(&t)?,
            range,
            wal,
        })
    }

    /// The keys whose rows differ between the sides, in one snapshot, and
    /// the WAL position of that snapshot.
    async fn differing_keys(
        &mut self,
        range: &KeyRange,
    ) -> Result<(HashSet<Vec<Option<String>>>, Lsn)> {
        let (s, t, wal) = self.both_sides((2, 3), range).await?;
        let hashes = |rows: Vec<tokio_postgres::Row>| -> RowHashes {
            rows.iter().map(|r| (r.get(0), r.get(1))).collect()
        };
        let (s, t) = (hashes(s), hashes(t));
        let mut keys: HashSet<Vec<Option<String>>> = s
            .iter()
            .filter(|(k, h)| t.get(*k) != Some(*h))
            .map(|(k, _)| k.clone())
            .collect();
        keys.extend(t.keys().filter(|k| !s.contains_key(*k)).cloned());
        Ok((keys, wal))
    }
}

/// A chunk that kept differing while it was busy: compare it row by row,
/// re-reading after the stream passed each read, and keep only the keys that
/// differed every time (a key changed in one lag window is current in the
/// next read; a wrong row differs in all of them).
async fn settle_keys(
    control: &Client,
    checker: &mut Checker,
    p: &Pipeline,
    range: &KeyRange,
) -> Result<usize> {
    let (mut suspects, mut wal) = checker.differing_keys(range).await?;
    for _ in 0..p.verify.rechecks.max(1) {
        if suspects.is_empty() {
            break;
        }
        wait_applied(control, &p.name, wal, Duration::from_secs(30)).await?;
        let (now, at) = checker.differing_keys(range).await?;
        suspects.retain(|k| now.contains(k));
        wal = at;
    }
    Ok(suspects.len())
}

/// Verifies a pipeline's target against its source and stores the report.
pub async fn verify(p: &Pipeline, opts: Options) -> Result<Report> {
    let dsn = p.source_dsn()?;
    let mut control = connect(&dsn, "verify").await?;
    let record = state::load(&control, &p.name)
        .await?
        .ok_or_else(|| Error::State(format!("pipeline {} has not been run", p.name)))?;
    if record.direction != "forward" || record.phase == "contracted" {
        return Err(Error::State(format!(
            "pipeline {} is {}; verification compares the old table with the new one before cut-over",
            p.name, record.phase
        )));
    }
    if !matches!(
        record.phase.as_str(),
        "caught_up" | "verified" | "rolled_back" | "cutting_over"
    ) {
        return Err(Error::State(format!(
            "pipeline {} is {}; verify once the backfill has finished and the stream caught up",
            p.name, record.phase
        )));
    }
    let checked = preflight::check(&mut control, p, Some(&record)).await?;
    let mapping = Arc::new(checked.mapping);
    let id: i64 = control
        .query_one(
            "INSERT INTO rowshift.verifications (pipeline) VALUES ($1) RETURNING id",
            &[&p.name],
        )
        .await
        .map_err(Error::db("record verification"))?
        .get(0);
    let started = Instant::now();
    let readings = first_pass(p, &dsn, mapping.clone()).await?;

    let mut checker = Checker::connect(&dsn, mapping.clone(), p).await?;
    let mut report = Report {
        id,
        chunks: readings.len() as i64,
        rows_source: readings.iter().map(|r| r.source.0).sum(),
        rows_target: readings.iter().map(|r| r.target.0).sum(),
        rechecked: 0,
        mismatches: Vec::new(),
        repaired: 0,
        duration_ms: 0,
        rows_per_s: 0.0,
    };
    for first in readings.into_iter().filter(|r| !r.equal()) {
        let last = recheck(&control, &mut checker, p, first).await?;
        let differing = if last.equal() {
            0
        } else {
            settle_keys(&control, &mut checker, p, &last.range).await?
        };
        if differing == 0 {
            report.rechecked += 1;
            continue;
        }
        let mut mismatch = Mismatch {
            range: last.range.clone(),
            source_rows: last.source.0,
            target_rows: last.target.0,
            differing_keys: differing,
            repaired: false,
        };
        tracing::warn!(pipeline = %p.name, range = %mismatch.range, keys = differing, "chunk differs");
        if opts.repair {
            request_repair(&control, p, &last.range).await?;
            let after = recheck(&control, &mut checker, p, last).await?;
            mismatch.repaired =
                after.equal() || settle_keys(&control, &mut checker, p, &after.range).await? == 0;
            if mismatch.repaired {
                report.repaired += 1;
            }
        }
        report.mismatches.push(mismatch);
    }
    let elapsed = started.elapsed();
    report.duration_ms = elapsed.as_millis() as i64;
    report.rows_per_s = (report.rows_source as f64 / elapsed.as_secs_f64().max(1e-3)).round();
    store(&control, p, &report).await?;
    Ok(report)
}

/// Reads every chunk once: one task finds chunk bounds along the source
/// key, `verify.workers` connections read chunks as the bounds arrive.
async fn first_pass(p: &Pipeline, dsn: &str, mapping: Arc<Mapping>) -> Result<Vec<Reading>> {
    let workers = p.verify.workers.max(1) as usize;
    let (tx, rx) = mpsc::channel::<KeyRange>(workers * 2);
    let rx = Arc::new(Mutex::new(rx));
    let mut bounds = PgSink::for_pipeline(dsn, p, mapping.clone(), Role::Copy).await?;
    let chunk = p.verify.chunk_rows as i64;
    let producer = async move {
        let mut cursor: Option<Key> = None;
        loop {
            let hi = bounds.next_bound(cursor.as_ref(), None, chunk).await?;
            if tx.send(KeyRange::new(&cursor, &hi)).await.is_err() {
                return Ok(());
            }
            match hi {
                Some(h) => cursor = Some(h),
                None => return Ok::<(), Error>(()),
            }
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let mut checker = Checker::connect(dsn, mapping.clone(), p).await?;
        let rx = rx.clone();
        tasks.spawn(async move {
            let mut out = Vec::new();
            loop {
                let next = rx.lock().await.recv().await;
                let Some(range) = next else { break };
                out.push(checker.read(range).await?);
            }
            Ok::<Vec<Reading>, Error>(out)
        });
    }
    let produced = producer.await;
    let mut readings = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let part = joined.map_err(|e| Error::State(format!("verify worker: {e}")))??;
        readings.extend(part);
    }
    produced?;
    Ok(readings)
}

/// Reads a differing chunk again, each time after the stream applied past
/// the previous read's WAL position, until it matches or the rechecks run out.
async fn recheck(
    control: &Client,
    checker: &mut Checker,
    p: &Pipeline,
    mut reading: Reading,
) -> Result<Reading> {
    for _ in 0..p.verify.rechecks {
        if reading.equal() {
            break;
        }
        wait_applied(control, &p.name, reading.wal, Duration::from_secs(30)).await?;
        reading = checker.read(reading.range.clone()).await?;
    }
    Ok(reading)
}

/// Waits until the running pipeline applied past `lsn`. Without a running
/// pipeline the target does not move, so there is nothing to wait for.
pub async fn wait_applied(control: &Client, name: &str, lsn: Lsn, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if !state::lease_held(control, name).await? {
            return Ok(());
        }
        let row = control
            .query_one(
                "SELECT coalesce(CASE WHEN direction = 'forward' THEN applied_lsn ELSE rev_applied_lsn END, '0/0')::text \
                 FROM rowshift.pipelines WHERE name = $1",
                &[&name],
            )
            .await
            .map_err(Error::db("read applied position"))?;
        let applied = Lsn::parse(&row.get::<_, String>(0)).unwrap_or(Lsn::ZERO);
        if applied >= lsn {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::State(format!(
                "the stream did not reach {lsn} within {} s (applied {applied}); is it lagging?",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Queues a range for the running pipeline to re-copy and waits until it has.
async fn request_repair(control: &Client, p: &Pipeline, range: &KeyRange) -> Result<()> {
    if !state::lease_held(control, &p.name).await? {
        return Err(Error::State(format!(
            "repair needs the pipeline running (`rowshift run {}`): the running pipeline is the only writer of the target",
            p.file.display()
        )));
    }
    let id: i64 = control
        .query_one(
            "INSERT INTO rowshift.repairs (pipeline, lo, hi) VALUES ($1, $2, $3) RETURNING id",
            &[&p.name, &range.lo, &range.hi],
        )
        .await
        .map_err(Error::db("queue repair"))?
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = control
            .query_opt(
                "SELECT 1 FROM rowshift.repairs WHERE id = $1 AND done_at IS NOT NULL",
                &[&id],
            )
            .await
            .map_err(Error::db("wait for repair"))?
            .is_some();
        if done {
            return Ok(());
        }
        if Instant::now() >= deadline || !state::lease_held(control, &p.name).await? {
            return Err(Error::State(format!(
                "the running pipeline did not re-copy {range}; repair request {id} stays queued"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn store(control: &Client, p: &Pipeline, r: &Report) -> Result<()> {
    let ranges = r
        .mismatches
        .iter()
        .map(|m| {
            format!(
                "{} (source {} rows, target {} rows, {} keys differ{})",
                m.range,
                m.source_rows,
                m.target_rows,
                m.differing_keys,
                if m.repaired { ", repaired" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    control
        .execute(
            "UPDATE rowshift.verifications SET finished_at = now(), chunks = $2, rows_source = $3, \
             rows_target = $4, rechecked = $5, mismatches = $6, repaired = $7, duration_ms = $8, \
             rows_per_s = $9, mismatched_ranges = $10 WHERE id = $1",
            &[
                &r.id,
                &r.chunks,
                &r.rows_source,
                &r.rows_target,
                &r.rechecked,
                &(r.mismatches.len() as i64),
                &r.repaired,
                &r.duration_ms,
                &r.rows_per_s,
                &ranges,
            ],
        )
        .await
        .map_err(Error::db("store verification"))?;
    if r.unresolved() == 0 {
        control
            .execute(
                "UPDATE rowshift.pipelines SET phase = 'verified', updated_at = now() \
                 WHERE name = $1 AND phase = 'caught_up'",
                &[&p.name],
            )
            .await
            .map_err(Error::db("record verified"))?;
    }
    state::audit(
        control,
        &p.name,
        "verified",
        &format!(
            "{} chunks, {} mismatches, {} repaired",
            r.chunks,
            r.mismatches.len(),
            r.repaired
        ),
    )
    .await
}
