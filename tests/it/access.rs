//! Access and privacy (issue 21): every route against every role, tokens
//! kept out of URLs, the live feed's tickets, the audit log, the server's
//! limits against idle connections, unsubscribe links for every client id,
//! erasure checked in the database files themselves, and the OpenAPI
//! document checked by a real validator.

use crate::helpers::{
    Backend, TestApp, TestEnv, daemon_vars, event, eventually, free_port, publish_retrying,
    registered,
};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::Duration;

/// One token per role, named after it.
const TOKENS: [(&str, &str); 4] = [
    ("ingest", "token-of-the-ingest-role"),
    ("staff", "token-of-the-staff-role-"),
    ("marketer", "token-of-the-marketer-role"),
    ("admin", "token-of-the-admin-role-"),
];
const RANKS: [&str; 4] = ["ingest", "staff", "marketer", "admin"];
const SECRET: &str = "an unsubscribe secret for the tests";

fn token_vars() -> Vec<(String, String)> {
    let mut v = vec![(
        "NUDGE__MAIL__UNSUBSCRIBE_SECRET".to_string(),
        SECRET.to_string(),
    )];
    for (role, token) in TOKENS {
        // The admin token is given by its hash, as a config without secrets would.
        let name = format!("T{}", role.to_uppercase());
        v.push((format!("NUDGE__HTTP__TOKENS__{name}__ROLE"), role.into()));
        if role == "admin" {
            use sha2::Digest;
            v.push((
                format!("NUDGE__HTTP__TOKENS__{name}__TOKEN_SHA256"),
                hex::encode(sha2::Sha256::digest(token.as_bytes())),
            ));
        } else {
            v.push((format!("NUDGE__HTTP__TOKENS__{name}__TOKEN"), token.into()));
        }
    }
    v
}

async fn spawn(backend: Backend) -> TestApp {
    let vars = token_vars();
    let refs: Vec<(&str, &str)> = vars.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    TestEnv::with_env(backend, &refs).await.start().await
}

fn token(role: &str) -> &'static str {
    TOKENS.iter().find(|(r, _)| *r == role).unwrap().1
}

async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    bearer: Option<&str>,
) -> reqwest::Response {
    let mut r = reqwest::Client::new().request(method, format!("http://{}{path}", app.http));
    if let Some(t) = bearer {
        r = r.bearer_auth(t);
    }
    r.send().await.expect("http request")
}

/// Every `/api` route, with the least role it needs: the contract this test
/// holds the server to (written out here, not read from the server).
const MATRIX: [(&str, &str, &str, &str); 24] = [
    ("GET", "/api/whoami", "/api/whoami", "ingest"),
    ("POST", "/api/events", "/api/events", "ingest"),
    ("GET", "/api/openapi.json", "/api/openapi.json", "ingest"),
    ("GET", "/api/clients", "/api/clients?q=a", "staff"),
    ("GET", "/api/clients/{id}", "/api/clients/nobody", "staff"),
    (
        "GET",
        "/api/clients/{id}/events",
        "/api/clients/nobody/events",
        "staff",
    ),
    (
        "GET",
        "/api/clients/{id}/log",
        "/api/clients/nobody/log",
        "staff",
    ),
    ("GET", "/api/tasks", "/api/tasks", "staff"),
    (
        "POST",
        "/api/tasks/{id}/done",
        "/api/tasks/none/done",
        "staff",
    ),
    ("GET", "/api/live", "/api/live", "staff"),
    ("POST", "/api/live/ticket", "/api/live/ticket", "staff"),
    ("GET", "/api/boards", "/api/boards", "staff"),
    ("GET", "/api/boards/{board}", "/api/boards/sales", "staff"),
    (
        "GET",
        "/api/products/popular",
        "/api/products/popular",
        "staff",
    ),
    (
        "GET",
        "/api/products/{id}/bought-with",
        "/api/products/p1/bought-with",
        "staff",
    ),
    ("GET", "/api/rules", "/api/rules", "marketer"),
    (
        "GET",
        "/api/reports/{rule}",
        "/api/reports/welcome",
        "marketer",
    ),
    (
        "POST",
        "/api/rules/{name}/run",
        "/api/rules/nope/run",
        "marketer",
    ),
    (
        "GET",
        "/api/rules/{name}/preview",
        "/api/rules/welcome/preview?client=nobody",
        "marketer",
    ),
    (
        "GET",
        "/api/templates/{name}/preview",
        "/api/templates/welcome/preview?client=nobody",
        "marketer",
    ),
    ("GET", "/api/rejected", "/api/rejected", "admin"),
    (
        "GET",
        "/api/clients/{id}/export",
        "/api/clients/nobody/export",
        "admin",
    ),
    (
        "DELETE",
        "/api/clients/{id}",
        "/api/clients/nobody",
        "admin",
    ),
    ("GET", "/api/audit", "/api/audit", "admin"),
];

async fn the_role_matrix_holds_for_every_route_and_role(backend: Backend) {
    let app = spawn(backend).await;
    for (method, template, path, needed) in MATRIX {
        let m: Method = method.parse().unwrap();
        let need = RANKS.iter().position(|r| *r == needed).unwrap();
        for (rank, role) in RANKS.iter().enumerate() {
            let r = call(&app, m.clone(), path, Some(token(role))).await;
            let status = r.status().as_u16();
            if rank < need {
                assert_eq!(status, 403, "{method} {path} as {role}");
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["role_needed"], needed, "{method} {template}: {body}");
                assert!(body["error"].as_str().unwrap().contains(needed), "{body}");
            } else {
                assert!(
                    ![401, 403].contains(&status),
                    "{method} {path} as {role}: {status}"
                );
            }
        }
        // No token, a wrong one, a token in the query string.
        assert_eq!(
            call(&app, m.clone(), path, None).await.status(),
            401,
            "{path}"
        );
        assert_eq!(
            call(&app, m.clone(), path, Some("not-a-token-of-ours"))
                .await
                .status(),
            401,
            "{path}"
        );
        let sep = if path.contains('?') { '&' } else { '?' };
        let q = format!("{path}{sep}token={}", token("admin"));
        let r = call(&app, m.clone(), &q, None).await;
        assert_eq!(r.status(), 400, "{q}");
        assert!(
            r.json::<Value>().await.unwrap()["error"]
                .as_str()
                .unwrap()
                .contains("query string")
        );
    }

    // The matrix covers every route the server documents, and the document
    // says the same roles.
    let doc: Value = call(
        &app,
        Method::GET,
        "/api/openapi.json",
        Some(token("ingest")),
    )
    .await
    .json()
    .await
    .unwrap();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if path.starts_with("/api/") {
                documented.insert((
                    method.to_uppercase(),
                    path.clone(),
                    op["x-nudge-role"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    let expected: BTreeSet<_> = MATRIX
        .iter()
        .map(|(m, t, _, r)| (m.to_string(), t.to_string(), r.to_string()))
        .collect();
    assert_eq!(documented, expected);

    // whoami names the token and its role.
    let me: Value = call(&app, Method::GET, "/api/whoami", Some(token("staff")))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me, json!({"name": "tstaff", "role": "staff"}));

    // The live feed: a ticket from a staff token opens it; a forged or
    // reused-elsewhere ticket does not, nor does an ingest token get one.
    let t: Value = call(&app, Method::POST, "/api/live/ticket", Some(token("staff")))
        .await
        .json()
        .await
        .unwrap();
    let ticket = t["ticket"].as_str().unwrap();
    assert_eq!(t["expires_in"], 60);
    let live = call(
        &app,
        Method::GET,
        &format!("/api/live?ticket={ticket}"),
        None,
    )
    .await;
    assert_eq!(live.status(), 200);
    assert_eq!(
        live.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    drop(live);
    let mut forged = ticket.to_string();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    assert_eq!(
        call(
            &app,
            Method::GET,
            &format!("/api/live?ticket={forged}"),
            None
        )
        .await
        .status(),
        401
    );
    assert_eq!(
        call(
            &app,
            Method::GET,
            &format!("/api/clients?q=a&ticket={ticket}"),
            None
        )
        .await
        .status(),
        401,
        "a ticket opens the live feed only"
    );
    assert_eq!(
        call(
            &app,
            Method::POST,
            "/api/live/ticket",
            Some(token("ingest"))
        )
        .await
        .status(),
        403
    );

    // Security headers: HTML gets CSP, no framing, no referrer; JSON nosniff.
    let page = call(&app, Method::GET, "/", None).await;
    let h = page.headers();
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'sha256-")
    );
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "no-referrer");
    let unsub = call(&app, Method::GET, "/unsubscribe/00.00", None).await;
    assert_eq!(unsub.headers()["x-frame-options"], "DENY");
    assert!(unsub.headers().contains_key("content-security-policy"));
    let j = call(&app, Method::GET, "/api/whoami", Some(token("staff"))).await;
    assert_eq!(j.headers()["x-content-type-options"], "nosniff");

    // The audit log names the token for each rule run, task closed, export
    // and erasure (the runs and closes above were refused or not found, and
    // are recorded all the same).
    let audit: Value = call(&app, Method::GET, "/api/audit", Some(token("admin")))
        .await
        .json()
        .await
        .unwrap();
    let lines = audit["audit"].as_array().unwrap();
    for (action, actor) in [
        ("rule_run", "tmarketer"),
        ("rule_run", "tadmin"),
        ("task_done", "tstaff"),
        ("export", "tadmin"),
        ("erase", "tadmin"),
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l["action"] == action && l["actor"] == actor),
            "{action} by {actor} in {audit}"
        );
    }
    assert!(
        !audit.to_string().contains("nobody"),
        "clients by hash only: {audit}"
    );
    app.stop().await;
}

async fn unsubscribe_works_for_a_128_character_client_and_repeated_clicks_store_one_event(
    backend: Backend,
) {
    let app = spawn(backend).await;
    let id = "u".repeat(120) + "-longest";
    assert_eq!(id.chars().count(), 128);
    let mut reg = registered("r-long", &id, "organic", "Long");
    reg["data"]["email"] = json!("long@example.com");
    app.publish(&reg).await;
    app.wait_events(1).await;
    let signer = nudge::delivery::unsubscribe::Signer::new(SECRET);
    let client = nudge::domain::event::ClientId::parse(id.clone()).unwrap();
    let path = format!("/unsubscribe/{}", signer.token(&client));
    let clicks = (0..21).map(|_| app.post(&path));
    for r in futures::future::join_all(clicks).await {
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().contains("You are unsubscribed"));
    }
    // And a few more once the first was applied.
    app.wait_events(2).await;
    for _ in 0..3 {
        assert_eq!(app.post(&path).await.status(), 200);
    }
    let sql = app.db.sql().await;
    let count = || async {
        sql.scalar(&format!(
            "SELECT COUNT(*) FROM events WHERE type = 'unsubscribed' AND client_id = '{id}'"
        ))
        .await
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count().await, 1, "one unsubscribed event for 24 clicks");
    let view: Value = call(
        &app,
        Method::GET,
        &format!("/api/clients/{id}"),
        Some(token("staff")),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(view["unsubscribed"], true, "{view}");
    app.stop().await;
}

/// Strings that name the erased client.
const EMAIL: &str = "reject.zoe-quintessa@erase.test";
const FIRST: &str = "Zoequintessa";
const LAST: &str = "Vandermolenbeek";

async fn erasure_leaves_no_personal_data_in_the_database_or_the_api(backend: Backend) {
    let app = spawn(backend).await;
    let id = "zq-1";
    let mut reg = registered("r-zq", id, "organic", FIRST);
    reg["data"]["email"] = json!(EMAIL);
    reg["data"]["last_name"] = json!(LAST);
    app.publish(&reg).await;
    // Three orders: a task for sales naming them.
    for i in 0..3 {
        app.publish(&event(
            &format!("o-zq-{i}"),
            "order_placed",
            id,
            &crate::helpers::ago(3600 - i),
            json!({"order_id": format!("o{i}"), "channel": "online", "total": 5.0, "currency": "EUR", "items": []}),
            json!({}),
        ))
        .await;
    }
    // Rejected envelopes naming them: one broken JSON, one over the size
    // limit (stored cut, so never valid JSON).
    let broken = format!(
        r#"{{"id": "bad-zq", "client_id": "{id}", "data": {{"email": "{EMAIL}", "first_name": "{FIRST}""#
    );
    app.publish_raw("client_updated", "bad-zq", broken.into_bytes())
        .await;
    let big = format!(
        r#"{{"id": "big-zq", "type": "page_viewed", "client_id": "{id}", "occurred_at": "2026-11-20T10:00:00Z", "data": {{"name": "{FIRST} {LAST}", "email": "{EMAIL}", "pad": "{}"}}, "context": {{}}}}"#,
        "x".repeat(5000)
    );
    app.publish_raw("page_viewed", "big-zq", big.into_bytes())
        .await;
    // The welcome mail to a `reject*@` address fails with a 550 quoting it.
    let sql = app.db.sql().await;
    eventually(Duration::from_secs(20), "a failed welcome mail and a task", || async {
        let failed = sql
            .scalar(&format!("SELECT COUNT(*) FROM outbox WHERE client_id = '{id}' AND status = 'failed' AND last_error IS NOT NULL"))
            .await;
        let tasks = sql.scalar(&format!("SELECT COUNT(*) FROM tasks WHERE client_id = '{id}'")).await;
        let rejected = sql.scalar("SELECT COUNT(*) FROM rejected").await;
        (failed > 0 && tasks > 0 && rejected >= 2).then_some(())
    })
    .await;
    // The setup put the strings where the test looks for them.
    assert!(db_text(&app, backend).await.contains(EMAIL));

    let r = call(
        &app,
        Method::DELETE,
        &format!("/api/clients/{id}"),
        Some(token("admin")),
    )
    .await;
    assert_eq!(r.status(), 200);

    // Every API that could show them.
    for path in [
        format!("/api/clients?q={FIRST}"),
        format!("/api/clients?q={EMAIL}"),
        format!("/api/clients/{id}"),
        format!("/api/clients/{id}/events"),
        format!("/api/clients/{id}/log"),
        format!("/api/clients/{id}/export"),
        "/api/rejected".into(),
        format!("/api/tasks?status=all&client={id}"),
        "/api/tasks?status=all".into(),
        "/api/audit".into(),
    ] {
        let r = call(&app, Method::GET, &path, Some(token("admin"))).await;
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert!(status == 200 || status == 404, "{path}: {status}");
        for s in [EMAIL, FIRST, LAST] {
            assert!(!body.contains(s), "{s} in {path}: {body}");
        }
    }
    for path in [
        format!("/api/clients/{id}"),
        format!("/api/clients/{id}/events"),
    ] {
        assert_eq!(
            call(&app, Method::GET, &path, Some(token("admin")))
                .await
                .status(),
            404,
            "{path}"
        );
    }
    // The erasure is in the audit log, by the client's hash.
    let audit: Value = call(
        &app,
        Method::GET,
        &format!("/api/audit?client={id}"),
        Some(token("admin")),
    )
    .await
    .json()
    .await
    .unwrap();
    let erased = audit["audit"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["action"] == "erase" && l["actor"] == "tadmin" && l["outcome"] == "ok");
    assert!(erased, "{audit}");

    // The database itself: every table's text, and on SQLite the file's
    // bytes after a checkpoint (free pages included).
    let text = db_text(&app, backend).await;
    for s in [EMAIL, FIRST, LAST] {
        assert!(!text.contains(s), "{s} still in the database");
    }
    if backend == Backend::Sqlite {
        sql.execute("PRAGMA wal_checkpoint(TRUNCATE)").await;
        let file = app.db.url.trim_start_matches("sqlite://").to_string();
        for f in [file.clone(), format!("{file}-wal")] {
            let Ok(bytes) = std::fs::read(&f) else {
                continue;
            };
            for s in [EMAIL, FIRST, LAST] {
                assert!(
                    !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                    "{s} in the bytes of {f}"
                );
            }
        }
    }
    app.stop().await;
}

/// All the text in every table of the database.
async fn db_text(app: &TestApp, backend: Backend) -> String {
    let sql = app.db.sql().await;
    let tables: Vec<String> = match backend {
        Backend::Sqlite => {
            sql.rows("SELECT name FROM sqlite_master WHERE type = 'table'")
                .await
        }
        Backend::Postgres => {
            sql.rows(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
            )
            .await
        }
    }
    .into_iter()
    .filter_map(|r| r[0].clone())
    .collect();
    assert!(tables.iter().any(|t| t == "rejected"), "{tables:?}");
    let mut text = String::new();
    for t in tables {
        let q = match backend {
            Backend::Sqlite => format!("SELECT * FROM \"{t}\""),
            Backend::Postgres => format!("SELECT t::text FROM \"{t}\" t"),
        };
        let rows = match backend {
            Backend::Sqlite => {
                let cols = sql
                    .rows(&format!("SELECT name FROM pragma_table_info('{t}')"))
                    .await;
                let list: Vec<String> = cols
                    .into_iter()
                    .filter_map(|c| c[0].clone())
                    // As bytes, in hex: some columns hold blobs or text
                    // that is not UTF-8 (hostile envelopes).
                    .map(|c| format!("hex(CAST(\"{c}\" AS BLOB))"))
                    .collect();
                sql.rows(&format!("SELECT {} FROM \"{t}\"", list.join(", ")))
                    .await
            }
            Backend::Postgres => sql.rows(&q).await,
        };
        for r in rows {
            for c in r.into_iter().flatten() {
                match backend {
                    Backend::Sqlite => text.push_str(&String::from_utf8_lossy(
                        &hex::decode(&c).expect("hex from SQLite"),
                    )),
                    Backend::Postgres => text.push_str(&c),
                }
                text.push('\n');
            }
        }
    }
    text
}

async fn the_openapi_document_is_valid(backend: Backend) {
    let app = spawn(backend).await;
    let doc = call(
        &app,
        Method::GET,
        "/api/openapi.json",
        Some(token("ingest")),
    )
    .await
    .text()
    .await
    .unwrap();
    let file = app.dir.path().join("openapi.json");
    std::fs::write(&file, &doc).unwrap();
    let python = std::env::var("NUDGE_TEST_PYTHON").unwrap_or("python3".into());
    let out = std::process::Command::new(&python)
        .args([
            "-c",
            "import sys, json; from openapi_spec_validator import validate; \
             validate(json.load(open(sys.argv[1]))); print('valid')",
        ])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("{python} must run (see .ci/run): {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named"),
        "openapi-spec-validator must be installed for {python} (see .ci/run): {stderr}"
    );
    assert!(
        out.status.success(),
        "the document is not valid OpenAPI: {stderr}\n{doc}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "valid");
    app.stop().await;
}

backend_tests!(
    the_role_matrix_holds_for_every_route_and_role,
    unsubscribe_works_for_a_128_character_client_and_repeated_clicks_store_one_event,
    erasure_leaves_no_personal_data_in_the_database_or_the_api,
    the_openapi_document_is_valid,
);

/// An API without a token on an address others can reach is refused at
/// start, unless `http.allow_open`; on loopback it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_api_on_a_public_address_is_refused_unless_allowed() {
    let env = TestEnv::with_env(Backend::Sqlite, &[("NUDGE__HTTP__LISTEN", "0.0.0.0:0")]).await;
    let e = nudge::app::Application::build(env.config.clone())
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("http.allow_open"), "{e:#}");
    let mut open = env.config.clone();
    open.http.allow_open = true;
    assert!(nudge::app::Application::build(open).await.is_ok());
    let mut tokened = env.config.clone();
    tokened.http.token = Some("a-token-of-enough-length".into());
    assert!(nudge::app::Application::build(tokened).await.is_ok());
}

/// 2,000 connections that send nothing, against a `nudge run` limited to
/// 1,024 open files: `/health` keeps answering and mail keeps going out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_do_not_starve_health_or_mail() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let vars = daemon_vars(&env, &[("NUDGE__HTTP__LISTEN", &listen)]);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"));
    cmd.arg("run")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(vars);
    if std::env::var("TEST_LOG").is_err() {
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    }
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 1024,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Killed(cmd.spawn().expect("nudge starts"));
    let health = format!("http://127.0.0.1:{port}/health");
    let healthy = || async {
        let r = reqwest::Client::new()
            .get(&health)
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    };
    eventually(Duration::from_secs(30), "/health before the flood", healthy).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.0.id())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 1024 ")),
        "{limits}"
    );

    // This process needs room for its own 2,000 sockets.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let mut idle = Vec::new();
    for _ in 0..2000 {
        let s = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        .expect("connect in time")
        .expect("connect");
        idle.push(s);
    }
    // While they are all held open: health answers, every time, quickly.
    for _ in 0..10 {
        let started = std::time::Instant::now();
        assert!(
            healthy().await.is_some(),
            "/health answers during the flood"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    // And mail goes out.
    publish_retrying(&env, &registered("r-flood", "flood", "organic", "Flo")).await;
    let mails = env.wait_mails(1).await;
    assert!(mails.iter().any(|m| {
        m.header("To")
            .is_some_and(|t| t.contains("flood@example.com"))
    }));
    let fds = std::fs::read_dir(format!("/proc/{}/fd", child.0.id()))
        .unwrap()
        .count();
    assert!(fds < 1024, "{fds} descriptors open");
    drop(idle);
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "nudge is still running"
    );
}

/// A child process killed when dropped, so a failing test leaves none behind.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
