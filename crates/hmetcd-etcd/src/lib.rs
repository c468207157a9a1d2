//! The etcd backend of hmetcd: [`EtcdKvs`] implements [`hmetcd_core::Kvi`] over
//! [etcd-client](https://docs.rs/etcd-client).
//!
//! - Opening connects at once and fails with `Error::Unavailable` when no endpoint answers
//!   within `connect_timeout`; every single request is bounded by `request_timeout`.
//! - Each handle owns one lease (`lease_ttl`) for its temporary keys and its lock session. One
//!   background task owns it: it keeps it alive, counts it lost when etcd says so or when no
//!   keep-alive was confirmed within the TTL (measured from when the last confirmed one was
//!   sent), then takes a new lease and puts the temp keys back, each only where it is absent.
//!   Locks taken under a lost lease are lost: `is_held()` turns false, `lost()` resolves.
//! - The distributed lock is etcd's own lock layout (`<prefix><lock_name>/<lease id in hex>`,
//!   as Go's `concurrency.Mutex` writes it), so Go services using the same lock name and this
//!   library exclude each other. The `prefix` option applies to the lock name as well; with
//!   no prefix the keys are exactly Go's.
//! - Named locks (`lock`, `lock_with`) use the same layout under their own names; a handle's own
//!   participants for one name (its guards, and `dist_lock` for `lock_name`) queue locally first,
//!   since the handle has one lease and so one waiter key per name. Only keys
//!   `<name>/<lease hex>` are participants. A guard's fencing token is its key's create
//!   revision; a guard whose key someone deletes is lost (`LostReason::KeyDeleted`). The keys of
//!   attempts that gave up or were cancelled are deleted in the background until etcd confirms.
//! - Watches are registered before `watch_stream`/`watch_prefix` return, deliver every event in
//!   revision order, and resume after an etcd restart from the last delivered revision. All
//!   watches of a handle share one etcd watch stream (a gRPC stream on the handle's connection,
//!   opened on first use); each is one etcd watch on it, cancelled when its stream is dropped.
//! - Reads (`get_range`, `get_kv`, `get_prefix`, `list`, transaction gets) return etcd's
//!   metadata (create and mod revision, version, lease); `leader()` and `observe()` leave it 0.
//!   Big reads are paged at the first page's revision, so they are one snapshot, and no page
//!   response is bigger than 4 MiB: a page too big to decode is asked for again with fewer keys.
//! - `txn` is one etcd transaction; `Op::put_temp` and `store_temp` put keys on the handle's
//!   lease, and like temp keys they are put back, with their values, after a lease loss.
//!   `watch_prefix_from` replays history from a revision on the shared watch stream.
//! - With several endpoints, each member is asked for its status about twice a second; one that
//!   does not answer (or has no leader) gets no requests until it answers again.
//! - With `user`/`password`, an expired or invalid token is refreshed and the request retried
//!   once (etcd-client's automatic token refresh).
//!
//! ```no_run
//! use hmetcd_core::Kvi;
//! use hmetcd_etcd::EtcdKvs;
//!
//! # async fn example() -> hmetcd_core::Result<()> {
//! let kv = EtcdKvs::connect("http://127.0.0.1:2379", "request_timeout=2s, prefix=svc/").await?;
//! kv.store("config/mode", "active").await?;
//! assert_eq!(kv.get("config/mode").await?.as_deref(), Some("active"));
//!
//! kv.dist_lock().await?;
//! // ... work that only one process may do at a time ...
//! kv.dist_unlock().await?;
//!
//! kv.close().await?;
//! # Ok(())
//! # }
//! ```

mod coalesce;
mod connect;
mod data;
mod election;
mod error;
mod lock;
mod members;
mod pause;
mod pool;
mod range;
mod retry;
mod server_version;
mod session;
mod watch;

#[doc(hidden)]
pub use coalesce::CoalesceStats;
#[cfg(feature = "pause-points")]
#[doc(hidden)]
pub use pause::{PausePoint, PausePoints};

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, Compare, Txn, TxnOp};
use hmetcd_core::instrument::Call;
use hmetcd_core::keys::{check_key, KeyPrefix};
use hmetcd_core::{
    CompareOp, Endpoint, Error, EtcdUrl, KeyChange, KeyValue, Kvi, LeaderStream, Leadership,
    ListPage, ListRequest, LockGuard, LockOptions, Options, Result, TxnOutcome, UpdateFn,
    WatchCallback, WatchEvent, WatchHandle, WatchStream,
};

use crate::error::{ErrorContext, Request};
use crate::retry::{resending, AbortOnDrop, Resend};
use crate::session::Session;

/// A handle on an etcd cluster, implementing [`Kvi`].
///
/// Create it with [`EtcdKvs::connect`] (or [`EtcdKvs::connect_with`]); it is `Send + Sync`, so
/// one handle (for example in an `Arc`) serves many tasks. Call [`Kvi::close`] when done: it
/// revokes the handle's lease, so its temporary keys and its lock go at once. A handle dropped
/// without closing stops its background tasks, and its lease expires within `lease_ttl`.
///
/// Many tasks on one handle is the fast way to use it: while a few plain calls (`get`,
/// `get_kv`, `store`, `delete`) are in flight, the ones that queue behind them go out together
/// as one etcd transaction, each caller still getting exactly its own answer (the `coalesce`
/// option, on by default; `coalesce=off` sends each call alone).
pub struct EtcdKvs {
    shared: Arc<Shared>,
    /// The session's owner task (see [`session`]).
    session_owner: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// With several endpoints, the member health checks.
    background: Mutex<Vec<AbortOnDrop>>,
}

/// What the handle and its background tasks share.
pub(crate) struct Shared {
    client: Client,
    errors: ErrorContext,
    options: Options,
    prefix: KeyPrefix,
    closed: AtomicBool,
    /// Becomes `true` when the handle is closed or dropped; watches and lock waits end on it.
    shutdown: tokio::sync::watch::Sender<bool>,
    session: Session,
    lock: lock::LockState,
    /// The handle's one etcd watch stream, shared by all its watchers.
    watches: watch::WatchHub,
    /// Idle KV clients for requests to borrow.
    kv_pool: pool::KvPool,
    /// Batches concurrent plain calls (see [`coalesce`]); `None` with `coalesce=off`.
    coalescer: Option<coalesce::Coalescer>,
    /// Whether the servers survive a read-only transaction cancelled in flight.
    read_only_txns: server_version::ReadOnlyTxns,
    /// Where tests can hold the background work (empty without the `pause-points` feature).
    pauses: pause::PausePoints,
}

impl EtcdKvs {
    /// Connects to the etcd cluster at `endpoints` (`http://h:p`, `https://h:p`, `h:p`, or a
    /// comma-separated list of them) with `options` (`""` or `name=value` pairs, see
    /// [`Options`]).
    ///
    /// Fails with `Error::InvalidEndpoint` for anything that is not an etcd address (a `mem:`
    /// endpoint included), `Error::InvalidOption` for a bad option, and `Error::Unavailable`
    /// when no endpoint answers within `connect_timeout`.
    pub async fn connect(endpoints: &str, options: &str) -> Result<EtcdKvs> {
        let urls = match Endpoint::parse(endpoints)? {
            Endpoint::Etcd(urls) => urls,
            Endpoint::Memory { .. } => {
                return Err(Error::InvalidEndpoint {
                    endpoint: endpoints.to_owned(),
                    reason: "an in-memory endpoint; the etcd backend needs http://host:port, \
                             https://host:port or host:port"
                        .to_owned(),
                })
            }
        };
        EtcdKvs::connect_with(&urls, Options::parse(options)?).await
    }

    /// Connects to the etcd cluster at `urls` with parsed `options`; see [`EtcdKvs::connect`].
    pub async fn connect_with(urls: &[EtcdUrl], options: Options) -> Result<EtcdKvs> {
        let errors = ErrorContext {
            endpoints: connect::joined(urls),
            user: options.user.clone(),
            request_timeout: options.request_timeout,
        };
        let (dial, connect_options) = connect::connect_arguments(urls, &options)?;
        let ttl = lease_seconds(options.lease_ttl);
        let connecting = async {
            let client = Client::connect(&dial, Some(connect_options))
                .await
                .map_err(|err| match err {
                    etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => {
                        Error::InvalidEndpoint {
                            endpoint: errors.endpoints.clone(),
                            reason: err.to_string(),
                        }
                    }
                    err => errors.map(Request::keyless("connect"), err),
                })?;
            // Granting the lease is the first request: it proves a member answers and has a leader.
            // The server's version (see `server_version`) is asked for at the same time.
            let granted_at = tokio::time::Instant::now();
            let mut lease_client = client.lease_client();
            let mut maintenance = client.maintenance_client();
            let (lease, status) = tokio::join!(lease_client.grant(ttl, None), maintenance.status());
            let lease = lease.map_err(|err| errors.map(Request::keyless("lease grant"), err))?;
            let version = match status {
                Ok(status) => Some(status.version().to_owned()),
                Err(err) => {
                    tracing::debug!(error = %err, "the etcd server's version is not known");
                    None
                }
            };
            Ok::<_, Error>((client, lease.id(), lease.ttl(), granted_at, version))
        };
        let (client, lease, granted_ttl, granted_at, version) =
            tokio::time::timeout(options.connect_timeout, connecting)
                .await
                .map_err(|_| {
                    errors.unavailable(
                        format!(
                            "no endpoint answered within connect_timeout ({:?})",
                            options.connect_timeout
                        ),
                        None,
                    )
                })??;
        tracing::debug!(endpoints = %errors.endpoints, lease = %lease_hex(lease), "connected to etcd");

        let prefix = KeyPrefix::new(options.prefix.clone());
        let (shutdown, _) = tokio::sync::watch::channel(false);
        let read_only_txns = server_version::ReadOnlyTxns::default();
        // With one server, its answer above is the version; with several, the member health
        // checks learn every member's.
        if connect::distinct_members(urls) == 1 {
            read_only_txns.set_from([version.as_deref()]);
        }
        let coalescer = options.coalesce.then(|| {
            coalesce::Coalescer::new(
                client.clone(),
                options.request_timeout,
                read_only_txns.clone(),
            )
        });
        let shared = Arc::new(Shared {
            client,
            errors,
            session: Session::new(lease, ttl, granted_ttl, granted_at),
            options,
            prefix,
            closed: AtomicBool::new(false),
            shutdown,
            lock: lock::LockState::default(),
            watches: watch::WatchHub::new(),
            kv_pool: pool::KvPool::new(),
            coalescer,
            read_only_txns,
            pauses: pause::PausePoints::new(),
        });
        let owner = tokio::spawn(session::run(Arc::clone(&shared)));
        let background = members::spawn_health_task(
            &shared.client,
            urls,
            &shared.options,
            shared.read_only_txns.clone(),
            shared.shutdown.subscribe(),
        )
        .into_iter()
        .collect();
        Ok(EtcdKvs {
            shared,
            session_owner: Mutex::new(Some(owner)),
            background: Mutex::new(background),
        })
    }

    /// The handle's pause points, for tests that stage a fault at an exact step.
    #[cfg(feature = "pause-points")]
    #[doc(hidden)]
    pub fn pause_points(&self) -> &PausePoints {
        &self.shared.pauses
    }

    /// How many lock names the handle keeps a local mutex for: none once no guard, lock wait
    /// or background delete of the handle needs one (for tests of its bookkeeping).
    #[cfg(feature = "pause-points")]
    #[doc(hidden)]
    pub fn lock_names_in_use(&self) -> usize {
        self.shared.lock.local_names()
    }

    /// What coalescing has done on this handle so far; all zero with `coalesce=off`.
    #[doc(hidden)]
    pub fn coalesce_stats(&self) -> CoalesceStats {
        self.shared
            .coalescer
            .as_ref()
            .map(coalesce::Coalescer::stats)
            .unwrap_or_default()
    }

    /// Stops the session's owner: at once (drop), or letting a lease grant under way finish so
    /// that the owner revokes what it granted (close, bounded by `request_timeout`).
    async fn stop_session_owner(&self) {
        let owner = self
            .session_owner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(mut owner) = owner {
            let limit = self.shared.options.request_timeout + Duration::from_secs(1);
            if tokio::time::timeout(limit, &mut owner).await.is_err() {
                owner.abort();
            }
        }
    }

    fn stop_background(&self) {
        let tasks = std::mem::take(
            &mut *self
                .background
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        drop(tasks);
    }
}

impl Drop for EtcdKvs {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        self.stop_background();
        if let Some(owner) = self
            .session_owner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
        {
            owner.abort();
        }
    }
}

impl fmt::Debug for EtcdKvs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = &self.shared;
        f.debug_struct("EtcdKvs")
            .field("endpoints", &shared.errors.endpoints)
            .field("user", &shared.options.user)
            .field("prefix", &shared.options.prefix)
            .field("lock_name", &shared.options.lock_name)
            .field("lease", &lease_hex(shared.session.current_lease()))
            .field("closed", &shared.closed.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

/// etcd counts lease TTLs in whole seconds; the options parser already insists on them.
fn lease_seconds(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1)
}

/// A lease id the way Go's `fmt.Sprintf("%x", id)` writes it, as lock keys need.
pub(crate) fn lease_hex(id: i64) -> String {
    if id < 0 {
        format!("-{:x}", id.unsigned_abs())
    } else {
        format!("{id:x}")
    }
}

impl Shared {
    fn ensure_open(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Runs one KV request on a borrowed client (see [`pool`]), bounded and mapped like
    /// [`Shared::request`].
    pub(crate) async fn kv_request<T>(
        &self,
        request: Request<'_>,
        call: impl AsyncFnOnce(&mut etcd_client::KvClient) -> Result<T, etcd_client::Error>,
    ) -> Result<T> {
        self.kv_bounded(request, call)
            .await?
            .map_err(|err| self.errors.map(request, err))
    }

    /// [`Shared::kv_request`] leaving etcd's own error unmapped, like [`Shared::bounded`].
    pub(crate) async fn kv_bounded<T>(
        &self,
        request: Request<'_>,
        call: impl AsyncFnOnce(&mut etcd_client::KvClient) -> Result<T, etcd_client::Error>,
    ) -> Result<Result<T, etcd_client::Error>> {
        let mut kv = self.kv_pool.take(&self.client);
        // The request future (kilobytes, from etcd-client) gets its own box: the boxed
        // future of the trait method stays small, instead of holding it twice.
        let answer = self.bounded(request, Box::pin(call(&mut kv))).await;
        // A timed-out request leaves the client fit for the next one; a cancelled one drops it.
        self.kv_pool.give_back(kv);
        answer
    }

    /// Sends a read-only transaction (reads only). Where the servers crash on a read-only
    /// transaction cancelled in flight (see [`server_version`]), it goes out on a task of its
    /// own that is never cancelled: the caller's wait is still bounded by `request_timeout`.
    pub(crate) async fn read_only_txn(
        &self,
        request: Request<'_>,
        txn: etcd_client::Txn,
    ) -> Result<Result<etcd_client::TxnResponse, etcd_client::Error>> {
        if self.read_only_txns.cancel_safe() {
            return self
                .kv_bounded(request, async |kv| {
                    resending!(Resend::Read, kv.txn(txn.clone()).await)
                })
                .await;
        }
        let mut kv = self.kv_pool.take(&self.client);
        let finishing =
            tokio::spawn(async move { resending!(Resend::Read, kv.txn(txn.clone()).await) });
        match tokio::time::timeout(self.options.request_timeout, finishing).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(join)) => Err(Error::Backend {
                operation: request.to_string(),
                reason: format!("the request's task ended without an answer: {join}"),
                source: None,
            }),
            Err(_) => Err(self.errors.timeout(request)),
        }
    }

    /// Runs one plain operation, coalesced with other calls' (see [`coalesce`]) unless
    /// `coalesce=off`, bounded by `request_timeout` and mapped like [`Shared::request`].
    pub(crate) async fn plain(
        &self,
        request: Request<'_>,
        op: coalesce::PlainOp,
    ) -> Result<etcd_client::TxnOpResponse> {
        // Sent alone: with coalescing off, or on a lane held until the answer is in.
        let (_lane, op) = match &self.coalescer {
            None => (None, op),
            Some(coalescer) => match coalescer.route(op) {
                coalesce::Route::Alone(lane, op) => (lane, op),
                coalesce::Route::Queued(answer) => {
                    return match tokio::time::timeout(self.options.request_timeout, answer).await {
                        Ok(Ok(Ok(answer))) => Ok(answer),
                        Ok(Ok(Err(err))) => Err(self.errors.map(request, err)),
                        // The batch timed out (or the runtime is going away): outcome unknown.
                        Ok(Err(_)) | Err(_) => Err(self.errors.timeout(request)),
                    };
                }
            },
        };
        self.kv_request(request, async |kv| op.send_alone(kv).await)
            .await
    }

    /// A plain read of one stored key (see [`Shared::plain`]).
    pub(crate) async fn plain_get(
        &self,
        request: Request<'_>,
        stored: Vec<u8>,
    ) -> Result<etcd_client::GetResponse> {
        match self.plain(request, coalesce::PlainOp::Get(stored)).await? {
            etcd_client::TxnOpResponse::Get(answer) => Ok(answer),
            _ => Err(Error::Backend {
                operation: request.to_string(),
                reason: "etcd answered a read with something else".to_owned(),
                source: None,
            }),
        }
    }

    /// Runs one etcd request, bounded by `request_timeout`, mapping its error.
    pub(crate) async fn request<T>(
        &self,
        request: Request<'_>,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        self.bounded(request, call)
            .await?
            .map_err(|err| self.errors.map(request, err))
    }

    /// Runs one etcd request bounded by `request_timeout`, leaving its own error unmapped
    /// for callers that treat some etcd errors specially.
    pub(crate) async fn bounded<T>(
        &self,
        request: Request<'_>,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<Result<T, etcd_client::Error>> {
        tokio::time::timeout(self.options.request_timeout, call)
            .await
            .map_err(|_| self.errors.timeout(request))
    }

    /// The text of a value read from etcd; never a lossy conversion.
    fn text(&self, key: &str, bytes: &[u8]) -> Result<String> {
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|source| Error::InvalidUtf8 {
                key: key.to_owned(),
                source,
            })
    }

    /// A key read from etcd as callers see it; `None` when it lies outside the prefix.
    fn shown_key<'a>(&self, stored: &'a [u8]) -> Result<Option<&'a str>> {
        let stored = std::str::from_utf8(stored).map_err(|source| Error::InvalidUtf8 {
            key: String::from_utf8_lossy(stored).into_owned(),
            source,
        })?;
        Ok(self.prefix.strip(stored))
    }

    async fn watch_key(&self, key: &str) -> Result<WatchStream> {
        self.ensure_open()?;
        check_key("key", key)?;
        self.open_watch_stream(watch::Target::key(key, &self.prefix))
            .await
    }
}

impl EtcdKvs {
    /// The span (and metrics) of one call: see `hmetcd_core::instrument`.
    fn call(&self, operation: &'static str, key: &str) -> Call {
        Call::start("etcd", Some(&self.shared.errors.endpoints), operation, key)
    }

    /// `temp_key` and `store_temp` (the span's `operation`): `value` on `key`, on the lease.
    async fn put_temp(&self, operation: &'static str, key: &str, value: &str) -> Result<()> {
        self.call(operation, key)
            .run(async {
                self.shared.ensure_open()?;
                check_key("key", key)?;
                self.shared.put_temp_key(key, value).await
            })
            .await
    }
}

#[async_trait]
impl Kvi for EtcdKvs {
    async fn dist_lock(&self) -> Result<()> {
        self.call("dist_lock", "")
            .run(async {
                self.shared.ensure_open()?;
                self.shared.acquire_lock(None).await
            })
            .await
    }

    async fn dist_timed_lock(&self, timeout: Duration) -> Result<()> {
        self.call("dist_timed_lock", "")
            .run(async {
                self.shared.ensure_open()?;
                self.shared
                    .acquire_lock(lock::deadline_after(Some(timeout)))
                    .await
            })
            .await
    }

    async fn dist_unlock(&self) -> Result<()> {
        self.call("dist_unlock", "")
            .run(async {
                self.shared.ensure_open()?;
                self.shared.release_lock().await
            })
            .await
    }

    async fn store(&self, key: &str, value: &str) -> Result<()> {
        self.call("store", key)
            .run(async {
                let shared = &self.shared;
                shared.ensure_open()?;
                check_key("key", key)?;
                let stored = shared.prefix.apply(key);
                // A plain put detaches the key from the lease: it is no longer temporary.
                shared.session.forget_temp_key(&stored);
                let put = coalesce::PlainOp::Put(stored.into_bytes(), value.as_bytes().to_vec());
                shared.plain(Request::new("put", key), put).await?;
                Ok(())
            })
            .await
    }

    async fn temp_key(&self, key: &str) -> Result<()> {
        self.put_temp("temp_key", key, session::TEMP_VALUE).await
    }

    async fn get(&self, key: &str) -> Result<Option<String>> {
        self.call("get", key)
            .run(async {
                let shared = &self.shared;
                shared.ensure_open()?;
                check_key("key", key)?;
                let stored = shared.prefix.apply(key).into_bytes();
                let answer = shared.plain_get(Request::new("get", key), stored).await?;
                answer
                    .kvs()
                    .first()
                    .map(|found| shared.text(key, found.value()))
                    .transpose()
            })
            .await
    }

    async fn get_range(&self, key_start: &str, key_end: &str) -> Result<Vec<KeyValue>> {
        self.call("get_range", key_start)
            .run(async {
                let shared = &self.shared;
                shared.ensure_open()?;
                // Answered here: etcd reads a range end of exactly "\0" as "every key from start on".
                let Some(range) = range::StoredRange::inclusive(&shared.prefix, key_start, key_end)
                else {
                    return Ok(Vec::new());
                };
                shared
                    .read_range(Request::new("get range from", key_start), &range)
                    .await
            })
            .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.call("delete", key)
            .run(async {
                let shared = &self.shared;
                shared.ensure_open()?;
                check_key("key", key)?;
                let stored = shared.prefix.apply(key);
                shared.session.forget_temp_key(&stored);
                let delete = coalesce::PlainOp::Delete(stored.into_bytes());
                shared.plain(Request::new("delete", key), delete).await?;
                Ok(())
            })
            .await
    }

    async fn transaction(
        &self,
        key: &str,
        op: CompareOp,
        value: &str,
        then_key: &str,
        then_value: &str,
        else_key: &str,
        else_value: &str,
    ) -> Result<bool> {
        self.call("transaction", key)
            .run(async {
                let shared = &self.shared;
                shared.ensure_open()?;
                check_key("key", key)?;
                check_key("then_key", then_key)?;
                check_key("else_key", else_key)?;
                let stored = shared.prefix.apply(key);
                let (then_stored, else_stored) =
                    (shared.prefix.apply(then_key), shared.prefix.apply(else_key));
                // etcd's value comparison on a missing key is false for every operator (there is no
                // value to compare), which is the contract's rule: one comparison says it all.
                // Built for each attempt: a resend needs its own, and the first costs no copy.
                let txn = || {
                    Txn::new()
                        .when([Compare::value(stored.as_str(), compare_op(op), value)])
                        .and_then([TxnOp::put(then_stored.as_str(), then_value, None)])
                        .or_else([TxnOp::put(else_stored.as_str(), else_value, None)])
                };
                let answer = shared
                    .kv_request(Request::new("transaction on", key), async |kv| {
                        resending!(Resend::Write, kv.txn(txn()).await)
                    })
                    .await?;
                let written = if answer.succeeded() {
                    &then_stored
                } else {
                    &else_stored
                };
                shared.session.forget_temp_key(written);
                Ok(answer.succeeded())
            })
            .await
    }

    async fn tas(&self, key: &str, test_value: &str, set_value: &str) -> Result<bool> {
        self.call("tas", key)
            .run(async {
                let shared = &self.shared;
                shared.ensure_open()?;
                check_key("key", key)?;
                let stored = shared.prefix.apply(key);
                // A missing key fails the value comparison: test-and-set on it is false.
                let txn = || {
                    Txn::new()
                        .when([Compare::value(
                            stored.as_str(),
                            etcd_client::CompareOp::Equal,
                            test_value,
                        )])
                        .and_then([TxnOp::put(stored.as_str(), set_value, None)])
                };
                let answer = shared
                    .kv_request(Request::new("test-and-set", key), async |kv| {
                        resending!(Resend::Write, kv.txn(txn()).await)
                    })
                    .await?;
                if answer.succeeded() {
                    shared.session.forget_temp_key(&stored);
                }
                Ok(answer.succeeded())
            })
            .await
    }

    async fn watch(&self, key: &str) -> Result<WatchEvent> {
        self.call("watch", key)
            .run(async { hmetcd_core::watch::first_event(self.watch_stream(key).await?).await })
            .await
    }

    async fn watch_with_cb(
        &self,
        key: &str,
        change: KeyChange,
        cb: WatchCallback,
    ) -> Result<WatchHandle> {
        self.call("watch_with_cb", key)
            .run(async {
                Ok(hmetcd_core::watch::spawn_callback_watcher(
                    self.watch_stream(key).await?,
                    change,
                    cb,
                ))
            })
            .await
    }

    fn watch_cb_cancel(&self, handle: WatchHandle) {
        handle.cancel();
    }

    async fn close(&self) -> Result<()> {
        self.call("close", "")
            .run(async {
                let shared = &self.shared;
                if shared.closed.swap(true, Ordering::SeqCst) {
                    return Ok(());
                }
                shared.shutdown.send_replace(true);
                self.stop_background();
                shared.lock.forget();
                // Once the owner has stopped nothing grants a lease again: the one revoked here is the
                // last, and keys put on it by calls racing this close go with it.
                self.stop_session_owner().await;
                // Revoking the lease removes the temp keys and the lock keys at once; so does revoking
                // a lost lease that etcd may still keep.
                let mut outcome = Ok(());
                for lease in shared.session.close() {
                    let mut leases = shared.client.lease_client();
                    let request = Request::keyless("lease revoke");
                    let revoked = match shared.bounded(request, leases.revoke(lease)).await {
                        Ok(Ok(_)) => Ok(()),
                        // Already gone (expired while etcd was unreachable): nothing left to remove.
                        Ok(Err(err)) if error::is_lease_not_found(&err) => Ok(()),
                        Ok(Err(err)) => Err(shared.errors.map(request, err)),
                        Err(timeout) => Err(timeout),
                    };
                    if outcome.is_ok() {
                        outcome = revoked;
                    }
                }
                outcome
            })
            .await
    }

    async fn watch_stream(&self, key: &str) -> Result<WatchStream> {
        self.call("watch_stream", key)
            .run(async { self.shared.watch_key(key).await })
            .await
    }

    async fn watch_prefix(&self, prefix: &str) -> Result<WatchStream> {
        self.call("watch_prefix", prefix)
            .run(async {
                let shared = &self.shared;
                shared.ensure_open()?;
                shared
                    .open_watch_stream(watch::Target::prefix(prefix, &shared.prefix))
                    .await
            })
            .await
    }

    async fn lock(&self, name: &str) -> Result<LockGuard> {
        self.call("lock", name)
            .run(async { self.shared.lock_named(name, LockOptions::new()).await })
            .await
    }

    async fn lock_with(&self, name: &str, options: LockOptions) -> Result<LockGuard> {
        self.call("lock_with", name)
            .run(async { self.shared.lock_named(name, options).await })
            .await
    }

    async fn campaign(&self, name: &str, value: &str) -> Result<Leadership> {
        self.call("campaign", name)
            .run(async { self.shared.campaign(name, value, LockOptions::new()).await })
            .await
    }

    async fn campaign_with(
        &self,
        name: &str,
        value: &str,
        options: LockOptions,
    ) -> Result<Leadership> {
        self.call("campaign_with", name)
            .run(async { self.shared.campaign(name, value, options).await })
            .await
    }

    async fn leader(&self, name: &str) -> Result<Option<KeyValue>> {
        self.call("leader", name)
            .run(async { self.shared.leader(name).await })
            .await
    }

    async fn observe(&self, name: &str) -> Result<LeaderStream> {
        self.call("observe", name)
            .run(async { self.shared.observe(name).await })
            .await
    }

    async fn get_kv(&self, key: &str) -> Result<Option<KeyValue>> {
        self.call("get_kv", key)
            .run(async { self.shared.get_kv(key).await })
            .await
    }

    async fn get_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        self.call("get_prefix", prefix)
            .run(async { self.shared.get_prefix(prefix).await })
            .await
    }

    async fn list(&self, request: ListRequest) -> Result<ListPage> {
        self.call("list", hmetcd_core::instrument::list_key(&request))
            .run(async { self.shared.list(request).await })
            .await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        self.call("delete_prefix", prefix)
            .run(async { self.shared.delete_prefix(prefix).await })
            .await
    }

    async fn store_temp(&self, key: &str, value: &str) -> Result<()> {
        self.put_temp("store_temp", key, value).await
    }

    async fn update(&self, key: &str, f: &mut UpdateFn<'_>) -> Result<Option<String>> {
        self.call("update", key)
            .run(hmetcd_core::update_with_txn(self, key, f))
            .await
    }

    async fn txn(&self, txn: hmetcd_core::Txn) -> Result<TxnOutcome> {
        self.call("txn", hmetcd_core::instrument::txn_key(&txn))
            .run(async { self.shared.txn(txn).await })
            .await
    }

    async fn watch_prefix_from(&self, prefix: &str, revision: i64) -> Result<WatchStream> {
        self.call("watch_prefix_from", prefix)
            .run(async { self.shared.watch_prefix_from(prefix, revision).await })
            .await
    }
}

fn compare_op(op: CompareOp) -> etcd_client::CompareOp {
    match op {
        CompareOp::Equal => etcd_client::CompareOp::Equal,
        CompareOp::NotEqual => etcd_client::CompareOp::NotEqual,
        CompareOp::Less => etcd_client::CompareOp::Less,
        CompareOp::Greater => etcd_client::CompareOp::Greater,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ids_print_like_go() {
        assert_eq!(lease_hex(0x694d_7a1b_2c3d_4e5f), "694d7a1b2c3d4e5f");
        assert_eq!(lease_hex(255), "ff");
        assert_eq!(lease_hex(-255), "-ff");
    }

    fn assert_send_sync<T: Send + Sync + 'static>() {}

    #[test]
    fn handle_is_send_and_sync() {
        assert_send_sync::<EtcdKvs>();
    }
}
