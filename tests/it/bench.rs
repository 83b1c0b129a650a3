//! The bench (`bench/`, the `nudge-bench` program) as a user runs it,
//! through `nudge bench`, and the shop it publishes: `nudge bench
//! --backtest` on a small history must add up (no timing is checked: targets
//! live in the bench), and every event of the kit's workload must be one
//! nudge accepts.

use chrono::{Duration, Utc};
use nudge_kit::workload::{Shape, generate, render};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds `nudge-bench` next to the `nudge` under test (same target folder,
/// same profile) and returns its path. `cargo test --all-targets` at the
/// root has built it already (the build is then a no-op); `cargo test -p
/// nudge` alone would leave it missing or stale.
pub fn build_bench() -> PathBuf {
    let nudge = Path::new(env!("CARGO_BIN_EXE_nudge"));
    let profile_dir = nudge.parent().expect("nudge is in a profile folder");
    let target_dir = profile_dir.parent().expect("in a target folder");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args(["build", "--quiet", "-p", "nudge-bench", "--target-dir"])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some(profile) => {
            build.args(["--profile", profile]);
        }
        None => panic!("no profile folder in {}", nudge.display()),
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "cargo build -p nudge-bench: {status}");
    let bench = nudge.with_file_name(format!("nudge-bench{}", std::env::consts::EXE_SUFFIX));
    assert!(bench.is_file(), "{} was not built", bench.display());
    bench
}

#[test]
fn the_backtest_bench_walks_every_event_and_reports_each_rule() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    build_bench();
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

#[test]
fn without_nudge_bench_beside_it_nudge_bench_says_how_to_build_it() {
    // A hard link (next to the target folder, on its file system) is a
    // nudge of its own path without copying the binary.
    let nudge = Path::new(env!("CARGO_BIN_EXE_nudge"));
    let dir = tempfile::tempdir_in(nudge.parent().unwrap()).unwrap();
    let lone = dir.path().join("nudge");
    std::fs::hard_link(nudge, &lone)
        .or_else(|_| std::fs::copy(nudge, &lone).map(drop))
        .unwrap();
    let out = Command::new(&lone)
        .args(["bench", "--events", "10"])
        .output()
        .expect("nudge runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("nudge-bench") && stderr.contains("cargo build --release -p nudge-bench"),
        "{stderr}"
    );
}

/// The kit's shop (which speaks JSON, not nudge's types) is valid as nudge
/// parses it: every kind of event, from both shapes the bench publishes.
#[test]
fn every_event_of_the_kits_workload_is_a_valid_envelope() {
    for (register, tag) in [(true, "s"), (false, "live")] {
        let shape = Shape {
            clients: 50,
            register,
            tag,
        };
        let specs = generate(2000, &shape, 7, Utc::now(), Duration::days(7));
        for (i, s) in specs.iter().enumerate() {
            let v = render(s, &format!("ev-{i}"), tag, None);
            let bytes = serde_json::to_vec(&v).unwrap();
            nudge::domain::event::Envelope::parse(&bytes, 64 * 1024)
                .unwrap_or_else(|e| panic!("{v}: {e}"));
        }
    }
}
