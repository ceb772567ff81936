//! Typed device-mapper table lines, as devicemapper-rs types its targets: the two thinstack
//! makes (`thin-pool`, `thin`) are values built and read back with their parameters typed, and
//! any other line (of a table someone else made) is kept as the kernel gave it.
//!
//! A line prints as `dmsetup table` shows it (`START LENGTH TARGET PARAMS`), and parses back.

use std::fmt;
use std::str::FromStr;

use devicemapper::{Device, Sectors, TargetParams, ThinPoolTargetParams};

use crate::error::{Error, Result};
use crate::names::ThinId;

/// The thin-pool target's name.
pub const THIN_POOL_TARGET: &str = "thin-pool";
/// The thin target's name.
pub const THIN_TARGET: &str = "thin";

/// What a line maps its sectors to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A thin pool over a metadata and a data device.
    ThinPool(ThinPoolTargetParams),
    /// Thin device `id` of the pool device `pool`.
    Thin {
        /// The pool device.
        pool: Device,
        /// The thin device's id in it.
        id: ThinId,
    },
    /// Any other target, with its parameters as the kernel gave them.
    Other {
        /// The target type.
        kind: String,
        /// Its parameters.
        params: String,
    },
}

/// One line of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The first sector it maps.
    pub start: Sectors,
    /// How many sectors it maps.
    pub length: Sectors,
    /// What it maps them to.
    pub target: Target,
}

impl Line {
    /// A thin pool, `length` long, over what `params` name.
    pub fn thin_pool(length: Sectors, params: ThinPoolTargetParams) -> Line {
        Line {
            start: Sectors(0),
            length,
            target: Target::ThinPool(params),
        }
    }

    /// Thin device `id` of `pool`, `length` long.
    pub fn thin(pool: Device, id: ThinId, length: Sectors) -> Line {
        Line {
            start: Sectors(0),
            length,
            target: Target::Thin { pool, id },
        }
    }

    /// The target type's name.
    pub fn kind(&self) -> &str {
        match &self.target {
            Target::ThinPool(_) => THIN_POOL_TARGET,
            Target::Thin { .. } => THIN_TARGET,
            Target::Other { kind, .. } => kind,
        }
    }

    /// The target's parameters, as the kernel takes them.
    pub fn params(&self) -> String {
        match &self.target {
            Target::ThinPool(params) => params.param_str(),
            Target::Thin { pool, id } => format!("{pool} {id}"),
            Target::Other { params, .. } => params.clone(),
        }
    }

    /// The form the devicemapper crate's ioctls take.
    pub(crate) fn raw(&self) -> (u64, u64, String, String) {
        (
            *self.start,
            *self.length,
            self.kind().to_string(),
            self.params(),
        )
    }

    /// A line as the devicemapper crate read it from the kernel.
    pub(crate) fn from_raw(
        (start, length, kind, params): (u64, u64, String, String),
    ) -> Result<Line> {
        let target = match kind.as_str() {
            THIN_POOL_TARGET => thin_pool_target(&params)?,
            THIN_TARGET => thin_target(&params)?,
            _ => Target::Other { kind, params },
        };
        Ok(Line {
            start: Sectors(start),
            length: Sectors(length),
            target,
        })
    }
}

/// `METADATA DATA BLOCK_SIZE LOW_WATER_MARK N FEATURE...`. devicemapper's parser indexes
/// past the end of a line that names more features than it has (it panics), so the count is
/// checked first: a bad line is an error, whoever printed it.
fn thin_pool_target(params: &str) -> Result<Target> {
    let words: Vec<&str> = params.split_whitespace().collect();
    let features = words.get(4).and_then(|n| n.parse::<usize>().ok());
    if features.is_none_or(|n| words.len() < 5 + n) {
        return Err(Error::invalid(format!(
            "{params:?} is not a thin-pool target's parameters (METADATA DATA BLOCK_SIZE \
             LOW_WATER_MARK, then the number of features and the features)"
        )));
    }
    let parsed = format!("{THIN_POOL_TARGET} {params}")
        .parse()
        .map_err(|e| Error::dm("parse table", THIN_POOL_TARGET, e))?;
    Ok(Target::ThinPool(parsed))
}

/// `POOL_MAJOR:POOL_MINOR ID` (a thin target may carry an external origin after; thinstack
/// makes none, so such a line is kept as it is).
fn thin_target(params: &str) -> Result<Target> {
    let words: Vec<&str> = params.split_whitespace().collect();
    let parsed = match words.as_slice() {
        [pool, id] => pool
            .parse::<Device>()
            .ok()
            .zip(id.parse::<u32>().ok().and_then(|id| ThinId::new(id).ok())),
        _ => None,
    };
    Ok(match parsed {
        Some((pool, id)) => Target::Thin { pool, id },
        None => Target::Other {
            kind: THIN_TARGET.to_string(),
            params: params.to_string(),
        },
    })
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            *self.start,
            *self.length,
            self.kind(),
            self.params()
        )
    }
}

impl FromStr for Line {
    type Err = Error;

    /// `START LENGTH TARGET PARAMS...`, as `dmsetup table` prints a line.
    fn from_str(text: &str) -> Result<Line> {
        let bad = || {
            Error::invalid(format!(
                "{text:?} is not a device-mapper table line (START LENGTH TARGET PARAMS)"
            ))
        };
        let mut words = text.split_whitespace();
        let start = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
        let length = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
        let kind = words.next().ok_or_else(bad)?.to_string();
        let params = words.collect::<Vec<_>>().join(" ");
        Line::from_raw((start, length, kind, params))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devicemapper::DataBlocks;

    #[test]
    fn lines_print_as_dmsetup_shows_them_and_parse_back() {
        let pool = Device {
            major: 253,
            minor: 0,
        };
        let thin = Line::thin(pool, ThinId::new(42).unwrap(), Sectors(2048));
        assert_eq!(thin.to_string(), "0 2048 thin 253:0 42");
        assert_eq!(thin.to_string().parse::<Line>().unwrap(), thin);

        let params = ThinPoolTargetParams::new(
            Device { major: 7, minor: 1 },
            Device { major: 7, minor: 0 },
            Sectors(128),
            DataBlocks(100),
            vec!["skip_block_zeroing".to_string()],
        );
        let pool_line = Line::thin_pool(Sectors(262144), params);
        assert_eq!(
            pool_line.to_string(),
            "0 262144 thin-pool 7:1 7:0 128 100 1 skip_block_zeroing"
        );
        assert_eq!(pool_line.to_string().parse::<Line>().unwrap(), pool_line);

        let linear: Line = "0 8 linear 8:0 2048".parse().unwrap();
        assert_eq!(linear.kind(), "linear");
        assert_eq!(linear.to_string(), "0 8 linear 8:0 2048");
        assert!("0 x thin".parse::<Line>().is_err());
        assert!("0 8 thin-pool nonsense".parse::<Line>().is_err());
        // More features counted than given: an error, not a panic in devicemapper's parser.
        assert!("0 8 thin-pool 7:1 7:0 128 100 5".parse::<Line>().is_err());
        assert!("0 8 thin-pool 7:1 7:0 128 100 2 skip_block_zeroing"
            .parse::<Line>()
            .is_err());
    }
}
