//! minijinja templates and expressions as used in pipeline and plugin files: what counts as a template, how a
//! whole-value template keeps its type, and the static checks run at load time (syntax, and which variables a
//! template reads, so that `compile` can insist that `stages.X` is an ancestor).

use std::collections::BTreeSet;
use std::ops::Range;

use minijinja::Environment;

use crate::document::{Diagnostic, Document};

/// Names minijinja provides as globals; they may appear in any template.
const GLOBALS: [&str; 4] = ["range", "dict", "namespace", "debug"];

/// A template that failed to parse, with the byte range inside the template text where known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// What the parser said.
    pub message: String,
    /// Where in the template text.
    pub range: Option<Range<usize>>,
}

/// True when `text` contains template syntax and must be rendered.
pub fn is_template(text: &str) -> bool {
    text.contains("{{") || text.contains("{%")
}

/// The expression of a value that is exactly one `{{ expr }}`, which keeps the expression's type when rendered.
pub fn whole_expression(text: &str) -> Option<&str> {
    let inner = text.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    (!inner.contains("{{") && !inner.contains("}}") && !inner.contains("{%")).then(|| inner.trim())
}

/// Parses a template and returns the variables it reads, as dotted paths (`stages.transcript.text`).
///
/// # Errors
/// [`SyntaxError`] when the template does not parse.
pub fn template_variables(source: &str) -> Result<BTreeSet<String>, SyntaxError> {
    guarded(|| {
        let env = Environment::new();
        let template = env.template_from_str(source).map_err(syntax_error)?;
        Ok(without_globals(template.undeclared_variables(true)))
    })
}

/// Parses a bare expression (`if`, `for_each`) and returns the variables it reads.
///
/// # Errors
/// [`SyntaxError`] when the expression does not parse, or is wrapped in `{{ }}`.
pub fn expression_variables(source: &str) -> Result<BTreeSet<String>, SyntaxError> {
    // Block delimiters do not belong in an expression; minijinja 2.24 also panics on some of them ("x }} y").
    if let Some(start) = ["{{", "{%", "}}", "%}", "#}"].iter().filter_map(|delimiter| source.find(delimiter)).min() {
        return Err(SyntaxError {
            message: "write a bare expression here, without `{{ }}` or `{% %}`".to_string(),
            range: Some(start..start + 2),
        });
    }
    guarded(|| {
        let env = Environment::new();
        let expression = env.compile_expression(source).map_err(syntax_error)?;
        Ok(without_globals(expression.undeclared_variables(true)))
    })
}

/// Runs the minijinja parser so that a panic inside it (a parser bug, seen in 2.24 on odd input) becomes a
/// syntax error instead of taking the process down.
fn guarded(parse: impl FnOnce() -> Result<BTreeSet<String>, SyntaxError>) -> Result<BTreeSet<String>, SyntaxError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)).unwrap_or_else(|_| {
        Err(SyntaxError { message: "syntax error: the template parser gave up on this text".to_string(), range: None })
    })
}

fn without_globals(variables: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    variables.into_iter().filter(|name| !GLOBALS.contains(&root(name))).collect()
}

/// The first segment of a dotted variable path.
pub fn root(path: &str) -> &str {
    path.split('.').next().unwrap_or(path)
}

/// The second segment of a dotted variable path (`transcript` in `stages.transcript.text`).
pub fn member(path: &str) -> Option<&str> {
    path.split('.').nth(1)
}

fn syntax_error(error: minijinja::Error) -> SyntaxError {
    let message = match error.detail() {
        Some(detail) => format!("{}: {detail}", error.kind()),
        None => error.kind().to_string(),
    };
    SyntaxError { message, range: error.range() }
}

/// Byte offset in the file of the first character of a TOML string's content, when the content appears there
/// verbatim (no escapes), so that positions inside a template map onto the file.
pub fn content_offset(file_text: &str, span: &Range<usize>) -> Option<usize> {
    let literal = file_text.get(span.clone())?;
    let (quote, basic) = if literal.starts_with("\"\"\"") {
        (3, true)
    } else if literal.starts_with("'''") {
        (3, false)
    } else if literal.starts_with('"') {
        (1, true)
    } else if literal.starts_with('\'') {
        (1, false)
    } else {
        return None;
    };
    let content = literal.get(quote..literal.len().checked_sub(quote)?)?;
    if basic && content.contains('\\') {
        return None;
    }
    // TOML drops a newline that directly follows the opening delimiter of a multi-line string.
    let newline = match quote {
        3 if content.starts_with("\r\n") => 2,
        3 if content.starts_with('\n') => 1,
        _ => 0,
    };
    Some(span.start + quote + newline)
}

/// A variable read by a template in a file, with where the reference starts in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The dotted path, such as `stages.transcript.text`.
    pub path: String,
    /// Byte offset in the file (the string's start when the exact place is unknown).
    pub offset: usize,
}

/// Checks one template (or bare expression) written as a TOML string at `span` of `document`, whose dotted key
/// path is `location`.
///
/// # Errors
/// A `template_syntax` diagnostic pointing into the template where the parser stopped.
pub fn check(
    document: &Document,
    span: &Range<usize>,
    text: &str,
    location: &str,
    expression: bool,
) -> Result<Vec<Reference>, Diagnostic> {
    let content = content_offset(&document.source, span);
    let parsed = if expression { expression_variables(text) } else { template_variables(text) };
    match parsed {
        Ok(variables) => Ok(variables
            .into_iter()
            .map(|path| {
                let offset =
                    content.and_then(|start| text.find(path.as_str()).map(|at| start + at)).unwrap_or(span.start);
                Reference { path, offset }
            })
            .collect()),
        Err(error) => {
            let offset = match (content, &error.range) {
                (Some(start), Some(range)) => start + range.start.min(text.len()),
                _ => span.start,
            };
            let what = if expression { "expression" } else { "template" };
            Err(document.diagnostic(
                &(offset..offset),
                "template_syntax",
                format!("`{location}`: {what} does not parse: {}", error.message),
            ))
        }
    }
}

/// A template that failed at run time, naming where it is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{location}`: {message}")]
pub struct RenderError {
    /// The dotted key path of the template (`stages.summary.with.transcript`).
    pub location: String,
    /// What went wrong.
    pub message: String,
}

/// Renders `with` values and evaluates `if` / `for_each` expressions at run time.
///
/// Undefined values are chainable: `stages.skipped.text` is empty rather than an error, so a stage that reads
/// an optional (skipped) ancestor still runs; `| default(...)` picks the fallback.
#[derive(Debug)]
pub struct Renderer {
    env: Environment<'static>,
}

impl Default for Renderer {
    fn default() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
        Self { env }
    }
}

impl Renderer {
    /// Renders every string in `value`: a whole `{{ expr }}` keeps the expression's type, any other template
    /// renders to a string, and non-template values pass through.
    ///
    /// # Errors
    /// [`RenderError`] naming the first template that failed.
    pub fn render(
        &self,
        value: &serde_json::Value,
        context: &minijinja::Value,
        location: &str,
    ) -> Result<serde_json::Value, RenderError> {
        use serde_json::Value;
        Ok(match value {
            Value::String(text) if is_template(text) => match whole_expression(text) {
                Some(expression) => to_json(&self.evaluate(expression, context, location)?, location)?,
                None => Value::String(self.env.render_str(text, context).map_err(|error| failure(location, &error))?),
            },
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(index, item)| self.render(item, context, &format!("{location}[{index}]")))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(key, item)| Ok((key.clone(), self.render(item, context, &format!("{location}.{key}"))?)))
                    .collect::<Result<_, RenderError>>()?,
            ),
            other => other.clone(),
        })
    }

    /// Evaluates a bare expression.
    ///
    /// # Errors
    /// [`RenderError`] when it does not parse or fails to evaluate.
    pub fn evaluate(
        &self,
        expression: &str,
        context: &minijinja::Value,
        location: &str,
    ) -> Result<minijinja::Value, RenderError> {
        let compiled = self.env.compile_expression(expression).map_err(|error| failure(location, &error))?;
        compiled.eval(context).map_err(|error| failure(location, &error))
    }
}

/// A minijinja value as JSON; undefined becomes null.
///
/// # Errors
/// [`RenderError`] for values JSON cannot hold.
pub fn to_json(value: &minijinja::Value, location: &str) -> Result<serde_json::Value, RenderError> {
    if value.is_undefined() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::to_value(value)
        .map_err(|error| RenderError { location: location.to_string(), message: error.to_string() })
}

fn failure(location: &str, error: &minijinja::Error) -> RenderError {
    let message = match error.detail() {
        Some(detail) => format!("{}: {detail}", error.kind()),
        None => error.kind().to_string(),
    };
    RenderError { location: location.to_string(), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_expressions_keep_their_type() {
        assert_eq!(whole_expression("{{ stages.a.items }}"), Some("stages.a.items"));
        assert_eq!(whole_expression("  {{x}} "), Some("x"));
        assert_eq!(whole_expression("a {{ x }}"), None);
        assert_eq!(whole_expression("{{ x }} and {{ y }}"), None);
    }

    #[test]
    fn variables_are_reported_as_paths() {
        let vars =
            template_variables("{{ stages.t.text }} {{ job.params.lang | default('en') }} {{ range(3) }}").unwrap();
        assert_eq!(vars.into_iter().collect::<Vec<_>>(), ["job.params.lang", "stages.t.text"]);
        let vars = expression_variables("job.params.x != false and stages.a").unwrap();
        assert_eq!(vars.into_iter().collect::<Vec<_>>(), ["job.params.x", "stages.a"]);
    }

    #[test]
    fn syntax_errors_carry_a_range() {
        let error = template_variables("hello {{ stages.a.text ").unwrap_err();
        assert!(error.message.starts_with("syntax error"), "{}", error.message);
        assert!(expression_variables("{{ a }}").is_err());
        // minijinja 2.24 panics on this one; it must come back as an error.
        assert_eq!(expression_variables("x }} y").unwrap_err().range, Some(2..4));
    }

    #[test]
    fn rendering_keeps_types_of_whole_expressions() {
        let renderer = Renderer::default();
        let context = minijinja::Value::from_serialize(serde_json::json!({
            "stages": { "t": { "text": "hi", "segments": [{ "start": 0.5 }] } },
            "job": { "params": {} }
        }));
        let value = serde_json::json!({
            "segments": "{{ stages.t.segments }}",
            "greeting": "say {{ stages.t.text }}",
            "language": "{{ job.params.language | default('en') }}",
            "missing": "{{ stages.skipped.text }}",
            "fixed": 3,
            "list": ["{{ stages.t.text | upper }}"]
        });
        let rendered = renderer.render(&value, &context, "with").unwrap();
        assert_eq!(
            rendered,
            serde_json::json!({
                "segments": [{ "start": 0.5 }],
                "greeting": "say hi",
                "language": "en",
                "missing": null,
                "fixed": 3,
                "list": ["HI"]
            })
        );
        let error = renderer
            .render(&serde_json::json!("{{ stages.t.text | no_such_filter }}"), &context, "with.x")
            .unwrap_err();
        assert_eq!(error.location, "with.x");
        assert!(renderer.evaluate("job.params.flag != false", &context, "if").unwrap().is_true());
    }

    #[test]
    fn content_offsets_skip_quotes() {
        let text = r#"x = "ab {{ c }}""#;
        assert_eq!(content_offset(text, &(4..text.len())), Some(5));
        let text = "x = \"\"\"\nab\"\"\"";
        assert_eq!(content_offset(text, &(4..text.len())), Some(8));
        let text = r#"x = "a\nb""#;
        assert_eq!(content_offset(text, &(4..text.len())), None);
    }
}
