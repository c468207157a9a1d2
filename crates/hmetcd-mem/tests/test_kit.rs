//! The memory store as a test kit: faults on demand, and every timing on Tokio's clock, so
//! that these tests cover minutes of lease TTLs, hold limits and timeouts in virtual time.
//! The twins of the faults on a real etcd are in `integration-tests/tests/test_kit.rs`.

#![allow(clippy::expect_used)]

use std::time::Duration;

use futures::{FutureExt, StreamExt};
use hmetcd_core::{Error, KeyChange, Kvi, LockOptions, LostReason, WatchEvent};
use hmetcd_mem::{MemKvs, MISSED_EVENTS_LIMIT};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(30);

/// Fails if a test took more than a second of wall time: virtual time must do the waiting.
struct WallClock(std::time::Instant);

impl WallClock {
    fn start() -> Self {
        WallClock(std::time::Instant::now())
    }
}

impl Drop for WallClock {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let took = self.0.elapsed();
            assert!(took < Duration::from_secs(1), "took {took:?} of wall time");
        }
    }
}

fn pair(store: &str) -> (MemKvs, MemKvs) {
    let a = MemKvs::open(store, "lease_ttl=30s,lock_name=work").expect("open A");
    let b = a
        .open_sibling("lease_ttl=30s,lock_name=work")
        .expect("open B");
    (a, b)
}

/// Cuts `faults`' handle off until its lease has expired, and checks through `observer` that
/// its temp key `temp_key` went with it.
async fn partition_past_the_lease(faults: &hmetcd_mem::Faults, observer: &MemKvs, temp_key: &str) {
    faults.partition(true);
    tokio::time::sleep(TTL + Duration::from_millis(1)).await;
    assert_eq!(
        observer.get(temp_key).await.expect("get"),
        None,
        "the lease expired"
    );
}

/// Spawns `b.dist_lock()` and returns its task.
fn spawn_dist_lock(b: &std::sync::Arc<MemKvs>) -> tokio::task::JoinHandle<hmetcd_core::Result<()>> {
    let b = std::sync::Arc::clone(b);
    tokio::spawn(async move { b.dist_lock().await })
}

#[tokio::test(start_paused = true)]
async fn a_dropped_holder_hands_over_at_once_and_a_crashed_one_after_lease_ttl() {
    let _wall = WallClock::start();
    let (a, b) = pair("kit-drop");
    let b = std::sync::Arc::new(b);
    a.dist_lock().await.expect("A locks");
    let waiting = spawn_dist_lock(&b);
    tokio::task::yield_now().await;
    let began = Instant::now();
    drop(a);
    waiting.await.expect("task").expect("B locks");
    assert_eq!(
        began.elapsed(),
        Duration::ZERO,
        "a dropped handle releases at once"
    );
    b.dist_unlock().await.expect("B unlocks");

    // A crash: the store hears nothing more from the handle, so its lease runs out.
    let c = b
        .open_sibling("lease_ttl=30s,lock_name=work")
        .expect("open C");
    c.dist_lock().await.expect("C locks");
    c.temp_key("workers/c").await.expect("temp key");
    let waiting = spawn_dist_lock(&b);
    let crashed = Instant::now();
    c.faults().partition(true);
    drop(c);
    tokio::time::sleep(TTL - Duration::from_millis(1)).await;
    assert!(!waiting.is_finished(), "taken over before lease_ttl");
    assert_eq!(b.get("workers/c").await.expect("get").as_deref(), Some("1"));
    tokio::time::timeout(TTL, waiting)
        .await
        .expect("taken over by lease_ttl")
        .expect("task")
        .expect("B locks");
    assert_eq!(crashed.elapsed(), TTL, "taken over exactly at lease_ttl");
    assert_eq!(b.get("workers/c").await.expect("get"), None);
}

#[tokio::test(start_paused = true)]
async fn max_hold_runs_on_tokios_clock() {
    let _wall = WallClock::start();
    let (a, b) = pair("kit-max-hold");
    let max_hold = Duration::from_secs(600);
    let guard = a
        .lock_with("report", LockOptions::new().max_hold(max_hold))
        .await
        .expect("lock");
    let began = Instant::now();
    let taken = b.lock("report");
    let (reason, taken) = futures::join!(guard.lost(), taken);
    assert_eq!(reason, LostReason::MaxHold);
    assert!(taken.expect("B locks").fencing_token() > guard.fencing_token());
    assert_eq!(began.elapsed(), max_hold);
    assert!(!guard.is_held());
}

#[tokio::test(start_paused = true)]
async fn lock_timeouts_run_on_tokios_clock() {
    let _wall = WallClock::start();
    let (a, b) = pair("kit-timeouts");
    a.dist_lock().await.expect("A locks");
    let guard = a.lock("report").await.expect("A locks report");
    let began = Instant::now();
    let timeout = Duration::from_secs(300);
    let attempt = b.dist_timed_lock(timeout).await;
    assert!(
        matches!(attempt, Err(Error::LockTimeout { .. })),
        "{attempt:?}"
    );
    assert_eq!(began.elapsed(), timeout);
    let attempt = b
        .lock_with("report", LockOptions::new().timeout(timeout))
        .await;
    assert!(
        matches!(attempt, Err(Error::LockTimeout { .. })),
        "{attempt:?}"
    );
    assert_eq!(began.elapsed(), timeout * 2);
    drop(guard);
}

#[tokio::test(start_paused = true)]
async fn a_partition_longer_than_lease_ttl_loses_the_lock_at_lease_ttl() {
    let _wall = WallClock::start();
    let (a, b) = pair("kit-long-partition");
    let b = std::sync::Arc::new(b);
    a.dist_lock().await.expect("A locks");
    let guard = a.lock("report").await.expect("A locks report");
    a.temp_key("workers/a").await.expect("temp key");
    let waiting = spawn_dist_lock(&b);
    let cut = Instant::now();
    a.faults().partition(true);
    tokio::time::sleep(TTL - Duration::from_millis(1)).await;
    assert!(guard.is_held(), "held until the lease can have expired");
    assert!(guard.lost().now_or_never().is_none());
    assert!(!waiting.is_finished());
    let reason = tokio::time::timeout(TTL, guard.lost()).await;
    assert_eq!(reason.expect("lost by lease_ttl"), LostReason::SessionLost);
    assert_eq!(cut.elapsed(), TTL);
    assert!(!guard.is_held());
    waiting.await.expect("task").expect("B locks");
    assert_eq!(b.get("workers/a").await.expect("get"), None);
    let attempt = a.get("workers/a").await;
    assert!(
        matches!(attempt, Err(Error::Unavailable { .. })),
        "{attempt:?}"
    );

    a.faults().partition(false);
    assert_eq!(b.get("workers/a").await.expect("get").as_deref(), Some("1"));
    let attempt = a.dist_timed_lock(Duration::from_secs(1)).await;
    assert!(
        matches!(attempt, Err(Error::LockTimeout { .. })),
        "A no longer holds: {attempt:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn expire_lease_during_a_partition_expires_it_at_once_and_once() {
    let _wall = WallClock::start();
    let (a, b) = pair("kit-expire-cut");
    a.temp_key("workers/a").await.expect("temp key");
    let guard = a.lock("report").await.expect("A locks report");
    let mut events = b.watch_stream("workers/a").await.expect("watch");
    let faults = a.faults();
    faults.partition(true);
    let began = Instant::now();
    faults.expire_lease();
    assert_eq!(guard.lost().await, LostReason::SessionLost);
    assert_eq!(b.get("workers/a").await.expect("get"), None);
    let deleted = events.next().await.expect("an event").expect("no error");
    assert!(matches!(deleted, WatchEvent::Delete { .. }), "{deleted:?}");
    assert_eq!(began.elapsed(), Duration::ZERO, "at once, not at lease_ttl");
    faults.expire_lease();
    assert!(
        events.next().now_or_never().is_none(),
        "a lost lease is lost once"
    );
    faults.partition(false);
    let restored = events.next().await.expect("an event").expect("no error");
    assert!(matches!(restored, WatchEvent::Put { .. }), "{restored:?}");
    assert_eq!(b.get("workers/a").await.expect("get").as_deref(), Some("1"));
}

#[tokio::test(start_paused = true)]
async fn a_second_partition_call_is_part_of_the_first() {
    let _wall = WallClock::start();
    let (a, b) = pair("kit-cut-twice");
    a.temp_key("workers/a").await.expect("temp key");
    let faults = a.faults();
    partition_past_the_lease(&faults, &b, "workers/a").await;
    faults.partition(true);
    faults.partition(false);
    assert_eq!(
        b.get("workers/a").await.expect("get").as_deref(),
        Some("1"),
        "the partition that ended is the one that lost the lease"
    );
    a.close().await.expect("close");
    faults.partition(true);
    assert!(matches!(a.get("x").await, Err(Error::Closed)));
    assert_eq!(b.get("workers/a").await.expect("get"), None);
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_handle_lets_go_of_its_lock_keys_when_the_partition_ends() {
    let _wall = WallClock::start();
    let (a, b) = pair("kit-let-go");
    let guard = a.lock("report").await.expect("A locks report");
    a.faults().partition(true);
    let unlocked = guard.unlock().await;
    assert!(
        matches!(unlocked, Err(Error::Unavailable { .. })),
        "the key cannot be deleted while cut off: {unlocked:?}"
    );
    let attempt = b
        .lock_with("report", LockOptions::new().timeout(Duration::from_secs(5)))
        .await;
    assert!(
        matches!(attempt, Err(Error::LockTimeout { .. })),
        "the store did not hear of the unlock yet: {attempt:?}"
    );
    a.faults().partition(false);
    let taken = b
        .lock_with(
            "report",
            LockOptions::new().timeout(Duration::from_millis(1)),
        )
        .await
        .expect("B locks once the partition ended");
    assert!(taken.is_held());
}

#[tokio::test(start_paused = true)]
async fn a_waiter_hears_of_its_turn_when_its_partition_ends() {
    let _wall = WallClock::start();
    let (a, b) = pair("kit-waiter");
    let a = std::sync::Arc::new(a);
    b.dist_lock().await.expect("B locks");
    let waiting = spawn_dist_lock(&a);
    tokio::task::yield_now().await;
    a.faults().partition(true);
    b.dist_unlock().await.expect("B unlocks");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !waiting.is_finished(),
        "a partitioned waiter heard of its turn"
    );
    a.faults().partition(false);
    waiting.await.expect("task").expect("A locks");
    let attempt = b.dist_timed_lock(Duration::from_secs(1)).await;
    assert!(
        matches!(attempt, Err(Error::LockTimeout { .. })),
        "{attempt:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn closing_a_partitioned_handle_leaves_its_keys_to_its_lease() {
    let _wall = WallClock::start();
    let (a, b) = pair("kit-close-cut");
    a.dist_lock().await.expect("A locks");
    a.temp_key("workers/a").await.expect("temp key");
    let guard = a.lock("report").await.expect("lock");
    a.faults().partition(true);
    let closed = a.close().await;
    assert!(
        matches!(closed, Err(Error::Unavailable { .. })),
        "{closed:?}"
    );
    assert!(matches!(a.get("x").await, Err(Error::Closed)));
    assert_eq!(guard.lost().await, LostReason::Closed);
    a.faults().partition(false);
    assert!(a.close().await.is_ok(), "closing twice is Ok");
    tokio::time::sleep(TTL - Duration::from_millis(1)).await;
    assert_eq!(b.get("workers/a").await.expect("get").as_deref(), Some("1"));
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert_eq!(b.get("workers/a").await.expect("get"), None);
    b.dist_timed_lock(Duration::from_millis(1))
        .await
        .expect("A's lock went with its lease");
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_puts_back_only_the_temp_keys_that_are_still_the_handles() {
    let (a, b) = pair("kit-restore");
    for key in ["t/deleted", "t/kept", "t/overwritten", "t/taken"] {
        a.temp_key(key).await.expect("temp key");
    }
    a.delete("t/deleted").await.expect("delete");
    a.store("t/overwritten", "plain").await.expect("store");
    let faults = a.faults();
    partition_past_the_lease(&faults, &b, "t/kept").await;
    b.store("t/taken", "b's").await.expect("B writes");
    faults.partition(false);
    let keys = b.get_range("t/", "t/~").await.expect("range");
    let keys: Vec<(&str, &str)> = keys
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_str()))
        .collect();
    assert_eq!(
        keys,
        [
            ("t/kept", "1"),
            ("t/overwritten", "plain"),
            ("t/taken", "b's")
        ]
    );
    a.close().await.expect("close");
    let keys = b.get_range("t/", "t/~").await.expect("range");
    assert_eq!(
        keys.len(),
        2,
        "only A's own temp key goes with it: {keys:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_watcher_that_missed_more_than_the_limit_gets_compacted() {
    let (a, b) = pair("kit-overrun");
    let mut stream = a.watch_stream("w").await.expect("watch");
    let (seen, callback) = {
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = std::sync::Arc::clone(&seen);
        (
            seen,
            Box::new(move |_: &WatchEvent| {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                true
            }),
        )
    };
    let watcher = a
        .watch_with_cb("w", KeyChange::Put, callback)
        .await
        .expect("watch_with_cb");
    a.faults().partition(true);
    let mut revisions = Vec::new();
    let mut observer = b.watch_stream("w").await.expect("watch");
    for i in 0..=MISSED_EVENTS_LIMIT {
        b.store("w", &i.to_string()).await.expect("store");
        revisions.push(
            observer
                .next()
                .await
                .expect("event")
                .expect("ok")
                .revision(),
        );
    }
    a.faults().partition(false);
    match stream.next().await {
        Some(Err(Error::Compacted {
            key,
            revision,
            compact_revision,
        })) => {
            assert_eq!(key, "w");
            assert_eq!(revision, revisions[0]);
            assert_eq!(compact_revision, revisions[MISSED_EVENTS_LIMIT]);
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(stream.next().await.is_none(), "Compacted is the last item");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(watcher.is_finished());
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 0);

    // Up to the limit, a watcher catches up.
    let mut stream = a.watch_stream("w").await.expect("watch");
    a.faults().partition(true);
    for i in 0..MISSED_EVENTS_LIMIT {
        b.store("w", &i.to_string()).await.expect("store");
    }
    a.faults().partition(false);
    for i in 0..MISSED_EVENTS_LIMIT {
        let event = stream.next().await.expect("event").expect("ok");
        assert_eq!(event.value(), Some(i.to_string().as_str()));
    }
}
