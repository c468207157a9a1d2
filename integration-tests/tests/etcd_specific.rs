//! Tests that only make sense on a real etcd: a watch across a server restart, the lock
//! layout shared with Go's `concurrency.Mutex`, and values other clients wrote as raw bytes.
//!
//! Named `etcd-<version>::<test>` like the conformance trials. The etcd comes from
//! `integration_tests::etcd_server`; the restart test starts one of its own, so that the
//! restart disturbs nothing else.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, WatchOptions,
};
use futures::StreamExt;
use hmetcd_core::{Error, KeyChange, Kvi, WatchEvent, DEFAULT_LOCK_NAME};
use integration_tests::backends::{self, EtcdOpener};
use integration_tests::etcd_server::{raw_client, EtcdServer};
use integration_tests::run_limited;
use integration_tests::{Opener, TestStore};
use libtest_mimic::{Arguments, Failed, Trial};

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let mut server = match backends::etcd_server_or_exit("etcd_specific", &args) {
        Ok(server) => server,
        Err(exit) => return exit,
    };
    let backend = format!("etcd-{}", server.version());
    let endpoints = server.endpoints().to_owned();

    let trials = vec![
        Trial::test(
            format!("{backend}::restart::watch_misses_nothing_across_a_restart"),
            || {
                let server = EtcdServer::start_owned().map_err(Failed::from)?;
                let opener: Arc<dyn Opener> = Arc::new(EtcdOpener::on(&server));
                run_limited(2, Duration::from_secs(120), async move {
                    watch_misses_nothing_across_a_restart(&server, TestStore::new(opener)).await;
                })
            },
        )
        .with_ignored_flag(!server.can_restart()),
        Trial::test(
            format!("{backend}::go_interop::lock_layout_matches_go_mutex"),
            {
                let opener = EtcdOpener::on(&server);
                move || run_limited(2, Duration::from_secs(60), go_interop_lock_layout(opener))
            },
        ),
        Trial::test(
            format!("{backend}::raw_bytes::invalid_utf8_names_the_key"),
            {
                let store = TestStore::new(Arc::new(EtcdOpener::on(&server)));
                move || {
                    run_limited(
                        2,
                        Duration::from_secs(30),
                        invalid_utf8_names_the_key(store, endpoints),
                    )
                }
            },
        ),
    ];
    let conclusion = libtest_mimic::run(&args, trials);
    server.shutdown();
    conclusion.exit_code()
}

/// Retries `store` until etcd answers again after a restart; a write whose answer was lost
/// may land twice, which the history comparison below accounts for.
async fn store_retrying(kv: &dyn Kvi, key: &str, value: &str) {
    let mut last_error = None;
    for _ in 0..60 {
        match kv.store(key, value).await {
            Ok(()) => return,
            Err(err) => last_error = Some(err),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("store({key:?}) kept failing after the restart: {last_error:?}");
}

/// Every put on `key` (its full name) from revision 1 up to `last_revision`, as etcd's own
/// history has them.
async fn history(endpoints: &str, key: &str, last_revision: i64) -> Vec<(String, i64)> {
    let mut client = raw_client(endpoints)
        .await
        .unwrap_or_else(|why| panic!("{why}"));
    let mut stream = client
        .watch(key, Some(WatchOptions::new().with_start_revision(1)))
        .await
        .expect("raw watch for the history");
    let mut puts = Vec::new();
    while let Some(response) = stream.message().await.expect("raw watch message") {
        for event in response.events() {
            let kv = event.kv().expect("event with a key-value");
            puts.push((
                kv.value_str().expect("utf-8 value").to_owned(),
                kv.mod_revision(),
            ));
            if kv.mod_revision() >= last_revision {
                return puts;
            }
        }
    }
    panic!("the raw watch ended before revision {last_revision}");
}

async fn watch_misses_nothing_across_a_restart(server: &EtcdServer, store: TestStore) {
    let kv = store.open_with("request_timeout=2s").await.expect("open");
    let mut stream = kv.watch_stream("k").await.expect("watch_stream");
    let seen_by_callback = Arc::new(Mutex::new(Vec::new()));
    let sink = seen_by_callback.clone();
    let handle = kv
        .watch_with_cb(
            "k",
            KeyChange::Put,
            Box::new(move |event: &WatchEvent| {
                if let Ok(mut seen) = sink.lock() {
                    seen.push(event.clone());
                }
                true
            }),
        )
        .await
        .expect("watch_with_cb");

    for i in 0..5 {
        kv.store("k", &format!("before-{i}"))
            .await
            .expect("store before the restart");
    }
    server
        .restart()
        .await
        .unwrap_or_else(|why| panic!("restarting etcd: {why}"));
    for i in 0..5 {
        store_retrying(&*kv, "k", &format!("after-{i}")).await;
    }

    let mut raw = raw_client(server.endpoints())
        .await
        .unwrap_or_else(|why| panic!("{why}"));
    let full_key = format!("{}k", store.prefix());
    let current = raw.get(full_key.as_str(), None).await.expect("raw get");
    let last_revision = current
        .kvs()
        .first()
        .expect("the key exists")
        .mod_revision();
    let expected = history(server.endpoints(), &full_key, last_revision).await;
    let values: Vec<&str> = expected.iter().map(|(value, _)| value.as_str()).collect();
    for i in 0..5 {
        assert!(
            values.contains(&format!("before-{i}").as_str()),
            "history lacks before-{i}: {values:?}"
        );
        assert!(
            values.contains(&format!("after-{i}").as_str()),
            "history lacks after-{i}: {values:?}"
        );
    }

    let mut streamed = Vec::new();
    while streamed.len() < expected.len() {
        let event = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!("stream: no event after {streamed:?}; expected {expected:?}")
            })
            .unwrap_or_else(|| panic!("stream ended after {streamed:?}"))
            .unwrap_or_else(|err| panic!("stream error after {streamed:?}: {err}"));
        match event {
            WatchEvent::Put {
                key,
                value,
                revision,
            } if key == "k" => streamed.push((value, revision)),
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(streamed, expected, "watch_stream across the restart");
    let extra = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
    assert!(extra.is_err(), "watch_stream repeated an event: {extra:?}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let called: Vec<(String, i64)> = loop {
        let called: Vec<(String, i64)> = seen_by_callback
            .lock()
            .map(|seen| {
                seen.iter()
                    .map(|event| {
                        (
                            event.value().unwrap_or_default().to_owned(),
                            event.revision(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if called.len() >= expected.len() || tokio::time::Instant::now() >= deadline {
            break called;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let final_len = seen_by_callback
        .lock()
        .map(|seen| seen.len())
        .unwrap_or_default();
    assert_eq!(called, expected, "watch_with_cb across the restart");
    assert_eq!(final_len, expected.len(), "watch_with_cb repeated an event");

    kv.watch_cb_cancel(handle);
    kv.close().await.expect("close");
}

/// A lock participant written the way Go's `concurrency.Mutex` does: a lease of its own and
/// `<name>/<lease id in hex>` created only if absent. Returns (key, lease id, create revision).
async fn go_style_enqueue(client: &mut etcd_client::Client, name: &str) -> (String, i64, i64) {
    let lease = client
        .lease_grant(30, None)
        .await
        .expect("raw lease_grant")
        .id();
    let key = format!("{name}/{lease:x}");
    let txn = Txn::new()
        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key.as_str(),
            "",
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(key.as_str(), None)]);
    let response = client.txn(txn).await.expect("raw txn");
    assert!(
        response.succeeded(),
        "the Go-style key {key} already existed"
    );
    let revision = response.header().expect("txn header").revision();
    (key, lease, revision)
}

/// The lock participants under `name/`, oldest first: (key, create revision).
async fn go_style_waiters(client: &mut etcd_client::Client, name: &str) -> Vec<(String, i64)> {
    let options = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend);
    let response = client
        .get(format!("{name}/"), Some(options))
        .await
        .expect("raw get");
    response
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().expect("utf-8 key").to_owned(),
                kv.create_revision(),
            )
        })
        .collect()
}

async fn go_interop_lock_layout(opener: EtcdOpener) {
    let mut raw = raw_client(opener.endpoints())
        .await
        .unwrap_or_else(|why| panic!("{why}"));
    let name = DEFAULT_LOCK_NAME;
    // No prefix and the default lock name, as a Go service would use them.
    let kv: Arc<dyn Kvi> = Arc::from(opener.open("lease_ttl=2s").await.expect("open"));

    // A Go holder blocks us until its key goes.
    let (go_key, go_lease, _) = go_style_enqueue(&mut raw, name).await;
    let err = kv
        .dist_timed_lock(Duration::from_secs(1))
        .await
        .expect_err("dist_timed_lock while a Go holder has the lock");
    assert!(matches!(err, Error::LockTimeout { .. }), "{err}");
    let waiter = tokio::spawn({
        let kv = kv.clone();
        async move { kv.dist_lock().await }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !waiter.is_finished(),
        "dist_lock returned while {go_key} held the lock"
    );
    raw.delete(go_key.as_str(), None)
        .await
        .expect("raw delete of the Go holder");
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("dist_lock did not follow the Go holder within 5s")
        .expect("dist_lock task")
        .expect("dist_lock");
    raw.lease_revoke(go_lease).await.expect("raw lease_revoke");

    // While we hold it, a Go waiter queues behind our key, which has the Go layout.
    let (waiter_key, waiter_lease, waiter_revision) = go_style_enqueue(&mut raw, name).await;
    let queue = go_style_waiters(&mut raw, name).await;
    assert_eq!(queue.len(), 2, "lock participants: {queue:?}");
    let (our_key, our_revision) = &queue[0];
    assert!(
        our_revision < &waiter_revision,
        "our key is not first: {queue:?}"
    );
    assert_eq!(queue[1].0, waiter_key, "{queue:?}");
    let lease_hex = our_key
        .strip_prefix(&format!("{name}/"))
        .unwrap_or_else(|| panic!("our lock key {our_key} is not under {name}/"));
    assert!(
        !lease_hex.is_empty()
            && lease_hex
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            && !lease_hex.starts_with('0'),
        "our lock key {our_key} is not <name>/<lease id in hex>"
    );
    let lease_id = i64::from_str_radix(lease_hex, 16).expect("hex lease id");
    let ttl = raw
        .lease_time_to_live(lease_id, None)
        .await
        .expect("raw lease_time_to_live");
    assert!(
        ttl.ttl() > 0,
        "our lock key's lease {lease_hex} is not alive"
    );

    // Our unlock hands the lock to the Go waiter.
    kv.dist_unlock().await.expect("dist_unlock");
    let queue = go_style_waiters(&mut raw, name).await;
    assert_eq!(
        queue.first().map(|(key, _)| key.as_str()),
        Some(waiter_key.as_str()),
        "{queue:?}"
    );
    raw.lease_revoke(waiter_lease)
        .await
        .expect("raw lease_revoke");
    kv.close().await.expect("close");
    assert!(
        go_style_waiters(&mut raw, name).await.is_empty(),
        "lock keys left behind"
    );
}

async fn invalid_utf8_names_the_key(store: TestStore, endpoints: String) {
    let mut raw = raw_client(&endpoints)
        .await
        .unwrap_or_else(|why| panic!("{why}"));
    let kv = store.open().await;
    kv.store("a-fine", "ok").await.expect("store");
    raw.put(
        format!("{}b-bad", store.prefix()).into_bytes(),
        vec![0x66u8, 0xff, 0xfe],
        None,
    )
    .await
    .expect("raw put of invalid UTF-8");

    let err = kv
        .get("b-bad")
        .await
        .expect_err("get of an invalid UTF-8 value");
    assert!(
        matches!(&err, Error::InvalidUtf8 { key, .. } if key == "b-bad"),
        "{err:?}"
    );
    assert!(err.to_string().contains("b-bad"), "{err}");

    let err = kv
        .get_range("a", "z")
        .await
        .expect_err("get_range over an invalid UTF-8 value");
    assert!(
        matches!(&err, Error::InvalidUtf8 { key, .. } if key == "b-bad"),
        "{err:?}"
    );
    assert!(err.to_string().contains("b-bad"), "{err}");

    assert_eq!(kv.get("a-fine").await.expect("get").as_deref(), Some("ok"));
    kv.close().await.expect("close");
}
