//! Signed webhooks: a `webhook` effect posted as JSON to `webhooks.<name>`,
//! signed per the Standard Webhooks specification: `webhook-id` is the
//! effect key (the same on every retry, so the receiver can drop a
//! repeat), `webhook-timestamp` the time of the attempt, and
//! `webhook-signature` `v1,` and the base64 HMAC-SHA256 of
//! `id.timestamp.body` under the decoded `whsec_` secret.
//!
//! Also the small HTTP/1.1 client the webhooks and the text gateway share:
//! hyper's connection API over a fresh TCP (or rustls, with the webpki
//! roots) connection per request, under one timeout that covers
//! connecting, sending and reading the answer. Posts are few and bounded
//! by `delivery.concurrency`, so a pool would save little.

use super::Sender;
use super::mailer::SendError;
use crate::config::{Config, SmsConfig, WebhookConfig};
use crate::core::decide::forward_key;
use crate::domain::effects::{Effect, EffectKind};
use crate::domain::event::ClientId;
use crate::store::{Delivery, OutboxItem, StoreError, Texts};
use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// The most of an answer read: enough for an error text or a gateway's
/// message id; a receiver that answers with more is cut off there.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The signature header's value for one attempt.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("v1,{sig}")
}

/// The body of a webhook, in the shape the specification suggests: what
/// happened (`type`), when (the effect's event time) and its `data`.
pub fn body(item: &OutboxItem, event_type: &str, at: &str, payload: &Value) -> Vec<u8> {
    let v = json!({
        "type": event_type,
        "timestamp": at,
        "rule": item.rule,
        "client_id": item.client_id,
        "data": payload,
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

impl Sender {
    /// Posts one webhook effect; the answer decides: 2xx sent, 5xx, 408,
    /// 429 or no answer retried, any other status failed for good.
    pub(super) async fn send_webhook(
        &self,
        item: &OutboxItem,
        name: &str,
        event_type: &str,
        at: &chrono::DateTime<chrono::Utc>,
        payload: &Value,
    ) -> Result<(), SendError> {
        let Some(hook) = self.channels.webhooks.get(name) else {
            return Err(SendError {
                transient: false,
                message: format!("no webhook `{name}` in the configuration"),
            });
        };
        let body = body(item, event_type, &at.to_rfc3339(), payload);
        self.wait_for_rate_slot().await;
        let timestamp = (self.clock)().timestamp();
        let signature = sign(hook.secret.key(), &item.key, timestamp, &body);
        let headers = [
            ("content-type", "application/json".to_string()),
            ("webhook-id", item.key.clone()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", signature),
        ];
        let timeout = Duration::from_secs(hook.timeout_secs.get());
        let answer = post(hook.url.as_str(), &headers, body, timeout).await?;
        answer.judge("the webhook receiver")
    }
}

/// The configured webhooks and the text gateway, as the sender uses them.
#[derive(Debug, Default)]
pub struct Channels {
    pub webhooks: BTreeMap<String, WebhookConfig>,
    pub sms: SmsConfig,
    /// Happening -> the webhooks it is forwarded to.
    forward: BTreeMap<String, Vec<String>>,
}

impl Channels {
    pub fn from_config(config: &Config) -> Self {
        Self {
            webhooks: config.webhooks.clone(),
            sms: config.sms.clone(),
            forward: crate::config::channel_settings(&config.webhooks).forward,
        }
    }

    /// Whether a webhook wants to hear of mails sent or failed.
    pub fn forwards_mail(&self) -> bool {
        self.forward.contains_key("mail_sent") || self.forward.contains_key("mail_failed")
    }
}

impl Sender {
    /// The metrics of one kind of effect: sent, retried, failed.
    pub(super) fn counters(&self, kind: &EffectKind) -> [&AtomicU64; 3] {
        let m = &self.metrics;
        match kind {
            EffectKind::Mail { .. } | EffectKind::Task { .. } => {
                [&m.mails_sent, &m.mails_retried, &m.mails_failed]
            }
            EffectKind::Emit { .. } => [&m.emits_published, &m.emits_retried, &m.emits_failed],
            EffectKind::Webhook { .. } => {
                [&m.webhooks_sent, &m.webhooks_retried, &m.webhooks_failed]
            }
            EffectKind::Sms { .. } => [&m.texts_sent, &m.texts_retried, &m.texts_failed],
        }
    }

    /// Queues `mail_sent` / `mail_failed` for the webhooks that want them,
    /// for the mails (client and task mails) of a round that went out or
    /// failed for good. `claimed` and `outcomes` are in the same order.
    pub(super) async fn forward_outcomes(
        &self,
        claimed: &[OutboxItem],
        outcomes: &[Delivery],
    ) -> Result<(), StoreError> {
        let mut effects = Vec::new();
        for (item, outcome) in claimed.iter().zip(outcomes) {
            let (happening, mut data) = match outcome {
                Delivery::Sent { message_id, .. } => {
                    ("mail_sent", json!({"message_id": message_id}))
                }
                Delivery::Failed { error, .. } => ("mail_failed", json!({"error": error})),
                _ => continue,
            };
            let Ok(kind) = serde_json::from_value::<EffectKind>(item.payload.clone()) else {
                continue;
            };
            let (template, to) = match &kind {
                EffectKind::Mail { template, to, .. } => (template.as_str(), to.as_str()),
                EffectKind::Task { to, .. } => (super::TASK_TEMPLATE, to.as_str()),
                _ => continue,
            };
            let Ok(client_id) = ClientId::parse(item.client_id.clone()) else {
                continue;
            };
            data["template"] = json!(template);
            data["to"] = json!(to);
            data["mail_key"] = json!(item.key);
            let at = (self.clock)();
            for name in self.channels.forward.get(happening).into_iter().flatten() {
                effects.push(Effect {
                    key: forward_key(name, happening, &item.key),
                    rule: item.rule.clone(),
                    client_id: client_id.clone(),
                    cause: item.cause.clone(),
                    at,
                    kind: EffectKind::Webhook {
                        name: name.clone(),
                        event_type: happening.replacen('_', ".", 1),
                        at,
                        payload: data.clone(),
                    },
                });
            }
        }
        self.store.queue_effects(&effects).await
    }
}

/// What a server answered.
pub(super) struct Answer {
    pub status: StatusCode,
    pub body: String,
}

impl Answer {
    /// 2xx is done; 5xx, 408 and 429 are worth another try; any other
    /// status (a 4xx, or a redirect, which is not followed) will not change.
    pub fn judge(&self, who: &str) -> Result<(), SendError> {
        let s = self.status;
        if s.is_success() {
            return Ok(());
        }
        let transient = s.is_server_error()
            || s == StatusCode::REQUEST_TIMEOUT
            || s == StatusCode::TOO_MANY_REQUESTS;
        let text: String = self.body.chars().take(200).collect();
        Err(SendError {
            transient,
            message: format!("{who} answered {s}: {}", text.trim()),
        })
    }
}

/// POSTs `body` to `url` with `headers`, all within `timeout`. Failing to
/// connect, a TLS error or the timeout are transient; a URL nudge cannot
/// use is not.
pub(super) async fn post(
    url: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Answer, SendError> {
    let permanent = |message: String| SendError {
        transient: false,
        message,
    };
    let transient = |message: String| SendError {
        transient: true,
        message,
    };
    let uri: Uri = url
        .parse()
        .map_err(|e| permanent(format!("bad URL: {e}")))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri
        .host()
        .ok_or_else(|| permanent("the URL has no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = uri
        .authority()
        .map(|a| {
            a.as_str()
                .rsplit('@')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default();
    let mut req = Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, authority)
        .header(hyper::header::USER_AGENT, "nudge");
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| permanent(format!("cannot build the request: {e}")))?;
    let exchange = async {
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| transient(format!("connecting to {host}:{port}: {e}")))?;
        if https {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| permanent(format!("{host}: {e}")))?;
            let tls = tls()
                .connect(name, tcp)
                .await
                .map_err(|e| transient(format!("TLS with {host}: {e}")))?;
            exchange(tls, req).await
        } else {
            exchange(tcp, req).await
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| transient(format!("no answer from {host}:{port} within {timeout:?}")))?
}

async fn exchange<T>(io: T, req: Request<Full<Bytes>>) -> Result<Answer, SendError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let transient = |message: String| SendError {
        transient: true,
        message,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| transient(format!("HTTP handshake: {e}")))?;
    // The connection is driven beside the request; it ends with the answer.
    let driver = tokio::spawn(conn);
    let answer = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| transient(format!("sending: {e}")))?;
        let status = resp.status();
        // A cut-off answer still says what the status says.
        let body = match Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
        {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            Err(_) => String::new(),
        };
        Ok(Answer { status, body })
    }
    .await;
    driver.abort();
    answer
}

/// The TLS client configuration: rustls with ring (as lettre's SMTP uses)
/// and the Mozilla roots of webpki-roots, built once.
fn tls() -> tokio_rustls::TlsConnector {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Arc::new(config)
    });
    tokio_rustls::TlsConnector::from(config.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_specifications_example() {
        // The example of the Standard Webhooks specification (and of its
        // reference libraries' tests).
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn answers_are_judged_as_the_specification_asks() {
        let judge = |code: u16| {
            Answer {
                status: StatusCode::from_u16(code).unwrap(),
                body: "x".into(),
            }
            .judge("r")
        };
        assert!(judge(200).is_ok() && judge(204).is_ok());
        for code in [500, 502, 503, 408, 429] {
            assert!(judge(code).unwrap_err().transient, "{code}");
        }
        for code in [400, 401, 404, 410, 301] {
            assert!(!judge(code).unwrap_err().transient, "{code}");
        }
    }
}
