//! Reading the configuration: the YAML file, then the `NUDGE__SECTION__KEY`
//! environment overrides, then serde into the typed sections (which parse
//! time zones, mailboxes, URLs, non-zero counts), then the checks that span
//! several keys. Every error names the key it is about.

use super::secret::redact;
use super::{Config, ConfigError, key_err};
use serde_yaml::Value;
use std::path::Path;

impl Config {
    /// Reads `path` (when given), applies the process environment, validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut root = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                let v: Value = serde_yaml::from_str(&text).map_err(|source| ConfigError::Yaml {
                    path: p.to_path_buf(),
                    source,
                })?;
                if v.is_null() {
                    Value::Mapping(Default::default())
                } else {
                    v
                }
            }
            None => Value::Mapping(Default::default()),
        };
        for (name, value) in env {
            if let Some(rest) = name.strip_prefix("NUDGE__") {
                let keys: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
                set_path(&mut root, &keys, &value)?;
            }
        }
        let config: Config = serde_path_to_error::deserialize(root).map_err(|e| {
            let key = e.path().to_string();
            key_err(&key, e.into_inner().to_string())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// What the types alone cannot say: URL schemes, names, lengths, and
    /// keys that depend on each other.
    fn validate(&self) -> Result<(), ConfigError> {
        let url = self.database.url.expose();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres:")
            || url.starts_with("postgresql:"))
        {
            return Err(key_err(
                "database.url",
                format!("{:?} must start with sqlite:// or postgres://", redact(url)),
            ));
        }
        if self.database.max_size_mb.is_some() && !self.database.is_sqlite() {
            return Err(key_err(
                "database.max_size_mb",
                "applies to SQLite only (a PostgreSQL server manages its own space)",
            ));
        }
        if self.nats.servers().is_empty() {
            return Err(key_err("nats.url", "names no server"));
        }
        for server in self.nats.servers() {
            server
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| key_err("nats.url", format!("{:?}: {e}", redact(server))))?;
        }
        if self.mail.transport == super::Transport::Smtp {
            // Only parsed here: building the pooled transport needs a runtime.
            lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(self.smtp.url.expose())
                .map_err(|e| key_err("smtp.url", e.to_string()))?;
        }
        for (key, name) in [
            ("nats.stream", &self.nats.stream),
            ("nats.consumer", &self.nats.consumer),
        ] {
            if name.is_empty() || name.contains(['.', ' ', '*', '>']) {
                return Err(key_err(
                    key,
                    "must be a non-empty name without '.', ' ', '*' or '>'",
                ));
            }
        }
        if let Some(secret) = &self.mail.unsubscribe_secret
            && secret.expose().len() < 16
        {
            return Err(key_err(
                "mail.unsubscribe_secret",
                "must be at least 16 characters",
            ));
        }
        if !(0.0..=100.0).contains(&self.mail.global_control_percent) {
            return Err(key_err(
                "mail.global_control_percent",
                "must be a percentage from 0 to 100",
            ));
        }
        if !(self.delivery.rate_per_sec >= 0.0 && self.delivery.rate_per_sec.is_finite()) {
            return Err(key_err(
                "delivery.rate_per_sec",
                "must be 0 (no limit) or more",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(key_err(
                "log.level",
                format!("{:?} is not a tracing filter: {e}", self.log.level),
            ));
        }
        self.validate_tokens()?;
        self.ingest.validate(&self.http)?;
        self.validate_channels()
    }

    fn validate_tokens(&self) -> Result<(), ConfigError> {
        let http = &self.http;
        if let Some(t) = &http.token
            && t.expose().len() < 16
        {
            return Err(key_err("http.token", "must be at least 16 characters"));
        }
        for (name, t) in &http.tokens {
            let key = format!("http.tokens.{name}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(key_err(
                    &key,
                    "a token's name takes letters, digits, '_' and '-'",
                ));
            }
            if http.token.is_some() && name == "admin" {
                return Err(key_err(
                    &key,
                    "`admin` is the name of http.token; choose another",
                ));
            }
            match (&t.token, &t.token_sha256) {
                (Some(tok), None) if tok.expose().len() < 16 => {
                    return Err(key_err(
                        &format!("{key}.token"),
                        "must be at least 16 characters",
                    ));
                }
                (Some(_), None) | (None, Some(_)) => {}
                _ => {
                    return Err(key_err(
                        &key,
                        "give exactly one of `token` and `token_sha256`",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Sets `root[keys...] = value`, the value read as a YAML scalar so that
/// `NUDGE__NATS__BATCH_SIZE=100` is a number and `...=true` a boolean.
fn set_path(root: &mut Value, keys: &[String], value: &str) -> Result<(), ConfigError> {
    let dotted = keys.join(".");
    let mut node = root;
    for (i, key) in keys.iter().enumerate() {
        if !node.is_mapping() {
            if node.is_null() {
                *node = Value::Mapping(Default::default());
            } else {
                return Err(key_err(&dotted, "overrides a value that is not a section"));
            }
        }
        let map = node.as_mapping_mut().expect("checked above");
        let k = Value::String(key.clone());
        if i + 1 == keys.len() {
            let parsed: Value =
                serde_yaml::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
            // A value that YAML reads as a map or list is meant as text here;
            // `null` stays null, to turn off an optional setting.
            let parsed = if parsed.is_mapping() || parsed.is_sequence() {
                Value::String(value.to_string())
            } else {
                parsed
            };
            map.insert(k, parsed);
            return Ok(());
        }
        node = map.entry(k).or_insert(Value::Null);
    }
    Ok(())
}
