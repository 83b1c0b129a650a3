//! Background upkeep of a backend: SQLite's WAL checkpoints, PostgreSQL's
//! vacuum of the consumer window. Off the write path, stopped with the store.

/// Stops a store's upkeep task ([`spawn_upkeep`]) when the last clone of
/// the store is dropped.
#[derive(Clone)]
pub(crate) struct UpkeepTask {
    _stop: std::sync::Arc<tokio_util::sync::DropGuard>,
}

/// Runs `sql` on `pool` every `every`, off the write path, until the store
/// goes or the pool is closed: SQLite's WAL checkpoints, PostgreSQL's
/// vacuum of the consumer window. A failure is only logged; the next
/// round tries again.
pub(crate) fn spawn_upkeep<DB>(
    pool: sqlx::Pool<DB>,
    sql: &'static str,
    every: std::time::Duration,
) -> UpkeepTask
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    let stop = tokio_util::sync::CancellationToken::new();
    let guard = UpkeepTask {
        _stop: std::sync::Arc::new(stop.clone().drop_guard()),
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !pool.is_closed() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = sqlx::raw_sql(sql).execute(&pool).await {
                tracing::debug!(error = %e, sql, "upkeep statement failed");
            }
        }
    });
    guard
}
