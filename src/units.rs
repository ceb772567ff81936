//! Sizes, percentages and lengths of time as users write them (`64K`, `10G`, `10%`, `30s`), as
//! typed values.
//!
//! Kernel-facing units (`Bytes`, `Sectors`, `DataBlocks`, `MetaBlocks`) come from the
//! `devicemapper` crate and are re-exported so the rest of thinstack uses one set of types.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use devicemapper::{Bytes, DataBlocks, MetaBlocks, Sectors, SECTOR_SIZE};

const KIB: u64 = 1024;
const SUFFIXES: [(char, u32); 6] = [('K', 1), ('M', 2), ('G', 3), ('T', 4), ('P', 5), ('E', 6)];

/// A size in bytes, written as a whole number with an optional binary suffix:
/// `512`, `64K`, `10G`, `2T` (`K` = 1024). `KiB`/`KB` style suffixes are accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(u64);

impl ByteSize {
    /// A size of `bytes` bytes.
    pub const fn from_bytes(bytes: u64) -> Self {
        ByteSize(bytes)
    }

    /// `n` binary megabytes.
    pub const fn mib(n: u64) -> Self {
        ByteSize(n * KIB * KIB)
    }

    /// `n` binary gigabytes.
    pub const fn gib(n: u64) -> Self {
        ByteSize(n * KIB * KIB * KIB)
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// The size in 512-byte sectors, rounded down.
    pub fn sectors(self) -> Sectors {
        Sectors(self.0 / SECTOR_SIZE as u64)
    }

    /// A size from a count of 512-byte sectors.
    pub fn from_sectors(sectors: Sectors) -> Self {
        ByteSize(*sectors * SECTOR_SIZE as u64)
    }

    /// Whether this size is a whole multiple of `unit` (false for a zero unit).
    pub fn is_multiple_of(self, unit: ByteSize) -> bool {
        unit.0 != 0 && self.0.is_multiple_of(unit.0)
    }
}

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Nothing was written.
    #[error("empty size; write a whole number with an optional suffix K, M, G, T or P, such as \"64K\" or \"10G\"")]
    Empty,
    /// The text is not a number with a known suffix.
    #[error("\"{0}\" is not a size; write a whole number with an optional suffix K, M, G, T or P, such as \"64K\" or \"10G\"")]
    Malformed(String),
    /// The number does not fit in 64 bits of bytes.
    #[error("\"{0}\" is too large; sizes must be below 16E")]
    Overflow(String),
}

impl FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(text: &str) -> Result<Self, SizeError> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(SizeError::Empty);
        }
        let malformed = || SizeError::Malformed(text.to_string());
        let digits_end = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (digits, suffix) = trimmed.split_at(digits_end);
        if digits.is_empty() {
            return Err(malformed());
        }
        let number: u64 = digits
            .parse()
            .map_err(|_| SizeError::Overflow(text.to_string()))?;
        let power = suffix_power(suffix.trim()).ok_or_else(malformed)?;
        KIB.checked_pow(power)
            .and_then(|unit| number.checked_mul(unit))
            .map(ByteSize)
            .ok_or_else(|| SizeError::Overflow(text.to_string()))
    }
}

/// The power of 1024 a suffix stands for: "" = 0, "K"/"KiB"/"KB" = 1, and so on.
fn suffix_power(suffix: &str) -> Option<u32> {
    if suffix.is_empty() || suffix.eq_ignore_ascii_case("b") {
        return Some(0);
    }
    let mut chars = suffix.chars();
    let letter = chars.next()?.to_ascii_uppercase();
    let rest = chars.as_str();
    let valid_rest = rest.is_empty() || rest.eq_ignore_ascii_case("b") || rest == "iB";
    let (_, power) = SUFFIXES.iter().find(|(c, _)| *c == letter)?;
    valid_rest.then_some(*power)
}

impl fmt::Display for ByteSize {
    /// The largest suffix that represents the size exactly, so the text parses back to it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return write!(f, "0");
        }
        for (letter, power) in SUFFIXES.iter().rev() {
            let unit = KIB.pow(*power);
            if self.0.is_multiple_of(unit) {
                return write!(f, "{}{}", self.0 / unit, letter);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl ByteSize {
    /// A short human rendering with one decimal (`1.5G`), for status output.
    pub fn human(self) -> String {
        for (letter, power) in SUFFIXES.iter().rev() {
            let unit = KIB.pow(*power);
            if self.0 >= unit {
                return format!("{:.1}{}", self.0 as f64 / unit as f64, letter);
            }
        }
        format!("{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SizeVisitor)
    }
}

struct SizeVisitor;

impl serde::de::Visitor<'_> for SizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size such as \"64K\" or \"10G\", or a whole number of bytes")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ByteSize, E> {
        text.parse().map_err(E::custom)
    }

    fn visit_u64<E: serde::de::Error>(self, bytes: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(bytes))
    }

    fn visit_i64<E: serde::de::Error>(self, bytes: i64) -> Result<ByteSize, E> {
        u64::try_from(bytes)
            .map(ByteSize)
            .map_err(|_| E::custom(format!("{bytes} is negative; sizes are zero or more")))
    }

    /// JSON has one number type: `141.0` is the whole number 141 (JSON Schema agrees).
    fn visit_f64<E: serde::de::Error>(self, bytes: f64) -> Result<ByteSize, E> {
        // 2^64 is the first f64 past u64::MAX.
        if bytes >= 0.0 && bytes.fract() == 0.0 && bytes < 18_446_744_073_709_551_616.0 {
            Ok(ByteSize(bytes as u64))
        } else {
            Err(E::custom(format!(
                "{bytes} is not a whole number of bytes from 0 to 2^64-1"
            )))
        }
    }
}

/// A whole percentage from 0 to 100, written `10%` (a bare `10` is accepted too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Percent(u8);

impl Percent {
    /// A percentage; values above 100 are refused.
    pub fn new(value: u64) -> Result<Self, String> {
        u8::try_from(value)
            .ok()
            .filter(|v| *v <= 100)
            .map(Percent)
            .ok_or_else(|| format!("{value}% is out of range; percentages go from 0% to 100%"))
    }

    /// The value, 0 to 100.
    pub fn value(self) -> u8 {
        self.0
    }

    /// This share of `total`, rounded up so a threshold is never undershot.
    pub fn of(self, total: u64) -> u64 {
        (u128::from(total) * u128::from(self.0)).div_ceil(100) as u64
    }
}

impl FromStr for Percent {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        let digits = trimmed.strip_suffix('%').unwrap_or(trimmed).trim();
        let value: u64 = digits.parse().map_err(|_| {
            format!("\"{text}\" is not a percentage; write a whole number from 0 to 100 followed by %, such as \"10%\"")
        })?;
        Percent::new(value)
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PercentVisitor)
    }
}

struct PercentVisitor;

impl serde::de::Visitor<'_> for PercentVisitor {
    type Value = Percent;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a percentage such as \"10%\"")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Percent, E> {
        text.parse().map_err(E::custom)
    }

    fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Percent, E> {
        Percent::new(value).map_err(E::custom)
    }

    fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Percent, E> {
        u64::try_from(value)
            .map_err(|_| {
                E::custom(format!(
                    "{value}% is negative; percentages go from 0% to 100%"
                ))
            })
            .and_then(|v| Percent::new(v).map_err(E::custom))
    }
}

/// An overcommit ratio: virtual bytes per byte of pool data, such as `3.0`; `0` means no
/// limit. At most [`Ratio::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Ratio(f64);

impl Ratio {
    /// No limit.
    pub const NONE: Ratio = Ratio(0.0);
    /// The largest ratio taken: a million virtual bytes per byte is no limit at all.
    pub const MAX: f64 = 1_000_000.0;

    /// A ratio; negative, infinite, NaN and values above [`Ratio::MAX`] are refused.
    pub fn new(value: f64) -> Result<Self, String> {
        if value.is_finite() && (0.0..=Ratio::MAX).contains(&value) {
            Ok(Ratio(value))
        } else {
            Err(format!(
                "{value} is not a ratio thinstack takes; write one from 0 (no limit) to {}, such as 3.0",
                Ratio::MAX
            ))
        }
    }

    /// The ratio; 0 for no limit.
    pub fn value(self) -> f64 {
        self.0
    }

    /// The limit, `None` for no limit.
    pub fn limit(self) -> Option<f64> {
        (self.0 > 0.0).then_some(self.0)
    }

    /// `virtual_bytes` over `capacity` bytes (0 for an empty pool).
    pub fn of(virtual_bytes: u128, capacity: u64) -> f64 {
        if capacity == 0 {
            return 0.0;
        }
        virtual_bytes as f64 / capacity as f64
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for Ratio {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.0)
    }
}

impl<'de> Deserialize<'de> for Ratio {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A float, or a whole number (`3` as well as `3.0`).
        let value = f64::deserialize(deserializer)?;
        Ratio::new(value).map_err(serde::de::Error::custom)
    }
}

/// A length of time, written with a unit (`30s`, `2m`, `1h 30m`, `500ms`) or as a bare whole
/// number of seconds (`30`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timeout(Duration);

impl Timeout {
    /// `n` seconds.
    pub const fn secs(n: u64) -> Self {
        Timeout(Duration::from_secs(n))
    }

    /// The length of time.
    pub fn duration(self) -> Duration {
        self.0
    }
}

impl FromStr for Timeout {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        if let Ok(seconds) = trimmed.parse::<u64>() {
            return Ok(Timeout::secs(seconds));
        }
        humantime::parse_duration(trimmed).map(Timeout).map_err(|e| {
            format!("\"{text}\" is not a length of time ({e}); write a number and a unit, such as \"30s\" or \"2m\"")
        })
    }
}

impl fmt::Display for Timeout {
    /// `30s`, `2m`, `1h 30m`: text that parses back to the same length.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_zero() {
            return f.write_str("0s");
        }
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Timeout {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TimeoutVisitor)
    }
}

struct TimeoutVisitor;

impl serde::de::Visitor<'_> for TimeoutVisitor {
    type Value = Timeout;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a length of time such as \"30s\"")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Timeout, E> {
        text.parse().map_err(E::custom)
    }

    fn visit_u64<E: serde::de::Error>(self, seconds: u64) -> Result<Timeout, E> {
        Ok(Timeout::secs(seconds))
    }

    fn visit_i64<E: serde::de::Error>(self, seconds: i64) -> Result<Timeout, E> {
        u64::try_from(seconds).map(Timeout::secs).map_err(|_| {
            E::custom(format!(
                "{seconds} is negative; a length of time is zero or more, such as \"30s\""
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_json_numbers_are_sizes_and_others_are_refused() {
        let size: ByteSize = serde_json::from_str("141.0").unwrap();
        assert_eq!(size, ByteSize(141));
        for bad in ["1.5", "-1.0", "1e20", "-3"] {
            let err = serde_json::from_str::<ByteSize>(bad)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("whole number") || err.contains("negative"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!("512".parse::<ByteSize>().unwrap().bytes(), 512);
        assert_eq!("64K".parse::<ByteSize>().unwrap().bytes(), 65536);
        assert_eq!("64k".parse::<ByteSize>().unwrap().bytes(), 65536);
        assert_eq!("10G".parse::<ByteSize>().unwrap(), ByteSize::gib(10));
        assert_eq!("2T".parse::<ByteSize>().unwrap().bytes(), 2 << 40);
        assert_eq!("100MiB".parse::<ByteSize>().unwrap(), ByteSize::mib(100));
        assert_eq!("1GB".parse::<ByteSize>().unwrap(), ByteSize::gib(1));
    }

    #[test]
    fn malformed_sizes_are_refused_with_the_text() {
        for bad in ["", "G", "10X", "1.5G", "-1G", "10 Gigs", "0x10"] {
            let err = bad.parse::<ByteSize>().unwrap_err().to_string();
            assert!(err.contains("size"), "{bad}: {err}");
        }
        assert!(matches!(
            "99999999999999999999".parse::<ByteSize>(),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            "20000000E".parse::<ByteSize>(),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn sizes_display_in_the_largest_exact_unit_and_round_trip() {
        for text in ["0", "512", "64K", "10G", "2T", "1536K", "3E"] {
            let size: ByteSize = text.parse().unwrap();
            assert_eq!(size.to_string(), text);
        }
        assert_eq!(ByteSize::from_bytes(1536 * 1024).human(), "1.5M");
    }

    #[test]
    fn sizes_convert_to_sectors() {
        assert_eq!(ByteSize::mib(1).sectors(), Sectors(2048));
        assert_eq!(ByteSize::from_sectors(Sectors(128)).bytes(), 65536);
    }

    #[test]
    fn percentages_parse_and_bound() {
        assert_eq!("10%".parse::<Percent>().unwrap().value(), 10);
        assert_eq!("100".parse::<Percent>().unwrap().value(), 100);
        assert!("101%".parse::<Percent>().is_err());
        assert!("ten%".parse::<Percent>().is_err());
        assert_eq!(Percent::new(10).unwrap().of(1000), 100);
        assert_eq!(Percent::new(10).unwrap().of(1001), 101);
    }

    #[test]
    fn timeouts_parse_with_units_or_as_seconds_and_round_trip() {
        assert_eq!("30".parse::<Timeout>().unwrap(), Timeout::secs(30));
        assert_eq!("30s".parse::<Timeout>().unwrap(), Timeout::secs(30));
        assert_eq!("2m".parse::<Timeout>().unwrap(), Timeout::secs(120));
        assert_eq!(
            "500ms".parse::<Timeout>().unwrap().duration(),
            Duration::from_millis(500)
        );
        for text in ["0s", "30s", "2m", "1h 30m", "1s 500ms"] {
            assert_eq!(text.parse::<Timeout>().unwrap().to_string(), text);
        }
        for bad in ["", "ten seconds", "-1s", "1.5x"] {
            let err = bad.parse::<Timeout>().unwrap_err();
            assert!(err.contains("not a length of time"), "{bad}: {err}");
        }
        let negative = serde_json::from_str::<Timeout>("-3")
            .unwrap_err()
            .to_string();
        assert!(negative.contains("negative"), "{negative}");
    }
}
