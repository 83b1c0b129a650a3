//! What a client was exposed to, for knowing what works: the variants a
//! client was given in experiments (kept, so a client's variant never
//! changes), and one exposure per rule and experiment with what followed it
//! (mails, opens, clicks, the first goal event within the goal's window).
//!
//! Everything here is decided from the client's own history in event time,
//! so the daemon, a replay and a backtest record the same exposures and
//! conversions. Assignment is a hash of the experiment and the client id,
//! the same on every instance; analysts can recompute it (README, "Knowing
//! what works").

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Exposures kept per client at most; past it the oldest finished ones
/// (their goal window over) leave the state. Their rows stay in the store;
/// only later opens or clicks of such a mail are no longer counted.
pub const MAX_EXPOSURES: usize = 64;

/// Experiments a client keeps a variant of at most (the oldest go first).
pub const MAX_EXPERIMENTS: usize = 64;

/// The variant name of the global control group in reports.
pub const GLOBAL_CONTROL: &str = "global_control";

/// What a rule is for: `const GOAL = #{ event: "order_placed", within_days: 7 }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Goal {
    /// The event type that counts as a conversion.
    pub event: String,
    /// The window after an exposure in which it counts, in days.
    pub within_days: u32,
    /// The least `data.total` a goal event must carry to count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_total: Option<f64>,
}

/// Longest goal window: a year.
pub const MAX_GOAL_DAYS: u32 = 366;

/// The first goal event after an exposure, within its window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversion {
    pub at: DateTime<Utc>,
    /// The goal event's `data.total` (0 when it has none).
    pub revenue: f64,
    pub event_id: String,
}

/// A client exposed to a rule (and, in an experiment, to a variant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exposure {
    pub rule: String,
    /// The experiment (`variant(name, ...)`), or empty: the rule's own
    /// exposure, made by its first mail to the client.
    #[serde(default)]
    pub experiment: String,
    #[serde(default)]
    pub variant: String,
    /// The client is in the global control group: marketing mail was held out.
    #[serde(default)]
    pub held_out: bool,
    pub at: DateTime<Utc>,
    /// The rule's goal when the client was exposed (kept, so a goal edited
    /// later does not change what an earlier exposure is measured against).
    #[serde(default)]
    pub goal: Option<Goal>,
    /// Mails of the rule queued for the client since the exposure.
    #[serde(default)]
    pub mails: u32,
    #[serde(default)]
    pub opened: bool,
    #[serde(default)]
    pub clicked: bool,
    #[serde(default)]
    pub converted: Option<Conversion>,
}

impl Exposure {
    /// The group this exposure counts in: its variant, or the global control.
    pub fn group(&self) -> &str {
        if self.held_out {
            GLOBAL_CONTROL
        } else {
            &self.variant
        }
    }

    /// The end of the goal window, when there is a goal.
    fn window_end(&self) -> Option<DateTime<Utc>> {
        let goal = self.goal.as_ref()?;
        self.at
            .checked_add_signed(Duration::days(goal.within_days.into()))
    }

    /// Nothing more can change it but an open or click.
    fn finished(&self, now: DateTime<Utc>) -> bool {
        self.converted.is_some() || self.window_end().is_none_or(|end| now > end)
    }
}

/// A client's exposure with the client's id: a row of the store's `exposures`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExposureRow {
    pub client_id: String,
    #[serde(flatten)]
    pub exposure: Exposure,
}

/// What a client was exposed to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Exposures {
    /// Variant by experiment, given on first use and kept.
    #[serde(default)]
    pub variants: BTreeMap<String, String>,
    /// Oldest first.
    #[serde(default)]
    pub rows: Vec<Exposure>,
}

impl Exposures {
    pub fn is_empty(&self) -> bool {
        self.variants.is_empty() && self.rows.is_empty()
    }

    fn find(&mut self, rule: &str, experiment: &str) -> Option<usize> {
        self.rows
            .iter()
            .position(|e| e.rule == rule && e.experiment == experiment)
    }

    /// Records an exposure unless the client has one for this rule and
    /// experiment already; returns the new one.
    pub fn expose(&mut self, new: Exposure) -> Option<&Exposure> {
        if self.find(&new.rule, &new.experiment).is_some() {
            return None;
        }
        if self.rows.len() >= MAX_EXPOSURES {
            let at = new.at;
            // The oldest finished one goes; failing that, the oldest.
            let drop = self.rows.iter().position(|e| e.finished(at)).unwrap_or(0);
            self.rows.remove(drop);
        }
        self.rows.push(new);
        self.rows.last()
    }

    /// A mail of `rule` queued at `at`: counted on each of the rule's
    /// exposures, or, when it has none, the rule's own exposure starts.
    /// Returns the exposures changed.
    pub fn mailed(&mut self, rule: &str, at: DateTime<Utc>, goal: Option<&Goal>) -> Vec<Exposure> {
        let mut changed: Vec<Exposure> = Vec::new();
        for e in self.rows.iter_mut().filter(|e| e.rule == rule) {
            e.mails = e.mails.saturating_add(1);
            changed.push(e.clone());
        }
        if changed.is_empty() {
            let mut own = Exposure::new(rule, "", "", false, at, goal);
            own.mails = 1;
            changed.extend(self.expose(own).cloned());
        }
        changed
    }

    /// A marketing mail of `rule` held out for the global control group:
    /// the rule's exposures of the client count in `global_control` from
    /// now on, or, when it has none, the rule's own exposure starts there.
    /// Returns the exposures changed.
    pub fn held_out(
        &mut self,
        rule: &str,
        at: DateTime<Utc>,
        goal: Option<&Goal>,
    ) -> Vec<Exposure> {
        let mut changed: Vec<Exposure> = Vec::new();
        let mut any = false;
        for e in self.rows.iter_mut().filter(|e| e.rule == rule) {
            any = true;
            if !e.held_out {
                e.held_out = true;
                changed.push(e.clone());
            }
        }
        if !any {
            changed.extend(
                self.expose(Exposure::new(rule, "", "", true, at, goal))
                    .cloned(),
            );
        }
        changed
    }

    /// An open or click of a mail of `rule`. Returns the exposures changed.
    pub fn engaged(&mut self, rule: &str, clicked: bool) -> Vec<Exposure> {
        let mut changed = Vec::new();
        for e in self.rows.iter_mut().filter(|e| e.rule == rule) {
            let flag = if clicked {
                &mut e.clicked
            } else {
                &mut e.opened
            };
            if !*flag {
                *flag = true;
                changed.push(e.clone());
            }
        }
        changed
    }

    /// An event of the client: converts every open exposure whose goal it
    /// meets (its type, its total, within the window, not before the
    /// exposure). Returns the exposures converted.
    pub fn goal_event(
        &mut self,
        event_type: &str,
        total: Option<f64>,
        at: DateTime<Utc>,
        event_id: &str,
    ) -> Vec<Exposure> {
        let mut converted = Vec::new();
        for e in &mut self.rows {
            let Some(goal) = &e.goal else { continue };
            if e.converted.is_some()
                || goal.event != event_type
                || at < e.at
                || e.window_end().is_none_or(|end| at > end)
                || goal.min_total.is_some_and(|min| total.unwrap_or(0.0) < min)
            {
                continue;
            }
            e.converted = Some(Conversion {
                at,
                revenue: total.filter(|t| t.is_finite()).unwrap_or(0.0),
                event_id: event_id.to_string(),
            });
            converted.push(e.clone());
        }
        converted
    }

    /// Keeps a variant given, dropping the oldest-named past the bound.
    pub fn keep_variants(&mut self, variants: BTreeMap<String, String>) {
        self.variants = variants;
        while self.variants.len() > MAX_EXPERIMENTS {
            self.variants.pop_first();
        }
    }
}

impl Exposure {
    pub fn new(
        rule: &str,
        experiment: &str,
        variant: &str,
        held_out: bool,
        at: DateTime<Utc>,
        goal: Option<&Goal>,
    ) -> Self {
        Self {
            rule: rule.to_string(),
            experiment: experiment.to_string(),
            variant: variant.to_string(),
            held_out,
            at,
            goal: goal.cloned(),
            mails: 0,
            opened: false,
            clicked: false,
            converted: None,
        }
    }
}

/// Where a client falls in `[0, 1)` for `salt`: the first 8 bytes of
/// SHA-256 of `salt`, a zero byte and the client id, big-endian, over 2^64.
/// The same on every instance and in every version.
pub fn bucket(salt: &str, client_id: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update([0]);
    h.update(client_id.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // 53 bits are all an f64 holds exactly; the rest would only round.
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// The variant a client's bucket `u` falls in, over `weights` in the order
/// given (cumulative shares of the total). `None` when no weight is positive.
pub fn choose(weights: &[(String, f64)], u: f64) -> Option<&str> {
    let total: f64 = weights.iter().map(|(_, w)| w.max(0.0)).sum();
    if !(total > 0.0 && total.is_finite()) {
        return None;
    }
    let mut upto = 0.0;
    let mut last = None;
    for (name, w) in weights.iter().filter(|(_, w)| *w > 0.0) {
        upto += w / total;
        last = Some(name.as_str());
        if u < upto {
            return last;
        }
    }
    // Rounding can leave the cumulative share a hair under 1.
    last
}

/// Whether a client is in the global control group of `percent` (0-100).
pub fn in_global_control(client_id: &str, percent: f64) -> bool {
    percent > 0.0 && bucket(GLOBAL_CONTROL, client_id) * 100.0 < percent
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn buckets_are_stable_and_spread_evenly() {
        // Fixed by the documented formula: a change here changes every
        // client's variant, which must never happen silently.
        assert_eq!(bucket("welcome_test", "c1"), bucket("welcome_test", "c1"));
        assert_ne!(bucket("welcome_test", "c1"), bucket("other", "c1"));
        let n = 20_000;
        let below: usize = (0..n)
            .filter(|i| bucket("x", &format!("client-{i}")) < 0.3)
            .count();
        // Binomial(20000, 0.3): sd 65; 5 sd either side.
        assert!((below as i64 - 6000).abs() < 325, "{below}");
    }

    #[test]
    fn choose_follows_cumulative_weights_in_order() {
        let w = vec![
            ("A".to_string(), 45.0),
            ("B".into(), 45.0),
            ("control".into(), 10.0),
        ];
        assert_eq!(choose(&w, 0.0), Some("A"));
        assert_eq!(choose(&w, 0.4499), Some("A"));
        assert_eq!(choose(&w, 0.45), Some("B"));
        assert_eq!(choose(&w, 0.8999), Some("B"));
        assert_eq!(choose(&w, 0.9), Some("control"));
        assert_eq!(choose(&w, 0.999_999), Some("control"));
        let zero = vec![("A".to_string(), 0.0), ("B".into(), 2.0)];
        assert_eq!(choose(&zero, 0.0), Some("B"));
        assert_eq!(choose(&[("A".to_string(), 0.0)], 0.5), None);
    }

    #[test]
    fn the_first_goal_event_in_the_window_converts_once() {
        let goal = Goal {
            event: "order_placed".into(),
            within_days: 7,
            min_total: Some(10.0),
        };
        let mut x = Exposures::default();
        x.expose(Exposure::new(
            "w",
            "e",
            "A",
            false,
            t("2026-11-01T10:00:00Z"),
            Some(&goal),
        ));
        assert!(
            x.goal_event(
                "order_placed",
                Some(50.0),
                t("2026-11-01T09:00:00Z"),
                "before"
            )
            .is_empty()
        );
        assert!(
            x.goal_event("page_viewed", None, t("2026-11-02T09:00:00Z"), "p")
                .is_empty()
        );
        assert!(
            x.goal_event(
                "order_placed",
                Some(5.0),
                t("2026-11-02T09:00:00Z"),
                "small"
            )
            .is_empty()
        );
        let c = x.goal_event("order_placed", Some(20.0), t("2026-11-08T10:00:00Z"), "o1");
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].converted.as_ref().unwrap().revenue, 20.0);
        assert!(
            x.goal_event("order_placed", Some(90.0), t("2026-11-08T11:00:00Z"), "o2")
                .is_empty()
        );

        let mut late = Exposures::default();
        late.expose(Exposure::new(
            "w",
            "",
            "",
            false,
            t("2026-11-01T10:00:00Z"),
            Some(&goal),
        ));
        assert!(
            late.goal_event("order_placed", Some(20.0), t("2026-11-08T10:00:01Z"), "o")
                .is_empty()
        );
    }

    #[test]
    fn exposures_stay_bounded_and_keep_the_first() {
        let mut x = Exposures::default();
        let at = t("2026-11-01T10:00:00Z");
        assert!(
            x.expose(Exposure::new("w", "e", "A", false, at, None))
                .is_some()
        );
        assert!(
            x.expose(Exposure::new("w", "e", "B", false, at, None))
                .is_none()
        );
        assert_eq!(x.rows[0].variant, "A");
        for i in 0..200 {
            x.expose(Exposure::new(&format!("r{i}"), "", "", false, at, None));
        }
        assert_eq!(x.rows.len(), MAX_EXPOSURES);
        let changed = x.mailed("r199", at, None);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].mails, 1);
        let own = x.mailed("new-rule", at, None);
        assert_eq!((own[0].experiment.as_str(), own[0].mails), ("", 1));
        assert_eq!(x.engaged("new-rule", false).len(), 1);
        assert!(
            x.engaged("new-rule", false).is_empty(),
            "an open counts once"
        );
    }

    #[test]
    fn the_global_control_share_is_what_was_asked() {
        assert!(!in_global_control("c1", 0.0));
        let n = 20_000;
        let held = (0..n)
            .filter(|i| in_global_control(&format!("client-{i}"), 10.0))
            .count();
        assert!((held as i64 - 2000).abs() < 212, "{held}");
    }
}
