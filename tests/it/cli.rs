//! The `nudge` command line, run as a user would.

use crate::helpers::{Backend, TestEnv, start_nats};
use std::path::Path;
use std::process::{Command, Output};

fn nudge(args: &[&str], env: &[(&str, String)]) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nudge"));
    cmd.args(args).current_dir(root);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("nudge runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_shipped_rules_pass_their_tests() {
    let out = nudge(&["test", "--config", "config.example.yaml"], &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains(" passed, 0 failed"), "{t}");
    assert!(t.contains("ok   rules/tests/welcome.yaml"), "{t}");
}

#[test]
fn a_failing_rule_test_says_what_was_expected_and_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wrong.yaml");
    std::fs::write(
        &file,
        r#"
tests:
  - name: promo expected as trial
    now: 2026-11-20T10:00:00Z
    events:
      - type: client_registered
        client: ana
        data: {email: ana@example.com, first_name: Ana, acquisition_channel: promo}
    expect:
      mails:
        - {template: welcome_trial, to: ana@example.com}
"#,
    )
    .unwrap();
    let out = nudge(
        &[
            "test",
            "--config",
            "config.example.yaml",
            file.to_str().unwrap(),
        ],
        &[],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("FAIL") && t.contains("wrong.yaml › promo expected as trial"),
        "{t}"
    );
    assert!(
        t.contains("- expected mail welcome_trial to ana@example.com"),
        "{t}"
    );
    assert!(
        t.contains("+ got mail welcome_promo to ana@example.com (rule welcome)"),
        "{t}"
    );
    assert!(t.contains("0 passed, 1 failed"), "{t}");
}

#[test]
fn check_refuses_a_broken_rule_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.rhai"),
        "const ON = [\"client_registered\"];\n\nlet x = ;\n",
    )
    .unwrap();
    let env = [("NUDGE__RULES__DIR", dir.path().display().to_string())];
    let out = nudge(&["check", "--config", "config.example.yaml"], &env);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("broken.rhai:3:"), "{t}");

    let out = nudge(&["check", "--config", "config.example.yaml"], &[]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_bad_config_is_refused_naming_the_key() {
    let env = [("NUDGE__NATS__BATCH_SIZE", "lots".to_string())];
    let out = nudge(&["check", "--config", "config.example.yaml"], &env);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("nats.batch_size"), "{t}");
}

async fn publish_then_run_then_list_rejected_then_stop_on_sigterm(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let nats = start_nats();
    let d = env.dir.path().display().to_string();
    let events = env.dir.path().join("events.jsonl");
    std::fs::write(
        &events,
        r#"{"id": "p-1", "type": "client_registered", "client_id": "zoe", "occurred_at": "2026-11-20T10:00:00Z", "data": {"email": "zoe@example.com", "first_name": "Zoe"}}
# comments and blank lines are allowed

{"id": "p-2", "type": "page_viewed", "client_id": "zoe", "occurred_at": "2026-11-20T10:01:00Z", "data": {"url": "/"}, "context": {"session_id": "s"}}
"#,
    )
    .unwrap();
    let vars = vec![
        ("NUDGE__NATS__URL", nats.url()),
        ("NUDGE__DATABASE__URL", env.db.url.clone()),
        ("NUDGE__MAIL__TRANSPORT", "file".to_string()),
        ("NUDGE__MAIL__DIR", format!("{d}/mail")),
        (
            "NUDGE__HTTP__LISTEN",
            format!("127.0.0.1:{}", crate::helpers::free_port()),
        ),
    ];
    let out = nudge(
        &[
            "publish",
            events.to_str().unwrap(),
            "--config",
            "config.example.yaml",
        ],
        &vars,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("published 2 events"), "{}", text(&out));

    // A malformed line is refused with its line number, and nothing is published.
    std::fs::write(&events, "{\"id\": \"x\"}\n").unwrap();
    let out = nudge(
        &[
            "publish",
            events.to_str().unwrap(),
            "--config",
            "config.example.yaml",
        ],
        &vars,
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("events.jsonl:1"), "{}", text(&out));

    // A raw malformed message straight onto the stream.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.publish("shop.events.order_placed", "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let mut daemon = Command::new(env!("CARGO_BIN_EXE_nudge"));
    daemon
        .args(["run", "--config", "config.example.yaml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in &vars {
        daemon.env(k, v);
    }
    if std::env::var("TEST_LOG").is_err() {
        daemon.stderr(std::process::Stdio::null());
    }
    let mut child = daemon.spawn().unwrap();
    let mail_dir = env.dir.path().join("mail");
    crate::helpers::eventually(
        std::time::Duration::from_secs(30),
        "the welcome .eml file",
        || async {
            let n = std::fs::read_dir(&mail_dir)
                .ok()?
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
                .count();
            (n == 1).then_some(())
        },
    )
    .await;

    // SIGTERM: a clean exit.
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit after SIGTERM: {status}");

    let out = nudge(&["rejected", "--config", "config.example.yaml"], &vars);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("shop.events.order_placed") && t.contains("not a JSON object"),
        "{t}"
    );
}

backend_tests!(publish_then_run_then_list_rejected_then_stop_on_sigterm,);

/// Every command that reports takes `--json`: a replay of an empty log
/// says so as one JSON object on stdout (its progress stays on stderr).
#[test]
fn replay_reports_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("r.db").display());
    let env = [("NUDGE__DATABASE__URL", db)];
    let out = nudge(&["migrate", "--config", "config.example.yaml"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let out = nudge(
        &["replay", "--json", "--config", "config.example.yaml"],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("one JSON object on stdout ({e}): {}", text(&out)));
    assert_eq!(v["events"], 0, "{v}");
    assert_eq!(v["from_stream"], false, "{v}");
}
