//! Gates for races a test sets up on the sim: the next call of an operation stops at its gate
//! until the test opens it, so a test can run another operation while it is held there.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One call's gate: reached by the call, opened by the test.
#[derive(Debug, Default)]
pub struct SimGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    reached: bool,
    open: bool,
}

impl SimGate {
    fn state(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until a call has reached the gate; false when `deadline` passed first.
    pub fn wait_reached(&self, deadline: Duration) -> bool {
        let until = Instant::now() + deadline;
        let mut state = self.state();
        while !state.reached {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Let the call held at the gate (or the next one to reach it) go on.
    pub fn open(&self) {
        self.state().open = true;
        self.changed.notify_all();
    }

    /// The call's side: say it is here, then wait until the test opens the gate.
    pub(super) fn pass(&self) {
        let mut state = self.state();
        state.reached = true;
        self.changed.notify_all();
        while !state.open {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_call_waits_at_the_gate_until_it_is_opened() {
        let gate = Arc::new(SimGate::default());
        assert!(!gate.wait_reached(Duration::from_millis(10)), "no call yet");
        let passed = Arc::new(Mutex::new(false));
        let call = {
            let (gate, passed) = (gate.clone(), passed.clone());
            std::thread::spawn(move || {
                gate.pass();
                *passed.lock().unwrap() = true;
            })
        };
        assert!(gate.wait_reached(Duration::from_secs(60)));
        assert!(!*passed.lock().unwrap(), "held at the gate");
        gate.open();
        call.join().unwrap();
        assert!(*passed.lock().unwrap());
    }
}
