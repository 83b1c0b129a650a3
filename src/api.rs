//! The HTTP side: health and metrics (open), and the `/api` routes (behind
//! the bearer token when `http.token` is set).

use crate::catalog::Catalog;
use crate::event::ClientId;
use crate::live::Live;
use crate::metrics::Metrics;
use crate::scheduler::{Scheduler, TriggerError};
use crate::store::{AnyStore, Store, TaskFilter};
use crate::unsubscribe::Signer;
use axum::extract::Path;
use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

#[derive(Clone)]
pub struct ApiState {
    pub store: AnyStore,
    pub nats: Option<async_nats::Client>,
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<Metrics>,
    pub scheduler: Option<Arc<Scheduler>>,
    /// Checks unsubscribe links.
    pub signer: Option<Arc<Signer>>,
    /// Where the shop's events go: an unsubscribe click becomes one of them.
    pub subject_prefix: String,
    /// The stream and consumer, for the consumer's lag in `/metrics`.
    pub stream: String,
    pub consumer: String,
    pub live: Live,
    pub token: Option<Arc<str>>,
}

pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/clients", get(search))
        .route("/clients/{id}/events", get(client_events))
        .route("/live", get(live))
        .route("/rejected", get(rejected))
        .route("/rules", get(rules))
        .route("/rules/{name}/run", post(run_rule))
        .route("/tasks", get(tasks))
        .route("/tasks/{id}/done", post(task_done))
        .route("/clients/{id}/log", get(client_log))
        .route("/clients/{id}/export", get(export_client))
        .route("/clients/{id}", get(client_360).delete(erase_client))
        .route("/templates/{name}/preview", get(preview))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/", get(staff_page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route(
            "/unsubscribe/{token}",
            get(unsubscribe_page).post(unsubscribe),
        )
        .nest("/api", api)
        .with_state(state)
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "api: store error");
        ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

async fn require_token(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let Some(expected) = &s.token else {
        return next.run(req).await;
    };
    // The header, or `?token=` for EventSource, which cannot set headers.
    let from_query = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(|t| t.to_string())
    });
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string)
        .or(from_query)
        .unwrap_or_default();
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        next.run(req).await
    } else {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        )
        .into_response()
    }
}

/// Compares without an early exit, so timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= (x ^ y) as usize;
    }
    diff == 0
}

/// Ready only when both NATS and the database answer.
async fn health(State(s): State<ApiState>) -> Response {
    let db_ok = s.store.ping().await.is_ok();
    let nats_ok = s
        .nats
        .as_ref()
        .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected);
    // The database may answer and still refuse writes (full, read-only,
    // locked): then the batch in hand keeps failing, and says why.
    let failing = s.metrics.ingest_failing();
    let status = if db_ok && nats_ok && failing.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let ingest = match failing {
        // Serving the API, mail and timers; another process consumes.
        None if s.metrics.standby() => {
            "standby: another nudge process consumes into this database".to_string()
        }
        None => "ok".to_string(),
        Some((error, since)) => format!(
            "failing since {}: {error}",
            since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
    };
    let body = json!({
        "status": if status == StatusCode::OK { "ready" } else { "not ready" },
        "database": if db_ok { "ok" } else { "unavailable" },
        "nats": if nats_ok { "ok" } else { "unavailable" },
        "ingest": ingest,
    });
    (status, Json(body)).into_response()
}

async fn metrics(State(s): State<ApiState>) -> Response {
    let depth = s.store.outbox_depth().await.unwrap_or(0);
    let lag = consumer_lag(&s).await.unwrap_or(0);
    let gauges = [
        (
            "nudge_outbox_depth",
            "Effects waiting to be delivered.",
            depth,
        ),
        (
            "nudge_consumer_lag",
            "Events in the stream not yet taken by nudge.",
            lag,
        ),
        (
            "nudge_consumer_standby",
            "1 while this instance waits for another process consuming into the same SQLite database.",
            u64::from(s.metrics.standby()),
        ),
    ];
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(&gauges),
    )
        .into_response()
}

async fn consumer_lag(s: &ApiState) -> Option<u64> {
    let js = async_nats::jetstream::new(s.nats.clone()?);
    let stream = js.get_stream(&s.stream).await.ok()?;
    let info = stream.consumer_info(&s.consumer).await.ok()?;
    Some(info.num_pending)
}

/// The staff page: one static file, no build step (see `src/staff.html`).
async fn staff_page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("staff.html"),
    )
        .into_response()
}

#[derive(Deserialize)]
struct SearchQuery {
    q: String,
    limit: Option<u32>,
}

async fn search(
    State(s): State<ApiState>,
    Query(q): Query<SearchQuery>,
) -> Result<Response, ApiError> {
    let found = s
        .store
        .search_clients(q.q.trim(), q.limit.unwrap_or(20).min(100))
        .await?;
    Ok(Json(json!({ "clients": found })).into_response())
}

/// The 360 view of a client, from the history nudge keeps (real time: what
/// was committed a moment ago is here).
async fn client_360(
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
    Ok(Json(crate::view::client_360(c, &mails, &tasks)).into_response())
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(rename = "type")]
    event_type: Option<String>,
    /// `next` from the previous page, or an RFC 3339 time.
    before: Option<String>,
    limit: Option<u32>,
}

async fn client_events(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let client = client_id(id)?;
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

/// Server-Sent Events: tasks, mails and notable events as they happen.
async fn live(State(s): State<ApiState>) -> Response {
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

#[derive(Deserialize)]
struct Limit {
    limit: Option<u32>,
}

async fn rejected(State(s): State<ApiState>, Query(q): Query<Limit>) -> Result<Response, ApiError> {
    let rows = s
        .store
        .list_rejected(q.limit.unwrap_or(100).min(1000))
        .await?;
    Ok(Json(json!({ "rejected": rows })).into_response())
}

async fn rules(State(s): State<ApiState>) -> Response {
    let set = s.catalog.rules();
    let rules: Vec<_> = set
        .rules
        .iter()
        .map(|r| {
            let (runs, errors) = s.metrics.rule_counts(&r.name);
            json!({"name": r.name, "file": r.path.display().to_string(),
                   "triggers": r.triggers,
                   "schedule": r.schedule.as_ref().map(|s| s.text.clone()),
                   "runs": runs, "errors": errors})
        })
        .collect();
    let errors: Vec<String> = s.catalog.errors().iter().map(|e| e.to_string()).collect();
    Json(json!({
        "rules": rules,
        "errors": errors,
        "quarantined": s.catalog.quarantined(),
        "quarantine": s.catalog.quarantine_criterion(),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct TaskQuery {
    /// `open` (default), `done` or `all`.
    status: Option<String>,
    team: Option<String>,
    client: Option<String>,
    limit: Option<u32>,
}

async fn tasks(
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
    let filter = TaskFilter {
        status,
        team: q.team,
        client_id: q.client,
    };
    let rows = s
        .store
        .list_tasks(&filter, q.limit.unwrap_or(100).min(1000))
        .await?;
    Ok(Json(json!({ "tasks": rows })).into_response())
}

async fn task_done(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if s.store.close_task(&id, chrono::Utc::now()).await? {
        Ok(Json(json!({ "id": id, "status": "done" })).into_response())
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no open task {id:?}"),
        ))
    }
}

async fn client_log(
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

#[derive(Deserialize)]
struct PreviewQuery {
    client: String,
}

/// A template rendered with a client's history, for the staff page.
async fn preview(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<PreviewQuery>,
) -> Result<Response, ApiError> {
    let vars = crate::tools::client_vars(&s.store, &q.client)
        .await
        .map_err(|e| ApiError(StatusCode::NOT_FOUND, e.to_string()))?;
    let r = crate::tools::preview(&s.catalog.templates(), &name, &vars)
        .map_err(|e| ApiError(StatusCode::NOT_FOUND, e.to_string()))?;
    Ok(Json(
        json!({"template": name, "client_id": q.client, "subject": r.subject,
                   "text": r.text, "html": r.html, "kind": r.kind}),
    )
    .into_response())
}

fn client_id(id: String) -> Result<ClientId, ApiError> {
    ClientId::parse(id).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

/// GDPR: everything nudge holds on a client.
async fn export_client(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let client = client_id(id)?;
    match s.store.export_client(&client).await? {
        Some(v) => Ok(Json(v).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no client {client}"),
        )),
    }
}

/// GDPR: erase a client's personal data (`nudge forget` does the same).
async fn erase_client(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let client = client_id(id)?;
    if s.store.erase_client(&client, chrono::Utc::now()).await? {
        tracing::info!("a client was erased on request");
        Ok(Json(json!({"client_id": client, "erased": true})).into_response())
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no client {client}"),
        ))
    }
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title>\
         <meta name=\"viewport\" content=\"width=device-width\"></head>\
         <body style=\"font-family: sans-serif; max-width: 32em; margin: 3em auto\">\
         <h1>{title}</h1>{body}</body></html>"
    );
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response()
}

fn refused_link() -> Response {
    page(
        StatusCode::BAD_REQUEST,
        "This link is not valid",
        "<p>The unsubscribe link is damaged or was not made by us. Please use the link from the mail as it is.</p>",
    )
}

/// The confirmation page behind the link in a mail: a person clicks a button.
async fn unsubscribe_page(State(s): State<ApiState>, Path(token): Path<String>) -> Response {
    if s.signer.as_ref().and_then(|sg| sg.verify(&token)).is_none() {
        return refused_link();
    }
    page(
        StatusCode::OK,
        "Unsubscribe",
        "<p>Do you want to stop receiving our offers and news by mail?</p>\
         <form method=\"post\"><button type=\"submit\">Unsubscribe</button></form>\
         <p>Mails about your account and orders will still reach you.</p>",
    )
}

/// RFC 8058 one-click unsubscribe (and the page's button): the click becomes
/// an `unsubscribed` event on the stream, so it is in the event log like the
/// shop's own and holds across replays.
async fn unsubscribe(State(s): State<ApiState>, Path(token): Path<String>) -> Response {
    let Some(client) = s.signer.as_ref().and_then(|sg| sg.verify(&token)) else {
        return refused_link();
    };
    let Some(nats) = &s.nats else {
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Please try again",
            "<p>We could not record your request just now.</p>",
        );
    };
    let now = chrono::Utc::now();
    let id = format!("unsubscribe-{}-{}", client, now.timestamp_millis());
    let event = json!({
        "id": id,
        "type": "unsubscribed",
        "client_id": client,
        "occurred_at": now.to_rfc3339(),
        "data": {"scope": "marketing", "source": "link"},
        "context": {"channel": "email"},
    });
    let js = async_nats::jetstream::new(nats.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id.as_str());
    let published = async {
        js.publish_with_headers(
            format!("{}.unsubscribed", s.subject_prefix),
            headers,
            serde_json::to_vec(&event).unwrap_or_default().into(),
        )
        .await?
        .await
        .map_err(async_nats::Error::from)
    };
    match published.await {
        Ok(_) => {
            tracing::info!(client_id = %client, "unsubscribed through a mail link");
            page(
                StatusCode::OK,
                "You are unsubscribed",
                "<p>You will not receive our offers and news by mail any more.</p>",
            )
        }
        Err(e) => {
            tracing::error!(error = %e, client_id = %client, "could not record an unsubscribe");
            page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Please try again",
                "<p>We could not record your request just now. Please try the link again in a minute.</p>",
            )
        }
    }
}

/// Runs a scheduled rule now (`nudge trigger RULE` does the same).
async fn run_rule(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let Some(scheduler) = &s.scheduler else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no scheduler".into(),
        ));
    };
    match scheduler.trigger(&name).await {
        Ok(report) => Ok(Json(json!({ "sweep": report })).into_response()),
        Err(TriggerError::UnknownRule(_)) => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no rule named `{name}`"),
        )),
        Err(e @ TriggerError::NotScheduled(_)) => {
            Err(ApiError(StatusCode::BAD_REQUEST, e.to_string()))
        }
        Err(e @ TriggerError::Busy(_)) => Err(ApiError(StatusCode::CONFLICT, e.to_string())),
        Err(TriggerError::Store(e)) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
