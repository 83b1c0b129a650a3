//! Settings: a YAML file, then `NUDGE__SECTION__KEY` environment overrides,
//! validated once at start. An error names the key it is about.

use serde::Deserialize;
use serde_yaml::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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

#[derive(Debug, Clone, Default, Deserialize)]
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
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated for a cluster. Default `nats://127.0.0.1:4222`.
    pub url: String,
    /// Stream holding the shop's events; created when missing. Default `SHOP_EVENTS`.
    pub stream: String,
    /// Subject prefix of the shop's events. Default `shop.events`.
    pub subject_prefix: String,
    /// Subject prefix of the events nudge emits. Default `nudge.events`.
    pub emit_prefix: String,
    /// Durable consumer name shared by all instances. Default `nudge`.
    pub consumer: String,
    /// How long the stream keeps events when nudge creates it. Default 365 days.
    pub max_age_days: u64,
    /// Events pulled and committed together. Default 2000.
    pub batch_size: usize,
    /// How long a batch that is not full waits for more events once the
    /// first one is in, in milliseconds. Each batch costs a few round trips
    /// to the database whatever its size, so under load full batches are
    /// what keeps up; when quiet this is added to the latency. Default 5.
    pub batch_linger_ms: u64,
    /// Batches one instance has in hand at once: each is decided while the
    /// one before it commits, on top of what that one decided, and commits
    /// after it, so batches still commit in stream order. 1 decides and
    /// commits one batch at a time. Default 3.
    pub batches_in_flight: usize,
    /// Envelopes larger than this are rejected. Default 65536.
    pub max_event_bytes: usize,
    /// How long the broker waits for an instance's ack before it hands the
    /// events to another instance (set when the consumer is created): the
    /// delay before a crashed instance's batch is taken over. Default 30.
    pub ack_wait_secs: u64,
    /// Copies of the stream nudge creates: 3 on a 3-node cluster. Default 1.
    pub replicas: usize,
    /// Deliveries of a message (counted by the broker, across restarts and
    /// instances) after which its batch is taken apart and the message, if
    /// it alone fails while the database answers, is kept as rejected.
    /// Default 5.
    pub max_deliveries: u64,
}

impl NatsConfig {
    /// The servers of `url`: one, or several (a cluster) separated by commas.
    pub fn servers(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            stream: "SHOP_EVENTS".into(),
            subject_prefix: "shop.events".into(),
            emit_prefix: "nudge.events".into(),
            consumer: "nudge".into(),
            max_age_days: 365,
            batch_size: 2000,
            batch_linger_ms: 5,
            batches_in_flight: 3,
            max_event_bytes: 64 * 1024,
            ack_wait_secs: 30,
            replicas: 1,
            max_deliveries: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://path` (created when missing) or `postgres://...`. Default `sqlite://nudge.db`.
    pub url: String,
    /// Connection pool size. Default 8.
    pub max_connections: u32,
    /// SQLite only: the most the database file may grow to, in MiB; writes
    /// beyond fail as on a full disk. Default unset: no limit.
    pub max_size_mb: Option<u64>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://nudge.db".into(),
            max_connections: 8,
            max_size_mb: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// lettre's URL form: `smtp://host:port`, `smtps://user:pass@host`, `smtp://host?tls=required`.
    /// Default `smtp://127.0.0.1:25`.
    pub url: String,
    /// Sender mailbox, `Name <addr>` or `addr`. Default `nudge <nudge@localhost>`.
    pub from: String,
    /// Timeout of one SMTP send, in seconds. Default 30.
    pub timeout_secs: u64,
    /// Pooled SMTP connections. Default 4.
    pub pool_size: u32,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            url: "smtp://127.0.0.1:25".into(),
            from: "nudge <nudge@localhost>".into(),
            timeout_secs: 30,
            pool_size: 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Smtp,
    File,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailConfig {
    /// `smtp`, or `file` to write `.eml` files into `dir`. Default `file`.
    pub transport: Transport,
    /// Folder for the file transport. Default `var/mail`.
    pub dir: PathBuf,
    /// Key that signs unsubscribe links. Default: a random key kept in the database.
    pub unsubscribe_secret: Option<String>,
    /// Marketing mails a client may get per day (0: no cap). Default 2.
    pub max_marketing_per_day: u32,
    /// Marketing mails a client may get per week (0: no cap). Default 5.
    pub max_marketing_per_week: u32,
    /// No marketing mail in these local hours of the client (their timezone,
    /// else the business one): deferred, not dropped. `null` turns it off.
    /// Default 21:00 to 08:00.
    pub quiet_hours: Option<QuietHours>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuietHours {
    /// `HH:MM`, local time.
    #[serde(deserialize_with = "hh_mm")]
    pub start: chrono::NaiveTime,
    /// `HH:MM`, local time.
    #[serde(deserialize_with = "hh_mm")]
    pub end: chrono::NaiveTime,
}

fn hh_mm<'de, D: serde::Deserializer<'de>>(d: D) -> Result<chrono::NaiveTime, D::Error> {
    let s = String::deserialize(d)?;
    chrono::NaiveTime::parse_from_str(&s, "%H:%M")
        .or_else(|_| chrono::NaiveTime::parse_from_str(&s, "%H:%M:%S"))
        .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a time like 21:00")))
}

impl QuietHours {
    /// Whether `t` falls in the quiet window (which may wrap past midnight).
    pub fn contains(&self, t: chrono::NaiveTime) -> bool {
        if self.start <= self.end {
            t >= self.start && t < self.end
        } else {
            t >= self.start || t < self.end
        }
    }
}

impl Default for MailConfig {
    fn default() -> Self {
        Self {
            transport: Transport::File,
            dir: "var/mail".into(),
            unsubscribe_secret: None,
            max_marketing_per_day: 2,
            max_marketing_per_week: 5,
            quiet_hours: Some(QuietHours {
                start: chrono::NaiveTime::from_hms_opt(21, 0, 0).expect("valid time"),
                end: chrono::NaiveTime::from_hms_opt(8, 0, 0).expect("valid time"),
            }),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// Folder of `*.rhai` rules. Default `rules`.
    pub dir: PathBuf,
    /// How often the rules and templates folders are checked for changes, in ms. Default 500.
    pub reload_poll_ms: u64,
    /// Rhai operations one rule run may take. Default 200000.
    pub max_operations: u64,
    /// Nested function calls. Default 32.
    pub max_call_depth: usize,
    /// Longest string a rule may build, in bytes. Default 65536.
    pub max_string_bytes: usize,
    /// Longest array. Default 10000.
    pub max_array_len: usize,
    /// Largest map. Default 10000.
    pub max_map_len: usize,
    /// How many secondary events deep an emit may go before it is stopped. Default 4.
    pub max_emit_depth: u32,
    /// Distinct clients a rule must have failed for before it is
    /// quarantined until its file changes (0: never). One client's odd data
    /// fails that client's runs only; a rule is taken out of service when
    /// it is broken for many: its last `quarantine_window` runs, in stream
    /// order, are at least 90 % failures, over at least this many distinct
    /// clients. Default 20.
    pub quarantine_after: u32,
    /// The runs of a rule the quarantine looks at (see `quarantine_after`).
    /// Default 100.
    pub quarantine_window: u32,
    /// Free-form values rules read as `settings` (e.g. partner shares). Default empty.
    pub settings: serde_json::Map<String, serde_json::Value>,
    /// Longest delay `after()` accepts, in days; a longer one fails the run
    /// (a timer years away is a mistake, and an unbounded one overflows the
    /// time arithmetic). Default 3650 (ten years).
    pub max_delay_days: u32,
    /// Largest value one rule may keep with `remember` (a larger one is not
    /// kept; the process log says so) and largest data of a timer (a larger
    /// one fails the run), in bytes of JSON: both are loaded and saved with
    /// every event of the client. (A mail's, emit's or task's data is bounded
    /// by `max_string_bytes`.) Default 8192.
    pub max_value_bytes: usize,
    /// Keys one rule may `remember` per client; a new key beyond it is not
    /// kept (noted in the process log). Default 50.
    pub max_facts_per_rule: usize,
    /// Pending timers one rule may hold per client; a new timer name beyond
    /// it is not set (noted). Default 20.
    pub max_timers_per_rule: usize,
    /// Bytes of `print`/`debug` output one rule run may write to the log; the
    /// rest is cut with a note. Default 16384.
    pub max_log_bytes_per_run: usize,
    /// Mails one rule run may queue; the rest are dropped with a note.
    /// Default 10.
    pub max_mails_per_run: usize,
    /// Tasks one rule run may make; the rest are dropped with a note. Default 10.
    pub max_tasks_per_run: usize,
    /// Secondary events one rule run may emit; the rest are dropped with a
    /// note. Default 10.
    pub max_emits_per_run: usize,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            dir: "rules".into(),
            reload_poll_ms: 500,
            max_operations: 200_000,
            max_call_depth: 32,
            max_string_bytes: 64 * 1024,
            max_array_len: 10_000,
            max_map_len: 10_000,
            max_emit_depth: 4,
            quarantine_after: 20,
            quarantine_window: 100,
            settings: Default::default(),
            max_delay_days: 3650,
            max_value_bytes: 8 * 1024,
            max_facts_per_rule: 50,
            max_timers_per_rule: 20,
            max_log_bytes_per_run: 16 * 1024,
            max_mails_per_run: 10,
            max_tasks_per_run: 10,
            max_emits_per_run: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplatesConfig {
    /// Folder of `NAME.txt` + `NAME.html` templates. Default `templates`.
    pub dir: PathBuf,
}

impl Default for TemplatesConfig {
    fn default() -> Self {
        Self {
            dir: "templates".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// How often the outbox is checked when idle, in ms. Default 500.
    pub poll_ms: u64,
    /// Mails sent at once. Default 4.
    pub concurrency: usize,
    /// Attempts before a mail is marked failed; with the backoff, 12 attempts
    /// ride out an SMTP server that is down for about two hours. Default 12.
    pub max_attempts: u32,
    /// Mails sent per second at most (0: no limit). Default 0.
    pub rate_per_sec: f64,
    /// First retry delay, doubled each attempt, in seconds. Default 2.
    pub retry_base_secs: u64,
    /// How long a claimed mail is reserved for one sender, in seconds. Default 120.
    pub lease_secs: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            poll_ms: 500,
            concurrency: 4,
            max_attempts: 12,
            rate_per_sec: 0.0,
            retry_base_secs: 2,
            lease_secs: 120,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamConfig {
    /// Where the team's tasks are mailed.
    pub email: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Silence that ends a session when events carry no `context.session_id`, in minutes. Default 30.
    pub session_gap_minutes: u32,
    /// IANA timezone of the business: shared counters' days, weeks, quarters. Default `UTC`.
    pub business_timezone: String,
    /// Distinct products kept per client in `stats.purchases` (the most
    /// bought stay). Every event of the client loads and saves its state, so
    /// without a bound 40 orders of 1,100 products made a 1.6 MB state.
    /// Default 200.
    pub max_purchases: usize,
    /// Distinct event types counted per client in `stats.events` and
    /// `stats.last_at`; events of a further type still count everywhere
    /// else. Default 200.
    pub max_event_types: usize,
    /// Distinct order channels kept per client in `orders_by_channel` (the
    /// channel is free text). Default 20.
    pub max_order_channels: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            session_gap_minutes: 30,
            business_timezone: "UTC".into(),
            max_purchases: 200,
            max_event_types: 200,
            max_order_channels: 20,
        }
    }
}

impl HistoryConfig {
    pub fn business_tz(&self) -> chrono_tz::Tz {
        // Validated at load.
        self.business_timezone.parse().unwrap_or(chrono_tz::Tz::UTC)
    }

    pub fn session_gap(&self) -> chrono::Duration {
        chrono::Duration::minutes(self.session_gap_minutes as i64)
    }

    /// What a client's state keeps at most, for [`crate::domain::history::ClientState::apply_limited`].
    pub fn limits(&self) -> crate::domain::history::HistoryLimits {
        crate::domain::history::HistoryLimits {
            max_purchases: self.max_purchases,
            max_event_types: self.max_event_types,
            max_order_channels: self.max_order_channels,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// How often due timers and schedules are checked, in ms. Default 1000.
    pub tick_ms: u64,
    /// Clients per transaction when firing timers or sweeping. Each page
    /// takes its turn among the stream's batches, which wait behind it, so
    /// a large page shows in the stream's latency. Default 100.
    pub page_size: u32,
    /// How long one instance holds a sweep before another may take it over, in seconds. Default 300.
    pub lease_secs: u64,
    /// A missed schedule occurrence is still run when nudge comes back within this many hours. Default 24.
    pub catch_up_hours: u32,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            tick_ms: 1000,
            page_size: 100,
            lease_secs: 300,
            catch_up_hours: 24,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP server. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// A bearer token with the `admin` role, named `admin` (kept from before
    /// named tokens). Unset and no `tokens`: the API is open, which nudge
    /// refuses on a non-loopback address unless `allow_open` is set.
    pub token: Option<String>,
    /// Named tokens, each with a role (`http.tokens.<name>: {role, token}` or
    /// `{role, token_sha256}`), so each caller gets only what it needs and is
    /// named in the audit log.
    pub tokens: std::collections::BTreeMap<String, TokenConfig>,
    /// Serve the API without any token on a non-loopback address. Default false.
    pub allow_open: bool,
    /// Host header values (`name` or `name:port`) accepted; others get 421, so
    /// a page on another site cannot reach nudge through DNS rebinding.
    /// A YAML list or one comma-separated string. Default: any.
    #[serde(deserialize_with = "list_or_commas")]
    pub allowed_hosts: Vec<String>,
    /// Connections served at once; at the limit the oldest connection that has
    /// not sent a request yet is closed for the new one. Default 512, and never
    /// more than half the process's open-file limit.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, and how long
    /// an idle keep-alive connection stays open. Default 10.
    pub header_timeout_secs: u64,
    /// How long one request may take, rule runs and the live feed excepted
    /// (a rule run sweeps every client; the live feed is meant to stay open).
    /// Default 30.
    pub request_timeout_secs: u64,
    /// The address people reach nudge at, for links in mails. Default `http://127.0.0.1:8080`.
    pub public_url: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("valid default address"),
            token: None,
            tokens: Default::default(),
            allow_open: false,
            allowed_hosts: Vec::new(),
            max_connections: 512,
            header_timeout_secs: 10,
            request_timeout_secs: 30,
            public_url: "http://127.0.0.1:8080".into(),
        }
    }
}

/// What a token may do, least to most; each role may do all that the ones
/// before it may.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Posting events only.
    Ingest,
    /// Reading clients, timelines, tasks and the live feed; closing tasks.
    Staff,
    /// Staff, and rules, previews, rule runs and reports.
    Marketer,
    /// Everything, export and erasure included.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Ingest, Role::Staff, Role::Marketer, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Staff => "staff",
            Role::Marketer => "marketer",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One named token: the secret itself, or only its SHA-256, so that the
/// configuration need not hold the secret.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub role: Role,
    /// The bearer token (16+ characters).
    pub token: Option<String>,
    /// Lowercase or uppercase hex of the SHA-256 of the bearer token.
    pub token_sha256: Option<String>,
}

impl TokenConfig {
    /// The SHA-256 of the token, which is what requests are checked against.
    pub fn digest(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        match (&self.token, &self.token_sha256) {
            (Some(t), _) => Sha256::digest(t.as_bytes()).into(),
            (None, Some(h)) => {
                let mut out = [0u8; 32];
                // Checked by `Config::validate`.
                hex::decode_to_slice(h, &mut out).expect("validated hex digest");
                out
            }
            (None, None) => unreachable!("validated: a token or its hash"),
        }
    }
}

/// A list given as a YAML sequence or, as an environment variable must, as
/// one comma-separated string.
fn list_or_commas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<Either>::deserialize(d)? {
        None => Vec::new(),
        Some(Either::One(s)) => s
            .split(',')
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .collect(),
        Some(Either::Many(v)) => v,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`. Default `text`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `nudge=debug`. `RUST_LOG` wins when set. Default `info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

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

    fn validate(&self) -> Result<(), ConfigError> {
        let url = &self.database.url;
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres:")
            || url.starts_with("postgresql:"))
        {
            return Err(key_err(
                "database.url",
                format!("{:?} must start with sqlite:// or postgres://", redact(url)),
            ));
        }
        if let Some(mb) = self.database.max_size_mb {
            if !url.starts_with("sqlite:") {
                return Err(key_err(
                    "database.max_size_mb",
                    "applies to SQLite only (a PostgreSQL server manages its own space)",
                ));
            }
            if mb == 0 {
                return Err(key_err("database.max_size_mb", "must be at least 1"));
            }
        }
        if self.mail.transport == Transport::Smtp {
            // Only parsed here: building the pooled transport needs a runtime.
            lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(&self.smtp.url)
                .map_err(|e| key_err("smtp.url", e.to_string()))?;
        }
        self.smtp
            .from
            .parse::<lettre::message::Mailbox>()
            .map_err(|e| {
                key_err(
                    "smtp.from",
                    format!("{:?} is not a mailbox: {e}", self.smtp.from),
                )
            })?;
        let positive = [
            ("nats.batch_size", self.nats.batch_size as u64),
            ("nats.ack_wait_secs", self.nats.ack_wait_secs),
            ("nats.replicas", self.nats.replicas as u64),
            ("nats.max_event_bytes", self.nats.max_event_bytes as u64),
            (
                "database.max_connections",
                self.database.max_connections as u64,
            ),
            ("delivery.concurrency", self.delivery.concurrency as u64),
            ("delivery.max_attempts", self.delivery.max_attempts as u64),
            ("rules.max_operations", self.rules.max_operations),
            ("rules.reload_poll_ms", self.rules.reload_poll_ms),
            ("rules.max_delay_days", self.rules.max_delay_days as u64),
            ("rules.max_value_bytes", self.rules.max_value_bytes as u64),
            (
                "rules.max_facts_per_rule",
                self.rules.max_facts_per_rule as u64,
            ),
            (
                "rules.max_timers_per_rule",
                self.rules.max_timers_per_rule as u64,
            ),
            (
                "rules.max_log_bytes_per_run",
                self.rules.max_log_bytes_per_run as u64,
            ),
            (
                "rules.max_mails_per_run",
                self.rules.max_mails_per_run as u64,
            ),
            (
                "rules.max_tasks_per_run",
                self.rules.max_tasks_per_run as u64,
            ),
            (
                "rules.max_emits_per_run",
                self.rules.max_emits_per_run as u64,
            ),
            ("history.max_purchases", self.history.max_purchases as u64),
            (
                "history.max_event_types",
                self.history.max_event_types as u64,
            ),
            (
                "history.max_order_channels",
                self.history.max_order_channels as u64,
            ),
            ("smtp.timeout_secs", self.smtp.timeout_secs),
            (
                "history.session_gap_minutes",
                self.history.session_gap_minutes as u64,
            ),
            ("scheduler.tick_ms", self.scheduler.tick_ms),
            ("scheduler.page_size", self.scheduler.page_size as u64),
            ("scheduler.lease_secs", self.scheduler.lease_secs),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(key_err(key, "must be greater than 0"));
            }
        }
        if self.nats.stream.is_empty() || self.nats.stream.contains(['.', ' ', '*', '>']) {
            return Err(key_err(
                "nats.stream",
                "must be a non-empty name without '.', ' ', '*' or '>'",
            ));
        }
        if self.nats.consumer.is_empty() || self.nats.consumer.contains(['.', ' ', '*', '>']) {
            return Err(key_err(
                "nats.consumer",
                "must be a non-empty name without '.', ' ', '*' or '>'",
            ));
        }
        if self
            .history
            .business_timezone
            .parse::<chrono_tz::Tz>()
            .is_err()
        {
            return Err(key_err(
                "history.business_timezone",
                format!(
                    "{:?} is not an IANA timezone",
                    self.history.business_timezone
                ),
            ));
        }
        for (name, team) in &self.teams {
            crate::domain::event::Email::parse(team.email.clone())
                .map_err(|e| key_err(&format!("teams.{name}.email"), e.to_string()))?;
        }
        if let Some(secret) = &self.mail.unsubscribe_secret
            && secret.len() < 16
        {
            return Err(key_err(
                "mail.unsubscribe_secret",
                "must be at least 16 characters",
            ));
        }
        if !(self.delivery.rate_per_sec >= 0.0 && self.delivery.rate_per_sec.is_finite()) {
            return Err(key_err(
                "delivery.rate_per_sec",
                "must be 0 (no limit) or more",
            ));
        }
        if let Some(t) = &self.http.token
            && t.len() < 16
        {
            return Err(key_err("http.token", "must be at least 16 characters"));
        }
        for (name, t) in &self.http.tokens {
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
            if self.http.token.is_some() && name == "admin" {
                return Err(key_err(
                    &key,
                    "`admin` is the name of http.token; choose another",
                ));
            }
            match (&t.token, &t.token_sha256) {
                (Some(tok), None) if tok.len() < 16 => {
                    return Err(key_err(
                        &format!("{key}.token"),
                        "must be at least 16 characters",
                    ));
                }
                (Some(_), None) => {}
                (None, Some(h)) if h.len() != 64 || hex::decode(h).is_err() => {
                    return Err(key_err(
                        &format!("{key}.token_sha256"),
                        "must be the 64 hex digits of a SHA-256",
                    ));
                }
                (None, Some(_)) => {}
                _ => {
                    return Err(key_err(
                        &key,
                        "give exactly one of `token` and `token_sha256`",
                    ));
                }
            }
        }
        for (key, v) in [
            ("http.max_connections", self.http.max_connections as u64),
            ("http.header_timeout_secs", self.http.header_timeout_secs),
            ("http.request_timeout_secs", self.http.request_timeout_secs),
        ] {
            if v == 0 {
                return Err(key_err(key, "must be greater than 0"));
            }
        }
        Ok(())
    }
}

/// A URL fit for logs and error messages: any password in it is masked
/// (`postgres://nudge:secret@db/x` -> `postgres://nudge:***@db/x`).
pub fn redact(url: &str) -> String {
    url.split(',')
        .map(|u| {
            let Some((scheme, rest)) = u.split_once("://") else {
                return u.to_string();
            };
            let (auth, host) = match rest.split_once('@') {
                Some(x) => x,
                None => return u.to_string(),
            };
            match auth.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => format!("{scheme}://***@{host}"),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(c.nats.url, "nats://10.0.0.1:4222");
        assert_eq!(c.nats.servers(), ["nats://10.0.0.1:4222"]);
        assert_eq!(c.nats.batch_size, 42);
        assert_eq!(c.mail.transport, Transport::Smtp);
        assert_eq!(c.http.listen.port(), 9999);
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://nudge:s3cret@db:5432/x"),
            "postgres://nudge:***@db:5432/x"
        );
        assert_eq!(
            redact("nats://tok@a:4222,nats://b:4222"),
            "nats://***@a:4222,nats://b:4222"
        );
        assert_eq!(redact("sqlite://var/nudge.db"), "sqlite://var/nudge.db");
        let e = Config::load_with_env(None, env(&[("NUDGE__DATABASE__URL", "mysql://u:pw@h/db")]))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("pw"), "{e}");
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
        assert_eq!(c.database.max_size_mb, Some(5));
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
