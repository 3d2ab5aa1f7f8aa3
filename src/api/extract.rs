//! Extractors that answer bad input in the API's error format (ARCHITECTURE.md, "The API"): [`ApiJson`] for
//! bodies, [`ApiPath`] and [`ApiQuery`] for the URL. axum's own extractors answer with plain text; these name
//! what was wrong and where: malformed JSON with its line and column, a missing, unknown or mistyped field by
//! its path (`items[2].recordingId`), a body over `server.max_body_size` with 413, a body that is not JSON
//! with 415.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::error::ApiError;

/// A JSON body; rejections become [`ApiError`]s naming the field at fault.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

/// Whether a `Content-Type` is JSON (`application/json`, `application/*+json`, with any parameters).
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The name between the first pair of backticks of a serde message (`missing field `x``).
fn quoted(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let end = start + message[start..].find('`')?;
    Some(&message[start..end])
}

/// The path of a field inside `parent` (serde_path_to_error writes `.` for the root).
fn child(parent: &str, name: &str) -> String {
    if parent == "." || parent.is_empty() { name.to_string() } else { format!("{parent}.{name}") }
}

/// The body without a leading UTF-8 byte order mark, which some Windows tools write and RFC 8259 lets a
/// reader skip (an error at "line 1 column 1" would point at a character nobody can see).
fn without_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// Reads a JSON body from bytes, naming what is wrong. The body must be an object: serde would otherwise read
/// a struct from an array by field position (`["rec-1", "a.mp3"]`), a sloppy body accepted by accident.
///
/// # Errors
/// 400 `malformed_json` for syntax, `missing_field`, `unknown_field` or `invalid_field` for content.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes = without_bom(bytes);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("missing_body", "the request needs a JSON body"));
    }
    if bytes.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::bad_request(
            "invalid_field",
            "the body is a JSON array; send a JSON object with named fields (`{ \"recordingId\": … }`)",
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = match serde_path_to_error::deserialize(&mut deserializer) {
        Ok(value) => value,
        Err(error) => {
            let path = error.path().to_string();
            let inner = error.into_inner();
            return Err(describe(&path, &inner));
        }
    };
    deserializer.end().map_err(|error| describe(".", &error))?;
    Ok(value)
}

fn describe(path: &str, error: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let (line, column) = (error.line(), error.column());
    let text = error.to_string();
    // serde_json appends " at line L column C"; the sentence keeps it only for syntax errors.
    let bare = text.rsplit_once(" at line ").map_or(text.as_str(), |(head, _)| head);
    match error.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::bad_request(
            "malformed_json",
            format!("the body is not valid JSON: {bare} at line {line} column {column}"),
        )
        .with_details(json!({ "line": line, "column": column })),
        Category::Data => {
            let (code, field) = if bare.starts_with("missing field") {
                ("missing_field", quoted(bare).map(|name| child(path, name)))
            } else if bare.starts_with("unknown field") {
                // The path already ends with the unknown key (`items[1].fileurl`).
                let named = |name: &str| if path.ends_with(name) { path.to_string() } else { child(path, name) };
                ("unknown_field", quoted(bare).map(named))
            } else {
                ("invalid_field", Some(path.trim_start_matches('.').to_string()).filter(|p| !p.is_empty()))
            };
            let message = match &field {
                Some(field) if code == "invalid_field" => format!("field `{field}`: {bare}"),
                _ => bare.to_string(),
            };
            let error = ApiError::bad_request(code, message);
            match field {
                Some(field) => error.with_details(json!({ "field": field })),
                None => error,
            }
        }
    }
}

fn not_json() -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "send the body as JSON, with the header Content-Type: application/json",
    )
}

/// The body's bytes, within `server.max_body_size`.
async fn read_body<S: Send + Sync>(request: Request, state: &S) -> Result<(Bytes, bool), ApiError> {
    let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok());
    let json = content_type.is_some_and(is_json);
    let bytes = Bytes::from_request(request, state).await.map_err(|rejection: BytesRejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the body is larger than this server accepts (server.max_body_size)",
            )
        } else {
            ApiError::bad_request("unreadable_body", format!("the body could not be read: {}", rejection.body_text()))
        }
    })?;
    Ok((bytes, json))
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok());
        if !content_type.is_some_and(is_json) {
            return Err(not_json());
        }
        let (bytes, _) = read_body(request, state).await?;
        parse_json(&bytes).map(Self)
    }
}

/// A JSON body that may be left out (an empty body, or `null`, is `None`, as the old worker's clients send for
/// `queue/clean`); one that is given is read as [`ApiJson`] reads it.
#[derive(Debug, Clone, Default)]
pub struct OptionalJson<T>(pub Option<T>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (bytes, json) = read_body(request, state).await?;
        let raw = without_bom(&bytes);
        // No bytes at all, or `null` (as `JSON.stringify(null)` sends it), is no body; blank text is not JSON.
        if raw.is_empty() || raw.trim_ascii() == b"null" {
            return Ok(Self(None));
        }
        if !json {
            return Err(not_json());
        }
        parse_json(&bytes).map(|value| Self(Some(value)))
    }
}

/// An integer type that [`whole`] reads, with its range as its errors say it.
pub trait WholeNumber: TryFrom<i128> {
    /// The smallest value.
    const MIN: i128;
    /// The largest value.
    const MAX: i128;
}

macro_rules! whole_number {
    ($($type:ty),*) => {$(
        impl WholeNumber for $type {
            const MIN: i128 = <$type>::MIN as i128;
            const MAX: i128 = <$type>::MAX as i128;
        }
    )*};
}
whole_number!(i32, i64, usize);

/// Reads an optional integer field that a client may have written with a zero fraction (`3.0`, as Python's
/// `json` writes a float): JSON has one kind of number, and JSON Schema's `integer` takes `3.0`, so a field the
/// document calls `integer` takes what that allows. A fraction (`1.5`), a number outside the type's range and
/// any other type are refused, naming what was given. Use with `#[serde(default, deserialize_with = …)]`.
///
/// # Errors
/// serde's "invalid type" or "invalid value" error.
pub fn whole<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: WholeNumber,
{
    use serde::de::{Error, Unexpected, Visitor};

    struct Whole<T>(std::marker::PhantomData<T>);

    impl<T: WholeNumber> Whole<T> {
        fn fit<E: Error>(&self, value: i128, given: Unexpected<'_>) -> Result<Option<T>, E> {
            T::try_from(value).map(Some).map_err(|_| E::invalid_value(given, self))
        }
    }

    impl<'de, T: WholeNumber> Visitor<'de> for Whole<T> {
        type Value = Option<T>;

        fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(formatter, "a whole number from {} to {}", T::MIN, T::MAX)
        }

        fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D2: serde::Deserializer<'de>>(self, deserializer: D2) -> Result<Self::Value, D2::Error> {
            deserializer.deserialize_any(self)
        }

        fn visit_i64<E: Error>(self, value: i64) -> Result<Self::Value, E> {
            self.fit(i128::from(value), Unexpected::Signed(value))
        }

        fn visit_u64<E: Error>(self, value: u64) -> Result<Self::Value, E> {
            self.fit(i128::from(value), Unexpected::Unsigned(value))
        }

        fn visit_f64<E: Error>(self, value: f64) -> Result<Self::Value, E> {
            // Below 2^100 a whole f64 converts to i128 exactly; anything that large is out of range anyway.
            if value.is_finite() && value.fract() == 0.0 && value.abs() < 1e30 {
                #[allow(clippy::cast_possible_truncation, reason = "whole and far inside i128: exact")]
                return self.fit(value as i128, Unexpected::Float(value));
            }
            Err(E::invalid_value(Unexpected::Float(value), &self))
        }
    }

    deserializer.deserialize_option(Whole(std::marker::PhantomData))
}

/// Path parameters; a bad one is a 400 naming it.
#[derive(Debug, Clone)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|path| Self(path.0))
            .map_err(|rejection| ApiError::bad_request("invalid_path", rejection.body_text()))
    }
}

/// Query parameters; a bad one is a 400 naming it.
#[derive(Debug, Clone)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let deserializer = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer).map(Self).map_err(|error| {
            let path = error.path().to_string();
            let inner = error.into_inner().to_string();
            let field = quoted(&inner).map(str::to_string).or_else(|| Some(path).filter(|p| p != "."));
            let error = ApiError::bad_request("invalid_query", format!("query string: {inner}"));
            match field {
                Some(field) => error.with_details(json!({ "field": field })),
                None => error,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Numbers {
        #[serde(default, deserialize_with = "whole")]
        signed: Option<i64>,
        #[serde(default, deserialize_with = "whole")]
        count: Option<usize>,
        #[serde(default, deserialize_with = "whole")]
        small: Option<i32>,
    }

    type Read = (Option<i64>, Option<usize>, Option<i32>);

    fn read(body: &str) -> Result<Read, ApiError> {
        parse_json::<Numbers>(body.as_bytes()).map(|n| (n.signed, n.count, n.small))
    }

    #[test]
    fn integer_fields_take_whole_numbers_written_with_a_zero_fraction() {
        assert_eq!(read("{}").unwrap(), (None, None, None));
        assert_eq!(read(r#"{"signed": null, "count": null, "small": null}"#).unwrap(), (None, None, None));
        assert_eq!(
            read(r#"{"signed": -393, "count": 15607, "small": 7}"#).unwrap(),
            (Some(-393), Some(15607), Some(7))
        );
        assert_eq!(
            read(r#"{"signed": -393.0, "count": 15607.0, "small": 7e0}"#).unwrap(),
            (Some(-393), Some(15607), Some(7))
        );
        assert_eq!(read(r#"{"signed": -9223372036854775808.0}"#).unwrap().0, Some(i64::MIN));
        for (body, field, says) in [
            (r#"{"signed": 1.5}"#, "signed", "floating point `1.5`"),
            (r#"{"signed": "3"}"#, "signed", "string \"3\""),
            (r#"{"signed": 1e20}"#, "signed", "a whole number from -9223372036854775808 to 9223372036854775807"),
            (r#"{"signed": 9223372036854775808}"#, "signed", "integer `9223372036854775808`"),
            (r#"{"count": -1}"#, "count", "from 0 to 18446744073709551615"),
            (r#"{"count": 1e300}"#, "count", "floating point"),
            (r#"{"small": 2147483648}"#, "small", "from -2147483648 to 2147483647"),
            (r#"{"small": true}"#, "small", "boolean"),
        ] {
            let error = read(body).expect_err(body);
            assert_eq!(
                (error.code, error.details().map(|d| d["field"].clone())),
                ("invalid_field", Some(json!(field))),
                "{body}"
            );
            assert!(error.message.contains(says), "{body}: {}", error.message);
        }
    }
}
