//! The sections of the configuration that belong to the daemon's shell:
//! broker, database, mail, delivery, scheduler, teams, log. (`history` and
//! `rules` live with the layers that use them; `http` in [`super::http`].)
//! Each section's defaults are in its [`Default`] impl and nowhere else in
//! the code; README's table and `config.example.yaml` are checked against
//! them by a test (`config::docs`).

use super::secret::{Secret, SecretUrl};
use crate::domain::event::Email;
use crate::domain::settings::nz;
use lettre::message::Mailbox;
use serde::{Deserialize, Serialize};
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated for a cluster; may hold a token or a
    /// user and password, hence secret.
    pub url: SecretUrl,
    /// Stream holding the shop's events; created when missing.
    pub stream: String,
    /// Subject prefix of the shop's events.
    pub subject_prefix: String,
    /// Subject prefix of the events nudge emits.
    pub emit_prefix: String,
    /// Durable consumer name shared by all instances.
    pub consumer: String,
    /// How long the stream keeps events when nudge creates it, in days.
    pub max_age_days: u64,
    /// Events pulled and committed together.
    pub batch_size: NonZeroUsize,
    /// How long a batch that is not full waits for more events once the
    /// first one is in, in milliseconds. Each batch costs a few round trips
    /// to the database whatever its size, so under load full batches are
    /// what keeps up; when quiet this is added to the latency.
    pub batch_linger_ms: u64,
    /// Batches one instance has in hand at once: each is decided while the
    /// one before it commits, on top of what that one decided, and commits
    /// after it, so batches still commit in stream order. 1 decides and
    /// commits one batch at a time.
    pub batches_in_flight: NonZeroUsize,
    /// Envelopes larger than this are rejected.
    pub max_event_bytes: NonZeroUsize,
    /// How long the broker waits for an instance's ack before it hands the
    /// events to another instance (set when the consumer is created), in
    /// seconds: the delay before a crashed instance's batch is taken over.
    pub ack_wait_secs: NonZeroU64,
    /// Copies of the stream nudge creates: 3 on a 3-node cluster.
    pub replicas: NonZeroUsize,
    /// Deliveries of a message (counted by the broker, across restarts and
    /// instances) after which its batch is taken apart and the message, if
    /// it alone fails while the database answers, is kept as rejected.
    pub max_deliveries: NonZeroU64,
}

impl NatsConfig {
    /// The servers of `url`: one, or several (a cluster) separated by
    /// commas. For connecting: they may hold credentials.
    pub fn servers(&self) -> Vec<&str> {
        self.url
            .expose()
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
            batch_size: nz!(2000),
            batch_linger_ms: 5,
            batches_in_flight: nz!(3),
            max_event_bytes: nz!(64 * 1024),
            ack_wait_secs: nz!(30),
            replicas: nz!(1),
            max_deliveries: nz!(5),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://path` (created when missing) or `postgres://...`, which may
    /// hold a password.
    pub url: SecretUrl,
    /// Connection pool size.
    pub max_connections: NonZeroU32,
    /// SQLite only: the most the database file may grow to, in MiB; writes
    /// beyond fail as on a full disk. Unset: no limit.
    pub max_size_mb: Option<NonZeroU64>,
}

impl DatabaseConfig {
    /// Whether `url` names a SQLite database (else PostgreSQL: checked at load).
    pub fn is_sqlite(&self) -> bool {
        self.url.expose().starts_with("sqlite:")
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://nudge.db".into(),
            max_connections: nz!(8),
            max_size_mb: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// lettre's URL form: `smtp://host:port`, `smtps://user:pass@host`,
    /// `smtp://host?tls=required`; may hold a password.
    pub url: SecretUrl,
    /// Sender mailbox, written `Name <addr>` or `addr`; its domain is used
    /// in `Message-ID`s.
    #[serde(with = "mailbox")]
    pub from: Mailbox,
    /// Timeout of one SMTP send, in seconds.
    pub timeout_secs: NonZeroU64,
    /// Pooled SMTP connections.
    pub pool_size: NonZeroU32,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            url: "smtp://127.0.0.1:25".into(),
            from: Mailbox::new(
                Some("nudge".into()),
                "nudge@localhost".parse().expect("a valid address"),
            ),
            timeout_secs: nz!(30),
            pool_size: nz!(4),
        }
    }
}

/// A mailbox written as text (`Shop <hello@shop.example>`).
mod mailbox {
    use lettre::message::Mailbox;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Mailbox, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a mailbox: {e}")))
    }

    pub fn serialize<S: Serializer>(m: &Mailbox, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(m)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Smtp,
    File,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailConfig {
    /// `smtp`, or `file` to write `.eml` files into `dir`.
    pub transport: Transport,
    /// Folder for the file transport.
    pub dir: PathBuf,
    /// Key that signs unsubscribe links (16+ characters). Unset: a random
    /// key kept in the database.
    pub unsubscribe_secret: Option<Secret>,
    /// Marketing mails a client may get per day (0: no cap).
    pub max_marketing_per_day: u32,
    /// Marketing mails a client may get per week (0: no cap).
    pub max_marketing_per_week: u32,
    /// The share of clients (0 to 100, in percent) held out of all
    /// marketing mail as a global control group, chosen by a hash of the
    /// client id; reports show them as `global_control`.
    pub global_control_percent: f64,
    /// No marketing mail in these local hours of the client (their timezone,
    /// else the business one): deferred, not dropped. `null` turns it off.
    pub quiet_hours: Option<QuietHours>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuietHours {
    /// `HH:MM`, local time.
    #[serde(with = "hh_mm")]
    pub start: chrono::NaiveTime,
    /// `HH:MM`, local time.
    #[serde(with = "hh_mm")]
    pub end: chrono::NaiveTime,
}

/// A time of day written `21:00` (or `21:00:00`).
mod hh_mm {
    use chrono::NaiveTime;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NaiveTime, D::Error> {
        let s = String::deserialize(d)?;
        NaiveTime::parse_from_str(&s, "%H:%M")
            .or_else(|_| NaiveTime::parse_from_str(&s, "%H:%M:%S"))
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a time like 21:00")))
    }

    pub fn serialize<S: Serializer>(t: &NaiveTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&t.format("%H:%M"))
    }
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
            global_control_percent: 0.0,
            quiet_hours: Some(QuietHours {
                start: chrono::NaiveTime::from_hms_opt(21, 0, 0).expect("valid time"),
                end: chrono::NaiveTime::from_hms_opt(8, 0, 0).expect("valid time"),
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplatesConfig {
    /// Folder of `NAME.txt` + `NAME.html` templates.
    pub dir: PathBuf,
}

impl Default for TemplatesConfig {
    fn default() -> Self {
        Self {
            dir: "templates".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// How often the outbox is checked when idle, in ms.
    pub poll_ms: NonZeroU64,
    /// Mails sent at once.
    pub concurrency: NonZeroUsize,
    /// Attempts before a mail is marked failed; with the backoff, the
    /// default rides out an SMTP server that is down for about two hours.
    pub max_attempts: NonZeroU32,
    /// Mails sent per second at most (0: no limit).
    pub rate_per_sec: f64,
    /// First retry delay, doubled each attempt, in seconds.
    pub retry_base_secs: u64,
    /// How long a claimed mail is reserved for one sender, in seconds.
    pub lease_secs: NonZeroU64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            poll_ms: nz!(500),
            concurrency: nz!(4),
            max_attempts: nz!(12),
            rate_per_sec: 0.0,
            retry_base_secs: 2,
            lease_secs: nz!(120),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TeamConfig {
    /// Where the team's tasks are mailed.
    pub email: Email,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// How often due timers and schedules are checked, in ms.
    pub tick_ms: NonZeroU64,
    /// Clients per transaction when firing timers or sweeping. Each page
    /// takes its turn among the stream's batches, which wait behind it, so
    /// a large page shows in the stream's latency.
    pub page_size: NonZeroU32,
    /// How long one instance holds a sweep before another may take it over, in seconds.
    pub lease_secs: NonZeroU64,
    /// A missed schedule occurrence is still run when nudge comes back within this many hours.
    pub catch_up_hours: u32,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            tick_ms: nz!(1000),
            page_size: nz!(100),
            lease_secs: nz!(300),
            catch_up_hours: 24,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `nudge=debug` (checked at load).
    /// `RUST_LOG` wins when set.
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
