//! The `Kvi` trait: the fourteen operations of the contract, plus streams and named locks.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::keys::check_key;
use crate::{
    Compare, CompareOp, KeyChange, KeyValue, LeaderStream, Leadership, ListPage, ListRequest,
    LockGuard, LockOptions, Op, Result, Txn, TxnOutcome, WatchCallback, WatchEvent, WatchHandle,
    WatchStream,
};

/// The read-modify-write function [`Kvi::update`] calls: the current value (`None` when
/// missing) in, the value to write (`None`: delete) out.
pub type UpdateFn<'a> = dyn FnMut(Option<&str>) -> Option<String> + Send + 'a;

/// A handle on a key-value store: etcd, or the in-memory store.
///
/// Every backend behaves the same way; the rules are those of the project's contract and
/// are checked by one conformance suite against each backend. A handle is `Send + Sync`:
/// one `Box<dyn Kvi>` or `Arc<dyn Kvi>` serves many tasks at once.
///
/// Each handle is one participant in its distributed lock (the `lock_name` option) and
/// owns one lease for its temporary keys.
///
/// # The methods, as a caller writes them
///
/// The trait is `#[async_trait]` (so that `Box<dyn Kvi>` works), which is why the method
/// pages below show boxed futures. Every method is an `async fn` returning
/// [`Result`](crate::Result):
///
/// | call | gives | in short |
/// |---|---|---|
/// | `get(key)` | `Option<String>` | the value; `None` when absent |
/// | `get_kv(key)` | `Option<KeyValue>` | the value with etcd's metadata |
/// | `store(key, value)` | `()` | create or overwrite |
/// | `delete(key)` | `()` | an absent key is `Ok` |
/// | `get_range(start, end)` | `Vec<KeyValue>` | both ends inclusive, sorted |
/// | `get_prefix(prefix)` | `Vec<KeyValue>` | every key under the prefix, sorted |
/// | `list(ListRequest)` | `ListPage` | one page; paging visits each key once |
/// | `delete_prefix(prefix)` | `u64` | how many were deleted; `""` refused |
/// | `transaction(key, op, value, then_key, then_value, else_key, else_value)` | `bool` | one compare, one write |
/// | `tas(key, test, set)` | `bool` | test-and-set; a missing key stays missing |
/// | `txn(Txn)` | `TxnOutcome` | compares and operations in one atomic step |
/// | `update(key, &mut f)` | `Option<String>` | read-modify-write that loses no concurrent write |
/// | `temp_key(key)`, `store_temp(key, value)` | `()` | gone with the handle (its lease) |
/// | `watch(key)` | `WatchEvent` | the next change |
/// | `watch_stream(key)`, `watch_prefix(prefix)` | `WatchStream` | every change from now on |
/// | `watch_prefix_from(prefix, revision)` | `WatchStream` | history from `revision`, then live |
/// | `watch_with_cb(key, change, cb)` | `WatchHandle` | a callback per change; `watch_cb_cancel` stops it |
/// | `dist_lock()`, `dist_timed_lock(t)`, `dist_unlock()` | `()` | the handle's own lock |
/// | `lock(name)`, `lock_with(name, LockOptions)` | `LockGuard` | a named lock with a fencing token |
/// | `campaign(name, value)`, `campaign_with(..)` | `Leadership` | leader election |
/// | `leader(name)` | `Option<KeyValue>` | the current leader |
/// | `observe(name)` | `LeaderStream` | the leader, then every change |
/// | `close()` | `()` | releases everything; later calls are `Error::Closed` |
#[async_trait]
pub trait Kvi: std::fmt::Debug + Send + Sync + 'static {
    /// Takes the handle's distributed lock, waiting as long as it takes (first come, first
    /// served). `Ok` at once if this handle already holds it.
    async fn dist_lock(&self) -> Result<()>;

    /// Like [`dist_lock`](Kvi::dist_lock), but gives up after `timeout` with
    /// [`Error::LockTimeout`](crate::Error::LockTimeout); a given-up attempt leaves no trace.
    async fn dist_timed_lock(&self, timeout: Duration) -> Result<()>;

    /// Releases the lock; `Ok` if this handle does not hold it. If the store cannot be
    /// reached, the error says so and the lock is let go all the same, as
    /// [`LockGuard::unlock`](crate::LockGuard::unlock).
    async fn dist_unlock(&self) -> Result<()>;

    /// Creates or overwrites `key`.
    async fn store(&self, key: &str, value: &str) -> Result<()>;

    /// Stores `"1"` at `key`, bound to this handle's lease: the key vanishes when the handle
    /// is closed, and within `lease_ttl` when its process dies.
    async fn temp_key(&self, key: &str) -> Result<()>;

    /// The value of `key`: `None` when absent, `Some("")` when present and empty.
    async fn get(&self, key: &str) -> Result<Option<String>>;

    /// Every key `k` with `key_start <= k <= key_end` (both inclusive, byte order), sorted
    /// ascending. `key_start > key_end` gives an empty `Vec`; an empty `key_start` means
    /// from the first key.
    async fn get_range(&self, key_start: &str, key_end: &str) -> Result<Vec<KeyValue>>;

    /// Deletes `key`; deleting an absent key is `Ok`.
    async fn delete(&self, key: &str) -> Result<()>;

    /// In one atomic step: if `value_of(key) op value` holds, stores `then_value` at
    /// `then_key` and returns `true`; otherwise stores `else_value` at `else_key` and
    /// returns `false`. A missing `key` makes every comparison false.
    #[allow(clippy::too_many_arguments)]
    async fn transaction(
        &self,
        key: &str,
        op: CompareOp,
        value: &str,
        then_key: &str,
        then_value: &str,
        else_key: &str,
        else_value: &str,
    ) -> Result<bool>;

    /// Test-and-set: if `key` exists and holds `test_value`, sets it to `set_value` and
    /// returns `true`; otherwise writes nothing and returns `false` (a missing key stays missing).
    async fn tas(&self, key: &str, test_value: &str, set_value: &str) -> Result<bool>;

    /// Waits for the next change to `key` after the call began.
    async fn watch(&self, key: &str) -> Result<WatchEvent>;

    /// Calls `cb` for every event of kind `change` on `key`, in revision order, until `cb`
    /// returns `false`, the key is deleted, the returned handle is cancelled, or this store
    /// handle is closed.
    async fn watch_with_cb(
        &self,
        key: &str,
        change: KeyChange,
        cb: WatchCallback,
    ) -> Result<WatchHandle>;

    /// Cancels a callback watcher; same as [`WatchHandle::cancel`].
    fn watch_cb_cancel(&self, handle: WatchHandle);

    /// Releases the lock, removes the temp keys, stops every watcher; every later call fails
    /// with [`Error::Closed`](crate::Error::Closed). Closing twice is `Ok`.
    async fn close(&self) -> Result<()>;

    /// Every change to `key` from now on. The watch is registered before this returns.
    async fn watch_stream(&self, key: &str) -> Result<WatchStream>;

    /// Every change to any key starting with `prefix` from now on. The watch is registered
    /// before this returns.
    async fn watch_prefix(&self, prefix: &str) -> Result<WatchStream>;

    /// Takes the named lock `name`, waiting as long as it takes (first come, first served),
    /// and hands back a guard that releases it when dropped.
    ///
    /// `name` is checked like a key and lives under the handle's `prefix`. Every guard for a
    /// name excludes every other guard for it, across handles and among the tasks of one
    /// handle (a guard is not re-entrant). The lock named by the handle's `lock_name` is the
    /// handle's lock: such a guard and [`dist_lock`](Kvi::dist_lock) exclude each other.
    /// [`close`](Kvi::close) releases every guard of the handle.
    ///
    /// ```
    /// # use hmetcd_core::Kvi;
    /// # async fn example(kv: &dyn Kvi) -> hmetcd_core::Result<()> {
    /// let guard = kv.lock("reports/nightly").await?;
    /// // ... work that only one holder of "reports/nightly" may do at a time ...
    /// guard.unlock().await?;
    /// # Ok(())
    /// # }
    /// ```
    async fn lock(&self, name: &str) -> Result<LockGuard>;

    /// Like [`lock`](Kvi::lock), with a timeout (give up with
    /// [`Error::LockTimeout`](crate::Error::LockTimeout), leaving no trace) and a maximum hold
    /// time (the lock is released once held that long), as `options` say.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use hmetcd_core::{Kvi, LockOptions};
    /// # async fn example(kv: &dyn Kvi) -> hmetcd_core::Result<()> {
    /// let options = LockOptions::new()
    ///     .timeout(Duration::from_secs(2))
    ///     .max_hold(Duration::from_secs(30));
    /// let guard = kv.lock_with("reports/nightly", options).await?;
    /// assert!(guard.is_held());
    /// drop(guard);
    /// # Ok(())
    /// # }
    /// ```
    async fn lock_with(&self, name: &str, options: LockOptions) -> Result<LockGuard>;

    /// Campaigns in the election `name` with `value`, waiting as long as it takes (first come,
    /// first served), and hands back the [`Leadership`] once this candidate leads; dropping it
    /// resigns.
    ///
    /// The layout is etcd's election layout (`<name>/<lease id in hex>` = value, bound to the
    /// handle's lease; the leader is the candidate created first), so Go's
    /// `concurrency.Election` and `etcdctl elect` take part in the same queue. `name` is
    /// checked like a key and lives under the handle's `prefix`. [`close`](Kvi::close)
    /// resigns; a crashed leader is replaced within `lease_ttl`. One handle may campaign in
    /// several elections; within one, its candidacies queue in the handle first, as its locks do.
    ///
    /// ```
    /// # use hmetcd_core::Kvi;
    /// # async fn example(kv: &dyn Kvi) -> hmetcd_core::Result<()> {
    /// let leadership = kv.campaign("scheduler", "10.0.0.7:8080").await?;
    /// tokio::select! {
    ///     reason = leadership.lost() => tracing::warn!(%reason, "no longer the leader"),
    ///     () = lead() => {}
    /// }
    /// # Ok(())
    /// # }
    /// # async fn lead() {}
    /// ```
    async fn campaign(&self, name: &str, value: &str) -> Result<Leadership>;

    /// Like [`campaign`](Kvi::campaign), with a timeout (give up with
    /// [`Error::LockTimeout`](crate::Error::LockTimeout) naming the election, leaving no trace)
    /// and a maximum term (`max_hold`), as `options` say.
    async fn campaign_with(
        &self,
        name: &str,
        value: &str,
        options: LockOptions,
    ) -> Result<Leadership>;

    /// The current leader of the election `name`: its key (`<name>/<lease id in hex>`, without
    /// the handle's prefix) and value; `None` when nobody campaigns.
    async fn leader(&self, name: &str) -> Result<Option<KeyValue>>;

    /// The leaders of the election `name`: the current one (or `None`) first, then every
    /// change — a new leader, a proclaimed value, `None` when the last candidate left — never
    /// the same twice in a row. Registered before this returns, so no change made after the
    /// call is missed.
    async fn observe(&self, name: &str) -> Result<LeaderStream>;

    /// `key` with its metadata (create and mod revision, version, lease); `None` when absent.
    async fn get_kv(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Every key starting with `prefix`, sorted, with metadata: the safe way to say what
    /// `get_range("p/", "p/~")` only approximates (that misses keys sorting after `~`). An
    /// empty prefix is every key under the handle's `prefix` option. Big prefixes are read in
    /// pages at one revision, so the answer is one consistent snapshot.
    ///
    /// ```
    /// # use hmetcd_core::Kvi;
    /// # async fn example(kv: &dyn Kvi) -> hmetcd_core::Result<()> {
    /// kv.store("nodes/~x", "up").await?;
    /// let nodes = kv.get_prefix("nodes/").await?;
    /// assert!(nodes.iter().any(|kv| kv.key == "nodes/~x"));
    /// # Ok(())
    /// # }
    /// ```
    async fn get_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>>;

    /// One page of the keys `request` covers, sorted, starting after its `after` key. Paging
    /// to the end (each next request `after` the last key of the page before) visits every
    /// key exactly once.
    ///
    /// ```
    /// # use hmetcd_core::{Kvi, ListRequest};
    /// # async fn example(kv: &dyn Kvi) -> hmetcd_core::Result<()> {
    /// let mut request = ListRequest::prefix("nodes/").limit(1000);
    /// loop {
    ///     let page = kv.list(request.clone()).await?;
    ///     for item in &page.items {
    ///         tracing::info!(key = %item.key, "node");
    ///     }
    ///     match page.items.last() {
    ///         Some(last) if page.more => request = request.after(last.key.clone()),
    ///         _ => break,
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    async fn list(&self, request: ListRequest) -> Result<ListPage>;

    /// Deletes every key starting with `prefix` in one step and returns how many there were.
    /// An empty `prefix` is [`Error::InvalidKey`](crate::Error::InvalidKey): a whole store is
    /// not deleted by accident.
    async fn delete_prefix(&self, prefix: &str) -> Result<u64>;

    /// Stores `value` at `key`, bound to this handle's lease: a [`temp_key`](Kvi::temp_key)
    /// with the caller's value.
    async fn store_temp(&self, key: &str, value: &str) -> Result<()>;

    /// Runs `txn` as one atomic step; see [`Txn`]. A malformed transaction (empty, too long,
    /// a key written twice in one branch) is
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) and nothing is written.
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome>;

    /// Read-modify-write that never loses a concurrent write: `f` gets the current value of
    /// `key` (`None` when missing) and returns the new one (`None` deletes the key); the write
    /// is conditional on the key's `mod_revision`, and when another writer got there first,
    /// `f` is called again with the fresh value. Returns what was written. The key is written
    /// without a lease.
    ///
    /// `f` may run several times, so it should only compute: do side effects after `update`
    /// returns.
    ///
    /// ```
    /// # use hmetcd_core::Kvi;
    /// # async fn example(kv: &dyn Kvi) -> hmetcd_core::Result<()> {
    /// let next = kv
    ///     .update("counters/jobs", &mut |current| {
    ///         let n: u64 = current.and_then(|v| v.parse().ok()).unwrap_or(0);
    ///         Some((n + 1).to_string())
    ///     })
    ///     .await?;
    /// tracing::info!(?next, "counted");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// The backends run [`update_with_txn`] in a span of its own (operation `update`); this
    /// provided version runs it as it is.
    async fn update(&self, key: &str, f: &mut UpdateFn<'_>) -> Result<Option<String>> {
        update_with_txn(self, key, f).await
    }

    /// Every change to a key starting with `prefix` with revision `>= revision`: history first,
    /// then live, in revision order, none missed or repeated. A `revision` below the store's
    /// compaction gives [`Error::Compacted`](crate::Error::Compacted); a `revision` below 1 is
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument). Resume a watch after a
    /// restart from the last revision handled plus one.
    async fn watch_prefix_from(&self, prefix: &str, revision: i64) -> Result<WatchStream>;
}

/// [`Kvi::update`] on any backend, through [`Kvi::get_kv`] and [`Kvi::txn`]: a
/// compare-and-set loop on the key's `mod_revision`, where a failed attempt's `Op::get` hands
/// back the fresh value, so a retry needs no second read.
pub async fn update_with_txn<K: Kvi + ?Sized>(
    kv: &K,
    key: &str,
    f: &mut UpdateFn<'_>,
) -> Result<Option<String>> {
    check_key("key", key)?;
    let mut current = kv.get_kv(key).await?;
    loop {
        let next = f(current.as_ref().map(|kv| kv.value.as_str()));
        let seen = current.as_ref().map_or(0, |kv| kv.mod_revision);
        let write = match &next {
            Some(value) => Op::put(key, value.as_str()),
            None => Op::delete(key),
        };
        let txn = Txn::new()
            .when(Compare::mod_revision(key, CompareOp::Equal, seen))
            .then(write)
            .otherwise(Op::get(key));
        let outcome = kv.txn(txn).await?;
        if outcome.succeeded {
            return Ok(next);
        }
        // Another writer got there first: start again from what it wrote.
        current = outcome.gets.into_iter().next().flatten();
    }
}

/// The future every `Kvi` method returns (what `#[async_trait]` makes of an `async fn`).
type KviFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

// Forwarding hands back the inner handle's future as it is: no second box per call.
macro_rules! forward_kvi {
    ($($wrapper:ident),*) => {$(
        #[deny(clippy::missing_trait_methods)]
        impl<T: Kvi + ?Sized> Kvi for $wrapper<T> {
            fn dist_lock<'s, 'f>(&'s self) -> KviFuture<'f, ()>
            where 's: 'f, Self: 'f {
                (**self).dist_lock()
            }
            fn dist_timed_lock<'s, 'f>(&'s self, timeout: Duration) -> KviFuture<'f, ()>
            where 's: 'f, Self: 'f {
                (**self).dist_timed_lock(timeout)
            }
            fn dist_unlock<'s, 'f>(&'s self) -> KviFuture<'f, ()>
            where 's: 'f, Self: 'f {
                (**self).dist_unlock()
            }
            fn store<'s, 'k, 'v, 'f>(&'s self, key: &'k str, value: &'v str) -> KviFuture<'f, ()>
            where 's: 'f, 'k: 'f, 'v: 'f, Self: 'f {
                (**self).store(key, value)
            }
            fn temp_key<'s, 'k, 'f>(&'s self, key: &'k str) -> KviFuture<'f, ()>
            where 's: 'f, 'k: 'f, Self: 'f {
                (**self).temp_key(key)
            }
            fn get<'s, 'k, 'f>(&'s self, key: &'k str) -> KviFuture<'f, Option<String>>
            where 's: 'f, 'k: 'f, Self: 'f {
                (**self).get(key)
            }
            fn get_range<'s, 'a, 'b, 'f>(&'s self, key_start: &'a str, key_end: &'b str) -> KviFuture<'f, Vec<KeyValue>>
            where 's: 'f, 'a: 'f, 'b: 'f, Self: 'f {
                (**self).get_range(key_start, key_end)
            }
            fn delete<'s, 'k, 'f>(&'s self, key: &'k str) -> KviFuture<'f, ()>
            where 's: 'f, 'k: 'f, Self: 'f {
                (**self).delete(key)
            }
            #[allow(clippy::too_many_arguments)]
            fn transaction<'s, 'a, 'b, 'c, 'd, 'e, 'g, 'f>(
                &'s self,
                key: &'a str,
                op: CompareOp,
                value: &'b str,
                then_key: &'c str,
                then_value: &'d str,
                else_key: &'e str,
                else_value: &'g str,
            ) -> KviFuture<'f, bool>
            where 's: 'f, 'a: 'f, 'b: 'f, 'c: 'f, 'd: 'f, 'e: 'f, 'g: 'f, Self: 'f {
                (**self).transaction(key, op, value, then_key, then_value, else_key, else_value)
            }
            fn tas<'s, 'a, 'b, 'c, 'f>(&'s self, key: &'a str, test_value: &'b str, set_value: &'c str) -> KviFuture<'f, bool>
            where 's: 'f, 'a: 'f, 'b: 'f, 'c: 'f, Self: 'f {
                (**self).tas(key, test_value, set_value)
            }
            fn watch<'s, 'k, 'f>(&'s self, key: &'k str) -> KviFuture<'f, WatchEvent>
            where 's: 'f, 'k: 'f, Self: 'f {
                (**self).watch(key)
            }
            fn watch_with_cb<'s, 'k, 'f>(&'s self, key: &'k str, change: KeyChange, cb: WatchCallback) -> KviFuture<'f, WatchHandle>
            where 's: 'f, 'k: 'f, Self: 'f {
                (**self).watch_with_cb(key, change, cb)
            }
            fn watch_cb_cancel(&self, handle: WatchHandle) {
                (**self).watch_cb_cancel(handle)
            }
            fn close<'s, 'f>(&'s self) -> KviFuture<'f, ()>
            where 's: 'f, Self: 'f {
                (**self).close()
            }
            fn watch_stream<'s, 'k, 'f>(&'s self, key: &'k str) -> KviFuture<'f, WatchStream>
            where 's: 'f, 'k: 'f, Self: 'f {
                (**self).watch_stream(key)
            }
            fn watch_prefix<'s, 'k, 'f>(&'s self, prefix: &'k str) -> KviFuture<'f, WatchStream>
            where 's: 'f, 'k: 'f, Self: 'f {
                (**self).watch_prefix(prefix)
            }
            fn lock<'s, 'n, 'f>(&'s self, name: &'n str) -> KviFuture<'f, LockGuard>
            where 's: 'f, 'n: 'f, Self: 'f {
                (**self).lock(name)
            }
            fn lock_with<'s, 'n, 'f>(&'s self, name: &'n str, options: LockOptions) -> KviFuture<'f, LockGuard>
            where 's: 'f, 'n: 'f, Self: 'f {
                (**self).lock_with(name, options)
            }
            fn campaign<'s, 'n, 'v, 'f>(&'s self, name: &'n str, value: &'v str) -> KviFuture<'f, Leadership>
            where 's: 'f, 'n: 'f, 'v: 'f, Self: 'f {
                (**self).campaign(name, value)
            }
            fn campaign_with<'s, 'n, 'v, 'f>(&'s self, name: &'n str, value: &'v str, options: LockOptions) -> KviFuture<'f, Leadership>
            where 's: 'f, 'n: 'f, 'v: 'f, Self: 'f {
                (**self).campaign_with(name, value, options)
            }
            fn leader<'s, 'n, 'f>(&'s self, name: &'n str) -> KviFuture<'f, Option<KeyValue>>
            where 's: 'f, 'n: 'f, Self: 'f {
                (**self).leader(name)
            }
            fn observe<'s, 'n, 'f>(&'s self, name: &'n str) -> KviFuture<'f, LeaderStream>
            where 's: 'f, 'n: 'f, Self: 'f {
                (**self).observe(name)
            }
            fn get_kv<'s, 'k, 'f>(&'s self, key: &'k str) -> KviFuture<'f, Option<KeyValue>>
            where 's: 'f, 'k: 'f, Self: 'f {
                (**self).get_kv(key)
            }
            fn get_prefix<'s, 'k, 'f>(&'s self, prefix: &'k str) -> KviFuture<'f, Vec<KeyValue>>
            where 's: 'f, 'k: 'f, Self: 'f {
                (**self).get_prefix(prefix)
            }
            fn list<'s, 'f>(&'s self, request: ListRequest) -> KviFuture<'f, ListPage>
            where 's: 'f, Self: 'f {
                (**self).list(request)
            }
            fn delete_prefix<'s, 'k, 'f>(&'s self, prefix: &'k str) -> KviFuture<'f, u64>
            where 's: 'f, 'k: 'f, Self: 'f {
                (**self).delete_prefix(prefix)
            }
            fn store_temp<'s, 'k, 'v, 'f>(&'s self, key: &'k str, value: &'v str) -> KviFuture<'f, ()>
            where 's: 'f, 'k: 'f, 'v: 'f, Self: 'f {
                (**self).store_temp(key, value)
            }
            fn txn<'s, 'f>(&'s self, txn: Txn) -> KviFuture<'f, TxnOutcome>
            where 's: 'f, Self: 'f {
                (**self).txn(txn)
            }
            fn update<'s, 'k, 'u, 'g, 'f>(&'s self, key: &'k str, f: &'u mut UpdateFn<'g>) -> KviFuture<'f, Option<String>>
            where 's: 'f, 'k: 'f, 'u: 'f, 'g: 'f, Self: 'f {
                (**self).update(key, f)
            }
            fn watch_prefix_from<'s, 'k, 'f>(&'s self, prefix: &'k str, revision: i64) -> KviFuture<'f, WatchStream>
            where 's: 'f, 'k: 'f, Self: 'f {
                (**self).watch_prefix_from(prefix, revision)
            }
        }
    )*};
}

forward_kvi!(Box, Arc);
