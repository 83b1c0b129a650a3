//! Mail templates: `templates/NAME.txt` (front matter with the subject and the
//! kind of mail, then the text part) and `templates/NAME.html` (the HTML
//! part), rendered with minijinja. HTML is escaped by default; the subject is
//! kept to one line so nothing from an event can add a header.
//!
//! The front matter may declare variables with defaults (`vars: {rank: 99}`):
//! a mail gets them unless its rule passes its own, and `nudge check` accepts
//! a template's variable only when every mail of it will have one (see
//! [`STANDARD_VARS`] and `rules::check`). A filter the environment does not
//! know refuses the template at load, with its line.

use minijinja::{Environment, Value as JinjaValue};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::core::rules::CompileError;
use crate::core::texts::split_front_matter;

/// `service` mail (welcome, account) or `marketing` mail (reminders, offers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MailKind {
    Service,
    #[default]
    Marketing,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FrontMatter {
    subject: String,
    #[serde(default)]
    kind: MailKind,
    /// Variables every mail of this template has, with their defaults.
    #[serde(default)]
    vars: serde_json::Map<String, serde_json::Value>,
}

/// Variables every mail has before its rule's own: those of
/// `decide::mail_defaults`, and what the sender adds: the unsubscribe link,
/// and for the HTML part the language (`lang`, from the client's locale)
/// and the rendered `subject` (its `<title>`).
pub const STANDARD_VARS: &[&str] = &[
    "client_id",
    "email",
    "first_name",
    "last_name",
    "acquisition_channel",
    "promo_code",
    "timezone",
    "unsubscribe_url",
    "lang",
    "subject",
];

/// The variables of a staff task mail (`templates/staff_task.*`), set by the sender.
pub const TASK_VARS: &[&str] = &[
    "team",
    "title",
    "client_id",
    "client_url",
    "data",
    "lang",
    "subject",
];

/// A variable a template reads from its context, and where first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarUse {
    pub name: String,
    pub file: String,
    pub line: Option<usize>,
}

/// The sources of one template, as last read without error.
#[derive(Debug, Clone)]
struct Source {
    subject: String,
    kind: MailKind,
    text: String,
    html: String,
    /// Front-matter defaults (`vars:`).
    defaults: serde_json::Map<String, serde_json::Value>,
    /// Variables the three parts read, in file order.
    uses: Vec<VarUse>,
}

/// A mail ready to send.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
    pub kind: MailKind,
}

/// The templates in force, swapped as a whole on reload.
pub struct TemplateSet {
    env: Environment<'static>,
    kinds: BTreeMap<String, MailKind>,
    /// Per template: front-matter defaults and the variables it reads.
    vars: BTreeMap<String, (serde_json::Map<String, serde_json::Value>, Vec<VarUse>)>,
    pub errors: Vec<CompileError>,
    /// Text-message templates (`NAME.sms`), loaded from the same directory.
    pub texts: crate::core::texts::TextSet,
}

impl std::fmt::Debug for TemplateSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateSet")
            .field("templates", &self.kinds.keys().collect::<Vec<_>>())
            .field("errors", &self.errors)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("no template named `{0}`")]
    Unknown(String),
    #[error("template `{name}` failed to render: {source}")]
    Failed {
        name: String,
        #[source]
        source: minijinja::Error,
    },
}

impl TemplateSet {
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.kinds.contains_key(name)
    }

    pub fn kind(&self, name: &str) -> Option<MailKind> {
        self.kinds.get(name).copied()
    }

    /// The front-matter defaults of a template (`vars:`).
    pub fn defaults(&self, name: &str) -> Option<&serde_json::Map<String, serde_json::Value>> {
        self.vars.get(name).map(|(d, _)| d)
    }

    /// The variables a template reads, each with where it is first read.
    pub fn uses(&self, name: &str) -> &[VarUse] {
        self.vars.get(name).map_or(&[], |(_, u)| u.as_slice())
    }

    pub fn render(
        &self,
        name: &str,
        vars: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Rendered, RenderError> {
        let kind = self
            .kind(name)
            .ok_or_else(|| RenderError::Unknown(name.to_string()))?;
        // Front-matter defaults first: the mail's own variables win.
        let ctx = match self.defaults(name) {
            Some(d) if !d.is_empty() => {
                let mut all = d.clone();
                all.extend(vars.iter().map(|(k, v)| (k.clone(), v.clone())));
                JinjaValue::from_serialize(&all)
            }
            _ => JinjaValue::from_serialize(vars),
        };
        let part = |suffix: &str| -> Result<String, RenderError> {
            self.env
                .get_template(&format!("{name}.{suffix}"))
                .and_then(|t| t.render(&ctx))
                .map_err(|source| RenderError::Failed {
                    name: name.to_string(),
                    source,
                })
        };
        let subject = part("subject")?;
        Ok(Rendered {
            subject: shorten(one_line(&subject), MAX_SUBJECT_CHARS),
            text: part("txt")?,
            html: part("html")?,
            kind,
        })
    }
}

/// The longest subject sent, in characters. A subject is rendered from
/// the client's data (a name): a value of a thousand characters without a
/// space cannot be folded, makes a header line longer than SMTP's 998
/// octets, and the server refuses the mail for good. Mail clients show
/// far fewer characters anyway.
pub const MAX_SUBJECT_CHARS: usize = 200;

/// Cuts `s` to at most `max` characters, ending with an ellipsis when cut
/// (at a character boundary: never inside a multi-byte character).
fn shorten(s: String, max: usize) -> String {
    if s.chars().count() <= max {
        return s;
    }
    let mut cut: String = s.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Collapses whitespace, CR and LF included, so a subject is one header line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Loads a templates directory, keeping each template's last good version.
pub struct TemplateLoader {
    dir: PathBuf,
    last_good: BTreeMap<String, Source>,
    texts: crate::core::texts::TextLoader,
}

impl TemplateLoader {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            last_good: BTreeMap::new(),
            texts: Default::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn load(&mut self) -> TemplateSet {
        let mut set = self.load_mail();
        set.texts = self.texts.load(&self.dir);
        set.errors.extend(set.texts.errors.iter().cloned());
        set
    }

    fn load_mail(&mut self) -> TemplateSet {
        let mut errors = Vec::new();
        let mut names = BTreeMap::new();
        match std::fs::read_dir(&self.dir) {
            Ok(entries) => {
                for path in entries.flatten().map(|e| e.path()) {
                    let ext = path.extension().and_then(|e| e.to_str());
                    if !matches!(ext, Some("txt" | "html")) {
                        continue;
                    }
                    if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                        names.insert(stem.to_string(), ());
                    }
                }
            }
            Err(e) => {
                errors.push(CompileError {
                    file: self.dir.display().to_string(),
                    line: None,
                    column: None,
                    message: format!("cannot read the templates directory: {e}"),
                });
                return build(&self.last_good, errors);
            }
        }
        let mut good = BTreeMap::new();
        for name in names.into_keys() {
            match read_source(&self.dir, &name) {
                Ok(src) => {
                    good.insert(name, src);
                }
                Err(e) => {
                    if let Some(old) = self.last_good.get(&name) {
                        good.insert(name, old.clone());
                    }
                    errors.push(e);
                }
            }
        }
        self.last_good = good;
        build(&self.last_good, errors)
    }
}

fn new_env() -> Environment<'static> {
    let mut env = Environment::new();
    // `NAME.html` is escaped by minijinja's default (by file extension);
    // subject and text are plain.
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Lenient);
    env.set_keep_trailing_newline(true);
    env
}

fn build(sources: &BTreeMap<String, Source>, errors: Vec<CompileError>) -> TemplateSet {
    let mut env = new_env();
    let mut kinds = BTreeMap::new();
    let mut vars = BTreeMap::new();
    for (name, src) in sources {
        // Each source compiled in `read_source` already, so these succeed.
        let added = env
            .add_template_owned(format!("{name}.subject"), src.subject.clone())
            .and_then(|_| env.add_template_owned(format!("{name}.txt"), src.text.clone()))
            .and_then(|_| env.add_template_owned(format!("{name}.html"), src.html.clone()));
        if added.is_ok() {
            kinds.insert(name.clone(), src.kind);
            vars.insert(name.clone(), (src.defaults.clone(), src.uses.clone()));
        }
    }
    TemplateSet {
        env,
        kinds,
        vars,
        errors,
        texts: Default::default(),
    }
}

fn read_source(dir: &Path, name: &str) -> Result<Source, CompileError> {
    let txt_path = dir.join(format!("{name}.txt"));
    let html_path = dir.join(format!("{name}.html"));
    let err = |path: &Path, line: Option<usize>, message: String| CompileError {
        file: path.display().to_string(),
        line,
        column: None,
        message,
    };
    let txt = std::fs::read_to_string(&txt_path).map_err(|e| {
        err(
            &txt_path,
            None,
            format!("cannot read the text part (every template needs NAME.txt and NAME.html): {e}"),
        )
    })?;
    let html = std::fs::read_to_string(&html_path).map_err(|e| {
        err(
            &html_path,
            None,
            format!("cannot read the HTML part (every template needs NAME.txt and NAME.html): {e}"),
        )
    })?;
    let (front, body, body_line) = split_front_matter(&txt).ok_or_else(|| {
        err(
            &txt_path,
            Some(1),
            "the text part must start with front matter: ---, subject: ..., kind: service|marketing, ---".into(),
        )
    })?;
    let fm: FrontMatter = serde_yaml::from_str(front).map_err(|e| {
        // The front matter starts on the file's second line; serde_yaml's
        // message names its own line, so the file's line is given once.
        let line = e.location().map(|l| l.line() + 1);
        let message = e.to_string();
        let message = match message.find(" at line ") {
            Some(i) => message[..i].to_string(),
            None => message,
        };
        err(&txt_path, line, format!("front matter: {message}"))
    })?;
    let subject_line = front
        .lines()
        .position(|l| l.trim_start().starts_with("subject:"))
        .map_or(2, |i| i + 2);
    let mut src = Source {
        subject: fm.subject,
        kind: fm.kind,
        text: body.to_string(),
        html,
        defaults: fm.vars,
        uses: Vec::new(),
    };
    // Compile each part once here so a broken one is refused with its line.
    let mut env = new_env();
    for (suffix, text, path, offset) in [
        ("subject", &src.subject, &txt_path, subject_line - 1),
        ("txt", &src.text, &txt_path, body_line - 1),
        ("html", &src.html, &html_path, 0),
    ] {
        let id = format!("{name}.{suffix}");
        env.add_template_owned(id.clone(), text.clone())
            .map_err(|e| {
                err(
                    path,
                    e.line().map(|l| l + offset),
                    e.detail().unwrap_or(&e.to_string()).to_string(),
                )
            })?;
        let tmpl = env
            .get_template(&id)
            .map_err(|e| err(path, None, e.to_string()))?;
        let walked = walk(&env, &tmpl);
        if let Some((filter, line)) = walked.unknown_filters.first() {
            return Err(err(
                path,
                line.map(|l| l + offset),
                format!("unknown filter `{filter}`"),
            ));
        }
        let mut undeclared: Vec<String> = tmpl.undeclared_variables(false).into_iter().collect();
        undeclared.sort_by_key(|v| walked.first_line.get(v).copied().flatten());
        for v in undeclared {
            if src.uses.iter().any(|u| u.name == v) {
                continue;
            }
            let line = walked.first_line.get(&v).copied().flatten();
            src.uses.push(VarUse {
                name: v,
                file: path.display().to_string(),
                line: line.map(|l| l + offset),
            });
        }
    }
    Ok(src)
}

/// What a compiled template's instructions show.
struct Walked {
    /// Filters the environment does not know, with their lines (in the part).
    unknown_filters: Vec<(String, Option<usize>)>,
    /// The first line each name is looked up on.
    first_line: BTreeMap<String, Option<usize>>,
}

/// Walks a template's instructions (its blocks included) for the filters it
/// applies and the names it looks up. A filter is known when applying it to
/// nothing fails for another reason than being unknown.
fn walk(env: &Environment<'static>, tmpl: &minijinja::Template<'_, '_>) -> Walked {
    use minijinja::machinery::{Instruction, get_compiled_template};
    let compiled = get_compiled_template(tmpl);
    let mut out = Walked {
        unknown_filters: Vec::new(),
        first_line: BTreeMap::new(),
    };
    for instrs in std::iter::once(&compiled.instructions).chain(compiled.blocks.values()) {
        for idx in 0..instrs.len() as u32 {
            match instrs.get(idx) {
                Some(Instruction::ApplyFilter(name, ..)) if !filter_known(env, name) => {
                    out.unknown_filters
                        .push((name.to_string(), instrs.get_line(idx)));
                }
                Some(Instruction::Lookup(name)) => {
                    out.first_line
                        .entry(name.to_string())
                        .or_insert(instrs.get_line(idx));
                }
                _ => {}
            }
        }
    }
    out
}

fn filter_known(env: &Environment<'static>, name: &str) -> bool {
    let probe = format!("{{{{ none | {name} }}}}");
    match env.render_str(&probe, ()) {
        Ok(_) => true,
        Err(e) => e.kind() != minijinja::ErrorKind::UnknownFilter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(dir: &Path, name: &str, txt: &str, html: &str) {
        std::fs::write(dir.join(format!("{name}.txt")), txt).unwrap();
        std::fs::write(dir.join(format!("{name}.html")), html).unwrap();
    }

    #[test]
    fn an_over_long_subject_is_cut_with_an_ellipsis_at_a_char_boundary() {
        let long = "é".repeat(1000);
        let cut = shorten(long, MAX_SUBJECT_CHARS);
        assert_eq!(cut.chars().count(), MAX_SUBJECT_CHARS);
        assert!(cut.ends_with('…') && cut.starts_with("éé"));
        assert_eq!(shorten("short".into(), MAX_SUBJECT_CHARS), "short");
        let exact = "a".repeat(MAX_SUBJECT_CHARS);
        assert_eq!(shorten(exact.clone(), MAX_SUBJECT_CHARS), exact);
    }

    #[test]
    fn renders_both_parts_escaping_html_and_keeping_the_subject_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "hi",
            "---\nsubject: \"Hello {{ name }}\"\nkind: service\n---\nHi {{ name }}\n",
            "<p>Hi {{ name }}</p>",
        );
        let set = TemplateLoader::new(dir.path().into()).load();
        assert!(set.errors.is_empty(), "{:?}", set.errors);
        let vars = json!({"name": "<b>Ana</b>\r\nBcc: x@y.z"});
        let r = set.render("hi", vars.as_object().unwrap()).unwrap();
        assert_eq!(r.subject, "Hello <b>Ana</b> Bcc: x@y.z");
        assert_eq!(r.text, "Hi <b>Ana</b>\r\nBcc: x@y.z\n");
        assert!(r.html.contains("&lt;b&gt;Ana"), "{}", r.html);
        assert_eq!(r.kind, MailKind::Service);
        assert!(matches!(
            set.render("nope", &Default::default()),
            Err(RenderError::Unknown(_))
        ));
    }

    #[test]
    fn a_broken_template_is_refused_with_its_line_and_the_old_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "t",
            "---\nsubject: S\n---\none\n",
            "<p>{{ a }}</p>",
        );
        let mut loader = TemplateLoader::new(dir.path().into());
        assert!(loader.load().contains("t"));
        write(
            dir.path(),
            "t",
            "---\nsubject: S\n---\nline two\n{% if %}\n",
            "<p>{{ a }}</p>",
        );
        let set = loader.load();
        assert!(set.contains("t"));
        assert_eq!(set.errors.len(), 1);
        let e = &set.errors[0];
        assert!(e.file.ends_with("t.txt"));
        assert_eq!(e.line, Some(5), "{e}");
        assert_eq!(set.render("t", &Default::default()).unwrap().text, "one\n");
    }

    #[test]
    fn front_matter_is_required() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "t", "no front matter", "<p></p>");
        let set = TemplateLoader::new(dir.path().into()).load();
        assert!(!set.contains("t"));
        assert!(set.errors[0].message.contains("front matter"));
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Whatever an event carries, rendering neither panics nor lets it
            /// add HTML or a header line.
            #[test]
            fn values_from_events_cannot_break_out(name in ".{0,200}", code in ".{0,50}") {
                let dir = tempfile::tempdir().unwrap();
                write(
                    dir.path(),
                    "t",
                    "---\nsubject: \"Hi {{ name }} {{ code }}\"\n---\n{{ name }}\n",
                    "<p>{{ name }}</p><p>{{ code }}</p>",
                );
                let set = TemplateLoader::new(dir.path().into()).load();
                let vars = serde_json::json!({"name": name, "code": code});
                let r = set.render("t", vars.as_object().unwrap()).unwrap();
                prop_assert!(!r.subject.contains('\n') && !r.subject.contains('\r'));
                let inner = r.html.trim_start_matches("<p>").trim_end_matches("</p>").replace("</p><p>", "");
                prop_assert!(!inner.contains('<') && !inner.contains('>'), "{}", r.html);
            }
        }
    }
}
