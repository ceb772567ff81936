//! How an `rbd` pool names what it keeps in the cluster: one image per thin id, one snapshot
//! per clone (on the parent, named after the clone), and one object for the pool's state.

use crate::names::{PoolName, ThinId};

/// The image of thin `id`: `<pool>.thin-<id>` (the pool name keeps pools sharing a Ceph pool
/// apart, as a namespace does).
pub fn image(pool: &PoolName, id: ThinId) -> String {
    format!("{}{id}", image_prefix(pool))
}

/// What every image of `pool` starts with.
pub fn image_prefix(pool: &PoolName) -> String {
    format!("{pool}.thin-")
}

/// The thin id an image of `pool` is named after, `None` for any other image.
pub fn thin_of_image(pool: &PoolName, image: &str) -> Option<ThinId> {
    let digits = image.strip_prefix(&image_prefix(pool))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.starts_with('0') {
        return None;
    }
    ThinId::new(digits.parse().ok()?).ok()
}

/// The snapshot of a parent image that clone `child` is made from.
pub fn clone_snapshot(child: ThinId) -> String {
    format!("to-{child}")
}

/// The object holding the pool's state (its transaction id).
pub fn state_object(pool: &PoolName) -> String {
    format!("{pool}.thinstack-pool")
}

/// The image metadata key holding how many parents an image has, as `<depth>@<image>`: the
/// image it is of. librbd copies a parent's metadata into each clone, so a clone starts with
/// its parent's value, which says its own depth is one more, and needs no write of its own.
/// (A bare `<depth>`, written by thinstack before, is the image's own.)
pub const DEPTH: &str = "thinstack.depth";

/// The value of [`DEPTH`] saying `image` has `depth` parents.
pub fn depth_value(depth: u32, image: &str) -> String {
    format!("{depth}@{image}")
}

/// How many parents `image` has, by its [`DEPTH`] value `raw`: its own value, or its parent's
/// copied into it by the clone (one more); `None` when `raw` says nothing usable.
pub fn depth_from(raw: &str, image: &str) -> Option<u32> {
    match raw.split_once('@') {
        None => raw.parse().ok(),
        Some((depth, of)) if of == image => depth.parse().ok(),
        Some((depth, _parent)) => depth.parse::<u32>().ok()?.checked_add(1),
    }
}

/// The state object's omap key for the transaction id of a pool from before hosts shared
/// it: the first host to start takes it as its own.
pub const TRANSACTION_ID: &str = "transaction_id";

/// The state object's omap key for `host`'s transaction id (each host has its own intents,
/// so its own transaction id).
pub fn transaction_id_of(host: &str) -> String {
    format!("transaction_id.{host}")
}

/// The object holding the pool's catalog of layers (`catalog.rs`).
pub fn catalog_object(pool: &PoolName) -> String {
    format!("{pool}.thinstack-catalog")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_depth_is_the_images_own_or_one_more_than_its_parents() {
        assert_eq!(depth_from(&depth_value(3, "p.thin-7"), "p.thin-7"), Some(3));
        assert_eq!(
            depth_from(&depth_value(3, "p.thin-7"), "p.thin-9"),
            Some(4),
            "a clone's copy"
        );
        assert_eq!(
            depth_from("5", "p.thin-9"),
            Some(5),
            "the old form is the image's own"
        );
        assert_eq!(depth_from("x@p.thin-9", "p.thin-9"), None);
        assert_eq!(depth_from("", "p.thin-9"), None);
    }

    #[test]
    fn image_names_round_trip_and_refuse_strangers() {
        let pool = PoolName::new("ci").unwrap();
        let id = ThinId::new(42).unwrap();
        assert_eq!(image(&pool, id), "ci.thin-42");
        assert_eq!(thin_of_image(&pool, "ci.thin-42"), Some(id));
        for other in [
            "ci.thin-",
            "ci.thin-042",
            "ci.thin-4x",
            "other.thin-42",
            "ci.thin-42.old",
        ] {
            assert_eq!(thin_of_image(&pool, other), None, "{other}");
        }
        assert_eq!(clone_snapshot(id), "to-42");
    }
}
