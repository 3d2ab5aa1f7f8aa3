//! Subtitles: SubRip (SRT) and WebVTT made from a transcript's timed segments (ARCHITECTURE.md). The `whisper`
//! stage writes them into its output, and the API serves them for a completed recording from the segments its
//! `result` keeps, so both make them here, the same way.
//!
//! Rules, as players and AssemblyAI's exports follow them:
//! - cues are numbered from 1 (SRT); SRT times are `HH:MM:SS,mmm`, VTT times `HH:MM:SS.mmm`, and a VTT file
//!   starts with `WEBVTT` and a blank line;
//! - a cue holds at most [`MAX_LINES`] lines of about [`LINE_WIDTH`] characters, broken between words; a longer
//!   segment becomes several cues, its time shared out in proportion to their characters;
//! - segments with no text are skipped; whitespace (line breaks included, which would end a cue early) is
//!   collapsed to single spaces;
//! - VTT cue text escapes `&`, `<` and `>` (so it never holds `-->`); SRT has no escapes, so an `-->` in the text
//!   is written `->`.

use serde::Deserialize;
use serde_json::Value;

/// Characters per subtitle line: the usual broadcast limit, readable on a phone.
pub const LINE_WIDTH: usize = 42;
/// Lines per cue.
pub const MAX_LINES: usize = 2;

/// One timed piece of a transcript.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Cue {
    /// Start, seconds from the beginning of the recording.
    pub start: f64,
    /// End, seconds.
    pub end: f64,
    /// What was said.
    pub text: String,
}

/// Why segments could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubtitleError {
    /// The value holding the segments is not a list.
    #[error("the transcript segments are not a list (found {found})")]
    NotAList {
        /// The JSON type found instead.
        found: &'static str,
    },
    /// One segment lacks a field or has one of the wrong type.
    #[error("transcript segment {index}: {reason}")]
    BadSegment {
        /// Its position in the list, from 0.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// Reads a JSON list of `{ start, end, text }` segments (the `whisper` stage's `segments`). Other fields are
/// ignored; a negative start counts as 0 and an end before the start as the start.
///
/// # Errors
/// [`SubtitleError`] naming the segment that cannot be read.
pub fn cues_from(value: &Value) -> Result<Vec<Cue>, SubtitleError> {
    let items = value.as_array().ok_or(SubtitleError::NotAList { found: json_type(value) })?;
    items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let cue: Cue = serde_json::from_value(item.clone())
                .map_err(|error| SubtitleError::BadSegment { index, reason: error.to_string() })?;
            if !cue.start.is_finite() || !cue.end.is_finite() {
                return Err(SubtitleError::BadSegment { index, reason: "times must be finite numbers".into() });
            }
            let start = cue.start.max(0.0);
            Ok(Cue { start, end: cue.end.max(start), text: cue.text })
        })
        .collect()
}

/// The segments a completed recording's `result` keeps: `whisper_segments` (what the shipped pipelines
/// persist), else `segments`, else the `segments` of a stage output stored under its stage id (what a job
/// without a `persist` stage leaves). `None` when there are none.
pub fn segments_in(result: &Value) -> Option<&Value> {
    let object = result.as_object()?;
    object
        .get("whisper_segments")
        .or_else(|| object.get("segments"))
        .filter(|value| value.is_array())
        .or_else(|| object.values().find_map(|value| value.get("segments").filter(|s| s.is_array())))
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The transcript as plain text: the cues' text joined by spaces.
pub fn plain_text(cues: &[Cue]) -> String {
    cues.iter().map(|cue| squash(&cue.text)).filter(|text| !text.is_empty()).collect::<Vec<_>>().join(" ")
}

/// SubRip subtitles.
pub fn srt(cues: &[Cue]) -> String {
    let mut out = String::new();
    for (index, (start, end, lines)) in shaped(cues).into_iter().enumerate() {
        let text: Vec<String> = lines.iter().map(|line| line.replace("-->", "->")).collect();
        out.push_str(&format!(
            "{}\n{} --> {}\n{}\n\n",
            index + 1,
            timestamp(start, ','),
            timestamp(end, ','),
            text.join("\n")
        ));
    }
    out
}

/// WebVTT subtitles.
pub fn vtt(cues: &[Cue]) -> String {
    let mut out = String::from("WEBVTT\n\n");
    for (start, end, lines) in shaped(cues) {
        let text: Vec<String> = lines.iter().map(|line| escape_vtt(line)).collect();
        out.push_str(&format!("{} --> {}\n{}\n\n", timestamp(start, '.'), timestamp(end, '.'), text.join("\n")));
    }
    out
}

/// `&`, `<` and `>` as character references, as WebVTT cue text requires (which also rules out `-->`).
fn escape_vtt(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// `HH:MM:SS` then `separator` then milliseconds; hours grow past two digits when they must.
fn timestamp(seconds: f64, separator: char) -> String {
    let millis = (seconds.max(0.0) * 1000.0).round() as u64;
    let (hours, rest) = (millis / 3_600_000, millis % 3_600_000);
    format!("{hours:02}:{:02}:{:02}{separator}{:03}", rest / 60_000, rest % 60_000 / 1000, rest % 1000)
}

/// Whitespace collapsed to single spaces, ends trimmed.
fn squash(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Every cue as (start, end, lines): empty ones dropped, long ones split into cues of at most [`MAX_LINES`]
/// lines, each piece given a share of the cue's time in proportion to its characters.
fn shaped(cues: &[Cue]) -> Vec<(f64, f64, Vec<String>)> {
    let mut out = Vec::new();
    for cue in cues {
        let lines = wrap(&squash(&cue.text));
        if lines.is_empty() {
            continue;
        }
        let pieces: Vec<Vec<String>> = lines.chunks(MAX_LINES).map(balance).collect();
        let weights: Vec<usize> = pieces.iter().map(|lines| lines.iter().map(|l| l.chars().count()).sum()).collect();
        let total = weights.iter().sum::<usize>().max(1) as f64;
        let length = cue.end - cue.start;
        let mut done = 0usize;
        for (index, (lines, weight)) in pieces.into_iter().zip(&weights).enumerate() {
            let start = cue.start + length * done as f64 / total;
            done += weight;
            let end = if index + 1 == weights.len() { cue.end } else { cue.start + length * done as f64 / total };
            out.push((start, end, lines));
        }
    }
    out
}

/// Lines of at most [`LINE_WIDTH`] characters, broken between words; a word longer than a line is cut.
fn wrap(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        while word.len() > LINE_WIDTH {
            if !line.is_empty() {
                lines.push(std::mem::take(&mut line));
            }
            lines.push(word.drain(..LINE_WIDTH).collect());
        }
        let word: String = word.into_iter().collect();
        if word.is_empty() {
            continue;
        }
        let needed =
            if line.is_empty() { word.chars().count() } else { line.chars().count() + 1 + word.chars().count() };
        if needed > LINE_WIDTH {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// Two greedy lines re-broken at the word boundary that makes the longer of them shortest, so a cue reads as
/// two even lines rather than a full one and a stub. One line, or lines that cannot be re-broken, stay.
fn balance(lines: &[String]) -> Vec<String> {
    let [first, second] = lines else { return lines.to_vec() };
    let words: Vec<&str> = first.split(' ').chain(second.split(' ')).collect();
    let width = |part: &[&str]| part.iter().map(|w| w.chars().count()).sum::<usize>() + part.len().saturating_sub(1);
    let best = (1..words.len())
        .filter(|&at| width(&words[..at]) <= LINE_WIDTH && width(&words[at..]) <= LINE_WIDTH)
        .min_by_key(|&at| (width(&words[..at]).max(width(&words[at..])), at));
    match best {
        Some(at) => vec![words[..at].join(" "), words[at..].join(" ")],
        None => lines.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cue(start: f64, end: f64, text: &str) -> Cue {
        Cue { start, end, text: text.into() }
    }

    /// Reads SRT or VTT back into (start, end, text with lines joined by spaces), checking numbering and shape.
    fn parse(text: &str, vtt: bool) -> Vec<(f64, f64, String)> {
        let body = if vtt {
            text.strip_prefix("WEBVTT\n\n").expect("a VTT file starts with WEBVTT and a blank line")
        } else {
            text
        };
        let seconds = |stamp: &str| -> f64 {
            let separator = if vtt { '.' } else { ',' };
            let (clock, millis) = stamp.split_once(separator).unwrap_or_else(|| panic!("bad timestamp {stamp}"));
            let parts: Vec<u64> = clock.split(':').map(|p| p.parse().unwrap()).collect();
            assert_eq!(parts.len(), 3, "{stamp}");
            assert_eq!(millis.len(), 3, "{stamp}");
            (parts[0] * 3600 + parts[1] * 60 + parts[2]) as f64 + millis.parse::<f64>().unwrap() / 1000.0
        };
        let mut cues = Vec::new();
        for (index, block) in body.split("\n\n").filter(|block| !block.is_empty()).enumerate() {
            let mut lines = block.lines();
            if !vtt {
                assert_eq!(lines.next().unwrap(), (index + 1).to_string(), "cues are numbered from 1");
            }
            let (start, end) = lines.next().unwrap().split_once(" --> ").expect("a timing line");
            let text: Vec<String> = lines
                .map(|line| {
                    if vtt { line.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") } else { line.into() }
                })
                .collect();
            assert!((1..=MAX_LINES).contains(&text.len()), "{block:?}");
            assert!(text.iter().all(|line| line.chars().count() <= LINE_WIDTH), "{block:?}");
            cues.push((seconds(start), seconds(end), text.join(" ")));
        }
        cues
    }

    #[test]
    fn timestamps_use_a_comma_in_srt_and_a_dot_in_vtt() {
        let cues = [cue(62.345, 3723.5, "hello")];
        assert_eq!(srt(&cues), "1\n00:01:02,345 --> 01:02:03,500\nhello\n\n");
        assert_eq!(vtt(&cues), "WEBVTT\n\n00:01:02.345 --> 01:02:03.500\nhello\n\n");
        assert_eq!(timestamp(0.0004, ','), "00:00:00,000");
        assert_eq!(timestamp(0.0005, ','), "00:00:00,001", "rounded to the millisecond");
        assert_eq!(timestamp(-3.0, '.'), "00:00:00.000", "never negative");
        assert_eq!(timestamp(360_000.0, '.'), "100:00:00.000", "hours grow past two digits");
    }

    #[test]
    fn cues_are_numbered_from_one_and_empty_segments_are_skipped() {
        let cues = [cue(0.0, 1.0, "one"), cue(1.0, 2.0, "  "), cue(2.0, 3.0, ""), cue(3.0, 4.0, "two")];
        assert_eq!(srt(&cues), "1\n00:00:00,000 --> 00:00:01,000\none\n\n2\n00:00:03,000 --> 00:00:04,000\ntwo\n\n");
        assert_eq!(vtt(&[cue(0.0, 1.0, " \n ")]), "WEBVTT\n\n", "nothing but the header");
        assert_eq!(srt(&[]), "");
    }

    #[test]
    fn line_breaks_inside_a_segment_cannot_end_its_cue() {
        let out = srt(&[cue(0.0, 1.0, "first\n\nsecond\r\nthird")]);
        assert_eq!(out, "1\n00:00:00,000 --> 00:00:01,000\nfirst second third\n\n");
    }

    #[test]
    fn long_text_wraps_to_two_even_lines_of_at_most_42_characters() {
        let text = "we agreed to ship the release on friday after the final review";
        assert!(text.len() > LINE_WIDTH && text.len() <= 2 * LINE_WIDTH);
        let out = srt(&[cue(0.0, 5.0, text)]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[2], "we agreed to ship the release");
        assert_eq!(lines[3], "on friday after the final review");
        assert_eq!(lines.len(), 5, "one cue of two lines: {out:?}");
        let short = "exactly forty-two characters in this line.";
        assert_eq!(short.len(), LINE_WIDTH);
        assert_eq!(wrap(short), [short], "42 characters fit on one line");
    }

    #[test]
    fn text_longer_than_two_lines_becomes_several_cues_sharing_the_time() {
        let words: Vec<String> = (0..40).map(|i| format!("word{i:02}")).collect();
        let text = words.join(" ");
        let out = srt(&[cue(10.0, 20.0, &text)]);
        let parsed = parse(&out, false);
        assert!(parsed.len() >= 3, "{out}");
        assert_eq!(parsed.first().unwrap().0, 10.0);
        assert_eq!(parsed.last().unwrap().1, 20.0);
        for pair in parsed.windows(2) {
            assert_eq!(pair[0].1, pair[1].0, "pieces follow each other without gaps or overlaps");
            assert!(pair[0].0 < pair[0].1);
        }
        let rejoined: Vec<String> = parsed.into_iter().map(|(_, _, text)| text).collect();
        assert_eq!(rejoined.join(" "), text, "no word lost or repeated");
    }

    #[test]
    fn a_word_longer_than_a_line_is_cut() {
        let long = "x".repeat(100);
        let lines = wrap(&format!("see {long} now"));
        assert_eq!(lines, ["see".to_string(), "x".repeat(42), "x".repeat(42), format!("{} now", "x".repeat(16))]);
    }

    #[test]
    fn vtt_text_is_escaped_and_srt_text_cannot_hold_an_arrow() {
        let cues = [cue(0.0, 1.0, "a --> b & <c>")];
        assert!(vtt(&cues).ends_with("\na --&gt; b &amp; &lt;c&gt;\n\n"), "{}", vtt(&cues));
        assert!(!vtt(&cues).split("\n\n").nth(1).unwrap().lines().nth(1).unwrap().contains("-->"));
        assert!(srt(&cues).ends_with("\na -> b & <c>\n\n"), "{}", srt(&cues));
    }

    #[test]
    fn subtitles_parse_back_to_the_segments() {
        let cues = vec![
            cue(0.0, 2.5, "Good morning everyone."),
            cue(2.5, 7.25, "Today we look at the quarterly figures and what they mean for the team in the spring."),
            cue(7.25, 7.25, "   "),
            cue(3599.999, 3601.001, "Past the hour & still going <loud>."),
        ];
        for vtt_format in [false, true] {
            let text = if vtt_format { vtt(&cues) } else { srt(&cues) };
            let parsed = parse(&text, vtt_format);
            let spoken: Vec<String> = parsed
                .iter()
                .map(|(_, _, t)| t.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
                .collect();
            assert_eq!(spoken.join(" "), plain_text(&cues), "{text}");
            assert_eq!((parsed[0].0, parsed[0].1), (0.0, 2.5));
            let last = parsed.last().unwrap();
            assert!((last.0 - 3599.999).abs() < 1e-6 && (last.1 - 3601.001).abs() < 1e-6, "{last:?}");
        }
    }

    #[test]
    fn segments_are_read_from_json_with_the_failing_one_named() {
        let value = json!([{ "start": -1.0, "end": 2.0, "text": "a", "avg_logprob": -0.2 }, { "start": 3.0, "end": 1.0, "text": "b" }]);
        assert_eq!(cues_from(&value).unwrap(), [cue(0.0, 2.0, "a"), cue(3.0, 3.0, "b")]);
        let error =
            cues_from(&json!([{ "start": 0, "end": 1, "text": "ok" }, { "start": 1, "text": "no end" }])).unwrap_err();
        assert_eq!(error.to_string(), "transcript segment 1: missing field `end`");
        let error = cues_from(&json!({ "start": 0 })).unwrap_err();
        assert_eq!(error.to_string(), "the transcript segments are not a list (found an object)");
    }

    #[test]
    fn segments_are_found_where_pipelines_keep_them() {
        let list = json!([{ "start": 0, "end": 1, "text": "x" }]);
        assert_eq!(segments_in(&json!({ "summary": "s", "whisper_segments": list })), Some(&list));
        assert_eq!(segments_in(&json!({ "segments": list })), Some(&list));
        assert_eq!(segments_in(&json!({ "transcript": { "text": "x", "segments": list } })), Some(&list));
        assert_eq!(segments_in(&json!({ "summary": "s" })), None);
        assert_eq!(segments_in(&json!("text")), None);
    }
}
