//! Segment-compatible ingest: `POST /v1/track`, `/v1/identify`, `/v1/page`
//! and `/v1/batch` as Segment's HTTP Tracking API defines them, so that
//! Segment's libraries and tags send to nudge unchanged (pointed at nudge's
//! address). The write key (the basic-auth user name, or `writeKey` in the
//! body) stands for a token of `http.tokens` (`ingest.segment`).
//!
//! Each message becomes a contract envelope ([`to_envelope`], a pure
//! function, the mapping table in README), which is then checked and
//! published exactly as `POST /api/events` does (`ingest.rs`), so the
//! stream holds what a shop publishing contract events would have sent.
//!
//! Answers follow Segment's: 200 `{"success": true}`; 400 for a body over
//! Segment's limits (32 KB a message, 500 KB a batch) or not JSON; 401 for
//! an unknown write key. Unlike a contract request, a batch is not all or
//! nothing: a library cannot fix a message and, on a 4xx, drops the whole
//! batch without retrying. So the valid messages are published, and the
//! others answered 400 with their reasons (`results`) and kept in the
//! rejected list (`/api/rejected`), where an operator sees them. A 503
//! (broker away) is retried by the libraries; the `messageId`s make the
//! retry harmless.

mod mapping;

use super::ingest::{Checked, Stored, config, publish, read_body, unavailable};
use super::*;
use crate::domain::event::Envelope;
use crate::store::{BatchWrite, Batches as _, Rejected};
use axum::body::{Body, Bytes};
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use mapping::{Call, Mapped, object, to_envelope};
use serde_json::{Map, Value};

/// Segment's limit on one message (a single call, or one of a batch).
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
/// Segment's limit on one `/v1/batch` request.
pub const MAX_BATCH_BYTES: usize = 500 * 1024;

/// A Segment-style error: `code` and `message` are what the libraries log.
fn segment_error(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({"code": code, "message": message}))).into_response()
}

/// The caller a write key stands for: from `Authorization: Basic
/// base64(key:)`, else the body's `writeKey`. An open API (no token at
/// all) takes any key, as it takes any request.
fn caller(s: &ApiState, headers: &HeaderMap, body: &Map<String, Value>) -> Option<Caller> {
    if s.tokens.is_open() {
        return Some(Caller {
            name: "anonymous".into(),
            role: crate::config::Role::Admin,
        });
    }
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64_decode(b.trim()))
        .and_then(|raw| String::from_utf8(raw).ok())
        .map(|up| {
            up.split_once(':')
                .map_or(up.clone(), |(u, _)| u.to_string())
        });
    let key = from_header.or_else(|| body.get("writeKey")?.as_str().map(str::to_string))?;
    use sha2::{Digest, Sha256};
    let given: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    // Every source is compared, without an early exit: timing tells nothing.
    let mut found = None;
    for source in config(s).ingest.segment.values() {
        let want: [u8; 32] = Sha256::digest(source.write_key.expose().as_bytes()).into();
        if auth::constant_time_eq(&given, &want) {
            found = Some(source.token.clone());
        }
    }
    s.tokens.by_name(&found?)
}

/// Standard base64 (padding optional); none for anything else.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(v);
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    Some(out)
}

/// The messages of a request: the body itself for a single call, the
/// `batch` array's for `/v1/batch` (a batch's own `context` fills in what
/// a message's lacks).
fn messages(body: &Map<String, Value>, call: Call) -> Result<Vec<Value>, String> {
    if call != Call::Batch {
        return Ok(vec![Value::Object(body.clone())]);
    }
    let Some(Value::Array(batch)) = body.get("batch") else {
        return Err("a batch needs `batch`, an array of messages".into());
    };
    let shared = object(body.get("context"));
    Ok(batch
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if let Some(obj) = m.as_object_mut()
                && !shared.is_empty()
            {
                let mut ctx = shared.clone();
                ctx.extend(object(obj.get("context")));
                obj.insert("context".into(), Value::Object(ctx));
            }
            m
        })
        .collect())
}

/// What becomes of one message of a request.
enum Outcome {
    /// Published.
    Take(Checked),
    /// Not kept, and no fault (`alias`, `group`), with why.
    Ignore(String),
    /// Refused, with the reason.
    Refuse(String),
}

/// Checks one message: Segment's size limit, the mapping, then the
/// contract's own check on the very bytes that will be published.
fn check(msg: &Value, call: Call, cfg: &crate::config::Config, received: DateTime<Utc>) -> Outcome {
    match check_message(msg, call, cfg, received) {
        Ok(Ok(c)) => Outcome::Take(c),
        Ok(Err(why)) => Outcome::Ignore(why),
        Err(reason) => Outcome::Refuse(reason),
    }
}

fn check_message(
    msg: &Value,
    call: Call,
    cfg: &crate::config::Config,
    received: DateTime<Utc>,
) -> Result<Result<Checked, String>, String> {
    let size = serde_json::to_vec(msg).map_or(0, |v| v.len());
    if size > MAX_MESSAGE_BYTES {
        return Err(format!(
            "the message is {size} bytes, over Segment's limit of {MAX_MESSAGE_BYTES}"
        ));
    }
    let Value::Object(m) = msg else {
        return Err("a message is a JSON object".into());
    };
    match to_envelope(m, call, &cfg.ingest, received)? {
        Mapped::Ignored(why) => Ok(Err(why)),
        Mapped::Event(v) => {
            let bytes = Bytes::from(serde_json::to_vec(&v).unwrap_or_default());
            let envelope = Envelope::parse(&bytes, cfg.nats.max_event_bytes.get())
                .map_err(|r| r.to_string())?;
            Ok(Ok(Checked { envelope, bytes }))
        }
    }
}

/// The four endpoints' shared work: authenticate, map, publish, answer.
async fn handle(s: ApiState, headers: HeaderMap, body: Body, call: Call) -> Response {
    let limit = if call == Call::Batch {
        MAX_BATCH_BYTES
    } else {
        MAX_MESSAGE_BYTES
    };
    // Segment answers 400 to a body over its limits; so does nudge.
    let body = match read_body(&headers, body, limit).await {
        Ok(b) => b,
        Err(e) => return segment_error(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()),
    };
    let body: Map<String, Value> = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return segment_error(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not a JSON object: {e}"),
            );
        }
    };
    let Some(caller) = caller(&s, &headers, &body) else {
        return segment_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown write key: send a write key of ingest.segment as the basic-auth user name"
                .into(),
        );
    };
    let msgs = match messages(&body, call) {
        Ok(m) => m,
        Err(e) => return segment_error(StatusCode::BAD_REQUEST, "invalid_request", e),
    };
    let cfg = config(&s);
    let received = Utc::now();
    let outcomes: Vec<Outcome> = msgs.iter().map(|m| check(m, call, cfg, received)).collect();
    let valid: Vec<Checked> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Take(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    let stored = match publish(&s, &valid).await {
        Ok(stored) => stored,
        Err(e) => return unavailable(&e),
    };
    answer(&s, &caller, &msgs, &outcomes, &stored, received).await
}

/// 200 when every message was taken (or ignored); else 400 with each
/// message's result, the refused ones kept in the rejected list.
async fn answer(
    s: &ApiState,
    caller: &Caller,
    msgs: &[Value],
    outcomes: &[Outcome],
    stored: &[Stored],
    received: DateTime<Utc>,
) -> Response {
    let mut stored = stored.iter();
    let mut rejected = Vec::new();
    let mut results = Vec::with_capacity(msgs.len());
    for (index, (msg, outcome)) in msgs.iter().zip(outcomes).enumerate() {
        let message_id = msg.get("messageId").cloned().unwrap_or(Value::Null);
        results.push(match outcome {
            Outcome::Take(c) => {
                let st = stored.next().expect("one ack per published event");
                json!({"index": index, "messageId": message_id, "id": c.envelope.id,
                       "status": if st.duplicate { "duplicate" } else { "accepted" }, "seq": st.seq})
            }
            Outcome::Ignore(why) => {
                json!({"index": index, "messageId": message_id, "status": "ignored", "reason": why})
            }
            Outcome::Refuse(reason) => {
                let payload = serde_json::to_string(msg).unwrap_or_default();
                rejected.push(Rejected {
                    received_at: received,
                    subject: format!("http segment ({})", caller.name),
                    stream_seq: None,
                    reason: format!("segment message: {reason}"),
                    payload: payload.chars().take(MAX_MESSAGE_BYTES).collect(),
                });
                json!({"index": index, "messageId": message_id, "status": "invalid", "reason": reason})
            }
        });
    }
    tracing::debug!(caller = %caller.name, messages = msgs.len(), refused = rejected.len(), "segment ingest");
    if rejected.is_empty() {
        return Json(json!({"success": true, "results": results})).into_response();
    }
    let n = rejected.len();
    tracing::info!(caller = %caller.name, messages = msgs.len(), refused = n, "segment ingest: messages refused, kept as rejected");
    let write = BatchWrite {
        rejected,
        ..Default::default()
    };
    if let Err(e) = s.store.commit_batch(&write).await {
        tracing::error!(error = %e, refused = n, "segment ingest: could not keep refused messages in the rejected list");
    }
    (
        StatusCode::BAD_REQUEST,
        Json(json!({
            "code": "invalid_message",
            "message": format!(
                "{n} of {} messages were refused (see `results`); the others were taken",
                msgs.len()
            ),
            "results": results,
        })),
    )
        .into_response()
}

const DOC_BODY: &str = "A Segment message (or, for /v1/batch, `{\"batch\": [messages]}`), as Segment's HTTP Tracking API defines it; may be gzip-compressed.";

/// Segment's `track`: an event by name, mapped to a contract type.
#[utoipa::path(post, path = "/v1/track", tag = "segment",
    security(("segment_write_key" = [])),
    request_body(content = serde_json::Value, content_type = "application/json", description = DOC_BODY),
    responses((status = 200, description = "`{\"success\": true}`: stored by the broker"),
              (status = 400, description = "over 32 KB, not JSON, or refused (`results` with each reason)"),
              (status = 401, description = "unknown write key"),
              (status = 503, description = "the broker is away: send again")))]
pub(super) async fn track(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Response {
    handle(s, headers, body, Call::Track).await
}

/// Segment's `identify`: the client's traits, as `client_updated`.
#[utoipa::path(post, path = "/v1/identify", tag = "segment",
    security(("segment_write_key" = [])),
    request_body(content = serde_json::Value, content_type = "application/json", description = DOC_BODY),
    responses((status = 200, description = "`{\"success\": true}`: stored by the broker"),
              (status = 400, description = "over 32 KB, not JSON, or refused (`results` with each reason)"),
              (status = 401, description = "unknown write key"),
              (status = 503, description = "the broker is away: send again")))]
pub(super) async fn identify(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(s, headers, body, Call::Identify).await
}

/// Segment's `page`: a `page_viewed`.
#[utoipa::path(post, path = "/v1/page", tag = "segment",
    security(("segment_write_key" = [])),
    request_body(content = serde_json::Value, content_type = "application/json", description = DOC_BODY),
    responses((status = 200, description = "`{\"success\": true}`: stored by the broker"),
              (status = 400, description = "over 32 KB, not JSON, or refused (`results` with each reason)"),
              (status = 401, description = "unknown write key"),
              (status = 503, description = "the broker is away: send again")))]
pub(super) async fn page(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Response {
    handle(s, headers, body, Call::Page).await
}

/// Segment's `batch`: many messages of any call, as the libraries send them.
#[utoipa::path(post, path = "/v1/batch", tag = "segment",
    security(("segment_write_key" = [])),
    request_body(content = serde_json::Value, content_type = "application/json", description = DOC_BODY),
    responses((status = 200, description = "`{\"success\": true}`: every message stored by the broker (or ignored: alias, group)"),
              (status = 400, description = "over 500 KB, not JSON, or some messages refused (`results`): the others were taken"),
              (status = 401, description = "unknown write key"),
              (status = 503, description = "the broker is away: send again")))]
pub(super) async fn batch(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Response {
    handle(s, headers, body, Call::Batch).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_decodes() {
        assert_eq!(base64_decode("a2V5Og==").unwrap(), b"key:");
        assert_eq!(base64_decode("a2V5Og").unwrap(), b"key:");
        assert!(base64_decode("a2V5O*").is_none());
    }
}
