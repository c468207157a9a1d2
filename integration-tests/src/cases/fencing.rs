//! Losing a lock, and fencing: `fencing_token()` grows from holder to holder, `lost()` says
//! why a hold ended, a hold ends when anyone deletes its lock key, and a lock only ever
//! considers its own keys `<name>/<lowercase hex>`.

use std::sync::Arc;
use std::time::Duration;

use hmetcd_core::{Kvi, LockGuard, LockOptions, LostReason, Op, Txn};
use tokio::time::Instant;

use super::lock::{assert_lock_taken, lock};
use super::named_locks::{assert_free, assert_taken, queue, take};
use super::{
    assert_handed_over_at_once, lock_keys, wait_for_lock_keys, within, MARGIN, PROBE, PROMPTLY,
};
use crate::TestStore;

/// The name most cases lock (under the case's own prefix).
const NAME: &str = "jobs";

/// A `max_hold` short enough for a case, long enough to see the lock held first.
const MAX_HOLD: Duration = Duration::from_millis(700);

/// Why `guard`'s hold ended; `lost()` must resolve within [`PROMPTLY`].
async fn lost_reason(guard: &LockGuard, what: &str) -> LostReason {
    within(PROMPTLY, &format!("{what}: lost()"), guard.lost()).await
}

/// Asserts that `guard.lost()` does not resolve within [`PROBE`].
async fn assert_not_lost(guard: &LockGuard, what: &str) {
    if let Ok(reason) = tokio::time::timeout(PROBE, guard.lost()).await {
        panic!("{what}: lost() resolved with {reason:?}");
    }
}

/// The lock key of `name` while exactly one participant holds it or waits for it.
async fn only_lock_key(kv: &dyn Kvi, name: &str, what: &str) -> String {
    wait_for_lock_keys(kv, name, 1, what).await.remove(0)
}

/// Starts a task that waits for the handle's lock on `kv`, shaped for
/// [`assert_handed_over_at_once`].
fn queue_dist(kv: &Arc<dyn Kvi>) -> tokio::task::JoinHandle<hmetcd_core::Result<((), Instant)>> {
    let kv = Arc::clone(kv);
    tokio::spawn(async move {
        kv.dist_timed_lock(Duration::from_secs(30))
            .await
            .map(|()| ((), Instant::now()))
    })
}

/// A guard's `fencing_token()` is positive and grows strictly from each holder of a name to
/// the next: handed over by unlock, by drop, by a deleted key, by `max_hold`, to another handle
/// or to the same one; likewise for the `lock_name` guard with `dist_lock` holders between.
pub async fn fencing_token_is_positive_and_strictly_increases_across_holders(store: TestStore) {
    let a: Arc<dyn Kvi> = Arc::from(store.open().await);
    let b: Arc<dyn Kvi> = Arc::from(store.open().await);
    let c: Arc<dyn Kvi> = Arc::from(store.open().await);
    let mut tokens = Vec::new();
    let first = take(a.as_ref(), NAME, "a").await;
    assert!(first.fencing_token() > 0, "{first:?}");
    tokens.push(first.fencing_token());
    let waiting = queue(&b, NAME);
    tokio::time::sleep(PROBE).await;
    first.unlock().await.unwrap();
    let (second, _) = within(MARGIN, "b after a unlocked", waiting)
        .await
        .unwrap()
        .unwrap();
    tokens.push(second.fencing_token());
    let waiting = queue(&c, NAME);
    tokio::time::sleep(PROBE).await;
    drop(second);
    let (third, _) = within(MARGIN, "c after b's guard was dropped", waiting)
        .await
        .unwrap()
        .unwrap();
    tokens.push(third.fencing_token());
    let key = only_lock_key(a.as_ref(), NAME, "c holds").await;
    let waiting = queue(&a, NAME);
    wait_for_lock_keys(a.as_ref(), NAME, 2, "c holds, a waits").await;
    b.delete(&key).await.unwrap();
    let (fourth, _) = within(MARGIN, "a after c's key was deleted", waiting)
        .await
        .unwrap()
        .unwrap();
    tokens.push(fourth.fencing_token());
    drop((third, fourth));
    let options = LockOptions::new().max_hold(MAX_HOLD);
    let expiring = within(PROMPTLY, "b with max_hold", b.lock_with(NAME, options))
        .await
        .unwrap();
    tokens.push(expiring.fencing_token());
    let waiting = queue(&c, NAME);
    let (fifth, _) = within(MAX_HOLD + PROMPTLY, "c after max_hold", waiting)
        .await
        .unwrap()
        .unwrap();
    tokens.push(fifth.fencing_token());
    drop((expiring, fifth));
    let again = take(c.as_ref(), NAME, "c again").await;
    tokens.push(again.fencing_token());
    drop(again);
    assert!(
        tokens.windows(2).all(|pair| pair[0] < pair[1]),
        "tokens of successive holders: {tokens:?}"
    );

    let name = store.lock_name().to_owned();
    let first = take(a.as_ref(), &name, "a's lock_name guard").await;
    assert!(first.fencing_token() > 0, "{first:?}");
    let token = first.fencing_token();
    first.unlock().await.unwrap();
    lock(b.as_ref(), "b's dist_lock").await;
    b.dist_unlock().await.unwrap();
    let second = take(c.as_ref(), &name, "c's lock_name guard").await;
    assert!(
        second.fencing_token() > token,
        "lock_name guards: {token} then {}",
        second.fencing_token()
    );
    drop(second);
    for kv in [a, b, c] {
        kv.close().await.unwrap();
    }
}

/// `lost()` resolves with `MaxHold` once `max_hold` ran out, and a `lost()` taken after
/// that resolves with it too.
pub async fn lost_resolves_max_hold(store: TestStore) {
    let kv = store.open().await;
    let options = LockOptions::new().max_hold(MAX_HOLD);
    let guard = within(PROMPTLY, "lock with max_hold", kv.lock_with(NAME, options))
        .await
        .unwrap();
    let taken = Instant::now();
    let lost = guard.lost();
    let reason = within(MAX_HOLD + PROMPTLY, "lost() after max_hold", lost).await;
    assert_eq!(reason, LostReason::MaxHold);
    assert!(
        taken.elapsed() >= MAX_HOLD - Duration::from_millis(100),
        "lost after {:?}, before max_hold {MAX_HOLD:?}",
        taken.elapsed()
    );
    assert!(!guard.is_held(), "held after max_hold");
    assert_eq!(
        lost_reason(&guard, "a later lost()").await,
        LostReason::MaxHold
    );
    guard.unlock().await.unwrap();
    kv.close().await.unwrap();
}

/// `lost()` resolves with `Closed` when the guard's handle is closed; the guard is no longer
/// held, its `unlock()` is `Ok`, and another handle gets the lock.
pub async fn lost_resolves_closed_on_close(store: TestStore) {
    let kv = store.open().await;
    let other = store.open().await;
    let guard = take(kv.as_ref(), NAME, "the holder").await;
    let lost = guard.lost();
    assert_not_lost(&guard, "before close()").await;
    kv.close().await.unwrap();
    assert!(!guard.is_held(), "held after close()");
    assert_eq!(
        within(PROMPTLY, "lost() after close()", lost).await,
        LostReason::Closed
    );
    guard.unlock().await.unwrap();
    drop(assert_free(other.as_ref(), NAME, "another handle after the close").await);
    other.close().await.unwrap();
}

/// Another handle deleting the holder's lock key hands the lock to the next waiter at once,
/// as on etcd; the old guard's `lost()` says `KeyDeleted`, it is not held, its token is below
/// the new holder's, and its `unlock()` is `Ok` and leaves the new holder holding.
pub async fn lost_resolves_key_deleted_when_another_handle_deletes_the_lock_key(store: TestStore) {
    let holder = store.open().await;
    let waiter: Arc<dyn Kvi> = Arc::from(store.open().await);
    let deleter = store.open().await;
    let guard = take(holder.as_ref(), NAME, "the holder").await;
    let key = only_lock_key(deleter.as_ref(), NAME, "the holder's key").await;
    let lost = guard.lost();
    let acquired = queue(&waiter, NAME);
    wait_for_lock_keys(
        deleter.as_ref(),
        NAME,
        2,
        "the holder holds, the waiter waits",
    )
    .await;
    let got = assert_handed_over_at_once(acquired, "deleting the holder's lock key", async {
        deleter.delete(&key).await.unwrap();
    })
    .await;
    assert_eq!(
        within(PROMPTLY, "lost() after the delete", lost).await,
        LostReason::KeyDeleted
    );
    assert!(!guard.is_held(), "held after its key was deleted");
    assert!(got.is_held());
    assert!(
        got.fencing_token() > guard.fencing_token(),
        "{got:?} after {guard:?}"
    );
    within(PROMPTLY, "the lost guard's unlock()", guard.unlock())
        .await
        .unwrap();
    assert!(
        got.is_held(),
        "the lost guard's unlock() released the new holder"
    );
    assert_taken(
        deleter.as_ref(),
        NAME,
        "a third handle while the waiter holds",
    )
    .await;
    let keys = lock_keys(deleter.as_ref(), NAME).await;
    assert!(keys.len() == 1 && keys[0] != key, "lock keys {keys:?}");
    drop(got);
    for kv in [holder, deleter] {
        kv.close().await.unwrap();
    }
    waiter.close().await.unwrap();
}

/// The holder's own handle deleting its lock key with a plain `delete` loses the lock
/// (`KeyDeleted`), and the lost guard blocks none of the handle's later guards for the name.
pub async fn lost_resolves_key_deleted_when_its_own_handle_deletes_the_lock_key(store: TestStore) {
    let kv = store.open().await;
    let other = store.open().await;
    let guard = take(kv.as_ref(), NAME, "the holder").await;
    let key = only_lock_key(kv.as_ref(), NAME, "the holder's key").await;
    kv.delete(&key).await.unwrap();
    assert_eq!(
        lost_reason(&guard, "after deleting its own key").await,
        LostReason::KeyDeleted
    );
    assert!(!guard.is_held());
    let again = assert_free(kv.as_ref(), NAME, "the same handle, its lost guard alive").await;
    assert!(
        again.fencing_token() > guard.fencing_token(),
        "{again:?} after {guard:?}"
    );
    assert_taken(
        other.as_ref(),
        NAME,
        "another handle while the new guard holds",
    )
    .await;
    drop(again);
    drop(guard);
    kv.close().await.unwrap();
    other.close().await.unwrap();
}

/// A `lost()` future may be dropped, polled or not, and many may be taken: each resolves with
/// the same reason. One taken before the guard's own unlock or drop never resolves.
pub async fn lost_future_dropped_is_fine_and_many_may_be_taken(store: TestStore) {
    let kv = store.open().await;
    let deleter = store.open().await;
    let guard = take(kv.as_ref(), NAME, "the holder").await;
    drop(guard.lost());
    let mut polled = guard.lost();
    assert!(
        tokio::time::timeout(PROBE, &mut polled).await.is_err(),
        "lost() resolved while held"
    );
    drop(polled);
    let (first, second) = (guard.lost(), guard.lost());
    let key = only_lock_key(deleter.as_ref(), NAME, "the holder's key").await;
    deleter.delete(&key).await.unwrap();
    let both = within(PROMPTLY, "two lost() futures", async {
        tokio::join!(first, second)
    })
    .await;
    assert_eq!(both, (LostReason::KeyDeleted, LostReason::KeyDeleted));
    assert_eq!(
        lost_reason(&guard, "a lost() taken after the loss").await,
        LostReason::KeyDeleted
    );
    drop(guard);
    let unlocked = take(kv.as_ref(), NAME, "a guard to unlock").await;
    let never = unlocked.lost();
    unlocked.unlock().await.unwrap();
    let dropped = take(kv.as_ref(), NAME, "a guard to drop").await;
    let never_either = dropped.lost();
    drop(dropped);
    let resolved = tokio::time::timeout(PROBE, async { tokio::join!(never, never_either) }).await;
    assert!(
        resolved.is_err(),
        "lost() resolved after the guard's own release: {resolved:?}"
    );
    kv.close().await.unwrap();
    deleter.close().await.unwrap();
}

/// A lost guard's `unlock()` is `Ok` and releases nobody: not another handle's holder, and not
/// a later guard of its own handle, whose lock key has the same name as the lost one had.
pub async fn unlock_of_a_lost_guard_releases_nobody(store: TestStore) {
    let a: Arc<dyn Kvi> = Arc::from(store.open().await);
    let b = store.open().await;
    let observer = store.open().await;
    let lost = take(a.as_ref(), NAME, "a").await;
    let key = only_lock_key(observer.as_ref(), NAME, "a holds").await;
    observer.delete(&key).await.unwrap();
    assert_eq!(
        lost_reason(&lost, "a's guard").await,
        LostReason::KeyDeleted
    );
    let b_holds = assert_free(b.as_ref(), NAME, "b after a's key was deleted").await;
    let a_again = queue(&a, NAME);
    wait_for_lock_keys(observer.as_ref(), NAME, 2, "b holds, a queued again").await;
    drop(b_holds);
    let (a_holds, _) = within(MARGIN, "a's new guard after b's", a_again)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        lock_keys(observer.as_ref(), NAME).await,
        std::slice::from_ref(&key),
        "a's new guard has its handle's key"
    );
    within(PROMPTLY, "the lost guard's unlock()", lost.unlock())
        .await
        .unwrap();
    assert!(
        a_holds.is_held(),
        "the lost guard's unlock() released a's new guard"
    );
    assert_not_lost(&a_holds, "a's new guard").await;
    assert_eq!(
        lock_keys(observer.as_ref(), NAME).await,
        [key],
        "the lost guard's unlock() deleted the new guard's key"
    );
    assert_taken(b.as_ref(), NAME, "b while a's new guard holds").await;
    drop(a_holds);
    for kv in [b, observer] {
        kv.close().await.unwrap();
    }
    a.close().await.unwrap();
}

/// "Holds" means holds now: once the handle's lock key is deleted, the next waiter has the
/// lock at once, `dist_lock` queues again instead of answering from a stale belief, and
/// `dist_unlock` is `Ok` and releases nobody.
pub async fn dist_lock_queues_again_after_its_key_was_deleted(store: TestStore) {
    let name = store.lock_name().to_owned();
    let a = store.open().await;
    let b: Arc<dyn Kvi> = Arc::from(store.open().await);
    let observer = store.open().await;
    lock(a.as_ref(), "a").await;
    let key = only_lock_key(observer.as_ref(), &name, "a holds").await;
    let waiting = queue_dist(&b);
    wait_for_lock_keys(observer.as_ref(), &name, 2, "a holds, b waits").await;
    assert_handed_over_at_once(waiting, "deleting a's lock key", async {
        observer.delete(&key).await.unwrap();
    })
    .await;
    assert_lock_taken(a.as_ref(), "a, whose key was deleted, while b holds").await;
    a.dist_unlock().await.unwrap();
    assert_lock_taken(observer.as_ref(), "another handle after a's dist_unlock").await;
    b.dist_unlock().await.unwrap();
    lock(a.as_ref(), "a once b unlocked").await;
    assert_eq!(lock_keys(observer.as_ref(), &name).await, [key]);
    a.dist_unlock().await.unwrap();
    for kv in [a, observer] {
        kv.close().await.unwrap();
    }
    b.close().await.unwrap();
}

/// Plain keys under the lock's name that are not `<name>/<lowercase hex>` neither block the
/// lock nor count as its holder or waiters.
pub async fn a_plain_key_under_the_lock_name_does_not_block(store: TestStore) {
    let a = store.open().await;
    let b = store.open().await;
    let plain = ["jobs/config", "jobs/1F", "jobs/", "jobs/a/b"];
    for key in plain {
        a.store(key, "x").await.unwrap();
    }
    let timeout = Duration::from_secs(2);
    let attempt = a.lock_with(NAME, LockOptions::new().timeout(timeout));
    let guard = within(timeout + MARGIN, "the lock beside plain keys", attempt)
        .await
        .unwrap_or_else(|err| panic!("plain keys under {NAME:?} blocked the lock: {err}"));
    for key in plain {
        b.delete(key).await.unwrap();
    }
    assert_not_lost(&guard, "after the plain keys were deleted").await;
    assert!(guard.is_held());
    assert_taken(b.as_ref(), NAME, "b while a holds").await;
    for key in plain {
        b.store(key, "y").await.unwrap();
    }
    guard.unlock().await.unwrap();
    let attempt = b.lock_with(NAME, LockOptions::new().timeout(timeout));
    let guard = within(
        timeout + MARGIN,
        "b beside plain keys written later",
        attempt,
    )
    .await
    .unwrap_or_else(|err| panic!("plain keys written under a held lock blocked it: {err}"));
    drop(guard);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// More plain keys under the lock name than one read of the keys ahead takes (some written one
/// by one, some in one transaction, so that a page can hold a single revision), between the
/// holder's key and a waiter's: the waiter still waits for the holder.
pub async fn pages_of_plain_keys_between_holder_and_waiter_keep_the_waiter_waiting(
    store: TestStore,
) {
    let a = store.open().await;
    let b = store.open().await;
    let guard = take(a.as_ref(), NAME, "a").await;
    for i in 0..40 {
        a.store(&format!("{NAME}/one/{i:02}"), "x").await.unwrap();
    }
    let many = (0..40).fold(Txn::new(), |txn, i| {
        txn.then(Op::put(format!("{NAME}/all/{i:02}"), "x"))
    });
    a.txn(many).await.unwrap();
    assert_taken(b.as_ref(), NAME, "b behind pages of plain keys").await;
    let b: Arc<dyn Kvi> = Arc::from(b);
    let waiting = queue(&b, NAME);
    let got = assert_handed_over_at_once(waiting, "a's unlock", async {
        guard.unlock().await.unwrap();
    })
    .await;
    drop(got);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// The keys of a lock named `jobs/7` (`jobs/7/<hex>`) do not block the lock `jobs`, and the
/// keys of `jobs` do not block `jobs/7`: both are held at once.
pub async fn a_lock_named_with_a_longer_path_does_not_block(store: TestStore) {
    let a = store.open().await;
    let b = store.open().await;
    let c = store.open().await;
    let timeout = Duration::from_secs(2);
    let longer = take(a.as_ref(), "jobs/7", "a").await;
    let attempt = b.lock_with(NAME, LockOptions::new().timeout(timeout));
    let jobs = within(timeout + MARGIN, "b's lock of jobs", attempt)
        .await
        .unwrap_or_else(|err| panic!("the lock jobs/7 blocked the lock jobs: {err}"));
    assert!(longer.is_held() && jobs.is_held());
    assert_taken(c.as_ref(), "jobs/7", "c").await;
    assert_taken(c.as_ref(), NAME, "c").await;
    drop(jobs);
    assert_not_lost(&longer, "jobs/7 after jobs was released").await;
    drop(longer);
    let jobs = take(b.as_ref(), NAME, "b").await;
    let attempt = a.lock_with("jobs/7", LockOptions::new().timeout(timeout));
    let longer = within(timeout + MARGIN, "a's lock of jobs/7", attempt)
        .await
        .unwrap_or_else(|err| panic!("the lock jobs blocked the lock jobs/7: {err}"));
    assert!(longer.is_held() && jobs.is_held());
    drop((jobs, longer));
    for kv in [a, b, c] {
        kv.close().await.unwrap();
    }
}

/// `is_held()` is false once the lock is lost, whatever the reason: right after `close()`
/// returns and after a waiter got the lock from `max_hold`, and by the time `lost()` resolves
/// after the key was deleted.
pub async fn is_held_false_after_loss(store: TestStore) {
    let holder = store.open().await;
    let waiter: Arc<dyn Kvi> = Arc::from(store.open().await);
    let options = LockOptions::new().max_hold(MAX_HOLD);
    let expiring = within(
        PROMPTLY,
        "lock with max_hold",
        holder.lock_with(NAME, options),
    )
    .await
    .unwrap();
    assert!(expiring.is_held());
    let (got, _) = within(
        MAX_HOLD + PROMPTLY,
        "the waiter after max_hold",
        queue(&waiter, NAME),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        !expiring.is_held(),
        "held after max_hold gave the lock away"
    );
    drop(got);

    let guard = take(holder.as_ref(), NAME, "the holder").await;
    let key = only_lock_key(waiter.as_ref(), NAME, "the holder's key").await;
    waiter.delete(&key).await.unwrap();
    lost_reason(&guard, "after the key was deleted").await;
    assert!(!guard.is_held(), "held after its key was deleted");
    let again = take(waiter.as_ref(), NAME, "the waiter after the delete").await;
    assert!(!guard.is_held(), "held while another handle holds");
    drop(again);

    let guard = take(holder.as_ref(), NAME, "the holder").await;
    holder.close().await.unwrap();
    assert!(!guard.is_held(), "held after close()");
    drop((expiring, guard));
    waiter.close().await.unwrap();
}

/// A key of the lock's form `<name>/<lowercase hex>` written by a plain `store` queues like a
/// participant of another client (say a Go service): the lock waits until it is deleted,
/// whether it was written before anyone locked or while the lock was held.
pub async fn a_key_in_lock_key_form_queues_like_a_participant(store: TestStore) {
    let a = store.open().await;
    let b = store.open().await;
    let c: Arc<dyn Kvi> = Arc::from(store.open().await);
    a.store("jobs/1f", "").await.unwrap();
    assert_taken(b.as_ref(), NAME, "b behind jobs/1f").await;
    a.delete("jobs/1f").await.unwrap();
    let guard = assert_free(b.as_ref(), NAME, "b once jobs/1f was deleted").await;
    a.store("jobs/ff", "").await.unwrap();
    assert_not_lost(&guard, "after a later key jobs/ff").await;
    let waiting = queue(&c, NAME);
    wait_for_lock_keys(a.as_ref(), NAME, 3, "b holds, jobs/ff, c waits").await;
    guard.unlock().await.unwrap();
    tokio::time::sleep(PROBE).await;
    assert!(
        !waiting.is_finished(),
        "c got the lock before jobs/ff, queued ahead of it, went"
    );
    a.delete("jobs/ff").await.unwrap();
    let (got, _) = within(MARGIN, "c after jobs/ff was deleted", waiting)
        .await
        .unwrap()
        .unwrap();
    drop(got);
    a.store("jobs/ff", "").await.unwrap();
    assert_taken(
        b.as_ref(),
        NAME,
        "b behind jobs/ff, written while nobody waited",
    )
    .await;
    a.delete("jobs/ff").await.unwrap();
    drop(assert_free(b.as_ref(), NAME, "b once jobs/ff was deleted").await);
    for kv in [a, b] {
        kv.close().await.unwrap();
    }
    c.close().await.unwrap();
}

/// A waiter whose lock key is deleted queues again at the back with a new key, as etcd's
/// waiter does when it finds its key gone: a waiter that queued after it is served first.
pub async fn a_waiter_whose_key_was_deleted_queues_again(store: TestStore) {
    let holder = store.open().await;
    let first: Arc<dyn Kvi> = Arc::from(store.open().await);
    let second: Arc<dyn Kvi> = Arc::from(store.open().await);
    let observer = store.open().await;
    let guard = take(holder.as_ref(), NAME, "the holder").await;
    let held_key = only_lock_key(observer.as_ref(), NAME, "the holder's key").await;
    let first_waits = queue(&first, NAME);
    let keys = wait_for_lock_keys(observer.as_ref(), NAME, 2, "one waiter").await;
    let Some(first_key) = keys.into_iter().find(|key| *key != held_key) else {
        panic!("the first waiter has no key of its own");
    };
    let second_waits = queue(&second, NAME);
    wait_for_lock_keys(observer.as_ref(), NAME, 3, "two waiters").await;
    observer.delete(&first_key).await.unwrap();
    tokio::time::sleep(PROBE).await;
    assert!(
        !first_waits.is_finished() && !second_waits.is_finished(),
        "a waiter got a held lock"
    );
    assert_not_lost(&guard, "the holder, after a waiter's key was deleted").await;
    guard.unlock().await.unwrap();
    let (second_got, _) = within(MARGIN, "the second waiter", second_waits)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(PROBE).await;
    assert!(
        !first_waits.is_finished(),
        "the waiter whose key was deleted kept its place"
    );
    let second_token = second_got.fencing_token();
    second_got.unlock().await.unwrap();
    let (first_got, _) = within(MARGIN, "the first waiter, queued again", first_waits)
        .await
        .unwrap()
        .unwrap();
    assert!(
        first_got.fencing_token() > second_token,
        "{first_got:?} after {second_token}"
    );
    drop(first_got);
    for kv in [holder, observer] {
        kv.close().await.unwrap();
    }
    first.close().await.unwrap();
    second.close().await.unwrap();
}
