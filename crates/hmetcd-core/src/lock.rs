//! Named locks: [`Kvi::lock`](crate::Kvi::lock) and [`Kvi::lock_with`](crate::Kvi::lock_with)
//! hand back a [`LockGuard`] that releases the lock when it is dropped.
//!
//! A named lock follows the rules of the handle's own lock (`dist_lock`): the name is checked
//! like a key and lives under the handle's `prefix`, waiters are served first come first
//! served, a timed attempt that gives up leaves no trace, and `close()` releases it. Unlike
//! `dist_lock`, a guard is not re-entrant: every guard for a name excludes every other guard
//! for that name, among the tasks of one handle as across handles. The named lock whose name
//! is the handle's `lock_name` is the handle's lock.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::Result;

/// Why a lock (or a leadership) stopped being held other than by its holder's own
/// `unlock()`, `resign()` or drop: what [`LockGuard::lost`] resolves with.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LostReason {
    /// `max_hold` ran out and the library released the lock.
    MaxHold,
    /// The handle's lease (its session) was lost: etcd was unreachable for longer than
    /// `lease_ttl`, or the lease was revoked. Another holder may have the lock now.
    SessionLost,
    /// The handle was closed.
    Closed,
    /// Someone else deleted this holder's lock key; the next waiter has the lock now.
    KeyDeleted,
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LostReason::MaxHold => "max_hold ran out",
            LostReason::SessionLost => "the handle's session (lease) was lost",
            LostReason::Closed => "the handle was closed",
            LostReason::KeyDeleted => "the lock key was deleted by someone else",
        })
    }
}

/// The backend side of [`LockGuard::lost`]: a one-shot signal that a hold ended, with the
/// first reason given. Clones share one signal. Backends fire it; applications never see it.
#[derive(Clone, Debug)]
pub struct LostSignal(Arc<tokio::sync::watch::Sender<Option<LostReason>>>);

impl Default for LostSignal {
    fn default() -> Self {
        LostSignal::new()
    }
}

impl LostSignal {
    /// A signal that has not fired.
    pub fn new() -> Self {
        LostSignal(Arc::new(tokio::sync::watch::Sender::new(None)))
    }

    /// Fires with `reason` unless it already fired; `true` if this call fired it.
    pub fn fire(&self, reason: LostReason) -> bool {
        self.0.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(reason);
            true
        })
    }

    /// The reason it fired with, if it did.
    pub fn reason(&self) -> Option<LostReason> {
        *self.0.borrow()
    }

    /// Resolves with the reason once it fires; never resolves if it never does.
    pub fn wait(&self) -> BoxFuture<'static, LostReason> {
        let mut receiver = self.0.subscribe();
        Box::pin(async move {
            // `None`: every clone was dropped unfired (the hold ended by its own release).
            let fired = receiver
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|reason| *reason);
            match fired {
                Some(reason) => reason,
                None => std::future::pending().await,
            }
        })
    }
}

/// How [`Kvi::lock_with`](crate::Kvi::lock_with) takes a named lock.
///
/// ```
/// use std::time::Duration;
/// use hmetcd_core::LockOptions;
///
/// let options = LockOptions::new()
///     .timeout(Duration::from_secs(2))
///     .max_hold(Duration::from_secs(30));
/// assert_eq!(options.get_timeout(), Some(Duration::from_secs(2)));
/// assert_eq!(options.get_max_hold(), Some(Duration::from_secs(30)));
/// assert_eq!(LockOptions::new(), LockOptions::default());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockOptions {
    timeout: Option<Duration>,
    max_hold: Option<Duration>,
}

impl LockOptions {
    /// Wait as long as it takes, hold until released: what [`Kvi::lock`](crate::Kvi::lock) does.
    pub fn new() -> Self {
        LockOptions::default()
    }

    /// Gives up after `timeout` with [`Error::LockTimeout`](crate::Error::LockTimeout) naming
    /// the lock, as `dist_timed_lock` does; the given-up attempt leaves no trace.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Releases the lock once it has been held for `max_hold`, whatever its holder is doing:
    /// a bound on how long a stuck holder can keep everyone else waiting.
    pub fn max_hold(mut self, max_hold: Duration) -> Self {
        self.max_hold = Some(max_hold);
        self
    }

    /// How long an attempt waits before giving up; `None` waits as long as it takes.
    pub fn get_timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// How long the lock is held at most; `None` holds it until it is released.
    pub fn get_max_hold(&self) -> Option<Duration> {
        self.max_hold
    }
}

/// The backend side of a [`LockGuard`]: how a backend tells whether the lock is still held
/// and releases it. Applications never use this; backends implement it and build guards with
/// [`LockGuard::from_backend`].
pub trait LockRelease: Send + Sync + 'static {
    /// Whether the lock is still held: not released, not expired by `max_hold`, not released
    /// by `close()`, and not possibly lost with the handle's session. Conservative: `false`
    /// from the moment the store may have expired the lease, never `true` while another
    /// holder can exist.
    fn is_held(&self) -> bool;

    /// Resolves once the lock stops being held for any reason other than this guard's own
    /// release; never resolves otherwise.
    fn lost(&self) -> BoxFuture<'static, LostReason>;

    /// Releases the lock now. `Ok` if it was already released (expired, closed).
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>>;

    /// Releases the lock without waiting: the guard is being dropped. Must not block or panic,
    /// with or without a Tokio runtime.
    fn release_on_drop(self: Box<Self>);
}

/// A named lock, held until this guard is dropped or [`unlock`](LockGuard::unlock)ed.
///
/// Made by [`Kvi::lock`](crate::Kvi::lock) and [`Kvi::lock_with`](crate::Kvi::lock_with).
/// Dropping the guard releases the lock (in memory at once; on etcd the release is sent on the
/// current Tokio runtime, and without one the lock goes with the handle's lease).
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard {
    name: String,
    key: String,
    fencing_token: i64,
    release: Option<Box<dyn LockRelease>>,
}

impl LockGuard {
    /// The guard of the lock `name`, held through `release`, whose lock key `key` (without the
    /// handle's prefix) was created at revision `fencing_token`. This is the backend side of
    /// the guard: backends call it once they hold the lock; applications get guards from
    /// [`Kvi::lock`](crate::Kvi::lock).
    pub fn from_backend(
        name: impl Into<String>,
        key: impl Into<String>,
        fencing_token: i64,
        release: Box<dyn LockRelease>,
    ) -> Self {
        LockGuard {
            name: name.into(),
            key: key.into(),
            fencing_token,
            release: Some(release),
        }
    }

    /// The lock's name, as given to `lock` (without the handle's prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This holder's lock key, `<name>/<lease id in hex>` (without the handle's prefix): what
    /// [`Compare::held`](crate::Compare::held) checks.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The fencing token of this hold: the store revision at which this holder's lock key was
    /// created (always > 0). For one lock name it strictly increases from each holder to the
    /// next, across handles and processes. Store it beside the data the lock protects and
    /// refuse writes that carry a lower token than the one stored: a holder that lost the lock
    /// (paused, partitioned) then cannot overwrite its successor's work.
    ///
    /// ```
    /// # use hmetcd_core::Kvi;
    /// # async fn example(kv: &dyn Kvi) -> hmetcd_core::Result<()> {
    /// let first = kv.lock("jobs").await?;
    /// let token = first.fencing_token();
    /// first.unlock().await?;
    /// let second = kv.lock("jobs").await?;
    /// assert!(second.fencing_token() > token);
    /// # Ok(())
    /// # }
    /// ```
    pub fn fencing_token(&self) -> i64 {
        self.fencing_token
    }

    /// Whether the lock is still held. Conservative: `false` once `max_hold` expired, the
    /// handle was closed, the lock key was deleted, or from the moment the store may have
    /// expired the handle's lease (measured from when the last successful keep-alive was
    /// sent). It may say `false` early; it never says `true` while another holder can exist.
    pub fn is_held(&self) -> bool {
        self.release
            .as_ref()
            .is_some_and(|release| release.is_held())
    }

    /// Resolves once the lock stops being held for any reason other than this guard's own
    /// [`unlock`](LockGuard::unlock) or drop, with the reason. Dropping the future is fine,
    /// and many may be taken; one taken before the guard is unlocked or dropped never
    /// resolves. After it resolved, [`unlock`](LockGuard::unlock) is `Ok` and releases nobody.
    ///
    /// ```
    /// # use hmetcd_core::{Kvi, LostReason};
    /// # async fn example(kv: &dyn Kvi) -> hmetcd_core::Result<()> {
    /// let guard = kv.lock("jobs").await?;
    /// tokio::select! {
    ///     reason = guard.lost() => tracing::warn!(%reason, "lost the lock; stopping"),
    ///     () = do_the_work() => {}
    /// }
    /// # Ok(())
    /// # }
    /// # async fn do_the_work() {}
    /// ```
    pub fn lost(&self) -> BoxFuture<'static, LostReason> {
        match &self.release {
            Some(release) => release.lost(),
            None => Box::pin(std::future::pending()),
        }
    }

    /// Releases the lock now and reports how that went. `Ok` if it was already released by
    /// `max_hold` or `close()`. If the store cannot be reached (a cut, an outage), the error
    /// says so and the lock is let go all the same: its key is deleted once the store can be
    /// reached, or goes with the handle's lease.
    pub async fn unlock(mut self) -> Result<()> {
        match self.release.take() {
            Some(release) => release.release().await,
            None => Ok(()),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release.release_on_drop();
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("name", &self.name)
            .field("fencing_token", &self.fencing_token)
            .field("held", &self.is_held())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_lost_signal_keeps_the_first_reason() {
        let signal = LostSignal::new();
        assert_eq!(signal.reason(), None);
        let waiting = signal.wait();
        assert!(signal.clone().fire(LostReason::MaxHold));
        assert!(!signal.fire(LostReason::Closed));
        assert_eq!(signal.reason(), Some(LostReason::MaxHold));
        assert_eq!(waiting.await, LostReason::MaxHold);
    }

    #[test]
    fn every_lost_reason_says_what_happened() {
        assert_eq!(LostReason::MaxHold.to_string(), "max_hold ran out");
        assert_eq!(
            LostReason::SessionLost.to_string(),
            "the handle's session (lease) was lost"
        );
        assert_eq!(LostReason::Closed.to_string(), "the handle was closed");
        assert_eq!(
            LostReason::KeyDeleted.to_string(),
            "the lock key was deleted by someone else"
        );
    }

    struct Counted(Arc<AtomicUsize>);

    impl LockRelease for Counted {
        fn is_held(&self) -> bool {
            true
        }
        fn lost(&self) -> BoxFuture<'static, LostReason> {
            Box::pin(std::future::pending())
        }
        fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
        fn release_on_drop(self: Box<Self>) {
            self.0.fetch_add(10, Ordering::SeqCst);
        }
    }

    fn assert_send_sync<T: Send + Sync>() {}

    #[tokio::test]
    async fn unlock_releases_once_and_drop_releases_once() {
        assert_send_sync::<LockGuard>();
        let released = Arc::new(AtomicUsize::new(0));
        let guard = LockGuard::from_backend(
            "jobs",
            "jobs/1",
            7,
            Box::new(Counted(Arc::clone(&released))),
        );
        assert_eq!(guard.name(), "jobs");
        assert_eq!(guard.fencing_token(), 7);
        assert!(guard.is_held());
        assert_eq!(
            format!("{guard:?}"),
            r#"LockGuard { name: "jobs", fencing_token: 7, held: true }"#
        );
        guard.unlock().await.unwrap();
        assert_eq!(released.load(Ordering::SeqCst), 1);
        drop(LockGuard::from_backend(
            "jobs",
            "jobs/2",
            8,
            Box::new(Counted(Arc::clone(&released))),
        ));
        assert_eq!(released.load(Ordering::SeqCst), 11);
    }

    #[tokio::test]
    async fn lost_signal_keeps_the_first_reason_and_wakes_every_waiter() {
        let signal = LostSignal::new();
        let early = signal.wait();
        assert_eq!(signal.reason(), None);
        assert!(signal.fire(LostReason::MaxHold));
        assert!(!signal.fire(LostReason::Closed));
        assert_eq!(early.await, LostReason::MaxHold);
        assert_eq!(signal.clone().wait().await, LostReason::MaxHold);
        let never = LostSignal::new();
        let waiting = tokio::time::timeout(Duration::from_millis(20), never.wait()).await;
        assert!(waiting.is_err(), "an unfired signal never resolves");
    }
}
