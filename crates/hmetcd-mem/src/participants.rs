//! A handle's lock participants (its `dist_lock` and its guards), queued as on etcd: first on
//! the handle's fair mutex for the name, then in the store's queue with a key of their own.
//!
//! On etcd a handle has one lease and so one waiter key per lock name; its own participants
//! for a name queue locally first, and only the front one puts `<name>/<lease id in hex>` and
//! waits in etcd. The in-memory backend copies that: the same key (bound to the handle's
//! lease, value `""`) is written when a participant joins the store's queue and deleted when
//! it releases or gives up, so ranges and watches see lock keys come and go as on etcd.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::OwnedMutexGuard;

use crate::store::{LeaseId, Queued, Store};

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What one handle's lock participants share.
#[derive(Debug)]
pub(crate) struct Participants {
    store: Arc<Store>,
    lease: LeaseId,
    /// One fair mutex per stored lock name; entries nobody uses are removed.
    local: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The lock keys of this handle now in the store (queued or held), for `close()`.
    keys: Mutex<HashSet<String>>,
}

impl Participants {
    pub(crate) fn new(store: Arc<Store>, lease: LeaseId) -> Self {
        Participants {
            store,
            lease,
            local: Mutex::default(),
            keys: Mutex::default(),
        }
    }

    /// The lock keys this handle has in the store now.
    pub(crate) fn keys(&self) -> Vec<String> {
        locked(&self.keys).iter().cloned().collect()
    }

    /// Waits for the lock `stored_name` (prefix included). Dropping the wait leaves no trace:
    /// the participant leaves both queues and its key is deleted.
    pub(crate) async fn acquire(self: &Arc<Self>, stored_name: &str) -> Held {
        let mut pending = Pending {
            participants: Arc::clone(self),
            stored_name: stored_name.to_owned(),
            key: None,
        };
        let local = Arc::clone(
            locked(&self.local)
                .entry(stored_name.to_owned())
                .or_default(),
        );
        // As on etcd: the handle's own participants for a name queue locally before the store.
        let local_guard = local.lock_owned().await;
        // Etcd's lock layout: `<name>/<lease id in lowercase hex>`.
        let key = format!("{stored_name}/{:x}", self.lease);
        locked(&self.keys).insert(key.clone());
        pending.key = Some(key.clone());
        let (queued, fencing_token) = self.store.enqueue(stored_name, &key, self.lease);
        let store_guard = match queued {
            Queued::Acquired(guard) => guard,
            Queued::Waiting(wait) => wait.await,
        };
        pending.key = None;
        Held {
            participants: Arc::clone(self),
            stored_name: stored_name.to_owned(),
            key,
            fencing_token,
            store_guard: Some(store_guard),
            local_guard: Some(local_guard),
        }
    }

    fn remove_key(&self, key: &str) {
        locked(&self.keys).remove(key);
        self.store.delete_leased(key, self.lease);
    }

    /// Drops what the store and the handle keep for `stored_name` if nobody uses it any more.
    fn forget_if_unused(&self, stored_name: &str) {
        self.store.forget_lock_if_unused(stored_name);
        let mut local = locked(&self.local);
        if local
            .get(stored_name)
            .is_some_and(|mutex| Arc::strong_count(mutex) == 1)
        {
            local.remove(stored_name);
        }
    }
}

/// A participant still waiting; cleans up after an abandoned wait.
struct Pending {
    participants: Arc<Participants>,
    stored_name: String,
    /// Our key, once we queued in the store.
    key: Option<String>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.participants.remove_key(&key);
        }
        self.participants.forget_if_unused(&self.stored_name);
    }
}

/// A held lock: its key, its place at the front of the store's queue and of the handle's.
/// Dropping it releases the lock.
#[derive(Debug)]
pub(crate) struct Held {
    participants: Arc<Participants>,
    stored_name: String,
    key: String,
    /// The create revision of `key`.
    fencing_token: i64,
    store_guard: Option<OwnedMutexGuard<()>>,
    local_guard: Option<OwnedMutexGuard<()>>,
}

impl Held {
    /// The create revision of this holder's lock key.
    pub(crate) fn fencing_token(&self) -> i64 {
        self.fencing_token
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // As on etcd: the key goes first and the next handle's waiter gets the lock; the
        // handle's own next participant for the name queues in the store only after that.
        self.participants.remove_key(&self.key);
        drop(self.store_guard.take());
        drop(self.local_guard.take());
        self.participants.forget_if_unused(&self.stored_name);
    }
}
