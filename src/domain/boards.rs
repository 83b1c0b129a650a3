//! Boards: rankings of members ("consultants by what they sold today"), per
//! day, week and month in the business timezone.
//!
//! A board is kept in shared counters, not beside them, so it inherits what
//! counters guarantee: read once per batch, changed in memory, written with
//! the batch as a compare-and-swap on each row's version, a lost race
//! decided again on the new value, steps that use it decided in stream
//! order, and replay and backtest rebuilding it with the counters.
//!
//! One board period is one counter *family*: the counter name
//! `board:<board>:<day|week|month>:<period key>` (`board:sales:day:2026-12-06`),
//! with one row per entry, the row's period column holding the entry
//! (`["team-a","ana","Ana L."]`: group, member, label). Reading a board
//! period is then one lookup by the counters' primary key prefix. A member
//! counted under two groups or labels in one period (moved to another team
//! mid-month) has a row for each: per team, each counts for its team;
//! overall, they add up, shown with the group and label of the larger part.

use super::counters::{CounterKey, period_key};
use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use std::collections::BTreeMap;

/// The periods every `rank()` counts in.
pub const BOARD_PERIODS: &[&str] = &["day", "week", "month"];
/// The counter names of boards start with this; `add()` may not use it.
pub const PREFIX: &str = "board:";
/// Longest board name, in bytes (letters, digits, `_`, `-`, `.`).
pub const MAX_BOARD_BYTES: usize = 64;
/// Longest member, group or label, in bytes: an entry is a key in the
/// counters' table, read with every ranking.
pub const MAX_PART_BYTES: usize = 128;
/// Most entries one ranking answer lists.
pub const MAX_LIMIT: usize = 500;
/// Most rows read for one board period (members × groups × labels): beyond
/// it a ranking is refused rather than read without bound.
pub const MAX_ROWS: usize = 100_000;
/// Most rows a ranking answer lists as its `parts` when asked (the wall page
/// ranks feed changes itself from them); a period with more answers without,
/// and the page reloads the ranking on each change instead.
pub const MAX_PARTS: usize = 2_000;

/// Who is ranked: the member, the group it counts for, how it is shown.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Entry {
    pub group: String,
    pub member: String,
    pub label: String,
}

impl Entry {
    /// The entry as its row's key: a JSON array, unambiguous whatever the parts hold.
    pub fn encode(&self) -> String {
        serde_json::to_string(&[&self.group, &self.member, &self.label]).expect("strings serialise")
    }

    pub fn decode(s: &str) -> Option<Entry> {
        let [group, member, label]: [String; 3] = serde_json::from_str(s).ok()?;
        Some(Entry {
            group,
            member,
            label,
        })
    }
}

/// A board name: 1 to [`MAX_BOARD_BYTES`] of letters, digits, `_`, `-`, `.`
/// (it is part of a counter name and of the wall page's URL).
pub fn check_board(board: &str) -> Result<(), String> {
    let ok = !board.is_empty()
        && board.len() <= MAX_BOARD_BYTES
        && board
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a board name is 1 to {MAX_BOARD_BYTES} letters, digits, `_`, `-` or `.`, got {board:?}"
        ))
    }
}

/// A member, group or label: at most [`MAX_PART_BYTES`] bytes; the member not empty.
pub fn check_part(what: &str, s: &str, may_be_empty: bool) -> Result<(), String> {
    if (s.is_empty() && !may_be_empty) || s.len() > MAX_PART_BYTES {
        let least = if may_be_empty { 0 } else { 1 };
        return Err(format!(
            "{what} must be {least} to {MAX_PART_BYTES} bytes long, got {}",
            s.len()
        ));
    }
    Ok(())
}

/// The counter family of `board` for the period `kind` whose key is `key`.
pub fn family(board: &str, kind: &str, key: &str) -> String {
    format!("{PREFIX}{board}:{kind}:{key}")
}

/// The counter of `entry` on `board` for the `kind` period containing `at`.
pub fn counter_key(
    board: &str,
    kind: &str,
    at: DateTime<Utc>,
    tz: Tz,
    entry: &Entry,
) -> Result<CounterKey, String> {
    Ok(CounterKey {
        name: family(board, kind, &period_key(kind, at, tz)?),
        period: entry.encode(),
    })
}

/// What a counter of a board is: `(board, kind, period key, entry)`; `None`
/// for any other counter.
pub fn parse_key(key: &CounterKey) -> Option<(&str, &str, &str, Entry)> {
    let rest = key.name.strip_prefix(PREFIX)?;
    let mut parts = rest.splitn(3, ':');
    let (board, kind, pk) = (parts.next()?, parts.next()?, parts.next()?);
    BOARD_PERIODS.contains(&kind).then_some(())?;
    Some((board, kind, pk, Entry::decode(&key.period)?))
}

/// A period asked for by date: its kind, its counter key and its first day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Period {
    pub kind: String,
    pub key: String,
    pub start: NaiveDate,
}

/// The `kind` period (`day`, `week`, `month`) that contains the local date `date`.
pub fn period_of(kind: &str, date: NaiveDate, tz: Tz) -> Result<Period, String> {
    if !BOARD_PERIODS.contains(&kind) {
        return Err(format!(
            "unknown period {kind:?}: use one of {}",
            BOARD_PERIODS.join(", ")
        ));
    }
    // Noon local time is in the date whatever the zone's DST does.
    let noon = date.and_hms_opt(12, 0, 0).expect("noon exists");
    let at = tz
        .from_local_datetime(&noon)
        .earliest()
        .map(|t| t.with_timezone(&Utc))
        .ok_or_else(|| format!("{date} has no noon in {tz}"))?;
    let start = match kind {
        "day" => date,
        "week" => date - chrono::Duration::days(i64::from(date.weekday().num_days_from_monday())),
        _ => date.with_day(1).expect("every month has a first day"),
    };
    Ok(Period {
        kind: kind.to_string(),
        key: period_key(kind, at, tz)?,
        start,
    })
}

/// One line of a ranking.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ranked {
    /// 1 for the best; equal scores share a rank (1, 1, 3).
    pub rank: usize,
    pub member: String,
    pub label: String,
    pub group: String,
    pub score: f64,
}

/// The ranking from a board period's rows: per member (only rows of
/// `group`, when given), highest score first, ties by member, at most
/// `limit` lines (ties at the cut included only up to `limit`).
pub fn rank_rows(rows: &[(Entry, f64)], group: Option<&str>, limit: usize) -> Vec<Ranked> {
    // member -> (total, the largest row's (score, group, label))
    let mut by_member: BTreeMap<&str, (f64, f64, &Entry)> = BTreeMap::new();
    for (entry, score) in rows {
        if group.is_some_and(|g| g != entry.group) {
            continue;
        }
        let e = by_member
            .entry(&entry.member)
            .or_insert((0.0, f64::NEG_INFINITY, entry));
        e.0 += score;
        // The larger part names the member; on a tie, the smaller entry, so
        // the answer does not depend on the rows' order.
        if *score > e.1 || (*score == e.1 && entry < e.2) {
            e.1 = *score;
            e.2 = entry;
        }
    }
    let mut lines: Vec<(&str, f64, &Entry)> = by_member
        .into_iter()
        .map(|(m, (total, _, e))| (m, total, e))
        .collect();
    lines.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let mut out: Vec<Ranked> = Vec::with_capacity(limit.min(lines.len()));
    for (i, (member, score, e)) in lines.into_iter().take(limit).enumerate() {
        let rank = match out.last() {
            Some(prev) if prev.score == score => prev.rank,
            _ => i + 1,
        };
        out.push(Ranked {
            rank,
            member: member.to_string(),
            label: e.label.clone(),
            group: e.group.clone(),
            score,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(group: &str, member: &str, label: &str) -> Entry {
        Entry {
            group: group.into(),
            member: member.into(),
            label: label.into(),
        }
    }

    #[test]
    fn keys_round_trip_and_other_counters_are_not_boards() {
        let at: DateTime<Utc> = "2026-12-06T23:30:00Z".parse().unwrap();
        let paris: Tz = "Europe/Paris".parse().unwrap();
        let entry = e("a:\"b", "ana", "Ana \u{1f}L");
        let key = counter_key("sales", "day", at, paris, &entry).unwrap();
        assert_eq!(key.name, "board:sales:day:2026-12-07");
        assert_eq!(
            parse_key(&key),
            Some(("sales", "day", "2026-12-07", entry.clone()))
        );
        // Sunday night in UTC is Monday in Paris: a new week there.
        let week = counter_key("sales", "week", at, paris, &entry).unwrap();
        assert_eq!(week.name, "board:sales:week:2026-W50");
        let plain = CounterKey {
            name: "big".into(),
            period: "2026-Q4".into(),
        };
        assert_eq!(parse_key(&plain), None);
        assert!(check_board("sales-2026.eu").is_ok());
        assert!(check_board("sales:x").is_err());
        assert!(check_board("").is_err());
    }

    #[test]
    fn periods_by_date_start_on_their_first_day() {
        let d = NaiveDate::from_ymd_opt(2026, 12, 6).unwrap(); // a Sunday
        let p = period_of("week", d, Tz::UTC).unwrap();
        assert_eq!(
            (p.key.as_str(), p.start.to_string()),
            ("2026-W49", "2026-11-30".into())
        );
        let p = period_of("month", d, Tz::UTC).unwrap();
        assert_eq!(
            (p.key.as_str(), p.start.to_string()),
            ("2026-12", "2026-12-01".into())
        );
        assert!(period_of("year", d, Tz::UTC).is_err());
    }

    #[test]
    fn ties_share_a_rank_and_a_member_in_two_groups_adds_up() {
        let rows = vec![
            (e("a", "ana", "Ana"), 100.0),
            (e("b", "ana", "Ana"), 50.0),
            (e("b", "bob", "Bob"), 150.0),
            (e("a", "cy", "Cy"), 20.0),
            (e("a", "dee", "Dee"), 20.0),
            (e("b", "eve", "Eve"), 5.0),
        ];
        let all = rank_rows(&rows, None, 10);
        let got: Vec<(usize, &str, &str, f64)> = all
            .iter()
            .map(|r| (r.rank, r.member.as_str(), r.group.as_str(), r.score))
            .collect();
        assert_eq!(
            got,
            [
                (1, "ana", "a", 150.0),
                (1, "bob", "b", 150.0),
                (3, "cy", "a", 20.0),
                (3, "dee", "a", 20.0),
                (5, "eve", "b", 5.0)
            ]
        );
        let b = rank_rows(&rows, Some("b"), 2);
        assert_eq!(
            b.iter()
                .map(|r| (r.rank, r.member.as_str(), r.score))
                .collect::<Vec<_>>(),
            [(1, "bob", 150.0), (2, "ana", 50.0)]
        );
    }
}
