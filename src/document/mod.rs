//! A TOML file parsed with byte spans kept on every key and value, so that each later check can point at the
//! exact line and column it is complaining about.
//!
//! serde stops at the first error. [`Document::deserialize`] turns that into "every error": it deserializes,
//! and when serde refuses an entry it records the error, removes the entry and tries again, so one pass reports
//! every unknown key and every wrongly typed value of a file. All unknown keys of one table go in one round,
//! and after 100 problems the rest are counted rather than listed, so a hostile file costs little.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::{DeserializeOwned, IntoDeserializer};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

pub mod diagnostic;
pub mod suggest;

pub use diagnostic::{Diagnostic, LoadError};

/// A parsed value tree with spans, borrowing from the [`Document`] text.
pub type SpannedValue<'a> = Spanned<DeValue<'a>>;

/// The text of one file plus what is needed to turn byte offsets into positions.
#[derive(Debug, Clone)]
pub struct Document {
    /// The file, as given (relative paths stay relative in messages).
    pub file: PathBuf,
    /// The whole text.
    pub source: String,
    line_starts: Vec<usize>,
}

/// The result of [`Document::deserialize`].
#[derive(Debug)]
pub struct Deserialized<T> {
    /// The value, built from what was left after the refused entries were removed.
    pub value: Option<T>,
    /// One diagnostic per refused entry.
    pub diagnostics: Vec<Diagnostic>,
    /// The dotted key paths of the removed entries, e.g. `stages.a.timeout`.
    pub removed: Vec<String>,
}

impl Document {
    /// Wraps the text of `file`.
    pub fn new(file: impl Into<PathBuf>, source: impl Into<String>) -> Self {
        let source = source.into();
        let line_starts = std::iter::once(0).chain(source.match_indices('\n').map(|(index, _)| index + 1)).collect();
        Self { file: file.into(), source, line_starts }
    }

    /// Reads `file` from disk.
    ///
    /// # Errors
    /// The I/O error, if the file cannot be read or is not UTF-8.
    pub fn read(file: &Path) -> std::io::Result<Self> {
        Ok(Self::new(file, std::fs::read_to_string(file)?))
    }

    /// Reads `file` from disk; a file that is not UTF-8 is a problem of that file (a diagnostic at the first
    /// bad byte), not an error that stops the loading of every other file.
    ///
    /// # Errors
    /// The I/O error, if the file cannot be read.
    pub fn open(file: &Path) -> std::io::Result<Result<Self, Diagnostic>> {
        let bytes = std::fs::read(file)?;
        match String::from_utf8(bytes) {
            Ok(text) => Ok(Ok(Self::new(file, text))),
            Err(error) => {
                let valid = error.utf8_error().valid_up_to();
                // The text before the bad byte is valid UTF-8, so it can place the byte at a line and column.
                let before = String::from_utf8_lossy(&error.as_bytes()[..valid]).into_owned();
                let (line, column) = Self::new(file, before).position(valid);
                Ok(Err(Diagnostic {
                    file: file.to_path_buf(),
                    line,
                    column,
                    code: "not_utf8",
                    message: format!(
                        "the file is not UTF-8 text (byte 0x{:02x} at offset {valid}); save it as UTF-8",
                        error.as_bytes()[valid]
                    ),
                }))
            }
        }
    }

    /// The file stem (`meeting` for `pipelines/meeting.toml`).
    pub fn stem(&self) -> String {
        self.file.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.source.len());
        let line = self.line_starts.partition_point(|start| *start <= offset);
        let start = self.line_starts[line - 1];
        let column = self.source.get(start..offset).map_or(offset - start, |text| text.chars().count()) + 1;
        (line, column)
    }

    /// A diagnostic pointing at the start of `span`.
    pub fn diagnostic(&self, span: &Range<usize>, code: &'static str, message: impl Into<String>) -> Diagnostic {
        let (line, column) = self.position(span.start);
        Diagnostic { file: self.file.clone(), line, column, code, message: message.into() }
    }

    /// Parses the text as a TOML document, reporting every syntax error the parser can recover from.
    ///
    /// # Errors
    /// One `syntax` diagnostic per syntax error.
    pub fn parse(&self) -> Result<SpannedValue<'_>, Vec<Diagnostic>> {
        let (table, errors) = DeTable::parse_recoverable(&self.source);
        if !errors.is_empty() {
            return Err(errors
                .iter()
                .map(|error| {
                    let span = error.span().unwrap_or(0..0);
                    let message = error.message().trim_end().replace('\n', "; ");
                    self.diagnostic(&span, "syntax", format!("invalid TOML: {message}"))
                })
                .collect());
        }
        let span = table.span();
        Ok(Spanned::new(span, DeValue::Table(table.into_inner())))
    }

    /// Deserializes `value` into `T`, collecting every error serde reports instead of only the first.
    ///
    /// `base` is the dotted path of `value` in the file (empty for the root) and only serves the messages.
    /// Keys listed in `optional` are known to have been removed on purpose by the caller, so a "missing" error
    /// for them is not reported.
    pub fn deserialize<T: DeserializeOwned>(
        &self,
        value: &SpannedValue<'_>,
        base: &str,
        optional: &[String],
    ) -> Deserialized<T> {
        let mut value = value.clone();
        let mut result = Deserialized { value: None, diagnostics: Vec::new(), removed: Vec::new() };
        let mut listing = Listing::default();
        // Each round removes at least one entry, so the loop ends after at most one round per entry; rounds
        // stop early once more problems were found than are worth listing.
        for _ in 0..=count_entries(&value) {
            if listing.is_full() {
                break;
            }
            let error = match T::deserialize(value.clone().into_deserializer()) {
                Ok(parsed) => {
                    result.value = Some(parsed);
                    break;
                }
                Err(error) => error,
            };
            let span = error.span().unwrap_or_else(|| value.span());
            let path = entry_path(&value, span.start);
            let message = error.message().to_string();
            let missing = message.strip_prefix("missing field `").and_then(|rest| rest.split('`').next());
            if let Some(field) = missing {
                let key = join(base, &path.join("."), field);
                if !optional.iter().any(|name| *name == key || name == field) {
                    listing.add(self, &span, || ("missing_key", format!("missing required key `{key}`")));
                }
                break;
            }
            let Some((last, parent)) = path.split_last() else {
                listing.add(self, &span, || ("invalid_value", describe(base, "", &message)));
                break;
            };
            if let Some(rest) = message.strip_prefix("unknown field `") {
                // Every key of that table that serde does not know is refused in this one round: with thousands
                // of unknown keys, one deserialization per key would take minutes.
                let expected = expected_names(rest);
                let unknown = remove_unknown(&mut value, parent, &expected);
                if !unknown.is_empty() {
                    for (key, span) in unknown {
                        let dotted = join(base, &parent.join("."), &key);
                        listing.add(self, &span, || unknown_key(&dotted, &expected));
                        result.removed.push(dotted);
                    }
                    continue;
                }
            }
            let dotted = join(base, &parent.join("."), last);
            listing.add(self, &span, || classify(&dotted, &message));
            remove_entry(&mut value, &path);
            result.removed.push(dotted);
        }
        result.diagnostics = listing.finish(self, result.value.is_none());
        result
    }
}

/// The diagnostics of one [`Document::deserialize`]: the first [`MAX_REPORTED`] in full, the rest counted
/// (their sentences, with a did-you-mean each, are not even built).
#[derive(Default)]
struct Listing {
    listed: Vec<Diagnostic>,
    more: usize,
    first_more: Option<Range<usize>>,
}

impl Listing {
    fn is_full(&self) -> bool {
        self.listed.len() >= MAX_REPORTED
    }

    fn add(&mut self, document: &Document, span: &Range<usize>, build: impl FnOnce() -> (&'static str, String)) {
        if self.is_full() {
            self.more += 1;
            self.first_more.get_or_insert_with(|| span.clone());
        } else {
            let (code, message) = build();
            self.listed.push(document.diagnostic(span, code, message));
        }
    }

    /// The listed diagnostics, plus one that counts the others, or says checking stopped (`stopped`: no value
    /// was built).
    fn finish(mut self, document: &Document, stopped: bool) -> Vec<Diagnostic> {
        if let Some(span) = &self.first_more {
            let more = self.more;
            let message = format!(
                "{more} more problem{} not listed; the first {MAX_REPORTED} are above",
                if more == 1 { " is" } else { "s are" }
            );
            self.listed.push(document.diagnostic(span, "too_many_problems", message));
        } else if stopped && self.is_full() {
            let span = 0..0;
            let message = format!("stopped checking after {MAX_REPORTED} problems; fix these first");
            self.listed.push(document.diagnostic(&span, "too_many_problems", message));
        }
        self.listed
    }
}

/// Most problems one check lists; the others are counted.
const MAX_REPORTED: usize = 100;

/// Removes every key of the table at `parent` that is not in `expected`; returns their names and spans, in
/// order.
fn remove_unknown(value: &mut SpannedValue<'_>, parent: &[String], expected: &[String]) -> Vec<(String, Range<usize>)> {
    let mut table = value;
    for key in parent {
        let DeValue::Table(entries) = table.get_mut() else { return Vec::new() };
        let Some((_, inner)) = entries.iter_mut().find(|(name, _)| name.get_ref() == key) else { return Vec::new() };
        table = inner;
    }
    let DeValue::Table(entries) = table.get_mut() else { return Vec::new() };
    let mut removed = Vec::new();
    *entries = std::mem::take(entries)
        .into_iter()
        .filter(|(key, _)| {
            let known = expected.iter().any(|name| name == key.get_ref());
            if !known {
                removed.push((key.get_ref().to_string(), key.span()));
            }
            known
        })
        .collect();
    removed
}

/// The diagnostic code and sentence for an unknown key, with the closest known name as a hint.
fn unknown_key(dotted: &str, expected: &[String]) -> (&'static str, String) {
    let hint = match suggest::closest(dotted.rsplit('.').next().unwrap_or(dotted), expected) {
        Some(name) => format!("; did you mean `{name}`?"),
        None if expected.is_empty() => String::new(),
        None => format!("; expected one of: {}", expected.join(", ")),
    };
    ("unknown_key", format!("unknown key `{dotted}`{hint}"))
}

/// Turns a serde message about the entry at `dotted` into a diagnostic code and sentence.
fn classify(dotted: &str, message: &str) -> (&'static str, String) {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        return unknown_key(dotted, &expected_names(rest));
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let given = rest.split('`').next().unwrap_or_default();
        let expected = expected_names(rest);
        return (
            "invalid_value",
            format!("`{dotted}`: unknown value `{given}`; expected one of: {}", expected.join(", ")),
        );
    }
    let code = if message.starts_with("invalid duration") {
        "invalid_duration"
    } else if message.starts_with("invalid size") {
        "invalid_size"
    } else {
        "invalid_value"
    };
    (code, describe("", dotted, &plain_types(message)))
}

/// Replaces Rust type names in serde messages with words people use.
fn plain_types(message: &str) -> String {
    let mut text = message.to_string();
    for (rust, plain) in [
        ("expected u32", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected a sequence", "expected an array"),
        ("expected a map", "expected a table"),
    ] {
        text = text.replace(rust, plain);
    }
    text
}

/// The names listed after "expected one of" / "expected" in a serde message.
fn expected_names(message: &str) -> Vec<String> {
    let Some((_, list)) = message.split_once("expected") else { return Vec::new() };
    list.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

fn describe(base: &str, dotted: &str, message: &str) -> String {
    let path = join(base, dotted, "");
    if path.is_empty() { message.to_string() } else { format!("`{path}`: {message}") }
}

/// Joins non-empty path parts with dots.
fn join(a: &str, b: &str, c: &str) -> String {
    [a, b, c].iter().filter(|part| !part.is_empty()).copied().collect::<Vec<_>>().join(".")
}

fn count_entries(value: &SpannedValue<'_>) -> usize {
    match value.get_ref() {
        DeValue::Table(table) => table.iter().map(|(_, v)| 1 + count_entries(v)).sum(),
        _ => 0,
    }
}

/// The keys leading to the innermost table entry whose key or value contains `offset`.
///
/// Every table is searched, whatever its own span: the span of a `[section]` table covers only its header,
/// not the keys below it.
fn entry_path(value: &SpannedValue<'_>, offset: usize) -> Vec<String> {
    let DeValue::Table(table) = value.get_ref() else { return Vec::new() };
    for (key, inner) in table.iter() {
        if key.span().contains(&offset) {
            return vec![key.get_ref().to_string()];
        }
        let nested = entry_path(inner, offset);
        if !nested.is_empty() {
            return std::iter::once(key.get_ref().to_string()).chain(nested).collect();
        }
        if inner.span().contains(&offset) {
            return vec![key.get_ref().to_string()];
        }
    }
    Vec::new()
}

fn remove_entry(value: &mut SpannedValue<'_>, path: &[String]) {
    let DeValue::Table(table) = value.get_mut() else { return };
    match path {
        [] => {}
        [last] => retain(table, |key| key != last),
        [first, rest @ ..] => {
            if let Some((_, inner)) = table.iter_mut().find(|(key, _)| key.get_ref() == first) {
                remove_entry(inner, rest);
            }
        }
    }
}

/// Looks up `key` in a table value.
pub fn get<'a, 'i>(value: &'a SpannedValue<'i>, key: &str) -> Option<&'a SpannedValue<'i>> {
    match value.get_ref() {
        DeValue::Table(table) => table.iter().find(|(name, _)| name.get_ref() == key).map(|(_, value)| value),
        _ => None,
    }
}

/// Looks up a dotted `path` of keys.
pub fn get_path<'a, 'i>(value: &'a SpannedValue<'i>, path: &[&str]) -> Option<&'a SpannedValue<'i>> {
    path.iter().try_fold(value, |value, key| get(value, key))
}

/// The span of `key` itself inside a table value.
pub fn key_span(value: &SpannedValue<'_>, key: &str) -> Option<Range<usize>> {
    match value.get_ref() {
        DeValue::Table(table) => table.iter().find(|(name, _)| name.get_ref() == key).map(|(name, _)| name.span()),
        _ => None,
    }
}

/// A copy of a table value without the given keys.
pub fn without_keys<'i>(value: &SpannedValue<'i>, keys: &[String]) -> SpannedValue<'i> {
    let mut value = value.clone();
    if let DeValue::Table(table) = value.get_mut() {
        retain(table, |key| !keys.iter().any(|k| k == key));
    }
    value
}

/// Calls `visit` with the dotted path, span and text of every string in `value`, depth first.
pub fn visit_strings<'i>(value: &SpannedValue<'i>, path: &str, visit: &mut impl FnMut(&str, Range<usize>, &str)) {
    match value.get_ref() {
        DeValue::String(text) => visit(path, value.span(), text),
        DeValue::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                visit_strings(item, &format!("{path}[{index}]"), visit);
            }
        }
        DeValue::Table(table) => {
            for (key, item) in table.iter() {
                visit_strings(item, &join(path, "", key.get_ref()), visit);
            }
        }
        _ => {}
    }
}

/// The TOML type name of a value, as used in messages (`string`, `integer`, ...).
pub fn type_name(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "string",
        DeValue::Integer(_) => "integer",
        DeValue::Float(_) => "float",
        DeValue::Boolean(_) => "boolean",
        DeValue::Datetime(_) => "datetime",
        DeValue::Array(_) => "array",
        DeValue::Table(_) => "table",
    }
}

/// Keeps the entries whose key passes `keep`, in order.
fn retain(table: &mut DeTable<'_>, keep: impl Fn(&str) -> bool) {
    *table = std::mem::take(table).into_iter().filter(|(key, _)| keep(key.get_ref())).collect();
}

/// The `*.toml` files of a folder, sorted by name.
///
/// # Errors
/// The I/O error when the folder cannot be listed.
pub fn toml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "toml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
