//! Reading product rankings ([`crate::domain::products`]): the rows of one
//! counter family, for the decision core's counters and for the API.

use crate::domain::counters::MAX_FAMILY_ROWS;
use crate::store::{AnyStore, Pools, StoreError, db, shared};
use sqlx::Row;
use std::future::Future;

pub trait Products {
    /// The rows of the counter family `name`, as `(period, value)`, at most
    /// [`MAX_FAMILY_ROWS`].
    fn counter_family(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Vec<(String, f64)>, StoreError>> + Send;
}

impl Products for AnyStore {
    async fn counter_family(&self, name: &str) -> Result<Vec<(String, f64)>, StoreError> {
        let rows = shared!(self, |s, D| sqlx::query(
            "SELECT period, value FROM counters WHERE name = $1 LIMIT $2"
        )
        .bind(name)
        .bind(MAX_FAMILY_ROWS as i64)
        .fetch_all(s.reader())
        .await
        .map_err(db("reading a ranking"))?
        .into_iter()
        .map(|r| (r.get::<String, _>(0), r.get::<f64, _>(1)))
        .collect::<Vec<_>>());
        Ok(rows)
    }
}
