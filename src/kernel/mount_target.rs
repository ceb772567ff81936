//! A mount target opened the way root must open one for a client: resolving no symbolic link
//! in any component, and keeping the directory open, so the directory checked is the very
//! directory mounted on (through `/proc/self/fd/N`), whatever is swapped into the path
//! meanwhile.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag, AT_FDCWD};
use nix::sys::stat::Mode;

use crate::error::{Error, ErrorKind, Result};

/// An open directory to mount on, or whose mount to check.
pub struct MountTarget {
    fd: OwnedFd,
    path: PathBuf,
}

impl MountTarget {
    /// Open the directory at `path` (absolute) without following a symbolic link anywhere in
    /// it. A link is refused (`Permission`), so is a missing path (`NotFound`) or one that is
    /// not a directory (`Invalid`).
    pub fn open(path: &Path) -> Result<MountTarget> {
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .mode(Mode::empty())
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = openat2(AT_FDCWD, path, how).map_err(|errno| refusal(path, errno))?;
        Ok(MountTarget {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The path as the caller gave it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path the kernel resolves to exactly this open directory.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// Refuse a directory that holds anything: a mount would hide it, and a caller that meant
    /// to mount on an empty place would write into the wrong one.
    pub fn ensure_empty(&self) -> Result<()> {
        let entries = std::fs::read_dir(self.proc_path())
            .map_err(|e| Error::io(format!("reading mount target {}", self.path.display()), e))?;
        if let Some(entry) = entries.flatten().next() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "mount target {} is not empty (it holds {:?}); a mount would hide what is \
                     there: empty the directory or choose an empty one",
                    self.path.display(),
                    entry.file_name()
                ),
            ));
        }
        Ok(())
    }
}

/// What an open of mount target `path` failing with `errno` means, and what to do.
fn refusal(path: &Path, errno: Errno) -> Error {
    match errno {
        Errno::ELOOP => Error::new(
            ErrorKind::Permission,
            format!(
                "mount target {} goes through a symbolic link; thinstack follows none, so that \
                 no link can move a mount elsewhere: name the real directory",
                path.display()
            ),
        ),
        Errno::ENOENT => Error::not_found(format!(
            "mount target {} does not exist; create the directory first",
            path.display()
        )),
        Errno::ENOTDIR => Error::invalid(format!(
            "mount target {} is not a directory; name an empty directory",
            path.display()
        )),
        Errno::EXDEV => Error::new(
            ErrorKind::Permission,
            format!(
                "mount target {} is reached through a magic link; name the real directory",
                path.display()
            ),
        ),
        errno => Error::io(
            format!("opening mount target {}", path.display()),
            std::io::Error::from(errno),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symbolic_link_in_any_component_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir_all(real.join("inner")).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        for through in ["link", "link/inner"] {
            let err = MountTarget::open(&dir.path().join(through))
                .err()
                .expect("a link is refused");
            assert_eq!(err.kind(), ErrorKind::Permission, "{through}: {err}");
            assert!(err.to_string().contains("symbolic link"), "{err}");
        }
        let target = MountTarget::open(&real.join("inner")).unwrap();
        target.ensure_empty().unwrap();
    }

    #[test]
    fn missing_file_and_non_empty_targets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = MountTarget::open(&dir.path().join("missing"))
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        let err = MountTarget::open(&dir.path().join("file")).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
        let err = MountTarget::open(dir.path())
            .unwrap()
            .ensure_empty()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
        assert!(err.to_string().contains("not empty"), "{err}");
    }

    #[test]
    fn the_proc_path_names_the_open_directory_even_after_a_rename() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        let target = MountTarget::open(&dir.path().join("a")).unwrap();
        std::fs::rename(dir.path().join("a"), dir.path().join("b")).unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("b/marker"), b"").unwrap();
        assert!(target.proc_path().join("marker").exists());
    }
}
