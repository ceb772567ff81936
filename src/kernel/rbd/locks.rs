//! Advisory locks on RADOS objects (librados' `cls_lock`): what an `rbd` pool takes on an
//! image's header to say which host writes the image, and what an operator breaks when that
//! host is dead.

use std::ffi::c_char;
use std::ptr;

use super::cluster::Io;
use super::{c_string, check};
use crate::error::Result;

/// One holder of a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locker {
    /// The RADOS client (`client.<id>`): one process's connection.
    pub client: String,
    /// What the holder named this hold.
    pub cookie: String,
    /// The client's address, to blocklist it.
    pub address: String,
}

impl Io {
    /// Take the exclusive lock `lock` on `object` (made when missing) as `cookie`, for ever
    /// (until unlocked or broken). Returns false when another client or cookie holds it;
    /// true when this client holds it now, as this cookie.
    pub fn lock_exclusive(
        &self,
        object: &str,
        lock: &str,
        cookie: &str,
        description: &str,
    ) -> Result<bool> {
        let (oid, name) = (c_string("object", object)?, c_string("lock", lock)?);
        let (cookie_c, desc) = (
            c_string("lock cookie", cookie)?,
            c_string("lock description", description)?,
        );
        // Safety: valid strings; a null duration is "for ever".
        let rc = unsafe {
            self.lib().rados_lock_exclusive(
                self.handle,
                oid.as_ptr(),
                name.as_ptr(),
                cookie_c.as_ptr(),
                desc.as_ptr(),
                ptr::null_mut(),
                0,
            )
        };
        match nix::errno::Errno::from_raw(-rc) {
            _ if rc == 0 => Ok(true),
            nix::errno::Errno::EEXIST => Ok(true),
            nix::errno::Errno::EBUSY => Ok(false),
            _ => check(
                rc,
                &format!("taking lock {lock} on"),
                &self.object_spec(object),
            )
            .map(|_| true),
        }
    }

    /// Let go of this client's hold of lock `lock` on `object` as `cookie`; false when this
    /// client holds no such hold (another connection's is broken with [`Io::break_lock`]).
    pub fn unlock(&self, object: &str, lock: &str, cookie: &str) -> Result<bool> {
        let (oid, name, cookie_c) = (
            c_string("object", object)?,
            c_string("lock", lock)?,
            c_string("lock cookie", cookie)?,
        );
        // Safety: valid strings.
        let rc = unsafe {
            self.lib()
                .rados_unlock(self.handle, oid.as_ptr(), name.as_ptr(), cookie_c.as_ptr())
        };
        if rc == -(nix::errno::Errno::ENOENT as i32) {
            return Ok(false);
        }
        check(
            rc,
            &format!("letting go of lock {lock} on"),
            &self.object_spec(object),
        )?;
        Ok(true)
    }

    /// Who holds lock `lock` on `object` (none when the object or the lock is not there).
    pub fn lockers(&self, object: &str, lock: &str) -> Result<Vec<Locker>> {
        let (oid, name) = (c_string("object", object)?, c_string("lock", lock)?);
        let mut sizes = [256usize; 4];
        loop {
            let mut buffers: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
            let mut lens = sizes;
            let mut exclusive = 0;
            let [tag, clients, cookies, addrs] = &mut buffers[..] else {
                unreachable!("four buffers")
            };
            // Safety: each buffer is as long as its length says; librados fills them.
            let rc = unsafe {
                self.lib().rados_list_lockers(
                    self.handle,
                    oid.as_ptr(),
                    name.as_ptr(),
                    &mut exclusive,
                    tag.as_mut_ptr().cast::<c_char>(),
                    &mut lens[0],
                    clients.as_mut_ptr().cast::<c_char>(),
                    &mut lens[1],
                    cookies.as_mut_ptr().cast::<c_char>(),
                    &mut lens[2],
                    addrs.as_mut_ptr().cast::<c_char>(),
                    &mut lens[3],
                )
            };
            let rc = rc as i32;
            if rc == -(nix::errno::Errno::ERANGE as i32) && sizes.iter().all(|&n| n < 1 << 20) {
                sizes = lens.map(|n| n.max(256) * 2);
                continue;
            }
            if rc == -(nix::errno::Errno::ENOENT as i32) {
                return Ok(Vec::new());
            }
            check(
                rc,
                &format!("listing the holders of lock {lock} on"),
                &self.object_spec(object),
            )?;
            let strings = |buf: &[u8], len: usize| -> Vec<String> {
                buf[..len.min(buf.len())]
                    .split(|&b| b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            };
            let (clients, cookies, addrs) = (
                strings(clients, lens[1]),
                strings(cookies, lens[2]),
                strings(addrs, lens[3]),
            );
            return Ok(clients
                .into_iter()
                .zip(cookies)
                .zip(addrs)
                .take(rc.max(0) as usize)
                .map(|((client, cookie), address)| Locker {
                    client,
                    cookie,
                    address,
                })
                .collect());
        }
    }

    /// Break `holder`'s hold of lock `lock` on `object`; gone already is fine.
    pub fn break_lock(&self, object: &str, lock: &str, holder: &Locker) -> Result<()> {
        let (oid, name) = (c_string("object", object)?, c_string("lock", lock)?);
        let (client, cookie) = (
            c_string("lock holder", &holder.client)?,
            c_string("lock cookie", &holder.cookie)?,
        );
        // Safety: valid strings.
        let rc = unsafe {
            self.lib().rados_break_lock(
                self.handle,
                oid.as_ptr(),
                name.as_ptr(),
                client.as_ptr(),
                cookie.as_ptr(),
            )
        };
        if rc == -(nix::errno::Errno::ENOENT as i32) {
            return Ok(());
        }
        check(
            rc,
            &format!("breaking lock {lock} held by {} on", holder.client),
            &self.object_spec(object),
        )?;
        Ok(())
    }

    fn object_spec(&self, object: &str) -> String {
        format!("{}/{object}", self.spec())
    }
}
