//! The in-memory backend of hmetcd: the etcd contract kept in one process, for tests and
//! single-instance services.
//!
//! Every rule of the contract holds here exactly as on etcd: inclusive sorted ranges,
//! atomic transactions with etcd's missing-key rule, a store-wide revision counter, a real
//! first-come-first-served lock whose participants write etcd's lock keys
//! (`<lock_name>/<lease id in hex>`, seen by ranges and watches; deleting a holder's key hands
//! the lock to the next waiter, as on etcd), temp keys that vanish with their handle, and
//! watches that are pushed to watchers as writes happen (no polling).
//!
//! It is also a test kit: [`MemKvs::faults`] makes a handle's lease expire, cuts it off from
//! its store or compacts the store, on demand and on Tokio's clock, so that a service's
//! failover code gets the unit tests it rarely has (see [`Faults`] and the `failover_test`
//! example).
//!
//! ```
//! use hmetcd_core::Kvi;
//! use hmetcd_mem::MemKvs;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> hmetcd_core::Result<()> {
//! let kv = MemKvs::new();
//! kv.store("jobs/1", "queued").await?;
//! assert!(kv.tas("jobs/1", "queued", "running").await?);
//! assert_eq!(kv.get("jobs/1").await?.as_deref(), Some("running"));
//!
//! // Handles opened with the same name share one store and one lock.
//! let a = MemKvs::open("shared", "lock_name=jobs")?;
//! let b = MemKvs::open("shared", "lock_name=jobs")?;
//! a.dist_lock().await?;
//! assert!(b.dist_timed_lock(std::time::Duration::from_millis(10)).await.is_err());
//! a.close().await?;
//! b.dist_lock().await?;
//! # Ok(())
//! # }
//! ```

#[cfg(test)]
mod bookkeeping_tests;
#[cfg(test)]
mod data_tests;
mod faults;
mod guards;
mod participants;
#[cfg(test)]
mod provided_tests;
mod store;

use hmetcd_core::instrument::Call;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
pub use faults::Faults;
use faults::Session;
use guards::MemLockRelease;
use hmetcd_core::keys::{check_key, KeyPrefix};
use hmetcd_core::watch::{first_event, spawn_callback_watcher};
use hmetcd_core::{
    leader_stream, Candidate, CompareOp, Error, KeyChange, KeyValue, Kvi, LeaderStream, Leadership,
    ListPage, ListRequest, LockGuard, LockOptions, Options, Result, Txn, TxnOutcome, UpdateFn,
    WatchCallback, WatchEvent, WatchHandle, WatchStream,
};
use participants::Held;
pub use store::MISSED_EVENTS_LIMIT;
use store::{Store, Target};

// Stores opened by name live as long as the process, as in the Go package: data outlives `close()`.
static NAMED_STORES: LazyLock<DashMap<String, Arc<Store>>> = LazyLock::new(DashMap::new);

/// A handle on an in-memory store.
///
/// [`MemKvs::new`] makes a fresh private store; [`MemKvs::open`] opens a named store that
/// every handle opened with the same name shares (the empty name is the process-wide store
/// behind the `mem:` endpoint). Each handle is one participant in its lock and owns its temp
/// keys; dropping the handle releases both at once, as `close()` does (but a handle
/// partitioned by [`Faults::partition`] leaves them to its lease, like a crashed process).
///
/// Callback watchers ([`Kvi::watch_with_cb`]) run on the Tokio runtime they were started in.
///
/// # Metadata
///
/// Every key read with [`Kvi::get_range`], [`Kvi::get_kv`], [`Kvi::get_prefix`],
/// [`Kvi::list`] or a [`Txn`]'s gets carries etcd's metadata: the store revision goes up by one
/// per request that changes something (all the keys one request changes share it, a lease
/// expiry or `close()` deleting several keys included), `create_revision` and `mod_revision`
/// are the revisions of the key's creation and last write, `version` counts its puts since it
/// was created, `lease` is its handle's lease id (0: none). As on a fresh etcd cluster, the
/// first write of a store has revision 2. [`Kvi::leader`] and [`Kvi::observe`] leave the
/// metadata at 0.
///
/// # History
///
/// The store keeps a log of its changes for [`Kvi::watch_prefix_from`], which replays it
/// before the live changes. The log is bounded like etcd's periodic compaction: it keeps at
/// least the last `history` revisions (the [`Options::history`] option, 10,000 by default);
/// once it spans more than twice that, it drops all but the last `history` revisions (the
/// store's compaction revision moves up). A watch from a revision below the compaction gets
/// [`Error::Compacted`] as its stream's only item, as on etcd. [`Faults::compact`] compacts
/// on demand.
///
/// Handles that share a named store share its history: the store keeps the largest `history`
/// any handle opened on it asked for (and keeps it after that handle is closed; named stores
/// live as long as the process). The log holds a copy of each change's key and value plus 24
/// bytes, in chunks of 64 KiB that it reuses: a write allocates nothing for it. An event too
/// big for it (a key or value of 4 GiB or more) compacts the history past it.
pub struct MemKvs {
    /// The store, the lease with its temp keys and lock participants, the live guards.
    session: Arc<Session>,
    store_name: Option<String>,
    options: Options,
    prefix: KeyPrefix,
    /// The handle's lock name as stored (under the prefix, as on etcd).
    stored_lock_name: String,
    /// The handle's lock, while held.
    held: Mutex<Option<Held>>,
    acquiring: tokio::sync::Mutex<()>,
    closing: tokio::sync::watch::Sender<bool>,
}

impl fmt::Debug for MemKvs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemKvs")
            .field("store", &self.store_name.as_deref().unwrap_or("<private>"))
            .field("prefix", &self.prefix.as_str())
            .field("lock_name", &self.options.lock_name)
            .field("closed", &self.session.is_closed())
            .finish_non_exhaustive()
    }
}

impl Default for MemKvs {
    fn default() -> Self {
        MemKvs::new()
    }
}

impl MemKvs {
    /// A handle on a fresh private store that no other handle sees: what a unit test wants.
    pub fn new() -> Self {
        MemKvs::on_store(Arc::new(Store::default()), None, Options::default())
    }

    /// A handle on the store named `name`, shared by every handle opened with that name in
    /// this process; `""` is the process-wide store of the `mem:` endpoint. `options` is the
    /// contract's options string: `prefix`, `lock_name` and `lease_ttl` apply, the
    /// connection options are accepted and ignored.
    ///
    /// ```
    /// use hmetcd_mem::MemKvs;
    ///
    /// let kv = MemKvs::open("orders", "prefix=svc/, lock_name=orders")?;
    /// assert!(MemKvs::open("orders", "lease_ttl=forever").is_err());
    /// # drop(kv);
    /// # Ok::<(), hmetcd_core::Error>(())
    /// ```
    pub fn open(name: &str, options: &str) -> Result<Self> {
        let options = Options::parse(options)?;
        let store = Arc::clone(NAMED_STORES.entry(name.to_owned()).or_default().value());
        Ok(MemKvs::on_store(store, Some(name.to_owned()), options))
    }

    /// Another handle on the same store as this one (a second participant in the lock).
    pub fn open_sibling(&self, options: &str) -> Result<Self> {
        let options = Options::parse(options)?;
        Ok(MemKvs::on_store(
            Arc::clone(&self.session.store),
            self.store_name.clone(),
            options,
        ))
    }

    fn on_store(store: Arc<Store>, store_name: Option<String>, options: Options) -> Self {
        let prefix = KeyPrefix::new(options.prefix.clone());
        // The lock lives under the prefix like every other key, as on etcd.
        let stored_lock_name = prefix.apply(&options.lock_name);
        store.keep_history(options.history);
        let session = Arc::new(Session::new(
            store,
            store_name.as_deref(),
            options.lease_ttl,
        ));
        MemKvs {
            session,
            store_name,
            options,
            prefix,
            stored_lock_name,
            held: Mutex::new(None),
            acquiring: tokio::sync::Mutex::new(()),
            closing: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Faults to inject into this handle: its lease expires, it is cut off from the store, the
    /// store is compacted. See [`Faults`].
    ///
    /// Nothing of this runs unless a test calls it: a handle costs the same with or without.
    pub fn faults(&self) -> Faults {
        Faults::new(Arc::clone(&self.session))
    }

    /// The options this handle was opened with.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// `Ok` while the handle is open and not partitioned.
    fn check_open(&self) -> Result<()> {
        self.session.check()
    }

    /// Whether the handle holds its lock now: "holds" means holds now, so a lock whose key
    /// was deleted (by anyone) is not held, and the next `dist_lock` queues again.
    fn holds_lock(&self) -> bool {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(Held::is_held)
    }

    async fn acquire(&self) -> Result<()> {
        self.check_open()?;
        if self.holds_lock() {
            return Ok(());
        }
        let mut closing = self.closing.subscribe();
        // One waiter per handle: a second task of this handle waits here, then finds it held.
        let acquire = async {
            let _one_at_a_time = self.acquiring.lock().await;
            if self.holds_lock() {
                return true;
            }
            // A lost hold's key is gone already: dropping it releases nothing.
            self.release_lock();
            // The handle's lock is the named lock `lock_name`, queued like every guard.
            let Some(held) = self
                .session
                .participants
                .acquire(&self.stored_lock_name, "")
                .await
            else {
                return false;
            };
            *self.held.lock().unwrap_or_else(PoisonError::into_inner) = Some(held);
            true
        };
        let acquired = tokio::select! {
            acquired = acquire => acquired,
            _ = closing.wait_for(|closed| *closed) => false,
        };
        if !acquired || self.session.is_closed() {
            self.release_lock();
            return Err(Error::Closed);
        }
        Ok(())
    }

    fn release_lock(&self) {
        let held = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(held);
    }

    /// Releases everything the handle holds in the store: locks, temp keys, watchers. `false`
    /// if the handle is partitioned: its keys then go when its lease expires.
    fn release(&self) -> bool {
        self.session.close(|| self.release_lock())
    }

    async fn lock_named(&self, name: &str, options: LockOptions) -> Result<LockGuard> {
        let (release, key, fencing_token) = self.take_named(name, "", options).await?;
        Ok(LockGuard::from_backend(
            name,
            key,
            fencing_token,
            Box::new(release),
        ))
    }

    async fn campaign_named(
        &self,
        name: &str,
        value: &str,
        options: LockOptions,
    ) -> Result<Leadership> {
        let (release, key, fencing_token) = self.take_named(name, value, options).await?;
        Ok(Leadership::from_backend(
            name,
            key,
            value,
            fencing_token,
            Box::new(release),
        ))
    }

    /// A named lock (or election candidacy) with `value` on its key, and its fencing token.
    async fn take_named(
        &self,
        name: &str,
        value: &str,
        options: LockOptions,
    ) -> Result<(MemLockRelease, String, i64)> {
        self.check_open()?;
        check_key("name", name)?;
        // Under the prefix like every other key; `lock_name` itself is the handle's lock.
        let stored_name = self.prefix.apply(name);
        let mut closing = self.closing.subscribe();
        // Dropping the wait leaves both queues and deletes the waiter's key: no trace is left.
        let wait = async {
            tokio::select! {
                held = self.session.participants.acquire(&stored_name, value) => held,
                _ = closing.wait_for(|closed| *closed) => None,
            }
        };
        let taken = match options.get_timeout() {
            Some(timeout) => {
                tokio::time::timeout(timeout, wait)
                    .await
                    .map_err(|_| Error::LockTimeout {
                        lock: name.to_owned(),
                        timeout,
                    })?
            }
            None => wait.await,
        };
        let Some(held) = taken else {
            return Err(Error::Closed);
        };
        let fencing_token = held.fencing_token();
        let key = self
            .prefix
            .strip(held.stored_key())
            .unwrap_or(held.stored_key())
            .to_owned();
        let release = MemLockRelease::register(
            name,
            &self.session,
            self.session.store.next_id(),
            held,
            options.get_max_hold(),
        )?;
        // A close that raced with this call may have missed the new guard.
        if self.session.is_closed() {
            release.release_now();
            return Err(Error::Closed);
        }
        Ok((release, key, fencing_token))
    }

    /// The candidates of the election `name`, leader first, and a watch of its keys from
    /// right after that read.
    fn candidates(&self, name: &str) -> Result<(Vec<Candidate>, WatchStream)> {
        self.check_open()?;
        check_key("name", name)?;
        let dir = format!("{}/", self.prefix.apply(name));
        let (candidates, stream) = self.session.store.candidates_and_watch(
            &dir,
            self.prefix.as_str().len(),
            self.session.id,
        );
        // A close or partition that raced with this call may have missed it; dropping the
        // stream unregisters it.
        self.check_open()?;
        Ok((candidates, Box::pin(stream)))
    }

    fn watch_target(&self, target: Target) -> Result<WatchStream> {
        self.check_open()?;
        let stream = self
            .session
            .store
            .watch(target, self.prefix.as_str().len(), self.session.id);
        // A close or partition that raced with this call may have missed it; dropping the
        // stream unregisters it.
        self.check_open()?;
        Ok(Box::pin(stream))
    }
}

impl Drop for MemKvs {
    fn drop(&mut self) {
        // As when an etcd client dies: the lock and temp keys go (here at once, not after a
        // TTL, unless the handle is partitioned: then, like a crashed process's, with its lease).
        self.release();
    }
}

impl MemKvs {
    /// The span (and metrics) of one call: see `hmetcd_core::instrument`.
    #[inline]
    fn call(&self, operation: &'static str, key: &str) -> Call {
        Call::start("mem", None, operation, key)
    }

    /// `temp_key` and `store_temp` (the span's `operation`): `value` on `key`, on the lease.
    async fn put_temp(&self, operation: &'static str, key: &str, value: &str) -> Result<()> {
        self.call(operation, key)
            .run(async {
                self.check_open()?;
                check_key("key", key)?;
                self.session.put_temp_key(&self.prefix.apply(key), value)
            })
            .await
    }
}

#[async_trait]
impl Kvi for MemKvs {
    async fn dist_lock(&self) -> Result<()> {
        self.call("dist_lock", "")
            .run(async { self.acquire().await })
            .await
    }

    async fn dist_timed_lock(&self, timeout: Duration) -> Result<()> {
        self.call("dist_timed_lock", "")
            .run(async {
                match tokio::time::timeout(timeout, self.acquire()).await {
                    Ok(result) => result,
                    // Dropping the wait takes this handle out of the queue: no trace is left.
                    Err(_) => Err(Error::LockTimeout {
                        lock: self.options.lock_name.clone(),
                        timeout,
                    }),
                }
            })
            .await
    }

    async fn dist_unlock(&self) -> Result<()> {
        self.call("dist_unlock", "")
            .run(async {
                if self.session.is_closed() {
                    return Err(Error::Closed);
                }
                // On a partitioned handle the lock is let go all the same (its key goes when
                // the cut ends), and the call fails if there was a key to delete: as on etcd,
                // and as a guard's release (`MemLockRelease::release`).
                let refused = self.session.cut_off().filter(|_| self.holds_lock());
                self.release_lock();
                refused.map_or(Ok(()), Err)
            })
            .await
    }

    async fn store(&self, key: &str, value: &str) -> Result<()> {
        self.call("store", key)
            .run(async {
                self.check_open()?;
                check_key("key", key)?;
                let stored = self.prefix.stored(key);
                self.session.store.put(&stored, value);
                self.session.forget_temp_key(&stored);
                Ok(())
            })
            .await
    }

    async fn temp_key(&self, key: &str) -> Result<()> {
        self.put_temp("temp_key", key, faults::TEMP_VALUE).await
    }

    async fn get(&self, key: &str) -> Result<Option<String>> {
        self.call("get", key)
            .run(async {
                self.check_open()?;
                check_key("key", key)?;
                Ok(self.session.store.get(&self.prefix.stored(key)))
            })
            .await
    }

    async fn get_range(&self, key_start: &str, key_end: &str) -> Result<Vec<KeyValue>> {
        self.call("get_range", key_start)
            .run(async {
                self.check_open()?;
                Ok(match self.prefix.range(key_start, key_end) {
                    Some((start, end)) => {
                        self.session
                            .store
                            .range(&start, &end, self.prefix.as_str().len())
                    }
                    None => Vec::new(),
                })
            })
            .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.call("delete", key)
            .run(async {
                self.check_open()?;
                check_key("key", key)?;
                let stored = self.prefix.stored(key);
                self.session.store.delete(&stored);
                self.session.forget_temp_key(&stored);
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
                self.check_open()?;
                check_key("key", key)?;
                check_key("then_key", then_key)?;
                check_key("else_key", else_key)?;
                let (key, then_key, else_key) = (
                    self.prefix.stored(key),
                    self.prefix.stored(then_key),
                    self.prefix.stored(else_key),
                );
                let then = self.session.store.transaction(
                    &key,
                    op,
                    value,
                    (&then_key, then_value),
                    (&else_key, else_value),
                );
                self.session
                    .forget_temp_key(if then { &then_key } else { &else_key });
                Ok(then)
            })
            .await
    }

    async fn tas(&self, key: &str, test_value: &str, set_value: &str) -> Result<bool> {
        self.call("tas", key)
            .run(async {
                self.check_open()?;
                check_key("key", key)?;
                let stored = self.prefix.stored(key);
                let set = self.session.store.tas(&stored, test_value, set_value);
                if set {
                    self.session.forget_temp_key(&stored);
                }
                Ok(set)
            })
            .await
    }

    async fn watch(&self, key: &str) -> Result<WatchEvent> {
        self.call("watch", key)
            .run(async { first_event(self.watch_stream(key).await?).await })
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
                Ok(spawn_callback_watcher(
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
                if self.session.is_closed() {
                    return Ok(());
                }
                // The session first: a lock wait woken by the closing signal below must find the
                // handle closed, not queue again on its lease meanwhile.
                let released = self.release();
                self.closing.send_replace(true);
                if released {
                    Ok(())
                } else {
                    // As on etcd when the lease revoke cannot reach the server: closed here, but the
                    // keys stay until the lease expires.
                    Err(self.session.unreachable_close())
                }
            })
            .await
    }

    async fn watch_stream(&self, key: &str) -> Result<WatchStream> {
        self.call("watch_stream", key)
            .run(async {
                check_key("key", key)?;
                self.watch_target(Target::Key(self.prefix.apply(key)))
            })
            .await
    }

    async fn watch_prefix(&self, prefix: &str) -> Result<WatchStream> {
        self.call("watch_prefix", prefix)
            .run(async { self.watch_target(Target::Prefix(self.prefix.apply(prefix))) })
            .await
    }

    async fn lock(&self, name: &str) -> Result<LockGuard> {
        self.call("lock", name)
            .run(async { self.lock_named(name, LockOptions::new()).await })
            .await
    }

    async fn lock_with(&self, name: &str, options: LockOptions) -> Result<LockGuard> {
        self.call("lock_with", name)
            .run(async { self.lock_named(name, options).await })
            .await
    }

    async fn campaign(&self, name: &str, value: &str) -> Result<Leadership> {
        self.call("campaign", name)
            .run(async { self.campaign_named(name, value, LockOptions::new()).await })
            .await
    }

    async fn campaign_with(
        &self,
        name: &str,
        value: &str,
        options: LockOptions,
    ) -> Result<Leadership> {
        self.call("campaign_with", name)
            .run(async { self.campaign_named(name, value, options).await })
            .await
    }

    async fn leader(&self, name: &str) -> Result<Option<KeyValue>> {
        self.call("leader", name)
            .run(async {
                let (candidates, _) = self.candidates(name)?;
                Ok(candidates.into_iter().next().map(KeyValue::from))
            })
            .await
    }

    async fn observe(&self, name: &str) -> Result<LeaderStream> {
        self.call("observe", name)
            .run(async {
                let (candidates, events) = self.candidates(name)?;
                Ok(leader_stream(name, candidates, events))
            })
            .await
    }

    async fn get_kv(&self, key: &str) -> Result<Option<KeyValue>> {
        self.call("get_kv", key)
            .run(async {
                self.check_open()?;
                check_key("key", key)?;
                Ok(self
                    .session
                    .store
                    .get_kv(&self.prefix.stored(key), self.prefix.as_str().len()))
            })
            .await
    }

    async fn get_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        self.call("get_prefix", prefix)
            .run(async {
                self.check_open()?;
                Ok(self
                    .session
                    .store
                    .list(&ListRequest::prefix(prefix), &self.prefix)
                    .items)
            })
            .await
    }

    async fn list(&self, request: ListRequest) -> Result<ListPage> {
        self.call("list", hmetcd_core::instrument::list_key(&request))
            .run(async {
                self.check_open()?;
                request.check()?;
                Ok(self.session.store.list(&request, &self.prefix))
            })
            .await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        self.call("delete_prefix", prefix)
            .run(async {
                self.check_open()?;
                check_key("prefix", prefix)?;
                let stored = self.prefix.stored(prefix);
                let deleted = self.session.store.delete_prefix(&stored);
                self.session.forget_temp_prefix(&stored);
                Ok(u64::try_from(deleted.len()).unwrap_or(u64::MAX))
            })
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

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        self.call("txn", hmetcd_core::instrument::txn_key(&txn))
            .run(async {
                self.check_open()?;
                txn.check()?;
                self.session.txn(&txn, &self.prefix)
            })
            .await
    }

    async fn watch_prefix_from(&self, prefix: &str, revision: i64) -> Result<WatchStream> {
        self.call("watch_prefix_from", prefix)
            .run(async {
                self.check_open()?;
                if revision < 1 {
                    return Err(Error::InvalidArgument {
                        what: "watch revision".to_owned(),
                        reason: format!("{revision}: revisions start at 1"),
                    });
                }
                let stream = self.session.store.watch_from(
                    self.prefix.apply(prefix),
                    self.prefix.as_str().len(),
                    self.session.id,
                    revision,
                );
                // A close or partition that raced with this call may have missed it; dropping the
                // stream unregisters it.
                self.check_open()?;
                Ok(Box::pin(stream) as WatchStream)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test]
    async fn dropped_and_closed_watchers_leave_the_store() {
        let kv = MemKvs::new();
        let stream = kv.watch_stream("a").await.unwrap();
        let prefix_stream = kv.watch_prefix("").await.unwrap();
        assert_eq!(kv.session.store.watcher_count(), 2);
        drop(stream);
        assert_eq!(kv.session.store.watcher_count(), 1);
        let mut other = kv.watch_stream("b").await.unwrap();
        kv.close().await.unwrap();
        assert_eq!(kv.session.store.watcher_count(), 0);
        assert!(
            other.next().await.is_none(),
            "a closed handle's streams end"
        );
        drop(prefix_stream);
    }

    #[tokio::test]
    async fn a_handle_keeps_its_options_and_shows_them_in_debug() {
        let kv = MemKvs::open(
            "debug-and-options",
            "prefix=svc/,lock_name=jobs,lease_ttl=7s",
        )
        .unwrap();
        assert_eq!(kv.options().prefix, "svc/");
        assert_eq!(kv.options().lock_name, "jobs");
        assert_eq!(kv.options().lease_ttl, Duration::from_secs(7));
        let shown = format!("{kv:?}");
        for part in [
            "MemKvs",
            "\"debug-and-options\"",
            "\"svc/\"",
            "\"jobs\"",
            "closed: false",
        ] {
            assert!(shown.contains(part), "{part} in {shown}");
        }
        let faults = format!("{:?}", kv.faults());
        for part in [
            "Faults",
            "Session",
            "\"mem:debug-and-options\"",
            "lease: ",
            "status: 0",
        ] {
            assert!(faults.contains(part), "{part} in {faults}");
        }
        kv.close().await.unwrap();
        assert!(format!("{kv:?}").contains("closed: true"));
        assert!(format!("{:?}", kv.faults()).contains("status: 1"));
        assert!(format!("{:?}", MemKvs::new()).contains("<private>"));
    }

    /// A lock wait woken by the closing signal fails with `Closed` whatever it finds of the
    /// session then, never returns as if it held the lock (here the signal comes alone).
    #[tokio::test]
    async fn a_lock_wait_woken_by_close_fails_even_before_the_session_is_closed() {
        let holder = MemKvs::new();
        let waiter = holder.open_sibling("").unwrap();
        holder.dist_lock().await.unwrap();
        let wait = waiter.dist_lock();
        tokio::pin!(wait);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut wait)
                .await
                .is_err(),
            "the lock is held by the other handle"
        );
        waiter.closing.send_replace(true);
        assert!(matches!(wait.await, Err(Error::Closed)));
        assert!(!waiter.holds_lock());
    }

    /// A wait that starts (or queues again) once the handle's link is gone writes nothing: no
    /// lock key on a revoked lease, not even for a moment.
    #[tokio::test]
    async fn a_closed_handles_participants_queue_nowhere() {
        let kv = MemKvs::new();
        kv.close().await.unwrap();
        let before = kv.session.store.revision();
        assert!(kv.session.participants.acquire("jobs", "").await.is_none());
        assert_eq!(
            kv.session.store.revision(),
            before,
            "a lock key was written"
        );
    }

    #[tokio::test]
    async fn a_leadership_shows_its_election_value_token_and_state() {
        let kv = MemKvs::new();
        let leadership = kv.campaign("scheduler", "10.0.0.7").await.unwrap();
        let shown = format!("{leadership:?}");
        let token = format!("fencing_token: {}", leadership.fencing_token());
        for part in [
            "Leadership",
            "name: \"scheduler\"",
            "value: \"10.0.0.7\"",
            token.as_str(),
            "leader: true",
        ] {
            assert!(shown.contains(part), "{part} in {shown}");
        }
        kv.close().await.unwrap();
        assert!(format!("{leadership:?}").contains("leader: false"));
    }

    #[tokio::test]
    async fn watch_returns_only_after_registering() {
        let kv = MemKvs::new();
        for _ in 0..100 {
            let _ = kv.watch_stream("a").await.unwrap();
        }
        assert_eq!(
            kv.session.store.watcher_count(),
            0,
            "one-shot watches must not accumulate"
        );
    }
}
