//! How callback watchers end: the reason their handle reports, and cancelling one from
//! inside another's callback.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hmetcd_core::watch::WatchEnd;
use hmetcd_core::{KeyChange, WatchEvent, WatchHandle};

use super::{eventually, Recorded, PROMPTLY};
use crate::TestStore;

/// A handle passed to the other watcher's callback.
type SharedHandle = Arc<Mutex<Option<WatchHandle>>>;

/// Lets `parties` threads wait for each other, giving up after a while (a plain
/// `std::sync::Barrier` would hang a failing case forever).
struct Rendezvous {
    arrived: Mutex<usize>,
    all_here: Condvar,
    parties: usize,
}

impl Rendezvous {
    fn new(parties: usize) -> Self {
        Rendezvous {
            arrived: Mutex::new(0),
            all_here: Condvar::new(),
            parties,
        }
    }

    /// Waits until every party arrived or `limit` passed; whether all arrived.
    fn meet(&self, limit: Duration) -> bool {
        let mut arrived = self.arrived.lock().unwrap_or_else(|p| p.into_inner());
        *arrived += 1;
        self.all_here.notify_all();
        let deadline = Instant::now() + limit;
        while *arrived < self.parties {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            arrived = self
                .all_here
                .wait_timeout(arrived, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// Two callback watchers whose callbacks run at the same moment and each cancel the other's
/// handle: neither waits for the other, and both calls return at once (no deadlock).
pub async fn callbacks_cancelling_each_other_do_not_deadlock(store: TestStore) {
    let kv = store.open().await;
    let writer = store.open().await;
    let meeting = Arc::new(Rendezvous::new(2));
    let returned = Arc::new(AtomicUsize::new(0));
    let handles: [SharedHandle; 2] = [Arc::default(), Arc::default()];
    let mut watchers = Vec::new();
    for (mine, other) in [(0, 1), (1, 0)] {
        let (meeting, returned) = (Arc::clone(&meeting), Arc::clone(&returned));
        let others = Arc::clone(&handles[other]);
        let callback = Box::new(move |_: &WatchEvent| {
            // Both callbacks are running now, each holding its own watcher's state.
            meeting.meet(Duration::from_secs(2));
            let handle = others.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(handle) = handle {
                handle.cancel();
            }
            returned.fetch_add(1, Ordering::SeqCst);
            true
        });
        let key = format!("k{mine}");
        watchers.push(
            kv.watch_with_cb(&key, KeyChange::Put, callback)
                .await
                .unwrap(),
        );
    }
    for (slot, watcher) in handles.iter().zip(watchers) {
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(watcher);
    }
    writer.store("k0", "1").await.unwrap();
    writer.store("k1", "1").await.unwrap();

    // Waited for on a thread of its own: a deadlock would block every worker of the runtime,
    // and with them its timers.
    let (done, outcome) = tokio::sync::oneshot::channel();
    let counter = Arc::clone(&returned);
    std::thread::spawn(move || {
        let deadline = Instant::now() + PROMPTLY;
        while counter.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = done.send(counter.load(Ordering::SeqCst));
    });
    let calls = outcome.await.unwrap_or(0);
    assert_eq!(
        calls, 2,
        "two callbacks cancelling each other: {calls} of 2 returned within {PROMPTLY:?} (a deadlock)"
    );
    kv.close().await.unwrap();
    writer.close().await.unwrap();
}

/// Waits until `handle` has finished and returns its finish reason.
async fn finish_reason(handle: &WatchHandle, after: &str) -> Option<WatchEnd> {
    eventually(
        PROMPTLY,
        &format!("watcher to finish after {after}"),
        || async { handle.is_finished() },
    )
    .await;
    handle.finish_reason()
}

/// A running watcher has no finish reason; one whose callback returned `false` says so.
pub async fn finish_reason_says_the_callback_returned_false(store: TestStore) {
    let kv = store.open().await;
    let recorded = Recorded::default();
    let handle = kv
        .watch_with_cb("k", KeyChange::Put, recorded.callback_until(2))
        .await
        .unwrap();
    kv.store("k", "1").await.unwrap();
    recorded.wait_for(1, PROMPTLY).await;
    assert!(!handle.is_finished());
    assert!(
        handle.finish_reason().is_none(),
        "{:?}",
        handle.finish_reason()
    );
    kv.store("k", "2").await.unwrap();
    let reason = finish_reason(&handle, "the callback returned false").await;
    assert!(
        matches!(reason, Some(WatchEnd::CallbackReturnedFalse)),
        "{reason:?}"
    );
    kv.close().await.unwrap();
}

/// A watcher ended by a delete of its key says `KeyDeleted`, for `Put` and `Delete` callbacks.
pub async fn finish_reason_says_the_key_was_deleted(store: TestStore) {
    let kv = store.open().await;
    kv.store("k", "1").await.unwrap();
    let puts = kv
        .watch_with_cb("k", KeyChange::Put, Recorded::default().callback())
        .await
        .unwrap();
    let deletes = kv
        .watch_with_cb("k", KeyChange::Delete, Recorded::default().callback())
        .await
        .unwrap();
    kv.delete("k").await.unwrap();
    for (handle, what) in [(&puts, "Put"), (&deletes, "Delete")] {
        let reason = finish_reason(handle, "the key was deleted").await;
        assert!(
            matches!(reason, Some(WatchEnd::KeyDeleted)),
            "{what} watcher: {reason:?}"
        );
    }
    kv.close().await.unwrap();
}

/// Closing the store handle ends its watchers with `Closed`.
pub async fn finish_reason_says_the_handle_was_closed(store: TestStore) {
    let kv = store.open().await;
    let handle = kv
        .watch_with_cb("k", KeyChange::Put, Recorded::default().callback())
        .await
        .unwrap();
    kv.close().await.unwrap();
    let reason = finish_reason(&handle, "close").await;
    assert!(matches!(reason, Some(WatchEnd::Closed)), "{reason:?}");
}

/// A callback that panics is not called again; its watcher says `CallbackPanicked`.
pub async fn finish_reason_says_the_callback_panicked(store: TestStore) {
    let kv = store.open().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let handle = kv
        .watch_with_cb(
            "k",
            KeyChange::Put,
            Box::new(move |_: &WatchEvent| {
                counter.fetch_add(1, Ordering::SeqCst);
                panic!("a callback that panics (expected by this case)");
            }),
        )
        .await
        .unwrap();
    kv.store("k", "1").await.unwrap();
    let reason = finish_reason(&handle, "the callback panicked").await;
    assert!(
        matches!(reason, Some(WatchEnd::CallbackPanicked)),
        "{reason:?}"
    );
    kv.store("k", "2").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "called again after a panic"
    );
    kv.close().await.unwrap();
}
