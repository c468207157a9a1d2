//! Keys, values, reads and writes.

use hmetcd_core::{CompareOp, Error, KeyChange, KeyValue, Result};

use super::{all_keys, pairs, within, PROMPTLY};
use crate::TestStore;

#[track_caller]
fn assert_invalid_key<T: std::fmt::Debug>(result: Result<T>, call: &str) {
    match result {
        Err(Error::InvalidKey { .. }) => {}
        other => panic!("{call}: expected InvalidKey, got {other:?}"),
    }
}

/// Every key-taking method refuses an empty key with `InvalidKey`, and writes nothing.
pub async fn empty_key_is_invalid_and_writes_nothing(store: TestStore) {
    let kv = store.open().await;
    assert_invalid_key(kv.store("", "v").await, "store");
    assert_invalid_key(kv.temp_key("").await, "temp_key");
    assert_invalid_key(kv.get("").await, "get");
    assert_invalid_key(kv.delete("").await, "delete");
    assert_invalid_key(
        kv.transaction("", CompareOp::Equal, "v", "then", "t", "else", "e")
            .await,
        "transaction",
    );
    assert_invalid_key(kv.tas("", "", "v").await, "tas");
    let watched = within(PROMPTLY, "watch(\"\")", kv.watch("")).await;
    assert_invalid_key(watched, "watch");
    let watcher = kv.watch_with_cb("", KeyChange::Put, Box::new(|_| true));
    assert_invalid_key(
        within(PROMPTLY, "watch_with_cb(\"\")", watcher).await,
        "watch_with_cb",
    );
    let stream = within(PROMPTLY, "watch_stream(\"\")", kv.watch_stream("")).await;
    assert_invalid_key(stream.map(|_| ()), "watch_stream");

    assert_eq!(
        all_keys(kv.as_ref()).await,
        Vec::<String>::new(),
        "an empty-key call wrote"
    );
    kv.close().await.unwrap();
}

/// An empty `then_key` or `else_key` is `InvalidKey` whichever branch would run, and
/// neither branch writes.
pub async fn empty_then_or_else_key_is_invalid_and_writes_nothing(store: TestStore) {
    let kv = store.open().await;
    kv.store("k", "v").await.unwrap();
    for (compare, then_key, else_key, argument) in [
        ("v", "", "else", "then_key"),
        ("other", "", "else", "then_key"),
        ("v", "then", "", "else_key"),
        ("other", "then", "", "else_key"),
    ] {
        let result = kv
            .transaction("k", CompareOp::Equal, compare, then_key, "t", else_key, "e")
            .await;
        match result {
            Err(Error::InvalidKey {
                argument: named, ..
            }) => assert_eq!(named, argument),
            other => {
                panic!("transaction with an empty {argument}: expected InvalidKey, got {other:?}")
            }
        }
    }
    assert_eq!(
        all_keys(kv.as_ref()).await,
        ["k"],
        "a refused transaction wrote"
    );
    assert_eq!(kv.get("k").await.unwrap().as_deref(), Some("v"));
    kv.close().await.unwrap();
}

/// The empty value is a value: stored, read back as `Some("")`, listed by ranges.
pub async fn empty_value_round_trips(store: TestStore) {
    let kv = store.open().await;
    kv.store("empty", "").await.unwrap();
    assert_eq!(kv.get("empty").await.unwrap().as_deref(), Some(""));
    assert_eq!(
        pairs(&kv.get_range("empty", "empty").await.unwrap()),
        [("empty", "")]
    );
    let other = store.open().await;
    assert_eq!(other.get("empty").await.unwrap().as_deref(), Some(""));
    other.close().await.unwrap();
    kv.close().await.unwrap();
}

/// `get` of an absent key is `None`.
pub async fn get_of_absent_key_is_none(store: TestStore) {
    let kv = store.open().await;
    assert_eq!(kv.get("absent").await.unwrap(), None);
    kv.store("absent-not", "x").await.unwrap();
    kv.store("absen", "x").await.unwrap();
    assert_eq!(kv.get("absent").await.unwrap(), None);
    kv.close().await.unwrap();
}

/// `store` creates a key, and overwrites it.
pub async fn store_creates_and_overwrites(store: TestStore) {
    let kv = store.open().await;
    kv.store("k", "first").await.unwrap();
    assert_eq!(kv.get("k").await.unwrap().as_deref(), Some("first"));
    kv.store("k", "second").await.unwrap();
    assert_eq!(kv.get("k").await.unwrap().as_deref(), Some("second"));
    kv.store("k", "").await.unwrap();
    assert_eq!(kv.get("k").await.unwrap().as_deref(), Some(""));
    assert_eq!(
        pairs(&kv.get_range("", super::LAST_KEY).await.unwrap()),
        [("k", "")]
    );
    kv.close().await.unwrap();
}

/// `delete` removes a key; deleting an absent key is `Ok`.
pub async fn delete_removes_and_absent_delete_is_ok(store: TestStore) {
    let kv = store.open().await;
    kv.delete("never").await.unwrap();
    kv.store("k", "v").await.unwrap();
    kv.store("k2", "v").await.unwrap();
    kv.delete("k").await.unwrap();
    assert_eq!(kv.get("k").await.unwrap(), None);
    assert_eq!(all_keys(kv.as_ref()).await, ["k2"]);
    kv.delete("k").await.unwrap();
    kv.close().await.unwrap();
}

/// Keys and values with non-ASCII characters, `/`, NUL, spaces and newlines come back
/// exactly as written.
pub async fn unusual_keys_and_values_round_trip(store: TestStore) {
    let kv = store.open().await;
    let long_value = "ünïcødé/\0\n".repeat(10_000);
    let pairs = [
        ("dir/sub/leaf", "a/b"),
        ("naïve-ключ-键-🦀", "välue-значение-值-🦀"),
        ("nul\0inside", "nul\0inside\0"),
        ("\0", "\0"),
        (" spaced key ", " spaced value "),
        ("line\nbreak", "line\nbreak\r\n"),
        ("tab\tkey", "\u{10FFFF}"),
        ("long", long_value.as_str()),
    ];
    for (key, value) in pairs {
        kv.store(key, value).await.unwrap();
    }
    for (key, value) in pairs {
        assert_eq!(
            kv.get(key).await.unwrap().as_deref(),
            Some(value),
            "key {key:?}"
        );
    }
    let mut expected: Vec<KeyValue> = pairs.iter().map(|(k, v)| KeyValue::new(*k, *v)).collect();
    expected.sort();
    assert_eq!(
        super::pairs(&kv.get_range("", super::LAST_KEY).await.unwrap()),
        super::pairs(&expected)
    );
    kv.close().await.unwrap();
}

/// Handles opened on one store see each other's writes.
pub async fn handles_on_one_store_share_data(store: TestStore) {
    let a = store.open().await;
    let b = store.open().await;
    a.store("shared", "from a").await.unwrap();
    assert_eq!(b.get("shared").await.unwrap().as_deref(), Some("from a"));
    b.store("shared", "from b").await.unwrap();
    assert_eq!(a.get("shared").await.unwrap().as_deref(), Some("from b"));
    b.delete("shared").await.unwrap();
    assert_eq!(a.get("shared").await.unwrap(), None);
    a.close().await.unwrap();
    b.close().await.unwrap();
}
