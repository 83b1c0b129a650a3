//! The source's shape, checked: the layers import only downwards, no two
//! modules import each other, and no file grows past what a reader holds.
//! It reads the `crate::` paths of every file under `src/`, so anyone can
//! run it (`cargo test --test it layers`) and it fails on the first edge
//! that goes the wrong way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers from the bottom up: each may import only those before it.
/// `domain` imports nothing else of nudge and `core` only the domain, so
/// the decision can be read and tested without any I/O.
const LAYERS: &[&str] = &[
    "domain",
    "core",
    "config",
    "telemetry",
    "store",
    "metrics",
    "flow",
    "delivery",
    "tools",
    "http",
    "app",
    "cli",
];

/// Lines of code (tests not counted) a file may hold.
const MAX_LINES: usize = 600;

fn sources() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
    out.sort();
    out
}

/// `src/flow/pipeline.rs` -> `flow::pipeline`; `src/store/mod.rs` -> `store`.
fn module_of(path: &Path) -> String {
    let rel = path
        .strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
        .unwrap();
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| {
            c.as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string()
        })
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts.join("::")
}

/// The code of a file without its comments and without its unit tests,
/// which may reach anywhere.
fn code_of(text: &str) -> String {
    let body = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    body.lines()
        .map(|l| match l.find("//") {
            Some(at) if !l[..at].contains('"') => &l[..at],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules of nudge a file's code names: `crate::a::b` paths, also
/// inside `use crate::{a::b, c}` groups.
fn imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let path: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                if !path.is_empty() {
                    found.insert(path);
                }
            }
        } else {
            let path: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            found.insert(path.trim_end_matches(':').to_string());
        }
    }
    found
}

/// The longest module of `known` that `path` starts with.
fn resolve(path: &str, known: &BTreeSet<String>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|m| known.contains(m))
}

fn layer_of(module: &str) -> &str {
    module.split("::").next().unwrap()
}

struct Graph {
    edges: BTreeMap<String, BTreeSet<String>>,
}

fn graph() -> Graph {
    let files = sources();
    let known: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    let mut edges = BTreeMap::new();
    for file in &files {
        let module = module_of(file);
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let targets: BTreeSet<String> = imports(&code)
            .iter()
            .filter_map(|p| resolve(p, &known))
            .filter(|t| *t != module)
            .collect();
        edges.insert(module, targets);
    }
    Graph { edges }
}

#[test]
fn layers_import_only_downwards_and_the_core_only_the_domain() {
    let g = graph();
    let mut wrong = Vec::new();
    for (from, targets) in &g.edges {
        let Some(own) = LAYERS.iter().position(|l| *l == layer_of(from)) else {
            // main.rs and lib.rs sit above every layer.
            assert!(
                from.is_empty() || from == "main",
                "{from} is in no layer: add its directory to LAYERS"
            );
            continue;
        };
        for to in targets {
            let below = LAYERS.iter().position(|l| *l == layer_of(to)).unwrap();
            if below > own {
                wrong.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(wrong.is_empty(), "imports going up the layers: {wrong:#?}");
    for (from, targets) in &g.edges {
        let allowed: &[&str] = match layer_of(from) {
            "domain" => &["domain"],
            "core" => &["domain", "core"],
            _ => continue,
        };
        for to in targets {
            assert!(
                allowed.contains(&layer_of(to)),
                "{from} imports {to}: {} may import only {allowed:?}",
                layer_of(from)
            );
        }
    }
}

#[test]
fn no_two_modules_import_each_other_even_through_others() {
    let g = graph();
    // A parent and its children are one unit: `mod.rs` declares them and
    // they use its items.
    let related =
        |a: &str, b: &str| a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"));
    let mut cycles = Vec::new();
    for start in g.edges.keys() {
        // Depth-first from `start`, looking for a way back to it.
        let mut stack: Vec<(String, Vec<String>)> = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((at, path)) = stack.pop() {
            for next in g.edges.get(&at).into_iter().flatten() {
                if related(&at, next) {
                    continue;
                }
                if next == start {
                    cycles.push(format!("{} -> {start}", path.join(" -> ")));
                } else if seen.insert(next.clone()) {
                    let mut p = path.clone();
                    p.push(next.clone());
                    stack.push((next.clone(), p));
                }
            }
        }
    }
    assert!(cycles.is_empty(), "import loops: {cycles:#?}");
}

#[test]
fn no_source_file_is_longer_than_a_reader_holds() {
    let long: Vec<String> = sources()
        .iter()
        .filter_map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            let code = match text.find("#[cfg(test)]\nmod tests") {
                Some(at) => &text[..at],
                None => &text,
            };
            let n = code.lines().count();
            (n > MAX_LINES).then(|| format!("{}: {n} lines", module_of(f)))
        })
        .collect();
    assert!(
        long.is_empty(),
        "files over {MAX_LINES} lines of code: {long:#?}"
    );
}

#[test]
fn the_import_reader_finds_groups_nested_paths_and_ignores_comments() {
    let code = code_of(
        "use crate::{domain::event::ClientId, store};\n\
         // use crate::http::Nothing;\n\
         let x = crate::flow::pipeline::Pipeline::new();\n",
    );
    let found = imports(&code);
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        vec![
            "domain::event::ClientId",
            "flow::pipeline::Pipeline::new",
            "store"
        ]
    );
    let known: BTreeSet<String> = ["domain", "domain::event", "flow::pipeline"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        resolve("domain::event::ClientId", &known).as_deref(),
        Some("domain::event")
    );
}
