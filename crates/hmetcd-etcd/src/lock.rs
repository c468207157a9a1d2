//! The distributed lock: the algorithm of etcd's Go `concurrency.Mutex`, on the handle's lease.
//!
//! Each participant puts `<lock_name>/<lease id in hex>` (with the handle's prefix in front)
//! bound to its lease, then waits until every key under `<lock_name>/` created before its own
//! is deleted. Waiters are therefore served in the order they queued, and Go services using
//! `concurrency.NewMutex(session, lock_name)` on the same etcd take part in the same queue.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    WatchOptions,
};
use hmetcd_core::{Error, Result};

use crate::error::{is_lease_not_found, Request};
use crate::retry::{pause_unless_shut_down, shut_down, Backoff};
use crate::{lease_hex, Shared};

/// The lock as this handle sees it.
#[derive(Default)]
pub(crate) struct LockState {
    /// Serializes acquisitions on this handle, so that it never queues two waiter keys.
    acquiring: tokio::sync::Mutex<()>,
    held: Mutex<Option<HeldLock>>,
}

struct HeldLock {
    /// The stored lock key.
    key: String,
    /// The lease generation it was taken under; a newer lease means the lock was lost.
    generation: u64,
}

impl LockState {
    fn held(&self) -> MutexGuard<'_, Option<HeldLock>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Forgets the lock without touching etcd (closing revokes the lease, which removes it).
    pub(crate) fn forget(&self) {
        self.held().take();
    }
}

/// How an attempt to queue and wait ended.
enum Attempt {
    Acquired,
    /// Our waiter key vanished (the lease expired meanwhile): queue again.
    KeyLost,
}

impl Shared {
    fn lock_name(&self) -> &str {
        &self.options.lock_name
    }

    /// `dist_lock` (no deadline) and `dist_timed_lock` (deadline and the caller's timeout).
    pub(crate) async fn acquire_lock(&self, deadline: Option<(Instant, Duration)>) -> Result<()> {
        let gave_up = |timeout| Error::LockTimeout {
            lock: self.lock_name().to_owned(),
            timeout,
        };
        let _acquiring = match deadline {
            Some((at, timeout)) => tokio::time::timeout_at(at.into(), self.lock.acquiring.lock())
                .await
                .map_err(|_| gave_up(timeout))?,
            None => self.lock.acquiring.lock().await,
        };
        let held = self
            .lock
            .held()
            .as_ref()
            .map(|held| (held.key.clone(), held.generation));
        if let Some((key, generation)) = held {
            // "Holds" means holds now: the lease is alive and the lock key is still there.
            if self.session.is_alive(generation).await
                && self
                    .create_revision(&key, Request::new("lock", self.lock_name()))
                    .await?
                    .is_some()
            {
                return Ok(());
            }
            tracing::warn!(
                lock = self.lock_name(),
                "the lock was lost with the lease; queueing again"
            );
            self.lock.forget();
        }
        loop {
            let leased = self.live_lease();
            let (lease, generation) = match deadline {
                Some((at, timeout)) => tokio::time::timeout_at(at.into(), leased)
                    .await
                    .unwrap_or_else(|_| Err(gave_up(timeout)))?,
                None => leased.await?,
            };
            let key = format!("{}{}", self.lock_prefix, lease_hex(lease));
            let mut waiter = WaiterKey::new(self, &key);
            let attempt = self.queue_and_wait(&key, lease);
            let outcome = match deadline {
                Some((at, timeout)) => tokio::time::timeout_at(at.into(), attempt)
                    .await
                    .unwrap_or_else(|_| Err(gave_up(timeout))),
                None => attempt.await,
            };
            match outcome {
                Ok(Attempt::Acquired) => {
                    waiter.keep();
                    *self.lock.held() = Some(HeldLock { key, generation });
                    return Ok(());
                }
                Ok(Attempt::KeyLost) => {
                    waiter.keep();
                    if let Some((at, timeout)) = deadline {
                        if Instant::now() >= at {
                            return Err(gave_up(timeout));
                        }
                    }
                }
                Err(err) => {
                    // A given-up attempt leaves no trace: our waiter key goes before we return.
                    waiter.remove_now(self).await;
                    return Err(err);
                }
            }
        }
    }

    /// `dist_unlock`: deletes the lock key if this handle holds the lock.
    pub(crate) async fn release_lock(&self) -> Result<()> {
        let Some(held) = self.lock.held().take() else {
            return Ok(());
        };
        let mut kv = self.client.kv_client();
        let outcome = self
            .request(
                Request::new("unlock", self.lock_name()),
                kv.delete(held.key.as_str(), None),
            )
            .await;
        if outcome.is_err() {
            // Still ours as far as we know; a later unlock tries again.
            *self.lock.held() = Some(held);
        }
        outcome.map(|_| ())
    }

    /// Puts our waiter key (if not there yet) and waits until every key queued before it is gone.
    async fn queue_and_wait(&self, key: &str, lease: i64) -> Result<Attempt> {
        let request = Request::new("lock", self.lock_name());
        let mut kv = self.client.kv_client();
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                "",
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let queued = match self.bounded(request, kv.txn(txn)).await? {
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
        self.wait_for_predecessors(my_revision, request).await?;
        // The lease may have expired while we waited; then the key went with it.
        if self.create_revision(key, request).await? == Some(my_revision) {
            Ok(Attempt::Acquired)
        } else {
            Ok(Attempt::KeyLost)
        }
    }

    async fn create_revision(&self, key: &str, request: Request<'_>) -> Result<Option<i64>> {
        let mut kv = self.client.kv_client();
        let answer = self.request(request, kv.get(key, None)).await?;
        Ok(answer.kvs().first().map(|found| found.create_revision()))
    }

    /// Go's `waitDeletes`: until no key under the lock was created before `my_revision`, watch
    /// the newest such key (the one just ahead of us) until it is deleted. Outages while
    /// waiting are ridden out: the wait itself has no time limit.
    async fn wait_for_predecessors(&self, my_revision: i64, request: Request<'_>) -> Result<()> {
        let mut backoff = Backoff::new();
        let mut shutdown = self.shutdown.subscribe();
        loop {
            if self.is_closed() {
                return Err(Error::Closed);
            }
            let options = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_max_create_revision(my_revision - 1)
                .with_limit(1);
            let mut kv = self.client.kv_client();
            let answer = match self
                .request(request, kv.get(self.lock_prefix.as_str(), Some(options)))
                .await
            {
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
            let Some(ahead) = answer.kvs().first() else {
                return Ok(());
            };
            let after = revision_of(answer.header(), request)?;
            if !self
                .wait_deleted(ahead.key(), after + 1, &mut shutdown)
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
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<bool> {
        let mut watches = self.client.watch_client();
        let options = WatchOptions::new().with_start_revision(revision);
        let request = Request::new("watch lock", self.lock_name());
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

    async fn remove_now(&mut self, shared: &Shared) {
        if let Some(key) = self.key.take() {
            let mut kv = shared.client.kv_client();
            if let Err(err) = shared
                .request(
                    Request::new("remove lock waiter", shared.lock_name()),
                    kv.delete(key, None),
                )
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
