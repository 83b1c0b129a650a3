//! The consumer window on PostgreSQL: the `inflight` table, shared by every
//! instance consuming the stream (see [`crate::store::Window`]).

use super::PgDb;
use crate::store::{StoreError, WindowBlockers, db};
use chrono::{DateTime, Utc};
use sqlx::{Postgres, Row};

pub(crate) async fn register(
    store: &PgDb,
    owner: &str,
    items: &[(u64, Option<String>)],
    lease_until: DateTime<Utc>,
) -> Result<(), StoreError> {
    let seqs: Vec<i64> = items.iter().map(|(s, _)| *s as i64).collect();
    let clients: Vec<Option<&str>> = items.iter().map(|(_, c)| c.as_deref()).collect();
    let mut tx = advisory_tx(store).await?;
    // A redelivered message changes hands; one already settled stays so.
    sqlx::query(
        "INSERT INTO inflight (seq, client_id, owner, lease_until) \
         SELECT s, c, $3, $4 FROM UNNEST($1::bigint[], $2::text[]) AS t(s, c) \
         ON CONFLICT (seq) DO UPDATE SET owner = excluded.owner, \
         lease_until = excluded.lease_until WHERE NOT inflight.done",
    )
    .bind(&seqs)
    .bind(&clients)
    .bind(owner)
    .bind(lease_until)
    .execute(&mut *tx)
    .await
    .map_err(db("registering pulled messages"))?;
    tx.commit()
        .await
        .map_err(db("registering pulled messages"))?;
    Ok(())
}

pub(crate) async fn blockers(
    store: &PgDb,
    owners: &[&str],
    mine: &[u64],
    floor: u64,
    below: u64,
    clients: &[&str],
    now: DateTime<Utc>,
) -> Result<WindowBlockers, StoreError> {
    let mine: Vec<i64> = mine.iter().map(|s| *s as i64).collect();
    // NULL: every sequence from the floor to `below` is known.
    let first_gap: Option<i64> = sqlx::query_scalar(
        "SELECT MIN(s + 1) FROM (SELECT $1::bigint AS s UNION ALL \
         SELECT seq FROM inflight WHERE seq > $1 AND seq < $2) AS known \
         WHERE NOT EXISTS (SELECT 1 FROM inflight i WHERE i.seq = known.s + 1)",
    )
    .bind(floor as i64)
    .bind(below as i64)
    .fetch_one(&store.pool)
    .await
    .map_err(db("reading the window"))?;
    let rows = sqlx::query(
        "SELECT client_id, seq, lease_until <= $2 FROM inflight WHERE NOT done \
         AND owner <> ALL($1) AND seq < $3 AND client_id = ANY($4) AND seq > $5 \
         AND seq <> ALL($6)",
    )
    .bind(owners)
    .bind(now)
    .bind(below as i64)
    .bind(clients)
    .bind(floor as i64)
    .bind(&mine)
    .fetch_all(&store.pool)
    .await
    .map_err(db("reading the window"))?;
    // Any client's: steps that use shared counters wait for every
    // earlier message, not only their clients' own.
    // The first pending, and whether its lease ran out.
    let first_pending: Option<(i64, bool)> = sqlx::query_as(
        "SELECT seq, lease_until <= $2 FROM inflight WHERE NOT done AND owner <> ALL($1) \
         AND seq < $3 AND seq > $4 AND seq <> ALL($5) ORDER BY seq LIMIT 1",
    )
    .bind(owners)
    .bind(now)
    .bind(below as i64)
    .bind(floor as i64)
    .bind(&mine)
    .fetch_optional(&store.pool)
    .await
    .map_err(db("reading the window"))?;
    let stale = rows.iter().any(|r| r.get::<bool, _>(2)) || first_pending.is_some_and(|(_, e)| e);
    Ok(WindowBlockers {
        first_gap: first_gap.map_or(u64::MAX, |g| g as u64),
        pending: rows
            .into_iter()
            .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1) as u64))
            .collect(),
        first_pending: first_pending.map_or(u64::MAX, |(s, _)| s as u64),
        stale,
    })
}

pub(crate) async fn renew(
    store: &PgDb,
    seqs: &[u64],
    lease_until: DateTime<Utc>,
) -> Result<(), StoreError> {
    let seqs: Vec<i64> = seqs.iter().map(|s| *s as i64).collect();
    let mut tx = advisory_tx(store).await?;
    sqlx::query(
        "UPDATE inflight SET lease_until = GREATEST(lease_until, $2) \
         WHERE seq = ANY($1) AND NOT done",
    )
    .bind(&seqs)
    .bind(lease_until)
    .execute(&mut *tx)
    .await
    .map_err(db("renewing the window's leases"))?;
    tx.commit()
        .await
        .map_err(db("renewing the window's leases"))?;
    Ok(())
}

pub(crate) async fn trim(store: &PgDb, floor: u64) -> Result<(), StoreError> {
    let mut tx = advisory_tx(store).await?;
    sqlx::query("DELETE FROM inflight WHERE seq <= $1")
        .bind(floor as i64)
        .execute(&mut *tx)
        .await
        .map_err(db("trimming the window"))?;
    tx.commit().await.map_err(db("trimming the window"))?;
    Ok(())
}

/// A transaction whose commit does not wait for the WAL to reach the
/// disk: for the consumer window's announcements and trims, which come
/// before each batch and are advisory. One lost in a server crash (the
/// only way it can be lost) is announced again when its batch is
/// retried, and until then it shows as a gap that holds later events
/// back. Each would wait for a disk flush, several per batch.
async fn advisory_tx(store: &PgDb) -> Result<sqlx::Transaction<'static, Postgres>, StoreError> {
    let mut tx = store
        .pool
        .begin()
        .await
        .map_err(db("starting a window transaction"))?;
    sqlx::query("SET LOCAL synchronous_commit TO OFF")
        .execute(&mut *tx)
        .await
        .map_err(db("starting a window transaction"))?;
    Ok(tx)
}
