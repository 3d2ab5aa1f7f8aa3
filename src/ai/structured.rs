//! Structured chat calls: a system and a user message, a reply constrained to a JSON Schema (`json_schema`
//! response format, strict when the schema allows), and the reply checked against the schema. A reply that
//! does not fit is asked for once more, then fails as `invalid_output`; a reply cut at `max_tokens`, stopped by
//! the content filter or refused is an error that says so.
//!
//! Texts longer than the model's context are not cut off: [`analyze`] splits them into parts that fit, asks
//! for each part (map), then asks once more to merge the partial results (reduce).

use std::sync::Arc;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::jsonschema::{OutputSchema, strict_compatible};
use super::{AiError, Provider, Usage, estimate_tokens};
use crate::error::ErrorCode;

/// What to ask.
#[derive(Debug, Clone, Default)]
pub struct Ask {
    /// The system message.
    pub system: String,
    /// The JSON Schema the reply must fit, compiled once when it was loaded; without one the reply is
    /// `{ "text": ... }`.
    pub schema: Option<OutputSchema>,
    /// A name for the schema (`[a-zA-Z0-9_-]`, at most 64).
    pub schema_name: String,
    /// Upper bound on the reply's tokens.
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Deployment or model instead of the provider's chat default.
    pub model: Option<String>,
}

/// Tokens kept free for the reply when `max_tokens` is not set.
const DEFAULT_REPLY_TOKENS: usize = 4096;
/// Tokens kept free for message framing and estimation error.
const CONTEXT_MARGIN: usize = 256;

fn permanent(code: ErrorCode, message: String) -> AiError {
    AiError { message, retryable: false, code, retry_after: None }
}

/// One structured call, with one more try when the reply does not fit the schema.
///
/// # Errors
/// [`AiError`] from the provider, or `invalid_output`, `truncated`, `content_filter`, `refused`.
pub async fn ask(
    provider: &Provider,
    ask: &Ask,
    user: &str,
    cancel: &CancellationToken,
) -> Result<(Value, Usage), AiError> {
    let mut body = json!({
        "messages": [
            { "role": "system", "content": ask.system },
            { "role": "user", "content": user }
        ]
    });
    if let Some(tokens) = ask.max_tokens {
        body["max_tokens"] = json!(tokens);
    }
    if let Some(temperature) = ask.temperature {
        body["temperature"] = json!(temperature);
    }
    if let Some(schema) = &ask.schema {
        body["response_format"] = json!({
            "type": "json_schema",
            "json_schema": { "name": ask.schema_name, "schema": schema.schema(), "strict": strict_compatible(schema.schema()) }
        });
    }
    let mut usage = Usage::default();
    let mut last_problem = String::new();
    for _ in 0..2 {
        let (reply, spent) = provider.chat(body.clone(), ask.model.as_deref(), cancel).await?;
        usage += spent;
        let choice = &reply["choices"][0];
        let name = &provider.name;
        match choice["finish_reason"].as_str() {
            Some("length") => {
                return Err(permanent(
                    ErrorCode::Truncated,
                    format!("provider `{name}`: the reply was cut off at max_tokens; raise max_tokens"),
                ));
            }
            Some("content_filter") => {
                return Err(permanent(
                    ErrorCode::ContentFilter,
                    format!("provider `{name}`: the content filter stopped the reply (content_filter)"),
                ));
            }
            _ => {}
        }
        if let Some(refusal) = choice["message"]["refusal"].as_str() {
            return Err(permanent(ErrorCode::Refused, format!("provider `{name}`: the model refused: {refusal}")));
        }
        let content = choice["message"]["content"].as_str().unwrap_or_default();
        let Some(schema) = &ask.schema else { return Ok((json!({ "text": content }), usage)) };
        match serde_json::from_str::<Value>(content) {
            Ok(value) => match schema.check(&value) {
                Ok(()) => return Ok((value, usage)),
                Err(problem) => last_problem = problem,
            },
            Err(error) => last_problem = format!("not JSON: {error}"),
        }
        tracing::info!(provider = %provider.name, problem = %last_problem, "reply does not fit the schema; asking again");
    }
    Err(permanent(
        ErrorCode::InvalidOutput,
        format!("provider `{}`: the reply does not fit the output schema: {last_problem}", provider.name),
    ))
}

/// Splits `text` into parts of at most `tokens` estimated tokens, cutting after a sentence where possible.
pub fn split(text: &str, tokens: usize) -> Vec<String> {
    let limit = (tokens * 4).max(64);
    let mut parts = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        if rest.chars().count() <= limit {
            parts.push(rest.to_string());
            break;
        }
        let hard = rest.char_indices().nth(limit).map_or(rest.len(), |(index, _)| index);
        let window = &rest[..hard];
        let cut =
            window.rfind(". ").map(|i| i + 1).or_else(|| window.rfind(' ')).filter(|i| *i > hard / 2).unwrap_or(hard);
        parts.push(rest[..cut].trim().to_string());
        rest = rest[cut..].trim_start();
    }
    parts
}

/// Asks about `text`, in parts when it does not fit the context. `user` builds the user message around the
/// text (or a part of it). Returns the result, the usage and the number of parts.
///
/// Every user message is built before the first request, so a message that cannot be built (a template
/// that fails) costs nothing.
///
/// # Errors
/// As [`ask`], and the error of `user`.
pub async fn analyze(
    provider: &Arc<Provider>,
    spec: &Ask,
    text: &str,
    user: impl Fn(&str) -> Result<String, AiError>,
    cancel: &CancellationToken,
) -> Result<(Value, Usage, usize), AiError> {
    let reply = spec.max_tokens.map_or(DEFAULT_REPLY_TOKENS, |t| t as usize);
    let context = provider.settings().context_tokens as usize;
    let fixed = estimate_tokens(&spec.system) + estimate_tokens(&user("")?) + reply + CONTEXT_MARGIN;
    let budget = context.saturating_sub(fixed);
    if estimate_tokens(text) <= budget {
        let message = user(text)?;
        let (value, usage) = ask(provider, spec, &message, cancel).await?;
        return Ok((value, usage, 1));
    }
    if budget < 100 {
        return Err(permanent(
            ErrorCode::ContextLengthExceeded,
            format!(
                "provider `{}`: the model's context ({context} tokens) leaves no room for the text after the prompt and max_tokens",
                provider.name
            ),
        ));
    }
    let messages = split(text, budget).iter().map(|part| user(part)).collect::<Result<Vec<_>, _>>()?;
    let count = messages.len();
    let mut running = tokio::task::JoinSet::new();
    for (index, message) in messages.into_iter().enumerate() {
        let (provider, spec, cancel) = (provider.clone(), spec.clone(), cancel.clone());
        running.spawn(async move { (index, ask(&provider, &spec, &message, &cancel).await) });
    }
    let mut partials: Vec<Option<Value>> = vec![None; count];
    let mut usage = Usage::default();
    while let Some(joined) = running.join_next().await {
        let (index, result) = joined.map_err(|error| permanent(ErrorCode::Panic, error.to_string()))?;
        let (value, spent) = result?;
        usage += spent;
        partials[index] = Some(value);
    }
    let partials: Vec<Value> = partials.into_iter().flatten().collect();
    let merge = Ask {
        system: format!(
            "{}\n\nThe text was too long to read at once, so it was analysed in {count} consecutive parts. \
             Merge the partial results below into one result for the whole text, in the same format: combine \
             lists without duplicates, and write summaries for the whole.",
            spec.system
        ),
        ..spec.clone()
    };
    let merged_input = serde_json::to_string_pretty(&partials).unwrap_or_default();
    if estimate_tokens(&merged_input) > budget {
        return Err(permanent(
            ErrorCode::ContextLengthExceeded,
            format!("provider `{}`: the {count} partial results are too long to merge in one call", provider.name),
        ));
    }
    let (value, spent) = ask(provider, &merge, &format!("Partial results, in order:\n{merged_input}"), cancel).await?;
    usage += spent;
    Ok((value, usage, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_respects_the_budget_and_keeps_every_word() {
        let text = "One sentence here. ".repeat(200);
        let parts = split(&text, 100);
        assert!(parts.len() > 1);
        assert!(parts.iter().all(|part| estimate_tokens(part) <= 100), "{parts:?}");
        assert!(parts.iter().all(|part| part.ends_with('.')), "cuts fall after sentences");
        assert_eq!(parts.join(" ").split_whitespace().count(), text.split_whitespace().count());
    }
}
