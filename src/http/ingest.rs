//! HTTP ingest: `POST /api/events` takes contract envelopes from sources
//! that cannot publish to NATS, checks each with the stream consumer's own
//! [`Envelope::parse`], publishes them to the shop's stream as the shop
//! would (`Nats-Msg-Id` = id) and answers only once the broker has stored
//! them. Everything downstream (dedupe, history, rules, mail) is then the
//! stream's, unchanged. The body reading and the publishing here are shared
//! with the Segment-compatible endpoints (`segment.rs`).
//!
//! A request is all or nothing: if any envelope is invalid, none is
//! published (400, with each item's reason), so a caller that fixes and
//! resends the request never has to work out which part went through.
//! A 202 means the broker stored every event; a 503 means it may have
//! stored some or none, and the caller sends the same request again: the
//! ids make a repeat harmless (the broker's dedupe window, then nudge's
//! event log, which takes each id once whenever it comes back).

use super::*;
use crate::config::Config;
use crate::domain::event::{Envelope, Rejection};
use axum::body::{Body, Bytes};
use axum::http::HeaderMap;
use futures::StreamExt;
use serde_json::Value;
use std::sync::LazyLock;

/// How long the broker has to store a request's events. A broker that is
/// there answers in milliseconds; this is for one that is away, so the
/// caller hears 503 well within `http.request_timeout_secs`.
const ACK_WAIT: Duration = Duration::from_secs(5);

/// What `Retry-After` tells a caller that got 503, in seconds.
const RETRY_AFTER_SECS: &str = "5";

/// The configuration when the state carries none (an HTTP side built
/// without one): the defaults.
static DEFAULTS: LazyLock<Config> = LazyLock::new(Config::default);

pub(super) fn config(s: &ApiState) -> &Config {
    s.config.as_deref().unwrap_or(&DEFAULTS)
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum BodyError {
    #[error("the body is over the limit of {limit} bytes{}", if *.gzip { " once gzip is undone" } else { "" })]
    TooLarge { limit: usize, gzip: bool },
    #[error("the body could not be read: {0}")]
    Broken(String),
    #[error("the body is not valid gzip: {0}")]
    BadGzip(String),
    #[error("Content-Encoding {0:?} is not supported: send identity or gzip")]
    Encoding(String),
}

/// Reads a body of at most `limit` bytes, undoing gzip (`Content-Encoding:
/// gzip`, as Segment's libraries may send): the limit holds for the
/// compressed bytes and again for what they expand to, so a small gzip
/// bomb is refused like a large body.
pub(super) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, BodyError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase());
    let gzip = match encoding.as_deref() {
        None | Some("" | "identity") => false,
        Some("gzip" | "x-gzip") => true,
        Some(other) => return Err(BodyError::Encoding(other.to_string())),
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge { limit, gzip: false });
    }
    let mut stream = body.into_data_stream();
    let mut raw = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BodyError::Broken(e.to_string()))?;
        if raw.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit, gzip: false });
        }
        raw.extend_from_slice(&chunk);
    }
    if !gzip {
        return Ok(raw.into());
    }
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(raw.as_slice())
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| BodyError::BadGzip(e.to_string()))?;
    if out.len() > limit {
        return Err(BodyError::TooLarge { limit, gzip: true });
    }
    Ok(out.into())
}

/// An envelope ready to publish: checked, and the exact bytes the stream
/// will hold (and the consumer will check again).
#[derive(Clone)]
pub(super) struct Checked {
    pub envelope: Envelope,
    pub bytes: Bytes,
}

/// The broker did not confirm every event in time: the caller must retry.
#[derive(Debug, thiserror::Error)]
#[error("the broker did not store the events: {0}")]
pub(super) struct Unavailable(pub String);

/// What the broker said of one published event.
pub(super) struct Stored {
    /// The stream's sequence of the event (of the first copy, when a duplicate).
    pub seq: u64,
    /// The broker had it already (same id within its dedupe window).
    pub duplicate: bool,
}

/// Publishes the events to `<subject_prefix>.<type>` with `Nats-Msg-Id` =
/// id, all at once, and waits for the broker to store each. An error means
/// that some may be stored and some not; a retry of all of them is safe.
pub(super) async fn publish(s: &ApiState, events: &[Checked]) -> Result<Vec<Stored>, Unavailable> {
    let Some(nats) = &s.nats else {
        return Err(Unavailable("no NATS connection".into()));
    };
    let js = async_nats::jetstream::new(nats.clone());
    let all = async {
        let mut acks = Vec::with_capacity(events.len());
        for c in events {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", c.envelope.id.as_str());
            let subject = format!("{}.{}", s.subject_prefix, c.envelope.event_type);
            let ack = js
                .publish_with_headers(subject, headers, c.bytes.clone())
                .await
                .map_err(|e| Unavailable(e.to_string()))?;
            acks.push(ack);
        }
        let mut stored = Vec::with_capacity(acks.len());
        for ack in acks {
            let ack = ack.await.map_err(|e| Unavailable(e.to_string()))?;
            stored.push(Stored {
                seq: ack.sequence,
                duplicate: ack.duplicate,
            });
        }
        Ok(stored)
    };
    match tokio::time::timeout(ACK_WAIT, all).await {
        Ok(r) => r,
        Err(_) => Err(Unavailable(format!("no answer within {ACK_WAIT:?}"))),
    }
}

/// 503 with `Retry-After`, saying what to do: send the same request again.
pub(super) fn unavailable(e: &Unavailable) -> Response {
    tracing::warn!(error = %e, "http ingest: broker unavailable, answering 503");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, RETRY_AFTER_SECS)],
        Json(json!({
            "error": format!(
                "{e}; none of this request counts as accepted: send it again \
                 (the same ids make a repeat harmless)"
            ),
        })),
    )
        .into_response()
}

fn body_error(e: BodyError) -> ApiError {
    let status = match e {
        BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        BodyError::Encoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        BodyError::Broken(_) | BodyError::BadGzip(_) => StatusCode::BAD_REQUEST,
    };
    ApiError(status, e.to_string())
}

/// The envelopes of a body: one JSON object, or an array of them. Each
/// item is kept as its raw text, so what is checked and published is
/// byte for byte what the caller sent.
fn split_items(body: &[u8]) -> Result<Vec<Box<serde_json::value::RawValue>>, ApiError> {
    let bad = |e: serde_json::Error| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("the body is not a JSON envelope nor an array of envelopes: {e}"),
        )
    };
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError(StatusCode::BAD_REQUEST, "the body is not UTF-8".into()))?;
    if text.trim_start().starts_with('[') {
        serde_json::from_str(text).map_err(bad)
    } else {
        Ok(vec![serde_json::from_str(text).map_err(bad)?])
    }
}

/// Accepts contract envelopes (one object, or an array of up to
/// `ingest.max_items`) and publishes them to the shop's stream.
#[utoipa::path(post, path = "/events", tag = "ingest",
    security(("bearer" = ["ingest"])),
    request_body(content = serde_json::Value, content_type = "application/json",
        description = "One contract envelope (`id`, `type`, `client_id`, `occurred_at`, `data`, `context`), or a JSON array of them; may be sent with `Content-Encoding: gzip`."),
    responses(
        (status = 202, description = "every event stored by the broker: `accepted`, `duplicates` and `results` (per item: `index`, `id`, `status` `accepted` or `duplicate` (the broker had that id already), `seq`)"),
        (status = 400, description = "not JSON, or an invalid envelope: `results` gives each item's `status` (`valid` or `invalid`) and `reason`; nothing of the request was published"),
        (status = 413, description = "the body is over `ingest.max_body_bytes`, or the array over `ingest.max_items`"),
        (status = 503, description = "the broker did not store the events in time: send the same request again (`Retry-After`)")))]
pub(super) async fn post_events(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let cfg = config(&s);
    let limits = &cfg.ingest;
    let body = read_body(&headers, body, limits.max_body_bytes.get())
        .await
        .map_err(body_error)?;
    let items = split_items(&body)?;
    if items.len() > limits.max_items.get() {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} envelopes, over the limit of {} (ingest.max_items): send them in smaller arrays",
                items.len(),
                limits.max_items
            ),
        ));
    }
    if items.is_empty() {
        return Err(ApiError(StatusCode::BAD_REQUEST, "no envelope".into()));
    }
    let max_event_bytes = cfg.nats.max_event_bytes.get();
    let checked: Vec<Result<Checked, Rejection>> = items
        .iter()
        .map(|raw| {
            let bytes = Bytes::copy_from_slice(raw.get().as_bytes());
            Envelope::parse(&bytes, max_event_bytes).map(|envelope| Checked { envelope, bytes })
        })
        .collect();
    let invalid = checked.iter().filter(|c| c.is_err()).count();
    if invalid > 0 {
        let results: Vec<_> = checked
            .iter()
            .zip(&items)
            .enumerate()
            .map(|(index, (c, raw))| match c {
                Ok(c) => json!({"index": index, "id": c.envelope.id, "status": "valid"}),
                Err(reason) => json!({
                    "index": index,
                    "id": loose_id(raw.get()),
                    "status": "invalid",
                    "reason": reason.to_string(),
                }),
            })
            .collect();
        tracing::info!(caller = %caller.name, invalid, items = items.len(), "http ingest: request refused");
        let body = json!({
            "error": format!(
                "{invalid} of {} envelopes are invalid; nothing was published: fix them and send the request again",
                items.len()
            ),
            "results": results,
        });
        return Ok((StatusCode::BAD_REQUEST, Json(body)).into_response());
    }
    let checked: Vec<Checked> = checked.into_iter().flatten().collect();
    let stored = match publish(&s, &checked).await {
        Ok(stored) => stored,
        Err(e) => return Ok(unavailable(&e)),
    };
    let duplicates = stored.iter().filter(|st| st.duplicate).count();
    tracing::debug!(caller = %caller.name, events = checked.len(), duplicates, "http ingest: events published");
    let results: Vec<_> = checked
        .iter()
        .zip(&stored)
        .enumerate()
        .map(|(index, (c, st))| {
            json!({
                "index": index,
                "id": c.envelope.id,
                "status": if st.duplicate { "duplicate" } else { "accepted" },
                "seq": st.seq,
            })
        })
        .collect();
    let body = json!({
        "accepted": checked.len() - duplicates,
        "duplicates": duplicates,
        "results": results,
    });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// The `id` of an envelope that failed the check, when it has a usable one,
/// so the caller can match the reason to the event.
fn loose_id(raw: &str) -> Value {
    serde_json::from_str::<Value>(raw)
        .ok()
        .and_then(|v| v.get("id").filter(|id| id.is_string()).cloned())
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn with_encoding(enc: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(e) = enc {
            h.insert(header::CONTENT_ENCODING, e.parse().unwrap());
        }
        h
    }

    #[tokio::test]
    async fn bodies_are_read_within_the_limit_gzip_or_not() {
        let plain = br#"{"a": 1}"#.to_vec();
        let got = read_body(&with_encoding(None), Body::from(plain.clone()), 100)
            .await
            .unwrap();
        assert_eq!(&got[..], &plain[..]);
        let got = read_body(&with_encoding(Some("gzip")), Body::from(gzip(&plain)), 100)
            .await
            .unwrap();
        assert_eq!(&got[..], &plain[..]);
        // Over the limit as sent.
        let e = read_body(&with_encoding(None), Body::from(vec![b' '; 101]), 100)
            .await
            .unwrap_err();
        assert!(matches!(e, BodyError::TooLarge { gzip: false, .. }), "{e}");
        // Small when sent, over the limit once expanded: a gzip bomb.
        let bomb = gzip(&vec![b' '; 100_000]);
        assert!(bomb.len() < 1000);
        let e = read_body(&with_encoding(Some("gzip")), Body::from(bomb), 1000)
            .await
            .unwrap_err();
        assert!(matches!(e, BodyError::TooLarge { gzip: true, .. }), "{e}");
        let e = read_body(&with_encoding(Some("gzip")), Body::from(plain.clone()), 100)
            .await
            .unwrap_err();
        assert!(matches!(e, BodyError::BadGzip(_)), "{e}");
        let e = read_body(&with_encoding(Some("br")), Body::from(plain), 100)
            .await
            .unwrap_err();
        assert!(matches!(e, BodyError::Encoding(_)), "{e}");
    }

    #[test]
    fn a_body_is_one_envelope_or_an_array_kept_as_sent() {
        let one = split_items(br#" {"id": "e1",  "x": [1, 2]}"#).ok().unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].get(), r#"{"id": "e1",  "x": [1, 2]}"#);
        let many = split_items(br#"[{"id": "a"}, 7]"#).ok().unwrap();
        assert_eq!(many.len(), 2);
        assert_eq!(many[1].get(), "7");
        assert!(split_items(b"{not json").is_err());
        assert!(split_items(b"\xff").is_err());
        assert_eq!(loose_id(r#"{"id": "e9"}"#), json!("e9"));
        assert_eq!(loose_id(r#"{"id": 9}"#), Value::Null);
    }
}
