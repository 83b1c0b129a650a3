//! `nudge bench --backtest`, run as a user would, on a small history: the
//! report must add up. No timing is checked: targets live in the bench.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

#[test]
fn the_backtest_bench_walks_every_event_and_reports_each_rule() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args([
            "--config",
            "config.example.yaml",
            "bench",
            "--backtest",
            "--events",
            "20000",
            "--json",
        ])
        .current_dir(root)
        .output()
        .expect("nudge runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));

    assert_eq!(report["events"], 20_000, "{report:#}");
    assert_eq!(
        report["clients"], 1_000,
        "one client per 20 events: {report:#}"
    );
    assert!(report["sweeps"].as_u64().unwrap() > 0, "{report:#}");
    assert!(
        report["events_per_sec"].as_f64().unwrap() > 0.0,
        "{report:#}"
    );
    assert!(
        report["backtest_secs"].as_f64().unwrap() > 0.0,
        "{report:#}"
    );
    assert!(report["peak_mib"].as_f64().unwrap() > 0.0, "{report:#}");
    assert_eq!(report["rule_errors"], 0, "{report:#}");

    // Every shipped rule has its line; the shop's new clients were welcomed.
    let effects = report["effects"].as_object().unwrap();
    for f in std::fs::read_dir(root.join("rules")).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|e| e == "rhai") {
            let rule = f.file_stem().unwrap().to_str().unwrap();
            assert!(effects.contains_key(rule), "no line for {rule}: {report:#}");
        }
    }
    assert!(
        effects["welcome"].as_u64().unwrap() > 0,
        "the shop's clients register: {report:#}"
    );
    let total: u64 = effects.values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(report["effects_total"].as_u64().unwrap(), total);
}
