//! The hmetcd conformance suite: every rule of the contract as a case, written once and
//! run against every backend by `tests/conformance.rs`.
//!
//! A case is `pub async fn name(store: TestStore)`; it opens as many handles as it needs
//! with [`TestStore::open`], all on the same store under a key prefix and lock name of
//! its own, so that cases can run in parallel against one server.

pub mod backends;
pub mod cases;
pub mod cluster;
pub mod coalescing;
pub mod etcd_server;
pub mod faults;
pub mod spans;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use hmetcd_core::{Kvi, Result};

/// Opens handles on one backend's store.
#[async_trait::async_trait]
pub trait Opener: Send + Sync + 'static {
    /// The backend's name as shown in test names, e.g. `mem` or `etcd-3.5.1`.
    fn name(&self) -> &str;

    /// A new handle on the store under test with `options` (a full options string).
    async fn open(&self, options: &str) -> Result<Box<dyn Kvi>>;

    /// How long a dropped (not closed) handle's lock and temp keys may linger:
    /// zero in memory, about `lease_ttl` on etcd.
    fn drop_release_bound(&self, lease_ttl: Duration) -> Duration;
}

/// One case's view of a store: a fresh random key prefix and lock name.
#[derive(Clone)]
pub struct TestStore {
    opener: Arc<dyn Opener>,
    prefix: String,
    lock_name: String,
}

impl TestStore {
    /// A view under a new random prefix (`t-<random>/`) and lock name.
    pub fn new(opener: Arc<dyn Opener>) -> Self {
        let tag: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(12)
            .collect();
        TestStore {
            opener,
            prefix: format!("t-{tag}/"),
            lock_name: format!("t-{tag}-lock"),
        }
    }

    /// The backend's name.
    pub fn backend(&self) -> &str {
        self.opener.name()
    }

    /// The key prefix this case's handles use (callers never see it).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lock name this case's handles use unless the options name another.
    pub fn lock_name(&self) -> &str {
        &self.lock_name
    }

    /// How long a dropped handle's lock and temp keys may linger on this backend.
    pub fn drop_release_bound(&self, lease_ttl: Duration) -> Duration {
        self.opener.drop_release_bound(lease_ttl)
    }

    /// A new handle with the case's prefix and lock name; panics if the store cannot be opened.
    pub async fn open(&self) -> Box<dyn Kvi> {
        self.open_with("")
            .await
            .unwrap_or_else(|err| panic!("opening {}: {err}", self.backend()))
    }

    /// A new handle with extra options; `prefix` and `lock_name` default to the case's own
    /// unless `extra` names them.
    pub async fn open_with(&self, extra: &str) -> Result<Box<dyn Kvi>> {
        self.opener.open(&self.options(extra)).await
    }

    /// The full options string `open_with(extra)` uses.
    pub fn options(&self, extra: &str) -> String {
        let mut options: Vec<String> = Vec::new();
        let names: Vec<&str> = extra
            .split(',')
            .filter_map(|item| item.split_once('=').map(|(name, _)| name.trim()))
            .collect();
        if !names.contains(&"prefix") {
            options.push(format!("prefix={}", self.prefix));
        }
        if !names.contains(&"lock_name") {
            options.push(format!("lock_name={}", self.lock_name));
        }
        if !extra.trim().is_empty() {
            options.push(extra.to_owned());
        }
        options.join(",")
    }
}

/// A conformance case.
pub type CaseFn = fn(TestStore) -> BoxFuture<'static, ()>;

/// A named conformance case.
#[derive(Clone, Copy)]
pub struct Case {
    /// The case's name, as shown in test output.
    pub name: &'static str,
    /// Runs the case.
    pub run: CaseFn,
}

/// Builds a [`Case`] from an `async fn(TestStore)`.
#[macro_export]
macro_rules! case {
    ($path:path) => {
        $crate::Case {
            name: stringify!($path),
            run: |store| Box::pin($path(store)),
        }
    };
}

/// Runs one test of an etcd test binary on a runtime of its own with `workers` threads,
/// failing it after `limit`; the runtime is shut down without waiting for its tasks, so
/// child processes die with the guards the test's future owns.
pub fn run_limited(
    workers: usize,
    limit: Duration,
    test: impl std::future::Future<Output = ()>,
) -> std::result::Result<(), libtest_mimic::Failed> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .map_err(|err| libtest_mimic::Failed::from(format!("tokio runtime: {err}")))?;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(async { tokio::time::timeout(limit, test).await })
    }));
    runtime.shutdown_background();
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(libtest_mimic::Failed::from(format!(
            "did not finish within {limit:?}"
        ))),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
