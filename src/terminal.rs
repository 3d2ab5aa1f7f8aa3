//! Text for a terminal, written safely: names, ids and messages that came from files, programs or other people
//! have their control characters escaped (so they cannot move the cursor, recolour or fake lines), and a
//! stdout whose reader went away (`echo-worker validate | head -1`) ends the output quietly instead of
//! panicking.

use std::borrow::Cow;
use std::fmt::Display;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

/// `text` with every control character (C0, DEL, C1) and bidirectional override written as `\u{…}`.
pub fn escape(text: &str) -> Cow<'_, str> {
    escape_with(text, false)
}

/// Like [`escape`], but keeps line breaks, for text of several lines.
pub fn escape_lines(text: &str) -> Cow<'_, str> {
    escape_with(text, true)
}

fn escape_with(text: &str, keep_newlines: bool) -> Cow<'_, str> {
    let unsafe_char = |c: char| (c.is_control() && !(keep_newlines && c == '\n')) || is_bidi_control(c);
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            escaped.extend(c.escape_unicode());
        } else {
            escaped.push(c);
        }
    }
    Cow::Owned(escaped)
}

/// Characters that reorder what is shown (U+202A–U+202E, U+2066–U+2069), so a line reads differently from
/// what it contains.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Set once stdout's reader has gone away; later output is dropped.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `text` to stdout and flushes it.
///
/// A broken pipe is not an error: the reader asked for no more, so this and every later write are dropped
/// and the command ends with its own exit code.
///
/// # Errors
/// Any other write error (a full disk behind a redirection).
pub fn print(text: impl Display) -> std::io::Result<()> {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    match write!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        result => result,
    }
}

/// Writes `text` and a line break to stdout; see [`print`].
///
/// # Errors
/// As [`print`].
pub fn println(text: impl Display) -> std::io::Result<()> {
    print(format_args!("{text}\n"))
}

/// Writes `text` and a line break to stderr, dropping it when stderr is a closed pipe
/// (`echo-worker validate 2>&1 | head -1`); stderr is for people, so no error is returned.
pub fn eprintln(text: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_in_ids_are_escaped() {
        assert_eq!(escape("plain-id_1 é"), "plain-id_1 é");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(escape("a\u{1b}[31mred\u{7}"), "a\\u{1b}[31mred\\u{7}");
        assert_eq!(escape("x\ny\rz\u{9b}w"), "x\\u{a}y\\u{d}z\\u{9b}w");
        assert_eq!(escape("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(escape_lines("one\ntwo\u{1b}"), "one\ntwo\\u{1b}");
    }
}
