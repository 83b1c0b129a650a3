//! The rules and templates in force, and their hot reload. A reload builds
//! the new sets completely and swaps each in one step, so an event is always
//! decided by one consistent version. Changes are found by polling the
//! folders' file listing (names, sizes, modification times): one mechanism
//! that works on every filesystem, container volumes included, and costs a
//! few `stat` calls per poll.

use crate::config::Config;
use crate::rules::loader::{RuleLoader, RuleSet};
use crate::rules::{CompileError, RuleEngine};
use crate::templates::{TemplateLoader, TemplateSet};
use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

pub struct Catalog {
    pub engine: Arc<RuleEngine>,
    rules: ArcSwap<RuleSet>,
    templates: ArcSwap<TemplateSet>,
    loaders: Mutex<Loaders>,
    health: Mutex<Health>,
    /// Consecutive failures that take a rule out of service (0: never).
    quarantine_after: u32,
}

/// How the rules have been doing, and which are out of service.
#[derive(Default)]
struct Health {
    consecutive_failures: std::collections::HashMap<String, u32>,
    quarantined: std::collections::BTreeMap<String, Quarantined>,
}

/// A rule taken out of service until its file changes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Quarantined {
    pub rule: String,
    pub reason: String,
    pub since: chrono::DateTime<chrono::Utc>,
    /// The file as it was: saving a new version lifts the quarantine.
    #[serde(skip)]
    stamp: Option<(u64, Option<SystemTime>)>,
}

fn stamp(path: &Path) -> Option<(u64, Option<SystemTime>)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.len(), m.modified().ok()))
}

struct Loaders {
    rules: RuleLoader,
    templates: TemplateLoader,
    fingerprint: Vec<(PathBuf, u64, Option<SystemTime>)>,
}

impl Catalog {
    /// Loads both folders once. Errors are in `errors()`; what compiled is in force.
    pub fn load(config: &Config) -> Self {
        let engine = Arc::new(RuleEngine::new(&config.rules));
        let mut rules = RuleLoader::new(engine.clone(), config.rules.dir.clone());
        let mut templates = TemplateLoader::new(config.templates.dir.clone());
        let fingerprint = fingerprint(&[rules.dir(), templates.dir()]);
        let rule_set = rules.load();
        let template_set = templates.load();
        for e in rule_set.errors.iter().chain(&template_set.errors) {
            tracing::error!("refused: {e}");
        }
        Self {
            engine,
            rules: ArcSwap::from_pointee(rule_set),
            templates: ArcSwap::from_pointee(template_set),
            loaders: Mutex::new(Loaders {
                rules,
                templates,
                fingerprint,
            }),
            health: Mutex::new(Health::default()),
            quarantine_after: config.rules.quarantine_after,
        }
    }

    /// Counts rule runs; a rule failing `rules.quarantine_after` times in a
    /// row is taken out of service (until its file is saved again), so one
    /// broken rule cannot flood the logs while the others go on.
    pub fn record_runs(&self, runs: &[(String, bool)]) {
        if self.quarantine_after == 0 || runs.is_empty() {
            return;
        }
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let mut newly = Vec::new();
        for (rule, ok) in runs {
            let n = h.consecutive_failures.entry(rule.clone()).or_default();
            *n = if *ok { 0 } else { *n + 1 };
            if *n >= self.quarantine_after && !h.quarantined.contains_key(rule) {
                newly.push(rule.clone());
            }
        }
        if newly.is_empty() {
            return;
        }
        let set = self.rules();
        for rule in &newly {
            let path = set.get(rule).map(|r| r.path.clone());
            let reason = format!(
                "failed {} times in a row; fix and save the file to bring it back",
                self.quarantine_after
            );
            tracing::error!(rule, "rule quarantined: {reason}");
            h.quarantined.insert(
                rule.clone(),
                Quarantined {
                    rule: rule.clone(),
                    reason,
                    since: chrono::Utc::now(),
                    stamp: path.as_deref().and_then(stamp),
                },
            );
            h.consecutive_failures.remove(rule);
        }
        self.rules.store(Arc::new(without(&set, &h.quarantined)));
    }

    /// Rules out of service, with why.
    pub fn quarantined(&self) -> Vec<Quarantined> {
        let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.quarantined.values().cloned().collect()
    }

    pub fn rules(&self) -> Arc<RuleSet> {
        self.rules.load_full()
    }

    pub fn templates(&self) -> Arc<TemplateSet> {
        self.templates.load_full()
    }

    /// Everything refused at the last load: `file:line: message`.
    pub fn errors(&self) -> Vec<CompileError> {
        let mut all = self.rules.load().errors.clone();
        all.extend(self.templates.load().errors.iter().cloned());
        all
    }

    /// Reloads when a file changed since the last look. Returns whether it did.
    pub fn reload_if_changed(&self) -> bool {
        let mut l = self.loaders.lock().unwrap_or_else(|p| p.into_inner());
        let now = fingerprint(&[l.rules.dir(), l.templates.dir()]);
        if now == l.fingerprint {
            return false;
        }
        l.fingerprint = now;
        let rule_set = l.rules.load();
        let template_set = l.templates.load();
        for e in rule_set.errors.iter().chain(&template_set.errors) {
            tracing::error!("refused, keeping the last good version: {e}");
        }
        tracing::info!(
            rules = rule_set.rules.len(),
            templates = template_set.names().count(),
            "rules and templates reloaded"
        );
        // A quarantined rule stays out while its file is as it was.
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.quarantined.retain(|name, q| {
            let path = rule_set.get(name).map(|r| r.path.clone());
            let same = path.as_deref().and_then(stamp) == q.stamp && q.stamp.is_some();
            if !same {
                tracing::info!(rule = name, "quarantine lifted: the rule's file changed");
            }
            same
        });
        let rule_set = without(&rule_set, &h.quarantined);
        drop(h);
        self.rules.store(Arc::new(rule_set));
        self.templates.store(Arc::new(template_set));
        true
    }

    /// Polls for changes until cancelled.
    pub async fn watch(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {
                    let this = self.clone();
                    // Compiling is CPU work; keep it off the async workers.
                    let _ = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
                }
            }
        }
    }
}

fn without(set: &RuleSet, out: &std::collections::BTreeMap<String, Quarantined>) -> RuleSet {
    RuleSet {
        rules: set
            .rules
            .iter()
            .filter(|r| !out.contains_key(&r.name))
            .cloned()
            .collect(),
        errors: set.errors.clone(),
        reads: Default::default(),
    }
}

fn fingerprint(dirs: &[&Path]) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            out.push((dir.to_path_buf(), u64::MAX, None));
            continue;
        };
        for entry in entries.flatten() {
            // Follow links: mounted config volumes swap files behind symlinks.
            if let Ok(meta) = std::fs::metadata(entry.path()) {
                out.push((entry.path(), meta.len(), meta.modified().ok()));
            }
        }
    }
    out.sort();
    out
}
