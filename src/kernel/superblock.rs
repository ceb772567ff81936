//! What filesystem a device holds, read from its superblock: type, size and UUID. Used to give
//! a thin device that lost its record its layer back (`pool doctor --adopt`): the pool keeps
//! no virtual size for a thin device, but its filesystem knows how large it was made.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};
use crate::units::ByteSize;
use crate::vocab::FsType;

/// A filesystem found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its type.
    pub fs: FsType,
    /// The size it spans (blocks times block size).
    pub size: ByteSize,
    /// Its UUID, as blkid prints it.
    pub uuid: String,
}

/// Bytes read from the start of a device: xfs's superblock is at 0, ext4's at 1024.
const HEAD: usize = 2048;

/// The filesystem on `device`, if it holds ext4 or xfs.
pub fn probe(device: &Path) -> Result<Option<Found>> {
    let mut head = vec![0u8; HEAD];
    std::fs::File::open(device)
        .and_then(|mut file| file.read_exact(&mut head))
        .map_err(|e| Error::io(format!("reading the superblock of {}", device.display()), e))?;
    Ok(parse(&head))
}

/// The filesystem whose superblock starts `head` (at least [`HEAD`] bytes).
pub fn parse(head: &[u8]) -> Option<Found> {
    xfs(head).or_else(|| ext4(&head[1024..]))
}

fn xfs(sb: &[u8]) -> Option<Found> {
    if &sb[0..4] != b"XFSB" {
        return None;
    }
    let block_size = u64::from(u32::from_be_bytes(sb[4..8].try_into().ok()?));
    let blocks = u64::from_be_bytes(sb[8..16].try_into().ok()?);
    Some(Found {
        fs: FsType::Xfs,
        size: ByteSize::from_bytes(blocks.checked_mul(block_size)?),
        uuid: uuid_text(&sb[32..48]),
    })
}

fn ext4(sb: &[u8]) -> Option<Found> {
    if sb[0x38..0x3a] != [0x53, 0xef] {
        return None;
    }
    let le32 = |at: usize| u32::from_le_bytes(sb[at..at + 4].try_into().unwrap());
    let incompat_64bit = le32(0x60) & 0x80 != 0;
    let high = if incompat_64bit { le32(0x150) } else { 0 };
    let blocks = (u64::from(high) << 32) | u64::from(le32(0x04));
    let block_size = 1024u64.checked_shl(le32(0x18))?;
    Some(Found {
        fs: FsType::Ext4,
        size: ByteSize::from_bytes(blocks.checked_mul(block_size)?),
        uuid: uuid_text(&sb[0x68..0x78]),
    })
}

/// 16 bytes as `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
fn uuid_text(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext4_and_xfs_superblocks_give_type_size_and_uuid() {
        let mut head = vec![0u8; HEAD];
        let sb = &mut head[1024..];
        sb[0x38..0x3a].copy_from_slice(&[0x53, 0xef]);
        sb[0x04..0x08].copy_from_slice(&16384u32.to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes()); // 4096-byte blocks
        sb[0x68..0x78].copy_from_slice(&[0xab; 16]);
        let found = parse(&head).unwrap();
        assert_eq!(found.fs, FsType::Ext4);
        assert_eq!(found.size, ByteSize::mib(64));
        assert_eq!(found.uuid, "abababab-abab-abab-abab-abababababab");

        let mut head = vec![0u8; HEAD];
        head[0..4].copy_from_slice(b"XFSB");
        head[4..8].copy_from_slice(&4096u32.to_be_bytes());
        head[8..16].copy_from_slice(&(1u64 << 18).to_be_bytes());
        let found = parse(&head).unwrap();
        assert_eq!(found.fs, FsType::Xfs);
        assert_eq!(found.size, ByteSize::gib(1));

        assert_eq!(parse(&vec![0u8; HEAD]), None);
    }
}
