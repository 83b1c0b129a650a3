//! The wall board in headless Chromium: 15 screens of `/boards/sales` open
//! at once with a staff token; a phone sale published over NATS must show
//! on all of them within a second (the p99 is printed), the changed row
//! flashes, and every page reconnects by itself after nudge restarts. The
//! test owns nats-server and nudge; `tests/browser/wall.mjs` (Playwright)
//! drives the pages. Needs what the staff page's browser test needs
//! ([`crate::staff`]).

use crate::helpers::{Backend, TestApp, TestEnv, ago, event, free_port};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::process::Command;

const TOKEN: &str = "a-wall-board-admin-token";
const STAFF: &str = "a-wall-board-staff-token";
const PAGES: usize = 15;
const DEADLINE: Duration = Duration::from_secs(180);

fn sale(id: &str, consultant: &str, team: &str, total: f64) -> Value {
    event(
        id,
        "order_placed",
        &format!("client-{id}"),
        &ago(0),
        json!({"order_id": id, "channel": "phone", "total": total, "currency": "EUR",
               "items": [], "consultant": consultant, "team": team}),
        json!({}),
    )
}

fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

/// The `q` quantile of `v` (nearest rank).
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

fn times(line: &str, prefix: &str) -> Vec<f64> {
    serde_json::from_str(line.strip_prefix(prefix).unwrap()).unwrap()
}

async fn env(port: u16) -> TestEnv {
    let listen = format!("127.0.0.1:{port}");
    TestEnv::with_env(
        Backend::Sqlite,
        &[
            ("NUDGE__HTTP__LISTEN", listen.as_str()),
            ("NUDGE__HTTP__TOKEN", TOKEN),
            ("NUDGE__HTTP__TOKENS__WALL__ROLE", "staff"),
            ("NUDGE__HTTP__TOKENS__WALL__TOKEN", STAFF),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifteen_wall_boards_show_a_sale_within_a_second_and_reconnect() {
    let _alone = crate::ALONE.lock().await;
    let tools = crate::staff::tools();
    let script = tools.script.with_file_name("wall.mjs");
    let port = free_port();
    let mut app: Option<TestApp> = Some(env(port).await.start().await);
    {
        let app = app.as_ref().unwrap();
        // Ana sells for two teams: overall she counts once, with both.
        app.publish(&sale("s0", "Ana", "west", 20.0)).await;
        app.publish(&sale("s1", "Ana", "east", 100.0)).await;
        app.publish(&sale("s2", "Ben", "west", 50.0)).await;
        app.wait_events(3).await;
    }

    let mut script = crate::Script::start(
        Command::new(&tools.node)
            .arg(&script)
            .env("NUDGE_URL", format!("http://127.0.0.1:{port}/"))
            .env("NUDGE_TOKEN", STAFF)
            .env("BOARD", "sales")
            .env("MEMBER", "Ben")
            .env("SCORES", "[150, 151]")
            .env("PAGES", PAGES.to_string())
            .env("CHROMIUM", &tools.chromium),
        DEADLINE,
    );
    let mut published = 0.0;
    let (mut shown, mut fed, mut reconnected) = (None, None, None);
    while let Some(line) = script.next().await {
        if line == "READY" {
            published = now_ms();
            app.as_ref()
                .unwrap()
                .publish(&sale("s3", "Ben", "west", 100.0))
                .await;
        } else if line.starts_with("SHOWN ") {
            shown = Some(times(&line, "SHOWN "));
        } else if line.starts_with("FED ") {
            fed = Some(times(&line, "FED "));
        } else if line == "RESTART" {
            // nudge stops (the pages lose their feed) and starts again on
            // the same port and database; then a sale comes in.
            let env = app.take().unwrap().stop().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let restarted = env.start().await;
            restarted.publish(&sale("s4", "Ben", "west", 1.0)).await;
            app = Some(restarted);
        } else if line.starts_with("RECONNECTED ") {
            reconnected = Some(times(&line, "RECONNECTED "));
        }
    }
    let ended = script.end().await;
    ended.check(
        "wall board",
        reconnected.is_some(),
        "the script did not reconnect",
    );
    let stderr = &ended.stderr;
    let latencies: Vec<f64> = shown
        .expect("SHOWN")
        .iter()
        .map(|t| t - published)
        .collect();
    assert_eq!(latencies.len(), PAGES);
    let feed: Vec<f64> = fed.expect("FED").iter().map(|t| t - published).collect();
    assert_eq!(feed.len(), PAGES, "every page's feed brought the sale");
    let (p50, p99) = (quantile(&latencies, 0.5), quantile(&latencies, 0.99));
    println!(
        "wall board: a sale on {PAGES} pages: p50 {p50:.0} ms, p99 {p99:.0} ms (max {:.0} ms); \
         its feed line p50 {:.0} ms, p99 {:.0} ms\n{stderr}",
        quantile(&latencies, 1.0),
        quantile(&feed, 0.5),
        quantile(&feed, 0.99),
    );
    assert!(
        p99 < 1000.0,
        "a sale took {p99:.0} ms (p99) to show: {latencies:?}"
    );
    assert_eq!(reconnected.unwrap().len(), PAGES);

    // The API agrees with what the pages drew.
    let app = app.unwrap();
    let r = reqwest::Client::new()
        .get(format!("http://{}/api/boards/sales?group=west", app.http))
        .bearer_auth(STAFF)
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["entries"][0]["member"], "Ben");
    assert_eq!(body["entries"][0]["score"], 151.0);
    app.stop().await;
}
