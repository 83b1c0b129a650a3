//! The live feed of the staff page and the wall boards: new tasks, mails
//! sent or failed, notable events, and board scores, as they are committed. A broadcast channel: a slow
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
    /// `task`, `event`, `mail`, `board`.
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
    /// For `board`: the entry whose day score changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub board: Option<BoardChange>,
}

/// A board entry's new score for the day, as a batch committed it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BoardChange {
    pub board: String,
    /// `day`: the week and month moved by as much.
    pub period: &'static str,
    /// The day's key: `2026-12-06`.
    pub key: String,
    pub member: String,
    pub group: String,
    pub label: String,
    /// The entry's score for the day (per group and label).
    pub score: f64,
}

/// The `board` lines for a committed batch's counters: one per day entry it
/// wrote. Only `rank()` writes board counters, and only by adding, so each
/// is a change.
pub fn board_items(
    counters: &[crate::domain::counters::CounterWrite],
    at: chrono::DateTime<chrono::Utc>,
) -> Vec<LiveItem> {
    counters
        .iter()
        .filter_map(|w| {
            let (board, kind, key, entry) = crate::domain::boards::parse_key(&w.key)?;
            (kind == "day").then(|| LiveItem {
                kind: "board",
                client_id: String::new(),
                at,
                text: format!("{board}: {} {}", entry.label, w.value),
                id: None,
                team: None,
                board: Some(BoardChange {
                    board: board.to_string(),
                    period: "day",
                    key: key.to_string(),
                    member: entry.member,
                    group: entry.group,
                    label: entry.label,
                    score: w.value,
                }),
            })
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::boards::{Entry, counter_key};
    use crate::domain::counters::{CounterKey, CounterWrite};

    #[test]
    fn a_board_line_for_each_day_entry_written_and_none_for_other_counters() {
        let at: chrono::DateTime<chrono::Utc> = "2026-12-06T10:00:00Z".parse().unwrap();
        let entry = Entry {
            group: "east".into(),
            member: "ana".into(),
            label: "Ana".into(),
        };
        let write = |key: CounterKey| CounterWrite {
            key,
            version: 3,
            value: 250.0,
        };
        let tz = chrono_tz::Tz::UTC;
        let writes = [
            write(counter_key("sales", "day", at, tz, &entry).unwrap()),
            write(counter_key("sales", "month", at, tz, &entry).unwrap()),
            write(CounterKey {
                name: "big".into(),
                period: "2026-Q4".into(),
            }),
        ];
        let items = board_items(&writes, at);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].kind, "board");
        assert_eq!(
            items[0].board,
            Some(BoardChange {
                board: "sales".into(),
                period: "day",
                key: "2026-12-06".into(),
                member: "ana".into(),
                group: "east".into(),
                label: "Ana".into(),
                score: 250.0,
            })
        );
    }
}
