//! minijinja templates and expressions as used in pipeline and plugin files: what counts as a template, how a
//! whole-value template keeps its type, and the static checks run at load time (syntax, and which variables a
//! template reads, so that `compile` can insist that `stages.X` is an ancestor).

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use minijinja::Environment;
use tokio_util::sync::CancellationToken;

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

/// Instructions one template or expression may execute (minijinja's fuel). Running out takes about 0.4 s in a
/// release build on this project's 2-core machine; a loop printing 6,000 transcript segments with a filter
/// each needs under 100,000. Nested loops over large ranges run out of it instead of running for hours.
pub const TEMPLATE_FUEL: u64 = 5_000_000;
/// Largest result of one template, rendered text or (as JSON) a whole-value expression.
pub const MAX_RENDERED_BYTES: usize = 16 << 20;

/// Renders `with` values and evaluates `if` / `for_each` expressions at run time.
///
/// Undefined values are chainable: `stages.skipped.text` is empty rather than an error, so a stage that reads
/// an optional (skipped) ancestor still runs; `| default(...)` picks the fallback.
///
/// Every template runs under [`TEMPLATE_FUEL`] and its result may not exceed [`MAX_RENDERED_BYTES`]. Rendering
/// is synchronous CPU work; the `*_async` forms run it on the blocking pool and return as soon as the caller's
/// token fires (a stage's timeout or cancellation), telling the render to stop at its next write.
#[derive(Debug, Clone)]
pub struct Renderer {
    env: std::sync::Arc<Environment<'static>>,
}

impl Default for Renderer {
    fn default() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
        env.set_fuel(Some(TEMPLATE_FUEL));
        Self { env: std::sync::Arc::new(env) }
    }
}

impl Renderer {
    /// Renders every string in `value`: a whole `{{ expr }}` keeps the expression's type, any other template
    /// renders to a string, and non-template values pass through.
    ///
    /// # Errors
    /// [`RenderError`] naming the first template that failed, ran out of fuel or grew past the size limit.
    pub fn render(
        &self,
        value: &serde_json::Value,
        context: &minijinja::Value,
        location: &str,
    ) -> Result<serde_json::Value, RenderError> {
        self.render_until(value, context, location, &AtomicBool::new(false))
    }

    /// [`Renderer::render`] on the blocking pool; `None` when `cancel` fired first.
    pub async fn render_async(
        &self,
        value: &serde_json::Value,
        context: &minijinja::Value,
        location: &str,
        cancel: &CancellationToken,
    ) -> Option<Result<serde_json::Value, RenderError>> {
        let (renderer, value, context, location) = (self.clone(), value.clone(), context.clone(), location.to_string());
        off_thread(cancel, move |stop| renderer.render_until(&value, &context, &location, stop)).await
    }

    /// [`Renderer::evaluate`] on the blocking pool, the result as JSON; `None` when `cancel` fired first.
    pub async fn evaluate_json_async(
        &self,
        expression: &str,
        context: &minijinja::Value,
        location: &str,
        cancel: &CancellationToken,
    ) -> Option<Result<serde_json::Value, RenderError>> {
        let (renderer, expression, context, location) =
            (self.clone(), expression.to_string(), context.clone(), location.to_string());
        off_thread(cancel, move |_| {
            renderer.evaluate(&expression, &context, &location).and_then(|v| to_json(&v, &location))
        })
        .await
    }

    fn render_until(
        &self,
        value: &serde_json::Value,
        context: &minijinja::Value,
        location: &str,
        stop: &AtomicBool,
    ) -> Result<serde_json::Value, RenderError> {
        use serde_json::Value;
        Ok(match value {
            Value::String(text) if is_template(text) => match whole_expression(text) {
                Some(expression) => to_json(&self.evaluate(expression, context, location)?, location)?,
                None => Value::String(self.render_text(text, context, location, stop)?),
            },
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(index, item)| self.render_until(item, context, &format!("{location}[{index}]"), stop))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(key, item)| {
                        Ok((key.clone(), self.render_until(item, context, &format!("{location}.{key}"), stop)?))
                    })
                    .collect::<Result<_, RenderError>>()?,
            ),
            other => other.clone(),
        })
    }

    /// Renders one template into a buffer that refuses to grow past [`MAX_RENDERED_BYTES`] and stops when
    /// `stop` is set.
    fn render_text(
        &self,
        text: &str,
        context: &minijinja::Value,
        location: &str,
        stop: &AtomicBool,
    ) -> Result<String, RenderError> {
        let template = self.env.template_from_str(text).map_err(|error| failure(location, &error))?;
        let mut output = Bounded { buffer: Vec::new(), limit: MAX_RENDERED_BYTES, stop, overflow: false };
        match template.render_captured_to(context, &mut output) {
            Ok(_) => Ok(String::from_utf8_lossy(&output.buffer).into_owned()),
            Err(_) if output.overflow => Err(too_large(location)),
            Err(_) if stop.load(Ordering::Relaxed) => {
                Err(RenderError { location: location.to_string(), message: "cancelled".to_string() })
            }
            Err(error) => Err(failure(location, &error)),
        }
    }

    /// Evaluates a bare expression.
    ///
    /// # Errors
    /// [`RenderError`] when it does not parse, fails to evaluate or runs out of fuel.
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

/// Runs `work` on the blocking pool and waits for it or for `cancel`, whichever comes first; on cancel the
/// work is told to stop (it checks at every write, and its fuel bounds it anyway) and `None` is returned.
async fn off_thread<T: Send + 'static>(
    cancel: &CancellationToken,
    work: impl FnOnce(&AtomicBool) -> Result<T, RenderError> + Send + 'static,
) -> Option<Result<T, RenderError>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let mut task = tokio::task::spawn_blocking(move || work(&flag));
    tokio::select! {
        joined = &mut task => Some(joined.unwrap_or_else(|error| {
            Err(RenderError { location: String::new(), message: format!("the template renderer failed: {error}") })
        })),
        () = cancel.cancelled() => {
            stop.store(true, Ordering::Relaxed);
            None
        }
    }
}

/// An output buffer with a size limit and a stop flag; minijinja aborts the render when a write fails.
struct Bounded<'a> {
    buffer: Vec<u8>,
    limit: usize,
    stop: &'a AtomicBool,
    overflow: bool,
}

impl std::io::Write for Bounded<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("cancelled"));
        }
        if self.buffer.len() + bytes.len() > self.limit {
            self.overflow = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.buffer.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Counts bytes and fails past a limit, so a value's JSON size is known without building the JSON.
struct Counter {
    count: usize,
    limit: usize,
}

impl std::io::Write for Counter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.count += bytes.len();
        if self.count > self.limit {
            return Err(std::io::Error::other("output limit"));
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn too_large(location: &str) -> RenderError {
    RenderError {
        location: location.to_string(),
        message: format!(
            "the template's result is larger than {}, the limit for one template",
            crate::units::ByteSize(MAX_RENDERED_BYTES as u64)
        ),
    }
}

/// A minijinja value as JSON; undefined becomes null.
///
/// # Errors
/// [`RenderError`] for values JSON cannot hold, or whose JSON is larger than [`MAX_RENDERED_BYTES`].
pub fn to_json(value: &minijinja::Value, location: &str) -> Result<serde_json::Value, RenderError> {
    if value.is_undefined() {
        return Ok(serde_json::Value::Null);
    }
    let mut counter = Counter { count: 0, limit: MAX_RENDERED_BYTES };
    if serde_json::to_writer(&mut counter, value).is_err() && counter.count > counter.limit {
        return Err(too_large(location));
    }
    serde_json::to_value(value)
        .map_err(|error| RenderError { location: location.to_string(), message: error.to_string() })
}

fn failure(location: &str, error: &minijinja::Error) -> RenderError {
    let message = match (error.kind(), error.detail()) {
        (minijinja::ErrorKind::OutOfFuel, _) => format!(
            "the template ran too long: it used up its {TEMPLATE_FUEL} steps (loops over large ranges, nested?)"
        ),
        (kind, Some(detail)) => format!("{kind}: {detail}"),
        (kind, None) => kind.to_string(),
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

    fn empty_context() -> minijinja::Value {
        minijinja::Value::from_serialize(serde_json::json!({ "job": {} }))
    }

    #[test]
    fn nested_loops_run_out_of_fuel() {
        let renderer = Renderer::default();
        let billion = "{% for i in range(100000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}";
        let started = std::time::Instant::now();
        let error = renderer.render(&serde_json::json!(billion), &empty_context(), "with.x").unwrap_err();
        println!("running out of {TEMPLATE_FUEL} fuel took {:?}", started.elapsed());
        assert_eq!(error.location, "with.x");
        assert!(error.message.starts_with("the template ran too long"), "{}", error.message);
        let error = renderer
            .evaluate(
                "range(100000) | map('string') | join | length > range(100000) | map('string') | join | length",
                &empty_context(),
                "if",
            )
            .map(|_| ())
            .err();
        assert!(error.is_none(), "ordinary expressions have fuel enough: {error:?}");
    }

    #[test]
    fn templates_that_expand_hugely_fail_at_the_size_cap() {
        let renderer = Renderer::default();
        // 200 MB of text from a few hundred bytes of template.
        let text = "{% for i in range(2000) %}{{ 'x' * 100000 }}{% endfor %}";
        let error = renderer.render(&serde_json::json!(text), &empty_context(), "with.x").unwrap_err();
        assert!(error.message.contains("larger than 16MiB"), "{}", error.message);
        // A whole-value expression keeps its type, and is measured as JSON.
        let error =
            renderer.render(&serde_json::json!("{{ 'x' * 50000000 }}"), &empty_context(), "with.y").unwrap_err();
        assert_eq!(error.location, "with.y");
        assert!(error.message.contains("larger than 16MiB"), "{}", error.message);
        let fits = renderer.render(&serde_json::json!("{{ 'x' * 1000 }}"), &empty_context(), "with.z").unwrap();
        assert_eq!(fits.as_str().map(str::len), Some(1000));
    }

    #[tokio::test]
    async fn a_cancelled_render_returns_at_once_and_stops_at_its_next_write() {
        let renderer = Renderer::default();
        let slow = serde_json::json!("{% for i in range(100000) %}{{ ('x' * 1000000) | upper | length }}{% endfor %}");
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            trigger.cancel();
        });
        let started = std::time::Instant::now();
        let rendered = renderer.render_async(&slow, &empty_context(), "with.x", &cancel).await;
        assert!(rendered.is_none(), "cancelled");
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "returned after {:?}", started.elapsed());
        let (sum, context) = (serde_json::json!("{{ 1 + 1 }}"), empty_context());
        let done = renderer.render_async(&sum, &context, "w", &cancel.child_token()).await;
        assert!(done.is_none(), "a child of a cancelled token is cancelled too");
        let done = renderer.render_async(&sum, &context, "w", &CancellationToken::new()).await;
        assert_eq!(done, Some(Ok(serde_json::json!(2))));
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
