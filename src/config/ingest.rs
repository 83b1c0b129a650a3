//! The `ingest` section: events that come in over HTTP instead of NATS
//! (`POST /api/events`, and the Segment-compatible `/v1/*` endpoints): how
//! much one request may carry, which Segment write keys stand for which
//! token, and the table of Segment event names to contract types.

use super::secret::Secret;
use super::{ConfigError, HttpConfig, key_err};
use crate::domain::event::EventType;
use crate::domain::settings::nz;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::num::NonZeroUsize;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Envelopes one `POST /api/events` may carry (a larger array is refused
    /// whole, 413).
    pub max_items: NonZeroUsize,
    /// Bytes of one `POST /api/events` body, after gzip is undone; a larger
    /// body is refused (413). Each envelope is still held to
    /// `nats.max_event_bytes`, as on the stream.
    pub max_body_bytes: NonZeroUsize,
    /// Segment sources by a name the operator chooses: each write key (the
    /// basic-auth user name Segment's libraries send) stands for a token of
    /// `http.tokens`, whose name and role the request then has.
    pub segment: BTreeMap<String, SegmentSource>,
    /// Segment `track` event names mapped to contract types, added to (or
    /// replacing entries of) the built-in table of Segment's e-commerce
    /// names; a name in neither becomes its snake_case form.
    pub track: BTreeMap<String, String>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_items: nz!(500),
            max_body_bytes: nz!(1024 * 1024),
            segment: BTreeMap::new(),
            track: BTreeMap::new(),
        }
    }
}

/// One Segment source: its write key and the token it acts as.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentSource {
    /// The write key the source's library is configured with (16+ characters).
    pub write_key: Secret,
    /// The name of the token in `http.tokens` (or `admin` for `http.token`)
    /// that this write key stands for.
    pub token: String,
}

impl IngestConfig {
    /// What the types cannot say: write keys long enough, tokens that exist,
    /// track types that are contract types.
    pub(super) fn validate(&self, http: &HttpConfig) -> Result<(), ConfigError> {
        for (name, source) in &self.segment {
            let key = format!("ingest.segment.{name}");
            if source.write_key.expose().len() < 16 {
                return Err(key_err(
                    &format!("{key}.write_key"),
                    "must be at least 16 characters",
                ));
            }
            let known = http.tokens.contains_key(&source.token)
                || (source.token == "admin" && http.token.is_some());
            if !known {
                return Err(key_err(
                    &format!("{key}.token"),
                    format!(
                        "{:?} is not a token of http.tokens (nor `admin` with http.token set)",
                        source.token
                    ),
                ));
            }
        }
        let mut keys: Vec<&str> = self
            .segment
            .values()
            .map(|s| s.write_key.expose())
            .collect();
        keys.sort_unstable();
        if keys.windows(2).any(|w| w[0] == w[1]) {
            return Err(key_err(
                "ingest.segment",
                "two sources have the same write key",
            ));
        }
        for (name, ty) in &self.track {
            EventType::parse(ty.as_str())
                .map_err(|e| key_err(&format!("ingest.track.{name}"), e.to_string()))?;
        }
        Ok(())
    }
}
