//! The pool record (`<state_dir>/pool.json`): how the pool was made. It is written before a
//! multi-step creation begins (`complete: false`), so a creation cut short is finished by the
//! next start instead of being mistaken for someone else's disks, and rewritten when done.
//! A later config that disagrees with it is refused: those settings cannot change.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use devicemapper::DmNameBuf;
use serde::{Deserialize, Serialize};

use crate::config::{Backend, Config};
use crate::error::{Error, Result};
use crate::kernel::lvm;
use crate::records;
use crate::units::ByteSize;

/// The pool record's format; bumped when its layout changes.
const POOL_RECORD_FORMAT: u32 = 1;

/// What is saved about a pool when it is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    format: u32,
    /// `pool.name`.
    pub name: String,
    /// `pool.backend`.
    pub backend: Backend,
    /// The pool's block size.
    pub block_size: ByteSize,
    created_unix: u64,
    /// False while a creation is under way (a crash leaves it false).
    #[serde(default = "yes")]
    pub complete: bool,
    /// The LVM setup (backend `lvm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvm: Option<LvmSetup>,
    /// The adopted pool's dm name (backend `existing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub existing: Option<String>,
    /// The data and metadata devices (backend `devices`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<DevicesSetup>,
    /// The Ceph pool and namespace of the images (backend `rbd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd: Option<RbdSetup>,
}

fn yes() -> bool {
    true
}

/// How a direct-LVM pool was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LvmSetup {
    /// The physical volumes, including those added later with `pool add-device`.
    pub devices: Vec<PathBuf>,
    /// The volume group.
    pub volume_group: String,
    /// Share of the VG for data at creation.
    pub data_percent: u8,
    /// Share of the VG for metadata at creation.
    pub metadata_percent: u8,
}

/// The raw devices of a `devices` pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesSetup {
    /// Data device.
    pub data: PathBuf,
    /// Metadata device.
    pub metadata: PathBuf,
}

/// Where an `rbd` pool's images are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RbdSetup {
    /// `pool.rbd.pool`.
    pub pool: String,
    /// `pool.rbd.namespace` ("" for none).
    pub namespace: String,
}

/// Where the record lives.
pub fn path(config: &Config) -> PathBuf {
    config.state_dir.path().join("pool.json")
}

/// The record, checked against `config`; `None` for a new pool.
pub fn load(config: &Config) -> Result<Option<PoolRecord>> {
    let path = path(config);
    let record = records::read_json::<PoolRecord>(&path)?;
    if let Some(record) = &record {
        check_matches(record, config, &path)?;
    }
    Ok(record)
}

/// Write `record` atomically and durably.
pub fn save(config: &Config, record: &PoolRecord) -> Result<()> {
    records::ensure_private_dir(config.state_dir.path())?;
    records::write_json(&path(config), record)
}

/// Save the record of a pool whose creation begins (a crash leaves it incomplete).
pub fn save_started(config: &Config, block_size: ByteSize) -> Result<()> {
    save(config, &new(config, block_size, false))
}

/// Save the record of a pool that is made (or adopted).
pub fn save_complete(config: &Config, block_size: ByteSize) -> Result<()> {
    save(config, &new(config, block_size, true))
}

/// The record of `config`'s pool.
fn new(config: &Config, block_size: ByteSize, complete: bool) -> PoolRecord {
    let pool = &config.pool;
    PoolRecord {
        format: POOL_RECORD_FORMAT,
        name: pool.name.to_string(),
        backend: pool.backend,
        block_size,
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        complete,
        lvm: (pool.backend == Backend::Lvm).then(|| LvmSetup {
            devices: pool
                .lvm
                .devices
                .iter()
                .map(|d| d.path().to_path_buf())
                .collect(),
            volume_group: pool.lvm.volume_group.to_string(),
            data_percent: pool.lvm.data_percent.value(),
            metadata_percent: pool.lvm.metadata_percent.value(),
        }),
        existing: (pool.backend == Backend::Existing).then(|| existing_name(config)),
        rbd: (pool.backend == Backend::Rbd).then(|| RbdSetup {
            pool: pool.rbd.pool.clone(),
            namespace: pool.rbd.namespace.clone(),
        }),
        devices: (pool.backend == Backend::Devices).then(|| DevicesSetup {
            data: pool
                .devices
                .data
                .as_ref()
                .expect("checked")
                .path()
                .to_path_buf(),
            metadata: pool
                .devices
                .metadata
                .as_ref()
                .expect("checked")
                .path()
                .to_path_buf(),
        }),
    }
}

/// `pool.existing.device` as a device-mapper name.
pub fn existing_dm_name(config: &Config) -> Result<DmNameBuf> {
    let name = existing_name(config);
    DmNameBuf::new(name.clone())
        .map_err(|_| Error::invalid(format!("{name:?} is not a device-mapper name")))
}

/// `pool.existing.device` without its `/dev/mapper/` prefix.
pub fn existing_name(config: &Config) -> String {
    let device = &config.pool.existing.device;
    device
        .strip_prefix("/dev/mapper/")
        .unwrap_or(device)
        .to_string()
}

/// The config must describe the pool the state directory holds; what cannot change is refused.
fn check_matches(record: &PoolRecord, config: &Config, path: &Path) -> Result<()> {
    let pool = &config.pool;
    let mut changed = Vec::new();
    let mut differs = |key: &str, was: String, now: String| {
        if was != now {
            changed.push(format!("{key} was {was}, config says {now}"));
        }
    };
    differs(
        "pool.name",
        format!("{:?}", record.name),
        format!("{:?}", pool.name.as_str()),
    );
    differs(
        "pool.backend",
        format!("{:?}", record.backend.as_str()),
        format!("{:?}", pool.backend.as_str()),
    );
    if record.backend == pool.backend {
        match pool.backend {
            Backend::Loop | Backend::Devices => differs(
                "pool.block_size",
                record.block_size.to_string(),
                pool.block_size.size().to_string(),
            ),
            Backend::Lvm => differs(
                "pool.lvm.chunk_size",
                record.block_size.to_string(),
                pool.lvm.chunk_size.size().to_string(),
            ),
            Backend::Existing | Backend::Rbd => {}
        }
        check_setup_matches(record, config, &mut changed);
    }
    if changed.is_empty() {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "the pool in {} was made with other settings ({}); these cannot change for an existing pool: \
         restore them in the config, or destroy the pool (thinstack pool destroy) to make a new one",
        path.parent().unwrap_or(path).display(),
        changed.join("; ")
    )))
}

fn check_setup_matches(record: &PoolRecord, config: &Config, changed: &mut Vec<String>) {
    let pool = &config.pool;
    if let Some(setup) = &record.lvm {
        let lvm = &pool.lvm;
        if setup.volume_group != lvm.volume_group.as_str() {
            changed.push(format!(
                "pool.lvm.volume_group was {:?}, config says {:?}",
                setup.volume_group,
                lvm.volume_group.as_str()
            ));
        }
        for (key, was, now) in [
            ("data_percent", setup.data_percent, lvm.data_percent.value()),
            (
                "metadata_percent",
                setup.metadata_percent,
                lvm.metadata_percent.value(),
            ),
        ] {
            if was != now {
                changed.push(format!("pool.lvm.{key} was {was}%, config says {now}%"));
            }
        }
        // Devices added later (pool add-device) need not be in the config, but every device
        // the config names must be one of the pool's.
        let known: Vec<PathBuf> = setup.devices.iter().map(|d| lvm::canonical(d)).collect();
        for device in &lvm.devices {
            if !known.contains(&lvm::canonical(device.path())) {
                changed.push(format!(
                    "pool.lvm.devices names {}, which is not one of the pool's devices ({}); add a device with `thinstack pool add-device`",
                    device.path().display(),
                    setup.devices.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
                ));
            }
        }
    }
    if let Some(setup) = &record.rbd {
        let rbd = &pool.rbd;
        for (key, was, now) in [
            ("pool", &setup.pool, &rbd.pool),
            ("namespace", &setup.namespace, &rbd.namespace),
        ] {
            if was != now {
                changed.push(format!("pool.rbd.{key} was {was:?}, config says {now:?}"));
            }
        }
    }
    if let Some(name) = &record.existing {
        let now = existing_name(config);
        if *name != now {
            changed.push(format!(
                "pool.existing.device was {name:?}, config says {now:?}"
            ));
        }
    }
    if let Some(setup) = &record.devices {
        for (key, was, now) in [
            ("data", &setup.data, &pool.devices.data),
            ("metadata", &setup.metadata, &pool.devices.metadata),
        ] {
            let now = now.as_ref().map(|p| p.path().to_path_buf());
            if now.as_deref() != Some(was.as_path()) {
                changed.push(format!(
                    "pool.devices.{key} was {}, config says {}",
                    was.display(),
                    now.map(|p| p.display().to_string())
                        .unwrap_or_else(|| "nothing".into())
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, "t").unwrap()
    }

    fn complete(config: &Config) -> PoolRecord {
        new(config, config.block_size(), true)
    }

    #[test]
    fn a_changed_block_size_or_name_is_refused_with_both_values() {
        let made = complete(&config("[pool]\nname = \"a\"\nblock_size = \"64K\"\n"));
        let later = config("[pool]\nname = \"b\"\nblock_size = \"128K\"\n");
        let err = check_matches(&made, &later, Path::new("/s/pool.json")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("pool.block_size was 64K, config says 128K"),
            "{text}"
        );
        assert!(text.contains("pool.name was \"a\""), "{text}");
        assert!(text.contains("thinstack pool destroy"), "{text}");
        let same = config("[pool]\nname = \"a\"\n");
        check_matches(&made, &same, Path::new("/s/pool.json")).unwrap();
    }

    #[test]
    fn changed_lvm_setup_is_refused_and_added_devices_are_not() {
        let lvm = "[pool]\nbackend = \"lvm\"\n[pool.lvm]\ndevices = [\"/dev/sdb\"]\n";
        let mut made = complete(&config(lvm));
        made.lvm.as_mut().unwrap().devices.push("/dev/sdc".into());
        check_matches(&made, &config(lvm), Path::new("/s/pool.json")).unwrap();
        let changed = config(
            "[pool]\nbackend = \"lvm\"\n[pool.lvm]\ndevices = [\"/dev/sdd\"]\nvolume_group = \"other\"\ndata_percent = 90\nchunk_size = \"1M\"\n",
        );
        let text = check_matches(&made, &changed, Path::new("/s/pool.json"))
            .unwrap_err()
            .to_string();
        for part in [
            "pool.lvm.chunk_size was 512K, config says 1M",
            "pool.lvm.volume_group was \"thinstack\", config says \"other\"",
            "pool.lvm.data_percent was 95%, config says 90%",
            "pool.lvm.devices names /dev/sdd",
        ] {
            assert!(text.contains(part), "{part} missing from: {text}");
        }
    }

    #[test]
    fn records_from_before_backends_read_as_complete_loop_pools() {
        let old = r#"{"format":1,"name":"thinstack","backend":"loop","block_size":"64K","created_unix":1}"#;
        let record: PoolRecord = serde_json::from_str(old).unwrap();
        assert!(record.complete);
        assert!(record.lvm.is_none());
    }
}
