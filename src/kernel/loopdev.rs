//! Loop devices over sparse backing files: create the file, find the loop device already bound
//! to it (after a daemon restart), attach, detach.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devicemapper::Device;
use loopdev::{LoopControl, LoopDevice};
use nix::errno::Errno;

use crate::error::{Error, Result};
use crate::units::ByteSize;

/// How often to retry when another process takes the free loop device between our query and
/// our attach (the kernel answers EBUSY then).
const ATTACH_ATTEMPTS: usize = 10;

/// Whether a backing file was made now or was already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    /// Created now, sparse and so all zeros.
    Created,
    /// Existing; its contents were not touched.
    Existing,
}

/// Make `path` a sparse file of `size` unless it exists; an existing file is never modified.
///
/// A new file is all zeros without writing anything, which is what a fresh thin-pool metadata
/// area needs. The file and its directory are fsynced so the file survives a power cut.
pub fn ensure_sparse_file(path: &Path, size: ByteSize) -> Result<FileState> {
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    let file = match created {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(FileState::Existing),
        Err(e) => return Err(Error::io(format!("creating {}", path.display()), e)),
    };
    let sized = file
        .set_len(size.bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| sync_parent(path));
    if let Err(e) = sized {
        let _ = std::fs::remove_file(path);
        return Err(Error::io(
            format!("making {} a sparse file of {size}", path.display()),
            e,
        ));
    }
    Ok(FileState::Created)
}

/// Tell loop device `device` that its file has grown.
pub fn refresh_capacity(device: &Path) -> Result<()> {
    LoopDevice::open(device)
        .and_then(|d| d.set_capacity())
        .map_err(|e| {
            Error::io(
                format!("refreshing the capacity of {}", device.display()),
                e,
            )
        })
}

/// Fsync the directory holding `path`, so a create or rename in it is durable.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    File::open(dir)?.sync_all()
}

/// A file's identity (device and inode), which survives renames and differs after re-creation.
fn file_identity(path: &Path) -> Result<(u64, u64)> {
    let meta =
        std::fs::metadata(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    Ok((meta.dev(), meta.ino()))
}

/// The loop device currently bound to `file`, if any.
///
/// Looks at every loop device's backing file in sysfs and compares device and inode, so a path
/// written differently (or a bind mount) still matches and a deleted-and-recreated file does not.
pub fn find_attached(file: &Path) -> Result<Option<PathBuf>> {
    let wanted = file_identity(file)?;
    let entries = match std::fs::read_dir("/sys/block") {
        Ok(entries) => entries,
        Err(e) => return Err(Error::io("listing /sys/block", e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let backing = entry.path().join("loop/backing_file");
        let Ok(text) = std::fs::read_to_string(&backing) else {
            continue; // not bound
        };
        // thinstack never sets autoclear; a device with it is being detached (LOOP_CLR_FD
        // while someone still holds it open only sets autoclear) or belongs to someone else.
        let autoclear = std::fs::read_to_string(entry.path().join("loop/autoclear"));
        if autoclear.is_ok_and(|flag| flag.trim() == "1") {
            continue;
        }
        let backing_path = Path::new(text.trim_end_matches('\n'));
        if file_identity(backing_path).ok() == Some(wanted) {
            return Ok(Some(PathBuf::from("/dev").join(name)));
        }
    }
    Ok(None)
}

/// A bound loop device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The loop device, `/dev/loopN`.
    pub device: PathBuf,
    /// The file it is bound to, as the kernel names it.
    pub file: PathBuf,
    /// Whether that file was deleted (the device then holds its only copy).
    pub deleted: bool,
}

/// Every bound loop device, from sysfs.
pub fn bindings() -> Result<Vec<Binding>> {
    let entries =
        std::fs::read_dir("/sys/block").map_err(|e| Error::io("listing /sys/block", e))?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue; // not bound
        };
        let (file, deleted) = parse_backing_file(&text);
        found.push(Binding {
            device: PathBuf::from("/dev").join(name),
            file,
            deleted,
        });
    }
    found.sort_by(|a, b| a.device.cmp(&b.device));
    Ok(found)
}

/// sysfs's `backing_file`: the path, with " (deleted)" appended once the file is unlinked.
fn parse_backing_file(text: &str) -> (PathBuf, bool) {
    let text = text.trim_end_matches('\n');
    match text.strip_suffix(" (deleted)") {
        Some(path) => (PathBuf::from(path), true),
        None => (PathBuf::from(text), false),
    }
}

/// Bind `file` to the loop device already bound to it, or to a free one.
///
/// Returns the loop device's path.
pub fn attach(file: &Path) -> Result<PathBuf> {
    if let Some(existing) = find_attached(file)? {
        tracing::info!(file = %file.display(), device = %existing.display(), "loop device already attached");
        return Ok(existing);
    }
    attach_free(file, false)
}

/// Bind `file` to a free loop device (read-only when asked), retrying when another process
/// takes the free device between our query and our attach (the kernel answers EBUSY then).
///
/// Returns the loop device's path.
pub fn attach_free(file: &Path, read_only: bool) -> Result<PathBuf> {
    let control = LoopControl::open()
        .map_err(|e| Error::io("opening /dev/loop-control (is the loop module loaded?)", e))?;
    let mut last_error = None;
    for _ in 0..ATTACH_ATTEMPTS {
        let device = control
            .next_free()
            .map_err(|e| Error::io("finding a free loop device", e))?;
        let path = device_path(&device)?;
        match device
            .with()
            .read_only(read_only)
            .autoclear(false)
            .attach(file)
        {
            Ok(()) => {
                tracing::info!(file = %file.display(), device = %path.display(), read_only, "attached loop device");
                return Ok(path);
            }
            Err(e) if e.raw_os_error() == Some(Errno::EBUSY as i32) => last_error = Some(e),
            Err(e) => {
                return Err(Error::io(
                    format!("attaching {} to {}", file.display(), path.display()),
                    e,
                ))
            }
        }
    }
    Err(Error::io(
        format!(
            "attaching {}: every free loop device was taken by someone else {ATTACH_ATTEMPTS} times",
            file.display()
        ),
        last_error.unwrap_or_else(|| io::Error::from_raw_os_error(Errno::EBUSY as i32)),
    ))
}

fn device_path(device: &LoopDevice) -> Result<PathBuf> {
    device
        .path()
        .ok_or_else(|| Error::not_found("a loop device has no path in /dev"))
}

/// How long [`detach`] waits for the kernel to let go of the file.
const DETACH_WAIT: Duration = Duration::from_secs(5);

/// Detach the loop device at `device` from its file, and wait (up to 5 s) until the binding is
/// gone: while anyone (udev, a probe) still holds the device open, the kernel only marks it
/// for detaching at the last close.
pub fn detach(device: &Path) -> Result<()> {
    let loop_device = LoopDevice::open(device)
        .map_err(|e| Error::io(format!("opening {}", device.display()), e))?;
    loop_device
        .detach()
        .map_err(|e| Error::io(format!("detaching {}", device.display()), e))?;
    drop(loop_device);
    let backing = device
        .file_name()
        .map(|name| Path::new("/sys/block").join(name).join("loop/backing_file"));
    let started = Instant::now();
    while backing.as_ref().is_some_and(|b| b.exists()) {
        if started.elapsed() > DETACH_WAIT {
            tracing::warn!(device = %device.display(), "loop device still held open; it detaches when released");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::info!(device = %device.display(), "detached loop device");
    Ok(())
}

/// Major and minor numbers of the block device at `path`, for device-mapper tables.
pub fn device_number(path: &Path) -> Result<Device> {
    let meta =
        std::fs::metadata(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    Ok(Device::from(meta.rdev()))
}

/// Size in bytes of a regular file.
pub fn file_size(path: &Path) -> Result<ByteSize> {
    std::fs::metadata(path)
        .map(|m| ByteSize::from_bytes(m.len()))
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleted_backing_files_are_told_apart() {
        assert_eq!(
            parse_backing_file("/var/lib/x/data (deleted)\n"),
            (PathBuf::from("/var/lib/x/data"), true)
        );
        assert_eq!(
            parse_backing_file("/var/lib/x/data\n"),
            (PathBuf::from("/var/lib/x/data"), false)
        );
    }

    #[test]
    fn sparse_files_are_created_once_and_never_touched_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        assert_eq!(
            ensure_sparse_file(&path, ByteSize::gib(4)).unwrap(),
            FileState::Created
        );
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 4 << 30);
        assert!(
            meta.blocks() < 64,
            "file should be sparse, has {} blocks",
            meta.blocks()
        );
        std::fs::write(&path, b"keep").unwrap();
        assert_eq!(
            ensure_sparse_file(&path, ByteSize::gib(4)).unwrap(),
            FileState::Existing
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    }

    #[test]
    fn unattached_file_has_no_loop_device() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        ensure_sparse_file(&path, ByteSize::mib(1)).unwrap();
        assert_eq!(find_attached(&path).unwrap(), None);
    }
}
