//! Each shipped template, sent as nudge sends it, scores 0 or less in
//! SpamAssassin's local tests (`spamassassin -L -t`: no network, no DNS
//! blocklists). The mails are rendered as the sender renders them (subject
//! first, `lang`, the signed unsubscribe link), built with the sender's
//! headers (List-Unsubscribe for marketing, Auto-Submitted for staff) and
//! written by nudge's own mailer with `mail.transport: file`. A missing
//! `spamassassin` fails the test. `scripts/spamcheck.sh` runs it.

use nudge::config::Config;
use nudge::core::templates::{MailKind, TemplateLoader};
use nudge::delivery::mailer::{Envelope, Mailer, build_message, message_id};
use nudge::delivery::render_mail;
use nudge::delivery::unsubscribe::Signer;
use nudge::domain::event::ClientId;
use serde_json::{Map, Value, json};
use std::path::Path;
use std::process::Command;

/// Values as the shipped rules and the sender give them.
fn vars_for(template: &str) -> Map<String, Value> {
    let v = json!({
        "first_name": "Anna",
        "client_id": "c-1042",
        "rank": 3,
        "valid_days": 7,
        "code": "THANKYOU10",
        "also_bought": ["P-1001", "P-2040"],
        "promo_code": "SPRING24",
        "idle_days": 30,
        "team": "sales",
        "title": "Call back Anna about her order",
        "client_url": "https://nudge.shop.example/staff#client/c-1042",
        "data": {"order": "O-5531", "amount": "129.00 EUR"},
    });
    let mut vars = v.as_object().unwrap().clone();
    vars.insert("template".into(), template.into());
    vars
}

/// The `X-Spam-Status` header (unfolded) in `spamassassin -t`'s output.
fn status(out: &str) -> Option<String> {
    let mut lines = out.lines().skip_while(|l| !l.starts_with("X-Spam-Status:"));
    let mut s = lines.next()?.to_string();
    for l in lines.take_while(|l| l.starts_with([' ', '\t'])) {
        s.push(' ');
        s.push_str(l.trim());
    }
    Some(s)
}

/// `score=N` of an `X-Spam-Status` header.
fn score(status: &str) -> Option<f64> {
    let s = status.split("score=").nth(1)?;
    s.split_whitespace().next()?.parse().ok()
}

/// Runs `spamassassin -L -t` on a mail; its status header and report.
fn spamassassin(mail: std::fs::File) -> (String, String) {
    let sa = Command::new("spamassassin")
        .args(["-L", "-t", "-x", "--cf=bayes_auto_learn 0"])
        .stdin(mail)
        .output()
        .expect("spamassassin runs");
    let report = String::from_utf8_lossy(&sa.stdout).into_owned();
    let Some(st) = status(&report) else {
        panic!(
            "no X-Spam-Status from spamassassin: {}{report}",
            String::from_utf8_lossy(&sa.stderr)
        );
    };
    (st, report)
}

#[tokio::test]
async fn every_shipped_template_scores_zero_in_spamassassin() {
    let version = Command::new("spamassassin").arg("--version").output();
    let version = match version {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        other => {
            panic!("spamassassin is needed for this test (apt-get install spamassassin): {other:?}")
        }
    };
    eprintln!("{}", version.lines().next().unwrap_or_default());

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();

    // The rules are in force: a mail without Date and Message-ID, with a
    // link to a bare IP, scores above 0.
    let control = out.path().join("control.txt");
    std::fs::write(
        &control,
        "From: a@shop.example\nTo: b@client.example\nSubject: FREE!!! ACT NOW\n\n\
         Click http://192.0.2.7/ now, 100% free, guaranteed!\n",
    )
    .unwrap();
    let (st, _) = spamassassin(std::fs::File::open(&control).unwrap());
    std::fs::remove_file(&control).unwrap();
    assert!(score(&st).is_some_and(|s| s > 0.0), "control mail: {st}");
    let config = Config::load_with_env(
        Some(&root.join("config.example.yaml")),
        [
            ("NUDGE__MAIL__TRANSPORT".to_string(), "file".to_string()),
            (
                "NUDGE__MAIL__DIR".to_string(),
                out.path().display().to_string(),
            ),
            // Links in mails go to nudge's public address: a name, as in
            // any real deployment (a bare IP is a spam sign of its own).
            (
                "NUDGE__HTTP__PUBLIC_URL".to_string(),
                "https://nudge.shop.example".to_string(),
            ),
        ],
    )
    .expect("config.example.yaml loads");
    let mailer = Mailer::from_config(&config).unwrap();
    let from = config.smtp.from.clone();
    let signer = Signer::new(b"spam-check-key-of-thirty-two-byt".to_vec());
    let templates = TemplateLoader::new(root.join("templates")).load();
    let names: Vec<String> = templates.names().map(str::to_string).collect();
    assert_eq!(names.len(), 8, "the shipped templates: {names:?}");

    let client = ClientId::parse("c-1042").unwrap();
    let unsubscribe = signer.url(&config.http.public_url, &client);
    let mut failures = Vec::new();
    for name in &names {
        let mut vars = vars_for(name);
        vars.insert("unsubscribe_url".into(), unsubscribe.clone().into());
        let rendered = render_mail(&templates, name, vars).unwrap();
        let marketing = rendered.kind == MailKind::Marketing;
        if marketing {
            // The HTML part escapes the link's `/`: look for its token.
            let token = unsubscribe.rsplit('/').next().unwrap();
            assert!(
                rendered.text.contains(&unsubscribe) && rendered.html.contains(token),
                "{name}: a marketing mail has the unsubscribe link in both parts"
            );
        }
        let before: Vec<_> = std::fs::read_dir(out.path()).unwrap().flatten().collect();
        let message = build_message(
            &Envelope {
                from: &from,
                to: "Anna Example <anna@client.example>",
                message_id: &message_id(&format!("spam-{name}"), &from),
                rule: name,
                template: name,
                unsubscribe: marketing.then_some(unsubscribe.as_str()),
                staff: name == "staff_task",
            },
            &rendered,
        )
        .unwrap();
        mailer.send(message).await.unwrap();
        let eml = std::fs::read_dir(out.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| !before.iter().any(|b| &b.path() == p))
            .expect("the mailer wrote a file");
        let (st, report) = spamassassin(std::fs::File::open(&eml).unwrap());
        let s = score(&st).unwrap_or_else(|| panic!("{name}: no score in {st}"));
        eprintln!("{name}: {st}");
        if s > 0.0 {
            let hits = report
                .split("Content analysis details:")
                .nth(1)
                .unwrap_or(&report)
                .to_string();
            failures.push(format!("{name}: score {s}\n{hits}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
