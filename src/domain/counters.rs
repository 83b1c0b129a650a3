//! Counters shared by all clients ("orders over 1000 this quarter", "distinct
//! clients who ..."), per period in the business timezone.
//!
//! The decision core sees them through [`Counters`]: values are read once per
//! batch from a [`CounterSource`] (the database in the daemon, memory in rule
//! tests), changed in memory, and written with the batch as compare-and-swap
//! on each counter's version. Two instances that raise the same counter at
//! once conflict, and the loser retries its batch on the new value, so the
//! counts are exact; redelivered events never reach the core, so they never
//! count twice.

use chrono::{DateTime, Datelike, Utc};
use chrono_tz::Tz;
use std::collections::{HashMap, HashSet};

/// A counter for one period: `("big_spenders", "2026-Q4")`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    pub name: String,
    pub period: String,
}

/// A counter's stored state.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Stored {
    pub value: f64,
    /// 0 when the counter does not exist yet.
    pub version: i64,
}

/// Where counter values come from when a batch first touches them.
pub trait CounterSource: Send {
    fn load(&mut self, key: &CounterKey) -> Result<Stored, String>;
    fn is_member(&mut self, key: &CounterKey, member: &str) -> Result<bool, String>;
    /// The rows of a counter family (every period of the counter `name`),
    /// as `(period, value)`: for rankings ([`super::products`]). At most
    /// [`MAX_FAMILY_ROWS`] rows.
    fn list(&mut self, name: &str) -> Result<Vec<(String, f64)>, String> {
        Err(format!(
            "counter family {name:?} cannot be listed here: shared counters are not available"
        ))
    }
}

/// Most rows one family listing reads: rankings admit fewer
/// ([`super::products::TOP_K`]), so this is only a guard.
pub const MAX_FAMILY_ROWS: usize = 10_000;

/// A counter changed by a batch, to be written if its version is unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct CounterWrite {
    pub key: CounterKey,
    /// The version read; the store writes `version + 1` only if it still holds.
    pub version: i64,
    pub value: f64,
}

/// The counters as one batch sees and changes them.
pub struct Counters {
    source: Box<dyn CounterSource>,
    tz: Tz,
    values: HashMap<CounterKey, (Stored, f64)>,
    members: HashSet<(CounterKey, String)>,
    added: Vec<(CounterKey, String)>,
    /// How many times a counter was read or changed: a step of a batch that
    /// moved it used shared state, and must be decided in the stream's order
    /// with every other such step (see `pipeline`).
    uses: u64,
}

/// A time period a counter is kept per.
pub const PERIODS: &[&str] = &["day", "week", "month", "quarter", "year", "all"];

/// The key of the period containing `at` in `tz`: `2026-11-23`, `2026-W48`,
/// `2026-11`, `2026-Q4`, `2026` or `all`.
pub fn period_key(period: &str, at: DateTime<Utc>, tz: Tz) -> Result<String, String> {
    let local = at.with_timezone(&tz);
    Ok(match period {
        "day" => local.format("%Y-%m-%d").to_string(),
        "week" => {
            let w = local.iso_week();
            format!("{}-W{:02}", w.year(), w.week())
        }
        "month" => local.format("%Y-%m").to_string(),
        "quarter" => format!("{}-Q{}", local.year(), (local.month() - 1) / 3 + 1),
        "year" => local.year().to_string(),
        "all" => "all".to_string(),
        other => {
            return Err(format!(
                "unknown period {other:?}: use one of {}",
                PERIODS.join(", ")
            ));
        }
    })
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters")
            .field("touched", &self.values.len())
            .field("added_members", &self.added.len())
            .finish()
    }
}

/// No counters at all: where a caller lends none, using one is an error.
struct NoCounters;

impl CounterSource for NoCounters {
    fn load(&mut self, _: &CounterKey) -> Result<Stored, String> {
        Err("shared counters are not available here".into())
    }
    fn is_member(&mut self, _: &CounterKey, _: &str) -> Result<bool, String> {
        Err("shared counters are not available here".into())
    }
}

impl Default for Counters {
    /// Counters that refuse every use: for callers that lend none.
    fn default() -> Self {
        Counters::new(Box::new(NoCounters), Tz::UTC)
    }
}

impl Counters {
    pub fn new(source: Box<dyn CounterSource>, tz: Tz) -> Self {
        Self {
            source,
            tz,
            values: HashMap::new(),
            members: HashSet::new(),
            added: Vec::new(),
            uses: 0,
        }
    }

    /// The business timezone the periods are in.
    pub fn tz(&self) -> Tz {
        self.tz
    }

    /// How many times counters were read or changed so far.
    pub fn uses(&self) -> u64 {
        self.uses
    }

    pub fn key(&self, name: &str, period: &str, at: DateTime<Utc>) -> Result<CounterKey, String> {
        Ok(CounterKey {
            name: name.to_string(),
            period: period_key(period, at, self.tz)?,
        })
    }

    fn entry(&mut self, key: &CounterKey) -> Result<&mut (Stored, f64), String> {
        self.uses += 1;
        if !self.values.contains_key(key) {
            let stored = self.source.load(key)?;
            self.values.insert(key.clone(), (stored, stored.value));
        }
        Ok(self.values.get_mut(key).expect("inserted above"))
    }

    pub fn get(&mut self, key: &CounterKey) -> Result<f64, String> {
        Ok(self.entry(key)?.1)
    }

    /// Adds `amount` and returns the new total.
    /// The total saturates within ±[`crate::domain::history::MAX_MONEY_SUM`]: an
    /// infinite total would be stored as `null`.
    pub fn add(&mut self, key: &CounterKey, amount: f64) -> Result<f64, String> {
        let e = self.entry(key)?;
        e.1 = crate::domain::history::money_add(e.1, amount);
        Ok(e.1)
    }

    /// True if `member` is in the distinct set, without adding it.
    pub fn has_member(&mut self, key: &CounterKey, member: &str) -> Result<bool, String> {
        self.uses += 1;
        let pair = (key.clone(), member.to_string());
        if self.members.contains(&pair) {
            return Ok(true);
        }
        let found = self.source.is_member(key, member)?;
        if found {
            self.members.insert(pair);
        }
        Ok(found)
    }

    /// The rows of the counter family `name` as this batch sees them
    /// (stored, then changed by the batch), by period. Reading a family
    /// does not take part in the compare-and-swap (only the rows' own reads
    /// do): steps that read one are still decided in stream order within an
    /// instance, as every step that uses counters.
    pub fn list(&mut self, name: &str) -> Result<Vec<(String, f64)>, String> {
        self.uses += 1;
        let mut rows: std::collections::BTreeMap<String, f64> =
            self.source.list(name)?.into_iter().collect();
        for (key, (_, now)) in &self.values {
            if key.name == name {
                rows.insert(key.period.clone(), *now);
            }
        }
        Ok(rows.into_iter().collect())
    }

    /// Adds `member` to the distinct set; true if it was not there. The
    /// counter's value is the number of members.
    pub fn add_distinct(&mut self, key: &CounterKey, member: &str) -> Result<bool, String> {
        self.uses += 1;
        let pair = (key.clone(), member.to_string());
        if self.members.contains(&pair) || self.source.is_member(key, member)? {
            self.members.insert(pair);
            return Ok(false);
        }
        self.members.insert(pair.clone());
        self.added.push(pair);
        self.add(key, 1.0)?;
        Ok(true)
    }

    /// What the batch used, for the store to write: every counter read or
    /// changed, each as a compare-and-swap on the version read. A counter
    /// only read is written too (same value, next version): a decision on a
    /// value another writer changed meanwhile must not commit, and a writer
    /// that read it must see that it was used.
    pub fn writes(&self) -> (Vec<CounterWrite>, Vec<(CounterKey, String)>) {
        let mut writes: Vec<CounterWrite> = self
            .values
            .iter()
            .map(|(key, (stored, now))| CounterWrite {
                key: key.clone(),
                version: stored.version,
                value: *now,
            })
            .collect();
        // A stable order keeps lock order stable across instances.
        writes.sort_by(|a, b| a.key.cmp(&b.key));
        (writes, self.added.clone())
    }

    /// Forgets what was read and changed, for a retry of the batch.
    pub fn reset(&mut self) {
        self.uses = 0;
        self.values.clear();
        self.members.clear();
        self.added.clear();
    }
}

/// Counters kept in memory: rule tests and backtests.
#[derive(Default)]
pub struct MemorySource {
    pub values: HashMap<CounterKey, Stored>,
    pub members: HashSet<(CounterKey, String)>,
}

impl CounterSource for MemorySource {
    fn load(&mut self, key: &CounterKey) -> Result<Stored, String> {
        Ok(self.values.get(key).copied().unwrap_or_default())
    }
    fn is_member(&mut self, key: &CounterKey, member: &str) -> Result<bool, String> {
        Ok(self.members.contains(&(key.clone(), member.to_string())))
    }
    fn list(&mut self, name: &str) -> Result<Vec<(String, f64)>, String> {
        Ok(self
            .values
            .iter()
            .filter(|(k, _)| k.name == name)
            .map(|(k, s)| (k.period.clone(), s.value))
            .take(MAX_FAMILY_ROWS)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn period_keys_follow_the_business_timezone() {
        let tz: Tz = "Europe/Paris".parse().unwrap();
        // 23:30 UTC on 31 March is already April in Paris.
        let at = t("2026-03-31T23:30:00Z");
        assert_eq!(period_key("day", at, tz).unwrap(), "2026-04-01");
        assert_eq!(period_key("month", at, tz).unwrap(), "2026-04");
        assert_eq!(period_key("quarter", at, tz).unwrap(), "2026-Q2");
        assert_eq!(period_key("quarter", at, Tz::UTC).unwrap(), "2026-Q1");
        assert_eq!(
            period_key("week", t("2026-11-23T10:00:00Z"), tz).unwrap(),
            "2026-W48"
        );
        assert_eq!(period_key("year", at, tz).unwrap(), "2026");
        assert_eq!(period_key("all", at, tz).unwrap(), "all");
        assert!(period_key("fortnight", at, tz).is_err());
    }

    #[test]
    fn distinct_members_count_once_and_writes_carry_the_version_read() {
        let mut src = MemorySource::default();
        let key = CounterKey {
            name: "big".into(),
            period: "2026-Q4".into(),
        };
        src.values.insert(
            key.clone(),
            Stored {
                value: 2.0,
                version: 7,
            },
        );
        src.members.insert((key.clone(), "old".into()));
        let mut c = Counters::new(Box::new(src), Tz::UTC);
        assert!(!c.add_distinct(&key, "old").unwrap());
        assert!(c.add_distinct(&key, "new").unwrap());
        assert!(!c.add_distinct(&key, "new").unwrap());
        assert_eq!(c.get(&key).unwrap(), 3.0);
        let (writes, members) = c.writes();
        assert_eq!(
            writes,
            vec![CounterWrite {
                key: key.clone(),
                version: 7,
                value: 3.0
            }]
        );
        assert_eq!(members, vec![(key, "new".to_string())]);
    }
}
