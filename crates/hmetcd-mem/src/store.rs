//! One in-memory store: the data, etcd's revision counter, the watchers and the locks.
//!
//! A lock is etcd's lock algorithm over the store itself: its queue is every key
//! `<name>/<lowercase hex>` in the store, oldest create revision first, and the oldest one
//! holds it. Whoever deletes a key (its participant, a lease revoke, or anyone's plain
//! `delete`) takes it out of the queue and the next key's participant holds the lock at once,
//! as an etcd waiter does when the key ahead of it is deleted.
//!
//! Every key carries etcd's metadata (create and mod revision, version, lease). The store
//! revision goes up by one per write request that changes something: a put, a delete that
//! deletes, a lease revoke that deletes keys, a transaction whose branch wrote; all the keys a
//! request changes share its revision.
//!
//! Watchers get each event as it is written. A watcher of a partitioned handle keeps what it
//! misses instead, and gets it when the partition ends, unless the store was compacted past
//! the first revision it still needs: then `Error::Compacted`, as etcd answers a watch that
//! reconnects behind a compaction.
//!
//! The store keeps a log of its events for `watch_prefix_from` (history first, then live):
//! every event from the compaction revision on. Logging an event copies its key and value into
//! chunks of bytes that the log fills in order and drops whole, so a write allocates nothing
//! for it (but a new chunk per 64 KiB) and the map keeps its values in place. The log compacts
//! itself like etcd's periodic compaction: once it spans more than twice `history` revisions
//! (the largest `history` option of the handles opened on the store), it drops all but the
//! last `history`; `Faults::compact` compacts it on demand.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::task::{Context, Poll};

use futures::Stream;
use hashbrown::HashMap;
use hmetcd_core::keys::{is_lease_suffix, KeyPrefix};
use hmetcd_core::{
    Candidate, CompareOp, Error, KeyValue, ListPage, ListRequest, LostReason, LostSignal, Op,
    Result, Txn, TxnOutcome, WatchEvent,
};
use tokio::sync::OwnedMutexGuard;

/// A lease of a handle: what its temp keys and lock keys are bound to. A handle takes a new
/// one when its lease expires (`Faults`).
pub(crate) type LeaseId = u64;

/// Identifies a handle, the owner of watchers.
pub(crate) type HandleId = u64;

#[derive(Debug)]
struct Entry {
    value: String,
    lease: Option<LeaseId>,
    /// The revision that created the key: its place in a lock's queue.
    create_revision: i64,
    /// The revision of the key's last write.
    mod_revision: i64,
    /// Puts since the key was created, from 1.
    version: i64,
}

impl Entry {
    /// The key as callers see it (`strip` leading bytes of `stored` removed), with its
    /// metadata; its value left empty with `keys_only`.
    fn key_value(&self, stored: &str, strip: usize, keys_only: bool) -> KeyValue {
        let value = if keys_only { "" } else { &*self.value };
        KeyValue::new(stored.get(strip..).unwrap_or_default(), value).with_metadata(
            self.create_revision,
            self.mod_revision,
            self.version,
            self.lease.map_or(0, lease_id),
        )
    }
}

/// A lease as `KeyValue::lease` shows it (etcd's lease ids are `i64`).
fn lease_id(lease: LeaseId) -> i64 {
    i64::try_from(lease).unwrap_or(i64::MAX)
}

/// The size of the log's chunks of bytes (a bigger event gets a chunk of its own size).
const LOG_CHUNK: usize = 64 * 1024;

/// One event of the history log (24 bytes): a put or a delete of a key (stored form), whose
/// key and value (for a put) lie one after the other in a chunk of the log.
#[derive(Debug)]
struct Logged {
    revision: i64,
    /// The sequence number of the chunk (wrapping).
    chunk: u32,
    /// Where the key starts in the chunk.
    start: u32,
    key_len: u32,
    /// The value's length; [`DELETED`] for a delete.
    value_len: u32,
}

/// `Logged::value_len` of a delete.
const DELETED: u32 = u32::MAX;

/// The history log: events oldest first, their keys and values in chunks.
#[derive(Debug, Default)]
struct Log {
    events: VecDeque<Logged>,
    chunks: VecDeque<String>,
    /// The sequence number of `chunks[0]` (wrapping).
    first_chunk: u32,
    /// A chunk emptied by compaction, kept for the next one: in a steady state the log
    /// neither allocates nor frees (freeing 64 KiB makes glibc consolidate its free lists).
    spare: Option<String>,
}

impl Log {
    /// Logs an event; `false` if it cannot be (a key or value of 4 GiB or more, or a chunk
    /// that big): the caller compacts the history past it.
    fn push(&mut self, revision: i64, key: &str, value: Option<&str>) -> bool {
        let len = key.len() + value.map_or(0, str::len);
        let (Ok(key_len), Ok(value_len)) = (
            u32::try_from(key.len()),
            value.map_or(Ok(DELETED), |value| u32::try_from(value.len())),
        ) else {
            return false;
        };
        if value_len == DELETED && value.is_some() {
            return false;
        }
        let full = self
            .chunks
            .back()
            .is_none_or(|chunk| chunk.capacity() - chunk.len() < len);
        if full {
            // A spare too small for this event stays for the next.
            let chunk = match self.spare.take_if(|spare| spare.capacity() >= len) {
                Some(spare) => spare,
                None => String::with_capacity(LOG_CHUNK.max(len)),
            };
            self.chunks.push_back(chunk);
        }
        let chunk = self
            .first_chunk
            .wrapping_add(u32::try_from(self.chunks.len()).unwrap_or(u32::MAX))
            .wrapping_sub(1);
        let Some(bytes) = self.chunks.back_mut() else {
            return false;
        };
        let Ok(start) = u32::try_from(bytes.len()) else {
            return false;
        };
        bytes.push_str(key);
        if let Some(value) = value {
            bytes.push_str(value);
        }
        self.events.push_back(Logged {
            revision,
            chunk,
            start,
            key_len,
            value_len,
        });
        true
    }

    /// Drops the oldest event if it is before `revision`; `false` if there is none such.
    fn pop_before(&mut self, revision: i64) -> bool {
        let Some(oldest) = self.events.front() else {
            return false;
        };
        if oldest.revision >= revision {
            return false;
        }
        let chunk = oldest.chunk;
        self.events.pop_front();
        if self.events.front().is_none_or(|next| next.chunk != chunk) {
            self.drop_chunks();
        }
        true
    }

    /// Drops the chunks before the oldest event's (the last one stays, to be filled), keeping
    /// one for reuse.
    #[cold]
    fn drop_chunks(&mut self) {
        let keep = self.events.front().map(|logged| logged.chunk);
        while Some(self.first_chunk) != keep && self.chunks.len() > 1 {
            if let Some(mut chunk) = self.chunks.pop_front() {
                if self.spare.is_none() && chunk.capacity() == LOG_CHUNK {
                    chunk.clear();
                    self.spare = Some(chunk);
                }
            }
            self.first_chunk = self.first_chunk.wrapping_add(1);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.events.len()
    }

    /// The key (stored form) and value of `logged`.
    fn text(&self, logged: &Logged) -> Option<(&str, Option<&str>)> {
        let index = usize::try_from(logged.chunk.wrapping_sub(self.first_chunk)).ok()?;
        let chunk = self.chunks.get(index)?;
        let start = usize::try_from(logged.start).ok()?;
        let key_end = start + usize::try_from(logged.key_len).ok()?;
        let key = chunk.get(start..key_end)?;
        let value = match logged.value_len {
            DELETED => None,
            len => Some(chunk.get(key_end..key_end + usize::try_from(len).ok()?)?),
        };
        Some((key, value))
    }

    /// The events with revision `>= from` under `prefix` (stored form), `strip` leading bytes
    /// of their keys removed, oldest first.
    fn replay<'a>(
        &'a self,
        from: i64,
        prefix: &'a str,
        strip: usize,
    ) -> impl Iterator<Item = WatchEvent> + 'a {
        let first = self.events.partition_point(|logged| logged.revision < from);
        self.events.range(first..).filter_map(move |logged| {
            let (key, value) = self.text(logged)?;
            if !key.starts_with(prefix) {
                return None;
            }
            let key = key.get(strip..).unwrap_or_default().to_owned();
            let revision = logged.revision;
            Some(match value {
                Some(value) => WatchEvent::Put {
                    key,
                    value: value.to_owned(),
                    revision,
                },
                None => WatchEvent::Delete { key, revision },
            })
        })
    }
}

/// Where a lock participant stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// Waiting until every lock key created before its own is deleted.
    Queued,
    /// Its key is the oldest of the lock's keys: it holds the lock.
    Holding,
    /// Its key is gone: deleted by the participant itself (`None`), or for the reason given.
    Gone(Option<LostReason>),
}

/// One participant's place in the queue of a lock: its key, what the store tells it, and
/// what the store lets go for it once its hold ends.
#[derive(Debug)]
pub(crate) struct Place {
    key: String,
    /// The create revision of `key`: the participant's fencing token.
    revision: i64,
    status: tokio::sync::watch::Sender<Status>,
    /// Fired when a hold ends other than by the participant's own release.
    lost: LostSignal,
    /// The participant's place at the front of its handle's queue for the name.
    local: Mutex<Option<OwnedMutexGuard<()>>>,
}

impl Place {
    /// The participant's stored lock key.
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    /// The create revision of the participant's lock key.
    pub(crate) fn revision(&self) -> i64 {
        self.revision
    }

    pub(crate) fn status(&self) -> Status {
        *self.status.borrow()
    }

    pub(crate) fn lost(&self) -> &LostSignal {
        &self.lost
    }

    /// Waits until the participant holds the lock or its key is gone.
    pub(crate) async fn turn(&self) -> Status {
        let mut status = self.status.subscribe();
        let settled = status.wait_for(|status| *status != Status::Queued).await;
        // The sender lives as long as `self`; `Err` cannot happen while we borrow it.
        settled.map_or(Status::Gone(None), |status| *status)
    }

    /// Takes back the participant's place in its handle's queue (to queue again with it).
    pub(crate) fn take_local(&self) -> Option<OwnedMutexGuard<()>> {
        self.local
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// The key is gone. A holder is told why (unless it released the lock itself) and gives up
    /// its place in its handle's queue; a waiter whose key was deleted, or whose lease was
    /// lost, keeps that place, as it queues again (on etcd: on the handle's next lease).
    fn end(&self, reason: Option<LostReason>) {
        let was = self.status.send_replace(Status::Gone(reason));
        let holder = was == Status::Holding;
        if holder {
            if let Some(reason) = reason {
                // Losses to `max_hold`, a lost lease or a close have their event where they start.
                if reason == LostReason::KeyDeleted {
                    tracing::warn!(lock = %self.key, %reason, token = self.revision, "lost the lock");
                }
                self.lost.fire(reason);
            }
        }
        let queues_again = matches!(
            reason,
            Some(LostReason::KeyDeleted | LostReason::SessionLost)
        );
        if holder || !queues_again {
            drop(self.take_local());
        }
    }
}

/// Etcd's lock layout: `<name>/<lease id in lowercase hex>`.
pub(crate) fn lock_key(name: &str, lease: LeaseId) -> String {
    format!("{name}/{lease:x}")
}

/// The lock name of a lock key `<name>/<lowercase hex>`, or `None` for any other key.
fn lock_name_of(key: &str) -> Option<&str> {
    let (name, id) = key.rsplit_once('/')?;
    is_lease_suffix(id.as_bytes()).then_some(name)
}

/// The keys of one lock that a participant of this store waits for or holds.
#[derive(Debug, Default)]
struct Queue {
    /// Every key `<name>/<lowercase hex>` in the store by create revision, with its
    /// participant; `None` for keys written otherwise (a plain `store`), which queue like a
    /// participant of another client, as on etcd.
    keys: BTreeMap<i64, Option<Arc<Place>>>,
    /// How many of `keys` have a participant; the queue is dropped when none has.
    places: usize,
}

impl Queue {
    /// The participant of the oldest key holds the lock.
    fn promote_front(&self) {
        if let Some((_, Some(place))) = self.keys.first_key_value() {
            place.status.send_if_modified(|status| {
                let promote = *status == Status::Queued;
                if promote {
                    *status = Status::Holding;
                }
                promote
            });
        }
    }
}

/// The queues of the locks that participants wait for or hold, by stored lock name.
#[derive(Debug, Default)]
struct LockQueues(HashMap<String, Queue>);

impl LockQueues {
    /// `key` was created at `revision`: if it is a key of a lock in use, it queues last.
    fn created(&mut self, key: &str, revision: i64) {
        if self.0.is_empty() {
            return;
        }
        if let Some(queue) = lock_name_of(key).and_then(|name| self.0.get_mut(name)) {
            // Keys put in one transaction share a revision: the first keeps the place.
            queue.keys.entry(revision).or_insert(None);
        }
    }

    /// `key`, created at `create_revision`, was deleted: its participant (if any) is told
    /// `reason` (`None`: it deleted the key itself) and the next key's participant holds.
    fn deleted(&mut self, key: &str, create_revision: i64, reason: Option<LostReason>) {
        if self.0.is_empty() {
            return;
        }
        let Some(name) = lock_name_of(key) else {
            return;
        };
        let Some(queue) = self.0.get_mut(name) else {
            return;
        };
        let Some(place) = queue.keys.remove(&create_revision) else {
            return;
        };
        if let Some(place) = place {
            place.end(reason);
            queue.places -= 1;
        }
        if queue.places == 0 {
            self.0.remove(name);
        } else {
            queue.promote_front();
        }
    }
}

/// A store shared by every handle opened on it.
#[derive(Debug, Default)]
pub(crate) struct Store {
    state: RwLock<State>,
    next_id: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct State {
    // Point reads and overwrites go to the hash map; the ordered set serves ranges.
    values: HashMap<String, Entry>,
    order: BTreeSet<String>,
    revision: i64,
    /// Revisions before this one are forgotten (`Faults::compact`, or the log compacting
    /// itself); 0: nothing compacted.
    compacted: i64,
    /// Every event from `compacted` on, oldest first, for `watch_prefix_from` (and a few
    /// before it that `record` has yet to drop, which no watch replays).
    log: Log,
    /// How many revisions the log keeps at least (the largest `history` option of the
    /// handles opened on the store); 0 until a handle says.
    history: i64,
    watchers: Watchers,
    locks: LockQueues,
}

impl Default for State {
    fn default() -> Self {
        State {
            values: HashMap::new(),
            order: BTreeSet::new(),
            // As on a fresh etcd cluster: the first write gets revision 2.
            revision: 1,
            compacted: 0,
            log: Log::default(),
            history: 0,
            watchers: Watchers::default(),
            locks: LockQueues::default(),
        }
    }
}

use hmetcd_core::instrument::{event_channel, EventReceiver, EventSender};

/// How many events a watcher of a partitioned handle keeps for when the partition ends. One
/// more, and its missed history counts as compacted: it gets `Error::Compacted` at the end of
/// the partition, as an etcd watcher does that reconnects behind a compaction.
pub const MISSED_EVENTS_LIMIT: usize = 10_000;

#[derive(Debug)]
struct Watcher {
    id: u64,
    owner: HandleId,
    // How many leading bytes of a stored key are the watching handle's prefix.
    strip: usize,
    tx: EventSender,
    /// The first revision not yet delivered: where an etcd watch resumes after a reconnect.
    next: i64,
    /// The first revision the watcher wants (`watch_prefix_from` a future revision): earlier
    /// events are not for it.
    from: i64,
    /// While the owner is partitioned: the events it missed (boxed: rare, and the common
    /// watcher stays small).
    missed: Option<Box<Missed>>,
}

/// What a watcher of a partitioned handle missed.
#[derive(Debug, Default)]
struct Missed {
    events: VecDeque<WatchEvent>,
    /// More than [`MISSED_EVENTS_LIMIT`] events were missed: the revision of the first one
    /// not kept.
    overrun: Option<i64>,
}

impl Missed {
    /// Keeps `event` at `revision` for the end of the partition, up to the limit. Only
    /// partitioned handles get here.
    #[cold]
    fn keep(&mut self, event: WatchEvent, revision: i64) {
        if self.overrun.is_none() {
            if self.events.len() < MISSED_EVENTS_LIMIT {
                self.events.push_back(event);
            } else {
                self.events = VecDeque::new();
                self.overrun = Some(revision);
            }
        }
    }
}

impl Watcher {
    /// Delivers `event` at `revision`, or keeps it while the owner is partitioned. `false`
    /// once the stream is gone.
    #[inline]
    fn deliver(&mut self, event: WatchEvent, revision: i64) -> bool {
        if revision < self.from {
            return !self.tx.is_closed();
        }
        match &mut self.missed {
            None => {
                self.next = revision + 1;
                self.tx.send(Ok(event)).is_ok()
            }
            Some(missed) => {
                missed.keep(event, revision);
                !self.tx.is_closed()
            }
        }
    }

    /// The owner's partition ended: delivers what the watcher missed, in order; or, if part of
    /// that was compacted away (the store's `compacted` revision is past the watcher's next
    /// one), `Error::Compacted` as its last item. `false` if the watcher ends.
    fn catch_up(&mut self, stored: &str, compacted: i64) -> bool {
        let Some(missed) = self.missed.take() else {
            return true;
        };
        let compact_revision = match missed.overrun {
            Some(overrun) => Some(overrun.max(compacted)),
            None => (compacted > self.next).then_some(compacted),
        };
        if let Some(compact_revision) = compact_revision {
            tracing::debug!(
                revision = self.next,
                compact_revision,
                "a partitioned watcher is behind the compaction"
            );
            let _ = self.tx.send(Err(Error::Compacted {
                key: stored.get(self.strip..).unwrap_or_default().to_owned(),
                revision: self.next,
                compact_revision,
            }));
            return false;
        }
        for event in missed.events {
            let revision = event.revision();
            if !self.deliver(event, revision) {
                return false;
            }
        }
        true
    }
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
            list.retain_mut(|w| w.deliver(event(w.strip), revision));
            if list.is_empty() {
                self.exact.remove(stored_key);
            }
        }
        self.prefixes.retain_mut(|(prefix, w)| {
            !stored_key.starts_with(prefix.as_str()) || w.deliver(event(w.strip), revision)
        });
    }

    /// Applies `f` to every watcher of `owner` with what it watches (stored form); drops
    /// those for which it returns `false`.
    fn retain_owned(&mut self, owner: HandleId, mut f: impl FnMut(&str, &mut Watcher) -> bool) {
        self.exact.retain(|key, list| {
            list.retain_mut(|w| w.owner != owner || f(key, w));
            !list.is_empty()
        });
        self.prefixes
            .retain_mut(|(prefix, w)| w.owner != owner || f(prefix, w));
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

    /// Puts the participant's lock key (its `value`: `""` for a lock, a candidate's value for
    /// an election; bound to `lease`) and queues it behind every key `<name>/<lowercase hex>`
    /// created before it, in one step. `local` is the participant's place in its handle's
    /// queue, let go when its hold ends.
    ///
    /// The key is `<name>/<lease in lowercase hex>`, read under the store's lock: a lease
    /// replaced meanwhile (`Faults::expire_lease`) is replaced under it too, so a key is never
    /// put on a lease that is already gone.
    pub(crate) fn enqueue(
        &self,
        name: &str,
        value: &str,
        lease: &AtomicU64,
        local: OwnedMutexGuard<()>,
    ) -> Arc<Place> {
        let mut state = self.write();
        let state = &mut *state;
        let lease = lease.load(std::sync::atomic::Ordering::Acquire);
        let key = &lock_key(name, lease);
        if !state.locks.0.contains_key(name) {
            let queue = state.existing_lock_keys(name);
            state.locks.0.insert(name.to_owned(), queue);
        }
        let revision = match state.values.get(key.as_str()) {
            // As on etcd, whose waiter puts its key only if it is missing: a key already
            // there keeps its place in the queue. It takes this participant's value (a
            // candidate's value is its own, as Go's Campaign proclaims it) and lease (someone
            // else may have written it, with none: it must go when this handle does).
            Some(entry) if entry.value != value || entry.lease != Some(lease) => {
                let revision = entry.create_revision;
                let _ = state.put(key, value, Some(lease));
                revision
            }
            Some(entry) => entry.create_revision,
            None => state.put(key, value, Some(lease)),
        };
        let place = Arc::new(Place {
            key: key.to_owned(),
            revision,
            status: tokio::sync::watch::Sender::new(Status::Queued),
            lost: LostSignal::new(),
            local: Mutex::new(Some(local)),
        });
        if let Some(queue) = state.locks.0.get_mut(name) {
            let slot = queue.keys.entry(revision).or_default();
            if slot.replace(Arc::clone(&place)).is_none() {
                queue.places += 1;
            }
            queue.promote_front();
        }
        place
    }

    /// The participant of `place` leaves: it unlocks, or gives up waiting. Deletes its key if
    /// the key is still its own (not deleted by someone else and put again since).
    pub(crate) fn release(&self, place: &Arc<Place>) {
        let mut state = self.write();
        let ours = lock_name_of(&place.key)
            .and_then(|name| state.locks.0.get(name))
            .and_then(|queue| queue.keys.get(&place.revision))
            .is_some_and(|slot| slot.as_ref().is_some_and(|p| Arc::ptr_eq(p, place)));
        if ours {
            state.delete(&place.key, None);
        } else {
            drop(state);
            place.end(None);
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<String> {
        self.read().values.get(key).map(|entry| entry.value.clone())
    }

    /// `key` (stored form) with its metadata; `strip` leading bytes removed.
    pub(crate) fn get_kv(&self, key: &str, strip: usize) -> Option<KeyValue> {
        self.read().key_value(key, strip)
    }

    /// Keys in `[start, end]` (stored form), sorted, with metadata; `strip` leading bytes
    /// removed.
    pub(crate) fn range(&self, start: &str, end: &str, strip: usize) -> Vec<KeyValue> {
        use std::ops::Bound::Included;
        let state = self.read();
        state
            .order
            .range::<str, _>((Included(start), Included(end)))
            .filter_map(|key| Some(state.values.get(key)?.key_value(key, strip, false)))
            .collect()
    }

    /// One page of `request` for a handle with `prefix`, read at one revision.
    pub(crate) fn list(&self, request: &ListRequest, prefix: &KeyPrefix) -> ListPage {
        use std::ops::Bound::{Included, Unbounded};
        let state = self.read();
        let Some(lower) = request.lower_bound() else {
            return ListPage::new(Vec::new(), false, 0, state.revision);
        };
        let start = prefix.apply(&lower);
        let strip = prefix.as_str().len();
        let limit = request.page_limit().unwrap_or(usize::MAX);
        let keys_only = request.is_keys_only();
        let mut items = Vec::new();
        let mut count = 0usize;
        let range = request.key_range();
        for stored in state
            .order
            .range::<str, _>((Included(start.as_str()), Unbounded))
        {
            let Some(key) = prefix.strip(stored) else {
                break;
            };
            if !range.contains(key) {
                // Sorted: nothing after a key past the range is in it.
                break;
            }
            if !request.matches(key) {
                continue;
            }
            count += 1;
            if items.len() < limit {
                if let Some(entry) = state.values.get(stored) {
                    items.push(entry.key_value(stored, strip, keys_only));
                }
            }
        }
        let more = count > items.len();
        ListPage::new(
            items,
            more,
            i64::try_from(count).unwrap_or(i64::MAX),
            state.revision,
        )
    }

    /// Deletes every key starting with `prefix` (stored form) in one revision, in key order;
    /// lock keys among them leave their queues as with `delete`. Returns the stored keys
    /// deleted.
    pub(crate) fn delete_prefix(&self, prefix: &str) -> Vec<String> {
        let mut state = self.write();
        let keys = state.keys_with_prefix(prefix);
        if !keys.is_empty() {
            state.revision += 1;
            let revision = state.revision;
            for key in &keys {
                state.delete_at(key, revision, Some(LostReason::KeyDeleted));
            }
        }
        keys
    }

    /// Runs `txn` for a handle with `prefix` in one step; `Op::PutTemp` binds to the handle's
    /// `lease`, read under the store's lock (see `enqueue`). `Err` (nothing written) for an
    /// operation this backend does not know.
    pub(crate) fn txn(
        &self,
        txn: &Txn,
        prefix: &KeyPrefix,
        lease: &AtomicU64,
    ) -> Result<TxnOutcome> {
        let mut state = self.write();
        let lease = lease.load(std::sync::atomic::Ordering::Acquire);
        state.txn(txn, prefix, lease)
    }

    pub(crate) fn put(&self, key: &str, value: &str) {
        let _ = self.write().put(key, value, None);
    }

    /// Puts `key` bound to the handle's `lease`, read under the store's lock (see `enqueue`).
    pub(crate) fn put_on_lease(&self, key: &str, value: &str, lease: &AtomicU64) {
        let mut state = self.write();
        let lease = lease.load(std::sync::atomic::Ordering::Acquire);
        let _ = state.put(key, value, Some(lease));
    }

    /// Deletes `key`; a lock key's holder loses the lock (`KeyDeleted`) and the next waiter
    /// gets it, as on etcd.
    pub(crate) fn delete(&self, key: &str) {
        self.write().delete(key, Some(LostReason::KeyDeleted));
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

    /// Deletes every key still bound to `lease`, in one revision and in key order, as etcd's
    /// lease revoke does; the lease's lock holders lose their locks for `reason`, its lock
    /// waiters queue again (on the handle's next lease). With `replace`, the handle's lease
    /// becomes `replace.1` in the same step.
    pub(crate) fn revoke(
        &self,
        lease: LeaseId,
        keys: &[String],
        reason: LostReason,
        replace: Option<(&AtomicU64, LeaseId)>,
    ) {
        let mut state = self.write();
        if let Some((current, next)) = replace {
            current.store(next, std::sync::atomic::Ordering::Release);
        }
        let mut owned: Vec<&String> = keys
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
        // etcd's lessor deletes a revoked lease's keys sorted, so watchers see them so.
        owned.sort_unstable();
        owned.dedup();
        state.revision += 1;
        let revision = state.revision;
        for key in owned {
            state.delete_at(key, revision, Some(reason));
        }
    }

    /// Puts `value` on the key of `place` if it still holds its lock with that key (a
    /// candidate proclaiming): `false` once the hold is lost.
    pub(crate) fn proclaim(&self, place: &Place, value: &str) -> bool {
        let mut state = self.write();
        let lease = match state.values.get(place.key.as_str()) {
            Some(entry)
                if entry.create_revision == place.revision && place.status() == Status::Holding =>
            {
                entry.lease
            }
            _ => return false,
        };
        let _ = state.put(&place.key, value, lease);
        true
    }

    /// The participants of the lock or election whose keys start with `dir` (`<name>/`, stored
    /// form), as key (less `strip` bytes), value and create revision, oldest first; and a
    /// watch of `dir` that sees every write after that read.
    pub(crate) fn candidates_and_watch(
        self: &Arc<Self>,
        dir: &str,
        strip: usize,
        owner: HandleId,
    ) -> (Vec<Candidate>, MemWatchStream) {
        let mut state = self.write();
        let mut candidates: Vec<Candidate> = state
            .order
            .range::<str, _>((std::ops::Bound::Included(dir), std::ops::Bound::Unbounded))
            .take_while(|key| key.starts_with(dir))
            .filter(|key| lock_name_of(key).is_some_and(|name| name.len() + 1 == dir.len()))
            .filter_map(|key| {
                let entry = state.values.get(key)?;
                Some(Candidate {
                    key: key.get(strip..).unwrap_or_default().to_owned(),
                    value: entry.value.clone(),
                    create_revision: entry.create_revision,
                })
            })
            .collect();
        candidates.sort_by_key(|candidate| candidate.create_revision);
        let stream = self.register(&mut state, Target::Prefix(dir.to_owned()), strip, owner);
        (candidates, stream)
    }

    /// Puts each value back at its key of `keys` where the key is absent, bound to `lease`,
    /// all in one revision (etcd: one transaction of `create_revision == 0` guarded puts).
    /// Returns the keys that were present: someone else wrote them since, they are theirs.
    pub(crate) fn restore(&self, lease: LeaseId, keys: &[(String, String)]) -> Vec<String> {
        let mut state = self.write();
        let (absent, present): (Vec<_>, Vec<_>) = keys
            .iter()
            .partition(|(key, _)| !state.values.contains_key(key.as_str()));
        if !absent.is_empty() {
            state.revision += 1;
            let revision = state.revision;
            for (key, value) in absent {
                state.put_at(key, value, Some(lease), revision);
            }
        }
        present.into_iter().map(|(key, _)| key.clone()).collect()
    }

    /// Forgets history before `revision` (at most the current revision, as etcd refuses a
    /// future one). Returns the store's compaction revision.
    pub(crate) fn compact(&self, revision: i64) -> i64 {
        let mut state = self.write();
        if revision > state.revision {
            tracing::warn!(
                revision,
                current = state.revision,
                "compaction past the store's revision; compacting at it"
            );
        }
        let revision = revision.min(state.revision);
        state.compact_to(revision);
        state.compacted
    }

    /// A handle asks the store to keep at least `revisions` revisions of history: the store
    /// keeps the largest any handle asked for.
    pub(crate) fn keep_history(&self, revisions: u64) {
        let revisions = i64::try_from(revisions).unwrap_or(i64::MAX);
        let mut state = self.write();
        state.history = state.history.max(revisions);
    }

    /// The store's revision now.
    pub(crate) fn revision(&self) -> i64 {
        self.read().revision
    }

    /// The handle `owner` is partitioned: its watchers keep what they miss.
    pub(crate) fn cut_watchers(&self, owner: HandleId) {
        self.write().watchers.retain_owned(owner, |_, w| {
            w.missed.get_or_insert_with(Box::default);
            true
        });
    }

    /// The partition of `owner` ended: its watchers get what they missed, in order (or
    /// `Error::Compacted`, and end, if part of it was compacted away).
    pub(crate) fn resume_watchers(&self, owner: HandleId) {
        let mut state = self.write();
        let state = &mut *state;
        let compacted = state.compacted;
        state
            .watchers
            .retain_owned(owner, |watched, w| w.catch_up(watched, compacted));
    }

    /// Registers a watcher; it sees every write made after this returns.
    pub(crate) fn watch(
        self: &Arc<Self>,
        target: Target,
        strip: usize,
        owner: HandleId,
    ) -> MemWatchStream {
        let mut state = self.write();
        self.register(&mut state, target, strip, owner)
    }

    /// A watcher of every change under `prefix` (stored form) with revision `>= from`: the
    /// logged ones are in its stream before this returns, the later ones follow as they are
    /// written. If `from` is below the compaction, the stream holds only `Error::Compacted`.
    pub(crate) fn watch_from(
        self: &Arc<Self>,
        prefix: String,
        strip: usize,
        owner: HandleId,
        from: i64,
    ) -> MemWatchStream {
        let mut state = self.write();
        if from < state.compacted {
            let (tx, rx) = event_channel("mem");
            let _ = tx.send(Err(Error::Compacted {
                key: prefix.get(strip..).unwrap_or_default().to_owned(),
                revision: from,
                compact_revision: state.compacted,
            }));
            return MemWatchStream {
                rx,
                // No watcher has id 0: dropping the stream unregisters nothing.
                id: 0,
                target: Target::Prefix(prefix),
                store: Weak::new(),
            };
        }
        let (tx, rx) = event_channel("mem");
        for event in state.log.replay(from, &prefix, strip) {
            let _ = tx.send(Ok(event));
        }
        self.register_with(
            &mut state,
            Target::Prefix(prefix),
            strip,
            owner,
            tx,
            rx,
            from,
        )
    }

    fn register(
        self: &Arc<Self>,
        state: &mut State,
        target: Target,
        strip: usize,
        owner: HandleId,
    ) -> MemWatchStream {
        let (tx, rx) = event_channel("mem");
        self.register_with(state, target, strip, owner, tx, rx, 0)
    }

    #[allow(clippy::too_many_arguments)]
    fn register_with(
        self: &Arc<Self>,
        state: &mut State,
        target: Target,
        strip: usize,
        owner: HandleId,
        tx: EventSender,
        rx: EventReceiver,
        from: i64,
    ) -> MemWatchStream {
        let id = self.next_id();
        let watcher = Watcher {
            id,
            owner,
            strip,
            tx,
            next: from.max(state.revision + 1),
            from,
            missed: None,
        };
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
    pub(crate) fn unwatch_owner(&self, owner: HandleId) {
        self.write().watchers.retain_owned(owner, |_, _| false);
    }

    /// How many events the history log holds.
    #[cfg(test)]
    pub(crate) fn logged(&self) -> usize {
        self.read().log.len()
    }

    #[cfg(test)]
    pub(crate) fn watcher_count(&self) -> usize {
        let state = self.read();
        state.watchers.exact.values().map(Vec::len).sum::<usize>() + state.watchers.prefixes.len()
    }

    /// Whether the store keeps no watcher, nor an entry for one (what `record` asks).
    #[cfg(test)]
    pub(crate) fn has_no_watchers(&self) -> bool {
        self.read().watchers.is_empty()
    }

    /// How many lock queues the store keeps (one per lock name a participant uses).
    #[cfg(test)]
    pub(crate) fn lock_queue_count(&self) -> usize {
        self.read().locks.0.len()
    }
}

impl State {
    /// Puts `key` and returns the new store revision.
    fn put(&mut self, key: &str, value: &str, lease: Option<LeaseId>) -> i64 {
        self.revision += 1;
        let revision = self.revision;
        self.put_at(key, value, lease, revision);
        revision
    }

    /// Puts `key` at `revision` (the current one: several puts of one transaction share it).
    fn put_at(&mut self, key: &str, value: &str, lease: Option<LeaseId>, revision: i64) {
        match self.values.get_mut(key) {
            Some(entry) => {
                entry.value.clear();
                entry.value.push_str(value);
                // As in etcd, a put without a lease detaches the key from its old lease.
                entry.lease = lease;
                entry.mod_revision = revision;
                entry.version += 1;
            }
            None => {
                self.values.insert(
                    key.to_owned(),
                    Entry {
                        value: value.to_owned(),
                        lease,
                        create_revision: revision,
                        mod_revision: revision,
                        version: 1,
                    },
                );
                self.order.insert(key.to_owned());
                self.locks.created(key, revision);
            }
        }
        self.record(key, Some(value), revision);
    }

    /// Deletes `key` in a revision of its own; a lock key leaves its lock's queue, and its
    /// participant is told `reason` (`None`: it deleted the key itself).
    fn delete(&mut self, key: &str, reason: Option<LostReason>) {
        if self.values.contains_key(key) {
            self.revision += 1;
            let revision = self.revision;
            self.delete_at(key, revision, reason);
        }
    }

    /// Deletes `key` at `revision` (the current one: the deletes of one request share it), if
    /// present; a lock key leaves its lock's queue, and its participant is told `reason`.
    /// Whether it was present.
    fn delete_at(&mut self, key: &str, revision: i64, reason: Option<LostReason>) -> bool {
        let Some(entry) = self.values.remove(key) else {
            return false;
        };
        self.order.remove(key);
        self.locks.deleted(key, entry.create_revision, reason);
        self.record(key, None, revision);
        true
    }

    /// Logs an event and delivers it to the watchers. The log compacts itself once it spans
    /// more than twice `history` revisions, down to the last `history`: the compaction
    /// revision moves at once, the events before it go two per event logged (no write pays
    /// for dropping thousands at a time; the log still shrinks, as every write logs at least
    /// one event).
    fn record(&mut self, key: &str, value: Option<&str>, revision: i64) {
        if !self.watchers.is_empty() {
            self.watchers.notify(key, value, revision);
        }
        if !self.log.push(revision, key, value) {
            tracing::warn!(
                revision,
                "an event too big for the history log; the history is compacted past it"
            );
            self.compact_to(revision + 1);
        }
        if self.history > 0 && revision - self.compacted > self.history.saturating_mul(2) {
            self.compacted = revision - self.history + 1;
        }
        if self.log.pop_before(self.compacted) {
            self.log.pop_before(self.compacted);
        }
    }

    /// Forgets the history before `revision` (`Faults::compact`), at once.
    fn compact_to(&mut self, revision: i64) {
        self.compacted = self.compacted.max(revision);
        while self.log.pop_before(self.compacted) {}
    }

    /// `key` (stored form) with its metadata, `strip` leading bytes removed.
    fn key_value(&self, key: &str, strip: usize) -> Option<KeyValue> {
        Some(self.values.get(key)?.key_value(key, strip, false))
    }

    /// The stored keys starting with `prefix`, sorted.
    fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        use std::ops::Bound::{Included, Unbounded};
        self.order
            .range::<str, _>((Included(prefix), Unbounded))
            .take_while(|key| key.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// A transaction in one step (see `Store::txn`): compares on the keys' current state, then
    /// the branch's operations in order at one revision, taken at its first change.
    fn txn(&mut self, txn: &Txn, prefix: &KeyPrefix, lease: LeaseId) -> Result<TxnOutcome> {
        let strip = prefix.as_str().len();
        let succeeded = txn.compares().iter().all(|compare| {
            let key = prefix.stored(compare.key());
            compare.holds(self.key_value(&key, strip).as_ref())
        });
        let ops = if succeeded {
            txn.then_ops()
        } else {
            txn.else_ops()
        };
        if let Some(op) = ops.iter().find(|op| !known(op)) {
            return Err(Error::NotSupported {
                what: format!("transaction operation {op:?}"),
                reason: "the in-memory backend does not know it".to_owned(),
            });
        }
        let before = self.revision;
        let mut gets = Vec::new();
        for op in ops {
            let key = prefix.stored(op.key());
            match op {
                Op::Put { value, .. } => {
                    let revision = self.write_revision(before);
                    self.put_at(&key, value, None, revision);
                }
                Op::PutTemp { value, .. } => {
                    let revision = self.write_revision(before);
                    self.put_at(&key, value, Some(lease), revision);
                }
                Op::Delete { .. } if self.values.contains_key(&*key) => {
                    let revision = self.write_revision(before);
                    self.delete_at(&key, revision, Some(LostReason::KeyDeleted));
                }
                Op::DeletePrefix { .. } => {
                    for stored in self.keys_with_prefix(&key) {
                        let revision = self.write_revision(before);
                        self.delete_at(&stored, revision, Some(LostReason::KeyDeleted));
                    }
                }
                Op::Get { .. } => gets.push(self.key_value(&key, strip)),
                // A delete of a missing key; other operations are refused above.
                _ => {}
            }
        }
        Ok(TxnOutcome::new(succeeded, self.revision, gets))
    }

    /// The revision of a transaction's writes: the store revision goes up at its first one.
    fn write_revision(&mut self, before: i64) -> i64 {
        if self.revision == before {
            self.revision += 1;
        }
        self.revision
    }

    /// The queue of the lock `name` as the store has it now: every key `<name>/<lowercase
    /// hex>`, whoever wrote it.
    fn existing_lock_keys(&self, name: &str) -> Queue {
        use std::ops::Bound::{Included, Unbounded};
        let dir = format!("{name}/");
        let keys = self
            .order
            .range::<str, _>((Included(dir.as_str()), Unbounded))
            .take_while(|key| key.starts_with(&dir))
            .filter(|key| lock_name_of(key) == Some(name))
            .filter_map(|key| Some((self.values.get(key.as_str())?.create_revision, None)))
            .collect();
        Queue { keys, places: 0 }
    }
}

/// Whether the in-memory backend knows `op` (`Op` may grow).
fn known(op: &Op) -> bool {
    matches!(
        op,
        Op::Put { .. }
            | Op::PutTemp { .. }
            | Op::Delete { .. }
            | Op::DeletePrefix { .. }
            | Op::Get { .. }
    )
}

/// The stream behind `watch_stream` and `watch_prefix`; dropping it unregisters the watcher.
#[derive(Debug)]
pub(crate) struct MemWatchStream {
    rx: EventReceiver,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_texts_in_chunks_and_drops_them_whole() {
        let mut log = Log::default();
        let big = "v".repeat(LOG_CHUNK + 10);
        for revision in 2..2000 {
            let value = match revision % 7 {
                0 => None,
                3 => Some(big.as_str()),
                _ => Some("value-\u{e9}"),
            };
            log.push(revision, &format!("k/{revision}"), value);
            while log.len() > 100 {
                assert!(log.pop_before(revision));
            }
            assert!(log.chunks.len() <= 40, "{} chunks", log.chunks.len());
        }
        assert!(!log.pop_before(1900), "nothing before 1900 is left");
        let replayed: Vec<WatchEvent> = log.replay(1995, "k/", 2).collect();
        let shown: Vec<(String, Option<usize>, i64)> = replayed
            .iter()
            .map(|event| {
                (
                    event.key().to_owned(),
                    event.value().map(str::len),
                    event.revision(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            vec![
                ("1995".to_owned(), None, 1995),
                ("1996".to_owned(), Some(8), 1996),
                ("1997".to_owned(), Some(8), 1997),
                ("1998".to_owned(), Some(LOG_CHUNK + 10), 1998),
                ("1999".to_owned(), Some(8), 1999),
            ]
        );
        assert_eq!(log.replay(1995, "x", 0).count(), 0);
    }

    /// Every event in `log`, as `(revision, key, value)`, read back from its chunk.
    fn logged(log: &Log) -> Vec<(i64, String, Option<String>)> {
        log.events
            .iter()
            .map(|logged| {
                let (key, value) = log.text(logged).unwrap_or(("<lost>", None));
                (logged.revision, key.to_owned(), value.map(str::to_owned))
            })
            .collect()
    }

    /// A log beside a model of what it must hold.
    struct Checked {
        log: Log,
        model: VecDeque<(i64, String, Option<String>)>,
    }

    impl Checked {
        /// Logs a put of `value` at `k/<revision>` (a 6-byte key) and reads every event back.
        fn push(&mut self, revision: i64, value: &str) {
            let key = format!("k/{revision:04}");
            assert_eq!(key.len(), 6);
            assert!(self.log.push(revision, &key, Some(value)));
            self.model
                .push_back((revision, key, Some(value.to_owned())));
            self.check();
        }

        /// `Log::pop_before`, and the same on the model.
        fn pop_before(&mut self, revision: i64) -> bool {
            let popped = self.log.pop_before(revision);
            let expected = self.model.front().is_some_and(|event| event.0 < revision);
            assert_eq!(popped, expected, "pop before {revision}");
            if popped {
                self.model.pop_front();
            }
            self.check();
            popped
        }

        fn check(&self) {
            assert_eq!(logged(&self.log), Vec::from(self.model.clone()));
        }

        /// The capacity of each chunk, oldest first.
        fn capacities(&self) -> Vec<usize> {
            self.log.chunks.iter().map(String::capacity).collect()
        }
    }

    /// The log's memory is accounted exactly: events fill 64 KiB chunks to the last byte and
    /// never make one grow, a chunk goes as soon as its last event does, one emptied chunk is
    /// kept as a spare for the next (never a bigger one, and never handed to an event it cannot
    /// hold), and the last chunk stays to be filled.
    #[test]
    fn the_log_fills_chunks_exactly_and_keeps_one_spare() {
        const SMALL: usize = 128;
        let small = "v".repeat(SMALL - 6);
        let big = "b".repeat(LOG_CHUNK + 10);
        let mut log = Checked {
            log: Log::default(),
            model: VecDeque::new(),
        };

        // 512 events of 128 bytes fill the first chunk exactly; the 513th starts a second.
        for revision in 1..=512 {
            log.push(revision, &small);
        }
        assert_eq!(log.capacities(), [LOG_CHUNK]);
        assert_eq!(
            log.log.chunks[0].len(),
            LOG_CHUNK,
            "filled to the last byte"
        );
        log.push(513, &small);
        assert_eq!(log.capacities(), [LOG_CHUNK, LOG_CHUNK]);

        // The first chunk goes with its last event, and becomes the spare.
        for revision in 1..=511 {
            assert!(log.pop_before(513));
            assert_eq!(
                log.log.chunks.len(),
                2,
                "event {revision} was not the chunk's last"
            );
        }
        assert!(log.pop_before(513));
        assert!(!log.pop_before(513));
        assert_eq!(log.capacities(), [LOG_CHUNK]);
        assert_eq!(log.log.first_chunk, 1);
        assert!(
            log.log.spare.is_some(),
            "an emptied chunk is kept for the next"
        );

        // An event bigger than a chunk gets one of its own size; the spare is too small for it.
        log.push(514, &big);
        assert_eq!(log.capacities(), [LOG_CHUNK, LOG_CHUNK + 16]);
        assert!(
            log.log.spare.is_some(),
            "the spare cannot hold the big event"
        );
        // The next small event does not fit after the big one, and takes the spare.
        log.push(515, &small);
        assert_eq!(log.capacities(), [LOG_CHUNK, LOG_CHUNK + 16, LOG_CHUNK]);
        assert!(log.log.spare.is_none());

        // The first chunk (513 alone) goes and becomes the spare; fill the last chunk so that a
        // new one takes it again.
        assert!(log.pop_before(514));
        assert!(log.log.spare.is_some());
        for revision in 516..=1026 {
            log.push(revision, &small);
        }
        assert_eq!(log.log.chunks.len(), 2);
        log.push(1027, &small);
        assert_eq!(log.capacities(), [LOG_CHUNK + 16, LOG_CHUNK, LOG_CHUNK]);
        assert!(log.log.spare.is_none());

        // The big event's chunk is freed, not kept as a spare.
        assert!(log.pop_before(515));
        assert_eq!(log.capacities(), [LOG_CHUNK, LOG_CHUNK]);
        assert!(
            log.log.spare.is_none(),
            "only a chunk of the usual size is kept"
        );

        // With every event gone, the last chunk stays, to be filled.
        while log.pop_before(i64::MAX) {}
        assert_eq!(log.log.len(), 0);
        assert_eq!(log.capacities(), [LOG_CHUNK]);
        assert!(log.log.spare.is_some());
        log.push(1028, &small);
        assert_eq!(log.capacities(), [LOG_CHUNK]);
    }

    #[test]
    fn only_name_slash_lowercase_hex_is_a_lock_key() {
        assert_eq!(lock_name_of("jobs/1f"), Some("jobs"));
        assert_eq!(lock_name_of("p/jobs/7/694d"), Some("p/jobs/7"));
        assert_eq!(
            lock_name_of("jobs/-1f"),
            Some("jobs"),
            "Go's %x of a negative id"
        );
        for key in [
            "jobs/config",
            "jobs/1F",
            "jobs/",
            "jobs",
            "jobs/1f/",
            "jobs/0x1f",
        ] {
            assert_eq!(lock_name_of(key), None, "{key:?}");
        }
    }
}
