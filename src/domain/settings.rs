//! The `history` section of the configuration: how a client's history is
//! kept. It lives with the domain that uses it; the configuration (`config`) composes it
//! into the whole file, with the other sections.

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use std::num::{NonZeroU32, NonZeroUsize};

/// A `NonZero` constant, checked when compiled: `nz!(30)`.
macro_rules! nz {
    ($n:expr) => {
        const { std::num::NonZero::new($n).unwrap() }
    };
}
pub(crate) use nz;

/// How a client's history is kept. Defaults are in [`Default`]; README's
/// configuration table and `config.example.yaml` are checked against them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Silence that ends a session when events carry no `context.session_id`, in minutes.
    pub session_gap_minutes: NonZeroU32,
    /// IANA time zone of the business: shared counters' days, weeks, quarters.
    #[serde(with = "iana")]
    pub business_timezone: Tz,
    /// Distinct products kept per client in `stats.purchases` (the most
    /// bought stay). Every event of the client loads and saves its state, so
    /// without a bound 40 orders of 1,100 products made a 1.6 MB state.
    pub max_purchases: NonZeroUsize,
    /// Distinct event types counted per client in `stats.events` and
    /// `stats.last_at`; events of a further type still count everywhere else.
    pub max_event_types: NonZeroUsize,
    /// Distinct order channels kept per client in `orders_by_channel` (the
    /// channel is free text).
    pub max_order_channels: NonZeroUsize,
    /// Days within which two orders of one client count their products as
    /// bought together (product rankings' bought-with); 0: only products
    /// of the same order.
    pub bought_together_days: u32,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            session_gap_minutes: nz!(30),
            business_timezone: Tz::UTC,
            max_purchases: nz!(200),
            max_event_types: nz!(200),
            max_order_channels: nz!(20),
            bought_together_days: 30,
        }
    }
}

impl HistoryConfig {
    /// The business time zone (parsed when the configuration was loaded).
    pub fn business_tz(&self) -> Tz {
        self.business_timezone
    }

    /// The window of `bought_together_days`.
    pub fn bought_together(&self) -> chrono::Duration {
        chrono::Duration::days(i64::from(self.bought_together_days))
    }

    pub fn session_gap(&self) -> chrono::Duration {
        chrono::Duration::minutes(i64::from(self.session_gap_minutes.get()))
    }

    /// What a client's state keeps at most, for [`crate::domain::history::ClientState::apply_limited`].
    pub fn limits(&self) -> HistoryLimits {
        HistoryLimits {
            max_purchases: self.max_purchases.get(),
            max_event_types: self.max_event_types.get(),
            max_order_channels: self.max_order_channels.get(),
        }
    }
}

/// What a client's state keeps at most ([`HistoryConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Distinct products in `stats.purchases`.
    pub max_purchases: usize,
    /// Distinct event types in `stats.events` / `stats.last_at`.
    pub max_event_types: usize,
    /// Distinct channels in `stats.orders_by_channel`.
    pub max_order_channels: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryConfig::default().limits()
    }
}

/// A time zone written as its IANA name (`Europe/Paris`).
mod iana {
    use chrono_tz::Tz;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Tz, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not an IANA timezone")))
    }

    pub fn serialize<S: Serializer>(tz: &Tz, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(tz.name())
    }
}
