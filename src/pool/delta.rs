//! Where one thin device differs from another, read from the pool's metadata through a
//! metadata snapshot: what an incremental export sends, found without reading either device.
//! thinstack reads the metadata in-process ([`thin_metadata::snapshot_delta`]); `thin_delta`
//! reads it the same way as a process, and is what the kernel tests check it against.

use crate::error::{Error, Result};
use crate::kernel::cmd::{self, Program};
use crate::kernel::dm::Dm;
use crate::kernel::thin_metadata;
use crate::kernel::{DeltaKind, DeltaRun};
use crate::names::ThinId;
use crate::pool::Pool;
use crate::units::ByteSize;

/// Where thin `id` differs from thin `base`, or every range it maps without a base, in
/// bytes, ascending.
pub fn thin_delta_of(
    dm: &Dm,
    pool: &Pool,
    base: Option<ThinId>,
    id: ThinId,
) -> Result<Vec<DeltaRun>> {
    let block_size = ByteSize::from_sectors(pool.block_size());
    let purpose = "find the layer's changed blocks";
    super::real::with_metadata_snapshot(dm, pool, purpose, || {
        thin_metadata::snapshot_delta(pool.metadata_node(), base, id, block_size)
    })
}

/// [`thin_delta_of`], as `thin_delta` reports it (a delta of a device with itself is all
/// `same`: its mapped ranges).
pub fn thin_delta_by_tool(
    dm: &Dm,
    pool: &Pool,
    base: Option<ThinId>,
    id: ThinId,
) -> Result<Vec<DeltaRun>> {
    let (snap1, snap2) = (base.unwrap_or(id).to_string(), id.to_string());
    let purpose = "find the layer's changed blocks";
    let output = super::real::with_metadata_snapshot(dm, pool, purpose, || {
        cmd::run(
            Program::ThinDelta,
            [
                "-m".as_ref(),
                "--snap1".as_ref(),
                snap1.as_ref(),
                "--snap2".as_ref(),
                snap2.as_ref(),
                pool.metadata_node().as_os_str(),
            ],
        )
    })?;
    let block_size = ByteSize::from_sectors(pool.block_size());
    parse_delta(
        &String::from_utf8_lossy(&output.stdout),
        block_size,
        base.is_none(),
    )
}

/// `thin_delta`'s XML (without `--verbose`): `<same|different|left_only|right_only begin="B"
/// length="L"/>` in blocks of `block_size`. With `whole` (a device against itself) its `same`
/// ranges are what it maps.
fn parse_delta(xml: &str, block_size: ByteSize, whole: bool) -> Result<Vec<DeltaRun>> {
    let mut runs: Vec<DeltaRun> = Vec::new();
    for element in xml.split('<').skip(1) {
        let tag = element.split([' ', '/', '>']).next().unwrap_or_default();
        let kind = match tag {
            "same" if whole => DeltaKind::Data,
            "different" | "right_only" => DeltaKind::Data,
            "left_only" => DeltaKind::Unmapped,
            _ => continue,
        };
        let blocks = |attribute: &str| -> Result<u64> {
            attribute_of(element, attribute)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| {
                    Error::inconsistent(format!(
                        "thin_delta printed a range thinstack cannot read: <{}",
                        element.trim_end()
                    ))
                })
        };
        let bytes = |n: u64| n.checked_mul(block_size.bytes());
        let (Some(offset), Some(length)) = (bytes(blocks("begin")?), bytes(blocks("length")?))
        else {
            return Err(Error::inconsistent(format!(
                "thin_delta printed a range beyond any device: <{}",
                element.trim_end()
            )));
        };
        match runs.last_mut() {
            Some(last) if last.kind == kind && last.offset + last.length == offset => {
                last.length += length;
            }
            _ => runs.push(DeltaRun {
                offset,
                length,
                kind,
            }),
        }
    }
    Ok(runs)
}

fn attribute_of<'a>(element: &'a str, name: &str) -> Option<&'a str> {
    let start = element.find(&format!(" {name}=\""))? + name.len() + 3;
    element[start..].split('"').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What thin_delta 1.x printed for a snapshot that rewrote blocks 5-7, discarded 15-16 and
    /// wrote 100-101 (seen on Debian's thin-provisioning-tools).
    const DELTA: &str = r#"<superblock uuid="" time="1" transaction="0" data_block_size="128" nr_data_blocks="0">
  <diff left="1" right="2">
    <same begin="0" length="5"/>
    <different begin="5" length="3"/>
    <same begin="8" length="7"/>
    <left_only begin="15" length="2"/>
    <same begin="17" length="3"/>
    <right_only begin="100" length="2"/>
    <right_only begin="102" length="1"/>
  </diff>
</superblock>"#;

    #[test]
    fn a_delta_is_what_changed_and_what_went() {
        let runs = parse_delta(DELTA, ByteSize::from_bytes(65536), false).unwrap();
        let k: u64 = 65536;
        let run = |offset: u64, length: u64, kind| DeltaRun {
            offset: offset * k,
            length: length * k,
            kind,
        };
        assert_eq!(
            runs,
            [
                run(5, 3, DeltaKind::Data),
                run(15, 2, DeltaKind::Unmapped),
                run(100, 3, DeltaKind::Data),
            ]
        );
    }

    #[test]
    fn a_device_against_itself_is_what_it_maps() {
        let xml = r#"<superblock><diff left="2" right="2">
    <same begin="0" length="15"/>
    <same begin="17" length="3"/>
  </diff></superblock>"#;
        let runs = parse_delta(xml, ByteSize::from_bytes(512), true).unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[1].offset, runs[1].length), (17 * 512, 3 * 512));
        assert!(parse_delta(xml, ByteSize::from_bytes(512), false)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn ranges_it_cannot_read_are_errors() {
        for bad in [
            r#"<different begin="x" length="1"/>"#,
            r#"<different length="1"/>"#,
            r#"<right_only begin="18446744073709551615" length="1"/>"#,
        ] {
            assert!(
                parse_delta(bad, ByteSize::from_bytes(65536), false).is_err(),
                "{bad}"
            );
        }
    }
}
