//! Pause points: steps of a handle's background work where a test can hold it, to stage a
//! fault at that exact step (a restore transaction sent into a frozen link, a keep-alive that
//! stops while the handle's other requests go through). A network proxy cannot pick one
//! request out of a connection; a pause point can.
//!
//! Compiled in only with the `pause-points` feature, which only this project's tests turn on.
//! Without it, [`PausePoints`] is empty and [`PausePoints::reached`] returns at once.

/// The steps a test can hold.
#[doc(hidden)]
#[cfg_attr(not(feature = "pause-points"), allow(unreachable_pub))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PausePoint {
    /// The session's restore, before each attempt to put the temp keys back on a new lease
    /// (before it reads which keys those are).
    RestoreTempKeys,
    /// The lease owner, before each keep-alive request it sends on an open stream.
    KeepAliveRenewal,
    /// The lease owner, before each request for a new lease once it counts one lost.
    LeaseGrant,
    /// The session's restore, before each attempt to revoke a lease it counted lost without
    /// etcd saying so, or gave up (etcd may still keep it, with the temp keys on it).
    LostLeaseRevoke,
}

#[cfg(feature = "pause-points")]
pub use enabled::PausePoints;

#[cfg(not(feature = "pause-points"))]
pub(crate) use disabled::PausePoints;

#[cfg(not(feature = "pause-points"))]
mod disabled {
    use super::PausePoint;

    /// Without the feature: nothing to hold.
    #[derive(Debug, Default)]
    pub(crate) struct PausePoints;

    impl PausePoints {
        pub(crate) fn new() -> Self {
            PausePoints
        }

        #[inline(always)]
        pub(crate) async fn reached(&self, _point: PausePoint) {}
    }
}

#[cfg(feature = "pause-points")]
mod enabled {
    use std::collections::HashMap;
    use std::sync::{Mutex, MutexGuard, PoisonError};

    use tokio::sync::watch;

    use super::PausePoint;

    /// What a held point has seen and allows.
    #[derive(Debug, Clone, Copy, Default)]
    struct Count {
        /// Arrivals since the point was held.
        arrived: u64,
        /// How many of those arrivals may go on.
        passes: u64,
        /// Every arrival goes on, now and later.
        open: bool,
    }

    /// A handle's pause points (see the module's documentation). A point that was never
    /// [held](Self::hold) lets everything through.
    #[doc(hidden)]
    #[derive(Debug, Default)]
    pub struct PausePoints {
        points: Mutex<HashMap<PausePoint, watch::Sender<Count>>>,
    }

    impl PausePoints {
        pub(crate) fn new() -> Self {
            Self::default()
        }

        fn points(&self) -> MutexGuard<'_, HashMap<PausePoint, watch::Sender<Count>>> {
            self.points.lock().unwrap_or_else(PoisonError::into_inner)
        }

        fn point(&self, point: PausePoint) -> Option<watch::Sender<Count>> {
            self.points().get(&point).cloned()
        }

        /// From now on, every arrival at `point` waits until [passed](Self::pass_one) or
        /// [opened](Self::open). Counts arrivals afresh.
        pub fn hold(&self, point: PausePoint) {
            self.points()
                .insert(point, watch::Sender::new(Count::default()));
        }

        /// Waits until `count` arrivals at `point` since it was held (passed or waiting).
        /// Returns at once for a point not held.
        pub async fn arrivals(&self, point: PausePoint, count: u64) {
            let Some(sender) = self.point(point) else {
                return;
            };
            let mut counts = sender.subscribe();
            // The sender is kept alive by `sender` here: `wait_for` cannot fail.
            let _ = counts.wait_for(|seen| seen.arrived >= count).await;
        }

        /// Lets the earliest arrival at `point` not yet let through go on (now, or when it
        /// comes).
        pub fn pass_one(&self, point: PausePoint) {
            if let Some(sender) = self.point(point) {
                sender.send_modify(|count| count.passes += 1);
            }
        }

        /// Lets every arrival at `point` go on, now and later.
        pub fn open(&self, point: PausePoint) {
            if let Some(sender) = self.point(point) {
                sender.send_modify(|count| count.open = true);
            }
        }

        /// The handle's work has reached `point`: waits there while the point is held.
        pub(crate) async fn reached(&self, point: PausePoint) {
            let Some(sender) = self.point(point) else {
                return;
            };
            let mut ours = 0;
            sender.send_modify(|count| {
                ours = count.arrived;
                count.arrived += 1;
            });
            tracing::debug!(?point, arrival = ours + 1, "reached a held pause point");
            let mut counts = sender.subscribe();
            let _ = counts
                .wait_for(|count| count.open || count.passes > ours)
                .await;
        }
    }

    #[cfg(test)]
    mod tests {
        use std::sync::Arc;
        use std::time::Duration;

        use super::*;

        #[tokio::test]
        async fn a_held_point_lets_arrivals_go_one_by_one() {
            let points = Arc::new(PausePoints::default());
            points.reached(PausePoint::RestoreTempKeys).await;
            points.hold(PausePoint::RestoreTempKeys);
            let arrive = || {
                let points = Arc::clone(&points);
                tokio::spawn(async move { points.reached(PausePoint::RestoreTempKeys).await })
            };
            let first = arrive();
            points.arrivals(PausePoint::RestoreTempKeys, 1).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!first.is_finished(), "held");
            points.pass_one(PausePoint::RestoreTempKeys);
            first.await.unwrap();
            let second = arrive();
            points.arrivals(PausePoint::RestoreTempKeys, 2).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!second.is_finished(), "held again");
            // Another point is not held.
            points.reached(PausePoint::KeepAliveRenewal).await;
            points.open(PausePoint::RestoreTempKeys);
            second.await.unwrap();
            arrive().await.unwrap();
        }
    }
}
