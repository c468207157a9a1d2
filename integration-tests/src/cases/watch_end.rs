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

/// Waits until `counter` reaches `target` or `limit` passes, on a thread of its own (blocked
/// callbacks could hold every worker of the runtime, and with them its timers); the count then.
async fn count_reaches(counter: &Arc<AtomicUsize>, target: usize, limit: Duration) -> usize {
    let (done, outcome) = tokio::sync::oneshot::channel();
    let counter = Arc::clone(counter);
    std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while counter.load(Ordering::SeqCst) < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = done.send(counter.load(Ordering::SeqCst));
    });
    outcome.await.unwrap_or(0)
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

    let calls = count_reaches(&returned, 2, PROMPTLY).await;
    assert_eq!(
        calls, 2,
        "two callbacks cancelling each other: {calls} of 2 returned within {PROMPTLY:?} (a deadlock)"
    );
    kv.close().await.unwrap();
    writer.close().await.unwrap();
}

/// Callbacks run where blocking is allowed: two callbacks that block until a third watcher's
/// callback has run (as many as the case's runtime has worker threads) stall neither that
/// watcher nor the writes that feed it.
pub async fn a_blocked_callback_stalls_no_other_watcher(store: TestStore) {
    const GIVE_UP: Duration = Duration::from_secs(3);
    let kv = store.open().await;
    let writer = store.open().await;
    let third_ran = Arc::new((Mutex::new(false), Condvar::new()));
    let (started, waited_it_out) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut watchers = Vec::new();
    for blocked in ["k0", "k1"] {
        let (third_ran, waited_it_out) = (Arc::clone(&third_ran), Arc::clone(&waited_it_out));
        let started = Arc::clone(&started);
        let callback = Box::new(move |_: &WatchEvent| {
            started.fetch_add(1, Ordering::SeqCst);
            let (ran, signal) = &*third_ran;
            let ran = ran.lock().unwrap_or_else(|p| p.into_inner());
            let (ran, _) = signal
                .wait_timeout_while(ran, GIVE_UP, |ran| !*ran)
                .unwrap_or_else(|p| p.into_inner());
            if *ran {
                waited_it_out.fetch_add(1, Ordering::SeqCst);
            }
            false
        });
        watchers.push(
            kv.watch_with_cb(blocked, KeyChange::Put, callback)
                .await
                .unwrap(),
        );
    }
    let signal = Arc::clone(&third_ran);
    let third = Box::new(move |_: &WatchEvent| {
        let (ran, wake) = &*signal;
        *ran.lock().unwrap_or_else(|p| p.into_inner()) = true;
        wake.notify_all();
        false
    });
    watchers.push(kv.watch_with_cb("k2", KeyChange::Put, third).await.unwrap());
    writer.store("k0", "1").await.unwrap();
    writer.store("k1", "1").await.unwrap();
    // Both callbacks are blocked before the third watcher's key changes.
    let blocked = count_reaches(&started, 2, GIVE_UP / 2).await;
    writer.store("k2", "1").await.unwrap();

    let calls = count_reaches(&waited_it_out, 2, PROMPTLY).await;
    assert_eq!(
        calls, 2,
        "two callbacks blocked until a third watcher's callback ran: {calls} of 2 saw it run \
         within {GIVE_UP:?}, {blocked} of 2 were running before it (callbacks block the \
         runtime's workers)"
    );
    kv.close().await.unwrap();
    writer.close().await.unwrap();
}

/// A callback may use a store handle synchronously, through the runtime's `block_on`: here
/// it copies every value it sees to another key.
pub async fn a_callback_may_call_the_store_synchronously(store: TestStore) {
    let kv = store.open().await;
    let writer: Arc<dyn hmetcd_core::Kvi> = Arc::from(store.open().await);
    let copier = Arc::clone(&writer);
    let failures = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::clone(&failures);
    let callback = Box::new(move |event: &WatchEvent| {
        let copy = copier.store("copy", event.value().unwrap_or_default());
        match tokio::runtime::Handle::current().block_on(copy) {
            Ok(()) => true,
            Err(err) => {
                failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(err.to_string());
                false
            }
        }
    });
    let handle = kv
        .watch_with_cb("k", KeyChange::Put, callback)
        .await
        .unwrap();
    for value in ["1", "2", "3"] {
        writer.store("k", value).await.unwrap();
    }
    eventually(PROMPTLY, "the callback to copy the last value", || async {
        writer.get("copy").await.ok().flatten().as_deref() == Some("3")
    })
    .await;
    assert!(
        !handle.is_finished(),
        "the copying watcher ended: {:?}",
        handle.finish_reason()
    );
    let failures = failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(
        failures.is_empty(),
        "stores from the callback failed: {failures:?}"
    );
    handle.cancel();
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
