//! One in-memory store: the data, etcd's revision counter, the watchers and the locks.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::Stream;
use hashbrown::HashMap;
use hmetcd_core::{CompareOp, KeyValue, Result, WatchEvent};
use tokio::sync::{mpsc, OwnedMutexGuard};

/// Identifies the handle (and so the lease) that owns a temp key.
pub(crate) type LeaseId = u64;

#[derive(Debug)]
struct Entry {
    value: String,
    lease: Option<LeaseId>,
}

/// A participant's place in the queue of a lock.
pub(crate) enum Queued {
    /// The lock was free: it is ours.
    Acquired(OwnedMutexGuard<()>),
    /// Queued; the future completes when the lock is ours, and dropping it leaves the queue.
    Waiting(BoxFuture<'static, OwnedMutexGuard<()>>),
}

/// A store shared by every handle opened on it.
#[derive(Debug, Default)]
pub(crate) struct Store {
    state: RwLock<State>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    next_id: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct State {
    // Point reads and overwrites go to the hash map; the ordered set serves ranges.
    values: HashMap<String, Entry>,
    order: BTreeSet<String>,
    revision: i64,
    watchers: Watchers,
}

impl Default for State {
    fn default() -> Self {
        State {
            values: HashMap::new(),
            order: BTreeSet::new(),
            // As on a fresh etcd cluster: the first write gets revision 2.
            revision: 1,
            watchers: Watchers::default(),
        }
    }
}

type EventSender = mpsc::UnboundedSender<Result<WatchEvent>>;

#[derive(Debug)]
struct Watcher {
    id: u64,
    owner: LeaseId,
    // How many leading bytes of a stored key are the watching handle's prefix.
    strip: usize,
    tx: EventSender,
}

#[derive(Debug, Default)]
struct Watchers {
    exact: HashMap<String, Vec<Watcher>>,
    prefixes: Vec<(String, Watcher)>,
}

impl Watchers {
    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    fn notify(&mut self, stored_key: &str, value: Option<&str>, revision: i64) {
        let event = |strip: usize| {
            let key = stored_key.get(strip..).unwrap_or_default().to_owned();
            match value {
                Some(value) => WatchEvent::Put {
                    key,
                    value: value.to_owned(),
                    revision,
                },
                None => WatchEvent::Delete { key, revision },
            }
        };
        if let Some(list) = self.exact.get_mut(stored_key) {
            list.retain(|w| w.tx.send(Ok(event(w.strip))).is_ok());
            if list.is_empty() {
                self.exact.remove(stored_key);
            }
        }
        self.prefixes.retain(|(prefix, w)| {
            !stored_key.starts_with(prefix.as_str()) || w.tx.send(Ok(event(w.strip))).is_ok()
        });
    }

    fn remove(&mut self, id: u64, target: &Target) {
        match target {
            Target::Key(key) => {
                if let Some(list) = self.exact.get_mut(key) {
                    list.retain(|w| w.id != id);
                    if list.is_empty() {
                        self.exact.remove(key);
                    }
                }
            }
            Target::Prefix(_) => self.prefixes.retain(|(_, w)| w.id != id),
        }
    }
}

/// What a watcher watches, as stored keys.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Key(String),
    Prefix(String),
}

impl Store {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    /// Puts the participant's lock `key` (value `""`, bound to `lease`) and joins the queue of
    /// the lock `name` in one step, so that the queue's order is the order of the keys'
    /// revisions, as on etcd. Also returns the key's create revision (its fencing token).
    pub(crate) fn enqueue(&self, name: &str, key: &str, lease: LeaseId) -> (Queued, i64) {
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        let mutex = Arc::clone(locks.entry(name.to_owned()).or_default());
        let revision = self.write().put(key, "", Some(lease));
        // Unconstrained: a first poll must join tokio's fair queue, not yield to the scheduler.
        let mut wait: BoxFuture<'static, OwnedMutexGuard<()>> =
            Box::pin(tokio::task::unconstrained(mutex.lock_owned()));
        let mut context = Context::from_waker(futures::task::noop_waker_ref());
        let queued = match wait.as_mut().poll(&mut context) {
            Poll::Ready(guard) => Queued::Acquired(guard),
            // The waiter stays queued; the caller polls it again with its own waker.
            Poll::Pending => Queued::Waiting(wait),
        };
        drop(locks);
        (queued, revision)
    }

    /// Drops the mutex of the lock `name` if nobody holds, waits for or keeps it, so that
    /// many short-lived lock names do not pile up.
    pub(crate) fn forget_lock_if_unused(&self, name: &str) {
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        if locks
            .get(name)
            .is_some_and(|mutex| Arc::strong_count(mutex) == 1)
        {
            locks.remove(name);
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<String> {
        self.read().values.get(key).map(|entry| entry.value.clone())
    }

    /// Keys in `[start, end]` (stored form), sorted; `strip` leading bytes removed.
    pub(crate) fn range(&self, start: &str, end: &str, strip: usize) -> Vec<KeyValue> {
        use std::ops::Bound::Included;
        let state = self.read();
        state
            .order
            .range::<str, _>((Included(start), Included(end)))
            .filter_map(|key| {
                let entry = state.values.get(key)?;
                Some(KeyValue {
                    key: key.get(strip..).unwrap_or_default().to_owned(),
                    value: entry.value.clone(),
                })
            })
            .collect()
    }

    pub(crate) fn put(&self, key: &str, value: &str, lease: Option<LeaseId>) {
        let _ = self.write().put(key, value, lease);
    }

    pub(crate) fn delete(&self, key: &str) {
        let mut state = self.write();
        if state.remove(key) {
            state.revision += 1;
            let revision = state.revision;
            state.watchers.notify(key, None, revision);
        }
    }

    /// Deletes `key` if it is still bound to `lease` (a lock key of that handle).
    pub(crate) fn delete_leased(&self, key: &str, lease: LeaseId) {
        let mut state = self.write();
        if state
            .values
            .get(key)
            .is_some_and(|entry| entry.lease == Some(lease))
        {
            state.remove(key);
            state.revision += 1;
            let revision = state.revision;
            state.watchers.notify(key, None, revision);
        }
    }

    /// One atomic compare-and-put; etcd's rule: a comparison on a missing key is false.
    pub(crate) fn transaction(
        &self,
        key: &str,
        op: CompareOp,
        value: &str,
        then: (&str, &str),
        otherwise: (&str, &str),
    ) -> bool {
        let mut state = self.write();
        let holds = state
            .values
            .get(key)
            .is_some_and(|entry| op.holds(&entry.value, value));
        let (put_key, put_value) = if holds { then } else { otherwise };
        let _ = state.put(put_key, put_value, None);
        holds
    }

    /// Test-and-set; like etcd, a missing key fails the test and stays missing.
    pub(crate) fn tas(&self, key: &str, test: &str, set: &str) -> bool {
        let mut state = self.write();
        let matches = state
            .values
            .get(key)
            .is_some_and(|entry| entry.value == test);
        if matches {
            let _ = state.put(key, set, None);
        }
        matches
    }

    /// Deletes every key still bound to `lease`, in one revision, as etcd's lease revoke does.
    pub(crate) fn revoke(&self, lease: LeaseId, keys: &[String]) {
        let mut state = self.write();
        let owned: Vec<&String> = keys
            .iter()
            .filter(|key| {
                state
                    .values
                    .get(key.as_str())
                    .is_some_and(|entry| entry.lease == Some(lease))
            })
            .collect();
        if owned.is_empty() {
            return;
        }
        state.revision += 1;
        let revision = state.revision;
        for key in owned {
            state.remove(key);
            state.watchers.notify(key, None, revision);
        }
    }

    /// Registers a watcher; it sees every write made after this returns.
    pub(crate) fn watch(
        self: &Arc<Self>,
        target: Target,
        strip: usize,
        owner: LeaseId,
    ) -> MemWatchStream {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_id();
        let watcher = Watcher {
            id,
            owner,
            strip,
            tx,
        };
        let mut state = self.write();
        match &target {
            Target::Key(key) => state
                .watchers
                .exact
                .entry(key.clone())
                .or_default()
                .push(watcher),
            Target::Prefix(prefix) => state.watchers.prefixes.push((prefix.clone(), watcher)),
        }
        MemWatchStream {
            rx,
            id,
            target,
            store: Arc::downgrade(self),
        }
    }

    /// Ends every watch stream the handle `owner` opened (it was closed or dropped).
    pub(crate) fn unwatch_owner(&self, owner: LeaseId) {
        let mut state = self.write();
        let watchers = &mut state.watchers;
        watchers.exact.retain(|_, list| {
            list.retain(|w| w.owner != owner);
            !list.is_empty()
        });
        watchers.prefixes.retain(|(_, w)| w.owner != owner);
    }

    #[cfg(test)]
    pub(crate) fn watcher_count(&self) -> usize {
        let state = self.read();
        state.watchers.exact.values().map(Vec::len).sum::<usize>() + state.watchers.prefixes.len()
    }
}

impl State {
    /// Puts `key` and returns the new store revision.
    fn put(&mut self, key: &str, value: &str, lease: Option<LeaseId>) -> i64 {
        match self.values.get_mut(key) {
            Some(entry) => {
                entry.value.clear();
                entry.value.push_str(value);
                // As in etcd, a put without a lease detaches the key from its old lease.
                entry.lease = lease;
            }
            None => {
                self.values.insert(
                    key.to_owned(),
                    Entry {
                        value: value.to_owned(),
                        lease,
                    },
                );
                self.order.insert(key.to_owned());
            }
        }
        self.revision += 1;
        let revision = self.revision;
        if !self.watchers.is_empty() {
            self.watchers.notify(key, Some(value), revision);
        }
        revision
    }

    fn remove(&mut self, key: &str) -> bool {
        if self.values.remove(key).is_some() {
            self.order.remove(key);
            true
        } else {
            false
        }
    }
}

/// The stream behind `watch_stream` and `watch_prefix`; dropping it unregisters the watcher.
#[derive(Debug)]
pub(crate) struct MemWatchStream {
    rx: mpsc::UnboundedReceiver<Result<WatchEvent>>,
    id: u64,
    target: Target,
    store: Weak<Store>,
}

impl Stream for MemWatchStream {
    type Item = Result<WatchEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for MemWatchStream {
    fn drop(&mut self) {
        if let Some(store) = self.store.upgrade() {
            store.write().watchers.remove(self.id, &self.target);
        }
    }
}
