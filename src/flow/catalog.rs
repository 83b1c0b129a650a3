//! The rules and templates in force, and their hot reload. A reload builds
//! the new sets completely and swaps each in one step, so an event is always
//! decided by one consistent version. Changes are found by polling the
//! folders' file listing (names, sizes, modification times): one mechanism
//! that works on every filesystem, container volumes included, and costs a
//! few `stat` calls per poll.

use crate::config::Config;
use crate::core::rules::loader::{RuleLoader, RuleSet};
use crate::core::rules::{CompileError, RuleEngine};
use crate::core::templates::{TemplateLoader, TemplateSet};
use crate::domain::event::ClientId;
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
    /// Distinct failing clients that take a rule out of service (0: never).
    quarantine_after: u32,
    /// The last runs of a rule the quarantine looks at.
    quarantine_window: usize,
}

/// The share of a full window's runs that must have failed for a quarantine.
const QUARANTINE_FAILURE_SHARE: f64 = 0.9;

/// How the rules have been doing, and which are out of service.
#[derive(Default)]
struct Health {
    /// Each rule's last runs in the order they were decided (the stream's):
    /// the client a run failed for, `None` for a run that succeeded.
    recent: std::collections::HashMap<String, std::collections::VecDeque<Option<ClientId>>>,
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

/// How long the rule and template folders must stay unchanged before a
/// change is loaded: far longer than a save takes, far shorter than the
/// poll (`rules.reload_poll_ms`).
const SETTLE: Duration = Duration::from_millis(50);

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
            quarantine_window: config.rules.quarantine_window.get() as usize,
        }
    }

    /// Counts rule runs, in the order they were decided, with the client
    /// each was for. A rule is taken out of service (until its file is saved
    /// again) when it is broken for many clients: its last
    /// `rules.quarantine_window` runs are nearly all failures
    /// ([`QUARANTINE_FAILURE_SHARE`]) over at least `rules.quarantine_after`
    /// distinct clients. A rule that fails on one client's odd data, however
    /// often, or on a few clients' among others it serves, stays in service:
    /// that is those clients' problem, logged for them.
    pub fn record_runs(&self, runs: &[(String, bool, ClientId)]) {
        if self.quarantine_after == 0 || runs.is_empty() {
            return;
        }
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let mut newly = Vec::new();
        for (rule, ok, client) in runs {
            let recent = h.recent.entry(rule.clone()).or_default();
            recent.push_back((!ok).then(|| client.clone()));
            if recent.len() > self.quarantine_window {
                recent.pop_front();
            }
            if *ok || recent.len() < self.quarantine_window {
                continue;
            }
            let failed: Vec<&ClientId> = recent.iter().flatten().collect();
            let share = failed.len() as f64 / recent.len() as f64;
            if share < QUARANTINE_FAILURE_SHARE {
                continue;
            }
            let distinct: std::collections::HashSet<&ClientId> = failed.into_iter().collect();
            if distinct.len() >= self.quarantine_after as usize
                && !h.quarantined.contains_key(rule)
                && !newly.contains(rule)
            {
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
                "broken for many clients: at least {:.0} % of its last {} runs failed, for {} or \
                 more distinct clients; fix and save the file to bring it back",
                QUARANTINE_FAILURE_SHARE * 100.0,
                self.quarantine_window,
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
            h.recent.remove(rule);
        }
        self.rules.store(Arc::new(without(&set, &h.quarantined)));
    }

    /// When a rule is taken out of service, for `/api/rules`.
    pub fn quarantine_criterion(&self) -> serde_json::Value {
        serde_json::json!({
            "distinct_clients": self.quarantine_after,
            "window_runs": self.quarantine_window,
            "failure_share": QUARANTINE_FAILURE_SHARE,
            "rule": "a rule is quarantined when at least failure_share of its last window_runs \
                     runs (in stream order) failed, for at least distinct_clients distinct \
                     clients; saving its file brings it back",
        })
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
    ///
    /// Only files at rest are taken: a save seen half written (an editor's
    /// truncate-then-write, a copy in progress) would be refused for what
    /// it is not, or worse, compile to something else. So the folders must
    /// look the same after a short pause, and again after loading; else the
    /// next look tries again.
    pub fn reload_if_changed(&self) -> bool {
        let mut l = self.loaders.lock().unwrap_or_else(|p| p.into_inner());
        let dirs = |l: &Loaders| fingerprint(&[l.rules.dir(), l.templates.dir()]);
        let now = dirs(&l);
        if now == l.fingerprint {
            return false;
        }
        std::thread::sleep(SETTLE);
        if dirs(&l) != now {
            return false;
        }
        let rule_set = l.rules.load();
        let template_set = l.templates.load();
        if dirs(&l) != now {
            return false;
        }
        l.fingerprint = now;
        for e in rule_set.errors.iter().chain(&template_set.errors) {
            tracing::error!("refused, keeping the last good version: {e}");
        }
        tracing::info!(
            rules = rule_set.rules.len(),
            templates = template_set.names().count(),
            "rules and templates reloaded"
        );
        // A quarantined rule stays out while its file is as it was; the
        // others start counting anew, since a saved file may be a fix.
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.recent.clear();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(dir: &Path) -> Catalog {
        let rules = dir.join("rules");
        std::fs::create_dir_all(&rules).unwrap();
        std::fs::create_dir_all(dir.join("templates")).unwrap();
        std::fs::write(rules.join("r.rhai"), "const ON = [\"x\"];\n").unwrap();
        let mut config = Config::default();
        config.rules.dir = rules;
        config.templates.dir = dir.join("templates");
        Catalog::load(&config)
    }

    fn run(ok: bool, client: &str) -> (String, bool, ClientId) {
        ("r".to_string(), ok, ClientId::parse(client).unwrap())
    }

    #[test]
    fn one_clients_odd_data_or_a_burst_among_good_runs_never_quarantines_a_rule() {
        let dir = tempfile::tempdir().unwrap();
        let c = catalog(dir.path());
        // One client failing again and again: that client's problem.
        c.record_runs(&vec![run(false, "odd"); 500]);
        assert!(c.quarantined().is_empty());
        // Twenty odd clients in a row, among clients the rule serves.
        let mut runs: Vec<_> = (0..40).map(|i| run(true, &format!("g{i}"))).collect();
        runs.extend((0..20).map(|i| run(false, &format!("bad{i}"))));
        runs.extend((0..40).map(|i| run(true, &format!("h{i}"))));
        runs.extend((0..20).map(|i| run(false, &format!("worse{i}"))));
        c.record_runs(&runs);
        assert!(c.quarantined().is_empty(), "{:?}", c.quarantined());
        assert!(c.rules().get("r").is_some());
    }

    #[test]
    fn a_rule_broken_for_many_clients_is_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let c = catalog(dir.path());
        let window = Config::default().rules.quarantine_window.get() as usize;
        let runs: Vec<_> = (0..window - 1)
            .map(|i| run(false, &format!("c{i}")))
            .collect();
        c.record_runs(&runs);
        assert!(c.quarantined().is_empty(), "the window is not full yet");
        c.record_runs(&[run(false, "last")]);
        let q = c.quarantined();
        assert_eq!(q.len(), 1);
        assert!(q[0].reason.contains("distinct clients"), "{}", q[0].reason);
        assert!(c.rules().get("r").is_none(), "out of service");
    }
}
