//! Leader election: one leader at a time, first come first served, `leader` and `observe`
//! agree with who leads, a term ends by `resign`, drop, `close`, `max_hold`, a crash or a
//! deleted key, and the fencing token grows from leader to leader.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use hmetcd_core::{Error, KeyValue, Kvi, LeaderStream, Leadership, LockOptions, LostReason};
use tokio::time::Instant;

use super::named_locks::{assert_free, assert_taken};
use super::{assert_handed_over_at_once, eventually, within, LAST_KEY, MARGIN, PROBE, PROMPTLY};
use crate::TestStore;

/// The election most cases hold (under the case's own prefix).
const NAME: &str = "leaders/scheduler";

/// A `max_hold` short enough for a case, long enough to see the term first.
const MAX_HOLD: Duration = Duration::from_millis(1500);

/// Campaigns for the free election `name` and checks the new leadership.
async fn lead(kv: &dyn Kvi, name: &str, value: &str, who: &str) -> Leadership {
    let what = format!("{who} campaigning in the free election {name:?}");
    let leadership = within(PROMPTLY, &what, kv.campaign(name, value))
        .await
        .unwrap_or_else(|err| panic!("{what}: {err}"));
    assert!(leadership.is_leader(), "{what}: not the leader");
    assert_eq!(leadership.name(), name);
    assert_eq!(leadership.value(), value);
    assert!(leadership.fencing_token() > 0, "{leadership:?}");
    leadership
}

/// Asserts that `kv` cannot lead `name` now: its timed campaign ends in `LockTimeout`.
async fn assert_led(kv: &dyn Kvi, name: &str, who: &str) {
    let what = format!("{who}'s timed campaign in {name:?}");
    let attempt = kv.campaign_with(name, who, LockOptions::new().timeout(PROBE));
    match within(PROBE + MARGIN, &what, attempt).await {
        Err(Error::LockTimeout { lock, .. }) => assert_eq!(lock, name, "{what}"),
        other => panic!("{who} should find {name:?} led by someone else, got {other:?}"),
    }
}

/// Starts a task that campaigns in `name` on `kv` with `value` and reports when it leads.
fn queue(
    kv: &Arc<dyn Kvi>,
    name: &str,
    value: &str,
) -> tokio::task::JoinHandle<hmetcd_core::Result<(Leadership, Instant)>> {
    let kv = Arc::clone(kv);
    let name = name.to_owned();
    let value = value.to_owned();
    tokio::spawn(async move {
        let options = LockOptions::new().timeout(Duration::from_secs(30));
        let leadership = kv.campaign_with(&name, &value, options).await?;
        Ok((leadership, Instant::now()))
    })
}

/// The candidate keys `<name>/<id>` that `kv` sees for the election `name`, with their
/// values, sorted by key.
async fn candidate_keys(kv: &dyn Kvi, name: &str) -> Vec<(String, String)> {
    let dir = format!("{name}/");
    kv.get_range("", LAST_KEY)
        .await
        .unwrap_or_else(|err| panic!("get_range over every key: {err}"))
        .into_iter()
        .filter(|pair| pair.key.starts_with(&dir))
        .map(|pair| (pair.key, pair.value))
        .collect()
}

/// Waits until `kv` sees `count` candidate keys for `name`.
async fn wait_for_candidates(kv: &dyn Kvi, name: &str, count: usize, what: &str) {
    let what = format!("{what}: {count} candidate key(s) under {name:?}");
    eventually(PROMPTLY, &what, || async {
        candidate_keys(kv, name).await.len() == count
    })
    .await;
}

/// The current leader of `name` as `kv` reads it: (key, value).
async fn leader_of(kv: &dyn Kvi, name: &str) -> Option<(String, String)> {
    within(PROMPTLY, "leader()", kv.leader(name))
        .await
        .unwrap_or_else(|err| panic!("leader({name:?}): {err}"))
        .map(|leader| (leader.key, leader.value))
}

/// The key `kv` reads for the current leader, which must lead with `value`.
async fn leader_key(kv: &dyn Kvi, name: &str, value: &str) -> String {
    match leader_of(kv, name).await {
        Some((key, read)) if read == value => key,
        other => panic!("the leader of {name:?} should have the value {value:?}: {other:?}"),
    }
}

/// The next leader `stream` yields, within [`PROMPTLY`].
async fn next_leader(stream: &mut LeaderStream, what: &str) -> Option<(String, String)> {
    match within(PROMPTLY, what, stream.next()).await {
        Some(Ok(leader)) => leader.map(|KeyValue { key, value, .. }| (key, value)),
        Some(Err(err)) => panic!("{what}: the stream failed: {err}"),
        None => panic!("{what}: the stream ended"),
    }
}

/// Asserts that `stream` yields nothing within [`PROBE`].
async fn assert_quiet(stream: &mut LeaderStream, what: &str) {
    if let Ok(item) = tokio::time::timeout(PROBE, stream.next()).await {
        panic!("{what}: observe yielded {item:?}");
    }
}

/// Why `leadership` ended; `lost()` must resolve within `limit`.
async fn lost_reason(leadership: &Leadership, limit: Duration, what: &str) -> LostReason {
    within(limit, &format!("{what}: lost()"), leadership.lost()).await
}

/// Asserts that a lost leadership says so everywhere: not the leader, and `proclaim` is
/// `NotLeader` naming the election and writes nothing.
async fn assert_no_longer_leads(kv: &dyn Kvi, mut leadership: Leadership, key: &str, what: &str) {
    assert!(
        !leadership.is_leader(),
        "{what}: is_leader() after the loss"
    );
    let before = kv.get(key).await.ok().flatten();
    let value = leadership.value().to_owned();
    match within(PROMPTLY, what, leadership.proclaim("stale")).await {
        Err(Error::NotLeader { election, .. }) => assert_eq!(election, leadership.name()),
        other => panic!("{what}: proclaim after the loss should be NotLeader, got {other:?}"),
    }
    assert_eq!(leadership.value(), value, "{what}: a refused proclaim");
    if let Ok(after) = kv.get(key).await {
        assert_eq!(after, before, "{what}: a refused proclaim wrote {key:?}");
    }
    within(PROMPTLY, "resign of a lost leadership", leadership.resign())
        .await
        .unwrap_or_else(|err| panic!("{what}: resign after the loss: {err}"));
}

/// Candidates on two handles exclude each other, and `leader()` names whoever leads.
pub async fn one_leader_at_a_time_across_handles(store: TestStore) {
    let a = store.open().await;
    let b = store.open().await;
    assert_eq!(leader_of(b.as_ref(), NAME).await, None);
    let leadership = lead(a.as_ref(), NAME, "a", "a").await;
    assert_led(b.as_ref(), NAME, "b while a leads").await;
    assert!(leadership.is_leader(), "a timed-out rival ended a's term");
    let key_a = leader_key(b.as_ref(), NAME, "a").await;
    leadership.resign().await.unwrap();
    let leadership = match within(
        PROMPTLY + MARGIN,
        "b after a resigned",
        b.campaign_with(NAME, "b", LockOptions::new().timeout(PROMPTLY)),
    )
    .await
    {
        Ok(leadership) => leadership,
        Err(err) => panic!("b should lead at once after a resigned: {err}"),
    };
    assert_led(a.as_ref(), NAME, "a while b leads").await;
    let key_b = leader_key(a.as_ref(), NAME, "b").await;
    assert_ne!(key_a, key_b, "two handles' candidates share a key");
    leadership.resign().await.unwrap();
    assert_eq!(leader_of(a.as_ref(), NAME).await, None);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

const HANDLES: usize = 3;
const TASKS_PER_HANDLE: usize = 2;
const TERMS: usize = 4;

/// Many tasks on several handles campaign at once, over and over: never two leaders at
/// once, whether the tasks share a handle or not, and every term gets a larger token.
pub async fn one_leader_at_a_time_across_handles_and_tasks(store: TestStore) {
    let leading = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let mut handles: Vec<Arc<dyn Kvi>> = Vec::new();
    let mut tasks = Vec::new();
    for handle in 0..HANDLES {
        let kv: Arc<dyn Kvi> = Arc::from(store.open().await);
        handles.push(Arc::clone(&kv));
        for task in 0..TASKS_PER_HANDLE {
            let kv = Arc::clone(&kv);
            let leading = Arc::clone(&leading);
            let tokens = Arc::clone(&tokens);
            tasks.push(tokio::spawn(async move {
                let value = format!("{handle}.{task}");
                for _ in 0..TERMS {
                    let leadership = kv.campaign(NAME, &value).await.unwrap();
                    let others = leading.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(others, 0, "{value} leads beside another leader");
                    tokens.lock().unwrap().push(leadership.fencing_token());
                    let read = kv.leader(NAME).await.unwrap();
                    assert_eq!(read.map(|leader| leader.value), Some(value.clone()));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    leading.fetch_sub(1, Ordering::SeqCst);
                    leadership.resign().await.unwrap();
                }
            }));
        }
    }
    within(Duration::from_secs(40), "every term of every task", async {
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await;
    let tokens = tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), HANDLES * TASKS_PER_HANDLE * TERMS);
    assert!(
        tokens.windows(2).all(|pair| pair[0] < pair[1]),
        "tokens in the order of the terms: {tokens:?}"
    );
    for kv in handles {
        kv.close().await.unwrap();
    }
}

/// Two tasks of one handle campaigning in one election: the second waits for the first.
pub async fn one_leader_at_a_time_among_tasks_of_one_handle(store: TestStore) {
    let kv: Arc<dyn Kvi> = Arc::from(store.open().await);
    let first = lead(kv.as_ref(), NAME, "first", "the first task").await;
    assert_led(kv.as_ref(), NAME, "a second task of the same handle").await;
    let second = queue(&kv, NAME, "second");
    tokio::time::sleep(PROBE).await;
    assert!(!second.is_finished(), "a second task of one handle led too");
    leader_key(kv.as_ref(), NAME, "first").await;
    first.resign().await.unwrap();
    let (second, _) = within(MARGIN, "the second task after the first resigned", second)
        .await
        .unwrap()
        .unwrap();
    assert!(second.is_leader());
    leader_key(kv.as_ref(), NAME, "second").await;
    drop(second);
    kv.close().await.unwrap();
}

/// Candidates lead in the order they campaigned; each waiting candidate's key holds its
/// value from the moment it campaigns.
pub async fn candidates_lead_first_come_first_served(store: TestStore) {
    let holder = store.open().await;
    let observer = store.open().await;
    let leadership = lead(holder.as_ref(), NAME, "holder", "holder").await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut candidates = Vec::new();
    for id in 1..=3 {
        let kv = store.open().await;
        let order = Arc::clone(&order);
        candidates.push(tokio::spawn(async move {
            let what = format!("candidate {id}");
            let leadership = within(Duration::from_secs(30), &what, kv.campaign(NAME, &what))
                .await
                .unwrap();
            order.lock().unwrap().push(id);
            tokio::time::sleep(Duration::from_millis(50)).await;
            leadership.resign().await.unwrap();
            kv.close().await.unwrap();
        }));
        // Lets this candidate queue before the next one campaigns.
        wait_for_candidates(observer.as_ref(), NAME, id + 1, "queueing").await;
    }
    let mut values: Vec<String> = candidate_keys(observer.as_ref(), NAME)
        .await
        .into_iter()
        .map(|(_, value)| value)
        .collect();
    values.sort();
    assert_eq!(
        values,
        ["candidate 1", "candidate 2", "candidate 3", "holder"],
        "the candidates' keys hold their values"
    );
    assert!(order.lock().unwrap().is_empty(), "a candidate led too");
    leader_key(observer.as_ref(), NAME, "holder").await;
    leadership.resign().await.unwrap();
    within(Duration::from_secs(30), "the three terms", async {
        for candidate in candidates {
            candidate.await.unwrap();
        }
    })
    .await;
    assert_eq!(*order.lock().unwrap(), [1, 2, 3]);
    assert_eq!(leader_of(observer.as_ref(), NAME).await, None);
    holder.close().await.unwrap();
    observer.close().await.unwrap();
}

/// `observe` yields the current leader (or `None`) first, then every change: a new leader,
/// a proclaimed value, `None` when the last candidate left; never the same twice in a row,
/// and nothing for waiting candidates or keys that are not candidates. `leader()` agrees.
pub async fn observe_yields_the_current_leader_then_every_change(store: TestStore) {
    let a = store.open().await;
    let b: Arc<dyn Kvi> = Arc::from(store.open().await);
    let observer = store.open().await;
    let mut from_start = observer.observe(NAME).await.unwrap();
    assert_eq!(next_leader(&mut from_start, "the first item").await, None);
    let mut leadership = lead(a.as_ref(), NAME, "a1", "a").await;
    let a_key = leader_key(observer.as_ref(), NAME, "a1").await;
    let a1 = Some((a_key.clone(), "a1".to_owned()));
    assert_eq!(next_leader(&mut from_start, "a leads").await, a1);
    let waiting = queue(&b, NAME, "b1");
    wait_for_candidates(observer.as_ref(), NAME, 2, "a leads, b waits").await;
    observer
        .store(&format!("{NAME}/config"), "not a candidate")
        .await
        .unwrap();
    observer
        .store(&format!("{NAME}/7/ff"), "another election")
        .await
        .unwrap();
    assert_quiet(&mut from_start, "a waiting candidate and plain keys").await;
    let mut later = observer.observe(NAME).await.unwrap();
    assert_eq!(
        next_leader(&mut later, "a later observer's first").await,
        a1
    );
    leadership.proclaim("a2").await.unwrap();
    let a2 = Some((a_key.clone(), "a2".to_owned()));
    for stream in [&mut from_start, &mut later] {
        assert_eq!(next_leader(stream, "a proclaimed a2").await, a2);
    }
    assert_eq!(leader_of(observer.as_ref(), NAME).await, a2);
    leadership.proclaim("a2").await.unwrap();
    assert_quiet(&mut from_start, "the same value proclaimed again").await;
    leadership.resign().await.unwrap();
    let (b_leads, _) = within(MARGIN, "b after a resigned", waiting)
        .await
        .unwrap()
        .unwrap();
    let b_key = leader_key(observer.as_ref(), NAME, "b1").await;
    let b1 = Some((b_key, "b1".to_owned()));
    for stream in [&mut from_start, &mut later] {
        assert_eq!(next_leader(stream, "b leads").await, b1);
    }
    b_leads.resign().await.unwrap();
    for stream in [&mut from_start, &mut later] {
        assert_eq!(next_leader(stream, "the last candidate left").await, None);
    }
    assert_eq!(leader_of(observer.as_ref(), NAME).await, None);
    let mut empty = observer.observe(NAME).await.unwrap();
    assert_eq!(next_leader(&mut empty, "an observer of nobody").await, None);
    let again = lead(a.as_ref(), NAME, "a3", "a again").await;
    let a3 = leader_of(observer.as_ref(), NAME).await;
    assert_eq!(a3.as_ref().map(|(_, value)| value.as_str()), Some("a3"));
    for stream in [&mut from_start, &mut later, &mut empty] {
        assert_eq!(next_leader(stream, "a leads again").await, a3);
    }
    drop(again);
    for stream in [&mut from_start, &mut later, &mut empty] {
        assert_eq!(next_leader(stream, "a's leadership dropped").await, None);
        assert_quiet(stream, "after the last change").await;
    }
    a.close().await.unwrap();
    b.close().await.unwrap();
    observer.close().await.unwrap();
}

/// `leader()` names the leader's key `<name>/<id>` without the handle's prefix, a key the
/// handle reads with the leader's value; `None` when nobody campaigns.
pub async fn leader_names_the_key_without_the_prefix(store: TestStore) {
    let kv = store.open().await;
    let other = store.open().await;
    assert_eq!(leader_of(other.as_ref(), NAME).await, None);
    let leadership = lead(kv.as_ref(), NAME, "10.0.0.7:8080", "kv").await;
    let key = leader_key(other.as_ref(), NAME, "10.0.0.7:8080").await;
    let id = key
        .strip_prefix(&format!("{NAME}/"))
        .unwrap_or_else(|| panic!("the leader's key {key:?} is not under {NAME}/"));
    assert!(
        !id.is_empty() && !id.contains('/'),
        "the leader's key {key:?} is not <name>/<id>"
    );
    assert_eq!(
        other.get(&key).await.unwrap().as_deref(),
        Some("10.0.0.7:8080"),
        "the leader's key read through the handle"
    );
    leadership.resign().await.unwrap();
    assert_eq!(leader_of(other.as_ref(), NAME).await, None);
    assert_eq!(other.get(&key).await.unwrap(), None, "resign left the key");
    kv.close().await.unwrap();
    other.close().await.unwrap();
}

/// A timed campaign gives up after its timeout with a `LockTimeout` naming the election and
/// the timeout, and leaves no trace: no key under `<name>/`, no change for observers, and a
/// later candidate leads as soon as the leader resigns.
pub async fn timed_campaign_gives_up_without_a_trace(store: TestStore) {
    let holder = store.open().await;
    let quitter = store.open().await;
    let later: Arc<dyn Kvi> = Arc::from(store.open().await);
    let observer = store.open().await;
    let leadership = lead(holder.as_ref(), NAME, "holder", "holder").await;
    let keys = candidate_keys(observer.as_ref(), NAME).await;
    let mut stream = observer.observe(NAME).await.unwrap();
    next_leader(&mut stream, "the holder").await;
    let timeout = Duration::from_millis(700);
    let started = Instant::now();
    let attempt = quitter.campaign_with(NAME, "quitter", LockOptions::new().timeout(timeout));
    let attempt = within(timeout + MARGIN, "the timed campaign", attempt).await;
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
    eventually(PROMPTLY, "the quitter's key to go", || async {
        candidate_keys(observer.as_ref(), NAME).await == keys
    })
    .await;
    assert_quiet(&mut stream, "a candidate that gave up").await;
    let waiting = queue(&later, NAME, "later");
    wait_for_candidates(observer.as_ref(), NAME, 2, "the holder leads, later waits").await;
    let got = assert_handed_over_at_once(waiting, "resign", async {
        leadership.resign().await.unwrap();
    })
    .await;
    assert_eq!(
        next_leader(&mut stream, "the later candidate").await,
        Some((
            leader_key(observer.as_ref(), NAME, "later").await,
            "later".to_owned()
        ))
    );
    assert_led(quitter.as_ref(), NAME, "the quitter while later leads").await;
    got.resign().await.unwrap();
    let again = lead(quitter.as_ref(), NAME, "quitter", "the quitter once free").await;
    drop(again);
    for kv in [holder, quitter, observer] {
        kv.close().await.unwrap();
    }
    later.close().await.unwrap();
}

/// `max_hold` ends a term: `lost()` says `MaxHold`, the leadership says it no longer leads,
/// and the next candidate leads no earlier than `max_hold` after the first did.
pub async fn max_hold_ends_a_term(store: TestStore) {
    let kv = store.open().await;
    let next: Arc<dyn Kvi> = Arc::from(store.open().await);
    let options = LockOptions::new().max_hold(MAX_HOLD);
    let leadership = within(
        PROMPTLY,
        "a campaign with max_hold",
        kv.campaign_with(NAME, "bounded", options),
    )
    .await
    .unwrap();
    let since = Instant::now();
    assert!(leadership.is_leader());
    let key = leader_key(next.as_ref(), NAME, "bounded").await;
    let waiting = queue(&next, NAME, "next");
    let reason = lost_reason(&leadership, MAX_HOLD + PROMPTLY, "the bounded term").await;
    assert_eq!(reason, LostReason::MaxHold);
    let (got, led) = within(PROMPTLY, "the next candidate after max_hold", waiting)
        .await
        .unwrap()
        .unwrap_or_else(|err| panic!("the next candidate after max_hold: {err}"));
    assert!(
        led - since >= MAX_HOLD - Duration::from_millis(100),
        "the next candidate led {:?} after the first, before max_hold {MAX_HOLD:?}",
        led - since
    );
    assert!(got.fencing_token() > leadership.fencing_token());
    leader_key(kv.as_ref(), NAME, "next").await;
    assert_no_longer_leads(kv.as_ref(), leadership, &key, "after max_hold").await;
    assert!(
        got.is_leader(),
        "the lost leadership's resign ended the next term"
    );
    drop(got);
    kv.close().await.unwrap();
    next.close().await.unwrap();
}

/// How a leader gives up its term.
#[derive(Debug, Clone, Copy)]
enum StepDown {
    Resign,
    Drop,
    Close,
}

/// Checks that `how` hands a leadership over to a waiting candidate at once.
async fn assert_handed_over(store: &TestStore, how: StepDown) {
    let leader = store.open().await;
    let waiter: Arc<dyn Kvi> = Arc::from(store.open().await);
    let leadership = lead(leader.as_ref(), NAME, "leader", "the leader").await;
    let lost = leadership.lost();
    let waiting = queue(&waiter, NAME, "successor");
    wait_for_candidates(waiter.as_ref(), NAME, 2, "one leads, one waits").await;
    let got = assert_handed_over_at_once(waiting, &format!("{how:?}"), async {
        match how {
            StepDown::Resign => {
                leadership.resign().await.unwrap();
                // Stepped down when `resign` returns, not some time after.
                let now = leader.leader(NAME).await.unwrap();
                assert!(
                    now.as_ref().is_none_or(|kv| kv.value != "leader"),
                    "the old leader still leads after resign() returned: {now:?}"
                );
            }
            StepDown::Drop => drop(leadership),
            StepDown::Close => {
                leader.close().await.unwrap();
                assert!(!leadership.is_leader(), "a leader after close()");
                let reason = within(PROMPTLY, "lost() after close()", lost).await;
                assert_eq!(reason, LostReason::Closed);
                drop(leadership);
            }
        }
    })
    .await;
    assert!(got.is_leader());
    leader_key(waiter.as_ref(), NAME, "successor").await;
    match how {
        StepDown::Close => {
            let attempt = leader.campaign(NAME, "closed").await;
            assert!(matches!(attempt, Err(Error::Closed)), "{attempt:?}");
        }
        StepDown::Resign | StepDown::Drop => {
            assert_led(leader.as_ref(), NAME, "the old leader").await;
            leader.close().await.unwrap();
        }
    }
    got.resign().await.unwrap();
    waiter.close().await.unwrap();
}

/// `resign()` hands the leadership to the next candidate at once, and has stepped down by the
/// time it returns.
pub async fn resign_hands_over_at_once(store: TestStore) {
    assert_handed_over(&store, StepDown::Resign).await;
}

/// Dropping the `Leadership` resigns: the next candidate leads at once.
pub async fn dropping_the_leadership_hands_over_at_once(store: TestStore) {
    assert_handed_over(&store, StepDown::Drop).await;
}

/// `close()` of the leader's handle resigns: the next candidate leads at once, and the
/// leadership's `lost()` says `Closed`.
pub async fn close_hands_over_at_once(store: TestStore) {
    assert_handed_over(&store, StepDown::Close).await;
}

/// A crashed leader (a handle dropped without closing) is replaced within the backend's
/// bound: at once in memory, within `lease_ttl` on etcd.
pub async fn a_crashed_leaders_successor_leads_within_the_bound(store: TestStore) {
    let lease_ttl = Duration::from_secs(2);
    let leader = store.open_with("lease_ttl=2s").await.unwrap();
    let successor = store.open().await;
    let leadership = lead(leader.as_ref(), NAME, "crashing", "the leader").await;
    assert_led(successor.as_ref(), NAME, "the successor before the crash").await;
    let crashed = Instant::now();
    drop(leader);
    assert!(!leadership.is_leader(), "a leader whose handle is gone");
    let bound = store.drop_release_bound(lease_ttl) + MARGIN;
    let attempt = successor.campaign_with(NAME, "successor", LockOptions::new().timeout(bound));
    let got = within(bound + MARGIN, "the successor of a crashed leader", attempt)
        .await
        .unwrap_or_else(|err| panic!("the crashed leader was not replaced: {err}"));
    let took = crashed.elapsed();
    assert!(took < bound, "the successor led {took:?} after the crash");
    assert!(got.fencing_token() > leadership.fencing_token());
    leader_key(successor.as_ref(), NAME, "successor").await;
    drop(leadership);
    got.resign().await.unwrap();
    successor.close().await.unwrap();
}

/// `proclaim` changes the value in place (same key, same token, `leader()` and observers
/// see it); once the leadership is lost it is `NotLeader` and writes nothing.
pub async fn proclaim_changes_the_value_in_place(store: TestStore) {
    let kv = store.open().await;
    let other = store.open().await;
    let mut leadership = lead(kv.as_ref(), NAME, "v1", "the leader").await;
    let token = leadership.fencing_token();
    let key = leader_key(other.as_ref(), NAME, "v1").await;
    let mut stream = other.observe(NAME).await.unwrap();
    next_leader(&mut stream, "the leader").await;
    within(PROMPTLY, "proclaim v2", leadership.proclaim("v2"))
        .await
        .unwrap();
    assert_eq!(leadership.value(), "v2");
    assert_eq!(leadership.fencing_token(), token);
    assert!(leadership.is_leader());
    assert_eq!(
        next_leader(&mut stream, "the proclaimed value").await,
        Some((key.clone(), "v2".to_owned()))
    );
    assert_eq!(leader_key(other.as_ref(), NAME, "v2").await, key);
    assert_eq!(other.get(&key).await.unwrap().as_deref(), Some("v2"));
    assert_eq!(candidate_keys(other.as_ref(), NAME).await.len(), 1);
    let next = lead_after_a_deletion(other.as_ref(), &key, &leadership).await;
    assert_no_longer_leads(kv.as_ref(), leadership, &key, "after the key was deleted").await;
    assert_eq!(
        other.get(&key).await.unwrap(),
        None,
        "proclaim re-created the key"
    );
    drop(next);
    kv.close().await.unwrap();
    other.close().await.unwrap();
}

/// Deletes the leader's `key` from `kv` (another handle), checks `lost()` says
/// `KeyDeleted`, and has `kv` lead next; hands back that leadership.
async fn lead_after_a_deletion(kv: &dyn Kvi, key: &str, leadership: &Leadership) -> Leadership {
    let lost = leadership.lost();
    kv.delete(key).await.unwrap();
    let reason = within(PROMPTLY, "lost() after the key was deleted", lost).await;
    assert_eq!(reason, LostReason::KeyDeleted);
    assert!(!leadership.is_leader(), "a leader whose key was deleted");
    let next = lead(kv, leadership.name(), "after the deletion", "the deleter").await;
    assert!(
        next.fencing_token() > leadership.fencing_token(),
        "{next:?} after {leadership:?}"
    );
    next
}

/// The fencing token is positive and grows strictly from each leader to the next, whatever
/// ended the term before: resign, drop, a deleted key, `max_hold`, `close`; on other handles
/// and on the same one.
pub async fn fencing_token_strictly_increases_from_leader_to_leader(store: TestStore) {
    let a = store.open().await;
    let b = store.open().await;
    let mut tokens = Vec::new();
    let first = lead(a.as_ref(), NAME, "a", "a").await;
    tokens.push(first.fencing_token());
    first.resign().await.unwrap();
    let second = lead(b.as_ref(), NAME, "b", "b").await;
    tokens.push(second.fencing_token());
    drop(second);
    let third = lead(b.as_ref(), NAME, "b", "b again").await;
    tokens.push(third.fencing_token());
    let key = leader_key(a.as_ref(), NAME, "b").await;
    let fourth = lead_after_a_deletion(a.as_ref(), &key, &third).await;
    tokens.push(fourth.fencing_token());
    drop((third, fourth));
    let options = LockOptions::new().max_hold(Duration::from_millis(500));
    let bounded = within(PROMPTLY, "max_hold", b.campaign_with(NAME, "b", options))
        .await
        .unwrap();
    tokens.push(bounded.fencing_token());
    let reason = lost_reason(&bounded, PROMPTLY, "the bounded term").await;
    assert_eq!(reason, LostReason::MaxHold);
    let fifth = lead(a.as_ref(), NAME, "a", "a after max_hold").await;
    tokens.push(fifth.fencing_token());
    drop((bounded, fifth));
    let closing = store.open().await;
    let sixth = lead(closing.as_ref(), NAME, "closing", "a handle to close").await;
    tokens.push(sixth.fencing_token());
    closing.close().await.unwrap();
    let seventh = lead(b.as_ref(), NAME, "b", "b after the close").await;
    tokens.push(seventh.fencing_token());
    drop((sixth, seventh));
    assert!(
        tokens.windows(2).all(|pair| pair[0] < pair[1]) && tokens[0] > 0,
        "tokens of successive leaders: {tokens:?}"
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// `lost()` resolves with `MaxHold` when the term ran out; `is_leader()` is false after.
pub async fn lost_resolves_max_hold(store: TestStore) {
    let kv = store.open().await;
    let options = LockOptions::new().max_hold(Duration::from_millis(700));
    let leadership = within(PROMPTLY, "max_hold", kv.campaign_with(NAME, "v", options))
        .await
        .unwrap();
    let key = leader_key(kv.as_ref(), NAME, "v").await;
    let reason = lost_reason(&leadership, PROMPTLY, "the bounded term").await;
    assert_eq!(reason, LostReason::MaxHold);
    assert_eq!(
        lost_reason(&leadership, PROMPTLY, "a later lost()").await,
        LostReason::MaxHold
    );
    // The holder may learn of the loss a moment before its key goes: the safe order.
    eventually(PROMPTLY, "max_hold to delete the key", || async {
        leader_of(kv.as_ref(), NAME).await.is_none()
    })
    .await;
    assert_no_longer_leads(kv.as_ref(), leadership, &key, "after max_hold").await;
    kv.close().await.unwrap();
}

/// `lost()` resolves with `Closed` when the leader's handle is closed; `is_leader()` is
/// false right after `close()` returns and `proclaim` is `NotLeader`.
pub async fn lost_resolves_closed_on_close(store: TestStore) {
    let kv = store.open().await;
    let other = store.open().await;
    let mut leadership = lead(kv.as_ref(), NAME, "v", "the leader").await;
    let lost = leadership.lost();
    if let Ok(reason) = tokio::time::timeout(PROBE, leadership.lost()).await {
        panic!("lost() resolved with {reason:?} while leading");
    }
    kv.close().await.unwrap();
    assert!(!leadership.is_leader(), "a leader after close()");
    assert_eq!(within(PROMPTLY, "lost()", lost).await, LostReason::Closed);
    match leadership.proclaim("after close").await {
        Err(Error::NotLeader { election, .. }) => assert_eq!(election, NAME),
        other => panic!("proclaim after close() should be NotLeader, got {other:?}"),
    }
    assert_eq!(leader_of(other.as_ref(), NAME).await, None);
    leadership.resign().await.unwrap();
    other.close().await.unwrap();
}

/// `lost()` resolves with `KeyDeleted` when another handle deletes the leader's key; the
/// next candidate leads at once and the old leadership says it no longer leads, and leaves
/// alone the same key put again by someone else.
pub async fn lost_resolves_key_deleted_when_another_handle_deletes_the_key(store: TestStore) {
    let kv = store.open().await;
    let waiter: Arc<dyn Kvi> = Arc::from(store.open().await);
    let deleter = store.open().await;
    let leadership = lead(kv.as_ref(), NAME, "v", "the leader").await;
    let key = leader_key(deleter.as_ref(), NAME, "v").await;
    let lost = leadership.lost();
    let waiting = queue(&waiter, NAME, "next");
    wait_for_candidates(deleter.as_ref(), NAME, 2, "one leads, one waits").await;
    let got = assert_handed_over_at_once(waiting, "deleting the leader's key", async {
        deleter.delete(&key).await.unwrap();
    })
    .await;
    assert_eq!(
        within(PROMPTLY, "lost() after the delete", lost).await,
        LostReason::KeyDeleted
    );
    assert!(got.fencing_token() > leadership.fencing_token());
    // The key put again by someone else is not the lost leader's: its proclaim and resign
    // must leave it alone.
    deleter.store(&key, "someone else's").await.unwrap();
    assert_no_longer_leads(kv.as_ref(), leadership, &key, "after the key was deleted").await;
    assert_eq!(
        deleter.get(&key).await.unwrap().as_deref(),
        Some("someone else's"),
        "the lost leader's resign deleted a key that is no longer its own"
    );
    assert!(
        got.is_leader(),
        "the lost leadership's resign ended the next term"
    );
    leader_key(deleter.as_ref(), NAME, "next").await;
    deleter.delete(&key).await.unwrap();
    drop(got);
    for kv in [kv, deleter] {
        kv.close().await.unwrap();
    }
    waiter.close().await.unwrap();
}

/// An election and a named lock of the same name are one queue: a guard blocks a
/// candidate and a leader blocks a guard.
pub async fn an_election_and_a_lock_of_one_name_are_one_queue(store: TestStore) {
    let a = store.open().await;
    let b = store.open().await;
    let leadership = lead(a.as_ref(), NAME, "leader", "a").await;
    assert_taken(b.as_ref(), NAME, "b's lock while a leads").await;
    leadership.resign().await.unwrap();
    let guard = assert_free(b.as_ref(), NAME, "b's lock once a resigned").await;
    assert_led(a.as_ref(), NAME, "a while b's guard holds").await;
    assert_eq!(
        leader_of(a.as_ref(), NAME).await.map(|(_, value)| value),
        Some(String::new()),
        "the guard's key leads with the empty value"
    );
    drop(guard);
    drop(lead(a.as_ref(), NAME, "leader", "a once the guard is gone").await);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// One handle may lead several elections at once, each with its own term.
pub async fn one_handle_leads_several_elections(store: TestStore) {
    let kv = store.open().await;
    let other = store.open().await;
    let first = lead(kv.as_ref(), "first", "1", "kv").await;
    let second = lead(kv.as_ref(), "second", "2", "kv").await;
    let third = lead(other.as_ref(), "third", "3", "other").await;
    assert_led(other.as_ref(), "first", "other").await;
    assert_led(other.as_ref(), "second", "other").await;
    first.resign().await.unwrap();
    assert!(second.is_leader(), "resigning one election ended another");
    drop(lead(other.as_ref(), "first", "1'", "other once first is free").await);
    assert_eq!(
        leader_of(other.as_ref(), "second")
            .await
            .map(|(_, value)| value),
        Some("2".to_owned())
    );
    drop((second, third));
    kv.close().await.unwrap();
    other.close().await.unwrap();
}

/// An empty election name is `InvalidKey` for every election call.
pub async fn empty_name_is_invalid(store: TestStore) {
    let kv = store.open().await;
    let attempts = [
        kv.campaign("", "v").await.map(drop),
        kv.campaign_with("", "v", LockOptions::new().timeout(PROBE))
            .await
            .map(drop),
        kv.leader("").await.map(drop),
        kv.observe("").await.map(drop),
    ];
    for attempt in attempts {
        match attempt {
            Err(Error::InvalidKey { argument, .. }) => assert_eq!(argument, "name"),
            other => panic!("expected InvalidKey, got {other:?}"),
        }
    }
    kv.close().await.unwrap();
}

/// After `close()`, every election call is `Closed`, an `observe` stream ends, and a
/// campaign that was waiting gives up with `Closed` and leaves no candidate key.
pub async fn election_calls_after_close_are_closed(store: TestStore) {
    let kv: Arc<dyn Kvi> = Arc::from(store.open().await);
    let leader = store.open().await;
    let leadership = lead(leader.as_ref(), NAME, "leader", "another handle").await;
    let mut stream = kv.observe(NAME).await.unwrap();
    next_leader(&mut stream, "the first item").await;
    let waiting = queue(&kv, NAME, "waiting");
    wait_for_candidates(leader.as_ref(), NAME, 2, "one leads, one waits").await;
    kv.close().await.unwrap();
    match within(PROMPTLY, "the waiting campaign after close()", waiting)
        .await
        .unwrap()
    {
        Err(Error::Closed) => {}
        other => panic!("a campaign waiting through close() should be Closed, got {other:?}"),
    }
    match within(PROMPTLY, "observe after close()", stream.next()).await {
        None | Some(Err(Error::Closed)) => {}
        Some(other) => panic!("observe after close() should end, got {other:?}"),
    }
    wait_for_candidates(leader.as_ref(), NAME, 1, "close() took the waiter's key").await;
    let calls = [
        kv.campaign(NAME, "v").await.map(drop),
        kv.campaign_with(NAME, "v", LockOptions::new().timeout(PROBE))
            .await
            .map(drop),
        kv.leader(NAME).await.map(drop),
        kv.observe(NAME).await.map(drop),
    ];
    for call in calls {
        assert!(
            matches!(call, Err(Error::Closed)),
            "an election call after close(): {call:?}"
        );
    }
    assert!(
        leadership.is_leader(),
        "another handle's close() ended a term"
    );
    drop(leadership);
    leader.close().await.unwrap();
}

/// Plain keys under `<name>/` written before any candidate (more than one page of them on
/// etcd) are not candidates: `leader()` and `observe` name the real leader, and a
/// candidate leads at once beside them.
pub async fn plain_keys_under_the_name_are_not_candidates(store: TestStore) {
    let kv = store.open().await;
    let writer = store.open().await;
    for index in 0..70 {
        writer
            .store(&format!("{NAME}/config-{index:02}"), "plain")
            .await
            .unwrap();
    }
    writer
        .store(&format!("{NAME}/7/ff"), "another election")
        .await
        .unwrap();
    assert_eq!(leader_of(kv.as_ref(), NAME).await, None);
    let mut stream = kv.observe(NAME).await.unwrap();
    assert_eq!(next_leader(&mut stream, "nobody yet").await, None);
    let leadership = lead(kv.as_ref(), NAME, "real", "the candidate").await;
    let key = leader_key(writer.as_ref(), NAME, "real").await;
    assert_eq!(
        next_leader(&mut stream, "the candidate").await,
        Some((key.clone(), "real".to_owned()))
    );
    let mut later = writer.observe(NAME).await.unwrap();
    assert_eq!(
        next_leader(&mut later, "a later observer").await,
        Some((key, "real".to_owned()))
    );
    leadership.resign().await.unwrap();
    assert_eq!(next_leader(&mut stream, "the candidate left").await, None);
    kv.close().await.unwrap();
    writer.close().await.unwrap();
}
