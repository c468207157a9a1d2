//! What the memory store keeps for watchers and lock participants returns to zero once the
//! streams, callbacks, guards, waits and handles that needed it are gone: a leak here grows
//! with every watch or lock and nothing else would notice.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use hmetcd_core::{KeyChange, Kvi, LockOptions, LostReason, WatchEvent, WatchStream};

use crate::MemKvs;

/// How long a cleanup that runs on another task may take.
const SETTLE: Duration = Duration::from_secs(5);

/// What a handle and its store keep: watchers, lock queues, the handle's local lock mutexes
/// and its live guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Kept {
    watchers: usize,
    lock_queues: usize,
    lock_names: usize,
    guards: usize,
}

fn kept(kv: &MemKvs) -> Kept {
    let session = &kv.session;
    Kept {
        watchers: session.store.watcher_count(),
        lock_queues: session.store.lock_queue_count(),
        lock_names: session.participants.names_in_use(),
        guards: session.guards.live_count(),
    }
}

const NOTHING: Kept = Kept {
    watchers: 0,
    lock_queues: 0,
    lock_names: 0,
    guards: 0,
};

/// Waits until `kv` keeps exactly `expected` (cleanups of callbacks and aborted tasks run on
/// other tasks); with nothing expected, the store's watcher table must be empty too.
async fn settles(kv: &MemKvs, expected: Kept, what: &str) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    while kept(kv) != expected && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(kept(kv), expected, "{what}");
    if expected.watchers == 0 {
        assert!(
            kv.session.store.has_no_watchers(),
            "{what}: watcher entries left"
        );
    } else {
        assert!(!kv.session.store.has_no_watchers(), "{what}");
    }
}

fn watchers(count: usize) -> Kept {
    Kept {
        watchers: count,
        ..NOTHING
    }
}

async fn next_put(stream: &mut WatchStream, what: &str) -> (String, String) {
    let event = tokio::time::timeout(SETTLE, stream.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: no event"))
        .unwrap_or_else(|| panic!("{what}: the stream ended"))
        .unwrap_or_else(|err| panic!("{what}: {err}"));
    match event {
        WatchEvent::Put { key, value, .. } => (key, value),
        other => panic!("{what}: expected a put, got {other:?}"),
    }
}

/// Why `guard` lost its lock, which it must within [`SETTLE`].
async fn lost(guard: &hmetcd_core::LockGuard, what: &str) -> LostReason {
    tokio::time::timeout(SETTLE, guard.lost())
        .await
        .unwrap_or_else(|_| panic!("{what}: the guard was not lost"))
}

fn pair(key: &str, value: &str) -> (String, String) {
    (key.to_owned(), value.to_owned())
}

#[tokio::test]
async fn streams_leave_the_store_when_dropped_in_any_order() {
    let kv = MemKvs::new();
    let first = kv.watch_stream("k").await.unwrap();
    let mut second = kv.watch_stream("k").await.unwrap();
    let prefix_first = kv.watch_prefix("").await.unwrap();
    let mut prefix_second = kv.watch_prefix("").await.unwrap();
    let elsewhere = kv.watch_prefix("other/").await.unwrap();
    settles(&kv, watchers(5), "five streams").await;

    drop(first);
    settles(&kv, watchers(4), "the first key stream dropped").await;
    kv.store("k", "1").await.unwrap();
    assert_eq!(next_put(&mut second, "second").await, pair("k", "1"));
    assert_eq!(
        next_put(&mut prefix_second, "second prefix").await,
        pair("k", "1")
    );
    drop(prefix_first);
    settles(&kv, watchers(3), "the first prefix stream dropped").await;
    kv.store("k", "2").await.unwrap();
    assert_eq!(
        next_put(&mut prefix_second, "the prefix stream left").await,
        pair("k", "2"),
        "dropping one prefix stream leaves the others"
    );
    assert_eq!(
        next_put(&mut second, "the key stream left").await,
        pair("k", "2")
    );
    drop(second);
    settles(&kv, watchers(2), "both key streams dropped").await;
    drop(prefix_second);
    drop(elsewhere);
    settles(&kv, NOTHING, "every stream dropped").await;
    kv.store("k", "3").await.unwrap();
    settles(&kv, NOTHING, "a write after").await;
}

#[tokio::test]
async fn one_shot_watches_and_callbacks_leave_the_store() {
    let kv = std::sync::Arc::new(MemKvs::new());

    let writer = std::sync::Arc::clone(&kv);
    let write = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        writer.store("k", "1").await.unwrap();
    });
    assert_eq!(kv.watch("k").await.unwrap().value(), Some("1"));
    write.await.unwrap();
    settles(&kv, NOTHING, "watch() returned").await;
    let given_up = tokio::time::timeout(Duration::from_millis(20), kv.watch("k")).await;
    assert!(given_up.is_err(), "nothing was written");
    settles(&kv, NOTHING, "a watch() given up").await;

    let once = kv
        .watch_with_cb("k", KeyChange::Put, Box::new(|_: &WatchEvent| false))
        .await
        .unwrap();
    settles(&kv, watchers(1), "a callback watcher").await;
    kv.store("k", "2").await.unwrap();
    settles(&kv, NOTHING, "a callback that returned false").await;
    assert!(once.is_finished());

    let cancelled = kv
        .watch_with_cb("k", KeyChange::Put, Box::new(|_: &WatchEvent| true))
        .await
        .unwrap();
    settles(&kv, watchers(1), "a callback watcher").await;
    cancelled.cancel();
    settles(&kv, NOTHING, "a cancelled callback watcher").await;

    let ended = kv
        .watch_with_cb("k", KeyChange::Put, Box::new(|_: &WatchEvent| true))
        .await
        .unwrap();
    kv.delete("k").await.unwrap();
    settles(&kv, NOTHING, "a put callback whose key was deleted").await;
    assert!(ended.is_finished());

    let detached = kv
        .watch_with_cb("k", KeyChange::Put, Box::new(|_: &WatchEvent| true))
        .await
        .unwrap();
    drop(detached);
    kv.store("k", "3").await.unwrap();
    settles(&kv, watchers(1), "a detached callback keeps watching").await;
    kv.close().await.unwrap();
    settles(&kv, NOTHING, "the handle closed").await;
}

#[tokio::test]
async fn election_reads_and_history_watches_leave_the_store() {
    let kv = MemKvs::new();
    let leadership = kv.campaign("e", "me").await.unwrap();
    assert_eq!(kv.leader("e").await.unwrap().unwrap().value, "me");
    let mut observed = kv.observe("e").await.unwrap();
    assert!(observed.next().await.unwrap().unwrap().is_some());
    drop(observed);
    leadership.resign().await.unwrap();
    settles(&kv, NOTHING, "leader(), observe() dropped, resigned").await;

    kv.store("a", "1").await.unwrap();
    let from = kv.faults().revision();
    kv.store("a", "2").await.unwrap();
    let mut history = kv.watch_prefix_from("", from).await.unwrap();
    assert_eq!(next_put(&mut history, "history").await, pair("a", "1"));
    let mut live = kv.watch_prefix("").await.unwrap();
    kv.faults().compact(from + 1);
    let compacted = kv.watch_prefix_from("", from).await.unwrap();
    drop(compacted);
    settles(&kv, watchers(2), "a compacted watch dropped").await;
    kv.store("a", "3").await.unwrap();
    assert_eq!(next_put(&mut live, "live").await, pair("a", "3"));
    drop(history);
    drop(live);
    settles(&kv, NOTHING, "history and live streams dropped").await;
}

#[tokio::test]
async fn a_dropped_handle_leaves_no_watcher() {
    let kv = MemKvs::new();
    let other = kv.open_sibling("").unwrap();
    let stream = other.watch_stream("k").await.unwrap();
    let prefix = other.watch_prefix("").await.unwrap();
    let _detached = other
        .watch_with_cb("k", KeyChange::Put, Box::new(|_: &WatchEvent| true))
        .await
        .unwrap();
    settles(&kv, watchers(3), "the other handle's watchers").await;
    drop(other);
    settles(&kv, NOTHING, "the other handle dropped").await;
    drop((stream, prefix));
}

#[tokio::test]
async fn locks_leave_no_trace_once_released() {
    let kv = MemKvs::new();
    kv.dist_lock().await.unwrap();
    let held = Kept {
        lock_queues: 1,
        lock_names: 1,
        ..NOTHING
    };
    settles(&kv, held, "dist_lock held").await;
    kv.dist_unlock().await.unwrap();
    settles(&kv, NOTHING, "dist_unlock").await;

    let guard = kv.lock("jobs").await.unwrap();
    settles(&kv, Kept { guards: 1, ..held }, "a guard").await;
    guard.unlock().await.unwrap();
    settles(&kv, NOTHING, "a guard unlocked").await;
    let first = kv.lock("jobs").await.unwrap();
    let second = kv.lock("other").await.unwrap();
    drop(first);
    settles(&kv, Kept { guards: 1, ..held }, "one of two guards dropped").await;
    drop(second);
    settles(&kv, NOTHING, "both guards dropped").await;

    let leadership = kv.campaign("e", "me").await.unwrap();
    drop(leadership);
    settles(&kv, NOTHING, "a leadership dropped").await;
}

#[tokio::test]
async fn given_up_and_aborted_waits_leave_no_trace() {
    let kv = std::sync::Arc::new(MemKvs::new());
    let other = kv.open_sibling("").unwrap();
    let guard = kv.lock("jobs").await.unwrap();
    let holder = Kept {
        lock_queues: 1,
        lock_names: 1,
        guards: 1,
        ..NOTHING
    };
    let timed = other
        .lock_with(
            "jobs",
            LockOptions::new().timeout(Duration::from_millis(20)),
        )
        .await;
    assert!(timed.is_err(), "the lock is held");
    assert_eq!(other.session.participants.names_in_use(), 0, "timed out");
    assert!(other
        .dist_timed_lock(Duration::from_millis(20))
        .await
        .is_ok());
    other.dist_unlock().await.unwrap();
    assert_eq!(other.session.participants.names_in_use(), 0);

    // Two waiters of one handle: one in the store's queue, one on the handle's own mutex.
    let waiter = std::sync::Arc::new(other);
    let (a, b) = (
        std::sync::Arc::clone(&waiter),
        std::sync::Arc::clone(&waiter),
    );
    let queued = tokio::spawn(async move { a.lock("jobs").await.map(drop) });
    let behind = tokio::spawn(async move { b.lock("jobs").await.map(drop) });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(waiter.session.participants.names_in_use(), 1);
    queued.abort();
    behind.abort();
    let _ = (queued.await, behind.await);
    assert_eq!(waiter.session.participants.names_in_use(), 0, "aborted");
    settles(&kv, holder, "only the holder is left").await;

    // A waiter served after the holder's release leaves nothing once it releases too.
    let b = std::sync::Arc::clone(&waiter);
    let served = tokio::spawn(async move { b.lock("jobs").await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(guard);
    let served = served.await.unwrap().unwrap();
    settles(
        &kv,
        Kept {
            guards: 0,
            lock_names: 0,
            ..holder
        },
        "the holder released",
    )
    .await;
    drop(served);
    settles(&kv, NOTHING, "the waiter released").await;
    assert_eq!(kept(&waiter), NOTHING);
}

#[tokio::test]
async fn lost_and_closed_locks_leave_no_trace() {
    let kv = MemKvs::new();
    let other = kv.open_sibling("").unwrap();

    let guard = kv.lock("jobs").await.unwrap();
    other.delete_prefix("jobs/").await.unwrap();
    assert_eq!(lost(&guard, "a deleted key").await, LostReason::KeyDeleted);
    drop(guard);
    settles(&kv, NOTHING, "a guard whose key was deleted").await;

    let guard = kv
        .lock_with(
            "jobs",
            LockOptions::new().max_hold(Duration::from_millis(20)),
        )
        .await
        .unwrap();
    assert_eq!(lost(&guard, "max_hold").await, LostReason::MaxHold);
    drop(guard);
    settles(&kv, NOTHING, "a guard past its max_hold").await;

    let guard = kv.lock("jobs").await.unwrap();
    kv.faults().expire_lease();
    assert_eq!(
        lost(&guard, "an expired lease").await,
        LostReason::SessionLost
    );
    drop(guard);
    settles(&kv, NOTHING, "a guard whose lease expired").await;

    let other = std::sync::Arc::new(other);
    let guard = other.lock("jobs").await.unwrap();
    other.dist_lock().await.unwrap();
    let waiting = std::sync::Arc::clone(&other);
    let behind = tokio::spawn(async move { waiting.lock("jobs").await.map(drop) });
    let _stream = other.watch_prefix("").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    other.close().await.unwrap();
    assert!(behind.await.unwrap().is_err(), "closed while waiting");
    assert_eq!(lost(&guard, "close").await, LostReason::Closed);
    settles(&kv, NOTHING, "the other handle closed").await;
    drop(guard);
    assert_eq!(kept(&other), NOTHING);
}
