//! The values that cross the store's traits: what a batch writes, what the
//! outbox hands a sender, the rows the staff API lists.

use crate::domain::counters::{CounterKey, CounterWrite};
use crate::domain::effects::Effect;
use crate::domain::event::{ClientId, Envelope};
use crate::domain::experiments::ExposureRow;
use crate::domain::history::ClientState;
use crate::domain::log::LogEntry;
use chrono::{DateTime, Utc};
use serde::Serialize;

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
    /// Exposures made or changed, as they are after each change.
    pub exposures: Vec<ExposureRow>,
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
    /// One of these pending messages (of these clients, or the first of
    /// any) is held under a lease that ran out: its holder stopped renewing
    /// it (it died, or is stuck). It still holds back what follows it, as
    /// long as the waiting batch's patience lasts; the broker hands it to
    /// another instance after `nats.ack_wait_secs`, which claims it anew.
    pub stale: bool,
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
