//! The `rules` section of the configuration: where rules live and what one
//! run may do. It lives with the engine that enforces it; the configuration (`config`)
//! composes it into the whole file, with the other sections.

use crate::domain::settings::nz;
use serde::{Deserialize, Serialize};
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::PathBuf;

/// Rules and their sandbox. Defaults are in [`Default`]; README's
/// configuration table and `config.example.yaml` are checked against them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// Folder of `*.rhai` rules.
    pub dir: PathBuf,
    /// How often the rules and templates folders are checked for changes, in ms.
    pub reload_poll_ms: NonZeroU64,
    /// Rhai operations one rule run may take.
    pub max_operations: NonZeroU64,
    /// Nested function calls.
    pub max_call_depth: NonZeroUsize,
    /// Longest string a rule may build, in bytes (Rhai reads 0 as no limit,
    /// hence not zero).
    pub max_string_bytes: NonZeroUsize,
    /// Longest array.
    pub max_array_len: NonZeroUsize,
    /// Largest map.
    pub max_map_len: NonZeroUsize,
    /// How many secondary events deep an emit may go before it is stopped.
    pub max_emit_depth: u32,
    /// Distinct clients a rule must have failed for before it is
    /// quarantined until its file changes (0: never). One client's odd data
    /// fails that client's runs only; a rule is taken out of service when
    /// it is broken for many: its last `quarantine_window` runs, in stream
    /// order, are at least 90 % failures, over at least this many distinct
    /// clients.
    pub quarantine_after: u32,
    /// The runs of a rule the quarantine looks at (see `quarantine_after`).
    pub quarantine_window: NonZeroU32,
    /// Free-form values rules read as `settings` (e.g. partner shares).
    pub settings: serde_json::Map<String, serde_json::Value>,
    /// Longest delay `after()` accepts, in days; a longer one fails the run
    /// (a timer years away is a mistake, and an unbounded one overflows the
    /// time arithmetic).
    pub max_delay_days: NonZeroU32,
    /// Largest value one rule may keep with `remember` (a larger one is not
    /// kept; the process log says so) and largest data of a timer (a larger
    /// one fails the run), in bytes of JSON: both are loaded and saved with
    /// every event of the client. (A mail's, emit's or task's data is bounded
    /// by `max_string_bytes`.)
    pub max_value_bytes: NonZeroUsize,
    /// Keys one rule may `remember` per client; a new key beyond it is not
    /// kept (noted in the process log).
    pub max_facts_per_rule: NonZeroUsize,
    /// Pending timers one rule may hold per client; a new timer name beyond
    /// it is not set (noted).
    pub max_timers_per_rule: NonZeroUsize,
    /// Bytes of `print`/`debug` output one rule run may write to the log; the
    /// rest is cut with a note.
    pub max_log_bytes_per_run: NonZeroUsize,
    /// Mails one rule run may queue; the rest are dropped with a note.
    pub max_mails_per_run: NonZeroUsize,
    /// Tasks one rule run may make; the rest are dropped with a note.
    pub max_tasks_per_run: NonZeroUsize,
    /// Secondary events one rule run may emit; the rest are dropped with a note.
    pub max_emits_per_run: NonZeroUsize,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            dir: "rules".into(),
            reload_poll_ms: nz!(500),
            max_operations: nz!(200_000),
            max_call_depth: nz!(32),
            max_string_bytes: nz!(64 * 1024),
            max_array_len: nz!(10_000),
            max_map_len: nz!(10_000),
            max_emit_depth: 4,
            quarantine_after: 20,
            quarantine_window: nz!(100),
            settings: Default::default(),
            max_delay_days: nz!(3650),
            max_value_bytes: nz!(8 * 1024),
            max_facts_per_rule: nz!(50),
            max_timers_per_rule: nz!(20),
            max_log_bytes_per_run: nz!(16 * 1024),
            max_mails_per_run: nz!(10),
            max_tasks_per_run: nz!(10),
            max_emits_per_run: nz!(10),
        }
    }
}
