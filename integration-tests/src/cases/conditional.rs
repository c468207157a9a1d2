//! Conditional writes: `transaction` and `tas`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use hmetcd_core::{CompareOp, Error, Kvi, WatchStream};

use super::{all_keys, next_event, put_of, within, PROMPTLY};
use crate::TestStore;

const OPERATORS: [CompareOp; 4] = [
    CompareOp::Equal,
    CompareOp::NotEqual,
    CompareOp::Less,
    CompareOp::Greater,
];

/// On a missing key every operator is false: the else branch runs and the key stays missing.
pub async fn missing_key_takes_the_else_branch_for_every_operator(store: TestStore) {
    let kv = store.open().await;
    for op in OPERATORS {
        for compare in ["", "x", "\u{10FFFF}"] {
            let ran_then = kv
                .transaction("missing", op, compare, "then", "t", "else", "e")
                .await
                .unwrap();
            assert!(!ran_then, "missing {op} {compare:?} ran the then branch");
            assert_eq!(
                kv.get("then").await.unwrap(),
                None,
                "missing {op} {compare:?}"
            );
            assert_eq!(
                kv.get("else").await.unwrap().as_deref(),
                Some("e"),
                "missing {op} {compare:?}"
            );
            assert_eq!(
                kv.get("missing").await.unwrap(),
                None,
                "missing {op} {compare:?}"
            );
            kv.delete("else").await.unwrap();
        }
    }
    kv.close().await.unwrap();
}

/// A key holding `""` is present: `= ""` holds and `!= ""` does not.
pub async fn empty_value_is_not_a_missing_key(store: TestStore) {
    let kv = store.open().await;
    kv.store("empty", "").await.unwrap();
    for (op, compare, expected) in [
        (CompareOp::Equal, "", true),
        (CompareOp::NotEqual, "", false),
        (CompareOp::NotEqual, "x", true),
        (CompareOp::Less, "a", true),
        (CompareOp::Greater, "", false),
    ] {
        let ran_then = kv
            .transaction("empty", op, compare, "then", "t", "else", "e")
            .await
            .unwrap();
        assert_eq!(ran_then, expected, "\"\" {op} {compare:?}");
    }
    kv.close().await.unwrap();
}

/// Comparison is byte-wise lexicographic: not numeric, not case-folded, not by characters.
pub async fn comparison_is_bytewise(store: TestStore) {
    let kv = store.open().await;
    for (stored, op, compare, expected) in [
        ("Z", CompareOp::Less, "a", true),
        ("a", CompareOp::Greater, "Z", true),
        ("10", CompareOp::Less, "9", true),
        ("9", CompareOp::Greater, "10", true),
        ("a", CompareOp::Less, "a\0", true),
        ("a\0", CompareOp::Greater, "a", true),
        ("é", CompareOp::Greater, "z", true),
        ("\u{FFFF}", CompareOp::Less, "𝄞", true),
        ("abc", CompareOp::Less, "abd", true),
        ("abc", CompareOp::Greater, "ab", true),
        ("abc", CompareOp::Equal, "abc", true),
        ("abc", CompareOp::Equal, "ABC", false),
        ("e\u{301}", CompareOp::Equal, "é", false),
        ("abc", CompareOp::NotEqual, "abc ", true),
    ] {
        kv.store("k", stored).await.unwrap();
        let ran_then = kv
            .transaction("k", op, compare, "then", "t", "else", "e")
            .await
            .unwrap();
        assert_eq!(ran_then, expected, "{stored:?} {op} {compare:?}");
        let (written, unwritten) = if expected {
            ("then", "else")
        } else {
            ("else", "then")
        };
        assert!(
            kv.get(written).await.unwrap().is_some(),
            "{stored:?} {op} {compare:?}"
        );
        assert_eq!(
            kv.get(unwritten).await.unwrap(),
            None,
            "{stored:?} {op} {compare:?}"
        );
        kv.delete(written).await.unwrap();
    }
    kv.close().await.unwrap();
}

/// A branch may write the compared key itself.
pub async fn branch_may_write_the_compared_key(store: TestStore) {
    let kv = store.open().await;
    kv.store("k", "1").await.unwrap();
    assert!(kv
        .transaction("k", CompareOp::Equal, "1", "k", "2", "k", "x")
        .await
        .unwrap());
    assert_eq!(kv.get("k").await.unwrap().as_deref(), Some("2"));
    assert!(!kv
        .transaction("k", CompareOp::Equal, "1", "k", "y", "k", "3")
        .await
        .unwrap());
    assert_eq!(kv.get("k").await.unwrap().as_deref(), Some("3"));
    assert_eq!(all_keys(kv.as_ref()).await, ["k"]);
    kv.close().await.unwrap();
}

const HANDLES: usize = 4;
const TASKS_PER_HANDLE: usize = 2;
const WINS_PER_TASK: usize = 10;

/// Runs `increment` (one compare-and-swap attempt of "counter" from `seen` to `seen + 1`)
/// from many tasks on several handles until each task has won `WINS_PER_TASK` times, and
/// checks that every value was won exactly once.
async fn contend<F, Fut>(store: &TestStore, what: &str, increment: F)
where
    F: Fn(Arc<dyn Kvi>, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let handles: Vec<Arc<dyn Kvi>> = {
        let mut handles = Vec::new();
        for _ in 0..HANDLES {
            handles.push(Arc::from(store.open().await));
        }
        handles
    };
    handles[0].store("counter", "0").await.unwrap();
    let mut tasks = Vec::new();
    for handle in &handles {
        for _ in 0..TASKS_PER_HANDLE {
            let kv = Arc::clone(handle);
            let increment = increment.clone();
            tasks.push(tokio::spawn(async move {
                let mut won = Vec::new();
                while won.len() < WINS_PER_TASK {
                    let seen: u64 = kv.get("counter").await.unwrap().unwrap().parse().unwrap();
                    if increment(Arc::clone(&kv), seen).await {
                        won.push(seen + 1);
                    }
                    tokio::task::yield_now().await;
                }
                won
            }));
        }
    }
    let total = (HANDLES * TASKS_PER_HANDLE * WINS_PER_TASK) as u64;
    let mut winners = BTreeSet::new();
    within(Duration::from_secs(60), what, async {
        for task in tasks {
            for value in task.await.unwrap() {
                assert!(winners.insert(value), "{what}: value {value} was won twice");
            }
        }
    })
    .await;
    assert_eq!(winners, (1..=total).collect::<BTreeSet<_>>(), "{what}");
    assert_eq!(
        handles[0].get("counter").await.unwrap(),
        Some(total.to_string()),
        "{what}"
    );
    for handle in handles {
        handle.close().await.unwrap();
    }
}

/// `transaction` is one atomic step: concurrent compare-and-swaps never both win.
pub async fn transaction_is_atomic_under_concurrency(store: TestStore) {
    contend(&store, "transaction increments", |kv, seen| async move {
        let (current, next) = (seen.to_string(), (seen + 1).to_string());
        kv.transaction(
            "counter",
            CompareOp::Equal,
            &current,
            "counter",
            &next,
            "lost",
            &current,
        )
        .await
        .unwrap()
    })
    .await;
}

/// `tas` sets the value when it matches, and writes nothing when it does not.
pub async fn tas_sets_only_on_a_match(store: TestStore) {
    let kv = store.open().await;
    kv.store("k", "old").await.unwrap();
    assert!(!kv.tas("k", "other", "new").await.unwrap());
    assert_eq!(kv.get("k").await.unwrap().as_deref(), Some("old"));
    assert!(!kv.tas("k", "ol", "new").await.unwrap());
    assert!(!kv.tas("k", "old ", "new").await.unwrap());
    assert_eq!(kv.get("k").await.unwrap().as_deref(), Some("old"));
    assert!(kv.tas("k", "old", "new").await.unwrap());
    assert_eq!(kv.get("k").await.unwrap().as_deref(), Some("new"));
    assert_eq!(all_keys(kv.as_ref()).await, ["k"]);
    kv.close().await.unwrap();
}

/// `tas` on a missing key is `false`, and the key stays missing.
pub async fn tas_on_missing_key_is_false_and_writes_nothing(store: TestStore) {
    let kv = store.open().await;
    assert!(!kv.tas("missing", "", "set").await.unwrap());
    assert!(!kv.tas("missing", "x", "set").await.unwrap());
    assert!(!kv.tas("missing", "", "").await.unwrap());
    assert_eq!(kv.get("missing").await.unwrap(), None);
    assert_eq!(all_keys(kv.as_ref()).await, Vec::<String>::new());
    kv.close().await.unwrap();
}

/// `tas` treats `""` as an ordinary value, both as the test and as the new value.
pub async fn tas_with_empty_values(store: TestStore) {
    let kv = store.open().await;
    kv.store("k", "").await.unwrap();
    assert!(!kv.tas("k", "x", "y").await.unwrap());
    assert_eq!(kv.get("k").await.unwrap().as_deref(), Some(""));
    assert!(kv.tas("k", "", "v").await.unwrap());
    assert_eq!(kv.get("k").await.unwrap().as_deref(), Some("v"));
    assert!(!kv.tas("k", "", "w").await.unwrap());
    assert!(kv.tas("k", "v", "").await.unwrap());
    assert_eq!(kv.get("k").await.unwrap().as_deref(), Some(""));
    kv.close().await.unwrap();
}

/// `tas` is atomic: concurrent test-and-sets of one value never both succeed.
pub async fn tas_is_atomic_under_concurrency(store: TestStore) {
    contend(&store, "tas increments", |kv, seen| async move {
        kv.tas("counter", &seen.to_string(), &(seen + 1).to_string())
            .await
            .unwrap()
    })
    .await;
}

/// `CompareOp` parses `=`, `==`, `!=`, `<`, `>`; anything else is `InvalidOperator`.
pub async fn compare_op_parses_the_five_spellings(store: TestStore) {
    let kv = store.open().await;
    kv.store("k", "b").await.unwrap();
    for (spelling, holds) in [
        ("=", false),
        ("==", false),
        ("!=", true),
        ("<", false),
        (">", true),
    ] {
        let op: CompareOp = spelling.parse().unwrap();
        let ran_then = kv
            .transaction("k", op, "a", "then", "t", "else", "e")
            .await
            .unwrap();
        assert_eq!(ran_then, holds, "\"b\" {spelling} \"a\"");
    }
    for bad in ["", "<=", ">=", "=!", "===", " =", "= ", "eq", "<>"] {
        match bad.parse::<CompareOp>() {
            Err(Error::InvalidOperator { operator }) => assert_eq!(operator, bad),
            other => panic!("{bad:?} parsed as {other:?}"),
        }
    }
    kv.close().await.unwrap();
}

/// The next event of `events` is the put of `sentinel`: nothing was written before it.
async fn assert_nothing_written_before(kv: &dyn Kvi, events: &mut WatchStream, what: &str) {
    kv.store("sentinel", what).await.unwrap();
    let event = next_event(events, PROMPTLY, what).await;
    assert_eq!(put_of(&event), ("sentinel", what), "{what} wrote something");
}

/// A `tas` or `transaction` that writes nothing makes no change a watcher could see.
pub async fn failed_writes_make_no_events(store: TestStore) {
    let kv = store.open().await;
    kv.store("k", "v").await.unwrap();
    let mut events = kv.watch_prefix("").await.unwrap();
    assert!(!kv.tas("k", "other", "new").await.unwrap());
    assert_nothing_written_before(kv.as_ref(), &mut events, "tas on a mismatch").await;
    assert!(!kv.tas("missing", "", "new").await.unwrap());
    assert_nothing_written_before(kv.as_ref(), &mut events, "tas on a missing key").await;
    let refused = kv
        .transaction("k", CompareOp::Equal, "v", "then", "t", "", "e")
        .await;
    assert!(
        matches!(refused, Err(Error::InvalidKey { .. })),
        "{refused:?}"
    );
    assert_nothing_written_before(kv.as_ref(), &mut events, "a refused transaction").await;
    kv.close().await.unwrap();
}

/// A transaction writes its one branch key in one change, and leaves the compared key alone.
pub async fn transaction_is_one_write(store: TestStore) {
    let kv = store.open().await;
    kv.store("k", "v").await.unwrap();
    let mut events = kv.watch_prefix("").await.unwrap();
    for (compare, branch_key) in [("v", "then"), ("w", "else")] {
        kv.transaction("k", CompareOp::Equal, compare, "then", "t", "else", "e")
            .await
            .unwrap();
        let event = next_event(&mut events, PROMPTLY, "the transaction's write").await;
        assert_eq!(event.key(), branch_key, "{event:?}");
        assert_nothing_written_before(kv.as_ref(), &mut events, "the rest of the transaction")
            .await;
    }
    kv.close().await.unwrap();
}
