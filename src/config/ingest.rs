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

#[cfg(test)]
mod tests {
    use super::super::Config;

    fn load(pairs: &[(&str, &str)]) -> Result<Config, String> {
        Config::load_with_env(
            None,
            pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())),
        )
        .map_err(|e| e.to_string())
    }

    const TOKEN: [(&str, &str); 2] = [
        ("NUDGE__HTTP__TOKENS__WEB__ROLE", "ingest"),
        ("NUDGE__HTTP__TOKENS__WEB__TOKEN", "a-web-shop-token-1"),
    ];

    #[test]
    fn a_segment_source_names_a_token_with_a_long_enough_key() {
        let mut ok = TOKEN.to_vec();
        ok.extend([
            (
                "NUDGE__INGEST__SEGMENT__SITE__WRITE_KEY",
                "a-segment-write-key",
            ),
            ("NUDGE__INGEST__SEGMENT__SITE__TOKEN", "web"),
            ("NUDGE__INGEST__TRACK__TRIAL_STARTED", "client_registered"),
        ]);
        let c = load(&ok).unwrap();
        assert_eq!(c.ingest.segment["site"].token, "web");
        assert_eq!(c.ingest.track["trial_started"], "client_registered");
        let shown = format!("{c:?}");
        assert!(!shown.contains("a-segment-write-key"), "{shown}");

        let mut short = ok.clone();
        short[2].1 = "short";
        assert!(
            load(&short)
                .unwrap_err()
                .contains("ingest.segment.site.write_key")
        );
        let mut unknown = ok.clone();
        unknown[3].1 = "nobody";
        assert!(
            load(&unknown)
                .unwrap_err()
                .contains("ingest.segment.site.token")
        );
        let mut bad_type = ok.clone();
        bad_type[4].1 = "Not A Type";
        assert!(
            load(&bad_type)
                .unwrap_err()
                .contains("ingest.track.trial_started")
        );
        let mut twice = ok.clone();
        twice.extend([
            (
                "NUDGE__INGEST__SEGMENT__APP__WRITE_KEY",
                "a-segment-write-key",
            ),
            ("NUDGE__INGEST__SEGMENT__APP__TOKEN", "web"),
        ]);
        assert!(load(&twice).unwrap_err().contains("same write key"));
        assert!(
            load(&[("NUDGE__INGEST__MAX_ITEMS", "0")])
                .unwrap_err()
                .contains("ingest.max_items")
        );
    }
}
