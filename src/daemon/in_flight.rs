//! Operations in flight, so a stop waits for every one of them, including those whose client
//! went away, and no new one starts once it has.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What a request is told when the stop has begun and its operation may not start.
pub const STOPPING: &str =
    "thinstackd is stopping; nothing was done: send the request again once it is back";

/// More permits than operations could ever run at once (each takes a blocking thread).
const ALL: u32 = u32::MAX;

/// Each operation holds a permit while it runs; the stop takes them all.
#[derive(Clone)]
pub struct InFlight(Arc<Semaphore>);

impl InFlight {
    /// No operation running.
    pub fn new() -> Self {
        InFlight(Arc::new(Semaphore::new(ALL as usize)))
    }

    /// A permit to start an operation, held until it ends; `None` once the stop has begun
    /// (the stop's waiting for all permits takes every one released meanwhile).
    pub fn enter(&self) -> Option<OwnedSemaphorePermit> {
        self.0.clone().try_acquire_owned().ok()
    }

    /// How many operations are running.
    pub fn running(&self) -> usize {
        ALL as usize - self.0.available_permits()
    }

    /// Wait for every operation to finish, however long it takes (an operation cut short
    /// would leave a layer half made), then let none start.
    pub async fn drain(&self) {
        let running = self.running();
        if running > 0 {
            tracing::info!(
                operations = running,
                "waiting for operations already started to finish"
            );
        }
        // The semaphore is closed only below, so acquiring cannot fail.
        let _all = self.0.acquire_many(ALL).await;
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_stop_waits_for_operations_and_then_refuses_new_ones() {
        let in_flight = InFlight::new();
        let operation = in_flight.enter().expect("open before the stop");
        assert_eq!(in_flight.running(), 1);
        let stop = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.drain().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!stop.is_finished(), "the stop waits for the operation");
        assert!(
            in_flight.enter().is_none(),
            "nothing starts once the stop began"
        );
        drop(operation);
        tokio::time::timeout(Duration::from_secs(10), stop)
            .await
            .expect("the stop ends once the operation has")
            .unwrap();
        assert!(in_flight.enter().is_none(), "nor after it");
    }
}
