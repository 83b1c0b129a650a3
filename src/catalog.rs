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
        }
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
