//! The documentation of the configuration agrees with the code: every key
//! of [`Config`] is in README's configuration table and in
//! `config.example.yaml`, nothing else is, and every default written there
//! is `Config::default()`'s. The defaults are written once in the code
//! (each section's `Default`); this test is what keeps the two documents
//! from drifting from them.

use super::Config;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Keys whose value is a whole structure, documented as one key.
const OPAQUE: [&str; 2] = ["rules.settings", "mail.quiet_hours"];
/// Sections that are maps by a name the operator chooses: their entries'
/// keys are documented as `<name>`.
const NAMED: [&str; 5] = [
    "teams",
    "http.tokens",
    "ingest.segment",
    "ingest.track",
    "webhooks",
];
/// Keys the code has and the documents deliberately leave out: none today.
const UNDOCUMENTED: [(&str, &str); 0] = [];
/// Keys whose value in `config.example.yaml` is an example, not the
/// default (the file says so next to each).
const EXAMPLE_VALUES: [(&str, &str); 4] = [
    ("database.url", "a file under var/, next to the mail folder"),
    (
        "smtp.from",
        "a shop's sender: the default is only fit for tests",
    ),
    ("rules.settings", "the settings the example rules read"),
    (
        "teams.<name>.email",
        "teams the example rules hand tasks to",
    ),
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `key -> value` of every leaf of a configuration tree.
fn leaves(v: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) if !OPAQUE.contains(&prefix) => {
            for (k, v) in m {
                let k = if NAMED.contains(&prefix) { "<name>" } else { k };
                let key = if prefix.is_empty() {
                    k.to_string()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(v, &key, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

fn tree(v: &impl serde::Serialize) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    leaves(&serde_json::to_value(v).unwrap(), "", &mut out);
    out
}

/// The defaults, by key.
fn defaults() -> BTreeMap<String, Value> {
    tree(&Config::default())
}

/// Every key of the code's configuration: the defaults, plus one entry of
/// each named section (empty by default) to show the keys it takes.
fn code_keys() -> BTreeSet<String> {
    let sample = Config::load_with_env(
        None,
        [
            ("NUDGE__TEAMS__X__EMAIL", "x@shop.example"),
            ("NUDGE__HTTP__TOKENS__X__ROLE", "staff"),
            ("NUDGE__HTTP__TOKENS__X__TOKEN", "a-long-enough-token"),
            (
                "NUDGE__INGEST__SEGMENT__X__WRITE_KEY",
                "a-long-enough-write-key",
            ),
            ("NUDGE__INGEST__SEGMENT__X__TOKEN", "x"),
            ("NUDGE__INGEST__TRACK__X", "x_happened"),
            ("NUDGE__WEBHOOKS__X__URL", "https://crm.example/hooks"),
            (
                "NUDGE__WEBHOOKS__X__SECRET",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            ),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .unwrap();
    let mut keys: BTreeSet<String> = tree(&sample).into_keys().collect();
    for (key, _why) in UNDOCUMENTED {
        keys.remove(key);
    }
    keys
}

/// Numbers compare by value (`0` is `0.0`), the rest as JSON.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, a)| y.get(k).is_some_and(|b| same(a, b)))
        }
        _ => a == b,
    }
}

/// A YAML text as JSON.
fn yaml(text: &str) -> Value {
    serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(text).unwrap()).unwrap()
}

/// The text between backticks in a table cell.
fn quoted(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// README's configuration table: `key -> default cell`, one entry per key
/// (a row may name several: `mail.max_marketing_per_day`, `max_marketing_per_week`).
fn readme_table() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = text
        .split("\n## Configuration\n")
        .nth(1)
        .expect("README has a configuration section");
    let section = section.split("\n## ").next().unwrap();
    let mut rows = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        // Cells split at `|`, but not at an escaped `\|`.
        let line = line.replace("\\|", "\u{0}");
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (keys, default) = (quoted(cells[1]), cells[2]);
        let section = keys[0].split('.').next().unwrap();
        let values = quoted(default);
        assert!(
            values.is_empty() || values.len() == keys.len(),
            "README row {keys:?}: give one default per key"
        );
        for (i, key) in keys.iter().enumerate() {
            let key = if key.contains('.') {
                key.to_string()
            } else {
                format!("{section}.{key}")
            };
            let default = values
                .get(i)
                .map_or(default.to_string(), |v| format!("`{v}`"));
            rows.push((key, default));
        }
    }
    rows
}

/// A key the README leaves without a value (`unset`, `none`, `any`, ...)
/// defaults to nothing.
fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
        _ => false,
    }
}

#[test]
fn the_readme_table_lists_every_key_with_its_default() {
    let defaults = defaults();
    let rows = readme_table();
    assert!(rows.len() > 60, "README's table not found: {rows:?}");
    let documented: BTreeSet<String> = rows.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(documented.len(), rows.len(), "a key is in README twice");
    let code = code_keys();
    let missing: Vec<_> = code.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&code).collect();
    assert!(missing.is_empty(), "not in README's table: {missing:?}");
    assert!(
        unknown.is_empty(),
        "in README's table, not in the code: {unknown:?}"
    );
    for (key, cell) in rows {
        let Some(want) = defaults.get(&key) else {
            continue; // an entry of a named section: no default
        };
        match quoted(&cell).first() {
            Some(v) => assert!(
                same(&yaml(v), want),
                "README: {key} defaults to {cell}, the code to {want}"
            ),
            None => assert!(
                is_unset(want),
                "README: {key} defaults to {cell:?}, the code to {want}"
            ),
        }
    }
}

#[test]
fn the_example_config_names_every_key_with_its_default() {
    let text = std::fs::read_to_string(root().join("config.example.yaml")).unwrap();
    let defaults = defaults();
    let mut active = BTreeMap::new();
    leaves(&yaml(&text), "", &mut active);
    for (key, value) in &active {
        if EXAMPLE_VALUES.iter().any(|(k, _)| k == key) {
            continue;
        }
        let want = defaults.get(key).unwrap_or(&Value::Null);
        assert!(
            same(value, want),
            "config.example.yaml: {key} is {value}, the default {want}; \
             make it the default or list it in EXAMPLE_VALUES"
        );
    }
    // Keys without a default are shown commented out (`  # token: ...`):
    // uncommented, they must complete the file.
    let uncommented: String = text
        .lines()
        .map(|l| match l.split_once("# ") {
            Some((indent, rest))
                if indent.trim().is_empty()
                    && rest.trim_start().split_once(':').is_some_and(|(k, _)| {
                        k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) =>
            {
                format!("{indent}{rest}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect();
    let mut all = BTreeMap::new();
    leaves(&yaml(&uncommented), "", &mut all);
    let documented: BTreeSet<String> = all.into_keys().collect();
    let code = code_keys();
    let missing: Vec<_> = code.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&code).collect();
    assert!(
        missing.is_empty(),
        "not in config.example.yaml: {missing:?}"
    );
    assert!(
        unknown.is_empty(),
        "in config.example.yaml, not in the code: {unknown:?}"
    );
}
