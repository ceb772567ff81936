//! The shared vocabulary: the words the config, the records, the kernel seam and the API all
//! speak (a filesystem type, the full-pool policy, a pool's space and health). A leaf module:
//! it imports nothing of thinstack's but units, so every layer above can use it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::units::ByteSize;

/// A filesystem thinstack can make on a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    /// ext4
    Ext4,
    /// xfs
    Xfs,
}

impl FsType {
    /// The kernel's filesystem type name.
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `pool.when_full`: the thin pool's no-space policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WhenFull {
    /// `queue` while thinstackd extends the pool by itself (loop and lvm backends with
    /// `autoextend_threshold` below 100%), so writes wait for the extension; `error` otherwise.
    #[default]
    Auto,
    /// Writes that need a new block fail at once (ENOSPC, seen by writers as ENOSPC or EIO):
    /// nothing hangs (the pool's `error_if_no_space`).
    Error,
    /// Such writes wait until the pool is extended, or until the kernel's `no_space_timeout`
    /// (dm-thin-pool module parameter, 60 s by default) passes, then fail.
    Queue,
}

impl WhenFull {
    /// The policy's name, as in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            WhenFull::Auto => "auto",
            WhenFull::Error => "error",
            WhenFull::Queue => "queue",
        }
    }
}

/// Used and total bytes of one of the pool's areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Space {
    /// Bytes in use.
    pub used: ByteSize,
    /// Bytes in all.
    pub total: ByteSize,
    /// Bytes free.
    pub available: ByteSize,
}

impl Space {
    /// Space from used and total bytes.
    pub fn new(used: u64, total: u64) -> Space {
        Space {
            used: ByteSize::from_bytes(used),
            total: ByteSize::from_bytes(total),
            available: ByteSize::from_bytes(total.saturating_sub(used)),
        }
    }

    /// Share in use, 0 to 100.
    pub fn percent_used(&self) -> f64 {
        if self.total.bytes() == 0 {
            return 100.0;
        }
        self.used.bytes() as f64 * 100.0 / self.total.bytes() as f64
    }
}

/// The pool's health as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The kernel reports the pool failed; no status can be read.
    pub failed: bool,
    /// The metadata is flagged for `thin_check`.
    pub needs_check: bool,
    /// The pool is read-only: thinstack's metadata guard (see `metadata_guard`), or the
    /// kernel's fall-back after metadata trouble.
    pub read_only: bool,
    /// thinstack made the pool read-only because its metadata is nearly full; growing the
    /// metadata (`pool extend --metadata`) makes it writable again.
    #[serde(default)]
    pub metadata_guard: bool,
    /// The data area is full.
    pub out_of_space: bool,
    /// What writes meet when the data is full ("error" or "queue"); none when failed.
    pub when_full: Option<WhenFull>,
}

impl Space {
    /// "1.2G used of 100.0G (1.2%), 98.8G available"
    pub fn describe(&self) -> String {
        format!(
            "{} used of {} ({:.1}%), {} available",
            self.used.human(),
            self.total.human(),
            self.percent_used(),
            self.available.human()
        )
    }
}

impl Health {
    /// "ok", or the flags that are set ("needs_check, read-only").
    pub fn describe(&self) -> String {
        let flags: Vec<&str> = [
            (self.failed, "FAILED"),
            (self.needs_check, "needs_check"),
            (self.read_only, "read-only"),
            (self.out_of_space, "out of data space"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| *name)
        .collect();
        if flags.is_empty() {
            "ok".to_string()
        } else {
            flags.join(", ")
        }
    }
}
