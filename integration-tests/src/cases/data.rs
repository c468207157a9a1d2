//! The data API's reads and writes: metadata with etcd's meanings, `get_kv`, `get_prefix`,
//! `list` paging, `delete_prefix`, `store_temp`.
//!
//! Cases of one run share one store (the backends' store revision counts every case's
//! writes), so revisions are checked as etcd promises them to one client: strictly increasing
//! from write to write, equal within one write request. The exact count (one per write) is
//! checked by the differential test, which runs alone.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hmetcd_core::{CompareOp, Error, KeyValue, Kvi, ListPage, ListRequest, Op, Txn, WatchEvent};

use super::named_locks::take;
use super::{all_keys, next_event, pairs, within, PROMPTLY};
use crate::TestStore;

/// `kv`'s `get_kv(key)`, which must be present.
pub(crate) async fn kv_of(kv: &dyn Kvi, key: &str) -> KeyValue {
    kv.get_kv(key)
        .await
        .unwrap_or_else(|err| panic!("get_kv({key:?}): {err}"))
        .unwrap_or_else(|| panic!("get_kv({key:?}): missing"))
}

/// Stores every `(key, value)` in transactions of up to 100 puts (quick on etcd too).
pub(crate) async fn store_all(kv: &dyn Kvi, items: &[(String, String)]) {
    for chunk in items.chunks(100) {
        let txn = chunk
            .iter()
            .fold(Txn::new(), |txn, (k, v)| txn.then(Op::put(k, v)));
        let outcome = kv
            .txn(txn)
            .await
            .unwrap_or_else(|err| panic!("txn of {} puts: {err}", chunk.len()));
        assert!(outcome.succeeded, "a txn without compares succeeds");
    }
}

/// One page, which must be answered.
async fn page(kv: &dyn Kvi, request: ListRequest) -> ListPage {
    let what = format!("{request:?}");
    kv.list(request)
        .await
        .unwrap_or_else(|err| panic!("list {what}: {err}"))
}

fn keys(kvs: &[KeyValue]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

/// The metadata of a key: create and mod revision, version, lease — etcd's meanings. A put
/// sets mod revision (and create revision when it creates), version counts puts from 1 and a
/// delete resets it; a failed `tas`/transaction changes nothing; the lease is 0 for plain
/// keys and the handle's (one, nonzero) lease for `temp_key`/`store_temp`.
pub async fn metadata_has_etcds_meanings(store: TestStore) {
    let kv = store.open().await;
    assert_eq!(kv.get_kv("k").await.unwrap(), None);
    kv.store("k", "1").await.unwrap();
    let first = kv_of(kv.as_ref(), "k").await;
    assert_eq!(first.pair(), ("k", "1"));
    assert!(first.create_revision > 0, "{first:?}");
    assert_eq!(first.mod_revision, first.create_revision, "{first:?}");
    assert_eq!((first.version, first.lease), (1, 0), "{first:?}");

    kv.store("k", "2").await.unwrap();
    let second = kv_of(kv.as_ref(), "k").await;
    assert_eq!(second.create_revision, first.create_revision, "{second:?}");
    assert!(second.mod_revision > first.mod_revision, "{second:?}");
    assert_eq!((second.version, second.lease), (2, 0), "{second:?}");

    assert!(kv.tas("k", "2", "3").await.unwrap());
    let third = kv_of(kv.as_ref(), "k").await;
    assert!(third.mod_revision > second.mod_revision, "{third:?}");
    assert_eq!(third.version, 3, "{third:?}");
    assert!(!kv.tas("k", "2", "4").await.unwrap());
    assert_eq!(
        kv_of(kv.as_ref(), "k").await,
        third,
        "a failed tas changes nothing"
    );
    assert!(!kv
        .transaction("k", CompareOp::Equal, "x", "k2", "v", "k3", "v")
        .await
        .unwrap());
    assert_eq!(kv_of(kv.as_ref(), "k").await, third);
    assert!(kv
        .transaction("k", CompareOp::Equal, "3", "k", "4", "k3", "v")
        .await
        .unwrap());
    let fourth = kv_of(kv.as_ref(), "k").await;
    assert_eq!(fourth.version, 4, "{fourth:?}");
    assert!(fourth.mod_revision > third.mod_revision, "{fourth:?}");

    kv.delete("k").await.unwrap();
    assert_eq!(kv.get_kv("k").await.unwrap(), None);
    kv.store("k", "again").await.unwrap();
    let again = kv_of(kv.as_ref(), "k").await;
    assert!(again.create_revision > fourth.mod_revision, "{again:?}");
    assert_eq!(again.mod_revision, again.create_revision, "{again:?}");
    assert_eq!(
        (again.version, again.lease),
        (1, 0),
        "version restarts: {again:?}"
    );

    kv.temp_key("t").await.unwrap();
    kv.store_temp("s", "value").await.unwrap();
    let temp = kv_of(kv.as_ref(), "t").await;
    let stored = kv_of(kv.as_ref(), "s").await;
    assert_eq!(temp.pair(), ("t", "1"));
    assert_eq!(stored.pair(), ("s", "value"));
    assert_ne!(temp.lease, 0, "a temp key has the handle's lease: {temp:?}");
    assert_eq!(stored.lease, temp.lease, "one lease per handle");
    assert_eq!(stored.version, 1, "{stored:?}");
    assert!(stored.create_revision > temp.create_revision, "{stored:?}");
    let other = store.open().await;
    other.temp_key("o").await.unwrap();
    let foreign = kv_of(kv.as_ref(), "o").await;
    assert_ne!(foreign.lease, 0);
    assert_ne!(foreign.lease, temp.lease, "another handle, another lease");
    kv.store("s", "plain").await.unwrap();
    assert_eq!(
        kv_of(kv.as_ref(), "s").await.lease,
        0,
        "a plain put drops the lease"
    );

    // Every read gives the same metadata as get_kv (k3: the failed transaction's else write).
    let expected = [
        kv_of(kv.as_ref(), "k").await,
        kv_of(kv.as_ref(), "k3").await,
        kv_of(kv.as_ref(), "o").await,
        kv_of(kv.as_ref(), "s").await,
        kv_of(kv.as_ref(), "t").await,
    ];
    assert_eq!(kv.get_range("", super::LAST_KEY).await.unwrap(), expected);
    assert_eq!(kv.get_prefix("").await.unwrap(), expected);
    assert_eq!(
        page(kv.as_ref(), ListRequest::prefix("")).await.items,
        expected
    );
    let outcome = kv
        .txn(Txn::new().then(Op::get("k")).then(Op::get("t")))
        .await
        .unwrap();
    assert_eq!(
        outcome.gets,
        [Some(expected[0].clone()), Some(expected[4].clone())]
    );
    other.close().await.unwrap();
    kv.close().await.unwrap();
}

/// A watch of the case's whole prefix sees every write; revisions strictly increase from one
/// write request to the next — put, delete, txn, delete_prefix, the deletes of another
/// handle's temp keys when it closes (its lease revoked), a lock taken and released — and
/// the keys one request wrote share its revision.
pub async fn revisions_strictly_increase_across_every_kind_of_write(store: TestStore) {
    let kv = store.open().await;
    let mut events = kv.watch_prefix("").await.unwrap();
    let mut steps: Vec<Vec<WatchEvent>> = Vec::new();
    let mut take_events = async |count: usize, what: &str| {
        let mut got = Vec::new();
        for _ in 0..count {
            got.push(next_event(&mut events, PROMPTLY, what).await);
        }
        got
    };
    kv.store("a", "1").await.unwrap();
    steps.push(take_events(1, "put").await);
    kv.delete("a").await.unwrap();
    steps.push(take_events(1, "delete").await);
    let outcome = kv
        .txn(
            Txn::new()
                .then(Op::put("x/1", "1"))
                .then(Op::put("x/2", "2"))
                .then(Op::put("b", "b")),
        )
        .await
        .unwrap();
    let txn_events = take_events(3, "txn").await;
    assert!(
        txn_events.iter().all(|e| e.revision() == outcome.revision),
        "the txn's writes share its revision {}: {txn_events:?}",
        outcome.revision
    );
    steps.push(txn_events);
    assert_eq!(kv.delete_prefix("x/").await.unwrap(), 2);
    steps.push(take_events(2, "delete_prefix").await);
    let other = store.open().await;
    other.temp_key("t1").await.unwrap();
    steps.push(take_events(1, "temp_key").await);
    other.store_temp("t2", "v").await.unwrap();
    steps.push(take_events(1, "store_temp").await);
    other.close().await.unwrap();
    steps.push(take_events(2, "the other handle's close").await);
    let guard = take(kv.as_ref(), "jobs", "the case").await;
    steps.push(take_events(1, "lock").await);
    guard.unlock().await.unwrap();
    steps.push(take_events(1, "unlock").await);
    kv.store("b", "last").await.unwrap();
    steps.push(take_events(1, "last put").await);

    let mut last = 0;
    for step in &steps {
        let revision = step[0].revision();
        assert!(
            step.iter().all(|event| event.revision() == revision),
            "one request, one revision: {step:?}\nall: {steps:#?}"
        );
        assert!(revision > last, "revisions must increase: {steps:#?}");
        last = revision;
    }
    let keys_of = |i: usize| -> Vec<&str> { steps[i].iter().map(WatchEvent::key).collect() };
    assert_eq!(keys_of(3), ["x/1", "x/2"], "delete_prefix in key order");
    let mut closed = keys_of(6);
    closed.sort_unstable();
    assert_eq!(closed, ["t1", "t2"]);
    let read = page(kv.as_ref(), ListRequest::prefix("")).await;
    assert!(read.revision >= last, "{read:?} after revision {last}");
    assert_eq!(kv_of(kv.as_ref(), "b").await.mod_revision, last);
    kv.close().await.unwrap();
}

/// Keys that `get_range("nodes/", "nodes/~")` misses — after `~`, non-ASCII, DEL — are all
/// in `get_prefix("nodes/")`, sorted by bytes; keys beside the prefix are not; an empty
/// prefix is every key under the handle's prefix.
pub async fn get_prefix_includes_keys_sorting_after_tilde(store: TestStore) {
    let kv = store.open().await;
    let inside = [
        "nodes/a",
        "nodes/~",
        "nodes/~x",
        "nodes/é",
        "nodes/\u{7f}",
        "nodes/\u{10FFFF}",
        "nodes/",
        "nodes/z/deeper",
    ];
    let beside = ["nodes", "node", "nodesX", "nodes.", "a"];
    for key in inside.iter().chain(&beside) {
        kv.store(key, &format!("v {key}")).await.unwrap();
    }
    let mut expected: Vec<&str> = inside.to_vec();
    expected.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let got = kv.get_prefix("nodes/").await.unwrap();
    assert_eq!(keys(&got), expected);
    for item in &got {
        assert_eq!(item.value, format!("v {}", item.key));
        assert_eq!(*item, kv_of(kv.as_ref(), &item.key).await, "metadata");
    }
    let ranged = kv.get_range("nodes/", "nodes/~").await.unwrap();
    for missed in ["nodes/~x", "nodes/é", "nodes/\u{7f}", "nodes/\u{10FFFF}"] {
        assert!(
            ranged.iter().all(|kv| kv.key != missed),
            "get_range(\"nodes/\", \"nodes/~\") is said to miss {missed:?}"
        );
    }
    let everything = kv.get_prefix("").await.unwrap();
    assert_eq!(everything.len(), inside.len() + beside.len());
    assert_eq!(keys(&everything), all_keys(kv.as_ref()).await);
    assert_eq!(kv.get_prefix("nodes/~").await.unwrap().len(), 2);
    assert_eq!(kv.get_prefix("none/").await.unwrap(), []);
    // A handle whose prefix option ends inside the data sees only its part.
    let inner = store
        .open_with(&format!("prefix={}nodes/", store.prefix()))
        .await
        .unwrap();
    let seen = inner.get_prefix("").await.unwrap();
    let trimmed: Vec<&str> = expected
        .iter()
        .map(|k| k.trim_start_matches("nodes/"))
        .collect();
    assert_eq!(keys(&seen), trimmed);
    inner.close().await.unwrap();
    kv.close().await.unwrap();
}

/// `get_prefix` of a few thousand keys (read in pages by backends that page) gives every key
/// once, sorted.
pub async fn get_prefix_reads_thousands_of_keys(store: TestStore) {
    let kv = store.open().await;
    let items: Vec<(String, String)> = (0..3000)
        .map(|i| (format!("many/{i:05}"), "x".repeat(i % 50)))
        .collect();
    store_all(kv.as_ref(), &items).await;
    let got = kv.get_prefix("many/").await.unwrap();
    let expected: Vec<(&str, &str)> = items
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(pairs(&got), expected);
    kv.close().await.unwrap();
}

/// `list`'s `count`, `more`, `revision`, `keys_only`, `after` and inclusive ranges; `limit(0)`
/// is `InvalidArgument`.
pub async fn list_pages_say_count_more_and_revision(store: TestStore) {
    let kv = store.open().await;
    for key in ["l/a", "l/b", "l/c", "l/d", "l/e", "m"] {
        kv.store(key, &format!("v {key}")).await.unwrap();
    }
    let last = kv_of(kv.as_ref(), "m").await.mod_revision;
    let check = async |request: ListRequest, items: &[&str], more: bool, count: i64| {
        let what = format!("{request:?}");
        let keys_only = request.is_keys_only();
        let got = page(kv.as_ref(), request).await;
        assert_eq!(keys(&got.items), items, "items of {what}");
        assert_eq!(got.more, more, "more of {what}");
        assert_eq!(got.count, count, "count of {what}");
        assert!(got.revision >= last, "revision of {what}: {got:?}");
        for item in &got.items {
            let stored = kv_of(kv.as_ref(), &item.key).await;
            if keys_only {
                assert_eq!(item.value, "", "{what}");
                let mut blank = stored;
                blank.value = String::new();
                assert_eq!(*item, blank, "{what}");
            } else {
                assert_eq!(*item, stored, "{what}");
            }
        }
        got
    };
    let all = ["l/a", "l/b", "l/c", "l/d", "l/e"];
    check(ListRequest::prefix("l/"), &all, false, 5).await;
    check(ListRequest::prefix("l/").limit(5), &all, false, 5).await;
    check(ListRequest::prefix("l/").limit(9), &all, false, 5).await;
    check(ListRequest::prefix("l/").limit(2), &all[..2], true, 5).await;
    let after_b = ListRequest::prefix("l/").limit(2).after("l/b");
    check(after_b, &all[2..4], true, 3).await;
    check(
        ListRequest::prefix("l/").limit(2).after("l/d"),
        &all[4..],
        false,
        1,
    )
    .await;
    check(ListRequest::prefix("l/").after("l/e"), &[], false, 0).await;
    check(ListRequest::prefix("l/").after("l/bb"), &all[2..], false, 3).await;
    check(ListRequest::prefix("l/").after("a"), &all, false, 5).await;
    check(ListRequest::prefix("l/").keys_only(), &all, false, 5).await;
    check(
        ListRequest::prefix("l/").keys_only().limit(1),
        &all[..1],
        true,
        5,
    )
    .await;
    let everything = ["l/a", "l/b", "l/c", "l/d", "l/e", "m"];
    check(ListRequest::prefix(""), &everything, false, 6).await;
    check(ListRequest::prefix("none/"), &[], false, 0).await;
    check(ListRequest::range("l/b", "l/d"), &all[1..4], false, 3).await;
    check(
        ListRequest::range("l/b", "l/d").limit(1),
        &all[1..2],
        true,
        3,
    )
    .await;
    check(
        ListRequest::range("l/a", "l/e").after("l/b").limit(1),
        &all[2..3],
        true,
        3,
    )
    .await;
    check(ListRequest::range("", "l/b"), &all[..2], false, 2).await;
    check(ListRequest::range("l/d", "l/b"), &[], false, 0).await;
    check(ListRequest::range("l/d", "l/b").limit(1), &[], false, 0).await;
    check(ListRequest::range("l/c", "l/c"), &all[2..3], false, 1).await;
    check(
        ListRequest::range("l/a", super::LAST_KEY),
        &everything,
        false,
        6,
    )
    .await;
    for request in [
        ListRequest::prefix("l/").limit(0),
        ListRequest::range("a", "z").limit(0),
    ] {
        match kv.list(request).await {
            Err(Error::InvalidArgument { .. }) => {}
            other => panic!("limit(0) must be InvalidArgument, got {other:?}"),
        }
    }
    kv.close().await.unwrap();
}

/// Paging through a prefix to the end visits every key exactly once, in order, while other
/// tasks overwrite those keys and add and delete keys of their own; each page holds at most
/// `limit` items, `more` is false only on the last one, and `count` covers the page.
pub async fn list_paging_visits_every_key_once_while_others_write(store: TestStore) {
    let kv: Arc<dyn Kvi> = Arc::from(store.open().await);
    let items: Vec<(String, String)> = (0..300)
        .map(|i| (format!("p/{i:04}"), "0".to_owned()))
        .collect();
    store_all(kv.as_ref(), &items).await;
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for task in 0..4 {
        let kv = Arc::clone(&kv);
        let stop = Arc::clone(&stop);
        let progress = Arc::clone(&progress);
        writers.push(tokio::spawn(async move {
            let mut round = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let old = format!("p/{:04}", fastrand::usize(0..300));
                kv.store(&old, &round.to_string()).await.unwrap();
                // New keys (half deleted again) for a while, so that the prefix stays
                // bounded and the paging ends however fast the writers are.
                if round < 100 {
                    let new = format!("p/{:04}-{task}-{round}", fastrand::usize(0..300));
                    kv.store(&new, "new").await.unwrap();
                    if round % 2 == 1 {
                        kv.delete(&new).await.unwrap();
                    }
                }
                round += 1;
                progress.fetch_add(1, Ordering::Relaxed);
                // The memory store answers without yielding: let the reader run.
                tokio::task::yield_now().await;
            }
            round
        }));
    }
    const LIMIT: usize = 7;
    let mut seen: Vec<String> = Vec::new();
    let mut request = ListRequest::prefix("p/").limit(LIMIT);
    let mut pages = 0;
    loop {
        // Some writes between any two pages (the memory store answers without yielding).
        let before = progress.load(Ordering::Relaxed);
        for _ in 0..500 {
            if progress.load(Ordering::Relaxed) > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let got = page(kv.as_ref(), request.clone()).await;
        pages += 1;
        assert!(got.items.len() <= LIMIT, "{got:?}");
        assert!(got.count >= got.items.len() as i64, "{got:?}");
        seen.extend(got.items.iter().map(|item| item.key.clone()));
        match got.items.last() {
            Some(last) if got.more => request = request.after(last.key.clone()),
            _ => {
                assert!(!got.more, "more with an empty page: {got:?}");
                break;
            }
        }
        assert!(pages < 1000, "paging does not end");
    }
    stop.store(true, Ordering::Relaxed);
    let mut rounds = 0;
    for writer in writers {
        rounds += within(PROMPTLY, "a writer to stop", writer).await.unwrap();
    }
    assert!(
        rounds > 0,
        "the writers wrote nothing while the pages were read"
    );
    assert!(
        seen.windows(2).all(|pair| pair[0] < pair[1]),
        "keys repeated or out of order"
    );
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for key in &seen {
        *counts.entry(key.as_str()).or_default() += 1;
    }
    for (key, _) in &items {
        assert_eq!(counts.get(key.as_str()), Some(&1), "{key} visited once");
    }
    kv.close().await.unwrap();
}

/// `delete_prefix` deletes exactly the keys starting with the prefix, says how many, and
/// refuses an empty prefix with `InvalidKey`, deleting nothing.
pub async fn delete_prefix_counts_and_refuses_an_empty_prefix(store: TestStore) {
    let kv = store.open().await;
    for key in ["p", "p/1", "p/2", "p/x/3", "p/\u{10FFFF}", "q/1", "o"] {
        kv.store(key, "v").await.unwrap();
    }
    match kv.delete_prefix("").await {
        Err(Error::InvalidKey { .. }) => {}
        other => panic!("delete_prefix(\"\") must be InvalidKey, got {other:?}"),
    }
    assert_eq!(all_keys(kv.as_ref()).await.len(), 7, "nothing deleted");
    assert_eq!(kv.delete_prefix("p/").await.unwrap(), 4);
    assert_eq!(all_keys(kv.as_ref()).await, ["o", "p", "q/1"]);
    assert_eq!(kv.delete_prefix("p/").await.unwrap(), 0);
    assert_eq!(kv.delete_prefix("none").await.unwrap(), 0);
    assert_eq!(kv.delete_prefix("p").await.unwrap(), 1);
    assert_eq!(all_keys(kv.as_ref()).await, ["o", "q/1"]);
    let other = store.open().await;
    assert_eq!(other.delete_prefix("q").await.unwrap(), 1);
    assert_eq!(all_keys(kv.as_ref()).await, ["o"]);
    other.close().await.unwrap();
    kv.close().await.unwrap();
}

/// `store_temp` stores the caller's value on the handle's lease: others read it, it can be
/// overwritten, and it vanishes when the handle closes; an empty key is `InvalidKey`.
pub async fn store_temp_keeps_its_value_and_vanishes_on_close(store: TestStore) {
    let kv = store.open().await;
    let other = store.open().await;
    kv.store_temp("svc/a", "10.0.0.1:80").await.unwrap();
    kv.store_temp("svc/empty", "").await.unwrap();
    assert_eq!(
        other.get("svc/a").await.unwrap().as_deref(),
        Some("10.0.0.1:80")
    );
    assert_eq!(other.get("svc/empty").await.unwrap().as_deref(), Some(""));
    kv.store_temp("svc/a", "10.0.0.2:80").await.unwrap();
    let a = kv_of(other.as_ref(), "svc/a").await;
    assert_eq!((a.value.as_str(), a.version), ("10.0.0.2:80", 2));
    assert_ne!(a.lease, 0);
    assert!(matches!(
        kv.store_temp("", "v").await,
        Err(Error::InvalidKey { .. })
    ));
    kv.close().await.unwrap();
    assert_eq!(
        other.get_prefix("svc/").await.unwrap(),
        [],
        "gone with close"
    );
    other.close().await.unwrap();
}

/// `get_kv` of an absent key is `None`; empty keys and prefixes are `InvalidKey` where the
/// contract says so; every data call after `close` is `Closed`.
pub async fn data_calls_check_keys_and_fail_closed_after_close(store: TestStore) {
    let kv = store.open().await;
    assert_eq!(kv.get_kv("absent").await.unwrap(), None);
    assert!(matches!(kv.get_kv("").await, Err(Error::InvalidKey { .. })));
    kv.close().await.unwrap();
    let closed = |what: &str, err: Option<Error>| match err {
        Some(Error::Closed) => {}
        other => panic!("{what} after close: {other:?}"),
    };
    closed("get_kv", kv.get_kv("k").await.err());
    closed("get_prefix", kv.get_prefix("").await.err());
    closed("list", kv.list(ListRequest::prefix("")).await.err());
    closed("delete_prefix", kv.delete_prefix("p").await.err());
    closed("store_temp", kv.store_temp("k", "v").await.err());
    closed(
        "txn",
        kv.txn(Txn::new().then(Op::put("k", "v"))).await.err(),
    );
    closed(
        "update",
        kv.update("k", &mut |_| Some("v".to_owned())).await.err(),
    );
    closed("watch_prefix_from", kv.watch_prefix_from("", 1).await.err());
}
