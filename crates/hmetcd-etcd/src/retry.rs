//! Small helpers for background work: backoff between retries, abort-on-drop tasks, shutdown.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The first pause after a failure.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
/// The longest pause between two attempts.
const LONGEST_PAUSE: Duration = Duration::from_secs(2);

/// Exponential backoff: 100 ms, 200 ms, ... up to 2 s.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff { next: FIRST_PAUSE }
    }

    /// The pause before the next attempt.
    pub(crate) fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(LONGEST_PAUSE);
        pause
    }

    pub(crate) fn reset(&mut self) {
        self.next = FIRST_PAUSE;
    }
}

/// A spawned task that is aborted when this guard is dropped.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves once the handle is closed or dropped (the sender sends `true` or goes away).
pub(crate) async fn shut_down(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: the handle was dropped.
    let _ = shutdown.wait_for(|closed| *closed).await;
}

/// Sleeps for `pause`; `false` if the handle was shut down meanwhile.
pub(crate) async fn pause_unless_shut_down(
    pause: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        () = shut_down(shutdown) => false,
        () = tokio::time::sleep(pause) => true,
    }
}
