//! Persistence. The [`Store`] trait is what the daemon needs from a database;
//! each backend implements it once. A batch of decisions is written with
//! [`Store::commit_batch`] in one transaction: events, client states, outbox
//! and process log together, so an effect exists only if its cause does.

pub mod postgres;
pub mod sqlite;
pub mod window;

use crate::domain::counters::{CounterKey, CounterWrite, Stored};
use crate::domain::effects::Effect;
use crate::domain::event::{ClientId, Envelope, EventId};
use crate::domain::history::ClientState;
use crate::domain::log::{Level, LogEntry};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::future::Future;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error while {context}: {source}")]
    Db {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt ({context}): {message}")]
    Corrupt {
        context: &'static str,
        message: String,
    },
    #[error("unsupported database url {0:?}")]
    Url(String),
}

impl StoreError {
    /// The database as a whole cannot serve this right now: unreachable,
    /// refusing connections, locked by another writer past the busy timeout,
    /// out of space, read-only, or shutting down. Nothing about the data is to
    /// blame, so the same work is to be retried as it is, never set aside.
    pub fn is_outage(&self) -> bool {
        match self {
            StoreError::Db { source, .. } => sqlx_outage(source),
            StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => sqlx_outage(e),
            _ => false,
        }
    }
}

fn sqlx_outage(e: &sqlx::Error) -> bool {
    use sqlx::Error as E;
    match e {
        E::Io(_)
        | E::Tls(_)
        | E::Protocol(_)
        | E::PoolTimedOut
        | E::PoolClosed
        | E::WorkerCrashed => true,
        E::Database(d) => {
            let code = d.code().unwrap_or_default();
            if d.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // Primary result codes: BUSY, LOCKED, NOMEM, READONLY,
                // INTERRUPT, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB.
                code.parse::<i32>()
                    .is_ok_and(|c| [5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 26].contains(&(c & 0xff)))
            } else {
                // SQLSTATE classes: connection exception, insufficient
                // resources (disk full, out of memory, too many connections),
                // operator intervention (shutdown, terminated, cannot connect
                // now), system error; a read-only transaction; a database
                // not accepting connections.
                ["08", "53", "57", "58"].iter().any(|c| code.starts_with(c))
                    || code == "25006"
                    || code == "55000"
            }
        }
        _ => false,
    }
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

pub(crate) fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Db { context, source }
}

/// An event as written to the log, with where it came from.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// Shared: a batch hands its events to each decision it makes (a
    /// batch decided again after a conflict, or partly held back), and
    /// copying `data` and `context` each time cost about 2 % of ingest.
    pub envelope: std::sync::Arc<Envelope>,
    pub received_at: DateTime<Utc>,
    /// JetStream stream sequence, when it came from the stream.
    pub stream_seq: Option<u64>,
}

/// An envelope that failed validation, kept with its reason.
#[derive(Debug, Clone, Serialize)]
pub struct Rejected {
    pub received_at: DateTime<Utc>,
    pub subject: String,
    /// Stream sequence: a redelivered rejection is stored once.
    pub stream_seq: Option<u64>,
    pub reason: String,
    /// The raw payload, lossily decoded for display.
    pub payload: String,
}

/// Everything one ingest batch writes, atomically.
#[derive(Debug, Default)]
pub struct BatchWrite {
    pub events: Vec<StoredEvent>,
    /// New states; `version` is the one loaded, the store writes `version + 1`.
    /// Shared with the batches decided on top of this one ([`crate::flow::chain`]).
    pub clients: Vec<std::sync::Arc<ClientState>>,
    pub effects: Vec<Effect>,
    pub log: Vec<LogEntry>,
    pub rejected: Vec<Rejected>,
    /// When this batch is a page of a sweep: how far the sweep got.
    pub sweep: Option<SweepProgress>,
    /// Shared counters changed, each written only if its version still holds.
    pub counters: Vec<CounterWrite>,
    /// New members of distinct counters.
    pub members: Vec<(CounterKey, String)>,
    /// Stream sequences this batch settles in the consumer's window.
    pub settled: Vec<u64>,
    /// An ack floor read before the batch: the window's messages at or
    /// below it are forgotten with the batch (as by `window_trim`).
    pub window_floor: Option<u64>,
}

/// What holds back events of a batch in the consumer's window.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WindowBlockers {
    /// The first stream sequence above the ack floor that no instance has
    /// registered yet: a message pulled but not yet announced, below which
    /// nothing is known to be missing.
    pub first_gap: u64,
    /// Messages of these clients still pending in other batches: `(client, seq)`.
    pub pending: Vec<(String, u64)>,
    /// The first message of any client still pending in another batch
    /// (`u64::MAX`: none): steps that use shared counters wait for it.
    pub first_pending: u64,
}

/// Where a walk through the event log got to: `(stream_seq, id)`. The log
/// is walked in the stream's order, the order the daemon decided it in (the
/// id only breaks ties should a stream have been recreated, its sequences
/// starting over).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogCursor {
    pub seq: i64,
    pub id: String,
}

/// Derived history rebuilt by a replay, to replace what the store holds.
#[derive(Debug, Default)]
pub struct Derived {
    pub clients: Vec<ClientState>,
    pub counters: Vec<(CounterKey, f64)>,
    pub members: Vec<(CounterKey, String)>,
}

/// One line of the audit log: who did what to which target, through the API.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    /// The token's name.
    pub actor: String,
    pub role: String,
    /// `export`, `erase`, `rule_run` or `task_done`.
    pub action: String,
    /// `client:<erasure hash>`, `rule:<name>` or `task:<id>`: never a client
    /// id, so the log keeps nothing personal after an erasure.
    pub target: String,
    /// `ok`, `not_found`, or why it was refused.
    pub outcome: String,
}

/// One event of a client's timeline.
#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub occurred_at: DateTime<Utc>,
    pub data: serde_json::Value,
    pub context: serde_json::Value,
}

/// A client found by a search.
#[derive(Debug, Clone, Serialize)]
pub struct ClientSummary {
    pub client_id: String,
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub last_seen: Option<DateTime<Utc>>,
}

/// A mail (or other effect) of one client, for the 360 view.
#[derive(Debug, Clone, Serialize)]
pub struct MailRow {
    /// The `Message-ID` once sent (opens and clicks name it).
    pub message_id: Option<String>,
    /// The variables the mail is rendered with (its outbox payload's `vars`).
    pub vars: serde_json::Value,
    pub rule: String,
    pub kind: String,
    pub template: Option<String>,
    pub status: String,
    pub at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// A staff task, as listed and closed over HTTP.
#[derive(Debug, Clone, Serialize)]
pub struct TaskRow {
    pub id: String,
    pub team: String,
    pub title: String,
    pub client_id: String,
    pub rule: String,
    pub data: serde_json::Value,
    pub status: String,
    /// Event time of what caused it.
    pub at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub done_at: Option<DateTime<Utc>>,
}

/// Which tasks to list.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub status: Option<String>,
    pub team: Option<String>,
    pub client_id: Option<String>,
    /// Paging: only tasks after this one (`created_at`, `id`) in the
    /// listing's order (newest first, then by id).
    pub after: Option<(DateTime<Utc>, String)>,
}

/// A sweep's position, committed with the page it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepProgress {
    pub rule: String,
    pub slot: DateTime<Utc>,
    /// The last client swept.
    pub cursor: Option<ClientId>,
    pub done: bool,
}

/// A sweep this instance may run: from the start or from `cursor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepClaim {
    pub slot: DateTime<Utc>,
    pub cursor: Option<ClientId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed,
    /// Another writer got there first (an event id already stored, or a client
    /// changed since it was loaded). Nothing was written; reload and retry.
    Conflict,
}

/// A mail taken from the outbox by one sender.
#[derive(Debug, Clone)]
pub struct OutboxItem {
    pub key: String,
    pub rule: String,
    pub client_id: String,
    pub cause: String,
    pub payload: serde_json::Value,
    pub attempts: u32,
}

/// What became of a claimed outbox item.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// The server took it: `message_id` is the mail's Message-ID, or the
    /// published event's id.
    Sent {
        key: String,
        message_id: String,
        at: DateTime<Utc>,
        log: LogEntry,
    },
    /// Not taken this time: tried again from `due_at`.
    Retry {
        key: String,
        due_at: DateTime<Utc>,
        error: String,
    },
    /// Given up for good.
    Failed {
        key: String,
        error: String,
        log: LogEntry,
    },
    /// Put back until `due_at` without counting the attempt (quiet hours).
    Deferred {
        key: String,
        due_at: DateTime<Utc>,
        why: String,
    },
}

/// The state of an outbox entry, for listing and tests.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxRow {
    pub key: String,
    pub kind: String,
    pub rule: String,
    pub client_id: String,
    pub cause: String,
    pub status: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub message_id: Option<String>,
}

pub trait Store: Send + Sync + 'static {
    fn migrate(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Which of these event ids are already in the log.
    fn known_events(
        &self,
        ids: &[&EventId],
    ) -> impl Future<Output = Result<HashSet<String>, StoreError>> + Send;
    /// Current states of these clients; absent ones are not in the map.
    fn load_clients(
        &self,
        ids: &[&ClientId],
    ) -> impl Future<Output = Result<HashMap<ClientId, ClientState>, StoreError>> + Send;
    fn commit_batch(
        &self,
        batch: &BatchWrite,
    ) -> impl Future<Output = Result<CommitOutcome, StoreError>> + Send;
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
    fn client_log(
        &self,
        client: &ClientId,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<LogEntry>, StoreError>> + Send;
    fn list_outbox(
        &self,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<OutboxRow>, StoreError>> + Send;
    fn count_events(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    fn load_counter(
        &self,
        key: &CounterKey,
    ) -> impl Future<Output = Result<Stored, StoreError>> + Send;
    fn is_member(
        &self,
        key: &CounterKey,
        member: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
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
    /// Hashes ([`erasure_hash`]) of the erased clients.
    fn erased(&self) -> impl Future<Output = Result<HashSet<String>, StoreError>> + Send;
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
    /// Effects waiting to be delivered (pending or in flight).
    fn outbox_depth(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// The value kept under `key`, first setting it to `init` if there is none.
    fn meta_get_or_init(
        &self,
        key: &str,
        init: &str,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// The shop's events (not nudge's own) in event-time order, after `after`.
    fn events_page(
        &self,
        after: Option<&LogCursor>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<(Envelope, LogCursor)>, StoreError>> + Send;
    /// Every sweep that ran, in slot order.
    fn sweep_log(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, DateTime<Utc>)>, StoreError>> + Send;
    /// Replaces clients and shared counters in one transaction.
    fn replace_derived(
        &self,
        derived: &Derived,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Clients with a timer due by `now`, soonest first.
    fn due_clients(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<ClientId>, StoreError>> + Send;
    /// Client ids in id order after `after`: the pages of a sweep.
    fn client_page(
        &self,
        after: Option<&ClientId>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<ClientId>, StoreError>> + Send;
    /// Claims the sweep of `rule` at `slot` until `lease_until`, unless that
    /// slot (or a later one) is done or another instance holds a live lease.
    fn claim_sweep(
        &self,
        rule: &str,
        slot: DateTime<Utc>,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> impl Future<Output = Result<Option<SweepClaim>, StoreError>> + Send;

    /// Reserves up to `limit` due mails for this sender until `lease_until`.
    fn claim_due(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<OutboxItem>, StoreError>> + Send;
    /// Records what became of claimed outbox items, all in one transaction.
    fn record_deliveries(
        &self,
        outcomes: &[Delivery],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Announces pulled messages `(stream seq, client)` in the consumer's
    /// window, owned by `owner` (one batch) until `lease_until`.
    fn window_register(
        &self,
        owner: &str,
        items: &[(u64, Option<String>)],
        lease_until: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// What holds back this batch's events of `clients` below `below`, given
    /// the stream's ack `floor`; leases that ran out hold nothing back, and
    /// neither do the messages of `owners` (the batch itself, and the
    /// batches it commits after).
    fn window_blockers(
        &self,
        owners: &[&str],
        floor: u64,
        below: u64,
        clients: &[&str],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<WindowBlockers, StoreError>> + Send;
    /// Forgets the window's messages at or below the ack floor.
    fn window_trim(&self, floor: u64) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The configured backend. An enum rather than `dyn Store` because the trait's
/// async methods are not object-safe; each variant forwards to its backend.
#[derive(Clone)]
pub enum AnyStore {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl AnyStore {
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        Self::open(&crate::config::DatabaseConfig {
            url: url.into(),
            max_connections: max_connections
                .try_into()
                .unwrap_or(std::num::NonZeroU32::MIN),
            max_size_mb: None,
        })
        .await
    }

    /// Opens the database as configured (`database.*`).
    pub async fn open(cfg: &crate::config::DatabaseConfig) -> Result<Self, StoreError> {
        let (url, max_connections) = (cfg.url.expose(), cfg.max_connections.get());
        if url.starts_with("sqlite:") {
            Ok(AnyStore::Sqlite(
                SqliteStore::connect_capped(url, max_connections, cfg.max_size_mb.map(|n| n.get()))
                    .await?,
            ))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(AnyStore::Postgres(
                PgStore::connect(url, max_connections).await?,
            ))
        } else {
            Err(StoreError::Url(format!(
                "{} (expected sqlite:// or postgres://)",
                crate::config::redact(url)
            )))
        }
    }
}

impl AnyStore {
    /// Waits until this process may consume the stream into the database,
    /// and returns what it holds while it does: at once on PostgreSQL, whose
    /// instances share the consumer window in the database; on SQLite once
    /// no other process consumes (its window is in this process's memory).
    /// `None`: cancelled while waiting. `standing_by` is told when a wait
    /// begins and ends.
    pub async fn consumer_lock(
        &self,
        cancel: &tokio_util::sync::CancellationToken,
        standing_by: &(dyn Fn(bool) + Sync),
    ) -> Option<window::ConsumerLock> {
        match self {
            AnyStore::Sqlite(s) => s.consumer_lock(cancel, standing_by).await,
            AnyStore::Postgres(_) => Some(window::ConsumerLock::shared()),
        }
    }
}

macro_rules! forward {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $call.await,
            AnyStore::Postgres($s) => $call.await,
        }
    };
}

impl Store for AnyStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        forward!(self, s => s.migrate())
    }
    async fn ping(&self) -> Result<(), StoreError> {
        forward!(self, s => s.ping())
    }
    async fn known_events(&self, ids: &[&EventId]) -> Result<HashSet<String>, StoreError> {
        forward!(self, s => s.known_events(ids))
    }
    async fn load_clients(
        &self,
        ids: &[&ClientId],
    ) -> Result<HashMap<ClientId, ClientState>, StoreError> {
        forward!(self, s => s.load_clients(ids))
    }
    async fn commit_batch(&self, batch: &BatchWrite) -> Result<CommitOutcome, StoreError> {
        forward!(self, s => s.commit_batch(batch))
    }
    async fn list_rejected(&self, limit: u32) -> Result<Vec<Rejected>, StoreError> {
        forward!(self, s => s.list_rejected(limit))
    }
    async fn rejected_page(
        &self,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<(i64, Rejected)>, StoreError> {
        forward!(self, s => s.rejected_page(before, limit))
    }
    async fn client_log(&self, client: &ClientId, limit: u32) -> Result<Vec<LogEntry>, StoreError> {
        forward!(self, s => s.client_log(client, limit))
    }
    async fn list_outbox(&self, limit: u32) -> Result<Vec<OutboxRow>, StoreError> {
        forward!(self, s => s.list_outbox(limit))
    }
    async fn count_events(&self) -> Result<u64, StoreError> {
        forward!(self, s => s.count_events())
    }
    async fn load_counter(&self, key: &CounterKey) -> Result<Stored, StoreError> {
        forward!(self, s => s.load_counter(key))
    }
    async fn is_member(&self, key: &CounterKey, member: &str) -> Result<bool, StoreError> {
        forward!(self, s => s.is_member(key, member))
    }
    async fn list_tasks(
        &self,
        filter: &TaskFilter,
        limit: u32,
    ) -> Result<Vec<TaskRow>, StoreError> {
        forward!(self, s => s.list_tasks(filter, limit))
    }
    async fn close_task(&self, id: &str, at: DateTime<Utc>) -> Result<bool, StoreError> {
        forward!(self, s => s.close_task(id, at))
    }
    async fn events_page(
        &self,
        after: Option<&LogCursor>,
        limit: u32,
    ) -> Result<Vec<(Envelope, LogCursor)>, StoreError> {
        forward!(self, s => s.events_page(after, limit))
    }
    async fn meta_get_or_init(&self, key: &str, init: &str) -> Result<String, StoreError> {
        forward!(self, s => s.meta_get_or_init(key, init))
    }
    async fn client_events(
        &self,
        client: &ClientId,
        event_type: Option<&str>,
        before: Option<(DateTime<Utc>, String)>,
        limit: u32,
    ) -> Result<Vec<EventRow>, StoreError> {
        forward!(self, s => s.client_events(client, event_type, before, limit))
    }
    async fn search_clients(
        &self,
        q: &str,
        offset: u32,
        limit: u32,
    ) -> Result<Vec<ClientSummary>, StoreError> {
        forward!(self, s => s.search_clients(q, offset, limit))
    }
    async fn client_mails(
        &self,
        client: &ClientId,
        limit: u32,
    ) -> Result<Vec<MailRow>, StoreError> {
        forward!(self, s => s.client_mails(client, limit))
    }
    async fn outbox_depth(&self) -> Result<u64, StoreError> {
        forward!(self, s => s.outbox_depth())
    }
    async fn export_client(
        &self,
        client: &ClientId,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        forward!(self, s => s.export_client(client))
    }
    async fn erase_client(&self, client: &ClientId, at: DateTime<Utc>) -> Result<bool, StoreError> {
        forward!(self, s => s.erase_client(client, at))
    }
    async fn erased(&self) -> Result<HashSet<String>, StoreError> {
        forward!(self, s => s.erased())
    }
    async fn record_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        forward!(self, s => s.record_audit(entry))
    }
    async fn list_audit(
        &self,
        target: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        forward!(self, s => s.list_audit(target, limit))
    }
    async fn sweep_log(&self) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        forward!(self, s => s.sweep_log())
    }
    async fn replace_derived(&self, derived: &Derived) -> Result<(), StoreError> {
        forward!(self, s => s.replace_derived(derived))
    }
    async fn due_clients(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<ClientId>, StoreError> {
        forward!(self, s => s.due_clients(now, limit))
    }
    async fn client_page(
        &self,
        after: Option<&ClientId>,
        limit: u32,
    ) -> Result<Vec<ClientId>, StoreError> {
        forward!(self, s => s.client_page(after, limit))
    }
    async fn claim_sweep(
        &self,
        rule: &str,
        slot: DateTime<Utc>,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<SweepClaim>, StoreError> {
        forward!(self, s => s.claim_sweep(rule, slot, now, lease_until))
    }
    async fn claim_due(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        forward!(self, s => s.claim_due(now, lease_until, limit))
    }
    async fn record_deliveries(&self, outcomes: &[Delivery]) -> Result<(), StoreError> {
        forward!(self, s => s.record_deliveries(outcomes))
    }
    async fn window_register(
        &self,
        owner: &str,
        items: &[(u64, Option<String>)],
        lease_until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        forward!(self, s => s.window_register(owner, items, lease_until))
    }
    async fn window_blockers(
        &self,
        owners: &[&str],
        floor: u64,
        below: u64,
        clients: &[&str],
        now: DateTime<Utc>,
    ) -> Result<WindowBlockers, StoreError> {
        forward!(self, s => s.window_blockers(owners, floor, below, clients, now))
    }
    async fn window_trim(&self, floor: u64) -> Result<(), StoreError> {
        forward!(self, s => s.window_trim(floor))
    }
}

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

/// Stops a store's upkeep task ([`spawn_upkeep`]) when the last clone of
/// the store is dropped.
#[derive(Clone)]
pub(crate) struct Upkeep {
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
) -> Upkeep
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    let stop = tokio_util::sync::CancellationToken::new();
    let guard = Upkeep {
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
