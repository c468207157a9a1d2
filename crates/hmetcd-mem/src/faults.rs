//! The handle's session (its lease, temp keys and link to the store) and [`Faults`], which
//! lets a test break it the way a real outage breaks an etcd client's.
//!
//! This mirrors the etcd backend's session (`hmetcd-etcd/src/session.rs`): a lost lease
//! deletes the handle's temp keys and lock keys in one revision (an etcd lease revoke), its
//! locks are lost (`SessionLost`), and the handle takes a new lease and puts back each temp
//! key that is still absent (one someone else wrote meanwhile is theirs). Its lock waiters then
//! queue again on the new lease.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hmetcd_core::keys::KeyPrefix;
use hmetcd_core::{Error, LostReason, Op, Result, Txn, TxnOutcome};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::guards::Guards;
use crate::participants::{Link, Participants};
use crate::store::{HandleId, Store};

/// The value of a `temp_key`, as in the Go package.
pub(crate) const TEMP_VALUE: &str = "1";

/// `status` bits: the handle was closed (or dropped).
const CLOSED: u8 = 1;
/// `status` bits: the handle is partitioned from its store.
const CUT: u8 = 2;

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A partition in progress.
#[derive(Debug)]
struct Partition {
    /// When it began: the handle's lease expires `lease_ttl` after that.
    since: Instant,
    /// The timer that expires the lease.
    expiry: Option<AbortHandle>,
    /// The lease expired during the partition; a new one is taken when it ends.
    lease_lost: bool,
}

/// What one handle owns in its store, shared with its [`Faults`] and its lease timer.
pub(crate) struct Session {
    pub(crate) store: Arc<Store>,
    /// How `Error::Unavailable` names the store.
    label: String,
    /// The owner of the handle's watchers.
    pub(crate) id: HandleId,
    lease_ttl: Duration,
    pub(crate) participants: Arc<Participants>,
    pub(crate) guards: Arc<Guards>,
    /// Stored keys of the handle's temp keys, with the values to put back after a lost lease.
    temp_keys: Mutex<BTreeMap<String, String>>,
    /// Whether `temp_keys` may have any; every plain write asks, most handles have none.
    has_temp_keys: AtomicBool,
    /// `CLOSED` and `CUT` bits: one load tells every call whether it may go on.
    status: AtomicU8,
    /// Serializes lease changes, partitions, closing and temp-key writes.
    partition: Mutex<Option<Partition>>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("store", &self.label)
            .field("lease", &format_args!("{:x}", self.participants.lease()))
            .field("status", &self.status.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(crate) fn new(store: Arc<Store>, store_name: Option<&str>, lease_ttl: Duration) -> Self {
        let id = store.next_id();
        // The first lease's id is the handle's; later leases get fresh ids from the store.
        let participants = Arc::new(Participants::new(Arc::clone(&store), id));
        Session {
            store,
            label: match store_name {
                Some(name) => format!("mem:{name}"),
                None => "mem (a private store)".to_owned(),
            },
            id,
            lease_ttl,
            participants,
            guards: Arc::default(),
            temp_keys: Mutex::new(BTreeMap::new()),
            has_temp_keys: AtomicBool::new(false),
            status: AtomicU8::new(0),
            partition: Mutex::new(None),
        }
    }

    /// `Ok` while the handle is open and reaches its store.
    #[inline]
    pub(crate) fn check(&self) -> Result<()> {
        match self.status.load(Ordering::Acquire) {
            0 => Ok(()),
            status => Err(self.refusal(status)),
        }
    }

    /// Why a call is refused: closed, or partitioned. Off the hot path.
    #[cold]
    fn refusal(&self, status: u8) -> Error {
        if status & CLOSED != 0 {
            Error::Closed
        } else {
            self.unavailable()
        }
    }

    /// `Error::Unavailable` while the handle is partitioned and not closed.
    pub(crate) fn cut_off(&self) -> Option<Error> {
        (self.status.load(Ordering::Acquire) == CUT).then(|| self.unavailable())
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.status.load(Ordering::Acquire) & CLOSED != 0
    }

    fn unavailable(&self) -> Error {
        Error::Unavailable {
            endpoints: self.label.clone(),
            reason: "the handle is partitioned from the store (Faults::partition)".to_owned(),
            source: None,
        }
    }

    /// `temp_key` and `store_temp`: puts `value` at `stored` on the lease and remembers both,
    /// to be put back if the lease is lost.
    pub(crate) fn put_temp_key(&self, stored: &str, value: &str) -> Result<()> {
        let _serial = locked(&self.partition);
        self.check()?;
        self.remember_temp_key(stored, value);
        self.store
            .put_on_lease(stored, value, self.participants.lease_cell());
        Ok(())
    }

    fn remember_temp_key(&self, stored: &str, value: &str) {
        locked(&self.temp_keys).insert(stored.to_owned(), value.to_owned());
        self.has_temp_keys.store(true, Ordering::Release);
    }

    /// A plain write or delete of `stored` by this handle: no longer a temp key (it is not
    /// put back after a lost lease), as on etcd. Without temp keys this takes no lock.
    #[inline]
    pub(crate) fn forget_temp_key(&self, stored: &str) {
        if self.has_temp_keys.load(Ordering::Acquire) {
            self.forget_remembered(stored);
        }
    }

    /// The slow half of `forget_temp_key`, for handles that have temp keys.
    #[cold]
    fn forget_remembered(&self, stored: &str) {
        locked(&self.temp_keys).remove(stored);
    }

    /// A `delete_prefix` of `stored` by this handle: the temp keys under it are forgotten.
    pub(crate) fn forget_temp_prefix(&self, stored: &str) {
        if self.has_temp_keys.load(Ordering::Acquire) {
            locked(&self.temp_keys).retain(|key, _| !key.starts_with(stored));
        }
    }

    /// Runs `txn` (keys under `prefix`) in the store. The temp keys its branch put
    /// (`Op::put_temp`, on the lease) are remembered like `store_temp`'s, the keys it wrote or
    /// deleted otherwise are forgotten; a transaction with temp puts runs serialized with
    /// lease changes, so its keys are never put on a lease that is already gone unremembered.
    pub(crate) fn txn(&self, txn: &Txn, prefix: &KeyPrefix) -> Result<TxnOutcome> {
        let temp = txn
            .then_ops()
            .iter()
            .chain(txn.else_ops())
            .any(|op| matches!(op, Op::PutTemp { .. }));
        let _serial = temp.then(|| locked(&self.partition));
        self.check()?;
        let outcome = self
            .store
            .txn(txn, prefix, self.participants.lease_cell())?;
        let ran = if outcome.succeeded {
            txn.then_ops()
        } else {
            txn.else_ops()
        };
        for op in ran {
            match op {
                Op::PutTemp { key, value } => self.remember_temp_key(&prefix.apply(key), value),
                Op::Put { key, .. } | Op::Delete { key } => {
                    self.forget_temp_key(&prefix.stored(key));
                }
                Op::DeletePrefix { prefix: deleted } => {
                    self.forget_temp_prefix(&prefix.stored(deleted));
                }
                _ => {}
            }
        }
        Ok(outcome)
    }

    /// Every key bound to the lease: temp keys and lock keys.
    fn lease_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = locked(&self.temp_keys).keys().cloned().collect();
        keys.extend(self.participants.keys());
        keys
    }

    /// The lease is lost: its keys go in one revision and its locks are lost (`SessionLost`).
    /// With `renew`, the handle takes a new lease in the same step.
    fn lose_lease(&self, renew: bool) {
        let lease = self.participants.lease();
        let next = renew.then(|| self.store.next_id());
        tracing::warn!(lease = %format_args!("{lease:x}"), "the lease is lost");
        hmetcd_core::instrument::lease_lost("mem");
        self.store.revoke(
            lease,
            &self.lease_keys(),
            LostReason::SessionLost,
            next.map(|next| (self.participants.lease_cell(), next)),
        );
        if renew {
            self.restore_temp_keys();
        }
    }

    /// Puts every temp key back on the (new) lease where it is absent; one someone else wrote
    /// since is theirs, and no longer a temp key of this handle.
    fn restore_temp_keys(&self) {
        let keys: Vec<(String, String)> = locked(&self.temp_keys)
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        let lease = self.participants.lease();
        let taken = self.store.restore(lease, &keys);
        let mut temp_keys = locked(&self.temp_keys);
        for key in taken {
            tracing::info!(key = %key, "a temp key was written by someone else while the lease was lost; it is theirs now");
            temp_keys.remove(&key);
        }
        tracing::info!(lease = %format_args!("{lease:x}"), restored = temp_keys.len(), "temp keys are back on a new lease");
    }

    /// [`Faults::expire_lease`].
    fn expire_lease(&self) {
        let mut partition = locked(&self.partition);
        if self.is_closed() {
            return;
        }
        match partition.as_mut() {
            // Cut off, the handle cannot take a new lease before the partition ends.
            Some(cut) => {
                if !cut.lease_lost {
                    cut.lease_lost = true;
                    self.lose_lease(false);
                }
            }
            None => self.lose_lease(true),
        }
    }

    /// [`Faults::partition`]`(true)`.
    fn cut(self: &Arc<Self>) {
        let mut partition = locked(&self.partition);
        if partition.is_some() || self.is_closed() {
            return;
        }
        self.status.fetch_or(CUT, Ordering::AcqRel);
        self.participants.set_link(Link::Cut);
        self.store.cut_watchers(self.id);
        let since = Instant::now();
        let expiry = match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let session = Arc::clone(self);
                let ttl = self.lease_ttl;
                Some(
                    runtime
                        .spawn(async move {
                            tokio::time::sleep_until(since + ttl).await;
                            session.expire_in_partition();
                        })
                        .abort_handle(),
                )
            }
            Err(_) => {
                tracing::warn!("Faults::partition outside a Tokio runtime: the lease will not expire during it");
                None
            }
        };
        *partition = Some(Partition {
            since,
            expiry,
            lease_lost: false,
        });
    }

    /// The partition has lasted `lease_ttl`: the store expires the lease. A handle closed or
    /// dropped meanwhile is gone for good then.
    fn expire_in_partition(&self) {
        let mut partition = locked(&self.partition);
        let Some(cut) = partition.as_mut() else {
            return;
        };
        tracing::debug!(lasted = ?cut.since.elapsed(), "the partition outlasted lease_ttl");
        if !cut.lease_lost {
            cut.lease_lost = true;
            self.lose_lease(false);
        }
        if self.is_closed() {
            *partition = None;
            self.participants.set_link(Link::Gone);
        }
    }

    /// [`Faults::partition`]`(false)`.
    fn heal(&self) {
        let mut partition = locked(&self.partition);
        // A handle closed while cut stays so; its lease expires on time, as on etcd.
        if self.is_closed() {
            return;
        }
        let Some(cut) = partition.take() else {
            return;
        };
        if let Some(expiry) = cut.expiry {
            expiry.abort();
        }
        // Missed events first (the deletes of a lost lease among them), then the restore.
        self.store.resume_watchers(self.id);
        if cut.lease_lost {
            let next = self.store.next_id();
            self.participants
                .lease_cell()
                .store(next, Ordering::Release);
            self.restore_temp_keys();
        }
        self.status.fetch_and(!CUT, Ordering::AcqRel);
        self.participants.set_link(Link::Up);
    }

    /// Closes the handle (`close()` and drop). Releases every lock and temp key at once; but a
    /// partitioned handle cannot tell the store: its keys stay until its lease expires, as an
    /// etcd client's do when it cannot revoke its lease. `false` then.
    pub(crate) fn close(&self, release_held: impl FnOnce()) -> bool {
        let partition = locked(&self.partition);
        self.status.fetch_or(CLOSED, Ordering::AcqRel);
        let reachable = partition.is_none();
        if reachable {
            let mut keys = std::mem::take(&mut *locked(&self.temp_keys))
                .into_keys()
                .collect::<Vec<_>>();
            keys.extend(self.participants.keys());
            // Gone first: a lock wait woken by the revoke must not queue again on the lease.
            self.participants.set_link(Link::Gone);
            // As when etcd revokes the lease: temp keys and lock keys go in one revision.
            self.store
                .revoke(self.participants.lease(), &keys, LostReason::Closed, None);
        }
        drop(partition);
        release_held();
        self.guards.release_all(LostReason::Closed);
        self.store.unwatch_owner(self.id);
        reachable
    }

    /// `Error::Unavailable` for a `close()` that could not reach the store.
    pub(crate) fn unreachable_close(&self) -> Error {
        self.unavailable()
    }
}

/// Faults to inject into one [`MemKvs`](crate::MemKvs) handle: what only a real outage causes
/// on etcd, on demand and in virtual time, so a service's failover code can have unit tests.
///
/// Get it with [`MemKvs::faults`](crate::MemKvs::faults); clones act on the same handle, and
/// they may outlive it (a fault on a closed or dropped handle does nothing). Each fault shows
/// what the etcd backend shows in the same situation, and the suite's `test_kit` tests cause
/// each on a real etcd too and check that a service sees the same on both:
///
/// - [`expire_lease`](Faults::expire_lease): the handle's lease expires now (on etcd:
///   keep-alives failed past `lease_ttl`, or the lease was revoked);
/// - [`partition`](Faults::partition): the handle cannot reach the store (a network cut);
///   longer than `lease_ttl`, the lease expires too;
/// - [`compact`](Faults::compact): the store forgets history (etcd's compaction), which a
///   watcher that was partitioned meanwhile may need.
///
/// All timing in the memory store runs on Tokio's clock (a partitioned handle's lease expiry,
/// `max_hold`, the timeouts of `dist_timed_lock` and `lock_with`; nothing else waits): under
/// `#[tokio::test(start_paused = true)]` a partition of minutes takes microseconds.
///
/// What a real etcd shows that this cannot (an error after `request_timeout` instead of at
/// once, a write that failed but was applied, a lease that expires up to a third of its TTL
/// early, restores in batches of 128 keys) is listed in the README's "Testing your service".
///
/// ```
/// use std::time::Duration;
/// use hmetcd_core::{Error, Kvi, LostReason};
/// use hmetcd_mem::MemKvs;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> hmetcd_core::Result<()> {
/// let a = MemKvs::open("faults-doc", "lease_ttl=30s")?;
/// let b = a.open_sibling("lease_ttl=30s")?;
/// let guard = a.lock("jobs").await?;
/// a.temp_key("workers/a").await?;
///
/// a.faults().expire_lease();
/// assert_eq!(guard.lost().await, LostReason::SessionLost);
/// assert!(!guard.is_held());
/// let taken = b.lock("jobs").await?; // the lock is free for others at once
/// assert!(taken.fencing_token() > guard.fencing_token());
/// assert_eq!(b.get("workers/a").await?.as_deref(), Some("1")); // back on a new lease
///
/// a.faults().partition(true);
/// assert!(matches!(a.get("workers/a").await, Err(Error::Unavailable { .. })));
/// tokio::time::sleep(Duration::from_secs(31)).await; // virtual time: instant
/// assert_eq!(b.get("workers/a").await?, None); // the lease expired meanwhile
/// a.faults().partition(false);
/// assert_eq!(b.get("workers/a").await?.as_deref(), Some("1")); // and is back
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Faults {
    session: Arc<Session>,
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faults")
            .field("session", &self.session)
            .finish()
    }
}

impl Faults {
    pub(crate) fn new(session: Arc<Session>) -> Self {
        Faults { session }
    }

    /// The handle's lease expires now, as on etcd when its keep-alives failed for longer than
    /// `lease_ttl` (or someone revoked it):
    ///
    /// 1. every temp key and lock key of the handle is deleted, in one revision and in key
    ///    order (watchers see one `Delete` per key, all with the same revision);
    /// 2. every lock the handle holds is lost: each guard's `lost()` resolves with
    ///    [`LostReason::SessionLost`], `is_held()` turns `false`, the next waiter (of any
    ///    handle) holds the lock, and the handle's next `dist_lock()` queues again;
    /// 3. the handle takes a new lease and puts back, in one revision, every temp key that is
    ///    still absent (watchers see a `Put` each); a key that someone else wrote meanwhile is
    ///    theirs and no longer a temp key of this handle;
    /// 4. the handle's lock waiters queue again, at the back, with keys on the new lease.
    ///
    /// On a partitioned handle, steps 1 and 2 happen now (the store expires the lease) and
    /// steps 3 and 4 when the partition ends, as on etcd, where the client can only take a new
    /// lease once it reaches the server again.
    pub fn expire_lease(&self) {
        self.session.expire_lease();
    }

    /// `partition(true)` cuts the handle off from its store; `partition(false)` ends the cut.
    /// Repeating either is a no-op.
    ///
    /// While cut:
    ///
    /// - every call of the handle fails with [`Error::Unavailable`](hmetcd_core::Error)
    ///   naming the store (on etcd: `Unavailable` or `Timeout` after `request_timeout`); a call
    ///   already waiting, such as a lock wait, keeps waiting, and learns of its turn only when
    ///   the cut ends; its timeout (`dist_timed_lock`, `lock_with`) still runs;
    /// - its watchers receive nothing; other handles go on;
    /// - a lock key it lets go of (unlock, a dropped guard, a given-up wait, `max_hold`) is
    ///   deleted only when the cut ends, as the etcd backend's retried deletes are:
    ///   `dist_unlock`, a guard's `unlock` and a leadership's `resign` fail with `Unavailable`
    ///   yet let go, and `proclaim` fails and writes nothing, as on etcd; `close()` (or
    ///   dropping the handle) closes it at once but leaves its keys to its lease, and fails
    ///   with `Unavailable`;
    /// - the handle keeps its locks and temp keys until its lease expires: `lease_ttl` after
    ///   the cut began, on Tokio's clock. The memory store counts the cut's first instant as
    ///   the last keep-alive; on etcd the lease expires `lease_ttl` after the last keep-alive
    ///   the server received, which is up to a third of `lease_ttl` (the renewal interval)
    ///   earlier. Then [`expire_lease`](Faults::expire_lease)'s steps 1 and 2 happen.
    ///
    /// When the cut ends, calls succeed again and each watcher gets every event it missed, in
    /// order, then live ones; if the lease expired, the handle takes a new one, puts its temp
    /// keys back and its waiters queue again (steps 3 and 4). A watcher whose missed history was
    /// compacted meanwhile ([`compact`](Faults::compact)) gets
    /// [`Error::Compacted`](hmetcd_core::Error) instead, as an etcd watch that reconnects behind
    /// a compaction does: a stream yields it as its last item, a callback watcher ends. A
    /// watcher keeps at most [`MISSED_EVENTS_LIMIT`](crate::MISSED_EVENTS_LIMIT) missed events;
    /// one more counts as compacted history, with the revision of the first event it could not
    /// keep as the compaction revision.
    ///
    /// The lease expiry needs a Tokio runtime: without one (called outside a runtime), the
    /// lease never expires during the cut.
    pub fn partition(&self, cut: bool) {
        if cut {
            self.session.cut();
        } else {
            self.session.heal();
        }
    }

    /// The store forgets history before `revision` (at most the store's current revision), as
    /// etcd's compaction does. Store-wide: it concerns every handle on the store. Compacting
    /// below the store's compaction revision does nothing.
    ///
    /// It compacts the same history the store keeps for
    /// [`watch_prefix_from`](hmetcd_core::Kvi::watch_prefix_from) (see
    /// [`MemKvs`](crate::MemKvs#history)), with etcd's meaning: afterwards a watch from
    /// `revision` itself still works, one from an earlier revision gets
    /// [`Error::Compacted`](hmetcd_core::Error) with `compact_revision == revision` as its
    /// stream's first and last item. A partitioned watcher whose next revision (the one after
    /// the last event it was delivered, or after the revision it was registered at) is before
    /// `revision` gets `Error::Compacted` when its partition ends.
    pub fn compact(&self, revision: i64) {
        self.session.store.compact(revision);
    }

    /// The store's current revision (the revision of its last write), for
    /// [`compact`](Faults::compact).
    pub fn revision(&self) -> i64 {
        self.session.store.revision()
    }
}
