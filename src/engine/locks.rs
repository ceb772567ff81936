//! Per-layer locks: operations on one layer are serialized, operations on different layers run
//! side by side.
//!
//! A lock is a name in a set guarded by one mutex and condition variable, so the table never
//! grows past the layers being worked on and needs no clean-up.

use std::collections::BTreeSet;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::names::LayerName;

/// The names being worked on.
#[derive(Default)]
pub(super) struct LayerLocks {
    held: Mutex<BTreeSet<LayerName>>,
    released: Condvar,
}

/// Holds one layer's lock until dropped.
pub(super) struct LayerGuard<'a> {
    locks: &'a LayerLocks,
    name: LayerName,
}

impl LayerLocks {
    fn held(&self) -> MutexGuard<'_, BTreeSet<LayerName>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until no one else works on `name`, then hold it.
    ///
    /// To stay free of deadlocks, a caller that holds a lock and needs another waits only for
    /// one no waiter for its own can hold: a fresh name of its own making. Two names that
    /// clients chose are taken together with [`LayerLocks::lock_both`].
    pub(super) fn lock(&self, name: &LayerName) -> LayerGuard<'_> {
        let mut held = self.held();
        while held.contains(name) {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        held.insert(name.clone());
        self.guard(name)
    }

    /// Hold `name` if no one works on it now; `None` when someone does.
    pub(super) fn try_lock(&self, name: &LayerName) -> Option<LayerGuard<'_>> {
        let mut held = self.held();
        if !held.insert(name.clone()) {
            return None;
        }
        Some(self.guard(name))
    }

    /// Wait until no one works on `first` or `second` (distinct), then hold both. Holding
    /// neither while waiting, the caller can be in no cycle of waits: `create b --parent a`
    /// and `create a --parent b` sent together each take both or wait with nothing.
    pub(super) fn lock_both(
        &self,
        first: &LayerName,
        second: &LayerName,
    ) -> (LayerGuard<'_>, LayerGuard<'_>) {
        debug_assert_ne!(first, second, "a name is locked once");
        let mut held = self.held();
        while held.contains(first) || held.contains(second) {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        held.insert(first.clone());
        held.insert(second.clone());
        (self.guard(first), self.guard(second))
    }

    /// `name`'s lock, with `other`'s when given (the parent of a create or an import, the
    /// base of an export), taken together as [`LayerLocks::lock_both`] does.
    pub(super) fn lock_with(
        &self,
        name: &LayerName,
        other: Option<&LayerName>,
    ) -> (LayerGuard<'_>, Option<LayerGuard<'_>>) {
        match other {
            Some(other) => {
                let (guard, other_guard) = self.lock_both(name, other);
                (guard, Some(other_guard))
            }
            None => (self.lock(name), None),
        }
    }

    fn guard(&self, name: &LayerName) -> LayerGuard<'_> {
        LayerGuard {
            locks: self,
            name: name.clone(),
        }
    }
}

impl Drop for LayerGuard<'_> {
    fn drop(&mut self) {
        self.locks.held().remove(&self.name);
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn one_layer_is_serialized_and_others_are_not() {
        let locks = Arc::new(LayerLocks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let a = LayerName::new("a").unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (locks, inside, most, a) =
                    (locks.clone(), inside.clone(), most.clone(), a.clone());
                std::thread::spawn(move || {
                    let _guard = locks.lock(&a);
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(5));
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        // Another layer is not held up by `a`.
        let b = LayerName::new("b").unwrap();
        drop(locks.lock(&b));
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 1);
        assert!(locks.held().is_empty(), "every guard gave its name back");
    }

    #[test]
    fn crossing_pairs_never_wait_on_each_other_forever() {
        let locks = Arc::new(LayerLocks::default());
        let a = LayerName::new("a").unwrap();
        let b = LayerName::new("b").unwrap();
        let threads: Vec<_> = [(a.clone(), b.clone()), (b, a)]
            .into_iter()
            .map(|(first, second)| {
                let locks = locks.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        let _both = locks.lock_both(&first, &second);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(locks.held().is_empty());
    }
}
