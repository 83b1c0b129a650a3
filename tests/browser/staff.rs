//! The staff page end to end in headless Chromium: the test owns nats-server,
//! the SMTP sink and nudge, builds a client's history over NATS, and runs
//! `tests/browser/staff.mjs` (Playwright) against the page. The script
//! searches the client and checks their orders, says `READY_FOR_TASK`; the
//! test then publishes the third order of the month, which makes the shipped
//! `vip_callback` rule hand sales a task; the script sees it arrive live,
//! marks it done in the page and says `DONE <id>`; the test checks through
//! the API that the task is closed.
//!
//! Needs Node.js 20+, `npm ci --prefix tests/browser` and Chromium
//! (`/usr/bin/chromium`, or `CHROMIUM`): `.ci/run` installs them. A missing
//! one fails the test with how to install it.

use crate::helpers::{Backend, TestApp, TestEnv, ago, event, registered_at};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::Command;

const TOKEN: &str = "a-browser-test-token";

/// Everything the run takes; the script's own waits are 20 s each.
const DEADLINE: Duration = Duration::from_secs(120);

pub(crate) struct Tools {
    pub(crate) node: String,
    pub(crate) script: PathBuf,
    pub(crate) chromium: PathBuf,
}

/// Node, the script's packages and Chromium, or a panic saying how to
/// install what is missing.
pub(crate) fn tools() -> Tools {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let node = std::env::var("NUDGE_TEST_NODE").unwrap_or("node".into());
    let how = "the staff page's browser test needs Node.js 20+ (apt-get install nodejs npm), \
               its packages (npm ci --prefix tests/browser) and Chromium (apt-get install chromium); \
               .ci/run installs all three";
    let version = match std::process::Command::new(&node).arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Ok(out) => panic!("`{node} --version` failed ({}): {how}", out.status),
        Err(e) => panic!("cannot run `{node}` ({e}): {how}"),
    };
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(major >= 20, "node {version} is too old: {how}");
    assert!(
        dir.join("node_modules/playwright-core/package.json")
            .is_file(),
        "{} has no playwright-core: run `npm ci --prefix tests/browser` ({how})",
        dir.display()
    );
    let chromium = PathBuf::from(std::env::var("CHROMIUM").unwrap_or("/usr/bin/chromium".into()));
    assert!(
        chromium.is_file(),
        "no Chromium at {} (set CHROMIUM to another one): {how}",
        chromium.display()
    );
    Tools {
        node,
        script: dir.join("staff.mjs"),
        chromium,
    }
}

fn order(id: &str, client: &str, at: &str, channel: &str, items: Value, total: f64) -> Value {
    event(
        id,
        "order_placed",
        client,
        at,
        json!({"order_id": id, "channel": channel, "total": total, "currency": "EUR", "items": items}),
        json!({}),
    )
}

async fn api(app: &TestApp, path: &str) -> Value {
    let r = reqwest::Client::new()
        .get(format!("http://{}{path}", app.http))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "GET {path}: {}", r.status());
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staff_page_search_live_task_and_done_in_chromium() {
    let _alone = crate::ALONE.lock().await;
    let tools = tools();
    let app = TestEnv::with_env(Backend::Sqlite, &[("NUDGE__HTTP__TOKEN", TOKEN)])
        .await
        .start()
        .await;

    // Ada's history: registered, one order online (3 items), one in store.
    // All orders share one time, so the month count cannot straddle a month.
    let at = ago(0);
    let mut reg = registered_at("r-ada", "ada", &ago(3600));
    reg["data"]["first_name"] = json!("Ada");
    reg["data"]["last_name"] = json!("Lovelace");
    app.publish(&reg).await;
    app.publish(&order(
        "o1",
        "ada",
        &at,
        "online",
        json!([{"product_id": "lamp", "name": "Lamp", "quantity": 2, "price": 10},
               {"product_id": "vase", "name": "Vase", "quantity": 1, "price": 30}]),
        50.0,
    ))
    .await;
    app.publish(&order(
        "o2",
        "ada",
        &at,
        "instore",
        json!([{"product_id": "lamp", "name": "Lamp", "quantity": 1, "price": 10}]),
        10.0,
    ))
    .await;
    app.wait_events(3).await;
    let tasks = api(&app, "/api/tasks?status=all&client=ada").await;
    assert_eq!(tasks["tasks"], json!([]), "no task before the third order");

    let expect = json!({
        "query": "Lovelace",
        "client_id": "ada",
        "name": "Ada Lovelace",
        "orders": {
            "online": {"count": 1, "items": 3, "spent": "50.00 EUR"},
            "instore": {"count": 1, "items": 1, "spent": "10.00 EUR"},
        },
        "total_spent": "60.00 EUR",
        "task": "Call to thank Ada Lovelace",
        "orders_after": {
            "online": {"count": 2, "items": 4, "spent": "80.00 EUR"},
            "instore": {"count": 1, "items": 1, "spent": "10.00 EUR"},
        },
        "total_spent_after": "90.00 EUR",
    });
    // Kept after the run: the page at 360, 800 and 1280 px, for people to look at.
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/staff-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let started = Instant::now();
    let mut script = crate::Script::start(
        Command::new(&tools.node)
            .arg(&tools.script)
            .env("NUDGE_URL", format!("http://{}/", app.http))
            .env("NUDGE_TOKEN", TOKEN)
            .env("NUDGE_EXPECT", expect.to_string())
            .env("CHROMIUM", &tools.chromium)
            .env("NUDGE_SCREENSHOTS", &shots),
        DEADLINE,
    );
    let mut done = None;
    while let Some(line) = script.next().await {
        if line == "READY_FOR_TASK" {
            // The third order this month: vip_callback makes a task.
            app.publish(&order(
                "o3",
                "ada",
                &at,
                "online",
                json!([{"product_id": "vase", "name": "Vase", "quantity": 1, "price": 30}]),
                30.0,
            ))
            .await;
        } else if let Some(id) = line.strip_prefix("DONE ") {
            done = Some(id.to_string());
        }
    }
    let ended = script.end().await;
    ended.check(
        "staff page's browser",
        done.is_some(),
        "the script did not finish with DONE",
    );
    let stderr = &ended.stderr;
    let took = started.elapsed();
    println!("staff page in Chromium: {took:?}\n{stderr}");

    // The page's click really closed the task, and it was the one the rule made.
    let id = done.unwrap();
    let closed = api(&app, "/api/tasks?status=done&client=ada").await;
    let closed = closed["tasks"].as_array().unwrap();
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0]["id"], id.as_str());
    assert_eq!(closed[0]["rule"], "vip_callback");
    assert_eq!(closed[0]["team"], "sales");
    assert!(closed[0]["done_at"].is_string(), "{closed:?}");
    assert!(
        closed[0]["title"]
            .as_str()
            .unwrap()
            .starts_with("Call to thank Ada Lovelace"),
        "{closed:?}"
    );
    let open = api(&app, "/api/tasks?client=ada").await;
    assert_eq!(open["tasks"], json!([]));
    let c = api(&app, "/api/clients/ada").await;
    assert_eq!(c["tasks"], json!([]), "no open task in the 360 view");
    for width in [360, 800, 1280] {
        let shot = shots.join(format!("staff-{width}.png"));
        let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
        assert!(size > 10_000, "{} is missing or empty", shot.display());
    }
    assert_eq!(c["orders"]["online"]["count"], 2);
    app.stop().await;
}
