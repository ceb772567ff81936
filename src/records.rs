//! Persisted records: small JSON files written atomically and durably.
//!
//! A record is written to `<name>.tmp`, fsynced, renamed over `<name>`, and the directory is
//! fsynced, so after a crash or power cut a reader sees either the old record or the new one,
//! never a torn one. Leftover `.tmp` files are ignored by readers and swept by [`sweep_temp`].

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

const TEMP_EXTENSION: &str = "tmp";

/// Create `dir` (and its parents) readable by root only, if it is not there yet.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("creating directory {}", dir.display()), e))
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(TEMP_EXTENSION);
    path.with_file_name(name)
}

/// Replace the file at `path` with `bytes`, atomically and durably (mode 0600).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let temp = temp_path(path);
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&temp, path))
        .and_then(|()| sync_dir_of(path));
    written.map_err(|e| {
        let _ = fs::remove_file(&temp);
        Error::io(format!("writing record {}", path.display()), e)
    })
}

/// Store `value` as pretty JSON at `path`, atomically and durably.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("records always serialize");
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Read the JSON record at `path`; `None` when there is none.
///
/// Returns an `Inconsistent` error naming the file when it exists but does not parse.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading record {}", path.display()), e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        Error::inconsistent(format!(
            "record {} is damaged ({e}); move it aside and run `thinstack pool check`",
            path.display()
        ))
    })
}

/// Remove the record at `path` durably; absent is fine.
pub fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir_of(path)
            .map_err(|e| Error::io(format!("syncing after removing {}", path.display()), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing record {}", path.display()), e)),
    }
}

/// Delete `*.tmp` files a crash left in `dir`; returns how many.
pub fn sweep_temp(dir: &Path) -> Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    let mut swept = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        // `Path::extension`, not `ends_with`: the latter compares whole components.
        if path.extension().is_some_and(|ext| ext == TEMP_EXTENSION) {
            fs::remove_file(&path)
                .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
            swept += 1;
        }
    }
    Ok(swept)
}

fn sync_dir_of(path: &Path) -> std::io::Result<()> {
    File::open(path.parent().unwrap_or(Path::new("/")))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn records_round_trip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.json");
        assert_eq!(read_json::<Vec<u32>>(&path).unwrap(), None);
        write_json(&path, &vec![1, 2]).unwrap();
        write_json(&path, &vec![3]).unwrap();
        assert_eq!(read_json::<Vec<u32>>(&path).unwrap(), Some(vec![3]));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!temp_path(&path).exists());
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert_eq!(read_json::<Vec<u32>>(&path).unwrap(), None);
    }

    #[test]
    fn damaged_record_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.json");
        fs::write(&path, b"{not json").unwrap();
        let err = read_json::<Vec<u32>>(&path).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Inconsistent);
        assert!(err.to_string().contains("pool.json"), "{err}");
    }

    #[test]
    fn leftover_temp_files_are_swept_and_records_kept() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.json.tmp"), b"x").unwrap();
        fs::write(dir.path().join("a.json"), b"[]").unwrap();
        assert_eq!(sweep_temp(dir.path()).unwrap(), 1);
        assert!(dir.path().join("a.json").exists());
    }

    #[test]
    fn private_dirs_are_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/b");
        ensure_private_dir(&state).unwrap();
        let mode = fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
