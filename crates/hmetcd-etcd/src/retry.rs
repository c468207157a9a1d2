//! Small helpers for background work: backoff between retries, abort-on-drop tasks, shutdown.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The first pause after a failure.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
/// The longest pause between two attempts.
const LONGEST_PAUSE: Duration = Duration::from_secs(2);

/// Exponential backoff with jitter: the n-th pause is drawn uniformly from [b/2, b] for
/// b = 100 ms, 200 ms, ... up to 2 s ("equal jitter"), so that many clients that lost etcd
/// at the same moment (a restart) do not all retry in lockstep.
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
        let bound = self.next;
        self.next = (self.next * 2).min(LONGEST_PAUSE);
        let half = bound / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(fastrand::u64(0..=nanos))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_within_their_bounds_and_vary() {
        let mut pauses = Vec::new();
        for _ in 0..50 {
            let mut backoff = Backoff::new();
            let mut bound = FIRST_PAUSE;
            for _ in 0..8 {
                let pause = backoff.next_pause();
                assert!(
                    pause >= bound / 2 && pause <= bound,
                    "{pause:?} outside [{:?}, {bound:?}]",
                    bound / 2
                );
                bound = (bound * 2).min(LONGEST_PAUSE);
                pauses.push(pause);
            }
        }
        let first = pauses[0];
        assert!(
            pauses.iter().step_by(8).any(|pause| *pause != first),
            "50 first pauses all {first:?}: no jitter"
        );
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new();
        for _ in 0..10 {
            backoff.next_pause();
        }
        assert!(backoff.next_pause() >= LONGEST_PAUSE / 2);
        backoff.reset();
        assert!(backoff.next_pause() <= FIRST_PAUSE);
    }
}
