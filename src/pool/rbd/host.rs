//! This host's name among the hosts that share an rbd pool: the host name and a random suffix,
//! made at the first start and kept in the state directory, so that two hosts named alike (or
//! two daemons on one host, each with its own state directory) are never taken for one.

use std::path::Path;

use crate::error::{Error, Result};
use crate::records;

const FILE: &str = "rbd-host";

/// The name in `state_dir`, made and stored durably when there is none.
pub fn host_id(state_dir: &Path) -> Result<String> {
    let path = state_dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(id) if valid(id.trim()) => return Ok(id.trim().to_string()),
        Ok(id) => {
            return Err(Error::inconsistent(format!(
                "{} holds {:?}, not a host name of letters, digits, '-' and '.'; \
                 restore it (the pool's catalog names this host by it)",
                path.display(),
                id.trim()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    }
    let id = format!("{}-{}", host_name(), random_suffix()?);
    records::ensure_private_dir(state_dir)?;
    records::write_atomic(&path, format!("{id}\n").as_bytes())?;
    Ok(id)
}

fn valid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The kernel's host name, with anything but letters, digits, '-' and '.' dropped.
fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(64)
        .collect();
    if name.is_empty() {
        "host".to_string()
    } else {
        name
    }
}

/// Eight random hex digits (a content id's random source).
fn random_suffix() -> Result<String> {
    let random = crate::names::ContentId::random()?;
    Ok(random.as_str()[..8].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = host_id(dir.path()).unwrap();
        assert!(valid(&first), "{first}");
        assert_eq!(host_id(dir.path()).unwrap(), first);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(host_id(other.path()).unwrap(), first);
    }

    #[test]
    fn a_damaged_name_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "a b/c\n").unwrap();
        let e = host_id(dir.path()).unwrap_err();
        assert!(e.to_string().contains("restore it"), "{e}");
    }
}
