//! `nudge bench --backtest`: how long `nudge backtest` takes over a large
//! history, against issue 7's "a million stored events in well under a
//! minute".
//!
//! The bench's shop ([`super::workload`]) is written straight into a scratch
//! database, no NATS: the events through the store's own batch write
//! (multi-row inserts, as the daemon commits them, each with its stream
//! sequence) and the daily sweeps of the scheduled rules through the store's
//! own sweep claim, so the sweep log is what a daemon running all along would
//! have kept. The derived tables (clients, counters) stay empty: a backtest
//! never reads them, it rebuilds every client from the log. Then every rule
//! of `rules.dir` is backtested over all of it, as
//! `nudge backtest --rules <rules.dir>` would.

use super::probe;
use super::report::Machine;
use super::workload::{self, Shape};
use crate::config::Config;
use crate::rules::RuleEngine;
use crate::rules::loader::RuleLoader;
use crate::store::{AnyStore, BatchWrite, LogCursor, Store, StoredEvent};
use anyhow::{Context, bail};
use chrono::{DateTime, Duration as Span, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// Events written per transaction while filling the database.
const WRITE_BATCH: usize = 5_000;
/// The history spans this long, ending when the bench starts.
const HISTORY_DAYS: i64 = 30;
/// "Well under a minute" for a million events, made a number: half of it.
const TARGET_SECS_PER_MILLION: f64 = 30.0;

#[derive(Debug, Serialize)]
pub struct BacktestReport {
    pub machine: Machine,
    /// `sqlite` or `postgres`.
    pub database: String,
    /// The shop's events in the log, all of them walked by the backtest.
    pub events: usize,
    pub clients: u32,
    pub history_days: i64,
    /// Sweeps of scheduled rules logged over the history, replayed in order.
    pub sweeps: u64,
    /// Writing the history into the scratch database.
    pub write_secs: f64,
    /// Size of the scratch SQLite database (0 for PostgreSQL).
    pub database_mib: f64,
    /// Reading the whole event log, page by page, deciding nothing.
    pub read_secs: f64,
    /// The backtest itself: reading, deciding every event with every rule.
    pub backtest_secs: f64,
    pub events_per_sec: f64,
    /// The most `backtest_secs` may be: 30 s per million events.
    pub target_secs: f64,
    pub meets_target: bool,
    /// Effects the rules would have made, by rule (every rule listed).
    pub effects: BTreeMap<String, u64>,
    pub effects_total: u64,
    /// Rule runs that failed (a script error or a limit reached).
    pub rule_errors: u64,
    /// Peak resident memory of the process during the backtest, MiB.
    pub peak_mib: f64,
    /// Whether the peak covers the backtest alone (else since process start).
    pub peak_reset: bool,
}

pub async fn run(
    events: usize,
    clients: u32,
    config: &Config,
    db_url: &str,
) -> anyhow::Result<BacktestReport> {
    let mut config = config.clone();
    config.database.url = db_url.to_string();
    config.database.max_size_mb = None;
    let store = crate::app::open_store(&config).await?;
    if store.count_events().await? != 0 {
        bail!(
            "the database {} is not empty",
            crate::config::redact(db_url)
        );
    }
    // The rules' names (every one gets a line in the report) and schedules.
    let rules = RuleLoader::new(
        Arc::new(RuleEngine::new(&config.rules)),
        config.rules.dir.clone(),
    )
    .load();
    if !rules.errors.is_empty() || rules.rules.is_empty() {
        let list: Vec<String> = rules.errors.iter().map(|e| e.to_string()).collect();
        bail!(
            "the rules of {} are refused or missing, the bench would measure the wrong work: {}",
            config.rules.dir.display(),
            list.join("; ")
        );
    }

    let end = Utc::now();
    let start = end - Span::days(HISTORY_DAYS);
    eprintln!("bench: writing {events} events from {clients} clients over {HISTORY_DAYS} days");
    let t = Instant::now();
    write_events(&store, events, clients, end).await?;
    for r in &rules.rules {
        if let Some(s) = &r.schedule {
            log_sweeps(&store, &r.name, &s.cron, start, end).await?;
        }
    }
    let write_secs = t.elapsed().as_secs_f64();
    eprintln!("bench: written in {write_secs:.1} s");
    let database_mib = db_url
        .strip_prefix("sqlite://")
        .map(|p| {
            ["", "-wal"]
                .iter()
                .filter_map(|suffix| std::fs::metadata(format!("{p}{suffix}")).ok())
                .map(|m| m.len() as f64 / 1024.0 / 1024.0)
                .sum()
        })
        .unwrap_or(0.0);

    eprintln!("bench: reading the log alone");
    let t = Instant::now();
    let read = read_all(&store).await?;
    let read_secs = t.elapsed().as_secs_f64();
    if read != events {
        bail!("read {read} of the {events} events written");
    }

    eprintln!(
        "bench: backtest with the {} rules of {}",
        rules.rules.len(),
        config.rules.dir.display()
    );
    // The peak covers the backtest, not the writing before it.
    let peak_reset = probe::reset_peak_memory();
    let t = Instant::now();
    let report = crate::tools::backtest(&config, &store, &config.rules.dir, None, None).await?;
    let backtest_secs = t.elapsed().as_secs_f64();
    let peak_mib = probe::memory_mib("VmHWM");
    if report.events != events as u64 {
        bail!("the backtest walked {} of {events} events", report.events);
    }
    let mut effects: BTreeMap<String, u64> =
        rules.rules.iter().map(|r| (r.name.clone(), 0)).collect();
    let mut rule_errors = 0;
    for (rule, s) in &report.rules {
        let n: u64 = s
            .mails
            .values()
            .chain(s.events.values())
            .chain(s.tasks.values())
            .sum();
        *effects.entry(rule.clone()).or_default() += n;
        rule_errors += s.errors;
    }
    let target_secs = TARGET_SECS_PER_MILLION * events as f64 / 1e6;
    Ok(BacktestReport {
        machine: Machine::this(),
        database: db_url.split(':').next().unwrap_or("").into(),
        events,
        clients,
        history_days: HISTORY_DAYS,
        sweeps: report.sweeps,
        write_secs,
        database_mib,
        read_secs,
        backtest_secs,
        events_per_sec: events as f64 / backtest_secs.max(1e-9),
        target_secs,
        meets_target: backtest_secs < target_secs,
        effects_total: effects.values().sum(),
        effects,
        rule_errors,
        peak_mib,
        peak_reset,
    })
}

/// The bench's shop over [`HISTORY_DAYS`] up to `end`, committed in batches
/// as the daemon would have: every event with its stream sequence.
async fn write_events(
    store: &AnyStore,
    n: usize,
    clients: u32,
    end: DateTime<Utc>,
) -> anyhow::Result<()> {
    let shape = Shape {
        clients,
        register: true,
        tag: "s",
    };
    let specs = workload::generate(n, &shape, 1, end, Span::days(HISTORY_DAYS));
    for (chunk_no, chunk) in specs.chunks(WRITE_BATCH).enumerate() {
        let base = chunk_no * WRITE_BATCH;
        let events = chunk
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let seq = base + i + 1;
                let id = format!("ev-{seq:08}");
                let envelope =
                    crate::event::Envelope::from_value(workload::render(s, &id, "s", None))
                        .map_err(|e| anyhow::anyhow!("the workload made an invalid event: {e}"))?;
                Ok(StoredEvent {
                    envelope,
                    // Received as it happened, as from a live shop.
                    received_at: s.at,
                    stream_seq: Some(seq as u64),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let write = BatchWrite {
            events,
            ..Default::default()
        };
        store
            .commit_batch(&write)
            .await
            .context("writing the history")?;
    }
    Ok(())
}

/// Claims (and so logs) every slot of `cron` between `start` and `end`, as
/// the scheduler of a daemon running all along would have.
async fn log_sweeps(
    store: &AnyStore,
    rule: &str,
    cron: &cron::Schedule,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> anyhow::Result<()> {
    for slot in cron.after(&start).take_while(|t| *t <= end) {
        // Each sweep finished well before the next slot: its lease is over.
        store
            .claim_sweep(rule, slot, slot, slot + Span::seconds(1))
            .await
            .context("logging a sweep")?;
    }
    Ok(())
}

/// Reads every page of the log as a walk does, deciding nothing.
async fn read_all(store: &AnyStore) -> anyhow::Result<usize> {
    let mut cursor: Option<LogCursor> = None;
    let mut n = 0;
    loop {
        let page = store
            .events_page(cursor.as_ref(), crate::replay::PAGE)
            .await?;
        n += page.len();
        let Some((_, last)) = page.last() else {
            return Ok(n);
        };
        cursor = Some(last.clone());
        if page.len() < crate::replay::PAGE as usize {
            return Ok(n);
        }
    }
}

impl BacktestReport {
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut t = String::new();
        let m = &self.machine;
        let _ = writeln!(
            t,
            "nudge bench --backtest: {} events from {} clients over {} days, {}",
            self.events, self.clients, self.history_days, self.database
        );
        let _ = writeln!(
            t,
            "machine: {} cpus, {}, {:.1} GiB\n",
            m.cpus, m.cpu_model, m.memory_gib
        );
        let _ = writeln!(
            t,
            "  history written     {:>8.1} s   ({:.0} MiB database, {} sweeps logged)",
            self.write_secs, self.database_mib, self.sweeps
        );
        let _ = writeln!(t, "  log read alone      {:>8.1} s", self.read_secs);
        let _ = writeln!(
            t,
            "  backtest            {:>8.1} s   ({:.0} events/s)",
            self.backtest_secs, self.events_per_sec
        );
        let _ = writeln!(
            t,
            "  target              < {:>6.1} s   ({})\n",
            self.target_secs,
            if self.meets_target {
                "met: well under a minute per million events"
            } else {
                "missed"
            }
        );
        let _ = writeln!(
            t,
            "effects found: {} in all; rule errors: {}",
            self.effects_total, self.rule_errors
        );
        for (rule, n) in &self.effects {
            let _ = writeln!(t, "  {rule:<22} {n:>8}");
        }
        let _ = writeln!(
            t,
            "peak memory (RSS): {:.0} MiB{}",
            self.peak_mib,
            if self.peak_reset {
                ""
            } else {
                " (since process start)"
            }
        );
        t
    }
}
