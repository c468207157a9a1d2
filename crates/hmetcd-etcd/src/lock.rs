//! Locks: the handle's lock (`dist_lock`) and named locks with a guard, both with the
//! algorithm of etcd's Go `concurrency.Mutex`, on the handle's lease.
//!
//! Each participant puts `<name>/<lease id in hex>` (with the handle's prefix in front) bound
//! to its lease, then waits until every key under `<name>/` created before its own is
//! deleted. Waiters are therefore served in the order they queued, and Go services using
//! `concurrency.NewMutex(session, name)` on the same etcd take part in the same queue.
//!
//! A handle has one lease and so one waiter key per name: its own participants (the handle's
//! lock and every guard for that name) queue first on a fair local mutex per name, held for as
//! long as the lock is. The handle's lock is the named lock `lock_name`. So a participant takes
//! its place in etcd's queue when it reaches the front of its handle's local queue: among
//! participants of different handles, first come first served holds from that moment.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use futures::future::BoxFuture;
use hmetcd_core::keys::check_key;
use hmetcd_core::{Error, LockGuard, LockOptions, LockRelease, LostReason, LostSignal, Result};
use tokio::sync::OwnedMutexGuard;
use tokio::task::AbortHandle;

use crate::error::{is_lease_not_found, Request};
use crate::retry::{pause_unless_shut_down, shut_down, Backoff};
use crate::{lease_hex, Shared};

/// When a timed attempt gives up, and the timeout to report then.
type Deadline = Option<(Instant, Duration)>;

/// A named lock held by one of the handle's guards; empty once released.
type GuardSlot = Arc<Mutex<Option<HeldKey>>>;

/// The locks as this handle sees them.
#[derive(Default)]
pub(crate) struct LockState {
    /// Serializes `dist_lock` callers: a second task of the handle waits for the first one's
    /// acquisition and then finds the lock held (the handle's lock is re-entrant).
    dist_callers: tokio::sync::Mutex<()>,
    /// The handle's lock, while held.
    held: Mutex<Option<HeldKey>>,
    /// One fair mutex per lock name (as the caller wrote it), so that the handle never queues
    /// two waiter keys for one name. Entries nobody uses are removed.
    local: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The named locks of the handle's guards, so that `close()` releases them.
    guards: Mutex<HashMap<u64, GuardSlot>>,
    next_guard: AtomicU64,
}

/// A lock this handle holds: its key in etcd and its name's local mutex.
struct HeldKey {
    /// The name as the caller wrote it (without the prefix).
    name: String,
    /// The stored lock key.
    key: String,
    /// The lease generation it was taken under; a newer lease means the lock was lost.
    generation: u64,
    /// The create revision of `key`: the fencing token.
    revision: i64,
    /// Released only once the key is deleted, so that the handle's next participant for this
    /// name never finds the old key and takes it for its own place in the queue.
    _local: OwnedMutexGuard<()>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LockState {
    fn held(&self) -> MutexGuard<'_, Option<HeldKey>> {
        locked(&self.held)
    }

    /// Forgets every lock of the handle without touching etcd (closing revokes the lease,
    /// which removes the keys).
    pub(crate) fn forget(&self) {
        self.held().take();
        let guards = std::mem::take(&mut *locked(&self.guards));
        for slot in guards.into_values() {
            locked(&slot).take();
        }
    }

    fn forget_guard(&self, id: u64) {
        locked(&self.guards).remove(&id);
    }

    fn local_mutex(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(locked(&self.local).entry(name.to_owned()).or_default())
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
    /// Our waiter key vanished (the lease expired meanwhile): queue again.
    KeyLost,
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
    pub(crate) async fn acquire_lock(&self, deadline: Deadline) -> Result<()> {
        let name = self.lock_name();
        let _one_caller_at_a_time = by_deadline(name, deadline, async {
            Ok(self.lock.dist_callers.lock().await)
        })
        .await?;
        let held = self
            .lock
            .held()
            .as_ref()
            .map(|held| (held.key.clone(), held.generation));
        if let Some((key, generation)) = held {
            // "Holds" means holds now: the lease is alive and the lock key is still there.
            if self.session.is_alive(generation)
                && self
                    .create_revision(&key, Request::new("lock", name))
                    .await?
                    .is_some()
            {
                return Ok(());
            }
            tracing::warn!(
                lock = name,
                "the lock was lost with the lease; queueing again"
            );
            self.lock.held().take();
        }
        let held = self.acquire_key(name, deadline).await?;
        *self.lock.held() = Some(held);
        Ok(())
    }

    /// `dist_unlock`: deletes the lock key if this handle holds the lock.
    pub(crate) async fn release_lock(&self) -> Result<()> {
        let Some(held) = self.lock.held().take() else {
            return Ok(());
        };
        if let Err(err) = self.delete_lock_key(&held).await {
            // Still ours as far as we know; a later unlock tries again.
            *self.lock.held() = Some(held);
            return Err(err);
        }
        self.drop_held(held);
        Ok(())
    }

    /// `lock` and `lock_with`: a guard for the named lock `name`.
    pub(crate) async fn lock_named(
        self: &Arc<Self>,
        name: &str,
        options: LockOptions,
    ) -> Result<LockGuard> {
        self.ensure_open()?;
        check_key("name", name)?;
        let deadline = deadline_after(options.get_timeout());
        let held = self.acquire_key(name, deadline).await?;
        let fencing_token = held.revision;
        let id = self.lock.next_guard.fetch_add(1, Ordering::Relaxed);
        let slot: GuardSlot = Arc::new(Mutex::new(Some(held)));
        locked(&self.lock.guards).insert(id, Arc::clone(&slot));
        let mut release = EtcdLockRelease {
            shared: Arc::clone(self),
            id,
            slot,
            lost: LostSignal::new(),
            expiry: None,
        };
        // A close that raced with this call may have missed the new guard.
        if self.is_closed() {
            release.take();
            return Err(Error::Closed);
        }
        if let Some(max_hold) = options.get_max_hold() {
            release.expiry = Some(release.start_expiry(name, max_hold)?);
        }
        Ok(LockGuard::from_backend(
            name,
            fencing_token,
            Box::new(release),
        ))
    }

    /// Takes the lock `name` for one of the handle's participants: first the name's local
    /// mutex, then a place in etcd's queue. Gives up at `deadline` without a trace.
    async fn acquire_key(&self, name: &str, deadline: Deadline) -> Result<HeldKey> {
        let local = self.lock.local_mutex(name);
        let mut shutdown = self.shutdown.subscribe();
        let taken = by_deadline(name, deadline, async {
            tokio::select! {
                guard = local.lock_owned() => Ok(guard),
                () = shut_down(&mut shutdown) => Err(Error::Closed),
            }
        })
        .await;
        let outcome = match taken {
            Ok(local) => self.queue_until_acquired(name, local, deadline).await,
            Err(err) => Err(err),
        };
        if outcome.is_err() {
            self.lock.forget_local_if_unused(name);
        }
        outcome
    }

    async fn queue_until_acquired(
        &self,
        name: &str,
        local: OwnedMutexGuard<()>,
        deadline: Deadline,
    ) -> Result<HeldKey> {
        let dir = format!("{}/", self.prefix.apply(name));
        loop {
            let (lease, generation) = by_deadline(name, deadline, self.live_lease()).await?;
            let key = format!("{dir}{}", lease_hex(lease));
            let mut waiter = WaiterKey::new(self, &key);
            let attempt = self.queue_and_wait(name, &dir, &key, lease);
            match by_deadline(name, deadline, attempt).await {
                Ok(Attempt::Acquired(revision)) => {
                    waiter.keep();
                    return Ok(HeldKey {
                        name: name.to_owned(),
                        key,
                        generation,
                        revision,
                        _local: local,
                    });
                }
                Ok(Attempt::KeyLost) => {
                    waiter.keep();
                    if let Some((at, timeout)) = deadline {
                        if Instant::now() >= at {
                            return Err(gave_up(name, timeout));
                        }
                    }
                }
                Err(err) => {
                    // A given-up attempt leaves no trace: our waiter key goes before we return.
                    waiter.remove_now(self, name).await;
                    return Err(err);
                }
            }
        }
    }

    /// Deletes a held lock's key (the next waiter gets the lock).
    async fn delete_lock_key(&self, held: &HeldKey) -> Result<()> {
        self.kv_request(Request::new("unlock", &held.name), async |kv| {
            kv.delete(held.key.as_str(), None).await
        })
        .await
        .map(|_| ())
    }

    /// Deletes a held lock's key, retrying until it is gone or the handle is shut down (then
    /// the key goes with the lease). The name's local mutex is released only after that.
    async fn delete_lock_key_until_done(&self, held: HeldKey) {
        let mut backoff = Backoff::new();
        let mut shutdown = self.shutdown.subscribe();
        while !self.is_closed() {
            match self.delete_lock_key(&held).await {
                Ok(()) => break,
                Err(err) => {
                    tracing::warn!(error = %err, lock = %held.name, "could not release the lock yet; retrying");
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

    /// Puts our waiter key (if not there yet) and waits until every key queued before it is gone.
    async fn queue_and_wait(
        &self,
        name: &str,
        dir: &str,
        key: &str,
        lease: i64,
    ) -> Result<Attempt> {
        let request = Request::new("lock", name);
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                "",
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let queued = match self
            .kv_bounded(request, async |kv| kv.txn(txn).await)
            .await?
        {
            Ok(queued) => queued,
            Err(err) if is_lease_not_found(&err) => {
                self.session.mark_lost(lease).await;
                return Ok(Attempt::KeyLost);
            }
            Err(err) => return Err(self.errors.map(request, err)),
        };
        let my_revision = if queued.succeeded() {
            revision_of(queued.header(), request)?
        } else {
            // The key is already there (an earlier attempt on this lease): its place in the queue stands.
            match self.create_revision(key, request).await? {
                Some(revision) => revision,
                None => return Ok(Attempt::KeyLost),
            }
        };
        self.wait_for_predecessors(dir, key, my_revision, request)
            .await
    }

    async fn create_revision(&self, key: &str, request: Request<'_>) -> Result<Option<i64>> {
        let answer = self
            .kv_request(request, async |kv| kv.get(key, None).await)
            .await?;
        Ok(answer.kvs().first().map(|found| found.create_revision()))
    }

    /// Go's `waitDeletes`: until no key under `dir` was created before `my_revision`, watch
    /// the newest such key (the one just ahead of us) until it is deleted. Each look reads the
    /// key ahead and our own key in one request: if ours vanished (the lease expired while we
    /// waited), the attempt must queue again. Outages while waiting are ridden out: the wait
    /// itself has no time limit.
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
            let ahead = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_max_create_revision(my_revision - 1)
                .with_limit(1);
            let txn = Txn::new().and_then([TxnOp::get(dir, Some(ahead)), TxnOp::get(key, None)]);
            let answer = match self.kv_request(request, async |kv| kv.txn(txn).await).await {
                Ok(answer) => answer,
                Err(err) if err.is_transient() => {
                    tracing::debug!(error = %err, "waiting for the lock: etcd unreachable; retrying");
                    if !pause_unless_shut_down(backoff.next_pause(), &mut shutdown).await {
                        return Err(Error::Closed);
                    }
                    continue;
                }
                Err(err) => return Err(err),
            };
            let responses = answer.op_responses();
            let mut reads = responses.iter().filter_map(|response| match response {
                TxnOpResponse::Get(read) => Some(read),
                _ => None,
            });
            let (Some(ahead), Some(mine)) = (reads.next(), reads.next()) else {
                return Err(Error::Backend {
                    operation: request.to_string(),
                    reason: "etcd answered a transaction of two reads without both results"
                        .to_owned(),
                    source: None,
                });
            };
            if mine.kvs().first().map(|found| found.create_revision()) != Some(my_revision) {
                return Ok(Attempt::KeyLost);
            }
            let Some(ahead) = ahead.kvs().first() else {
                return Ok(Attempt::Acquired(my_revision));
            };
            let after = revision_of(answer.header(), request)?;
            if !self
                .wait_deleted(ahead.key(), after + 1, request, &mut shutdown)
                .await?
            {
                if !pause_unless_shut_down(backoff.next_pause(), &mut shutdown).await {
                    return Err(Error::Closed);
                }
            } else {
                backoff.reset();
            }
        }
    }

    /// Watches `key` from `revision` until it is deleted (`true`), or the watch breaks
    /// (`false`: look again).
    async fn wait_deleted(
        &self,
        key: &[u8],
        revision: i64,
        request: Request<'_>,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<bool> {
        let mut watches = self.client.watch_client();
        let options = WatchOptions::new().with_start_revision(revision);
        let request = Request::new("watch lock", request.key);
        let mut stream = match self
            .bounded(request, watches.watch(key, Some(options)))
            .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "waiting for the lock: cannot watch the key ahead");
                return Ok(false);
            }
            Err(_) => return Ok(false),
        };
        loop {
            let message = tokio::select! {
                () = shut_down(shutdown) => return Err(Error::Closed),
                message = stream.message() => message,
            };
            match message {
                Ok(Some(answer)) => {
                    if answer
                        .events()
                        .iter()
                        .any(|event| event.event_type() == EventType::Delete)
                    {
                        return Ok(true);
                    }
                    if answer.canceled() || answer.compact_revision() > 0 {
                        return Ok(false);
                    }
                }
                Ok(None) | Err(_) => return Ok(false),
            }
        }
    }
}

/// The etcd side of a [`LockGuard`].
struct EtcdLockRelease {
    shared: Arc<Shared>,
    id: u64,
    slot: GuardSlot,
    lost: LostSignal,
    /// The `max_hold` timer, if any.
    expiry: Option<AbortHandle>,
}

impl EtcdLockRelease {
    /// Takes the held lock out of the guard (it is no longer held as far as the guard is
    /// concerned) and stops the `max_hold` timer. `None` if it was already released.
    fn take(&mut self) -> Option<HeldKey> {
        let held = locked(&self.slot).take();
        self.shared.lock.forget_guard(self.id);
        if held.is_some() {
            // Only while the lock was still in the slot: a timer that took it must finish.
            if let Some(expiry) = self.expiry.take() {
                expiry.abort();
            }
        }
        held
    }

    /// Starts the timer that releases the lock after `max_hold`.
    fn start_expiry(&self, name: &str, max_hold: Duration) -> Result<AbortHandle> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NotSupported {
            what: format!("max_hold on the lock {name:?}"),
            reason: "the timer needs a Tokio runtime; call lock_with from within one".to_owned(),
        })?;
        let shared = Arc::clone(&self.shared);
        let slot = Arc::clone(&self.slot);
        let lost = self.lost.clone();
        let id = self.id;
        Ok(runtime
            .spawn(async move {
                let mut shutdown = shared.shutdown.subscribe();
                if !pause_unless_shut_down(max_hold, &mut shutdown).await {
                    return;
                }
                let held = locked(&slot).take();
                shared.lock.forget_guard(id);
                if let Some(held) = held {
                    lost.fire(LostReason::MaxHold);
                    tracing::debug!(lock = %held.name, ?max_hold, "max_hold expired; releasing the lock");
                    shared.delete_lock_key_until_done(held).await;
                }
            })
            .abort_handle())
    }
}

impl LockRelease for EtcdLockRelease {
    fn is_held(&self) -> bool {
        let generation = locked(&self.slot).as_ref().map(|held| held.generation);
        generation.is_some_and(|generation| {
            !*self.shared.shutdown.borrow() && self.shared.session.is_alive(generation)
        })
    }

    fn lost(&self) -> BoxFuture<'static, LostReason> {
        self.lost.wait()
    }

    fn release(mut self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        let held = self.take();
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            let Some(held) = held else {
                return Ok(());
            };
            if shared.is_closed() {
                // Closing revoked the lease, and the key with it.
                shared.drop_held(held);
                return Ok(());
            }
            match shared.delete_lock_key(&held).await {
                Ok(()) => {
                    shared.drop_held(held);
                    Ok(())
                }
                Err(err) => {
                    // Reported, and still released: in the background, as a dropped guard is.
                    spawn_release(shared, held);
                    Err(err)
                }
            }
        })
    }

    fn release_on_drop(mut self: Box<Self>) {
        if let Some(held) = self.take() {
            spawn_release(Arc::clone(&self.shared), held);
        }
    }
}

/// Deletes the key of `held` in the background on the current Tokio runtime. Without one,
/// the key stays until the handle's lease ends, and the handle's next participant for this
/// name takes the lock over from it.
fn spawn_release(shared: Arc<Shared>, held: HeldKey) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move { shared.delete_lock_key_until_done(held).await });
        }
        Err(_) => {
            tracing::debug!(lock = %held.name, "guard dropped outside a Tokio runtime; the lock goes with the lease");
            shared.drop_held(held);
        }
    }
}

fn revision_of(header: Option<&etcd_client::ResponseHeader>, request: Request<'_>) -> Result<i64> {
    header
        .map(|header| header.revision())
        .ok_or_else(|| Error::Backend {
            operation: request.to_string(),
            reason: "etcd answered without a response header".to_owned(),
            source: None,
        })
}

/// Our waiter key while we queue: removed if the attempt is abandoned, so it never delays a
/// later acquirer. If the waiting future is dropped, the removal is spawned.
struct WaiterKey {
    key: Option<String>,
    kv: etcd_client::KvClient,
    timeout: Duration,
}

impl WaiterKey {
    fn new(shared: &Shared, key: &str) -> Self {
        WaiterKey {
            key: Some(key.to_owned()),
            kv: shared.client.kv_client(),
            timeout: shared.options.request_timeout,
        }
    }

    /// The key stays (we hold the lock now, or it is already gone).
    fn keep(&mut self) {
        self.key = None;
    }

    async fn remove_now(&mut self, shared: &Shared, name: &str) {
        if let Some(key) = self.key.take() {
            if let Err(err) = shared
                .kv_request(Request::new("remove lock waiter", name), async |kv| {
                    kv.delete(key, None).await
                })
                .await
            {
                tracing::warn!(error = %err, "could not remove the lock waiter key; it goes with the lease");
            }
        }
    }
}

impl Drop for WaiterKey {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut kv = self.kv.clone();
        let timeout = self.timeout;
        runtime.spawn(async move {
            let _ = tokio::time::timeout(timeout, kv.delete(key, None)).await;
        });
    }
}
