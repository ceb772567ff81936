//! The API socket: root-only by default, or shared with one group.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tokio::net::UnixListener;

use crate::error::{Error, ErrorKind, Result};

/// Bind the socket at `path` with mode 0600, or 0660 and group `group` when one is named.
/// A stale socket (nothing answers on it) is replaced; a live one is refused.
pub fn bind(path: &Path, group: &str) -> Result<UnixListener> {
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
