//! Marketers' and operators' tools over the stored history: template
//! previews, replay of the derived history, backtests of rules, and the
//! analytics export.

pub mod check;
pub mod export;
mod offset;
pub mod replay;
pub mod report;
mod ruleboards;
pub mod ruletest;
mod ruletest_channels;

use crate::config::Config;
use crate::core::decide::{Core, CoreSettings, client_view, mail_defaults};
use crate::core::rules::RuleEngine;
use crate::core::rules::loader::RuleLoader;
use crate::core::templates::{Rendered, TemplateSet};
use crate::domain::effects::EffectKind;
use crate::domain::event::ClientId;
use crate::flow::catalog::Catalog;
use crate::store::{AnyStore, History, State};
use crate::tools::replay::{Progress, Replay, walk};
use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// The variables a mail to this client would get by default, plus the
/// whole client as `client`.
pub async fn client_vars(store: &AnyStore, client: &str) -> anyhow::Result<Map<String, Value>> {
    let id = ClientId::parse(client).map_err(|e| anyhow::anyhow!("client id: {e}"))?;
    let states = store.load_clients(&[&id]).await?;
    let Some(state) = states.get(&id) else {
        bail!("no client {client:?} in the database");
    };
    let mut vars = mail_defaults(state);
    vars.insert("client".into(), client_view(state));
    Ok(vars)
}

/// Renders a template with the given variables.
pub fn preview(
    templates: &TemplateSet,
    name: &str,
    vars: &Map<String, Value>,
) -> anyhow::Result<Rendered> {
    Ok(templates.render(name, vars)?)
}

/// Reads variables for a preview from a YAML or JSON file (a map).
pub fn vars_file(path: &Path) -> anyhow::Result<Map<String, Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not YAML or JSON", path.display()))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => bail!("{} must hold a map of variables", path.display()),
    }
}

/// Rebuilds clients, sessions, timers and counters from the event log with
/// the rules in force, effects suppressed, and swaps them in at once.
pub async fn replay(
    config: &Config,
    store: &AnyStore,
    on_progress: impl FnMut(Progress),
) -> anyhow::Result<Progress> {
    let catalog = Catalog::load(config);
    let errors = catalog.errors();
    if !errors.is_empty() {
        let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        bail!(
            "rules or templates are refused; fix them before replaying:\n{}",
            list.join("\n")
        );
    }
    let rules = catalog.rules();
    let templates = catalog.templates();
    let settings = CoreSettings::from_config(config);
    let core = Core {
        engine: &catalog.engine,
        rules: &rules,
        templates: &templates,
        settings: &settings,
    };
    let mut replay = Replay::new(core, config.history.business_tz());
    let progress = walk(store, &mut replay, None, |_, _| {}, on_progress).await?;
    store.replace_derived(&replay.into_derived()).await?;
    Ok(progress)
}

/// One effect a backtest found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct FoundEffect {
    /// The effect's key, as the daemon's outbox has it for the same decision.
    pub key: String,
    /// What caused it: the event id, or a timer or sweep.
    pub cause: String,
    pub rule: String,
    pub kind: String,
    /// The template (mails), event type (emits) or team (tasks).
    pub template: String,
    pub client_id: String,
    pub at: DateTime<Utc>,
}

/// Per rule: counts of mails by template, events and tasks.
#[derive(Debug, Default, Serialize)]
pub struct RuleSummary {
    pub mails: BTreeMap<String, u64>,
    pub events: BTreeMap<String, u64>,
    pub tasks: BTreeMap<String, u64>,
    /// Webhooks by name and texts by template.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub webhooks: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub texts: BTreeMap<String, u64>,
    pub errors: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Backtest {
    pub events: u64,
    pub sweeps: u64,
    pub rules: BTreeMap<String, RuleSummary>,
    pub effects: Vec<FoundEffect>,
    /// Per rule, what its exposures would have been and how many of those
    /// clients converted anyway (a baseline: nothing was sent then).
    pub reports: BTreeMap<String, crate::core::report::Report>,
}

/// Runs the rules in `rules_dir` over the stored history in stream order,
/// in memory: reports what they would have done between `since` and `until`.
pub async fn backtest(
    config: &Config,
    store: &AnyStore,
    rules_dir: &Path,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> anyhow::Result<Backtest> {
    let engine = Arc::new(RuleEngine::new(&config.rules));
    let rules = RuleLoader::new(engine.clone(), rules_dir.to_path_buf()).load();
    if !rules.errors.is_empty() {
        let list: Vec<String> = rules.errors.iter().map(|e| e.to_string()).collect();
        bail!("refused:\n{}", list.join("\n"));
    }
    let catalog = Catalog::load(config);
    let templates = catalog.templates();
    let settings = CoreSettings::from_config(config);
    let core = Core {
        engine: &engine,
        rules: &rules,
        templates: &templates,
        settings: &settings,
    };
    let mut replay = Replay::new(core, config.history.business_tz());
    let mut report = Backtest::default();
    let mut exposures = report::Collected::default();
    let in_window = |t: DateTime<Utc>| since.is_none_or(|s| t >= s);
    let progress = walk(
        store,
        &mut replay,
        until,
        |_, d| {
            for (rule, ok) in &d.runs {
                if !ok {
                    report.rules.entry(rule.clone()).or_default().errors += 1;
                }
            }
            exposures.add(d.exposures);
            for e in d.effects {
                if !in_window(e.at) {
                    continue;
                }
                let summary = report.rules.entry(e.rule.clone()).or_default();
                let (kind, name) = match &e.kind {
                    EffectKind::Mail { template, .. } => {
                        *summary.mails.entry(template.clone()).or_default() += 1;
                        ("mail", template.clone())
                    }
                    EffectKind::Emit { event_type, .. } => {
                        *summary.events.entry(event_type.clone()).or_default() += 1;
                        ("emit", event_type.clone())
                    }
                    EffectKind::Task { team, .. } => {
                        *summary.tasks.entry(team.clone()).or_default() += 1;
                        ("task", team.clone())
                    }
                    EffectKind::Webhook { name, .. } => {
                        *summary.webhooks.entry(name.clone()).or_default() += 1;
                        ("webhook", name.clone())
                    }
                    EffectKind::Sms { template, .. } => {
                        *summary.texts.entry(template.clone()).or_default() += 1;
                        ("sms", template.clone())
                    }
                };
                report.effects.push(FoundEffect {
                    key: e.key,
                    cause: e.cause,
                    rule: e.rule,
                    kind: kind.to_string(),
                    template: name,
                    client_id: e.client_id.to_string(),
                    at: e.at,
                });
            }
        },
        |_| {},
    )
    .await?;
    report.events = progress.events;
    report.sweeps = progress.sweeps;
    report.reports = exposures.reports(|r| rules.get(r).and_then(|r| r.goal.clone()), since, until);
    Ok(report)
}

/// Where a replay from the stream starts.
#[derive(Debug, Clone, Copy)]
pub enum StreamStart {
    All,
    Sequence(u64),
    Time(DateTime<Utc>),
}

/// Re-reads the JetStream stream into the configured (fresh) database with
/// the rules in force, effects suppressed: for a database lost or started
/// anew while the stream still holds the history. Returns the messages read.
pub async fn replay_from_stream(
    config: &Config,
    store: &AnyStore,
    start: StreamStart,
    mut on_progress: impl FnMut(u64, u64),
) -> anyhow::Result<u64> {
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
    use futures::StreamExt;
    let catalog = Arc::new(Catalog::load(config));
    let pipeline = crate::flow::pipeline::Pipeline::new(
        store.clone(),
        catalog,
        Arc::new(crate::metrics::Metrics::default()),
        config,
    )
    .suppressing_effects();
    let client = async_nats::connect(config.nats.servers().as_slice())
        .await
        .with_context(|| format!("cannot connect to nats.url {}", config.nats.url))?;
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(&config.nats.stream)
        .await
        .with_context(|| format!("no stream {}", config.nats.stream))?;
    let deliver_policy = match start {
        StreamStart::All => DeliverPolicy::All,
        StreamStart::Sequence(s) => DeliverPolicy::ByStartSequence { start_sequence: s },
        StreamStart::Time(t) => DeliverPolicy::ByStartTime { start_time: t },
    };
    // An ephemeral consumer of our own: the daemons' durable one is untouched.
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy,
            ack_policy: AckPolicy::None,
            inactive_threshold: std::time::Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .context("cannot create a replay consumer")?;
    let mut read = 0u64;
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(config.nats.batch_size.get())
            .expires(std::time::Duration::from_secs(1))
            .messages()
            .await
            .context("cannot read the stream")?;
        let mut incoming = Vec::new();
        let mut pending = 0;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| anyhow::anyhow!("reading the stream: {e}"))?;
            let info = m.info().ok();
            pending = info.as_ref().map_or(0, |i| i.pending);
            incoming.push(crate::flow::pipeline::Incoming {
                subject: m.subject.to_string(),
                payload: m.payload.clone(),
                stream_seq: info.as_ref().map(|i| i.stream_sequence),
                published: info.map(|i| i.published),
            });
        }
        if incoming.is_empty() {
            break;
        }
        pipeline.process(&incoming).await?;
        read += incoming.len() as u64;
        on_progress(read, pending);
        if pending == 0 {
            break;
        }
    }
    Ok(read)
}

/// One mail a rule preview would send.
#[derive(Debug, Serialize)]
pub struct PreviewMail {
    pub template: String,
    pub to: String,
    /// Every variable the mail is rendered with: the standard ones, the
    /// rule's, the front-matter defaults under them, and `unsubscribe_url`.
    pub vars: Map<String, Value>,
    pub rendered: Rendered,
}

/// What one rule would do for one client at one time.
#[derive(Debug, Serialize)]
pub struct RulePreview {
    pub rule: String,
    pub client_id: String,
    pub at: DateTime<Utc>,
    pub mails: Vec<PreviewMail>,
    /// Emits and tasks, described.
    pub other: Vec<String>,
    /// The process-log lines of the run (why a mail was skipped, ...).
    pub log: Vec<String>,
}

/// Shared counters read from the store as the rule uses them; what the run
/// adds stays in memory. Runs on a blocking thread.
struct ReadOnlyCounters {
    store: AnyStore,
    runtime: tokio::runtime::Handle,
}

impl crate::domain::counters::CounterSource for ReadOnlyCounters {
    fn load(
        &mut self,
        key: &crate::domain::counters::CounterKey,
    ) -> Result<crate::domain::counters::Stored, String> {
        self.runtime
            .block_on(self.store.load_counter(key))
            .map_err(|e| e.to_string())
    }
    fn is_member(
        &mut self,
        key: &crate::domain::counters::CounterKey,
        member: &str,
    ) -> Result<bool, String> {
        self.runtime
            .block_on(self.store.is_member(key, member))
            .map_err(|e| e.to_string())
    }
    fn list(&mut self, name: &str) -> Result<Vec<(String, f64)>, String> {
        use crate::store::Products;
        self.runtime
            .block_on(self.store.counter_family(name))
            .map_err(|e| e.to_string())
    }
}

/// Runs `rule` for the client's stored history at `at`, as a sweep of it
/// would (`event.type == "sweep"`), with the decision core on a copy of the
/// client and shared counters read from the store: nothing is queued or
/// written. Each mail is rendered with every variable the rule computed and
/// the client's real signed unsubscribe link.
pub async fn preview_rule(
    config: &Config,
    store: &AnyStore,
    rule: &str,
    client: &str,
    at: DateTime<Utc>,
) -> anyhow::Result<RulePreview> {
    let id = ClientId::parse(client).map_err(|e| anyhow::anyhow!("client id: {e}"))?;
    let states = store.load_clients(&[&id]).await?;
    let Some(mut state) = states.get(&id).cloned() else {
        bail!("no client {client:?} in the database");
    };
    let signer = crate::delivery::unsubscribe::Signer::load(
        config
            .mail
            .unsubscribe_secret
            .as_ref()
            .map(crate::config::Secret::expose),
        store,
    )
    .await?;
    let unsubscribe = signer.url(&config.http.public_url, &id);
    let catalog = Catalog::load(config);
    let rules = catalog.rules();
    let templates = catalog.templates();
    let Some(found) = rules.get(rule).cloned() else {
        bail!("no rule {rule:?} in {}", config.rules.dir.display());
    };
    let settings = CoreSettings::from_config(config);
    let tz = config.history.business_tz();
    let source = ReadOnlyCounters {
        store: store.clone(),
        runtime: tokio::runtime::Handle::current(),
    };
    let engine = catalog.engine.clone();
    let templates2 = templates.clone();
    let decision = tokio::task::spawn_blocking(move || {
        let core = Core {
            engine: &engine,
            rules: &rules,
            templates: &templates2,
            settings: &settings,
        };
        let mut counters = crate::domain::counters::Counters::new(Box::new(source), tz);
        core.sweep(&mut state, &found, at, &mut counters)
    })
    .await?;
    let mut preview = RulePreview {
        rule: rule.to_string(),
        client_id: client.to_string(),
        at,
        mails: Vec::new(),
        other: Vec::new(),
        log: decision
            .log
            .iter()
            .filter(|l| l.rule.as_deref() == Some(rule))
            .map(|l| l.message.clone())
            .collect(),
    };
    for e in decision.effects.into_iter().filter(|e| e.rule == rule) {
        match e.kind {
            EffectKind::Mail { template, to, vars } => {
                let mut all = templates.defaults(&template).cloned().unwrap_or_default();
                all.extend(vars);
                all.insert("unsubscribe_url".into(), Value::String(unsubscribe.clone()));
                let rendered = templates.render(&template, &all)?;
                preview.mails.push(PreviewMail {
                    template,
                    to,
                    vars: all,
                    rendered,
                });
            }
            EffectKind::Emit { event_type, .. } => {
                preview.other.push(format!("event `{event_type}` emitted"))
            }
            EffectKind::Task { team, title, .. } => {
                preview.other.push(format!("task for {team}: {title}"))
            }
            EffectKind::Webhook {
                name, event_type, ..
            } => preview
                .other
                .push(format!("webhook `{name}` ({event_type})")),
            EffectKind::Sms { template, to, vars } => {
                let text = templates
                    .texts
                    .render(&template, &vars)
                    .unwrap_or_else(|e| format!("<render failed: {e}>"));
                preview
                    .other
                    .push(format!("text `{template}` to {to}: {text}"))
            }
        }
    }
    Ok(preview)
}

/// The variables of a template-only preview: the template's front-matter
/// defaults under the given ones.
pub fn with_defaults(
    templates: &TemplateSet,
    name: &str,
    vars: Map<String, Value>,
) -> Map<String, Value> {
    let mut all = templates.defaults(name).cloned().unwrap_or_default();
    all.extend(vars);
    all
}
