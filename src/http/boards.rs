//! Boards over HTTP: the list of boards, one board's ranking for a day,
//! week or month (overall or for one group), and the wall page that shows a
//! ranking full screen and follows the live feed.

use super::*;
use crate::domain::boards::{self, MAX_LIMIT, MAX_PARTS, MAX_ROWS};
use crate::store::Boards;
use chrono::NaiveDate;
use std::collections::BTreeMap;

/// The business timezone: the one counters, boards and rankings count days in.
pub(super) fn business_tz(s: &ApiState) -> chrono_tz::Tz {
    s.config
        .as_ref()
        .map_or(chrono_tz::Tz::UTC, |c| c.history.business_tz())
}

pub(super) fn bad(message: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message)
}

/// `at`, a date in the business timezone `tz` (today when absent), checked.
pub(super) fn date_at(at: Option<&str>, tz: chrono_tz::Tz) -> Result<NaiveDate, ApiError> {
    match at {
        None | Some("") => Ok(chrono::Utc::now().with_timezone(&tz).date_naive()),
        Some(d) => NaiveDate::parse_from_str(d, "%Y-%m-%d")
            .map_err(|e| bad(format!("at: {d:?} is not a date like 2026-12-06: {e}"))),
    }
}

/// The boards in use, each with its most recent day.
#[utoipa::path(get, path = "/boards", tag = "staff",
    security(("bearer" = ["staff"])),
    responses((status = 200, description = "`boards`: `[{board, last_day}]`, by name")))]
pub(super) async fn list_boards(State(s): State<ApiState>) -> Result<Response, ApiError> {
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    for family in s.store.board_days().await? {
        let Some((board, day)) = family
            .strip_prefix(boards::PREFIX)
            .and_then(|rest| rest.split_once(":day:"))
        else {
            continue;
        };
        if boards::check_board(board).is_err() {
            continue;
        }
        let seen = last.entry(board.to_string()).or_default();
        if day > seen.as_str() {
            *seen = day.to_string();
        }
    }
    let list: Vec<_> = last
        .into_iter()
        .map(|(board, last_day)| json!({"board": board, "last_day": last_day}))
        .collect();
    Ok(Json(json!({ "boards": list })).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct BoardQuery {
    /// `day` (the default), `week` or `month`.
    period: Option<String>,
    /// A date (`2026-12-06`) in the period, in the business timezone; today when absent.
    at: Option<String>,
    /// Only this group's entries (a team).
    group: Option<String>,
    /// Lines: 1 to 500, 50 when absent.
    limit: Option<String>,
    /// `true`: also the period's rows (of `group`, when given) as `parts:
    /// [{member, group, label, score}]`, when there are at most 2,000; the
    /// wall page ranks live changes itself from them.
    parts: Option<String>,
}

/// A board's ranking: equal scores share a rank.
#[utoipa::path(get, path = "/boards/{board}", tag = "staff",
    security(("bearer" = ["staff"])),
    params(("board" = String, Path, description = "the board's name"), BoardQuery),
    responses((status = 200, description = "`{board, period, key, start, group, groups, entries: [{rank, member, label, group, score}]}`, and `parts` when asked; no entries for a board or period with none"),
              (status = 400, description = "a bad board name, period, date, group, limit or parts")))]
pub(super) async fn board(
    State(s): State<ApiState>,
    Path(board): Path<String>,
    Query(q): Query<BoardQuery>,
) -> Result<Response, ApiError> {
    boards::check_board(&board).map_err(bad)?;
    let tz = business_tz(&s);
    let kind = q.period.as_deref().unwrap_or("day");
    let date = date_at(q.at.as_deref(), tz)?;
    let period = boards::period_of(kind, date, tz).map_err(|e| bad(format!("period: {e}")))?;
    let limit = match q.limit.as_deref() {
        None | Some("") => 50,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                bad(format!(
                    "limit: {l:?} is not a number from 1 to {MAX_LIMIT}"
                ))
            })?,
    };
    let parts = match q.parts.as_deref() {
        None | Some("" | "false") => false,
        Some("true") => true,
        Some(p) => return Err(bad(format!("parts: {p:?} is neither true nor false"))),
    };
    let group = q.group.filter(|g| !g.is_empty());
    if let Some(g) = &group {
        boards::check_part("group", g, false).map_err(bad)?;
    }
    let rows = s
        .store
        .board_rows(&boards::family(&board, &period.kind, &period.key))
        .await?;
    if rows.len() > MAX_ROWS {
        return Err(ApiError(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("the board has over {MAX_ROWS} entries in this period: not ranked"),
        ));
    }
    let entries = boards::rank_rows(&rows, group.as_deref(), limit);
    let mut groups: Vec<&str> = rows.iter().map(|(e, _)| e.group.as_str()).collect();
    groups.sort_unstable();
    groups.dedup();
    let mut answer = json!({
        "board": board,
        "period": period.kind,
        "key": period.key,
        "start": period.start.to_string(),
        "group": group,
        "groups": groups,
        "entries": entries,
    });
    if parts && rows.len() <= MAX_PARTS {
        answer["parts"] = rows
            .iter()
            .filter(|(e, _)| group.as_ref().is_none_or(|g| *g == e.group))
            .map(|(e, score)| {
                json!({"member": e.member, "group": e.group, "label": e.label, "score": score})
            })
            .collect();
    }
    Ok(Json(answer).into_response())
}

/// The wall page: a board's ranking full screen, with team tabs, following
/// the live feed. The page is open; what it shows needs a staff token.
#[utoipa::path(get, path = "/boards/{board}", tag = "open",
    params(("board" = String, Path, description = "the board's name")),
    responses((status = 200, description = "the wall board page", content_type = "text/html"),
              (status = 400, description = "a bad board name")))]
pub(super) async fn wall_page(Path(board): Path<String>) -> Response {
    if let Err(e) = boards::check_board(&board) {
        return ops::page(StatusCode::BAD_REQUEST, "No such board", &html_escape(&e));
    }
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("wall.html"),
    )
        .into_response()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
