//! Closing, and sharing one handle between tasks.

use std::sync::Arc;
use std::time::Duration;

use hmetcd_core::{CompareOp, Error, KeyChange, KeyValue, Kvi, Result};

use super::{within, PROMPTLY};
use crate::TestStore;

#[track_caller]
fn assert_closed<T: std::fmt::Debug>(result: Result<T>, call: &str) {
    match result {
        Err(Error::Closed) => {}
        other => panic!("{call} after close: expected Closed, got {other:?}"),
    }
}

/// After `close()` every call fails with `Closed`, at once.
pub async fn every_call_after_close_is_closed(store: TestStore) {
    let kv = store.open().await;
    kv.store("k", "v").await.unwrap();
    kv.close().await.unwrap();
    within(PROMPTLY, "calls on a closed handle", async {
        assert_closed(kv.dist_lock().await, "dist_lock");
        assert_closed(
            kv.dist_timed_lock(Duration::from_secs(1)).await,
            "dist_timed_lock",
        );
        assert_closed(kv.dist_unlock().await, "dist_unlock");
        assert_closed(kv.store("k", "w").await, "store");
        assert_closed(kv.temp_key("t").await, "temp_key");
        assert_closed(kv.get("k").await, "get");
        assert_closed(kv.get_range("", "z").await, "get_range");
        assert_closed(kv.delete("k").await, "delete");
        assert_closed(
            kv.transaction("k", CompareOp::Equal, "v", "then", "t", "else", "e")
                .await,
            "transaction",
        );
        assert_closed(kv.tas("k", "v", "w").await, "tas");
        assert_closed(kv.watch("k").await, "watch");
        assert_closed(
            kv.watch_with_cb("k", KeyChange::Put, Box::new(|_| true))
                .await,
            "watch_with_cb",
        );
        assert_closed(kv.watch_stream("k").await.map(|_| ()), "watch_stream");
        assert_closed(kv.watch_prefix("").await.map(|_| ()), "watch_prefix");
    })
    .await;
    let other = store.open().await;
    assert_eq!(
        other.get("k").await.unwrap().as_deref(),
        Some("v"),
        "a call after close wrote"
    );
    other.close().await.unwrap();
}

/// Closing twice is `Ok`.
pub async fn close_twice_is_ok(store: TestStore) {
    let kv = store.open().await;
    kv.temp_key("t").await.unwrap();
    kv.close().await.unwrap();
    within(PROMPTLY, "second close", kv.close()).await.unwrap();
}

/// Data outlives the handle that wrote it: a new handle reads it after `close()`.
pub async fn data_outlives_close(store: TestStore) {
    let kv = store.open().await;
    kv.store("k", "v").await.unwrap();
    kv.close().await.unwrap();
    let reopened = store.open().await;
    assert_eq!(reopened.get("k").await.unwrap().as_deref(), Some("v"));
    reopened.close().await.unwrap();
}

/// One `Arc<dyn Kvi>` serves many tasks at once.
pub async fn one_handle_serves_many_tasks(store: TestStore) {
    const TASKS: usize = 16;
    const ROUNDS: usize = 10;
    let kv: Arc<dyn Kvi> = Arc::from(store.open().await);
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let kv = Arc::clone(&kv);
        tasks.push(tokio::spawn(async move {
            let dir = format!("task{task:02}/");
            for round in 0..ROUNDS {
                let key = format!("{dir}{round:02}");
                kv.store(&key, "0").await.unwrap();
                assert!(kv.tas(&key, "0", &task.to_string()).await.unwrap());
                assert_eq!(kv.get(&key).await.unwrap(), Some(task.to_string()));
            }
            let end = format!("{dir}~");
            let pairs = kv.get_range(&dir, &end).await.unwrap();
            let expected: Vec<KeyValue> = (0..ROUNDS)
                .map(|round| KeyValue::new(format!("{dir}{round:02}"), task.to_string()))
                .collect();
            assert_eq!(super::pairs(&pairs), super::pairs(&expected));
        }));
    }
    within(
        Duration::from_secs(30),
        "16 tasks sharing one handle",
        async {
            for task in tasks {
                task.await.unwrap();
            }
        },
    )
    .await;
    kv.close().await.unwrap();
}
