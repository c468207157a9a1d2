//! The test data of the original Go package (hms-hmetcd), kept so that both ports answer
//! it the same way.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use hmetcd_core::{CompareOp, KeyValue, Kvi};

use super::pairs;
use crate::TestStore;

const KEYS: usize = 1000;

fn key(i: usize) -> String {
    format!("key_{i:04}")
}

fn value(i: usize) -> String {
    format!("value_{i:04}")
}

/// Stores `key_0000..key_0999`, several at a time so that it stays quick on etcd.
async fn store_thousand(kv: &Arc<dyn Kvi>) {
    futures::stream::iter(0..KEYS)
        .map(|i| {
            let kv = Arc::clone(kv);
            async move { kv.store(&key(i), &value(i)).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .unwrap();
}

async fn open_with_thousand(store: &TestStore) -> Arc<dyn Kvi> {
    let kv: Arc<dyn Kvi> = Arc::from(store.open().await);
    store_thousand(&kv).await;
    kv
}

/// The 1000 keys read back, one by one and as one range.
pub async fn thousand_keys_read_back(store: TestStore) {
    let kv = open_with_thousand(&store).await;
    let read: Vec<Option<String>> = futures::stream::iter(0..KEYS)
        .map(|i| {
            let kv = Arc::clone(&kv);
            async move { kv.get(&key(i)).await.unwrap() }
        })
        .buffered(16)
        .collect()
        .await;
    for (i, got) in read.into_iter().enumerate() {
        assert_eq!(got, Some(value(i)), "{}", key(i));
    }
    let all: Vec<KeyValue> = (0..KEYS).map(|i| KeyValue::new(key(i), value(i))).collect();
    assert_eq!(
        pairs(&kv.get_range(&key(0), &key(KEYS - 1)).await.unwrap()),
        pairs(&all)
    );
    kv.close().await.unwrap();
}

/// `get_range("key_0100", "key_0500")` is exactly the 401 keys 100..=500, in order.
pub async fn range_0100_to_0500_is_401_keys(store: TestStore) {
    let kv = open_with_thousand(&store).await;
    let range = kv.get_range("key_0100", "key_0500").await.unwrap();
    assert_eq!(range.len(), 401);
    let expected: Vec<KeyValue> = (100..=500)
        .map(|i| KeyValue::new(key(i), value(i)))
        .collect();
    assert_eq!(pairs(&range), pairs(&expected));
    kv.close().await.unwrap();
}

/// A range next to the data, and a reversed one, are empty.
pub async fn range_without_keys_is_empty(store: TestStore) {
    let kv = open_with_thousand(&store).await;
    assert_eq!(kv.get_range("key_1000", "key_9999").await.unwrap(), []);
    assert_eq!(kv.get_range("kex", "key_").await.unwrap(), []);
    assert_eq!(kv.get_range("key_0500", "key_0100").await.unwrap(), []);
    kv.close().await.unwrap();
}

/// A deleted key reads `None` and leaves the range.
pub async fn deleted_key_reads_none(store: TestStore) {
    let kv = open_with_thousand(&store).await;
    kv.delete("key_0300").await.unwrap();
    assert_eq!(kv.get("key_0300").await.unwrap(), None);
    assert_eq!(kv.get("key_0301").await.unwrap(), Some(value(301)));
    let range = kv.get_range("key_0100", "key_0500").await.unwrap();
    assert_eq!(range.len(), 400);
    assert!(range.iter().all(|pair| pair.key != "key_0300"));
    kv.close().await.unwrap();
}

/// The Go package's transaction table: `(key, stored, op, compare, then-branch runs)`.
pub async fn transaction_table(store: TestStore) {
    let kv = store.open().await;
    for (key, stored, op, compare, runs_then) in [
        ("x0001", "val0001", "=", "val0001", true),
        ("x0011", "val0011", "!=", "val0011", false),
        ("x0021", "val0021", "<", "val0021", false),
        ("x0031", "val0031", ">", "val0031", false),
        ("x0041", "val0041", "!=", "val004x", true),
        ("x0051", "val0051", "<", "val0052", true),
        ("x0061", "val0061", "<", "val0060", false),
        ("x0071", "val0071", ">", "val0070", true),
        ("x0081", "val0081", ">", "val0082", false),
    ] {
        let row = format!("{key} {stored:?} {op} {compare:?}");
        kv.store(key, stored).await.unwrap();
        let op: CompareOp = op.parse().unwrap();
        let (then_key, else_key) = (format!("{key}/then"), format!("{key}/else"));
        let ran_then = kv
            .transaction(
                key, op, compare, &then_key, "then ran", &else_key, "else ran",
            )
            .await
            .unwrap();
        assert_eq!(ran_then, runs_then, "{row}");
        let (then_value, else_value) = if runs_then {
            (Some("then ran"), None)
        } else {
            (None, Some("else ran"))
        };
        assert_eq!(
            kv.get(&then_key).await.unwrap().as_deref(),
            then_value,
            "{row}: then key"
        );
        assert_eq!(
            kv.get(&else_key).await.unwrap().as_deref(),
            else_value,
            "{row}: else key"
        );
        assert_eq!(
            kv.get(key).await.unwrap().as_deref(),
            Some(stored),
            "{row}: compared key"
        );
    }
    kv.close().await.unwrap();
}

/// The Go package's test-and-set table: `(key, stored, test, set, sets)`.
pub async fn test_and_set_table(store: TestStore) {
    let kv = store.open().await;
    for (key, stored, test, set, sets) in [
        ("x0100", "val0100", "val0100", "new0100", true),
        ("x0110", "val0110", "val01x0", "new0110", false),
    ] {
        kv.store(key, stored).await.unwrap();
        assert_eq!(
            kv.tas(key, test, set).await.unwrap(),
            sets,
            "{key} tas {test:?}"
        );
        let now = if sets { set } else { stored };
        assert_eq!(kv.get(key).await.unwrap().as_deref(), Some(now), "{key}");
    }
    kv.close().await.unwrap();
}
