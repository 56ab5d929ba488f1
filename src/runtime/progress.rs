//! Progress for people: a redrawn line on a terminal, a structured log line
//! every few seconds otherwise. Counts and rates only, never row values.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    tty: bool,
    name: String,
    estimated: i64,
    rows: i64,
    chunks: i64,
    events: u64,
    lag_ms: Option<i64>,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    pub fn new(enabled: bool, name: &str, estimated: i64) -> Progress {
        Progress {
            tty: enabled && std::io::stderr().is_terminal(),
            name: name.to_string(),
            estimated,
            rows: 0,
            chunks: 0,
            events: 0,
            lag_ms: None,
            started: Instant::now(),
            last_log: Instant::now(),
        }
    }

    pub fn backfill(&mut self, rows: i64, chunks: i64) {
        self.rows = rows;
        self.chunks = chunks;
    }

    pub fn stream(&mut self, events: usize, lag_ms: Option<i64>) {
        self.events += events as u64;
        self.lag_ms = lag_ms.or(self.lag_ms);
    }

    pub fn draw(&mut self, note: Option<&str>) {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = self.rows as f64 / secs;
        let pct = if self.estimated > 0 {
            (self.rows as f64 * 100.0 / self.estimated as f64).min(100.0)
        } else {
            0.0
        };
        if self.tty {
            let bar_width = 24usize;
            let filled = ((pct / 100.0) * bar_width as f64) as usize;
            let line = format!(
                "\r{} [{}{}] {:5.1}% {}/{} rows  {:.0} rows/s  {} events  lag {} ms{}",
                self.name,
                "#".repeat(filled),
                "-".repeat(bar_width - filled),
                pct,
                self.rows,
                self.estimated,
                rate,
                self.events,
                self.lag_ms.unwrap_or(0),
                note.map(|n| format!("  ({n})")).unwrap_or_default()
            );
            let mut err = std::io::stderr();
            let _ = write!(err, "{line}\x1b[K");
            let _ = err.flush();
        } else if self.last_log.elapsed() >= Duration::from_secs(5) {
            self.last_log = Instant::now();
            tracing::info!(
                pipeline = %self.name,
                rows_copied = self.rows,
                rows_estimated = self.estimated,
                chunks = self.chunks,
                rows_per_s = rate as i64,
                events_applied = self.events,
                lag_ms = self.lag_ms.unwrap_or(0),
                throttled = note.unwrap_or(""),
                "progress"
            );
        }
    }

    pub fn finish(&mut self) {
        self.draw(None);
        if self.tty {
            eprintln!();
        }
    }
}
