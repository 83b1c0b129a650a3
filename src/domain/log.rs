//! The process log: what nudge decided and did for a client, line by line.

use crate::domain::event::{ClientId, EventId};
use chrono::{DateTime, Utc};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Notice,
    Warning,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Notice => "notice",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// One line of a client's process log: what nudge decided and did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogEntry {
    pub client_id: ClientId,
    pub at: DateTime<Utc>,
    pub level: Level,
    pub rule: Option<String>,
    pub event_id: Option<EventId>,
    pub message: String,
}
