//! Which host writes an image: a RADOS lock on the image's header, taken by the host that
//! activates the image read-write and held until it deactivates it. Another host is refused
//! as busy meanwhile (to write it, to map it at all, or to snapshot it: a snapshot would catch
//! the writer's filesystem mid-write). A host's own hold from before a restart (another
//! connection, the same host name as cookie) is its own.
//!
//! Why not the kernel's `exclusive` map option: with it the kernel refuses to hand RBD's own
//! exclusive lock to librbd, so the writing host could not snapshot its image (a checkpoint
//! of a mounted layer, measured: EROFS). Without it, RBD's exclusive lock passes between the
//! kernel and this host's librbd for a snapshot, and this lock says which host may write.

use super::RbdPool;
use crate::error::{Error, ErrorKind, Result};
use crate::kernel::catalog::{BrokenLock, Catalog};
use crate::kernel::rbd::{Image, Locker};
use crate::names::ThinId;

/// The lock's name on the header object.
const WRITER_LOCK: &str = "thinstack.writer";

impl RbdPool {
    /// The header object of thin `id`'s image.
    fn header(&self, id: ThinId) -> Result<String> {
        if let Some(header) = self.known_headers().get(&id) {
            return Ok(header.clone());
        }
        let open = self.io.open(&self.image(id), None, true)?;
        self.note_header(id, &open)
    }

    /// Note the header object of thin `id`'s image, open as `open`; returns it.
    pub(super) fn note_header(&self, id: ThinId, open: &Image<'_>) -> Result<String> {
        let header = format!("rbd_header.{}", open.id()?);
        self.known_headers().insert(id, header.clone());
        Ok(header)
    }

    fn known_headers(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<ThinId, String>> {
        self.headers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn host(&self) -> &str {
        self.catalog.host()
    }

    /// Take thin `id`'s writer lock for this host; `Busy` when another host holds it.
    #[tracing::instrument(level = "debug", skip_all)]
    pub(super) fn claim_writer(&self, id: ThinId) -> Result<()> {
        let header = self.header(id)?;
        let description = format!("host {} writes this image", self.host());
        for _ in 0..3 {
            if self
                .io
                .lock_exclusive(&header, WRITER_LOCK, self.host(), &description)?
            {
                return Ok(());
            }
            let (ours, theirs) = self.holders(&header)?;
            if let Some(holder) = theirs.first() {
                return Err(self.written_elsewhere(id, holder));
            }
            // This host's hold from a connection before a restart: taken over.
            for hold in ours {
                self.io.break_lock(&header, WRITER_LOCK, &hold)?;
            }
        }
        Err(Error::new(
            ErrorKind::Busy,
            format!(
                "the writer lock of image {} changed hands while this host took it; try again",
                self.io.image_spec(&self.image(id))
            ),
        ))
    }

    /// Let go of thin `id`'s writer lock, if this host holds it.
    pub(super) fn release_writer(&self, id: ThinId) -> Result<()> {
        let header = self.header(id)?;
        if self.io.unlock(&header, WRITER_LOCK, self.host())? {
            return Ok(());
        }
        // Not this connection's hold: one from before a restart, or none.
        for hold in self.holders(&header)?.0 {
            self.io.break_lock(&header, WRITER_LOCK, &hold)?;
        }
        Ok(())
    }

    /// `Busy` when another host writes thin `id` (`what`: what would be refused).
    #[tracing::instrument(level = "debug", skip_all)]
    pub(super) fn refuse_if_written_elsewhere(&self, id: ThinId, what: &str) -> Result<()> {
        let header = self.header(id)?;
        match self.holders(&header)?.1.first() {
            None => Ok(()),
            Some(holder) => Err(self
                .written_elsewhere(id, holder)
                .context(format!("cannot {what}"))),
        }
    }

    /// The holds of the writer lock on `header`: this host's, and other hosts'.
    fn holders(&self, header: &str) -> Result<(Vec<Locker>, Vec<Locker>)> {
        Ok(self
            .io
            .lockers(header, WRITER_LOCK)?
            .into_iter()
            .partition(|hold| hold.cookie == self.host()))
    }

    fn written_elsewhere(&self, id: ThinId, holder: &Locker) -> Error {
        Error::new(
            ErrorKind::Busy,
            format!(
                "image {} is written by host {} (it holds the image's writer lock; a layer is \
                 written by one host at a time): deactivate it there. If that host is dead, \
                 `thinstack layer break-lock LAYER` on this host takes the lock away and fences \
                 it (a host that is still alive loses its writes)",
                self.io.image_spec(&self.image(id)),
                holder.cookie
            ),
        )
    }

    /// See [`crate::kernel::PoolKernel::break_writer_lock`]: fence every other client of the
    /// image (RBD's lock owner with its lock broken, then every other watcher: the holder's
    /// kernel mapping), then break the writer lock.
    pub(super) fn break_writer(&self, id: ThinId) -> Result<BrokenLock> {
        let image = self.image(id);
        let header = self.header(id)?;
        let (_, theirs) = self.holders(&header)?;
        let Some(holder) = theirs.first().map(|h| h.cookie.clone()) else {
            return Err(Error::not_found(format!(
                "no other host holds the writer lock of image {}",
                self.io.image_spec(&image)
            )));
        };
        let own = self.io.cluster().own_addresses()?;
        let mut fenced = Vec::new();
        {
            // Read-write: librbd reads RBD's lock owners only of an image it could write.
            let open = self.io.open(&image, None, false)?;
            for owner in open.lock_owners()? {
                open.break_lock(&owner)?;
                fenced.push(owner);
            }
            for address in open.watchers()? {
                if !is_own(&own, &address) {
                    self.io.cluster().blocklist(&address)?;
                    fenced.push(address);
                }
            }
        }
        for hold in &theirs {
            if !is_own(&own, &hold.address) {
                self.io.cluster().blocklist(&hold.address)?;
                fenced.push(hold.address.clone());
            }
            self.io.break_lock(&header, WRITER_LOCK, hold)?;
        }
        fenced.dedup();
        tracing::warn!(image = %self.io.image_spec(&image), holder, ?fenced, "broke another host's writer lock");
        Ok(BrokenLock { holder, fenced })
    }
}

/// Whether client address `address` (`ip:port/nonce`) is one of `own` (this connection's).
fn is_own(own: &str, address: &str) -> bool {
    let nonce = |a: &str| a.rsplit_once('/').map(|(_, n)| n.to_string());
    match nonce(address) {
        Some(n) => own
            .split([',', '[', ']'])
            .any(|a| nonce(a).as_deref() == Some(n.as_str())),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_known_by_its_nonce() {
        let own = "[v2:10.0.0.5:0/3538153906,v1:10.0.0.5:0/3538153906]";
        assert!(is_own(own, "10.0.0.5:0/3538153906"));
        assert!(!is_own(own, "10.0.0.5:0/1403104616"));
        assert!(!is_own(own, "garbage"));
    }
}
