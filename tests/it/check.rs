//! `nudge check` and `nudge test` on broken rules and templates, as a
//! marketer runs them: each problem once, as `file:line: message`, a
//! non-zero exit, and `ok` only when all is; the configuration found as the
//! README says.

use std::path::Path;
use std::process::{Command, Output};

/// A project folder: the shipped rules and templates copied, then broken.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn shipped() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().unwrap();
        for sub in ["rules", "rules/tests", "templates"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
            for e in std::fs::read_dir(root.join(sub)).unwrap().flatten() {
                if e.path().is_file() {
                    std::fs::copy(e.path(), dir.path().join(sub).join(e.file_name())).unwrap();
                }
            }
        }
        std::fs::copy(
            root.join("config.example.yaml"),
            dir.path().join("example.yaml"),
        )
        .unwrap();
        Self { dir }
    }

    fn edit(&self, file: &str, from: &str, to: &str) {
        let p = self.dir.path().join(file);
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.contains(from), "{file} has no {from:?}");
        std::fs::write(&p, s.replacen(from, to, 1)).unwrap();
    }

    fn nudge(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nudge"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_remove("NUDGE_CONFIG")
            .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("nudge runs")
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn all(o: &Output) -> String {
    format!("{}{}", stdout(o), String::from_utf8_lossy(&o.stderr))
}

/// `nudge check` on a project with one change; returns its problem lines.
fn check_after(file: &str, from: &str, to: &str) -> (Output, Vec<String>) {
    let p = Project::shipped();
    p.edit(file, from, to);
    let out = p.nudge(&["check", "--config", "example.yaml"], &[]);
    let lines = all(&out)
        .lines()
        .filter(|l| l.starts_with("rules/") || l.starts_with("templates/"))
        .map(str::to_string)
        .collect();
    (out, lines)
}

fn assert_refused(out: &Output, lines: &[String], want: &[&str]) {
    let t = all(out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert_eq!(lines, want, "{t}");
    assert!(!t.contains("\x1b["), "no colour codes: {t}");
    assert!(!t.contains("ok:"), "{t}");
    assert!(t.contains(&format!("{} problem(s)", want.len())), "{t}");
}

#[test]
fn check_passes_the_shipped_project_and_says_which_config() {
    let p = Project::shipped();
    let out = p.nudge(&["check", "--config", "example.yaml"], &[]);
    assert!(out.status.success(), "{}", all(&out));
    assert_eq!(
        stdout(&out),
        "config: example.yaml (--config)\nok: 8 rules, 8 templates\n"
    );
    let out = p.nudge(&["check", "--json"], &[("NUDGE_CONFIG", "example.yaml")]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["config"], "example.yaml");
    assert_eq!(v["problems"], serde_json::json!([]));
}

#[test]
fn check_refuses_a_mail_of_a_template_that_does_not_exist() {
    let (out, lines) = check_after(
        "rules/browse_discount.rhai",
        "mail(\"browse_discount\"",
        "mail(\"browse_discont\"",
    );
    assert_refused(
        &out,
        &lines,
        &[
            "rules/browse_discount.rhai:47: mail(\"browse_discont\"): no such template (did you mean `browse_discount`?)",
        ],
    );
}

#[test]
fn check_refuses_a_typo_in_a_map_of_template_names() {
    let (out, lines) = check_after(
        "rules/welcome.rhai",
        "\"welcome_trial\"",
        "\"welcome_trail\"",
    );
    assert_refused(
        &out,
        &lines,
        &[
            "rules/welcome.rhai:25: `TEMPLATES` names template `welcome_trail`, which does not exist (did you mean `welcome_trial`?)",
        ],
    );
}

#[test]
fn check_refuses_a_function_that_does_not_exist() {
    let (out, lines) = check_after(
        "rules/idle_reminder.rhai",
        "remember(\"reminded_for\"",
        "remembr(\"reminded_for\"",
    );
    assert_refused(
        &out,
        &lines,
        &[
            "rules/idle_reminder.rhai:23: no function `remembr`: not in the rule API or Rhai's standard library (did you mean `remember`?)",
        ],
    );
}

#[test]
fn check_refuses_an_unknown_filter() {
    let (out, lines) = check_after(
        "templates/quick_leave.txt",
        "Hello {{ first_name }}",
        "Hello {{ first_name | shout }}",
    );
    assert_refused(
        &out,
        &lines,
        &["templates/quick_leave.txt:5: unknown filter `shout`"],
    );
}

#[test]
fn check_refuses_a_variable_no_mail_has() {
    let (out, lines) = check_after("templates/happy_client.txt", "{{ rank }}", "{{ rnak }}");
    assert_refused(
        &out,
        &lines,
        &[
            "templates/happy_client.txt:7: `rnak` is not a variable of this mail: not a standard one, \
           not declared under `vars:` in the front matter, not passed by the mail at \
           rules/happy_client.rhai:28 (did you mean `rank`?)",
        ],
    );
}

#[test]
fn check_refuses_a_bad_kind_with_one_line_number() {
    let (out, lines) = check_after("templates/welcome.txt", "kind: service", "kind: sevrice");
    assert_eq!(lines.len(), 1, "{}", all(&out));
    assert!(
        lines[0]
            .starts_with("templates/welcome.txt:3: front matter: kind: unknown variant `sevrice`"),
        "{lines:?}"
    );
    assert!(!lines[0].contains(" line "), "{lines:?}");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn test_explains_a_task_for_an_unknown_team_and_says_the_config() {
    let p = Project::shipped();
    // Without any configuration file: the built-in defaults, said so.
    let out = p.nudge(&["test"], &[]);
    let t = all(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.starts_with("config: built-in defaults"), "{t}");
    assert!(
        t.contains("why: rule vip_callback, client vic: task for team `sales` not made: no such team in `teams`"),
        "{t}"
    );
    assert!(t.contains("19 passed, 2 failed"), "{t}");

    // NUDGE_CONFIG, then ./nudge.yaml, are found.
    let out = p.nudge(&["test"], &[("NUDGE_CONFIG", "example.yaml")]);
    assert!(out.status.success(), "{}", all(&out));
    assert!(stdout(&out).starts_with("config: example.yaml (NUDGE_CONFIG)\n"));
    std::fs::copy(
        p.dir.path().join("example.yaml"),
        p.dir.path().join("nudge.yaml"),
    )
    .unwrap();
    let out = p.nudge(&["test", "--json"], &[]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["config"].as_str(), v["failed"].as_u64()),
        (Some("nudge.yaml"), Some(0)),
        "{v}"
    );
    assert_eq!(v["passed"], 21, "{v}");
}

#[test]
fn test_names_a_mail_of_a_template_that_does_not_exist() {
    let p = Project::shipped();
    p.edit(
        "rules/browse_discount.rhai",
        "mail(\"browse_discount\"",
        "mail(\"browse_discont\"",
    );
    let out = p.nudge(&["test", "--config", "example.yaml"], &[]);
    let t = all(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("rules/browse_discount.rhai:47: mail(\"browse_discont\"): no such template"),
        "{t}"
    );
    assert!(t.contains("fix them before testing"), "{t}");
}

/// `nudge preview RULE --client ID` runs the rule on the stored history
/// with nothing queued: idle_reminder's computed `idle_days` and the
/// client's real signed unsubscribe link are in the mail.
async fn a_rule_preview_shows_the_mail_with_computed_variables_and_a_real_unsubscribe_link(
    backend: crate::helpers::Backend,
) {
    use nudge::store::Outbox;
    let env = crate::helpers::TestEnv::new(backend).await;
    let store = nudge::app::open_store(&env.config).await.unwrap();
    let catalog = std::sync::Arc::new(nudge::flow::catalog::Catalog::load(&env.config));
    let pipeline = nudge::flow::pipeline::Pipeline::new(
        store.clone(),
        catalog,
        std::sync::Arc::new(nudge::metrics::Metrics::default()),
        &env.config,
    );
    let mut e = crate::helpers::registered_at("r-ivy", "ivy", &crate::helpers::ago(20 * 86_400));
    e["data"]["marketing_consent"] = serde_json::json!(true);
    e["data"]["first_name"] = serde_json::json!("Ivy");
    pipeline
        .process(&[nudge::flow::pipeline::Incoming {
            subject: "shop.events.client_registered".into(),
            payload: serde_json::to_vec(&e).unwrap().into(),
            stream_seq: Some(1),
            published: None,
        }])
        .await
        .unwrap();
    let outbox = store.list_outbox(100).await.unwrap().len();

    let at = chrono::Utc::now();
    let p = nudge::tools::preview_rule(&env.config, &store, "idle_reminder", "ivy", at)
        .await
        .unwrap();
    assert_eq!(p.mails.len(), 1, "{p:?}");
    let m = &p.mails[0];
    assert_eq!(m.template, "idle_reminder");
    assert!(
        m.rendered.text.contains("it has been 20 days"),
        "{}",
        m.rendered.text
    );
    let url = m.vars["unsubscribe_url"].as_str().unwrap();
    let prefix = format!(
        "{}/unsubscribe/",
        env.config.http.public_url.trim_end_matches('/')
    );
    assert!(url.starts_with(&prefix), "{url}");
    assert!(m.rendered.text.contains(url), "{}", m.rendered.text);
    let signer = nudge::delivery::unsubscribe::Signer::load(
        env.config
            .mail
            .unsubscribe_secret
            .as_ref()
            .map(|s| s.expose()),
        &store,
    )
    .await
    .unwrap();
    assert_eq!(
        signer.verify(&url[prefix.len()..]).map(|c| c.to_string()),
        Some("ivy".to_string())
    );
    // Nothing queued, nothing remembered: a second preview finds the same.
    assert_eq!(store.list_outbox(100).await.unwrap().len(), outbox);
    let again = nudge::tools::preview_rule(&env.config, &store, "idle_reminder", "ivy", at)
        .await
        .unwrap();
    assert_eq!(again.mails.len(), 1);
}

backend_tests!(a_rule_preview_shows_the_mail_with_computed_variables_and_a_real_unsubscribe_link);

/// The HTTP twin of the CLI preview: `GET /api/rules/{rule}/preview?client=ID&at=T`
/// (role marketer) answers the same mail, with idle_reminder's computed
/// `idle_days` and the client's real signed unsubscribe link, and queues
/// nothing; an unknown rule or client is a 404.
async fn a_rule_preview_over_http_shows_the_mail_and_a_real_unsubscribe_link(
    backend: crate::helpers::Backend,
) {
    use nudge::store::Outbox;
    let app = crate::helpers::TestApp::spawn(backend).await;
    let mut e = crate::helpers::registered_at("r-ivy", "ivy", &crate::helpers::ago(20 * 86_400));
    e["data"]["marketing_consent"] = serde_json::json!(true);
    e["data"]["first_name"] = serde_json::json!("Ivy");
    app.publish(&e).await;
    app.wait_events(1).await;
    app.wait_outbox_settled().await;
    let outbox = app.store.list_outbox(100).await.unwrap().len();

    let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let r = app
        .get(&format!(
            "/api/rules/idle_reminder/preview?client=ivy&at={at}"
        ))
        .await;
    assert_eq!(r.status(), 200);
    let p: serde_json::Value = r.json().await.unwrap();
    assert_eq!(p["rule"], "idle_reminder", "{p:#}");
    assert_eq!(p["client_id"], "ivy", "{p:#}");
    let mails = p["mails"].as_array().unwrap();
    assert_eq!(mails.len(), 1, "{p:#}");
    let m = &mails[0];
    assert_eq!(m["template"], "idle_reminder");
    let text = m["rendered"]["text"].as_str().unwrap();
    assert!(text.contains("it has been 20 days"), "{text}");
    assert!(
        m["rendered"]["subject"].as_str().unwrap().contains("Ivy"),
        "{m:#}"
    );
    assert!(
        m["rendered"]["html"].as_str().unwrap().contains("<html"),
        "{m:#}"
    );
    let url = m["vars"]["unsubscribe_url"].as_str().unwrap();
    let prefix = format!(
        "{}/unsubscribe/",
        app.config.http.public_url.trim_end_matches('/')
    );
    assert!(url.starts_with(&prefix), "{url}");
    assert!(text.contains(url), "{text}");
    let signer = nudge::delivery::unsubscribe::Signer::load(
        app.config
            .mail
            .unsubscribe_secret
            .as_ref()
            .map(|s| s.expose()),
        &app.store,
    )
    .await
    .unwrap();
    assert_eq!(
        signer.verify(&url[prefix.len()..]).map(|c| c.to_string()),
        Some("ivy".to_string())
    );
    assert!(p["log"].is_array() && p["other"].is_array(), "{p:#}");
    assert_eq!(app.store.list_outbox(100).await.unwrap().len(), outbox);

    let r = app.get("/api/rules/nope/preview?client=ivy").await;
    assert_eq!(r.status(), 404);
    let r = app
        .get("/api/rules/idle_reminder/preview?client=nobody")
        .await;
    assert_eq!(r.status(), 404);
}

backend_tests!(a_rule_preview_over_http_shows_the_mail_and_a_real_unsubscribe_link);
