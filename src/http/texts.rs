//! The text gateway's inbound webhook: a reply to one of nudge's texts,
//! posted the way Twilio posts it (a form with `From`, `Body`,
//! `MessageSid`, signed in `X-Twilio-Signature` with the account's token).
//! A reply STOP (or one of the other opt-out words carriers honour)
//! becomes a `client_updated` event with `sms_consent: false` on the
//! shop's stream, for the client last texted at that number: in the event
//! log like any other, so it holds across replays.

use super::*;
use crate::domain::phone::Phone;
use crate::store::Texts;
use axum::body::Bytes;
use axum::http::HeaderMap;
use base64::Engine as _;
use hmac::{Hmac, Mac};

/// The words that opt a number out (Twilio's and the carriers' list).
const STOP_WORDS: &[&str] = &[
    "STOP",
    "STOPALL",
    "UNSUBSCRIBE",
    "CANCEL",
    "END",
    "QUIT",
    "REVOKE",
    "OPTOUT",
];

/// The path the gateway is configured to post replies to.
pub const INBOUND_PATH: &str = "/sms/inbound";

/// Twilio's request signature: the base64 HMAC-SHA1, under the account's
/// token, of the URL followed by every form field's name and value, the
/// fields sorted by name.
pub fn twilio_signature(token: &str, url: &str, fields: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = fields.iter().collect();
    sorted.sort();
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(token.as_bytes()).expect("any key length");
    mac.update(url.as_bytes());
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

fn twiml(status: StatusCode) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "text/xml")],
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>",
    )
        .into_response()
}

/// A reply to a text, from the gateway.
#[utoipa::path(post, path = "/sms/inbound", tag = "open",
    request_body(content_type = "application/x-www-form-urlencoded", description = "the gateway's form: From, Body, MessageSid"),
    responses((status = 200, description = "noted (an empty TwiML answer)", content_type = "text/xml"),
              (status = 400, description = "a form without From, Body or MessageSid, or a number not in E.164"),
              (status = 403, description = "no valid X-Twilio-Signature"),
              (status = 503, description = "no gateway configured, or the stop could not be recorded now; the gateway retries")))]
pub(super) async fn sms_inbound(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(config) = &s.config else {
        return twiml(StatusCode::SERVICE_UNAVAILABLE);
    };
    let Some(token) = &config.sms.token else {
        return twiml(StatusCode::SERVICE_UNAVAILABLE);
    };
    let Ok(fields) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&body) else {
        return twiml(StatusCode::BAD_REQUEST);
    };
    let url = format!(
        "{}{INBOUND_PATH}",
        config.http.public_url.trim_end_matches('/')
    );
    let want = twilio_signature(token.expose(), &url, &fields);
    let given = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !crate::http::auth::constant_time_eq(given.as_bytes(), want.as_bytes()) {
        tracing::warn!("a text reply without a valid X-Twilio-Signature refused");
        return twiml(StatusCode::FORBIDDEN);
    }
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let (Some(from), Some(text), Some(sid)) = (field("From"), field("Body"), field("MessageSid"))
    else {
        return twiml(StatusCode::BAD_REQUEST);
    };
    let Ok(phone) = Phone::parse(from) else {
        return twiml(StatusCode::BAD_REQUEST);
    };
    let word = text.trim().to_ascii_uppercase();
    if !STOP_WORDS.contains(&word.as_str()) {
        tracing::info!(%phone, "a text reply that is not an opt-out: nothing to do");
        return twiml(StatusCode::OK);
    }
    let client = match s.store.client_of_number(&phone).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            tracing::warn!(%phone, "STOP from a number nudge never texted: nothing to do");
            return twiml(StatusCode::OK);
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot look up the number of a STOP");
            return twiml(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let Some(nats) = &s.nats else {
        return twiml(StatusCode::SERVICE_UNAVAILABLE);
    };
    // The gateway's message id makes the event's: a retried post is one event.
    let sid: String = sid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(64)
        .collect();
    let id = format!("sms-stop-{sid}");
    let event = json!({
        "id": id,
        "type": "client_updated",
        "client_id": client,
        "occurred_at": chrono::Utc::now().to_rfc3339(),
        "data": {"sms_consent": false, "source": "sms_stop"},
        "context": {"channel": "sms"},
    });
    let js = async_nats::jetstream::new(nats.clone());
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", id.as_str());
    let published = async {
        js.publish_with_headers(
            format!("{}.client_updated", s.subject_prefix),
            h,
            serde_json::to_vec(&event).unwrap_or_default().into(),
        )
        .await?
        .await
        .map_err(async_nats::Error::from)
    };
    match published.await {
        Ok(_) => {
            tracing::info!(client_id = %client, "texts stopped by a reply STOP");
            twiml(StatusCode::OK)
        }
        Err(e) => {
            tracing::error!(error = %e, client_id = %client, "could not record a STOP");
            twiml(StatusCode::SERVICE_UNAVAILABLE)
        }
    }
}
