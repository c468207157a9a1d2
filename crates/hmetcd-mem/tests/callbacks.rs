//! Watch callbacks on a current-thread runtime, where they run on the blocking pool (the
//! conformance suite covers the multi-thread runtime, where they run in place).

#![allow(clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use hmetcd_core::{KeyChange, Kvi, WatchEvent};
use hmetcd_mem::MemKvs;

const LIMIT: Duration = Duration::from_secs(5);

/// A callback blocked until another watcher's callback runs holds up neither that watcher nor
/// the runtime's only thread.
#[tokio::test]
async fn a_blocked_callback_stalls_no_other_watcher() {
    let kv = MemKvs::new();
    let other_ran = Arc::new((Mutex::new(false), Condvar::new()));
    let saw_it = Arc::new(AtomicBool::new(false));
    let (ran, saw) = (Arc::clone(&other_ran), Arc::clone(&saw_it));
    let blocked = kv
        .watch_with_cb(
            "blocked",
            KeyChange::Put,
            Box::new(move |_: &WatchEvent| {
                let (flag, signal) = &*ran;
                let flag = flag.lock().unwrap_or_else(|p| p.into_inner());
                let (flag, _) = signal
                    .wait_timeout_while(flag, LIMIT, |ran| !*ran)
                    .unwrap_or_else(|p| p.into_inner());
                saw.store(*flag, Ordering::SeqCst);
                false
            }),
        )
        .await
        .expect("watch blocked");
    let ran = Arc::clone(&other_ran);
    let other = kv
        .watch_with_cb(
            "other",
            KeyChange::Put,
            Box::new(move |_: &WatchEvent| {
                let (flag, signal) = &*ran;
                *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
                signal.notify_all();
                false
            }),
        )
        .await
        .expect("watch other");
    kv.store("blocked", "1").await.expect("store blocked");
    tokio::task::yield_now().await;
    kv.store("other", "1").await.expect("store other");
    tokio::time::timeout(LIMIT * 2, async {
        while !(blocked.is_finished() && other.is_finished()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("both watchers finish");
    assert!(
        saw_it.load(Ordering::SeqCst),
        "the blocked callback gave up before the other watcher's callback ran"
    );
}

/// A callback may call the store through the runtime's `block_on`.
#[tokio::test]
async fn a_callback_may_call_the_store_synchronously() {
    let kv = Arc::new(MemKvs::new());
    let copier = Arc::clone(&kv);
    let handle = kv
        .watch_with_cb(
            "k",
            KeyChange::Put,
            Box::new(move |event: &WatchEvent| {
                let copy = copier.store("copy", event.value().unwrap_or_default());
                tokio::runtime::Handle::current().block_on(copy).is_ok()
            }),
        )
        .await
        .expect("watch");
    kv.store("k", "1").await.expect("store");
    tokio::time::timeout(LIMIT, async {
        while kv.get("copy").await.ok().flatten().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the callback copies the value");
    assert!(!handle.is_finished(), "{:?}", handle.finish_reason());
    handle.cancel();
}
