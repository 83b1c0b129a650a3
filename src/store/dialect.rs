//! What differs between the databases, in one small trait, and the helpers
//! every backend's statements share: how a time and a JSON column are
//! bound and read, how a list of ids is matched, how many parameters a
//! statement may carry, and the few statements that are not the same text
//! on both. Everything else is written once (`queries/`), with `$n`
//! placeholders, which SQLite reads too.

use super::StoreError;
use crate::domain::event::ClientId;
use crate::domain::experiments::ExposureRow;
use crate::domain::history::ClientState;
use chrono::{DateTime, Utc};
use sqlx::{Database, QueryBuilder};
use std::future::Future;

/// A database's dialect, implemented by `sqlx::Sqlite` and `sqlx::Postgres`
/// (in `sqlite/` and `postgres/`). Shared queries are compiled once per
/// dialect ([`crate::store::shared`]): static dispatch, no cost.
pub(crate) trait Dialect: Database {
    /// How a time is bound: fixed-width UTC text on SQLite (so that text
    /// order is time order), `timestamptz` on PostgreSQL.
    type Time: for<'q> sqlx::Encode<'q, Self> + sqlx::Type<Self> + Send + Sync + 'static;
    /// Bound parameters one statement may carry, with room to spare.
    const MAX_PARAMS: usize;
    /// Appended to a JSON text bound into a `json` column.
    const JSON: &'static str;
    /// Empties the tables a replay rebuilds.
    const WIPE_DERIVED: &'static [&'static str];
    /// Takes up to `$3` due outbox rows until `$1` (see `queries::outbox`).
    const CLAIM_DUE: &'static str;
    /// Searches clients for the pattern `$1` (see `queries::staff`).
    const SEARCH: &'static str;
    /// Follows a text column in `ORDER BY` to order by bytes, as Rust
    /// orders strings (SQLite's default; PostgreSQL's `"C"` collation).
    const BYTE_ORDER: &'static str;

    fn time(t: DateTime<Utc>) -> Self::Time;
    fn read_time(row: &Self::Row, i: usize) -> Result<DateTime<Utc>, StoreError>;
    fn read_time_opt(row: &Self::Row, i: usize) -> Result<Option<DateTime<Utc>>, StoreError>;
    /// A JSON column (JSON text on SQLite); NULL reads as `Value::Null`.
    fn read_json(row: &Self::Row, i: usize) -> Result<serde_json::Value, String>;
    /// The pattern [`Self::SEARCH`] binds for a search for `q`.
    fn search_pattern(q: &str) -> String;
    /// Appends a match of the column before it against `ids` (`IN (...)` or
    /// `= ANY(...)`); `ids` is one of [`Self::id_chunks`].
    fn push_in<'a>(q: &mut QueryBuilder<'a, Self>, ids: &'a [&'a str]);
    /// How a list of ids is split into statements for [`Self::push_in`].
    fn id_chunks<T>(ids: &[T]) -> impl Iterator<Item = &[T]>;
    fn migrator() -> &'static sqlx::migrate::Migrator;
    /// Marks mails sent: `(key, at, message_id)`, in a few statements.
    fn mark_sent<'c>(
        conn: &'c mut Self::Connection,
        sent: &'c [(&'c str, DateTime<Utc>, &'c str)],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c;
    /// Deletes rejected envelopes whose payload or reason holds any of `needles`.
    fn delete_rejected_naming<'c>(
        conn: &'c mut Self::Connection,
        needles: &'c [String],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c;
}

/// Rows of `columns` parameters that fit in one of `D`'s statements.
pub(crate) fn chunk_rows<D: Dialect>(columns: usize) -> usize {
    (D::MAX_PARAMS / columns).max(1)
}

pub(crate) fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("plain data serialises")
}

pub(crate) fn stored_client_id(s: String) -> Result<ClientId, StoreError> {
    ClientId::parse(s).map_err(|e| StoreError::Corrupt {
        context: "client_id",
        message: e.to_string(),
    })
}

/// A column that would not decode as the type the store reads it as.
pub(crate) fn corrupt_column(e: sqlx::Error) -> StoreError {
    StoreError::Corrupt {
        context: "column",
        message: e.to_string(),
    }
}

/// Appends lines to the clients' process logs (a batch's, or deliveries'),
/// on `$conn` (a connection of dialect `$D`); a `Result<(), sqlx::Error>`.
/// A macro rather than a generic function: the statement builder's
/// arguments borrow the entries, which sqlx's bounds cannot say generically.
macro_rules! insert_log {
    ($D:ty, $conn:expr, $entries:expr) => {
        async {
            use $crate::store::dialect::{Dialect, chunk_rows, statement_chunks};
            for chunk in statement_chunks($entries, chunk_rows::<$D>(6)) {
                let mut q = sqlx::QueryBuilder::<$D>::new(
                    "INSERT INTO client_log (client_id, at, level, rule, event_id, message) ",
                );
                q.push_values(chunk, |mut b, e| {
                    b.push_bind(e.client_id.as_str())
                        .push_bind(<$D>::time(e.at))
                        .push_bind(e.level.as_str())
                        .push_bind(e.rule.as_deref())
                        .push_bind(e.event_id.as_ref().map(|i| i.as_str()))
                        .push_bind(e.message.as_str());
                });
                q.build().execute(&mut *$conn).await?;
            }
            Ok::<(), sqlx::Error>(())
        }
    };
}
pub(crate) use insert_log;

/// Writes exposures as they now are (insert or replace by rule, experiment
/// and client), on `$conn` of dialect `$D`; a `Result<(), sqlx::Error>`.
/// Only the last change of each exposure in `$rows` is written: one
/// statement may not change a row twice. A macro for the reason
/// [`insert_log`] is one.
macro_rules! upsert_exposures {
    ($D:ty, $conn:expr, $rows:expr) => {
        async {
            use $crate::store::dialect::{Dialect, chunk_rows, json, statement_chunks};
            let rows = $crate::store::dialect::latest_exposures($rows);
            for chunk in statement_chunks(&rows, chunk_rows::<$D>(13)) {
                let mut q = sqlx::QueryBuilder::<$D>::new(
                    "INSERT INTO exposures (rule, experiment, client_id, variant, held_out, \
                     exposed_at, goal, mails, opened, clicked, converted_at, revenue, \
                     conversion_event) ",
                );
                q.push_values(chunk, |mut b, r| {
                    let e = &r.exposure;
                    let c = e.converted.as_ref();
                    b.push_bind(e.rule.as_str())
                        .push_bind(e.experiment.as_str())
                        .push_bind(r.client_id.as_str())
                        .push_bind(e.variant.as_str())
                        .push_bind(e.held_out)
                        .push_bind(<$D>::time(e.at))
                        .push_bind(e.goal.as_ref().map(json))
                        .push_unseparated(<$D>::JSON)
                        .push_bind(i64::from(e.mails))
                        .push_bind(e.opened)
                        .push_bind(e.clicked)
                        .push_bind(c.map(|c| <$D>::time(c.at)))
                        .push_bind(c.map(|c| c.revenue))
                        .push_bind(c.map(|c| c.event_id.as_str()));
                });
                q.push(
                    " ON CONFLICT (rule, experiment, client_id) DO UPDATE SET \
                     variant = excluded.variant, held_out = excluded.held_out, \
                     exposed_at = excluded.exposed_at, goal = excluded.goal, \
                     mails = excluded.mails, opened = excluded.opened, \
                     clicked = excluded.clicked, converted_at = excluded.converted_at, \
                     revenue = excluded.revenue, conversion_event = excluded.conversion_event",
                );
                q.build().execute(&mut *$conn).await?;
            }
            Ok::<(), sqlx::Error>(())
        }
    };
}
pub(crate) use upsert_exposures;

/// The last of each exposure's changes, in the order first changed.
pub(crate) fn latest_exposures(rows: &[ExposureRow]) -> Vec<&ExposureRow> {
    fn key(r: &ExposureRow) -> (&str, &str, &str) {
        (
            r.exposure.rule.as_str(),
            r.exposure.experiment.as_str(),
            r.client_id.as_str(),
        )
    }
    let last: std::collections::HashMap<_, usize> =
        rows.iter().enumerate().map(|(i, r)| (key(r), i)).collect();
    rows.iter()
        .enumerate()
        .filter(|(i, r)| last[&key(r)] == *i)
        .map(|(_, r)| r)
        .collect()
}

/// Prepared statements kept per connection: the batch's statements, each
/// in up to 37 lengths (see [`statement_chunks`]), and the rest.
pub(crate) const STATEMENT_CACHE: usize = 512;

/// Below this many rows a chunk has its own length: such statements are
/// cheap to prepare, and small batches (a quiet shop) stay one statement
/// per table, one round trip each on PostgreSQL.
const SMALL_CHUNK: usize = 32;

/// Splits a batch's rows into the chunks of its multi-row statements.
/// Their lengths are powers of two, at most `max_rows` (and 1,024), but for
/// a last one of fewer than [`SMALL_CHUNK`] rows: a statement's text
/// depends on its row count, so with a handful of lengths each statement
/// is prepared once per connection, instead of parsing and planning one of
/// thousands of parameters at every batch (5 % of the SQLite writer's work
/// when every batch had its own lengths).
pub(crate) fn statement_chunks<T>(rows: &[T], max_rows: usize) -> impl Iterator<Item = &[T]> {
    let floor_pow2 = |n: usize| 1usize << (usize::BITS - 1 - n.max(1).leading_zeros());
    let top = floor_pow2(max_rows.min(1024));
    let mut rest = rows;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let len = if rest.len() < SMALL_CHUNK.min(top) {
            rest.len()
        } else {
            top.min(floor_pow2(rest.len()))
        };
        let (head, tail) = rest.split_at(len);
        rest = tail;
        Some(head)
    })
}

/// Timestamps are stored as fixed-width UTC text so that text order is time order.
pub fn ts(t: DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    // Written digit by digit: a batch writes a few of these per event, and
    // interpreting a format string each time cost more than the rest of
    // building the statement. Years beyond four digits and leap seconds
    // are left to chrono.
    let (year, nanos) = (t.year(), t.nanosecond());
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    }
    let mut s = String::with_capacity(27);
    push_digits(&mut s, year as u32, 4);
    for (sep, n) in [
        ('-', t.month()),
        ('-', t.day()),
        ('T', t.hour()),
        (':', t.minute()),
        (':', t.second()),
    ] {
        s.push(sep);
        push_digits(&mut s, n, 2);
    }
    s.push('.');
    push_digits(&mut s, nanos / 1000, 6);
    s.push('Z');
    s
}

/// `n` in decimal, zero-padded to `width` digits.
fn push_digits(s: &mut String, n: u32, width: u32) {
    for i in (0..width).rev() {
        s.push(char::from(b'0' + (n / 10u32.pow(i) % 10) as u8));
    }
}

/// A client's stored state as the batch decides on it. A state that cannot
/// be read at all (not JSON, or no readable `client_id` in it; partly
/// readable ones are mended by [`ClientState::decode`]) is never the end
/// of the client: their history starts fresh from the row's id, the error
/// is logged, and the row's version is kept so that the next write replaces
/// the unreadable text. Only an id the row itself cannot give is an error.
pub fn state_from_row(
    client_id: &str,
    version: i64,
    text: &str,
) -> Result<ClientState, StoreError> {
    let mut state = match serde_json::from_str::<ClientState>(text) {
        Ok(state) => state,
        Err(e) => {
            let id = ClientId::parse(client_id).map_err(|id_error| StoreError::Corrupt {
                context: "clients.state",
                message: format!("{e}; and the row's client id: {id_error}"),
            })?;
            tracing::error!(client = %id, error = %e, "a stored client state could not be read; the client's history starts fresh");
            ClientState::new(id)
        }
    };
    state.version = version;
    Ok(state)
}

pub fn parse_ts(s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt {
            context: "timestamp",
            message: format!("{s:?}: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::collections::HashSet;

    #[test]
    fn statement_chunks_take_every_row_in_order_in_a_few_lengths() {
        let mut lengths = HashSet::new();
        for n in 0..3000usize {
            let rows: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = statement_chunks(&rows, 2727).collect();
            assert_eq!(chunks.concat(), rows, "{n} rows");
            for (i, c) in chunks.iter().enumerate() {
                let last = i + 1 == chunks.len();
                let power = c.len().is_power_of_two() && (SMALL_CHUNK..=1024).contains(&c.len());
                assert!(power || (last && c.len() < SMALL_CHUNK), "{n}: {}", c.len());
                lengths.insert(c.len());
            }
            // A small batch is one statement.
            if n < SMALL_CHUNK {
                assert!(chunks.len() == usize::from(n > 0), "{n}");
            }
            // Whole chunks of the top length, then at most one of each below.
            let below: Vec<usize> = chunks
                .iter()
                .map(|c| c.len())
                .filter(|l| *l < 1024)
                .collect();
            assert!(below.windows(2).all(|w| w[0] > w[1]), "{n}: {below:?}");
        }
        // 1 to 31, then 32, 64, ..., 1,024.
        assert_eq!(lengths.len(), 31 + 6);
        let few: Vec<usize> = statement_chunks(&[0; 10], 3).map(<[i32]>::len).collect();
        assert_eq!(few, [2, 2, 2, 2, 2]);
    }

    #[test]
    fn timestamps_are_fixed_width_microseconds_as_chrono_writes_them() {
        let chrono_ts = |t: DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
        let mut times = vec![
            Utc.with_ymd_and_hms(2026, 11, 23, 9, 5, 7).unwrap(),
            Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap(),
            DateTime::from_timestamp(1_794_837_731, 668_626_999).unwrap(),
            DateTime::from_timestamp(0, 1_000).unwrap(),
        ];
        // A leap second, as chrono represents it.
        times.push(
            Utc.with_ymd_and_hms(2016, 12, 31, 23, 59, 59).unwrap()
                + chrono::Duration::nanoseconds(0),
        );
        times.push(
            chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
                .unwrap()
                .and_hms_micro_opt(23, 59, 59, 1_500_000)
                .unwrap()
                .and_utc(),
        );
        let mut x: i64 = 1;
        for _ in 0..1000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let secs = (x >> 20).rem_euclid(253_402_300_800);
            times.push(DateTime::from_timestamp(secs, (x as u32) % 1_000_000_000).unwrap());
        }
        for t in times {
            assert_eq!(ts(t), chrono_ts(t), "{t:?}");
        }
    }
}
