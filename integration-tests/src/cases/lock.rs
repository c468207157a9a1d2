//! The distributed lock: one participant per handle, first come first served.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmetcd_core::{Error, Kvi};
use tokio::time::Instant;

use super::{
    assert_handed_over_at_once, lock_keys, wait_for_lock_keys, within, MARGIN, PROBE, PROMPTLY,
};
use crate::TestStore;

pub(crate) async fn lock(kv: &dyn Kvi, who: &str) {
    within(
        PROMPTLY,
        &format!("{who} taking a free lock"),
        kv.dist_lock(),
    )
    .await
    .unwrap_or_else(|err| panic!("{who} taking a free lock: {err}"));
}

/// Asserts that `kv` cannot take the lock now: its timed attempt ends in `LockTimeout`.
pub(crate) async fn assert_lock_taken(kv: &dyn Kvi, who: &str) {
    let what = format!("{who}'s timed lock");
    match within(PROBE + MARGIN, &what, kv.dist_timed_lock(PROBE)).await {
        Err(Error::LockTimeout { .. }) => {}
        other => panic!("{who} should find the lock taken, got {other:?}"),
    }
}

/// Asserts that `kv` gets the lock promptly.
pub(crate) async fn assert_lock_free(kv: &dyn Kvi, who: &str) {
    let what = format!("{who}'s timed lock");
    within(PROMPTLY + MARGIN, &what, kv.dist_timed_lock(PROMPTLY))
        .await
        .unwrap_or_else(|err| panic!("{who} should get the lock at once: {err}"));
}

/// Two handles on one store exclude each other.
pub async fn two_handles_exclude_each_other(store: TestStore) {
    let a = store.open().await;
    let b = store.open().await;
    lock(a.as_ref(), "a").await;
    assert_lock_taken(b.as_ref(), "b while a holds").await;
    a.dist_unlock().await.unwrap();
    assert_lock_free(b.as_ref(), "b after a unlocked").await;
    assert_lock_taken(a.as_ref(), "a while b holds").await;
    b.dist_unlock().await.unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// `dist_timed_lock(t)` gives up after `t` (not before, not much later) with a
/// `LockTimeout` naming the lock and `t`.
pub async fn timed_lock_gives_up_after_its_timeout(store: TestStore) {
    let holder = store.open().await;
    let waiter = store.open().await;
    lock(holder.as_ref(), "holder").await;
    let timeout = Duration::from_millis(700);
    let started = Instant::now();
    let attempt = within(
        timeout + MARGIN,
        "timed lock",
        waiter.dist_timed_lock(timeout),
    )
    .await;
    let waited = started.elapsed();
    match attempt {
        Err(Error::LockTimeout {
            lock,
            timeout: reported,
        }) => {
            assert_eq!(lock, store.lock_name());
            assert_eq!(reported, timeout);
        }
        other => panic!("expected LockTimeout, got {other:?}"),
    }
    assert!(
        waited >= timeout,
        "gave up after {waited:?}, before the timeout {timeout:?}"
    );
    holder.close().await.unwrap();
    waiter.close().await.unwrap();
}

/// An attempt that timed out leaves no trace: it delays no later acquirer, and never
/// takes the lock behind the caller's back.
pub async fn given_up_attempt_leaves_no_trace(store: TestStore) {
    let holder = store.open().await;
    let quitter = store.open().await;
    let later = store.open().await;
    lock(holder.as_ref(), "holder").await;
    for _ in 0..3 {
        assert_lock_taken(quitter.as_ref(), "quitter while the holder holds").await;
    }
    holder.dist_unlock().await.unwrap();
    assert_lock_free(later.as_ref(), "a later handle after the holder unlocked").await;
    assert_lock_taken(quitter.as_ref(), "quitter while the later handle holds").await;
    later.dist_unlock().await.unwrap();
    assert_lock_free(quitter.as_ref(), "quitter once the lock is free").await;
    for kv in [holder, quitter, later] {
        kv.close().await.unwrap();
    }
}

/// Locking again while holding is `Ok` at once (even with a tiny timeout), and the lock
/// stays held.
pub async fn relock_by_holder_is_ok_at_once(store: TestStore) {
    let holder = store.open().await;
    let other = store.open().await;
    lock(holder.as_ref(), "holder").await;
    within(PROMPTLY, "dist_lock by the holder", holder.dist_lock())
        .await
        .unwrap();
    within(
        PROMPTLY,
        "dist_timed_lock by the holder",
        holder.dist_timed_lock(Duration::from_millis(1)),
    )
    .await
    .unwrap_or_else(|err| panic!("dist_timed_lock(1ms) by the holder: {err}"));
    assert_lock_taken(other.as_ref(), "another handle").await;
    holder.close().await.unwrap();
    other.close().await.unwrap();
}

/// `dist_timed_lock` takes any timeout without panicking: `Duration::MAX` acts as no
/// limit, and a zero timeout either takes a free lock or gives up with `LockTimeout`.
pub async fn timed_lock_takes_any_timeout(store: TestStore) {
    let kv = store.open().await;
    within(
        PROMPTLY,
        "dist_timed_lock(Duration::MAX) on a free lock",
        kv.dist_timed_lock(Duration::MAX),
    )
    .await
    .unwrap();
    kv.dist_unlock().await.unwrap();
    match within(
        PROMPTLY,
        "dist_timed_lock(0)",
        kv.dist_timed_lock(Duration::ZERO),
    )
    .await
    {
        Ok(()) | Err(Error::LockTimeout { .. }) => {}
        Err(other) => panic!("dist_timed_lock(0) on a free lock: {other}"),
    }
    kv.dist_unlock().await.unwrap();
    assert_lock_free(kv.as_ref(), "the same handle after a zero-timeout attempt").await;
    kv.close().await.unwrap();
}

/// Unlocking without holding is `Ok` and does not release another handle's lock.
pub async fn unlock_without_holding_is_ok_and_releases_nothing(store: TestStore) {
    let holder = store.open().await;
    let bystander = store.open().await;
    let prober = store.open().await;
    bystander.dist_unlock().await.unwrap();
    lock(holder.as_ref(), "holder").await;
    bystander.dist_unlock().await.unwrap();
    assert_lock_taken(prober.as_ref(), "prober after a bystander's unlock").await;
    holder.dist_unlock().await.unwrap();
    holder.dist_unlock().await.unwrap();
    assert_lock_free(prober.as_ref(), "prober after the holder unlocked").await;
    for kv in [holder, bystander, prober] {
        kv.close().await.unwrap();
    }
}

/// Waiters get the lock in the order they asked for it.
pub async fn waiters_are_served_first_come_first_served(store: TestStore) {
    let holder = store.open().await;
    lock(holder.as_ref(), "holder").await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for id in 1..=4 {
        let kv = store.open().await;
        let order = Arc::clone(&order);
        waiters.push(tokio::spawn(async move {
            within(
                Duration::from_secs(30),
                &format!("waiter {id}"),
                kv.dist_lock(),
            )
            .await
            .unwrap();
            order.lock().unwrap().push(id);
            tokio::time::sleep(Duration::from_millis(50)).await;
            kv.dist_unlock().await.unwrap();
            kv.close().await.unwrap();
        }));
        // Lets this waiter queue before the next one asks.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        *order.lock().unwrap(),
        Vec::<i32>::new(),
        "a waiter got the held lock"
    );
    holder.dist_unlock().await.unwrap();
    for waiter in waiters {
        waiter.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), [1, 2, 3, 4]);
    holder.close().await.unwrap();
}

/// How a holder gives up the lock.
#[derive(Debug, Clone, Copy)]
enum Release {
    Unlock,
    Close,
}

/// Checks that `release` hands a held lock to a queued waiter at once.
async fn assert_released_at_once(store: &TestStore, release: Release) {
    let holder = store.open().await;
    let waiter: Arc<dyn Kvi> = Arc::from(store.open().await);
    lock(holder.as_ref(), "holder").await;
    let queued = Arc::clone(&waiter);
    let acquired = tokio::spawn(async move {
        queued
            .dist_timed_lock(Duration::from_secs(30))
            .await
            .map(|()| ((), Instant::now()))
    });
    let how = format!("{release:?}");
    assert_handed_over_at_once(acquired, &how, async {
        match release {
            Release::Unlock => holder.dist_unlock().await.unwrap(),
            Release::Close => holder.close().await.unwrap(),
        }
    })
    .await;
    waiter.close().await.unwrap();
    holder.close().await.unwrap();
}

/// `dist_unlock()` hands the lock to a waiter at once.
pub async fn unlock_releases_at_once(store: TestStore) {
    assert_released_at_once(&store, Release::Unlock).await;
}

/// `close()` releases the lock at once.
pub async fn close_releases_at_once(store: TestStore) {
    assert_released_at_once(&store, Release::Close).await;
}

/// A holder dropped without `close()` releases the lock within the backend's bound (at once
/// in memory, about `lease_ttl` on etcd).
pub async fn drop_releases_within_the_bound(store: TestStore) {
    let lease_ttl = Duration::from_secs(2);
    let holder = store.open_with("lease_ttl=2s").await.unwrap();
    let waiter = store.open().await;
    lock(holder.as_ref(), "holder").await;
    assert_lock_taken(waiter.as_ref(), "waiter before the drop").await;
    drop(holder);
    let bound = store.drop_release_bound(lease_ttl) + MARGIN;
    within(
        bound + MARGIN,
        "lock after the holder was dropped",
        waiter.dist_timed_lock(bound),
    )
    .await
    .unwrap_or_else(|err| panic!("the lock of a dropped holder was not released: {err}"));
    waiter.close().await.unwrap();
}

/// Handles with different `lock_name`s do not exclude each other; equal names do.
pub async fn different_lock_names_do_not_exclude(store: TestStore) {
    let other_name = format!("lock_name={}-other", store.lock_name());
    let a = store.open().await;
    let b = store.open_with(&other_name).await.unwrap();
    let a_again = store.open().await;
    let b_again = store.open_with(&other_name).await.unwrap();
    lock(a.as_ref(), "a").await;
    assert_lock_free(b.as_ref(), "b on another lock name").await;
    assert_lock_taken(a_again.as_ref(), "a second handle on a's lock name").await;
    assert_lock_taken(b_again.as_ref(), "a second handle on b's lock name").await;
    for kv in [a, b, a_again, b_again] {
        kv.close().await.unwrap();
    }
}

const COUNTER_HANDLES: usize = 8;
const COUNTER_ROUNDS: usize = 25;

/// The lock serialises read-modify-write cycles of many handles: no increment is lost.
pub async fn lock_protects_a_counter(store: TestStore) {
    let first = store.open().await;
    first.store("counter", "0").await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..COUNTER_HANDLES {
        let kv = store.open().await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..COUNTER_ROUNDS {
                kv.dist_lock().await.unwrap();
                let count: usize = kv.get("counter").await.unwrap().unwrap().parse().unwrap();
                tokio::task::yield_now().await;
                kv.store("counter", &(count + 1).to_string()).await.unwrap();
                kv.dist_unlock().await.unwrap();
            }
            kv.close().await.unwrap();
        }));
    }
    within(Duration::from_secs(60), "the locked increments", async {
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await;
    let expected = (COUNTER_HANDLES * COUNTER_ROUNDS).to_string();
    assert_eq!(first.get("counter").await.unwrap(), Some(expected));
    first.close().await.unwrap();
}

/// Starts a task that waits for the handle's lock on `kv` and reports when it got it.
pub(crate) fn queue_dist_lock(
    kv: &Arc<dyn Kvi>,
) -> tokio::task::JoinHandle<hmetcd_core::Result<Instant>> {
    let kv = Arc::clone(kv);
    tokio::spawn(async move {
        kv.dist_timed_lock(Duration::from_secs(30))
            .await
            .map(|()| Instant::now())
    })
}

/// Every participant in the lock has a key `<lock_name>/<id>` with the value `""` (etcd's lock
/// layout) from the moment it queues until it unlocks or gives up, seen by every handle
/// under the same prefix.
pub async fn lock_keys_come_and_go_with_participants(store: TestStore) {
    let name = store.lock_name().to_owned();
    let a = store.open().await;
    let b: Arc<dyn Kvi> = Arc::from(store.open().await);
    let observer = store.open().await;
    assert_eq!(
        lock_keys(observer.as_ref(), &name).await,
        Vec::<String>::new()
    );
    lock(a.as_ref(), "a").await;
    let held_by_a = wait_for_lock_keys(observer.as_ref(), &name, 1, "a holds").await;
    assert_lock_taken(b.as_ref(), "b, giving up").await;
    assert_eq!(
        lock_keys(observer.as_ref(), &name).await,
        held_by_a,
        "a timed attempt that gave up left a key"
    );
    let waiter = queue_dist_lock(&b);
    let both = wait_for_lock_keys(observer.as_ref(), &name, 2, "a holds, b waits").await;
    assert!(both.contains(&held_by_a[0]), "{both:?}");
    assert!(!waiter.is_finished(), "b got a held lock");
    a.dist_unlock().await.unwrap();
    within(MARGIN, "b after a unlocked", waiter)
        .await
        .unwrap()
        .unwrap_or_else(|err| panic!("b after a unlocked: {err}"));
    let held_by_b = lock_keys(observer.as_ref(), &name).await;
    assert_eq!(held_by_b.len(), 1, "b holds: {held_by_b:?}");
    assert_ne!(held_by_b, held_by_a, "a's key outlived its unlock");
    within(PROMPTLY, "b's relock", b.dist_lock()).await.unwrap();
    assert_eq!(
        lock_keys(observer.as_ref(), &name).await,
        held_by_b,
        "relocking a held lock put another key"
    );
    b.dist_unlock().await.unwrap();
    assert_eq!(
        lock_keys(observer.as_ref(), &name).await,
        Vec::<String>::new()
    );
    lock(b.as_ref(), "b again").await;
    wait_for_lock_keys(observer.as_ref(), &name, 1, "b holds again").await;
    b.close().await.unwrap();
    assert_eq!(
        lock_keys(observer.as_ref(), &name).await,
        Vec::<String>::new(),
        "close() left the lock key"
    );
    a.close().await.unwrap();
    observer.close().await.unwrap();
}

/// A handle's own participants for its lock queue in the handle first: while `a` holds the
/// lock and a guard of `a` on `lock_name` waits, a later `dist_lock` of `b` is served
/// before `a`'s guard (on etcd one handle has one lock key per name).
pub async fn own_handle_queues_after_other_handles(store: TestStore) {
    let name = store.lock_name().to_owned();
    let a: Arc<dyn Kvi> = Arc::from(store.open().await);
    let b: Arc<dyn Kvi> = Arc::from(store.open().await);
    lock(a.as_ref(), "a").await;
    let a2 = {
        let a = Arc::clone(&a);
        let name = name.clone();
        tokio::spawn(async move {
            let options = hmetcd_core::LockOptions::new().timeout(Duration::from_secs(30));
            a.lock_with(&name, options).await
        })
    };
    tokio::time::sleep(PROBE).await;
    let b_waits = queue_dist_lock(&b);
    tokio::time::sleep(PROBE).await;
    assert!(
        !a2.is_finished() && !b_waits.is_finished(),
        "a waiter got a held lock"
    );
    a.dist_unlock().await.unwrap();
    within(MARGIN, "b, queued in the store before a's guard", b_waits)
        .await
        .unwrap()
        .unwrap_or_else(|err| panic!("b after a unlocked: {err}"));
    tokio::time::sleep(PROBE).await;
    assert!(!a2.is_finished(), "a's guard got the lock b holds");
    b.dist_unlock().await.unwrap();
    let guard = within(MARGIN, "a's guard after b unlocked", a2)
        .await
        .unwrap()
        .unwrap_or_else(|err| panic!("a's guard after b unlocked: {err}"));
    assert!(guard.is_held());
    drop(guard);
    a.close().await.unwrap();
    b.close().await.unwrap();
}
