//! RADOS objects with an omap: where an `rbd` pool keeps what must change atomically in the
//! cluster (its transaction id), guarded by compare-and-set so a change never lands on a value
//! someone else changed first.

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
        let k = c_string("omap key", key)?;
        let mut compared: c_int = 0;
        // Safety: a valid operation; `compared` outlives operate, which fills it.
        unsafe {
            self.lib().rados_write_op_omap_cmp(
                op.handle,
                k.as_ptr(),
                sys::LIBRADOS_CMPXATTR_OP_EQ as u8,
                old.as_ptr().cast::<c_char>(),
                old.len(),
                &mut compared,
            )
        };
        op.set(key, new)?;
        op.operate(object, &format!("changing {key} from {old} to {new} in"))
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
        let oid = c_string("object", object)?;
        let k = c_string("omap key", key)?;
        // Safety: released below on every path.
        let op = unsafe { self.lib().rados_create_read_op() };
        let mut iter: sys::rados_omap_iter_t = ptr::null_mut();
        let (mut more, mut prval): (u8, c_int) = (0, 0);
        // Safety: a valid operation; the outputs outlive operate.
        let rc = unsafe {
            self.lib().rados_read_op_omap_get_vals2(
                op,
                ptr::null(),
                k.as_ptr(),
                16,
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
            unsafe { self.find_in(iter, key) }
        });
        // Safety: the operation is this function's own.
        unsafe { self.lib().rados_release_read_op(op) };
        result
    }

    /// # Safety
    /// `iter` must be an iterator a completed read operation filled (or null).
    unsafe fn find_in(&self, iter: sys::rados_omap_iter_t, key: &str) -> Result<Option<String>> {
        if iter.is_null() {
            return Ok(None);
        }
        let mut found = None;
        loop {
            let (mut k, mut v): (*mut c_char, *mut c_char) = (ptr::null_mut(), ptr::null_mut());
            let (mut k_len, mut v_len) = (0usize, 0usize);
            let rc = self
                .lib()
                .rados_omap_get_next2(iter, &mut k, &mut v, &mut k_len, &mut v_len);
            if rc < 0 || k.is_null() {
                break;
            }
            let name = std::slice::from_raw_parts(k.cast::<u8>(), k_len);
            if name == key.as_bytes() {
                let value = std::slice::from_raw_parts(v.cast::<u8>(), v_len);
                found = Some(String::from_utf8(value.to_vec()).map_err(|_| {
                    Error::inconsistent(format!("omap {key} of {}: not UTF-8", self.spec()))
                })?);
            }
        }
        self.lib().rados_omap_get_end(iter);
        Ok(found)
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
