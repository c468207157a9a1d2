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
use std::time::Duration;

use futures::future::BoxFuture;

use crate::Result;

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
    /// Whether the lock is still held, as far as the handle knows: not released, not expired
    /// by `max_hold`, not released by `close()`, and not lost with the handle's session.
    fn is_held(&self) -> bool;

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
    release: Option<Box<dyn LockRelease>>,
}

impl LockGuard {
    /// The guard of the lock `name`, held through `release`. This is the backend side of the
    /// guard: backends call it once they hold the lock; applications get guards from
    /// [`Kvi::lock`](crate::Kvi::lock).
    pub fn from_backend(name: impl Into<String>, release: Box<dyn LockRelease>) -> Self {
        LockGuard {
            name: name.into(),
            release: Some(release),
        }
    }

    /// The lock's name, as given to `lock` (without the handle's prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the lock is still held: `false` once `max_hold` expired, the handle was closed,
    /// or (on etcd) the handle's lease was lost as far as the handle knows.
    pub fn is_held(&self) -> bool {
        self.release
            .as_ref()
            .is_some_and(|release| release.is_held())
    }

    /// Releases the lock now and reports how that went. `Ok` if it was already released by
    /// `max_hold` or `close()`.
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
            .field("held", &self.is_held())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    struct Counted(Arc<AtomicUsize>);

    impl LockRelease for Counted {
        fn is_held(&self) -> bool {
            true
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
        let guard = LockGuard::from_backend("jobs", Box::new(Counted(Arc::clone(&released))));
        assert_eq!(guard.name(), "jobs");
        assert!(guard.is_held());
        assert_eq!(
            format!("{guard:?}"),
            r#"LockGuard { name: "jobs", held: true }"#
        );
        guard.unlock().await.unwrap();
        assert_eq!(released.load(Ordering::SeqCst), 1);
        drop(LockGuard::from_backend(
            "jobs",
            Box::new(Counted(Arc::clone(&released))),
        ));
        assert_eq!(released.load(Ordering::SeqCst), 11);
    }
}
