//! RADOS objects with an omap: where an `rbd` pool keeps what must change atomically in the
//! cluster (its transaction id), guarded by compare-and-set so a change never lands on a value
//! someone else changed first.

use std::cell::UnsafeCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int};
use std::ptr;

use super::cluster::Io;
use super::sys;
use super::{c_string, check};
use crate::error::{Error, Result};

/// A write operation, released when dropped.
struct WriteOp<'a> {
    handle: sys::rados_write_op_t,
    io: &'a Io,
}

impl<'a> WriteOp<'a> {
    fn new(io: &'a Io) -> Self {
        // Safety: released in Drop.
        let handle = unsafe { io.lib().rados_create_write_op() };
        WriteOp { handle, io }
    }

    fn operate(&self, object: &str, what: &str) -> Result<()> {
        let oid = c_string("object", object)?;
        // Safety: a built operation on a valid context.
        let rc = unsafe {
            self.io.lib().rados_write_op_operate(
                self.handle,
                self.io.handle,
                oid.as_ptr(),
                ptr::null_mut(),
                sys::LIBRADOS_OPERATION_NOFLAG as c_int,
            )
        };
        check(rc, what, &format!("{}/{object}", self.io.spec()))?;
        Ok(())
    }

    /// Compare omap `key` with `value` (an absent key compares as ""); the outcome is read
    /// once the operation ran.
    fn compare(&self, key: &str, value: &str) -> Result<Box<Compared>> {
        let k = c_string("omap key", key)?;
        let compared = Box::new(Compared(UnsafeCell::new(0)));
        // Safety: a valid operation; the result slot is boxed, so it stays put until the
        // operation ran (the caller keeps it past operate), and librados writes it only then.
        unsafe {
            self.io.lib().rados_write_op_omap_cmp(
                self.handle,
                k.as_ptr(),
                sys::LIBRADOS_CMPXATTR_OP_EQ as u8,
                value.as_ptr().cast::<c_char>(),
                value.len(),
                compared.0.get(),
            )
        };
        Ok(compared)
    }

    /// Set omap `key` to `value`, or remove it when `None`.
    fn change(&self, key: &str, value: Option<&str>) -> Result<()> {
        match value {
            Some(value) => self.set(key, value),
            None => {
                let k = c_string("omap key", key)?;
                let keys = [k.as_ptr()];
                // Safety: one key; librados copies it now.
                unsafe {
                    self.io
                        .lib()
                        .rados_write_op_omap_rm_keys(self.handle, keys.as_ptr(), 1)
                };
                Ok(())
            }
        }
    }

    fn set(&self, key: &str, value: &str) -> Result<()> {
        let k = c_string("omap key", key)?;
        let keys = [k.as_ptr()];
        let values = [value.as_ptr().cast::<c_char>()];
        let lens = [value.len()];
        // Safety: one key and one value of the given length; librados copies them now.
        unsafe {
            self.io.lib().rados_write_op_omap_set(
                self.handle,
                keys.as_ptr(),
                values.as_ptr(),
                lens.as_ptr(),
                1,
            )
        };
        Ok(())
    }
}

/// Where librados puts the outcome of one comparison of a write operation.
struct Compared(UnsafeCell<c_int>);

impl Compared {
    fn failed(&self) -> bool {
        // Safety: librados wrote it during operate, which has returned.
        let value = unsafe { *self.0.get() };
        value == -(nix::errno::Errno::ECANCELED as c_int)
    }
}

/// Which comparison of [`Io::omap_swap_guarded`] failed, if one did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarded {
    /// Both held; both keys changed.
    Done,
    /// The key was not what was expected; nothing changed.
    KeyDiffered,
    /// The key was, the guard was not; nothing changed.
    GuardDiffered,
}

impl Drop for WriteOp<'_> {
    fn drop(&mut self) {
        // Safety: created in new, released once.
        unsafe { self.io.lib().rados_release_write_op(self.handle) };
    }
}

impl Io {
    /// Make `object` holding omap `key` = `value`, atomically; `AlreadyExists` when the object
    /// exists (whoever made it first wins).
    pub fn create_object(&self, object: &str, key: &str, value: &str) -> Result<()> {
        let op = WriteOp::new(self);
        // Safety: a valid operation; no category.
        unsafe {
            self.lib().rados_write_op_create(
                op.handle,
                sys::LIBRADOS_CREATE_EXCLUSIVE as c_int,
                ptr::null(),
            )
        };
        op.set(key, value)?;
        op.operate(object, "creating object")
    }

    /// Set omap `key` of `object` to `new` if it is `old` now; `Inconsistent` (ECANCELED)
    /// when it is not, `NotFound` when there is no such object.
    pub fn compare_and_set(&self, object: &str, key: &str, old: &str, new: &str) -> Result<()> {
        let op = WriteOp::new(self);
        let _compared = op.compare(key, old)?;
        op.set(key, new)?;
        op.operate(object, &format!("changing {key} from {old} to {new} in"))
    }

    /// In one atomic operation on `object`: if omap `key` is `old` (absent when `None`), set
    /// it to `new` (remove it when `None`) and set every pair of `also`. Returns whether the
    /// comparison held (nothing changed when it did not); `NotFound` when there is no such
    /// object.
    pub fn omap_swap(
        &self,
        object: &str,
        key: &str,
        old: Option<&str>,
        new: Option<&str>,
        also: &[(&str, &str)],
    ) -> Result<bool> {
        let op = WriteOp::new(self);
        let compared = op.compare(key, old.unwrap_or(""))?;
        op.change(key, new)?;
        for (key, value) in also {
            op.set(key, value)?;
        }
        match op.operate(object, &format!("changing omap {key} of")) {
            Ok(()) => Ok(true),
            Err(_) if compared.failed() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// [`Io::omap_swap`] of `(key, old, new)` guarded by omap key `guard` being `was` ("" for
    /// absent), which becomes `then`: both compared, both changed, in one operation. Says
    /// which comparison failed, if one did.
    pub fn omap_swap_guarded(
        &self,
        object: &str,
        (key, old, new): (&str, Option<&str>, Option<&str>),
        (guard, was, then): (&str, &str, &str),
    ) -> Result<Guarded> {
        let op = WriteOp::new(self);
        let key_compared = op.compare(key, old.unwrap_or(""))?;
        let guard_compared = op.compare(guard, was)?;
        op.change(key, new)?;
        op.set(guard, then)?;
        match op.operate(object, &format!("changing omap {key} of")) {
            Ok(()) => Ok(Guarded::Done),
            Err(_) if key_compared.failed() => Ok(Guarded::KeyDiffered),
            Err(_) if guard_compared.failed() => Ok(Guarded::GuardDiffered),
            Err(e) => Err(e),
        }
    }

    /// Every omap key of `object` starting with `prefix`, with its value; `NotFound` when
    /// there is no such object. Read in pages, each its own read operation.
    pub fn omap_entries(&self, object: &str, prefix: &str) -> Result<BTreeMap<String, String>> {
        const PAGE: u64 = 1024;
        let mut entries: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let after = entries.keys().next_back().cloned().unwrap_or_default();
            let (page, more) = self.omap_page(object, prefix, &after, PAGE)?;
            entries.extend(page);
            if !more {
                return Ok(entries);
            }
        }
    }

    /// Up to `max` omap entries of `object` with `prefix`, after key `after`; and whether
    /// more follow.
    fn omap_page(
        &self,
        object: &str,
        prefix: &str,
        after: &str,
        max: u64,
    ) -> Result<(Vec<(String, String)>, bool)> {
        let oid = c_string("object", object)?;
        let (start, filter) = (c_string("omap key", after)?, c_string("omap key", prefix)?);
        // Safety: released below on every path.
        let op = unsafe { self.lib().rados_create_read_op() };
        let mut iter: sys::rados_omap_iter_t = ptr::null_mut();
        let (mut more, mut prval): (u8, c_int) = (0, 0);
        // Safety: a valid operation; the outputs outlive operate.
        let rc = unsafe {
            self.lib().rados_read_op_omap_get_vals2(
                op,
                start.as_ptr(),
                filter.as_ptr(),
                max,
                &mut iter,
                &mut more,
                &mut prval,
            );
            self.lib().rados_read_op_operate(
                op,
                self.handle,
                oid.as_ptr(),
                sys::LIBRADOS_OPERATION_NOFLAG as c_int,
            )
        };
        let target = format!("{}/{object}", self.spec());
        let result = check(rc, "reading the omap of", &target).and_then(|_| {
            check(prval, "reading the omap of", &target)?;
            // Safety: the iterator operate filled, read to its end, then freed.
            unsafe { self.pairs_of(iter, &target) }
        });
        // Safety: the operation is this function's own.
        unsafe { self.lib().rados_release_read_op(op) };
        Ok((result?, more != 0))
    }

    /// # Safety
    /// `iter` must be an iterator a completed read operation filled (or null).
    unsafe fn pairs_of(
        &self,
        iter: sys::rados_omap_iter_t,
        target: &str,
    ) -> Result<Vec<(String, String)>> {
        let mut pairs = Vec::new();
        if iter.is_null() {
            return Ok(pairs);
        }
        let text = |bytes: &[u8]| {
            String::from_utf8(bytes.to_vec())
                .map_err(|_| Error::inconsistent(format!("an omap entry of {target}: not UTF-8")))
        };
        let mut result = Ok(());
        loop {
            let (mut k, mut v): (*mut c_char, *mut c_char) = (ptr::null_mut(), ptr::null_mut());
            let (mut k_len, mut v_len) = (0usize, 0usize);
            let rc = self
                .lib()
                .rados_omap_get_next2(iter, &mut k, &mut v, &mut k_len, &mut v_len);
            if rc < 0 || k.is_null() {
                break;
            }
            let key = std::slice::from_raw_parts(k.cast::<u8>(), k_len);
            let value = std::slice::from_raw_parts(v.cast::<u8>(), v_len);
            match (text(key), text(value)) {
                (Ok(key), Ok(value)) => pairs.push((key, value)),
                (Err(e), _) | (_, Err(e)) => result = Err(e),
            }
        }
        self.lib().rados_omap_get_end(iter);
        result.map(|()| pairs)
    }

    /// Remove `object`; `NotFound` when there is none.
    pub fn remove_object(&self, object: &str) -> Result<()> {
        let op = WriteOp::new(self);
        // Safety: a valid operation.
        unsafe { self.lib().rados_write_op_remove(op.handle) };
        op.operate(object, "removing object")
    }

    /// The value of omap `key` of `object`; `None` when the object has no such key,
    /// `NotFound` when there is no such object.
    pub fn omap_value(&self, object: &str, key: &str) -> Result<Option<String>> {
        // Keys with `key` as their prefix sort from it on: the first is it, if it is there.
        let (page, _) = self.omap_page(object, key, "", 1)?;
        Ok(page.into_iter().find(|(k, _)| k == key).map(|(_, v)| v))
    }

    /// The cluster's raw capacity and use, in bytes: (total, used, available).
    pub fn cluster_capacity(&self) -> Result<(u64, u64, u64)> {
        // Safety: a plain-data struct librados fills.
        let mut stat: sys::rados_cluster_stat_t = unsafe { std::mem::zeroed() };
        // Safety: a connected cluster; out-pointer.
        let rc = unsafe {
            self.lib()
                .rados_cluster_stat(self.cluster.handle, &mut stat)
        };
        check(rc, "reading the capacity of the cluster of", &self.spec())?;
        Ok((stat.kb * 1024, stat.kb_used * 1024, stat.kb_avail * 1024))
    }
}
