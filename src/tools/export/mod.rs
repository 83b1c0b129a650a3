//! The analytics export (`nudge export`, and `export.schedule` in the
//! daemon): the history as Parquet or CSV files that DuckDB, ClickHouse,
//! Spark or pandas open as they are.
//!
//! Layout of the export folder: `TABLE/date=YYYY-MM-DD/FILE` (Hive-style
//! day partitions, the day in the business timezone; `clients` and
//! `counters` are one file each) and `manifest.json`, which says what each
//! run wrote and where the export got to.
//!
//! - **Incremental by stream sequence.** `events`, `orders` and
//!   `order_items` come from the event log; a run exports the events in
//!   `(from, to]`, `to` being the last sequence stored, `from` where the
//!   last run got to (or `--since-seq`, `--since`). Their files are named
//!   by that range (`part-FROM-TO`), so re-running a range writes the very
//!   same names and bytes; and before writing, a run removes every file of
//!   a range at or after its start (starting lower when its start falls
//!   inside an earlier range), so nothing is exported twice, even after a
//!   run cut short. The other tables are the current state, rewritten
//!   whole at each run (`snapshot-TO`).
//! - **Consistent.** Everything comes from one read snapshot of the
//!   database ([`crate::store::Snapshot`]), while the daemon runs.
//! - **GDPR.** Rows of erased clients are left out; and when clients were
//!   erased since the last run, the run starts over from sequence 0, so
//!   files written before the erasure lose them too.
//! - **Bounded memory.** Rows are streamed in event-time order from the
//!   database into one open file per table (see [`writer`]).

mod lock;
pub mod manifest;
pub mod schedule;
pub mod tables;
#[cfg(test)]
mod tests;
pub mod writer;

use crate::domain::event::ClientId;
use crate::store::{AnyStore, Cell, Snapshot, StreamError, erasure_hash};
use anyhow::{Context, anyhow};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use manifest::{Manifest, Run};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use tables::{EVENTS, INCREMENTAL_TABLES, ORDER_ITEMS, ORDERS, SNAPSHOT_TABLES};
use writer::TableWriter;
pub use writer::{FileInfo, Format};

/// Where a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Where the last run into the folder got to (the beginning the first time).
    Resume,
    /// After this stream sequence.
    AfterSeq(i64),
    /// At the first event that occurred at or after this time.
    Since(DateTime<Utc>),
}

/// What to export where.
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    pub format: Format,
    pub start: Start,
    /// The business timezone: the days of the partitions and the local
    /// year, month, day, weekday and hour columns.
    pub timezone: Tz,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The events in `(from_seq, to_seq]` were exported.
    pub from_seq: i64,
    pub to_seq: i64,
    /// Started over from 0 because clients were erased since the last run.
    pub restarted_for_erasure: bool,
    /// Rows written per table.
    pub rows: BTreeMap<String, u64>,
    /// Files removed before writing (earlier ranges replaced).
    pub removed: usize,
    pub files: Vec<FileInfo>,
    pub seconds: f64,
}

/// Runs one export.
pub async fn export(store: &AnyStore, opts: &Options) -> anyhow::Result<Report> {
    let started = std::time::Instant::now();
    let dir = &opts.dir;
    // The export holds personal data (profiles, event payloads): a folder
    // it creates is its owner's alone.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let _lock = lock::DirLock::take(dir)?;
    let mut previous = Manifest::read(dir)?;
    if previous.is_none() {
        refuse_foreign(dir)?;
    }
    if let Some(m) = &previous
        && m.format != opts.format
    {
        anyhow::bail!(
            "{} holds a {} export; export {} into another folder",
            dir.display(),
            m.format.extension(),
            opts.format.extension()
        );
    }
    if let Some(m) = &previous
        && m.timezone != opts.timezone.name()
    {
        anyhow::bail!(
            "{} holds an export in the timezone {}, not {}: export into another folder",
            dir.display(),
            m.timezone,
            opts.timezone.name()
        );
    }
    let mut snap = store.export_snapshot().await?;
    let to = snap.last_seq().await?;
    let erased = snap.erased().await?;
    let mut from = match opts.start {
        Start::Resume => previous.as_ref().map_or(0, |m| m.position),
        Start::AfterSeq(n) => n,
        Start::Since(t) => snap.seq_before(t).await?,
    }
    .clamp(0, to);
    let restarted_for_erasure = previous
        .as_ref()
        .is_some_and(|m| m.erasures != erased.len() as u64)
        && from > 0;
    if restarted_for_erasure {
        from = 0;
    }
    let parts = manifest::part_files(dir, &INCREMENTAL_TABLES)?;
    from = manifest::extend_down(from, &parts);
    let replaced: Vec<&manifest::PartFile> = parts.iter().filter(|p| p.from >= from).collect();
    if let Some(m) = &mut previous
        && !replaced.is_empty()
    {
        m.truncate(from);
        m.write(dir)?;
    }
    let mut removed = 0;
    for p in replaced {
        std::fs::remove_file(&p.path)
            .with_context(|| format!("cannot remove {}", p.path.display()))?;
        removed += 1;
    }

    let mut files = incremental(&mut snap, opts, from, to, &erased).await?;
    for table in SNAPSHOT_TABLES {
        files.extend(snapshot_table(&mut snap, opts, table, to, &erased).await?);
    }
    drop(snap);

    let names = INCREMENTAL_TABLES
        .into_iter()
        .chain(SNAPSHOT_TABLES.iter().map(|t| t.name));
    let mut rows: BTreeMap<String, u64> = names.map(|t| (t.to_string(), 0)).collect();
    for f in &files {
        *rows.entry(f.table.clone()).or_insert(0) += f.rows;
    }
    let run = Run {
        from_seq: from,
        to_seq: to,
        at: Utc::now(),
        restarted_for_erasure,
        rows: rows.clone(),
        files: files.clone(),
    };
    let mut m = previous.unwrap_or_else(|| Manifest::new(opts.format, opts.timezone));
    m.record(run, erased.len() as u64);
    m.write(dir)?;
    Ok(Report {
        from_seq: from,
        to_seq: to,
        restarted_for_erasure,
        rows,
        removed,
        files,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Writes `events`, `orders` and `order_items` for the events in `(from, to]`.
async fn incremental(
    snap: &mut Snapshot,
    opts: &Options,
    from: i64,
    to: i64,
    erased: &HashSet<String>,
) -> anyhow::Result<Vec<FileInfo>> {
    let stem = format!("part-{from}-{to}");
    let new = |name: &'static str, columns| {
        TableWriter::new(
            &opts.dir,
            name,
            name,
            columns,
            opts.format,
            &stem,
            Some(4),
            opts.timezone,
        )
    };
    let (mut events, mut orders, mut items) = (
        new("events", EVENTS),
        new("orders", ORDERS),
        new("order_items", ORDER_ITEMS),
    );
    let tz = opts.timezone;
    let mut sink = |raw: Vec<Cell>| -> anyhow::Result<()> {
        let r = tables::event_rows(raw, tz)?;
        if is_erased(erased, &r.client_id) {
            return Ok(());
        }
        events.write(&r.event)?;
        if let Some(order) = &r.order {
            orders.write(order)?;
        }
        for item in &r.items {
            items.write(item)?;
        }
        Ok(())
    };
    if from < to {
        snap.stream(
            &tables::EVENTS_SQL,
            &[from, to],
            tables::EVENTS_READ,
            &mut sink,
        )
        .await
        .map_err(stream_error)?;
    }
    let mut files = events.finish()?;
    files.extend(orders.finish()?);
    files.extend(items.finish()?);
    Ok(files)
}

/// Writes one snapshot table into a staging folder, then puts it in place
/// of the previous run's copy.
async fn snapshot_table(
    snap: &mut Snapshot,
    opts: &Options,
    table: &tables::SnapshotTable,
    to: i64,
    erased: &HashSet<String>,
) -> anyhow::Result<Vec<FileInfo>> {
    let staging = format!(".staging-{}", table.name);
    let staging_dir = opts.dir.join(&staging);
    remove_dir(&staging_dir)?;
    let mut w = TableWriter::new(
        &opts.dir,
        &staging,
        table.name,
        table.columns,
        opts.format,
        &format!("snapshot-{to}"),
        table.partition_by,
        opts.timezone,
    );
    let mut sink = |raw: Vec<Cell>| -> anyhow::Result<()> {
        if let Some(Cell::Text(client)) = table.client_col.and_then(|i| raw.get(i))
            && is_erased(erased, client)
        {
            return Ok(());
        }
        w.write(&(table.shape)(raw)?)
    };
    snap.stream(&table.sql, &[], table.reads, &mut sink)
        .await
        .map_err(stream_error)
        .with_context(|| format!("exporting {}", table.name))?;
    let mut files = w.finish()?;
    // Swapped by two renames: a reader between them finds no table
    // rather than half of one.
    let live = opts.dir.join(table.name);
    let old = opts.dir.join(format!(".old-{}", table.name));
    remove_dir(&old)?;
    if live.exists() {
        std::fs::rename(&live, &old).with_context(|| format!("cannot move {}", live.display()))?;
    }
    std::fs::create_dir_all(&staging_dir)?;
    std::fs::rename(&staging_dir, &live)
        .with_context(|| format!("cannot move {}", staging_dir.display()))?;
    remove_dir(&old)?;
    for f in &mut files {
        if let Some(rest) = f.path.strip_prefix(&staging) {
            f.path = format!("{}{rest}", table.name);
        }
    }
    Ok(files)
}

/// A folder without a manifest is written into only when it holds nothing
/// but what a run leaves (a first run cut short): the tables' folders are
/// replaced whole, and another folder of the same name must not be.
fn refuse_foreign(dir: &Path) -> anyhow::Result<()> {
    let ours = |name: &str| {
        INCREMENTAL_TABLES.contains(&name)
            || SNAPSHOT_TABLES.iter().any(|t| t.name == name)
            || name.starts_with('.')
    };
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !ours(&name) {
            anyhow::bail!(
                "{} holds {name:?} and no {}: not an export folder; export into an empty one",
                dir.display(),
                manifest::FILE
            );
        }
    }
    Ok(())
}

/// Whether `client` was erased: erasures are kept by hash only.
fn is_erased(erased: &HashSet<String>, client: &str) -> bool {
    !erased.is_empty()
        && ClientId::parse(client).is_ok_and(|id| erased.contains(&erasure_hash(&id)))
}

fn remove_dir(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn stream_error(e: StreamError<anyhow::Error>) -> anyhow::Error {
    match e {
        StreamError::Store(e) => anyhow!(e),
        StreamError::Sink(e) => e,
    }
}
