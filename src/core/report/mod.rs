//! What a rule achieves: its exposures summed per experiment and variant
//! (the global control group apart), each variant compared with its
//! experiment's baseline. One computation for every source of exposures:
//! the store's (`nudge report`, `/api/reports/{rule}`) and a backtest's.

pub mod stats;

use crate::domain::experiments::{Exposure, GLOBAL_CONTROL, Goal};
use chrono::{DateTime, Utc};
use serde::Serialize;
use stats::{Comparison, Moments, two_proportions, welch};
use std::collections::BTreeMap;

/// Below this many exposed clients in either group, or this many converted
/// or not converted, a comparison says "not enough data": the normal
/// approximations behind its interval and p-value do not hold.
pub const MIN_EXPOSED: u64 = 100;
pub const MIN_OUTCOMES: u64 = 5;

/// The variant an experiment is measured against when it has one by this name.
pub const CONTROL: &str = "control";

/// A rule's report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub rule: String,
    /// Exposures from this time on (inclusive) ...
    pub since: Option<DateTime<Utc>>,
    /// ... and before this time.
    pub until: Option<DateTime<Utc>>,
    /// The rule's goal now (each exposure is measured against the goal it
    /// was made under).
    pub goal: Option<Goal>,
    /// A backtest's report: no mail was sent then, so conversions are what
    /// clients did anyway, a baseline.
    pub baseline_only: bool,
    /// Experiments by name; `""` is the rule's own exposures, made by its
    /// first mail to a client outside any experiment.
    pub experiments: Vec<ExperimentReport>,
    pub min_exposed: u64,
    pub min_outcomes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExperimentReport {
    pub experiment: String,
    /// The group the others are compared with: `control`, else the first
    /// variant by name, else (for the rule's own exposures) `global_control`.
    pub baseline: Option<String>,
    pub variants: Vec<VariantReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantReport {
    /// The variant, `global_control`, or `""` for the rule's own exposures.
    pub variant: String,
    pub exposed: u64,
    pub mailed: u64,
    pub opened: u64,
    pub clicked: u64,
    pub converted: u64,
    pub conversion_rate: f64,
    pub revenue: f64,
    pub revenue_per_exposed: f64,
    /// Against the baseline; absent on the baseline itself.
    pub lift: Option<Lift>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lift {
    pub against: String,
    /// `ok`, or `not enough data` (see [`MIN_EXPOSED`], [`MIN_OUTCOMES`]).
    pub status: &'static str,
    pub conversion: Option<Comparison>,
    pub revenue_per_exposed: Option<Comparison>,
}

/// Sums of one group.
#[derive(Debug, Clone, Default)]
struct Tally {
    exposed: u64,
    mailed: u64,
    opened: u64,
    clicked: u64,
    converted: u64,
    /// Revenue per exposed client (0 for those who did not convert).
    revenue: Moments,
}

/// Sums exposures as they come (from a store's rows or a backtest's states).
#[derive(Debug, Default)]
pub struct ReportBuilder {
    groups: BTreeMap<String, BTreeMap<String, Tally>>,
}

impl ReportBuilder {
    pub fn add(&mut self, e: &Exposure) {
        let t = self
            .groups
            .entry(e.experiment.clone())
            .or_default()
            .entry(e.group().to_string())
            .or_default();
        t.exposed += 1;
        t.mailed += u64::from(e.mails > 0);
        t.opened += u64::from(e.opened);
        t.clicked += u64::from(e.clicked);
        t.converted += u64::from(e.converted.is_some());
        t.revenue
            .add(e.converted.as_ref().map_or(0.0, |c| c.revenue));
    }

    pub fn finish(self, rule: &str, goal: Option<Goal>) -> Report {
        let experiments = self
            .groups
            .into_iter()
            .map(|(experiment, tallies)| experiment_report(experiment, tallies))
            .collect();
        Report {
            rule: rule.to_string(),
            since: None,
            until: None,
            goal,
            baseline_only: false,
            experiments,
            min_exposed: MIN_EXPOSED,
            min_outcomes: MIN_OUTCOMES,
        }
    }
}

fn experiment_report(experiment: String, tallies: BTreeMap<String, Tally>) -> ExperimentReport {
    let baseline = if tallies.contains_key(CONTROL) {
        Some(CONTROL.to_string())
    } else if experiment.is_empty() {
        tallies
            .contains_key(GLOBAL_CONTROL)
            .then(|| GLOBAL_CONTROL.to_string())
    } else {
        tallies.keys().find(|k| *k != GLOBAL_CONTROL).cloned()
    };
    let base = baseline.as_ref().and_then(|b| tallies.get(b)).cloned();
    let variants = tallies
        .into_iter()
        .map(|(variant, t)| {
            let lift = match (&baseline, &base) {
                (Some(b), Some(base)) if *b != variant => Some(lift(b, &t, base)),
                _ => None,
            };
            VariantReport {
                conversion_rate: ratio(t.converted as f64, t.exposed),
                revenue: t.revenue.sum,
                revenue_per_exposed: ratio(t.revenue.sum, t.exposed),
                variant,
                exposed: t.exposed,
                mailed: t.mailed,
                opened: t.opened,
                clicked: t.clicked,
                converted: t.converted,
                lift,
            }
        })
        .collect();
    ExperimentReport {
        experiment,
        baseline,
        variants,
    }
}

fn ratio(x: f64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { x / n as f64 }
}

fn enough(t: &Tally) -> bool {
    t.exposed >= MIN_EXPOSED
        && t.converted >= MIN_OUTCOMES
        && t.exposed - t.converted >= MIN_OUTCOMES
}

fn lift(against: &str, t: &Tally, base: &Tally) -> Lift {
    if !(enough(t) && enough(base)) {
        return Lift {
            against: against.to_string(),
            status: "not enough data",
            conversion: None,
            revenue_per_exposed: None,
        };
    }
    Lift {
        against: against.to_string(),
        status: "ok",
        conversion: two_proportions(t.converted, t.exposed, base.converted, base.exposed),
        revenue_per_exposed: welch(&t.revenue, &base.revenue),
    }
}

/// The report as a text table, for the terminal.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "report of rule `{}`", r.rule);
    if r.baseline_only {
        let _ = writeln!(
            out,
            "BASELINE from a backtest: no mail was sent then; conversions are what the \
             clients the rule would have reached did anyway"
        );
    }
    match &r.goal {
        Some(g) => {
            let min = g
                .min_total
                .map(|m| format!(", total at least {m}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "goal: `{}` within {} days{min}",
                g.event, g.within_days
            );
        }
        None => {
            let _ = writeln!(out, "goal: none declared (const GOAL): no conversions");
        }
    }
    let span = |t: Option<DateTime<Utc>>| t.map_or("-".to_string(), |t| t.to_rfc3339());
    let _ = writeln!(
        out,
        "exposed from {} until {}",
        span(r.since),
        span(r.until)
    );
    if r.experiments.is_empty() {
        let _ = writeln!(out, "\nno exposures");
    }
    for e in &r.experiments {
        let name = if e.experiment.is_empty() {
            "(no experiment: clients the rule mailed)".to_string()
        } else {
            format!("experiment `{}`", e.experiment)
        };
        let _ = writeln!(out, "\n{name}");
        let _ = writeln!(
            out,
            "  {:<16} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7} {:>12} {:>10}",
            "variant",
            "exposed",
            "mailed",
            "opened",
            "clicked",
            "converted",
            "rate",
            "revenue",
            "rev/exp"
        );
        for v in &e.variants {
            let name = if v.variant.is_empty() {
                "(mailed)"
            } else {
                &v.variant
            };
            let _ = writeln!(
                out,
                "  {:<16} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6.2}% {:>12.2} {:>10.2}",
                name,
                v.exposed,
                v.mailed,
                v.opened,
                v.clicked,
                v.converted,
                v.conversion_rate * 100.0,
                v.revenue,
                v.revenue_per_exposed
            );
        }
        for v in &e.variants {
            let Some(l) = &v.lift else { continue };
            let name = if v.variant.is_empty() {
                "(mailed)"
            } else {
                &v.variant
            };
            let _ = write!(out, "  {name} against {}: ", l.against);
            match &l.conversion {
                Some(c) => {
                    let _ = write!(
                        out,
                        "conversion {:+.2} points [{:+.2}, {:+.2}]",
                        c.absolute * 100.0,
                        c.absolute_ci[0] * 100.0,
                        c.absolute_ci[1] * 100.0
                    );
                    if let (Some(rel), Some(ci)) = (c.relative, c.relative_ci) {
                        let _ = write!(
                            out,
                            ", {:+.1}% [{:+.1}%, {:+.1}%]",
                            rel * 100.0,
                            ci[0] * 100.0,
                            ci[1] * 100.0
                        );
                    }
                    let _ = write!(out, ", p = {:.4}", c.p_value);
                    if let Some(rv) = &l.revenue_per_exposed {
                        let _ = write!(
                            out,
                            "; revenue per exposed {:+.2} [{:+.2}, {:+.2}], p = {:.4}",
                            rv.absolute, rv.absolute_ci[0], rv.absolute_ci[1], rv.p_value
                        );
                    }
                    let _ = writeln!(out);
                }
                None => {
                    let _ = writeln!(
                        out,
                        "{} (each group needs {} exposed, {} converted and {} not)",
                        l.status, r.min_exposed, r.min_outcomes, r.min_outcomes
                    );
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::experiments::Conversion;

    fn exposure(experiment: &str, variant: &str, converted: Option<f64>) -> Exposure {
        let at: DateTime<Utc> = "2026-11-01T10:00:00Z".parse().unwrap();
        let mut e = Exposure::new("welcome", experiment, variant, false, at, None);
        e.mails = u32::from(variant != CONTROL);
        e.converted = converted.map(|revenue| Conversion {
            at,
            revenue,
            event_id: "o".into(),
        });
        e
    }

    #[test]
    fn variants_are_summed_and_compared_with_the_control() {
        let mut b = ReportBuilder::default();
        for i in 0..1000 {
            let mail = exposure("t", "mail", (i % 10 == 0).then_some(50.0));
            let control = exposure("t", CONTROL, (i % 20 == 0).then_some(40.0));
            b.add(&mail);
            b.add(&control);
        }
        let mut held = exposure("t", "mail", None);
        held.held_out = true;
        b.add(&held);
        let r = b.finish("welcome", None);
        let e = &r.experiments[0];
        assert_eq!(e.baseline.as_deref(), Some(CONTROL));
        let names: Vec<&str> = e.variants.iter().map(|v| v.variant.as_str()).collect();
        assert_eq!(names, [CONTROL, GLOBAL_CONTROL, "mail"]);
        let mail = &e.variants[2];
        assert_eq!(
            (mail.exposed, mail.mailed, mail.converted),
            (1000, 1000, 100)
        );
        assert_eq!(mail.revenue, 5000.0);
        assert_eq!(mail.revenue_per_exposed, 5.0);
        let c = mail.lift.as_ref().unwrap().conversion.as_ref().unwrap();
        assert!((c.absolute - 0.05).abs() < 1e-12);
        assert!(c.p_value < 1e-4, "{c:?}");
        assert!(e.variants[0].lift.is_none(), "the baseline has no lift");
        assert_eq!(
            e.variants[1].lift.as_ref().unwrap().status,
            "not enough data",
            "one held-out client"
        );
        let text = render(&r);
        assert!(text.contains("experiment `t`"), "{text}");
        assert!(text.contains("mail against control"), "{text}");
    }

    #[test]
    fn a_rule_without_experiments_is_measured_against_the_global_control() {
        let mut b = ReportBuilder::default();
        b.add(&exposure("", "", Some(10.0)));
        let mut held = exposure("", "", None);
        held.held_out = true;
        b.add(&held);
        let r = b.finish("welcome", None);
        let e = &r.experiments[0];
        assert_eq!(e.baseline.as_deref(), Some(GLOBAL_CONTROL));
        assert_eq!(e.variants[0].variant, "");
        assert_eq!(e.variants[0].converted, 1);
    }
}
