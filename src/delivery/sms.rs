//! Text messages: an `sms` effect rendered from `templates/NAME.sms` at
//! send time (a fixed template reaches texts still waiting), held back
//! during the client's quiet hours like marketing mail, and posted to the
//! gateway in the shape of Twilio's Messages API: a form with `To`,
//! `From` and `Body`, basic auth with the account and token, and the
//! effect key as Twilio's idempotency token, so a retry after a lost
//! answer is not sent twice by a gateway that honours it.

use super::Sender;
use super::mailer::SendError;
use super::webhook::post;
use crate::core::texts::TextKind;
use crate::domain::event::ClientId;
use crate::domain::phone::Phone;
use crate::store::{OutboxItem, State, Texts};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// What became of a text that did not fail.
pub(super) enum TextSent {
    /// The gateway took it: its message id (Twilio's `sid`), else the key.
    Done(String),
    /// Not now: the client's quiet hours, until then.
    Deferred(DateTime<Utc>),
}

impl Sender {
    pub(super) async fn send_sms(
        &self,
        item: &OutboxItem,
        template: &str,
        to: &Phone,
        vars: &Map<String, Value>,
    ) -> Result<TextSent, SendError> {
        let permanent = |message: String| SendError {
            transient: false,
            message,
        };
        let transient = |message: String| SendError {
            transient: true,
            message,
        };
        let templates = self.catalog.templates();
        let kind = templates
            .texts
            .kind(template)
            .ok_or_else(|| permanent(format!("no text template `{template}.sms`")))?;
        let body = templates
            .texts
            .render(template, vars)
            .map_err(|e| permanent(e.to_string()))?;
        if kind == TextKind::Marketing
            && let Some(until) = self.quiet_until(vars)
        {
            return Ok(TextSent::Deferred(until));
        }
        // A reply STOP may have come in since the text was decided: it wins.
        let client =
            ClientId::parse(item.client_id.clone()).map_err(|e| permanent(e.to_string()))?;
        let states = self
            .store
            .load_clients(&[&client])
            .await
            .map_err(|e| transient(format!("reading the client's consent: {e}")))?;
        if !states.get(&client).is_some_and(|c| c.profile.sms_consent) {
            return Err(permanent(
                "the client withdrew consent to texts before this one went out".into(),
            ));
        }
        let sms = &self.channels.sms;
        let (Some(url), Some(account), Some(token), Some(from)) =
            (&sms.url, &sms.account, &sms.token, &sms.from)
        else {
            return Err(transient("no text gateway configured (sms.url)".into()));
        };
        // Noted before sending, so a STOP in answer always finds the client.
        self.store
            .note_text_number(to, &item.client_id)
            .await
            .map_err(|e| transient(format!("noting the number: {e}")))?;
        let form = serde_urlencoded::to_string([
            ("To", to.as_str()),
            ("From", from.as_str()),
            ("Body", body.as_str()),
        ])
        .map_err(|e| permanent(e.to_string()))?;
        let auth = base64::engine::general_purpose::STANDARD
            .encode(format!("{account}:{}", token.expose()));
        let headers = [
            (
                "content-type",
                "application/x-www-form-urlencoded".to_string(),
            ),
            ("authorization", format!("Basic {auth}")),
            ("i-twilio-idempotency-token", item.key.clone()),
        ];
        self.wait_for_rate_slot().await;
        let answer = post(url.as_str(), &headers, form.into_bytes(), sms.timeout()).await?;
        answer.judge("the text gateway")?;
        let sid = serde_json::from_str::<Value>(&answer.body)
            .ok()
            .and_then(|v| v.get("sid").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| item.key.clone());
        Ok(TextSent::Done(sid))
    }
}
