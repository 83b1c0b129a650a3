//! What `nudge check` verifies beyond compiling: what each rule can reach.
//!
//! A rule compiles even when it mails a template that does not exist or
//! calls a function nobody registered: Rhai resolves both at run time, and
//! the mistake shows only as a mail never sent. This module walks each
//! compiled rule for
//!
//! - every function it calls (by name and number of arguments), against the
//!   rule API, Rhai's standard library and the script's own functions;
//! - every template name it can mail: a string in `mail(...)`, or the values
//!   of a constant map, array or string the name is taken from
//!   (`mail(TEMPLATES[x] ?? FALLBACK)`, also through a `let`);
//! - the variables it passes, when `mail`'s second argument is a map literal;
//!
//! and then checks the variables of each template a rule mails: each must be
//! one every mail of it has ([`STANDARD_VARS`], the front matter's `vars:`, or passed by every
//! rule that mails it). A name computed at run time cannot be checked here:
//! the decision core still refuses it, with a line in the client's log.

use crate::core::rules::loader::RuleSet;
use crate::core::rules::{CompileError, Rule, RuleEngine};
use crate::core::templates::{STANDARD_VARS, TASK_VARS, TemplateSet};
use rhai::{ASTNode, Dynamic, Expr, Stmt};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// The template staff task mails use (`delivery::TASK_TEMPLATE`).
const TASK_TEMPLATE: &str = crate::delivery::TASK_TEMPLATE;

/// Function-like keywords Rhai handles itself, with no registration.
const KEYWORDS: &[&str] = &[
    "print",
    "debug",
    "type_of",
    "Fn",
    "call",
    "curry",
    "is_shared",
    "is_def_var",
    "is_def_fn",
];

/// A `mail(...)` a rule can make.
#[derive(Debug, Clone, PartialEq)]
pub struct Mailing {
    /// The template name.
    pub template: String,
    /// The constant the name comes from, if not a literal in the call.
    pub via: Option<String>,
    /// The line of the `mail(...)` call.
    pub line: Option<usize>,
    /// The keys of the vars map, when it is a literal; `None`: not known.
    pub vars: Option<BTreeSet<String>>,
}

/// A call in a rule: name, number of arguments (the object of a method
/// call included), line.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    pub args: usize,
    pub line: Option<usize>,
}

/// What one rule reaches.
#[derive(Debug, Default)]
pub struct Reach {
    pub calls: Vec<Call>,
    pub mails: Vec<Mailing>,
}

/// Walks a compiled rule for its calls and the templates it can mail.
pub fn reach(rule: &Rule) -> Reach {
    let ast = &rule.ast;
    let consts: HashMap<String, Dynamic> = ast
        .iter_literal_variables(true, false)
        .map(|(n, _, v)| (n.to_string(), v))
        .collect();
    let mut lets: HashMap<String, Vec<Expr>> = HashMap::new();
    let mut calls = Vec::new();
    let mut mail_calls: Vec<(Vec<Expr>, Option<usize>)> = Vec::new();
    ast.walk(&mut |path: &[ASTNode]| {
        let Some(node) = path.last() else { return true };
        let (call, pos, method) = match node {
            ASTNode::Stmt(Stmt::Var(x, _, _)) => {
                lets.entry(x.0.name.to_string())
                    .or_default()
                    .push(x.1.clone());
                return true;
            }
            ASTNode::Stmt(Stmt::FnCall(x, pos)) | ASTNode::Expr(Expr::FnCall(x, pos)) => {
                (x, pos, false)
            }
            ASTNode::Expr(Expr::MethodCall(x, pos)) => (x, pos, true),
            _ => return true,
        };
        let name = call.name.as_str();
        // Operators (`+`, `==`, `!`) are calls too; Rhai has them all.
        if call.op_token.is_some() || !name.starts_with(|c: char| c.is_alphabetic() || c == '_') {
            return true;
        }
        calls.push(Call {
            name: name.to_string(),
            args: call.args.len() + usize::from(method),
            line: pos.line(),
        });
        if name == "mail" && !method {
            mail_calls.push((call.args.to_vec(), pos.line()));
        }
        true
    });
    let scope = Names {
        consts: &consts,
        lets: &lets,
    };
    let mut mails = Vec::new();
    for (args, line) in mail_calls {
        let Some(first) = args.first() else { continue };
        let vars = args.get(1).and_then(map_keys);
        let mut found = Vec::new();
        scope.templates(first, None, 0, &mut found);
        for (template, via) in found {
            mails.push(Mailing {
                template,
                via,
                line,
                vars: vars.clone(),
            });
        }
    }
    Reach { calls, mails }
}

/// The keys of a map literal.
fn map_keys(e: &Expr) -> Option<BTreeSet<String>> {
    match e {
        Expr::Map(x, _) => Some(x.1.keys().map(|k| k.to_string()).collect()),
        Expr::DynamicConstant(v, _) => v
            .read_lock::<rhai::Map>()
            .map(|m| m.keys().map(|k| k.to_string()).collect()),
        _ => None,
    }
}

/// The constants and `let`s of a rule, for following a template name back.
struct Names<'a> {
    consts: &'a HashMap<String, Dynamic>,
    lets: &'a HashMap<String, Vec<Expr>>,
}

impl Names<'_> {
    /// Collects the template names `e` can be, as far as they are constant.
    fn templates(
        &self,
        e: &Expr,
        via: Option<&str>,
        depth: usize,
        out: &mut Vec<(String, Option<String>)>,
    ) {
        // `let a = b; let b = a;` cannot loop: a name is followed a few times at most.
        if depth > 8 {
            return;
        }
        match e {
            Expr::StringConstant(s, _) => out.push((s.to_string(), via.map(str::to_string))),
            Expr::Coalesce(list, _) => {
                for x in list.iter() {
                    self.templates(x, via, depth + 1, out);
                }
            }
            Expr::Index(x, ..) => {
                // NAMES[key]: any value of the constant.
                if let Some((v, name)) = self.constant(&x.lhs) {
                    strings_in(&v, name.as_deref().or(via), out);
                }
            }
            Expr::Variable(x, ..) => {
                let name = x.1.as_str();
                if let Some(v) = self.consts.get(name) {
                    strings_in(v, Some(name), out);
                } else if let Some(inits) = self.lets.get(name) {
                    for init in inits {
                        self.templates(init, via, depth + 1, out);
                    }
                }
            }
            other => {
                if let Some(v) = other.get_literal_value(None) {
                    strings_in(&v, via, out);
                }
            }
        }
    }

    /// The value of a constant expression, with the constant's name.
    fn constant(&self, e: &Expr) -> Option<(Dynamic, Option<String>)> {
        match e {
            Expr::Variable(x, ..) => self
                .consts
                .get(x.1.as_str())
                .map(|v| (v.clone(), Some(x.1.to_string()))),
            other => other.get_literal_value(None).map(|v| (v, None)),
        }
    }
}

/// The strings in a string, an array or a map's values.
fn strings_in(v: &Dynamic, via: Option<&str>, out: &mut Vec<(String, Option<String>)>) {
    let via = via.map(str::to_string);
    if let Some(s) = v.read_lock::<rhai::ImmutableString>() {
        out.push((s.to_string(), via));
    } else if let Some(a) = v.read_lock::<rhai::Array>() {
        for x in a
            .iter()
            .filter_map(|x| x.read_lock::<rhai::ImmutableString>())
        {
            out.push((x.to_string(), via.clone()));
        }
    } else if let Some(m) = v.read_lock::<rhai::Map>() {
        for x in m
            .values()
            .filter_map(|x| x.read_lock::<rhai::ImmutableString>())
        {
            out.push((x.to_string(), via.clone()));
        }
    }
}

/// Every problem of rules and templates that compiled, sorted by file and line.
pub fn check(engine: &RuleEngine, rules: &RuleSet, templates: &TemplateSet) -> Vec<CompileError> {
    let functions = engine.functions();
    let refused: HashSet<String> = templates
        .errors
        .iter()
        .filter_map(|e| {
            std::path::Path::new(&e.file)
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string)
        })
        .collect();
    let mut problems = Vec::new();
    // Template -> (rule, file, mailing) of every rule that mails it.
    let mut mailers: BTreeMap<String, Vec<(String, Mailing)>> = BTreeMap::new();
    for rule in &rules.rules {
        let file = rule.path.display().to_string();
        let reach = reach(rule);
        let own: HashSet<(String, usize)> = rule
            .ast
            .iter_functions()
            .map(|f| (f.name.to_string(), f.params.len()))
            .collect();
        for c in &reach.calls {
            if let Some(message) = unknown_call(c, &functions, &own) {
                problems.push(problem(&file, c.line, message));
            }
        }
        for m in reach.mails {
            if !templates.contains(&m.template) && !refused.contains(&m.template) {
                let mut message = match &m.via {
                    Some(c) => format!(
                        "`{c}` names template `{}`, which does not exist",
                        m.template
                    ),
                    None => format!("mail(\"{}\"): no such template", m.template),
                };
                if let Some(near) = nearest(&m.template, templates.names()) {
                    message.push_str(&format!(" (did you mean `{near}`?)"));
                }
                problems.push(problem(&file, m.line, message));
                continue;
            }
            mailers
                .entry(m.template.clone())
                .or_default()
                .push((file.clone(), m));
        }
    }
    for name in templates.names() {
        let mut provided: HashSet<&str> = STANDARD_VARS.iter().copied().collect();
        if name == TASK_TEMPLATE {
            provided.extend(TASK_VARS);
        }
        if let Some(d) = templates.defaults(name) {
            provided.extend(d.keys().map(String::as_str));
        }
        // A template no rule mails sends nothing: its variables are checked
        // once a rule mails it (the shipped staff task template always is).
        let by = mailers.get(name).map(Vec::as_slice).unwrap_or(&[]);
        if by.is_empty() && name != TASK_TEMPLATE {
            continue;
        }
        for u in templates.uses(name) {
            if provided.contains(u.name.as_str()) {
                continue;
            }
            let missing: Vec<String> = by
                .iter()
                .filter(|(_, m)| m.vars.as_ref().is_none_or(|v| !v.contains(&u.name)))
                .map(|(file, m)| match m.line {
                    Some(l) => format!("{file}:{l}"),
                    None => file.clone(),
                })
                .collect();
            if !by.is_empty() && missing.is_empty() {
                continue;
            }
            let why = if by.is_empty() {
                "not set for staff task mails".to_string()
            } else {
                format!("not passed by the mail at {}", missing.join(", "))
            };
            let mut message = format!(
                "`{}` is not a variable of this mail: not a standard one, not declared \
                 under `vars:` in the front matter, {why}",
                u.name
            );
            let known = provided
                .iter()
                .map(|s| s.to_string())
                .chain(
                    by.iter()
                        .flat_map(|(_, m)| m.vars.iter().flatten().cloned()),
                )
                .collect::<Vec<_>>();
            if let Some(near) = nearest(&u.name, known.iter().map(String::as_str)) {
                message.push_str(&format!(" (did you mean `{near}`?)"));
            }
            problems.push(problem(&u.file, u.line, message));
        }
    }
    problems.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    problems.dedup();
    problems
}

fn problem(file: &str, line: Option<usize>, message: String) -> CompileError {
    CompileError {
        file: file.to_string(),
        line,
        column: None,
        message,
    }
}

/// Why a call cannot be made, if it cannot.
fn unknown_call(
    c: &Call,
    functions: &HashMap<String, BTreeSet<usize>>,
    own: &HashSet<(String, usize)>,
) -> Option<String> {
    if KEYWORDS.contains(&c.name.as_str()) || own.contains(&(c.name.clone(), c.args)) {
        return None;
    }
    match functions.get(&c.name) {
        Some(arities) if arities.contains(&c.args) => None,
        Some(arities) => {
            let list: Vec<String> = arities.iter().map(|n| n.to_string()).collect();
            Some(format!(
                "`{}` takes {} argument(s), not {}",
                c.name,
                list.join(" or "),
                c.args
            ))
        }
        None if own.iter().any(|(n, _)| *n == c.name) => Some(format!(
            "`{}` is defined in this file with another number of arguments than {}",
            c.name, c.args
        )),
        None => {
            let mut m = format!(
                "no function `{}`: not in the rule API or Rhai's standard library",
                c.name
            );
            let names = functions
                .keys()
                .map(String::as_str)
                .chain(own.iter().map(|(n, _)| n.as_str()));
            if let Some(near) = nearest(&c.name, names) {
                m.push_str(&format!(" (did you mean `{near}`?)"));
            }
            Some(m)
        }
    }
}

/// The closest of `names` to `word`, within two edits.
fn nearest<'a>(word: &str, names: impl Iterator<Item = &'a str>) -> Option<String> {
    names
        .filter(|n| *n != word && !n.contains('$'))
        .map(|n| (edits(word, n), n))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, n)| n.to_string())
}

/// Levenshtein distance.
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RulesConfig;
    use crate::core::rules::loader::RuleLoader;
    use crate::core::templates::TemplateLoader;
    use std::path::Path;
    use std::sync::Arc;

    struct Project {
        dir: tempfile::TempDir,
    }

    impl Project {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("rules")).unwrap();
            std::fs::create_dir(dir.path().join("templates")).unwrap();
            Self { dir }
        }
        fn rule(&self, name: &str, src: &str) -> &Self {
            let p = self.dir.path().join("rules").join(format!("{name}.rhai"));
            std::fs::write(p, src).unwrap();
            self
        }
        fn template(&self, name: &str, txt: &str) -> &Self {
            let t = self.dir.path().join("templates");
            std::fs::write(t.join(format!("{name}.txt")), txt).unwrap();
            std::fs::write(t.join(format!("{name}.html")), "<p>{{ first_name }}</p>").unwrap();
            self
        }
        /// Every problem, as `file:line: message` with the folder cut off.
        fn problems(&self) -> Vec<String> {
            let engine = Arc::new(RuleEngine::new(&RulesConfig::default()));
            let root = self.dir.path();
            let rules = RuleLoader::new(engine.clone(), root.join("rules")).load();
            let templates = TemplateLoader::new(root.join("templates")).load();
            let mut all: Vec<CompileError> = rules.errors.clone();
            all.extend(templates.errors.clone());
            all.extend(check(&engine, &rules, &templates));
            let prefix = format!("{}/", root.display());
            all.iter()
                .map(|e| e.to_string().replace(&prefix, ""))
                .collect()
        }
    }

    const HELLO: &str = "---\nsubject: Hi\n---\nHello {{ first_name }}\n";

    #[test]
    fn the_shipped_rules_and_templates_have_no_problem() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let engine = Arc::new(RuleEngine::new(&RulesConfig::default()));
        let rules = RuleLoader::new(engine.clone(), root.join("rules")).load();
        let templates = TemplateLoader::new(root.join("templates")).load();
        assert!(rules.errors.is_empty() && templates.errors.is_empty());
        assert_eq!(check(&engine, &rules, &templates), vec![]);
        // The welcome rule's map of names is followed to every template in it.
        let welcome = reach(rules.get("welcome").unwrap());
        let mut names: Vec<&str> = welcome.mails.iter().map(|m| m.template.as_str()).collect();
        names.sort();
        assert_eq!(names, ["welcome", "welcome_promo", "welcome_trial"]);
    }

    #[test]
    fn a_missing_template_is_named_with_the_line_of_the_mail() {
        let p = Project::new();
        p.template("browse_discount", HELLO)
            .rule("b", "const ON = [\"a\"];\n\nmail(\"browse_discont\");\n");
        assert_eq!(
            p.problems(),
            [
                "rules/b.rhai:3: mail(\"browse_discont\"): no such template (did you mean `browse_discount`?)"
            ]
        );
    }

    #[test]
    fn a_typo_in_a_map_of_template_names_is_found() {
        let p = Project::new();
        p.template("welcome", HELLO)
            .template("welcome_promo", HELLO)
            .rule(
                "w",
                "const ON = [\"a\"];\nconst TEMPLATES = #{ promo: \"welcome_prmo\" };\n\
                 const FALLBACK = \"welcome\";\nlet t = TEMPLATES[client.channel] ?? FALLBACK;\n\
                 mail(t, #{});\n",
            );
        assert_eq!(
            p.problems(),
            [
                "rules/w.rhai:5: `TEMPLATES` names template `welcome_prmo`, which does not exist (did you mean `welcome_promo`?)"
            ]
        );
    }

    #[test]
    fn a_function_that_does_not_exist_is_refused() {
        let p = Project::new();
        p.template("t", HELLO).rule(
            "r",
            "const ON = [\"a\"];\nfn own(x) { x }\nlet n = own(1).to_string();\n\
             let s = \"a\"; s.trim();\nremembr(\"k\", 1);\nmail(\"t\", #{}, 3);\n",
        );
        assert_eq!(
            p.problems(),
            [
                "rules/r.rhai:5: no function `remembr`: not in the rule API or Rhai's standard library (did you mean `remember`?)",
                "rules/r.rhai:6: `mail` takes 1 or 2 argument(s), not 3",
            ]
        );
    }

    #[test]
    fn an_unknown_filter_is_refused_with_its_line() {
        let p = Project::new();
        p.template(
            "t",
            "---\nsubject: Hi\n---\nHello\n{{ first_name | shout }}\n",
        )
        .template(
            "u",
            "---\nsubject: Hi\n---\n{{ first_name | upper | title }}\n",
        );
        assert_eq!(p.problems(), ["templates/t.txt:5: unknown filter `shout`"]);
    }

    #[test]
    fn a_variable_no_mail_has_is_refused_unless_passed_or_declared() {
        let p = Project::new();
        p.template(
            "happy",
            "---\nsubject: \"{{ first_name }}\"\n---\nyou are our {{ rnak }}th client\n",
        )
        .template(
            "declared",
            "---\nsubject: Hi\nvars: {days: 0}\n---\nit has been {{ days }} days, {{ rank }}\n",
        )
        .rule(
            "h",
            "const ON = [\"a\"];\nmail(\"happy\", #{ rank: 99 });\nmail(\"declared\", #{ rank: 1 });\n",
        );
        assert_eq!(
            p.problems(),
            [
                "templates/happy.txt:4: `rnak` is not a variable of this mail: not a standard one, \
                 not declared under `vars:` in the front matter, not passed by the mail at \
                 rules/h.rhai:2 (did you mean `rank`?)"
            ]
        );
    }

    #[test]
    fn a_bad_kind_is_refused_with_one_line_number() {
        let p = Project::new();
        p.template("t", "---\nsubject: Hi\nkind: sevrice\n---\nHello\n");
        let problems = p.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0]
                .starts_with("templates/t.txt:3: front matter: kind: unknown variant `sevrice`"),
            "{problems:?}"
        );
        assert!(!problems[0].contains("line "), "{problems:?}");
    }
}
