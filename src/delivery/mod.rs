//! The outbox sender: claims due mails, renders them with the templates in
//! force, sends them, and records the outcome. A small loop over one fallible
//! step ([`Sender::send_due`]); the loop only decides how long to wait.
//!
//! A mail is marked sent only after the server accepted it. If nudge dies in
//! between, the lease runs out and the mail is sent again with the same
//! `Message-ID`: at most the mails in flight can be doubled, and each double
//! is recognisable.

pub mod mailer;
pub mod sms;
pub mod unsubscribe;
pub mod webhook;

use crate::config::QuietHours;
use crate::config::{Config, DeliveryConfig};
use crate::core::templates::MailKind;
use crate::delivery::unsubscribe::Signer;
use crate::domain::effects::EffectKind;
use crate::domain::event::{ClientId, EventId};
use crate::domain::log::{Level, LogEntry};
use crate::flow::catalog::Catalog;
use crate::flow::live::{Live, LiveItem};
use crate::metrics::Metrics;
use crate::store::{AnyStore, Delivery, Outbox, OutboxItem, State, StoreError};
use chrono::{DateTime, Duration as ChronoDuration, TimeZone, Utc};
use chrono_tz::Tz;
use lettre::message::Mailbox;
use mailer::{Mailer, SendError, build_message, message_id};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The template staff task mails are rendered with (`templates/staff_task.*`).
pub const TASK_TEMPLATE: &str = "staff_task";

pub struct Sender {
    store: AnyStore,
    catalog: Arc<Catalog>,
    mailer: Mailer,
    from: Mailbox,
    cfg: DeliveryConfig,
    metrics: Arc<Metrics>,
    /// Where secondary events are published; `None` in one-shot commands.
    nats: Option<async_nats::Client>,
    emit_prefix: String,
    public_url: String,
    signer: Arc<Signer>,
    quiet_hours: Option<QuietHours>,
    business_tz: Tz,
    clock: Clock,
    /// Mails sent and failed go to the staff page's live feed.
    live: Live,
    /// The earliest time the next send may start, for `delivery.rate_per_sec`.
    next_slot: tokio::sync::Mutex<tokio::time::Instant>,
    /// Cancelled when nudge stops: recording an outcome stops retrying then.
    stop: CancellationToken,
    /// Webhooks and the text gateway (`webhook.rs`, `sms.rs`).
    channels: Arc<webhook::Channels>,
}

/// What one pass over the outbox did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing was due.
    Idle,
    /// This many mails were handled (sent, retried or failed).
    Handled(usize),
}

impl Sender {
    pub fn new(
        config: &Config,
        store: AnyStore,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
        nats: Option<async_nats::Client>,
        signer: Arc<Signer>,
        clock: Clock,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            store,
            catalog,
            mailer: Mailer::from_config(config)?,
            from: config.smtp.from.clone(),
            cfg: config.delivery.clone(),
            metrics,
            nats,
            emit_prefix: config.nats.emit_prefix.clone(),
            public_url: config.http.public_url.trim_end_matches('/').to_string(),
            signer,
            quiet_hours: config.mail.quiet_hours,
            business_tz: config.history.business_tz(),
            clock,
            next_slot: tokio::sync::Mutex::new(tokio::time::Instant::now()),
            live: Live::default(),
            stop: CancellationToken::new(),
            channels: Arc::new(webhook::Channels::from_config(config)),
        })
    }

    pub fn with_live(mut self, live: Live) -> Self {
        self.live = live;
        self
    }

    /// Runs until cancelled; wakes on `wake` (new effects committed) or every `poll_ms`.
    pub async fn run(mut self, wake: Arc<Notify>, cancel: CancellationToken) {
        self.stop = cancel.clone();
        let idle = Duration::from_millis(self.cfg.poll_ms.get());
        let mut failures = 0u32;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let pause = match self.send_due().await {
                Ok(Outcome::Handled(_)) => {
                    failures = 0;
                    continue;
                }
                Ok(Outcome::Idle) => {
                    failures = 0;
                    idle
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!(error = %e, "outbox sender: database error");
                    idle * failures.min(20)
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Claims due mails and sends them, `concurrency` at a time, then
    /// records what became of all of them in one transaction: one commit
    /// per round rather than per mail. A mail the server took waits for the
    /// slowest of its round before it is recorded, so a crash in between can
    /// send at most one round again (with the same Message-IDs), the mails
    /// that were in flight anyway.
    pub async fn send_due(&self) -> Result<Outcome, StoreError> {
        let now = (self.clock)();
        let lease = now + ChronoDuration::seconds(self.cfg.lease_secs.get() as i64);
        let items = self
            .store
            .claim_due(now, lease, self.cfg.concurrency.get() as u32)
            .await?;
        if items.is_empty() {
            return Ok(Outcome::Idle);
        }
        let n = items.len();
        let claimed = if self.channels.forwards_mail() {
            items.clone()
        } else {
            Vec::new()
        };
        let outcomes = futures::future::join_all(items.into_iter().map(|i| self.deliver(i))).await;
        // Queued before the outcomes are recorded, under keys derived from
        // the mails': a crash in between sends the mail again and finds
        // the forward already there, never missing nor doubled.
        self.forward_outcomes(&claimed, &outcomes).await?;
        self.record(&outcomes).await?;
        Ok(Outcome::Handled(n))
    }

    /// Sends one claimed item and says what became of it.
    #[tracing::instrument(skip_all, fields(key = %item.key, rule = %item.rule, client_id = %item.client_id))]
    async fn deliver(&self, item: OutboxItem) -> Delivery {
        let log = |level, message: String| LogEntry {
            client_id: ClientId::parse(item.client_id.clone())
                .unwrap_or_else(|_| ClientId::parse("unknown").expect("valid id")),
            at: (self.clock)(),
            level,
            rule: Some(item.rule.clone()),
            event_id: EventId::parse(item.cause.clone()).ok(),
            message,
        };
        let kind: EffectKind = match serde_json::from_value(item.payload.clone()) {
            Ok(k) => k,
            Err(e) => {
                let why = format!("unreadable outbox payload: {e}");
                return Delivery::Failed {
                    log: log(Level::Error, why.clone()),
                    key: item.key,
                    error: why,
                };
            }
        };
        let [sent, retried, failed] = self.counters(&kind);
        let (what, result) = match kind {
            EffectKind::Mail { template, to, vars } => {
                let mid = message_id(&item.key, &self.from);
                match self
                    .send_mail(&item, &template, &to, &vars, &mid, false)
                    .await
                {
                    Ok(Sent::Deferred(until)) => {
                        self.metrics.mails_deferred.fetch_add(1, Relaxed);
                        tracing::info!(template, to, %until, "marketing mail deferred: quiet hours");
                        return Delivery::Deferred {
                            key: item.key,
                            due_at: until,
                            why: format!("deferred to {until}: quiet hours of the client"),
                        };
                    }
                    r => (format!("mail `{template}` to {to}"), r.map(|_| mid)),
                }
            }
            EffectKind::Task {
                team,
                title,
                to,
                data,
            } => {
                let mid = message_id(&item.key, &self.from);
                let mut vars = serde_json::Map::new();
                vars.insert("team".into(), team.clone().into());
                vars.insert("title".into(), title.clone().into());
                vars.insert("client_id".into(), item.client_id.clone().into());
                vars.insert(
                    "client_url".into(),
                    format!(
                        "{}/#client={}",
                        self.public_url,
                        mailer::percent_encode(&item.client_id)
                    )
                    .into(),
                );
                vars.insert("data".into(), data.into());
                let r = self
                    .send_mail(&item, TASK_TEMPLATE, &to, &vars, &mid, true)
                    .await;
                (format!("task mail to {team} ({to})"), r.map(|_| mid))
            }
            EffectKind::Webhook {
                name,
                event_type,
                at,
                payload,
            } => {
                let r = self
                    .send_webhook(&item, &name, &event_type, &at, &payload)
                    .await;
                (
                    format!("webhook `{name}` ({event_type})"),
                    r.map(|_| item.key.clone()),
                )
            }
            EffectKind::Sms { template, to, vars } => {
                match self.send_sms(&item, &template, &to, &vars).await {
                    Ok(sms::TextSent::Deferred(until)) => {
                        self.metrics.texts_deferred.fetch_add(1, Relaxed);
                        tracing::info!(template, %to, %until, "marketing text deferred: quiet hours");
                        return Delivery::Deferred {
                            key: item.key,
                            due_at: until,
                            why: format!("deferred to {until}: quiet hours of the client"),
                        };
                    }
                    Ok(sms::TextSent::Done(sid)) => (format!("text `{template}` to {to}"), Ok(sid)),
                    Err(e) => (format!("text `{template}` to {to}"), Err(e)),
                }
            }
            EffectKind::Emit { event_type, event } => {
                let r = self.publish(&event_type, &event).await;
                let id = event["id"].as_str().unwrap_or_default().to_string();
                (format!("event `{event_type}`"), r.map(|_| id))
            }
        };
        match result {
            Ok(id) => {
                tracing::info!(what, "delivered");
                sent.fetch_add(1, Relaxed);
                self.announce(&item, format!("{what} sent"));
                Delivery::Sent {
                    log: log(Level::Notice, format!("{what} sent")),
                    key: item.key,
                    message_id: id,
                    at: Utc::now(),
                }
            }
            Err(e) if e.transient && item.attempts < self.cfg.max_attempts.get() => {
                retried.fetch_add(1, Relaxed);
                let delay = backoff(self.cfg.retry_base_secs, item.attempts);
                tracing::warn!(what, error = %e, attempt = item.attempts, retry_in_secs = delay.num_seconds(), "not delivered, will retry");
                Delivery::Retry {
                    key: item.key,
                    due_at: (self.clock)() + delay,
                    error: e.message,
                }
            }
            Err(e) => {
                tracing::error!(what, error = %e, attempt = item.attempts, "delivery failed");
                failed.fetch_add(1, Relaxed);
                let why = format!("{what} failed: {}", e.message);
                self.announce(&item, why.clone());
                Delivery::Failed {
                    log: log(Level::Error, why),
                    key: item.key,
                    error: e.message,
                }
            }
        }
    }

    /// Records what became of claimed mails. They have left (or failed)
    /// already: while the database is away, keep trying until it is back,
    /// rather than let the lease run out and the mails go out again. Gives
    /// up only when nudge stops (the mails are then sent again after the
    /// restart, with the same Message-IDs).
    async fn record(&self, outcomes: &[Delivery]) -> Result<(), StoreError> {
        let mut pause = Duration::from_millis(100);
        loop {
            match self.store.record_deliveries(outcomes).await {
                Err(e) if e.is_outage() && !self.stop.is_cancelled() => {
                    tracing::warn!(error = %e, retry_in = ?pause, "cannot record deliveries yet: database unavailable");
                    tokio::select! {
                        _ = self.stop.cancelled() => return Err(e),
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                r => return r,
            }
        }
    }

    fn announce(&self, item: &OutboxItem, text: String) {
        self.live.send(LiveItem {
            kind: "mail",
            client_id: item.client_id.clone(),
            at: (self.clock)(),
            text,
            id: None,
            team: None,
            board: None,
        });
    }

    /// Publishes a secondary event, with `Nats-Msg-Id` set to its id.
    async fn publish(&self, event_type: &str, event: &serde_json::Value) -> Result<(), SendError> {
        let transient = |message: String| SendError {
            transient: true,
            message,
        };
        let Some(client) = &self.nats else {
            return Err(transient("no NATS connection in this process".into()));
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", event["id"].as_str().unwrap_or_default());
        let payload = serde_json::to_vec(event).map_err(|e| transient(e.to_string()))?;
        client
            .publish_with_headers(
                format!("{}.{event_type}", self.emit_prefix),
                headers,
                payload.into(),
            )
            .await
            .map_err(|e| transient(format!("publishing: {e}")))?;
        // Published means the server has it, not that it sits in a buffer here.
        client
            .flush()
            .await
            .map_err(|e| transient(format!("flushing: {e}")))
    }

    async fn send_mail(
        &self,
        item: &OutboxItem,
        template: &str,
        to: &str,
        vars: &serde_json::Map<String, serde_json::Value>,
        mid: &str,
        staff: bool,
    ) -> Result<Sent, SendError> {
        let client = ClientId::parse(item.client_id.clone()).map_err(|e| SendError {
            transient: false,
            message: e.to_string(),
        })?;
        let unsubscribe = self.signer.url(&self.public_url, &client);
        let mut vars = vars.clone();
        vars.insert("unsubscribe_url".into(), unsubscribe.clone().into());
        // Staff read task mails in the page's language; a client in theirs.
        let locale = if staff {
            None
        } else {
            self.client_locale(&client, &vars).await
        };
        vars.insert("lang".into(), lang_tag(locale.as_deref()).into());
        // Rendered at send time with the templates in force: a fix to a
        // template reaches mails still waiting for a retry.
        let rendered = render_mail(&self.catalog.templates(), template, vars.clone())?;
        let marketing = rendered.kind == MailKind::Marketing;
        if marketing && let Some(until) = self.quiet_until(&vars) {
            return Ok(Sent::Deferred(until));
        }
        let message = build_message(
            &mailer::Envelope {
                from: &self.from,
                to,
                message_id: mid,
                rule: &item.rule,
                template,
                unsubscribe: marketing.then_some(unsubscribe.as_str()),
                staff,
            },
            &rendered,
        )?;
        self.wait_for_rate_slot().await;
        self.mailer.send(message).await.map(|_| Sent::Done)
    }

    /// The client's locale: the mail's own `locale` variable if the rule
    /// gave one, else the profile's. A lookup that fails sends the mail in
    /// the default language rather than hold it back.
    async fn client_locale(
        &self,
        client: &ClientId,
        vars: &serde_json::Map<String, serde_json::Value>,
    ) -> Option<String> {
        if let Some(l) = vars.get("locale").and_then(|v| v.as_str()) {
            return Some(l.to_string());
        }
        match self.store.load_clients(&[client]).await {
            Ok(states) => states.get(client).and_then(|c| c.profile.locale.clone()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the client's locale; the mail says lang=\"en\"");
                None
            }
        }
    }

    /// When the client's quiet hours end, if they are in them now. The
    /// client's timezone comes with the mail; else the business one.
    fn quiet_until(
        &self,
        vars: &serde_json::Map<String, serde_json::Value>,
    ) -> Option<DateTime<Utc>> {
        let q = self.quiet_hours?;
        let tz: Tz = vars
            .get("timezone")
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse().ok())
            .unwrap_or(self.business_tz);
        let local = (self.clock)().with_timezone(&tz);
        if !q.contains(local.time()) {
            return None;
        }
        let mut day = local.date_naive();
        if local.time() >= q.end {
            day = day.succ_opt()?;
        }
        tz.from_local_datetime(&day.and_time(q.end))
            .earliest()
            .map(|t| t.with_timezone(&Utc))
    }

    /// Spaces sends out to `delivery.rate_per_sec`.
    async fn wait_for_rate_slot(&self) {
        if self.cfg.rate_per_sec <= 0.0 {
            return;
        }
        let gap = Duration::from_secs_f64(1.0 / self.cfg.rate_per_sec);
        let start = {
            let mut next = self.next_slot.lock().await;
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + gap;
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// Renders a mail twice over: the subject first, then the parts with the
/// subject as `subject` (the HTML part's `<title>`). `vars` should carry
/// `lang`. Shared with `nudge`'s spam check, which renders each shipped
/// template as the sender does.
pub fn render_mail(
    templates: &crate::core::templates::TemplateSet,
    template: &str,
    mut vars: serde_json::Map<String, serde_json::Value>,
) -> Result<crate::core::templates::Rendered, SendError> {
    let permanent = |e: crate::core::templates::RenderError| SendError {
        transient: false,
        message: e.to_string(),
    };
    vars.entry("lang").or_insert_with(|| lang_tag(None).into());
    let first = templates.render(template, &vars).map_err(permanent)?;
    vars.insert("subject".into(), first.subject.clone().into());
    templates.render(template, &vars).map_err(permanent)
}

/// An HTML `lang` value from a profile's locale (`de_DE` -> `de-DE`):
/// letters, digits and hyphens only, "en" when there is none.
pub fn lang_tag(locale: Option<&str>) -> String {
    let tag: String = locale
        .unwrap_or("")
        .trim()
        .chars()
        .map(|c| if c == '_' { '-' } else { c })
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(35)
        .collect();
    let tag = tag.trim_matches('-');
    if tag.is_empty() || !tag.starts_with(|c: char| c.is_ascii_alphabetic()) {
        "en".into()
    } else {
        tag.to_string()
    }
}

/// What became of a mail that did not fail.
enum Sent {
    Done,
    /// Not now: quiet hours of the client until then.
    Deferred(DateTime<Utc>),
}

/// The time source of the sender: the wall clock, or a test's.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

/// `base * 2^(attempt-1)`, capped at an hour, with up to 25% jitter so that
/// mails failing together do not retry together.
fn backoff(base_secs: u64, attempt: u32) -> ChronoDuration {
    let exp = base_secs.saturating_mul(1u64 << attempt.saturating_sub(1).min(16));
    let capped = exp.clamp(1, 3600) as i64;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as i64)
        .unwrap_or(0);
    let jitter_ms = (capped * 250 * (nanos % 1000)) / 1000;
    ChronoDuration::milliseconds(capped * 1000 + jitter_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lang_tags_come_from_locales_and_default_to_en() {
        assert_eq!(lang_tag(Some("de_DE")), "de-DE");
        assert_eq!(lang_tag(Some("fr")), "fr");
        assert_eq!(lang_tag(Some("\"><script>")), "script");
        assert_eq!(lang_tag(Some("")), "en");
        assert_eq!(lang_tag(None), "en");
        assert_eq!(lang_tag(Some("--")), "en");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let a = backoff(2, 1).num_milliseconds();
        let b = backoff(2, 3).num_milliseconds();
        assert!((2000..=2500).contains(&a), "{a}");
        assert!((8000..=10000).contains(&b), "{b}");
        assert!(backoff(2, 40).num_seconds() <= 4500);
    }
}
