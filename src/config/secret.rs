//! Values that must never reach a log, an error message or a serialised
//! configuration: tokens, keys, and URLs that may carry a password. They
//! print as `***` (a URL with its password masked); the value itself comes
//! out only through [`Secret::expose`] / [`SecretUrl::expose`], so every
//! place that reads it says so.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A token or key: prints as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself: for the one place that needs it, never for a log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_string())
    }
}

/// A URL (or several, comma-separated) that may hold a user and password:
/// prints with the password masked (`postgres://nudge:***@db/x`).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The URL with its password: for connecting, never for a log.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL as logs and messages show it.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl From<String> for SecretUrl {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for SecretUrl {
    fn from(value: &str) -> Self {
        Self(value.to_string())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Text).map(Self)
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Text).map(Self)
    }
}

/// Reads a secret's text. An environment override is read as YAML, so a
/// token of digits arrives as a number: taken as its digits. Anything else
/// is refused without quoting it, as serde's own message would.
struct Text;

impl serde::de::Visitor<'_> for Text {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("text")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<String, E> {
        Err(E::custom("must be text (quote it)"))
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<String, E> {
        Err(E::custom("must be text (quote it)"))
    }
}

/// A URL fit for logs and error messages: any password in it is masked
/// (`postgres://nudge:secret@db/x` -> `postgres://nudge:***@db/x`), and a
/// user alone (a NATS token) too (`nats://tok@a` -> `nats://***@a`).
pub fn redact(url: &str) -> String {
    url.split(',')
        .map(|u| {
            let Some((scheme, rest)) = u.split_once("://") else {
                return u.to_string();
            };
            // The credentials end at the last '@': a password may hold an
            // '@' (or a '/') of its own. Masking too much is harmless.
            let Some(at) = rest.rfind('@') else {
                return u.to_string();
            };
            let (auth, host) = (&rest[..at], &rest[at + 1..]);
            match auth.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => format!("{scheme}://***@{host}"),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://nudge:s3cret@db:5432/x"),
            "postgres://nudge:***@db:5432/x"
        );
        assert_eq!(
            redact("nats://tok@a:4222,nats://b:4222"),
            "nats://***@a:4222,nats://b:4222"
        );
        assert_eq!(redact("sqlite://var/nudge.db"), "sqlite://var/nudge.db");
        assert_eq!(
            redact("smtps://u:p@ss@mail.example/?tls=required"),
            "smtps://u:***@mail.example/?tls=required"
        );
        assert_eq!(redact("postgres://u:a/b@db/x"), "postgres://u:***@db/x");
    }

    #[test]
    fn secrets_print_as_stars_and_come_out_only_when_asked() {
        let s = Secret::new("a-long-admin-token");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert_eq!(s.expose(), "a-long-admin-token");
        let u = SecretUrl::new("postgres://nudge:s3cret@db/x");
        assert_eq!(u.to_string(), "postgres://nudge:***@db/x");
        assert_eq!(format!("{u:?}"), "\"postgres://nudge:***@db/x\"");
        assert_eq!(
            serde_json::to_string(&u).unwrap(),
            "\"postgres://nudge:***@db/x\""
        );
        assert_eq!(u.expose(), "postgres://nudge:s3cret@db/x");
        // Nor through a section's Debug.
        let c = crate::config::Config {
            database: crate::config::DatabaseConfig {
                url: u,
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
