//! The `http` section: where the API listens, who may call it (tokens and
//! their roles), and how it bounds its clients.

use super::secret::Secret;
use crate::domain::settings::nz;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::num::{NonZeroU64, NonZeroUsize};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP server.
    pub listen: SocketAddr,
    /// A bearer token with the `admin` role, named `admin` (kept from before
    /// named tokens). Unset and no `tokens`: the API is open, which nudge
    /// refuses on a non-loopback address unless `allow_open` is set.
    pub token: Option<Secret>,
    /// Named tokens, each with a role (`http.tokens.<name>: {role, token}` or
    /// `{role, token_sha256}`), so each caller gets only what it needs and is
    /// named in the audit log.
    pub tokens: std::collections::BTreeMap<String, TokenConfig>,
    /// Serve the API without any token on a non-loopback address.
    pub allow_open: bool,
    /// Host header values (`name` or `name:port`) accepted; others get 421, so
    /// a page on another site cannot reach nudge through DNS rebinding.
    /// A YAML list or one comma-separated string. Empty: any.
    #[serde(deserialize_with = "list_or_commas")]
    pub allowed_hosts: Vec<String>,
    /// Connections served at once; at the limit the oldest connection that has
    /// not sent a request yet is closed for the new one. Never more than half
    /// the process's open-file limit.
    pub max_connections: NonZeroUsize,
    /// How long a client may take to send a request's headers, and how long
    /// an idle keep-alive connection stays open, in seconds.
    pub header_timeout_secs: NonZeroU64,
    /// How long one request may take, in seconds, rule runs and the live feed
    /// excepted (a rule run sweeps every client; the live feed is meant to
    /// stay open).
    pub request_timeout_secs: NonZeroU64,
    /// The address people reach nudge at, for links in mails.
    pub public_url: PublicUrl,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8080).into(),
            token: None,
            tokens: Default::default(),
            allow_open: false,
            allowed_hosts: Vec::new(),
            max_connections: nz!(512),
            header_timeout_secs: nz!(10),
            request_timeout_secs: nz!(30),
            public_url: PublicUrl::parse("http://127.0.0.1:8080").expect("a valid URL"),
        }
    }
}

/// An `http://` or `https://` URL with a host: the base of links in mails.
/// Reads as the `str` it was written as.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct PublicUrl(String);

impl PublicUrl {
    pub fn parse(s: impl Into<String>) -> Result<Self, String> {
        let s = s.into();
        let ok = s.parse::<axum::http::Uri>().ok().is_some_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
        });
        if ok {
            Ok(Self(s))
        } else {
            Err(format!("{s:?} is not an http:// or https:// URL"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for PublicUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PublicUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for PublicUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl From<PublicUrl> for String {
    fn from(u: PublicUrl) -> String {
        u.0
    }
}

/// What a token may do, least to most; each role may do all that the ones
/// before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Posting events only.
    Ingest,
    /// Reading clients, timelines, tasks and the live feed; closing tasks.
    Staff,
    /// Staff, and rules, previews, rule runs and reports.
    Marketer,
    /// Everything, export and erasure included.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Ingest, Role::Staff, Role::Marketer, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Staff => "staff",
            Role::Marketer => "marketer",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One named token: the secret itself, or only its SHA-256, so that the
/// configuration need not hold the secret. Exactly one of the two (checked
/// at load).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub role: Role,
    /// The bearer token (16+ characters).
    pub token: Option<Secret>,
    /// The SHA-256 of the bearer token, written as hex (either case).
    pub token_sha256: Option<TokenDigest>,
}

impl TokenConfig {
    /// The SHA-256 of the token, which is what requests are checked against.
    pub fn digest(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        match (&self.token, &self.token_sha256) {
            (Some(t), _) => Sha256::digest(t.expose().as_bytes()).into(),
            (None, Some(d)) => d.0,
            (None, None) => unreachable!("checked at load: a token or its hash"),
        }
    }
}

/// A SHA-256, read from and written as its 64 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct TokenDigest(pub [u8; 32]);

impl TryFrom<String> for TokenDigest {
    type Error = &'static str;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out)
            .map_err(|_| "must be the 64 hex digits of a SHA-256")?;
        Ok(Self(out))
    }
}

impl From<TokenDigest> for String {
    fn from(d: TokenDigest) -> String {
        hex::encode(d.0)
    }
}

/// A list given as a YAML sequence or, as an environment variable must, as
/// one comma-separated string.
pub(super) fn list_or_commas<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<Either>::deserialize(d)? {
        None => Vec::new(),
        Some(Either::One(s)) => s
            .split(',')
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .collect(),
        Some(Either::Many(v)) => v,
    })
}
