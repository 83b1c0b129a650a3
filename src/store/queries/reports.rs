//! Reading a rule's exposures for its report, streamed: a report sums
//! them as they come ([`crate::core::report::ReportBuilder`]), so a rule
//! that reached millions of clients needs no more memory than one that
//! reached ten. They come in key order, as a backtest adds them, so that
//! sums of revenue are the same to the last bit.

use crate::domain::experiments::{Conversion, Exposure, Goal};
use crate::store::dialect::Dialect;
use crate::store::{AnyStore, Pools, StoreError, db, shared};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::Row;
use std::future::Future;

/// For reports (`nudge report`, `/api/reports/{rule}`).
pub trait Reports {
    /// Hands `f` every exposure of `rule` made in `[since, until)`.
    fn each_exposure(
        &self,
        rule: &str,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        f: &mut (dyn FnMut(Exposure) + Send),
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

impl Reports for AnyStore {
    async fn each_exposure(
        &self,
        rule: &str,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        f: &mut (dyn FnMut(Exposure) + Send),
    ) -> Result<(), StoreError> {
        shared!(self, |s, D| {
            let sql = format!(
                "SELECT experiment, variant, held_out, exposed_at, goal, mails, opened, \
                 clicked, converted_at, revenue, conversion_event FROM exposures \
                 WHERE rule = $1 AND ($2 IS NULL OR exposed_at >= $2) \
                 AND ($3 IS NULL OR exposed_at < $3) \
                 ORDER BY experiment{o}, client_id{o}",
                o = D::BYTE_ORDER
            );
            let mut rows = sqlx::query(&sql)
                .bind(rule)
                .bind(since.map(D::time))
                .bind(until.map(D::time))
                .fetch(s.reader());
            while let Some(r) = rows.try_next().await.map_err(db("reading exposures"))? {
                let goal = match D::read_json(&r, 4) {
                    Ok(serde_json::Value::Null) | Err(_) => None,
                    Ok(v) => serde_json::from_value::<Goal>(v).ok(),
                };
                let converted = D::read_time_opt(&r, 8)?.map(|at| Conversion {
                    at,
                    revenue: r.try_get::<Option<f64>, _>(9).ok().flatten().unwrap_or(0.0),
                    event_id: r
                        .try_get::<Option<String>, _>(10)
                        .ok()
                        .flatten()
                        .unwrap_or_default(),
                });
                f(Exposure {
                    rule: rule.to_string(),
                    experiment: r.get(0),
                    variant: r.get(1),
                    held_out: r.get(2),
                    at: D::read_time(&r, 3)?,
                    goal,
                    mails: r.get::<i32, _>(5).max(0) as u32,
                    opened: r.get(6),
                    clicked: r.get(7),
                    converted,
                });
            }
            Ok(())
        })
    }
}
