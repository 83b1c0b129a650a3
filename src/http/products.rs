//! Product rankings over HTTP: the most popular products by views, cart
//! adds or purchases for a day, week or month, and the products most bought
//! with one product in a month ([`crate::domain::products`]).

use super::boards::{bad, business_tz, date_at};
use super::*;
use crate::domain::boards::period_of;
use crate::domain::products::{self, MAX_LIMIT};
use crate::store::Products;
use chrono::NaiveDate;

/// `at` (a date in the business timezone, today when absent) and `limit`
/// (1 to 100, 10 when absent), checked.
fn date_and_limit(
    s: &ApiState,
    at: Option<&str>,
    limit: Option<&str>,
) -> Result<(NaiveDate, usize), ApiError> {
    let date = date_at(at, business_tz(s))?;
    let limit = match limit {
        None | Some("") => 10,
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
    Ok((date, limit))
}

/// The ranking's lines: `[{rank, product_id, count}]`, equal counts sharing a rank.
fn lines(rows: Vec<(String, f64)>) -> Vec<serde_json::Value> {
    let mut out: Vec<serde_json::Value> = Vec::with_capacity(rows.len());
    let mut prev: Option<(f64, usize)> = None;
    for (i, (product, count)) in rows.into_iter().enumerate() {
        let rank = match prev {
            Some((c, r)) if c == count => r,
            _ => i + 1,
        };
        prev = Some((count, rank));
        out.push(json!({"rank": rank, "product_id": product, "count": count}));
    }
    out
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct PopularQuery {
    /// `viewed`, `carted` or `bought` (the default).
    kind: Option<String>,
    /// `day`, `week` (the default) or `month`.
    period: Option<String>,
    /// A date (`2026-12-06`) in the period, in the business timezone; today when absent.
    at: Option<String>,
    /// Lines: 1 to 100, 10 when absent.
    limit: Option<String>,
}

/// The most popular products of a period.
#[utoipa::path(get, path = "/products/popular", tag = "staff",
    security(("bearer" = ["staff"])),
    params(PopularQuery),
    responses((status = 200, description = "`{kind, period, key, start, products: [{rank, product_id, count}]}`, highest count first"),
              (status = 400, description = "a bad kind, period, date or limit")))]
pub(super) async fn popular(
    State(s): State<ApiState>,
    Query(q): Query<PopularQuery>,
) -> Result<Response, ApiError> {
    let kind = q.kind.as_deref().unwrap_or("bought");
    products::check_kind(kind).map_err(|e| bad(format!("kind: {e}")))?;
    let period = q.period.as_deref().unwrap_or("week");
    products::check_period(period).map_err(|e| bad(format!("period: {e}")))?;
    let (date, limit) = date_and_limit(&s, q.at.as_deref(), q.limit.as_deref())?;
    let p = period_of(period, date, business_tz(&s)).map_err(bad)?;
    let rows = s
        .store
        .counter_family(&products::popular_family(kind, period, &p.key))
        .await?;
    Ok(Json(json!({
        "kind": kind,
        "period": p.kind,
        "key": p.key,
        "start": p.start.to_string(),
        "products": lines(products::top(rows, limit)),
    }))
    .into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct WithQuery {
    /// A date (`2026-12-06`) in the month, in the business timezone; today when absent.
    at: Option<String>,
    /// Lines: 1 to 100, 10 when absent.
    limit: Option<String>,
}

/// The products most bought with a product (in the same order) in a month.
#[utoipa::path(get, path = "/products/{id}/bought-with", tag = "staff",
    security(("bearer" = ["staff"])),
    params(("id" = String, Path, description = "the product's id"), WithQuery),
    responses((status = 200, description = "`{product_id, period: \"month\", key, start, products: [{rank, product_id, count}]}`"),
              (status = 400, description = "a bad product id, date or limit")))]
pub(super) async fn bought_with(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<WithQuery>,
) -> Result<Response, ApiError> {
    if id.is_empty() || id.len() > crate::domain::bounds::MAX_KEY_BYTES {
        return Err(bad(format!(
            "a product id is 1 to {} bytes",
            crate::domain::bounds::MAX_KEY_BYTES
        )));
    }
    let (date, limit) = date_and_limit(&s, q.at.as_deref(), q.limit.as_deref())?;
    let p = period_of(products::WITH_PERIOD, date, business_tz(&s)).map_err(bad)?;
    let rows = s
        .store
        .counter_family(&products::with_family(&id, &p.key))
        .await?;
    Ok(Json(json!({
        "product_id": id,
        "period": p.kind,
        "key": p.key,
        "start": p.start.to_string(),
        "products": lines(products::top(rows, limit)),
    }))
    .into_response())
}
