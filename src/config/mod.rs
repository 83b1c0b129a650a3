//! Settings: a YAML file, then `NUDGE__SECTION__KEY` environment overrides,
//! parsed once at start into typed sections: time zones, mailboxes, checked
//! URLs, non-zero counts, closed sets as enums, and secrets that never print
//! ([`Secret`], [`SecretUrl`]). An error names the key it is about.
//!
//! Each default is written once, in its section's `Default` impl; the
//! README's table and `config.example.yaml` are checked against
//! `Config::default()` by the test in `docs.rs`.
//!
//! The sections the lower layers read live with them
//! ([`HistoryConfig`] in `domain::settings`, [`RulesConfig`] in
//! `core::rules::settings`), and the decision core's settings are built here
//! from the whole file ([`CoreSettings::from_config`]), so neither layer
//! imports the configuration.

mod channels;
mod export;
mod http;
mod ingest;
mod load;
mod secret;
mod sections;

#[cfg(test)]
mod docs;

pub use crate::core::rules::RulesConfig;
pub use crate::domain::settings::HistoryConfig;
pub use channels::{HttpUrl, SmsConfig, WebhookConfig, WebhookSecret, channel_settings};
pub use export::{Cron, ExportConfig, ExportFormat};
pub use http::{HttpConfig, PublicUrl, Role, TokenConfig, TokenDigest};
pub use ingest::{IngestConfig, SegmentSource};
pub use secret::{Secret, SecretUrl, redact};
pub use sections::{
    DatabaseConfig, DeliveryConfig, LogConfig, LogFormat, MailConfig, NatsConfig, QuietHours,
    SchedulerConfig, SmtpConfig, TeamConfig, TemplatesConfig, Transport,
};

use crate::core::decide::CoreSettings;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid YAML: {source}")]
    Yaml {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
}

fn key_err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.to_string(),
        message: message.into(),
    }
}

/// The whole configuration file, one field per section.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub nats: NatsConfig,
    pub database: DatabaseConfig,
    pub smtp: SmtpConfig,
    pub mail: MailConfig,
    pub rules: RulesConfig,
    pub templates: TemplatesConfig,
    pub delivery: DeliveryConfig,
    pub history: HistoryConfig,
    pub scheduler: SchedulerConfig,
    /// Staff teams that rules hand tasks to (`task("sales", ...)`), by name.
    pub teams: std::collections::BTreeMap<String, TeamConfig>,
    pub http: HttpConfig,
    /// Events posted over HTTP (`/api/events`, Segment's `/v1/*`).
    pub ingest: IngestConfig,
    pub log: LogConfig,
    /// The analytics export the daemon runs on a schedule.
    pub export: ExportConfig,
    /// Signed posts to other systems (`webhook(name, payload)`), by name.
    pub webhooks: std::collections::BTreeMap<String, WebhookConfig>,
    /// The gateway texts (`sms(template)`) go through.
    pub sms: SmsConfig,
}

/// The decision core's settings are defined by the core and filled here, so
/// that the core never reads the configuration (an inherent impl may live
/// anywhere in the crate; this one lives with the file it reads).
impl CoreSettings {
    pub fn from_config(config: &Config) -> Self {
        let mut settings = CoreSettings::new(
            &config.history,
            &config.rules,
            config
                .teams
                .iter()
                .map(|(name, team)| (name.clone(), team.email.as_str().to_string()))
                .collect(),
            &config.http.public_url,
            config.mail.max_marketing_per_day,
            config.mail.max_marketing_per_week,
        )
        .with_global_control(config.mail.global_control_percent);
        settings.channels = channels::channel_settings(&config.webhooks);
        settings
    }
}

/// What a default configuration gives (tests and tools that run rules
/// without a configuration file).
impl Default for CoreSettings {
    fn default() -> Self {
        Self::from_config(&Config::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn a_cluster_is_several_urls() {
        let nats = NatsConfig {
            url: "nats://n1:4222, nats://n2:4222,nats://n3:4222".into(),
            ..Default::default()
        };
        assert_eq!(
            nats.servers(),
            ["nats://n1:4222", "nats://n2:4222", "nats://n3:4222"]
        );
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.yaml");
        Config::load_with_env(Some(&path), env(&[])).unwrap();
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = Config::load_with_env(
            None,
            env(&[
                ("NUDGE__NATS__URL", "nats://10.0.0.1:4222"),
                ("NUDGE__NATS__BATCH_SIZE", "42"),
                ("NUDGE__MAIL__TRANSPORT", "smtp"),
                ("NUDGE__SMTP__URL", "smtp://127.0.0.1:2525"),
                ("NUDGE__HTTP__LISTEN", "127.0.0.1:9999"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.nats.url.expose(), "nats://10.0.0.1:4222");
        assert_eq!(c.nats.servers(), ["nats://10.0.0.1:4222"]);
        assert_eq!(c.nats.batch_size.get(), 42);
        assert_eq!(c.mail.transport, Transport::Smtp);
        assert_eq!(c.http.listen.port(), 9999);
    }

    #[test]
    fn passwords_never_reach_messages() {
        let e = Config::load_with_env(None, env(&[("NUDGE__DATABASE__URL", "mysql://u:pw@h/db")]))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("pw"), "{e}");
        let e = Config::load_with_env(None, env(&[("NUDGE__NATS__URL", "http://u:pw@h")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nats.url") && !e.contains("pw"), "{e}");
        // A secret of the wrong type is refused without being quoted.
        let e = Config::load_with_env(None, env(&[("NUDGE__HTTP__TOKEN", "1.2345678901234567")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("http.token") && !e.contains("2345"), "{e}");
        // Digits are text to a secret (an override is read as YAML).
        let c = Config::load_with_env(
            None,
            env(&[("NUDGE__MAIL__UNSUBSCRIBE_SECRET", "12345678901234567")]),
        )
        .unwrap();
        let secret = c.mail.unsubscribe_secret.as_ref().unwrap();
        assert_eq!(secret.expose(), "12345678901234567");
        let shown = format!("{c:?} {}", serde_json::to_string(&c).unwrap());
        assert!(!shown.contains("12345678901234567"), "{shown}");
    }

    #[test]
    fn values_are_parsed_into_their_types_at_load() {
        let c = Config::load_with_env(
            None,
            env(&[
                ("NUDGE__HISTORY__BUSINESS_TIMEZONE", "Europe/Paris"),
                ("NUDGE__SMTP__FROM", "Shop <hello@shop.example>"),
                ("NUDGE__TEAMS__SALES__EMAIL", "sales@shop.example"),
            ]),
        )
        .unwrap();
        assert_eq!(c.history.business_tz(), chrono_tz::Europe::Paris);
        assert_eq!(c.smtp.from.email.domain(), "shop.example");
        assert_eq!(c.teams["sales"].email.as_str(), "sales@shop.example");
        for (var, value, key) in [
            (
                "NUDGE__HISTORY__BUSINESS_TIMEZONE",
                "Mars/Olympus",
                "history.business_timezone",
            ),
            ("NUDGE__TEAMS__SALES__EMAIL", "sales", "teams.sales.email"),
            ("NUDGE__HTTP__PUBLIC_URL", "shop.example", "http.public_url"),
            ("NUDGE__NATS__URL", "nats://a:4222,ftp://b", "nats.url"),
            ("NUDGE__NATS__BATCH_SIZE", "0", "nats.batch_size"),
            (
                "NUDGE__RULES__MAX_STRING_BYTES",
                "0",
                "rules.max_string_bytes",
            ),
            ("NUDGE__LOG__LEVEL", "nudge=loud", "log.level"),
            ("NUDGE__LOG__FORMAT", "xml", "log.format"),
        ] {
            let e = Config::load_with_env(None, env(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn quiet_hours_wrap_past_midnight() {
        let c = Config::load_with_env(
            None,
            env(&[
                ("NUDGE__MAIL__QUIET_HOURS__START", "21:30"),
                ("NUDGE__MAIL__QUIET_HOURS__END", "07:00"),
            ]),
        )
        .unwrap();
        let q = c.mail.quiet_hours.unwrap();
        let t = |s: &str| chrono::NaiveTime::parse_from_str(s, "%H:%M").unwrap();
        assert!(q.contains(t("23:00")) && q.contains(t("03:00")) && q.contains(t("21:30")));
        assert!(!q.contains(t("07:00")) && !q.contains(t("12:00")));
        let e = Config::load_with_env(None, env(&[("NUDGE__MAIL__QUIET_HOURS__START", "late")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mail.quiet_hours.start"), "{e}");
    }

    #[test]
    fn max_size_mb_is_for_sqlite() {
        let c = Config::load_with_env(None, env(&[("NUDGE__DATABASE__MAX_SIZE_MB", "5")])).unwrap();
        assert_eq!(c.database.max_size_mb.map(|n| n.get()), Some(5));
        assert_eq!(Config::default().database.max_size_mb, None);
        let e = Config::load_with_env(
            None,
            env(&[
                ("NUDGE__DATABASE__URL", "postgres://u@h/db"),
                ("NUDGE__DATABASE__MAX_SIZE_MB", "5"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("database.max_size_mb"), "{e}");
    }

    #[test]
    fn a_bad_config_names_the_key() {
        let e = Config::load_with_env(None, env(&[("NUDGE__NATS__BATCH_SIZE", "many")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nats.batch_size"), "{e}");
        let e = Config::load_with_env(None, env(&[("NUDGE__NATS__NOPE", "1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        let e = Config::load_with_env(None, env(&[("NUDGE__DATABASE__URL", "mysql://x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("database.url"), "{e}");
        let e = Config::load_with_env(None, env(&[("NUDGE__SMTP__FROM", "not a mailbox")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("smtp.from"), "{e}");
        let e = Config::load_with_env(
            None,
            env(&[
                ("NUDGE__MAIL__TRANSPORT", "smtp"),
                ("NUDGE__SMTP__URL", "ftp://x"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("smtp.url"), "{e}");
        let e = Config::load_with_env(None, env(&[("NUDGE__HTTP__LISTEN", "nowhere")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("http.listen"), "{e}");
    }
}

#[cfg(test)]
mod http_tests {
    use super::*;
    use std::path::Path;

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load_with_env(
            None,
            pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())),
        )
    }

    #[test]
    fn named_tokens_come_from_the_environment_with_a_role_and_a_token_or_its_hash() {
        let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let c = load(&[
            ("NUDGE__HTTP__TOKENS__CALLCENTRE__ROLE", "staff"),
            (
                "NUDGE__HTTP__TOKENS__CALLCENTRE__TOKEN",
                "a-call-centre-token",
            ),
            ("NUDGE__HTTP__TOKENS__PARTNER__ROLE", "ingest"),
            ("NUDGE__HTTP__TOKENS__PARTNER__TOKEN_SHA256", hash),
            (
                "NUDGE__HTTP__ALLOWED_HOSTS",
                "nudge.shop.example, localhost:8080",
            ),
        ])
        .unwrap();
        let t = &c.http.tokens["callcentre"];
        assert_eq!(t.role, Role::Staff);
        use sha2::{Digest, Sha256};
        let want: [u8; 32] = Sha256::digest(b"a-call-centre-token").into();
        assert_eq!(t.digest(), want);
        assert_eq!(c.http.tokens["partner"].role, Role::Ingest);
        assert_eq!(hex::encode(c.http.tokens["partner"].digest()), hash);
        assert_eq!(
            c.http.allowed_hosts,
            ["nudge.shop.example", "localhost:8080"]
        );
        assert!(Role::Ingest < Role::Staff && Role::Marketer < Role::Admin);
    }

    #[test]
    fn bad_tokens_are_refused_naming_the_key() {
        let cases: [(&[(&str, &str)], &str); 5] = [
            (
                &[
                    ("NUDGE__HTTP__TOKENS__X__ROLE", "staff"),
                    ("NUDGE__HTTP__TOKENS__X__TOKEN", "short"),
                ],
                "http.tokens.x.token",
            ),
            (
                &[("NUDGE__HTTP__TOKENS__X__ROLE", "staff")],
                "http.tokens.x",
            ),
            (
                &[
                    ("NUDGE__HTTP__TOKENS__X__ROLE", "boss"),
                    ("NUDGE__HTTP__TOKENS__X__TOKEN", "long-enough-token-1"),
                ],
                "http.tokens.x.role",
            ),
            (
                &[
                    ("NUDGE__HTTP__TOKENS__X__ROLE", "staff"),
                    ("NUDGE__HTTP__TOKENS__X__TOKEN_SHA256", "abc"),
                ],
                "http.tokens.x.token_sha256",
            ),
            (
                &[("NUDGE__HTTP__MAX_CONNECTIONS", "0")],
                "http.max_connections",
            ),
        ];
        for (vars, key) in cases {
            let e = load(vars).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn the_production_config_listens_on_loopback_and_takes_its_tokens_from_the_environment() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nudge.yaml");
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let e = Config::load_with_env(Some(&path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("http.tokens.callcentre"), "{e}");
        let c = Config::load_with_env(
            Some(&path),
            env(&[
                (
                    "NUDGE__HTTP__TOKENS__CALLCENTRE__TOKEN",
                    "call-centre-token-1",
                ),
                (
                    "NUDGE__HTTP__TOKENS__MARKETING__TOKEN",
                    "marketing-token-12",
                ),
                ("NUDGE__HTTP__TOKENS__DPO__TOKEN", "data-protection-token"),
            ]),
        )
        .unwrap();
        assert!(c.http.listen.ip().is_loopback());
        assert_eq!(c.http.tokens["dpo"].role, Role::Admin);
        assert_eq!(c.http.allowed_hosts, ["nudge.shop.example"]);
    }
}
