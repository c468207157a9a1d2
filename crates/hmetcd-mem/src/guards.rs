//! Named locks in memory: a guard holds its participant's place at the front of the lock's
//! queues; the handle keeps track of its live guards so that `close()` and drop release them.
//! A guard loses its lock to `max_hold`, to `close()`, or when anyone deletes its lock key
//! (the store then tells its participant, see `store.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use hmetcd_core::{Candidacy, Error, LockRelease, LostReason, LostSignal, Result};
use tokio::task::AbortHandle;

use crate::faults::Session;
use crate::participants::Held;

/// The lock while a guard holds it; empty once released.
type Slot = Arc<Mutex<Option<Held>>>;

/// A live guard as the handle sees it: its lock, and the signal that tells it why it lost it.
struct Live {
    slot: Slot,
    lost: LostSignal,
}

/// The live guards of one handle.
#[derive(Default)]
pub(crate) struct Guards {
    live: Mutex<HashMap<u64, Live>>,
}

impl Guards {
    /// Releases every guard at once (the handle is closed or dropped): each guard's `lost()`
    /// resolves with `reason`.
    pub(crate) fn release_all(&self, reason: LostReason) {
        let live = std::mem::take(&mut *self.live.lock().unwrap_or_else(PoisonError::into_inner));
        for guard in live.into_values() {
            if let Some(held) = take(&guard.slot) {
                if held.is_held() {
                    guard.lost.fire(reason);
                    lost_the_lock(held.stored_key(), reason, held.fencing_token());
                }
                drop(held);
            }
        }
    }

    /// How many guards are live.
    #[cfg(test)]
    pub(crate) fn live_count(&self) -> usize {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn forget(&self, id: u64) {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
}

/// The `WARN` event of a lock lost (as the etcd backend's).
fn lost_the_lock(lock: &str, reason: LostReason, token: i64) {
    tracing::warn!(lock, %reason, token, "lost the lock");
}

fn take(slot: &Slot) -> Option<Held> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}

/// One guard's hold on its lock.
pub(crate) struct MemLockRelease {
    id: u64,
    /// The lock's (or election's) name, as the caller wrote it.
    name: String,
    slot: Slot,
    lost: LostSignal,
    guards: Weak<Guards>,
    /// The handle's session: while it is partitioned, `unlock`, `resign` and `proclaim` fail.
    session: Weak<Session>,
    expiry: Option<AbortHandle>,
}

impl MemLockRelease {
    /// Registers `held` with the guards of the handle's `session` and, with `max_hold`, starts
    /// the timer that releases it (on the current Tokio runtime; without one, `max_hold` is
    /// refused and the lock released).
    pub(crate) fn register(
        name: &str,
        session: &Arc<Session>,
        id: u64,
        held: Held,
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
        let guards = &session.guards;
        let lost = held.lost().clone();
        let slot: Slot = Arc::new(Mutex::new(Some(held)));
        guards
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                Live {
                    slot: Arc::clone(&slot),
                    lost: lost.clone(),
                },
            );
        let expiry = max_hold.zip(runtime).map(|(max_hold, runtime)| {
            let slot = Arc::clone(&slot);
            let guards = Arc::downgrade(guards);
            let lost = lost.clone();
            let name = name.to_owned();
            runtime
                .spawn(async move {
                    tokio::time::sleep(max_hold).await;
                    tracing::debug!(lock = %name, ?max_hold, "max_hold expired; releasing the lock");
                    if let Some(held) = take(&slot) {
                        let was_held = held.is_held();
                        let (key, token) = (held.stored_key().to_owned(), held.fencing_token());
                        // The key goes first, as on the etcd backend: once `lost()` resolves,
                        // `Compare::held` fails (on a partitioned handle the delete waits for
                        // the partition's end).
                        drop(held);
                        if was_held {
                            lost.fire(LostReason::MaxHold);
                            lost_the_lock(&key, LostReason::MaxHold, token);
                        }
                    }
                    release(id, &slot, &guards);
                })
                .abort_handle()
        });
        Ok(MemLockRelease {
            id,
            name: name.to_owned(),
            slot,
            lost,
            guards: Arc::downgrade(guards),
            session: Arc::downgrade(session),
            expiry,
        })
    }

    /// `Error::Unavailable` while the handle is partitioned (and not closed).
    fn cut_off(&self) -> Option<Error> {
        self.session.upgrade().and_then(|session| session.cut_off())
    }

    /// Releases the lock now (if still held) and stops the `max_hold` timer.
    pub(crate) fn release_now(self) {
        if let Some(expiry) = &self.expiry {
            expiry.abort();
        }
        release(self.id, &self.slot, &self.guards);
    }
}

fn release(id: u64, slot: &Slot, guards: &Weak<Guards>) {
    drop(take(slot));
    if let Some(guards) = guards.upgrade() {
        guards.forget(id);
    }
}

impl Candidacy for MemLockRelease {
    fn proclaim(&self, value: &str) -> BoxFuture<'static, Result<()>> {
        // As on etcd, where the proclaiming transaction cannot reach the server.
        if let Some(err) = self.cut_off() {
            return Box::pin(async move { Err(err) });
        }
        let proclaimed = self
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|held| held.proclaim(value));
        let outcome = if proclaimed {
            Ok(())
        } else {
            Err(Error::NotLeader {
                election: self.name.clone(),
                reason: match self.lost.reason() {
                    Some(reason) => reason.to_string(),
                    None => "the leadership ended".to_owned(),
                },
            })
        };
        Box::pin(async move { outcome })
    }
}

impl LockRelease for MemLockRelease {
    fn is_held(&self) -> bool {
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(Held::is_held)
    }

    fn lost(&self) -> BoxFuture<'static, LostReason> {
        self.lost.wait()
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        // A held lock's key cannot be deleted while the handle is cut off: the release fails,
        // and the key goes when the cut ends (as the etcd backend's delete, retried in the
        // background). A lost lock has nothing to delete.
        let refused = self.cut_off().filter(|_| self.is_held());
        self.release_now();
        Box::pin(async move { refused.map_or(Ok(()), Err) })
    }

    fn release_on_drop(self: Box<Self>) {
        self.release_now();
    }
}
