//! A handle's lock participants (its `dist_lock` and its guards), queued as on etcd: first on
//! the handle's fair mutex for the name, then in the store's queue with a key of their own.
//!
//! On etcd a handle has one lease and so one waiter key per lock name; its own participants
//! for a name queue locally first, and only the front one puts `<name>/<lease id in hex>` and
//! waits in etcd. The in-memory backend copies that: the same key (bound to the handle's
//! lease, value `""`) is written when a participant joins the store's queue and deleted when
//! it releases or gives up, so ranges and watches see lock keys come and go as on etcd.
//!
//! Whoever deletes a participant's key ends its place at once: a holder has lost the lock
//! (its handle's next participant for the name may queue), and a waiter queues again at the
//! back with a new key, as etcd's waiter does when it finds its key gone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hmetcd_core::{LostReason, LostSignal};

use crate::store::{LeaseId, Place, Status, Store};

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
}

impl Participants {
    pub(crate) fn new(store: Arc<Store>, lease: LeaseId) -> Self {
        Participants {
            store,
            lease,
            local: Mutex::default(),
        }
    }

    fn key(&self, stored_name: &str) -> String {
        // Etcd's lock layout: `<name>/<lease id in lowercase hex>`.
        format!("{stored_name}/{:x}", self.lease)
    }

    /// The lock keys this handle may have in the store now: one per name that a participant
    /// of the handle waits for or holds (for `close()`, which deletes those bound to the lease).
    pub(crate) fn keys(&self) -> Vec<String> {
        locked(&self.local)
            .keys()
            .map(|name| self.key(name))
            .collect()
    }

    /// Waits for the lock `stored_name` (prefix included). Dropping the wait leaves no trace:
    /// the participant leaves both queues and its key is deleted. `None` if the handle's lease
    /// was revoked meanwhile (the handle is closing).
    pub(crate) async fn acquire(self: &Arc<Self>, stored_name: &str, value: &str) -> Option<Held> {
        let mut pending = Pending {
            participants: Arc::clone(self),
            stored_name: stored_name.to_owned(),
            place: None,
        };
        let local = Arc::clone(
            locked(&self.local)
                .entry(stored_name.to_owned())
                .or_default(),
        );
        let key = self.key(stored_name);
        let mut local_guard = None;
        loop {
            // As on etcd: the handle's own participants for a name queue locally before the store.
            let guard = match local_guard.take() {
                Some(guard) => guard,
                None => Arc::clone(&local).lock_owned().await,
            };
            let place = self
                .store
                .enqueue(stored_name, &key, value, self.lease, guard);
            pending.place = Some(Arc::clone(&place));
            match place.turn().await {
                Status::Holding => {
                    pending.place = None;
                    return Some(Held {
                        participants: Arc::clone(self),
                        stored_name: stored_name.to_owned(),
                        place,
                    });
                }
                Status::Gone(Some(LostReason::KeyDeleted)) => {
                    // As etcd's waiter does when its key vanished: queue again, at the back.
                    tracing::debug!(lock = %stored_name, "a waiter's lock key was deleted; queueing again");
                    pending.place = None;
                    local_guard = place.take_local();
                }
                Status::Gone(_) | Status::Queued => return None,
            }
        }
    }

    /// Drops the handle's local mutex for `stored_name` if nobody uses it any more.
    fn forget_if_unused(&self, stored_name: &str) {
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
    /// Our place, once we queued in the store.
    place: Option<Arc<Place>>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(place) = self.place.take() {
            self.participants.store.release(&place);
        }
        self.participants.forget_if_unused(&self.stored_name);
    }
}

/// A held lock: its key at the front of the store's queue, and its place at the front of the
/// handle's. Dropping it releases the lock, unless it was lost already.
#[derive(Debug)]
pub(crate) struct Held {
    participants: Arc<Participants>,
    stored_name: String,
    place: Arc<Place>,
}

impl Held {
    /// The create revision of this holder's lock key.
    pub(crate) fn fencing_token(&self) -> i64 {
        self.place.revision()
    }

    /// Whether the lock is still held: its key was not deleted, by anyone but this holder.
    pub(crate) fn is_held(&self) -> bool {
        self.place.status() == Status::Holding
    }

    /// Fires when the hold ends other than by this holder's release.
    pub(crate) fn lost(&self) -> &LostSignal {
        self.place.lost()
    }

    /// Puts `value` on the holder's key while it still holds the lock (a leader proclaiming);
    /// `false` once it lost it.
    pub(crate) fn proclaim(&self, value: &str) -> bool {
        self.participants.store.proclaim(&self.place, value)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // As on etcd: the key goes first and the next handle's waiter gets the lock; the
        // handle's own next participant for the name queues in the store only after that.
        // A lost hold's key is gone already, and whatever now has the key is not ours.
        self.participants.store.release(&self.place);
        self.participants.forget_if_unused(&self.stored_name);
    }
}
