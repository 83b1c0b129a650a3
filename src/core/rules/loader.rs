//! Loading `rules/*.rhai`, keeping each file's last good version when a new
//! one fails to compile.

use super::{CompileError, Reads, Rule, RuleEngine};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The rules in force, swapped as a whole on reload.
#[derive(Debug, Default, Clone)]
pub struct RuleSet {
    /// Sorted by name, so rules run in a stable order.
    pub rules: Vec<Rule>,
    /// Files refused at the last load (their last good version, if any, is in `rules`).
    pub errors: Vec<CompileError>,
    /// What the rules of each event type read, worked out on first use.
    pub reads: ReadsByType,
}

/// [`Reads`] of the rules matching each event type seen so far.
#[derive(Debug, Default)]
pub struct ReadsByType(Mutex<HashMap<String, Arc<Reads>>>);

impl Clone for ReadsByType {
    /// Starts empty: a copy may be filtered (quarantine), and it fills again.
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl RuleSet {
    pub fn matching<'a>(&'a self, event_type: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |r| r.matches(event_type))
    }
    pub fn get(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }
    /// What the rules matching `event_type` read, together.
    pub fn reads(&self, event_type: &str) -> Arc<Reads> {
        let mut cache = self.reads.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = cache.get(event_type) {
            return r.clone();
        }
        let r = Arc::new(Reads::any(self.matching(event_type)));
        // Event types come from producers: keep the cache from growing
        // without bound on a stream of made-up ones.
        if cache.len() < 1024 {
            cache.insert(event_type.to_string(), r.clone());
        }
        r
    }
}

/// Compiles a rules directory, remembering the last good version of each file.
pub struct RuleLoader {
    engine: Arc<RuleEngine>,
    dir: PathBuf,
    last_good: BTreeMap<String, Rule>,
}

impl RuleLoader {
    pub fn new(engine: Arc<RuleEngine>, dir: PathBuf) -> Self {
        Self {
            engine,
            dir,
            last_good: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads every `*.rhai` in the directory. A file that fails keeps its last
    /// good version running; a deleted file's rule is dropped.
    pub fn load(&mut self) -> RuleSet {
        let mut errors = Vec::new();
        let files = match rule_files(&self.dir) {
            Ok(files) => files,
            Err(e) => {
                // An unreadable directory must not silently unload every rule.
                errors.push(CompileError {
                    file: self.dir.display().to_string(),
                    line: None,
                    column: None,
                    message: format!("cannot read the rules directory: {e}"),
                });
                return RuleSet {
                    rules: self.last_good.values().cloned().collect(),
                    errors,
                    reads: Default::default(),
                };
            }
        };
        let mut seen = BTreeMap::new();
        for (name, path) in files {
            let result = std::fs::read_to_string(&path)
                .map_err(|e| CompileError {
                    file: path.display().to_string(),
                    line: None,
                    column: None,
                    message: format!("cannot read: {e}"),
                })
                .and_then(|src| self.engine.compile(&name, path.clone(), &src));
            match result {
                Ok(rule) => {
                    seen.insert(name, rule);
                }
                Err(e) => {
                    if let Some(old) = self.last_good.get(&name) {
                        seen.insert(name, old.clone());
                    }
                    errors.push(e);
                }
            }
        }
        self.last_good = seen;
        RuleSet {
            rules: self.last_good.values().cloned().collect(),
            errors,
            reads: Default::default(),
        }
    }
}

/// `(rule name, path)` of every `*.rhai` file, sorted by name.
pub fn rule_files(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("rhai") || !path.is_file() {
            continue;
        }
        if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
            out.push((stem.to_string(), path));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::rules::RulesConfig;

    #[test]
    fn a_broken_file_keeps_its_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(RuleEngine::new(&RulesConfig::default()));
        let mut loader = RuleLoader::new(engine, dir.path().to_path_buf());
        let file = dir.path().join("w.rhai");
        std::fs::write(&file, "const ON = [\"a\"];\nmail(\"one\");").unwrap();
        let set = loader.load();
        assert_eq!(set.rules.len(), 1);
        assert!(set.errors.is_empty());

        std::fs::write(&file, "const ON = [\"b\"];\nmail(\"two\"").unwrap();
        let set = loader.load();
        assert_eq!(set.rules[0].triggers, vec!["a"], "old version kept");
        assert_eq!(set.errors.len(), 1);
        assert!(
            set.errors[0].to_string().contains("w.rhai:2"),
            "{:?}",
            set.errors
        );

        std::fs::remove_file(&file).unwrap();
        let set = loader.load();
        assert!(set.rules.is_empty() && set.errors.is_empty());
    }
}
