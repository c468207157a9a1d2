//! `watch_prefix_from`: history from a revision, then live, none missed or repeated.
//!
//! Compaction concerns a whole store, so its cases (below the compaction revision is
//! `Compacted`, from it is fine) live in `tests/test_kit.rs`, which runs one test at a time
//! on a private etcd, as do the reconnect cases (a cut link on etcd, a partition in memory).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hmetcd_core::{Error, Kvi, Op, Txn, WatchEvent, WatchStream};

use super::data::kv_of;
use super::{next_event, within, PROMPTLY};
use crate::TestStore;

/// Opens a handle that keeps plenty of history: the cases of a run share one store, and the
/// memory store's default (the last 10,000 revisions, compacted by itself) could pass while
/// a case runs next to a busy one. etcd ignores the option (the test servers never compact
/// by themselves).
async fn open_with_history(store: &TestStore) -> Box<dyn Kvi> {
    store
        .open_with("history=1000000")
        .await
        .unwrap_or_else(|err| panic!("open with history: {err}"))
}

/// An event without its revision, for comparing with what was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// A put of key = value.
    Put(String, String),
    /// A delete of key.
    Delete(String),
}

pub(crate) fn change(event: &WatchEvent) -> Change {
    match event {
        WatchEvent::Put { key, value, .. } => Change::Put(key.clone(), value.clone()),
        WatchEvent::Delete { key, .. } => Change::Delete(key.clone()),
    }
}

fn put(key: &str, value: &str) -> Change {
    Change::Put(key.to_owned(), value.to_owned())
}

fn delete(key: &str) -> Change {
    Change::Delete(key.to_owned())
}

async fn events(stream: &mut WatchStream, count: usize, what: &str) -> Vec<WatchEvent> {
    let mut got = Vec::with_capacity(count);
    for _ in 0..count {
        got.push(next_event(stream, PROMPTLY, what).await);
    }
    got
}

/// Nothing more arrives for a while.
async fn quiet(stream: &mut WatchStream, what: &str) {
    let extra = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(extra.is_err(), "{what}: unexpected {extra:?}");
}

/// From a past revision the stream replays every change under the prefix from that revision
/// on (puts, deletes, a txn's writes at one revision, a delete_prefix), in order, then goes
/// on with live changes; nothing outside the prefix, nothing twice.
pub async fn watch_prefix_from_replays_history_then_goes_live(store: TestStore) {
    let kv = open_with_history(&store).await;
    kv.store("w/a", "0").await.unwrap();
    kv.store("w/a", "1").await.unwrap();
    let from = kv_of(kv.as_ref(), "w/a").await.mod_revision;
    kv.store("w/b", "2").await.unwrap();
    kv.store("outside", "x").await.unwrap();
    kv.delete("w/a").await.unwrap();
    kv.txn(
        Txn::new()
            .then(Op::put("w/c", "3"))
            .then(Op::put("w/d/1", "4"))
            .then(Op::put("wx", "not under w/")),
    )
    .await
    .unwrap();
    assert_eq!(kv.delete_prefix("w/d/").await.unwrap(), 1);
    let history = [
        put("w/a", "1"),
        put("w/b", "2"),
        delete("w/a"),
        put("w/c", "3"),
        put("w/d/1", "4"),
        delete("w/d/1"),
    ];
    let mut stream = kv.watch_prefix_from("w/", from).await.unwrap();
    let replayed = events(&mut stream, history.len(), "history").await;
    assert_eq!(replayed.iter().map(change).collect::<Vec<_>>(), history);
    assert_eq!(replayed[0].revision(), from);
    assert!(
        replayed
            .windows(2)
            .all(|p| p[0].revision() <= p[1].revision()),
        "{replayed:?}"
    );
    assert_eq!(replayed[3].revision(), replayed[4].revision(), "one txn");
    quiet(&mut stream, "after the history").await;
    kv.store("w/e", "5").await.unwrap();
    kv.store("outside", "y").await.unwrap();
    kv.store("w/e", "6").await.unwrap();
    let live = events(&mut stream, 2, "live").await;
    assert_eq!(
        live.iter().map(change).collect::<Vec<_>>(),
        [put("w/e", "5"), put("w/e", "6")]
    );
    assert!(live[0].revision() > replayed[5].revision());
    quiet(&mut stream, "after the live writes").await;

    // From the middle of the history: that revision's change first.
    let middle = replayed[2].revision();
    let mut from_middle = kv.watch_prefix_from("w/", middle).await.unwrap();
    let got = events(&mut from_middle, 6, "from the middle").await;
    assert_eq!(
        got.iter().map(change).collect::<Vec<_>>(),
        [
            delete("w/a"),
            put("w/c", "3"),
            put("w/d/1", "4"),
            delete("w/d/1"),
            put("w/e", "5"),
            put("w/e", "6"),
        ]
    );
    // From a revision still to come: live changes only.
    let next = kv_of(kv.as_ref(), "w/e").await.mod_revision + 1;
    let mut from_next = kv.watch_prefix_from("w/", next).await.unwrap();
    quiet(&mut from_next, "from the next revision").await;
    kv.store("w/f", "7").await.unwrap();
    let got = next_event(&mut from_next, PROMPTLY, "from the next revision").await;
    assert_eq!(change(&got), put("w/f", "7"));
    assert!(got.revision() >= next);
    kv.close().await.unwrap();
}

/// A watch from a past revision started while another task writes sees each write exactly
/// once, in order: the replay and the live part neither overlap nor leave a gap.
pub async fn watch_prefix_from_misses_nothing_while_others_write(store: TestStore) {
    const WRITES: usize = 200;
    let kv: Arc<dyn Kvi> = Arc::from(open_with_history(&store).await);
    kv.store("s/0000", "first").await.unwrap();
    let from = kv_of(kv.as_ref(), "s/0000").await.mod_revision;
    let writer = {
        let kv = Arc::clone(&kv);
        tokio::spawn(async move {
            for i in 1..WRITES {
                kv.store(&format!("s/{i:04}"), &i.to_string())
                    .await
                    .unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut stream = kv.watch_prefix_from("s/", from).await.unwrap();
    let got = events(&mut stream, WRITES, "every write").await;
    within(PROMPTLY, "the writer", writer).await.unwrap();
    let keys: Vec<&str> = got.iter().map(WatchEvent::key).collect();
    let expected: Vec<String> = (0..WRITES).map(|i| format!("s/{i:04}")).collect();
    assert_eq!(keys, expected);
    assert!(
        got.windows(2).all(|p| p[0].revision() < p[1].revision()),
        "revisions strictly increase"
    );
    quiet(&mut stream, "after every write").await;
    kv.close().await.unwrap();
}

/// A revision below 1 is `InvalidArgument` from the call itself; a closed handle's stream
/// ends.
pub async fn watch_prefix_from_below_one_is_invalid_argument(store: TestStore) {
    let kv = store.open().await;
    for revision in [0, -1, i64::MIN] {
        match kv.watch_prefix_from("w/", revision).await {
            Err(Error::InvalidArgument { what, .. }) => assert_eq!(what, "watch revision"),
            Err(other) => panic!("revision {revision}: expected InvalidArgument, got {other:?}"),
            Ok(_) => panic!("revision {revision}: expected InvalidArgument, got a stream"),
        }
    }
    kv.store("w/a", "1").await.unwrap();
    let mut stream = kv.watch_prefix_from("", 1).await.unwrap();
    // Revision 1 predates every case's writes; on a store compacted since, the first item
    // is Compacted and the stream ends; otherwise the history holds the write above.
    let first = within(PROMPTLY, "the first item", stream.next()).await;
    match first {
        Some(Ok(_)) => {}
        Some(Err(Error::Compacted { revision, .. })) => {
            assert_eq!(revision, 1);
            let after = within(PROMPTLY, "the end", stream.next()).await;
            assert!(after.is_none(), "Compacted ends the stream: {after:?}");
        }
        other => panic!("watch from revision 1: {other:?}"),
    }
    kv.close().await.unwrap();
    within(PROMPTLY, "the stream to end with close", async {
        while let Some(item) = stream.next().await {
            drop(item);
        }
    })
    .await;
}
