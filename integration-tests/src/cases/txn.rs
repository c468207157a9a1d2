//! Multi-operation transactions (`txn`), guarded writes (`Compare::held`,
//! `Compare::leading`) and read-modify-write (`update`).

use std::sync::Arc;
use std::time::Duration;

use hmetcd_core::{
    Compare, CompareOp, Error, Kvi, LockOptions, LostReason, Op, Txn, TxnOutcome, MAX_TXN_OPS,
};

use super::data::kv_of;
use super::named_locks::take;
use super::{all_keys, within, PROMPTLY};
use crate::TestStore;

/// A `max_hold` short enough for a case.
const MAX_HOLD: Duration = Duration::from_millis(700);

async fn run(kv: &dyn Kvi, txn: Txn) -> TxnOutcome {
    let what = format!("{txn:?}");
    kv.txn(txn)
        .await
        .unwrap_or_else(|err| panic!("txn {what}: {err}"))
}

/// Whether `compare` holds, by a transaction that writes nothing.
async fn holds(kv: &dyn Kvi, compare: Compare) -> bool {
    run(kv, Txn::new().when(compare).then(Op::get("probe")))
        .await
        .succeeded
}

fn assert_invalid_argument(what: &str, result: hmetcd_core::Result<TxnOutcome>) {
    match result {
        Err(Error::InvalidArgument {
            what: about,
            reason,
        }) => {
            assert!(!reason.is_empty(), "{what}: no reason given");
            assert_eq!(about, "transaction", "{what}");
        }
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    }
}

/// An empty transaction, one with 129 operations in a branch or 129 compares, and one that
/// writes a key twice in a branch are `InvalidArgument` and write nothing; 128 operations
/// are fine; an empty key is `InvalidKey`.
pub async fn malformed_transactions_are_refused_and_write_nothing(store: TestStore) {
    let kv = store.open().await;
    let mut long = Txn::new();
    for i in 0..=MAX_TXN_OPS {
        long = long.then(Op::put(format!("long/{i:03}"), "v"));
    }
    assert_invalid_argument("129 puts", kv.txn(long).await);
    let mut long_else = Txn::new().when(Compare::exists("nothing"));
    for i in 0..=MAX_TXN_OPS {
        long_else = long_else.otherwise(Op::put(format!("else/{i:03}"), "v"));
    }
    assert_invalid_argument("129 puts in otherwise", kv.txn(long_else).await);
    let mut compares = Txn::new().then(Op::put("c", "v"));
    for i in 0..=MAX_TXN_OPS {
        compares = compares.when(Compare::missing(format!("c/{i}")));
    }
    assert_invalid_argument("129 compares", kv.txn(compares).await);
    assert_invalid_argument("empty", kv.txn(Txn::new()).await);
    assert_invalid_argument(
        "compares only",
        kv.txn(Txn::new().when(Compare::missing("a"))).await,
    );
    let twice = Txn::new()
        .then(Op::put("dup", "1"))
        .then(Op::put("other", "x"))
        .then(Op::put("dup", "2"));
    assert_invalid_argument("a key put twice", kv.txn(twice).await);
    let temp_twice = Txn::new()
        .then(Op::put("dup", "1"))
        .then(Op::put_temp("dup", "2"));
    assert_invalid_argument("put and put_temp of one key", kv.txn(temp_twice).await);
    let covered = Txn::new()
        .otherwise(Op::delete_prefix("dup"))
        .otherwise(Op::put("dup/x", "1"));
    assert_invalid_argument("a put under a deleted prefix", kv.txn(covered).await);
    assert!(matches!(
        kv.txn(Txn::new().then(Op::put("", "v"))).await,
        Err(Error::InvalidKey { .. })
    ));
    assert!(matches!(
        kv.txn(Txn::new().then(Op::delete_prefix(""))).await,
        Err(Error::InvalidKey { .. })
    ));
    assert_eq!(
        all_keys(kv.as_ref()).await,
        Vec::<String>::new(),
        "nothing written"
    );

    let mut full = Txn::new();
    for i in 0..MAX_TXN_OPS {
        full = full.then(Op::put(format!("full/{i:03}"), "v"));
    }
    let outcome = run(kv.as_ref(), full).await;
    assert!(outcome.succeeded);
    let written = kv.get_prefix("full/").await.unwrap();
    assert_eq!(written.len(), MAX_TXN_OPS);
    assert!(
        written.iter().all(|kv| kv.mod_revision == outcome.revision),
        "128 puts share the txn's revision {}",
        outcome.revision
    );
    // The same key in both branches is fine: only one runs.
    let both = Txn::new()
        .when(Compare::missing("b"))
        .then(Op::put("b", "then"))
        .otherwise(Op::put("b", "else"));
    assert!(run(kv.as_ref(), both.clone()).await.succeeded);
    assert!(!run(kv.as_ref(), both).await.succeeded);
    assert_eq!(kv.get("b").await.unwrap().as_deref(), Some("else"));
    kv.close().await.unwrap();
}

/// Compares decide as etcd does: value compares byte-wise and false on a missing key;
/// `exists`/`missing`; mod revision, create revision and version (0 when missing); every
/// compare must hold.
pub async fn compares_decide_like_etcd(store: TestStore) {
    let kv = store.open().await;
    kv.store("k", "b").await.unwrap();
    kv.store("k", "b").await.unwrap();
    let k = kv_of(kv.as_ref(), "k").await;
    let table = [
        (Compare::value("k", CompareOp::Equal, "b"), true),
        (Compare::value("k", CompareOp::NotEqual, "b"), false),
        (Compare::value("k", CompareOp::Less, "c"), true),
        (Compare::value("k", CompareOp::Less, "b"), false),
        (Compare::value("k", CompareOp::Greater, "a"), true),
        (Compare::value("k", CompareOp::Greater, "b\0"), false),
        (Compare::exists("k"), true),
        (Compare::missing("k"), false),
        (Compare::version("k", CompareOp::Equal, 2), true),
        (Compare::version("k", CompareOp::Greater, 2), false),
        (
            Compare::mod_revision("k", CompareOp::Equal, k.mod_revision),
            true,
        ),
        (
            Compare::mod_revision("k", CompareOp::Less, k.mod_revision),
            false,
        ),
        (
            Compare::mod_revision("k", CompareOp::Greater, k.create_revision),
            true,
        ),
        (
            Compare::create_revision("k", CompareOp::Equal, k.create_revision),
            true,
        ),
        (
            Compare::create_revision("k", CompareOp::NotEqual, k.create_revision),
            false,
        ),
        // A missing key: every value compare is false, its numbers are 0.
        (Compare::value("none", CompareOp::Equal, ""), false),
        (Compare::value("none", CompareOp::NotEqual, "x"), false),
        (Compare::value("none", CompareOp::Less, "z"), false),
        (Compare::value("none", CompareOp::Greater, ""), false),
        (Compare::exists("none"), false),
        (Compare::missing("none"), true),
        (Compare::version("none", CompareOp::Equal, 0), true),
        (Compare::mod_revision("none", CompareOp::Equal, 0), true),
        (Compare::mod_revision("none", CompareOp::Less, 1), true),
        (
            Compare::create_revision("none", CompareOp::Greater, 0),
            false,
        ),
    ];
    for (compare, expected) in &table {
        assert_eq!(
            holds(kv.as_ref(), compare.clone()).await,
            *expected,
            "{compare:?}"
        );
    }
    kv.store("empty", "").await.unwrap();
    assert!(holds(kv.as_ref(), Compare::value("empty", CompareOp::Equal, "")).await);
    let all_hold = table
        .iter()
        .filter(|(_, holds)| *holds)
        .fold(Txn::new(), |txn, (c, _)| txn.when(c.clone()))
        .then(Op::put("all", "held"));
    assert!(run(kv.as_ref(), all_hold).await.succeeded);
    let one_fails = table
        .iter()
        .fold(Txn::new(), |txn, (c, _)| txn.when(c.clone()))
        .then(Op::put("all", "then"))
        .otherwise(Op::put("all", "else"));
    assert!(!run(kv.as_ref(), one_fails).await.succeeded);
    assert_eq!(kv.get("all").await.unwrap().as_deref(), Some("else"));
    kv.close().await.unwrap();
}

/// The branch's operations run in order: a get sees the puts, deletes and delete_prefix
/// before it; `gets` holds one entry per get of the branch that ran, with metadata; the
/// writes share one revision, the outcome's.
pub async fn ops_run_in_order_and_gets_see_earlier_writes(store: TestStore) {
    let kv = store.open().await;
    kv.store("c", "old").await.unwrap();
    kv.store("x/1", "1").await.unwrap();
    kv.store("x/2", "2").await.unwrap();
    kv.store("y", "y").await.unwrap();
    let txn = Txn::new()
        .when(Compare::exists("c"))
        .then(Op::get("a"))
        .then(Op::put("a", "1"))
        .then(Op::get("a"))
        .then(Op::get("c"))
        .then(Op::delete("c"))
        .then(Op::get("c"))
        .then(Op::put_temp("t", "tv"))
        .then(Op::get("t"))
        .then(Op::delete_prefix("x/"))
        .then(Op::get("x/1"))
        .then(Op::get("y"))
        .otherwise(Op::get("nothing"));
    let outcome = run(kv.as_ref(), txn).await;
    assert!(outcome.succeeded);
    let gets: Vec<Option<(&str, &str)>> = outcome
        .gets
        .iter()
        .map(|got| got.as_ref().map(|kv| kv.pair()))
        .collect();
    assert_eq!(
        gets,
        [
            None,
            Some(("a", "1")),
            Some(("c", "old")),
            None,
            Some(("t", "tv")),
            None,
            Some(("y", "y")),
        ]
    );
    let a = outcome.gets[1].clone().unwrap();
    assert_eq!((a.version, a.lease), (1, 0));
    assert_eq!(a.create_revision, outcome.revision);
    assert_eq!(a.mod_revision, outcome.revision);
    let t = outcome.gets[4].clone().unwrap();
    assert_ne!(t.lease, 0, "put_temp binds the handle's lease");
    assert_eq!(t.mod_revision, outcome.revision);
    assert_eq!(outcome.gets[6], Some(kv_of(kv.as_ref(), "y").await));
    assert_eq!(
        kv_of(kv.as_ref(), "a").await,
        a,
        "what the get saw is stored"
    );
    assert_eq!(kv_of(kv.as_ref(), "t").await, t);
    assert_eq!(all_keys(kv.as_ref()).await, ["a", "t", "y"]);

    // The other branch runs when a compare fails; its gets only.
    let outcome = run(
        kv.as_ref(),
        Txn::new()
            .when(Compare::exists("c"))
            .then(Op::get("a"))
            .otherwise(Op::get("y"))
            .otherwise(Op::get("nothing"))
            .otherwise(Op::put("b", "else")),
    )
    .await;
    assert!(!outcome.succeeded);
    assert_eq!(outcome.gets.len(), 2);
    assert_eq!(
        outcome.gets[0].as_ref().map(|kv| kv.pair()),
        Some(("y", "y"))
    );
    assert_eq!(outcome.gets[1], None);
    assert_eq!(kv_of(kv.as_ref(), "b").await.mod_revision, outcome.revision);

    // A read-only transaction reads at the current revision.
    let read = run(kv.as_ref(), Txn::new().then(Op::get("b"))).await;
    assert!(read.revision >= outcome.revision);
    kv.close().await.unwrap();
}

/// A key written by `Op::put_temp` is bound to the handle's lease: it vanishes when the
/// handle closes, while the transaction's plain puts stay.
pub async fn put_temp_in_a_txn_vanishes_on_close(store: TestStore) {
    let kv = store.open().await;
    let other = store.open().await;
    let outcome = run(
        kv.as_ref(),
        Txn::new()
            .when(Compare::missing("owner"))
            .then(Op::put_temp("owner", "worker-3"))
            .then(Op::put("state", "running")),
    )
    .await;
    assert!(outcome.succeeded);
    let owner = kv_of(other.as_ref(), "owner").await;
    assert_eq!(owner.value, "worker-3");
    assert_ne!(owner.lease, 0);
    assert_eq!(kv_of(other.as_ref(), "state").await.lease, 0);
    kv.close().await.unwrap();
    assert_eq!(other.get("owner").await.unwrap(), None, "gone with close");
    assert_eq!(
        other.get("state").await.unwrap().as_deref(),
        Some("running")
    );
    other.close().await.unwrap();
}

/// `Compare::held` holds while the guard holds its lock — on its handle and on another with
/// the same prefix — and no longer after `unlock`, after a drop, after `max_hold`, or once
/// another holder took the lock.
pub async fn held_holds_only_while_the_lock_is_held(store: TestStore) {
    let kv = store.open().await;
    let other = store.open().await;
    let guard = take(kv.as_ref(), "jobs", "the holder").await;
    let held = Compare::held(&guard);
    let write = Txn::new()
        .when(held.clone())
        .then(Op::put("jobs-state", "done"));
    assert!(run(kv.as_ref(), write.clone()).await.succeeded);
    assert!(holds(other.as_ref(), held.clone()).await, "another handle");
    guard.unlock().await.unwrap();
    assert!(!holds(kv.as_ref(), held.clone()).await, "after unlock");
    let next = take(other.as_ref(), "jobs", "the next holder").await;
    assert!(
        !holds(kv.as_ref(), held.clone()).await,
        "while another holds"
    );
    assert!(holds(kv.as_ref(), Compare::held(&next)).await);
    let next_held = Compare::held(&next);
    drop(next);
    super::eventually(PROMPTLY, "the dropped guard's key to go", || async {
        !holds(kv.as_ref(), next_held.clone()).await
    })
    .await;
    let expiring = kv
        .lock_with("jobs", LockOptions::new().max_hold(MAX_HOLD))
        .await
        .unwrap();
    let expiring_held = Compare::held(&expiring);
    assert!(holds(kv.as_ref(), expiring_held.clone()).await);
    let reason = within(MAX_HOLD + PROMPTLY, "max_hold", expiring.lost()).await;
    assert_eq!(reason, LostReason::MaxHold);
    assert!(!holds(kv.as_ref(), expiring_held).await, "after max_hold");
    let outcome = run(
        kv.as_ref(),
        Txn::new()
            .when(held)
            .then(Op::put("jobs-state", "late"))
            .otherwise(Op::get("jobs-state")),
    )
    .await;
    assert!(!outcome.succeeded);
    assert_eq!(
        outcome.gets[0].as_ref().map(|kv| kv.value.as_str()),
        Some("done"),
        "a lost holder cannot write through its guard"
    );
    kv.close().await.unwrap();
    other.close().await.unwrap();
}

/// `Compare::leading` holds while the leadership leads and no longer after `resign`, after
/// `max_hold`, or once the next candidate leads.
pub async fn leading_holds_only_while_leading(store: TestStore) {
    let kv = store.open().await;
    let other: Arc<dyn Kvi> = Arc::from(store.open().await);
    let leadership = within(PROMPTLY, "campaign", kv.campaign("boss", "a"))
        .await
        .unwrap();
    let leading = Compare::leading(&leadership);
    assert!(holds(kv.as_ref(), leading.clone()).await);
    assert!(
        holds(other.as_ref(), leading.clone()).await,
        "another handle"
    );
    let waiting = {
        let other = Arc::clone(&other);
        tokio::spawn(async move { other.campaign("boss", "b").await })
    };
    tokio::time::sleep(super::PROBE).await;
    assert!(
        holds(kv.as_ref(), leading.clone()).await,
        "with a waiting candidate"
    );
    leadership.resign().await.unwrap();
    assert!(!holds(kv.as_ref(), leading.clone()).await, "after resign");
    let next = within(PROMPTLY, "the next candidate", waiting)
        .await
        .unwrap()
        .unwrap();
    assert!(holds(kv.as_ref(), Compare::leading(&next)).await);
    assert!(!holds(kv.as_ref(), leading).await, "while another leads");
    next.resign().await.unwrap();
    let expiring = kv
        .campaign_with("boss", "c", LockOptions::new().max_hold(MAX_HOLD))
        .await
        .unwrap();
    let expiring_leading = Compare::leading(&expiring);
    assert!(holds(kv.as_ref(), expiring_leading.clone()).await);
    let reason = within(MAX_HOLD + PROMPTLY, "max_hold", expiring.lost()).await;
    assert_eq!(reason, LostReason::MaxHold);
    assert!(
        !holds(kv.as_ref(), expiring_leading).await,
        "after max_hold"
    );
    kv.close().await.unwrap();
    other.close().await.unwrap();
}

/// `update` creates, changes and (returning `None`) deletes a key, returning what it wrote;
/// `f` sees `None` for a missing key; an empty key is `InvalidKey`.
pub async fn update_writes_what_f_returns_and_none_deletes(store: TestStore) {
    let kv = store.open().await;
    let mut calls = Vec::new();
    let wrote = kv
        .update("n", &mut |current| {
            calls.push(current.map(str::to_owned));
            Some("1".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(wrote.as_deref(), Some("1"));
    assert_eq!(calls, [None]);
    let n = kv_of(kv.as_ref(), "n").await;
    assert_eq!((n.value.as_str(), n.version, n.lease), ("1", 1, 0));
    let wrote = kv
        .update("n", &mut |current| {
            let n: u64 = current.and_then(|v| v.parse().ok()).unwrap_or(0);
            Some((n + 1).to_string())
        })
        .await
        .unwrap();
    assert_eq!(wrote.as_deref(), Some("2"));
    assert_eq!(kv.get("n").await.unwrap().as_deref(), Some("2"));
    let mut seen = None;
    let wrote = kv
        .update("n", &mut |current| {
            seen = current.map(str::to_owned);
            None
        })
        .await
        .unwrap();
    assert_eq!((wrote, seen.as_deref()), (None, Some("2")));
    assert_eq!(kv.get_kv("n").await.unwrap(), None, "None deletes");
    let wrote = kv.update("n", &mut |_| None).await.unwrap();
    assert_eq!(wrote, None);
    assert_eq!(kv.get_kv("n").await.unwrap(), None);
    // A temp key updated becomes a plain key (update writes without a lease).
    kv.temp_key("t").await.unwrap();
    kv.update("t", &mut |_| Some("plain".to_owned()))
        .await
        .unwrap();
    assert_eq!(kv_of(kv.as_ref(), "t").await.lease, 0);
    assert!(matches!(
        kv.update("", &mut |_| Some("x".to_owned())).await,
        Err(Error::InvalidKey { .. })
    ));
    kv.close().await.unwrap();
}

/// 64 tasks on 8 handles each `update` one counter 100 times: it ends at exactly 6,400 and
/// every task saw its own writes' values go up.
pub async fn update_loses_no_write_under_contention(store: TestStore) {
    const TASKS: usize = 64;
    const HANDLES: usize = 8;
    const ROUNDS: u64 = 100;
    let mut handles: Vec<Arc<dyn Kvi>> = Vec::new();
    for _ in 0..HANDLES {
        handles.push(Arc::from(store.open().await));
    }
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let kv = Arc::clone(&handles[task % HANDLES]);
        tasks.push(tokio::spawn(async move {
            let mut last = 0u64;
            for _ in 0..ROUNDS {
                let wrote = kv
                    .update("counter", &mut |current| {
                        let n: u64 = current.and_then(|v| v.parse().ok()).unwrap_or(0);
                        Some((n + 1).to_string())
                    })
                    .await
                    .unwrap_or_else(|err| panic!("update: {err}"));
                let n: u64 = wrote.and_then(|v| v.parse().ok()).unwrap_or(0);
                assert!(n > last, "a task's own updates go up: {n} after {last}");
                last = n;
            }
        }));
    }
    for task in tasks {
        within(super::SLOW_CASE_LIMIT, "64 tasks × 100 updates", task)
            .await
            .unwrap();
    }
    let counter = kv_of(handles[0].as_ref(), "counter").await;
    assert_eq!(counter.value, (TASKS as u64 * ROUNDS).to_string());
    assert_eq!(
        counter.version,
        TASKS as i64 * ROUNDS as i64,
        "one put per update"
    );
    for kv in handles {
        kv.close().await.unwrap();
    }
}
