//! The open routes: health, metrics, the staff page and the pages an
//! unsubscribe link opens.

use super::*;

/// Ready only when both NATS and the database answer.
#[utoipa::path(get, path = "/health", tag = "open",
    responses((status = 200, description = "ready: NATS and the database answer and batches commit"),
              (status = 503, description = "not ready, saying which part is not")))]
pub(super) async fn health(State(s): State<ApiState>) -> Response {
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
pub(super) async fn metrics(State(s): State<ApiState>) -> Response {
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

pub(super) async fn consumer_lag(s: &ApiState) -> Option<u64> {
    let js = async_nats::jetstream::new(s.nats.clone()?);
    let stream = js.get_stream(&s.stream).await.ok()?;
    let info = stream.consumer_info(&s.consumer).await.ok()?;
    Some(info.num_pending)
}

/// The staff page: one static file, no build step (see `src/staff.html`).
#[utoipa::path(get, path = "/", tag = "open",
    responses((status = 200, description = "the staff page", content_type = "text/html")))]
pub(super) async fn staff_page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("staff.html"),
    )
        .into_response()
}

pub(super) fn page(status: StatusCode, title: &str, body: &str) -> Response {
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

pub(super) fn refused_link() -> Response {
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
pub(super) async fn unsubscribe_page(
    State(s): State<ApiState>,
    Path(token): Path<String>,
) -> Response {
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
pub(super) async fn unsubscribe(State(s): State<ApiState>, Path(token): Path<String>) -> Response {
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
