//! Reading the file: TOML → [`Config`], with every error placed at file:line.
//!
//! Shape errors come from the TOML deserializer with a byte span; meaning
//! errors from [`Config::check`] come with a key path. Both are turned into
//! [`ConfigError`]s by one [`Locator`] over the spanned parse tree, so the
//! user always sees where, which key, and how to fix it.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::Config;

/// How bad a finding is: errors stop the engine, warnings are best-practice lint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

/// One finding in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub severity: Severity,
    pub file: PathBuf,
    /// 1-based; 0 when the finding is about the file as a whole.
    pub line: usize,
    pub column: usize,
    /// Dotted key path, e.g. `flows.orders.sink.connector`.
    pub key: String,
    pub message: String,
    /// What to do about it.
    pub help: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        write!(f, ": {level}")?;
        if !self.key.is_empty() {
            write!(f, " in `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// Every finding of one load, errors first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render_errors(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn has_errors(&self) -> bool {
        self.0.iter().any(|e| e.severity == Severity::Error)
    }
}

/// One finding a line, errors before warnings, in file order.
pub fn render_errors(errors: &[ConfigError]) -> String {
    let mut sorted: Vec<&ConfigError> = errors.iter().collect();
    sorted.sort_by_key(|e| (std::cmp::Reverse(e.severity), e.line, e.column));
    sorted.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")
}

/// A finding before it is placed in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Finding {
    pub severity: Severity,
    pub path: Vec<String>,
    pub message: String,
    pub help: Option<String>,
}

impl Finding {
    pub fn error(path: &[&str], message: impl Into<String>, help: impl Into<String>) -> Finding {
        Finding {
            severity: Severity::Error,
            path: path.iter().map(|s| s.to_string()).collect(),
            message: message.into(),
            help: Some(help.into()).filter(|h: &String| !h.is_empty()),
        }
    }

    pub fn warning(path: &[&str], message: impl Into<String>, help: impl Into<String>) -> Finding {
        Finding { severity: Severity::Warning, ..Finding::error(path, message, help) }
    }
}

/// A parsed config with the means to place findings in its source.
pub struct Loaded {
    pub config: Config,
    pub file: PathBuf,
    text: String,
}

impl Loaded {
    /// Places findings of [`Config::check`] / [`Config::resolve`] in the file.
    pub(super) fn locate(&self, findings: Vec<Finding>) -> Vec<ConfigError> {
        let locator = Locator::new(&self.text, &self.file);
        findings.into_iter().map(|f| locator.place(f)).collect()
    }

    /// The folder relative paths in the config are resolved against.
    pub fn base_dir(&self) -> &Path {
        self.file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
    }
}

/// Parses `text` (read from `file`) and checks its meaning.
///
/// Returns the config together with any warnings, or every error found.
pub fn load(text: &str, file: &Path) -> Result<(Loaded, Vec<ConfigError>), ConfigErrors> {
    let config = parse(text, file).map_err(|e| ConfigErrors(vec![e]))?;
    let loaded = Loaded { config, file: file.to_path_buf(), text: text.to_string() };
    let findings = loaded.locate(loaded.config.check());
    if findings.iter().any(|f| f.severity == Severity::Error) {
        return Err(ConfigErrors(findings));
    }
    Ok((loaded, findings))
}

fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let root = DeTable::parse(text).map_err(|e| syntax_error(text, file, &e))?;
    let de = toml::de::ValueDeserializer::from(Spanned::new(root.span(), DeValue::Table(root.into_inner())));
    Config::deserialize(de).map_err(|e| {
        let locator = Locator::new(text, file);
        locator.place_deserialize_error(e.message(), e.span())
    })
}

fn syntax_error(text: &str, file: &Path, e: &toml::de::Error) -> ConfigError {
    let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
    ConfigError {
        severity: Severity::Error,
        file: file.to_path_buf(),
        line,
        column,
        key: String::new(),
        message: format!("this is not valid TOML: {}", e.message().trim_end()),
        help: Some("see https://toml.io for the syntax; strings need quotes, tables are [name]".to_string()),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map(|nl| before.len() - nl).unwrap_or(before.len() + 1);
    (line, column)
}

/// Maps key paths to spans and spans to key paths over the parse tree.
struct Locator<'a> {
    text: &'a str,
    file: &'a Path,
    root: Option<Spanned<DeTable<'a>>>,
}

impl<'a> Locator<'a> {
    fn new(text: &'a str, file: &'a Path) -> Locator<'a> {
        Locator { text, file, root: DeTable::parse(text).ok() }
    }

    fn error_at(&self, span: Option<Range<usize>>, key: String, message: String, help: Option<String>) -> ConfigError {
        let (line, column) = span.map(|s| line_col(self.text, s.start)).unwrap_or((0, 0));
        ConfigError { severity: Severity::Error, file: self.file.to_path_buf(), line, column, key, message, help }
    }

    fn place(&self, f: Finding) -> ConfigError {
        let path: Vec<&str> = f.path.iter().map(String::as_str).collect();
        let span = self.span_of(&path);
        ConfigError { severity: f.severity, ..self.error_at(span, f.path.join("."), f.message, f.help) }
    }

    /// The span of the deepest existing key along `path` (the key itself,
    /// so the line shown is the one to edit).
    fn span_of(&self, path: &[&str]) -> Option<Range<usize>> {
        let root = self.root.as_ref()?;
        let mut table = root.get_ref();
        let mut best = None;
        for (i, part) in path.iter().enumerate() {
            let Some((k, v)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == *part) else {
                break;
            };
            best = Some(k.span());
            match v.get_ref() {
                DeValue::Table(t) if i + 1 < path.len() => table = t,
                _ => break,
            }
        }
        best
    }

    /// The key path of the deepest table whose span holds `span`. Parent
    /// tables of `[a.b]` headers have no useful span of their own, so the
    /// whole tree is searched rather than descending greedily.
    fn path_at(&self, span: &Range<usize>) -> Vec<String> {
        fn walk(table: &DeTable<'_>, span: &Range<usize>, prefix: &mut Vec<String>, best: &mut Vec<String>) {
            for (k, v) in table.iter() {
                prefix.push(k.get_ref().to_string());
                let vs = v.span();
                if (vs.start <= span.start && span.end <= vs.end) && prefix.len() > best.len() {
                    *best = prefix.clone();
                }
                if let DeValue::Table(t) = v.get_ref() {
                    walk(t, span, prefix, best);
                }
                prefix.pop();
            }
        }
        let mut best = Vec::new();
        if let Some(root) = self.root.as_ref() {
            walk(root.get_ref(), span, &mut Vec::new(), &mut best);
        }
        best
    }

    /// The table at `path`, if it is one.
    fn table_at(&self, path: &[String]) -> Option<&DeTable<'a>> {
        let mut table = self.root.as_ref()?.get_ref();
        for part in path {
            let (_, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == part.as_str())?;
            let DeValue::Table(t) = v.get_ref() else { return None };
            table = t;
        }
        Some(table)
    }

    /// For a message that quotes a bad value (`` `10 seconds` is not a
    /// duration``), the key in `path`'s table holding that string value.
    fn key_with_value(&self, path: &[String], message: &str) -> Option<(String, Range<usize>)> {
        let quoted = message.strip_prefix('`')?.split('`').next()?;
        let table = self.table_at(path)?;
        fn find(table: &DeTable<'_>, quoted: &str, prefix: &mut Vec<String>) -> Option<(String, Range<usize>)> {
            for (k, v) in table.iter() {
                prefix.push(k.get_ref().to_string());
                match v.get_ref() {
                    DeValue::String(s) if s.as_ref() == quoted => return Some((prefix.join("."), k.span())),
                    DeValue::Table(t) => {
                        if let Some(hit) = find(t, quoted, prefix) {
                            return Some(hit);
                        }
                    }
                    _ => {}
                }
                prefix.pop();
            }
            None
        }
        find(table, quoted, &mut Vec::new())
    }

    /// serde reports unknown and missing fields by name; find that key so the
    /// line shown is the misspelt one rather than the table header.
    fn place_deserialize_error(&self, message: &str, span: Option<Range<usize>>) -> ConfigError {
        let message = message.trim_end().to_string();
        let mut path = span.as_ref().map(|s| self.path_at(s)).unwrap_or_default();
        let mut span = span;
        let named =
            |prefix: &str| message.strip_prefix(prefix).and_then(|rest| rest.split('`').next()).map(str::to_string);
        let help = if let Some(field) = named("unknown field `") {
            let mut p: Vec<&str> = path.iter().map(String::as_str).collect();
            p.push(&field);
            if let Some(s) = self.span_of(&p).filter(|s| self.text.get(s.clone()) == Some(field.as_str())) {
                span = Some(s);
                path.push(field.clone());
            }
            Some("remove the key or correct its spelling; the expected keys are listed above".to_string())
        } else if let Some(field) = named("missing field `") {
            path.push(field);
            Some("add the key; see the README's configuration reference for its form".to_string())
        } else if message.starts_with("unknown variant") {
            Some("use one of the values listed".to_string())
        } else {
            if let Some((key, s)) = self.key_with_value(&path, &message) {
                path.push(key);
                span = Some(s);
            }
            None
        };
        self.error_at(span, path.join("."), message, help)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ConfigErrors {
        match load(text, Path::new("dovetail.toml")) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let e = err("[engine]\nstore = sqlite\n");
        assert_eq!(e.0[0].line, 2, "{e}");
        assert!(e.0[0].message.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn unknown_keys_point_at_the_key() {
        let text = "[connectors.billing]\ntype = \"http\"\nbase_url = \"http://x\"\ntimout = \"10s\"\n";
        let e = err(text);
        assert_eq!((e.0[0].line, e.0[0].key.as_str()), (4, "connectors.billing.timout"), "{e}");
        assert!(e.0[0].message.contains("unknown field `timout`"), "{e}");
    }

    #[test]
    fn bad_durations_say_the_accepted_forms() {
        let text = "[connectors.billing]\ntype = \"http\"\nbase_url = \"http://x\"\ntimeout = \"10 seconds\"\n";
        let e = err(text);
        assert!(e.0[0].message.contains("not a duration"), "{e}");
        assert_eq!(e.0[0].line, 4, "{e}");
    }

    #[test]
    fn missing_fields_name_the_key() {
        let e = err("[flows.orders]\nsink = { type = \"http\", connector = \"b\" }\n");
        assert_eq!(e.0[0].key, "flows.orders.source", "{e}");
        assert_eq!(e.0[0].line, 1, "{e}");
    }

    #[test]
    fn line_col_is_one_based() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
