//! The analytics export (`nudge export`), read back with a real engine:
//! DuckDB through its Python package (`pip install duckdb`; see .ci/run),
//! checked against what the store holds.

mod support;

use crate::helpers::{Backend, TestEnv};
use chrono::{Datelike, Timelike, Utc};
use nudge::domain::event::ClientId;
use nudge::store::{Staff, State};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use support::{
    README_QUERIES, TZ, count, duck, export, files, orders, page_view, publish_history, start,
    table, tokyo,
};

async fn the_export_reads_back_in_duckdb_as_the_store_holds_it(backend: Backend) {
    let app = start(backend).await;
    let n = publish_history(&app).await;
    app.wait_events(n).await;
    app.wait_outbox_settled().await;
    let dir = app.dir.path().join("export");
    let report = export(&app, &dir, &[]);
    let sql = app.db.sql().await;
    // It holds personal data: the folder it made is its owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);

    // Row counts per table, against the store.
    let stored = |q: &'static str| {
        let sql = &sql;
        async move { sql.scalar(q).await }
    };
    let pairs = [
        (
            "events",
            "SELECT count(*) FROM events WHERE stream_seq IS NOT NULL",
        ),
        (
            "orders",
            "SELECT count(*) FROM events WHERE type = 'order_placed'",
        ),
        ("clients", "SELECT count(*) FROM clients"),
        ("mails", "SELECT count(*) FROM outbox WHERE kind = 'mail'"),
        ("tasks", "SELECT count(*) FROM tasks"),
        ("counters", "SELECT count(*) FROM counters"),
        ("exposures", "SELECT count(*) FROM exposures"),
    ];
    for (name, q) in pairs {
        let want = stored(q).await;
        assert_eq!(count(&dir, &table(name)), want, "rows of {name}");
        assert_eq!(
            report["rows"][name].as_i64().unwrap_or(0),
            want,
            "report of {name}"
        );
    }
    assert_eq!(count(&dir, &table("events")), n as i64);
    // The welcome mails are its exposures (the shipped welcome has a goal),
    // and each exported mail says whether its client converted since.
    assert!(stored("SELECT count(*) FROM exposures").await > 0);
    assert_eq!(
        count(&dir, &format!("{} WHERE converted", table("mails"))),
        stored(
            "SELECT count(*) FROM outbox o WHERE kind = 'mail' AND EXISTS (SELECT 1 FROM \
             exposures x WHERE x.rule = o.rule AND x.client_id = o.client_id \
             AND x.converted_at IS NOT NULL)"
        )
        .await
    );
    assert!(count(&dir, &table("mails")) >= 3, "the welcome mails");
    let lines: usize = orders().iter().map(|o| o.4.len()).sum();
    assert_eq!(count(&dir, &table("order_items")), lines as i64);

    // Sums of order totals per day (in the business timezone) and channel.
    let mut want: BTreeMap<(String, String), f64> = BTreeMap::new();
    for (_, at, channel, total, _) in orders() {
        let day = tokyo(at).format("%Y-%m-%d").to_string();
        *want.entry((day, channel.to_string())).or_default() += total;
    }
    let got: BTreeMap<(String, String), f64> = duck(
        &dir,
        &format!(
            "SELECT CAST(date AS VARCHAR), channel, sum(total) FROM {} GROUP BY ALL",
            table("orders")
        ),
    )
    .into_iter()
    .map(|r| {
        let key = (
            r[0].as_str().unwrap().to_string(),
            r[1].as_str().unwrap().to_string(),
        );
        (key, r[2].as_f64().unwrap())
    })
    .collect();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, v) in &want {
        assert!((got[k] - v).abs() < 1e-9, "{k:?}: {} against {v}", got[k]);
    }
    let item_sum = duck(
        &dir,
        &format!(
            "SELECT sum(quantity * price) = sum(amount) FROM {}",
            table("order_items")
        ),
    );
    assert_eq!(item_sum[0][0], json!(true));

    // One client's history, field by field, against the store.
    let ana = ClientId::parse("ana").unwrap();
    let mut history = app
        .store
        .client_events(&ana, None, None, 100)
        .await
        .unwrap();
    history.reverse();
    let rows = duck(
        &dir,
        &format!(
            "SELECT id, type, epoch_us(occurred_at), data, context, year, month, day, weekday, \
             hour, CAST(date AS VARCHAR), session_id, channel, context_channel, total, currency, \
             order_id, product_id, category, price, quantity, promo_code, utm_source \
             FROM {} WHERE client_id = 'ana' ORDER BY stream_seq",
            table("events")
        ),
    );
    assert_eq!(rows.len(), history.len());
    for (row, e) in rows.iter().zip(&history) {
        let at = e
            .occurred_at
            .with_timezone(&TZ.parse::<chrono_tz::Tz>().unwrap());
        let text = |k: &str| {
            e.data.get(k).map_or(Value::Null, |v| {
                v.as_str().map_or(json!(v.to_string()), |s| json!(s))
            })
        };
        let num = |k: &str| {
            e.data
                .get(k)
                .and_then(Value::as_f64)
                .map_or(Value::Null, |f| json!(f))
        };
        let want = vec![
            json!(e.id),
            json!(e.event_type),
            json!(e.occurred_at.timestamp_micros()),
            json!(e.data.to_string()),
            json!(e.context.to_string()),
            json!(at.year()),
            json!(at.month()),
            json!(at.day()),
            json!(at.weekday().number_from_monday()),
            json!(at.hour()),
            json!(at.format("%Y-%m-%d").to_string()),
            e.context["session_id"].clone(),
            text("channel"),
            e.context["channel"].clone(),
            num("total"),
            text("currency"),
            text("order_id"),
            text("product_id"),
            text("category"),
            num("price"),
            num("quantity"),
            text("promo_code"),
            e.context.get("utm_source").cloned().unwrap_or(Value::Null),
        ];
        let mut got = row.clone();
        for i in [3, 4] {
            // JSON text compared as JSON (key order aside).
            got[i] = json!(
                serde_json::from_str::<Value>(got[i].as_str().unwrap())
                    .unwrap()
                    .to_string()
            );
        }
        assert_eq!(got, want, "event {}", e.id);
    }
    let state = app.store.load_clients(&[&ana]).await.unwrap()[&ana].clone();
    let c = &duck(
        &dir,
        &format!(
            "SELECT email, first_name, acquisition_channel, promo_code, marketing_consent, \
             epoch_us(registered_at), orders, spend, cart_adds, events, mails FROM {} \
             WHERE client_id = 'ana'",
            table("clients")
        ),
    )[0];
    let p = &state.profile;
    assert_eq!(
        c,
        &vec![
            json!(p.email),
            json!(p.first_name),
            json!(p.acquisition_channel),
            json!(p.promo_code),
            json!(p.marketing_consent),
            json!(p.registered_at.unwrap().timestamp_micros()),
            json!(state.stats.orders),
            json!(state.stats.spend),
            json!(state.stats.cart_adds),
            json!(state.stats.events.values().sum::<u64>()),
            json!(state.stats.mails),
        ]
    );
    assert_eq!(state.stats.orders, 2);

    // The README's queries run over the export and agree with it.
    for (name, q) in README_QUERIES {
        let rows = duck(&dir, q);
        // This history has no clients registered two years ago: the
        // question runs, and has no answer.
        assert_eq!(rows.is_empty(), name == "question", "{name}: {rows:?}");
        if name == "funnel" {
            assert_eq!(rows[0], vec![json!(1), json!(1), json!(1)], "ana's session");
        }
    }
    app.stop().await;
}

async fn an_incremental_run_adds_exactly_the_new_events_and_a_rerun_changes_nothing(
    backend: Backend,
) {
    let app = start(backend).await;
    let n = publish_history(&app).await;
    app.wait_events(n).await;
    let (dir, csv) = (app.dir.path().join("export"), app.dir.path().join("csv"));
    let first = export(&app, &dir, &[]);
    assert_eq!(first["from_seq"], json!(0));
    let last = first["to_seq"].as_i64().unwrap();
    assert!(last >= n as i64);
    export(&app, &csv, &["--format", "csv"]);

    for i in 0..30 {
        app.publish(&page_view(i, ["ana", "ben", "dan"][i % 3]))
            .await;
    }
    app.wait_events(n + 30).await;
    let second = export(&app, &dir, &[]);
    assert_eq!(
        second["from_seq"],
        json!(last),
        "starts where the first run got to"
    );
    assert_eq!(
        second["rows"]["events"],
        json!(30),
        "exactly the new events"
    );
    assert_eq!(second["rows"]["orders"], json!(0));
    let events = table("events");
    let all = duck(
        &dir,
        &format!("SELECT count(*), count(DISTINCT id) FROM {events}"),
    );
    assert_eq!(all[0], vec![json!(n + 30), json!(n + 30)], "no event twice");
    let stored = app.db.sql().await;
    let want = stored
        .scalar("SELECT count(*) FROM events WHERE stream_seq IS NOT NULL")
        .await;
    assert_eq!(want, (n + 30) as i64);
    // The snapshot tables are the current state, once.
    assert_eq!(
        count(&dir, &table("clients")),
        stored.scalar("SELECT count(*) FROM clients").await
    );

    // A run with nothing new, and a run of the same range again, rewrite
    // nothing and the very same files.
    let before = files(&dir);
    let again = export(&app, &dir, &[]);
    assert_eq!(again["rows"]["events"], json!(0));
    assert_eq!(files(&dir), before, "a run with nothing new");
    let range = export(&app, &dir, &["--since-seq", &last.to_string()]);
    assert_eq!(range["from_seq"], json!(last));
    assert_eq!(files(&dir), before, "the same range again");

    // From the start: the ranges are replaced by one, nothing doubles.
    let full = export(&app, &dir, &["--since-seq", "0"]);
    assert!(
        full["removed"].as_u64().unwrap() > 0,
        "the earlier ranges go"
    );
    assert_eq!(full["rows"]["events"], json!(n + 30));
    let all = duck(
        &dir,
        &format!("SELECT count(*), count(DISTINCT id) FROM {events}"),
    );
    assert_eq!(all[0], vec![json!(n + 30), json!(n + 30)]);
    let replaced = files(&dir);
    export(&app, &dir, &["--since-seq", "0"]);
    assert_eq!(files(&dir), replaced, "the same full range again");
    // A start inside an earlier range goes down to that range's start.
    let inside = export(&app, &dir, &["--since-seq", "5"]);
    assert_eq!(inside["from_seq"], json!(0));
    assert_eq!(files(&dir), replaced);
    let since = export(&app, &dir, &["--since", "2026-03-05T00:00:00Z"]);
    assert_eq!(since["from_seq"], json!(0), "inside the one range there is");

    // The CSV export, read by DuckDB too, then brought up to date.
    export(&app, &csv, &["--format", "csv"]);
    let csv_events = "read_csv('{dir}/events/*/*.csv', hive_partitioning = true, header = true)";
    let got = duck(
        &csv,
        &format!("SELECT count(*), count(DISTINCT id) FROM {csv_events}"),
    );
    assert_eq!(got[0], vec![json!(n + 30), json!(n + 30)]);
    let csv_orders = "read_csv('{dir}/orders/*/*.csv', hive_partitioning = true, header = true)";
    let totals = |d: &Path, from: &str| {
        duck(
            d,
            &format!(
                "SELECT CAST(date AS VARCHAR), channel, sum(total) FROM {from} GROUP BY ALL ORDER BY ALL"
            ),
        )
    };
    assert_eq!(totals(&csv, csv_orders), totals(&dir, &table("orders")));
    // A folder keeps its format.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(["export", "--format", "parquet", "--to"])
        .arg(&csv)
        .current_dir(app.dir.path())
        .env("NUDGE__DATABASE__URL", &app.db.url)
        .env("NUDGE__HISTORY__BUSINESS_TIMEZONE", TZ)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds a csv export"));
    // A folder that is not an export is left alone.
    let foreign = app.dir.path().join("foreign");
    std::fs::create_dir_all(foreign.join("clients")).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(["export", "--to"])
        .arg(&foreign)
        .current_dir(app.dir.path())
        .env("NUDGE__DATABASE__URL", &app.db.url)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an export folder"));
    assert!(foreign.join("clients").is_dir() && foreign.join("notes.txt").is_file());
    app.stop().await;
}

async fn an_erased_client_is_absent_and_does_not_come_back(backend: Backend) {
    let app = start(backend).await;
    let n = publish_history(&app).await;
    app.wait_events(n).await;
    app.wait_outbox_settled().await;
    let dir = app.dir.path().join("export");
    export(&app, &dir, &[]);
    let of_ana = |name: &str| count(&dir, &format!("{} WHERE client_id = 'ana'", table(name)));
    assert!(of_ana("events") > 0 && of_ana("orders") > 0 && of_ana("clients") == 1);
    assert!(of_ana("mails") > 0);

    let ana = ClientId::parse("ana").unwrap();
    assert!(app.store.erase_client(&ana, Utc::now()).await.unwrap());
    let after = export(&app, &dir, &[]);
    // Nothing new to export, but the files written before the erasure held
    // her: the run starts over without her.
    assert_eq!(after["from_seq"], json!(0));
    assert_eq!(after["restarted_for_erasure"], json!(true));
    for name in [
        "events",
        "orders",
        "order_items",
        "clients",
        "mails",
        "tasks",
    ] {
        assert_eq!(of_ana(name), 0, "ana in {name}");
    }
    let others = count(&dir, &table("events"));
    assert_eq!(
        others,
        app.db
            .sql()
            .await
            .scalar(
                "SELECT count(*) FROM events WHERE stream_seq IS NOT NULL AND client_id <> 'ana'"
            )
            .await
    );

    // Later runs, incremental or of the whole range, leave her out.
    app.publish(&page_view(1, "ben")).await;
    app.wait_events(n + 1).await;
    let later = export(&app, &dir, &[]);
    assert_eq!(later["restarted_for_erasure"], json!(false));
    assert_eq!(later["rows"]["events"], json!(1));
    export(&app, &dir, &["--since-seq", "0"]);
    for name in ["events", "orders", "clients", "mails"] {
        assert_eq!(of_ana(name), 0, "ana in {name} after later runs");
    }
    assert_eq!(count(&dir, &table("events")), others + 1);
    app.stop().await;
}

/// Exports while the daemon takes events in: each run exports exactly the
/// events of its range, whatever was committed meanwhile, and together
/// they hold each event once.
async fn exports_while_events_stream_in_hold_each_event_once(backend: Backend) {
    let app = start(backend).await;
    let dir = app.dir.path().join("export");
    let mut runs = Vec::new();
    for round in 0..3 {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
            .args(["export", "--json", "--to"])
            .arg(&dir)
            .current_dir(app.dir.path())
            .env("NUDGE__DATABASE__URL", &app.db.url)
            .env("NUDGE__HISTORY__BUSINESS_TIMEZONE", TZ)
            .env("NUDGE__LOG__LEVEL", "error")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        for i in 0..100 {
            app.publish(&page_view(
                round * 100 + i,
                ["ana", "ben", "cleo", "dan"][i % 4],
            ))
            .await;
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        runs.push(serde_json::from_slice::<Value>(&out.stdout).unwrap());
    }
    app.wait_events(300).await;
    runs.push(export(&app, &dir, &[]));
    let sql = app.db.sql().await;
    let mut at = 0;
    for r in &runs {
        let (from, to) = (
            r["from_seq"].as_i64().unwrap(),
            r["to_seq"].as_i64().unwrap(),
        );
        assert_eq!(from, at, "each run starts where the one before ended");
        let q =
            format!("SELECT count(*) FROM events WHERE stream_seq > {from} AND stream_seq <= {to}");
        assert_eq!(
            r["rows"]["events"].as_i64().unwrap(),
            sql.scalar(&q).await,
            "{r}"
        );
        at = to;
    }
    let all = duck(
        &dir,
        &format!(
            "SELECT count(*), count(DISTINCT id) FROM {}",
            table("events")
        ),
    );
    assert_eq!(all[0], vec![json!(300), json!(300)]);
    app.stop().await;
}

/// `export.schedule`: the daemon writes the export itself, and catches up
/// with new events at its next occurrence.
async fn the_daemon_exports_on_its_schedule(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("scheduled");
    let out_text = out.display().to_string();
    let app = TestEnv::with_env(
        backend,
        &[
            ("NUDGE__HISTORY__BUSINESS_TIMEZONE", TZ),
            ("NUDGE__EXPORT__SCHEDULE", "* * * * * *"),
            ("NUDGE__EXPORT__DIR", &out_text),
        ],
    )
    .await
    .start()
    .await;
    let n = publish_history(&app).await;
    app.wait_events(n).await;
    let last = app
        .db
        .sql()
        .await
        .scalar("SELECT max(stream_seq) FROM events")
        .await;
    crate::helpers::eventually(
        std::time::Duration::from_secs(20),
        "a scheduled export",
        || async {
            let text = std::fs::read_to_string(out.join("manifest.json")).ok()?;
            let m: Value = serde_json::from_str(&text).ok()?;
            (m["position"] == json!(last)).then_some(())
        },
    )
    .await;
    app.stop().await;
    assert_eq!(count(&out, &table("events")), n as i64);
    assert_eq!(count(&out, &table("orders")), orders().len() as i64);
}

backend_tests!(
    the_export_reads_back_in_duckdb_as_the_store_holds_it,
    an_incremental_run_adds_exactly_the_new_events_and_a_rerun_changes_nothing,
    an_erased_client_is_absent_and_does_not_come_back,
    the_daemon_exports_on_its_schedule,
    exports_while_events_stream_in_hold_each_event_once,
);

/// `nudge bench --export` on a small history adds up (no timing checked:
/// the target lives in the bench).
#[test]
fn the_export_bench_exports_every_event_in_both_formats() {
    crate::bench::build_bench();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args([
            "--config",
            "config.example.yaml",
            "bench",
            "--export",
            "--events",
            "5000",
            "--json",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("nudge runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(report["events"], 5000, "{report:#}");
    let runs = report["runs"].as_array().unwrap();
    let formats: Vec<&str> = runs.iter().map(|r| r["format"].as_str().unwrap()).collect();
    assert_eq!(formats, ["parquet", "csv"]);
    for r in runs {
        assert_eq!(r["events_rows"], 5000, "{report:#}");
        assert!(r["orders_rows"].as_u64().unwrap() > 0, "{report:#}");
        assert!(r["order_items_rows"].as_u64().unwrap() > 0, "{report:#}");
        assert!(r["secs"].as_f64().unwrap() > 0.0 && r["output_mib"].as_f64().unwrap() > 0.0);
        assert!(r["peak_mib"].as_f64().unwrap() > 0.0);
    }
}
