//! The store revision across every kind of write, as etcd counts it: each write request
//! that changes something takes a revision above every earlier one, every key it changes
//! carries that revision (watch events, `mod_revision`, `create_revision`), and a lease
//! revoke (a handle's `close()`) deletes all the lease's keys — temp keys and lock keys — in
//! one revision. Watch ordering, `watch_prefix_from` and fencing tokens rest on this.
//!
//! Cases of one run share one store, so a case sees its own writes' revisions with gaps
//! between them (other cases write too); it checks what etcd promises to one client: strictly
//! increasing from request to request, equal within one.

use hmetcd_core::{CompareOp, KeyValue, Kvi, Op, Txn, WatchEvent, WatchStream};

use super::data::kv_of;
use super::named_locks::take;
use super::{next_event, within, PROMPTLY};
use crate::TestStore;

/// A watch of a handle's whole prefix and the revision of the last write request it saw.
struct Revisions {
    events: WatchStream,
    last: i64,
    seen: Vec<(String, Vec<WatchEvent>)>,
}

impl Revisions {
    async fn watch(kv: &dyn Kvi) -> Self {
        Revisions {
            events: kv.watch_prefix("").await.unwrap(),
            last: 0,
            seen: Vec::new(),
        }
    }

    /// The `count` events of the write request `what`: they must share one revision, above
    /// every earlier request's. Returns them, sorted by key.
    async fn step(&mut self, count: usize, what: &str) -> Vec<WatchEvent> {
        let mut got = Vec::with_capacity(count);
        for _ in 0..count {
            got.push(next_event(&mut self.events, PROMPTLY, what).await);
        }
        self.seen.push((what.to_owned(), got.clone()));
        let revision = got[0].revision();
        assert!(
            got.iter().all(|event| event.revision() == revision),
            "{what}: one request, one revision: {got:?}\nso far: {:#?}",
            self.seen
        );
        assert!(
            revision > self.last,
            "{what}: revision {revision} after {}; revisions must strictly increase: {:#?}",
            self.last,
            self.seen
        );
        self.last = revision;
        got.sort_by(|a, b| a.key().cmp(b.key()));
        got
    }

    /// The one event of the write request `what`, which must be a put of `key`; checks that
    /// `get_kv(key)` names its revision as `mod_revision`. Returns the key's metadata.
    async fn put(&mut self, kv: &dyn Kvi, key: &str, what: &str) -> KeyValue {
        let event = self.step(1, what).await.remove(0);
        assert!(
            matches!(&event, WatchEvent::Put { key: k, .. } if k == key),
            "{what}: expected a put of {key:?}, got {event:?}"
        );
        let meta = kv_of(kv, key).await;
        assert_eq!(meta.mod_revision, event.revision(), "{what}: {meta:?}");
        meta
    }

    /// The events of the write request `what`, which must be deletes of exactly `keys`.
    async fn deletes(&mut self, kv: &dyn Kvi, keys: &[&str], what: &str) -> i64 {
        let got = self.step(keys.len(), what).await;
        let deleted: Vec<&str> = got
            .iter()
            .map(|event| match event {
                WatchEvent::Delete { key, .. } => key.as_str(),
                other => panic!("{what}: expected deletes, got {other:?}"),
            })
            .collect();
        let mut expected = keys.to_vec();
        expected.sort_unstable();
        assert_eq!(deleted, expected, "{what}");
        for key in keys {
            assert_eq!(kv.get_kv(key).await.unwrap(), None, "{what}: {key:?}");
        }
        got[0].revision()
    }
}

/// Puts, overwrites, `tas`, `transaction` (either branch), `txn`, `update`, `delete` and
/// `delete_prefix`: each takes a revision above the last, which watch events and `get_kv`
/// agree on; a created key's `create_revision` is its first put's, an overwrite keeps it.
pub async fn plain_writes_take_increasing_revisions(store: TestStore) {
    let kv = store.open().await;
    let mut seen = Revisions::watch(kv.as_ref()).await;

    kv.store("a", "1").await.unwrap();
    let created = seen.put(kv.as_ref(), "a", "store (create)").await;
    assert_eq!(created.create_revision, created.mod_revision, "{created:?}");
    kv.store("a", "2").await.unwrap();
    let overwritten = seen.put(kv.as_ref(), "a", "store (overwrite)").await;
    assert_eq!(overwritten.create_revision, created.create_revision);
    assert!(kv.tas("a", "2", "3").await.unwrap());
    let set = seen.put(kv.as_ref(), "a", "tas").await;
    assert_eq!((set.value.as_str(), set.version), ("3", 3), "{set:?}");
    assert!(kv
        .transaction("a", CompareOp::Equal, "3", "a", "4", "b", "x")
        .await
        .unwrap());
    seen.put(kv.as_ref(), "a", "transaction (then)").await;
    assert!(!kv
        .transaction("a", CompareOp::Equal, "no", "a", "5", "b", "x")
        .await
        .unwrap());
    let other = seen.put(kv.as_ref(), "b", "transaction (else)").await;
    assert_eq!(other.create_revision, other.mod_revision, "{other:?}");

    let outcome = kv
        .txn(
            Txn::new()
                .then(Op::put("x/1", "1"))
                .then(Op::put("x/2", "2"))
                .then(Op::delete("b")),
        )
        .await
        .unwrap();
    let written = seen.step(3, "txn").await;
    assert_eq!(written[0].revision(), outcome.revision, "{written:?}");
    for key in ["x/1", "x/2"] {
        assert_eq!(kv_of(kv.as_ref(), key).await.mod_revision, outcome.revision);
    }
    kv.update("a", &mut |value| value.map(|v| format!("{v}+")))
        .await
        .unwrap();
    let updated = seen.put(kv.as_ref(), "a", "update").await;
    assert_eq!(updated.value, "4+");
    assert_eq!(updated.create_revision, created.create_revision);

    kv.delete("a").await.unwrap();
    seen.deletes(kv.as_ref(), &["a"], "delete").await;
    assert_eq!(kv.delete_prefix("x/").await.unwrap(), 2);
    seen.deletes(kv.as_ref(), &["x/1", "x/2"], "delete_prefix")
        .await;
    kv.store("a", "again").await.unwrap();
    let again = seen.put(kv.as_ref(), "a", "store after the deletes").await;
    assert_eq!(again.create_revision, again.mod_revision, "{again:?}");
    assert_eq!(again.version, 1, "{again:?}");
    kv.close().await.unwrap();
}

/// A lock key is a write like any other: `dist_lock` and `lock` put it at a revision above
/// the last (its create revision is the fencing token), and `dist_unlock`, a guard's
/// `unlock()` and a dropped guard delete it at a revision above that; so do a leader's
/// `campaign`, `proclaim` and `resign`.
pub async fn lock_keys_are_written_at_increasing_revisions(store: TestStore) {
    let kv = store.open().await;
    let watcher = store.open().await;
    let mut seen = Revisions::watch(watcher.as_ref()).await;
    let mut dist_key = String::new();

    kv.dist_lock().await.unwrap();
    let put = seen.step(1, "dist_lock").await;
    dist_key.push_str(put[0].key());
    let taken = seen_put_of(&put[0], "dist_lock");
    assert_eq!(
        kv_of(watcher.as_ref(), &dist_key).await.create_revision,
        taken
    );
    kv.dist_unlock().await.unwrap();
    seen.deletes(watcher.as_ref(), &[&dist_key], "dist_unlock")
        .await;

    let guard = take(kv.as_ref(), "jobs", "the case").await;
    let put = seen.step(1, "lock").await;
    let key = put[0].key().to_owned();
    assert_eq!(guard.fencing_token(), seen_put_of(&put[0], "lock"));
    guard.unlock().await.unwrap();
    seen.deletes(watcher.as_ref(), &[&key], "a guard's unlock")
        .await;

    let guard = take(kv.as_ref(), "jobs", "the case").await;
    let put = seen.step(1, "lock again").await;
    assert_eq!(guard.fencing_token(), seen_put_of(&put[0], "lock again"));
    drop(guard);
    seen.deletes(watcher.as_ref(), &[put[0].key()], "a dropped guard")
        .await;

    let mut leadership = within(PROMPTLY, "campaign", kv.campaign("leader", "one"))
        .await
        .unwrap();
    let put = seen.step(1, "campaign").await;
    let key = put[0].key().to_owned();
    assert_eq!(
        leadership.fencing_token(),
        revision_of_put(&put[0], "one", "campaign")
    );
    leadership.proclaim("two").await.unwrap();
    let proclaimed = seen.put(watcher.as_ref(), &key, "proclaim").await;
    assert_eq!(proclaimed.value, "two");
    assert_eq!(proclaimed.create_revision, leadership.fencing_token());
    leadership.resign().await.unwrap();
    seen.deletes(watcher.as_ref(), &[&key], "resign").await;

    kv.store("last", "put").await.unwrap();
    seen.put(watcher.as_ref(), "last", "a put after the lock keys")
        .await;
    kv.close().await.unwrap();
    watcher.close().await.unwrap();
}

/// The revision of `event`, which must be a put of a lock key (value `""`).
fn seen_put_of(event: &WatchEvent, what: &str) -> i64 {
    revision_of_put(event, "", what)
}

/// The revision of `event`, which must be a put of `value`.
fn revision_of_put(event: &WatchEvent, value: &str, what: &str) -> i64 {
    match event {
        WatchEvent::Put {
            value: put,
            revision,
            ..
        } if put == value => *revision,
        other => panic!("{what}: expected a put of {value:?}, got {other:?}"),
    }
}

/// `close()` revokes the handle's lease: its temp keys, its `dist_lock` key and its guards'
/// keys go in one revision, above every earlier write's; the next write's revision is above
/// that. Another handle closing with nothing on its lease writes nothing.
pub async fn close_deletes_every_lease_key_in_one_revision(store: TestStore) {
    let kv = store.open().await;
    let watcher = store.open().await;
    let mut seen = Revisions::watch(watcher.as_ref()).await;

    kv.temp_key("t1").await.unwrap();
    seen.put(watcher.as_ref(), "t1", "temp_key").await;
    kv.store_temp("t2", "v").await.unwrap();
    seen.put(watcher.as_ref(), "t2", "store_temp").await;
    kv.dist_lock().await.unwrap();
    let dist_key = seen.step(1, "dist_lock").await[0].key().to_owned();
    let guard = take(kv.as_ref(), "jobs", "the closing handle").await;
    let guard_key = seen.step(1, "lock").await[0].key().to_owned();
    kv.store("plain", "stays").await.unwrap();
    seen.put(watcher.as_ref(), "plain", "a plain put").await;

    let empty = store.open().await;
    empty.close().await.unwrap();
    kv.close().await.unwrap();
    let closed = seen
        .deletes(
            watcher.as_ref(),
            &["t1", "t2", &dist_key, &guard_key],
            "close (the lease revoked)",
        )
        .await;
    assert!(!guard.is_held(), "a closed handle's guard is not held");
    drop(guard);
    assert_eq!(kv_of(watcher.as_ref(), "plain").await.value, "stays");

    watcher.store("after", "close").await.unwrap();
    let after = seen
        .put(watcher.as_ref(), "after", "a put after the close")
        .await;
    assert!(after.mod_revision > closed, "{after:?} after {closed}");
    watcher.close().await.unwrap();
}

/// Closing a handle that holds the lock while another waits: the holder's key and its temp
/// key go in one revision, then the waiter's key is the oldest and it holds the lock; a
/// dropped waiter's key goes at a revision of its own.
pub async fn close_hands_the_lock_over_after_its_revision(store: TestStore) {
    let holder = store.open().await;
    let waiter = store.open().await;
    let watcher = store.open().await;
    let mut seen = Revisions::watch(watcher.as_ref()).await;

    holder.temp_key("t").await.unwrap();
    seen.put(watcher.as_ref(), "t", "temp_key").await;
    let held = take(holder.as_ref(), "jobs", "the holder").await;
    let held_key = seen.step(1, "the holder's lock").await[0].key().to_owned();
    let queued = tokio::spawn(async move {
        let guard = waiter.lock("jobs").await;
        (waiter, guard)
    });
    let waiting = seen.step(1, "the waiter's key").await;
    let waiting_key = waiting[0].key().to_owned();
    let token = seen_put_of(&waiting[0], "the waiter's key");

    holder.close().await.unwrap();
    seen.deletes(watcher.as_ref(), &["t", &held_key], "the holder's close")
        .await;
    drop(held);
    let (waiter, guard) = within(PROMPTLY, "the waiter to get the lock", queued)
        .await
        .unwrap();
    let guard = guard.unwrap();
    assert_eq!(
        guard.fencing_token(),
        token,
        "the waiter's key is its token"
    );
    drop(guard);
    seen.deletes(
        watcher.as_ref(),
        &[&waiting_key],
        "the waiter's guard dropped",
    )
    .await;
    waiter.close().await.unwrap();
    watcher.close().await.unwrap();
}
