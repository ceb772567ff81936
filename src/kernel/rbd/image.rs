//! RBD images of one pool: create, clone, list, remove, and an open image's size, snapshots,
//! parent, children and metadata.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr;

use super::cluster::Io;
use super::sys;
use super::{c_string, check};
use crate::error::{Error, Result};

/// The features thinstack's images have: layering (clones), and the exclusive lock, object
/// map and fast diff that let one host own a writable image and let usage and diffs be read
/// from the object map instead of every object. The 6.1 kernel client maps all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageFeatures(pub u64);

impl Default for ImageFeatures {
    fn default() -> Self {
        ImageFeatures(u64::from(
            sys::RBD_FEATURE_LAYERING
                | sys::RBD_FEATURE_EXCLUSIVE_LOCK
                | sys::RBD_FEATURE_OBJECT_MAP
                | sys::RBD_FEATURE_FAST_DIFF
                | sys::RBD_FEATURE_DEEP_FLATTEN,
        ))
    }
}

/// One snapshot of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Its name.
    pub name: String,
    /// Its id in the image.
    pub id: u64,
    /// The image's size when it was taken.
    pub size: u64,
}

/// Options for create and clone, destroyed when dropped.
struct ImageOptions<'a> {
    handle: sys::rbd_image_options_t,
    io: &'a Io,
}

impl<'a> ImageOptions<'a> {
    fn new(io: &'a Io, features: ImageFeatures) -> Result<Self> {
        let mut handle: sys::rbd_image_options_t = ptr::null_mut();
        // Safety: out-pointer; destroyed in Drop.
        unsafe { io.lib().rbd_image_options_create(&mut handle) };
        let options = ImageOptions { handle, io };
        options.set(sys::RBD_IMAGE_OPTION_FEATURES, features.0)?;
        Ok(options)
    }

    /// Options for a clone: format 2, whose parent snapshot needs no protection and whose
    /// parent may go to the trash while clones of it live. (A create refuses the option.)
    fn for_clone(io: &'a Io, features: ImageFeatures) -> Result<Self> {
        let options = Self::new(io, features)?;
        options.set(sys::RBD_IMAGE_OPTION_CLONE_FORMAT, 2)?;
        Ok(options)
    }

    fn set(&self, option: u32, value: u64) -> Result<()> {
        // Safety: a valid options handle.
        let rc = unsafe {
            self.io
                .lib()
                .rbd_image_options_set_uint64(self.handle, option as c_int, value)
        };
        check(rc, "setting image option", &option.to_string())?;
        Ok(())
    }
}

impl Drop for ImageOptions<'_> {
    fn drop(&mut self) {
        // Safety: created in new, destroyed once.
        unsafe { self.io.lib().rbd_image_options_destroy(self.handle) };
    }
}

impl Io {
    /// Make a new image of `size` bytes. `AlreadyExists` when the name is taken.
    pub fn create_image(&self, name: &str, size: u64, features: ImageFeatures) -> Result<()> {
        let text = c_string("image", name)?;
        let options = ImageOptions::new(self, features)?;
        // Safety: valid context, name and options.
        let rc = unsafe {
            self.lib()
                .rbd_create4(self.handle, text.as_ptr(), size, options.handle)
        };
        check(rc, "creating image", &self.image_spec(name))?;
        Ok(())
    }

    /// Make `child` a clone of `parent@snapshot` in this pool.
    pub fn clone_image(
        &self,
        parent: &str,
        snapshot: &str,
        child: &str,
        features: ImageFeatures,
    ) -> Result<()> {
        let (p, s, c) = (
            c_string("image", parent)?,
            c_string("snapshot", snapshot)?,
            c_string("image", child)?,
        );
        let options = ImageOptions::for_clone(self, features)?;
        // Safety: valid contexts (the same one twice), names and options.
        let rc = unsafe {
            self.lib().rbd_clone3(
                self.handle,
                p.as_ptr(),
                s.as_ptr(),
                self.handle,
                c.as_ptr(),
                options.handle,
            )
        };
        let what = format!("{}@{snapshot} as {child}", self.image_spec(parent));
        check(rc, "cloning", &what)?;
        Ok(())
    }

    /// Remove an image and its data. `NotFound` when there is none, `Busy` while it is open
    /// (mapped) somewhere or has snapshots.
    pub fn remove_image(&self, name: &str) -> Result<()> {
        let text = c_string("image", name)?;
        // Safety: valid context and name.
        let rc = unsafe { self.lib().rbd_remove(self.handle, text.as_ptr()) };
        check(rc, "removing image", &self.image_spec(name))?;
        Ok(())
    }

    /// The names of every image in the pool (and namespace).
    pub fn image_names(&self) -> Result<Vec<String>> {
        let mut capacity = 64usize;
        loop {
            // Safety: a plain-data array librbd fills up to `count` entries.
            let mut specs: Vec<sys::rbd_image_spec_t> =
                vec![unsafe { std::mem::zeroed() }; capacity];
            let mut count = capacity;
            // Safety: the array holds `count` entries; librbd sets count to what it needs.
            let rc = unsafe {
                self.lib()
                    .rbd_list2(self.handle, specs.as_mut_ptr(), &mut count)
            };
            if rc == -(nix::errno::Errno::ERANGE as i32) {
                capacity = count.max(capacity * 2);
                continue;
            }
            check(rc, "listing the images of", &self.spec())?;
            // Safety: librbd filled `count` entries with NUL-terminated strings, freed after.
            let names = unsafe {
                let names = specs[..count].iter().map(|s| owned(s.name)).collect();
                self.lib()
                    .rbd_image_spec_list_cleanup(specs.as_mut_ptr(), count);
                names
            };
            return Ok(names);
        }
    }

    /// Open an image (at its head, or at `snapshot`), writable unless `read_only`.
    pub fn open(&self, name: &str, snapshot: Option<&str>, read_only: bool) -> Result<Image<'_>> {
        let text = c_string("image", name)?;
        let snap = snapshot.map(|s| c_string("snapshot", s)).transpose()?;
        let snap_ptr = snap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut handle: sys::rbd_image_t = ptr::null_mut();
        // Safety: valid context and strings; out-pointer to the image, closed in Drop.
        let rc = unsafe {
            if read_only {
                self.lib()
                    .rbd_open_read_only(self.handle, text.as_ptr(), &mut handle, snap_ptr)
            } else {
                self.lib()
                    .rbd_open(self.handle, text.as_ptr(), &mut handle, snap_ptr)
            }
        };
        let spec = match snapshot {
            Some(snapshot) => format!("{}@{snapshot}", self.image_spec(name)),
            None => self.image_spec(name),
        };
        check(rc, "opening image", &spec)?;
        Ok(Image {
            handle,
            io: self,
            spec,
        })
    }
}

/// An open image, closed when dropped.
pub struct Image<'a> {
    handle: sys::rbd_image_t,
    io: &'a Io,
    spec: String,
}

impl Image<'_> {
    /// `pool/image[@snapshot]`.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// Its size in bytes.
    pub fn size(&self) -> Result<u64> {
        let mut size = 0u64;
        // Safety: an open image; out-pointer.
        let rc = unsafe { self.io.lib().rbd_get_size(self.handle, &mut size) };
        check(rc, "reading the size of", &self.spec)?;
        Ok(size)
    }

    /// Grow (or, with `allow_shrink`, shrink) it to `size` bytes.
    pub fn resize(&self, size: u64, allow_shrink: bool) -> Result<()> {
        // Safety: an open image; no progress callback.
        let rc = unsafe {
            self.io
                .lib()
                .rbd_resize2(self.handle, size, allow_shrink, None, ptr::null_mut())
        };
        check(rc, "resizing", &self.spec)?;
        Ok(())
    }

    /// Copy what it reads from its parents into its own objects and detach it from them: it
    /// then has no parent. Costs a copy of every object the parents hold for it.
    pub fn flatten(&self) -> Result<()> {
        // Safety: an open image.
        let rc = unsafe { self.io.lib().rbd_flatten(self.handle) };
        check(rc, "flattening", &self.spec)?;
        Ok(())
    }

    /// Take a snapshot named `name`.
    pub fn snapshot(&self, name: &str) -> Result<()> {
        let text = c_string("snapshot", name)?;
        // Safety: an open image and a valid name.
        let rc = unsafe { self.io.lib().rbd_snap_create(self.handle, text.as_ptr()) };
        check(rc, "taking snapshot", &format!("{}@{name}", self.spec))?;
        Ok(())
    }

    /// Remove snapshot `name`. A snapshot with clones goes to the image's trash namespace
    /// (clone format 2) and is removed by Ceph once its last clone is.
    pub fn remove_snapshot(&self, name: &str) -> Result<()> {
        let text = c_string("snapshot", name)?;
        // Safety: an open image and a valid name.
        let rc = unsafe { self.io.lib().rbd_snap_remove(self.handle, text.as_ptr()) };
        check(rc, "removing snapshot", &format!("{}@{name}", self.spec))?;
        Ok(())
    }

    /// Its snapshots (the user namespace's: not those in the trash).
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let mut capacity: c_int = 16;
        loop {
            // Safety: a plain-data array librbd fills (with one terminating entry).
            let mut snaps: Vec<sys::rbd_snap_info_t> =
                vec![unsafe { std::mem::zeroed() }; capacity as usize + 1];
            let mut max = capacity;
            // Safety: the array holds max + 1 entries.
            let rc = unsafe {
                self.io
                    .lib()
                    .rbd_snap_list(self.handle, snaps.as_mut_ptr(), &mut max)
            };
            if rc == -(nix::errno::Errno::ERANGE as i32) {
                capacity = max.max(capacity * 2);
                continue;
            }
            let count = check(rc, "listing the snapshots of", &self.spec)? as usize;
            // Safety: librbd filled `count` entries; rbd_snap_list_end frees their names.
            let list: Vec<Snapshot> = unsafe {
                let list = snaps[..count]
                    .iter()
                    .map(|s| Snapshot {
                        name: owned(s.name),
                        id: s.id,
                        size: s.size,
                    })
                    .collect();
                self.io.lib().rbd_snap_list_end(snaps.as_mut_ptr());
                list
            };
            // The list also holds snapshots removed while clones still read them (in the
            // trash namespace, named by a uuid): not the user's, and not removable by name;
            // Ceph drops each when its last clone goes.
            let mut user = Vec::with_capacity(list.len());
            for snapshot in list {
                if self.snapshot_namespace(snapshot.id)?
                    == sys::rbd_snap_namespace_type_t_RBD_SNAP_NAMESPACE_TYPE_USER
                {
                    user.push(snapshot);
                }
            }
            return Ok(user);
        }
    }

    /// Which namespace snapshot `id` is in (the user's, or the trash's).
    fn snapshot_namespace(&self, id: u64) -> Result<sys::rbd_snap_namespace_type_t> {
        let mut namespace: sys::rbd_snap_namespace_type_t = 0;
        // Safety: an open image; an out-pointer to a plain enum.
        let rc = unsafe {
            self.io
                .lib()
                .rbd_snap_get_namespace_type(self.handle, id, &mut namespace)
        };
        check(rc, "reading the namespace of a snapshot of", &self.spec)?;
        Ok(namespace)
    }

    /// The image and snapshot it is a clone of, `None` when it is not a clone (or its parent
    /// was flattened away).
    pub fn parent(&self) -> Result<Option<(String, String)>> {
        // Safety: plain-data structs librbd fills and the cleanups free.
        let mut image: sys::rbd_linked_image_spec_t = unsafe { std::mem::zeroed() };
        let mut snap: sys::rbd_snap_spec_t = unsafe { std::mem::zeroed() };
        // Safety: an open image; out-pointers.
        let rc = unsafe {
            self.io
                .lib()
                .rbd_get_parent(self.handle, &mut image, &mut snap)
        };
        if rc == -(nix::errno::Errno::ENOENT as i32) {
            return Ok(None);
        }
        check(rc, "reading the parent of", &self.spec)?;
        // Safety: filled above; freed once.
        let parent = unsafe {
            let parent = (owned(image.image_name), owned(snap.name));
            self.io.lib().rbd_linked_image_spec_cleanup(&mut image);
            self.io.lib().rbd_snap_spec_cleanup(&mut snap);
            parent
        };
        Ok(Some(parent))
    }

    /// The images cloned from the snapshot this image was opened at (or, at the head, from
    /// any of its snapshots), those in the trash included.
    pub fn children(&self) -> Result<Vec<String>> {
        let mut capacity = 16usize;
        loop {
            // Safety: a plain-data array librbd fills.
            let mut specs: Vec<sys::rbd_linked_image_spec_t> =
                vec![unsafe { std::mem::zeroed() }; capacity];
            let mut count = capacity;
            // Safety: the array holds `count` entries.
            let rc = unsafe {
                self.io
                    .lib()
                    .rbd_list_children3(self.handle, specs.as_mut_ptr(), &mut count)
            };
            if rc == -(nix::errno::Errno::ERANGE as i32) {
                capacity = count.max(capacity * 2);
                continue;
            }
            check(rc, "listing the clones of", &self.spec)?;
            // Safety: `count` entries filled; freed once.
            let names = unsafe {
                let names = specs[..count].iter().map(|s| owned(s.image_name)).collect();
                self.io
                    .lib()
                    .rbd_linked_image_spec_list_cleanup(specs.as_mut_ptr(), count);
                names
            };
            return Ok(names);
        }
    }

    /// The image's metadata value of `key`, `None` when it has none.
    pub fn metadata(&self, key: &str) -> Result<Option<String>> {
        let text = c_string("metadata key", key)?;
        let mut buffer = vec![0u8; 4096];
        loop {
            let mut len = buffer.len();
            // Safety: the buffer's length is passed; librbd sets len to what it needs.
            let rc = unsafe {
                self.io.lib().rbd_metadata_get(
                    self.handle,
                    text.as_ptr(),
                    buffer.as_mut_ptr().cast::<c_char>(),
                    &mut len,
                )
            };
            match rc {
                rc if rc == -(nix::errno::Errno::ERANGE as i32) => buffer.resize(len, 0),
                rc if rc == -(nix::errno::Errno::ENOENT as i32) => return Ok(None),
                rc => {
                    check(rc, "reading metadata of", &format!("{} ({key})", self.spec))?;
                    let value = CStr::from_bytes_until_nul(&buffer).map_err(|_| {
                        Error::invalid(format!("metadata {key} of {}: not a string", self.spec))
                    })?;
                    return Ok(Some(value.to_string_lossy().into_owned()));
                }
            }
        }
    }

    /// Set the image's metadata `key` to `value`.
    pub fn set_metadata(&self, key: &str, value: &str) -> Result<()> {
        let (k, v) = (
            c_string("metadata key", key)?,
            c_string("metadata value", value)?,
        );
        // Safety: an open image and valid strings.
        let rc = unsafe {
            self.io
                .lib()
                .rbd_metadata_set(self.handle, k.as_ptr(), v.as_ptr())
        };
        check(rc, "setting metadata of", &format!("{} ({key})", self.spec))?;
        Ok(())
    }

    /// The byte ranges that hold data of the image's own (not its parent's), or that differ
    /// from `since` (a snapshot of it), ascending. `whole_object` reports whole objects, read
    /// from the object map alone.
    pub fn extents(&self, since: Option<&str>, whole_object: bool) -> Result<Vec<(u64, u64)>> {
        self.diff(since, false, whole_object, true)
    }

    /// The byte ranges that hold data, its parents' included (whole objects).
    pub fn extents_with_parent(&self) -> Result<Vec<(u64, u64)>> {
        self.diff(None, true, true, true)
    }

    /// The byte ranges (whole objects) the image changed since it was cloned from its parent:
    /// written, and also discarded or zeroed (which read as zeros now, not as the parent's
    /// data).
    pub fn changed_since_clone(&self) -> Result<Vec<(u64, u64)>> {
        self.diff(None, false, true, false)
    }

    /// Runs librbd's diff reports, merged when they touch; only those that hold data when
    /// `existing_only`.
    fn diff(
        &self,
        since: Option<&str>,
        include_parent: bool,
        whole_object: bool,
        existing_only: bool,
    ) -> Result<Vec<(u64, u64)>> {
        struct Collected {
            runs: Vec<(u64, u64)>,
            existing_only: bool,
        }
        unsafe extern "C" fn collect(
            offset: u64,
            len: usize,
            exists: c_int,
            arg: *mut c_void,
        ) -> c_int {
            // Safety: `arg` is the Collected passed below, alive for the whole call.
            let collected = &mut *(arg as *mut Collected);
            if exists != 0 || !collected.existing_only {
                match collected.runs.last_mut() {
                    Some((start, length)) if *start + *length == offset => *length += len as u64,
                    _ => collected.runs.push((offset, len as u64)),
                }
            }
            0
        }
        let size = self.size()?;
        let since = since.map(|s| c_string("snapshot", s)).transpose()?;
        let mut collected = Collected {
            runs: Vec::new(),
            existing_only,
        };
        // Safety: an open image; the callback writes only into `collected`, which outlives it.
        let rc = unsafe {
            self.io.lib().rbd_diff_iterate2(
                self.handle,
                since.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
                0,
                size,
                u8::from(include_parent),
                u8::from(whole_object),
                Some(collect),
                (&mut collected as *mut Collected).cast::<c_void>(),
            )
        };
        check(rc, "reading the extents of", &self.spec)?;
        Ok(collected.runs)
    }

    /// The clients holding its exclusive lock.
    pub fn lock_owners(&self) -> Result<Vec<String>> {
        let mut mode: sys::rbd_lock_mode_t = 0;
        let mut owners: Vec<*mut c_char> = vec![ptr::null_mut(); 8];
        let mut count = owners.len();
        // Safety: the array holds `count` pointers; librbd allocates the strings.
        let rc = unsafe {
            self.io.lib().rbd_lock_get_owners(
                self.handle,
                &mut mode,
                owners.as_mut_ptr(),
                &mut count,
            )
        };
        if rc == -(nix::errno::Errno::ENOENT as i32) {
            return Ok(Vec::new());
        }
        check(rc, "reading the lock owners of", &self.spec)?;
        // Safety: `count` strings filled; freed once.
        let names = unsafe {
            let names = owners[..count].iter().map(|&o| owned(o)).collect();
            self.io
                .lib()
                .rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), count);
            names
        };
        Ok(names)
    }

    /// The image's id in its pool (its header object is `rbd_header.<id>`).
    pub fn id(&self) -> Result<String> {
        let mut buf = vec![0u8; 64];
        loop {
            // Safety: the buffer is `buf.len()` bytes; librbd writes a NUL-terminated id.
            let rc = unsafe {
                self.io
                    .lib()
                    .rbd_get_id(self.handle, buf.as_mut_ptr().cast(), buf.len())
            };
            if rc == -(nix::errno::Errno::ERANGE as i32) && buf.len() < 4096 {
                buf.resize(buf.len() * 4, 0);
                continue;
            }
            check(rc, "reading the id of", &self.spec)?;
            // Safety: NUL-terminated within the buffer, as librbd wrote it.
            return Ok(unsafe { owned(buf.as_ptr().cast()) });
        }
    }

    /// The addresses of the clients watching the image: whoever has it open or mapped.
    pub fn watchers(&self) -> Result<Vec<String>> {
        let mut watchers: Vec<sys::rbd_image_watcher_t> = Vec::with_capacity(64);
        let mut count = watchers.capacity();
        // Safety: room for `count` entries; librbd fills `count` of them.
        let rc = unsafe {
            self.io
                .lib()
                .rbd_watchers_list(self.handle, watchers.as_mut_ptr(), &mut count)
        };
        check(rc, "listing the watchers of", &self.spec)?;
        // Safety: `count` entries filled, their strings freed once by the cleanup.
        let addresses = unsafe {
            watchers.set_len(count);
            let addresses = watchers.iter().map(|w| owned(w.addr)).collect();
            self.io
                .lib()
                .rbd_watchers_list_cleanup(watchers.as_mut_ptr(), count);
            addresses
        };
        Ok(addresses)
    }

    /// Break the exclusive lock `owner` holds (and blocklist it, so a host that only seemed
    /// dead cannot write on).
    pub fn break_lock(&self, owner: &str) -> Result<()> {
        let text = c_string("lock owner", owner)?;
        // Safety: an open image and a valid string.
        let rc = unsafe {
            self.io.lib().rbd_lock_break(
                self.handle,
                sys::rbd_lock_mode_t_RBD_LOCK_MODE_EXCLUSIVE,
                text.as_ptr(),
            )
        };
        check(
            rc,
            "breaking the lock of",
            &format!("{} held by {owner}", self.spec),
        )?;
        Ok(())
    }
}

impl Drop for Image<'_> {
    fn drop(&mut self) {
        // Safety: the image is this value's own, closed once.
        let rc = unsafe { self.io.lib().rbd_close(self.handle) };
        if rc < 0 {
            tracing::warn!("{}", Error::ceph("closing", &self.spec, rc));
        }
    }
}

/// A NUL-terminated C string librbd allocated, copied (empty when null).
///
/// # Safety
/// `text` must be null or point to a NUL-terminated string.
unsafe fn owned(text: *const c_char) -> String {
    if text.is_null() {
        return String::new();
    }
    CStr::from_ptr(text).to_string_lossy().into_owned()
}

/// An image in the pool's trash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrashedImage {
    /// Its id (what trash calls take).
    pub id: String,
    /// The name it had.
    pub name: String,
}

impl Io {
    /// Move an image to the pool's trash: for an image whose snapshots still have clones,
    /// which Ceph keeps (and the clones read) until the last clone goes.
    pub fn trash_image(&self, name: &str) -> Result<()> {
        let text = c_string("image", name)?;
        // Safety: valid context and name; no deferment.
        let rc = unsafe { self.lib().rbd_trash_move(self.handle, text.as_ptr(), 0) };
        check(rc, "moving to the trash image", &self.image_spec(name))?;
        Ok(())
    }

    /// Remove an image from the trash; `Busy` while clones of it live.
    pub fn remove_trashed(&self, id: &str) -> Result<()> {
        let text = c_string("image id", id)?;
        // Safety: valid context and id; not forced.
        let rc = unsafe {
            self.lib()
                .rbd_trash_remove(self.handle, text.as_ptr(), false)
        };
        check(rc, "removing from the trash image id", id)?;
        Ok(())
    }

    /// The images in the pool's trash.
    pub fn trashed_images(&self) -> Result<Vec<TrashedImage>> {
        let mut capacity = 16usize;
        loop {
            // Safety: a plain-data array librbd fills.
            let mut entries: Vec<sys::rbd_trash_image_info_t> =
                vec![unsafe { std::mem::zeroed() }; capacity];
            let mut count = capacity;
            // Safety: the array holds `count` entries.
            let rc = unsafe {
                self.lib()
                    .rbd_trash_list(self.handle, entries.as_mut_ptr(), &mut count)
            };
            if rc == -(nix::errno::Errno::ERANGE as i32) {
                capacity = count.max(capacity * 2);
                continue;
            }
            check(rc, "listing the trash of", &self.spec())?;
            // Safety: `count` entries filled; freed once.
            let list = unsafe {
                let list = entries[..count]
                    .iter()
                    .map(|e| TrashedImage {
                        id: owned(e.id),
                        name: owned(e.name),
                    })
                    .collect();
                self.lib()
                    .rbd_trash_list_cleanup(entries.as_mut_ptr(), count);
                list
            };
            return Ok(list);
        }
    }
}
