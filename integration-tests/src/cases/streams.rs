//! `watch_stream` and `watch_prefix`: every change, in order, from the moment they return.

use hmetcd_core::{KeyChange, Kvi, WatchEvent, WatchStream};

use super::{next_event, PROMPTLY};
use crate::TestStore;

/// The next `count` events of `stream`, as `(key, value or None for a delete)`.
async fn next_changes(stream: &mut WatchStream, count: usize) -> Vec<(String, Option<String>)> {
    let mut changes = Vec::new();
    let mut last_revision = 0;
    for i in 0..count {
        let event = next_event(stream, PROMPTLY, &format!("event {i} of {count}")).await;
        assert!(
            event.revision() > last_revision,
            "revisions out of order at {event:?}"
        );
        last_revision = event.revision();
        changes.push((event.key().to_owned(), event.value().map(str::to_owned)));
    }
    changes
}

fn put(key: &str, value: &str) -> (String, Option<String>) {
    (key.to_owned(), Some(value.to_owned()))
}

fn delete(key: &str) -> (String, Option<String>) {
    (key.to_owned(), None)
}

/// `watch_stream(key)` yields every put and delete of `key` in order, with unprefixed
/// keys, and nothing for other keys.
pub async fn watch_stream_yields_every_change_in_order(store: TestStore) {
    let kv = store.open().await;
    let writer = store.open().await;
    let mut stream = kv.watch_stream("k").await.unwrap();
    let mut expected = Vec::new();
    for i in 0..100 {
        writer.store("k", &i.to_string()).await.unwrap();
        writer.store("k2", "other key").await.unwrap();
        expected.push(put("k", &i.to_string()));
    }
    writer.delete("k").await.unwrap();
    writer.delete("k").await.unwrap();
    writer.store("k", "again").await.unwrap();
    expected.push(delete("k"));
    expected.push(put("k", "again"));
    assert_eq!(next_changes(&mut stream, expected.len()).await, expected);
    kv.close().await.unwrap();
    writer.close().await.unwrap();
}

/// A change made right after `watch_stream` returns is never missed.
pub async fn watch_stream_misses_nothing_made_after_it_returns(store: TestStore) {
    let kv = store.open().await;
    let writer = store.open().await;
    for i in 0..20 {
        let key = format!("k{i}");
        let mut stream = kv.watch_stream(&key).await.unwrap();
        let by: &dyn Kvi = if i % 2 == 0 {
            kv.as_ref()
        } else {
            writer.as_ref()
        };
        by.store(&key, "v").await.unwrap();
        assert_eq!(next_changes(&mut stream, 1).await, [put(&key, "v")]);
    }
    kv.close().await.unwrap();
    writer.close().await.unwrap();
}

/// `watch_prefix(p)` yields every change of every key starting with `p` (the key `p`
/// itself included), in order, with unprefixed keys, and nothing else.
pub async fn watch_prefix_yields_every_change_under_the_prefix(store: TestStore) {
    let kv = store.open().await;
    let writer = store.open().await;
    let mut stream = kv.watch_prefix("dir/").await.unwrap();
    writer.store("dir/a", "1").await.unwrap();
    writer.store("dira", "outside").await.unwrap();
    writer.store("di", "outside").await.unwrap();
    writer.store("dir", "outside").await.unwrap();
    writer.store("other/dir/", "outside").await.unwrap();
    writer.store("dir/b/c", "2").await.unwrap();
    writer.delete("dir/a").await.unwrap();
    writer.store("dir/", "3").await.unwrap();
    writer.delete("dira").await.unwrap();
    writer.store("dir/\u{10FFFF}", "last").await.unwrap();
    let expected = [
        put("dir/a", "1"),
        put("dir/b/c", "2"),
        delete("dir/a"),
        put("dir/", "3"),
        put("dir/\u{10FFFF}", "last"),
    ];
    assert_eq!(next_changes(&mut stream, expected.len()).await, expected);
    kv.close().await.unwrap();
    writer.close().await.unwrap();
}

/// A change made right after `watch_prefix` returns is never missed.
pub async fn watch_prefix_misses_nothing_made_after_it_returns(store: TestStore) {
    let kv = store.open().await;
    let writer = store.open().await;
    for i in 0..20 {
        let prefix = format!("p{i}/");
        let mut stream = kv.watch_prefix(&prefix).await.unwrap();
        let by: &dyn Kvi = if i % 2 == 0 {
            kv.as_ref()
        } else {
            writer.as_ref()
        };
        by.delete(&format!("{prefix}gone")).await.unwrap();
        by.store(&format!("{prefix}x"), "v").await.unwrap();
        let event = next_event(&mut stream, PROMPTLY, &format!("watch_prefix {prefix}")).await;
        assert!(
            matches!(&event, WatchEvent::Put { key, value, .. } if *key == format!("{prefix}x") && value == "v"),
            "{event:?}"
        );
        assert_eq!(event.change(), KeyChange::Put);
    }
    kv.close().await.unwrap();
    writer.close().await.unwrap();
}
