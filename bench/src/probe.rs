//! Looking at the database from outside the daemon, on a connection of its
//! own, the way an operator would: how many of the shop's events are
//! committed, how full the outbox is, and which events became visible since
//! the last look (for the latency phase). One variant per backend.

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use nudge::store::ts;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{PgPool, SqlitePool};
use std::str::FromStr;

pub enum Probe {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A position in the event log: rows after it are newer commits.
#[derive(Debug, Clone, Copy)]
pub struct Cursor {
    /// SQLite's rowid, or PostgreSQL's stream sequence.
    pos: i64,
    /// When the cursor was first taken: the events to time occur after it.
    since: DateTime<Utc>,
}

impl Probe {
    pub async fn open(url: &str) -> anyhow::Result<Self> {
        if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect(url)
                .await
                .with_context(|| {
                    format!("cannot open {} to observe it", nudge::config::redact(url))
                })?;
            return Ok(Probe::Postgres(pool));
        }
        if !url.starts_with("sqlite:") {
            bail!(
                "the bench observes SQLite or PostgreSQL, not {}",
                nudge::config::redact(url)
            );
        }
        let opts = SqliteConnectOptions::from_str(url)
            .with_context(|| format!("bad database url {url}"))?
            .read_only(true);
        // One connection: the probe must not compete with the daemon's pool.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .with_context(|| format!("cannot open {url} to observe it"))?;
        Ok(Probe::Sqlite(pool))
    }

    /// The backend, and for PostgreSQL the server's version and whether its
    /// autovacuum runs (without it every table nudge updates bloats, and
    /// the figures are not those of a server in its default setting).
    pub async fn describe(&self) -> anyhow::Result<String> {
        let Probe::Postgres(pool) = self else {
            return Ok("sqlite".into());
        };
        let (version, autovacuum): (String, String) = sqlx::query_as(
            "SELECT current_setting('server_version'), current_setting('autovacuum')",
        )
        .fetch_one(pool)
        .await
        .context("reading the server's settings")?;
        let version = version.split_whitespace().next().unwrap_or_default();
        Ok(format!("postgres {version} (autovacuum {autovacuum})"))
    }

    /// Events in the log that came from the stream (nudge's own secondary
    /// events have no stream sequence).
    pub async fn shop_events(&self) -> anyhow::Result<u64> {
        self.count("SELECT COUNT(*) FROM events WHERE stream_seq IS NOT NULL")
            .await
            .context("counting the shop's events")
    }

    pub async fn all_events(&self) -> anyhow::Result<u64> {
        self.count("SELECT COUNT(*) FROM events")
            .await
            .context("counting events")
    }

    async fn count(&self, sql: &str) -> Result<u64, sqlx::Error> {
        let n: i64 = match self {
            Probe::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await?,
            Probe::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await?,
        };
        Ok(n as u64)
    }

    /// (effects in the outbox, of which due now and not yet sent or failed).
    /// Mail deferred to later (quiet hours) is not due, so it does not count.
    pub async fn outbox(&self) -> anyhow::Result<(u64, u64)> {
        let (all, due): (i64, i64) = match self {
            Probe::Sqlite(pool) => {
                sqlx::query_as(
                    "SELECT COUNT(*), COALESCE(SUM(status = 'sending' \
                 OR (status = 'pending' AND due_at <= ?)), 0) FROM outbox",
                )
                .bind(ts(Utc::now()))
                .fetch_one(pool)
                .await
            }
            Probe::Postgres(pool) => {
                sqlx::query_as(
                    "SELECT COUNT(*), COUNT(*) FILTER (WHERE status = 'sending' \
                 OR (status = 'pending' AND due_at <= now())) FROM outbox",
                )
                .fetch_one(pool)
                .await
            }
        }
        .context("counting the outbox")?;
        Ok((all as u64, due as u64))
    }

    /// The newest committed event's position; the events to be timed from
    /// it on must occur after now.
    pub async fn cursor(&self) -> anyhow::Result<Cursor> {
        let since = Utc::now();
        let pos = match self {
            Probe::Sqlite(pool) => {
                sqlx::query_scalar("SELECT COALESCE(MAX(rowid), 0) FROM events")
                    .fetch_one(pool)
                    .await
            }
            Probe::Postgres(pool) => {
                // Where autovacuum is off the table has no statistics yet,
                // and the planner would scan the whole log on every poll.
                sqlx::query("ANALYZE events")
                    .execute(pool)
                    .await
                    .context("analyzing the event log")?;
                sqlx::query_scalar("SELECT COALESCE(MAX(stream_seq), 0) FROM events")
                    .fetch_one(pool)
                    .await
            }
        }
        .context("reading the newest event position")?;
        Ok(Cursor { pos, since })
    }

    /// Ids of the events committed after `after`, and the new cursor. SQLite
    /// hands out rowids in insert order and there is one writer at a time,
    /// so this is a cheap range read on the table's own b-tree. PostgreSQL
    /// has no rowid; one daemon commits the stream in sequence order, so the
    /// stream sequence serves (nudge's own events, without one, are not
    /// timed), read through the replay index by event time: the bench polls
    /// every millisecond, and a scan of the whole log each time would load
    /// the server it measures.
    pub async fn committed_since(&self, after: Cursor) -> anyhow::Result<(Vec<String>, Cursor)> {
        let rows: Vec<(i64, String)> = match self {
            Probe::Sqlite(pool) => {
                sqlx::query_as("SELECT rowid, id FROM events WHERE rowid > ? ORDER BY rowid")
                    .bind(after.pos)
                    .fetch_all(pool)
                    .await
            }
            Probe::Postgres(pool) => {
                sqlx::query_as(
                    "SELECT stream_seq, id FROM events WHERE stream_seq IS NOT NULL \
                     AND occurred_at >= $2 AND stream_seq > $1 ORDER BY stream_seq",
                )
                .bind(after.pos)
                .bind(after.since)
                .fetch_all(pool)
                .await
            }
        }
        .context("reading newly committed events")?;
        let pos = rows.last().map_or(after.pos, |r| r.0);
        Ok((
            rows.into_iter().map(|r| r.1).collect(),
            Cursor { pos, ..after },
        ))
    }
}

/// A field of `/proc/self/status` in MiB (`VmRSS`, `VmHWM`); 0 where unknown.
pub fn memory_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// CPU time (user and system, all threads) a process has used so far, in
/// seconds: this process (`None`) or another one; `None` where unknown. Rates
/// move with whatever else the machine runs; CPU per event much less.
pub fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let path = pid.map_or("/proc/self/stat".to_string(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces, in parentheses):
    // utime and stime are the 14th and 15th fields, in clock ticks of 1/100 s
    // (USER_HZ, fixed at 100 in the Linux ABI).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Resets `VmHWM` to the current RSS (Linux `clear_refs` 5), so the peak
/// reported covers nudge's work and not the bench's own set-up.
pub fn reset_peak_memory() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
