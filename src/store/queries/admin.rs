//! Starting up and checking on the database.

use crate::store::{AnyStore, Pools, StoreError, db, dialect::Dialect, shared};
use std::future::Future;

/// For `app` (migrations at start), health checks and settings kept in the
/// database (the unsubscribe key).
pub trait Admin {
    fn migrate(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The value kept under `key`, first setting it to `init` if there is none.
    fn meta_get_or_init(
        &self,
        key: &str,
        init: &str,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;
}

impl Admin for AnyStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        shared!(self, |s, D| D::migrator().run(s.writer()).await)?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        shared!(self, |s, D| sqlx::query("SELECT 1")
            .execute(s.reader())
            .await
            .map(drop)
            .map_err(db("pinging the database")))
    }

    async fn meta_get_or_init(&self, key: &str, init: &str) -> Result<String, StoreError> {
        shared!(self, |s, D| {
            sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(key)
                .bind(init)
                .execute(s.writer())
                .await
                .map_err(db("initialising a setting"))?;
            sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
                .bind(key)
                .fetch_one(s.writer())
                .await
                .map_err(db("reading a setting"))
        })
    }
}
