//! Named locks in memory: a guard holds the store's fair mutex for its name; the handle keeps
//! track of its live guards so that `close()` and drop release them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use hmetcd_core::{Error, LockRelease, Result};
use tokio::sync::OwnedMutexGuard;
use tokio::task::AbortHandle;

use crate::store::Store;

/// The store's mutex while a guard holds it; empty once released.
type Slot = Arc<Mutex<Option<OwnedMutexGuard<()>>>>;

/// The live guards of one handle, with the stored name of each one's lock.
#[derive(Default)]
pub(crate) struct Guards {
    live: Mutex<HashMap<u64, (String, Slot)>>,
}

impl Guards {
    /// Releases every guard at once (the handle is closed or dropped).
    pub(crate) fn release_all(&self, store: &Store) {
        let live = std::mem::take(&mut *self.live.lock().unwrap_or_else(PoisonError::into_inner));
        for (_, (stored_name, slot)) in live {
            drop(take(&slot));
            store.forget_lock_if_unused(&stored_name);
        }
    }

    fn forget(&self, id: u64) {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
}

fn take(slot: &Slot) -> Option<OwnedMutexGuard<()>> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}

/// One guard's hold on the store's mutex.
pub(crate) struct MemLockRelease {
    id: u64,
    stored_name: String,
    slot: Slot,
    guards: Weak<Guards>,
    store: Arc<Store>,
    expiry: Option<AbortHandle>,
}

impl MemLockRelease {
    /// Registers `guard` with the handle's `guards` and, with `max_hold`, starts the timer
    /// that releases it (on the current Tokio runtime; without one, `max_hold` is refused).
    pub(crate) fn register(
        name: &str,
        guards: &Arc<Guards>,
        store: Arc<Store>,
        id: u64,
        stored_name: String,
        guard: OwnedMutexGuard<()>,
        max_hold: Option<Duration>,
    ) -> Result<Self> {
        let runtime =
            match max_hold {
                Some(_) => Some(tokio::runtime::Handle::try_current().map_err(|_| {
                    Error::NotSupported {
                        what: format!("max_hold on the lock {name:?}"),
                        reason: "the timer needs a Tokio runtime; call lock_with from within one"
                            .to_owned(),
                    }
                })?),
                None => None,
            };
        let slot: Slot = Arc::new(Mutex::new(Some(guard)));
        guards
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, (stored_name.clone(), Arc::clone(&slot)));
        let expiry = max_hold.zip(runtime).map(|(max_hold, runtime)| {
            let slot = Arc::clone(&slot);
            let guards = Arc::downgrade(guards);
            let store = Arc::clone(&store);
            let stored_name = stored_name.clone();
            runtime.spawn(async move {
                tokio::time::sleep(max_hold).await;
                tracing::debug!(lock = %stored_name, ?max_hold, "max_hold expired; releasing the lock");
                release(id, &stored_name, &slot, &guards, &store);
            })
            .abort_handle()
        });
        Ok(MemLockRelease {
            id,
            stored_name,
            slot,
            guards: Arc::downgrade(guards),
            store,
            expiry,
        })
    }

    /// Releases the lock now (if still held) and stops the `max_hold` timer.
    pub(crate) fn release_now(self) {
        if let Some(expiry) = &self.expiry {
            expiry.abort();
        }
        release(
            self.id,
            &self.stored_name,
            &self.slot,
            &self.guards,
            &self.store,
        );
    }
}

fn release(id: u64, stored_name: &str, slot: &Slot, guards: &Weak<Guards>, store: &Store) {
    drop(take(slot));
    if let Some(guards) = guards.upgrade() {
        guards.forget(id);
    }
    store.forget_lock_if_unused(stored_name);
}

impl LockRelease for MemLockRelease {
    fn is_held(&self) -> bool {
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        self.release_now();
        Box::pin(async { Ok(()) })
    }

    fn release_on_drop(self: Box<Self>) {
        self.release_now();
    }
}
