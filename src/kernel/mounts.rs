//! The mount table (`/proc/self/mountinfo`), read in one place.

use std::path::{Path, PathBuf};

use devicemapper::Device;

use crate::error::{Error, Result};

/// One mounted filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The device it is mounted from (`major:minor`; 0:N for virtual filesystems).
    pub device: Device,
    /// Where it is mounted.
    pub target: PathBuf,
    /// Whether it is mounted read-only.
    pub read_only: bool,
}

/// Every mount this process can see.
pub fn table() -> Result<Vec<Mount>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    Ok(parse(&text))
}

/// Whether something is mounted at `target`.
pub fn is_mounted(target: &Path) -> Result<bool> {
    Ok(table()?.iter().any(|mount| mount.target == target))
}

/// Where the block device `device` is mounted, and whether read-only.
pub fn of_device(device: Device) -> Result<Vec<Mount>> {
    Ok(table()?
        .into_iter()
        .filter(|mount| mount.device == device)
        .collect())
}

/// mountinfo lines: `id parent major:minor root target options ...`.
fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let (major, minor) = fields.nth(2)?.split_once(':')?;
            let target = fields.nth(1)?;
            let options = fields.next()?;
            Some(Mount {
                device: Device {
                    major: major.parse().ok()?,
                    minor: minor.parse().ok()?,
                },
                target: PathBuf::from(unescape(target)),
                read_only: options.split(',').any(|o| o == "ro"),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(code) = u8::from_str_radix(digits, 8) {
                out.push(code);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_read() {
        let text = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    98 29 253:3 / /mnt/a\\040b rw,relatime shared:50 - ext4 /dev/dm-3 rw\n\
                    garbage\n";
        let mounts = parse(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(
            mounts[1].device,
            Device {
                major: 253,
                minor: 3
            }
        );
        assert_eq!(mounts[1].target, Path::new("/mnt/a b"));
        assert!(!mounts[1].read_only);
        let ro = parse("98 29 253:3 / /m ro,relatime - ext4 /dev/dm-3 ro\n");
        assert!(ro[0].read_only);
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/x\"), r"/x\");
    }
}
