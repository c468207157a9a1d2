//! Locks: the handle's lock (`dist_lock`) and named locks with a guard, both with the
//! algorithm of etcd's Go `concurrency.Mutex`, on the handle's lease.
//!
//! Each participant puts `<name>/<lease id in hex>` (with the handle's prefix in front) bound
//! to its lease, then waits until every lock key of `<name>` created before its own is
//! deleted. Waiters are therefore served in the order they queued, and Go services using
//! `concurrency.NewMutex(session, name)` on the same etcd take part in the same queue. Only
//! keys of exactly that form count: `<name>/config`, or the keys of a lock named `<name>/7`,
//! are not participants of `<name>`. (Go's Mutex waits on every key under `<name>/`: that
//! makes a Go waiter slower, never two holders.)
//!
//! A handle has one lease and so one waiter key per name: its own participants (the handle's
//! lock and every guard for that name) queue first on a fair local mutex per name, held for as
//! long as the lock is, and until its key is deleted. The handle's lock is the named lock
//! `lock_name`. So a participant takes its place in etcd's queue when it reaches the front of
//! its handle's local queue: among participants of different handles, first come first served
//! holds from that moment.
//!
//! A held lock is a [`Hold`], watched by a monitor task until it is released: the monitor
//! notices when the lock is lost (the lease's generation ended, the handle closed, `max_hold`
//! ran out, or someone deleted the lock key), fires the hold's [`LostSignal`] with the reason
//! and lets the name go. The fencing token of a hold is its key's create revision.
//!
//! Keys that must go away (released lock keys, the waiter keys of attempts that gave up or were
//! cancelled) are deleted in the background, retried until etcd confirms the delete or the
//! handle is shut down (closing revokes the lease, and the keys with it). Until then the
//! handle keeps the name's local mutex: it never queues again behind its own stale key.
//!
//! Every such delete compares the key's create revision: a delete we gave up on can still
//! reach etcd later (held by a paused member or a slow link), when the handle holds the same
//! key again (same lease, same name); it must find another incarnation and leave it alone.
//! What no compare can stop is a put of a waiter key that reaches etcd after its attempt was
//! given up: nobody of this handle waits under that key, yet it stands in everyone's way until
//! the lease ends (Go's Mutex has that flaw). So an attempt given up before its put was
//! answered leaves a sweeper: it watches the key for [`LATE_PUT_WINDOW`] (while the lease is
//! the session's), and deletes it whenever it is there while no participant of this handle
//! has the name. A participant of this handle that finds the key takes it as its own place.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};
use futures::future::BoxFuture;
use futures::StreamExt;
use hmetcd_core::keys::{check_key, is_lease_suffix};
use hmetcd_core::{
    Error, LockGuard, LockOptions, LockRelease, LostReason, LostSignal, Result, WatchEvent,
};
use tokio::sync::OwnedMutexGuard;
use tokio::task::AbortHandle;

use crate::error::{is_lease_not_found, revision_of, Request};
use crate::retry::{pause_unless_shut_down, shut_down, Backoff};
use crate::session::Phase;
use crate::watch::Target;
use crate::{lease_hex, Shared};

/// When a timed attempt gives up, and the timeout to report then.
type Deadline = Option<(Instant, Duration)>;

/// How many keys ahead of ours one read looks at for the next lock participant.
const AHEAD_PAGE: i64 = 16;

/// How long a waiter key whose put went unanswered is watched for the put arriving late.
const LATE_PUT_WINDOW: Duration = Duration::from_secs(600);

/// The locks as this handle sees them.
#[derive(Default)]
pub(crate) struct LockState {
    /// Serializes `dist_lock` callers: a second task of the handle waits for the first one's
    /// acquisition and then finds the lock held (the handle's lock is re-entrant).
    dist_callers: tokio::sync::Mutex<()>,
    /// The handle's lock, while held.
    held: Mutex<Option<Arc<Hold>>>,
    /// One fair mutex per lock name (as the caller wrote it), so that the handle never queues
    /// two waiter keys for one name. Entries nobody uses are removed.
    local: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Every lock the handle holds (its own and its guards'), so that `close()` releases them.
    holds: Mutex<HashMap<u64, Arc<Hold>>>,
    next_hold: AtomicU64,
    /// Waiter keys (stored form) whose put went unanswered, each watched by a sweeper until
    /// the time given.
    sweeping: Mutex<HashMap<String, Instant>>,
}

/// A lock key this handle owns in etcd and the name's local mutex, kept until the key is
/// deleted (or known gone).
struct HeldKey {
    /// The name as the caller wrote it (without the prefix).
    name: String,
    /// The stored lock key.
    key: String,
    /// The key's create revision: only that incarnation of the key is ours to delete. `None`
    /// when the put's answer never came (the incarnation there, if any, is ours then).
    revision: Option<i64>,
    /// Released only once the key is deleted, so that the handle's next participant for this
    /// name never finds the old key and takes it for its own place in the queue.
    _local: OwnedMutexGuard<()>,
}

/// One held lock: the handle's lock or a guard's.
pub(crate) struct Hold {
    /// When the lock was taken, for `hmetcd_lock_hold_seconds`.
    since: std::time::Instant,
    id: u64,
    /// The name as the caller wrote it.
    pub(crate) name: String,
    /// The lease the key is bound to, and its generation in the session.
    pub(crate) lease: i64,
    generation: u64,
    /// The key's create revision: the fencing token.
    pub(crate) revision: i64,
    /// The key's mod revision as of this hold's last write of it (a candidate's proclaim): the
    /// create revision until then.
    pub(crate) written: AtomicI64,
    /// The key while held; `None` once released or lost.
    key: Mutex<Option<HeldKey>>,
    pub(crate) lost: LostSignal,
    /// The monitor saw the key deleted (and is finding out by whom).
    key_gone: AtomicBool,
    /// The task that notices a loss.
    monitor: Mutex<Option<AbortHandle>>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Hold {
    /// The stored key, while held.
    pub(crate) fn stored_key(&self) -> Option<String> {
        locked(&self.key).as_ref().map(|held| held.key.clone())
    }

    /// Takes the key out (the lock is no longer held as far as this hold is concerned) and
    /// stops the monitor. `None` if it was already released or lost.
    fn take(&self) -> Option<HeldKey> {
        let key = locked(&self.key).take();
        if let Some(monitor) = locked(&self.monitor).take() {
            monitor.abort();
        }
        if key.is_some() {
            self.ended();
        }
        key
    }

    /// Whether the lock is surely still held: not released or lost, the handle neither closed
    /// nor dropped, and the
    /// lease of its generation confirmed recently enough that etcd cannot have expired it.
    fn is_held(&self, shared: &Shared) -> bool {
        locked(&self.key).is_some()
            && !self.key_gone.load(Ordering::SeqCst)
            && self.lost.reason().is_none()
            && !*shared.shutdown.borrow()
            && shared.session.holds(self.generation)
    }

    /// The lock was lost for `reason`: the hold lets go of its key. Returns it if it was still
    /// held (for the caller to delete where that is needed).
    fn lose(&self, reason: LostReason) -> Option<HeldKey> {
        let key = locked(&self.key).take()?;
        self.fire_lost(reason);
        Some(key)
    }

    /// Says the lock is lost, once its key is taken.
    fn fire_lost(&self, reason: LostReason) {
        self.lost.fire(reason);
        tracing::warn!(lock = %self.name, %reason, token = self.revision, held = ?self.since.elapsed(), "lost the lock");
        self.ended();
    }

    /// The hold ended (its key taken out, released or lost).
    fn ended(&self) {
        hmetcd_core::instrument::lock_ended(
            "etcd",
            &self.name,
            self.revision,
            self.since.elapsed(),
        );
    }
}

impl LockState {
    fn held(&self) -> MutexGuard<'_, Option<Arc<Hold>>> {
        locked(&self.held)
    }

    /// Forgets every lock of the handle without touching etcd (closing revokes the lease,
    /// which removes the keys); each hold's `lost()` says `Closed`.
    pub(crate) fn forget(&self) {
        self.held().take();
        let holds = std::mem::take(&mut *locked(&self.holds));
        for hold in holds.into_values() {
            if let Some(monitor) = locked(&hold.monitor).take() {
                monitor.abort();
            }
            drop(hold.lose(LostReason::Closed));
        }
    }

    fn forget_hold(&self, id: u64) {
        locked(&self.holds).remove(&id);
    }

    fn local_mutex(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(locked(&self.local).entry(name.to_owned()).or_default())
    }

    /// How many names have a local mutex now.
    #[cfg(feature = "pause-points")]
    pub(crate) fn local_names(&self) -> usize {
        locked(&self.local).len()
    }

    /// Drops the local mutex of `name` if nobody holds or waits for it.
    fn forget_local_if_unused(&self, name: &str) {
        let mut local = locked(&self.local);
        if local
            .get(name)
            .is_some_and(|mutex| Arc::strong_count(mutex) == 1)
        {
            local.remove(name);
        }
    }
}

/// How an attempt to queue and wait ended.
enum Attempt {
    /// Ours, with our key's create revision.
    Acquired(i64),
    /// Our waiter key vanished (deleted by someone, or with its lease): queue again.
    KeyLost,
    /// Our lease is gone: queue again on the next one.
    LeaseLost,
}

/// Runs `step`, giving up at `deadline` with `LockTimeout` naming `name`.
async fn by_deadline<T>(
    name: &str,
    deadline: Deadline,
    step: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match deadline {
        Some((at, timeout)) => tokio::time::timeout_at(at.into(), step)
            .await
            .unwrap_or_else(|_| Err(gave_up(name, timeout))),
        None => step.await,
    }
}

fn gave_up(name: &str, timeout: Duration) -> Error {
    Error::LockTimeout {
        lock: name.to_owned(),
        timeout,
    }
}

/// The deadline of an attempt that starts now and may take `timeout`; a timeout too far ahead
/// to represent is no timeout at all.
pub(crate) fn deadline_after(timeout: Option<Duration>) -> Deadline {
    timeout.and_then(|timeout| Instant::now().checked_add(timeout).map(|at| (at, timeout)))
}

impl Shared {
    fn lock_name(&self) -> &str {
        &self.options.lock_name
    }

    /// `dist_lock` (no deadline) and `dist_timed_lock`.
    pub(crate) async fn acquire_lock(self: &Arc<Self>, deadline: Deadline) -> Result<()> {
        let name = self.lock_name();
        let _one_caller_at_a_time = by_deadline(name, deadline, async {
            Ok(self.lock.dist_callers.lock().await)
        })
        .await?;
        let held = self.lock.held().clone();
        if let Some(hold) = held {
            // "Holds" means holds now: the lease is surely alive and the lock key still there.
            let key = locked(&hold.key).as_ref().map(|held| held.key.clone());
            if let Some(key) = key {
                if hold.is_held(self)
                    && self
                        .create_revision(&key, Request::new("lock", name))
                        .await?
                        == Some(hold.revision)
                {
                    return Ok(());
                }
            }
            tracing::warn!(lock = name, "the lock was lost; queueing again");
            self.lock.held().take();
            self.lock.forget_hold(hold.id);
            if let Some(held) = hold.lose(LostReason::SessionLost) {
                self.drop_held(held);
            }
        }
        let hold = self.acquire_key(name, "", deadline, None).await?;
        *self.lock.held() = Some(hold);
        Ok(())
    }

    /// `dist_unlock`: deletes the lock key if this handle holds the lock.
    pub(crate) async fn release_lock(self: &Arc<Self>) -> Result<()> {
        let Some(hold) = self.lock.held().take() else {
            return Ok(());
        };
        self.lock.forget_hold(hold.id);
        match hold.take() {
            Some(held) => self.delete_released(held).await,
            None => Ok(()),
        }
    }

    /// Deletes a released lock's key; if that fails, reports it and goes on trying in the
    /// background, as for a dropped guard.
    async fn delete_released(self: &Arc<Self>, held: HeldKey) -> Result<()> {
        if self.is_closed() {
            // Closing revoked the lease, and the key with it.
            self.drop_held(held);
            return Ok(());
        }
        match self.delete_held(&held).await {
            Ok(()) => {
                self.drop_held(held);
                Ok(())
            }
            Err(err) => {
                spawn_delete(Arc::clone(self), held);
                Err(err)
            }
        }
    }

    /// `lock` and `lock_with`: a guard for the named lock `name`.
    pub(crate) async fn lock_named(
        self: &Arc<Self>,
        name: &str,
        options: LockOptions,
    ) -> Result<LockGuard> {
        let release = self.take_named(name, "", options).await?;
        let fencing_token = release.hold.revision;
        let key = format!("{name}/{}", crate::lease_hex(release.hold.lease));
        Ok(LockGuard::from_backend(
            name,
            key,
            fencing_token,
            Box::new(release),
        ))
    }

    /// A named lock (or election candidacy) with `value` on its key, as `options` say.
    pub(crate) async fn take_named(
        self: &Arc<Self>,
        name: &str,
        value: &str,
        options: LockOptions,
    ) -> Result<EtcdLockRelease> {
        self.ensure_open()?;
        check_key("name", name)?;
        let deadline = deadline_after(options.get_timeout());
        if let Some(max_hold) = options.get_max_hold() {
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(Error::NotSupported {
                    what: format!("max_hold ({max_hold:?}) on {name:?}"),
                    reason: "the timer needs a Tokio runtime; call from within one".to_owned(),
                });
            }
        }
        let hold = self
            .acquire_key(name, value, deadline, options.get_max_hold())
            .await?;
        Ok(EtcdLockRelease {
            shared: Arc::clone(self),
            hold,
        })
    }

    /// Takes the lock `name` for one of the handle's participants: first the name's local
    /// mutex, then a place in etcd's queue. Gives up at `deadline` without a trace. The hold
    /// is watched from then on, and released after `max_hold` if given.
    pub(crate) async fn acquire_key(
        self: &Arc<Self>,
        name: &str,
        value: &str,
        deadline: Deadline,
        max_hold: Option<Duration>,
    ) -> Result<Arc<Hold>> {
        let asked = std::time::Instant::now();
        let local = self.lock.local_mutex(name);
        let mut shutdown = self.shutdown.subscribe();
        let taken = by_deadline(name, deadline, async {
            tokio::select! {
                guard = local.lock_owned() => Ok(guard),
                () = shut_down(&mut shutdown) => Err(Error::Closed),
            }
        })
        .await;
        let acquired = match taken {
            Ok(local) => {
                self.queue_until_acquired(name, value, local, deadline)
                    .await
            }
            Err(err) => Err(err),
        };
        let (held, lease, generation, revision) = match acquired {
            Ok(acquired) => acquired,
            Err(err) => {
                self.lock.forget_local_if_unused(name);
                return Err(err);
            }
        };
        hmetcd_core::instrument::lock_taken("etcd", name, revision, asked.elapsed());
        let hold = Arc::new(Hold {
            since: std::time::Instant::now(),
            id: self.lock.next_hold.fetch_add(1, Ordering::Relaxed),
            name: name.to_owned(),
            lease,
            generation,
            revision,
            written: AtomicI64::new(revision),
            key: Mutex::new(Some(held)),
            lost: LostSignal::new(),
            key_gone: AtomicBool::new(false),
            monitor: Mutex::new(None),
        });
        locked(&self.lock.holds).insert(hold.id, Arc::clone(&hold));
        // A close that raced with this call may have missed the new hold.
        if self.is_closed() {
            self.lock.forget_hold(hold.id);
            if let Some(held) = hold.take() {
                self.drop_held(held);
            }
            return Err(Error::Closed);
        }
        let monitor = tokio::spawn(monitor(Arc::clone(self), Arc::clone(&hold), max_hold));
        *locked(&hold.monitor) = Some(monitor.abort_handle());
        // The monitor may have finished already (a loss at once): then it stays stopped.
        if locked(&hold.key).is_none() {
            monitor.abort();
        }
        Ok(hold)
    }

    /// Queues under the current lease until the lock is ours. Returns our key, its lease,
    /// generation and create revision.
    async fn queue_until_acquired(
        self: &Arc<Self>,
        name: &str,
        value: &str,
        local: OwnedMutexGuard<()>,
        deadline: Deadline,
    ) -> Result<(HeldKey, i64, u64, i64)> {
        let dir = format!("{}/", self.prefix.apply(name));
        let request = Request::new("lock", name);
        let mut waiter = WaiterKey {
            shared: Arc::clone(self),
            name: name.to_owned(),
            key: None,
            generation: 0,
            placed: AtomicI64::new(0),
            unanswered: None,
            local: Some(local),
        };
        let mut not = None;
        loop {
            let timeout = self.options.request_timeout;
            let (lease, generation) = by_deadline(
                name,
                deadline,
                self.session.live_lease(not, timeout, request),
            )
            .await?;
            let key = format!("{dir}{}", lease_hex(lease));
            waiter.key = Some(key.clone());
            waiter.generation = generation;
            // A lease lost while we wait takes our key with it: queue again on the next one.
            let attempt = async {
                let attempt = tokio::select! {
                    attempt = self.queue_and_wait(&dir, &key, value, lease, &waiter.placed, request) => attempt,
                    _ = session_ended(self, generation) => Ok(Attempt::LeaseLost),
                };
                // Ours, but handed over only while the lease surely stays valid a while: a
                // lease whose renewal is overdue is about to be counted lost and revoked.
                match attempt {
                    Ok(Attempt::Acquired(revision)) => {
                        if self.session.ready_to_grant(generation).await {
                            Ok(Attempt::Acquired(revision))
                        } else {
                            Ok(Attempt::LeaseLost)
                        }
                    }
                    other => other,
                }
            };
            match by_deadline(name, deadline, attempt).await {
                Ok(Attempt::Acquired(revision)) => {
                    let held = waiter
                        .take_held(key, revision)
                        .ok_or_else(|| Error::Backend {
                            operation: request.to_string(),
                            reason: "the handle's queue place for the lock was handed on twice"
                                .to_owned(),
                            source: None,
                        })?;
                    return Ok((held, lease, generation, revision));
                }
                Ok(lost @ (Attempt::KeyLost | Attempt::LeaseLost)) => {
                    // The key is gone, or goes with its lease: nothing to delete.
                    waiter.forget_key();
                    not = matches!(lost, Attempt::LeaseLost).then_some(lease);
                    if let Some((at, timeout)) = deadline {
                        if Instant::now() >= at {
                            return Err(gave_up(name, timeout));
                        }
                    }
                }
                Err(err) => {
                    // A given-up attempt leaves no trace: our waiter key goes before we return
                    // (or, if etcd does not answer now, as soon as it does).
                    waiter.remove_now().await;
                    return Err(err);
                }
            }
        }
    }

    /// Deletes a lock key of ours (the next waiter gets the lock), but only the incarnation
    /// created at `revision`. A delete we gave up on may still reach etcd later (held by a
    /// paused member or a slow link) when this handle holds the same key again (same lease,
    /// same name): it must not delete that later hold. Without a known revision (the put's
    /// answer never came), the incarnation there now is ours: it is read, then deleted.
    async fn delete_lock_key(&self, name: &str, key: &str, revision: Option<i64>) -> Result<()> {
        self.delete_incarnation(key, revision, Request::new("unlock", name))
            .await
            .map(|_| ())
    }

    /// Deletes lock `key` if it is the incarnation created at `revision`; without one, the
    /// incarnation there now, read first. Returns the revision etcd answered at last, and the
    /// create revision of the incarnation deleted (`None`: nothing was there). Not deleted
    /// although asked means that incarnation is gone already.
    async fn delete_incarnation(
        &self,
        key: &str,
        revision: Option<i64>,
        request: Request<'_>,
    ) -> Result<(i64, Option<i64>)> {
        let created = match revision {
            Some(revision) => revision,
            None => {
                let found = self
                    .kv_request(request, async |kv| kv.get(key, None).await)
                    .await?;
                let read_at = revision_of(found.header(), request)?;
                match found.kvs().first() {
                    Some(kv) => kv.create_revision(),
                    None => return Ok((read_at, None)),
                }
            }
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, created)])
            .and_then([TxnOp::delete(key, None)]);
        let deleted = self
            .kv_request(request, async |kv| kv.txn(txn).await)
            .await?;
        Ok((revision_of(deleted.header(), request)?, Some(created)))
    }

    async fn delete_held(&self, held: &HeldKey) -> Result<()> {
        self.delete_lock_key(&held.name, &held.key, held.revision)
            .await
    }

    /// Deletes a lock key, retrying until it is gone or the handle is shut down (then the key
    /// goes with the lease). The name's local mutex is released only after that.
    async fn delete_lock_key_until_done(&self, held: HeldKey) {
        let mut backoff = Backoff::new();
        let mut shutdown = self.shutdown.subscribe();
        while !self.is_closed() {
            match self.delete_held(&held).await {
                Ok(()) => break,
                Err(err) => {
                    tracing::warn!(error = %err, lock = %held.name, "could not delete a lock key yet; retrying");
                    if !pause_unless_shut_down(backoff.next_pause(), &mut shutdown).await {
                        break;
                    }
                }
            }
        }
        self.drop_held(held);
    }

    fn drop_held(&self, held: HeldKey) {
        let name = held.name.clone();
        drop(held);
        self.lock.forget_local_if_unused(&name);
    }

    /// Puts our waiter key (if not there yet), records its create revision in `placed`, and
    /// waits until every key queued before it is gone.
    async fn queue_and_wait(
        &self,
        dir: &str,
        key: &str,
        value: &str,
        lease: i64,
        placed: &AtomicI64,
        request: Request<'_>,
    ) -> Result<Attempt> {
        let put = TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)));
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([put.clone()])
            .or_else([TxnOp::get(key, None)]);
        let queued = match self
            .kv_bounded(request, async |kv| kv.txn(txn).await)
            .await?
        {
            Ok(queued) => queued,
            Err(err) if is_lease_not_found(&err) => {
                self.session.report_lost(lease);
                return Ok(Attempt::LeaseLost);
            }
            Err(err) => return Err(self.errors.map(request, err)),
        };
        let my_revision = if queued.succeeded() {
            revision_of(queued.header(), request)?
        } else {
            // The key is already there: a participant of this handle on the same lease let go
            // of it without deleting it (it counted the lock as lost), or its put arrived
            // late, or someone else wrote it. Its place in the queue stands, as in Go's Mutex;
            // nobody held the lock in between.
            let found = queued
                .op_responses()
                .into_iter()
                .find_map(|read| match read {
                    TxnOpResponse::Get(read) => read.kvs().first().map(|kv| {
                        let ours = kv.value() == value.as_bytes() && kv.lease() == lease;
                        (kv.create_revision(), ours)
                    }),
                    _ => None,
                });
            match found {
                // A candidate's value is its own, as Go's Campaign proclaims it; and a key
                // someone else wrote (with no lease) must go when this handle does.
                Some((revision, false)) => {
                    let txn = Txn::new()
                        .when([Compare::create_revision(key, CompareOp::Equal, revision)])
                        .and_then([put]);
                    let updated = self
                        .kv_request(request, async |kv| kv.txn(txn).await)
                        .await?;
                    if !updated.succeeded() {
                        return Ok(Attempt::KeyLost);
                    }
                    revision
                }
                Some((revision, true)) => revision,
                None => return Ok(Attempt::KeyLost),
            }
        };
        placed.store(my_revision, Ordering::SeqCst);
        self.wait_for_predecessors(dir, key, my_revision, request)
            .await
    }

    async fn create_revision(&self, key: &str, request: Request<'_>) -> Result<Option<i64>> {
        let answer = self
            .kv_request(request, async |kv| kv.get(key, None).await)
            .await?;
        Ok(answer.kvs().first().map(|found| found.create_revision()))
    }

    /// The lock key of `dir` created last before `below` (inclusive), if any: the participant
    /// just ahead of us. Only keys `<dir><lease hex>` count. Also the create revision of our
    /// own `key` and the revision everything was read at.
    ///
    /// Plain range requests only, never a read-only transaction: a lock wait that is given up
    /// cancels its request, and etcd 3.5.0 to 3.5.4 crash when a read-only transaction is
    /// cancelled in flight (see [`crate::server_version`]). Our own key is read first; the
    /// pages are read at its revision, so all of it is one snapshot, as one transaction would
    /// give.
    async fn key_ahead(
        &self,
        dir: &str,
        key: &str,
        below: i64,
        request: Request<'_>,
    ) -> Result<(Option<Vec<u8>>, Option<i64>, i64)> {
        // A compaction up to the revision just read makes the pages unreadable at it: read
        // again from our own key, a few times at most.
        let mut tries = 0;
        loop {
            match self.key_ahead_once(dir, key, below, request).await {
                Err(Error::Compacted { .. }) if tries < 3 => tries += 1,
                outcome => return outcome,
            }
        }
    }

    async fn key_ahead_once(
        &self,
        dir: &str,
        key: &str,
        below: i64,
        request: Request<'_>,
    ) -> Result<(Option<Vec<u8>>, Option<i64>, i64)> {
        let own = self
            .kv_request(request, async |kv| kv.get(key, None).await)
            .await?;
        let revision = revision_of(own.header(), request)?;
        let mine = own.kvs().first().map(|found| found.create_revision());
        // Pages go by create revision, down from `below` (inclusive: keys created by one
        // transaction share a revision and may straddle pages).
        let mut below = below;
        let mut limit = AHEAD_PAGE;
        loop {
            let ahead = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_max_create_revision(below)
                .with_limit(limit)
                .with_keys_only()
                .with_revision(revision);
            let page = self
                .kv_request(request, async |kv| kv.get(dir, Some(ahead)).await)
                .await?;
            let participant = page.kvs().iter().find(|found| {
                found
                    .key()
                    .strip_prefix(dir.as_bytes())
                    .is_some_and(is_lease_suffix)
            });
            if let Some(found) = participant {
                return Ok((Some(found.key().to_vec()), mine, revision));
            }
            match page.kvs().last() {
                // A whole page of one revision: read more of it at once.
                Some(last) if page.more() && last.create_revision() == below => {
                    limit = limit.saturating_mul(2);
                }
                Some(last) if page.more() => {
                    below = last.create_revision();
                    limit = AHEAD_PAGE;
                }
                _ => return Ok((None, mine, revision)),
            }
        }
    }

    /// Go's `waitDeletes`: until no lock key of `dir` was created before `my_revision`, watch
    /// the newest such key (the one just ahead of us) until it is deleted. Each look also reads
    /// our own key: if it vanished (the lease expired while we waited), the attempt must queue
    /// again. Outages while waiting are ridden out: the wait itself has no time limit.
    async fn wait_for_predecessors(
        &self,
        dir: &str,
        key: &str,
        my_revision: i64,
        request: Request<'_>,
    ) -> Result<Attempt> {
        let mut backoff = Backoff::new();
        let mut shutdown = self.shutdown.subscribe();
        loop {
            if self.is_closed() {
                return Err(Error::Closed);
            }
            let (ahead, mine, revision) = match self
                .key_ahead(dir, key, my_revision - 1, request)
                .await
            {
                Ok(found) => found,
                Err(err) if err.is_transient() => {
                    tracing::debug!(error = %err, "waiting for the lock: etcd unreachable; retrying");
                    if !pause_unless_shut_down(backoff.next_pause(), &mut shutdown).await {
                        return Err(Error::Closed);
                    }
                    continue;
                }
                Err(err) => return Err(err),
            };
            if mine != Some(my_revision) {
                return Ok(Attempt::KeyLost);
            }
            let Some(ahead) = ahead else {
                return Ok(Attempt::Acquired(my_revision));
            };
            tracing::debug!(lock = request.key, token = my_revision, ahead = %String::from_utf8_lossy(&ahead), "waiting for the lock: the key ahead goes first");
            if self
                .wait_deleted(&ahead, revision + 1, request, &mut shutdown)
                .await?
            {
                backoff.reset();
            } else if !pause_unless_shut_down(backoff.next_pause(), &mut shutdown).await {
                return Err(Error::Closed);
            }
        }
    }

    /// Watches the stored `key` from `revision` until it is deleted (`true`), or the watch
    /// breaks (`false`: look again).
    async fn wait_deleted(
        &self,
        key: &[u8],
        revision: i64,
        request: Request<'_>,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<bool> {
        let Some(target) = self.stored_target(key) else {
            return Ok(false);
        };
        // The key existed at the revision before `revision`: it was read there.
        let mut stream = match self.watch_from(target, revision, true).await {
            Ok(stream) => stream,
            Err(err) => {
                tracing::debug!(error = %err, lock = request.key, "waiting for the lock: cannot watch the key ahead");
                return Ok(false);
            }
        };
        loop {
            let event = tokio::select! {
                () = shut_down(shutdown) => return Err(Error::Closed),
                event = stream.next() => event,
            };
            match event {
                Some(Ok(WatchEvent::Delete { .. })) => return Ok(true),
                Some(Ok(WatchEvent::Put { .. })) => {}
                Some(Err(_)) | None => return Ok(false),
            }
        }
    }

    /// A watch target for a stored lock key (lock keys are under the prefix by construction).
    fn stored_target(&self, key: &[u8]) -> Option<Target> {
        let key = std::str::from_utf8(key).ok()?;
        let shown = self.prefix.strip(key)?;
        Some(Target::key(shown, &self.prefix))
    }

    /// Why the lock key of `hold` was deleted: with its lease (the session is lost), or by
    /// someone else.
    async fn why_deleted(&self, hold: &Hold) -> LostReason {
        let mut leases = self.client.lease_client();
        let asked = self
            .request(
                Request::keyless("lease time-to-live"),
                leases.time_to_live(hold.lease, None),
            )
            .await;
        match asked {
            Ok(answer) if answer.ttl() > 0 => LostReason::KeyDeleted,
            Ok(_) => {
                self.session.report_lost(hold.lease);
                LostReason::SessionLost
            }
            Err(err) => {
                tracing::debug!(error = %err, lock = %hold.name, "cannot ask about the lease of a deleted lock key");
                if self.session.holds(hold.generation) {
                    LostReason::KeyDeleted
                } else {
                    LostReason::SessionLost
                }
            }
        }
    }
}

/// Watches one hold until the lock is lost, then fires its signal and lets the name go.
/// Aborted when the hold is released by its holder.
async fn monitor(shared: Arc<Shared>, hold: Arc<Hold>, max_hold: Option<Duration>) {
    let reason = tokio::select! {
        reason = session_ended(&shared, hold.generation) => reason,
        reason = key_deleted(&shared, &hold) => reason,
        () = sleep_or_forever(max_hold) => LostReason::MaxHold,
    };
    shared.lock.forget_hold(hold.id);
    {
        let mut held = shared.lock.held();
        if held.as_ref().is_some_and(|own| own.id == hold.id) {
            held.take();
        }
    }
    if reason == LostReason::MaxHold {
        // The key goes before `lost()` says so (one attempt, bounded by request_timeout): a
        // holder told `MaxHold` can no longer write through `Compare::held`/`leading`. Nobody
        // may abort this task from here on (a release finds the key taken and leaves it to us).
        locked(&hold.monitor).take();
        let Some(held) = locked(&hold.key).take() else {
            return;
        };
        tracing::debug!(lock = %hold.name, ?max_hold, "max_hold expired; releasing the lock");
        let deleted = shared.delete_held(&held).await;
        hold.fire_lost(reason);
        match deleted {
            Ok(()) => shared.drop_held(held),
            Err(_) => shared.delete_lock_key_until_done(held).await,
        }
        return;
    }
    // Gone with its lease, deleted by someone else, or going with the lease at close.
    if let Some(held) = hold.lose(reason) {
        shared.drop_held(held);
    }
}

async fn sleep_or_forever(duration: Option<Duration>) {
    match duration {
        Some(duration) => tokio::time::sleep(duration).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the session generation a lock was taken under ends.
async fn session_ended(shared: &Shared, generation: u64) -> LostReason {
    let mut states = shared.session.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    let ended = states.wait_for(|state| {
        state.generation != generation || !matches!(state.phase, Phase::Live | Phase::Restoring)
    });
    tokio::select! {
        () = shut_down(&mut shutdown) => LostReason::Closed,
        ended = ended => match ended {
            Ok(state) if state.phase == Phase::Closed => LostReason::Closed,
            Ok(_) => LostReason::SessionLost,
            Err(_) => LostReason::Closed,
        },
    }
}

/// Resolves when the hold's key is deleted, with whose doing that was.
async fn key_deleted(shared: &Shared, hold: &Hold) -> LostReason {
    let Some(key) = locked(&hold.key).as_ref().map(|held| held.key.clone()) else {
        return std::future::pending().await;
    };
    let request = Request::new("watch lock", &hold.name);
    let mut shutdown = shared.shutdown.subscribe();
    let mut backoff = Backoff::new();
    let mut from = hold.revision + 1;
    loop {
        if matches!(
            shared
                .wait_deleted(key.as_bytes(), from, request, &mut shutdown)
                .await,
            Ok(true)
        ) {
            // Not held from this moment: the next waiter may have the lock already.
            hold.key_gone.store(true, Ordering::SeqCst);
            return shared.why_deleted(hold).await;
        }
        // The watch broke: look whether the key is still ours, then watch again from there.
        let read = shared
            .kv_request(request, async |kv| kv.get(key.as_str(), None).await)
            .await;
        match read {
            Ok(answer) => {
                let ours = answer
                    .kvs()
                    .first()
                    .is_some_and(|found| found.create_revision() == hold.revision);
                if !ours {
                    hold.key_gone.store(true, Ordering::SeqCst);
                    return shared.why_deleted(hold).await;
                }
                // Still ours at this revision: only a later event counts (the one the broken
                // watch was at may have been compacted away since).
                if let Some(header) = answer.header() {
                    from = from.max(header.revision() + 1);
                }
            }
            Err(err) => {
                tracing::debug!(error = %err, lock = %hold.name, "cannot check the lock key; retrying");
            }
        }
        if !pause_unless_shut_down(backoff.next_pause(), &mut shutdown).await {
            return std::future::pending().await;
        }
    }
}

/// The etcd side of a [`LockGuard`] (and of a `Leadership`, see `election.rs`).
pub(crate) struct EtcdLockRelease {
    pub(crate) shared: Arc<Shared>,
    pub(crate) hold: Arc<Hold>,
}

impl LockRelease for EtcdLockRelease {
    fn is_held(&self) -> bool {
        self.hold.is_held(&self.shared)
    }

    fn lost(&self) -> BoxFuture<'static, LostReason> {
        self.hold.lost.wait()
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        self.shared.lock.forget_hold(self.hold.id);
        let held = self.hold.take();
        let shared = self.shared;
        Box::pin(async move {
            match held {
                Some(held) => shared.delete_released(held).await,
                None => Ok(()),
            }
        })
    }

    fn release_on_drop(self: Box<Self>) {
        self.shared.lock.forget_hold(self.hold.id);
        if let Some(held) = self.hold.take() {
            spawn_delete(self.shared, held);
        }
    }
}

/// Deletes the key of `held` in the background on the current Tokio runtime. Without one,
/// the key stays until the handle's lease ends, and the name stays taken in this handle
/// until then.
fn spawn_delete(shared: Arc<Shared>, held: HeldKey) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move { shared.delete_lock_key_until_done(held).await });
        }
        Err(_) => {
            tracing::debug!(lock = %held.name, "lock released outside a Tokio runtime; its key goes with the lease");
            shared.drop_held(held);
        }
    }
}

/// Starts (or extends) the sweeper of a waiter key whose put went unanswered, on the current
/// Tokio runtime; without one, a late put stands until the lease ends.
fn spawn_sweeper(shared: Arc<Shared>, name: String, key: String, generation: u64) {
    let until = Instant::now() + LATE_PUT_WINDOW;
    if locked(&shared.lock.sweeping)
        .insert(key.clone(), until)
        .is_some()
    {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move { shared.sweep_late_puts(name, key, generation).await });
        }
        Err(_) => {
            locked(&shared.lock.sweeping).remove(&key);
        }
    }
}

impl Shared {
    /// The sweeper of a waiter key whose put went unanswered: the put may reach etcd any time
    /// later (held by a paused member or a slow link), when no participant of this handle
    /// waits under the key. Whenever the key is there while nobody of this handle has the name
    /// (the sweeper holds the name's local mutex to know), it is such a put, and is deleted.
    /// Ends once the window has passed, the lease is no longer the session's (a put on it
    /// fails, or its key goes with it) or the handle shuts down.
    async fn sweep_late_puts(self: Arc<Self>, name: String, key: String, generation: u64) {
        // Ends the sweep once the window, extended by every later put that went unanswered,
        // has passed; the entry goes in the same step, so that a later put starts a new one.
        let window_ended = async {
            loop {
                let until = {
                    let mut sweeping = locked(&self.lock.sweeping);
                    match sweeping.get(&key) {
                        Some(&until) if Instant::now() < until => until,
                        _ => {
                            sweeping.remove(&key);
                            return;
                        }
                    }
                };
                tokio::time::sleep_until(until.into()).await;
            }
        };
        tokio::select! {
            () = window_ended => {}
            () = self.sweep(&name, &key) => {
                locked(&self.lock.sweeping).remove(&key);
            }
            // The key's lease is gone, or goes: no put on it can stand.
            _ = session_ended(&self, generation) => {
                locked(&self.lock.sweeping).remove(&key);
            }
        }
    }

    async fn sweep(&self, name: &str, key: &str) {
        let Some(target) = self.stored_target(key.as_bytes()) else {
            return;
        };
        let request = Request::new("lock", name);
        let mut shutdown = self.shutdown.subscribe();
        let mut backoff = Backoff::new();
        loop {
            let local = self.lock.local_mutex(name);
            let looked = {
                let _nobody_else = local.lock().await;
                self.delete_late_put(key, request).await
            };
            drop(local);
            self.lock.forget_local_if_unused(name);
            let watched = match looked {
                Ok(revision) => self.watch_from(target.clone(), revision + 1, false).await,
                Err(err) => Err(err),
            };
            // Until the key is put: look again then. If the watch breaks, look again too, after
            // a pause.
            let put = match watched {
                Ok(mut stream) => loop {
                    match stream.next().await {
                        Some(Ok(WatchEvent::Put { .. })) => break true,
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break false,
                    }
                },
                Err(err) => {
                    tracing::debug!(error = %err, lock = name, "cannot watch for a late waiter key put; retrying");
                    false
                }
            };
            if put {
                backoff.reset();
            } else if !pause_unless_shut_down(backoff.next_pause(), &mut shutdown).await {
                return;
            }
        }
    }

    /// Deletes our waiter `key` if it is there (nobody of this handle has the name: it is a
    /// put that arrived late). Returns the revision the key was looked at.
    async fn delete_late_put(&self, key: &str, request: Request<'_>) -> Result<i64> {
        let (revision, deleted) = self.delete_incarnation(key, None, request).await?;
        if let Some(created) = deleted {
            tracing::warn!(
                lock = request.key,
                token = created,
                "a waiter key put reached etcd after its attempt was given up; deleted it"
            );
        }
        Ok(revision)
    }
}

/// Our place while we queue: the name's local mutex, and our waiter key once put. An
/// abandoned attempt (an error, a timeout, a dropped future) retires the key: it is deleted,
/// now or in the background once etcd answers, and only then is the local mutex released.
struct WaiterKey {
    shared: Arc<Shared>,
    name: String,
    key: Option<String>,
    /// The session generation of the key's lease.
    generation: u64,
    /// The key's create revision once known, 0 before.
    placed: AtomicI64,
    /// A key retired before its put was answered, and its generation: to be swept.
    unanswered: Option<(String, u64)>,
    local: Option<OwnedMutexGuard<()>>,
}

impl WaiterKey {
    /// The lock is ours: the key and the local mutex now belong to the hold. `None` only if the
    /// local mutex was already handed on, which `queue_until_acquired` never does.
    fn take_held(&mut self, key: String, revision: i64) -> Option<HeldKey> {
        self.forget_key();
        let local = self.local.take()?;
        Some(HeldKey {
            name: self.name.clone(),
            key,
            revision: Some(revision),
            _local: local,
        })
    }

    /// The key is no longer ours to delete: gone, or handed on.
    fn forget_key(&mut self) {
        self.key = None;
        self.placed.store(0, Ordering::SeqCst);
    }

    /// The key's create revision, if known.
    fn revision(&self) -> Option<i64> {
        Some(self.placed.load(Ordering::SeqCst)).filter(|&revision| revision > 0)
    }

    /// Tries to delete the key once now; if etcd does not answer, the retirement goes on in
    /// the background (on drop).
    async fn remove_now(&mut self) {
        let Some(key) = self.key.clone() else {
            return;
        };
        if self.shared.is_closed() {
            return;
        }
        if self.revision().is_none() {
            self.unanswered = Some((key.clone(), self.generation));
        }
        match self
            .shared
            .delete_lock_key(&self.name, &key, self.revision())
            .await
        {
            Ok(()) => self.forget_key(),
            Err(err) => {
                tracing::warn!(error = %err, lock = %self.name, "could not remove the lock waiter key yet; retrying in the background");
            }
        }
    }
}

impl Drop for WaiterKey {
    fn drop(&mut self) {
        let Some(local) = self.local.take() else {
            return;
        };
        if let Some(key) = &self.key {
            if self.revision().is_none() {
                self.unanswered = Some((key.clone(), self.generation));
            }
        }
        let name = std::mem::take(&mut self.name);
        let held = HeldKey {
            name: name.clone(),
            revision: self.revision(),
            key: self.key.take().unwrap_or_default(),
            _local: local,
        };
        if held.key.is_empty() {
            self.shared.drop_held(held);
        } else {
            spawn_delete(Arc::clone(&self.shared), held);
        }
        if let Some((key, generation)) = self.unanswered.take() {
            spawn_sweeper(Arc::clone(&self.shared), name, key, generation);
        }
    }
}
