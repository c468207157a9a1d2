//! The handle's session: one lease, owned by one task, and the temp keys bound to it.
//!
//! One task, [`run`], owns the lease: it keeps it alive, notices when it is lost, takes a new
//! one and puts the temp keys back. Nobody else grants or revokes a lease (but `close()`,
//! after the owner has stopped). The owner publishes what it knows as a [`SessionState`]
//! through a `tokio::sync::watch` channel:
//!
//! - requests that need the lease (temp keys, lock waiter keys) read the current state, or wait
//!   for a live lease with their own deadline; none waits for a restore it did not ask for;
//! - a request that hears "lease not found" from etcd reports it ([`Session::report_lost`]),
//!   and the owner replaces the lease;
//! - locks remember the generation they were taken under: a lock is held only while that
//!   generation is live and its lease confirmed ([`Session::holds`]).
//!
//! The lease counts as lost when etcd says so (a keep-alive answer with TTL 0, "lease not
//! found" from any request), or when no keep-alive was confirmed within the TTL measured from
//! when the last confirmed one was *sent*: from then on etcd may have expired it. Such a lease
//! may still be alive in etcd (a slow network), so the owner revokes it before it puts the temp
//! keys back on the new one: nothing of ours is left on a lease we no longer keep alive.
//!
//! The restore runs beside the keep-alive of the new lease (never in its way), in transactions
//! of up to [`RESTORE_BATCH`] keys (fewer where the server says a transaction is too big), each
//! key put back with the value it was last written with (`"1"` for `temp_key`, the caller's for
//! `store_temp` and a transaction's `Op::put_temp`), and only if it is absent: a key that
//! someone else wrote since is theirs, and the handle stops treating it as a temp key. A
//! restore transaction that gets no answer may still land later, after a key was deleted: the
//! restore then gives its lease up (revoked, and a new one taken) rather than try again on it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, KvClient, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};
use hmetcd_core::{Error, Result};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::error::{is_lease_not_found, Request};
use crate::pause::PausePoint;
use crate::retry::{pause_unless_shut_down, resending, shut_down, AbortOnDrop, Backoff, Resend};
use crate::{lease_hex, Shared};

/// The value of a `temp_key`, as in the Go package.
pub(crate) const TEMP_VALUE: &str = "1";

/// Keys put back per transaction. Each is a nested transaction of one operation, and etcd
/// allows a nested transaction only the operations its parent leaves of `max-txn-ops` (128 by
/// default): 64 keys fit with room to spare. A server with a smaller limit halves it.
const RESTORE_BATCH: usize = 64;

/// Bytes of keys and values per restore transaction, well under etcd's 1.5 MiB request limit
/// (a bigger single temp key goes alone).
const RESTORE_BATCH_BYTES: usize = 512 * 1024;

/// Taken off a lease's confirmed validity: etcd counts TTLs in whole seconds on its own clock.
const VALIDITY_MARGIN: Duration = Duration::from_millis(250);

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// The lease is kept alive and every temp key is on it.
    Live,
    /// A new lease is kept alive; the temp keys are being put back on it.
    Restoring,
    /// The lease is lost; a new one is being taken.
    Lost,
    /// The handle is closed or dropped: no lease will be taken again.
    Closed,
}

/// What the owner publishes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionState {
    /// The current (or, while `Lost`, the last) lease.
    pub(crate) lease: i64,
    /// Grows by one with every new lease.
    pub(crate) generation: u64,
    /// Until when etcd surely keeps the lease: the send time of the last confirmed keep-alive
    /// (or of the grant) plus the TTL etcd confirmed, less a margin.
    pub(crate) valid_until: Instant,
    pub(crate) phase: Phase,
}

impl SessionState {
    fn has_lease(&self) -> bool {
        matches!(self.phase, Phase::Live | Phase::Restoring)
    }
}

/// The handle's lease and the temp keys bound to it.
pub(crate) struct Session {
    /// Lease TTL in seconds.
    ttl: i64,
    state: watch::Sender<SessionState>,
    /// Leases that a request found gone or that the handle gives up, for the owner.
    reports: mpsc::UnboundedSender<(i64, LeaseEnd)>,
    reports_inbox: Mutex<Option<mpsc::UnboundedReceiver<(i64, LeaseEnd)>>>,
    /// Leases counted lost without etcd saying so, not yet revoked: etcd may still keep them,
    /// and our keys on them. Revoked before the temp keys are put back, and by `close()`.
    unconfirmed: Mutex<Vec<i64>>,
    /// The handle's temp keys (stored form, prefix applied) and the values to put back.
    temp_keys: Mutex<BTreeMap<String, String>>,
    /// Whether `temp_keys` has any; every plain write asks, most handles have none.
    has_temp_keys: AtomicBool,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Session {
    /// The session of a lease asked for with `ttl` seconds and granted with `granted_ttl` by a
    /// request sent at `granted_at`.
    pub(crate) fn new(lease: i64, ttl: i64, granted_ttl: i64, granted_at: Instant) -> Self {
        let (reports, inbox) = mpsc::unbounded_channel();
        Session {
            ttl,
            state: watch::Sender::new(SessionState {
                lease,
                generation: 0,
                valid_until: valid_until(granted_at, granted_ttl),
                phase: Phase::Live,
            }),
            reports,
            reports_inbox: Mutex::new(Some(inbox)),
            unconfirmed: Mutex::new(Vec::new()),
            temp_keys: Mutex::new(BTreeMap::new()),
            has_temp_keys: AtomicBool::new(false),
        }
    }

    pub(crate) fn state(&self) -> SessionState {
        *self.state.borrow()
    }

    pub(crate) fn current_lease(&self) -> i64 {
        self.state.borrow().lease
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl.unsigned_abs())
    }

    /// A receiver of every change of the state, for lock holders to watch.
    pub(crate) fn subscribe(&self) -> watch::Receiver<SessionState> {
        self.state.subscribe()
    }

    /// Whether a lock taken under `generation` is surely still held as far as the lease goes:
    /// that generation is live and etcd cannot have expired its lease yet.
    pub(crate) fn holds(&self, generation: u64) -> bool {
        let state = self.state.borrow();
        state.generation == generation && state.has_lease() && Instant::now() < state.valid_until
    }

    /// Waits until a lock taken under `generation` can be handed to its holder: the lease
    /// surely stays valid for at least a renewal interval (`true`), or that generation ends
    /// (`false`: queue again on the next lease). A lease whose renewal is overdue may be
    /// counted lost any moment, and its keys revoked with it, the lock key among them: a lock
    /// granted then could pass to the next waiter while its holder has only begun.
    pub(crate) async fn ready_to_grant(&self, generation: u64) -> bool {
        let need = renewal_interval(self.ttl());
        let mut states = self.state.subscribe();
        loop {
            {
                let state = states.borrow_and_update();
                if state.generation != generation || !state.has_lease() {
                    return false;
                }
                if state.valid_until.saturating_duration_since(Instant::now()) >= need {
                    return true;
                }
            }
            // The owner renews, or counts the lease lost once its validity runs out.
            if states.changed().await.is_err() {
                return false;
            }
        }
    }

    /// A request found `lease` gone: the owner takes a new one.
    pub(crate) fn report_lost(&self, lease: i64) {
        // Fails only once the owner has stopped (closed or dropped): nothing to replace then.
        let _ = self.reports.send((lease, LeaseEnd::Gone));
    }

    /// The handle gives `lease` up: a request on it may still reach etcd (its answer never
    /// came), and what it would write is no longer wanted. The owner revokes it, so that such
    /// a request fails once it arrives, or its writes go with the lease, and takes a new one.
    fn give_up(&self, lease: i64) {
        let _ = self.reports.send((lease, LeaseEnd::GivenUp));
    }

    /// No lease will be taken again: said by `close()` once the owner has stopped. Returns
    /// every lease that may still hold keys of the handle, for `close()` to revoke: the current
    /// one and those lost without etcd saying so.
    pub(crate) fn close(&self) -> Vec<i64> {
        self.state.send_modify(|state| state.phase = Phase::Closed);
        let mut leases = std::mem::take(&mut *locked(&self.unconfirmed));
        leases.push(self.current_lease());
        leases
    }

    fn publish(&self, change: impl FnOnce(&mut SessionState)) {
        self.state.send_modify(change);
    }

    /// A live lease to put keys on, and its generation, waiting up to `timeout` while a new one
    /// is being taken; never `not` (a lease the caller found gone). `Closed` once the handle is.
    pub(crate) async fn live_lease(
        &self,
        not: Option<i64>,
        timeout: Duration,
        request: Request<'_>,
    ) -> Result<(i64, u64)> {
        let usable = |state: &SessionState| {
            state.phase == Phase::Closed || (state.has_lease() && Some(state.lease) != not)
        };
        let mut states = self.state.subscribe();
        let state = match tokio::time::timeout(timeout, states.wait_for(usable)).await {
            Ok(Ok(state)) => *state,
            Ok(Err(_)) => return Err(Error::Closed),
            Err(_) => {
                return Err(Error::Timeout {
                    operation: format!("{request}: waiting for a new lease"),
                    timeout,
                })
            }
        };
        if state.phase == Phase::Closed {
            return Err(Error::Closed);
        }
        Ok((state.lease, state.generation))
    }

    fn temp_keys(&self) -> MutexGuard<'_, BTreeMap<String, String>> {
        locked(&self.temp_keys)
    }

    /// Remembers a temp key (stored form) and its value, to be put back if the lease is ever
    /// lost.
    pub(crate) fn remember_temp_key(&self, stored: &str, value: &str) {
        let mut keys = self.temp_keys();
        match keys.get_mut(stored) {
            Some(remembered) if remembered == value => {}
            Some(remembered) => value.clone_into(remembered),
            None => {
                keys.insert(stored.to_owned(), value.to_owned());
            }
        }
        self.has_temp_keys.store(true, Ordering::Release);
    }

    /// The key (stored form) is no longer bound to the lease: a plain write or a delete.
    /// Without temp keys (the usual case) this takes no lock.
    pub(crate) fn forget_temp_key(&self, stored: &str) {
        if !self.has_temp_keys.load(Ordering::Acquire) {
            return;
        }
        let mut keys = self.temp_keys();
        if keys.remove(stored).is_some() && keys.is_empty() {
            self.has_temp_keys.store(false, Ordering::Release);
        }
    }

    /// Every key (stored form) starting with `stored_prefix` is no longer bound to the lease:
    /// a prefix delete.
    pub(crate) fn forget_temp_prefix(&self, stored_prefix: &str) {
        if !self.has_temp_keys.load(Ordering::Acquire) {
            return;
        }
        let mut keys = self.temp_keys();
        keys.retain(|key, _| !key.starts_with(stored_prefix));
        if keys.is_empty() {
            self.has_temp_keys.store(false, Ordering::Release);
        }
    }

    fn is_temp_key(&self, stored: &str) -> bool {
        self.has_temp_keys.load(Ordering::Acquire) && self.temp_keys().contains_key(stored)
    }
}

fn valid_until(sent_at: Instant, ttl: i64) -> Instant {
    let ttl = Duration::from_secs(ttl.max(0).unsigned_abs());
    (sent_at + ttl)
        .checked_sub(VALIDITY_MARGIN)
        .unwrap_or(sent_at)
}

impl Shared {
    /// `temp_key` and `store_temp`: stores `value` at `key` bound to the lease and remembers
    /// both, so the key can be put back if the lease is ever lost. If etcd says the lease is
    /// gone, the owner is told and the put runs once more on the new lease.
    pub(crate) async fn put_temp_key(&self, key: &str, value: &str) -> Result<()> {
        let stored = self.prefix.apply(key);
        // Remembered first, so that a restore running meanwhile puts it back too.
        self.session.remember_temp_key(&stored, value);
        let request = Request::new("put temp key", key);
        let timeout = self.options.request_timeout;
        let mut not = None;
        let outcome = loop {
            let lease = match self.session.live_lease(not, timeout, request).await {
                Ok((lease, _)) => lease,
                Err(err) => break Err(err),
            };
            let options = PutOptions::new().with_lease(lease);
            let put = async |kv: &mut KvClient| {
                resending!(
                    Resend::Write,
                    kv.put(stored.as_str(), value, Some(options.clone())).await
                )
            };
            match self.kv_bounded(request, put).await {
                Ok(Ok(_)) => break Ok(()),
                Ok(Err(err)) if is_lease_not_found(&err) && not.is_none() => {
                    self.session.report_lost(lease);
                    not = Some(lease);
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

/// Why the owner stopped keeping a lease alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseEnd {
    /// etcd said it is gone.
    Gone,
    /// Not confirmed in time: etcd may have expired it, or may still keep it.
    Unconfirmed,
    /// The handle gave it up (see [`Session::give_up`]): etcd still keeps it.
    GivenUp,
    /// The handle is closed or dropped.
    Shutdown,
}

/// The session's owner: keeps the lease alive, replaces it when lost and has the temp keys
/// put back, until the handle is closed or dropped.
pub(crate) async fn run(shared: Arc<Shared>) {
    let Some(mut reports) = locked(&shared.session.reports_inbox).take() else {
        return;
    };
    let mut shutdown = shared.shutdown.subscribe();
    let session = &shared.session;
    // The lease was granted by connect a moment ago: its first renewal is due in one interval,
    // not now. A short-lived handle never opens a keep-alive stream.
    let interval = renewal_interval(session.ttl());
    let mut first_pause = Some(interval);
    // The restore of the current generation, if one is running.
    let mut restore: Option<AbortOnDrop> = None;
    loop {
        let SessionState {
            lease, generation, ..
        } = session.state();
        let end = keep_alive(
            &shared,
            lease,
            first_pause.take(),
            &mut reports,
            &mut shutdown,
        )
        .await;
        if end == LeaseEnd::Shutdown {
            return;
        }
        tracing::warn!(lease = %lease_hex(lease), reason = ?end, "the lease is lost; taking a new one");
        hmetcd_core::instrument::lease_lost("etcd");
        session.publish(|state| {
            if state.generation == generation {
                state.phase = Phase::Lost;
            }
        });
        restore.take();
        let Some((new_lease, sent_at, ttl)) = grant(&shared, &mut shutdown).await else {
            return;
        };
        tracing::info!(lease = %lease_hex(new_lease), "took a new lease");
        session.publish(|state| {
            *state = SessionState {
                lease: new_lease,
                generation: generation + 1,
                valid_until: valid_until(sent_at, ttl),
                phase: Phase::Restoring,
            };
        });
        if matches!(end, LeaseEnd::Unconfirmed | LeaseEnd::GivenUp) {
            locked(&session.unconfirmed).push(lease);
        }
        restore = Some(AbortOnDrop(tokio::spawn(restore_session(
            Arc::clone(&shared),
            new_lease,
            generation + 1,
        ))));
    }
}

/// etcd's own clients renew at a third of the TTL.
fn renewal_interval(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(100))
}

/// Grants a new lease, retrying until etcd answers. `None` if the handle was shut down; a
/// lease granted while it was is revoked at once, so nothing outlives `close()`.
async fn grant(
    shared: &Shared,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(i64, Instant, i64)> {
    let mut backoff = Backoff::new();
    let request = Request::keyless("lease grant");
    loop {
        if *shutdown.borrow() {
            return None;
        }
        shared.pauses.reached(PausePoint::LeaseGrant).await;
        let sent_at = Instant::now();
        let mut leases = shared.client.lease_client();
        // Not raced with the shutdown: a grant that etcd performs must be seen, to revoke it.
        match shared
            .request(request, leases.grant(shared.session.ttl, None))
            .await
        {
            Ok(granted) if *shutdown.borrow() => {
                revoke_quietly(shared, granted.id()).await;
                return None;
            }
            Ok(granted) => return Some((granted.id(), sent_at, granted.ttl())),
            Err(err) => {
                tracing::debug!(error = %err, "cannot take a new lease yet; retrying");
                if !pause_unless_shut_down(backoff.next_pause(), shutdown).await {
                    return None;
                }
            }
        }
    }
}

async fn revoke_quietly(shared: &Shared, lease: i64) {
    let mut leases = shared.client.lease_client();
    if let Err(err) = shared
        .request(Request::keyless("lease revoke"), leases.revoke(lease))
        .await
    {
        tracing::debug!(error = %err, lease = %lease_hex(lease), "could not revoke the lease; it expires by itself");
    }
}

/// Keeps `lease` alive until it is lost or the handle shuts down.
async fn keep_alive(
    shared: &Shared,
    lease: i64,
    first_pause: Option<Duration>,
    reports: &mut mpsc::UnboundedReceiver<(i64, LeaseEnd)>,
    shutdown: &mut watch::Receiver<bool>,
) -> LeaseEnd {
    let renewing = async {
        if let Some(pause) = first_pause {
            tokio::time::sleep(pause).await;
        }
        renew(shared, lease).await
    };
    let reported = async {
        loop {
            match reports.recv().await {
                Some((reported, end)) if reported == lease => return end,
                Some(_) => {}
                // Unreachable: the session holds a sender.
                None => std::future::pending::<()>().await,
            }
        }
    };
    let mut states = shared.session.subscribe();
    let expired = async {
        loop {
            let until = states.borrow_and_update().valid_until;
            tokio::select! {
                () = tokio::time::sleep_until(until) => return,
                changed = states.changed() => if changed.is_err() {
                    return std::future::pending().await;
                },
            }
        }
    };
    tokio::select! {
        () = shut_down(shutdown) => LeaseEnd::Shutdown,
        end = renewing => end,
        end = reported => end,
        () = expired => LeaseEnd::Unconfirmed,
    }
}

/// Renews `lease` every interval, reopening the keep-alive stream when it breaks; returns
/// only when etcd says the lease is gone (the caller also stops it when the lease's validity
/// runs out unconfirmed).
async fn renew(shared: &Shared, lease: i64) -> LeaseEnd {
    let interval = renewal_interval(shared.session.ttl());
    let mut backoff = Backoff::new();
    loop {
        let mut leases = shared.client.lease_client();
        match shared
            .bounded(
                Request::keyless("lease keep-alive"),
                leases.keep_alive(lease),
            )
            .await
        {
            Ok(Ok((keeper, answers))) => {
                if renew_until_broken(shared, lease, keeper, answers, interval, &mut backoff).await
                {
                    return LeaseEnd::Gone;
                }
            }
            Ok(Err(err)) if is_lease_not_found(&err) => return LeaseEnd::Gone,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, lease = %lease_hex(lease), "lease keep-alive failed; retrying");
            }
            Err(err) => {
                tracing::warn!(error = %err, lease = %lease_hex(lease), "lease keep-alive timed out; retrying");
            }
        }
        tokio::time::sleep(backoff.next_pause().min(interval)).await;
    }
}

/// Renews `lease` every `interval` over one keep-alive stream, publishing each confirmed
/// validity. Returns `true` when etcd says the lease is gone, `false` when the stream broke.
async fn renew_until_broken(
    shared: &Shared,
    lease: i64,
    mut keeper: LeaseKeeper,
    mut answers: LeaseKeepAliveStream,
    interval: Duration,
    backoff: &mut Backoff,
) -> bool {
    // An answer slower than half the interval means a stuck member: reopening the stream (on
    // another member) while the lease still has two thirds of its TTL left beats waiting.
    let answer_timeout = shared.options.request_timeout.min(interval / 2);
    loop {
        shared.pauses.reached(PausePoint::KeepAliveRenewal).await;
        let sent_at = Instant::now();
        if keeper.keep_alive().await.is_err() {
            return false;
        }
        match tokio::time::timeout(answer_timeout, answers.message()).await {
            Ok(Ok(Some(answer))) if answer.ttl() > 0 => {
                backoff.reset();
                let confirmed = valid_until(sent_at, answer.ttl());
                shared.session.publish(|state| {
                    if state.lease == lease && confirmed > state.valid_until {
                        state.valid_until = confirmed;
                    }
                });
            }
            Ok(Ok(Some(_))) => return true,
            Ok(Ok(None)) => return false,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, lease = %lease_hex(lease), "lease keep-alive stream broke");
                return false;
            }
            Err(_) => {
                tracing::warn!(lease = %lease_hex(lease), "no keep-alive answer in time; reopening the stream");
                return false;
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// After a new lease: revokes the leases etcd may still keep, then puts every temp key back
/// on the new one, and marks the session live. Retries until done; the owner aborts it if the
/// new lease is lost meanwhile.
async fn restore_session(shared: Arc<Shared>, lease: i64, generation: u64) {
    let mut backoff = Backoff::new();
    // Our keys on them (temp keys, lock keys) go now rather than when etcd expires them.
    let request = Request::keyless("lease revoke");
    loop {
        let Some(&old) = locked(&shared.session.unconfirmed).first() else {
            break;
        };
        shared.pauses.reached(PausePoint::LostLeaseRevoke).await;
        let mut leases = shared.client.lease_client();
        let revoked = match shared.bounded(request, leases.revoke(old)).await {
            Ok(Ok(_)) => true,
            Ok(Err(err)) if is_lease_not_found(&err) => true,
            Ok(Err(err)) => {
                tracing::debug!(error = %err, lease = %lease_hex(old), "cannot revoke a lost lease yet; retrying");
                false
            }
            Err(err) => {
                tracing::debug!(error = %err, lease = %lease_hex(old), "cannot revoke a lost lease yet; retrying");
                false
            }
        };
        if revoked {
            locked(&shared.session.unconfirmed).retain(|&unconfirmed| unconfirmed != old);
        } else {
            tokio::time::sleep(backoff.next_pause()).await;
        }
    }
    loop {
        shared.pauses.reached(PausePoint::RestoreTempKeys).await;
        match restore_temp_keys(&shared, lease).await {
            Ok(restored) => {
                tracing::info!(lease = %lease_hex(lease), restored, "temp keys are back on the new lease");
                break;
            }
            Err(Error::Closed) => return,
            // A restore transaction whose answer never came may still reach etcd, any time
            // later (a paused member, a slow link): after this handle deleted or rewrote one
            // of its keys, it would put the key back on this lease, where nothing of the
            // handle would ever delete it again. The lease is given up instead: revoked
            // before the keys go back on the next one, so such a transaction fails when it
            // arrives, or its keys go with the lease.
            Err(err @ (Error::Timeout { .. } | Error::Unavailable { .. })) => {
                tracing::warn!(error = %err, lease = %lease_hex(lease), "putting the temp keys back got no answer; giving the lease up for a new one");
                shared.session.give_up(lease);
                return;
            }
            Err(err) => {
                tracing::debug!(error = %err, "cannot put the temp keys back yet; retrying");
                tokio::time::sleep(backoff.next_pause()).await;
            }
        }
    }
    shared.session.publish(|state| {
        if state.generation == generation && state.phase == Phase::Restoring {
            state.phase = Phase::Live;
        }
    });
}

/// Puts every temp key back on `lease` where it is absent, in batches; returns how many it put.
/// A key present on `lease` is already back (a `temp_key` call did it); a key present otherwise
/// was written by someone else since, and is theirs. A key etcd refuses to put back even alone
/// (its value fills the request limit) is given up, with a warning.
async fn restore_temp_keys(shared: &Shared, lease: i64) -> Result<usize> {
    let keys: Vec<(String, String)> = shared
        .session
        .temp_keys()
        .iter()
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    let mut restored = 0;
    let mut size = RESTORE_BATCH;
    let mut rest = keys.as_slice();
    while !rest.is_empty() {
        let take = batch_len(rest, size);
        let (batch, after) = rest.split_at(take);
        match restore_batch(shared, lease, batch).await? {
            Some(count) => {
                restored += count;
                rest = after;
            }
            None if size > 1 => {
                size = (take / 2).max(1);
                tracing::debug!(
                    size,
                    "etcd finds the restore transaction too big; making it smaller"
                );
            }
            None => {
                // The key's own put fit etcd's request limit, the guarded put around it does
                // not: it cannot come back on any lease, and must not keep the keys after it
                // from coming back.
                let (key, value) = &batch[0];
                tracing::warn!(
                    key = %key,
                    value_bytes = value.len(),
                    "etcd refuses to put this temp key back even alone (the request is too large); it stays gone"
                );
                shared.session.forget_temp_key(key);
                rest = after;
                size = RESTORE_BATCH;
            }
        }
    }
    Ok(restored)
}

/// Whether etcd refused a transaction for its size (`max-txn-ops`, the request size limit).
fn is_too_big(err: &etcd_client::Error) -> bool {
    let text = err.to_string();
    text.contains("too many operations in txn request") || text.contains("request is too large")
}

/// How many of `keys` the next restore transaction takes: up to `size` keys and about
/// [`RESTORE_BATCH_BYTES`] of keys and values, at least one.
fn batch_len(keys: &[(String, String)], size: usize) -> usize {
    let mut take = 0;
    let mut bytes = 0;
    while take < keys.len().min(size) && (take == 0 || bytes < RESTORE_BATCH_BYTES) {
        let (key, value) = &keys[take];
        bytes += key.len() + value.len();
        take += 1;
    }
    take
}

/// Puts one batch back, each key with its value; how many keys it put, or `None` when etcd
/// finds the batch too big.
async fn restore_batch(
    shared: &Shared,
    lease: i64,
    keys: &[(String, String)],
) -> Result<Option<usize>> {
    let request = Request::keyless("put temp keys back");
    let options = PutOptions::new().with_lease(lease);
    let ops: Vec<TxnOp> = keys
        .iter()
        .map(|(key, value)| {
            TxnOp::txn(
                Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key.as_str(),
                        value.as_str(),
                        Some(options.clone()),
                    )])
                    .or_else([TxnOp::get(key.as_str(), None)]),
            )
        })
        .collect();
    let txn = Txn::new().and_then(ops);
    let answer = match shared
        .kv_bounded(request, async |kv| kv.txn(txn).await)
        .await?
    {
        Ok(answer) => answer,
        Err(err) if is_lease_not_found(&err) => {
            shared.session.report_lost(lease);
            return Err(shared.errors.map(request, err));
        }
        Err(err) if is_too_big(&err) => return Ok(None),
        Err(err) => return Err(shared.errors.map(request, err)),
    };
    let revision = answer.header().map_or(0, |header| header.revision());
    let mut restored = 0;
    let mut withdrawn = Vec::new();
    for ((key, _), response) in keys.iter().zip(answer.op_responses()) {
        let TxnOpResponse::Txn(outcome) = response else {
            continue;
        };
        if outcome.succeeded() {
            restored += 1;
            // Deleted or overwritten by this handle while the batch was under way: not ours.
            if !shared.session.is_temp_key(key) {
                withdrawn.push(key.clone());
            }
            continue;
        }
        let found = outcome
            .op_responses()
            .into_iter()
            .find_map(|read| match read {
                TxnOpResponse::Get(read) => read.kvs().first().map(|kv| kv.lease()),
                _ => None,
            });
        if found.is_some_and(|owner| owner != lease) {
            tracing::info!(key = %key, "a temp key was written by someone else while the lease was lost; it is theirs now");
            shared.session.forget_temp_key(key);
        }
    }
    for key in withdrawn {
        // Only our own put of this batch: a later write by anyone stays.
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        shared
            .kv_request(request, async |kv| kv.txn(txn).await)
            .await?;
    }
    Ok(Some(restored))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(key: &str, bytes: usize) -> (String, String) {
        (key.to_owned(), "v".repeat(bytes))
    }

    #[test]
    fn restore_batches_count_values_too() {
        let small: Vec<_> = (0..100).map(|i| temp(&format!("k{i}"), 1)).collect();
        assert_eq!(batch_len(&small, RESTORE_BATCH), RESTORE_BATCH);
        assert_eq!(batch_len(&small[..3], RESTORE_BATCH), 3);
        assert_eq!(batch_len(&small, 5), 5);
        // Values count: two of 300 KiB fill a batch; one bigger than a batch goes alone.
        let big = [temp("a", 300 << 10), temp("b", 300 << 10), temp("c", 1)];
        assert_eq!(batch_len(&big, RESTORE_BATCH), 2);
        let huge = [temp("a", 1 << 20), temp("b", 1)];
        assert_eq!(batch_len(&huge, RESTORE_BATCH), 1);
        // A batch that reaches the byte budget exactly is full.
        let half = RESTORE_BATCH_BYTES / 2 - 1;
        let exact = [temp("a", half), temp("b", half), temp("c", 1)];
        assert_eq!(batch_len(&exact, RESTORE_BATCH), 2);
    }

    #[test]
    fn a_lock_is_held_only_under_its_own_live_generation_while_valid() {
        let session = Session::new(1, 10, 10, Instant::now());
        assert!(session.holds(0));
        assert!(!session.holds(1), "a generation not yet taken");
        session.publish(|state| state.phase = Phase::Lost);
        assert!(!session.holds(0), "the lease is lost");
        session.publish(|state| {
            *state = SessionState {
                lease: 2,
                generation: 1,
                valid_until: valid_until(Instant::now(), 10),
                phase: Phase::Restoring,
            };
        });
        assert!(session.holds(1));
        assert!(!session.holds(0), "a lock of the lost lease's generation");
        session.publish(|state| state.valid_until = Instant::now());
        assert!(!session.holds(1), "validity ran out unconfirmed");
        session.publish(|state| state.phase = Phase::Closed);
        assert!(!session.holds(1));
    }

    #[tokio::test]
    async fn a_lock_is_granted_only_with_a_renewal_interval_of_validity_ahead() {
        let session = Arc::new(Session::new(1, 3, 3, Instant::now()));
        assert!(session.ready_to_grant(0).await, "a fresh lease");
        assert!(
            !session.ready_to_grant(1).await,
            "a generation not yet taken"
        );
        // The renewal is overdue: less than a third of the TTL of validity is left.
        session.publish(|state| state.valid_until = Instant::now() + Duration::from_millis(500));
        let waiting = tokio::spawn({
            let session = Arc::clone(&session);
            async move { session.ready_to_grant(0).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "granted with 500 ms of a 3 s lease left"
        );
        session.publish(|state| state.valid_until = valid_until(Instant::now(), 3));
        assert!(waiting.await.unwrap(), "renewed: granted");
        session.publish(|state| state.valid_until = Instant::now());
        let waiting = tokio::spawn({
            let session = Arc::clone(&session);
            async move { session.ready_to_grant(0).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        session.publish(|state| state.phase = Phase::Lost);
        assert!(!waiting.await.unwrap(), "lost: queue again");
    }

    #[test]
    fn temp_keys_remember_their_values() {
        let session = Session::new(1, 10, 10, Instant::now());
        session.remember_temp_key("p/a", "1");
        session.remember_temp_key("p/a", "two");
        session.remember_temp_key("p/b/c", "x");
        session.remember_temp_key("q", "y");
        assert_eq!(
            session.temp_keys().get("p/a").map(String::as_str),
            Some("two")
        );
        session.forget_temp_prefix("p/");
        assert!(!session.is_temp_key("p/a") && !session.is_temp_key("p/b/c"));
        assert!(session.is_temp_key("q"));
        session.forget_temp_key("q");
        assert!(!session.has_temp_keys.load(Ordering::Acquire));
    }

    #[test]
    fn forgetting_one_temp_key_keeps_the_others() {
        let session = Session::new(1, 10, 10, Instant::now());
        session.remember_temp_key("a", "1");
        session.remember_temp_key("b", "2");
        session.forget_temp_key("a");
        assert!(!session.is_temp_key("a"));
        assert!(session.is_temp_key("b"), "b was forgotten with a");
        session.forget_temp_key("never");
        assert!(
            session.is_temp_key("b"),
            "b was forgotten with a key never put"
        );
        session.forget_temp_key("b");
        assert!(!session.is_temp_key("b"));
        assert!(!session.has_temp_keys.load(Ordering::Acquire));
    }
}
