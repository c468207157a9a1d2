//! Watching one key: `watch`, `watch_with_cb` and its handle.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hmetcd_core::{Error, KeyChange, Kvi, WatchEvent, WatchHandle};

use super::{eventually, next_event, put_of, within, Recorded, PROMPTLY};
use crate::TestStore;

/// How long a case waits to be sure something does not happen.
const QUIET: Duration = Duration::from_millis(300);

/// Time for a watch started in a task to be registered before the case writes.
const SETTLE: Duration = Duration::from_millis(300);

/// Starts `kv.watch(key)` in a task and gives it time to begin.
async fn spawn_watch(
    kv: &Arc<dyn Kvi>,
    key: &str,
) -> tokio::task::JoinHandle<hmetcd_core::Result<WatchEvent>> {
    let kv = Arc::clone(kv);
    let key = key.to_owned();
    let watching = tokio::spawn(async move { kv.watch(&key).await });
    tokio::time::sleep(SETTLE).await;
    assert!(
        !watching.is_finished(),
        "watch returned before any change: {watching:?}"
    );
    watching
}

async fn watched(watching: tokio::task::JoinHandle<hmetcd_core::Result<WatchEvent>>) -> WatchEvent {
    within(PROMPTLY, "watch to return the change", watching)
        .await
        .unwrap()
        .unwrap_or_else(|err| panic!("watch failed: {err}"))
}

async fn finished(handle: &WatchHandle, why: &str) {
    eventually(
        PROMPTLY,
        &format!("watcher to finish after {why}"),
        || async { handle.is_finished() },
    )
    .await;
}

fn values(events: &[WatchEvent]) -> Vec<String> {
    events
        .iter()
        .map(|event| put_of(event).1.to_owned())
        .collect()
}

/// `watch(key)` returns the next put to `key` with its value, not an earlier one.
pub async fn watch_returns_the_next_put(store: TestStore) {
    let kv: Arc<dyn Kvi> = Arc::from(store.open().await);
    let writer = store.open().await;
    writer.store("k", "before").await.unwrap();
    let watching = spawn_watch(&kv, "k").await;
    writer.store("k", "after").await.unwrap();
    let event = watched(watching).await;
    assert_eq!(put_of(&event), ("k", "after"));
    kv.close().await.unwrap();
    writer.close().await.unwrap();
}

/// `watch(key)` returns a delete of `key`.
pub async fn watch_returns_a_delete(store: TestStore) {
    let kv: Arc<dyn Kvi> = Arc::from(store.open().await);
    let writer = store.open().await;
    writer.store("k", "v").await.unwrap();
    let watching = spawn_watch(&kv, "k").await;
    writer.delete("k").await.unwrap();
    let event = watched(watching).await;
    assert!(
        matches!(&event, WatchEvent::Delete { key, .. } if key == "k"),
        "{event:?}"
    );
    assert_eq!(event.value(), None);
    kv.close().await.unwrap();
    writer.close().await.unwrap();
}

/// A watch on a key ignores other keys, including keys that start with it.
pub async fn watch_sees_only_its_key(store: TestStore) {
    let kv: Arc<dyn Kvi> = Arc::from(store.open().await);
    let writer = store.open().await;
    let recorded = Recorded::default();
    let handle = kv
        .watch_with_cb("a", KeyChange::Put, recorded.callback())
        .await
        .unwrap();
    let watching = spawn_watch(&kv, "a").await;
    for other in ["ab", "a/x", "a\0", "A", "b", "\0a"] {
        writer.store(other, "other").await.unwrap();
    }
    writer.delete("ab").await.unwrap();
    writer.store("a", "mine").await.unwrap();
    assert_eq!(put_of(&watched(watching).await), ("a", "mine"));
    recorded.wait_for(1, PROMPTLY).await;
    tokio::time::sleep(QUIET).await;
    let events = recorded.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(put_of(&events[0]), ("a", "mine"));
    handle.cancel();
    kv.close().await.unwrap();
    writer.close().await.unwrap();
}

/// A callback sees every put, in order, none missed and none repeated, with increasing
/// revisions, even when the puts come as fast as they can.
pub async fn callback_sees_every_put_in_order(store: TestStore) {
    const PUTS: usize = 500;
    let kv = store.open().await;
    let writer = store.open().await;
    let recorded = Recorded::default();
    let handle = kv
        .watch_with_cb("k", KeyChange::Put, recorded.callback())
        .await
        .unwrap();
    for i in 0..PUTS {
        writer.store("k", &i.to_string()).await.unwrap();
    }
    recorded.wait_for(PUTS, Duration::from_secs(20)).await;
    tokio::time::sleep(QUIET).await;
    let events = recorded.events();
    let expected: Vec<String> = (0..PUTS).map(|i| i.to_string()).collect();
    assert_eq!(values(&events), expected);
    assert!(events.iter().all(|event| event.key() == "k"));
    assert!(events
        .windows(2)
        .all(|pair| pair[0].revision() < pair[1].revision()));
    kv.watch_cb_cancel(handle);
    kv.close().await.unwrap();
    writer.close().await.unwrap();
}

/// A callback that returns `false` is not called again, and its watcher finishes.
pub async fn callback_stops_when_it_returns_false(store: TestStore) {
    let kv = store.open().await;
    let recorded = Recorded::default();
    let handle = kv
        .watch_with_cb("k", KeyChange::Put, recorded.callback_until(3))
        .await
        .unwrap();
    for i in 0..10 {
        kv.store("k", &i.to_string()).await.unwrap();
    }
    recorded.wait_for(3, PROMPTLY).await;
    finished(&handle, "the callback returned false").await;
    kv.store("k", "later").await.unwrap();
    tokio::time::sleep(QUIET).await;
    assert_eq!(values(&recorded.events()), ["0", "1", "2"]);
    kv.close().await.unwrap();
}

/// A `Put` watcher ends when its key is deleted, without a call for the delete.
pub async fn put_callback_ends_on_delete_without_a_call(store: TestStore) {
    let kv = store.open().await;
    let recorded = Recorded::default();
    let handle = kv
        .watch_with_cb("k", KeyChange::Put, recorded.callback())
        .await
        .unwrap();
    kv.store("k", "a").await.unwrap();
    kv.store("k", "b").await.unwrap();
    kv.delete("k").await.unwrap();
    finished(&handle, "its key was deleted").await;
    kv.store("k", "c").await.unwrap();
    tokio::time::sleep(QUIET).await;
    assert_eq!(values(&recorded.events()), ["a", "b"]);
    kv.close().await.unwrap();
}

/// A `Delete` watcher is not called for puts; it is called for the delete, then ends.
pub async fn delete_callback_sees_the_delete_then_ends(store: TestStore) {
    let kv = store.open().await;
    let recorded = Recorded::default();
    let handle = kv
        .watch_with_cb("k", KeyChange::Delete, recorded.callback())
        .await
        .unwrap();
    kv.store("k", "a").await.unwrap();
    kv.store("k", "b").await.unwrap();
    kv.delete("k").await.unwrap();
    recorded.wait_for(1, PROMPTLY).await;
    finished(&handle, "its key was deleted").await;
    kv.store("k", "c").await.unwrap();
    kv.delete("k").await.unwrap();
    tokio::time::sleep(QUIET).await;
    let events = recorded.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        matches!(&events[0], WatchEvent::Delete { key, .. } if key == "k"),
        "{events:?}"
    );
    kv.close().await.unwrap();
}

/// Once `cancel()` or `watch_cb_cancel()` returns, the callback is never called again,
/// though the key keeps changing.
pub async fn cancel_means_no_call_after_it_returns(store: TestStore) {
    const MAX_WRITES: usize = 100_000;
    let kv = store.open().await;
    let writer: Arc<dyn Kvi> = Arc::from(store.open().await);
    for through_store in [false, true] {
        let calls = Arc::new(AtomicUsize::new(0));
        let late_calls = Arc::new(AtomicUsize::new(0));
        let cancelled = Arc::new(AtomicBool::new(false));
        let callback = {
            let (calls, late_calls, cancelled) = (
                Arc::clone(&calls),
                Arc::clone(&late_calls),
                Arc::clone(&cancelled),
            );
            Box::new(move |_: &WatchEvent| {
                if cancelled.load(Ordering::SeqCst) {
                    late_calls.fetch_add(1, Ordering::SeqCst);
                }
                calls.fetch_add(1, Ordering::SeqCst);
                true
            })
        };
        let handle = kv
            .watch_with_cb("k", KeyChange::Put, callback)
            .await
            .unwrap();
        let stop_writing = Arc::new(AtomicBool::new(false));
        let writing = {
            let (writer, stop_writing) = (Arc::clone(&writer), Arc::clone(&stop_writing));
            tokio::spawn(async move {
                let mut written = 0usize;
                while !stop_writing.load(Ordering::SeqCst) && written < MAX_WRITES {
                    writer.store("k", &written.to_string()).await.unwrap();
                    written += 1;
                    // Leaves the watcher's task room to run on a busy runtime.
                    tokio::task::yield_now().await;
                }
                written
            })
        };
        eventually(PROMPTLY, "callback to be called", || async {
            calls.load(Ordering::SeqCst) >= 10
        })
        .await;
        if through_store {
            kv.watch_cb_cancel(handle);
        } else {
            handle.cancel();
        }
        cancelled.store(true, Ordering::SeqCst);
        let calls_at_cancel = calls.load(Ordering::SeqCst);
        tokio::time::sleep(QUIET).await;
        stop_writing.store(true, Ordering::SeqCst);
        let written = within(PROMPTLY, "the writer to stop", writing)
            .await
            .unwrap();
        let how = if through_store {
            "watch_cb_cancel"
        } else {
            "WatchHandle::cancel"
        };
        assert!(
            written > calls_at_cancel,
            "{how}: the key did not change after the cancel"
        );
        assert_eq!(
            late_calls.load(Ordering::SeqCst),
            0,
            "{how}: callback called after cancel"
        );
    }
    kv.close().await.unwrap();
    writer.close().await.unwrap();
}

/// Dropping a `WatchHandle` detaches it: the callback keeps being called.
pub async fn dropped_watch_handle_keeps_running(store: TestStore) {
    let kv = store.open().await;
    let recorded = Recorded::default();
    let handle = kv
        .watch_with_cb("k", KeyChange::Put, recorded.callback())
        .await
        .unwrap();
    drop(handle);
    for i in 0..5 {
        kv.store("k", &i.to_string()).await.unwrap();
    }
    recorded.wait_for(5, PROMPTLY).await;
    assert_eq!(values(&recorded.events()), ["0", "1", "2", "3", "4"]);
    kv.close().await.unwrap();
}

/// `close()` stops every watcher: callbacks finish and are not called again, streams
/// end, and a pending `watch` returns `Closed`.
pub async fn close_stops_watchers(store: TestStore) {
    let kv: Arc<dyn Kvi> = Arc::from(store.open().await);
    let writer = store.open().await;
    let recorded = Recorded::default();
    let handle = kv
        .watch_with_cb("k", KeyChange::Put, recorded.callback())
        .await
        .unwrap();
    let mut stream = kv.watch_stream("k").await.unwrap();
    let mut prefix_stream = kv.watch_prefix("").await.unwrap();
    let pending = spawn_watch(&kv, "k").await;

    kv.close().await.unwrap();
    finished(&handle, "the store handle was closed").await;
    match within(PROMPTLY, "pending watch after close", pending)
        .await
        .unwrap()
    {
        Err(Error::Closed) => {}
        other => panic!("pending watch after close: expected Closed, got {other:?}"),
    }
    writer.store("k", "after close").await.unwrap();
    for (name, stream) in [
        ("watch_stream", &mut stream),
        ("watch_prefix", &mut prefix_stream),
    ] {
        within(PROMPTLY, &format!("{name} to end after close"), async {
            while let Some(item) = stream.next().await {
                assert!(item.is_err(), "{name} yielded {item:?} after close");
            }
        })
        .await;
    }
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        recorded.len(),
        0,
        "callback called after close: {:?}",
        recorded.events()
    );
    writer.close().await.unwrap();
}

/// Events carry the store's revisions: positive, and increasing from change to change,
/// across keys too.
pub async fn events_carry_increasing_revisions(store: TestStore) {
    let kv = store.open().await;
    let mut events = kv.watch_prefix("").await.unwrap();
    kv.store("k", "a").await.unwrap();
    kv.store("j", "b").await.unwrap();
    kv.store("k", "c").await.unwrap();
    kv.delete("j").await.unwrap();
    kv.delete("k").await.unwrap();
    let mut revisions = Vec::new();
    for _ in 0..5 {
        revisions.push(
            next_event(&mut events, PROMPTLY, "watch_prefix")
                .await
                .revision(),
        );
    }
    assert!(revisions[0] > 0, "{revisions:?}");
    assert!(
        revisions.windows(2).all(|pair| pair[0] < pair[1]),
        "{revisions:?}"
    );
    kv.close().await.unwrap();
}
