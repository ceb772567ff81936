//! Loop devices standing in for disks, and cleanup of volume groups a test made.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use thinstack::kernel::loopdev;
use thinstack::units::ByteSize;

/// A sparse file on a loop device: a blank "disk"; detached when dropped.
pub struct TestDisk {
    pub path: PathBuf,
    pub file: PathBuf,
}

impl TestDisk {
    /// A blank disk of `size` backed by `dir/name`.
    pub fn new(dir: &Path, name: &str, size: ByteSize) -> TestDisk {
        let file = dir.join(name);
        loopdev::ensure_sparse_file(&file, size).expect("disk file");
        let path = loopdev::attach_free(&file, false).expect("attach disk");
        TestDisk { path, file }
    }

    /// The disk's path as text, for configs and commands.
    pub fn name(&self) -> String {
        self.path.display().to_string()
    }

    /// A hash of every byte on the disk, to prove it was not touched.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let bytes = std::fs::read(&self.path).expect("read disk");
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut hasher);
        hasher.finish()
    }

    /// What `blkid -p` finds on the disk (empty when it is blank).
    pub fn probe(&self) -> String {
        let out = run("blkid", &["-p", "-o", "export", &self.name()]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TestDisk {
    fn drop(&mut self) {
        let _ = loopdev::detach(&self.path);
    }
}

/// Removes a test's volume group (and its PV labels) when dropped, whatever state it is in.
pub struct VolumeGroupGuard(pub String);

impl Drop for VolumeGroupGuard {
    fn drop(&mut self) {
        let pvs = lvm(&["pvs", "--noheadings", "-o", "pv_name,vg_name"]);
        let ours: Vec<String> = String::from_utf8_lossy(&pvs.stdout)
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let pv = fields.next()?;
                (fields.next() == Some(self.0.as_str())).then(|| pv.to_string())
            })
            .collect();
        lvm(&["vgchange", "-an", &self.0]);
        lvm(&["vgremove", "-ff", "-y", &self.0]);
        for pv in ours {
            lvm(&["pvremove", "-ff", "-y", &pv]);
        }
    }
}

/// A unique volume group name for a test.
pub fn volume_group_name(test: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "ts{}{}{test}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Run `lvm ARGS` (output kept; status not checked), with monitoring off so LVM never starts
/// a dmeventd of its own in the test VM (thinstackd extends pools there; see `kernel::lvm`).
pub fn lvm(args: &[&str]) -> Output {
    let (command, rest) = args.split_first().expect("an lvm command");
    Command::new("lvm")
        .arg(command)
        .args(["--config", "activation/monitoring=0"])
        .args(rest)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .expect("run lvm")
}

/// [`lvm`], which must succeed.
pub fn lvm_ok(args: &[&str]) -> Output {
    let out = lvm(args);
    assert!(
        out.status.success(),
        "lvm {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a program (output kept; status not checked).
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// Run a program that must succeed.
pub fn run_ok(program: &str, args: &[&str]) -> Output {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
