//! Staff's routes about clients: search, the 360 view, events, the
//! process log, tasks, and the GDPR export and erasure.

use super::*;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct SearchQuery {
    q: String,
    /// Clients per page: 1 to 100, 20 when absent.
    limit: Option<u32>,
    /// `next` from the previous page.
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/clients", tag = "staff",
    security(("bearer" = ["staff"])), params(SearchQuery),
    responses((status = 200, description = "`clients` matching the id, e-mail or name (an exact id first, then the most recently seen), and `next`: the cursor of the next page, null on the last"),
              (status = 400, description = "a bad cursor")))]
pub(super) async fn search(
    State(s): State<ApiState>,
    Query(q): Query<SearchQuery>,
) -> Result<Response, ApiError> {
    let limit = page_limit(q.limit, 20, 100);
    // The search's order has no stable key of its own (an exact id first,
    // then by last activity): its cursor is a position.
    let offset: u32 = match q.cursor.as_deref() {
        None | Some("") => 0,
        Some(c) => c
            .strip_prefix('o')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| bad_cursor(c))?,
    };
    let mut found = s
        .store
        .search_clients(q.q.trim(), offset, limit + 1)
        .await?;
    let next = (found.len() > limit as usize).then(|| format!("o{}", offset + limit));
    found.truncate(limit as usize);
    Ok(Json(json!({ "clients": found, "next": next })).into_response())
}

/// The 360 view of a client, from the history nudge keeps (real time: what
/// was committed a moment ago is here).
#[utoipa::path(get, path = "/clients/{id}", tag = "staff",
    security(("bearer" = ["staff"])), params(("id" = String, Path, description = "the client id")),
    responses((status = 200, description = "the 360 view"), (status = 404, description = "no such client")))]
pub(super) async fn client_360(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let client = client_id(id)?;
    let states = s.store.load_clients(&[&client]).await?;
    let Some(c) = states.get(&client) else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no client {client}"),
        ));
    };
    let mails = s.store.client_mails(&client, 20).await?;
    let filter = TaskFilter {
        status: Some("open".into()),
        client_id: Some(client.to_string()),
        ..Default::default()
    };
    let tasks = s.store.list_tasks(&filter, 50).await?;
    // Opens and clicks name the mail's Message-ID: the last few hundred say
    // which of the 20 mails shown were opened or clicked.
    let mut seen = [
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    ];
    for (set, ty) in seen.iter_mut().zip(["email_opened", "email_clicked"]) {
        for e in s.store.client_events(&client, Some(ty), None, 500).await? {
            if let Some(key) = e.data["message_id"]
                .as_str()
                .and_then(crate::domain::effects::key_of_message_id)
            {
                set.insert(key.to_string());
            }
        }
    }
    let templates = s.catalog.templates();
    let ctx = crate::http::view::MailContext {
        templates: &templates,
        opened: &seen[0],
        clicked: &seen[1],
    };
    Ok(Json(crate::http::view::client_360(c, &mails, &tasks, &ctx)).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct EventsQuery {
    #[serde(rename = "type")]
    event_type: Option<String>,
    /// `next` from the previous page, or an RFC 3339 time.
    before: Option<String>,
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/clients/{id}/events", tag = "staff",
    security(("bearer" = ["staff"])), params(("id" = String, Path, description = "the client id"), EventsQuery),
    responses((status = 200, description = "the timeline, newest first, and `next`"), (status = 404, description = "no such client (or erased)")))]
pub(super) async fn client_events(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let client = client_id(id)?;
    // Only a client nudge knows has a timeline: an erased client's event
    // rows stay (emptied, for counts and replays), their timeline does not.
    if !s
        .store
        .load_clients(&[&client])
        .await?
        .contains_key(&client)
    {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no client {client}"),
        ));
    }
    let before = match q.before.as_deref() {
        None | Some("") => None,
        Some(b) => {
            let (t, id) = b.split_once('~').unwrap_or((b, "\u{10FFFF}"));
            let t = chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("before: {e}")))?;
            Some((t.with_timezone(&chrono::Utc), id.to_string()))
        }
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let events = s
        .store
        .client_events(&client, q.event_type.as_deref(), before, limit)
        .await?;
    let next = (events.len() == limit as usize)
        .then(|| {
            events
                .last()
                .map(|e| format!("{}~{}", e.occurred_at.to_rfc3339(), e.id))
        })
        .flatten();
    Ok(Json(json!({ "client_id": client, "events": events, "next": next })).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct TaskQuery {
    /// `open` (default), `done` or `all`.
    status: Option<String>,
    team: Option<String>,
    client: Option<String>,
    /// Tasks per page: 1 to 1000, 100 when absent.
    limit: Option<u32>,
    /// `next` from the previous page.
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/tasks", tag = "staff",
    security(("bearer" = ["staff"])), params(TaskQuery),
    responses((status = 200, description = "`tasks`, newest first, and `next`: the cursor of the next page, null on the last"),
              (status = 400, description = "a bad status or cursor")))]
pub(super) async fn tasks(
    State(s): State<ApiState>,
    Query(q): Query<TaskQuery>,
) -> Result<Response, ApiError> {
    let status = match q.status.as_deref() {
        None | Some("open") => Some("open".to_string()),
        Some("done") => Some("done".to_string()),
        Some("all") => None,
        Some(other) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("status {other:?}: use open, done or all"),
            ));
        }
    };
    let after = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => {
            let (t, id) = c.split_once('~').ok_or_else(|| bad_cursor(c))?;
            let t = chrono::DateTime::parse_from_rfc3339(t).map_err(|_| bad_cursor(c))?;
            Some((t.with_timezone(&chrono::Utc), id.to_string()))
        }
    };
    let filter = TaskFilter {
        status,
        team: q.team,
        client_id: q.client,
        after,
    };
    let limit = page_limit(q.limit, 100, 1000);
    let mut rows = s.store.list_tasks(&filter, limit + 1).await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    // The last task's place in the order: creation time to the nanosecond, and id.
    let next = more
        .then(|| {
            rows.last().map(|t| {
                format!(
                    "{}~{}",
                    t.created_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
                    t.id
                )
            })
        })
        .flatten();
    Ok(Json(json!({ "tasks": rows, "next": next })).into_response())
}

#[utoipa::path(post, path = "/tasks/{id}/done", tag = "staff",
    security(("bearer" = ["staff"])), params(("id" = String, Path, description = "the task id")),
    responses((status = 200, description = "closed"), (status = 404, description = "no such open task")))]
pub(super) async fn task_done(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let closed = s.store.close_task(&id, chrono::Utc::now()).await?;
    let outcome = if closed { "ok" } else { "not_found" };
    audit(&s, &caller, "task_done", format!("task:{id}"), outcome).await;
    if closed {
        Ok(Json(json!({ "id": id, "status": "done" })).into_response())
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no open task {id:?}"),
        ))
    }
}

#[utoipa::path(get, path = "/clients/{id}/log", tag = "staff",
    security(("bearer" = ["staff"])), params(("id" = String, Path, description = "the client id"), Limit),
    responses((status = 200, description = "the client's process log")))]
pub(super) async fn client_log(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<Limit>,
) -> Result<Response, ApiError> {
    let client =
        ClientId::parse(id).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let rows = s
        .store
        .client_log(&client, q.limit.unwrap_or(100).min(1000))
        .await?;
    Ok(Json(json!({ "client_id": client, "log": rows })).into_response())
}

/// GDPR: everything nudge holds on a client.
#[utoipa::path(get, path = "/clients/{id}/export", tag = "admin",
    security(("bearer" = ["admin"])), params(("id" = String, Path, description = "the client id")),
    responses((status = 200, description = "everything nudge holds on the client (GDPR)"), (status = 404, description = "no such client")))]
pub(super) async fn export_client(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let client = client_id(id)?;
    let found = s.store.export_client(&client).await?;
    let outcome = if found.is_some() { "ok" } else { "not_found" };
    audit(&s, &caller, "export", client_target(&client), outcome).await;
    match found {
        Some(v) => Ok(Json(v).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no client {client}"),
        )),
    }
}

/// GDPR: erase a client's personal data (`nudge forget` does the same).
#[utoipa::path(delete, path = "/clients/{id}", tag = "admin",
    security(("bearer" = ["admin"])), params(("id" = String, Path, description = "the client id")),
    responses((status = 200, description = "erased"), (status = 404, description = "no such client")))]
pub(super) async fn erase_client(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let client = client_id(id)?;
    let erased = s.store.erase_client(&client, chrono::Utc::now()).await?;
    let outcome = if erased { "ok" } else { "not_found" };
    audit(&s, &caller, "erase", client_target(&client), outcome).await;
    if erased {
        tracing::info!("a client was erased on request");
        Ok(Json(json!({"client_id": client, "erased": true})).into_response())
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no client {client}"),
        ))
    }
}
