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

/// The image metadata key holding how many parents the image has.
pub const DEPTH: &str = "thinstack.depth";

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
