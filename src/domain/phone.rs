//! A phone number in E.164 form (`+447700900123`), the only form a text
//! message is sent to. Parsed at the edge (an envelope's `data.phone`), so
//! the rest of nudge cannot hold a number a gateway would refuse.

use serde::{Deserialize, Serialize};

/// Why a text is not a phone number nudge can text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} (E.164 is `+` and 2 to 15 digits, e.g. +447700900123)")]
pub struct PhoneError(String);

/// `+`, a country code that does not start with 0, at most 15 digits in all
/// (ITU-T E.164). Nothing else: no spaces, dashes or brackets, so a number
/// is compared and looked up in exactly one spelling.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Phone(String);

impl Phone {
    pub fn parse(s: impl Into<String>) -> Result<Self, PhoneError> {
        let s = s.into();
        let invalid = |reason: &str| PhoneError(reason.to_string());
        let Some(digits) = s.strip_prefix('+') else {
            return Err(invalid("does not start with `+`"));
        };
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("holds something other than digits after the `+`"));
        }
        if !(2..=15).contains(&digits.len()) {
            return Err(invalid("is not 2 to 15 digits long"));
        }
        if digits.starts_with('0') {
            return Err(invalid("a country code never starts with 0"));
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Phone {
    type Error = PhoneError;
    fn try_from(s: String) -> Result<Self, PhoneError> {
        Self::parse(s)
    }
}

impl From<Phone> for String {
    fn from(p: Phone) -> String {
        p.0
    }
}

impl std::fmt::Display for Phone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_e164_numbers_parse() {
        for ok in ["+447700900123", "+15551234567", "+12", "+123456789012345"] {
            assert_eq!(Phone::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "447700900123",
            "+44 7700 900123",
            "+44-7700-900123",
            "+0447700900123",
            "+1",
            "+1234567890123456",
            "+",
            "",
            "+44\n7700900123",
            "tel:+447700900123",
        ] {
            let e = Phone::parse(bad).unwrap_err().to_string();
            assert!(e.contains("E.164"), "{bad}: {e}");
        }
    }
}
