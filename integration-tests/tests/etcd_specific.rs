//! Tests that only make sense on a real etcd: a watch across a server restart, the lock
//! layout shared with Go's `concurrency.Mutex`, elections shared with `etcdctl elect` (Go's
//! `concurrency.Election`), and values other clients wrote as raw bytes.
//!
//! The election tests run `etcdctl` (`HMETCD_ETCDCTL`, else the one next to
//! `HMETCD_ETCD_BIN`, else `etcdctl` on `PATH`) as a child process against the test server,
//! and fail, saying why, without one.
//!
//! Named `etcd-<version>::<test>` like the conformance trials. The etcd comes from
//! `integration_tests::etcd_server`; the restart test starts one of its own, so that the
//! restart disturbs nothing else.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, WatchOptions,
};
use futures::StreamExt;
use hmetcd_core::{Error, KeyChange, Kvi, Leadership, LockOptions, WatchEvent, DEFAULT_LOCK_NAME};
use integration_tests::backends::{self, EtcdOpener};
use integration_tests::coalescing::assert_reads_batched_only_where_safe;
use integration_tests::etcd_server::{raw_client, EtcdServer};
use integration_tests::run_limited;
use integration_tests::{Opener, TestStore};
use libtest_mimic::{Arguments, Failed, Trial};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::ChildStdout;

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let mut server = match backends::etcd_server_or_exit("etcd_specific", &args) {
        Ok(server) => server,
        Err(exit) => return exit,
    };
    let backend = format!("etcd-{}", server.version());
    let endpoints = server.endpoints().to_owned();

    let mut trials = vec![
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
        etcdctl_trial(
            &backend,
            "etcdctl_elect_leads_and_a_campaign_leads_once_it_resigns",
            &server,
            |etcdctl, opener| Box::pin(etcdctl_leads_then_resigns(etcdctl, opener)),
        ),
        etcdctl_trial(
            &backend,
            "a_campaign_leads_once_a_killed_etcdctl_elect_s_lease_is_gone",
            &server,
            |etcdctl, opener| Box::pin(killed_etcdctl_leader(etcdctl, opener)),
        ),
        etcdctl_trial(
            &backend,
            "etcdctl_elect_listen_sees_our_leader_and_proclaims",
            &server,
            |etcdctl, opener| Box::pin(etcdctl_observes_our_leader(etcdctl, opener)),
        ),
        Trial::test(
            format!("{backend}::raw_txn::a_candidate_created_with_100_other_keys_in_one_transaction_leads"),
            {
                let store = TestStore::new(Arc::new(EtcdOpener::on(&server)));
                let endpoints = endpoints.clone();
                move || {
                    run_limited(
                        2,
                        Duration::from_secs(30),
                        candidate_among_keys_of_one_revision(store, endpoints),
                    )
                }
            },
        ),
        Trial::test(
            format!("{backend}::raw_txn::a_lock_key_created_with_40_other_keys_in_one_transaction_blocks"),
            {
                let store = TestStore::new(Arc::new(EtcdOpener::on(&server)));
                let endpoints = endpoints.clone();
                move || {
                    run_limited(
                        2,
                        Duration::from_secs(30),
                        lock_key_among_keys_of_one_revision(store, endpoints),
                    )
                }
            },
        ),
        Trial::test(
            format!("{backend}::raw_bytes::invalid_utf8_names_the_key"),
            {
                let store = TestStore::new(Arc::new(EtcdOpener::on(&server)));
                let endpoints = endpoints.clone();
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
    trials.push(Trial::test(
        format!("{backend}::server_safety::reads_are_batched_only_where_etcd_survives_a_cancelled_batch"),
        {
            let endpoints = endpoints.clone();
            let version = server.version().to_owned();
            move || {
                run_limited(
                    2,
                    Duration::from_secs(30),
                    reads_batched_only_where_safe(endpoints, version),
                )
            }
        },
    ));
    for reads in [
        CancelledReads::Coalesced,
        CancelledReads::ReadOnlyTxn,
        CancelledReads::LockWait,
    ] {
        trials.push(
            Trial::test(
                format!(
                    "{backend}::server_safety::{}_cancelled_in_flight_leave_etcd_running",
                    reads.name()
                ),
                move || {
                    let server = EtcdServer::start_owned().map_err(Failed::from)?;
                    let outcome = run_limited(
                        2,
                        Duration::from_secs(60),
                        reads_cancelled_in_flight_leave_etcd_running(
                            server.endpoints().to_owned(),
                            reads,
                        ),
                    );
                    drop(server);
                    outcome
                },
            )
            .with_ignored_flag(!server.can_restart()),
        );
    }
    let conclusion = libtest_mimic::run(&args, trials);
    server.shutdown();
    conclusion.exit_code()
}

/// Coalesced reads go out as read-only transactions, which etcd 3.5.0 to 3.5.4 cannot survive
/// being cancelled: there (and only there) reads are not batched. 64 concurrent gets: batched
/// on any other version, each alone on those.
async fn reads_batched_only_where_safe(endpoints: String, version: String) {
    let kv = hmetcd_etcd::EtcdKvs::connect(&endpoints, "")
        .await
        .expect("connect");
    assert_reads_batched_only_where_safe(Arc::new(kv), &version).await;
}

/// The reads of [`reads_cancelled_in_flight_leave_etcd_running`].
#[derive(Clone, Copy)]
enum CancelledReads {
    /// Plain `get`s, which coalescing batches into read-only transactions.
    Coalesced,
    /// The caller's own read-only `txn`s.
    ReadOnlyTxn,
    /// Lock waits, which read who is ahead in the queue.
    LockWait,
}

impl CancelledReads {
    fn name(self) -> &'static str {
        match self {
            CancelledReads::Coalesced => "coalesced_reads",
            CancelledReads::ReadOnlyTxn => "read_only_transactions",
            CancelledReads::LockWait => "lock_waits",
        }
    }
}

/// Reads that time out while etcd is serving them must not take etcd down. etcd 3.5.0 to
/// 3.5.4 crash when a read-only transaction's request is cancelled while it reads (etcd issue
/// 14110, fixed in 3.5.5). Many tasks read hot keys (or wait for a held lock, which reads who
/// is ahead) through handles whose request timeouts (1 to 13 ms) expire mid-request again and
/// again; etcd, started for this test alone, must still answer afterwards.
async fn reads_cancelled_in_flight_leave_etcd_running(endpoints: String, reads: CancelledReads) {
    const KEYS: usize = 50;
    let seed = hmetcd_etcd::EtcdKvs::connect(&endpoints, "")
        .await
        .expect("connect");
    for key in 0..KEYS {
        seed.store(&format!("hot/{key}"), &"v".repeat(100))
            .await
            .expect("store");
    }
    // Held throughout, so that every lock attempt waits.
    let _held = seed.lock("busy").await.expect("lock");
    let until = Instant::now() + Duration::from_secs(6);
    let mut tasks = tokio::task::JoinSet::new();
    let mut handles = Vec::new();
    for millis in [1, 2, 3, 5, 8, 13] {
        let options = format!("request_timeout={millis}ms, connect_timeout=10s");
        let kv = hmetcd_etcd::EtcdKvs::connect(&endpoints, &options)
            .await
            .expect("connect");
        handles.push(Arc::new(kv));
    }
    for kv in &handles {
        for task in 0..12 {
            let kv = Arc::clone(kv);
            tasks.spawn(async move {
                let mut round = task;
                while Instant::now() < until {
                    let key = |at: usize| format!("hot/{}", at % KEYS);
                    match reads {
                        CancelledReads::Coalesced => drop(kv.get(&key(round)).await),
                        CancelledReads::ReadOnlyTxn => {
                            let txn = hmetcd_core::Txn::new()
                                .then(hmetcd_core::Op::get(key(round)))
                                .then(hmetcd_core::Op::get(key(round + 1)));
                            drop(kv.txn(txn).await);
                        }
                        CancelledReads::LockWait => {
                            let wait = LockOptions::new().timeout(Duration::from_millis(30));
                            drop(kv.lock_with("busy", wait).await);
                        }
                    }
                    round += 1;
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    drop(handles);
    let answer = integration_tests::etcd_server::status_version(&endpoints).await;
    assert!(
        answer.is_ok(),
        "etcd stopped answering after {} were cancelled in flight: {answer:?}",
        reads.name().replace('_', " ")
    );
}

/// Keys created by one transaction share a create revision: a candidate key among 100 other
/// keys of one revision under the election's name is still found, by `leader` and `observe`,
/// however etcd orders them within that revision and wherever a page of the read ends.
async fn candidate_among_keys_of_one_revision(store: TestStore, endpoints: String) {
    let kv = store.open().await;
    let raw = raw_client(&endpoints)
        .await
        .unwrap_or_else(|why| panic!("{why}"));
    let dir = format!("{}e/", store.prefix());
    // Keys sorting before (more than a page of them) and after the candidate's, none of them
    // a candidate.
    let mut puts: Vec<TxnOp> = (0..70)
        .map(|i| TxnOp::put(format!("{dir}0-plain-{i:03}"), "x", None))
        .chain((0..30).map(|i| TxnOp::put(format!("{dir}fz-plain-{i:03}"), "x", None)))
        .collect();
    puts.push(TxnOp::put(format!("{dir}fa"), "the candidate", None));
    let answer = raw
        .kv_client()
        .txn(Txn::new().and_then(puts))
        .await
        .unwrap_or_else(|err| panic!("raw txn: {err}"));
    assert!(answer.succeeded());
    let leader = kv.leader("e").await.unwrap();
    assert_eq!(
        leader.map(|leader| (leader.key, leader.value)),
        Some(("e/fa".to_owned(), "the candidate".to_owned()))
    );
    let mut observed = kv.observe("e").await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), observed.next())
        .await
        .unwrap_or_else(|_| panic!("observe yielded nothing"));
    assert_eq!(
        first
            .and_then(Result::ok)
            .flatten()
            .map(|leader| leader.key),
        Some("e/fa".to_owned())
    );
    kv.close().await.unwrap();
}

/// A lock key another client created in one transaction with 40 other keys under the lock's
/// name (so they share its create revision, and more than a page of them sorts before it)
/// holds the lock: our attempt waits, and gets the lock once that key is deleted.
async fn lock_key_among_keys_of_one_revision(store: TestStore, endpoints: String) {
    let kv = store.open().await;
    let raw = raw_client(&endpoints)
        .await
        .unwrap_or_else(|why| panic!("{why}"));
    let dir = format!("{}jobs/", store.prefix());
    let foreign = format!("{dir}fa");
    let puts: Vec<TxnOp> = (0..40)
        .map(|i| TxnOp::put(format!("{dir}0-plain-{i:03}"), "x", None))
        .chain([TxnOp::put(foreign.as_str(), "", None)])
        .collect();
    let answer = raw
        .kv_client()
        .txn(Txn::new().and_then(puts))
        .await
        .unwrap_or_else(|err| panic!("raw txn: {err}"));
    assert!(answer.succeeded());
    let attempt = kv
        .lock_with("jobs", LockOptions::new().timeout(Duration::from_secs(2)))
        .await;
    assert!(
        matches!(attempt, Err(Error::LockTimeout { .. })),
        "took the lock while another client's lock key held it: {attempt:?}"
    );
    let waiting = kv.lock("jobs");
    let (got, deleted) = futures::join!(waiting, async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        raw.kv_client().delete(foreign.as_str(), None).await
    });
    deleted.unwrap_or_else(|err| panic!("raw delete: {err}"));
    drop(got.unwrap());
    kv.close().await.unwrap();
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

/// An election test against `etcdctl`: given its path and an opener on the server.
type EtcdctlTest = fn(PathBuf, EtcdOpener) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// The trial `<backend>::go_interop::<name>`; it fails, saying why, when there is no
/// `etcdctl`.
fn etcdctl_trial(backend: &str, name: &str, server: &EtcdServer, test: EtcdctlTest) -> Trial {
    let etcdctl = etcdctl_binary();
    let opener = EtcdOpener::on(server);
    Trial::test(format!("{backend}::go_interop::{name}"), move || {
        let etcdctl = etcdctl.ok_or_else(|| {
            Failed::from(
                "no etcdctl: set HMETCD_ETCDCTL, put one beside HMETCD_ETCD_BIN or on PATH \
                 (scripts/install-etcd.sh installs Debian's)",
            )
        })?;
        run_limited(2, Duration::from_secs(60), test(etcdctl, opener))
    })
}

/// `HMETCD_ETCDCTL`, else the `etcdctl` next to `HMETCD_ETCD_BIN`, else one on `PATH`.
fn etcdctl_binary() -> Option<PathBuf> {
    if let Some(given) = std::env::var_os("HMETCD_ETCDCTL").filter(|bin| !bin.is_empty()) {
        return Some(PathBuf::from(given)).filter(|bin| bin.is_file());
    }
    let beside = std::env::var_os("HMETCD_ETCD_BIN")
        .map(|etcd| PathBuf::from(etcd).with_file_name("etcdctl"))
        .filter(|bin| bin.is_file());
    beside.or_else(|| {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("etcdctl"))
                .find(|bin| bin.is_file())
        })
    })
}

/// A running `etcdctl elect`, killed when dropped; its stdout is read line by line.
struct Elect {
    child: tokio::process::Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Elect {
    /// Starts `etcdctl elect <args>` against `endpoints`.
    fn start(etcdctl: &Path, endpoints: &str, args: &[&str]) -> Elect {
        let mut child = tokio::process::Command::new(etcdctl)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .arg("elect")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("starting {} elect: {err}", etcdctl.display()));
        let stdout = child.stdout.take().expect("etcdctl's stdout");
        Elect {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// The next line etcdctl prints, within `limit`.
    async fn next_line(&mut self, limit: Duration, what: &str) -> String {
        match tokio::time::timeout(limit, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => panic!("{what}: etcdctl elect ended its output"),
            Ok(Err(err)) => panic!("{what}: reading etcdctl elect: {err}"),
            Err(_) => panic!("{what}: etcdctl elect printed nothing within {limit:?}"),
        }
    }

    /// The next leader etcdctl prints: its key line and its value line.
    async fn next_leader(&mut self, limit: Duration, what: &str) -> (String, String) {
        let key = self.next_line(limit, what).await;
        let value = self.next_line(Duration::from_secs(2), what).await;
        (key, value)
    }

    /// Asserts that etcdctl prints nothing for `quiet`.
    async fn assert_quiet(&mut self, quiet: Duration, what: &str) {
        if let Ok(line) = tokio::time::timeout(quiet, self.lines.next_line()).await {
            panic!("{what}: etcdctl elect printed {line:?}");
        }
    }

    /// Sends `signal` to etcdctl.
    fn signal(&self, signal: rustix::process::Signal) {
        let pid = self
            .child
            .id()
            .and_then(|pid| rustix::process::Pid::from_raw(pid as i32))
            .expect("etcdctl's pid");
        rustix::process::kill_process(pid, signal).expect("signalling etcdctl");
    }

    /// Waits up to five seconds for etcdctl to exit.
    async fn exited(&mut self, what: &str) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{what}: etcdctl elect did not exit"))
            .expect("waiting for etcdctl")
    }
}

/// An election name no other test uses (no prefix: the keys must be exactly etcd's).
fn election_name() -> String {
    let tag: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(10)
        .collect();
    format!("hmetcd-election-{tag}")
}

/// The leader this library reads: (key, value).
async fn our_reading(kv: &dyn Kvi, name: &str) -> Option<(String, String)> {
    kv.leader(name)
        .await
        .unwrap_or_else(|err| panic!("leader({name:?}): {err}"))
        .map(|leader| (leader.key, leader.value))
}

/// Starts `etcdctl elect NAME v1` and waits until it leads; checks that this library's
/// `leader` names its key and value and that a timed campaign gives up. Hands back etcdctl,
/// its key, and a campaign of ours waiting behind it.
async fn etcdctl_leads(
    etcdctl: &Path,
    opener: &EtcdOpener,
    name: &str,
    kv: &Arc<dyn Kvi>,
) -> (
    Elect,
    String,
    tokio::task::JoinHandle<hmetcd_core::Result<Leadership>>,
) {
    let mut go = Elect::start(etcdctl, opener.endpoints(), &[name, "v1"]);
    let (go_key, value) = go
        .next_leader(Duration::from_secs(10), "etcdctl leads")
        .await;
    assert_eq!(value, "v1", "etcdctl elect's value line");
    assert!(
        go_key.starts_with(&format!("{name}/")),
        "etcdctl elect's key line {go_key:?}"
    );
    assert_eq!(
        our_reading(kv.as_ref(), name).await,
        Some((go_key.clone(), "v1".to_owned())),
        "leader() while etcdctl leads"
    );
    let err = kv
        .campaign_with(
            name,
            "ours",
            LockOptions::new().timeout(Duration::from_millis(500)),
        )
        .await
        .expect_err("a timed campaign while etcdctl leads");
    assert!(
        matches!(&err, Error::LockTimeout { lock, .. } if lock == name),
        "{err}"
    );
    let campaign = tokio::spawn({
        let kv = Arc::clone(kv);
        let name = name.to_owned();
        async move { kv.campaign(&name, "ours").await }
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !campaign.is_finished(),
        "our campaign led while etcdctl led"
    );
    (go, go_key, campaign)
}

/// Awaits `campaign` (within `limit` of `since`) and checks that we now lead, as
/// `leader()` says, with a token above `go_key`'s create revision.
async fn we_lead_after(
    campaign: tokio::task::JoinHandle<hmetcd_core::Result<Leadership>>,
    since: Instant,
    limit: Duration,
    kv: &dyn Kvi,
    name: &str,
    go_revision: i64,
) -> Leadership {
    let leadership = tokio::time::timeout(limit, campaign)
        .await
        .unwrap_or_else(|_| panic!("our campaign did not lead within {limit:?}"))
        .expect("campaign task")
        .expect("campaign");
    eprintln!(
        "our campaign led {:.2} s after etcdctl's term ended",
        since.elapsed().as_secs_f64()
    );
    assert!(leadership.is_leader());
    assert!(leadership.fencing_token() > go_revision);
    let ours = our_reading(kv, name).await;
    assert_eq!(ours.map(|(_, value)| value).as_deref(), Some("ours"));
    leadership
}

/// The create revision of `key` (stored form), read with a raw client.
async fn create_revision(raw: &mut etcd_client::Client, key: &str) -> (i64, i64) {
    let answer = raw.get(key, None).await.expect("raw get");
    let kv = answer
        .kvs()
        .first()
        .unwrap_or_else(|| panic!("{key} is missing"));
    (kv.create_revision(), kv.lease())
}

/// `etcdctl elect NAME v1` leads; a campaign of this library waits behind it and leads at
/// once when etcdctl resigns (SIGTERM: etcdctl resigns and exits).
async fn etcdctl_leads_then_resigns(etcdctl: PathBuf, opener: EtcdOpener) {
    let name = election_name();
    let mut raw = raw_client(opener.endpoints())
        .await
        .unwrap_or_else(|why| panic!("{why}"));
    let kv: Arc<dyn Kvi> = Arc::from(opener.open("lease_ttl=2s").await.expect("open"));
    let (mut go, go_key, campaign) = etcdctl_leads(&etcdctl, &opener, &name, &kv).await;
    let (go_revision, _) = create_revision(&mut raw, &go_key).await;
    go.signal(rustix::process::Signal::TERM);
    let resigned = Instant::now();
    let leadership = we_lead_after(
        campaign,
        resigned,
        Duration::from_secs(5),
        kv.as_ref(),
        &name,
        go_revision,
    )
    .await;
    go.exited("etcdctl after SIGTERM").await;
    assert!(
        raw.get(go_key.as_str(), None)
            .await
            .expect("raw get")
            .kvs()
            .is_empty(),
        "etcdctl's key outlived its resignation"
    );
    leadership.resign().await.expect("resign");
    kv.close().await.expect("close");
}

/// `etcdctl elect NAME v1` leads and is killed with SIGKILL: its key stays until its session
/// lease is gone, and a campaign of this library leads at once after that. etcdctl's session
/// TTL is 60 s and `etcdctl elect` has no flag to shorten it, so the test revokes the lease
/// from a raw client, which is what its expiry does.
async fn killed_etcdctl_leader(etcdctl: PathBuf, opener: EtcdOpener) {
    let name = election_name();
    let mut raw = raw_client(opener.endpoints())
        .await
        .unwrap_or_else(|why| panic!("{why}"));
    let kv: Arc<dyn Kvi> = Arc::from(opener.open("lease_ttl=2s").await.expect("open"));
    let (mut go, go_key, campaign) = etcdctl_leads(&etcdctl, &opener, &name, &kv).await;
    let (go_revision, go_lease) = create_revision(&mut raw, &go_key).await;
    go.signal(rustix::process::Signal::KILL);
    go.exited("etcdctl after SIGKILL").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !campaign.is_finished(),
        "our campaign led while the killed etcdctl's key was alive"
    );
    assert_eq!(
        our_reading(kv.as_ref(), &name)
            .await
            .map(|(key, _)| key)
            .as_deref(),
        Some(go_key.as_str()),
        "the killed etcdctl still leads until its lease goes"
    );
    raw.lease_revoke(go_lease)
        .await
        .expect("raw lease_revoke of etcdctl's session");
    let expired = Instant::now();
    let leadership = we_lead_after(
        campaign,
        expired,
        Duration::from_secs(5),
        kv.as_ref(),
        &name,
        go_revision,
    )
    .await;
    leadership.resign().await.expect("resign");
    kv.close().await.expect("close");
}

/// A leader of this library is what `etcdctl elect -l NAME` prints (its key line and its
/// value line), and so is each value it proclaims; an `etcdctl elect` candidate waits behind
/// it and leads once it resigns.
async fn etcdctl_observes_our_leader(etcdctl: PathBuf, opener: EtcdOpener) {
    let name = election_name();
    let kv = opener.open("lease_ttl=2s").await.expect("open");
    let mut leadership = kv.campaign(&name, "v1").await.expect("campaign");
    let (key, _) = our_reading(kv.as_ref(), &name)
        .await
        .expect("leader() while we lead");
    let mut listener = Elect::start(&etcdctl, opener.endpoints(), &["-l", &name]);
    assert_eq!(
        listener
            .next_leader(Duration::from_secs(10), "etcdctl elect -l, our leader")
            .await,
        (key.clone(), "v1".to_owned())
    );
    leadership.proclaim("v2").await.expect("proclaim");
    assert_eq!(
        listener
            .next_leader(Duration::from_secs(5), "etcdctl elect -l, our proclaim")
            .await,
        (key.clone(), "v2".to_owned())
    );
    let mut go = Elect::start(&etcdctl, opener.endpoints(), &[&name, "go"]);
    go.assert_quiet(Duration::from_secs(1), "etcdctl elect while we lead")
        .await;
    listener
        .assert_quiet(Duration::from_millis(300), "a waiting etcdctl candidate")
        .await;
    leadership.resign().await.expect("resign");
    let (go_key, value) = go
        .next_leader(Duration::from_secs(5), "etcdctl elect after we resigned")
        .await;
    assert_eq!(value, "go");
    assert_ne!(go_key, key);
    assert_eq!(
        listener
            .next_leader(Duration::from_secs(5), "etcdctl elect -l, etcdctl's leader")
            .await,
        (go_key.clone(), "go".to_owned())
    );
    assert_eq!(
        our_reading(kv.as_ref(), &name).await,
        Some((go_key, "go".to_owned()))
    );
    go.signal(rustix::process::Signal::TERM);
    go.exited("etcdctl after SIGTERM").await;
    listener.signal(rustix::process::Signal::TERM);
    kv.close().await.expect("close");
}
