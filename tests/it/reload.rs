//! Rules change on disk while nudge runs.

use crate::helpers::{Backend, TestApp, eventually, registered};
use nudge::store::Staff;
use serde_json::Value;
use std::time::Duration;

const WELCOME_ALL_AS_TRIAL: &str = r#"
const ON = ["client_registered"];
mail("welcome_trial", #{ first_name: client.first_name });
"#;

async fn rules_api(app: &TestApp) -> Value {
    app.get("/api/rules").await.json().await.unwrap()
}

async fn has_rule(app: &TestApp, name: &str) -> bool {
    let r = rules_api(app).await;
    r["rules"]
        .as_array()
        .is_some_and(|rules| rules.iter().any(|x| x["name"] == name))
}

async fn an_edited_rule_takes_effect_and_a_broken_one_is_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let file = app.rules_dir().join("welcome.rhai");

    std::fs::write(&file, WELCOME_ALL_AS_TRIAL).unwrap();
    // The reload poll runs every 100 ms; 2 s is the promise to marketers.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    app.publish(&registered("e-1", "kim", "organic", "Kim"))
        .await;
    let mails = app.wait_mails(1).await;
    assert_eq!(
        mails[0].header("X-Nudge-Template").as_deref(),
        Some("welcome_trial")
    );

    // A broken save is refused with file:line; the last good version runs on.
    std::fs::write(
        &file,
        "const ON = [\"client_registered\"];\nmail(\"welcome\"\n",
    )
    .unwrap();
    let errors = eventually(Duration::from_secs(5), "the refusal", || async {
        let r = rules_api(&app).await;
        let e = r["errors"].as_array()?.clone();
        (!e.is_empty()).then_some(e)
    })
    .await;
    let msg = errors[0].as_str().unwrap();
    assert!(msg.contains("welcome.rhai:3"), "{msg}");
    app.publish(&registered("e-2", "lea", "organic", "Lea"))
        .await;
    let mails = app.wait_mails(2).await;
    let lea = mails.iter().find(|m| m.to == "lea@example.com").unwrap();
    assert_eq!(
        lea.header("X-Nudge-Template").as_deref(),
        Some("welcome_trial")
    );

    // A new rule file is picked up; deleting it removes it.
    let extra = app.rules_dir().join("extra.rhai");
    std::fs::write(
        &extra,
        "const ON = [\"client_registered\"];\nmail(\"welcome\");\n",
    )
    .unwrap();
    eventually(Duration::from_secs(5), "the new rule", || async {
        has_rule(&app, "extra").await.then_some(())
    })
    .await;
    std::fs::remove_file(&extra).unwrap();
    eventually(Duration::from_secs(5), "the deleted rule gone", || async {
        (!has_rule(&app, "extra").await).then_some(())
    })
    .await;
    app.stop().await;
}

async fn a_rule_that_loops_forever_is_stopped_and_the_others_go_on(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    std::fs::write(
        app.rules_dir().join("aaa_loop.rhai"),
        "const ON = [\"client_registered\"];\nlet n = 0;\nloop { n += 1; }\n",
    )
    .unwrap();
    eventually(
        Duration::from_secs(5),
        "the looping rule loaded",
        || async { has_rule(&app, "aaa_loop").await.then_some(()) },
    )
    .await;
    app.publish(&registered("e-1", "max", "promo", "Max")).await;
    let mails = app.wait_mails(1).await;
    assert_eq!(
        mails[0].header("X-Nudge-Template").as_deref(),
        Some("welcome_promo")
    );

    let r = rules_api(&app).await;
    let looping = r["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "aaa_loop")
        .unwrap()
        .clone();
    assert_eq!(looping["errors"], 1, "{r}");
    let client = nudge::domain::event::ClientId::parse("max").unwrap();
    let log = app.store.client_log(&client, 10).await.unwrap();
    let err = log
        .iter()
        .find(|l| l.rule.as_deref() == Some("aaa_loop"))
        .expect("the failure is in the client's process log");
    assert!(err.message.contains("too many operations"), "{err:?}");
    assert_eq!(err.event_id.as_ref().unwrap().as_str(), "e-1");
    app.stop().await;
}

backend_tests!(
    an_edited_rule_takes_effect_and_a_broken_one_is_refused,
    a_rule_that_loops_forever_is_stopped_and_the_others_go_on,
);
