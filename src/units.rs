//! Human-friendly literals used in pipeline, plugin and settings files: durations (`"10m"`, `"1h30m"`,
//! `"500ms"`), byte sizes (`"500MB"`, `"24MiB"`) and audio bitrates (`"32k"`).
//!
//! They live in one place so that every file format spells them the same way and every bad literal gets the
//! same error, which names the literal and says what would have been accepted.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A duration written as a sequence of `<number><unit>` parts: `ms`, `s`, `m`, `h` or `d` (`"1h30m"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub std::time::Duration);

/// A byte count written as `<number><unit>`: `B`, `KB`/`MB`/`GB`/`TB` (powers of 1000) or
/// `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024). A bare integer counts bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

/// An audio bitrate in bits per second, written as `"32k"` or `"32000"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bitrate(pub u32);

/// Why a literal could not be read; the message quotes the literal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Not a duration.
    #[error("invalid duration `{literal}`: {reason}")]
    Duration {
        /// The text that was given.
        literal: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Not a byte size.
    #[error("invalid size `{literal}`: {reason}")]
    Size {
        /// The text that was given.
        literal: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Not a bitrate.
    #[error("invalid bitrate `{literal}`: expected a number of bits per second such as \"32k\" or \"64000\"")]
    Bitrate {
        /// The text that was given.
        literal: String,
    },
}

const DURATION_HINT: &str = "expected parts like \"500ms\", \"30s\", \"10m\", \"1h30m\" or \"2d\"";
const SIZE_HINT: &str = "expected a number with a unit such as \"500MB\", \"24MiB\" or \"2GB\"";

impl HumanDuration {
    /// Reads a duration literal.
    ///
    /// # Errors
    /// [`UnitError::Duration`] when the text is empty, has no unit, or has an unknown unit.
    pub fn parse(text: &str) -> Result<Self, UnitError> {
        let bad = || UnitError::Duration { literal: text.to_string(), reason: DURATION_HINT };
        let mut rest = text.trim();
        if rest.is_empty() {
            return Err(bad());
        }
        let mut total = std::time::Duration::ZERO;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
            if digits == 0 {
                return Err(bad());
            }
            let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            let millis_per_unit: u64 = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(bad()),
            };
            rest = &rest[unit_len..];
            let part = number.checked_mul(millis_per_unit).ok_or_else(bad)?;
            total = total.checked_add(std::time::Duration::from_millis(part)).ok_or_else(bad)?;
        }
        Ok(Self(total))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut millis = self.0.as_millis();
        if millis == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
            if millis >= size {
                write!(f, "{}{unit}", millis / size)?;
                millis %= size;
            }
        }
        Ok(())
    }
}

impl ByteSize {
    /// Reads a size literal.
    ///
    /// # Errors
    /// [`UnitError::Size`] when the text has no number, an unknown unit, or overflows 64 bits.
    pub fn parse(text: &str) -> Result<Self, UnitError> {
        let bad = || UnitError::Size { literal: text.to_string(), reason: SIZE_HINT };
        let trimmed = text.trim();
        let split = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let number: f64 = number.parse().map_err(|_| bad())?;
        let multiplier: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            _ => return Err(bad()),
        };
        let bytes = number * multiplier as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 || bytes.fract() != 0.0 {
            return Err(bad());
        }
        Ok(Self(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [("TiB", 1u64 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.0 >= size && self.0 % size == 0 {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        for (unit, size) in [("TB", 1_000_000_000_000u64), ("GB", 1_000_000_000), ("MB", 1_000_000), ("KB", 1_000)] {
            if self.0 >= size && self.0 % size == 0 {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl ByteSize {
    /// The size for people: `"518.4 MB"` (one decimal, powers of 1000), or the exact round figure when there is
    /// one (`"500 MB"`, `"24 MiB"`), or `"812 B"`. [`Display`](fmt::Display) stays the exact literal.
    pub fn human(self) -> HumanSize {
        HumanSize(self.0)
    }
}

/// A byte count printed for people; see [`ByteSize::human`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanSize(pub u64);

impl fmt::Display for HumanSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const DECIMAL: [(&str, u64); 4] =
            [("TB", 1_000_000_000_000), ("GB", 1_000_000_000), ("MB", 1_000_000), ("KB", 1_000)];
        const BINARY: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        let bytes = self.0;
        if bytes < 1000 {
            return write!(f, "{bytes} B");
        }
        for (unit, size) in DECIMAL.into_iter().chain(BINARY) {
            if bytes >= size && bytes % size == 0 && bytes / size < 1000 {
                return write!(f, "{} {unit}", bytes / size);
            }
        }
        let (unit, size) = DECIMAL.into_iter().find(|(_, size)| bytes >= *size).unwrap_or(("KB", 1_000));
        let value = bytes as f64 / size as f64;
        // 999.96 KB would round to "1000.0 KB"; say "1.0 MB" instead.
        match DECIMAL.iter().rev().find(|(_, bigger)| *bigger == size * 1000) {
            Some((bigger, _)) if (value * 10.0).round() >= 10_000.0 => write!(f, "1.0 {bigger}"),
            _ => write!(f, "{value:.1} {unit}"),
        }
    }
}

impl Bitrate {
    /// Reads a bitrate literal.
    ///
    /// # Errors
    /// [`UnitError::Bitrate`] for anything but digits with an optional `k` suffix.
    pub fn parse(text: &str) -> Result<Self, UnitError> {
        let bad = || UnitError::Bitrate { literal: text.to_string() };
        let (digits, factor) = match text.strip_suffix('k') {
            Some(digits) => (digits, 1000),
            None => (text, 1),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let value: u32 = digits.parse().map_err(|_| bad())?;
        value.checked_mul(factor).filter(|v| *v > 0).map(Self).ok_or_else(bad)
    }
}

impl fmt::Display for Bitrate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 % 1000 == 0 { write!(f, "{}k", self.0 / 1000) } else { write!(f, "{}", self.0) }
    }
}

/// Implements string (de)serialization and a string JSON schema with a pattern for one literal type.
macro_rules! string_literal {
    ($ty:ty, $name:literal, $pattern:literal, $description:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl JsonSchema for $ty {
            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({ "type": "string", "pattern": $pattern, "description": $description })
            }
        }
    };
}

string_literal!(
    HumanDuration,
    "Duration",
    "^([0-9]+(ms|s|m|h|d))+$",
    "A duration such as \"500ms\", \"30s\", \"10m\" or \"1h30m\"."
);
string_literal!(
    ByteSize,
    "ByteSize",
    "^[0-9]+(\\.[0-9]+)?\\s*(B|KB|kB|MB|GB|TB|KiB|MiB|GiB|TiB)?$",
    "A size such as \"500MB\" (powers of 1000) or \"24MiB\" (powers of 1024)."
);
string_literal!(Bitrate, "Bitrate", "^[0-9]+k?$", "An audio bitrate such as \"32k\".");

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Bitrate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"500MB\" or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size `{v}`: a size cannot be negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(HumanDuration::parse("10m").unwrap().0, Duration::from_secs(600));
        assert_eq!(HumanDuration::parse("1h30m").unwrap().0, Duration::from_secs(5400));
        assert_eq!(HumanDuration::parse("500ms").unwrap().0, Duration::from_millis(500));
        assert_eq!(HumanDuration::parse("1h30m").unwrap().to_string(), "1h30m");
        assert_eq!(HumanDuration::parse("0s").unwrap().to_string(), "0s");
        for bad in ["", "10", "m", "10x", "1.5h", "-1s", "10 m"] {
            let err = HumanDuration::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with(&format!("invalid duration `{bad}`")), "{err}");
        }
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(ByteSize::parse("500MB").unwrap().0, 500_000_000);
        assert_eq!(ByteSize::parse("24MiB").unwrap().0, 24 << 20);
        assert_eq!(ByteSize::parse("1.5GB").unwrap().0, 1_500_000_000);
        assert_eq!(ByteSize::parse("1024").unwrap().0, 1024);
        assert_eq!(ByteSize(24 << 20).to_string(), "24MiB");
        assert_eq!(ByteSize(500_000_000).to_string(), "500MB");
        for bad in ["", "MB", "500XB", "5e3MB", "0.5B"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn sizes_print_for_people_in_human_units() {
        assert_eq!(ByteSize(518_432_108).human().to_string(), "518.4 MB");
        assert_eq!(ByteSize(500_000_000).human().to_string(), "500 MB");
        assert_eq!(ByteSize(24 << 20).human().to_string(), "24 MiB");
        assert_eq!(ByteSize(812).human().to_string(), "812 B");
        assert_eq!(ByteSize(0).human().to_string(), "0 B");
        assert_eq!(ByteSize(1_234_567).human().to_string(), "1.2 MB");
        assert_eq!(ByteSize(1_500_000).human().to_string(), "1.5 MB");
        assert_eq!(ByteSize(2048).human().to_string(), "2 KiB");
        assert_eq!(ByteSize(999_960).human().to_string(), "1.0 MB");
        assert_eq!(ByteSize(1_500_000_000_000_001).human().to_string(), "1500.0 TB");
        assert_eq!(ByteSize(u64::MAX).human().to_string(), "18446744.1 TB");
    }

    #[test]
    fn bitrates_parse_and_print() {
        assert_eq!(Bitrate::parse("32k").unwrap().0, 32_000);
        assert_eq!(Bitrate::parse("64000").unwrap().to_string(), "64k");
        for bad in ["", "k", "32kb", "0k", "-3"] {
            assert!(Bitrate::parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
