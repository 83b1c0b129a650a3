//! The live feed of the staff page: new tasks, mails sent or failed, and
//! notable events, as they are committed. A broadcast channel: a slow
//! listener misses old news rather than slowing nudge down.

use serde::Serialize;
use tokio::sync::broadcast;

/// Event types worth a line in the live feed.
pub const NOTABLE: &[&str] = &[
    "client_registered",
    "order_placed",
    "order_cancelled",
    "error_occurred",
    "support_contacted",
    "unsubscribed",
];

/// One line of the feed.
#[derive(Debug, Clone, Serialize)]
pub struct LiveItem {
    /// `task`, `event`, `mail`.
    pub kind: &'static str,
    pub client_id: String,
    pub at: chrono::DateTime<chrono::Utc>,
    /// What happened, for people.
    pub text: String,
    /// The task id, for tasks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
}

#[derive(Clone)]
pub struct Live {
    tx: broadcast::Sender<LiveItem>,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(1024).0,
        }
    }
}

impl Live {
    pub fn send(&self, item: LiveItem) {
        // No listener is fine: nobody has the page open.
        let _ = self.tx.send(item);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LiveItem> {
        self.tx.subscribe()
    }
}
