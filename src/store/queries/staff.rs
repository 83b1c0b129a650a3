//! What staff ask of the store through the HTTP API and the CLI: rejected
//! envelopes, a client's process log, events and mails (the 360 view),
//! searches, tasks, GDPR export and erasure, and the audit log.

use crate::domain::event::{ClientId, EventId};
use crate::domain::log::{Level, LogEntry};
use crate::store::dialect::{Dialect, ts};
use crate::store::{
    AnyStore, AuditEntry, ClientSummary, EventRow, MailRow, Pools, Rejected, StoreError,
    TaskFilter, TaskRow, db, shared,
};
use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Row};
use std::future::Future;

/// For the HTTP API's staff routes and the CLI.
pub trait Staff {
    fn list_rejected(
        &self,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Rejected>, StoreError>> + Send;
    /// Rejected envelopes older than the row `before` (all when `None`),
    /// newest first, each with its row id (the cursor of the next page).
    fn rejected_page(
        &self,
        before: Option<i64>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<(i64, Rejected)>, StoreError>> + Send;
    /// A client's process log, newest first.
    fn client_log(
        &self,
        client: &ClientId,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<LogEntry>, StoreError>> + Send;
    /// Tasks, newest first (then by id), as `filter` says.
    fn list_tasks(
        &self,
        filter: &TaskFilter,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<TaskRow>, StoreError>> + Send;
    /// Marks a task done; false when there is no such open task.
    fn close_task(
        &self,
        id: &str,
        at: DateTime<Utc>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Everything kept about one client, for a GDPR export; `None` if unknown.
    fn export_client(
        &self,
        client: &ClientId,
    ) -> impl Future<Output = Result<Option<serde_json::Value>, StoreError>> + Send;
    /// Erases a client's personal data everywhere (event payloads included),
    /// keeping anonymous aggregates, and records the erasure. False if unknown.
    fn erase_client(
        &self,
        client: &ClientId,
        at: DateTime<Utc>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Appends to the audit log.
    fn record_audit(
        &self,
        entry: &AuditEntry,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The audit log, newest first, of one target when given.
    fn list_audit(
        &self,
        target: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<AuditEntry>, StoreError>> + Send;
    /// A client's events, newest first, before `(time, id)` when given.
    fn client_events(
        &self,
        client: &ClientId,
        event_type: Option<&str>,
        before: Option<(DateTime<Utc>, String)>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<EventRow>, StoreError>> + Send;
    /// Clients whose id, e-mail or name contains `q` (case-insensitive),
    /// an exact id first, then the most recently seen; `offset` skips
    /// that many (paging).
    fn search_clients(
        &self,
        q: &str,
        offset: u32,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<ClientSummary>, StoreError>> + Send;
    /// A client's mails and other effects, newest first.
    fn client_mails(
        &self,
        client: &ClientId,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<MailRow>, StoreError>> + Send;
}

/// The search of clients, with `$matches` the dialect's condition on the
/// pattern `$1`; `$2` is the query in lower case (an exact id comes
/// first), `$3` and `$4` the limit and offset.
macro_rules! search_sql {
    ($matches:literal) => {
        concat!(
            "SELECT client_id, email, first_name, last_name, last_seen FROM clients WHERE ",
            $matches,
            " ORDER BY (lower(client_id) = $2) DESC, last_seen DESC NULLS LAST, client_id \
             LIMIT $3 OFFSET $4"
        )
    };
}
pub(crate) use search_sql;

impl Staff for AnyStore {
    async fn list_rejected(&self, limit: u32) -> Result<Vec<Rejected>, StoreError> {
        let page = self.rejected_page(None, limit).await?;
        Ok(page.into_iter().map(|(_, r)| r).collect())
    }

    async fn rejected_page(
        &self,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<(i64, Rejected)>, StoreError> {
        shared!(self, |s, D| {
            let rows = sqlx::query(
                "SELECT received_at, subject, stream_seq, reason, payload, id FROM rejected \
                 WHERE id < $1 ORDER BY id DESC LIMIT $2",
            )
            .bind(before.unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(s.reader())
            .await
            .map_err(db("listing rejected events"))?;
            rows.into_iter()
                .map(|r| {
                    Ok((
                        r.get(5),
                        Rejected {
                            received_at: D::read_time(&r, 0)?,
                            subject: r.get(1),
                            stream_seq: r.get::<Option<i64>, _>(2).map(|s| s as u64),
                            reason: r.get(3),
                            payload: r.get(4),
                        },
                    ))
                })
                .collect()
        })
    }

    async fn client_log(&self, client: &ClientId, limit: u32) -> Result<Vec<LogEntry>, StoreError> {
        shared!(self, |s, D| {
            let rows = sqlx::query(
                "SELECT at, level, rule, event_id, message FROM client_log WHERE client_id = $1 \
                 ORDER BY id DESC LIMIT $2",
            )
            .bind(client.as_str())
            .bind(i64::from(limit))
            .fetch_all(s.reader())
            .await
            .map_err(db("reading the process log"))?;
            rows.into_iter()
                .map(|r| {
                    Ok(LogEntry {
                        client_id: client.clone(),
                        at: D::read_time(&r, 0)?,
                        level: match r.get::<&str, _>(1) {
                            "error" => Level::Error,
                            "warning" => Level::Warning,
                            _ => Level::Notice,
                        },
                        rule: r.get(2),
                        event_id: r
                            .get::<Option<String>, _>(3)
                            .and_then(|s| EventId::parse(s).ok()),
                        message: r.get(4),
                    })
                })
                .collect()
        })
    }

    async fn list_tasks(
        &self,
        filter: &TaskFilter,
        limit: u32,
    ) -> Result<Vec<TaskRow>, StoreError> {
        shared!(self, |s, D| {
            let mut q = QueryBuilder::<D>::new(
                "SELECT id, team, title, client_id, rule, data, status, at, created_at, done_at \
                 FROM tasks WHERE TRUE",
            );
            if let Some(s) = &filter.status {
                q.push(" AND status = ").push_bind(s.clone());
            }
            if let Some(t) = &filter.team {
                q.push(" AND team = ").push_bind(t.clone());
            }
            if let Some(c) = &filter.client_id {
                q.push(" AND client_id = ").push_bind(c.clone());
            }
            if let Some((t, id)) = &filter.after {
                q.push(" AND (created_at < ")
                    .push_bind(D::time(*t))
                    .push(" OR (created_at = ")
                    .push_bind(D::time(*t))
                    .push(" AND id > ")
                    .push_bind(id.clone())
                    .push("))");
            }
            q.push(" ORDER BY created_at DESC, id LIMIT ")
                .push_bind(i64::from(limit));
            let rows = q
                .build()
                .fetch_all(s.reader())
                .await
                .map_err(db("listing tasks"))?;
            rows.into_iter()
                .map(|r| {
                    Ok(TaskRow {
                        id: r.get(0),
                        team: r.get(1),
                        title: r.get(2),
                        client_id: r.get(3),
                        rule: r.get(4),
                        data: D::read_json(&r, 5).unwrap_or_default(),
                        status: r.get(6),
                        at: D::read_time(&r, 7)?,
                        created_at: D::read_time(&r, 8)?,
                        done_at: D::read_time_opt(&r, 9)?,
                    })
                })
                .collect()
        })
    }

    async fn close_task(&self, id: &str, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let done = shared!(self, |s, D| sqlx::query(
            "UPDATE tasks SET status = 'done', done_at = $1 WHERE id = $2 AND status = 'open'",
        )
        .bind(D::time(at))
        .bind(id)
        .execute(s.writer())
        .await
        .map_err(db("closing a task"))?
        .rows_affected());
        Ok(done == 1)
    }

    async fn export_client(
        &self,
        client: &ClientId,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        let id = client.as_str();
        let found = shared!(self, |s, D| {
            let state = sqlx::query("SELECT state FROM clients WHERE client_id = $1")
                .bind(id)
                .fetch_optional(s.reader())
                .await
                .map_err(db("exporting a client"))?;
            let Some(state) = state else {
                return Ok(None);
            };
            let json =
                |r: &<D as sqlx::Database>::Row, i: usize| D::read_json(r, i).unwrap_or_default();
            let mut events = Vec::new();
            for r in sqlx::query(
                "SELECT id, type, occurred_at, data, context FROM events WHERE client_id = $1 \
                 ORDER BY occurred_at, id",
            )
            .bind(id)
            .fetch_all(s.reader())
            .await
            .map_err(db("exporting events"))?
            {
                events.push(serde_json::json!({"id": r.get::<&str, _>(0),
                    "type": r.get::<&str, _>(1), "occurred_at": ts(D::read_time(&r, 2)?),
                    "data": json(&r, 3), "context": json(&r, 4)}));
            }
            let mut mails = Vec::new();
            for r in sqlx::query(
                "SELECT key, kind, rule, status, payload, created_at, sent_at, message_id \
                 FROM outbox WHERE client_id = $1 ORDER BY created_at, key",
            )
            .bind(id)
            .fetch_all(s.reader())
            .await
            .map_err(db("exporting mails"))?
            {
                mails.push(serde_json::json!({"key": r.get::<&str, _>(0),
                    "kind": r.get::<&str, _>(1), "rule": r.get::<&str, _>(2),
                    "status": r.get::<&str, _>(3), "payload": json(&r, 4),
                    "created_at": ts(D::read_time(&r, 5)?),
                    "sent_at": D::read_time_opt(&r, 6)?.map(ts),
                    "message_id": r.get::<Option<&str>, _>(7)}));
            }
            (json(&state, 0), events, mails)
        });
        let (history, events, mails) = found;
        let filter = TaskFilter {
            client_id: Some(id.to_string()),
            ..Default::default()
        };
        let tasks = self.list_tasks(&filter, 10_000).await?;
        let log = self.client_log(client, 10_000).await?;
        Ok(Some(serde_json::json!({
            "client_id": id,
            "history": history,
            "events": events,
            "mails": mails,
            "tasks": tasks,
            "log": log,
        })))
    }

    async fn erase_client(&self, client: &ClientId, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let id = client.as_str();
        let hash = erasure_hash(client);
        let known = shared!(self, |s, D| {
            let mut tx = s.begin_write().await.map_err(db("starting an erasure"))?;
            // What names the client in raw text (rejected envelopes, errors).
            let profile: Option<(Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT email, first_name, last_name FROM clients WHERE client_id = $1",
            )
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db("reading a client to erase"))?;
            let known = profile.is_some();
            let (email, first, last) = profile.unwrap_or_default();
            let needles = erasure_needles(id, email, first, last);
            for (sql, what) in ERASE {
                sqlx::query(sql)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(what))?;
            }
            // Rejected envelopes are raw text, often not JSON (cut at the size
            // limit, broken): any that holds the id, e-mail or a name goes.
            D::delete_rejected_naming(&mut tx, &needles)
                .await
                .map_err(db("erasing rejected envelopes"))?;
            // Distinct counts keep their numbers, not who was counted.
            sqlx::query("UPDATE counter_members SET member = 'erased:' || $1 WHERE member = $2")
                .bind(&hash)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(db("anonymising counters"))?;
            sqlx::query(
                "INSERT INTO erasures (client_id, at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(&hash)
            .bind(D::time(at))
            .execute(&mut *tx)
            .await
            .map_err(db("recording an erasure"))?;
            tx.commit().await.map_err(db("committing an erasure"))?;
            s.after_erasure().await;
            known
        });
        Ok(known)
    }

    async fn record_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        shared!(self, |s, D| sqlx::query(
            "INSERT INTO audit (at, actor, role, action, target, outcome) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(D::time(e.at))
        .bind(&e.actor)
        .bind(&e.role)
        .bind(&e.action)
        .bind(&e.target)
        .bind(&e.outcome)
        .execute(s.writer())
        .await
        .map(drop)
        .map_err(db("recording an audit entry")))
    }

    async fn list_audit(
        &self,
        target: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        shared!(self, |s, D| {
            let mut q = QueryBuilder::<D>::new(
                "SELECT at, actor, role, action, target, outcome FROM audit",
            );
            if let Some(t) = target {
                q.push(" WHERE target = ").push_bind(t);
            }
            q.push(" ORDER BY id DESC LIMIT ")
                .push_bind(i64::from(limit));
            let rows = q
                .build()
                .fetch_all(s.reader())
                .await
                .map_err(db("reading the audit log"))?;
            rows.into_iter()
                .map(|r| {
                    Ok(AuditEntry {
                        at: D::read_time(&r, 0)?,
                        actor: r.get(1),
                        role: r.get(2),
                        action: r.get(3),
                        target: r.get(4),
                        outcome: r.get(5),
                    })
                })
                .collect()
        })
    }

    async fn client_events(
        &self,
        client: &ClientId,
        event_type: Option<&str>,
        before: Option<(DateTime<Utc>, String)>,
        limit: u32,
    ) -> Result<Vec<EventRow>, StoreError> {
        shared!(self, |s, D| {
            let mut q = QueryBuilder::<D>::new(
                "SELECT id, type, occurred_at, data, context FROM events WHERE client_id = ",
            );
            q.push_bind(client.as_str());
            if let Some(t) = event_type {
                q.push(" AND type = ").push_bind(t);
            }
            if let Some((at, id)) = &before {
                q.push(" AND (occurred_at, id) < (")
                    .push_bind(D::time(*at))
                    .push(", ")
                    .push_bind(id.as_str())
                    .push(")");
            }
            q.push(" ORDER BY occurred_at DESC, id DESC LIMIT ")
                .push_bind(i64::from(limit));
            let rows = q
                .build()
                .fetch_all(s.reader())
                .await
                .map_err(db("reading a client's events"))?;
            rows.into_iter()
                .map(|r| {
                    Ok(EventRow {
                        id: r.get(0),
                        event_type: r.get(1),
                        occurred_at: D::read_time(&r, 2)?,
                        data: D::read_json(&r, 3).unwrap_or_default(),
                        context: D::read_json(&r, 4).unwrap_or_default(),
                    })
                })
                .collect()
        })
    }

    async fn search_clients(
        &self,
        q: &str,
        offset: u32,
        limit: u32,
    ) -> Result<Vec<ClientSummary>, StoreError> {
        shared!(self, |s, D| {
            let rows = sqlx::query(D::SEARCH)
                .bind(D::search_pattern(q))
                .bind(q.to_lowercase())
                .bind(i64::from(limit))
                .bind(i64::from(offset))
                .fetch_all(s.reader())
                .await
                .map_err(db("searching clients"))?;
            rows.into_iter()
                .map(|r| {
                    Ok(ClientSummary {
                        client_id: r.get(0),
                        email: r.get(1),
                        first_name: r.get(2),
                        last_name: r.get(3),
                        last_seen: D::read_time_opt(&r, 4)?,
                    })
                })
                .collect()
        })
    }

    async fn client_mails(
        &self,
        client: &ClientId,
        limit: u32,
    ) -> Result<Vec<MailRow>, StoreError> {
        shared!(self, |s, D| {
            // `->>` and `->` read JSON alike on both (SQLite 3.38 and later).
            let rows = sqlx::query(
                "SELECT rule, kind, payload->>'template', status, created_at, sent_at, \
                 last_error, message_id, payload->'vars' FROM outbox WHERE client_id = $1 \
                 ORDER BY created_at DESC, key LIMIT $2",
            )
            .bind(client.as_str())
            .bind(i64::from(limit))
            .fetch_all(s.reader())
            .await
            .map_err(db("reading a client's mails"))?;
            rows.into_iter()
                .map(|r| {
                    Ok(MailRow {
                        message_id: r.get(7),
                        vars: D::read_json(&r, 8).unwrap_or_default(),
                        rule: r.get(0),
                        kind: r.get(1),
                        template: r.get(2),
                        status: r.get(3),
                        at: D::read_time(&r, 4)?,
                        sent_at: D::read_time_opt(&r, 5)?,
                        last_error: r.get(6),
                    })
                })
                .collect()
        })
    }
}

/// An erasure's statements on the client's own rows, each with what it does.
const ERASE: [(&str, &str); 7] = [
    (
        "DELETE FROM clients WHERE client_id = $1",
        "erasing a client",
    ),
    (
        "DELETE FROM exposures WHERE client_id = $1",
        "erasing exposures",
    ),
    (
        "UPDATE events SET data = '{}', context = '{}' WHERE client_id = $1",
        "erasing event payloads",
    ),
    (
        "DELETE FROM client_log WHERE client_id = $1",
        "erasing the process log",
    ),
    (
        // A failed mail's error often quotes the address ("550
        // <ana@...>: no such user"): errors go too, not just payloads.
        "UPDATE outbox SET payload = '{}', \
         last_error = CASE WHEN status IN ('pending', 'sending') THEN 'client erased' \
         WHEN last_error IS NULL THEN NULL ELSE '(erased)' END, \
         status = CASE WHEN status IN ('pending', 'sending') THEN 'failed' ELSE status END \
         WHERE client_id = $1",
        "erasing mails",
    ),
    (
        "UPDATE tasks SET title = '(erased)', data = '{}' WHERE client_id = $1",
        "erasing tasks",
    ),
    (
        "DELETE FROM text_numbers WHERE client_id = $1",
        "erasing texted numbers",
    ),
];

/// The strings that name a client in raw text it left behind (rejected
/// envelopes, error texts): the id, and the e-mail and names the store holds.
/// Matched as they are (case-sensitive, as SQLite's `instr` and PostgreSQL's
/// `strpos` do); names as JSON strings (`"Ana"`), so a short name does not
/// match inside other words.
pub(crate) fn erasure_needles(
    id: &str,
    email: Option<String>,
    first_name: Option<String>,
    last_name: Option<String>,
) -> Vec<String> {
    let mut needles = vec![id.to_string()];
    // As stored, and in lower case: shops differ in how they spell it.
    if let Some(e) = email.filter(|e| !e.is_empty()) {
        let lower = e.to_lowercase();
        if lower != e {
            needles.push(lower);
        }
        needles.push(e);
    }
    for name in [first_name, last_name].into_iter().flatten() {
        if !name.is_empty() {
            needles.push(serde_json::Value::String(name).to_string());
        }
    }
    needles
}

/// How an erased client is recorded: not by id, which is personal data too.
pub fn erasure_hash(client: &ClientId) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(client.as_str().as_bytes()))
}
