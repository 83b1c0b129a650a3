//! The database, its disk and the mail server failing under a running nudge:
//! consumption pauses without acking anything that was not committed, goes
//! on when they are back, and every event and every mail takes effect once.

use crate::helpers::{Backend, TestApp, TestEnv, ago, event, eventually, registered_at};
use nudge::store::{History, Outbox, Staff};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// `/health`: its status code and body.
async fn health(app: &TestApp) -> (u16, Value) {
    let r = app.get("/health").await;
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

/// Waits until `/health` says the batch in hand cannot be committed.
async fn wait_ingest_failing(app: &TestApp) -> Value {
    eventually(
        Duration::from_secs(60),
        "/health to report failing commits",
        || async {
            let (code, body) = health(app).await;
            (code == 503 && body["ingest"].as_str()?.starts_with("failing")).then_some(body)
        },
    )
    .await
}

async fn wait_ready(app: &TestApp) -> Value {
    eventually(Duration::from_secs(60), "/health ready again", || async {
        let (code, body) = health(app).await;
        (code == 200 && body["ingest"] == "ok").then_some(body)
    })
    .await
}

/// Asserts, from the broker's side, that nudge acked nothing past the first
/// `floor` messages of the stream (acks are contiguous: none beyond the ack
/// floor); returns the floor and how many later messages nudge holds
/// delivered but unacked.
async fn acked_prefix(env: &TestEnv) -> (u64, u64) {
    let info = env.consumer_info().await;
    let floor = info.ack_floor.stream_sequence;
    let delivered = info.delivered.stream_sequence;
    let acked_past_floor = (delivered - floor) as i64 - info.num_ack_pending as i64;
    assert_eq!(
        acked_past_floor, 0,
        "no message past the ack floor is acked: {info:?}"
    );
    (floor, delivered - floor)
}

/// Asserts that every message the broker counts as acked was committed:
/// each stream sequence up to the ack floor is a stored event or a kept
/// rejection.
async fn assert_acked_were_committed(app: &TestApp) -> (u64, u64) {
    let (floor, held) = acked_prefix(app).await;
    let sql = app.db.sql().await;
    let stored = sql
        .scalar(&format!(
            "SELECT (SELECT COUNT(*) FROM events WHERE stream_seq <= {floor}) \
                  + (SELECT COUNT(*) FROM rejected WHERE stream_seq <= {floor})"
        ))
        .await as u64;
    sql.close().await;
    assert_eq!(stored, floor, "every acked message was committed");
    (floor, held)
}

/// Waits until the broker saw every one of `total` messages acked.
async fn wait_all_acked(env: &TestEnv, total: u64) {
    eventually(Duration::from_secs(30), "every message acked", || async {
        let info = env.consumer_info().await;
        (info.ack_floor.stream_sequence == total && info.num_ack_pending == 0).then_some(())
    })
    .await
}

/// `n` from `/metrics`.
async fn metric(app: &TestApp, name: &str) -> u64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} in /metrics"))
        .parse()
        .unwrap()
}

/// Mails by Message-ID: (mails, distinct, duplicates).
fn count_mails(app: &TestApp) -> (usize, usize, usize) {
    let mails = app.mails();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for m in &mails {
        *by_id.entry(m.message_id.clone()).or_default() += 1;
    }
    (mails.len(), by_id.len(), mails.len() - by_id.len())
}

fn page_view(id: &str, client: &str, at: &str) -> Value {
    event(
        id,
        "page_viewed",
        client,
        at,
        json!({"url": "/"}),
        json!({"session_id": "s"}),
    )
}

/// Holds SQLite's write lock from another connection (an open `IMMEDIATE`
/// transaction that wrote), as a long migration or a backup tool would.
async fn hold_sqlite_write_lock(url: &str) -> sqlx::SqliteConnection {
    use sqlx::Connection;
    let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE; CREATE TABLE outage_lock (x INTEGER)")
        .execute(&mut c)
        .await
        .unwrap();
    c
}

async fn the_database_away_for_a_while_pauses_consumption_and_loses_nothing(backend: Backend) {
    // A short lease: a mail caught in flight by the outage and left claimed
    // would be taken again and sent twice within the test.
    let env = TestEnv::with_env(backend, &[("NUDGE__DELIVERY__LEASE_SECS", "3")]).await;
    let app = env.start().await;
    let before = 20u64;
    for i in 0..before {
        app.publish(&registered_at(
            &format!("b{i}"),
            &format!("b{i}"),
            &ago(3600),
        ))
        .await;
    }
    app.wait_events(before).await;
    app.wait_outbox_settled().await;

    // A mail on its way when the database goes: the SMTP server takes 3 s
    // over `slow*@` mail, so it is accepted while the database is away.
    app.publish(&registered_at("slow1", "slow1", &ago(3500)))
        .await;
    eventually(Duration::from_secs(20), "the slow mail claimed", || async {
        let rows = app.store.list_outbox(1000).await.ok()?;
        rows.iter()
            .any(|r| r.client_id == "slow1" && r.status == "sending")
            .then_some(())
    })
    .await;
    wait_all_acked(&app, before + 1).await;
    let committed = before + 1;

    let away = Instant::now();
    let lock = match backend {
        Backend::Postgres => {
            app.db.pg_refuse_connections().await;
            None
        }
        Backend::Sqlite => Some(hold_sqlite_write_lock(&app.db.url).await),
    };
    let clients = 30;
    for i in 0..clients {
        app.publish(&registered_at(
            &format!("o{i}"),
            &format!("o{i}"),
            &ago(3000),
        ))
        .await;
        app.publish(&page_view(&format!("v{i}"), &format!("o{i}"), &ago(2900)))
            .await;
    }
    let during = 2 * clients as u64;

    let body = wait_ingest_failing(&app).await;
    let reason = body["ingest"].as_str().unwrap().to_string();
    match backend {
        Backend::Postgres => assert_eq!(body["database"], "unavailable", "{body}"),
        Backend::Sqlite => assert!(reason.contains("database is locked"), "{body}"),
    }
    eventually(
        Duration::from_secs(20),
        "the slow mail accepted by the server",
        || async {
            app.mails()
                .iter()
                .any(|m| m.to == "slow1@example.com")
                .then_some(())
        },
    )
    .await;
    // Stay away until recording the slow mail as sent has failed (SQLite
    // waits out its 10 s busy timeout first) and its lease has run out.
    let hold = match backend {
        Backend::Postgres => Duration::from_secs(4),
        Backend::Sqlite => Duration::from_secs(11),
    };
    let until = Instant::now() + hold;
    let mut checks = 0;
    let mut held = 0;
    while Instant::now() < until {
        let (floor, unacked) = acked_prefix(&app).await;
        assert_eq!(floor, committed, "nothing acked since the database went");
        held = held.max(unacked);
        if backend == Backend::Sqlite {
            // Readers go on under SQLite's write lock.
            assert_eq!(app.store.count_events().await.unwrap(), committed);
        }
        checks += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        held > 0,
        "nudge took messages during the outage and held them unacked"
    );
    let failures = metric(&app, "nudge_batch_failures_total").await;

    match lock {
        Some(mut c) => {
            sqlx::raw_sql("ROLLBACK").execute(&mut c).await.unwrap();
        }
        None => app.db.pg_allow_connections().await,
    }
    let away_for = away.elapsed();

    let total = committed + during;
    eventually(
        Duration::from_secs(60),
        "every event stored after the outage",
        || async { (app.store.count_events().await.ok()? == total).then_some(()) },
    )
    .await;
    wait_all_acked(&app, total).await;
    app.wait_outbox_settled().await;
    wait_ready(&app).await;

    let rows = app.store.list_outbox(10_000).await.unwrap();
    let registrations = before as usize + 1 + clients;
    assert_eq!(rows.len(), registrations, "one welcome per registration");
    assert!(rows.iter().all(|r| r.status == "sent"), "{rows:?}");
    assert!(app.store.list_rejected(10).await.unwrap().is_empty());
    let (mails, distinct, duplicates) = count_mails(&app);
    assert_eq!(distinct, registrations, "every welcome mail arrived");
    assert_eq!(duplicates, 0, "not one mail twice");
    let slow = app
        .mails()
        .iter()
        .filter(|m| m.to == "slow1@example.com")
        .count();
    assert_eq!(slow, 1, "the mail in flight at the cut went out once");
    println!(
        "fault suite ({backend:?}): database away for {:.1} s ({}): {during} events published \
         meanwhile, {held} held unacked, 0 acked across {checks} checks, {failures} failed \
         commits (\"{reason}\"); afterwards {total} events stored once, {mails} mails, \
         {duplicates} duplicates, the mail in flight at the cut sent once",
        away_for.as_secs_f64(),
        match backend {
            Backend::Sqlite => "another connection held the write lock",
            Backend::Postgres => "connections refused and ended",
        }
    );
    app.stop().await;
}

backend_tests!(the_database_away_for_a_while_pauses_consumption_and_loses_nothing,);

async fn a_full_or_read_only_database_fails_clearly_acks_nothing_and_recovers(backend: Backend) {
    // SQLite: a 1 MiB cap on the file (`database.max_size_mb`), which SQLite
    // enforces like a full disk (SQLITE_FULL). PostgreSQL: the database made
    // read-only. A restart of nudge re-reads unacked messages after ack_wait.
    let extra: &[(&str, &str)] = match backend {
        Backend::Sqlite => &[
            ("NUDGE__DATABASE__MAX_SIZE_MB", "1"),
            ("NUDGE__NATS__ACK_WAIT_SECS", "5"),
        ],
        Backend::Postgres => &[],
    };
    let env = TestEnv::with_env(backend, extra).await;
    let app = env.start().await;
    let first = 20usize;
    for i in 0..first {
        app.publish(&registered_at(
            &format!("r{i}"),
            &format!("c{i}"),
            &ago(3600),
        ))
        .await;
    }
    app.wait_events(first as u64).await;
    app.wait_outbox_settled().await;
    wait_all_acked(&app, first as u64).await;
    let mut published = first;

    let expected = match backend {
        Backend::Postgres => {
            app.db.pg_set_read_only(true).await;
            "read-only transaction"
        }
        Backend::Sqlite => {
            // Page views (no mail) with some weight, until the file is full.
            let mut n = 0;
            loop {
                for _ in 0..50 {
                    let mut e = page_view(&format!("p{n}"), &format!("c{}", n % first), &ago(3000));
                    e["data"]["notes"] = json!("n".repeat(400));
                    app.publish(&e).await;
                    n += 1;
                    published += 1;
                }
                let full = eventually(Duration::from_secs(30), "stored or failing", || async {
                    if app.store.count_events().await.ok()? == published as u64 {
                        return Some(false);
                    }
                    let (_, body) = health(&app).await;
                    body["ingest"]
                        .as_str()?
                        .starts_with("failing")
                        .then_some(true)
                })
                .await;
                if full {
                    break;
                }
                assert!(n < 20_000, "a 1 MiB database never filled up");
            }
            "database or disk is full"
        }
    };
    // Registrations that cannot be stored yet.
    let later = 30usize;
    for i in 0..later {
        let c = first + i;
        app.publish(&registered_at(
            &format!("r{c}"),
            &format!("c{c}"),
            &ago(2000),
        ))
        .await;
    }
    published += later;

    let body = wait_ingest_failing(&app).await;
    let reason = body["ingest"].as_str().unwrap().to_string();
    assert!(reason.contains(expected), "{body}");
    // Retried well past the point where a batch that keeps failing is taken
    // apart to find a poison message.
    eventually(Duration::from_secs(60), "retries", || async {
        (metric(&app, "nudge_batch_failures_total").await >= 5).then_some(())
    })
    .await;
    let failures = metric(&app, "nudge_batch_failures_total").await;
    let committed = app.store.count_events().await.unwrap();
    let (acked, held) = assert_acked_were_committed(&app).await;
    assert!(held > 0, "messages held unacked");
    assert!(
        acked <= (published - later) as u64,
        "nothing acked since writes fail"
    );
    let rejected = app.store.list_rejected(10).await.unwrap();
    assert!(
        rejected.is_empty(),
        "nothing set aside as poison: the database is at fault, not a message: {rejected:?}"
    );
    assert_eq!(app.mails().len(), first, "no mail for what is not stored");

    let (app, size) = match backend {
        Backend::Postgres => {
            app.db.pg_set_read_only(false).await;
            (app, String::new())
        }
        Backend::Sqlite => {
            // Stopped while failing, the file is whole; started again with
            // room, nudge takes the unacked messages up again.
            let mut env = app.stop().await;
            let sql = env.db.sql().await;
            let check = sql.rows("PRAGMA integrity_check").await;
            assert_eq!(check, vec![vec![Some("ok".to_string())]]);
            let bytes = sql
                .scalar(
                    "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
                )
                .await;
            sql.close().await;
            assert!(bytes <= 1024 * 1024, "{bytes}");
            env.config.database.max_size_mb = std::num::NonZeroU64::new(64);
            (
                env.start().await,
                format!(", file at {bytes} bytes of 1 MiB, integrity_check ok"),
            )
        }
    };
    let total = published as u64;
    eventually(
        Duration::from_secs(60),
        "every event stored once writes work again",
        || async { (app.store.count_events().await.ok()? == total).then_some(()) },
    )
    .await;
    wait_all_acked(&app, total).await;
    let registrations = first + later;
    eventually(Duration::from_secs(30), "every welcome sent", || async {
        let rows = app.store.list_outbox(10_000).await.ok()?;
        (rows.len() == registrations && rows.iter().all(|r| r.status == "sent")).then_some(())
    })
    .await;
    wait_ready(&app).await;
    assert!(app.store.list_rejected(10).await.unwrap().is_empty());
    let (mails, distinct, duplicates) = count_mails(&app);
    assert_eq!(distinct, registrations);
    assert_eq!(duplicates, 0);
    println!(
        "fault suite ({backend:?}): {} (\"{reason}\"): {committed} events committed, {acked} \
         acked, {held} held unacked, 0 set aside as poison after {failures} failed commits{size}; \
         afterwards {total} events stored once, {mails} mails, {duplicates} duplicates",
        match backend {
            Backend::Sqlite => "database full",
            Backend::Postgres => "database read-only",
        }
    );
    app.stop().await;
}

backend_tests!(a_full_or_read_only_database_fails_clearly_acks_nothing_and_recovers,);

async fn a_stalling_mail_server_times_out_one_mail_and_the_rest_goes_on(backend: Backend) {
    let env = TestEnv::with_env(backend, &[("NUDGE__SMTP__TIMEOUT_SECS", "2")]).await;
    let app = env.start().await;
    // The server never answers RCPT for `stall*@`.
    app.publish(&registered_at("s1", "stall1", &ago(3600)))
        .await;
    let others = 20usize;
    for i in 0..others {
        app.publish(&registered_at(
            &format!("r{i}"),
            &format!("c{i}"),
            &ago(3500),
        ))
        .await;
        app.publish(&page_view(&format!("v{i}"), &format!("c{i}"), &ago(3400)))
            .await;
    }
    let stalled = eventually(
        Duration::from_secs(60),
        "the stalled mail tried twice",
        || async {
            let rows = app.store.list_outbox(1000).await.ok()?;
            rows.into_iter()
                .find(|r| r.client_id == "stall1" && r.attempts >= 2 && r.last_error.is_some())
        },
    )
    .await;
    let error = stalled.last_error.clone().unwrap();
    assert!(error.contains("timed out"), "{stalled:?}");
    assert_ne!(stalled.status, "sent");

    // Meanwhile everything else went on: events decided, the other mails sent
    // at their first attempt (the stalled connection was not handed to them).
    let events = 1 + 2 * others as u64;
    app.wait_events(events).await;
    let rows = eventually(Duration::from_secs(30), "the other mails sent", || async {
        let rows = app.store.list_outbox(1000).await.ok()?;
        let sent: Vec<_> = rows
            .into_iter()
            .filter(|r| r.client_id != "stall1" && r.status == "sent")
            .collect();
        (sent.len() == others).then_some(sent)
    })
    .await;
    for r in &rows {
        assert_eq!(r.attempts, 1, "{r:?}");
    }
    // And later events still go through while the stalled mail keeps retrying.
    for i in 0..5 {
        let c = others + i;
        app.publish(&registered_at(
            &format!("r{c}"),
            &format!("c{c}"),
            &ago(100),
        ))
        .await;
    }
    app.wait_events(events + 5).await;
    let mails = app.wait_mails(others + 5).await;
    assert!(mails.iter().all(|m| m.to != "stall1@example.com"));
    let stalled = app
        .store
        .list_outbox(1000)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.client_id == "stall1")
        .unwrap();
    println!(
        "fault suite ({backend:?}): SMTP stalling at RCPT with smtp.timeout_secs 2: the stalled \
         mail tried {} times (\"{error}\"), {} other mails sent each at the first attempt, {} \
         events decided meanwhile",
        stalled.attempts,
        others + 5,
        events + 5
    );
    app.stop().await;
}

backend_tests!(a_stalling_mail_server_times_out_one_mail_and_the_rest_goes_on,);
