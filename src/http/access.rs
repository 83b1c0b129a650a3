//! Who the caller is, the API's own document, the live feed and the
//! admin's audit and rejected lists.

use super::*;

/// The caller: the token's name and role, for the staff page to show only
/// what the role may do.
#[utoipa::path(get, path = "/whoami", tag = "access",
    security(("bearer" = ["ingest"])),
    responses((status = 200, description = "the token's name and role", body = Caller)))]
pub(super) async fn whoami(Extension(caller): Extension<Caller>) -> Json<Caller> {
    Json(caller)
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "access",
    security(("bearer" = ["ingest"])),
    responses((status = 200, description = "the OpenAPI 3.1 document of the HTTP API")))]
pub(super) async fn openapi_json(State(s): State<ApiState>) -> Response {
    Json(s.openapi.as_ref().clone()).into_response()
}

/// A ticket that opens the live feed for 60 seconds: `GET /api/live?ticket=`
/// (EventSource cannot send an Authorization header; a ticket in a URL that
/// leaks is worth a minute of the feed, not the token).
#[utoipa::path(post, path = "/live/ticket", tag = "staff",
    security(("bearer" = ["staff"])),
    responses((status = 200, description = "`ticket`, `expires_in` seconds and the feed's `url`"),
              (status = 503, description = "no signing key")))]
pub(super) async fn live_ticket(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let ticket =
        auth::issue_ticket(&s, &caller, chrono::Utc::now().timestamp()).ok_or_else(|| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "no key to sign tickets with".into(),
            )
        })?;
    Ok(Json(json!({
        "ticket": ticket,
        "expires_in": auth::TICKET_SECS,
        "url": format!("/api/live?ticket={ticket}"),
    }))
    .into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct AuditQuery {
    /// Only this target: `rule:<name>`, `task:<id>` or `client:<hash>`.
    target: Option<String>,
    /// Only this client (looked up by its hash, so erased clients too).
    client: Option<String>,
    limit: Option<u32>,
}

/// The audit log, newest first: exports, erasures, rule runs and tasks
/// closed, with the token's name. Clients appear by their erasure hash.
#[utoipa::path(get, path = "/audit", tag = "admin",
    security(("bearer" = ["admin"])), params(AuditQuery),
    responses((status = 200, description = "`audit`: entries with `at`, `actor`, `role`, `action`, `target`, `outcome`")))]
pub(super) async fn audit_log(
    State(s): State<ApiState>,
    Query(q): Query<AuditQuery>,
) -> Result<Response, ApiError> {
    let target = match (q.target, q.client) {
        (_, Some(c)) => Some(client_target(&client_id(c)?)),
        (t, None) => t,
    };
    let rows = s
        .store
        .list_audit(target.as_deref(), q.limit.unwrap_or(100).min(1000))
        .await?;
    Ok(Json(json!({ "audit": rows })).into_response())
}

/// Server-Sent Events: tasks, mails and notable events as they happen.
#[utoipa::path(get, path = "/live", tag = "staff",
    security(("bearer" = ["staff"])),
    params(("ticket" = Option<String>, Query, description = "a ticket from POST /api/live/ticket, instead of the Authorization header")),
    responses((status = 200, description = "Server-Sent Events: `event`, `task`, `mail`", content_type = "text/event-stream")))]
pub(super) async fn live(State(s): State<ApiState>) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let rx = s.live.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(item) => {
                    let ev = Event::default()
                        .event(item.kind)
                        .json_data(&item)
                        .unwrap_or_else(|_| Event::default());
                    return Some((Ok::<_, std::convert::Infallible>(ev), rx));
                }
                // A slow page missed some news; it goes on with the rest.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[utoipa::path(get, path = "/rejected", tag = "admin",
    security(("bearer" = ["admin"])), params(PageQuery),
    responses((status = 200, description = "`rejected`: envelopes (raw, personal data included) with reasons, newest first, and `next`: the cursor of the next page, null on the last"),
              (status = 400, description = "a bad cursor")))]
pub(super) async fn rejected(
    State(s): State<ApiState>,
    Query(q): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let limit = page_limit(q.limit, 100, 1000);
    let before = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(c.parse::<i64>().map_err(|_| bad_cursor(c))?),
    };
    let mut rows = s.store.rejected_page(before, limit + 1).await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next = more
        .then(|| rows.last().map(|(id, _)| id.to_string()))
        .flatten();
    let rows: Vec<_> = rows.into_iter().map(|(_, r)| r).collect();
    Ok(Json(json!({ "rejected": rows, "next": next })).into_response())
}
