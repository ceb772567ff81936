//! Names and ids: the pool's name, thin device ids, and the device-mapper names derived from
//! them.
//!
//! Every device-mapper name thinstack creates starts with [`DM_PREFIX`], which carries a format
//! version, so leftovers can be found by prefix and a future layout can live beside this one.
//! Names are computed from the pool name and thin ids, never from user-chosen layer names, so a
//! half-built device can always be found again by recomputing its name.

use std::fmt;
use std::str::FromStr;

use devicemapper::{DmName, DmNameBuf, DmUuidBuf};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// The format version carried in every device-mapper name and uuid.
pub const FORMAT_VERSION: u32 = 1;

/// The prefix of every device-mapper name and uuid thinstack creates.
pub const DM_PREFIX: &str = "thinstack-1-";

/// Longest pool name: keeps every derived dm name far below the kernel's 127-byte limit
/// (`DM_NAME_LEN` in `linux/dm-ioctl.h`): "thinstack-1-" (12) + 32 + "-thin-" (6) + 8 digits
/// of a 24-bit id = 58.
pub const POOL_NAME_MAX: usize = 32;

/// Largest thin device id the kernel accepts (24 bits; `Documentation/admin-guide/device-mapper/thin-provisioning.rst`).
pub const THIN_ID_MAX: u32 = (1 << 24) - 1;

/// A validated pool name: `[A-Za-z0-9][A-Za-z0-9._-]{0,31}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolName(String);

impl PoolName {
    /// Validate `name`.
    ///
    /// Returns an `Invalid` error naming the rule when the name is empty, too long, or holds a
    /// character other than letters, digits, `.`, `_` and `-` (or starts with one of the last three).
    pub fn new(name: &str) -> Result<Self> {
        if !is_safe_name(name, POOL_NAME_MAX) {
            return Err(Error::invalid(format!(
                "invalid pool name {name:?}: pool names are 1 to 32 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"
            )));
        }
        Ok(PoolName(name.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The thin-pool device's name: `thinstack-1-<pool>-pool`.
    pub fn pool_dm_name(&self) -> DmNameBuf {
        dm_name(format!("{DM_PREFIX}{}-pool", self.0))
    }

    /// The thin-pool device's uuid, same text as its name.
    pub fn pool_dm_uuid(&self) -> DmUuidBuf {
        dm_uuid(format!("{DM_PREFIX}{}-pool", self.0))
    }

    /// An active thin device's name: `thinstack-1-<pool>-thin-<id>`.
    pub fn thin_dm_name(&self, id: ThinId) -> DmNameBuf {
        dm_name(format!("{DM_PREFIX}{}-thin-{}", self.0, id.0))
    }

    /// An active thin device's uuid, same text as its name.
    pub fn thin_dm_uuid(&self, id: ThinId) -> DmUuidBuf {
        dm_uuid(format!("{DM_PREFIX}{}-thin-{}", self.0, id.0))
    }

    /// The prefix shared by every dm device of this pool, for finding leftovers.
    pub fn dm_prefix(&self) -> String {
        format!("{DM_PREFIX}{}-", self.0)
    }
}

/// `[A-Za-z0-9][A-Za-z0-9._-]*`, at most `max` bytes: never empty, never `.` or `..`, no `/`,
/// no NUL, no whitespace; safe in file names and device-mapper names.
fn is_safe_name(name: &str, max: usize) -> bool {
    let valid_first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let valid_rest = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    valid_first && valid_rest && name.len() <= max
}

/// Names built from validated parts always fit the kernel's limits; a failure is a bug here.
fn dm_name(text: String) -> DmNameBuf {
    DmNameBuf::new(text).expect("dm names from validated parts fit DM_NAME_LEN")
}

fn dm_uuid(text: String) -> DmUuidBuf {
    DmUuidBuf::new(text).expect("dm uuids from validated parts fit DM_UUID_LEN")
}

/// The thin id of a device name of `pool`, if `name` is one of its thin devices.
pub fn parse_thin_dm_name(pool: &PoolName, name: &DmName) -> Option<ThinId> {
    let prefix = format!("{}thin-", pool.dm_prefix());
    name.to_string()
        .strip_prefix(&prefix)
        .and_then(|id| id.parse::<u32>().ok())
        .and_then(|id| ThinId::new(id).ok())
}

impl fmt::Display for PoolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for PoolName {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        PoolName::new(text)
    }
}

impl Serialize for PoolName {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PoolName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        PoolName::new(&text).map_err(|e| serde::de::Error::custom(e.message()))
    }
}

/// Longest layer name (also keeps `<name>.json` far below any file-name limit).
pub const LAYER_NAME_MAX: usize = 128;

/// A validated layer name: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`.
///
/// The rule keeps names safe as file names (no `/`, no NUL, never `.` or `..`), which is why
/// record files may be named after layers. Device-mapper names never use them.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct LayerName(String);

/// Quoted like a string, as error messages show it (`layer "base" is committed`).
impl fmt::Debug for LayerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl LayerName {
    /// Validate `name`.
    ///
    /// Returns an `Invalid` error that shows the name and the rule.
    pub fn new(name: &str) -> Result<Self> {
        if !is_safe_name(name, LAYER_NAME_MAX) {
            return Err(Error::invalid(format!(
                "invalid layer name {name:?}: layer names are 1 to 128 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"
            )));
        }
        Ok(LayerName(name.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LayerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for LayerName {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        LayerName::new(text)
    }
}

impl<'de> Deserialize<'de> for LayerName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        LayerName::new(&text).map_err(|e| serde::de::Error::custom(e.message()))
    }
}

/// A thin device id in the pool: 24 bits, checked when built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct ThinId(u32);

impl ThinId {
    /// A thin id; values above [`THIN_ID_MAX`] are refused.
    pub fn new(value: u32) -> Result<Self> {
        if value > THIN_ID_MAX {
            return Err(Error::invalid(format!(
                "thin device id {value} is out of range (0 to {THIN_ID_MAX})"
            )));
        }
        Ok(ThinId(value))
    }

    /// The id as a number.
    pub fn value(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for ThinId {
    type Error = String;
    fn try_from(value: u32) -> std::result::Result<Self, String> {
        ThinId::new(value).map_err(|e| e.message().to_string())
    }
}

impl From<ThinId> for u32 {
    fn from(id: ThinId) -> u32 {
        id.0
    }
}

impl fmt::Display for ThinId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a committed layer holds, named once and kept wherever the layer goes: an exported
/// layer's content id travels in its stream and an import keeps it, so an incremental stream
/// names the base it needs and is applied only onto that content. 128 random bits, as 32
/// lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContentId(String);

impl ContentId {
    /// Hex digits in a content id.
    pub const LEN: usize = 32;

    /// A new content id, from the kernel's random source.
    pub fn random() -> Result<Self> {
        let mut bits = [0u8; Self::LEN / 2];
        getrandom::fill(&mut bits).map_err(|e| {
            Error::new(
                crate::error::ErrorKind::Kernel,
                format!("reading random bits for a content id: {e}"),
            )
        })?;
        Ok(ContentId(bits.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// A content id as text; refused unless it is 32 lowercase hex digits.
    pub fn new(text: &str) -> Result<Self> {
        let hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        if text.len() != Self::LEN || !text.chars().all(hex) {
            return Err(Error::invalid(format!(
                "content id {text:?} is not {} lowercase hex digits",
                Self::LEN
            )));
        }
        Ok(ContentId(text.to_string()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ContentId {
    type Error = String;
    fn try_from(text: String) -> std::result::Result<Self, String> {
        ContentId::new(&text).map_err(|e| e.message().to_string())
    }
}

impl From<ContentId> for String {
    fn from(id: ContentId) -> String {
        id.0
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ids_are_random_and_checked() {
        let a = ContentId::random().unwrap();
        assert_ne!(a, ContentId::random().unwrap());
        assert_eq!(ContentId::new(a.as_str()).unwrap(), a);
        for bad in [
            "",
            "ABCDEF0123456789abcdef0123456789",
            "0123",
            &"g".repeat(32),
        ] {
            assert!(ContentId::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pool_names_are_checked() {
        for good in ["thinstack", "a", "Pool-1.x_y", &"p".repeat(32)] {
            assert!(PoolName::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-x",
            ".x",
            "a/b",
            "..",
            "a b",
            "a\0b",
            &"p".repeat(33),
            "é",
        ] {
            let err = PoolName::new(bad).unwrap_err();
            assert!(err.to_string().contains("pool names are"), "{bad}: {err}");
        }
    }

    #[test]
    fn dm_names_carry_the_versioned_prefix_and_round_trip() {
        let pool = PoolName::new("p").unwrap();
        assert_eq!(pool.pool_dm_name().to_string(), "thinstack-1-p-pool");
        let id = ThinId::new(THIN_ID_MAX).unwrap();
        let name = pool.thin_dm_name(id);
        assert_eq!(name.to_string(), "thinstack-1-p-thin-16777215");
        assert_eq!(parse_thin_dm_name(&pool, &name), Some(id));
        assert_eq!(parse_thin_dm_name(&pool, &pool.pool_dm_name()), None);
        let longest = PoolName::new(&"p".repeat(32)).unwrap();
        assert!(longest.thin_dm_name(id).to_string().len() <= 127);
    }

    #[test]
    fn layer_names_are_checked() {
        for good in ["base", "a", "Layer-1.2_x", &"l".repeat(128), "a..b"] {
            assert!(LayerName::new(good).is_ok(), "{good}");
        }
        let long = "l".repeat(129);
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "-a",
            "_a",
            "a b",
            "a\0b",
            "é",
            long.as_str(),
        ] {
            let err = LayerName::new(bad).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Invalid);
            assert!(err.to_string().contains("layer names are"), "{bad}: {err}");
        }
    }

    #[test]
    fn thin_ids_are_24_bit() {
        assert!(ThinId::new(THIN_ID_MAX).is_ok());
        assert!(ThinId::new(THIN_ID_MAX + 1).is_err());
    }
}
