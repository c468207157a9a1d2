//! The data API on the memory store: metadata and revision counting, pages, transactions,
//! history and its compaction.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use hmetcd_core::{Compare, CompareOp, Error, KeyValue, Kvi, ListRequest, LostReason, Op, Txn};

use crate::MemKvs;

fn revision(kv: &MemKvs) -> i64 {
    kv.faults().revision()
}

async fn kv_of(kv: &MemKvs, key: &str) -> KeyValue {
    kv.get_kv(key).await.unwrap().expect("key present")
}

fn meta(kv: &KeyValue) -> (i64, i64, i64) {
    (kv.create_revision, kv.mod_revision, kv.version)
}

/// The next `n` events of `stream`, failing if one is an error or does not come at once.
async fn next_events(stream: &mut hmetcd_core::WatchStream, n: usize) -> Vec<(String, i64)> {
    let mut events = Vec::new();
    for _ in 0..n {
        let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on")
            .expect("an event, not an error");
        let shown = match event.value() {
            Some(value) => format!("put {}={value}", event.key()),
            None => format!("delete {}", event.key()),
        };
        events.push((shown, event.revision()));
    }
    events
}

/// Nothing more is in `stream` now.
async fn nothing_more(stream: &mut hmetcd_core::WatchStream) {
    tokio::task::yield_now().await;
    assert!(
        futures::FutureExt::now_or_never(stream.next()).is_none(),
        "no further event"
    );
}

#[tokio::test]
async fn revisions_count_changing_requests_and_versions_restart_after_a_delete() {
    let kv = MemKvs::new();
    assert_eq!(revision(&kv), 1, "a fresh store is at revision 1, as etcd");
    kv.store("a", "1").await.unwrap();
    assert_eq!(meta(&kv_of(&kv, "a").await), (2, 2, 1));
    kv.store("a", "2").await.unwrap();
    assert_eq!(meta(&kv_of(&kv, "a").await), (2, 3, 2));
    kv.delete("missing").await.unwrap();
    assert!(!kv.tas("a", "nope", "x").await.unwrap());
    assert_eq!(revision(&kv), 3, "no bump for nothing changed");
    kv.delete("a").await.unwrap();
    assert_eq!(revision(&kv), 4);
    assert_eq!(kv.get_kv("a").await.unwrap(), None);
    kv.store("a", "3").await.unwrap();
    assert_eq!(
        meta(&kv_of(&kv, "a").await),
        (5, 5, 1),
        "recreated: new create revision, version from 1"
    );
    assert_eq!(kv_of(&kv, "a").await.lease, 0);
    kv.temp_key("t").await.unwrap();
    let temp = kv_of(&kv, "t").await;
    assert_ne!(temp.lease, 0, "a temp key carries its lease");
    let range = kv.get_range("a", "z").await.unwrap();
    assert_eq!(range, vec![kv_of(&kv, "a").await, temp.clone()]);
    // A plain put detaches the key from its lease, as in etcd.
    kv.store("t", "plain").await.unwrap();
    assert_eq!(kv_of(&kv, "t").await.lease, 0);
    assert_eq!(kv_of(&kv, "t").await.version, 2);
}

#[tokio::test]
async fn a_lost_lease_deletes_its_keys_in_one_revision_and_restores_their_values() {
    let kv = MemKvs::new();
    let other = kv.open_sibling("").unwrap();
    kv.temp_key("t/1").await.unwrap();
    kv.store_temp("t/2", "mine").await.unwrap();
    let guard = kv.lock("jobs").await.unwrap();
    let mut events = other.watch_prefix("").await.unwrap();
    let before = revision(&kv);
    kv.faults().expire_lease();
    let lost = tokio::time::timeout(Duration::from_secs(5), guard.lost()).await;
    assert_eq!(lost.expect("the guard is lost"), LostReason::SessionLost);
    let deleted = next_events(&mut events, 3).await;
    assert!(
        deleted.iter().all(|(_, rev)| *rev == before + 1),
        "{deleted:?}"
    );
    let restored = next_events(&mut events, 2).await;
    assert_eq!(
        restored,
        vec![
            ("put t/1=1".to_owned(), before + 2),
            ("put t/2=mine".to_owned(), before + 2)
        ]
    );
    assert_eq!(kv.get("t/2").await.unwrap().as_deref(), Some("mine"));
    let restored = kv_of(&kv, "t/2").await;
    assert_eq!(meta(&restored), (before + 2, before + 2, 1));
    assert_ne!(restored.lease, 0);
}

#[tokio::test]
async fn lists_page_count_and_read_at_one_revision() {
    let kv = MemKvs::open("data-tests-list", "prefix=svc/").unwrap();
    let outside = MemKvs::open("data-tests-list", "").unwrap();
    outside.store("other", "x").await.unwrap();
    outside.store("svc~", "x").await.unwrap();
    for key in ["n/a", "n/b", "n/c", "n/~z", "o"] {
        kv.store(key, key).await.unwrap();
    }
    let all = kv.get_prefix("n/").await.unwrap();
    let keys: Vec<&str> = all.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["n/a", "n/b", "n/c", "n/~z"]);
    assert_eq!(
        kv.get_prefix("").await.unwrap().len(),
        5,
        "only under the prefix"
    );

    let page = kv.list(ListRequest::prefix("n/").limit(2)).await.unwrap();
    assert_eq!(page.items.len(), 2);
    assert!(page.more);
    assert_eq!(page.count, 4);
    assert_eq!(page.revision, revision(&kv));
    let next = kv
        .list(ListRequest::prefix("n/").limit(2).after("n/b").keys_only())
        .await
        .unwrap();
    assert_eq!(next.count, 2, "what matches after `after`");
    assert!(!next.more);
    assert_eq!(next.items[0].pair(), ("n/c", ""));
    assert_eq!(next.items[1].key, "n/~z");
    assert_ne!(
        next.items[1].mod_revision, 0,
        "keys_only keeps the metadata"
    );

    let range = kv.list(ListRequest::range("n/b", "o")).await.unwrap();
    assert_eq!(range.count, 4);
    assert_eq!(range.items.last().map(|kv| kv.key.as_str()), Some("o"));
    let empty = kv.list(ListRequest::range("o", "n")).await.unwrap();
    assert_eq!((empty.items.len(), empty.more, empty.count), (0, false, 0));
    assert!(matches!(
        kv.list(ListRequest::prefix("").limit(0)).await,
        Err(Error::InvalidArgument { .. })
    ));
}

#[tokio::test]
async fn delete_prefix_is_one_revision_in_key_order() {
    let kv = MemKvs::new();
    for key in ["p/b", "p/a", "p/c", "q"] {
        kv.store(key, "v").await.unwrap();
    }
    let mut events = kv.watch_prefix("").await.unwrap();
    let before = revision(&kv);
    assert_eq!(kv.delete_prefix("p/").await.unwrap(), 3);
    assert_eq!(
        next_events(&mut events, 3).await,
        vec![
            ("delete p/a".to_owned(), before + 1),
            ("delete p/b".to_owned(), before + 1),
            ("delete p/c".to_owned(), before + 1)
        ]
    );
    assert_eq!(kv.delete_prefix("p/").await.unwrap(), 0);
    assert_eq!(revision(&kv), before + 1, "nothing deleted, no revision");
    assert!(matches!(
        kv.delete_prefix("").await,
        Err(Error::InvalidKey { .. })
    ));
    assert_eq!(kv.get("q").await.unwrap().as_deref(), Some("v"));
}

#[tokio::test]
async fn a_txn_runs_its_branch_in_order_at_one_revision() {
    let kv = MemKvs::new();
    kv.store("a", "old").await.unwrap();
    kv.store("c", "gone").await.unwrap();
    let mut events = kv.watch_prefix("").await.unwrap();
    let before = revision(&kv);
    let outcome = kv
        .txn(
            Txn::new()
                .when(Compare::value("a", CompareOp::Equal, "old"))
                .when(Compare::version("b", CompareOp::Equal, 0))
                .then(Op::put("a", "new"))
                .then(Op::get("a"))
                .then(Op::put("b", "1"))
                .then(Op::delete("c"))
                .then(Op::get("c"))
                .then(Op::get("b"))
                .otherwise(Op::put("never", "x")),
        )
        .await
        .unwrap();
    assert!(outcome.succeeded);
    assert_eq!(outcome.revision, before + 1, "one revision for every write");
    let gets: Vec<Option<(String, i64, i64)>> = outcome
        .gets
        .iter()
        .map(|kv| {
            kv.as_ref()
                .map(|kv| (kv.value.clone(), kv.mod_revision, kv.version))
        })
        .collect();
    assert_eq!(
        gets,
        vec![
            Some(("new".to_owned(), before + 1, 2)),
            None,
            Some(("1".to_owned(), before + 1, 1))
        ],
        "gets see the branch's earlier writes"
    );
    assert_eq!(
        next_events(&mut events, 3).await,
        vec![
            ("put a=new".to_owned(), before + 1),
            ("put b=1".to_owned(), before + 1),
            ("delete c".to_owned(), before + 1)
        ]
    );

    // The other branch, which writes nothing: no revision.
    let outcome = kv
        .txn(
            Txn::new()
                .when(Compare::value("c", CompareOp::NotEqual, "x"))
                .then(Op::put("never", "x"))
                .otherwise(Op::delete("c"))
                .otherwise(Op::get("b")),
        )
        .await
        .unwrap();
    assert!(
        !outcome.succeeded,
        "a missing key fails every value compare"
    );
    assert_eq!(outcome.revision, before + 1);
    assert_eq!(outcome.gets.len(), 1);
    assert_eq!(kv.get("never").await.unwrap(), None);
    nothing_more(&mut events).await;

    assert!(matches!(
        kv.txn(Txn::new()).await,
        Err(Error::InvalidArgument { .. })
    ));
    kv.close().await.unwrap();
    assert!(matches!(
        kv.txn(Txn::new().then(Op::get("a"))).await,
        Err(Error::Closed)
    ));
}

#[tokio::test]
async fn a_txn_keeps_the_lock_queues_as_plain_writes_do() {
    let a = MemKvs::open("data-tests-txn-locks", "").unwrap();
    let b = a.open_sibling("").unwrap();
    let guard = a.lock("jobs").await.unwrap();
    let held = Txn::new()
        .when(Compare::held(&guard))
        .then(Op::put("jobs/state", "done"));
    assert!(a.txn(held.clone()).await.unwrap().succeeded);
    let waiting = tokio::spawn(async move {
        let guard = b.lock("jobs").await;
        (b, guard)
    });
    tokio::task::yield_now().await;
    // Deleting the holder's key in a transaction hands the lock over, as a plain delete does.
    let outcome = a
        .txn(Txn::new().then(Op::delete(guard.key())))
        .await
        .unwrap();
    assert!(outcome.succeeded);
    let lost = tokio::time::timeout(Duration::from_secs(5), guard.lost()).await;
    assert_eq!(lost.expect("the guard is lost"), LostReason::KeyDeleted);
    let (b, taken) = waiting.await.unwrap();
    let taken = taken.unwrap();
    assert!(taken.fencing_token() > guard.fencing_token());
    assert!(
        !a.txn(held).await.unwrap().succeeded,
        "a lost lock fences its writes"
    );
    // A lock-shaped key put in a transaction queues like any client's key.
    let foreign = "jobs/abc";
    a.txn(Txn::new().then(Op::put(foreign, ""))).await.unwrap();
    taken.unlock().await.unwrap();
    let next = tokio::time::timeout(
        Duration::from_millis(50),
        b.lock_with("jobs", hmetcd_core::LockOptions::new()),
    )
    .await;
    assert!(next.is_err(), "the foreign key holds the lock now");
    a.txn(Txn::new().then(Op::delete_prefix("jobs/a")))
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), b.lock("jobs"))
        .await
        .expect("the lock is free again");
    assert!(next.is_ok());
}

#[tokio::test]
async fn a_txn_put_temp_is_on_the_lease_and_put_back_with_its_value() {
    let kv = MemKvs::new();
    let outcome = kv
        .txn(Txn::new().then(Op::put_temp("w/1", "busy")))
        .await
        .unwrap();
    assert!(outcome.succeeded);
    assert_ne!(kv_of(&kv, "w/1").await.lease, 0);
    // Not the branch that ran: not remembered.
    kv.txn(
        Txn::new()
            .when(Compare::exists("w/1"))
            .then(Op::get("w/1"))
            .otherwise(Op::put_temp("w/2", "no")),
    )
    .await
    .unwrap();
    let lease = kv_of(&kv, "w/1").await.lease;
    kv.faults().expire_lease();
    let back = kv_of(&kv, "w/1").await;
    assert_eq!(back.value, "busy");
    assert_ne!(back.lease, lease, "on the new lease");
    assert_eq!(kv.get("w/2").await.unwrap(), None);
    // A plain write in a txn makes it an ordinary key again.
    kv.txn(Txn::new().then(Op::put("w/1", "plain")))
        .await
        .unwrap();
    kv.faults().expire_lease();
    assert_eq!(kv.get("w/1").await.unwrap().as_deref(), Some("plain"));
}

#[tokio::test]
async fn watch_prefix_from_replays_history_then_goes_live() {
    let kv = MemKvs::new();
    kv.store("w/a", "1").await.unwrap();
    let first = revision(&kv);
    kv.store("x", "not watched").await.unwrap();
    kv.store("w/b", "2").await.unwrap();
    kv.delete("w/a").await.unwrap();
    let mut stream = kv.watch_prefix_from("w/", first).await.unwrap();
    kv.store("w/c", "3").await.unwrap();
    assert_eq!(
        next_events(&mut stream, 4).await,
        vec![
            ("put w/a=1".to_owned(), first),
            ("put w/b=2".to_owned(), first + 2),
            ("delete w/a".to_owned(), first + 3),
            ("put w/c=3".to_owned(), first + 4)
        ]
    );
    nothing_more(&mut stream).await;

    // From a future revision: nothing before it.
    let now = revision(&kv);
    let mut future = kv.watch_prefix_from("w/", now + 2).await.unwrap();
    kv.store("w/d", "skipped").await.unwrap();
    kv.store("w/e", "seen").await.unwrap();
    assert_eq!(
        next_events(&mut future, 1).await,
        vec![("put w/e=seen".to_owned(), now + 2)]
    );
    nothing_more(&mut future).await;

    assert!(matches!(
        kv.watch_prefix_from("w/", 0).await,
        Err(Error::InvalidArgument { what, .. }) if what == "watch revision"
    ));
}

#[tokio::test]
async fn a_watch_below_the_compaction_is_compacted_and_from_it_works() {
    let kv = MemKvs::open("data-tests-compact", "prefix=p/").unwrap();
    for i in 0..5 {
        kv.store(&format!("w/{i}"), "v").await.unwrap();
    }
    let at = revision(&kv) - 2;
    kv.faults().compact(at);
    let mut stream = kv.watch_prefix_from("w/", at).await.unwrap();
    assert_eq!(next_events(&mut stream, 3).await.len(), 3);
    let mut compacted = kv.watch_prefix_from("w/", at - 1).await.unwrap();
    match compacted.next().await {
        Some(Err(Error::Compacted {
            key,
            revision,
            compact_revision,
        })) => {
            assert_eq!(
                (key.as_str(), revision, compact_revision),
                ("w/", at - 1, at)
            );
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(compacted.next().await.is_none(), "then the stream ends");
    kv.faults().compact(1);
    assert!(
        matches!(
            kv.watch_prefix_from("w/", at - 1).await.unwrap().next().await,
            Some(Err(Error::Compacted { compact_revision, .. })) if compact_revision == at
        ),
        "a compaction never goes back"
    );
}

#[tokio::test]
async fn the_history_compacts_itself_keeping_the_last_history_revisions() {
    let kv = MemKvs::open("data-tests-history", "history=10").unwrap();
    // A handle asking for less does not shrink the store's history.
    let small = kv.open_sibling("history=3").unwrap();
    // Revisions 2..=30; the log compacts itself at 21 (down to 12; 33 would be next).
    for i in 2..=30 {
        small.store("k", &i.to_string()).await.unwrap();
    }
    assert_eq!(revision(&kv), 30);
    assert!(matches!(
        kv.watch_prefix_from("k", 11).await.unwrap().next().await,
        Some(Err(Error::Compacted {
            compact_revision: 12,
            ..
        }))
    ));
    let mut stream = kv.watch_prefix_from("k", 12).await.unwrap();
    let replayed = next_events(&mut stream, 19).await;
    assert_eq!(replayed.first(), Some(&("put k=12".to_owned(), 12)));
    assert_eq!(replayed.last(), Some(&("put k=30".to_owned(), 30)));
    nothing_more(&mut stream).await;
    // However far it goes, the last 10 revisions stay.
    for i in 31..=200 {
        kv.store("k", &i.to_string()).await.unwrap();
        let mut last = kv.watch_prefix_from("k", i - 9).await.unwrap();
        assert_eq!(next_events(&mut last, 10).await.len(), 10);
        let logged = kv.session.store.logged();
        assert!(logged <= 30, "{logged} events logged for a history of 10");
    }
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_history_watch_catches_up() {
    let kv = MemKvs::open("data-tests-partition", "lease_ttl=30s").unwrap();
    let other = kv.open_sibling("").unwrap();
    other.store("w/1", "a").await.unwrap();
    let from = revision(&kv);
    let mut stream = kv.watch_prefix_from("w/", from).await.unwrap();
    assert_eq!(next_events(&mut stream, 1).await.len(), 1);
    kv.faults().partition(true);
    assert!(matches!(
        kv.watch_prefix_from("w/", 1).await,
        Err(Error::Unavailable { .. })
    ));
    assert!(matches!(
        kv.txn(Txn::new().then(Op::get("w/1"))).await,
        Err(Error::Unavailable { .. })
    ));
    assert!(matches!(
        kv.get_kv("w/1").await,
        Err(Error::Unavailable { .. })
    ));
    assert!(matches!(
        kv.list(ListRequest::prefix("w/")).await,
        Err(Error::Unavailable { .. })
    ));
    other.store("w/2", "b").await.unwrap();
    other.store("w/3", "c").await.unwrap();
    nothing_more(&mut stream).await;
    kv.faults().partition(false);
    assert_eq!(
        next_events(&mut stream, 2).await,
        vec![
            ("put w/2=b".to_owned(), from + 1),
            ("put w/3=c".to_owned(), from + 2)
        ]
    );
    other.store("w/4", "d").await.unwrap();
    assert_eq!(next_events(&mut stream, 1).await.len(), 1);
    nothing_more(&mut stream).await;
}
