//! Text-message templates: `templates/NAME.sms`, an optional front matter
//! (`kind: service|marketing`, default marketing, and `vars:` defaults, as
//! mail templates have) and the message, rendered with minijinja as plain
//! text. Loaded with the mail templates and swapped with them; a broken one
//! is refused with `file:line` and its last good version stays in force.

use crate::core::rules::CompileError;
use minijinja::{Environment, Value as JinjaValue};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `service` texts (a code, an order's news) or `marketing` texts (offers):
/// only marketing texts wait for quiet hours and count toward the caps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextKind {
    Service,
    #[default]
    Marketing,
}

/// Why a text could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("no text template `{0}.sms`")]
    Unknown(String),
    #[error("text template `{name}.sms` failed to render: {source}")]
    Failed {
        name: String,
        #[source]
        source: minijinja::Error,
    },
    #[error(
        "text template `{name}.sms` makes {chars} characters, over the {MAX_TEXT_CHARS} a message may have"
    )]
    TooLong { name: String, chars: usize },
}

/// The longest text sent, in characters: what Twilio's Messages API takes
/// in one `Body` (it splits it into segments itself). A longer rendering
/// fails the text for good rather than reach the client cut.
pub const MAX_TEXT_CHARS: usize = 1600;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FrontMatter {
    #[serde(default)]
    kind: TextKind,
    #[serde(default)]
    vars: Map<String, Value>,
}

/// One text template as last read without error.
#[derive(Debug, Clone)]
struct Source {
    kind: TextKind,
    body: String,
    defaults: Map<String, Value>,
}

/// The text templates in force.
#[derive(Default)]
pub struct TextSet {
    env: Environment<'static>,
    sources: BTreeMap<String, Source>,
    pub errors: Vec<CompileError>,
}

impl TextSet {
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sources.keys().map(String::as_str)
    }

    pub fn kind(&self, name: &str) -> Option<TextKind> {
        self.sources.get(name).map(|s| s.kind)
    }

    pub fn defaults(&self, name: &str) -> Option<&Map<String, Value>> {
        self.sources.get(name).map(|s| &s.defaults)
    }

    /// The message, trimmed; over [`MAX_TEXT_CHARS`] is an error.
    pub fn render(&self, name: &str, vars: &Map<String, Value>) -> Result<String, TextError> {
        let src = self
            .sources
            .get(name)
            .ok_or_else(|| TextError::Unknown(name.to_string()))?;
        let mut all = src.defaults.clone();
        all.extend(vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        let failed = |source| TextError::Failed {
            name: name.to_string(),
            source,
        };
        let text = self
            .env
            .get_template(name)
            .and_then(|t| t.render(JinjaValue::from_serialize(&all)))
            .map_err(failed)?;
        let text = text.trim().to_string();
        let n = text.chars().count();
        if n > MAX_TEXT_CHARS {
            return Err(TextError::TooLong {
                name: name.to_string(),
                chars: n,
            });
        }
        Ok(text)
    }
}

impl std::fmt::Debug for TextSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextSet")
            .field("texts", &self.sources.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Loads the `.sms` files of the templates directory.
#[derive(Debug, Default)]
pub struct TextLoader {
    last_good: BTreeMap<String, Source>,
}

impl TextLoader {
    pub fn load(&mut self, dir: &Path) -> TextSet {
        let mut errors = Vec::new();
        let mut good = BTreeMap::new();
        // An unreadable directory is reported by the mail templates' loader.
        let paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        for path in paths {
            if path.extension().and_then(|e| e.to_str()) != Some("sms") {
                continue;
            }
            let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            match read(&path) {
                Ok(src) => {
                    good.insert(name.to_string(), src);
                }
                Err(e) => {
                    if let Some(old) = self.last_good.get(name) {
                        good.insert(name.to_string(), old.clone());
                    }
                    errors.push(e);
                }
            }
        }
        self.last_good = good;
        let mut env = Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Lenient);
        for (name, src) in &self.last_good {
            // Compiled once in `read` already.
            let _ = env.add_template_owned(name.clone(), src.body.clone());
        }
        TextSet {
            env,
            sources: self.last_good.clone(),
            errors,
        }
    }
}

fn read(path: &Path) -> Result<Source, CompileError> {
    let err = |line: Option<usize>, message: String| CompileError {
        file: path.display().to_string(),
        line,
        column: None,
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(None, format!("cannot read: {e}")))?;
    let (fm, body, body_line) = if text.starts_with("---") {
        let (front, body, line) = split_front_matter(&text)
            .ok_or_else(|| err(Some(1), "front matter not closed by a line `---`".into()))?;
        let fm: FrontMatter = serde_yaml::from_str(front).map_err(|e| {
            err(
                e.location().map(|l| l.line() + 1),
                format!("front matter: {e}"),
            )
        })?;
        (fm, body.to_string(), line)
    } else {
        (FrontMatter::default(), text.clone(), 1)
    };
    let mut env = Environment::new();
    env.add_template_owned("t", body.clone()).map_err(|e| {
        err(
            e.line().map(|l| l + body_line - 1),
            e.detail().unwrap_or("syntax error").to_string(),
        )
    })?;
    Ok(Source {
        kind: fm.kind,
        body,
        defaults: fm.vars,
    })
}

/// Splits `---\nyaml\n---\nbody` into (yaml, body, 1-based line where body starts).
pub(crate) fn split_front_matter(s: &str) -> Option<(&str, &str, usize)> {
    let rest = s.strip_prefix("---")?;
    let rest = rest
        .strip_prefix("\r\n")
        .or_else(|| rest.strip_prefix('\n'))?;
    let end = rest.find("\n---")?;
    let front = &rest[..end];
    let after = &rest[end + 4..];
    let body = after
        .strip_prefix("\r\n")
        .or_else(|| after.strip_prefix('\n'))
        .unwrap_or(after);
    let body_line = 1 + s[..s.len() - body.len()].matches('\n').count();
    Some((front, body, body_line))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn texts_load_render_and_keep_their_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, s: &str| std::fs::write(dir.path().join(name), s).unwrap();
        write(
            "promo.sms",
            "Hi {{ first_name }}, code {{ code }}. Reply STOP to stop.\n",
        );
        write(
            "otp.sms",
            "---\nkind: service\nvars: {code: none}\n---\nYour code: {{ code }}",
        );
        write("promo.txt", "not a text template");
        let mut loader = TextLoader::default();
        let set = loader.load(dir.path());
        assert!(set.errors.is_empty(), "{:?}", set.errors);
        assert_eq!(set.names().collect::<Vec<_>>(), ["otp", "promo"]);
        assert_eq!(set.kind("promo"), Some(TextKind::Marketing));
        assert_eq!(set.kind("otp"), Some(TextKind::Service));
        let vars = json!({"first_name": "Ana", "code": "X1"});
        let text = set.render("promo", vars.as_object().unwrap()).unwrap();
        assert_eq!(text, "Hi Ana, code X1. Reply STOP to stop.");
        assert_eq!(
            set.render("otp", &Map::new()).unwrap(),
            "Your code: none",
            "front-matter defaults"
        );
        let long = json!({"first_name": "a".repeat(MAX_TEXT_CHARS)});
        assert!(set.render("promo", long.as_object().unwrap()).is_err());

        write("promo.sms", "---\nkind: service\n---\nline\n{% if %}");
        let set = loader.load(dir.path());
        assert_eq!(set.errors.len(), 1);
        assert_eq!(set.errors[0].line, Some(5), "{:?}", set.errors);
        assert_eq!(set.kind("promo"), Some(TextKind::Marketing), "old one kept");
    }
}
