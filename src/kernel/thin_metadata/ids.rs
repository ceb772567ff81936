//! The thin ids a pool's metadata holds: the keys of the device-details btree's leaves, whose
//! root the metadata snapshot's copy of the superblock names. `thin_dump --skip-mappings` does
//! the same as a process.

use std::collections::BTreeSet;
use std::path::Path;

use super::*;
use crate::names::ThinId;

/// The thin ids in the metadata snapshot on `metadata` (a block device). The caller holds the
/// snapshot (`reserve_metadata_snap`) for the call.
pub fn snapshot_thin_ids(metadata: &Path) -> Result<BTreeSet<ThinId>> {
    thin_ids(&Device::open(metadata, nix::libc::O_DIRECT)?)
}

fn thin_ids(device: &Device<'_>) -> Result<BTreeSet<ThinId>> {
    let root = device.snapshot_superblock()?.u64_at(DEVICE_DETAILS_ROOT);
    let mut ids = BTreeSet::new();
    for block in leaves(device, root, "device-details")? {
        let leaf = device.leaf(block)?;
        for i in 0..leaf.entries() {
            let id = u32::try_from(leaf.key(i))
                .map_err(|_| device.damaged(block, "a thin id is out of range"))?;
            ids.insert(ThinId::new(id)?);
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::super::image::Image;
    use super::*;

    /// A two-level device-details btree whose leaves hold `leaves` (values of 24 bytes, as
    /// the kernel's device details are): the image, and the root's block.
    fn image(leaves: &[&[u64]]) -> (Image, u64) {
        let mut image = Image::new();
        let blocks: Vec<u64> = leaves
            .iter()
            .map(|keys| {
                let entries: Vec<(u64, u64)> = keys.iter().map(|&k| (k, 0)).collect();
                image.leaf(&entries, 24)
            })
            .collect();
        let root = image.internal(&blocks);
        image.set_root(DEVICE_DETAILS_ROOT, root);
        (image, root)
    }

    fn ids(raw: &[u32]) -> BTreeSet<ThinId> {
        raw.iter().map(|&i| ThinId::new(i).unwrap()).collect()
    }

    #[test]
    fn the_leaves_keys_are_the_thin_ids() {
        let (image, _) = image(&[&[1, 2, 7], &[9, 4000]]);
        assert_eq!(image.read(thin_ids).unwrap(), ids(&[1, 2, 7, 9, 4000]));
    }

    #[test]
    fn a_loop_in_the_btree_is_refused_not_walked_for_ever() {
        let (mut image, root) = image(&[&[1], &[2]]);
        // The root's second child is the root itself.
        let at = image.value_at(root, 1);
        image.put64(at, root);
        let err = image.read(thin_ids).unwrap_err();
        assert!(err.to_string().contains("loops"), "{err}");
    }

    #[test]
    fn a_block_that_names_another_number_is_refused() {
        let (mut image, root) = image(&[&[1], &[2]]);
        // The second leaf says it is block 9.
        let second_leaf = root - 1;
        image.bytes_mut()[second_leaf as usize * BLOCK + 8] = 9;
        let err = image.read(thin_ids).unwrap_err();
        let block = format!("block {second_leaf} of pool metadata");
        assert!(err.to_string().contains(&block), "{err}");
    }

    #[test]
    fn no_snapshot_and_no_superblock_are_told_apart() {
        let (mut image, _) = image(&[&[1]]);
        image.put64(HELD_ROOT, 0);
        let err = image.read(thin_ids).unwrap_err();
        assert!(err.to_string().contains("no metadata snapshot"), "{err}");
        image.bytes_mut()[32] = 0;
        let err = image.read(thin_ids).unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");
    }
}
