//! Named locks with a guard: the same rules as the handle's lock, per name, and not
//! re-entrant; a guard releases on drop, on `unlock`, after `max_hold`, or with `close()`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use hmetcd_core::{Error, Kvi, LockGuard, LockOptions, WatchEvent};
use tokio::time::Instant;

use super::{
    assert_handed_over_at_once, lock_keys, next_event, put_of, wait_for_lock_keys, within, MARGIN,
    PROBE, PROMPTLY,
};
use crate::TestStore;

/// The name most cases lock (under the case's own prefix).
const NAME: &str = "jobs/nightly";

pub(crate) async fn take(kv: &dyn Kvi, name: &str, who: &str) -> LockGuard {
    let what = format!("{who} taking the free lock {name:?}");
    let guard = within(PROMPTLY, &what, kv.lock(name))
        .await
        .unwrap_or_else(|err| panic!("{what}: {err}"));
    assert!(guard.is_held(), "{what}: the new guard is not held");
    assert_eq!(guard.name(), name);
    guard
}

/// Asserts that `kv` cannot take `name` now: its timed attempt ends in `LockTimeout`.
pub(crate) async fn assert_taken(kv: &dyn Kvi, name: &str, who: &str) {
    let what = format!("{who}'s timed lock of {name:?}");
    let attempt = kv.lock_with(name, LockOptions::new().timeout(PROBE));
    match within(PROBE + MARGIN, &what, attempt).await {
        Err(Error::LockTimeout { .. }) => {}
        other => panic!("{who} should find {name:?} taken, got {other:?}"),
    }
}

/// Asserts that `kv` gets `name` promptly, and hands back the guard.
pub(crate) async fn assert_free(kv: &dyn Kvi, name: &str, who: &str) -> LockGuard {
    let what = format!("{who}'s timed lock of {name:?}");
    let attempt = kv.lock_with(name, LockOptions::new().timeout(PROMPTLY));
    within(PROMPTLY + MARGIN, &what, attempt)
        .await
        .unwrap_or_else(|err| panic!("{who} should get {name:?} at once: {err}"))
}

/// Starts a task that waits for `name` on `kv` and reports when it got it.
pub(crate) fn queue(
    kv: &Arc<dyn Kvi>,
    name: &str,
) -> tokio::task::JoinHandle<hmetcd_core::Result<(LockGuard, Instant)>> {
    let kv = Arc::clone(kv);
    let name = name.to_owned();
    tokio::spawn(async move {
        let options = LockOptions::new().timeout(Duration::from_secs(30));
        let guard = kv.lock_with(&name, options).await?;
        Ok((guard, Instant::now()))
    })
}

/// Two handles' guards for one name exclude each other.
pub async fn guards_exclude_across_handles(store: TestStore) {
    let a = store.open().await;
    let b = store.open().await;
    let guard = take(a.as_ref(), NAME, "a").await;
    assert_taken(b.as_ref(), NAME, "b while a holds").await;
    guard.unlock().await.unwrap();
    let guard = assert_free(b.as_ref(), NAME, "b after a unlocked").await;
    assert_taken(a.as_ref(), NAME, "a while b holds").await;
    guard.unlock().await.unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Guards are not re-entrant: a second guard on the same handle waits for the first, and a
/// task waiting for it gets it once the first is released.
pub async fn guards_exclude_among_tasks_of_one_handle(store: TestStore) {
    let kv: Arc<dyn Kvi> = Arc::from(store.open().await);
    let first = take(kv.as_ref(), NAME, "the first task").await;
    assert_taken(kv.as_ref(), NAME, "a second task of the same handle").await;
    let second = queue(&kv, NAME);
    tokio::time::sleep(PROBE).await;
    assert!(
        !second.is_finished(),
        "a second guard of one handle got a held lock"
    );
    assert!(first.is_held());
    first.unlock().await.unwrap();
    let (second, _) = within(MARGIN, "the second task after the first unlocked", second)
        .await
        .unwrap()
        .unwrap();
    assert!(second.is_held());
    assert_taken(kv.as_ref(), NAME, "a third task while the second holds").await;
    drop(second);
    kv.close().await.unwrap();
}

/// How a holder gives up its guard.
#[derive(Debug, Clone, Copy)]
enum Release {
    Drop,
    Unlock,
}

/// Checks that `release` hands a held guard's lock to a queued waiter at once.
async fn assert_released_at_once(store: &TestStore, release: Release) {
    let holder = store.open().await;
    let waiter: Arc<dyn Kvi> = Arc::from(store.open().await);
    let guard = take(holder.as_ref(), NAME, "holder").await;
    let acquired = queue(&waiter, NAME);
    let how = format!("{release:?}");
    let got = assert_handed_over_at_once(acquired, &how, async move {
        match release {
            Release::Drop => drop(guard),
            Release::Unlock => {
                assert!(guard.is_held());
                guard.unlock().await.unwrap();
            }
        }
    })
    .await;
    assert_taken(
        holder.as_ref(),
        NAME,
        "the old holder while the waiter holds",
    )
    .await;
    drop(got);
    waiter.close().await.unwrap();
    holder.close().await.unwrap();
}

/// Dropping a guard releases its lock at once.
pub async fn dropping_a_guard_releases_it(store: TestStore) {
    assert_released_at_once(&store, Release::Drop).await;
}

/// `unlock()` releases the lock at once and reports `Ok`.
pub async fn unlock_releases_and_reports_ok(store: TestStore) {
    assert_released_at_once(&store, Release::Unlock).await;
}

/// Waiters for a name get it in the order they asked for it.
pub async fn guard_waiters_are_served_first_come_first_served(store: TestStore) {
    let holder = store.open().await;
    let guard = take(holder.as_ref(), NAME, "holder").await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for id in 1..=3 {
        let kv = store.open().await;
        let order = Arc::clone(&order);
        waiters.push(tokio::spawn(async move {
            let what = format!("waiter {id}");
            let guard = within(Duration::from_secs(30), &what, kv.lock(NAME))
                .await
                .unwrap();
            order.lock().unwrap().push(id);
            tokio::time::sleep(Duration::from_millis(50)).await;
            guard.unlock().await.unwrap();
            kv.close().await.unwrap();
        }));
        // Lets this waiter queue before the next one asks.
        tokio::time::sleep(PROBE).await;
    }
    assert!(
        order.lock().unwrap().is_empty(),
        "a waiter got the held lock"
    );
    guard.unlock().await.unwrap();
    for waiter in waiters {
        waiter.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), [1, 2, 3]);
    holder.close().await.unwrap();
}

/// A timed attempt gives up after its timeout with a `LockTimeout` naming the lock and the
/// timeout, and leaves no trace: it delays no later waiter and never takes the lock later.
pub async fn timed_guard_gives_up_without_a_trace(store: TestStore) {
    let holder = store.open().await;
    let quitter = store.open().await;
    let later = store.open().await;
    let guard = take(holder.as_ref(), NAME, "holder").await;
    let timeout = Duration::from_millis(700);
    let started = Instant::now();
    let attempt = quitter.lock_with(NAME, LockOptions::new().timeout(timeout));
    let attempt = within(timeout + MARGIN, "the timed lock", attempt).await;
    let waited = started.elapsed();
    match attempt {
        Err(Error::LockTimeout {
            lock,
            timeout: reported,
        }) => {
            assert_eq!(lock, NAME);
            assert_eq!(reported, timeout);
        }
        other => panic!("expected LockTimeout, got {other:?}"),
    }
    assert!(
        waited >= timeout,
        "gave up after {waited:?}, before the timeout {timeout:?}"
    );
    for _ in 0..2 {
        assert_taken(quitter.as_ref(), NAME, "quitter while the holder holds").await;
    }
    guard.unlock().await.unwrap();
    let guard = assert_free(
        later.as_ref(),
        NAME,
        "a later handle after the holder unlocked",
    )
    .await;
    assert_taken(
        quitter.as_ref(),
        NAME,
        "quitter while the later handle holds",
    )
    .await;
    guard.unlock().await.unwrap();
    let guard = assert_free(quitter.as_ref(), NAME, "quitter once the lock is free").await;
    guard.unlock().await.unwrap();
    for kv in [holder, quitter, later] {
        kv.close().await.unwrap();
    }
}

/// After `max_hold` the lock is released to a waiter, the guard says it is no longer held,
/// and its `unlock()` is `Ok`.
pub async fn max_hold_releases_to_a_waiter(store: TestStore) {
    let max_hold = Duration::from_millis(1500);
    let holder = store.open().await;
    let waiter: Arc<dyn Kvi> = Arc::from(store.open().await);
    let options = LockOptions::new().max_hold(max_hold);
    let guard = within(PROMPTLY, "holder's lock", holder.lock_with(NAME, options))
        .await
        .unwrap();
    let held_since = Instant::now();
    assert!(guard.is_held());
    let acquired = queue(&waiter, NAME);
    let got = within(max_hold + PROMPTLY, "the waiter after max_hold", acquired)
        .await
        .unwrap()
        .unwrap_or_else(|err| panic!("the waiter after max_hold: {err}"));
    let waited = got.1 - held_since;
    assert!(
        waited >= max_hold - Duration::from_millis(100),
        "the waiter got the lock {waited:?} after the holder, before max_hold {max_hold:?}"
    );
    assert!(!guard.is_held(), "the guard is held after max_hold");
    guard.unlock().await.unwrap();
    assert!(
        got.0.is_held(),
        "unlocking an expired guard released the next holder"
    );
    assert_taken(
        holder.as_ref(),
        NAME,
        "the old holder while the waiter holds",
    )
    .await;
    drop(got);
    holder.close().await.unwrap();
    waiter.close().await.unwrap();
}

/// Unlocking before `max_hold` stops its timer: it never releases a later holder of the
/// name, not even one on the same handle.
pub async fn unlock_before_max_hold_stops_the_timer(store: TestStore) {
    let max_hold = Duration::from_millis(500);
    let kv = store.open().await;
    let other = store.open().await;
    let options = LockOptions::new().max_hold(max_hold);
    let first = within(PROMPTLY, "the first lock", kv.lock_with(NAME, options))
        .await
        .unwrap();
    first.unlock().await.unwrap();
    let dropped = within(PROMPTLY, "the second lock", kv.lock_with(NAME, options))
        .await
        .unwrap();
    drop(dropped);
    let later = take(kv.as_ref(), NAME, "a later guard of the same handle").await;
    tokio::time::sleep(max_hold * 2).await;
    assert!(
        later.is_held(),
        "an earlier guard's max_hold released a later guard"
    );
    assert_taken(
        other.as_ref(),
        NAME,
        "another handle after the earlier max_hold",
    )
    .await;
    later.unlock().await.unwrap();
    kv.close().await.unwrap();
    other.close().await.unwrap();
}

/// `close()` releases every guard of the handle at once; later `lock` calls are `Closed`.
pub async fn close_releases_every_guard(store: TestStore) {
    let kv = store.open().await;
    let waiter: Arc<dyn Kvi> = Arc::from(store.open().await);
    let first = take(kv.as_ref(), "first", "holder").await;
    let second = take(kv.as_ref(), "second", "holder").await;
    let acquired = queue(&waiter, "first");
    let got = assert_handed_over_at_once(acquired, "close()", async {
        kv.close().await.unwrap();
        assert!(
            !first.is_held() && !second.is_held(),
            "guards held after close"
        );
    })
    .await;
    drop(
        assert_free(
            waiter.as_ref(),
            "second",
            "another name of the closed handle",
        )
        .await,
    );
    first.unlock().await.unwrap();
    second.unlock().await.unwrap();
    for attempt in [
        kv.lock("third").await,
        kv.lock_with("third", LockOptions::new().timeout(PROBE))
            .await,
    ] {
        assert!(matches!(attempt, Err(Error::Closed)), "{attempt:?}");
    }
    drop(got);
    waiter.close().await.unwrap();
}

/// `close()` ends every lock wait of the handle with `Closed`, the one queued in the store and
/// the one queued behind it on the handle itself, and no wait queues again afterwards: the
/// only lock key the handle had goes, and none comes back.
pub async fn close_ends_every_wait_and_no_wait_queues_again(store: TestStore) {
    let holder = store.open().await;
    let observer = store.open().await;
    let closing: Arc<dyn Kvi> = Arc::from(store.open().await);
    let guard = take(holder.as_ref(), NAME, "holder").await;
    let held = wait_for_lock_keys(observer.as_ref(), NAME, 1, "the holder").await;
    let first = queue(&closing, NAME);
    wait_for_lock_keys(observer.as_ref(), NAME, 2, "the handle's first waiter").await;
    let second = queue(&closing, NAME);
    assert_taken(observer.as_ref(), NAME, "the observer").await;
    let mut keys = observer
        .watch_prefix(&format!("{NAME}/"))
        .await
        .unwrap_or_else(|err| panic!("watch the lock keys: {err}"));

    closing.close().await.unwrap();
    for (waiter, which) in [(first, "first"), (second, "second")] {
        let ended = within(PROMPTLY, &format!("the {which} wait"), waiter)
            .await
            .unwrap_or_else(|err| panic!("the {which} waiter's task: {err}"));
        assert!(
            matches!(ended, Err(Error::Closed)),
            "the {which} wait: {:?}",
            ended.map(|(guard, _)| guard.name().to_owned())
        );
    }
    let gone = next_event(&mut keys, PROMPTLY, "the waiter's key deleted").await;
    assert!(
        matches!(&gone, WatchEvent::Delete { key, .. } if !held.contains(key)),
        "{gone:?}"
    );
    let more = tokio::time::timeout(PROBE, keys.next()).await;
    assert!(
        more.is_err(),
        "a closed handle's wait queued again: {more:?}"
    );
    assert_eq!(lock_keys(observer.as_ref(), NAME).await, held);
    drop(guard);
    wait_for_lock_keys(observer.as_ref(), NAME, 0, "the holder let go").await;
    holder.close().await.unwrap();
    observer.close().await.unwrap();
}

/// A dropped handle's guards are released within the backend's bound (at once in memory,
/// about `lease_ttl` on etcd) and no longer say they are held.
pub async fn dropping_the_handle_releases_its_guards(store: TestStore) {
    let lease_ttl = Duration::from_secs(2);
    let holder = store.open_with("lease_ttl=2s").await.unwrap();
    let waiter = store.open().await;
    let guard = take(holder.as_ref(), NAME, "holder").await;
    assert_taken(waiter.as_ref(), NAME, "waiter before the drop").await;
    drop(holder);
    assert!(!guard.is_held(), "a guard of a dropped handle is held");
    let bound = store.drop_release_bound(lease_ttl) + MARGIN;
    let attempt = waiter.lock_with(NAME, LockOptions::new().timeout(bound));
    let got = within(bound + MARGIN, "the lock of a dropped handle", attempt)
        .await
        .unwrap_or_else(|err| panic!("the lock of a dropped handle was not released: {err}"));
    drop(guard);
    drop(got);
    waiter.close().await.unwrap();
}

/// The named lock `lock_name` is the handle's lock: a guard for it and `dist_lock` exclude
/// each other, on one handle and across handles.
pub async fn lock_name_guard_is_the_handles_lock(store: TestStore) {
    let name = store.lock_name().to_owned();
    let a = store.open().await;
    let b = store.open().await;
    a.dist_lock().await.unwrap();
    assert_taken(a.as_ref(), &name, "a guard of the handle holding dist_lock").await;
    assert_taken(b.as_ref(), &name, "a guard of another handle").await;
    a.dist_unlock().await.unwrap();
    let guard = assert_free(b.as_ref(), &name, "b once a unlocked").await;
    for (kv, who) in [(&a, "a"), (&b, "b, the guard's own handle")] {
        match kv.dist_timed_lock(PROBE).await {
            Err(Error::LockTimeout { .. }) => {}
            other => panic!("{who}'s dist_lock while a guard holds lock_name: {other:?}"),
        }
    }
    guard.unlock().await.unwrap();
    within(
        PROMPTLY,
        "b's dist_lock once the guard is gone",
        b.dist_lock(),
    )
    .await
    .unwrap();
    b.dist_unlock().await.unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Different names do not exclude each other, nor a name and the handle's lock.
pub async fn distinct_names_do_not_exclude(store: TestStore) {
    let a = store.open().await;
    let b = store.open().await;
    let x = take(a.as_ref(), "x", "a").await;
    let y = assert_free(b.as_ref(), "y", "b on another name").await;
    let y2 = assert_free(a.as_ref(), "y2", "a on a second name").await;
    within(PROMPTLY, "dist_lock beside named guards", b.dist_lock())
        .await
        .unwrap();
    assert_taken(b.as_ref(), "x", "b on a's name").await;
    assert!(x.is_held() && y.is_held() && y2.is_held());
    b.dist_unlock().await.unwrap();
    drop((x, y, y2));
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// An empty name is `InvalidKey` naming the argument, for both calls.
pub async fn empty_name_is_invalid(store: TestStore) {
    let kv = store.open().await;
    for attempt in [
        kv.lock("").await,
        kv.lock_with("", LockOptions::new().timeout(PROBE)).await,
    ] {
        match attempt {
            Err(Error::InvalidKey { argument, .. }) => assert_eq!(argument, "name"),
            other => panic!("expected InvalidKey, got {other:?}"),
        }
    }
    kv.close().await.unwrap();
}

const COUNTER_HANDLES: usize = 4;
const TASKS_PER_HANDLE: usize = 2;
const COUNTER_ROUNDS: usize = 15;

/// A guard serialises read-modify-write cycles of many tasks on several handles: no
/// increment is lost.
pub async fn guard_protects_a_counter(store: TestStore) {
    let first = store.open().await;
    first.store("counter", "0").await.unwrap();
    let mut handles: Vec<Arc<dyn Kvi>> = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..COUNTER_HANDLES {
        let kv: Arc<dyn Kvi> = Arc::from(store.open().await);
        handles.push(Arc::clone(&kv));
        for _ in 0..TASKS_PER_HANDLE {
            let kv = Arc::clone(&kv);
            tasks.push(tokio::spawn(async move {
                for _ in 0..COUNTER_ROUNDS {
                    let guard = kv.lock("counter-lock").await.unwrap();
                    let count: usize = kv.get("counter").await.unwrap().unwrap().parse().unwrap();
                    tokio::task::yield_now().await;
                    kv.store("counter", &(count + 1).to_string()).await.unwrap();
                    guard.unlock().await.unwrap();
                }
            }));
        }
    }
    within(Duration::from_secs(60), "the locked increments", async {
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await;
    let expected = (COUNTER_HANDLES * TASKS_PER_HANDLE * COUNTER_ROUNDS).to_string();
    assert_eq!(first.get("counter").await.unwrap(), Some(expected));
    for kv in handles {
        kv.close().await.unwrap();
    }
    first.close().await.unwrap();
}

/// Every guard's participant has a key `<name>/<id>` with the value `""` (etcd's lock
/// layout) from the moment it queues until it is released or gives up.
pub async fn guard_keys_come_and_go_with_participants(store: TestStore) {
    let a = store.open().await;
    let b: Arc<dyn Kvi> = Arc::from(store.open().await);
    let quitter = store.open().await;
    let observer = store.open().await;
    assert_eq!(
        lock_keys(observer.as_ref(), NAME).await,
        Vec::<String>::new()
    );
    let guard = take(a.as_ref(), NAME, "a").await;
    let held_by_a = wait_for_lock_keys(observer.as_ref(), NAME, 1, "a holds").await;
    assert_taken(quitter.as_ref(), NAME, "a quitter").await;
    assert_eq!(
        lock_keys(observer.as_ref(), NAME).await,
        held_by_a,
        "a timed attempt that gave up left a key"
    );
    let waiter = queue(&b, NAME);
    let both = wait_for_lock_keys(observer.as_ref(), NAME, 2, "a holds, b waits").await;
    assert!(both.contains(&held_by_a[0]), "{both:?}");
    drop(guard);
    let (got, _) = within(MARGIN, "b after a's guard was dropped", waiter)
        .await
        .unwrap()
        .unwrap_or_else(|err| panic!("b after a's guard was dropped: {err}"));
    let held_by_b = lock_keys(observer.as_ref(), NAME).await;
    assert_eq!(held_by_b.len(), 1, "b holds: {held_by_b:?}");
    assert_ne!(held_by_b, held_by_a, "a's key outlived its guard");
    got.unlock().await.unwrap();
    assert_eq!(
        lock_keys(observer.as_ref(), NAME).await,
        Vec::<String>::new()
    );
    let guard = take(quitter.as_ref(), NAME, "the quitter, now").await;
    wait_for_lock_keys(observer.as_ref(), NAME, 1, "the quitter holds").await;
    quitter.close().await.unwrap();
    assert_eq!(
        lock_keys(observer.as_ref(), NAME).await,
        Vec::<String>::new(),
        "close() left the guard's key"
    );
    drop(guard);
    for kv in [a, observer] {
        kv.close().await.unwrap();
    }
    b.close().await.unwrap();
}

/// `watch_prefix("<name>/")` sees a guard's key put when the lock is taken and deleted when
/// the guard is dropped.
pub async fn watch_prefix_sees_guard_keys(store: TestStore) {
    let kv = store.open().await;
    let observer = store.open().await;
    let dir = format!("{NAME}/");
    let mut events = observer.watch_prefix(&dir).await.unwrap();
    let guard = take(kv.as_ref(), NAME, "the holder").await;
    let put = next_event(&mut events, PROMPTLY, "the guard's key being put").await;
    let (key, value) = put_of(&put);
    assert!(
        key.starts_with(&dir) && key.len() > dir.len(),
        "lock key {key:?}"
    );
    assert_eq!(value, "");
    let key = key.to_owned();
    drop(guard);
    match next_event(&mut events, PROMPTLY, "the guard's key being deleted").await {
        hmetcd_core::WatchEvent::Delete { key: deleted, .. } => assert_eq!(deleted, key),
        other => panic!("expected the Delete of {key:?}, got {other:?}"),
    }
    drop(events);
    kv.close().await.unwrap();
    observer.close().await.unwrap();
}

/// A handle's own guards for a name queue in the handle first: while `a` holds, a second
/// guard of `a` waits, then `b` asks; when `a` releases, `b` gets the lock before `a`'s
/// second guard (on etcd one handle has one lock key per name).
pub async fn own_handle_guards_queue_after_other_handles(store: TestStore) {
    let a: Arc<dyn Kvi> = Arc::from(store.open().await);
    let b: Arc<dyn Kvi> = Arc::from(store.open().await);
    let first = take(a.as_ref(), NAME, "a").await;
    let a2 = queue(&a, NAME);
    tokio::time::sleep(PROBE).await;
    let b_waits = queue(&b, NAME);
    tokio::time::sleep(PROBE).await;
    assert!(
        !a2.is_finished() && !b_waits.is_finished(),
        "a waiter got a held lock"
    );
    drop(first);
    let (got, _) = within(MARGIN, "b, queued in the store before a2", b_waits)
        .await
        .unwrap()
        .unwrap_or_else(|err| panic!("b after a released: {err}"));
    tokio::time::sleep(PROBE).await;
    assert!(!a2.is_finished(), "a2 got the lock b holds");
    got.unlock().await.unwrap();
    let (second, _) = within(MARGIN, "a2 after b unlocked", a2)
        .await
        .unwrap()
        .unwrap_or_else(|err| panic!("a2 after b unlocked: {err}"));
    assert!(second.is_held());
    drop(second);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Someone else writes this handle's own lock key (`<name>/<lease hex>`, with no lease) while
/// the handle is not queued for the name: the handle's next lock of it takes the key as its
/// place (its fencing token is the key's create revision), with the lock's own value and bound
/// to the handle's lease, so that it goes when the handle closes instead of blocking the lock
/// for everyone for good. The same whether the value written is a lock's (empty) or not.
pub async fn a_foreign_write_of_the_handles_own_lock_key_is_taken_over(store: TestStore) {
    let other: Arc<dyn Kvi> = Arc::from(store.open().await);
    for written_value in ["", "someone else's"] {
        let kv = store.open().await;
        let first = take(kv.as_ref(), NAME, "A").await;
        let key = first.key().to_owned();
        first.unlock().await.unwrap();
        other.store(&key, written_value).await.unwrap();
        let written = other
            .get_kv(&key)
            .await
            .unwrap()
            .expect("the key just written");
        assert_eq!(written.lease, 0, "a stored key has no lease");

        let guard = take(kv.as_ref(), NAME, "A over the written key").await;
        assert_eq!(
            guard.fencing_token(),
            written.create_revision,
            "A's place is the written key ({written_value:?})"
        );
        let taken = other.get_kv(&key).await.unwrap().expect("A's lock key");
        assert_eq!(
            (taken.value.as_str(), taken.lease != 0),
            ("", true),
            "A's lock key once A took it over ({written_value:?}): {taken:?}"
        );
        assert_taken(other.as_ref(), NAME, "the other handle").await;
        let waiting = queue(&other, NAME);
        let got = assert_handed_over_at_once(waiting, "A's close()", async {
            kv.close().await.unwrap();
        })
        .await;
        assert!(got.is_held());
        got.unlock().await.unwrap();
        drop(guard);
    }
    other.close().await.unwrap();
}
