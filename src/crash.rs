//! Crash points: named places inside multi-step operations where a test build can make the
//! process die, to prove that the next open reconciles whatever was left half done.
//!
//! Compiled only for unit tests and with the `crash-points` feature; in a normal build
//! [`point`] is an empty inline function. Two ways to arm a point:
//! - the environment variable `THINSTACK_CRASH_AT=<point>` makes the process abort there, as
//!   `kill -9` would (no destructors, no cleanup), for kernel tests that run a child process
//!   (`THINSTACK_CRASH_TRACE=<file>` appends every point passed to the file, to learn which
//!   points an operation reaches);
//! - [`arm`] makes the current process panic there, for unit tests that then re-open the
//!   engine on the same records and the same simulated kernel.

/// Every crash point, in the order an operation reaches them.
pub const POINTS: &[&str] = &[
    "create.record_written",
    "pool_step.intent_written",
    "pool_step.message_sent",
    "pool_step.transaction_set",
    "create.activated",
    "create.formatted",
    "create.grown",
    "create.done",
    "commit.reactivated",
    "commit.done",
    "snapshot_commit.in_place",
    "snapshot_commit.record_written",
    "snapshot_commit.snapshotted",
    "remove.marked",
    "remove.deactivated",
    "remove.discarded",
    "remove.deleted",
    "resize.recorded",
    "resize.reloaded",
    "resize.grown",
    "lvm.record_written",
    "lvm.pvs_created",
    "lvm.vg_created",
    "lvm.data_lv_created",
    "lvm.metadata_lv_created",
    "lvm.converted",
    "lvm.profile_attached",
    "devices.record_written",
    "devices.prepared",
    "devices.activated",
];

/// Die here if this point is armed (test builds only).
#[inline]
pub fn point(name: &'static str) {
    #[cfg(any(test, feature = "crash-points"))]
    armed::check(name);
    #[cfg(not(any(test, feature = "crash-points")))]
    let _ = name;
}

#[cfg(any(test, feature = "crash-points"))]
pub use armed::{arm, disarm};

#[cfg(any(test, feature = "crash-points"))]
mod armed {
    use std::cell::RefCell;

    thread_local! {
        static ARMED: RefCell<Option<String>> = const { RefCell::new(None) };
    }

    /// Make this thread panic when it reaches `point` (once).
    pub fn arm(point: &str) {
        assert!(
            super::POINTS.contains(&point),
            "unknown crash point {point}"
        );
        ARMED.with(|a| *a.borrow_mut() = Some(point.to_string()));
    }

    /// Disarm this thread's point.
    pub fn disarm() {
        ARMED.with(|a| *a.borrow_mut() = None);
    }

    pub(super) fn check(name: &str) {
        if let Some(path) = std::env::var_os("THINSTACK_CRASH_TRACE") {
            use std::io::Write;
            let traced = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut file| writeln!(file, "{name}"));
            if let Err(e) = traced {
                eprintln!("thinstack: cannot trace crash point {name}: {e}");
            }
        }
        if std::env::var("THINSTACK_CRASH_AT").is_ok_and(|p| p == name) {
            eprintln!("thinstack: crash point {name} reached: aborting as if killed");
            std::process::abort();
        }
        let hit = ARMED.with(|a| {
            let mut armed = a.borrow_mut();
            if armed.as_deref() == Some(name) {
                *armed = None;
                true
            } else {
                false
            }
        });
        if hit {
            panic!("crash point {name}");
        }
    }
}
