//! Reading boards: the names in use and one board period's rows. Boards are
//! written as shared counters, with the batch ([`crate::domain::boards`]);
//! this is only how the API reads them back.

use crate::domain::boards::{self, Entry};
use crate::store::{AnyStore, Pools, StoreError, db, shared};
use sqlx::Row;
use std::future::Future;

/// Most board day families `board_days` looks at: boards × days kept.
pub const MAX_FAMILIES: i64 = 10_000;

/// For the board API and the wall page.
pub trait Boards {
    /// The names of the counter families of boards' days
    /// (`board:<board>:day:<date>`), newest dates first within a board, at
    /// most [`MAX_FAMILIES`].
    fn board_days(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    /// The rows of one board period (a counter family), at most
    /// [`boards::MAX_ROWS`] + 1 so the caller can tell it was cut.
    fn board_rows(
        &self,
        family: &str,
    ) -> impl Future<Output = Result<Vec<(Entry, f64)>, StoreError>> + Send;
}

impl Boards for AnyStore {
    async fn board_days(&self) -> Result<Vec<String>, StoreError> {
        // `substr` rather than a range on `name`: under a PostgreSQL
        // collation other than C, punctuation does not order as bytes.
        let names: Vec<String> = shared!(self, |s, D| sqlx::query_scalar(
            "SELECT DISTINCT name FROM counters WHERE substr(name, 1, 6) = 'board:' \
             AND name LIKE '%:day:%' ORDER BY name DESC LIMIT $1"
        )
        .bind(MAX_FAMILIES)
        .fetch_all(s.reader())
        .await
        .map_err(db("listing boards"))?);
        Ok(names)
    }

    async fn board_rows(&self, family: &str) -> Result<Vec<(Entry, f64)>, StoreError> {
        let rows = shared!(self, |s, D| sqlx::query(
            "SELECT period, value FROM counters WHERE name = $1 LIMIT $2"
        )
        .bind(family)
        .bind(boards::MAX_ROWS as i64 + 1)
        .fetch_all(s.reader())
        .await
        .map_err(db("reading a board"))?
        .into_iter()
        .map(|r| (r.get::<String, _>(0), r.get::<f64, _>(1)))
        .collect::<Vec<_>>());
        // A row that is no entry was not written by `rank()`: left out.
        Ok(rows
            .into_iter()
            .filter_map(|(key, v)| Entry::decode(&key).map(|e| (e, v)))
            .collect())
    }
}
