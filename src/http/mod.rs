//! The HTTP side: health and metrics (open), the staff page, unsubscribe
//! links (open, signed), and the `/api` routes, each behind a role
//! (`auth`). The routes are declared once, with their OpenAPI description
//! and role (`utoipa`), and the document served at `/api/openapi.json` is
//! what the role check reads.

mod auth;
mod guard;
mod serve;
pub mod view;

pub use auth::{Caller, Tokens};
pub use serve::{Limits, serve};

use crate::delivery::unsubscribe::Signer;
use crate::domain::event::ClientId;
use crate::flow::catalog::Catalog;
use crate::flow::live::Live;
use crate::flow::scheduler::{Scheduler, TriggerError};
use crate::metrics::Metrics;
use crate::store::{
    Admin, AnyStore, AuditEntry, Outbox, Staff, State as _, TaskFilter, erasure_hash,
};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(Clone)]
pub struct ApiState {
    pub store: AnyStore,
    pub nats: Option<async_nats::Client>,
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<Metrics>,
    pub scheduler: Option<Arc<Scheduler>>,
    /// Checks unsubscribe links, and signs the live feed's tickets.
    pub signer: Option<Arc<Signer>>,
    /// Where the shop's events go: an unsubscribe click becomes one of them.
    pub subject_prefix: String,
    /// The stream and consumer, for the consumer's lag in `/metrics`.
    pub stream: String,
    pub consumer: String,
    pub live: Live,
    /// The configured tokens; none: the API is open.
    pub tokens: Arc<Tokens>,
    /// `http.allowed_hosts`; empty: any Host.
    pub allowed_hosts: Arc<Vec<String>>,
    /// How long one request may take (rule runs and the live feed excepted).
    pub request_timeout: Duration,
    /// The role each `/api` route needs, read from the OpenAPI document.
    roles: Arc<auth::RoleMap>,
    /// The OpenAPI document, served at `/api/openapi.json`.
    openapi: Arc<serde_json::Value>,
    /// The configuration a rule preview runs with (rules, history settings,
    /// `http.public_url` and the unsubscribe key); none: no rule previews.
    pub config: Option<Arc<crate::config::Config>>,
}

impl ApiState {
    /// The state of the HTTP side; `http` gives the tokens, hosts and limits.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: AnyStore,
        nats: Option<async_nats::Client>,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
        scheduler: Option<Arc<Scheduler>>,
        signer: Option<Arc<Signer>>,
        nats_cfg: &crate::config::NatsConfig,
        live: Live,
        http: &crate::config::HttpConfig,
    ) -> Self {
        let openapi = openapi();
        Self {
            store,
            nats,
            catalog,
            metrics,
            scheduler,
            signer,
            subject_prefix: nats_cfg.subject_prefix.clone(),
            stream: nats_cfg.stream.clone(),
            consumer: nats_cfg.consumer.clone(),
            live,
            tokens: Arc::new(Tokens::from_config(http)),
            allowed_hosts: Arc::new(
                http.allowed_hosts
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
            ),
            request_timeout: Duration::from_secs(http.request_timeout_secs.get()),
            roles: Arc::new(auth::RoleMap::from_openapi(&openapi)),
            openapi: Arc::new(openapi),
            config: None,
        }
    }

    /// Enables rule previews (`GET /api/rules/{name}/preview`).
    pub fn with_config(mut self, config: Arc<crate::config::Config>) -> Self {
        self.config = Some(config);
        self
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "nudge",
        description = "The HTTP API of nudge, the marketing-automation rules engine. Every `/api` route needs `Authorization: Bearer <token>`; a token has a role (ingest < staff < marketer < admin) and a route answers 403 to a role below the one in its `x-nudge-role`."
    ),
    modifiers(&BearerScheme)
)]
struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// `/api` routes answered within `request_timeout`.
fn timed_api() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(whoami))
        .routes(routes!(openapi_json))
        .routes(routes!(search))
        .routes(routes!(client_360, erase_client))
        .routes(routes!(client_events))
        .routes(routes!(client_log))
        .routes(routes!(export_client))
        .routes(routes!(live_ticket))
        .routes(routes!(rejected))
        .routes(routes!(rules))
        .routes(routes!(tasks))
        .routes(routes!(task_done))
        .routes(routes!(preview))
        .routes(routes!(preview_rule))
        .routes(routes!(audit_log))
}

/// `/api` routes that may take long: a rule run sweeps every client (cut
/// short, it would leave its sweep half done until its lease ran out), and
/// the live feed stays open.
fn untimed_api() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(run_rule))
        .routes(routes!(live))
}

/// The open routes: health, metrics, the staff page, unsubscribe links.
fn open_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(staff_page))
        .routes(routes!(health))
        .routes(routes!(metrics))
        .routes(routes!(unsubscribe_page, unsubscribe))
}

/// The OpenAPI document, made from the route declarations above, with each
/// operation's role as `x-nudge-role` and in its description.
pub fn openapi() -> serde_json::Value {
    let doc = OpenApiRouter::<ApiState>::with_openapi(ApiDoc::openapi())
        .merge(open_routes())
        .nest("/api", timed_api().merge(untimed_api()))
        .into_openapi();
    let mut v = serde_json::to_value(&doc).expect("an OpenAPI document serialises");
    for item in v["paths"]
        .as_object_mut()
        .into_iter()
        .flatten()
        .map(|(_, i)| i)
    {
        for op in item.as_object_mut().into_iter().flatten().map(|(_, o)| o) {
            let role = op["security"][0]["bearer"][0]
                .as_str()
                .unwrap_or("open")
                .to_string();
            let note = if role == "open" {
                "Open: no token.".to_string()
            } else {
                format!("Role: `{role}` or higher.")
            };
            let desc = op["description"].as_str().unwrap_or("").to_string();
            op["description"] = json!(if desc.is_empty() {
                note
            } else {
                format!("{note} {desc}")
            });
            op["x-nudge-role"] = json!(role);
        }
    }
    v
}

pub fn router(state: ApiState) -> Router {
    let timeout = tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        state.request_timeout,
    );
    let api = timed_api()
        .route_layer(timeout)
        .merge(untimed_api())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    let (router, _) = open_routes()
        .route_layer(timeout)
        .nest("/api", api)
        .split_for_parts();
    router
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard::check_host,
        ))
        .layer(middleware::from_fn(guard::security_headers))
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

impl From<crate::flow::error::BatchError> for ApiError {
    fn from(e: crate::flow::error::BatchError) -> Self {
        use crate::flow::error::BatchError as E;
        tracing::error!(error = %e, class = e.class(), "api: batch not committed");
        let status = match e {
            E::Transient(_) | E::Conflict(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::Poison(_) | E::Fatal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

/// Records who did what; a failure to record is logged, not returned: the
/// action it describes has happened already.
async fn audit(s: &ApiState, caller: &Caller, action: &str, target: String, outcome: &str) {
    let entry = AuditEntry {
        at: chrono::Utc::now(),
        actor: caller.name.clone(),
        role: caller.role.to_string(),
        action: action.into(),
        target,
        outcome: outcome.into(),
    };
    if let Err(e) = s.store.record_audit(&entry).await {
        tracing::error!(error = %e, action, actor = %caller.name, "could not record an audit entry");
    }
}

fn client_target(client: &ClientId) -> String {
    format!("client:{}", erasure_hash(client))
}

/// The caller: the token's name and role, for the staff page to show only
/// what the role may do.
#[utoipa::path(get, path = "/whoami", tag = "access",
    security(("bearer" = ["ingest"])),
    responses((status = 200, description = "the token's name and role", body = Caller)))]
async fn whoami(Extension(caller): Extension<Caller>) -> Json<Caller> {
    Json(caller)
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "access",
    security(("bearer" = ["ingest"])),
    responses((status = 200, description = "the OpenAPI 3.1 document of the HTTP API")))]
async fn openapi_json(State(s): State<ApiState>) -> Response {
    Json(s.openapi.as_ref().clone()).into_response()
}

/// A ticket that opens the live feed for 60 seconds: `GET /api/live?ticket=`
/// (EventSource cannot send an Authorization header; a ticket in a URL that
/// leaks is worth a minute of the feed, not the token).
#[utoipa::path(post, path = "/live/ticket", tag = "staff",
    security(("bearer" = ["staff"])),
    responses((status = 200, description = "`ticket`, `expires_in` seconds and the feed's `url`"),
              (status = 503, description = "no signing key")))]
async fn live_ticket(
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
struct AuditQuery {
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
async fn audit_log(
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

/// Ready only when both NATS and the database answer.
#[utoipa::path(get, path = "/health", tag = "open",
    responses((status = 200, description = "ready: NATS and the database answer and batches commit"),
              (status = 503, description = "not ready, saying which part is not")))]
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

#[utoipa::path(get, path = "/metrics", tag = "open",
    responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
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
            "nudge_rules_quarantined",
            "Rules taken out of service by the quarantine (listed under `quarantined` in /api/rules) until their file is saved again.",
            s.catalog.quarantined().len() as u64,
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
#[utoipa::path(get, path = "/", tag = "open",
    responses((status = 200, description = "the staff page", content_type = "text/html")))]
async fn staff_page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("staff.html"),
    )
        .into_response()
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct SearchQuery {
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
async fn search(
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

/// A page's size: `asked` within 1..=`max`, `default` when absent.
fn page_limit(asked: Option<u32>, default: u32, max: u32) -> u32 {
    asked.unwrap_or(default).clamp(1, max)
}

fn bad_cursor(c: &str) -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        format!("cursor {c:?}: pass the `next` of the previous page as it is"),
    )
}

/// The 360 view of a client, from the history nudge keeps (real time: what
/// was committed a moment ago is here).
#[utoipa::path(get, path = "/clients/{id}", tag = "staff",
    security(("bearer" = ["staff"])), params(("id" = String, Path, description = "the client id")),
    responses((status = 200, description = "the 360 view"), (status = 404, description = "no such client")))]
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
struct EventsQuery {
    #[serde(rename = "type")]
    event_type: Option<String>,
    /// `next` from the previous page, or an RFC 3339 time.
    before: Option<String>,
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/clients/{id}/events", tag = "staff",
    security(("bearer" = ["staff"])), params(("id" = String, Path, description = "the client id"), EventsQuery),
    responses((status = 200, description = "the timeline, newest first, and `next`"), (status = 404, description = "no such client (or erased)")))]
async fn client_events(
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

/// Server-Sent Events: tasks, mails and notable events as they happen.
#[utoipa::path(get, path = "/live", tag = "staff",
    security(("bearer" = ["staff"])),
    params(("ticket" = Option<String>, Query, description = "a ticket from POST /api/live/ticket, instead of the Authorization header")),
    responses((status = 200, description = "Server-Sent Events: `event`, `task`, `mail`", content_type = "text/event-stream")))]
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

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct Limit {
    limit: Option<u32>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// Entries per page: 1 to 1000, 100 when absent.
    limit: Option<u32>,
    /// `next` from the previous page.
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/rejected", tag = "admin",
    security(("bearer" = ["admin"])), params(PageQuery),
    responses((status = 200, description = "`rejected`: envelopes (raw, personal data included) with reasons, newest first, and `next`: the cursor of the next page, null on the last"),
              (status = 400, description = "a bad cursor")))]
async fn rejected(
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

#[utoipa::path(get, path = "/rules", tag = "marketer",
    security(("bearer" = ["marketer"])),
    responses((status = 200, description = "rules in force, runs, errors, refused files, quarantined rules")))]
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

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct TaskQuery {
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
async fn task_done(
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

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct PreviewQuery {
    client: String,
}

/// A template rendered with a client's history, for the staff page.
#[utoipa::path(get, path = "/templates/{name}/preview", tag = "marketer",
    security(("bearer" = ["marketer"])),
    params(("name" = String, Path, description = "the template"), PreviewQuery),
    responses((status = 200, description = "subject, text and HTML"), (status = 404, description = "no such template or client")))]
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

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct RulePreviewQuery {
    /// The client whose stored history the rule runs on.
    client: String,
    /// The time of the run (RFC 3339); default now.
    at: Option<chrono::DateTime<chrono::Utc>>,
}

/// What a rule would do for one client now (or `at`), as a sweep of its
/// stored history would: each mail with its subject, text and HTML, every
/// variable and the client's real signed unsubscribe link; emits and tasks
/// (`other`); the run's process-log lines. Nothing is queued or written
/// (`nudge preview RULE --client ID` does the same).
#[utoipa::path(get, path = "/rules/{name}/preview", tag = "marketer",
    security(("bearer" = ["marketer"])),
    params(("name" = String, Path, description = "the rule"), RulePreviewQuery),
    responses((status = 200, description = "rule, client_id, at, mails (template, to, vars, rendered: subject, text, html, kind), other, log"),
              (status = 404, description = "no such rule or client"),
              (status = 503, description = "rule previews are not enabled in this process")))]
async fn preview_rule(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<RulePreviewQuery>,
) -> Result<Response, ApiError> {
    let Some(config) = &s.config else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no rule previews in this process".into(),
        ));
    };
    client_id(q.client.clone())?;
    let at = q.at.unwrap_or_else(chrono::Utc::now);
    let p = crate::tools::preview_rule(config, &s.store, &name, &q.client, at)
        .await
        .map_err(|e| ApiError(StatusCode::NOT_FOUND, e.to_string()))?;
    Ok(Json(p).into_response())
}

fn client_id(id: String) -> Result<ClientId, ApiError> {
    ClientId::parse(id).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

/// GDPR: everything nudge holds on a client.
#[utoipa::path(get, path = "/clients/{id}/export", tag = "admin",
    security(("bearer" = ["admin"])), params(("id" = String, Path, description = "the client id")),
    responses((status = 200, description = "everything nudge holds on the client (GDPR)"), (status = 404, description = "no such client")))]
async fn export_client(
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
async fn erase_client(
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
#[utoipa::path(get, path = "/unsubscribe/{token}", tag = "open",
    params(("token" = String, Path, description = "the signed link's token")),
    responses((status = 200, description = "the confirmation page", content_type = "text/html"),
              (status = 400, description = "a damaged or forged link", content_type = "text/html")))]
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
#[utoipa::path(post, path = "/unsubscribe/{token}", tag = "open",
    params(("token" = String, Path, description = "the signed link's token")),
    responses((status = 200, description = "unsubscribed (RFC 8058 one-click)", content_type = "text/html"),
              (status = 400, description = "a damaged or forged link", content_type = "text/html"),
              (status = 503, description = "could not be recorded now", content_type = "text/html")))]
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
    let id = crate::delivery::unsubscribe::event_id(&client, &token);
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
#[utoipa::path(post, path = "/rules/{name}/run", tag = "marketer",
    security(("bearer" = ["marketer"])), params(("name" = String, Path, description = "a scheduled rule")),
    responses((status = 200, description = "the sweep's report"), (status = 404, description = "no such rule"),
              (status = 400, description = "not a scheduled rule"), (status = 409, description = "already running")))]
async fn run_rule(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let Some(scheduler) = &s.scheduler else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no scheduler".into(),
        ));
    };
    let result = scheduler.trigger(&name).await;
    let outcome = match &result {
        Ok(_) => "ok".to_string(),
        Err(e) => e.to_string(),
    };
    audit(&s, &caller, "rule_run", format!("rule:{name}"), &outcome).await;
    match result {
        Ok(report) => Ok(Json(json!({ "sweep": report })).into_response()),
        Err(TriggerError::UnknownRule(_)) => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no rule named `{name}`"),
        )),
        Err(e @ TriggerError::NotScheduled(_)) => {
            Err(ApiError(StatusCode::BAD_REQUEST, e.to_string()))
        }
        Err(e @ TriggerError::Busy(_)) => Err(ApiError(StatusCode::CONFLICT, e.to_string())),
        Err(TriggerError::Batch(e)) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_api_route_declares_a_role_that_the_role_map_enforces() {
        let doc = openapi();
        let roles = auth::RoleMap::from_openapi(&doc);
        let mut n = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let declared = op["x-nudge-role"].as_str().unwrap();
                let m: axum::http::Method = method.to_uppercase().parse().unwrap();
                if path.starts_with("/api/") {
                    n += 1;
                    let enforced = roles
                        .get(&m, path)
                        .unwrap_or_else(|| panic!("{method} {path}"));
                    assert_eq!(enforced.as_str(), declared, "{method} {path}");
                } else {
                    assert_eq!(declared, "open", "{method} {path}");
                }
            }
        }
        assert_eq!(n, 18, "{doc:#}");
    }
}
