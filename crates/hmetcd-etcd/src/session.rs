//! The handle's lease: kept alive in the background, taken anew when lost, with the temp keys
//! put back on the new lease.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etcd_client::{KvClient, LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use hmetcd_core::Result;

use crate::error::{is_lease_not_found, Request};
use crate::retry::Backoff;
use crate::{lease_hex, Shared};

/// The value of every temp key, as in the Go package.
const TEMP_VALUE: &str = "1";

/// The handle's lease and the temp keys bound to it.
pub(crate) struct Session {
    /// Lease TTL in seconds.
    ttl: i64,
    /// The current lease id, readable without waiting (for `close` and `Debug`).
    current: AtomicI64,
    state: tokio::sync::Mutex<LeaseState>,
    /// What `state` says about the lease's life, readable without waiting (for `is_alive`).
    view: Mutex<LeaseView>,
    /// Stored keys (prefix applied) of the handle's temp keys.
    temp_keys: Mutex<BTreeSet<String>>,
    /// Whether `temp_keys` has any; every plain write asks, most handles have none.
    has_temp_keys: AtomicBool,
}

/// The part of [`LeaseState`] that tells whether a lease generation is alive.
#[derive(Clone, Copy)]
struct LeaseView {
    generation: u64,
    lost: bool,
    renewed_at: Instant,
}

struct LeaseState {
    id: i64,
    /// Grows by one with every new lease; a lock taken under an older generation is lost.
    generation: u64,
    /// etcd said the lease is gone; the next user takes a new one.
    lost: bool,
    /// The temp keys still have to be put back on the current lease.
    restore_pending: bool,
    /// When etcd last confirmed the lease.
    renewed_at: Instant,
}

impl Session {
    pub(crate) fn new(lease: i64, ttl: i64) -> Self {
        Session {
            ttl,
            current: AtomicI64::new(lease),
            state: tokio::sync::Mutex::new(LeaseState {
                id: lease,
                generation: 0,
                lost: false,
                restore_pending: false,
                renewed_at: Instant::now(),
            }),
            view: Mutex::new(LeaseView {
                generation: 0,
                lost: false,
                renewed_at: Instant::now(),
            }),
            temp_keys: Mutex::new(BTreeSet::new()),
            has_temp_keys: AtomicBool::new(false),
        }
    }

    fn view(&self) -> MutexGuard<'_, LeaseView> {
        self.view
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Mirrors `state` into the view; called with `state` locked, after every change.
    fn publish(&self, state: &LeaseState) {
        *self.view() = LeaseView {
            generation: state.generation,
            lost: state.lost,
            renewed_at: state.renewed_at,
        };
    }

    pub(crate) fn current_lease(&self) -> i64 {
        self.current.load(Ordering::SeqCst)
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl.unsigned_abs())
    }

    fn temp_keys(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.temp_keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Remembers a temp key (stored form), to be put back if the lease is ever lost.
    fn remember_temp_key(&self, stored: &str) {
        let mut keys = self.temp_keys();
        keys.insert(stored.to_owned());
        self.has_temp_keys.store(true, Ordering::Release);
    }

    /// The key (stored form) is no longer bound to the lease: a plain write or a delete.
    /// Without temp keys (the usual case) this takes no lock.
    pub(crate) fn forget_temp_key(&self, stored: &str) {
        if !self.has_temp_keys.load(Ordering::Acquire) {
            return;
        }
        let mut keys = self.temp_keys();
        if keys.remove(stored) && keys.is_empty() {
            self.has_temp_keys.store(false, Ordering::Release);
        }
    }

    /// Whether the lease of `generation` is alive as far as anyone can tell: etcd has not said
    /// otherwise, and confirmed it less than a TTL ago.
    pub(crate) fn is_alive(&self, generation: u64) -> bool {
        let view = *self.view();
        view.generation == generation && !view.lost && view.renewed_at.elapsed() < self.ttl()
    }

    /// Records that etcd said `lease` is gone.
    pub(crate) async fn mark_lost(&self, lease: i64) {
        let mut state = self.state.lock().await;
        if state.id == lease && !state.lost {
            tracing::warn!(lease = %lease_hex(lease), "the lease expired; taking a new one");
            state.lost = true;
            self.publish(&state);
        }
    }

    async fn renewed(&self, lease: i64) {
        let mut state = self.state.lock().await;
        if state.id == lease {
            state.renewed_at = Instant::now();
            self.publish(&state);
        }
    }
}

impl Shared {
    /// The current lease and its generation, taking a new lease first if the old one was lost
    /// and putting the temp keys back if that is still to do.
    pub(crate) async fn live_lease(&self) -> Result<(i64, u64)> {
        let session = &self.session;
        let mut state = session.state.lock().await;
        if state.lost {
            let mut leases = self.client.lease_client();
            let granted = self
                .request(
                    Request::keyless("lease grant"),
                    leases.grant(session.ttl, None),
                )
                .await?;
            state.id = granted.id();
            state.generation += 1;
            state.lost = false;
            state.restore_pending = true;
            state.renewed_at = Instant::now();
            session.current.store(granted.id(), Ordering::SeqCst);
            session.publish(&state);
            tracing::info!(lease = %lease_hex(granted.id()), "took a new lease");
        }
        if state.restore_pending {
            let keys: Vec<String> = session.temp_keys().iter().cloned().collect();
            for stored in keys {
                let shown = self.prefix.strip(&stored).unwrap_or(&stored).to_owned();
                let options = PutOptions::new().with_lease(state.id);
                self.kv_request(Request::new("put temp key", &shown), async |kv| {
                    kv.put(stored, TEMP_VALUE, Some(options)).await
                })
                .await?;
            }
            state.restore_pending = false;
        }
        Ok((state.id, state.generation))
    }

    /// `temp_key`: stores "1" at `key` bound to the lease and remembers it, so it can be put
    /// back if the lease is ever lost.
    pub(crate) async fn put_temp_key(&self, key: &str) -> Result<()> {
        let stored = self.prefix.apply(key);
        // Remembered first, so that a lease renewal running meanwhile puts it back too.
        self.session.remember_temp_key(&stored);
        let request = Request::new("put temp key", key);
        let mut attempt = 0;
        let outcome = loop {
            attempt += 1;
            let lease = match self.live_lease().await {
                Ok((lease, _)) => lease,
                Err(err) => break Err(err),
            };
            let options = PutOptions::new().with_lease(lease);
            let put =
                async |kv: &mut KvClient| kv.put(stored.as_str(), TEMP_VALUE, Some(options)).await;
            match self.kv_bounded(request, put).await {
                Ok(Ok(_)) => break Ok(()),
                Ok(Err(err)) if is_lease_not_found(&err) && attempt < 2 => {
                    self.session.mark_lost(lease).await
                }
                Ok(Err(err)) => break Err(self.errors.map(request, err)),
                Err(timeout) => break Err(timeout),
            }
        };
        if outcome.is_err() {
            self.session.forget_temp_key(&stored);
        }
        outcome
    }
}

/// Keeps the handle's lease alive until the handle is closed or dropped (the task is aborted
/// then). Never gives up: failures are retried with backoff, and a lost lease is replaced.
pub(crate) async fn keep_alive(shared: Arc<Shared>) {
    let ttl = shared.session.ttl();
    // etcd's own clients renew at a third of the TTL.
    let interval = (ttl / 3).max(Duration::from_millis(100));
    // The lease was granted by connect a moment ago: its first renewal is due in one interval,
    // not now. Opening the keep-alive stream later keeps it out of `open()`'s way, and a
    // short-lived handle never opens one.
    tokio::time::sleep(interval).await;
    let mut backoff = Backoff::new();
    while !shared.is_closed() {
        let lease = match shared.live_lease().await {
            Ok((lease, _)) => lease,
            Err(err) => {
                tracing::debug!(error = %err, "cannot renew the lease yet; retrying");
                tokio::time::sleep(backoff.next_pause()).await;
                continue;
            }
        };
        let mut leases = shared.client.lease_client();
        match shared
            .bounded(
                Request::keyless("lease keep-alive"),
                leases.keep_alive(lease),
            )
            .await
        {
            Ok(Ok((keeper, answers))) => {
                backoff.reset();
                shared.session.renewed(lease).await;
                if renew_until_broken(&shared, lease, keeper, answers, interval).await {
                    shared.session.mark_lost(lease).await;
                } else {
                    tokio::time::sleep(backoff.next_pause()).await;
                }
            }
            Ok(Err(err)) if is_lease_not_found(&err) => shared.session.mark_lost(lease).await,
            Ok(Err(err)) => {
                tracing::debug!(error = %err, lease = %lease_hex(lease), "lease keep-alive failed; retrying");
                tokio::time::sleep(backoff.next_pause()).await;
            }
            Err(err) => {
                tracing::debug!(error = %err, lease = %lease_hex(lease), "lease keep-alive timed out; retrying");
                tokio::time::sleep(backoff.next_pause()).await;
            }
        }
    }
}

/// Renews `lease` every `interval` over one keep-alive stream. Returns `true` when etcd says the
/// lease is gone, `false` when the stream broke (etcd restarted, network trouble).
async fn renew_until_broken(
    shared: &Shared,
    lease: i64,
    mut keeper: LeaseKeeper,
    mut answers: LeaseKeepAliveStream,
    interval: Duration,
) -> bool {
    // An answer slower than half the interval means a stuck member: reopening the stream (on
    // another member) while the lease still has two thirds of its TTL left beats waiting.
    let answer_timeout = shared.options.request_timeout.min(interval / 2);
    loop {
        tokio::time::sleep(interval).await;
        if keeper.keep_alive().await.is_err() {
            return false;
        }
        match tokio::time::timeout(answer_timeout, answers.message()).await {
            Ok(Ok(Some(answer))) if answer.ttl() > 0 => shared.session.renewed(lease).await,
            Ok(Ok(Some(_))) => return true,
            Ok(Ok(None)) => return false,
            Ok(Err(err)) => {
                tracing::debug!(error = %err, lease = %lease_hex(lease), "lease keep-alive stream broke");
                return false;
            }
            Err(_) => {
                tracing::debug!(lease = %lease_hex(lease), "no keep-alive answer in time; reopening the stream");
                return false;
            }
        }
    }
}
