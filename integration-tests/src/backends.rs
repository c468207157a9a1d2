//! The backends the suite runs against, chosen by `HMETCD_TEST_BACKENDS`.

use std::sync::Arc;
use std::time::Duration;

use hmetcd_core::{Kvi, Result};
use hmetcd_mem::MemKvs;

use crate::Opener;

/// The in-memory backend: every handle of one run opens the same named store.
pub struct MemOpener {
    store_name: String,
}

impl MemOpener {
    /// An opener on a fresh named store.
    pub fn new() -> Self {
        let tag: String = std::iter::repeat_with(fastrand::alphanumeric).take(12).collect();
        MemOpener {
            store_name: format!("conformance-{tag}"),
        }
    }
}

impl Default for MemOpener {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait::async_trait]
impl Opener for MemOpener {
    fn name(&self) -> &str {
        "mem"
    }

    async fn open(&self, options: &str) -> Result<Box<dyn Kvi>> {
        Ok(Box::new(MemKvs::open(&self.store_name, options)?))
    }

    fn drop_release_bound(&self, _lease_ttl: Duration) -> Duration {
        Duration::ZERO
    }
}

/// The backends to test, from `HMETCD_TEST_BACKENDS` (a comma-separated list; default `mem,etcd`).
pub fn from_env() -> std::result::Result<Vec<Arc<dyn Opener>>, String> {
    let wanted = std::env::var("HMETCD_TEST_BACKENDS").unwrap_or_else(|_| "mem".to_owned());
    let mut openers: Vec<Arc<dyn Opener>> = Vec::new();
    for name in wanted.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match name {
            "mem" => openers.push(Arc::new(MemOpener::new())),
            other => return Err(format!("HMETCD_TEST_BACKENDS: unknown backend {other:?} (known: mem, etcd)")),
        }
    }
    Ok(openers)
}
