//! A full pool (issue 7, item 1): a writer inside a mounted layer drives a small pool out of
//! data space. With `pool.when_full = "error"` the writer gets ENOSPC or EIO
//! promptly instead of hanging, thinstackd stays responsive and says the pool is out of
//! space, and after `pool extend` the pool takes writes again with every layer intact; for
//! ext4 and xfs. These pools do not grow by themselves, so "auto" (the default) means "error";
//! the other policies are applied and reported.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::TestDaemon;
use common::require_dm_thin;
use thinstack::vocab::WhenFull;

const KEEP: &str = "kept on the committed base layer";

/// Write 1 MiB chunks, syncing every 4 MiB, until a write or sync fails: the error, how long
/// the failing call itself took, and the MiB written. Panics if `limit` MiB go in without one.
fn write_until_error(path: &Path, limit: usize) -> (std::io::Error, Duration, usize) {
    let chunk = vec![0xa5u8; 1 << 20];
    let mut file = std::fs::File::create(path).unwrap();
    for mib in 1..=limit {
        // Timed per call: the failing call's own time is what says writes did not queue.
        let started = Instant::now();
        let step = file.write_all(&chunk).and_then(|()| {
            if mib % 4 == 0 {
                file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = step {
            return (e, started.elapsed(), mib);
        }
    }
    let started = Instant::now();
    match file.sync_all() {
        Err(e) => (e, started.elapsed(), limit),
        Ok(()) => panic!("{limit} MiB written into a pool smaller than that, and no error"),
    }
}

/// A committed base layer with a file, and a child of it, mounted, to fill; the child's mount.
fn base_and_mounted_child(d: &TestDaemon) -> String {
    d.json(&["layer", "create", "base"]);
    let base_mnt = d.cli(&["layer", "mount", "base"]).stdout.trim().to_string();
    std::fs::write(Path::new(&base_mnt).join("keep"), KEEP).unwrap();
    assert_eq!(d.cli(&["layer", "unmount", "base"]).code, 0);
    d.json(&["layer", "commit", "base"]);
    d.json(&["layer", "create", "fill", "--parent", "base"]);
    d.cli(&["layer", "mount", "fill"]).stdout.trim().to_string()
}

/// After the extension: the filled child mounts again and takes a new file, both layers keep
/// the base's file, and the metadata checks clean. Stops the daemon.
fn writable_again_with_layers_intact(d: &mut TestDaemon, what: &str) {
    let unmounted = d.cli(&["layer", "unmount", "fill"]);
    assert_eq!(unmounted.code, 0, "{what}: {unmounted:?}");
    let mnt = d.cli(&["layer", "mount", "fill"]).stdout.trim().to_string();
    assert!(
        !mnt.is_empty(),
        "{what}: the filled layer did not mount again"
    );
    std::fs::write(Path::new(&mnt).join("after"), "written after the extension").unwrap();
    std::fs::File::open(Path::new(&mnt).join("after"))
        .unwrap()
        .sync_all()
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(Path::new(&mnt).join("keep")).unwrap(),
        KEEP,
        "{what}: the child lost its parent's file"
    );
    assert_eq!(d.cli(&["layer", "unmount", "fill"]).code, 0);
    let base_mnt = d.cli(&["layer", "mount", "base"]).stdout.trim().to_string();
    assert_eq!(
        std::fs::read_to_string(Path::new(&base_mnt).join("keep")).unwrap(),
        KEEP
    );
    assert_eq!(d.cli(&["layer", "unmount", "base"]).code, 0);
    let check = d.cli(&["pool", "check"]);
    assert_eq!(check.code, 0, "{what}: {check:?}");
    assert_eq!(d.stop(), 0);
}

fn fill_and_recover(fs: &str, layer_size: &str) {
    let mut d = TestDaemon::start(
        &format!("full-{fs}"),
        &format!(
            "[pool]\nmin_free_space = \"0%\"\n\
             [pool.loop]\ndata_size = \"192M\"\nautoextend_threshold = \"100%\"\n\
             [layers]\nfilesystem = \"{fs}\"\nbase_size = \"{layer_size}\"\n"
        ),
    );
    let status = d.json(&["pool", "status"]);
    assert_eq!(status["health"]["when_full"], "error", "{status}");

    let mnt = base_and_mounted_child(&d);
    if fs == "xfs" {
        let knob = xfs_enospc_knob(&mnt);
        assert_eq!(
            std::fs::read_to_string(&knob).unwrap().trim(),
            "30",
            "{knob}"
        );
    }

    let (error, took, written) = write_until_error(&Path::new(&mnt).join("big"), 400);
    let errno = error.raw_os_error();
    assert!(
        errno == Some(nix::libc::ENOSPC) || errno == Some(nix::libc::EIO),
        "{fs}: the writer got {error} (wanted ENOSPC or EIO)"
    );
    eprintln!("{fs}: the writer got {error:?} after {written} MiB; the failing call took {took:?}");
    assert!(
        took < Duration::from_secs(30),
        "{fs}: the failing call took {took:?}: writes waited on the full pool"
    );

    // thinstackd answers and says what happened.
    let answered = Instant::now();
    let status = d.json(&["pool", "status"]);
    // A daemon stuck behind the full pool would not answer at all; the bound leaves room for
    // emulation.
    assert!(answered.elapsed() < Duration::from_secs(60));
    assert_eq!(status["health"]["out_of_space"], true, "{fs}: {status}");
    let text = d.cli(&["pool", "status"]).stdout;
    assert!(text.contains("out of data space"), "{text}");

    // Extended, the pool takes writes again.
    assert_eq!(d.cli(&["pool", "extend", "--data", "768M"]).code, 0);
    let status = d.json(&["pool", "status"]);
    assert_eq!(status["health"]["out_of_space"], false, "{fs}: {status}");
    writable_again_with_layers_intact(&mut d, fs);
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn a_full_pool_fails_ext4_writers_promptly_and_recovers_after_extend() {
    require_dm_thin();
    fill_and_recover("ext4", "256M");
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn a_full_pool_fails_xfs_writers_promptly_and_recovers_after_extend() {
    require_dm_thin();
    fill_and_recover("xfs", "320M");
}

/// The policy is applied at every start: a pool made with "error" is reloaded with "queue"
/// when the config says so, and back.
#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn the_no_space_policy_follows_the_config_at_every_start() {
    require_dm_thin();
    // "auto" on a loop pool that grows by itself: queue.
    let mut d = TestDaemon::start("when-full", "");
    d.json(&["layer", "create", "base", "--size", "64M"]);
    assert_eq!(d.json(&["pool", "status"])["health"]["when_full"], "queue");
    let table = dm_table(&d);
    assert!(!table.contains("error_if_no_space"), "{table}");
    for (policy, when_full, in_table) in [
        ("error", WhenFull::Error, true),
        ("queue", WhenFull::Queue, false),
        ("error", WhenFull::Auto, true),
    ] {
        if when_full == WhenFull::Auto {
            // A pool that does not grow by itself: error.
            d.pool.config.pool.loop_files.autoextend_threshold =
                thinstack::units::Percent::new(100).unwrap();
        }
        d.stop();
        d.pool.config.pool.when_full = when_full;
        d.write_config();
        d.spawn();
        let status = d.json(&["pool", "status"]);
        assert_eq!(status["health"]["when_full"], policy, "{status}");
        let table = dm_table(&d);
        assert_eq!(table.contains("error_if_no_space"), in_table, "{table}");
        assert_eq!(d.json(&["layer", "inspect", "base"])["name"], "base");
    }
}

/// The sysfs file that bounds xfs's ENOSPC retries for the filesystem mounted at `mnt`.
fn xfs_enospc_knob(mnt: &str) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let device = mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (device, target) = (fields.next()?, fields.next()?);
            (target == mnt).then(|| device.to_string())
        })
        .unwrap_or_else(|| panic!("{mnt} is not mounted"));
    let name = std::fs::canonicalize(&device).unwrap();
    let name = name.file_name().unwrap().to_string_lossy();
    format!("/sys/fs/xfs/{name}/error/metadata/ENOSPC/retry_timeout_seconds")
}

fn dm_table(d: &TestDaemon) -> String {
    let name = d.pool.config.pool.name.pool_dm_name().to_string();
    let out = std::process::Command::new("dmsetup")
        .args(["table", &name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One 4 KiB write at the start of every 64 KiB pool block, so each write maps a block of its
/// own: the most metadata per byte a writer can use. Syncs every 512 writes; stops at the
/// first failing call and returns its error, how long that call took, and the writes that
/// went before.
fn map_blocks_until_error(path: &Path, limit: u64) -> (std::io::Error, Duration, u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(path).unwrap();
    let block = [0x5au8; 4096];
    for n in 0..limit {
        let started = Instant::now();
        let step = file.write_all_at(&block, n * 65536).and_then(|()| {
            if n % 512 == 511 {
                file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = step {
            return (e, started.elapsed(), n);
        }
    }
    panic!("{limit} blocks mapped on a 2M metadata device, and no error");
}

/// The metadata runs out before the data. Running out fails a pool for good (the kernel
/// cannot even flag it for a check), so thinstackd's watcher makes the pool read-only at the
/// kernel's low-water mark: the writer fails promptly with EIO, the pool says read-only (not
/// failed, no check needed), and growing the metadata makes it writable again with its layers
/// intact.
#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn a_pool_out_of_metadata_fails_ext4_writers_promptly_and_recovers_after_extend() {
    require_dm_thin();
    metadata_full_and_recover("ext4");
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn a_pool_out_of_metadata_fails_xfs_writers_promptly_and_recovers_after_extend() {
    require_dm_thin();
    metadata_full_and_recover("xfs");
}

/// One metadata test at a time: each puts about 300 MiB into the VM's tmpfs.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn metadata_full_and_recover(fs: &str) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut d = TestDaemon::start(
        &format!("meta-full-{fs}"),
        &format!(
            "[pool]\nmin_free_space = \"0%\"\n\
             [pool.loop]\ndata_size = \"16G\"\nmetadata_size = \"2M\"\nautoextend_threshold = \"100%\"\n\
             [layers]\nfilesystem = \"{fs}\"\nbase_size = \"12G\"\n"
        ),
    );
    let mnt = base_and_mounted_child(&d);

    let started = Instant::now();
    let (error, took, mapped) = map_blocks_until_error(&Path::new(&mnt).join("sparse"), 180_000);
    let errno = error.raw_os_error();
    eprintln!(
        "metadata, {fs}: the writer got {error:?} after {mapped} blocks mapped ({} MiB written) in {:?}; the failing call took {took:?}",
        (mapped * 4096) >> 20,
        started.elapsed()
    );
    assert!(
        errno == Some(nix::libc::ENOSPC) || errno == Some(nix::libc::EIO),
        "the writer got {error} (wanted ENOSPC or EIO)"
    );
    assert!(
        took < Duration::from_secs(30),
        "the failing call took {took:?}"
    );

    let answered = Instant::now();
    let status = d.json(&["pool", "status"]);
    // A daemon stuck behind the full pool would not answer at all; the bound leaves room for
    // emulation.
    assert!(answered.elapsed() < Duration::from_secs(60));
    eprintln!(
        "metadata, {fs}: pool status when full: {}",
        status["health"]
    );
    assert_eq!(status["health"]["read_only"], true, "{status}");
    assert_eq!(status["health"]["needs_check"], false, "{status}");
    assert_eq!(status["health"]["failed"], false, "{status}");
    let text = d.cli(&["pool", "status"]).stdout;
    assert!(text.contains("read-only"), "{text}");

    // thinstackd starts again on the read-only pool: reads and status are served, writes are
    // refused saying why and what to do, and the fix (extend) can be reached.
    assert_eq!(d.stop(), 0, "{}", d.log_text());
    d.spawn();
    assert_eq!(
        d.json(&["pool", "status"])["health"]["metadata_guard"],
        true
    );
    assert_eq!(d.json(&["layer", "inspect", "base"])["state"], "ready");
    let refused = d.cli(&["layer", "create", "more", "--parent", "base"]);
    assert_eq!(refused.code, 6, "{refused:?}");
    assert!(
        refused.stderr.contains("pool extend --metadata"),
        "{refused:?}"
    );

    let extended = d.cli(&["pool", "extend", "--metadata", "16M"]);
    assert_eq!(extended.code, 0, "{extended:?}");
    let status = d.json(&["pool", "status"]);
    eprintln!(
        "metadata, {fs}: pool status after extend: {}",
        status["health"]
    );
    assert_eq!(status["health"]["read_only"], false, "{status}");
    assert_eq!(status["health"]["needs_check"], false, "{status}");
    writable_again_with_layers_intact(&mut d, fs);
}
