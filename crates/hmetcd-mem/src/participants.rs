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
//! back with a new key, as etcd's waiter does when it finds its key gone. A lost lease
//! (`Faults::expire_lease`, or a partition longer than `lease_ttl`) deletes the keys too: its
//! holders lose their locks (`SessionLost`) and its waiters queue again on the next lease.
//!
//! While the handle is partitioned (`Faults::partition`) it hears nothing from the store: a
//! waiter learns that its turn came (or that its lease was lost) only when the partition ends,
//! and a key it lets go of (unlock, drop, a given-up wait) is deleted only then, as the etcd
//! backend's retried deletes are. A lease that expires meanwhile takes the key with it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hmetcd_core::{LostReason, LostSignal};

use crate::store::{lock_key, LeaseId, Place, Status, Store};

/// Whether a handle reaches its store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Link {
    /// It does.
    Up,
    /// It is partitioned (`Faults::partition(true)`).
    Cut,
    /// It was closed or dropped, and its lease is gone: it never reaches the store again.
    Gone,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What one handle's lock participants share.
#[derive(Debug)]
pub(crate) struct Participants {
    store: Arc<Store>,
    /// The handle's lease now; replaced only under the store's lock.
    lease: AtomicU64,
    /// One fair mutex per stored lock name; entries nobody uses are removed.
    local: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// `link`'s value, read by every lock and release without touching the channel.
    link_now: AtomicU8,
    link: tokio::sync::watch::Sender<Link>,
}

impl Participants {
    pub(crate) fn new(store: Arc<Store>, lease: LeaseId) -> Self {
        Participants {
            store,
            lease: AtomicU64::new(lease),
            local: Mutex::default(),
            link_now: AtomicU8::new(Link::Up as u8),
            link: tokio::sync::watch::Sender::new(Link::Up),
        }
    }

    pub(crate) fn lease(&self) -> LeaseId {
        self.lease.load(Ordering::Acquire)
    }

    /// The handle's lease, for store operations that read it under the store's lock.
    pub(crate) fn lease_cell(&self) -> &AtomicU64 {
        &self.lease
    }

    pub(crate) fn link(&self) -> Link {
        match self.link_now.load(Ordering::Acquire) {
            up if up == Link::Up as u8 => Link::Up,
            cut if cut == Link::Cut as u8 => Link::Cut,
            _ => Link::Gone,
        }
    }

    pub(crate) fn set_link(&self, link: Link) {
        self.link_now.store(link as u8, Ordering::Release);
        self.link.send_replace(link);
    }

    /// Waits until the handle is not partitioned.
    async fn reachable(&self) -> Link {
        let now = self.link();
        if now != Link::Cut {
            return now;
        }
        // The channel's own value decides from here, so a cut ending meanwhile is not missed.
        let mut link = self.link.subscribe();
        let settled = link.wait_for(|link| *link != Link::Cut).await;
        // The sender lives as long as `self`; `Err` cannot happen while we borrow it.
        settled.map_or(Link::Gone, |link| *link)
    }

    /// The lock keys this handle may have in the store now: one per name that a participant
    /// of the handle waits for or holds (for `close()` and a lost lease, which delete those
    /// bound to the lease).
    pub(crate) fn keys(&self) -> Vec<String> {
        let lease = self.lease();
        locked(&self.local)
            .keys()
            .map(|name| lock_key(name, lease))
            .collect()
    }

    /// Lets go of `place` (unlock, drop, a given-up wait): its key is deleted now, or, while
    /// the handle is partitioned, once the partition ends (on the current Tokio runtime;
    /// without one, now).
    fn let_go(self: &Arc<Self>, place: &Arc<Place>, stored_name: &str) {
        if self.link() == Link::Cut {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let (participants, place) = (Arc::clone(self), Arc::clone(place));
                let stored_name = stored_name.to_owned();
                runtime.spawn(async move {
                    participants.reachable().await;
                    participants.store.release(&place);
                    participants.forget_if_unused(&stored_name);
                });
                return;
            }
        }
        self.store.release(place);
        self.forget_if_unused(stored_name);
    }

    /// Waits for the lock `stored_name` (prefix included). Dropping the wait leaves no trace:
    /// the participant leaves both queues and its key is deleted. `None` if the handle's lease
    /// was revoked meanwhile (the handle is closing).
    pub(crate) async fn acquire(self: &Arc<Self>, stored_name: &str, value: &str) -> Option<Held> {
        let asked = std::time::Instant::now();
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
        let mut local_guard = None;
        loop {
            // As on etcd: the handle's own participants for a name queue locally before the store.
            let guard = match local_guard.take() {
                Some(guard) => guard,
                None => Arc::clone(&local).lock_owned().await,
            };
            if self.link() == Link::Gone {
                return None;
            }
            let place = self.store.enqueue(stored_name, value, &self.lease, guard);
            pending.place = Some(Arc::clone(&place));
            place.turn().await;
            // A partitioned handle hears of its turn (or of its lost lease) when it ends.
            if self.reachable().await == Link::Gone {
                return None;
            }
            match place.status() {
                Status::Holding => {
                    pending.place = None;
                    let token = place.revision();
                    hmetcd_core::instrument::lock_taken("mem", stored_name, token, asked.elapsed());
                    return Some(Held {
                        participants: Arc::clone(self),
                        stored_name: stored_name.to_owned(),
                        place,
                        since: std::time::Instant::now(),
                    });
                }
                Status::Gone(Some(reason @ (LostReason::KeyDeleted | LostReason::SessionLost))) => {
                    // As etcd's waiter does when its key vanished (deleted, or with its
                    // lease): queue again, at the back, on the handle's lease now.
                    tracing::debug!(lock = %stored_name, %reason, "a waiter's lock key was deleted; queueing again");
                    pending.place = None;
                    local_guard = place.take_local();
                }
                Status::Gone(_) | Status::Queued => return None,
            }
        }
    }

    /// How many lock names the handle keeps a local mutex for.
    #[cfg(test)]
    pub(crate) fn names_in_use(&self) -> usize {
        locked(&self.local).len()
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
        match self.place.take() {
            Some(place) => self.participants.let_go(&place, &self.stored_name),
            None => self.participants.forget_if_unused(&self.stored_name),
        }
    }
}

/// A held lock: its key at the front of the store's queue, and its place at the front of the
/// handle's. Dropping it releases the lock, unless it was lost already.
#[derive(Debug)]
pub(crate) struct Held {
    participants: Arc<Participants>,
    stored_name: String,
    place: Arc<Place>,
    /// When the hold began, for `hmetcd_lock_hold_seconds`.
    since: std::time::Instant,
}

impl Held {
    /// The stored lock key.
    pub(crate) fn stored_key(&self) -> &str {
        self.place.key()
    }

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
        self.participants.let_go(&self.place, &self.stored_name);
        let token = self.place.revision();
        hmetcd_core::instrument::lock_ended("mem", &self.stored_name, token, self.since.elapsed());
    }
}
