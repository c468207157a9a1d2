//! Temporary keys: bound to their handle's lease.

use std::time::Duration;

use hmetcd_core::KeyChange;

use super::{eventually, next_event, MARGIN, PROMPTLY};
use crate::TestStore;

/// `temp_key` stores `"1"`, over any earlier value, visible to every handle.
pub async fn temp_key_stores_one(store: TestStore) {
    let kv = store.open().await;
    let other = store.open().await;
    kv.temp_key("t").await.unwrap();
    assert_eq!(kv.get("t").await.unwrap().as_deref(), Some("1"));
    assert_eq!(other.get("t").await.unwrap().as_deref(), Some("1"));
    other.store("was-plain", "x").await.unwrap();
    kv.temp_key("was-plain").await.unwrap();
    assert_eq!(other.get("was-plain").await.unwrap().as_deref(), Some("1"));
    kv.close().await.unwrap();
    other.close().await.unwrap();
}

/// `close()` removes the handle's temp keys at once (and only those), seen by other handles
/// and by watchers as a delete.
pub async fn temp_keys_vanish_at_once_on_close(store: TestStore) {
    let kv = store.open().await;
    let other = store.open().await;
    kv.temp_key("a").await.unwrap();
    kv.temp_key("b").await.unwrap();
    kv.store("plain", "stays").await.unwrap();
    assert_eq!(other.get("a").await.unwrap().as_deref(), Some("1"));
    let mut events = other.watch_stream("a").await.unwrap();

    kv.close().await.unwrap();
    assert_eq!(
        other.get("a").await.unwrap(),
        None,
        "temp key still there after close"
    );
    assert_eq!(
        other.get("b").await.unwrap(),
        None,
        "temp key still there after close"
    );
    assert_eq!(other.get("plain").await.unwrap().as_deref(), Some("stays"));
    let event = next_event(
        &mut events,
        PROMPTLY,
        "watching a temp key removed by close",
    )
    .await;
    assert_eq!(
        (event.key(), event.change()),
        ("a", KeyChange::Delete),
        "{event:?}"
    );
    other.close().await.unwrap();
}

/// A handle dropped without `close()` loses its temp keys within the backend's bound
/// (at once in memory, about `lease_ttl` on etcd); its plain keys stay.
pub async fn temp_keys_vanish_after_drop(store: TestStore) {
    let lease_ttl = Duration::from_secs(2);
    let kv = store.open_with("lease_ttl=2s").await.unwrap();
    let other = store.open().await;
    kv.temp_key("t").await.unwrap();
    kv.store("plain", "stays").await.unwrap();
    assert_eq!(other.get("t").await.unwrap().as_deref(), Some("1"));

    drop(kv);
    let bound = store.drop_release_bound(lease_ttl) + MARGIN;
    eventually(bound, "temp key of a dropped handle to vanish", || async {
        other.get("t").await.unwrap().is_none()
    })
    .await;
    assert_eq!(other.get("plain").await.unwrap().as_deref(), Some("stays"));
    other.close().await.unwrap();
}

/// A live handle's temp keys stay for longer than its lease's time to live.
pub async fn temp_keys_of_a_live_handle_stay(store: TestStore) {
    let lease_ttl = Duration::from_secs(1);
    let kv = store.open_with("lease_ttl=1s").await.unwrap();
    let other = store.open().await;
    kv.temp_key("t").await.unwrap();
    let watch_for = store.drop_release_bound(lease_ttl) + 3 * lease_ttl;
    let until = tokio::time::Instant::now() + watch_for;
    while tokio::time::Instant::now() < until {
        assert_eq!(
            other.get("t").await.unwrap().as_deref(),
            Some("1"),
            "a live handle's temp key vanished"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    kv.close().await.unwrap();
    other.close().await.unwrap();
}

/// Closing one handle leaves another handle's temp keys alone.
pub async fn temp_keys_belong_to_their_handle(store: TestStore) {
    let first = store.open().await;
    let second = store.open().await;
    first.temp_key("first").await.unwrap();
    second.temp_key("second").await.unwrap();
    first.close().await.unwrap();
    assert_eq!(second.get("first").await.unwrap(), None);
    assert_eq!(second.get("second").await.unwrap().as_deref(), Some("1"));
    second.close().await.unwrap();
}
