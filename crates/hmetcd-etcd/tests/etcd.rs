//! The etcd backend against a real etcd server, started by each test (see `support`).
//! Every test fails with a clear message when no etcd binary is available.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use futures::StreamExt;
use hmetcd_core::{CompareOp, Error, KeyChange, KeyValue, Kvi, LockOptions, WatchEvent};
use hmetcd_etcd::EtcdKvs;
use support::EtcdServer;

async fn open(server: &EtcdServer, options: &str) -> EtcdKvs {
    EtcdKvs::connect(&server.endpoint(), options).await.unwrap()
}

async fn raw_keys(server: &EtcdServer, prefix: &str) -> Vec<String> {
    let mut raw = server.raw_client().await;
    let answer = raw
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    answer
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_writes_ranges_and_conditional_writes() {
    let server = EtcdServer::start().await;
    let kv = open(&server, "").await;

    assert_eq!(kv.get("a").await.unwrap(), None);
    kv.store("a", "").await.unwrap();
    assert_eq!(kv.get("a").await.unwrap().as_deref(), Some(""));
    kv.store("a", "1").await.unwrap();
    assert_eq!(kv.get("a").await.unwrap().as_deref(), Some("1"));
    kv.delete("a").await.unwrap();
    kv.delete("a").await.unwrap();
    assert_eq!(kv.get("a").await.unwrap(), None);

    for key in ["r/a", "r/b", "r/c", "r/d"] {
        kv.store(key, &key.to_uppercase()).await.unwrap();
    }
    let keys = |found: Vec<KeyValue>| found.into_iter().map(|pair| pair.key).collect::<Vec<_>>();
    assert_eq!(
        keys(kv.get_range("r/b", "r/c").await.unwrap()),
        ["r/b", "r/c"]
    );
    // Each key was put once, in order, one revision each: metadata is etcd's.
    let found = kv.get_range("r/a", "r/a").await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].pair(), ("r/a", "R/A"));
    assert!(found[0].create_revision > 0);
    assert_eq!(found[0].mod_revision, found[0].create_revision);
    assert_eq!((found[0].version, found[0].lease), (1, 0));
    assert_eq!(keys(kv.get_range("", "r/b").await.unwrap()), ["r/a", "r/b"]);
    assert!(kv.get_range("r/c", "r/b").await.unwrap().is_empty());
    assert!(kv.get_range("r/a", "").await.unwrap().is_empty());
    assert!(kv.get_range("", "").await.unwrap().is_empty());
    assert_eq!(
        keys(kv.get_range("r/", "r/\u{10FFFF}").await.unwrap()),
        ["r/a", "r/b", "r/c", "r/d"]
    );

    // A comparison on a missing key is false for every operator, as etcd decides.
    for op in [
        CompareOp::Equal,
        CompareOp::NotEqual,
        CompareOp::Less,
        CompareOp::Greater,
    ] {
        let then_ran = kv
            .transaction("t/missing", op, "x", "t/then", "1", "t/else", "1")
            .await
            .unwrap();
        assert!(!then_ran, "{op} on a missing key ran the then-branch");
        assert_eq!(kv.get("t/then").await.unwrap(), None, "{op}");
        assert_eq!(kv.get("t/else").await.unwrap().as_deref(), Some("1"));
        kv.delete("t/else").await.unwrap();
    }
    kv.store("t/k", "m").await.unwrap();
    for (op, value, expected) in [
        (CompareOp::Equal, "m", true),
        (CompareOp::Equal, "n", false),
        (CompareOp::NotEqual, "n", true),
        (CompareOp::NotEqual, "m", false),
        (CompareOp::Less, "n", true),
        (CompareOp::Less, "m", false),
        (CompareOp::Greater, "l", true),
        (CompareOp::Greater, "m", false),
    ] {
        let then_ran = kv
            .transaction("t/k", op, value, "t/then", "T", "t/else", "E")
            .await
            .unwrap();
        assert_eq!(then_ran, expected, "m {op} {value}");
    }

    assert!(!kv.tas("tas/missing", "", "set").await.unwrap());
    assert_eq!(
        kv.get("tas/missing").await.unwrap(),
        None,
        "tas created a missing key"
    );
    kv.store("tas/k", "old").await.unwrap();
    assert!(!kv.tas("tas/k", "other", "new").await.unwrap());
    assert!(kv.tas("tas/k", "old", "new").await.unwrap());
    assert_eq!(kv.get("tas/k").await.unwrap().as_deref(), Some("new"));

    for err in [
        kv.store("", "v").await.unwrap_err(),
        kv.get("").await.unwrap_err(),
        kv.temp_key("").await.unwrap_err(),
        kv.transaction("k", CompareOp::Equal, "v", "", "1", "e", "1")
            .await
            .unwrap_err(),
        kv.transaction("k", CompareOp::Equal, "v", "t", "1", "", "1")
            .await
            .unwrap_err(),
        kv.tas("", "a", "b").await.unwrap_err(),
    ] {
        assert!(matches!(err, Error::InvalidKey { .. }), "{err}");
    }
    assert_eq!(kv.get("t").await.unwrap(), None);

    // Raw bytes written by another client are an error naming the key, never a lossy string.
    let mut raw = server.raw_client().await;
    raw.put("bin", vec![0xff_u8, 0xfe], None).await.unwrap();
    let err = kv.get("bin").await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidUtf8 { key, .. } if key == "bin"),
        "{err}"
    );

    kv.close().await.unwrap();
    kv.close().await.unwrap();
    assert!(matches!(kv.get("a").await, Err(Error::Closed)));
    assert!(matches!(kv.dist_lock().await, Err(Error::Closed)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_is_applied_and_hidden() {
    let server = EtcdServer::start().await;
    let kv = open(&server, "prefix=svc/").await;
    let other = open(&server, "").await;
    kv.store("a", "1").await.unwrap();
    kv.store("b", "2").await.unwrap();
    other.store("c", "outside").await.unwrap();
    assert_eq!(other.get("svc/a").await.unwrap().as_deref(), Some("1"));
    let pairs = |found: Vec<KeyValue>| {
        found
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        pairs(kv.get_range("", "z").await.unwrap()),
        [
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned())
        ]
    );
    let mut events = kv.watch_prefix("").await.unwrap();
    other.store("c", "still outside").await.unwrap();
    kv.store("d", "4").await.unwrap();
    let event = events.next().await.unwrap().unwrap();
    assert!(
        matches!(&event, WatchEvent::Put { key, value, .. } if key == "d" && value == "4"),
        "{event:?}"
    );
    // One transaction writing two keys: two events of one revision, both delivered.
    let mut raw = server.raw_client().await;
    let txn = etcd_client::Txn::new().and_then([
        etcd_client::TxnOp::put("svc/e", "5", None),
        etcd_client::TxnOp::put("svc/f", "6", None),
    ]);
    raw.txn(txn).await.unwrap();
    let mut both = Vec::new();
    while both.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event of the transaction never came");
        both.push(event.unwrap().unwrap());
    }
    let (e, f) = (&both[0], &both[1]);
    assert_eq!((e.key(), f.key()), ("e", "f"));
    assert_eq!(e.revision(), f.revision());
    kv.dist_lock().await.unwrap();
    let lock_keys = raw_keys(&server, "svc/hbtd_dist_lock/").await;
    assert_eq!(lock_keys.len(), 1, "{lock_keys:?}");
    kv.close().await.unwrap();
    other.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_keys_live_with_the_handle() {
    let server = EtcdServer::start().await;
    let kv = open(&server, "lease_ttl=2s").await;
    let observer = open(&server, "").await;
    kv.temp_key("tmp/closed").await.unwrap();
    assert_eq!(
        observer.get("tmp/closed").await.unwrap().as_deref(),
        Some("1")
    );
    // Kept alive well past its TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        observer.get("tmp/closed").await.unwrap().as_deref(),
        Some("1")
    );
    kv.close().await.unwrap();
    assert_eq!(
        observer.get("tmp/closed").await.unwrap(),
        None,
        "temp key outlived close"
    );

    // Dropped without closing: the lease is no longer kept alive and expires.
    let dropped = open(&server, "lease_ttl=2s").await;
    dropped.temp_key("tmp/dropped").await.unwrap();
    drop(dropped);
    let deadline = Instant::now() + Duration::from_secs(6);
    while observer.get("tmp/dropped").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "temp key of a dropped handle outlived its lease"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The lease is lost behind the handle's back: a new lease, and the temp keys come back.
    let kv = open(&server, "lease_ttl=2s").await;
    kv.temp_key("tmp/restored").await.unwrap();
    let mut raw = server.raw_client().await;
    let lease = raw.get("tmp/restored", None).await.unwrap().kvs()[0].lease();
    raw.lease_revoke(lease).await.unwrap();
    assert_eq!(observer.get("tmp/restored").await.unwrap(), None);
    let deadline = Instant::now() + Duration::from_secs(6);
    while observer.get("tmp/restored").await.unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "temp key was not put back on a new lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new_lease = raw.get("tmp/restored", None).await.unwrap().kvs()[0].lease();
    assert_ne!(new_lease, lease);
    kv.close().await.unwrap();
    assert_eq!(observer.get("tmp/restored").await.unwrap(), None);
    observer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_excludes_queues_fifo_and_times_out_without_trace() {
    let server = EtcdServer::start().await;
    let first = Arc::new(open(&server, "").await);
    let second = Arc::new(open(&server, "").await);
    let third = Arc::new(open(&server, "").await);

    first.dist_lock().await.unwrap();
    first.dist_lock().await.unwrap(); // already held: at once
    let keys = raw_keys(&server, "hbtd_dist_lock/").await;
    assert_eq!(keys.len(), 1);
    let lease = format!(
        "{:x}",
        server
            .raw_client()
            .await
            .get(keys[0].as_str(), None)
            .await
            .unwrap()
            .kvs()[0]
            .lease()
    );
    assert_eq!(
        keys[0],
        format!("hbtd_dist_lock/{lease}"),
        "lock key layout differs from Go's"
    );

    let err = second
        .dist_timed_lock(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::LockTimeout { lock, .. } if lock == "hbtd_dist_lock"),
        "{err}"
    );
    assert_eq!(
        raw_keys(&server, "hbtd_dist_lock/").await.len(),
        1,
        "a timed-out waiter left its key"
    );

    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let waiter =
        |kv: Arc<EtcdKvs>, name: &'static str, order: Arc<std::sync::Mutex<Vec<&'static str>>>| {
            tokio::spawn(async move {
                kv.dist_lock().await.unwrap();
                order.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(200)).await;
                kv.dist_unlock().await.unwrap();
            })
        };
    let second_waits = waiter(Arc::clone(&second), "second", Arc::clone(&order));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third_waits = waiter(Arc::clone(&third), "third", Arc::clone(&order));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        order.lock().unwrap().is_empty(),
        "a waiter got the lock while it was held"
    );
    first.dist_unlock().await.unwrap();
    first.dist_unlock().await.unwrap(); // not held: Ok
    second_waits.await.unwrap();
    third_waits.await.unwrap();
    assert_eq!(*order.lock().unwrap(), ["second", "third"]);

    // Closing the handle ends its lock wait.
    let waiting = Arc::clone(&third);
    first.dist_lock().await.unwrap();
    let wait = tokio::spawn(async move { waiting.dist_lock().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    third.close().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(2), wait)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(ended, Err(Error::Closed)), "{ended:?}");
    first.dist_unlock().await.unwrap();

    // Closing releases the lock at once.
    first.dist_lock().await.unwrap();
    first.close().await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), second.dist_lock())
        .await
        .unwrap()
        .unwrap();
    second.close().await.unwrap();
    third.close().await.unwrap();
    assert!(raw_keys(&server, "hbtd_dist_lock/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_delivers_every_event_in_order() {
    let server = EtcdServer::start().await;
    let kv = open(&server, "").await;
    let mut events = kv.watch_stream("w").await.unwrap();
    let writer = open(&server, "").await;
    for i in 0..1000 {
        writer.store("w", &i.to_string()).await.unwrap();
    }
    writer.delete("w").await.unwrap();
    let mut last_revision = 0;
    for i in 0..1000 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(event.value(), Some(i.to_string().as_str()), "{event:?}");
        assert!(event.revision() > last_revision);
        last_revision = event.revision();
    }
    let event = events.next().await.unwrap().unwrap();
    assert_eq!(event.change(), KeyChange::Delete);

    // watch(): the next change after the call began.
    let waiting = {
        let kv = Arc::new(open(&server, "").await);
        let watching = Arc::clone(&kv);
        (tokio::spawn(async move { watching.watch("w1").await }), kv)
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    writer.store("w1", "v").await.unwrap();
    let event = waiting.0.await.unwrap().unwrap();
    assert!(matches!(&event, WatchEvent::Put { key, value, .. } if key == "w1" && value == "v"));

    // Callbacks see every put until cancelled.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let handle = kv
        .watch_with_cb(
            "cb",
            KeyChange::Put,
            Box::new(move |event| {
                sink.lock()
                    .unwrap()
                    .push(event.value().unwrap_or_default().to_owned());
                true
            }),
        )
        .await
        .unwrap();
    for i in 0..10 {
        writer.store("cb", &i.to_string()).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.lock().unwrap().len() < 10 {
        assert!(
            Instant::now() < deadline,
            "callback missed events: {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kv.watch_cb_cancel(handle);
    writer.store("cb", "after").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(seen.lock().unwrap().len(), 10);

    // Dropping a stream cancels its etcd watch.
    let before = server.watcher_count();
    let streams = futures::future::join_all(
        (0..5).map(|i| kv.watch_stream(["d0", "d1", "d2", "d3", "d4"][i])),
    )
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()
    .unwrap();
    assert_eq!(server.watcher_count(), before + 5);
    drop(streams);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.watcher_count() > before {
        assert!(
            Instant::now() < deadline,
            "dropped streams kept their etcd watches"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Closing ends the streams.
    let mut open_stream = kv.watch_stream("w2").await.unwrap();
    kv.close().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(2), open_stream.next())
        .await
        .unwrap();
    assert!(end.is_none(), "{end:?}");
    assert!(matches!(kv.watch_stream("w2").await, Err(Error::Closed)));
    waiting.1.close().await.unwrap();
    writer.close().await.unwrap();
}

/// One of etcd's gauges from the `/metrics` page on its client URL.
fn etcd_gauge(server: &EtcdServer, name: &str) -> u64 {
    use std::io::{Read, Write};

    let address = server.endpoint().replace("http://", "");
    let mut connection = std::net::TcpStream::connect(address).unwrap();
    connection
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .unwrap();
    let mut metrics = String::new();
    connection.read_to_string(&mut metrics).unwrap();
    let line = format!("{name} ");
    metrics
        .lines()
        .find_map(|found| found.strip_prefix(line.as_str()))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as u64)
        .unwrap_or_else(|| panic!("etcd has no {name} metric"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_of_one_handle_share_one_etcd_watch_stream() {
    const STREAMS: &str = "etcd_debugging_mvcc_watch_stream_total";
    let server = EtcdServer::start().await;
    let kv = open(&server, "").await;
    assert_eq!(etcd_gauge(&server, STREAMS), 0);

    let keys: Vec<String> = (0..200).map(|i| format!("many/{i:03}")).collect();
    let mut streams = futures::future::try_join_all(keys.iter().map(|key| kv.watch_stream(key)))
        .await
        .unwrap();
    let mut everything = kv.watch_prefix("many/").await.unwrap();
    eprintln!(
        "200 watch_stream and 1 watch_prefix on one handle: {STREAMS} {}, \
         etcd_debugging_mvcc_watcher_total {}",
        etcd_gauge(&server, STREAMS),
        server.watcher_count()
    );
    assert_eq!(etcd_gauge(&server, STREAMS), 1, "one etcd watch stream");
    assert_eq!(server.watcher_count(), 201, "one etcd watch per stream");

    let writer = open(&server, "").await;
    for key in &keys {
        writer.store(key, &format!("value of {key}")).await.unwrap();
    }
    for (key, stream) in keys.iter().zip(streams.iter_mut()) {
        let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap_or_else(|_| panic!("the watcher of {key} got no event"))
            .unwrap()
            .unwrap();
        assert!(
            matches!(&event, WatchEvent::Put { key: got, value, .. }
                if got == key && *value == format!("value of {key}")),
            "{event:?}"
        );
    }
    for key in &keys {
        let event = tokio::time::timeout(Duration::from_secs(5), everything.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(event.key(), key);
    }
    // Nobody got an event of someone else's key.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (key, stream) in keys.iter().zip(streams.iter_mut()) {
        let extra = futures::FutureExt::now_or_never(stream.next());
        assert!(extra.is_none(), "{key}: {extra:?}");
    }

    // Dropped streams cancel their etcd watches; the etcd stream stays for the next ones.
    drop(streams);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.watcher_count() > 1 {
        assert!(
            Instant::now() < deadline,
            "dropped streams kept their etcd watches"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(etcd_gauge(&server, STREAMS), 1);
    writer.store("many/again", "1").await.unwrap();
    let event = everything.next().await.unwrap().unwrap();
    assert_eq!(event.key(), "many/again");

    // Another handle has a stream of its own; closing a handle ends its stream.
    let other = open(&server, "").await;
    let _other_stream = other.watch_stream("many/000").await.unwrap();
    assert_eq!(etcd_gauge(&server, STREAMS), 2);
    kv.close().await.unwrap();
    assert!(everything.next().await.is_none());
    let deadline = Instant::now() + Duration::from_secs(5);
    while etcd_gauge(&server, STREAMS) > 1 {
        assert!(
            Instant::now() < deadline,
            "a closed handle kept its etcd watch stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    other.close().await.unwrap();
    writer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_across_an_etcd_restart() {
    let mut server = EtcdServer::start().await;
    let kv = open(&server, "request_timeout=2s").await;
    let mut events = kv.watch_prefix("r/").await.unwrap();
    let writer = open(&server, "request_timeout=2s").await;
    for i in 0..50 {
        writer.store(&format!("r/{i:03}"), "before").await.unwrap();
    }
    kv.temp_key("tmp").await.unwrap();
    server.restart().await;
    // Written after the restart, whether or not the watch is back yet.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut written = 0;
    while written < 50 {
        match writer
            .store(&format!("r/{:03}", 50 + written), "after")
            .await
        {
            Ok(()) => written += 1,
            Err(err) if err.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(err) => panic!("{err}"),
        }
    }
    let mut last_revision = 0;
    for i in 0..100 {
        let event = tokio::time::timeout(Duration::from_secs(15), events.next())
            .await
            .unwrap_or_else(|_| panic!("event {i} never came"))
            .unwrap()
            .unwrap();
        assert_eq!(event.key(), format!("r/{i:03}"), "{event:?}");
        assert!(event.revision() > last_revision);
        last_revision = event.revision();
    }
    let extra = tokio::time::timeout(Duration::from_millis(500), events.next()).await;
    assert!(extra.is_err(), "an event was repeated: {extra:?}");
    // The lease survived the restart (etcd renews leases when it comes back) and is kept alive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(writer.get("tmp").await.unwrap().as_deref(), Some("1"));
    kv.close().await.unwrap();
    writer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_compaction() {
    let mut server = EtcdServer::start().await;
    let kv = open(&server, "request_timeout=2s").await;
    let mut events = kv.watch_stream("c").await.unwrap();
    kv.store("c", "0").await.unwrap();
    assert_eq!(events.next().await.unwrap().unwrap().value(), Some("0"));
    // While the watch cannot reach etcd, history moves on and is compacted.
    let mut raw = server.restart_out_of_reach().await;
    let mut revision = 0;
    for i in 0..5 {
        revision = raw
            .put("c", i.to_string(), None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
    }
    raw.compact(revision, None).await.unwrap();
    server.restart().await;
    let item = tokio::time::timeout(Duration::from_secs(15), events.next())
        .await
        .unwrap();
    match item {
        Some(Err(Error::Compacted {
            key,
            compact_revision,
            ..
        })) => {
            assert_eq!(key, "c");
            assert_eq!(compact_revision, revision);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        events.next().await.is_none(),
        "the stream goes on after Compacted"
    );
    kv.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_etcd_is_unavailable_in_time() {
    let started = Instant::now();
    let err = EtcdKvs::connect("127.0.0.1:1", "connect_timeout=1s")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Unavailable { endpoints, .. } if endpoints.contains("127.0.0.1:1")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let err = EtcdKvs::connect("mem:", "").await.unwrap_err();
    assert!(matches!(err, Error::InvalidEndpoint { .. }), "{err}");
    let err = EtcdKvs::connect("127.0.0.1:1", "password=hunter2,user=u")
        .await
        .unwrap_err();
    assert!(!format!("{err} {err:?}").contains("hunter2"));

    // A server that goes away: requests give up within request_timeout.
    let mut server = EtcdServer::start().await;
    let kv = open(&server, "request_timeout=500ms").await;
    server.stop();
    let started = Instant::now();
    let err = kv.get("k").await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_is_lost_with_the_lease_and_never_queued_twice() {
    let server = EtcdServer::start().await;
    let kv = Arc::new(open(&server, "lease_ttl=2s").await);
    let other = open(&server, "").await;

    kv.dist_lock().await.unwrap();
    let mut raw = server.raw_client().await;
    let keys = raw_keys(&server, "hbtd_dist_lock/").await;
    let lease = raw.get(keys[0].as_str(), None).await.unwrap().kvs()[0].lease();
    raw.lease_revoke(lease).await.unwrap();
    other.dist_timed_lock(Duration::from_secs(2)).await.unwrap();
    // The handle lost the lock with its lease: it queues again instead of answering at once.
    let err = kv
        .dist_timed_lock(Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LockTimeout { .. }), "{err}");

    // Two concurrent lock calls on one handle queue one waiter key, and both succeed.
    let (a, b) = (Arc::clone(&kv), Arc::clone(&kv));
    let first = tokio::spawn(async move { a.dist_lock().await });
    let second = tokio::spawn(async move { b.dist_lock().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        raw_keys(&server, "hbtd_dist_lock/").await.len(),
        2,
        "holder plus one waiter"
    );
    other.dist_unlock().await.unwrap();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(raw_keys(&server, "hbtd_dist_lock/").await.len(), 1);

    // A lock call abandoned by its caller leaves no waiter key behind.
    let abandoned = tokio::time::timeout(Duration::from_millis(300), other.dist_lock()).await;
    assert!(abandoned.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        raw_keys(&server, "hbtd_dist_lock/").await.len(),
        1,
        "an abandoned waiter left its key"
    );

    kv.close().await.unwrap();
    other.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_mutex_and_this_library_exclude_each_other() {
    let server = EtcdServer::start().await;
    let kv = open(&server, "").await;

    // Go's concurrency.Mutex (etcdctl lock) holds the lock for three seconds.
    let mut go = etcdctl_lock(&server, "hbtd_dist_lock", &["sleep", "3"]);
    let go_took_it = go_holds(&server, "hbtd_dist_lock").await;
    let err = kv
        .dist_timed_lock(Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LockTimeout { .. }), "{err}");
    tokio::time::timeout(Duration::from_secs(10), kv.dist_lock())
        .await
        .unwrap()
        .unwrap();
    got_it_after_go(go_took_it, &mut go).await;

    // This library holds it: Go waits until it is released.
    let mut go = go_waits(&server, "hbtd_dist_lock").await;
    kv.dist_unlock().await.unwrap();
    exits_successfully(&mut go).await;
    kv.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_mutex_and_named_guards_exclude_each_other() {
    const NAME: &str = "jobs/nightly";
    let server = EtcdServer::start().await;
    let kv = open(&server, "").await;

    // Go's concurrency.Mutex (etcdctl lock) holds the named lock for three seconds.
    let mut go = etcdctl_lock(&server, NAME, &["sleep", "3"]);
    let go_took_it = go_holds(&server, NAME).await;
    let err = kv
        .lock_with(NAME, LockOptions::new().timeout(Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::LockTimeout { lock, .. } if lock == NAME),
        "{err}"
    );
    let guard = tokio::time::timeout(Duration::from_secs(10), kv.lock(NAME))
        .await
        .unwrap()
        .unwrap();
    got_it_after_go(go_took_it, &mut go).await;
    let keys = raw_keys(&server, "jobs/nightly/").await;
    assert_eq!(keys.len(), 1);
    assert!(
        keys[0].starts_with("jobs/nightly/") && keys[0].len() > "jobs/nightly/".len(),
        "lock key layout differs from Go's: {keys:?}"
    );

    // A guard holds it: Go waits until the guard is unlocked, and until a guard is dropped.
    let mut go = go_waits(&server, NAME).await;
    guard.unlock().await.unwrap();
    exits_successfully(&mut go).await;
    let guard = kv.lock(NAME).await.unwrap();
    let mut go = go_waits(&server, NAME).await;
    drop(guard);
    exits_successfully(&mut go).await;
    kv.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_guard_attempts_leave_no_waiter_key() {
    const NAME: &str = "jobs/nightly";
    const KEYS: &str = "jobs/nightly/";
    let server = EtcdServer::start().await;
    let holder = open(&server, "").await;
    let other = Arc::new(open(&server, "").await);
    let guard = holder.lock(NAME).await.unwrap();
    assert_eq!(raw_keys(&server, KEYS).await.len(), 1);

    // Timed out, on another handle and on the holder's own handle (which queues locally).
    let short = LockOptions::new().timeout(Duration::from_millis(300));
    for kv in [&*other, &holder] {
        let err = kv.lock_with(NAME, short).await.unwrap_err();
        assert!(matches!(err, Error::LockTimeout { .. }), "{err}");
        assert_eq!(
            raw_keys(&server, KEYS).await.len(),
            1,
            "a timed-out guard attempt left its waiter key"
        );
    }

    // Abandoned: the waiting future is dropped while its key is queued.
    let waiting = Arc::clone(&other);
    let attempt = tokio::spawn(async move { waiting.lock(NAME).await.map(drop) });
    let deadline = Instant::now() + Duration::from_secs(5);
    while raw_keys(&server, KEYS).await.len() < 2 {
        assert!(Instant::now() < deadline, "the waiter never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    attempt.abort();
    let deadline = Instant::now() + Duration::from_secs(5);
    while raw_keys(&server, KEYS).await.len() > 1 {
        assert!(
            Instant::now() < deadline,
            "an abandoned guard attempt left its waiter key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    guard.unlock().await.unwrap();
    assert!(
        raw_keys(&server, KEYS).await.is_empty(),
        "unlock left the key"
    );

    // max_hold deletes the key too.
    let held = LockOptions::new().max_hold(Duration::from_millis(300));
    let guard = other.lock_with(NAME, held).await.unwrap();
    assert_eq!(raw_keys(&server, KEYS).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!guard.is_held());
    assert!(
        raw_keys(&server, KEYS).await.is_empty(),
        "max_hold left the key"
    );
    drop(guard);
    holder.close().await.unwrap();
    other.close().await.unwrap();
}

/// Starts `etcdctl lock <name> <command>`: Go's `concurrency.Mutex` on `name`, held while the
/// command runs.
fn etcdctl_lock(server: &EtcdServer, name: &str, command: &[&str]) -> std::process::Child {
    use std::process::{Command, Stdio};

    Command::new(server.etcdctl())
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", server.endpoint()))
        .args(["lock", name])
        .args(command)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits (up to five seconds) until etcdctl's key is under `<name>/`, and returns when it was
/// seen: Go took the lock before that, with nobody else queued.
async fn go_holds(server: &EtcdServer, name: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(5);
    while raw_keys(server, &format!("{name}/")).await.is_empty() {
        assert!(Instant::now() < deadline, "etcdctl did not take the lock");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Instant::now()
}

/// Asserts that we took the lock only after Go's hold (`sleep 3`, from `go_took_it`) ended,
/// and that etcdctl, which releases the lock first and exits after, exits successfully.
async fn got_it_after_go(go_took_it: Instant, go: &mut std::process::Child) {
    let waited = go_took_it.elapsed();
    assert!(
        waited >= Duration::from_millis(2500),
        "took the lock {waited:?} after Go did, while Go held it for 3 s"
    );
    exits_successfully(go).await;
}

/// Starts `etcdctl lock <name> true` while we hold `name`, and asserts that Go is still
/// waiting a second later.
async fn go_waits(server: &EtcdServer, name: &str) -> std::process::Child {
    let mut go = etcdctl_lock(server, name, &["true"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        go.try_wait().unwrap().is_none(),
        "Go took the lock {name:?} while this library held it"
    );
    go
}

/// Waits up to five seconds for `etcdctl lock` to take the lock, run its command, release
/// the lock and exit with success.
async fn exits_successfully(etcdctl: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = etcdctl.try_wait().unwrap() {
            assert!(status.success(), "etcdctl lock failed: {status}");
            return;
        }
        assert!(Instant::now() < deadline, "etcdctl lock never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_and_token_refresh() {
    let server = EtcdServer::start_with(&["--auth-token-ttl=2"]).await;
    let mut raw = server.raw_client().await;
    raw.user_add("root", "s3cret-pw", None).await.unwrap();
    let _ = raw.role_add("root").await;
    raw.user_grant_role("root", "root").await.unwrap();
    raw.auth_enable().await.unwrap();

    let kv = open(&server, "user=root,password=s3cret-pw").await;
    let shown = format!("{kv:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    kv.store("a", "1").await.unwrap();
    let mut events = kv.watch_stream("a").await.unwrap();
    // The simple token expires after two seconds; the next request re-authenticates.
    tokio::time::sleep(Duration::from_secs(4)).await;
    // etcd refuses a watch on the stream opened with the expired token: one refresh, a new
    // stream, and every watch of the handle resumes on it.
    let mut late = kv.watch_stream("b").await.unwrap();
    assert_eq!(kv.get("a").await.unwrap().as_deref(), Some("1"));
    kv.store("a", "2").await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.value(), Some("2"));
    kv.store("b", "3").await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), late.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.value(), Some("3"));
    kv.temp_key("t").await.unwrap();
    kv.dist_lock().await.unwrap();
    kv.close().await.unwrap();

    let err = EtcdKvs::connect(&server.endpoint(), "user=root,password=wrong-pw")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Unauthenticated { user, .. } if user == "root"),
        "{err}"
    );
    assert!(!format!("{err} {err:?}").contains("wrong-pw"));
    // Without credentials etcd grants the lease but refuses the keys.
    let anonymous = open(&server, "").await;
    let err = anonymous.get("a").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unauthenticated { .. } | Error::PermissionDenied { .. }
        ),
        "{err}"
    );
    anonymous.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the openssl command to make certificates; run with --ignored"]
async fn tls_with_ca_and_client_certificate() {
    use std::process::Command;

    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap_or_else(|err| panic!("this test needs the openssl command: {err}"));
        assert!(
            status.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&status.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    std::fs::write(
        dir.path().join("san.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    for name in ["server", "client"] {
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            &format!("{name}.pem"),
        ]);
    }
    let server = EtcdServer::start_with(&[
        &format!("--cert-file={}", path("server.pem")),
        &format!("--key-file={}", path("server.key")),
        &format!("--trusted-ca-file={}", path("ca.pem")),
        "--client-cert-auth",
    ])
    .await;
    let options = format!(
        "ca_file={},cert_file={},key_file={}",
        path("ca.pem"),
        path("client.pem"),
        path("client.key")
    );
    let kv = EtcdKvs::connect(&server.tls_endpoint(), &options)
        .await
        .unwrap();
    kv.store("secure", "yes").await.unwrap();
    assert_eq!(kv.get("secure").await.unwrap().as_deref(), Some("yes"));
    kv.close().await.unwrap();
    // A bare host:port with TLS options means https too.
    let bare = server.tls_endpoint().replace("https://", "");
    let kv = EtcdKvs::connect(&bare, &options).await.unwrap();
    assert_eq!(kv.get("secure").await.unwrap().as_deref(), Some("yes"));
    kv.close().await.unwrap();
    // Without the client certificate the server refuses.
    let err = EtcdKvs::connect(
        &server.tls_endpoint(),
        &format!("ca_file={},connect_timeout=2s", path("ca.pem")),
    )
    .await
    .unwrap_err();
    assert!(err.is_transient(), "{err}");
}

// ---- The data API ----

fn txn_outcome_gets(outcome: &hmetcd_core::TxnOutcome) -> Vec<Option<(String, String)>> {
    outcome
        .gets
        .iter()
        .map(|got| got.as_ref().map(|kv| (kv.key.clone(), kv.value.clone())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_api_reads_lists_deletes_and_transactions() {
    use hmetcd_core::{Compare, ListRequest, Op, Txn};

    let server = EtcdServer::start_with(&["--max-txn-ops=8"]).await;
    let kv = open(&server, "prefix=svc/").await;
    let other = open(&server, "").await;

    assert_eq!(kv.get_kv("n/a").await.unwrap(), None);
    kv.store("n/a", "1").await.unwrap();
    kv.store("n/a", "2").await.unwrap();
    let a = kv.get_kv("n/a").await.unwrap().unwrap();
    assert_eq!(a.pair(), ("n/a", "2"));
    assert_eq!(a.version, 2);
    assert_eq!(a.mod_revision, a.create_revision + 1);
    kv.store_temp("n/~t", "temp value").await.unwrap();
    let t = kv.get_kv("n/~t").await.unwrap().unwrap();
    assert_eq!(t.value, "temp value");
    assert_ne!(t.lease, 0);
    other.store("outside", "x").await.unwrap();

    let all = kv.get_prefix("").await.unwrap();
    let keys: Vec<&str> = all.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["n/a", "n/~t"]);
    assert_eq!(all[0], a);
    // Without a prefix option, "" is the whole keyspace.
    assert_eq!(other.get_prefix("").await.unwrap().len(), 3);

    for i in 0..10 {
        kv.store(&format!("l/{i}"), &i.to_string()).await.unwrap();
    }
    let first = kv.list(ListRequest::prefix("l/").limit(4)).await.unwrap();
    assert_eq!(first.items.len(), 4);
    assert!(first.more);
    assert_eq!(first.count, 10);
    let next = kv
        .list(ListRequest::prefix("l/").limit(4).after("l/3").keys_only())
        .await
        .unwrap();
    assert_eq!(next.items[0].key, "l/4");
    assert_eq!(next.items[0].value, "");
    assert!(next.items[0].mod_revision > 0);
    assert_eq!((next.count, next.more), (6, true));
    let last = kv
        .list(ListRequest::prefix("l/").after("l/7"))
        .await
        .unwrap();
    assert_eq!((last.items.len(), last.count, last.more), (2, 2, false));
    let range = kv.list(ListRequest::range("l/2", "l/4")).await.unwrap();
    assert_eq!(range.items.len(), 3);
    let empty = kv.list(ListRequest::range("l/4", "l/2")).await.unwrap();
    assert_eq!((empty.items.len(), empty.count, empty.more), (0, 0, false));
    assert!(empty.revision >= range.revision);
    assert!(matches!(
        kv.list(ListRequest::prefix("l/").limit(0)).await,
        Err(Error::InvalidArgument { .. })
    ));

    assert_eq!(kv.delete_prefix("l/").await.unwrap(), 10);
    assert_eq!(kv.delete_prefix("l/").await.unwrap(), 0);
    assert!(matches!(
        kv.delete_prefix("").await,
        Err(Error::InvalidKey { .. })
    ));

    let outcome = kv
        .txn(
            Txn::new()
                .when(Compare::value("n/a", CompareOp::Equal, "2"))
                .then(Op::put("n/b", "b"))
                .then(Op::get("n/b"))
                .then(Op::put_temp("n/c", "c"))
                .then(Op::get("n/missing"))
                .otherwise(Op::get("n/a")),
        )
        .await
        .unwrap();
    assert!(outcome.succeeded);
    assert_eq!(
        txn_outcome_gets(&outcome),
        [Some(("n/b".to_owned(), "b".to_owned())), None]
    );
    let b = outcome.gets[0].as_ref().unwrap();
    assert_eq!(b.mod_revision, outcome.revision);
    assert_ne!(kv.get_kv("n/c").await.unwrap().unwrap().lease, 0);
    let failed = kv
        .txn(
            Txn::new()
                .when(Compare::missing("n/a"))
                .then(Op::delete_prefix("n/"))
                .otherwise(Op::get("n/a")),
        )
        .await
        .unwrap();
    assert!(!failed.succeeded);
    assert_eq!(failed.revision, outcome.revision);
    assert_eq!(failed.gets[0].as_ref().unwrap().value, "2");

    // The server's own limit (8 here) is InvalidArgument too, and nothing is written.
    let mut long = Txn::new();
    for i in 0..9 {
        long = long.then(Op::put(format!("long/{i}"), "x"));
    }
    assert!(matches!(
        kv.txn(long).await,
        Err(Error::InvalidArgument { what, .. }) if what == "transaction"
    ));
    assert!(kv.get_prefix("long/").await.unwrap().is_empty());

    // update never loses a concurrent write.
    let kv = Arc::new(kv);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let kv = Arc::clone(&kv);
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                kv.update("counter", &mut |current| {
                    let n: u64 = current.and_then(|v| v.parse().ok()).unwrap_or(0);
                    Some((n + 1).to_string())
                })
                .await
                .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(kv.get("counter").await.unwrap().as_deref(), Some("160"));
    kv.close().await.unwrap();
    assert!(matches!(
        kv.txn(Txn::new().then(Op::get("x"))).await,
        Err(Error::Closed)
    ));
    other.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_prefixes_are_read_in_pages_at_one_revision() {
    use etcd_client::{Txn as RawTxn, TxnOp};

    let server = EtcdServer::start().await;
    let kv = open(&server, "request_timeout=20s").await;
    let mut raw = server.raw_client().await;
    // 100,000 small keys, written 128 per transaction.
    for batch in 0..(100_000 / 125) {
        let ops: Vec<TxnOp> = (0..125)
            .map(|i| TxnOp::put(format!("many/{:06}", batch * 125 + i), "v", None))
            .collect();
        raw.txn(RawTxn::new().and_then(ops)).await.unwrap();
    }
    let started = Instant::now();
    let all = kv.get_prefix("many/").await.unwrap();
    assert_eq!(all.len(), 100_000, "in {:?}", started.elapsed());
    assert!(all.windows(2).all(|pair| pair[0].key < pair[1].key));
    assert_eq!(all[99_999].key, "many/099999");
    let page = kv
        .list(
            hmetcd_core::ListRequest::prefix("many/")
                .limit(30_000)
                .after("many/050000"),
        )
        .await
        .unwrap();
    assert_eq!(
        (page.items.len(), page.count, page.more),
        (30_000, 49_999, true)
    );
    assert_eq!(page.items[0].key, "many/050001");
    let rest = kv
        .list(hmetcd_core::ListRequest::prefix("many/").after("many/050000"))
        .await
        .unwrap();
    assert_eq!((rest.items.len(), rest.more), (49_999, false));

    // Values of 700 KB: pages of 1000 keys do not fit the 4 MiB decode limit, and shrink.
    let big = "x".repeat(700_000);
    for i in 0..12 {
        kv.store(&format!("big/{i:02}"), &big).await.unwrap();
    }
    let read = kv.get_prefix("big/").await.unwrap();
    assert_eq!(read.len(), 12);
    assert!(read.iter().all(|kv| kv.value.len() == 700_000));
    let listed = kv
        .list(hmetcd_core::ListRequest::prefix("big/").limit(7))
        .await
        .unwrap();
    assert_eq!(
        (listed.items.len(), listed.count, listed.more),
        (7, 12, true)
    );
    kv.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prefix_from_replays_history_and_reports_compaction() {
    let mut server = EtcdServer::start().await;
    let kv = open(&server, "prefix=svc/, request_timeout=2s").await;
    assert!(matches!(
        kv.watch_prefix_from("w/", 0).await,
        Err(Error::InvalidArgument { what, .. }) if what == "watch revision"
    ));
    kv.store("w/a", "1").await.unwrap();
    let start = kv.get_kv("w/a").await.unwrap().unwrap().mod_revision;
    kv.store("x", "outside").await.unwrap();
    kv.store("w/b", "2").await.unwrap();
    kv.delete("w/a").await.unwrap();
    let mut events = kv.watch_prefix_from("w/", start).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let event = events.next().await.unwrap().unwrap();
        seen.push((event.key().to_owned(), event.value().map(str::to_owned)));
    }
    assert_eq!(
        seen,
        [
            ("w/a".to_owned(), Some("1".to_owned())),
            ("w/b".to_owned(), Some("2".to_owned())),
            ("w/a".to_owned(), None),
        ]
    );
    // Live after history, and across an etcd restart, none missed or repeated.
    kv.store("w/c", "3").await.unwrap();
    assert_eq!(events.next().await.unwrap().unwrap().key(), "w/c");
    server.restart().await;
    kv.store("w/d", "4").await.unwrap();
    let item = tokio::time::timeout(Duration::from_secs(15), events.next())
        .await
        .unwrap();
    assert_eq!(item.unwrap().unwrap().key(), "w/d");

    // Compacted at C: from C is fine, from C - 1 is Compacted as the stream's only item.
    let mut raw = server.raw_client().await;
    let compacted_at = kv.get_kv("w/d").await.unwrap().unwrap().mod_revision;
    raw.compact(compacted_at, None).await.unwrap();
    let mut from_c = kv.watch_prefix_from("w/", compacted_at).await.unwrap();
    assert_eq!(from_c.next().await.unwrap().unwrap().key(), "w/d");
    let mut gone = kv.watch_prefix_from("w/", compacted_at - 1).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), gone.next())
        .await
        .unwrap()
    {
        Some(Err(Error::Compacted {
            key,
            revision,
            compact_revision,
        })) => {
            assert_eq!(key, "w/");
            assert_eq!(revision, compacted_at - 1);
            assert_eq!(compact_revision, compacted_at);
        }
        other => panic!("{other:?}"),
    }
    assert!(gone.next().await.is_none());
    kv.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_values_come_back_with_their_values() {
    use hmetcd_core::{Op, Txn};

    let server = EtcdServer::start().await;
    let kv = open(&server, "lease_ttl=2s").await;
    let observer = open(&server, "").await;
    kv.temp_key("tv/plain").await.unwrap();
    kv.store_temp("tv/valued", "hello").await.unwrap();
    let outcome = kv
        .txn(Txn::new().then(Op::put_temp("tv/txn", "from txn")))
        .await
        .unwrap();
    assert!(outcome.succeeded);
    kv.store_temp("tv/gone", "x").await.unwrap();
    kv.delete_prefix("tv/gone").await.unwrap();
    let mut raw = server.raw_client().await;
    let lease = raw.get("tv/valued", None).await.unwrap().kvs()[0].lease();
    raw.lease_revoke(lease).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(6);
    while observer.get_prefix("tv/").await.unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "temp keys were not put back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = observer.get_prefix("tv/").await.unwrap();
    let pairs: Vec<(&str, &str)> = back.iter().map(KeyValue::pair).collect();
    assert_eq!(
        pairs,
        [
            ("tv/plain", "1"),
            ("tv/txn", "from txn"),
            ("tv/valued", "hello")
        ]
    );
    assert!(back.iter().all(|kv| kv.lease != 0 && kv.lease != lease));
    kv.close().await.unwrap();
    assert!(observer.get_prefix("tv/").await.unwrap().is_empty());
    observer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_lost_to_max_hold_fences_at_once() {
    use hmetcd_core::{Compare, LostReason, Op, Txn};

    let server = EtcdServer::start().await;
    let kv = open(&server, "").await;
    let guard = kv
        .lock_with(
            "fenced",
            LockOptions::new().max_hold(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    let held = Compare::held(&guard);
    let write = |compare: Compare| Txn::new().when(compare).then(Op::put("fenced/out", "x"));
    assert!(kv.txn(write(held.clone())).await.unwrap().succeeded);
    assert_eq!(guard.lost().await, LostReason::MaxHold);
    // Once lost() says so, the key is gone: the fence holds without waiting.
    assert!(!kv.txn(write(held)).await.unwrap().succeeded);
    drop(guard);
    kv.close().await.unwrap();
}
