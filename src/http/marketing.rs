//! Marketers' routes: the rules in force, previews of templates and rules,
//! and running a scheduled rule now.

use super::*;

#[utoipa::path(get, path = "/rules", tag = "marketer",
    security(("bearer" = ["marketer"])),
    responses((status = 200, description = "rules in force, runs, errors, refused files, quarantined rules")))]
pub(super) async fn rules(State(s): State<ApiState>) -> Response {
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
pub(super) struct PreviewQuery {
    client: String,
}

/// A template rendered with a client's history, for the staff page.
#[utoipa::path(get, path = "/templates/{name}/preview", tag = "marketer",
    security(("bearer" = ["marketer"])),
    params(("name" = String, Path, description = "the template"), PreviewQuery),
    responses((status = 200, description = "subject, text and HTML"), (status = 404, description = "no such template or client")))]
pub(super) async fn preview(
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
pub(super) struct RulePreviewQuery {
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
pub(super) async fn preview_rule(
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

/// Runs a scheduled rule now (`nudge trigger RULE` does the same).
#[utoipa::path(post, path = "/rules/{name}/run", tag = "marketer",
    security(("bearer" = ["marketer"])), params(("name" = String, Path, description = "a scheduled rule")),
    responses((status = 200, description = "the sweep's report"), (status = 404, description = "no such rule"),
              (status = 400, description = "not a scheduled rule"), (status = 409, description = "already running")))]
pub(super) async fn run_rule(
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

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ReportQuery {
    /// Exposures from this time on (RFC 3339).
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Exposures before this time (RFC 3339).
    until: Option<chrono::DateTime<chrono::Utc>>,
}

/// What a rule achieves, per experiment and variant (and the global
/// control group): exposed, mailed, opened, clicked, converted,
/// conversion_rate, revenue, revenue_per_exposed, and each variant's lift
/// against the baseline (`control`, else the first variant) with 95 %
/// intervals and p-values, or "not enough data". As `nudge report RULE --json`.
#[utoipa::path(get, path = "/reports/{rule}", tag = "marketer",
    security(("bearer" = ["marketer"])),
    params(("rule" = String, Path, description = "the rule"), ReportQuery),
    responses((status = 200, description = "rule, goal, since, until, experiments: [{experiment, baseline, variants: [{variant, exposed, mailed, opened, clicked, converted, conversion_rate, revenue, revenue_per_exposed, lift}]}]"),
              (status = 404, description = "no such rule and no exposures of it")))]
pub(super) async fn report(
    State(s): State<ApiState>,
    Path(rule): Path<String>,
    Query(q): Query<ReportQuery>,
) -> Result<Response, ApiError> {
    let goal = s.catalog.rules().get(&rule).map(|r| r.goal.clone());
    let report =
        crate::tools::report::stored(&s.store, &rule, goal.clone().flatten(), q.since, q.until)
            .await
            .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    if goal.is_none() && report.experiments.is_empty() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no rule `{rule}` and no exposures of it"),
        ));
    }
    Ok(Json(report).into_response())
}
