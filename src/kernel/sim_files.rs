//! A sim layer's files, kept in memory (`thinstackd --sim`): what a mount puts in its target
//! directory and an unmount takes back, so a script that writes a file into a mounted layer
//! and reads it from a child sees what it would see on the real kernel.
//!
//! Regular files, directories and symbolic links, with their permission bits; nothing else
//! (the sim has no device nodes, sockets or fifos to keep).

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};

/// One entry of a tree, by its path relative to the tree's root.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Directory { mode: u32 },
    File { mode: u32, data: Arc<Vec<u8>> },
    Link(PathBuf),
}

/// A layer's files. Cloning shares the file contents (a snapshot copies no data).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree(BTreeMap<PathBuf, Entry>);

impl Tree {
    /// Each regular file's contents: one allocation of pool data, shared with the trees this
    /// one was copied to (a snapshot's) until either rewrites the file.
    pub fn contents(&self) -> impl Iterator<Item = &Arc<Vec<u8>>> {
        self.0.values().filter_map(|entry| match entry {
            Entry::File { data, .. } => Some(data),
            _ => None,
        })
    }

    /// Where a file has the same path and contents in `old`, take `old`'s contents, so data
    /// shared with a snapshot stays shared until it is rewritten (as unchanged blocks do).
    pub fn share_unchanged(&mut self, old: &Tree) {
        for (path, entry) in &mut self.0 {
            if let (Entry::File { data, .. }, Some(Entry::File { data: before, .. })) =
                (entry, old.0.get(path))
            {
                if data == before {
                    *data = before.clone();
                }
            }
        }
    }

    /// Read what `dir` holds (not `dir` itself).
    pub fn read(dir: &Path) -> Result<Tree> {
        let mut tree = Tree::default();
        read_into(dir, Path::new(""), &mut tree)?;
        Ok(tree)
    }

    /// Write the tree into the empty directory `dir`. Parents come before their children
    /// (the map is ordered by path).
    pub fn write(&self, dir: &Path) -> Result<()> {
        for (relative, entry) in &self.0 {
            let path = dir.join(relative);
            let written = match entry {
                Entry::Directory { mode } => std::fs::create_dir(&path)
                    .and_then(|()| std::fs::set_permissions(&path, mode_of(*mode))),
                Entry::File { mode, data } => std::fs::write(&path, data.as_slice())
                    .and_then(|()| std::fs::set_permissions(&path, mode_of(*mode))),
                Entry::Link(to) => symlink(to, &path),
            };
            written.map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        }
        Ok(())
    }
}

fn mode_of(mode: u32) -> std::fs::Permissions {
    std::fs::Permissions::from_mode(mode & 0o7777)
}

fn read_into(dir: &Path, relative: &Path, tree: &mut Tree) -> Result<()> {
    let entries = std::fs::read_dir(dir.join(relative))
        .map_err(|e| Error::io(format!("reading {}", dir.join(relative).display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
        let path = entry.path();
        let name = relative.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let mode = meta.permissions().mode();
        let kind = meta.file_type();
        if kind.is_dir() {
            tree.0.insert(name.clone(), Entry::Directory { mode });
            read_into(dir, &name, tree)?;
        } else if kind.is_file() {
            let data = std::fs::read(&path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            tree.0.insert(
                name,
                Entry::File {
                    mode,
                    data: Arc::new(data),
                },
            );
        } else if kind.is_symlink() {
            let to = std::fs::read_link(&path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            tree.0.insert(name, Entry::Link(to));
        } else {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{} is neither a file, a directory nor a symbolic link; the sim keeps only those",
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Empty `dir` (it stays).
pub fn clear(dir: &Path) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
    for entry in entries {
        let path = entry
            .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
            .path();
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let removed = if meta.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::mount_target::MountTarget;

    #[test]
    fn a_tree_is_read_back_as_written() {
        let from = tempfile::tempdir().unwrap();
        std::fs::create_dir(from.path().join("etc")).unwrap();
        std::fs::write(from.path().join("etc/hello"), "hi").unwrap();
        std::fs::set_permissions(from.path().join("etc/hello"), mode_of(0o600)).unwrap();
        symlink("etc/hello", from.path().join("link")).unwrap();
        let tree = Tree::read(from.path()).unwrap();
        assert_eq!(tree.contents().map(|data| data.len()).sum::<usize>(), 2);

        let to = tempfile::tempdir().unwrap();
        let target = MountTarget::open(to.path()).unwrap();
        target.ensure_empty().unwrap();
        tree.write(to.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(to.path().join("link")).unwrap(),
            "hi"
        );
        assert_eq!(Tree::read(to.path()).unwrap(), tree);
        assert_eq!(target.ensure_empty().unwrap_err().kind(), ErrorKind::Busy);
        clear(to.path()).unwrap();
        assert_eq!(Tree::read(to.path()).unwrap(), Tree::default());
    }
}
