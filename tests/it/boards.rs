//! Boards: a day of contact-centre sales over NATS, ranked by the shipped
//! `sales_leaderboard` rule, must give the ranking a reference computation
//! here gives, overall and per team, per day, week and month; redelivered
//! sales count once; the live feed says what changed; a replay rebuilds the
//! boards exactly.

use crate::helpers::{
    Backend, Sql, TestApp, TestEnv, daemon_vars, event, eventually, spawn_daemon,
};
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

/// The day of the sales, and other days of its month (and one before it).
const DAY: &str = "2026-11-10";
const SAME_MONTH: [&str; 2] = ["2026-11-03", "2026-11-20"];
const MONTH_BEFORE: &str = "2026-10-31";

/// A phone sale by `consultant` of `team`.
fn sale(id: &str, client: &str, at: &str, consultant: &str, team: &str, total: f64) -> Value {
    event(
        id,
        "order_placed",
        client,
        at,
        json!({"order_id": id, "channel": "phone", "total": total, "currency": "EUR",
               "items": [], "consultant": consultant, "team": team}),
        json!({}),
    )
}

fn consultant(i: usize) -> (String, String) {
    (format!("Consultant {i:02}"), format!("team-{}", i % 4 + 1))
}

/// The sales: `(event, date)`, in publishing order. A small LCG makes the
/// amounts (quarters of a euro: exact in binary, so sums do not depend on
/// their order) and who sold; consultants 39 and 40 tie on the day.
fn sales() -> Vec<(Value, &'static str)> {
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    };
    let mut out = Vec::new();
    for k in 0..480 {
        let date = match k % 8 {
            0 => SAME_MONTH[0],
            1 => SAME_MONTH[1],
            2 if k % 16 == 2 => MONTH_BEFORE,
            _ => DAY,
        };
        let (name, team) = consultant(next(38) as usize + 1);
        let total = (next(4000) + 1) as f64 * 0.25;
        let at = format!("{date}T{:02}:{:02}:00Z", 8 + next(10), next(60));
        out.push((
            sale(
                &format!("s{k}"),
                &format!("k{}", k % 97),
                &at,
                &name,
                &team,
                total,
            ),
            date,
        ));
    }
    for i in [39, 40] {
        let (name, team) = consultant(i);
        out.push((
            sale(
                &format!("tie{i}"),
                "k-tie",
                &format!("{DAY}T12:00:00Z"),
                &name,
                &team,
                100.0,
            ),
            DAY,
        ));
    }
    out
}

/// The ranking the API must give, computed here: per member the sum of
/// their sales in the period (of the team only, when given), best first,
/// ties by name and sharing a rank.
fn reference(sales: &[(Value, &str)], dates: &[&str], team: Option<&str>) -> Vec<Value> {
    let mut sums: BTreeMap<String, (String, f64)> = BTreeMap::new();
    for (e, date) in sales {
        let d = &e["data"];
        if !dates.contains(date) || team.is_some_and(|t| d["team"] != t) {
            continue;
        }
        let s = sums
            .entry(d["consultant"].as_str().unwrap().to_string())
            .or_insert((d["team"].as_str().unwrap().to_string(), 0.0));
        s.1 += d["total"].as_f64().unwrap();
    }
    let mut lines: Vec<_> = sums.into_iter().collect();
    lines.sort_by(|a, b| b.1.1.total_cmp(&a.1.1).then(a.0.cmp(&b.0)));
    let mut out: Vec<Value> = Vec::new();
    for (i, (member, (team, score))) in lines.into_iter().enumerate() {
        let rank = match out.last() {
            Some(prev) if prev["score"].as_f64() == Some(score) => prev["rank"].as_u64().unwrap(),
            _ => i as u64 + 1,
        };
        out.push(
            json!({"rank": rank, "member": member, "label": member, "group": team, "score": score}),
        );
    }
    out
}

async fn ranking(app: &TestApp, query: &str) -> Value {
    let r = app.get(&format!("/api/boards/sales?{query}")).await;
    assert_eq!(r.status(), 200, "{query}");
    r.json().await.unwrap()
}

/// Every board counter, as stored.
async fn board_rows(url: &str) -> Vec<Vec<Option<String>>> {
    let sql = Sql::connect(url).await;
    let rows = sql
        .rows(
            "SELECT name, period, CAST(value AS TEXT), CAST(version AS TEXT) FROM counters \
             WHERE substr(name, 1, 6) = 'board:' ORDER BY name, period",
        )
        .await;
    sql.close().await;
    rows
}

async fn a_day_of_phone_sales_ranks_like_the_reference(backend: Backend) {
    let env = TestEnv::new(backend).await;
    // Sweeps run at wall-clock times the back-dated sales do not follow.
    std::fs::remove_file(env.rules_dir().join("idle_reminder.rhai")).unwrap();
    let app = env.start().await;
    let sales = sales();
    let (early, late) = sales.split_at(sales.len() / 2);
    for (e, _) in early {
        app.publish(e).await;
    }
    // Redelivered with other broker ids (the back office sent them twice):
    // they must count once. Published before the rest, so once every
    // distinct sale is stored, these were decided too.
    for (e, _) in early.iter().step_by(25) {
        let id = format!("again-{}", e["id"].as_str().unwrap());
        app.publish_raw("order_placed", &id, serde_json::to_vec(e).unwrap())
            .await;
    }
    // Orders that are no phone sales by a consultant rank nobody.
    let mut online = sale(
        "web1",
        "k1",
        &format!("{DAY}T09:00:00Z"),
        "Consultant 01",
        "team-2",
        9999.0,
    );
    online["data"]["channel"] = json!("online");
    let mut nobody = sale(
        "ph1",
        "k2",
        &format!("{DAY}T09:00:00Z"),
        "",
        "team-1",
        9999.0,
    );
    nobody["data"].as_object_mut().unwrap().remove("consultant");
    app.publish(&online).await;
    app.publish(&nobody).await;
    for (e, _) in late {
        app.publish(e).await;
    }
    app.wait_events(sales.len() as u64 + 2).await;

    let day = ranking(&app, &format!("at={DAY}&limit=500")).await;
    assert_eq!(day["board"], "sales");
    assert_eq!(
        (day["period"].as_str(), day["start"].as_str()),
        (Some("day"), Some(DAY))
    );
    let want = reference(&sales, &[DAY], None);
    assert_eq!(want.len(), 40, "every consultant sold that day");
    assert_eq!(day["entries"], json!(want), "the day's ranking");
    let tie: Vec<&Value> = want
        .iter()
        .filter(|e| e["member"] == "Consultant 39" || e["member"] == "Consultant 40")
        .collect();
    assert_eq!(tie[0]["rank"], tie[1]["rank"], "equal scores share a rank");

    let mut month_days = vec![DAY];
    month_days.extend(SAME_MONTH);
    let month = ranking(&app, &format!("period=month&at={DAY}&limit=500")).await;
    assert_eq!(month["start"], "2026-11-01");
    assert_eq!(
        month["entries"],
        json!(reference(&sales, &month_days, None)),
        "the month"
    );
    for t in 1..=4 {
        let team = format!("team-{t}");
        let got = ranking(&app, &format!("at={DAY}&group={team}&limit=500")).await;
        assert_eq!(
            got["entries"],
            json!(reference(&sales, &[DAY], Some(&team))),
            "{team}, day"
        );
        assert_eq!(got["entries"].as_array().unwrap().len(), 10);
        let got = ranking(
            &app,
            &format!("period=month&at=2026-11-30&group={team}&limit=500"),
        )
        .await;
        assert_eq!(
            got["entries"],
            json!(reference(&sales, &month_days, Some(&team))),
            "{team}, month"
        );
    }
    // 2026-11-10 is a Tuesday: its week holds only that day's sales.
    let week = ranking(&app, "period=week&at=2026-11-15&limit=500").await;
    assert_eq!(week["start"], "2026-11-09");
    assert_eq!(week["entries"], day["entries"]);
    let top = ranking(&app, &format!("at={DAY}&limit=3")).await;
    assert_eq!(top["entries"], json!(want[..3]));
    assert_eq!(ranking(&app, "at=2026-11-11").await["entries"], json!([]));
    // The rows behind a ranking (the wall page ranks feed changes from them)
    // add up to it, member by member, and keep to the group asked for.
    for group in ["", "team-2"] {
        let got = ranking(
            &app,
            &format!("at={DAY}&limit=500&parts=true&group={group}"),
        )
        .await;
        let mut sums: std::collections::BTreeMap<String, f64> = Default::default();
        for p in got["parts"].as_array().expect("parts") {
            assert!(group.is_empty() || p["group"] == group, "{p}");
            *sums
                .entry(p["member"].as_str().unwrap().into())
                .or_default() += p["score"].as_f64().unwrap();
        }
        let entries = got["entries"].as_array().unwrap();
        assert_eq!(sums.len(), entries.len(), "{group:?}");
        for e in entries {
            let sum = sums[e["member"].as_str().unwrap()];
            assert!(
                (sum - e["score"].as_f64().unwrap()).abs() < 1e-6,
                "{e}: {sum}"
            );
        }
    }
    assert!(
        ranking(&app, &format!("at={DAY}"))
            .await
            .get("parts")
            .is_none()
    );

    let boards: Value = app.get("/api/boards").await.json().await.unwrap();
    assert_eq!(
        boards["boards"],
        json!([{"board": "sales", "last_day": SAME_MONTH[1]}])
    );
    for bad in [
        "period=year",
        "at=10/11/2026",
        "limit=0",
        "limit=501",
        "limit=ten",
        "parts=yes",
        "group=",
    ] {
        let r = app.get(&format!("/api/boards/sales?{bad}")).await;
        if bad == "group=" {
            assert_eq!(r.status(), 200, "an empty group is no filter");
            continue;
        }
        assert_eq!(r.status(), 400, "{bad}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().len() > 10, "{bad}: {body}");
    }
    assert_eq!(app.get("/api/boards/no%3Asuch").await.status(), 400);

    // The live feed says what a new sale changed.
    let feed = reqwest::get(format!("http://{}/api/live", app.http))
        .await
        .unwrap();
    let mut body = feed.bytes_stream();
    let (name, team) = consultant(7);
    let before = day["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["member"] == name)
        .unwrap()["score"]
        .as_f64()
        .unwrap();
    app.publish(&sale(
        "live1",
        "k5",
        &format!("{DAY}T18:00:00Z"),
        &name,
        &team,
        12.5,
    ))
    .await;
    let line = tokio::time::timeout(Duration::from_secs(10), async {
        let mut text = String::new();
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if let Some(at) = text.find("event: board\ndata: ") {
                let rest = &text[at + "event: board\ndata: ".len()..];
                if let Some(end) = rest.find('\n') {
                    return serde_json::from_str::<Value>(&rest[..end]).unwrap();
                }
            }
        }
        panic!("the live feed ended: {text}")
    })
    .await
    .expect("a board line on the live feed");
    assert_eq!(
        line["board"],
        json!({"board": "sales", "period": "day", "key": DAY, "member": name,
               "group": team, "label": name, "score": before + 12.5})
    );

    // A replay rebuilds the boards exactly.
    app.wait_events(sales.len() as u64 + 3).await;
    let env = app.stop().await;
    let url = env.config.database.url.expose().to_string();
    let live = board_rows(&url).await;
    assert!(live.len() > 40 * 3, "{}", live.len());
    let store = nudge::app::open_store(&env.config).await.unwrap();
    nudge::tools::replay(&env.config, &store, |_| {})
        .await
        .unwrap();
    let replayed = board_rows(&url).await;
    let values = |rows: &[Vec<Option<String>>]| -> Vec<Vec<Option<String>>> {
        rows.iter().map(|r| r[..3].to_vec()).collect()
    };
    assert_eq!(
        values(&live),
        values(&replayed),
        "replay rebuilds the boards"
    );
}

/// Three `nudge run` processes share the stream (on SQLite one consumes and
/// the others stand by): the boards are as exact as with one.
async fn three_instances_rank_the_same_sales_exactly(backend: Backend) {
    let env = TestEnv::new(backend).await;
    std::fs::remove_file(env.rules_dir().join("idle_reminder.rhai")).unwrap();
    env.create_stream().await;
    let vars = daemon_vars(
        &env,
        &[
            ("NUDGE__HTTP__LISTEN", "127.0.0.1:0"),
            // Small batches, several in flight: instances race for the
            // same board rows all the time.
            ("NUDGE__NATS__BATCH_SIZE", "10"),
            ("NUDGE__DATABASE__MAX_CONNECTIONS", "4"),
        ],
    );
    let _daemons: Vec<_> = (0..3).map(|_| spawn_daemon(&vars)).collect();
    let sales = sales();
    for (e, _) in &sales {
        env.publish(e).await;
    }
    let store = nudge::app::open_store(&env.config).await.unwrap();
    eventually(Duration::from_secs(120), "every sale stored", || async {
        use nudge::store::History;
        (store.count_events().await.ok()? >= sales.len() as u64).then_some(())
    })
    .await;
    use nudge::domain::boards::{family, rank_rows};
    use nudge::store::Boards;
    // The last batch may still be committing its board rows with its events:
    // they are one transaction, so the rows are there with the events.
    for (kind, key, dates) in [
        ("day", DAY, vec![DAY]),
        ("month", "2026-11", vec![DAY, SAME_MONTH[0], SAME_MONTH[1]]),
    ] {
        let rows = store.board_rows(&family("sales", kind, key)).await.unwrap();
        let got = serde_json::to_value(rank_rows(&rows, None, 500)).unwrap();
        assert_eq!(got, json!(reference(&sales, &dates, None)), "{kind}");
    }
}

backend_tests!(
    a_day_of_phone_sales_ranks_like_the_reference,
    three_instances_rank_the_same_sales_exactly,
);
