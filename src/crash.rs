//! Crash points: named places inside multi-step operations where a test build can make the
//! process die, to prove that the next open reconciles whatever was left half done.
//!
//! A point is a [`Point`], so a name that is not a point does not compile. Compiled in only for
//! unit tests and with the `crash-points` feature; in a normal build [`point`] is an empty
//! inline function. Two ways to arm a point:
//! - the environment variable `THINSTACK_CRASH_AT=<point>` (or `<point>#<n>` for its n-th pass
//!   in the process) makes the process abort there, as `kill -9` would (no destructors, no
//!   cleanup), for kernel tests that run a child process; `THINSTACK_CRASH_TRACE=<file>`
//!   appends every point passed to the file, to learn which points an operation reaches;
//! - [`arm`] makes the current thread panic there with the message `crash point <name>` (and
//!   [`is_crash`] tells that panic from any other), for unit tests that then re-open the engine
//!   on the same records and the same simulated kernel.

/// Declares [`Point`] with each point's name, in the order an operation reaches them.
macro_rules! points {
    ($($variant:ident => $name:literal,)*) => {
        /// A crash point.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Point {
            $(
                #[doc = $name]
                $variant,
            )*
        }

        impl Point {
            /// Every crash point, in the order an operation reaches them.
            pub const ALL: &'static [Point] = &[$(Point::$variant,)*];

            /// The point's name, as `THINSTACK_CRASH_AT` and traces spell it.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Point::$variant => $name,)*
                }
            }

            /// The point named `name`.
            pub fn named(name: &str) -> Option<Point> {
                Point::ALL.iter().copied().find(|p| p.name() == name)
            }
        }
    };
}

points! {
    CreateRecordWritten => "create.record_written",
    PoolStepIntentWritten => "pool_step.intent_written",
    PoolStepMessageSent => "pool_step.message_sent",
    PoolStepTransactionSet => "pool_step.transaction_set",
    CreateActivated => "create.activated",
    CreateFormatted => "create.formatted",
    CreateGrown => "create.grown",
    CreateDone => "create.done",
    CommitReactivated => "commit.reactivated",
    CommitDone => "commit.done",
    SnapshotCommitInPlace => "snapshot_commit.in_place",
    SnapshotCommitRecordWritten => "snapshot_commit.record_written",
    SnapshotCommitSnapshotted => "snapshot_commit.snapshotted",
    RemoveMarked => "remove.marked",
    RemoveDeactivated => "remove.deactivated",
    RemoveQueued => "remove.queued",
    DeletionDiscarded => "deletion.discarded",
    DeletionDone => "deletion.done",
    ResizeRecorded => "resize.recorded",
    ResizeReloaded => "resize.reloaded",
    ResizeGrown => "resize.grown",
    CheckpointRecordWritten => "checkpoint.record_written",
    ImportRecordWritten => "import.record_written",
    ImportWritten => "import.written",
    ResetRecordWritten => "reset.record_written",
    ResetSwitched => "reset.switched",
    ResetDone => "reset.done",
    ResetSpareClaimed => "reset.spare_claimed",
    ResetSpareMade => "reset.spare_made",
    LvmRecordWritten => "lvm.record_written",
    LvmPvsCreated => "lvm.pvs_created",
    LvmVgCreated => "lvm.vg_created",
    LvmDataLvCreated => "lvm.data_lv_created",
    LvmMetadataLvCreated => "lvm.metadata_lv_created",
    LvmConverted => "lvm.converted",
    LvmProfileAttached => "lvm.profile_attached",
    DevicesRecordWritten => "devices.record_written",
    DevicesPrepared => "devices.prepared",
    DevicesActivated => "devices.activated",
    RbdSnapshotTaken => "rbd.snapshot_taken",
    RbdCloned => "rbd.cloned",
    RbdFlattened => "rbd.flattened",
    RbdSnapshotsRemoved => "rbd.snapshots_removed",
    RbdParentSnapshotReleased => "rbd.parent_snapshot_released",
    RbdImageRemoved => "rbd.image_removed",
    RbdResized => "rbd.resized",
    SharedPublished => "shared.published",
    SharedRecordDropped => "shared.record_dropped",
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Die here if this point is armed (test builds only).
#[inline]
pub fn point(point: Point) {
    #[cfg(any(test, feature = "crash-points"))]
    armed::check(point);
    #[cfg(not(any(test, feature = "crash-points")))]
    let _ = point;
}

#[cfg(any(test, feature = "crash-points"))]
pub use armed::{arm, arm_nth, disarm, is_crash};

#[cfg(any(test, feature = "crash-points"))]
mod armed {
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::Point;

    thread_local! {
        /// The armed point and how many more passes to let by before panicking.
        static ARMED: RefCell<Option<(Point, u32)>> = const { RefCell::new(None) };
    }

    /// Passes of each point in this process, for `THINSTACK_CRASH_AT=<point>#<n>`.
    static PASSES: Mutex<BTreeMap<Point, u32>> = Mutex::new(BTreeMap::new());

    /// Make this thread panic when it reaches `point` (once).
    pub fn arm(point: Point) {
        arm_nth(point, 1);
    }

    /// Make this thread panic at the `nth` pass (1-based) of `point`.
    pub fn arm_nth(point: Point, nth: u32) {
        assert!(nth >= 1, "passes count from 1");
        ARMED.with(|a| *a.borrow_mut() = Some((point, nth - 1)));
    }

    /// Disarm this thread's point.
    pub fn disarm() {
        ARMED.with(|a| *a.borrow_mut() = None);
    }

    /// Whether a caught panic is the crash of an armed point (not some other failure).
    pub fn is_crash(payload: &(dyn std::any::Any + Send), point: Point) -> bool {
        let text = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied());
        text == Some(crash_message(point).as_str())
    }

    fn crash_message(point: Point) -> String {
        format!("crash point {}", point.name())
    }

    /// `<point>` or `<point>#<n>`: the point and the pass (1-based) to die at.
    fn wanted() -> Option<(String, u32)> {
        let text = std::env::var("THINSTACK_CRASH_AT").ok()?;
        Some(match text.split_once('#') {
            Some((name, nth)) => (name.to_string(), nth.parse().unwrap_or(1)),
            None => (text, 1),
        })
    }

    pub(super) fn check(point: Point) {
        let name = point.name();
        let pass = {
            let mut passes = PASSES.lock().unwrap_or_else(|e| e.into_inner());
            let count = passes.entry(point).or_insert(0);
            *count += 1;
            *count
        };
        if let Some(path) = std::env::var_os("THINSTACK_CRASH_TRACE") {
            use std::io::Write;
            let traced = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut file| writeln!(file, "{name}#{pass}"));
            if let Err(e) = traced {
                eprintln!("thinstack: cannot trace crash point {name}: {e}");
            }
        }
        if wanted().is_some_and(|(wanted, nth)| wanted == name && nth == pass) {
            eprintln!("thinstack: crash point {name}#{pass} reached: aborting as if killed");
            std::process::abort();
        }
        let hit = ARMED.with(|a| {
            let mut armed = a.borrow_mut();
            match armed.as_mut() {
                Some((armed_point, 0)) if *armed_point == point => {
                    *armed = None;
                    true
                }
                Some((armed_point, left)) if *armed_point == point => {
                    *left -= 1;
                    false
                }
                _ => false,
            }
        });
        if hit {
            panic!("{}", crash_message(point));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_point_has_a_distinct_name_that_finds_it() {
        let mut names = std::collections::BTreeSet::new();
        for point in Point::ALL {
            assert!(names.insert(point.name()), "{point} named twice");
            assert_eq!(Point::named(point.name()), Some(*point));
        }
        assert_eq!(Point::named("no.such_point"), None);
    }

    #[test]
    fn an_armed_point_panics_at_its_nth_pass_only() {
        arm_nth(Point::RemoveQueued, 2);
        point(Point::RemoveQueued);
        point(Point::RemoveMarked);
        let caught = std::panic::catch_unwind(|| point(Point::RemoveQueued)).unwrap_err();
        assert!(is_crash(caught.as_ref(), Point::RemoveQueued));
        assert!(!is_crash(caught.as_ref(), Point::RemoveMarked));
        point(Point::RemoveQueued); // disarmed after it fired
    }
}
