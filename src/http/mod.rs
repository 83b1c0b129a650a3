//! The HTTP side: health and metrics (open), the staff page, unsubscribe
//! links (open, signed), and the `/api` routes, each behind a role
//! (`auth`). The routes are declared once, with their OpenAPI description
//! and role (`utoipa`), and the document served at `/api/openapi.json` is
//! what the role check reads.

mod access;
mod auth;
mod boards;
mod clients;
mod guard;
mod ingest;
mod marketing;
mod ops;
mod products;
mod segment;
mod serve;
pub mod texts;
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
        // Segment's libraries send the write key as the basic-auth user.
        components.add_security_scheme(
            "segment_write_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Basic).build()),
        );
    }
}

/// `/api` routes answered within `request_timeout`.
fn timed_api() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(access::whoami))
        .routes(routes!(ingest::post_events))
        .routes(routes!(access::openapi_json))
        .routes(routes!(clients::search))
        .routes(routes!(clients::client_360, clients::erase_client))
        .routes(routes!(clients::client_events))
        .routes(routes!(clients::client_log))
        .routes(routes!(clients::export_client))
        .routes(routes!(access::live_ticket))
        .routes(routes!(access::rejected))
        .routes(routes!(marketing::rules))
        .routes(routes!(clients::tasks))
        .routes(routes!(clients::task_done))
        .routes(routes!(marketing::preview))
        .routes(routes!(marketing::preview_rule))
        .routes(routes!(marketing::report))
        .routes(routes!(access::audit_log))
        .routes(routes!(boards::list_boards))
        .routes(routes!(boards::board))
        .routes(routes!(products::popular))
        .routes(routes!(products::bought_with))
}

/// `/api` routes that may take long: a rule run sweeps every client (cut
/// short, it would leave its sweep half done until its lease ran out), and
/// the live feed stays open.
fn untimed_api() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(marketing::run_rule))
        .routes(routes!(access::live))
}

/// The open routes: health, metrics, the staff page, unsubscribe links.
fn open_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(ops::staff_page))
        .routes(routes!(ops::health))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::unsubscribe_page, ops::unsubscribe))
        .routes(routes!(boards::wall_page))
        .routes(routes!(texts::sms_inbound))
        .merge(segment_routes())
}

/// Segment's endpoints, outside `/api`: they authenticate by write key
/// (`segment.rs`), as Segment's libraries do.
fn segment_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(segment::track))
        .routes(routes!(segment::identify))
        .routes(routes!(segment::page))
        .routes(routes!(segment::batch))
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
            let write_key = op["security"][0].get("segment_write_key").is_some();
            let role = op["security"][0]["bearer"][0]
                .as_str()
                .unwrap_or(if write_key { "ingest" } else { "open" })
                .to_string();
            let note = if role == "open" {
                "Open: no token.".to_string()
            } else if write_key {
                "A write key of `ingest.segment` as the basic-auth user name.".to_string()
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

fn client_id(id: String) -> Result<ClientId, ApiError> {
    ClientId::parse(id).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
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
                } else if path.starts_with("/v1/") {
                    assert_eq!(declared, "ingest", "{method} {path}");
                } else {
                    assert_eq!(declared, "open", "{method} {path}");
                }
            }
        }
        assert_eq!(n, 24, "{doc:#}");
    }
}
