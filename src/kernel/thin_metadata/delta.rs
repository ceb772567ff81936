//! Where one thin device's mappings differ from another's, read from the data-mapping btree
//! the metadata snapshot names: what `thin_delta` reports, without its process.
//!
//! The mapping btree has two levels: the top maps a thin id to the root of that device's own
//! btree, which maps a virtual block to a data block (the value's upper 40 bits) and the time
//! it was mapped (its lower 24). A snapshot starts out sharing its origin's btree, and dm-thin
//! copies a node only when it changes, so a leaf both devices' btrees hold maps the same blocks
//! the same way in both: only the leaves one device holds alone are read.

use std::collections::HashSet;
use std::path::Path;

use super::*;
use crate::kernel::{DeltaKind, DeltaRun};
use crate::names::ThinId;
use crate::units::ByteSize;

/// The btree's name in errors.
const TREE: &str = "data-mapping";

/// A mapping's data block: the value without its 24 bits of time.
const TIME_BITS: u32 = 24;

/// Where thin `id` differs from thin `base`, or every range it maps without a base, in bytes
/// of `block_size` blocks, ascending. `Data` where `id` maps a block of its own (written
/// since the base, or mapped at all without one), `Unmapped` where only the base maps one.
/// The caller holds the metadata snapshot (`reserve_metadata_snap`) for the call.
pub fn snapshot_delta(
    metadata: &Path,
    base: Option<ThinId>,
    id: ThinId,
    block_size: ByteSize,
) -> Result<Vec<DeltaRun>> {
    delta(
        &Device::open(metadata, nix::libc::O_DIRECT)?,
        base,
        id,
        block_size,
    )
}

fn delta(
    device: &Device<'_>,
    base: Option<ThinId>,
    id: ThinId,
    block_size: ByteSize,
) -> Result<Vec<DeltaRun>> {
    let top = device.snapshot_superblock()?.u64_at(DATA_MAPPING_ROOT);
    let mut runs = Runs::new(block_size.bytes());
    let right = leaves(device, device_root(device, top, id)?, TREE)?;
    let Some(base) = base else {
        for leaf in right {
            for (block, _) in mappings(device, leaf)? {
                runs.push(block, DeltaKind::Data)?;
            }
        }
        return Ok(runs.done());
    };
    let left = leaves(device, device_root(device, top, base)?, TREE)?;
    let shared: HashSet<u64> = left.iter().copied().collect::<HashSet<_>>();
    let shared: HashSet<u64> = right
        .iter()
        .copied()
        .filter(|b| shared.contains(b))
        .collect();
    // Leaf by leaf, so memory holds two leaves, not two devices' mappings.
    let mut l = OwnMappings::new(device, &left, &shared);
    let mut r = OwnMappings::new(device, &right, &shared);
    loop {
        let change = match (l.peek()?, r.peek()?) {
            (None, None) => break,
            (Some((lb, _)), Some((rb, _))) if lb < rb => {
                l.take();
                Some((lb, DeltaKind::Unmapped))
            }
            (Some((lb, ld)), Some((rb, rd))) if lb == rb => {
                l.take();
                r.take();
                (ld != rd).then_some((rb, DeltaKind::Data))
            }
            (_, Some((rb, _))) => {
                r.take();
                Some((rb, DeltaKind::Data))
            }
            (Some((lb, _)), None) => {
                l.take();
                Some((lb, DeltaKind::Unmapped))
            }
        };
        if let Some((block, kind)) = change {
            runs.push(block, kind)?;
        }
    }
    Ok(runs.done())
}

/// The root of thin `id`'s own btree: its value in the top level.
fn device_root(device: &Device<'_>, top: u64, id: ThinId) -> Result<u64> {
    let key = u64::from(id.value());
    let mut block = top;
    for _ in 0..MAX_DEPTH {
        let node = device.node(block)?;
        if node.is_leaf() {
            if node.value_size() != 8 {
                return Err(device.damaged(block, "a device's root is not a block number"));
            }
            return (0..node.entries())
                .find(|&i| node.key(i) == key)
                .map(|i| node.value_u64(i))
                .ok_or_else(|| not_in_metadata(device, id));
        }
        // The last child whose first key is at most the id.
        match (0..node.entries()).rev().find(|&i| node.key(i) <= key) {
            Some(i) => block = node.value_u64(i),
            None => return Err(not_in_metadata(device, id)),
        }
    }
    Err(device.damaged(top, &format!("the {TREE} btree is deeper than any pool's")))
}

fn not_in_metadata(device: &Device<'_>, id: ThinId) -> Error {
    Error::inconsistent(format!(
        "thin device {id} is not in the metadata snapshot of pool metadata {}",
        device.path.display()
    ))
}

/// The mappings (virtual block, data block) of the `leaves` not in `shared`, in key order,
/// read one leaf at a time.
struct OwnMappings<'d, 'a> {
    device: &'d Device<'a>,
    leaves: std::vec::IntoIter<u64>,
    current: std::vec::IntoIter<(u64, u64)>,
    next: Option<(u64, u64)>,
}

impl<'d, 'a> OwnMappings<'d, 'a> {
    fn new(device: &'d Device<'a>, leaves: &[u64], shared: &HashSet<u64>) -> Self {
        let own: Vec<u64> = leaves
            .iter()
            .copied()
            .filter(|leaf| !shared.contains(leaf))
            .collect();
        OwnMappings {
            device,
            leaves: own.into_iter(),
            current: Vec::new().into_iter(),
            next: None,
        }
    }

    /// The next mapping, not taken; leaves are read as they are reached.
    fn peek(&mut self) -> Result<Option<(u64, u64)>> {
        while self.next.is_none() {
            if let Some(mapping) = self.current.next() {
                self.next = Some(mapping);
            } else if let Some(leaf) = self.leaves.next() {
                self.current = mappings(self.device, leaf)?.into_iter();
            } else {
                break;
            }
        }
        Ok(self.next)
    }

    /// Take the mapping [`OwnMappings::peek`] showed.
    fn take(&mut self) {
        self.next = None;
    }
}

/// The mappings of one leaf, in key order.
fn mappings(device: &Device<'_>, leaf: u64) -> Result<Vec<(u64, u64)>> {
    let node = device.leaf(leaf)?;
    if node.value_size() != 8 {
        return Err(device.damaged(leaf, "its values are not block mappings"));
    }
    let entries: Vec<(u64, u64)> = (0..node.entries())
        .map(|i| (node.key(i), node.value_u64(i) >> TIME_BITS))
        .collect();
    if entries.windows(2).any(|pair| pair[0].0 >= pair[1].0) {
        return Err(device.damaged(leaf, "its keys are out of order"));
    }
    Ok(entries)
}

/// Blocks of one kind, in ascending order, joined into byte ranges.
struct Runs {
    block_bytes: u64,
    runs: Vec<DeltaRun>,
}

impl Runs {
    fn new(block_bytes: u64) -> Runs {
        Runs {
            block_bytes,
            runs: Vec::new(),
        }
    }

    fn push(&mut self, block: u64, kind: DeltaKind) -> Result<()> {
        let offset = block
            .checked_mul(self.block_bytes)
            .filter(|offset| offset.checked_add(self.block_bytes).is_some())
            .ok_or_else(|| {
                Error::inconsistent(format!(
                    "the pool's metadata maps block {block}, beyond any device"
                ))
            })?;
        // Each leaf's keys are checked in order; this catches damage across leaves.
        if let Some(last) = self.runs.last() {
            if offset < last.offset + last.length {
                return Err(Error::inconsistent(format!(
                    "the pool's metadata maps block {block} out of order; check the metadata with thin_check"
                )));
            }
        }
        match self.runs.last_mut() {
            Some(last) if last.kind == kind && last.offset + last.length == offset => {
                last.length += self.block_bytes;
            }
            _ => self.runs.push(DeltaRun {
                offset,
                length: self.block_bytes,
                kind,
            }),
        }
        Ok(())
    }

    fn done(self) -> Vec<DeltaRun> {
        self.runs
    }
}

#[cfg(test)]
mod tests {
    use super::super::image::Image;
    use super::*;

    const K: u64 = 65536;

    fn mapping(block: u64, data: u64) -> (u64, u64) {
        (block, data << TIME_BITS | 7)
    }

    fn thin(id: u32) -> ThinId {
        ThinId::new(id).unwrap()
    }

    fn run(block: u64, blocks: u64, kind: DeltaKind) -> DeltaRun {
        DeltaRun {
            offset: block * K,
            length: blocks * K,
            kind,
        }
    }

    /// Thin 1 (the origin) maps blocks 0-9, 20-29 and 40-49 in three leaves under an
    /// internal node; thin 2, its snapshot, shares the first and third leaves, and its second
    /// rewrote block 21, dropped 25 and mapped 30-31 (the same time, to show only the data
    /// block counts).
    fn image() -> Image {
        let mut image = Image::new();
        let first: Vec<_> = (0..10).map(|b| mapping(b, 100 + b)).collect();
        let second: Vec<_> = (20..30).map(|b| mapping(b, 100 + b)).collect();
        let third: Vec<_> = (40..50).map(|b| mapping(b, 100 + b)).collect();
        let first = image.leaf(&first, 8);
        let third = image.leaf(&third, 8);
        let origin_second = image.leaf(&second, 8);
        let mut changed: Vec<_> = second.iter().copied().filter(|&(b, _)| b != 25).collect();
        changed[1] = mapping(21, 500);
        changed.extend([mapping(30, 501), mapping(31, 502)]);
        let snapshot_second = image.leaf(&changed, 8);
        let origin = image.internal(&[first, origin_second, third]);
        let snapshot = image.internal(&[first, snapshot_second, third]);
        let top = image.leaf(&[(1, origin), (2, snapshot)], 8);
        image.set_root(DATA_MAPPING_ROOT, top);
        image
    }

    fn delta_of(image: &Image, base: Option<u32>, id: u32) -> Result<Vec<DeltaRun>> {
        image.read(|device| delta(device, base.map(thin), thin(id), ByteSize::from_bytes(K)))
    }

    #[test]
    fn a_delta_is_what_changed_and_what_went() {
        assert_eq!(
            delta_of(&image(), Some(1), 2).unwrap(),
            [
                run(21, 1, DeltaKind::Data),
                run(25, 1, DeltaKind::Unmapped),
                run(30, 2, DeltaKind::Data),
            ]
        );
    }

    #[test]
    fn the_other_way_round_what_went_is_what_the_base_lacks() {
        assert_eq!(
            delta_of(&image(), Some(2), 1).unwrap(),
            [
                run(21, 1, DeltaKind::Data),
                run(25, 1, DeltaKind::Data),
                run(30, 2, DeltaKind::Unmapped),
            ]
        );
    }

    #[test]
    fn without_a_base_it_is_every_mapped_range() {
        assert_eq!(
            delta_of(&image(), None, 2).unwrap(),
            [
                run(0, 10, DeltaKind::Data),
                run(20, 5, DeltaKind::Data),
                run(26, 6, DeltaKind::Data),
                run(40, 10, DeltaKind::Data),
            ]
        );
        assert!(delta_of(&image(), Some(2), 2).unwrap().is_empty());
    }

    #[test]
    fn a_shared_leaf_is_not_read() {
        let mut image = image();
        // Spoil the third leaf, which both devices share: a delta that read it would refuse
        // it. (The first leaf of a btree is read, to learn where its leaves are.)
        image.bytes_mut()[3 * BLOCK + 8] = 99;
        assert_eq!(delta_of(&image, Some(1), 2).unwrap().len(), 3);
        assert!(delta_of(&image, None, 2).is_err());
    }

    #[test]
    fn leaves_out_of_order_are_refused() {
        let mut image = Image::new();
        let high = image.leaf(&[mapping(50, 1), mapping(51, 2)], 8);
        let low = image.leaf(&[mapping(10, 3)], 8);
        let root = image.internal(&[high, low]);
        let top = image.leaf(&[(1, root)], 8);
        image.set_root(DATA_MAPPING_ROOT, top);
        let err = delta_of(&image, None, 1).unwrap_err();
        assert!(err.to_string().contains("out of order"), "{err}");
    }

    #[test]
    fn an_unknown_device_and_damage_are_refused() {
        let err = delta_of(&image(), Some(1), 3).unwrap_err();
        assert!(err.to_string().contains("thin device 3 is not in"), "{err}");
        let mut looped = image();
        // The snapshot's internal node names its first leaf twice.
        let snapshot = 7;
        let at = looped.value_at(snapshot, 1);
        looped.put64(at, 2);
        let err = delta_of(&looped, Some(1), 2).unwrap_err();
        assert!(err.to_string().contains("loops"), "{err}");
    }
}
