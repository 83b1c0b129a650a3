//! The store's contract: what every backend must do, trait by trait, tested
//! through the store's API alone and run on each backend (a fresh SQLite
//! file, a fresh PostgreSQL database). A new backend, or a query moved
//! between the shared and the per-backend code, must pass all of it.

use crate::helpers::{Backend, TestDb};
use chrono::{DateTime, Duration, TimeZone, Utc};
use nudge::domain::counters::{CounterKey, CounterWrite};
use nudge::domain::effects::{Effect, EffectKind};
use nudge::domain::event::{ClientId, Envelope};
use nudge::domain::history::{ClientState, Timer};
use nudge::domain::log::{Level, LogEntry};
use nudge::store::{
    Admin, AnyStore, AuditEntry, BatchWrite, Batches, CommitOutcome, Delivery, Derived, History,
    LogCursor, Outbox, Rejected, Schedules, Staff, State, StoredEvent, SweepProgress, TaskFilter,
    Window, erasure_hash,
};
use serde_json::{Map, json};
use std::sync::Arc;
use tempfile::TempDir;

backend_tests!(
    a_batch_stores_each_event_once_and_a_known_id_conflicts,
    client_states_are_written_as_a_compare_and_swap,
    shared_counters_are_compare_and_swaps_and_members_distinct,
    effects_are_deduplicated_by_key,
    the_outbox_claims_with_a_lease_and_records_retry_deferral_sending_and_failure,
    schedules_find_due_timers_page_clients_and_claim_each_sweep_once,
    the_history_log_is_read_in_stream_order_and_replaced_derived_history_is_what_is_read,
    staff_lists_page_search_and_erasure_leaves_nothing_personal,
    the_window_holds_back_other_batches_pending_messages_until_settled,
);

/// A fresh, migrated store of its own; keep the other two alive as long.
async fn open(backend: Backend) -> (AnyStore, TestDb, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(backend, dir.path(), "contract").await;
    let store = AnyStore::connect(&db.url, 4).await.unwrap();
    store.migrate().await.unwrap();
    // Migrating again is a no-op.
    store.migrate().await.unwrap();
    store.ping().await.unwrap();
    (store, db, dir)
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 9, 0, 0).unwrap()
}

fn client(id: &str) -> ClientId {
    ClientId::parse(id).unwrap()
}

fn event(id: &str, client: &str, at: DateTime<Utc>, seq: Option<u64>) -> StoredEvent {
    let mut data = Map::new();
    data.insert("total".into(), json!(12.5));
    let env = Envelope::from_stored(id, "order_placed", client, at, data, Map::new()).unwrap();
    StoredEvent {
        envelope: Arc::new(env),
        received_at: at,
        stream_seq: seq,
    }
}

fn state(id: &str, version: i64) -> Arc<ClientState> {
    let mut s = ClientState::new(client(id));
    s.version = version;
    Arc::new(s)
}

fn mail(key: &str, client_id: &str, template: &str) -> Effect {
    Effect {
        key: key.into(),
        rule: "welcome".into(),
        client_id: client(client_id),
        cause: "e1".into(),
        at: t0(),
        kind: EffectKind::Mail {
            template: template.into(),
            to: format!("{client_id}@example.com"),
            vars: Map::new(),
        },
    }
}

fn log(client_id: &str, message: &str) -> LogEntry {
    LogEntry {
        client_id: client(client_id),
        at: t0(),
        level: Level::Notice,
        rule: Some("welcome".into()),
        event_id: None,
        message: message.into(),
    }
}

fn key(name: &str) -> CounterKey {
    CounterKey {
        name: name.into(),
        period: "2026-Q1".into(),
    }
}

async fn commit(store: &AnyStore, batch: BatchWrite) -> CommitOutcome {
    store.commit_batch(&batch).await.unwrap()
}

async fn a_batch_stores_each_event_once_and_a_known_id_conflicts(backend: Backend) {
    let (store, _db, _dir) = open(backend).await;
    let first = BatchWrite {
        events: vec![
            event("e1", "ana", t0(), Some(1)),
            event("e2", "ana", t0(), Some(2)),
        ],
        clients: vec![state("ana", 0)],
        log: vec![log("ana", "first")],
        ..Default::default()
    };
    assert_eq!(commit(&store, first).await, CommitOutcome::Committed);
    let ids = [
        &nudge::domain::event::EventId::parse("e1").unwrap(),
        &nudge::domain::event::EventId::parse("e3").unwrap(),
    ];
    let known = store.known_events(&ids).await.unwrap();
    assert_eq!(known.into_iter().collect::<Vec<_>>(), ["e1"]);
    assert_eq!(store.count_events().await.unwrap(), 2);

    // A batch repeating a stored event id conflicts, and writes nothing
    // else either: not its new event, client, mail or log line.
    let again = BatchWrite {
        events: vec![
            event("e3", "bob", t0(), Some(3)),
            event("e2", "ana", t0(), Some(2)),
        ],
        clients: vec![state("bob", 0)],
        effects: vec![mail("k-bob", "bob", "welcome")],
        log: vec![log("bob", "never")],
        ..Default::default()
    };
    assert_eq!(commit(&store, again).await, CommitOutcome::Conflict);
    assert_eq!(store.count_events().await.unwrap(), 2);
    assert!(
        store
            .load_clients(&[&client("bob")])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.list_outbox(10).await.unwrap().is_empty());
    assert!(
        store
            .client_log(&client("bob"), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let ana_log = store.client_log(&client("ana"), 10).await.unwrap();
    assert_eq!(ana_log.len(), 1);
    assert_eq!(ana_log[0].message, "first");
    assert_eq!(ana_log[0].at, t0());

    // A big batch, past every statement's chunk length, is one commit.
    let many: Vec<StoredEvent> = (0..2_500)
        .map(|i| event(&format!("m{i}"), &format!("c{i}"), t0(), Some(10 + i)))
        .collect();
    let clients = (0..2_500).map(|i| state(&format!("c{i}"), 0)).collect();
    let big = BatchWrite {
        events: many,
        clients,
        ..Default::default()
    };
    assert_eq!(commit(&store, big).await, CommitOutcome::Committed);
    assert_eq!(store.count_events().await.unwrap(), 2_502);
    let ids: Vec<ClientId> = (0..2_500).map(|i| client(&format!("c{i}"))).collect();
    let refs: Vec<&ClientId> = ids.iter().collect();
    assert_eq!(store.load_clients(&refs).await.unwrap().len(), 2_500);
}

async fn client_states_are_written_as_a_compare_and_swap(backend: Backend) {
    let (store, _db, _dir) = open(backend).await;
    let write = |version: i64| BatchWrite {
        clients: vec![state("ana", version)],
        ..Default::default()
    };
    assert_eq!(commit(&store, write(0)).await, CommitOutcome::Committed);
    let loaded = store.load_clients(&[&client("ana")]).await.unwrap();
    assert_eq!(loaded[&client("ana")].version, 1);
    // Created meanwhile by another writer: the new client conflicts.
    assert_eq!(commit(&store, write(0)).await, CommitOutcome::Conflict);
    assert_eq!(commit(&store, write(1)).await, CommitOutcome::Committed);
    // Loaded at version 1, changed meanwhile: a stale write conflicts.
    assert_eq!(commit(&store, write(1)).await, CommitOutcome::Conflict);
    let mut changed = ClientState::new(client("ana"));
    changed.version = 2;
    changed.profile.email = Some("ana@example.com".into());
    changed.timers.push(Timer {
        rule: "welcome".into(),
        name: "check".into(),
        due: t0(),
        data: Map::new(),
    });
    let batch = BatchWrite {
        clients: vec![Arc::new(changed.clone())],
        ..Default::default()
    };
    assert_eq!(commit(&store, batch).await, CommitOutcome::Committed);
    let loaded = store.load_clients(&[&client("ana")]).await.unwrap();
    let mut expected = changed;
    expected.version = 3;
    assert_eq!(loaded[&client("ana")], expected);
}

async fn shared_counters_are_compare_and_swaps_and_members_distinct(backend: Backend) {
    let (store, _db, _dir) = open(backend).await;
    let add = |version: i64, value: f64| BatchWrite {
        counters: vec![CounterWrite {
            key: key("orders"),
            version,
            value,
        }],
        ..Default::default()
    };
    assert_eq!(store.load_counter(&key("orders")).await.unwrap().version, 0);
    assert_eq!(commit(&store, add(0, 1.0)).await, CommitOutcome::Committed);
    let stored = store.load_counter(&key("orders")).await.unwrap();
    assert_eq!((stored.value, stored.version), (1.0, 1));
    assert_eq!(commit(&store, add(0, 5.0)).await, CommitOutcome::Conflict);
    assert_eq!(commit(&store, add(1, 2.5)).await, CommitOutcome::Committed);
    assert_eq!(commit(&store, add(1, 9.0)).await, CommitOutcome::Conflict);
    let stored = store.load_counter(&key("orders")).await.unwrap();
    assert_eq!((stored.value, stored.version), (2.5, 2));

    let member = |m: &str| BatchWrite {
        members: vec![(key("buyers"), m.to_string())],
        ..Default::default()
    };
    assert!(!store.is_member(&key("buyers"), "ana").await.unwrap());
    assert_eq!(
        commit(&store, member("ana")).await,
        CommitOutcome::Committed
    );
    assert!(store.is_member(&key("buyers"), "ana").await.unwrap());
    assert!(!store.is_member(&key("buyers"), "bob").await.unwrap());
    // Added meanwhile by another writer: the batch counted on a new member.
    assert_eq!(commit(&store, member("ana")).await, CommitOutcome::Conflict);
}

async fn effects_are_deduplicated_by_key(backend: Backend) {
    let (store, _db, _dir) = open(backend).await;
    let task = Effect {
        kind: EffectKind::Task {
            team: "sales".into(),
            title: "call ana".into(),
            to: "sales@example.com".into(),
            data: Map::new(),
        },
        ..mail("k-task", "ana", "")
    };
    let first = BatchWrite {
        events: vec![event("e1", "ana", t0(), Some(1))],
        effects: vec![mail("k1", "ana", "welcome"), task.clone()],
        ..Default::default()
    };
    assert_eq!(commit(&store, first).await, CommitOutcome::Committed);
    // The same keys decided again (a redelivery, a replay): the first stays.
    let again = BatchWrite {
        events: vec![event("e2", "ana", t0(), Some(2))],
        effects: vec![
            mail("k1", "ana", "other"),
            task,
            mail("k2", "ana", "second"),
        ],
        ..Default::default()
    };
    assert_eq!(commit(&store, again).await, CommitOutcome::Committed);
    let outbox = store.list_outbox(10).await.unwrap();
    let mut keys: Vec<&str> = outbox.iter().map(|r| r.key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["k-task", "k1", "k2"]);
    let mails = store.client_mails(&client("ana"), 10).await.unwrap();
    let k1 = mails
        .iter()
        .find(|m| m.rule == "welcome" && m.kind == "mail");
    assert!(k1.is_some());
    let templates: Vec<Option<&str>> = mails.iter().map(|m| m.template.as_deref()).collect();
    assert!(templates.contains(&Some("welcome")), "{templates:?}");
    assert!(!templates.contains(&Some("other")), "{templates:?}");
    let tasks = store.list_tasks(&TaskFilter::default(), 10).await.unwrap();
    assert_eq!(tasks.len(), 1);
    assert_eq!(
        (tasks[0].title.as_str(), tasks[0].status.as_str()),
        ("call ana", "open")
    );
    assert_eq!(store.outbox_depth().await.unwrap(), 3);
}

async fn the_outbox_claims_with_a_lease_and_records_retry_deferral_sending_and_failure(
    backend: Backend,
) {
    let (store, _db, _dir) = open(backend).await;
    let batch = BatchWrite {
        effects: vec![mail("k1", "ana", "welcome"), mail("k2", "bob", "welcome")],
        ..Default::default()
    };
    assert_eq!(commit(&store, batch).await, CommitOutcome::Committed);
    let now = Utc::now() + Duration::seconds(1);
    let lease = now + Duration::seconds(60);
    let claimed = store.claim_due(now, lease, 10).await.unwrap();
    assert_eq!(claimed.len(), 2);
    assert!(claimed.iter().all(|c| c.attempts == 1));
    assert_eq!(claimed[0].payload["template"], "welcome");
    // Leased: nobody else takes them, until the lease runs out.
    assert!(store.claim_due(now, lease, 10).await.unwrap().is_empty());
    let later = lease + Duration::seconds(1);
    let retaken = store
        .claim_due(later, later + Duration::seconds(60), 1)
        .await
        .unwrap();
    assert_eq!(retaken.len(), 1);
    assert_eq!(retaken[0].attempts, 2);

    let retry_at = later + Duration::seconds(300);
    let outcomes = [
        Delivery::Retry {
            key: "k1".into(),
            due_at: retry_at,
            error: "421 try later".into(),
        },
        Delivery::Failed {
            key: "k2".into(),
            error: "550 no such user".into(),
            log: log("bob", "mail failed"),
        },
    ];
    store.record_deliveries(&outcomes).await.unwrap();
    store.record_deliveries(&[]).await.unwrap();
    let row = |rows: &[nudge::store::OutboxRow], k: &str| {
        rows.iter().find(|r| r.key == k).cloned().unwrap()
    };
    let rows = store.list_outbox(10).await.unwrap();
    assert_eq!(row(&rows, "k1").status, "pending");
    assert_eq!(
        row(&rows, "k1").last_error.as_deref(),
        Some("421 try later")
    );
    assert_eq!(row(&rows, "k2").status, "failed");
    assert_eq!(store.outbox_depth().await.unwrap(), 1);
    let bob_log = store.client_log(&client("bob"), 10).await.unwrap();
    assert_eq!(bob_log[0].message, "mail failed");
    // Not due before its retry time.
    assert!(
        store
            .claim_due(later, retry_at, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let at = retry_at + Duration::seconds(1);
    let again = store
        .claim_due(at, at + Duration::seconds(60), 10)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    let attempts = again[0].attempts;
    // Deferred (quiet hours): put back without counting the attempt.
    store
        .record_deliveries(&[Delivery::Deferred {
            key: "k1".into(),
            due_at: at,
            why: "quiet hours".into(),
        }])
        .await
        .unwrap();
    let again = store
        .claim_due(at, at + Duration::seconds(60), 10)
        .await
        .unwrap();
    assert_eq!(again[0].attempts, attempts);
    store
        .record_deliveries(&[Delivery::Sent {
            key: "k1".into(),
            message_id: "<k1.nudge@example.com>".into(),
            at,
            log: log("ana", "mail sent"),
        }])
        .await
        .unwrap();
    let rows = store.list_outbox(10).await.unwrap();
    assert_eq!(row(&rows, "k1").status, "sent");
    assert_eq!(
        row(&rows, "k1").message_id.as_deref(),
        Some("<k1.nudge@example.com>")
    );
    assert_eq!(row(&rows, "k1").last_error, None);
    assert_eq!(store.outbox_depth().await.unwrap(), 0);
    let mails = store.client_mails(&client("ana"), 10).await.unwrap();
    // Times are kept to the microsecond.
    let at_micros = DateTime::from_timestamp_micros(at.timestamp_micros());
    assert_eq!(mails[0].sent_at, at_micros);
    assert!(
        store
            .claim_due(at + Duration::days(1), at, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn schedules_find_due_timers_page_clients_and_claim_each_sweep_once(backend: Backend) {
    let (store, _db, _dir) = open(backend).await;
    let mut timed = ClientState::new(client("b-timed"));
    timed.timers.push(Timer {
        rule: "welcome".into(),
        name: "check".into(),
        due: t0() + Duration::minutes(15),
        data: Map::new(),
    });
    let batch = BatchWrite {
        clients: vec![state("c", 0), Arc::new(timed), state("a", 0)],
        ..Default::default()
    };
    assert_eq!(commit(&store, batch).await, CommitOutcome::Committed);
    assert!(store.due_clients(t0(), 10).await.unwrap().is_empty());
    let due = store
        .due_clients(t0() + Duration::minutes(15), 10)
        .await
        .unwrap();
    assert_eq!(due, [client("b-timed")]);
    let page = store.client_page(None, 2).await.unwrap();
    assert_eq!(page, [client("a"), client("b-timed")]);
    let page = store
        .client_page(Some(&client("b-timed")), 2)
        .await
        .unwrap();
    assert_eq!(page, [client("c")]);

    let slot = t0();
    let (now, lease) = (t0(), t0() + Duration::minutes(5));
    let claim = store.claim_sweep("idle", slot, now, lease).await.unwrap();
    assert_eq!(claim.map(|c| (c.slot, c.cursor)), Some((slot, None)));
    // Another instance while the lease is live: nothing.
    assert!(
        store
            .claim_sweep("idle", slot, now, lease)
            .await
            .unwrap()
            .is_none()
    );
    let progress = BatchWrite {
        sweep: Some(SweepProgress {
            rule: "idle".into(),
            slot,
            cursor: Some(client("a")),
            done: false,
        }),
        ..Default::default()
    };
    assert_eq!(commit(&store, progress).await, CommitOutcome::Committed);
    // The lease ran out: taken over where it got to.
    let after = lease + Duration::seconds(1);
    let claim = store
        .claim_sweep("idle", slot, after, after + Duration::minutes(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.cursor, Some(client("a")));
    let done = BatchWrite {
        sweep: Some(SweepProgress {
            rule: "idle".into(),
            slot,
            cursor: Some(client("c")),
            done: true,
        }),
        ..Default::default()
    };
    assert_eq!(commit(&store, done).await, CommitOutcome::Committed);
    let much_later = after + Duration::hours(1);
    assert!(
        store
            .claim_sweep("idle", slot, much_later, much_later)
            .await
            .unwrap()
            .is_none()
    );
    let next = slot + Duration::days(1);
    let claim = store
        .claim_sweep("idle", next, next, next + Duration::minutes(5))
        .await;
    assert_eq!(claim.unwrap().map(|c| c.cursor), Some(None));
    let log = store.sweep_log().await.unwrap();
    assert_eq!(
        log,
        [("idle".to_string(), slot), ("idle".to_string(), next)]
    );
}

async fn the_history_log_is_read_in_stream_order_and_replaced_derived_history_is_what_is_read(
    backend: Backend,
) {
    let (store, _db, _dir) = open(backend).await;
    // Written out of order, with a tie on the sequence (a recreated stream)
    // and an event of nudge's own (no sequence), which the walk leaves out.
    let batches = [
        vec![
            event("e-5", "ana", t0(), Some(5)),
            event("own", "ana", t0(), None),
        ],
        vec![event("e-2b", "bob", t0() + Duration::hours(1), Some(2))],
        vec![event("e-2a", "ana", t0() - Duration::hours(1), Some(2))],
        vec![event("e-1", "bob", t0(), Some(1))],
    ];
    for events in batches {
        let batch = BatchWrite {
            events,
            ..Default::default()
        };
        assert_eq!(commit(&store, batch).await, CommitOutcome::Committed);
    }
    let mut walked = Vec::new();
    let mut after: Option<LogCursor> = None;
    loop {
        let page = store.events_page(after.as_ref(), 2).await.unwrap();
        let Some((_, last)) = page.last() else { break };
        after = Some(last.clone());
        walked.extend(
            page.into_iter()
                .map(|(e, c)| (e.id.as_str().to_string(), c.seq)),
        );
    }
    let expected = [("e-1", 1), ("e-2a", 2), ("e-2b", 2), ("e-5", 5)];
    let expected: Vec<(String, i64)> = expected.iter().map(|(i, s)| (i.to_string(), *s)).collect();
    assert_eq!(walked, expected);
    let first = store.events_page(None, 1).await.unwrap();
    assert_eq!(first[0].0.data["total"], 12.5);
    assert_eq!(first[0].0.occurred_at, t0());

    let mut rebuilt = ClientState::new(client("ana"));
    rebuilt.profile.first_name = Some("Ana".into());
    let derived = Derived {
        clients: vec![rebuilt.clone()],
        counters: vec![(key("orders"), 4.0)],
        members: vec![(key("buyers"), "ana".into())],
    };
    let before = BatchWrite {
        clients: vec![state("gone", 0)],
        counters: vec![CounterWrite {
            key: key("stale"),
            version: 0,
            value: 1.0,
        }],
        ..Default::default()
    };
    assert_eq!(commit(&store, before).await, CommitOutcome::Committed);
    store.replace_derived(&derived).await.unwrap();
    let loaded = store
        .load_clients(&[&client("ana"), &client("gone")])
        .await
        .unwrap();
    assert_eq!(loaded.len(), 1);
    rebuilt.version = 1;
    assert_eq!(loaded[&client("ana")], rebuilt);
    assert_eq!(store.load_counter(&key("orders")).await.unwrap().value, 4.0);
    assert_eq!(store.load_counter(&key("stale")).await.unwrap().version, 0);
    assert!(store.is_member(&key("buyers"), "ana").await.unwrap());
}

async fn staff_lists_page_search_and_erasure_leaves_nothing_personal(backend: Backend) {
    let (store, _db, _dir) = open(backend).await;
    assert_eq!(
        store.meta_get_or_init("key", "first").await.unwrap(),
        "first"
    );
    assert_eq!(
        store.meta_get_or_init("key", "second").await.unwrap(),
        "first"
    );

    let mut emile = ClientState::new(client("c-emile"));
    emile.profile.email = Some("Emile@Example.com".into());
    emile.profile.first_name = Some("Émile".into());
    emile.profile.last_seen = Some(t0());
    let events: Vec<StoredEvent> = (0..5)
        .map(|i| {
            event(
                &format!("e{i}"),
                "c-emile",
                t0() + Duration::minutes(i),
                Some(i as u64 + 1),
            )
        })
        .collect();
    let tasks: Vec<Effect> = (0..5)
        .map(|i| Effect {
            key: format!("t{i}"),
            kind: EffectKind::Task {
                team: "sales".into(),
                title: format!("call Émile {i}"),
                to: "sales@example.com".into(),
                data: Map::new(),
            },
            ..mail("", "c-emile", "")
        })
        .collect();
    let rejected = |seq: u64, payload: &str| Rejected {
        received_at: t0(),
        subject: "shop.events".into(),
        stream_seq: Some(seq),
        reason: "missing field".into(),
        payload: payload.into(),
    };
    let batch = BatchWrite {
        events,
        clients: vec![Arc::new(emile), state("c-other", 0)],
        effects: [vec![mail("m1", "c-emile", "welcome")], tasks].concat(),
        log: vec![log("c-emile", "welcomed")],
        rejected: vec![
            rejected(100, r#"{"email": "Emile@Example.com"}"#),
            rejected(101, "not json at all"),
            rejected(101, "redelivered: stored once"),
        ],
        members: vec![(key("buyers"), "c-emile".into())],
        ..Default::default()
    };
    assert_eq!(commit(&store, batch).await, CommitOutcome::Committed);

    // Rejected envelopes, newest first, in pages.
    let page = store.rejected_page(None, 1).await.unwrap();
    assert_eq!(page.len(), 1);
    let next = store.rejected_page(Some(page[0].0), 10).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(store.list_rejected(10).await.unwrap().len(), 2);
    // Tasks, newest first then by id, in pages that skip and double nothing.
    let mut seen = Vec::new();
    let mut filter = TaskFilter {
        team: Some("sales".into()),
        status: Some("open".into()),
        ..Default::default()
    };
    loop {
        let page = store.list_tasks(&filter, 2).await.unwrap();
        let Some(last) = page.last() else { break };
        filter.after = Some((last.created_at, last.id.clone()));
        seen.extend(page.iter().map(|t| t.id.clone()));
    }
    assert_eq!(seen, ["t0", "t1", "t2", "t3", "t4"]);
    assert!(store.close_task("t0", t0()).await.unwrap());
    assert!(!store.close_task("t0", t0()).await.unwrap());
    // A client's events, newest first, before a cursor.
    let events = store
        .client_events(&client("c-emile"), None, None, 2)
        .await
        .unwrap();
    assert_eq!(
        events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["e4", "e3"]
    );
    let before = Some((events[1].occurred_at, events[1].id.clone()));
    let older = store
        .client_events(&client("c-emile"), Some("order_placed"), before, 10)
        .await
        .unwrap();
    assert_eq!(
        older.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["e2", "e1", "e0"]
    );
    assert_eq!(older[0].data["total"], 12.5);
    // Searches ignore case in every script; an exact id comes first.
    for q in ["émile", "EMILE@example", "c-emi"] {
        let found = store.search_clients(q, 0, 10).await.unwrap();
        assert_eq!(found.len(), 1, "{q}");
        assert_eq!(found[0].last_seen, Some(t0()), "{q}");
    }
    let found = store.search_clients("c-", 0, 10).await.unwrap();
    assert_eq!(found.len(), 2);
    assert_eq!(store.search_clients("c-", 1, 10).await.unwrap().len(), 1);
    assert!(store.search_clients("%", 0, 10).await.unwrap().is_empty());
    let export = store
        .export_client(&client("c-emile"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(export["events"].as_array().unwrap().len(), 5);
    assert_eq!(export["tasks"].as_array().unwrap().len(), 5);
    assert_eq!(export["history"]["profile"]["first_name"], "Émile");
    assert!(
        store
            .export_client(&client("nobody"))
            .await
            .unwrap()
            .is_none()
    );

    // Erasure: nothing personal left, aggregates kept, recorded by hash.
    assert!(!store.erase_client(&client("nobody"), t0()).await.unwrap());
    assert!(store.erase_client(&client("c-emile"), t0()).await.unwrap());
    assert!(
        store
            .load_clients(&[&client("c-emile")])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .export_client(&client("c-emile"))
            .await
            .unwrap()
            .is_none()
    );
    let events = store
        .client_events(&client("c-emile"), None, None, 10)
        .await
        .unwrap();
    assert!(events.iter().all(|e| e.data == json!({})), "{events:?}");
    assert!(
        store
            .client_log(&client("c-emile"), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let rejected = store.list_rejected(10).await.unwrap();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].payload, "not json at all");
    let tasks = store.list_tasks(&TaskFilter::default(), 10).await.unwrap();
    assert!(tasks.iter().all(|t| t.title == "(erased)"), "{tasks:?}");
    let mails = store.client_mails(&client("c-emile"), 10).await.unwrap();
    assert_eq!(mails[0].status, "failed");
    assert!(!store.is_member(&key("buyers"), "c-emile").await.unwrap());
    let hash = erasure_hash(&client("c-emile"));
    assert!(store.erased().await.unwrap().contains(&hash));
    assert!(
        store
            .search_clients("émile", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // The audit log, newest first, of one target when asked.
    for (action, target) in [
        ("export", "client:x"),
        ("erase", "client:x"),
        ("rule_run", "rule:y"),
    ] {
        let entry = AuditEntry {
            at: t0(),
            actor: "admin".into(),
            role: "admin".into(),
            action: action.into(),
            target: target.into(),
            outcome: "ok".into(),
        };
        store.record_audit(&entry).await.unwrap();
    }
    let all = store.list_audit(None, 10).await.unwrap();
    let actions: Vec<&str> = all.iter().map(|a| a.action.as_str()).collect();
    assert_eq!(actions, ["rule_run", "erase", "export"]);
    let of_x = store.list_audit(Some("client:x"), 1).await.unwrap();
    assert_eq!((of_x[0].action.as_str(), of_x[0].at), ("erase", t0()));
}

async fn the_window_holds_back_other_batches_pending_messages_until_settled(backend: Backend) {
    let (store, _db, _dir) = open(backend).await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let lock = store.consumer_lock(&cancel, &|_| {}).await;
    assert!(lock.is_some());
    let now = Utc::now();
    let lease = now + Duration::seconds(30);
    let items = |seqs: &[(u64, &str)]| -> Vec<(u64, Option<String>)> {
        seqs.iter()
            .map(|(s, c)| (*s, Some(c.to_string())))
            .collect()
    };
    store
        .window_register("a", &items(&[(11, "x"), (12, "y")]), lease)
        .await
        .unwrap();
    store
        .window_register("b", &items(&[(13, "x")]), lease)
        .await
        .unwrap();
    let blockers = store
        .window_blockers(&["b"], &[], 10, 14, &["x"], now)
        .await
        .unwrap();
    assert_eq!(blockers.pending, [("x".to_string(), 11)]);
    assert_eq!(blockers.first_pending, 11);
    assert_eq!(blockers.first_gap, 14);
    // A message nobody announced is a gap.
    let blockers = store
        .window_blockers(&["b"], &[], 10, 20, &["x"], now)
        .await
        .unwrap();
    assert_eq!(blockers.first_gap, 14);
    // Settled with its batch's commit: it holds nothing back any more.
    let settle = BatchWrite {
        settled: vec![11, 12],
        ..Default::default()
    };
    assert_eq!(commit(&store, settle).await, CommitOutcome::Committed);
    let blockers = store
        .window_blockers(&["b"], &[], 10, 14, &["x"], now)
        .await
        .unwrap();
    assert!(blockers.pending.is_empty(), "{blockers:?}");
    assert_eq!(blockers.first_pending, u64::MAX);
    assert!(!blockers.stale);
    // A lease that ran out still holds back, as stale (its holder stopped
    // renewing it); a renewal makes it live again, and never shortens it.
    let later = lease + Duration::seconds(1);
    let blockers = store
        .window_blockers(&["c"], &[], 10, 14, &["x"], later)
        .await
        .unwrap();
    assert_eq!(blockers.pending, [("x".to_string(), 13)]);
    assert_eq!(blockers.first_pending, 13);
    assert!(blockers.stale, "{blockers:?}");
    store
        .window_renew(&[13], later + Duration::seconds(30))
        .await
        .unwrap();
    store.window_renew(&[13], now).await.unwrap();
    let blockers = store
        .window_blockers(&["c"], &[], 10, 14, &["x"], later)
        .await
        .unwrap();
    assert!(!blockers.stale, "{blockers:?}");
    // Another client's stale message is stale for these events only as
    // the first pending (which steps using shared counters wait for).
    store
        .window_register("gone", &items(&[(14, "w")]), now)
        .await
        .unwrap();
    let blockers = store
        .window_blockers(&["c"], &[], 10, 15, &["x"], later)
        .await
        .unwrap();
    assert!(!blockers.stale, "{blockers:?}");
    let blockers = store
        .window_blockers(&["b"], &[], 10, 15, &["x"], later)
        .await
        .unwrap();
    assert_eq!(blockers.first_pending, 14);
    assert!(blockers.stale, "{blockers:?}");
    // Trimmed to the ack floor: what it passed is forgotten, so the first
    // gap is counted from the floor.
    store.window_trim(13).await.unwrap();
    let blockers = store
        .window_blockers(&["b"], &[], 13, 20, &["x"], now)
        .await
        .unwrap();
    assert_eq!(blockers.first_gap, 15);
    let floor = BatchWrite {
        window_floor: Some(13),
        ..Default::default()
    };
    assert_eq!(commit(&store, floor).await, CommitOutcome::Committed);
}
