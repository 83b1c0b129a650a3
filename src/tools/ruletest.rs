//! `nudge test`: rule tests written as YAML beside the rules. Each test
//! starts a virtual clock, feeds events (and timer advances, and sweeps) to the
//! same decision core the daemon uses, with clients and counters in memory,
//! and compares every effect the rules asked for with what the test expects.
//! No NATS, no SMTP, no database.

use crate::core::decide::{Core, CoreSettings, Decision};
use crate::core::rules::RuleEngine;
use crate::core::rules::loader::RuleSet;
use crate::core::templates::TemplateSet;
use crate::domain::counters::{Counters, MemorySource};
use crate::domain::effects::EffectKind;
use crate::domain::event::{ClientId, Envelope};
use crate::domain::history::ClientState;
use crate::domain::log::Level;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use super::offset::offset;
use super::ruletest_channels as channels;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    tests: Vec<TestCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestCase {
    name: String,
    /// Where the virtual clock starts; offsets like `+15m` count from here.
    now: DateTime<Utc>,
    /// Events applied first, whose effects are not checked.
    #[serde(default)]
    history: Vec<Step>,
    /// What happens in the test: events, `advance: +1h`, `sweep: RULE`.
    #[serde(default)]
    events: Vec<Step>,
    #[serde(default)]
    expect: Expect,
    /// Nothing at all may happen (the same as an empty `expect`).
    #[serde(default)]
    no_effects: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Step {
    Advance {
        advance: String,
    },
    Sweep {
        sweep: String,
        #[serde(default)]
        at: Option<String>,
    },
    Event(EventStep),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventStep {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(alias = "client_id")]
    client: String,
    /// `+15m`, `-2d` from the test's `now`, or an RFC 3339 time; default: the previous step's time.
    #[serde(default)]
    at: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    data: Map<String, Value>,
    #[serde(default)]
    context: Map<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    #[serde(default)]
    mails: Vec<MailExpect>,
    #[serde(default)]
    events: Vec<EmitExpect>,
    #[serde(default)]
    tasks: Vec<TaskExpect>,
    /// Scores on boards as the test leaves them (`rank()` makes no effect).
    #[serde(default)]
    boards: Vec<super::ruleboards::BoardExpect>,
    #[serde(default)]
    webhooks: Vec<channels::WebhookExpect>,
    #[serde(default)]
    texts: Vec<channels::TextExpect>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MailExpect {
    template: String,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    rule: Option<String>,
    #[serde(default)]
    subject_contains: Option<String>,
    #[serde(default)]
    text_contains: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmitExpect {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    client: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskExpect {
    team: String,
    #[serde(default)]
    title_contains: Option<String>,
    #[serde(default)]
    client: Option<String>,
}

/// One effect as a test sees it.
#[derive(Debug, Clone)]
enum Seen {
    Mail {
        rule: String,
        template: String,
        to: String,
        subject: String,
        text: String,
    },
    Emit {
        rule: String,
        event_type: String,
        client: String,
    },
    Task {
        rule: String,
        team: String,
        title: String,
        client: String,
    },
    /// A webhook or a text (`ruletest_channels`).
    Channel(channels::Seen),
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::Mail {
                rule,
                template,
                to,
                subject,
                ..
            } => write!(
                f,
                "mail {template} to {to} (rule {rule}), subject {subject:?}"
            ),
            Seen::Emit {
                rule,
                event_type,
                client,
            } => write!(f, "event {event_type} for {client} (rule {rule})"),
            Seen::Task {
                rule,
                team,
                title,
                client,
            } => write!(f, "task for {team} about {client} (rule {rule}): {title:?}"),
            Seen::Channel(c) => c.fmt(f),
        }
    }
}

/// The outcome of a run over some files.
#[derive(Debug, Default)]
pub struct Report {
    pub passed: usize,
    pub failed: usize,
    /// Human-readable lines, failures with their diffs.
    pub output: String,
}

/// The rules and templates under test.
pub struct Subject<'a> {
    pub engine: &'a RuleEngine,
    pub rules: &'a RuleSet,
    pub templates: &'a TemplateSet,
    pub settings: &'a CoreSettings,
    pub business_tz: Tz,
    /// Said under every failure: where the configuration came from, when
    /// that may be why (built-in defaults have no teams and no settings).
    pub config_note: Option<String>,
}

/// Test files under `paths` (files, or folders searched for `*.yaml`/`*.yml`).
pub fn collect_files(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)?
                .flatten()
                .map(|e| e.path())
                .filter(|f| matches!(f.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

pub fn run_files(subject: &Subject<'_>, files: &[PathBuf]) -> Report {
    let mut report = Report::default();
    for file in files {
        let parsed = std::fs::read_to_string(file)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_yaml::from_str::<TestFile>(&t).map_err(|e| e.to_string()));
        let tests = match parsed {
            Ok(f) => f.tests,
            Err(e) => {
                report.failed += 1;
                let _ = writeln!(report.output, "FAIL {}: cannot read: {e}", file.display());
                continue;
            }
        };
        for case in &tests {
            match run_case(subject, case) {
                Ok(()) => {
                    report.passed += 1;
                    let _ = writeln!(report.output, "ok   {} › {}", file.display(), case.name);
                }
                Err(lines) => {
                    report.failed += 1;
                    let _ = writeln!(report.output, "FAIL {} › {}", file.display(), case.name);
                    for l in lines {
                        let _ = writeln!(report.output, "     {l}");
                    }
                }
            }
        }
    }
    let _ = writeln!(
        report.output,
        "\n{} passed, {} failed",
        report.passed, report.failed
    );
    report
}

fn time_of(
    spec: &Option<String>,
    start: DateTime<Utc>,
    current: DateTime<Utc>,
) -> Result<DateTime<Utc>, String> {
    match spec {
        None => Ok(current),
        Some(s) if s.starts_with(['+', '-']) => Ok(start + offset(s)?),
        Some(s) => DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| format!("{s:?}: {e}")),
    }
}

fn run_case(subject: &Subject<'_>, case: &TestCase) -> Result<(), Vec<String>> {
    let core = Core {
        engine: subject.engine,
        rules: subject.rules,
        templates: subject.templates,
        settings: subject.settings,
    };
    let mut world = World {
        core,
        clients: BTreeMap::new(),
        counters: Counters::new(Box::new(MemorySource::default()), subject.business_tz),
        clock: case.now,
        start: case.now,
        next_id: 0,
    };
    let mut seen = Vec::new();
    let mut problems = Vec::new();
    // Why something asked for was not made (no such template or team, no
    // address, an emit refused): shown under a failure, so it explains itself.
    let mut why = Vec::new();
    let note = |l: &crate::domain::log::LogEntry, why: &mut Vec<String>| {
        if l.level == Level::Warning {
            let rule = l.rule.as_deref().unwrap_or("-");
            let line = format!("  why: rule {rule}, client {}: {}", l.client_id, l.message);
            if !why.contains(&line) {
                why.push(line);
            }
        }
    };
    for step in &case.history {
        let decisions = world
            .step(step)
            .map_err(|e| vec![format!("history: {e}")])?;
        for d in &decisions {
            for l in &d.log {
                note(l, &mut why);
            }
        }
    }
    for step in &case.events {
        let decisions = world.step(step).map_err(|e| vec![e])?;
        for d in decisions {
            for l in &d.log {
                note(l, &mut why);
            }
            for l in d.log.iter().filter(|l| l.level == Level::Error) {
                problems.push(format!("! {}", l.message));
            }
            for e in d.effects {
                seen.push(describe(
                    subject.templates,
                    &e.rule,
                    e.client_id.as_str(),
                    e.kind,
                ));
            }
        }
    }
    if case.no_effects
        && !(case.expect.mails.is_empty()
            && case.expect.events.is_empty()
            && case.expect.tasks.is_empty()
            && case.expect.webhooks.is_empty()
            && case.expect.texts.is_empty())
    {
        return Err(vec![
            "a test cannot both expect effects and say no_effects".into(),
        ]);
    }
    problems.extend(compare(&case.expect, seen));
    problems.extend(super::ruleboards::compare(
        &case.expect.boards,
        &world.counters,
    ));
    if problems.is_empty() {
        Ok(())
    } else {
        problems.extend(why);
        if let Some(n) = &subject.config_note {
            problems.push(format!("  note: {n}"));
        }
        Err(problems)
    }
}

struct World<'a> {
    core: Core<'a>,
    clients: BTreeMap<String, ClientState>,
    counters: Counters,
    clock: DateTime<Utc>,
    start: DateTime<Utc>,
    next_id: usize,
}

impl World<'_> {
    fn step(&mut self, step: &Step) -> Result<Vec<Decision>, String> {
        match step {
            Step::Event(e) => {
                let at = time_of(&e.at, self.start, self.clock)?;
                self.clock = self.clock.max(at);
                self.next_id += 1;
                let mut v = serde_json::json!({
                    "id": e.id.clone().unwrap_or_else(|| format!("test-{}", self.next_id)),
                    "type": e.event_type,
                    "client_id": e.client,
                    "occurred_at": at.to_rfc3339(),
                    "data": e.data,
                });
                if !e.context.is_empty() {
                    v["context"] = Value::Object(e.context.clone());
                }
                let env = Envelope::from_value(v)
                    .map_err(|r| format!("event {} for {}: {r}", e.event_type, e.client))?;
                let state = self.state(&e.client)?;
                let mut state = state;
                let d = self.core.on_event(&mut state, &env, &mut self.counters);
                self.clients.insert(e.client.clone(), state);
                Ok(vec![d])
            }
            Step::Advance { advance } => {
                let until = self.start + offset(advance)?;
                self.clock = self.clock.max(until);
                let mut out = Vec::new();
                for state in self.clients.values_mut() {
                    out.push(self.core.advance(state, until, &mut self.counters));
                }
                Ok(out)
            }
            Step::Sweep { sweep, at } => {
                let slot = time_of(at, self.start, self.clock)?;
                self.clock = self.clock.max(slot);
                let rule = self
                    .core
                    .rules
                    .get(sweep)
                    .ok_or_else(|| format!("sweep: no rule named {sweep:?}"))?;
                let mut out = Vec::new();
                for state in self.clients.values_mut() {
                    out.push(self.core.sweep(state, rule, slot, &mut self.counters));
                }
                Ok(out)
            }
        }
    }

    fn state(&mut self, client: &str) -> Result<ClientState, String> {
        match self.clients.remove(client) {
            Some(s) => Ok(s),
            None => Ok(ClientState::new(
                ClientId::parse(client).map_err(|e| e.to_string())?,
            )),
        }
    }
}

fn describe(templates: &TemplateSet, rule: &str, client: &str, kind: EffectKind) -> Seen {
    match kind {
        EffectKind::Mail { template, to, vars } => {
            let (subject, text) = match templates.render(&template, &vars) {
                Ok(r) => (r.subject, r.text),
                Err(e) => (format!("<render failed: {e}>"), String::new()),
            };
            Seen::Mail {
                rule: rule.into(),
                template,
                to,
                subject,
                text,
            }
        }
        EffectKind::Emit { event_type, .. } => Seen::Emit {
            rule: rule.into(),
            event_type,
            client: client.into(),
        },
        EffectKind::Task { team, title, .. } => Seen::Task {
            rule: rule.into(),
            team,
            title,
            client: client.into(),
        },
        other => match channels::describe(templates, rule, client, other) {
            Some(c) => Seen::Channel(c),
            None => unreachable!("every other kind is described above"),
        },
    }
}

fn matches_mail(want: &MailExpect, got: &Seen) -> bool {
    let Seen::Mail {
        rule,
        template,
        to,
        subject,
        text,
    } = got
    else {
        return false;
    };
    want.template == *template
        && want.to.as_ref().is_none_or(|t| t == to)
        && want.rule.as_ref().is_none_or(|r| r == rule)
        && want
            .subject_contains
            .as_ref()
            .is_none_or(|s| subject.contains(s.as_str()))
        && want
            .text_contains
            .as_ref()
            .is_none_or(|s| text.contains(s.as_str()))
}

fn matches_emit(want: &EmitExpect, got: &Seen) -> bool {
    let Seen::Emit {
        event_type, client, ..
    } = got
    else {
        return false;
    };
    want.event_type == *event_type && want.client.as_ref().is_none_or(|c| c == client)
}

fn matches_task(want: &TaskExpect, got: &Seen) -> bool {
    let Seen::Task {
        team,
        title,
        client,
        ..
    } = got
    else {
        return false;
    };
    want.team == *team
        && want
            .title_contains
            .as_ref()
            .is_none_or(|s| title.contains(s.as_str()))
        && want.client.as_ref().is_none_or(|c| c == client)
}

/// Every expectation must meet one effect, and every effect one expectation.
fn compare(expect: &Expect, mut seen: Vec<Seen>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut take = |pred: &dyn Fn(&Seen) -> bool, label: String| match seen.iter().position(pred) {
        Some(i) => {
            seen.remove(i);
        }
        None => problems.push(format!("- expected {label}")),
    };
    for m in &expect.mails {
        let mut label = format!("mail {}", m.template);
        if let Some(t) = &m.to {
            let _ = write!(label, " to {t}");
        }
        if let Some(s) = &m.subject_contains {
            let _ = write!(label, ", subject containing {s:?}");
        }
        if let Some(s) = &m.text_contains {
            let _ = write!(label, ", text containing {s:?}");
        }
        take(&|g| matches_mail(m, g), label);
    }
    for e in &expect.events {
        take(&|g| matches_emit(e, g), format!("event {}", e.event_type));
    }
    for t in &expect.tasks {
        let mut label = format!("task for {}", t.team);
        if let Some(s) = &t.title_contains {
            let _ = write!(label, ", title containing {s:?}");
        }
        take(&|g| matches_task(t, g), label);
    }
    let channel = |g: &Seen| match g {
        Seen::Channel(c) => Some(c.clone()),
        _ => None,
    };
    for w in &expect.webhooks {
        take(&|g| channel(g).is_some_and(|c| w.matches(&c)), w.label());
    }
    for t in &expect.texts {
        take(&|g| channel(g).is_some_and(|c| t.matches(&c)), t.label());
    }
    for s in seen {
        problems.push(format!("+ got {s}"));
    }
    problems
}

/// The default place of rule tests: `<rules.dir>/tests`.
pub fn default_dir(rules_dir: &Path) -> PathBuf {
    rules_dir.join("tests")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn offsets() {
        assert_eq!(offset("+15m").unwrap(), Duration::minutes(15));
        assert_eq!(offset("-2d").unwrap(), Duration::days(-2));
        assert_eq!(offset("90s").unwrap(), Duration::seconds(90));
        assert_eq!(offset("+1d29m").unwrap(), Duration::minutes(24 * 60 + 29));
        assert!(offset("soon").is_err());
        assert!(offset("15").is_err());
        assert!(offset("+3w").is_err());
    }
}
