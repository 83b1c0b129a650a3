//! Which configuration a command uses, and the rules and templates as
//! `check` and `test` load them.

use nudge::config::Config;
use std::path::PathBuf;
use std::sync::Arc;

/// Where the configuration came from.
pub(crate) enum ConfigSource {
    Option(PathBuf),
    Env(PathBuf),
    WorkingFolder(PathBuf),
    Defaults,
}

/// The configuration file looked for in the working folder.
pub(crate) const DEFAULT_CONFIG_FILE: &str = "nudge.yaml";

impl ConfigSource {
    /// `--config`, then `NUDGE_CONFIG`, then `./nudge.yaml`, then the defaults.
    pub(crate) fn find(option: Option<PathBuf>, env: Option<std::ffi::OsString>) -> Self {
        if let Some(p) = option {
            return Self::Option(p);
        }
        if let Some(p) = env.filter(|v| !v.is_empty()) {
            return Self::Env(p.into());
        }
        let local = PathBuf::from(DEFAULT_CONFIG_FILE);
        if local.is_file() {
            return Self::WorkingFolder(local);
        }
        Self::Defaults
    }

    pub(crate) fn path(&self) -> Option<&std::path::Path> {
        match self {
            Self::Option(p) | Self::Env(p) | Self::WorkingFolder(p) => Some(p),
            Self::Defaults => None,
        }
    }

    /// One line saying which configuration is used.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Option(p) => format!("config: {} (--config)", p.display()),
            Self::Env(p) => format!("config: {} (NUDGE_CONFIG)", p.display()),
            Self::WorkingFolder(p) => {
                format!("config: {} (found in the working folder)", p.display())
            }
            Self::Defaults => format!(
                "config: built-in defaults (no --config, no NUDGE_CONFIG, no ./{DEFAULT_CONFIG_FILE}): \
                 no teams and no rules.settings"
            ),
        }
    }
}

/// Rules and templates loaded as `check` and `test` see them, with every
/// problem (refused files and what `rules::check` finds) listed once.
/// Nothing is logged: the caller prints the problems.
pub(crate) struct Checked {
    pub(crate) engine: Arc<nudge::core::rules::RuleEngine>,
    pub(crate) rules: nudge::core::rules::loader::RuleSet,
    pub(crate) templates: nudge::core::templates::TemplateSet,
    pub(crate) problems: Vec<nudge::core::rules::CompileError>,
}

impl Checked {
    pub(crate) fn load(config: &Config) -> Self {
        let engine = Arc::new(nudge::core::rules::RuleEngine::new(&config.rules));
        let rules =
            nudge::core::rules::loader::RuleLoader::new(engine.clone(), config.rules.dir.clone())
                .load();
        let templates =
            nudge::core::templates::TemplateLoader::new(config.templates.dir.clone()).load();
        let mut problems: Vec<_> = rules
            .errors
            .iter()
            .chain(&templates.errors)
            .cloned()
            .collect();
        problems.extend(nudge::tools::check::check(&engine, &rules, &templates));
        Self {
            engine,
            rules,
            templates,
            problems,
        }
    }
}
