//! Building a MIME message from a rendered template and handing it to SMTP
//! (pooled, async) or to `.eml` files for trying nudge without a mail server.

use crate::config::{Config, SmtpConfig, Transport};
use crate::core::templates::Rendered;
use crate::domain::effects::MESSAGE_ID_MARK;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::sync::Arc;
use std::time::Duration;

pub enum Mailer {
    Smtp(SmtpMailer),
    File(AsyncFileTransport<Tokio1Executor>),
}

/// Pooled SMTP with a bound on each send. lettre's own timeout covers only
/// connecting, and a send cancelled half-way puts its connection back in the
/// pool as if it were healthy, still waiting for the server's answer: the
/// next mail to take it would hang as well. So a send that times out
/// replaces the whole pool, and no other mail is ever handed that connection.
pub struct SmtpMailer {
    config: SmtpConfig,
    timeout: Duration,
    transport: std::sync::Mutex<Arc<AsyncSmtpTransport<Tokio1Executor>>>,
}

impl SmtpMailer {
    fn new(config: &SmtpConfig) -> Result<Self, lettre::transport::smtp::Error> {
        Ok(Self {
            transport: std::sync::Mutex::new(Arc::new(smtp_transport(config)?)),
            timeout: Duration::from_secs(config.timeout_secs.get()),
            config: config.clone(),
        })
    }

    fn current(&self) -> Arc<AsyncSmtpTransport<Tokio1Executor>> {
        self.transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Swaps in a fresh pool, unless another timed-out send already did.
    fn discard(&self, stuck: &Arc<AsyncSmtpTransport<Tokio1Executor>>) {
        let mut t = self.transport.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&t, stuck) {
            match smtp_transport(&self.config) {
                Ok(fresh) => *t = Arc::new(fresh),
                Err(e) => tracing::error!(error = %e, "cannot rebuild the SMTP transport"),
            }
        }
    }

    async fn send(&self, message: Message) -> Result<(), SendError> {
        let transport = self.current();
        match tokio::time::timeout(self.timeout, transport.send(message)).await {
            Ok(sent) => sent.map(|_| ()).map_err(|e| SendError {
                // Connection problems and 4xx replies may pass; 5xx replies will not.
                transient: !e.is_permanent(),
                message: e.to_string(),
            }),
            Err(_) => {
                self.discard(&transport);
                Err(SendError {
                    transient: true,
                    message: format!(
                        "send timed out after {} s (smtp.timeout_secs)",
                        self.timeout.as_secs()
                    ),
                })
            }
        }
    }
}

/// Why a send did not happen; `transient` failures are retried.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SendError {
    pub transient: bool,
    pub message: String,
}

pub fn smtp_transport(
    smtp: &SmtpConfig,
) -> Result<AsyncSmtpTransport<Tokio1Executor>, lettre::transport::smtp::Error> {
    Ok(
        AsyncSmtpTransport::<Tokio1Executor>::from_url(smtp.url.expose())?
            .timeout(Some(Duration::from_secs(smtp.timeout_secs.get())))
            .pool_config(PoolConfig::new().max_size(smtp.pool_size.get()))
            .build(),
    )
}

impl Mailer {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        Ok(match config.mail.transport {
            Transport::Smtp => Mailer::Smtp(SmtpMailer::new(&config.smtp)?),
            Transport::File => {
                std::fs::create_dir_all(&config.mail.dir).map_err(|e| {
                    anyhow::anyhow!("cannot create mail.dir {}: {e}", config.mail.dir.display())
                })?;
                Mailer::File(AsyncFileTransport::new(&config.mail.dir))
            }
        })
    }

    pub async fn send(&self, message: Message) -> Result<(), SendError> {
        match self {
            Mailer::Smtp(m) => m.send(message).await,
            Mailer::File(t) => t.send(message).await.map(|_| ()).map_err(|e| SendError {
                transient: true,
                message: format!("writing the mail file: {e}"),
            }),
        }
    }
}

/// What goes into one message besides the rendered parts.
pub struct Envelope<'a> {
    pub from: &'a Mailbox,
    pub to: &'a str,
    pub message_id: &'a str,
    pub rule: &'a str,
    pub template: &'a str,
    /// For marketing mail: the one-click unsubscribe URL (RFC 8058).
    pub unsubscribe: Option<&'a str>,
    /// A staff task mail: marked automatic (RFC 3834) so that out-of-office
    /// replies and auto-forwarders leave it alone.
    pub staff: bool,
}

/// A `multipart/alternative` message with the contract's headers.
pub fn build_message(env: &Envelope<'_>, mail: &Rendered) -> Result<Message, SendError> {
    let permanent = |message: String| SendError {
        transient: false,
        message,
    };
    let to: Mailbox = env
        .to
        .parse()
        .map_err(|e| permanent(format!("bad recipient {:?}: {e}", env.to)))?;
    let mut builder = Message::builder()
        .from(env.from.clone())
        .to(to)
        .subject(mail.subject.clone())
        .message_id(Some(env.message_id.to_string()))
        .raw_header(header("X-Nudge-Rule", env.rule))
        .raw_header(header("X-Nudge-Template", env.template));
    if let Some(url) = env.unsubscribe {
        builder = builder
            .raw_header(header("List-Id", &list_id(env)))
            .raw_header(header("List-Unsubscribe", &format!("<{url}>")))
            .raw_header(header(
                "List-Unsubscribe-Post",
                "List-Unsubscribe=One-Click",
            ));
    }
    if env.staff {
        builder = builder
            .raw_header(header("Auto-Submitted", "auto-generated"))
            .raw_header(header("X-Auto-Response-Suppress", "All"));
    }
    builder
        .multipart(MultiPart::alternative_plain_html(
            mail.text.clone(),
            mail.html.clone(),
        ))
        .map_err(|e| permanent(format!("cannot build the message: {e}")))
}

/// `"<template> (<rule>)" <rule.template.nudge.domain>` (RFC 2919): one list
/// per rule and template, so filters and complaint loops can tell the
/// campaigns apart, under the sender's domain.
fn list_id(env: &Envelope<'_>) -> String {
    // A List-Id label is a dot-atom: keep names to letters, digits, `-`, `_`.
    let label = |s: &str| -> String {
        let l: String = s
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        if l.is_empty() { "x".into() } else { l }
    };
    let (rule, template) = (label(env.rule), label(env.template));
    format!(
        "\"{template} ({rule})\" <{rule}.{template}.nudge.{}>",
        env.from.email.domain()
    )
}

/// A value for a URL's path segment or fragment: everything but RFC 3986's
/// unreserved characters percent-encoded (UTF-8), so an id with `&`, `#`, a
/// space or `/` stays one value (`decodeURIComponent` gives it back).
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Rule and template names come from file stems: keep them to safe header text.
fn header(name: &'static str, value: &str) -> HeaderValue {
    let clean: String = value
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .collect();
    HeaderValue::new(HeaderName::new_from_ascii_str(name), clean)
}

/// `<key.nudge@domain>`: derived from the effect key, so a resend after a
/// crash carries the same id and can be recognised downstream, and an open or
/// a click that names it can be tied back to its rule and template.
pub fn message_id(key: &str, from: &Mailbox) -> String {
    format!("<{key}{MESSAGE_ID_MARK}{}>", from.email.domain())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_an_id_one_value() {
        assert_eq!(percent_encode("a&b c#d/é"), "a%26b%20c%23d%2F%C3%A9");
        assert_eq!(percent_encode("plain-id_1.2~"), "plain-id_1.2~");
    }

    #[test]
    fn list_ids_are_dot_atoms_under_the_senders_domain() {
        let from: Mailbox = "Shop <hello@shop.example>".parse().unwrap();
        let env = Envelope {
            from: &from,
            to: "a@b.c",
            message_id: "<x@y>",
            rule: "browse discount!",
            template: "browse_discount",
            unsubscribe: None,
            staff: false,
        };
        assert_eq!(
            list_id(&env),
            "\"browse_discount (browse-discount-)\" <browse-discount-.browse_discount.nudge.shop.example>"
        );
    }
}
