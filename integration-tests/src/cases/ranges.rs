//! `get_range`: inclusive at both ends, byte-wise, sorted ascending.

use hmetcd_core::Kvi;

use super::LAST_KEY;
use crate::TestStore;

/// Stores every key with its own name as value, in a random order.
async fn store_shuffled(kv: &dyn Kvi, keys: &[&str]) {
    let mut keys = keys.to_vec();
    fastrand::shuffle(&mut keys);
    for key in keys {
        kv.store(key, &format!("value of {key}")).await.unwrap();
    }
}

async fn range_keys(kv: &dyn Kvi, start: &str, end: &str) -> Vec<String> {
    let pairs = kv.get_range(start, end).await.unwrap();
    for pair in &pairs {
        assert_eq!(
            pair.value,
            format!("value of {}", pair.key),
            "value of {:?}",
            pair.key
        );
    }
    pairs.into_iter().map(|pair| pair.key).collect()
}

/// A range includes a key equal to its start and a key equal to its end.
pub async fn both_ends_are_inclusive(store: TestStore) {
    let kv = store.open().await;
    store_shuffled(kv.as_ref(), &["k1", "k2", "k3", "k4", "k5"]).await;
    assert_eq!(
        range_keys(kv.as_ref(), "k2", "k4").await,
        ["k2", "k3", "k4"]
    );
    assert_eq!(
        range_keys(kv.as_ref(), "k1", "k5").await,
        ["k1", "k2", "k3", "k4", "k5"]
    );
    kv.close().await.unwrap();
}

/// Results come sorted ascending by the keys' bytes, whatever the insertion order.
pub async fn sorted_ascending_by_bytes(store: TestStore) {
    let kv = store.open().await;
    let keys = [
        "a", "a\0", "a/b", "a0", "aa", "ab", "b", "B", "A", "Z", "~", "\u{7f}", "é", "e\u{301}",
        "z", "ä", "中", "𝄞", "\u{FFFF}", "0", "9", "10", " ", "-",
    ];
    store_shuffled(kv.as_ref(), &keys).await;
    let mut expected: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
    expected.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    assert_eq!(range_keys(kv.as_ref(), "", LAST_KEY).await, expected);
    assert_eq!(
        range_keys(kv.as_ref(), "a", "b").await,
        ["a", "a\0", "a/b", "a0", "aa", "ab", "b"]
    );
    kv.close().await.unwrap();
}

/// Keys just below the start or just above the end are left out; the ends themselves are in.
pub async fn bounds_are_exact(store: TestStore) {
    let kv = store.open().await;
    store_shuffled(
        kv.as_ref(),
        &["b", "b\0", "b/", "ba", "c", "c\0", "c/", "ca", "d"],
    )
    .await;
    assert_eq!(
        range_keys(kv.as_ref(), "b\0", "c").await,
        ["b\0", "b/", "ba", "c"]
    );
    assert_eq!(
        range_keys(kv.as_ref(), "b/", "c\0").await,
        ["b/", "ba", "c", "c\0"]
    );
    assert_eq!(range_keys(kv.as_ref(), "ba", "ba").await, ["ba"]);
    kv.close().await.unwrap();
}

/// `start > end` is an empty result, not an error.
pub async fn start_after_end_is_empty(store: TestStore) {
    let kv = store.open().await;
    store_shuffled(kv.as_ref(), &["a", "b", "c", "d", "e"]).await;
    assert_eq!(kv.get_range("d", "b").await.unwrap(), []);
    assert_eq!(kv.get_range("b\0", "b").await.unwrap(), []);
    assert_eq!(kv.get_range(LAST_KEY, "a").await.unwrap(), []);
    kv.close().await.unwrap();
}

/// An empty `end` is below every key: the result is empty, whatever the start.
pub async fn empty_end_is_empty(store: TestStore) {
    let kv = store.open().await;
    store_shuffled(kv.as_ref(), &["a", "b", "c"]).await;
    assert_eq!(kv.get_range("b", "").await.unwrap(), []);
    assert_eq!(kv.get_range("", "").await.unwrap(), []);
    kv.close().await.unwrap();
}

/// Without a prefix, an empty `end` is still empty (etcd would read a range end of `"\0"`
/// as "every key from start on").
pub async fn empty_end_is_empty_without_a_prefix(store: TestStore) {
    let kv = store.open_with("prefix=").await.unwrap();
    let mine = |key: &str| format!("{}{key}", store.prefix());
    kv.store(&mine("a"), "1").await.unwrap();
    kv.store(&mine("b"), "2").await.unwrap();
    assert_eq!(kv.get_range(&mine("a"), "").await.unwrap(), []);
    assert_eq!(kv.get_range(&mine("b"), &mine("a")).await.unwrap(), []);
    assert_eq!(
        super::pairs(&kv.get_range(&mine("a"), &mine("b")).await.unwrap()),
        [(mine("a").as_str(), "1"), (mine("b").as_str(), "2")]
    );
    kv.close().await.unwrap();
}

/// An empty `start` means from the first key.
pub async fn empty_start_means_from_the_first_key(store: TestStore) {
    let kv = store.open().await;
    store_shuffled(kv.as_ref(), &["\0", "!", "a", "b", "c"]).await;
    assert_eq!(
        range_keys(kv.as_ref(), "", "b").await,
        ["\0", "!", "a", "b"]
    );
    assert_eq!(range_keys(kv.as_ref(), "", "\0").await, ["\0"]);
    kv.close().await.unwrap();
}

/// A range that matches no key is empty, not an error.
pub async fn no_match_is_empty(store: TestStore) {
    let kv = store.open().await;
    assert_eq!(kv.get_range("", LAST_KEY).await.unwrap(), []);
    store_shuffled(kv.as_ref(), &["a", "b", "x"]).await;
    assert_eq!(kv.get_range("c", "w").await.unwrap(), []);
    assert_eq!(kv.get_range("a\0", "a\u{10FFFF}").await.unwrap(), []);
    assert_eq!(kv.get_range("y", LAST_KEY).await.unwrap(), []);
    kv.close().await.unwrap();
}

/// `start == end` gives that one key when it exists, and nothing when it does not.
pub async fn start_equal_to_end_is_that_key(store: TestStore) {
    let kv = store.open().await;
    store_shuffled(kv.as_ref(), &["k", "k\0", "ka", "j"]).await;
    assert_eq!(range_keys(kv.as_ref(), "k", "k").await, ["k"]);
    assert_eq!(
        range_keys(kv.as_ref(), "kb", "kb").await,
        Vec::<String>::new()
    );
    kv.close().await.unwrap();
}
