//! What the export tests share: the history they publish, `nudge export`
//! run as a user runs it, and DuckDB (its Python package) to read the
//! export back; and the queries the README shows.

use crate::helpers::{Backend, TestApp, TestEnv, event, registered_at};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;

/// The business timezone of these tests: not UTC, so a day in it is not
/// the UTC day (and Tokyo has no daylight saving time to reason about).
pub(crate) const TZ: &str = "Asia/Tokyo";

pub(crate) async fn start(backend: Backend) -> TestApp {
    TestEnv::with_env(backend, &[("NUDGE__HISTORY__BUSINESS_TIMEZONE", TZ)])
        .await
        .start()
        .await
}

/// `nudge export --to DIR --json ARGS...` on the test's database: its report.
pub(crate) fn export(app: &TestApp, dir: &Path, args: &[&str]) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(["export", "--json", "--to"])
        .arg(dir)
        .args(args)
        .current_dir(app.dir.path())
        .env("NUDGE__DATABASE__URL", &app.db.url)
        .env("NUDGE__HISTORY__BUSINESS_TIMEZONE", TZ)
        .env("NUDGE__LOG__LEVEL", "warn")
        .output()
        .expect("nudge export runs");
    assert!(
        out.status.success(),
        "nudge export failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON report")
}

/// Runs `sql` in DuckDB, `{dir}` replaced by the export folder: the rows,
/// each value as JSON (times and dates as text).
pub(crate) fn duck(dir: &Path, sql: &str) -> Vec<Vec<Value>> {
    let python = std::env::var("NUDGE_TEST_PYTHON").unwrap_or("python3".into());
    let sql = sql.replace("{dir}", &dir.display().to_string());
    let out = std::process::Command::new(&python)
        .args([
            "-c",
            "import sys, json, duckdb\n\
             rows = duckdb.connect().execute(sys.argv[1]).fetchall()\n\
             print(json.dumps([list(r) for r in rows], default=str))",
        ])
        .arg(&sql)
        .output()
        .unwrap_or_else(|e| panic!("{python} must run (see .ci/run): {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named"),
        "the Python package duckdb must be installed for {python} (see .ci/run): {stderr}"
    );
    assert!(out.status.success(), "DuckDB refused {sql}: {stderr}");
    serde_json::from_slice(&out.stdout).expect("JSON rows")
}

pub(crate) fn count(dir: &Path, from: &str) -> i64 {
    duck(dir, &format!("SELECT count(*) FROM {from}"))[0][0]
        .as_i64()
        .unwrap()
}

/// The export's tables as DuckDB reads them.
pub(crate) fn table(name: &str) -> String {
    match name {
        "clients" | "counters" => format!("read_parquet('{{dir}}/{name}/*.parquet')"),
        _ => format!("read_parquet('{{dir}}/{name}/*/*.parquet', hive_partitioning = true)"),
    }
}

/// An order: `(client, at, channel, total, items as (product, quantity, price))`.
pub(crate) type Order = (
    &'static str,
    &'static str,
    &'static str,
    f64,
    Vec<(&'static str, f64, f64)>,
);

pub(crate) fn orders() -> Vec<Order> {
    vec![
        // 23:30 UTC is 08:30 the next day in Tokyo.
        (
            "ana",
            "2026-03-02T23:30:00Z",
            "online",
            120.5,
            vec![("p1", 2.0, 50.0), ("p2", 1.0, 20.5)],
        ),
        (
            "ana",
            "2026-03-03T01:00:00Z",
            "instore",
            40.0,
            vec![("p3", 1.0, 40.0)],
        ),
        (
            "ben",
            "2026-03-03T02:00:00Z",
            "online",
            99.0,
            vec![("p1", 1.0, 99.0)],
        ),
        ("ben", "2026-03-05T10:00:00Z", "phone", 310.0, vec![]),
        (
            "cleo",
            "2026-03-02T10:00:00Z",
            "online",
            15.25,
            vec![("p4", 3.0, 5.083333)],
        ),
    ]
}

/// Registrations, a browsing session with a cart add, and the orders;
/// returns the number of events published.
pub(crate) async fn publish_history(app: &TestApp) -> u64 {
    let mut n = 0;
    for (i, c) in ["ana", "ben", "cleo"].iter().enumerate() {
        let mut r = registered_at(&format!("r-{c}"), c, "2026-03-01T09:00:00Z");
        r["data"]["acquisition_channel"] = json!(["promo", "ads", "organic"][i]);
        app.publish(&r).await;
        n += 1;
    }
    for (k, ty) in ["product_viewed", "product_viewed", "cart_item_added"]
        .iter()
        .enumerate()
    {
        let e = event(
            &format!("b-ana-{k}"),
            ty,
            "ana",
            &format!("2026-03-02T23:0{k}:00Z"),
            json!({"product_id": "p1", "price": 50, "quantity": 2, "category": "shoes"}),
            json!({"session_id": "s-ana", "channel": "web", "utm_source": "news"}),
        );
        app.publish(&e).await;
        n += 1;
    }
    for (i, (client, at, channel, total, items)) in orders().into_iter().enumerate() {
        let items: Vec<Value> = items
            .iter()
            .map(|(p, q, price)| json!({"product_id": p, "name": format!("n-{p}"), "quantity": q, "price": price}))
            .collect();
        let e = event(
            &format!("o-{i}"),
            "order_placed",
            client,
            at,
            json!({"order_id": format!("o{i}"), "channel": channel, "total": total,
                   "currency": "EUR", "items": items, "promo_code": "SPRING"}),
            json!({"session_id": format!("s-{client}"), "channel": "web"}),
        );
        app.publish(&e).await;
        n += 1;
    }
    n
}

pub(crate) fn tokyo(at: &str) -> DateTime<chrono_tz::Tz> {
    let tz: chrono_tz::Tz = TZ.parse().unwrap();
    at.parse::<DateTime<Utc>>().unwrap().with_timezone(&tz)
}

/// The DuckDB queries the README shows, over an export in `{dir}`.
pub(crate) const README_QUERIES: [(&str, &str); 4] = [
    (
        "cohorts",
        "WITH o AS (SELECT client_id, count(*) AS orders, sum(total) AS spend \
           FROM read_parquet('{dir}/orders/*/*.parquet', hive_partitioning = true) GROUP BY client_id) \
         SELECT date_trunc('month', c.registered_at) AS cohort, c.acquisition_channel, \
           count(*) AS clients, count(o.client_id) AS buyers, \
           round(sum(o.spend) / sum(o.orders), 2) AS avg_order \
         FROM read_parquet('{dir}/clients/*.parquet') c LEFT JOIN o USING (client_id) \
         GROUP BY ALL ORDER BY ALL",
    ),
    (
        "channels",
        "SELECT channel, count(*) AS orders, sum(total) AS revenue, round(avg(total), 2) AS avg_order, \
           count(DISTINCT client_id) AS clients \
         FROM read_parquet('{dir}/orders/*/*.parquet', hive_partitioning = true) \
         WHERE date BETWEEN DATE '2026-01-01' AND DATE '2026-12-31' \
         GROUP BY channel ORDER BY revenue DESC",
    ),
    (
        "funnel",
        "WITH s AS (SELECT session_id, \
             bool_or(type = 'product_viewed') AS viewed, \
             bool_or(type = 'cart_item_added') AS carted, \
             bool_or(type = 'order_placed') AS ordered \
           FROM read_parquet('{dir}/events/*/*.parquet', hive_partitioning = true) \
           WHERE session_id IS NOT NULL GROUP BY session_id) \
         SELECT count(*) FILTER (viewed) AS viewed, \
           count(*) FILTER (viewed AND carted) AS carted, \
           count(*) FILTER (viewed AND carted AND ordered) AS ordered FROM s",
    ),
    (
        "question",
        "WITH o AS (SELECT * FROM read_parquet('{dir}/orders/*/*.parquet', hive_partitioning = true)), \
           c AS (SELECT * FROM read_parquet('{dir}/clients/*.parquet')), \
           loyal AS (SELECT client_id FROM o WHERE occurred_at >= now() - INTERVAL 6 MONTH \
             GROUP BY client_id HAVING count(*) > 1) \
         SELECT c.acquisition_channel, \
           round(avg(o.total) FILTER (o.date BETWEEN DATE '2026-01-05' AND DATE '2026-01-18'), 2) AS january, \
           round(avg(o.total) FILTER (o.date BETWEEN DATE '2026-09-07' AND DATE '2026-09-20'), 2) AS september \
         FROM o JOIN c USING (client_id) JOIN loyal USING (client_id) \
         WHERE o.promo_code IS NULL AND c.registered_at < now() - INTERVAL 2 YEAR \
         GROUP BY ALL ORDER BY ALL",
    ),
];

/// Every data file of an export (not the manifest, not hidden ones), with
/// its bytes' hash.
pub(crate) fn files(dir: &Path) -> BTreeMap<String, String> {
    use sha2::{Digest, Sha256};
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || name == "manifest.json" {
                continue;
            }
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                out.insert(
                    rel,
                    hex::encode(Sha256::digest(std::fs::read(&path).unwrap())),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

pub(crate) fn page_view(i: usize, client: &str) -> Value {
    event(
        &format!("pv-{client}-{i}"),
        "page_viewed",
        client,
        &format!("2026-03-{:02}T12:00:00Z", 1 + i % 20),
        json!({"url": format!("/p/{i}")}),
        json!({"session_id": format!("s-{client}-{}", i % 3)}),
    )
}
