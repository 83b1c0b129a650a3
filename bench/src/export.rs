//! `nudge bench --export`: how long `nudge export` takes over a large
//! history, against issue 27's "a million events in well under a minute on
//! two cores, with bounded memory".
//!
//! The bench's shop is written straight into a scratch database as for
//! `--backtest` (the events through the store's own batch write, each with
//! its stream sequence; the derived tables stay empty, so the snapshot
//! tables are small and the figure is the event log's three tables), then
//! exported once as Parquet and once as CSV into the scratch folder, as
//! `nudge export --to DIR` would on its first run.

use crate::backtest::{cpu_secs, write_events};
use crate::probe;
use crate::report::Machine;
use anyhow::bail;
use nudge::config::{Config, ExportFormat};
use nudge::store::History;
use nudge::tools::export::{Options, Start, export};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// "Well under a minute" for a million events, made a number: half of it.
const TARGET_SECS_PER_MILLION: f64 = 30.0;

#[derive(Debug, Serialize)]
pub struct ExportReport {
    pub machine: Machine,
    /// `sqlite` or `postgres`.
    pub database: String,
    pub events: usize,
    pub clients: u32,
    /// Writing the history into the scratch database.
    pub write_secs: f64,
    pub runs: Vec<ExportRun>,
    /// The most an export may take: 30 s per million events.
    pub target_secs: f64,
    pub meets_target: bool,
    /// The machine's 1, 5 and 15 minute load averages at the start.
    pub load_average: String,
}

/// One export of the whole history.
#[derive(Debug, Serialize)]
pub struct ExportRun {
    pub format: ExportFormat,
    pub secs: f64,
    pub events_per_sec: f64,
    /// CPU time of the process during the run (all threads).
    pub cpu_secs: f64,
    /// Rows of `events`, `orders` and `order_items`.
    pub events_rows: u64,
    pub orders_rows: u64,
    pub order_items_rows: u64,
    pub files: usize,
    pub output_mib: f64,
    /// Peak resident memory of the process during the run, MiB.
    pub peak_mib: f64,
    /// Whether the peak covers the run alone (else since process start).
    pub peak_reset: bool,
}

pub async fn run(
    events: usize,
    clients: u32,
    config: &Config,
    db_url: &str,
    scratch: &Path,
) -> anyhow::Result<ExportReport> {
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
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into());
    eprintln!("bench: writing {events} events from {clients} clients");
    let t = Instant::now();
    write_events(&store, events, clients, chrono::Utc::now()).await?;
    let write_secs = t.elapsed().as_secs_f64();
    eprintln!("bench: written in {write_secs:.1} s");

    let mut runs = Vec::new();
    for format in [ExportFormat::Parquet, ExportFormat::Csv] {
        let dir = scratch.join(format!("export-{}", format.extension()));
        eprintln!(
            "bench: exporting as {} into {}",
            format.extension(),
            dir.display()
        );
        let peak_reset = probe::reset_peak_memory();
        let cpu = cpu_secs();
        let t = Instant::now();
        let opts = Options {
            dir: dir.clone(),
            format,
            start: Start::Resume,
            timezone: config.history.business_timezone,
        };
        let report = export(&store, &opts).await?;
        let secs = t.elapsed().as_secs_f64();
        let rows = |t: &str| report.rows.get(t).copied().unwrap_or(0);
        if rows("events") != events as u64 {
            bail!("the export wrote {} of {events} events", rows("events"));
        }
        runs.push(ExportRun {
            format,
            secs,
            events_per_sec: events as f64 / secs.max(1e-9),
            cpu_secs: cpu_secs() - cpu,
            events_rows: rows("events"),
            orders_rows: rows("orders"),
            order_items_rows: rows("order_items"),
            files: report.files.len(),
            output_mib: report.files.iter().map(|f| f.bytes).sum::<u64>() as f64 / 1048576.0,
            peak_mib: probe::memory_mib("VmHWM"),
            peak_reset,
        });
    }
    let target_secs = TARGET_SECS_PER_MILLION * events as f64 / 1e6;
    Ok(ExportReport {
        machine: Machine::this(),
        database: db_url.split(':').next().unwrap_or("").into(),
        events,
        clients,
        write_secs,
        meets_target: runs.iter().all(|r| r.secs < target_secs),
        runs,
        target_secs,
        load_average,
    })
}

impl ExportReport {
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut t = String::new();
        let m = &self.machine;
        let _ = writeln!(
            t,
            "nudge bench --export: {} events from {} clients, {}",
            self.events, self.clients, self.database
        );
        let _ = writeln!(
            t,
            "machine: {} cpus, {}, {:.1} GiB; load average {} at the start\n",
            m.cpus, m.cpu_model, m.memory_gib, self.load_average
        );
        let _ = writeln!(t, "  history written     {:>8.1} s", self.write_secs);
        for r in &self.runs {
            let _ = writeln!(
                t,
                "  export {:<8}     {:>8.1} s   ({:.0} events/s; {:.1} CPU-seconds; {} orders, \
                 {} items; {} files, {:.0} MiB; peak memory {:.0} MiB{})",
                r.format.extension(),
                r.secs,
                r.events_per_sec,
                r.cpu_secs,
                r.orders_rows,
                r.order_items_rows,
                r.files,
                r.output_mib,
                r.peak_mib,
                if r.peak_reset { "" } else { " since start" }
            );
        }
        let _ = writeln!(
            t,
            "  target            < {:>8.1} s   ({})",
            self.target_secs,
            if self.meets_target { "met" } else { "missed" }
        );
        t
    }
}
