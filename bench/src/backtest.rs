//! `nudge bench --backtest`: how long `nudge backtest` takes over a large
//! history, against issue 7's "a million stored events in well under a
//! minute".
//!
//! The bench's shop ([`nudge_kit::workload`]) is written straight into a scratch
//! database, no NATS: the events through the store's own batch write
//! (multi-row inserts, as the daemon commits them, each with its stream
//! sequence) and the daily sweeps of the scheduled rules through the store's
//! own sweep claim, so the sweep log is what a daemon running all along would
//! have kept. The derived tables (clients, counters) stay empty: a backtest
//! never reads them, it rebuilds every client from the log. Then every rule
//! of `rules.dir` is backtested over all of it, as
//! `nudge backtest --rules <rules.dir>` would.

use crate::probe;
use crate::report::Machine;
use anyhow::{Context, bail};
use chrono::{DateTime, Duration as Span, Utc};
use nudge::config::Config;
use nudge::core::rules::RuleEngine;
use nudge::core::rules::loader::RuleLoader;
use nudge::store::{AnyStore, BatchWrite, Batches, History, LogCursor, Schedules, StoredEvent};
use nudge_kit::workload::{self, Shape};
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
    /// CPU time the process spent in the backtest (all threads): what it
    /// costs whatever else the machine is doing.
    pub backtest_cpu_secs: f64,
    /// The most `backtest_secs` may be: 30 s per million events.
    pub target_secs: f64,
    pub meets_target: bool,
    /// Effects the rules would have made, by rule (every rule listed).
    pub effects: BTreeMap<String, u64>,
    pub effects_total: u64,
    /// Rule runs that failed (a script error or a limit reached).
    pub rule_errors: u64,
    /// The machine's 1, 5 and 15 minute load averages when the bench
    /// started: other work on the machine slows the figures down.
    pub load_average: String,
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
    config.database.url = db_url.into();
    config.database.max_size_mb = None;
    let store = nudge::app::open_store(&config).await?;
    if store.count_events().await? != 0 {
        bail!(
            "the database {} is not empty",
            nudge::config::redact(db_url)
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

    let load_average = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into());
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
    let cpu = cpu_secs();
    let t = Instant::now();
    let report = nudge::tools::backtest(&config, &store, &config.rules.dir, None, None).await?;
    let backtest_secs = t.elapsed().as_secs_f64();
    let backtest_cpu_secs = cpu_secs() - cpu;
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
        load_average,
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
        backtest_cpu_secs,
        target_secs,
        meets_target: backtest_secs < target_secs,
        effects_total: effects.values().sum(),
        effects,
        rule_errors,
        peak_mib,
        peak_reset,
    })
}

/// User and system CPU seconds of this process so far (0 where unknown).
pub(crate) fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    // utime and stime are fields 14 and 15, in clock ticks (100 a second on Linux).
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

/// The bench's shop over [`HISTORY_DAYS`] up to `end`, committed in batches
/// as the daemon would have: every event with its stream sequence.
pub(crate) async fn write_events(
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
                    nudge::domain::event::Envelope::from_value(workload::render(s, &id, "s", None))
                        .map_err(|e| anyhow::anyhow!("the workload made an invalid event: {e}"))?;
                Ok(StoredEvent {
                    envelope: envelope.into(),
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
            .events_page(cursor.as_ref(), nudge::tools::replay::PAGE)
            .await?;
        n += page.len();
        let Some((_, last)) = page.last() else {
            return Ok(n);
        };
        cursor = Some(last.clone());
        if page.len() < nudge::tools::replay::PAGE as usize {
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
            "machine: {} cpus, {}, {:.1} GiB; load average {} at the start\n",
            m.cpus, m.cpu_model, m.memory_gib, self.load_average
        );
        let size = if self.database == "sqlite" {
            format!("{:.0} MiB database, ", self.database_mib)
        } else {
            String::new()
        };
        let _ = writeln!(
            t,
            "  history written     {:>8.1} s   ({size}{} sweeps logged)",
            self.write_secs, self.sweeps
        );
        let _ = writeln!(t, "  log read alone      {:>8.1} s", self.read_secs);
        let _ = writeln!(
            t,
            "  backtest            {:>8.1} s   ({:.0} events/s; {:.1} CPU-seconds)",
            self.backtest_secs, self.events_per_sec, self.backtest_cpu_secs
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

#[cfg(test)]
mod tests {
    use super::*;
    use nudge::core::decide::{Core, CoreSettings};
    use nudge::flow::catalog::Catalog;
    use nudge::tools::replay::{Replay, walk};

    /// Everything a walk decides, in the order it hands it on, and the
    /// counters it leaves.
    type Walked = (Vec<(DateTime<Utc>, String, String)>, String);

    async fn walk_with(
        config: &Config,
        store: &AnyStore,
        shards: usize,
        end: DateTime<Utc>,
    ) -> Walked {
        let engine = Arc::new(RuleEngine::new(&config.rules));
        let rules = RuleLoader::new(engine.clone(), config.rules.dir.clone()).load();
        assert!(rules.errors.is_empty(), "{:?}", rules.errors);
        let catalog = Catalog::load(config);
        let templates = catalog.templates();
        let settings = CoreSettings::from_config(config);
        let core = Core {
            engine: &engine,
            rules: &rules,
            templates: &templates,
            settings: &settings,
        };
        let mut replay = Replay::with_shards(core, config.history.business_tz(), shards);
        let mut seen = Vec::new();
        walk(
            store,
            &mut replay,
            Some(end),
            |at, d| {
                for (rule, ok) in d.runs {
                    seen.push((at, rule, format!("run {ok}")));
                }
                for e in d.effects {
                    seen.push((at, e.rule, e.key));
                }
            },
            |_| {},
        )
        .await
        .unwrap();
        let derived = replay.into_derived();
        let counters = format!("{:?} {:?}", derived.counters, derived.members);
        (seen, counters)
    }

    /// Shards decide each client apart, but the counters shared by all
    /// clients must still be used in the log's order: a rule that mails
    /// every fifth distinct buyer picks the same buyers on any number of
    /// threads, and every decision comes out in the same order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sharded_walks_decide_as_one_thread_does() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the bench is a folder of the repository");
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules");
        std::fs::create_dir(&rules).unwrap();
        for f in std::fs::read_dir(root.join("rules")).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "rhai") {
                std::fs::copy(&f, rules.join(f.file_name().unwrap())).unwrap();
            }
        }
        std::fs::write(
            rules.join("every_fifth_buyer.rhai"),
            "const ON = [\"order_placed\", \"cart_item_added\"];\n\
             add(\"steps\", \"all\", 1);\n\
             if add_distinct(\"buyers\", \"all\", client.id) && distinct(\"buyers\", \"all\") % 5 == 0 {\n\
                 mail(\"welcome\");\n\
             }\n",
        )
        .unwrap();
        let mut config =
            Config::load_with_env(Some(&root.join("config.example.yaml")), Vec::new()).unwrap();
        config.rules.dir = rules;
        config.templates.dir = root.join("templates");
        config.database.url = format!("sqlite://{}", dir.path().join("h.db").display()).into();
        let store = nudge::app::open_store(&config).await.unwrap();
        write_events(&store, 6_000, 300, Utc::now()).await.unwrap();
        let schedule: cron::Schedule = "0 0 9 * * *".parse().unwrap();
        let end = Utc::now();
        log_sweeps(
            &store,
            "idle_reminder",
            &schedule,
            end - Span::days(HISTORY_DAYS),
            end,
        )
        .await
        .unwrap();

        let one = walk_with(&config, &store, 1, end).await;
        assert!(
            one.0.iter().any(|(_, rule, _)| rule == "every_fifth_buyer"),
            "the counter rule mailed nobody"
        );
        assert!(one.1.contains("buyers"), "{}", one.1);
        for shards in [2, 5] {
            let many = walk_with(&config, &store, shards, end).await;
            assert_eq!(many.1, one.1, "counters with {shards} shards");
            assert!(many.0 == one.0, "decisions with {shards} shards differ");
        }
    }
}
