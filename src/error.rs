//! One error type for the whole crate: a kind a program can act on, and a message a person can.
//!
//! Kernel failures are translated here from errno into what happened ("device is busy",
//! "no such device", "pool is out of space"), so no caller ever sees a bare ioctl failure.

use std::fmt;
use std::io;

use devicemapper::{errors::Error as DmCoreError, DmError};
use nix::errno::Errno;
use serde::Serialize;

/// What kind of failure happened; stable, for programs (HTTP statuses, exit codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A layer, device or file does not exist.
    NotFound,
    /// Something with that name or id exists already.
    AlreadyExists,
    /// A device is open, mounted or otherwise in use.
    Busy,
    /// The pool (or a filesystem) has no room.
    NoSpace,
    /// The request or configuration is malformed or out of range.
    Invalid,
    /// The running kernel or machine lacks a needed feature.
    Unsupported,
    /// The caller lacks the privilege (root, CAP_SYS_ADMIN).
    Permission,
    /// Records and the kernel disagree in a way that needs attention.
    Inconsistent,
    /// The kernel refused for another reason.
    Kernel,
    /// An external command (mkfs, thin_check, ...) failed.
    Command,
    /// A file-system or other I/O operation failed.
    Io,
}

impl ErrorKind {
    /// Every kind, for the tables that map each one (HTTP status, gRPC code, exit code).
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::Busy,
        ErrorKind::NoSpace,
        ErrorKind::Invalid,
        ErrorKind::Unsupported,
        ErrorKind::Permission,
        ErrorKind::Inconsistent,
        ErrorKind::Kernel,
        ErrorKind::Command,
        ErrorKind::Io,
    ];
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&text)
    }
}

/// A thinstack error: its kind, a message that says what failed and what to do, and the cause.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with a complete message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Keep `source` as the cause (shown by `{:#}`-style chains, logged by callers).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Malformed or out-of-range input.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    /// Something that should exist does not.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// Records and kernel disagree.
    pub fn inconsistent(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Inconsistent, message)
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message alone.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefix the message with the step that failed, keeping the kind.
    pub fn context(mut self, step: impl fmt::Display) -> Self {
        self.message = format!("{step}: {}", self.message);
        self
    }

    /// An I/O failure while doing `what` (for example "creating /var/lib/thinstack").
    pub fn io(what: impl fmt::Display, err: io::Error) -> Self {
        let kind = match err.raw_os_error().map(Errno::from_raw) {
            Some(errno) => kind_of_errno(errno),
            None => match err.kind() {
                io::ErrorKind::NotFound => ErrorKind::NotFound,
                io::ErrorKind::PermissionDenied => ErrorKind::Permission,
                io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
                _ => ErrorKind::Io,
            },
        };
        let kind = if kind == ErrorKind::Kernel {
            ErrorKind::Io
        } else {
            kind
        };
        Self::new(kind, format!("{what}: {err}")).with_source(err)
    }

    /// A device-mapper failure of `op` (for example "suspend") on `device`, translated.
    pub fn dm(op: &str, device: &str, err: DmError) -> Self {
        let message = match dm_errno(&err) {
            Some(errno) => format!("{op} {device}: {}", describe_dm_errno(errno)),
            None => match &err {
                DmError::Core(DmCoreError::ContextInit(why)) => format!(
                    "{op} {device}: cannot open /dev/mapper/control ({why}); the kernel has no \
                     device-mapper, or it is not loaded (modprobe dm-mod) or this is not root"
                ),
                DmError::Core(DmCoreError::UdevSync(why)) => {
                    format!("{op} {device}: waiting for udev failed: {why}")
                }
                other => format!("{op} {device}: {other}"),
            },
        };
        let kind = match (&err, dm_errno(&err)) {
            (_, Some(errno)) => kind_of_errno(errno),
            (DmError::Core(DmCoreError::ContextInit(_)), None) => ErrorKind::Unsupported,
            (DmError::Core(DmCoreError::InvalidArgument(_)), None) => ErrorKind::Invalid,
            _ => ErrorKind::Kernel,
        };
        Self::new(kind, message).with_source(err)
    }

    /// A failed device-mapper ioctl issued by thinstack itself rather than the crate.
    pub fn dm_errno(op: &str, device: &str, errno: Errno) -> Self {
        Self::new(
            kind_of_errno(errno),
            format!("{op} {device}: {}", describe_dm_errno(errno)),
        )
        .with_source(io::Error::from_raw_os_error(errno as i32))
    }

    /// A failed call into librbd or librados (a negative errno, as they return it) doing `op`
    /// on `target` (an image, a pool, an object), translated into what happened in Ceph.
    pub fn ceph(op: &str, target: &str, rc: i32) -> Self {
        let errno = Errno::from_raw(rc.saturating_abs());
        let what = match errno {
            Errno::ENOENT => "no such image, snapshot, pool or object",
            Errno::EEXIST => "it exists already",
            Errno::EBUSY => {
                "it is in use: mapped or open on some host, its lock held by another client, or \
                 it has clones"
            }
            Errno::ENOTEMPTY => "it still has snapshots",
            Errno::ETIMEDOUT => {
                "the cluster did not answer in time; check that its monitors are up and \
                 reachable (`ceph -s`)"
            }
            Errno::EPERM | Errno::EACCES => {
                "the cluster refused the client's key or capabilities (cephx)"
            }
            Errno::ENOSPC | Errno::EDQUOT => "the cluster or the pool is full",
            Errno::EROFS => "it is read-only (a snapshot, or a pool set read-only)",
            Errno::ESHUTDOWN => "this client was blocklisted by the cluster",
            Errno::ENOTCONN => "not connected to the cluster",
            Errno::EINVAL => "the cluster refused the request as invalid",
            Errno::ECANCELED => {
                "the comparison that guards the change failed: someone else changed it first"
            }
            _ => "the call failed",
        };
        let kind = match errno {
            Errno::ENOTEMPTY => ErrorKind::Busy,
            Errno::ETIMEDOUT | Errno::ENOTCONN | Errno::ESHUTDOWN => ErrorKind::Io,
            Errno::EDQUOT => ErrorKind::NoSpace,
            Errno::ECANCELED => ErrorKind::Inconsistent,
            Errno::EROFS => ErrorKind::Permission,
            _ => match kind_of_errno(errno) {
                ErrorKind::Kernel => ErrorKind::Io,
                kind => kind,
            },
        };
        Self::new(
            kind,
            format!("{op} {target}: {what} ({}, {errno:?})", errno.desc()),
        )
        .with_source(io::Error::from_raw_os_error(errno as i32))
    }

    /// The errno behind a device-mapper failure, if it came from an ioctl.
    pub fn errno(&self) -> Option<Errno> {
        let source = self.source.as_deref()?;
        if let Some(dm) = source.downcast_ref::<DmError>() {
            return dm_errno(dm);
        }
        source
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
            .map(Errno::from_raw)
    }
}

/// The errno of a failed device-mapper ioctl.
fn dm_errno(err: &DmError) -> Option<Errno> {
    match err {
        DmError::Core(DmCoreError::Ioctl(_, _, _, errno)) => Some(**errno),
        _ => None,
    }
}

fn kind_of_errno(errno: Errno) -> ErrorKind {
    match errno {
        Errno::EBUSY => ErrorKind::Busy,
        Errno::ENXIO | Errno::ENODEV | Errno::ENOENT | Errno::ENODATA => ErrorKind::NotFound,
        Errno::EEXIST => ErrorKind::AlreadyExists,
        Errno::ENOSPC => ErrorKind::NoSpace,
        Errno::EPERM | Errno::EACCES => ErrorKind::Permission,
        Errno::EINVAL => ErrorKind::Invalid,
        _ => ErrorKind::Kernel,
    }
}

/// What an errno from a device-mapper ioctl means, in words.
fn describe_dm_errno(errno: Errno) -> String {
    let what = match errno {
        Errno::EBUSY => "device is busy (open, mounted, or used by another device)",
        Errno::ENXIO | Errno::ENODEV | Errno::ENOENT => "no such device",
        Errno::ENODATA => "no such thin device in the pool",
        Errno::EEXIST => "it exists already",
        Errno::ENOSPC => "the pool is out of space",
        Errno::EPERM | Errno::EACCES => "permission denied; device-mapper needs root",
        Errno::EINVAL => "the kernel refused the request as invalid (its reason is in `dmesg`)",
        Errno::EIO => "I/O error on the device",
        Errno::ENOMEM => "the kernel is out of memory",
        _ => "the kernel refused the request",
    };
    format!(
        "{what} ({})",
        errno.desc().to_owned() + ", " + &format!("{errno:?}")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ioctl_error(errno: Errno) -> DmError {
        DmError::Core(DmCoreError::Ioctl(0, None, None, Box::new(errno)))
    }

    #[test]
    fn kernel_errnos_become_kinds_and_words() {
        let busy = Error::dm("remove", "thinstack-1-p-thin-1", ioctl_error(Errno::EBUSY));
        assert_eq!(busy.kind(), ErrorKind::Busy);
        assert!(busy.to_string().contains("device is busy"), "{busy}");
        assert!(busy.to_string().contains("thinstack-1-p-thin-1"), "{busy}");
        assert_eq!(busy.errno(), Some(Errno::EBUSY));

        let gone = Error::dm("status", "x", ioctl_error(Errno::ENXIO));
        assert_eq!(gone.kind(), ErrorKind::NotFound);
        let full = Error::dm("message", "x", ioctl_error(Errno::ENOSPC));
        assert_eq!(full.kind(), ErrorKind::NoSpace);
        let exists = Error::dm("create", "x", ioctl_error(Errno::EEXIST));
        assert_eq!(exists.kind(), ErrorKind::AlreadyExists);
    }

    #[test]
    fn missing_control_node_says_no_device_mapper() {
        let err = Error::dm(
            "open",
            "device-mapper",
            DmError::Core(DmCoreError::ContextInit("No such file".into())),
        );
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("no device-mapper"), "{err}");
    }

    #[test]
    fn io_errors_keep_their_kind() {
        let err = Error::io(
            "opening /x",
            io::Error::from_raw_os_error(Errno::ENOENT as i32),
        );
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(err.to_string().starts_with("opening /x: "));
    }

    #[test]
    fn kinds_serialize_in_snake_case() {
        assert_eq!(ErrorKind::AlreadyExists.to_string(), "already_exists");
        assert_eq!(ErrorKind::NoSpace.to_string(), "no_space");
    }
}
