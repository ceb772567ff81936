//! Where a client may make root mount a layer.
//!
//! A mount hides what lies beneath it, so a target is a decision root makes for the client:
//! `<state_dir>/mnt` (the default mount points) and the directories an operator listed in
//! `layers.mount_roots`, nothing else. Never `/`, never the state directory itself or anything
//! in it but `mnt` (the next start would read records a mount hid). This is the path's policy;
//! that no component is a symbolic link, and that the target is an existing empty directory,
//! is checked by the kernel seam on the directory it then mounts on (`FsKernel::mount`).

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};

/// The places a layer may be mounted.
pub(super) struct MountPolicy<'a> {
    pub state_dir: &'a Path,
    pub roots: &'a [PathBuf],
}

impl MountPolicy<'_> {
    /// The default mount points' directory.
    fn mnt(&self) -> PathBuf {
        self.state_dir.join("mnt")
    }

    /// `path` in its plain form when a client may mount a layer there; otherwise an `Invalid`
    /// error (malformed) or a `Permission` error (outside the allowed places).
    pub fn check(&self, path: &Path) -> Result<PathBuf> {
        let target = plain(path)?;
        let mnt = self.mnt();
        if target.starts_with(self.state_dir) {
            // Beneath `mnt`, but not its hidden growth mounts (`.grow-<id>`).
            let allowed = target.strip_prefix(&mnt).ok().and_then(|rest| {
                let first = rest.components().next()?;
                (!first.as_os_str().to_string_lossy().starts_with('.')).then_some(())
            });
            if allowed.is_none() {
                return Err(self.refused(
                    &target,
                    "is in the state directory, which holds the records",
                ));
            }
            return Ok(target);
        }
        if target.parent().is_none() {
            return Err(self.refused(&target, "is the root of the file system"));
        }
        if self
            .roots
            .iter()
            .any(|root| target.starts_with(root) && target != *root)
        {
            return Ok(target);
        }
        Err(self.refused(&target, "is not beneath any of layers.mount_roots"))
    }

    fn refused(&self, target: &Path, why: &str) -> Error {
        let roots = if self.roots.is_empty() {
            "none configured".to_string()
        } else {
            self.roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        Error::new(
            ErrorKind::Permission,
            format!(
                "mount target {} {why}; thinstack mounts layers only beneath {} (the default, \
                 used when no target is given) and beneath layers.mount_roots ({roots}); \
                 choose a directory there, or have the operator add a directory above it to \
                 layers.mount_roots",
                target.display(),
                self.mnt().display()
            ),
        )
    }
}

/// `path` without `.` components, repeated or trailing slashes; absolute and free of `..`.
pub(super) fn plain(path: &Path) -> Result<PathBuf> {
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return Err(Error::invalid(format!(
            "mount target {} must be an absolute path without \"..\"",
            path.display()
        )));
    }
    Ok(path
        .components()
        .filter(|c| *c != Component::CurDir)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_check(target: &str) -> Result<PathBuf> {
        let roots = [PathBuf::from("/srv/layers"), PathBuf::from("/run/vm")];
        MountPolicy {
            state_dir: Path::new("/var/lib/thinstack"),
            roots: &roots,
        }
        .check(Path::new(target))
    }

    #[test]
    fn targets_beneath_mnt_and_the_mount_roots_are_allowed() {
        for (target, plain) in [
            ("/var/lib/thinstack/mnt/a", "/var/lib/thinstack/mnt/a"),
            ("/var/lib/thinstack/mnt/a/b/", "/var/lib/thinstack/mnt/a/b"),
            ("/srv/layers/x", "/srv/layers/x"),
            ("/srv//layers/./x/y", "/srv/layers/x/y"),
            ("/run/vm/1", "/run/vm/1"),
        ] {
            assert_eq!(policy_check(target).unwrap(), Path::new(plain), "{target}");
        }
    }

    #[test]
    fn every_other_target_is_refused_as_not_permitted() {
        for target in [
            "/",
            "/etc",
            "/srv",
            "/srv/layers",
            "/srv/layersx/a",
            "/var/lib/thinstack",
            "/var/lib/thinstack/records",
            "/var/lib/thinstack/mnt",
            "/var/lib/thinstack/mnt/.grow-7",
            "/var/lib/thinstack/layers/a",
        ] {
            let err = policy_check(target).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Permission, "{target}: {err}");
            assert!(err.to_string().contains("layers.mount_roots"), "{err}");
        }
    }

    #[test]
    fn malformed_targets_are_invalid() {
        for target in ["relative", "/srv/layers/../../etc", ""] {
            let err = policy_check(target).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Invalid, "{target}: {err}");
        }
    }
}
