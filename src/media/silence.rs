//! Silences reported by ffmpeg's `silencedetect`, and where to cut a recording into chunks so that each chunk
//! stays under a length limit and, when asked, every cut falls in the middle of a silence.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One silent interval, in seconds from the start.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Silence {
    /// Where it starts.
    pub start: f64,
    /// Where it ends.
    pub end: f64,
}

impl Silence {
    /// Its midpoint, where a cut goes.
    pub fn middle(&self) -> f64 {
        (self.start + self.end) / 2.0
    }
}

/// Collects silences from silencedetect's stderr lines (`silence_start: 19.99` then
/// `silence_end: 22.00 | silence_duration: 2.01`).
#[derive(Debug, Default)]
pub struct SilenceLog {
    open: Option<f64>,
    /// The complete intervals seen so far.
    pub silences: Vec<Silence>,
}

impl SilenceLog {
    /// Feeds one stderr line.
    pub fn feed(&mut self, line: &str) {
        let number = |marker: &str| {
            line.split_once(marker)
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .and_then(|text| text.parse::<f64>().ok())
        };
        if let Some(start) = number("silence_start: ") {
            self.open = Some(start.max(0.0));
        } else if let Some(end) = number("silence_end: ")
            && let Some(start) = self.open.take()
        {
            self.silences.push(Silence { start, end });
        }
    }

    /// Ends the log; a silence still open runs to `duration`.
    pub fn finish(mut self, duration: f64) -> Vec<Silence> {
        if let Some(start) = self.open.take() {
            self.silences.push(Silence { start, end: duration });
        }
        self.silences
    }
}

/// The level under which audio counts as silence, as ffmpeg's `silencedetect` reads it: decibels (`"-30dB"`,
/// from -200 to 0) or an amplitude ratio (`"0.03"`, from 0 to 1).
///
/// It is checked when read because it is pasted into an ffmpeg filter expression, where `:`, `,`, `;` or `[`
/// would add options or whole filters.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseLevel(String);

/// A silence threshold that is not decibels or a ratio in range; it quotes the literal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid silence threshold `{0}`: expected decibels from -200dB to 0dB such as \"-30dB\", or an amplitude ratio from 0 to 1 such as \"0.03\""
)]
pub struct NoiseLevelError(pub String);

impl NoiseLevel {
    /// Reads a threshold literal.
    ///
    /// # Errors
    /// [`NoiseLevelError`] for anything but a plain decimal number (with `dB`) in range.
    pub fn parse(text: &str) -> Result<Self, NoiseLevelError> {
        let bad = || NoiseLevelError(text.to_string());
        let (number, decibels) = match text.strip_suffix("dB") {
            Some(number) => (number, true),
            None => (text, false),
        };
        let digits = number.strip_prefix('-').unwrap_or(number);
        let plain = !digits.is_empty()
            && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
            && digits.matches('.').count() <= 1
            && digits.chars().any(|c| c.is_ascii_digit());
        let value: f64 = if plain { number.parse().map_err(|_| bad())? } else { return Err(bad()) };
        let in_range = if decibels { (-200.0..=0.0).contains(&value) } else { (0.0..=1.0).contains(&value) };
        if in_range { Ok(Self(text.to_string())) } else { Err(bad()) }
    }
}

impl fmt::Display for NoiseLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for NoiseLevel {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NoiseLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for NoiseLevel {
    fn schema_name() -> Cow<'static, str> {
        Cow::Borrowed("NoiseLevel")
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^(-?[0-9]+(\\.[0-9]+)?dB|[01](\\.[0-9]+)?)$",
            "description": "Decibels such as \"-30dB\" (-200dB to 0dB) or an amplitude ratio such as \"0.03\" (0 to 1)."
        })
    }
}

/// Cut points (seconds) that split `duration` into chunks of at most `max_chunk` seconds.
///
/// Without silences the chunks are of equal length. With silences, each cut is the middle of the latest
/// silence that keeps the chunk within `max_chunk` and makes it at least half of `max_chunk` long, and falls
/// back to the limit itself when no silence qualifies.
pub fn cut_points(duration: f64, max_chunk: f64, silences: Option<&[Silence]>) -> Vec<f64> {
    if !(duration.is_finite() && max_chunk.is_finite()) || max_chunk <= 0.0 || duration <= max_chunk {
        return Vec::new();
    }
    let Some(silences) = silences else {
        let count = (duration / max_chunk).ceil();
        let length = duration / count;
        return (1..count as usize).map(|index| length * index as f64).collect();
    };
    let mut cuts = Vec::new();
    let mut start = 0.0;
    while duration - start > max_chunk {
        let limit = start + max_chunk;
        let earliest = start + max_chunk / 2.0;
        let cut = silences
            .iter()
            .map(Silence::middle)
            .filter(|middle| *middle >= earliest && *middle <= limit && *middle < duration)
            .fold(None, |best: Option<f64>, middle| Some(best.map_or(middle, |best| best.max(middle))))
            .unwrap_or(limit);
        // Rounding can put `start + max_chunk` on `duration` itself while `duration - start` is still above the
        // limit by a hair; a cut there would leave an empty last chunk.
        if cut >= duration {
            break;
        }
        cuts.push(cut);
        start = cut;
    }
    cuts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_threshold_is_decibels_or_a_ratio_and_nothing_else() {
        for good in ["-30dB", "-35.5dB", "0dB", "-200dB", "0.03", "0", "1", "0.5"] {
            assert_eq!(NoiseLevel::parse(good).map(|level| level.to_string()).as_deref(), Ok(good));
        }
        for bad in [
            "",
            "dB",
            "-dB",
            "30dB",
            "-201dB",
            "1.5",
            "-0.1",
            "-30db",
            "-30 dB",
            "1e-3",
            "inf",
            "NaN",
            "..5",
            "-1.2.3dB",
            "-30dB:d=0",
            "-30dB,amovie=/etc/passwd",
            "0.1;x",
            "-30dB[out]",
        ] {
            assert!(NoiseLevel::parse(bad).is_err(), "`{bad}` should be refused");
        }
    }

    #[test]
    fn reads_silencedetect_lines() {
        let mut log = SilenceLog::default();
        log.feed("[silencedetect @ 0x55] silence_start: 19.9999");
        log.feed("[silencedetect @ 0x55] silence_end: 22.0001 | silence_duration: 2.00025");
        log.feed("size=N/A time=00:00:30.00 bitrate=N/A");
        log.feed("[silencedetect @ 0x55] silence_start: 40.5");
        assert_eq!(log.finish(45.0), [Silence { start: 19.9999, end: 22.0001 }, Silence { start: 40.5, end: 45.0 }]);
    }

    #[test]
    fn equal_chunks_without_silences() {
        assert_eq!(cut_points(3000.0, 599.0, None).len(), 5, "3000 s in chunks of at most 599 s is 6 chunks");
        let cuts = cut_points(3000.0, 599.0, None);
        assert!((cuts[0] - 500.0).abs() < 1e-9, "{cuts:?}");
        assert!(cut_points(100.0, 600.0, None).is_empty());
    }

    #[test]
    fn cuts_go_in_the_latest_silence_before_the_limit() {
        let silences = [
            Silence { start: 100.0, end: 102.0 },
            Silence { start: 500.0, end: 504.0 },
            Silence { start: 560.0, end: 562.0 },
            Silence { start: 1150.0, end: 1152.0 },
        ];
        let cuts = cut_points(1500.0, 600.0, Some(&silences));
        assert_eq!(cuts, [561.0, 1151.0]);
        // No usable silence: cut at the limit.
        assert_eq!(cut_points(1300.0, 600.0, Some(&[])), [600.0, 1200.0]);
    }

    #[test]
    fn every_equal_chunk_cut_is_a_multiple_of_the_chunk_length() {
        assert_eq!(cut_points(3000.0, 599.0, None), [500.0, 1000.0, 1500.0, 2000.0, 2500.0]);
    }

    #[test]
    fn endless_unknown_or_non_positive_lengths_give_no_cuts() {
        // Each of these would otherwise ask for an endless list of cuts.
        assert!(cut_points(f64::INFINITY, 600.0, None).is_empty());
        assert!(cut_points(100.0, 0.0, None).is_empty());
        assert!(cut_points(f64::INFINITY, 600.0, Some(&[])).is_empty());
        assert!(cut_points(100.0, -5.0, Some(&[])).is_empty());
        assert!(cut_points(f64::NAN, 600.0, None).is_empty());
        assert!(cut_points(100.0, f64::NAN, Some(&[])).is_empty());
        assert!(cut_points(100.0, f64::INFINITY, None).is_empty());
    }

    #[test]
    fn a_remainder_of_exactly_the_limit_needs_no_further_cut() {
        assert_eq!(cut_points(1200.0, 600.0, Some(&[])), [600.0]);
        assert_eq!(cut_points(1200.0, 600.0, None), [600.0]);
        // Not even at a silence inside that remainder.
        assert_eq!(cut_points(1200.0, 600.0, Some(&[Silence { start: 999.0, end: 1001.0 }])), [600.0]);
    }

    #[test]
    fn a_remainder_within_the_limit_is_not_cut_again_at_a_silence() {
        let silences = [Silence { start: 499.0, end: 501.0 }, Silence { start: 849.0, end: 851.0 }];
        assert_eq!(cut_points(1000.0, 600.0, Some(&silences)), [500.0]);
    }

    #[test]
    fn a_silence_before_half_the_limit_is_passed_over() {
        let early = [Silence { start: 100.0, end: 102.0 }];
        assert_eq!(cut_points(1000.0, 600.0, Some(&early)), [600.0]);
    }

    #[test]
    fn a_silence_at_exactly_half_the_limit_is_a_cut() {
        // The contract: a chunk at least half of `max_chunk` long.
        let half = [Silence { start: 299.0, end: 301.0 }];
        assert_eq!(cut_points(1000.0, 600.0, Some(&half)), [300.0, 900.0]);
    }

    #[test]
    fn no_cut_falls_on_the_end_when_rounding_puts_the_limit_there() {
        // 1100 - first is a hair above 600, yet first + 600 rounds to exactly 1100.
        let first = 500.0 - 2f64.powi(-43);
        assert!(1100.0 - first > 600.0 && first + 600.0 == 1100.0);
        let at_first = Silence { start: first, end: first };
        assert_eq!(cut_points(1100.0, 600.0, Some(&[at_first])), [first]);
        // A silence whose middle is the very end is no cut either; the latest one before it is.
        let inner = Silence { start: 899.0, end: 901.0 };
        let at_end = Silence { start: 1099.0, end: 1101.0 };
        assert_eq!(cut_points(1100.0, 600.0, Some(&[at_first, inner, at_end])), [first, 900.0]);
    }
}
