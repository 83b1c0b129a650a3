//! Counters the daemon keeps about itself, rendered as Prometheus text.

use crate::store::BatchWrite;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Metrics {
    pub events_consumed: AtomicU64,
    pub events_accepted: AtomicU64,
    pub events_duplicate: AtomicU64,
    pub events_rejected: AtomicU64,
    pub batches: AtomicU64,
    pub effects_queued: AtomicU64,
    /// Mails (to clients and staff task mails) the mail server accepted.
    pub mails_sent: AtomicU64,
    pub mails_failed: AtomicU64,
    pub mails_retried: AtomicU64,
    /// Marketing mails held in the outbox for the client's quiet hours.
    pub mails_deferred: AtomicU64,
    /// Secondary events published on NATS (not mails).
    pub emits_published: AtomicU64,
    pub emits_failed: AtomicU64,
    pub emits_retried: AtomicU64,
    /// Webhooks the receiver took (2xx), gave up on, and will retry.
    pub webhooks_sent: AtomicU64,
    pub webhooks_failed: AtomicU64,
    pub webhooks_retried: AtomicU64,
    /// Texts the gateway took, gave up on, will retry, held for quiet hours.
    pub texts_sent: AtomicU64,
    pub texts_failed: AtomicU64,
    pub texts_retried: AtomicU64,
    pub texts_deferred: AtomicU64,
    /// Mails a rule asked for that were not queued, by reason.
    mails_skipped: Mutex<BTreeMap<&'static str, u64>>,
    /// Batches that stopped waiting for earlier events of their clients.
    pub order_waits_expired: AtomicU64,
    /// Batches decided ahead whose decision did not hold (see `chain`).
    pub decided_again: AtomicU64,
    /// Steps set aside because deciding them panicked.
    pub steps_panicked: AtomicU64,
    /// Batches that stopped waiting for an earlier message nobody announced.
    pub order_gaps_expired: AtomicU64,
    /// Attempts to commit a batch that failed (each retry counts).
    pub batch_failures: AtomicU64,
    /// The same, by class (`flow::error::BatchError::class`).
    batch_failures_by_class: Mutex<BTreeMap<&'static str, u64>>,
    /// While this instance stands by for the stream: on SQLite, another
    /// process consumes into the database.
    standby: AtomicBool,
    /// Why the batch in hand cannot be committed, and since when; `None`
    /// once a batch went through.
    ingest_failing: Mutex<Option<(String, chrono::DateTime<chrono::Utc>)>>,
    /// (runs, errors) by rule.
    rules: Mutex<BTreeMap<String, (u64, u64)>>,
    /// Publish-to-commit latency: counts per bucket, then sum and count.
    latency: Mutex<Histogram>,
}

/// Every reason a mail is skipped, so each series exists from the start
/// (a rate over a series that appears only with its first skip misses it).
pub const SKIP_REASONS: &[&str] = &[
    "no_consent",
    "unsubscribed",
    "cap",
    "no_address",
    "no_template",
];

/// Why a mail was not queued, read from the line the decision core writes
/// to the client's process log (`decide::Decider`'s mail checks): the core
/// stays free of metrics, and the log line is what support reads anyway.
pub fn skip_reason(message: &str) -> Option<&'static str> {
    if !message.contains("mail `") {
        return None;
    }
    if message.contains("skipped: the client unsubscribed") {
        Some("unsubscribed")
    } else if message.contains("skipped: the client has not given marketing consent") {
        Some("no_consent")
    } else if message.contains("skipped: the cap of") {
        Some("cap")
    } else if message.contains("not queued: the client has no e-mail address") {
        Some("no_address")
    } else if message.contains("not queued: no such template") {
        Some("no_template")
    } else {
        None
    }
}

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; 13],
    sum: f64,
    count: u64,
}

impl Metrics {
    /// A batch committed; `duplicates` messages of it were left out as
    /// already known.
    pub fn batch_committed(&self, write: &BatchWrite, duplicates: usize) {
        let accepted = write.events.len();
        let total = accepted + duplicates + write.rejected.len();
        self.events_consumed.fetch_add(total as u64, Relaxed);
        self.events_accepted.fetch_add(accepted as u64, Relaxed);
        self.events_duplicate.fetch_add(duplicates as u64, Relaxed);
        self.events_rejected
            .fetch_add(write.rejected.len() as u64, Relaxed);
        self.effects_queued
            .fetch_add(write.effects.len() as u64, Relaxed);
        self.batches.fetch_add(1, Relaxed);
        let mut skipped = self.mails_skipped.lock().unwrap_or_else(|p| p.into_inner());
        for reason in write.log.iter().filter_map(|l| skip_reason(&l.message)) {
            *skipped.entry(reason).or_default() += 1;
        }
    }

    pub fn order_wait_expired(&self) {
        self.order_waits_expired.fetch_add(1, Relaxed);
    }

    /// A step of a batch panicked while decided and was set aside.
    pub fn step_panicked(&self) {
        self.steps_panicked.fetch_add(1, Relaxed);
    }

    /// Held events were applied without waiting longer for an earlier
    /// message nobody announced (a gap in the consumer's window).
    pub fn order_gap_expired(&self) {
        self.order_gaps_expired.fetch_add(1, Relaxed);
    }

    pub fn decided_again(&self) {
        self.decided_again.fetch_add(1, Relaxed);
    }

    /// A batch could not be committed and will be retried.
    pub fn batch_failed(&self, class: &'static str, error: &str) {
        self.batch_failures.fetch_add(1, Relaxed);
        *self
            .batch_failures_by_class
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(class)
            .or_default() += 1;
        let mut f = self
            .ingest_failing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let since = f.as_ref().map_or_else(chrono::Utc::now, |(_, t)| *t);
        *f = Some((error.to_string(), since));
    }

    /// The batch in hand went through: ingest is no longer failing.
    pub fn batch_ok(&self) {
        let mut f = self
            .ingest_failing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *f = None;
    }

    pub fn set_standby(&self, on: bool) {
        self.standby.store(on, Relaxed);
    }

    pub fn standby(&self) -> bool {
        self.standby.load(Relaxed)
    }

    /// The last commit error and since when commits fail, while they do.
    pub fn ingest_failing(&self) -> Option<(String, chrono::DateTime<chrono::Utc>)> {
        self.ingest_failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn observe_latency(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let mut h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            h.counts[i] += 1;
        }
        h.sum += secs;
        h.count += 1;
    }

    pub fn rule_run(&self, rule: &str, ok: bool) {
        let mut m = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(rule.to_string()).or_default();
        e.0 += 1;
        if !ok {
            e.1 += 1;
        }
    }

    /// (runs, errors) of one rule since start.
    pub fn rule_counts(&self, rule: &str) -> (u64, u64) {
        let m = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        m.get(rule).copied().unwrap_or_default()
    }

    /// The metrics in Prometheus' text format, with gauges measured by the caller.
    pub fn render(&self, gauges: &[(&str, &str, u64)]) -> String {
        let mut out = String::new();
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        {
            let h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
            let name = "nudge_event_latency_seconds";
            let _ = writeln!(
                out,
                "# HELP {name} From publish to committed decision.\n# TYPE {name} histogram"
            );
            let mut cumulative = 0;
            for (b, n) in BUCKETS.iter().zip(h.counts) {
                cumulative += n;
                let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
                h.count, h.sum, h.count
            );
        }
        let counters = [
            (
                "nudge_events_consumed_total",
                "Messages taken from the stream.",
                &self.events_consumed,
            ),
            (
                "nudge_events_accepted_total",
                "Events stored and decided.",
                &self.events_accepted,
            ),
            (
                "nudge_events_duplicate_total",
                "Events that had already taken effect.",
                &self.events_duplicate,
            ),
            (
                "nudge_events_rejected_total",
                "Envelopes refused and kept with a reason.",
                &self.events_rejected,
            ),
            ("nudge_batches_total", "Batches committed.", &self.batches),
            (
                "nudge_batch_failures_total",
                "Attempts to commit a batch that failed (the batch is retried, not acked).",
                &self.batch_failures,
            ),
            (
                "nudge_effects_queued_total",
                "Effects written to the outbox.",
                &self.effects_queued,
            ),
            (
                "nudge_mails_sent_total",
                "Mails (to clients, and staff task mails) accepted by the mail server.",
                &self.mails_sent,
            ),
            (
                "nudge_mails_failed_total",
                "Mails given up on.",
                &self.mails_failed,
            ),
            (
                "nudge_mails_retried_total",
                "Mail attempts that will be retried.",
                &self.mails_retried,
            ),
            (
                "nudge_mails_deferred_total",
                "Marketing mails held back to the end of the client's quiet hours (each deferral counts).",
                &self.mails_deferred,
            ),
            (
                "nudge_emits_published_total",
                "Secondary events published on NATS.",
                &self.emits_published,
            ),
            (
                "nudge_emits_failed_total",
                "Secondary events given up on.",
                &self.emits_failed,
            ),
            (
                "nudge_emits_retried_total",
                "Secondary event publishes that will be retried.",
                &self.emits_retried,
            ),
            (
                "nudge_webhooks_sent_total",
                "Webhooks the receiver accepted (2xx).",
                &self.webhooks_sent,
            ),
            (
                "nudge_webhooks_failed_total",
                "Webhooks given up on (a 4xx other than 408/429, or attempts used up).",
                &self.webhooks_failed,
            ),
            (
                "nudge_webhooks_retried_total",
                "Webhook posts that will be retried (no answer, 5xx, 408, 429).",
                &self.webhooks_retried,
            ),
            (
                "nudge_texts_sent_total",
                "Text messages the gateway accepted.",
                &self.texts_sent,
            ),
            (
                "nudge_texts_failed_total",
                "Text messages given up on.",
                &self.texts_failed,
            ),
            (
                "nudge_texts_retried_total",
                "Text message attempts that will be retried.",
                &self.texts_retried,
            ),
            (
                "nudge_texts_deferred_total",
                "Marketing texts held back to the end of the client's quiet hours (each deferral counts).",
                &self.texts_deferred,
            ),
            (
                "nudge_order_waits_expired_total",
                "Batches applied without waiting longer for earlier events of the same clients held by another instance.",
                &self.order_waits_expired,
            ),
            (
                "nudge_order_gaps_expired_total",
                "Batches applied without waiting longer for an earlier message of the stream that no instance announced (its holder died before announcing it): that message is decided when it is redelivered, after later ones.",
                &self.order_gaps_expired,
            ),
            (
                "nudge_steps_panicked_total",
                "Steps (an event, a timer, a client's sweep) whose decision panicked: each is set aside with a line in the client's process log, and its batch goes on.",
                &self.steps_panicked,
            ),
            (
                "nudge_batches_decided_again_total",
                "Batches decided ahead of the batch before them whose decision did not hold (that one did not commit as decided, another writer changed their clients, or events had to wait), so decided again.",
                &self.decided_again,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
        {
            let skipped = self.mails_skipped.lock().unwrap_or_else(|p| p.into_inner());
            let name = "nudge_mails_skipped_total";
            let _ = writeln!(
                out,
                "# HELP {name} Mails a rule asked for that were not queued, by reason (no_consent, unsubscribed, cap, no_address, no_template).\n# TYPE {name} counter"
            );
            for reason in SKIP_REASONS {
                let n = skipped.get(reason).copied().unwrap_or(0);
                let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {n}");
            }
        }
        {
            let failed = self
                .batch_failures_by_class
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let name = "nudge_batch_failures_by_class_total";
            let _ = writeln!(
                out,
                "# HELP {name} Failed attempts to commit a batch, by class: transient (retried as it is), conflict (other writers), poison (a message may be to blame; taken apart after 3), fatal (an operator must act), panic (the batch task panicked; redelivered).\n# TYPE {name} counter"
            );
            for class in ["transient", "conflict", "poison", "fatal", "panic"] {
                let n = failed.get(class).copied().unwrap_or(0);
                let _ = writeln!(out, "{name}{{class=\"{class}\"}} {n}");
            }
        }
        let rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(
            out,
            "# HELP nudge_rule_runs_total Rule runs.\n# TYPE nudge_rule_runs_total counter"
        );
        for (rule, (runs, _)) in rules.iter() {
            let _ = writeln!(out, "nudge_rule_runs_total{{rule=\"{rule}\"}} {runs}");
        }
        let _ = writeln!(
            out,
            "# HELP nudge_rule_errors_total Rule runs that failed.\n# TYPE nudge_rule_errors_total counter"
        );
        for (rule, (_, errors)) in rules.iter() {
            let _ = writeln!(out, "nudge_rule_errors_total{{rule=\"{rule}\"}} {errors}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_reasons_are_read_from_the_process_log_lines() {
        for (line, reason) in [
            (
                "marketing mail `x` skipped: the client unsubscribed",
                Some("unsubscribed"),
            ),
            (
                "marketing mail `x` skipped: the client has not given marketing consent",
                Some("no_consent"),
            ),
            (
                "marketing mail `x` skipped: the cap of 2 per day is reached",
                Some("cap"),
            ),
            (
                "mail `x` not queued: the client has no e-mail address",
                Some("no_address"),
            ),
            ("mail `x` not queued: no such template", Some("no_template")),
            ("mail `x` queued to a@b.c", None),
            ("rule failed: skipped: the client unsubscribed", None),
        ] {
            assert_eq!(skip_reason(line), reason, "{line}");
        }
    }

    /// Every sample line is `name{labels} value` under a HELP and TYPE of
    /// its family, and no family is declared twice.
    #[test]
    fn the_text_is_valid_prometheus_exposition() {
        let m = Metrics::default();
        m.rule_run("welcome", false);
        let text = m.render(&[("nudge_rules_quarantined", "Rules out of service.", 1)]);
        let mut declared = std::collections::BTreeSet::new();
        let mut typed = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(declared.insert(name.to_string()), "{name} declared twice");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut p = rest.split(' ');
                let name = p.next().unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&p.next().unwrap()));
                typed.insert(name.to_string());
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap();
                value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
                let name = series.split('{').next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                    .unwrap_or(name);
                assert!(typed.contains(family), "{line}: no TYPE before it");
                assert!(
                    name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{name}"
                );
            }
        }
        assert!(text.contains("nudge_mails_skipped_total{reason=\"no_consent\"} 0"));
        assert!(text.contains("nudge_emits_published_total 0"));
        assert!(text.contains("nudge_rules_quarantined 1"));
    }
}
