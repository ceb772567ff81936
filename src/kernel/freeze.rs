//! Freezing a mounted filesystem (FIFREEZE) for the moment a snapshot of its device is taken,
//! where no device-mapper suspend does it: the filesystem writes everything out and holds new
//! writes until it is thawed.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

mod ioctls {
    //! `FIFREEZE` and `FITHAW` (linux/fs.h: `_IOWR('X', 119, int)`, `_IOWR('X', 120, int)`).
    #![allow(missing_docs)]
    nix::ioctl_readwrite!(fifreeze, b'X', 119, nix::libc::c_int);
    nix::ioctl_readwrite!(fithaw, b'X', 120, nix::libc::c_int);
}
use ioctls::{fifreeze, fithaw};

/// A frozen filesystem, thawed when dropped (on every path, so a failed snapshot never leaves
/// writers hanging).
#[derive(Debug)]
pub struct Frozen {
    dir: File,
    target: PathBuf,
}

/// Freeze the filesystem mounted at `target`.
pub fn freeze(target: &Path) -> Result<Frozen> {
    let dir = File::open(target)
        .map_err(|e| Error::io(format!("opening mount point {}", target.display()), e))?;
    let mut unused: nix::libc::c_int = 0;
    // Safety: an ioctl on an open directory of the filesystem; the argument is unused.
    unsafe { fifreeze(dir.as_raw_fd(), &mut unused) }.map_err(|errno| {
        Error::io(
            format!("freezing the filesystem at {}", target.display()),
            std::io::Error::from_raw_os_error(errno as i32),
        )
    })?;
    Ok(Frozen {
        dir,
        target: target.to_path_buf(),
    })
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let mut unused: nix::libc::c_int = 0;
        // Safety: as in freeze.
        if let Err(errno) = unsafe { fithaw(self.dir.as_raw_fd(), &mut unused) } {
            tracing::error!(target = %self.target.display(), %errno, "thawing a frozen filesystem failed; `fsfreeze -u` it by hand");
        }
    }
}
