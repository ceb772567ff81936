//! The API socket: root-only by default, or shared with one group.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tokio::net::UnixListener;

use crate::error::{Error, ErrorKind, Result};

/// Bind the socket at `path` with mode 0600, or 0660 and group `group` when one is named.
/// A stale socket (nothing answers on it) is replaced; a live one is refused.
pub fn bind(path: &Path, group: &str) -> Result<UnixListener> {
    // The group is checked first, so a bad one changes nothing.
    let gid = match group {
        "" => None,
        name => Some(
            nix::unistd::Group::from_name(name)
                .map_err(|e| Error::io(format!("looking up group {name:?}"), e.into()))?
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "daemon.socket_group: there is no group {name:?}; create it (groupadd {name}) or set socket_group = \"\""
                    ))
                })?
                .gid,
        ),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "socket {} is served by another process (another thinstackd?); stop it or set `socket` to another path",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| Error::io(format!("removing stale socket {}", path.display()), e))?;
    }
    // Bind under a umask that leaves no window in which others could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|e| Error::io(format!("binding {}", path.display()), e))?;
    if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|e| Error::io(format!("giving {} to its group", path.display()), e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(|e| Error::io(format!("setting the mode of {}", path.display()), e))?;
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn the_socket_is_root_only_unless_a_group_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/thinstack.sock");
        let listener = bind(&path, "").unwrap();
        assert_eq!(mode(&path), 0o600);

        // A live socket is not taken over; a stale one is replaced.
        let err = bind(&path, "").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
        drop(listener);
        let our_group = nix::unistd::Group::from_gid(nix::unistd::getegid())
            .unwrap()
            .expect("our group has a name");
        let _listener = bind(&path, &our_group.name).unwrap();
        assert_eq!(mode(&path), 0o660);
        assert_eq!(
            std::fs::metadata(&path).unwrap().gid(),
            our_group.gid.as_raw()
        );
    }

    #[tokio::test]
    async fn an_unknown_group_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let err = bind(&dir.path().join("s.sock"), "no-such-group-xyz").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert!(
            err.to_string().contains("groupadd no-such-group-xyz"),
            "{err}"
        );
    }
}
