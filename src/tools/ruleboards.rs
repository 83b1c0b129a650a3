//! Boards in rule tests: `expect: boards:` checks a member's score on a
//! board as the test leaves it, since `rank()` makes no effect to compare.
//!
//! ```yaml
//! expect:
//!   boards:
//!     - {board: sales, member: Ana, score: 300}                 # today, all groups
//!     - {board: sales, member: Ana, group: east, period: month, score: 300}
//! ```

use crate::domain::boards::{self, BOARD_PERIODS};
use crate::domain::counters::Counters;
use serde::Deserialize;

/// A member's score in the latest `period` (`day` when absent) of a board
/// that the test's rules ranked in; 0 for a member never ranked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardExpect {
    board: String,
    member: String,
    score: f64,
    /// Only the member's rows of this group.
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    period: Option<String>,
}

/// One line per expectation the boards do not meet.
pub fn compare(expect: &[BoardExpect], counters: &Counters) -> Vec<String> {
    let (writes, _) = counters.writes();
    let rows: Vec<_> = writes
        .iter()
        .filter_map(|w| boards::parse_key(&w.key).map(|k| (k, w.value)))
        .collect();
    let mut problems = Vec::new();
    for e in expect {
        let kind = e.period.as_deref().unwrap_or("day");
        if !BOARD_PERIODS.contains(&kind) {
            problems.push(format!(
                "- board {}: unknown period {kind:?}: use one of {}",
                e.board,
                BOARD_PERIODS.join(", ")
            ));
            continue;
        }
        let of_board = || {
            rows.iter()
                .filter(|((b, k, _, _), _)| *b == e.board && *k == kind)
        };
        // Period keys sort in time: the latest is the board as the test left it.
        let latest = of_board().map(|((_, _, pk, _), _)| *pk).max();
        let got: f64 = of_board()
            .filter(|((_, _, pk, entry), _)| {
                Some(*pk) == latest
                    && entry.member == e.member
                    && e.group.as_ref().is_none_or(|g| *g == entry.group)
            })
            .map(|(_, v)| v)
            .sum();
        if (got - e.score).abs() > 1e-9 {
            let group = e
                .group
                .as_ref()
                .map_or(String::new(), |g| format!(" in {g}"));
            problems.push(format!(
                "- expected board {}: {}{group} at {} this {kind}\n     + got {got}",
                e.board, e.member, e.score
            ));
        }
    }
    problems
}
