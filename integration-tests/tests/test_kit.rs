//! The memory store's test kit against a real etcd: each fault that `MemKvs::faults()` causes
//! is caused on etcd too, and one scenario per fault checks that a service sees the same on
//! both backends: what reads return, which watch events arrive in which order, which calls
//! fail with which error, when `lost()` resolves and why, and that temp keys come back.
//!
//! Named `test_kit::<backend>::<what it proves>`. A [`Rig`] knows how to cause each fault on
//! its backend: in memory with [`Faults`]; on etcd by revoking the lease (as etcd does when
//! keep-alives fail past the TTL), with a TCP proxy between handle A and etcd that the test
//! cuts (a network partition), and with etcd's compaction. The scenarios never ask which
//! backend they run on. Memory runs on a current-thread runtime with Tokio's clock paused, so
//! its lease TTLs pass in virtual time; etcd runs in real time on a private server (one test
//! compacts it), one test at a time.
//!
//! Where etcd takes a moment (the client notices a revoked lease at its next keep-alive; the
//! server expires leases on its own clock), the scenarios wait for an effect with a deadline
//! instead of asserting it at once; in memory the effect is there at once.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use hmetcd_core::{
    Compare, Error, KeyChange, Kvi, LockOptions, LostReason, Op, Txn, WatchEvent, WatchStream,
};
use hmetcd_etcd::EtcdKvs;
use hmetcd_mem::{Faults, MemKvs};
use integration_tests::etcd_server::raw_client;
use integration_tests::faults::proxy::FaultProxy;
use integration_tests::faults::runner::{run_fault_binary, EtcdTrials};
use libtest_mimic::{Failed, Trial};
use tokio::time::Instant;

/// The lease TTL of handle A, whose lease the scenarios make expire.
const LEASE_TTL: Duration = Duration::from_secs(3);
/// Handle A's request timeout: calls during a partition fail this fast on etcd.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// How long an effect may take to show on etcd after its cause (a keep-alive round, a watch
/// reconnect); memory shows it at once.
const SETTLE: Duration = Duration::from_secs(5);
/// How long each etcd scenario may run.
const ETCD_LIMIT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let trials: Vec<Trial> = SCENARIOS
        .iter()
        .map(|&(name, scenario)| {
            Trial::test(format!("test_kit::mem::{name}"), move || {
                run_in_virtual_time(scenario(Box::new(MemRig::new())))
            })
        })
        .collect();
    // The etcd scenarios measure lease timings; and one compacts the whole store.
    run_fault_binary("test_kit", trials, |server| {
        let mut trials = EtcdTrials::new("test_kit", server);
        for &(name, scenario) in SCENARIOS {
            let endpoints = server.endpoints().to_owned();
            trials.add_future(name, ETCD_LIMIT.as_secs(), move || {
                Box::pin(async move {
                    let rig = EtcdRig::new(&endpoints).await;
                    scenario(Box::new(rig)).await;
                })
            });
        }
        trials.into_trials()
    })
}

type Scenario = fn(Box<dyn Rig>) -> futures::future::BoxFuture<'static, ()>;

/// Every scenario; the compaction goes last, as it concerns the whole etcd store.
const SCENARIOS: &[(&str, Scenario)] = &[
    (
        "lease_expiry_deletes_temp_and_lock_keys_in_one_revision_loses_locks_and_restores",
        |rig| Box::pin(lease_expiry(rig)),
    ),
    (
        "partition_shorter_than_lease_ttl_fails_calls_then_catches_watchers_up_and_keeps_locks",
        |rig| Box::pin(short_partition(rig)),
    ),
    (
        "partition_fails_unlock_resign_and_proclaim_and_hands_over_when_it_ends",
        |rig| Box::pin(releases_during_a_partition(rig)),
    ),
    (
        "partition_longer_than_lease_ttl_loses_locks_and_restores_only_unclaimed_temp_keys",
        |rig| Box::pin(long_partition(rig)),
    ),
    (
        "lease_expiry_ends_a_leadership_with_session_lost_and_the_next_candidate_leads",
        |rig| Box::pin(leadership_lease_expiry(rig)),
    ),
    (
        "lease_expiry_ends_guarded_writes_and_restores_store_temp_and_put_temp_values",
        |rig| Box::pin(guarded_writes_lease_expiry(rig)),
    ),
    (
        "lease_expiry_puts_back_no_temp_key_the_handle_rewrote_or_deleted",
        |rig| Box::pin(rewritten_temp_keys_lease_expiry(rig)),
    ),
    (
        "watch_prefix_from_resumes_across_a_cut_missing_and_repeating_nothing",
        |rig| Box::pin(history_across_a_cut(rig)),
    ),
    (
        "watcher_partitioned_behind_a_compaction_gets_compacted",
        |rig| Box::pin(compaction(rig)),
    ),
    (
        "watch_prefix_from_below_the_compaction_is_compacted_and_from_it_replays",
        |rig| Box::pin(history_compaction(rig)),
    ),
];

/// Runs a memory scenario on a current-thread runtime whose clock is paused: the lease TTLs
/// and waits of the scenario pass in virtual time.
fn run_in_virtual_time(test: impl std::future::Future<Output = ()>) -> Result<(), Failed> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|err| Failed::from(format!("tokio runtime: {err}")))?;
    let wall = std::time::Instant::now();
    runtime.block_on(async {
        tokio::time::timeout(ETCD_LIMIT, test)
            .await
            .map_err(|_| Failed::from("did not finish"))
    })?;
    let took = wall.elapsed();
    if took > Duration::from_secs(2) {
        return Err(Failed::from(format!(
            "took {took:?} of wall time in virtual time"
        )));
    }
    Ok(())
}

/// How a scenario opens its handles and causes faults on one backend.
#[async_trait::async_trait]
trait Rig: Send + Sync {
    /// Opens handle A, the one the faults hit (`lease_ttl` and `request_timeout` as above).
    async fn open_faulty(&mut self) -> Box<dyn Kvi>;
    /// Opens another handle on the same store, never faulted.
    async fn open_other(&self) -> Box<dyn Kvi>;
    /// A's lease expires now; `temp_key` is one of A's temp keys (etcd finds the lease by it).
    async fn expire_lease(&self, temp_key: &str);
    /// A is cut off from the store.
    fn cut(&self);
    /// A reaches the store again.
    fn resume(&self);
    /// The store forgets history before `revision`.
    async fn compact(&self, revision: i64);
}

/// The handles' lock (`lock_name`); under the scenario's prefix, so no other scenario's.
const LOCK_NAME: &str = "work";

/// A fresh key prefix for one scenario.
struct Names {
    prefix: String,
}

impl Names {
    fn new() -> Self {
        let tag: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(12)
            .collect();
        Names {
            prefix: format!("kit-{tag}/"),
        }
    }

    fn options(&self, extra: &str) -> String {
        let base = format!(
            "prefix={},lock_name={LOCK_NAME},lease_ttl={}s",
            self.prefix,
            LEASE_TTL.as_secs()
        );
        if extra.is_empty() {
            base
        } else {
            format!("{base},{extra}")
        }
    }
}

fn a_options() -> String {
    format!("request_timeout={}ms", REQUEST_TIMEOUT.as_millis())
}

/// Memory: the faults are [`Faults`] of handle A.
struct MemRig {
    store: String,
    names: Names,
    faults: Option<Faults>,
}

impl MemRig {
    fn new() -> Self {
        let names = Names::new();
        MemRig {
            store: names.prefix.clone(),
            names,
            faults: None,
        }
    }

    fn faults(&self) -> &Faults {
        self.faults
            .as_ref()
            .unwrap_or_else(|| panic!("no faulty handle opened"))
    }
}

#[async_trait::async_trait]
impl Rig for MemRig {
    async fn open_faulty(&mut self) -> Box<dyn Kvi> {
        let options = self.names.options(&a_options());
        let kv = MemKvs::open(&self.store, &options).unwrap_or_else(|err| panic!("{err}"));
        self.faults = Some(kv.faults());
        Box::new(kv)
    }

    async fn open_other(&self) -> Box<dyn Kvi> {
        let options = self.names.options("");
        Box::new(MemKvs::open(&self.store, &options).unwrap_or_else(|err| panic!("{err}")))
    }

    async fn expire_lease(&self, _temp_key: &str) {
        self.faults().expire_lease();
    }

    fn cut(&self) {
        self.faults().partition(true);
    }

    fn resume(&self) {
        self.faults().partition(false);
    }

    async fn compact(&self, revision: i64) {
        self.faults().compact(revision);
    }
}

/// etcd: A connects through a proxy the rig cuts; a raw client revokes and compacts.
struct EtcdRig {
    endpoints: String,
    names: Names,
    proxy: Option<FaultProxy>,
    raw: tokio::sync::Mutex<etcd_client::Client>,
}

impl EtcdRig {
    async fn new(endpoints: &str) -> Self {
        let raw = raw_client(endpoints)
            .await
            .unwrap_or_else(|why| panic!("{why}"));
        EtcdRig {
            endpoints: endpoints.to_owned(),
            names: Names::new(),
            proxy: None,
            raw: tokio::sync::Mutex::new(raw),
        }
    }

    fn proxy(&self) -> &FaultProxy {
        self.proxy
            .as_ref()
            .unwrap_or_else(|| panic!("no faulty handle opened"))
    }
}

#[async_trait::async_trait]
impl Rig for EtcdRig {
    async fn open_faulty(&mut self) -> Box<dyn Kvi> {
        let proxy = FaultProxy::start(&self.endpoints)
            .await
            .unwrap_or_else(|why| panic!("{why}"));
        let options = self.names.options(&a_options());
        let kv = EtcdKvs::connect(proxy.endpoint(), &options)
            .await
            .unwrap_or_else(|err| panic!("open A behind the proxy: {err}"));
        self.proxy = Some(proxy);
        Box::new(kv)
    }

    async fn open_other(&self) -> Box<dyn Kvi> {
        let options = self.names.options("request_timeout=2s");
        Box::new(
            EtcdKvs::connect(&self.endpoints, &options)
                .await
                .unwrap_or_else(|err| panic!("open B: {err}")),
        )
    }

    async fn expire_lease(&self, temp_key: &str) {
        let mut raw = self.raw.lock().await;
        let key = format!("{}{temp_key}", self.names.prefix);
        let found = raw
            .get(key.as_str(), None)
            .await
            .unwrap_or_else(|err| panic!("raw get {key}: {err}"));
        let lease = found
            .kvs()
            .first()
            .map(|kv| kv.lease())
            .unwrap_or_else(|| panic!("A's temp key {key} is missing"));
        assert_ne!(lease, 0, "A's temp key {key} has no lease");
        raw.lease_revoke(lease)
            .await
            .unwrap_or_else(|err| panic!("revoke A's lease: {err}"));
    }

    fn cut(&self) {
        self.proxy().cut();
    }

    fn resume(&self) {
        self.proxy().resume();
    }

    async fn compact(&self, revision: i64) {
        self.raw
            .lock()
            .await
            .compact(revision, None)
            .await
            .unwrap_or_else(|err| panic!("compact at {revision}: {err}"));
    }
}

/// An event as a service sees it, without its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Put(String, String),
    Delete(String),
}

fn seen(event: &WatchEvent) -> Seen {
    match event {
        WatchEvent::Put { key, value, .. } => Seen::Put(key.clone(), value.clone()),
        WatchEvent::Delete { key, .. } => Seen::Delete(key.clone()),
    }
}

fn put(key: &str, value: &str) -> Seen {
    Seen::Put(key.to_owned(), value.to_owned())
}

fn delete(key: &str) -> Seen {
    Seen::Delete(key.to_owned())
}

async fn next_event(stream: &mut WatchStream, what: &str) -> WatchEvent {
    match tokio::time::timeout(SETTLE * 2, stream.next()).await {
        Err(_) => panic!("{what}: no watch event within {:?}", SETTLE * 2),
        Ok(None) => panic!("{what}: the watch stream ended"),
        Ok(Some(Err(err))) => panic!("{what}: watch stream error: {err}"),
        Ok(Some(Ok(event))) => event,
    }
}

async fn next_events(stream: &mut WatchStream, count: usize, what: &str) -> Vec<WatchEvent> {
    let mut events = Vec::with_capacity(count);
    for _ in 0..count {
        events.push(next_event(stream, what).await);
    }
    events
}

/// Nothing more arrives for a while.
async fn no_event(stream: &mut WatchStream, what: &str) {
    let extra = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(extra.is_err(), "{what}: unexpected {extra:?}");
}

/// A call of the cut-off handle fails as an unreachable store does: `Unavailable` (memory,
/// and etcd when the connection is refused) or `Timeout` (etcd, after `request_timeout`).
async fn fails_unreachable<T: std::fmt::Debug>(
    what: &str,
    call: impl std::future::Future<Output = hmetcd_core::Result<T>>,
) {
    let began = Instant::now();
    let outcome = tokio::time::timeout(REQUEST_TIMEOUT * 4, call).await;
    match outcome {
        Err(_) => panic!(
            "{what} on the cut-off handle hung for {:?}",
            began.elapsed()
        ),
        Ok(Ok(answer)) => panic!("{what} on the cut-off handle answered {answer:?}"),
        Ok(Err(Error::Unavailable { .. } | Error::Timeout { .. })) => {}
        Ok(Err(err)) => panic!("{what} on the cut-off handle: {err:?}"),
    }
}

/// Retries `call` until it succeeds (etcd may need a reconnect after a cut ends).
async fn once_reachable<T, F: std::future::Future<Output = hmetcd_core::Result<T>>>(
    what: &str,
    mut call: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + SETTLE;
    loop {
        match call().await {
            Ok(answer) => return answer,
            Err(err @ (Error::Unavailable { .. } | Error::Timeout { .. }))
                if Instant::now() < deadline =>
            {
                drop(err);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("{what} after the cut ended: {err}"),
        }
    }
}

/// Waits until `check` holds.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Spawns `b.dist_lock()`.
fn spawn_dist_lock(b: &Arc<dyn Kvi>) -> tokio::task::JoinHandle<hmetcd_core::Result<()>> {
    let b = Arc::clone(b);
    tokio::spawn(async move { b.dist_lock().await })
}

/// The one lock key `<lock>/<hex>` a participant just put, from a watch of `<lock>/`.
async fn queued_key(stream: &mut WatchStream, what: &str) -> String {
    match next_event(stream, what).await {
        WatchEvent::Put { key, .. } => key,
        other => panic!("{what}: expected a lock key put, got {other:?}"),
    }
}

/// Records every event a callback sees.
fn recording_callback() -> (Arc<Mutex<Vec<Seen>>>, hmetcd_core::WatchCallback) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&calls);
    let callback = Box::new(move |event: &WatchEvent| {
        if let Ok(mut calls) = sink.lock() {
            calls.push(seen(event));
        }
        true
    });
    (calls, callback)
}

fn calls(recorded: &Mutex<Vec<Seen>>) -> Vec<Seen> {
    recorded
        .lock()
        .map(|calls| calls.clone())
        .unwrap_or_default()
}

/// `expire_lease` / etcd's lease revoke: A's temp keys and lock keys go in one revision; A's
/// lock is lost (`SessionLost`) and handed on; A takes a new lease, its temp keys come back
/// in one later revision and its waiter queues again with a key on the new lease.
/// A leader whose lease expires is no longer the leader: `lost()` says `SessionLost`,
/// `proclaim` is `NotLeader`, the next candidate leads with a higher fencing token, and
/// observers see the handover without a gap.
async fn leadership_lease_expiry(mut rig: Box<dyn Rig>) {
    let a: Arc<dyn Kvi> = Arc::from(rig.open_faulty().await);
    let b: Arc<dyn Kvi> = Arc::from(rig.open_other().await);
    let mut observer = b.observe("boss").await.expect("observe");
    assert_eq!(next_leader(&mut observer).await, None);
    a.temp_key("t/1").await.expect("temp key");
    let mut leadership = a.campaign("boss", "a").await.expect("A campaigns");
    assert_eq!(next_leader(&mut observer).await.as_deref(), Some("a"));
    let b_campaigns = tokio::spawn({
        let b = Arc::clone(&b);
        async move { b.campaign("boss", "b").await }
    });
    eventually("B's candidacy", Duration::from_secs(10), || async {
        b.get_range("boss/", "boss/~")
            .await
            .is_ok_and(|kvs| kvs.len() == 2)
    })
    .await;

    rig.expire_lease("t/1").await;

    let reason = tokio::time::timeout(LEASE_TTL + Duration::from_secs(2), leadership.lost())
        .await
        .expect("lost() did not resolve");
    assert_eq!(reason, LostReason::SessionLost);
    assert!(!leadership.is_leader(), "a leader after its lease expired");
    let b_leads = tokio::time::timeout(Duration::from_secs(10), b_campaigns)
        .await
        .expect("B never led")
        .expect("B's campaign task")
        .expect("B's campaign");
    assert!(b_leads.fencing_token() > leadership.fencing_token());
    assert_eq!(next_leader(&mut observer).await.as_deref(), Some("b"));
    let proclaimed = leadership.proclaim("a again").await;
    assert!(
        matches!(proclaimed, Err(Error::NotLeader { .. })),
        "{proclaimed:?}"
    );
    let again = a
        .campaign_with(
            "boss",
            "a",
            LockOptions::new().timeout(Duration::from_secs(1)),
        )
        .await;
    assert!(
        matches!(again, Err(Error::LockTimeout { .. })),
        "A led again while B leads: {again:?}"
    );
    b_leads.resign().await.expect("B resigns");
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

/// The value of the next leader `observer` yields (`None`: no leader).
async fn next_leader(observer: &mut hmetcd_core::LeaderStream) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(10), observer.next())
        .await
        .expect("the observer saw nothing")
        .expect("the observer ended")
        .expect("observe failed")
        .map(|leader| leader.value)
}

async fn lease_expiry(mut rig: Box<dyn Rig>) {
    let a: Arc<dyn Kvi> = Arc::from(rig.open_faulty().await);
    let b: Arc<dyn Kvi> = Arc::from(rig.open_other().await);
    let mut temps = b.watch_prefix("t/").await.expect("watch t/");
    let mut jobs = b.watch_prefix("jobs/").await.expect("watch jobs/");
    let mut queue = b.watch_prefix("q/").await.expect("watch q/");

    a.temp_key("t/1").await.expect("temp key");
    a.temp_key("t/2").await.expect("temp key");
    next_events(&mut temps, 2, "A's temp keys").await;
    let guard = a.lock("jobs").await.expect("A locks jobs");
    let a_jobs_key = queued_key(&mut jobs, "A's jobs key").await;
    let b_jobs = tokio::spawn({
        let b = Arc::clone(&b);
        async move { b.lock("jobs").await }
    });
    let b_jobs_key = queued_key(&mut jobs, "B's jobs key").await;
    let b_queue = b.lock("q").await.expect("B locks q");
    queued_key(&mut queue, "B's q key").await;
    let a_waits = tokio::spawn({
        let a = Arc::clone(&a);
        async move { a.lock("q").await }
    });
    let a_queue_key = queued_key(&mut queue, "A's q key").await;

    rig.expire_lease("t/1").await;

    // 1. Every key of the lease goes in one revision, temp keys in key order.
    let deleted = next_events(&mut temps, 2, "temp keys deleted").await;
    assert_eq!(
        deleted.iter().map(seen).collect::<Vec<_>>(),
        [delete("t/1"), delete("t/2")]
    );
    let revoked_at = deleted[0].revision();
    assert_eq!(
        deleted[1].revision(),
        revoked_at,
        "one revision for the lease"
    );
    let jobs_deleted = next_event(&mut jobs, "A's jobs key deleted").await;
    assert_eq!(seen(&jobs_deleted), delete(&a_jobs_key));
    assert_eq!(jobs_deleted.revision(), revoked_at);

    // 2. The lock is lost, for SessionLost, and handed on to B.
    let reason = tokio::time::timeout(SETTLE, guard.lost())
        .await
        .expect("lost() resolves");
    assert_eq!(reason, LostReason::SessionLost);
    assert!(!guard.is_held());
    let b_guard = tokio::time::timeout(SETTLE, b_jobs)
        .await
        .expect("B gets jobs")
        .expect("task")
        .expect("B locks jobs");
    assert!(b_guard.fencing_token() > guard.fencing_token());
    assert_eq!(
        b.get(&b_jobs_key).await.expect("get").as_deref(),
        Some(""),
        "B's key holds the lock"
    );

    // 3. The temp keys come back on a new lease, in one later revision.
    let restored = next_events(&mut temps, 2, "temp keys restored").await;
    assert_eq!(
        restored.iter().map(seen).collect::<Vec<_>>(),
        [put("t/1", "1"), put("t/2", "1")]
    );
    assert!(restored[0].revision() > revoked_at);
    assert_eq!(restored[1].revision(), restored[0].revision());
    assert_eq!(b.get("t/2").await.expect("get").as_deref(), Some("1"));

    // 4. A's waiter lost its key with the lease and queues again on the new one.
    let requeued = next_events(&mut queue, 2, "A's waiter queues again").await;
    assert_eq!(seen(&requeued[0]), delete(&a_queue_key));
    assert_eq!(requeued[0].revision(), revoked_at);
    let WatchEvent::Put { key: new_key, .. } = &requeued[1] else {
        panic!("expected A's new q key, got {:?}", requeued[1]);
    };
    assert_ne!(new_key, &a_queue_key, "a key on a new lease");
    assert!(!a_waits.is_finished(), "A took q while B holds it");
    let b_token = b_queue.fencing_token();
    b_queue.unlock().await.expect("B unlocks q");
    let a_queue = tokio::time::timeout(SETTLE, a_waits)
        .await
        .expect("A gets q")
        .expect("task")
        .expect("A locks q");
    assert!(a_queue.fencing_token() > b_token);

    drop(a_queue);
    guard.unlock().await.expect("a lost guard's unlock is Ok");
    drop(b_guard);
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

/// A temp key that A itself overwrote or deleted afterwards (`store`, `delete`,
/// `delete_prefix`, a transaction's put, delete or delete_prefix) is no longer one of its temp
/// keys: the lease's loss neither deletes nor puts it back, even where someone else deleted it
/// since. One that A rewrote with `store_temp` stays a temp key and comes back with its last
/// value.
async fn rewritten_temp_keys_lease_expiry(mut rig: Box<dyn Rig>) {
    let a = rig.open_faulty().await;
    let b = rig.open_other().await;
    for key in [
        "r/stored",
        "r/deleted",
        "r/sub/1",
        "r/sub/2",
        "r/txn-put",
        "r/txn-deleted",
        "r/txn-sub/1",
        "r/kept",
    ] {
        a.temp_key(key).await.expect("temp key");
    }
    a.store_temp("r/kept", "last").await.expect("store_temp");
    a.store("r/stored", "plain").await.expect("store");
    a.delete("r/deleted").await.expect("delete");
    a.delete_prefix("r/sub/").await.expect("delete_prefix");
    a.txn(
        Txn::new()
            .then(Op::put("r/txn-put", "plain"))
            .then(Op::delete("r/txn-deleted"))
            .then(Op::delete_prefix("r/txn-sub/")),
    )
    .await
    .expect("txn");
    // Absent now: A would put these back if it still took them for its temp keys.
    b.delete("r/stored").await.expect("B deletes");
    b.delete("r/txn-put").await.expect("B deletes");
    let mut events = b.watch_prefix("r/").await.expect("watch r/");

    rig.expire_lease("r/kept").await;

    let lost = next_event(&mut events, "the lease's one key deleted").await;
    assert_eq!(seen(&lost), delete("r/kept"));
    let restored = next_event(&mut events, "the temp key restored").await;
    assert_eq!(seen(&restored), put("r/kept", "last"));
    assert!(restored.revision() > lost.revision());
    no_event(&mut events, "nothing else is put back").await;
    let left = b.get_range("r/", "r/~").await.expect("range");
    let left: Vec<(&str, &str)> = left
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_str()))
        .collect();
    assert_eq!(left, [("r/kept", "last")]);
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

/// A partition shorter than `lease_ttl`: A's calls fail, its watchers hear nothing, others go
/// on; afterwards A's watchers catch up in order, and A still holds its locks and temp key.
async fn short_partition(mut rig: Box<dyn Rig>) {
    let a = rig.open_faulty().await;
    let b: Arc<dyn Kvi> = Arc::from(rig.open_other().await);
    a.dist_lock().await.expect("A locks");
    a.temp_key("t/a").await.expect("temp key");
    let guard = a.lock("jobs").await.expect("A locks jobs");
    let mut lock_keys = b
        .watch_prefix(&format!("{LOCK_NAME}/"))
        .await
        .expect("watch the lock");
    let b_waits = spawn_dist_lock(&b);
    queued_key(&mut lock_keys, "B queues for A's lock").await;
    let mut stream = a.watch_stream("w").await.expect("watch_stream");
    let (recorded, callback) = recording_callback();
    let watcher = a
        .watch_with_cb("w", KeyChange::Put, callback)
        .await
        .expect("watch_with_cb");
    b.store("w", "0").await.expect("store");
    assert_eq!(seen(&next_event(&mut stream, "w=0").await), put("w", "0"));

    rig.cut();
    let cut = Instant::now();
    // Side by side: on etcd each takes up to request_timeout, and the cut must stay short.
    futures::join!(
        fails_unreachable("get", a.get("w")),
        fails_unreachable("store", a.store("x", "1")),
        fails_unreachable("get_range", a.get_range("a", "z")),
        fails_unreachable("tas", a.tas("w", "0", "1")),
        fails_unreachable("delete", a.delete("x")),
        fails_unreachable("temp_key", a.temp_key("t/b")),
        fails_unreachable("watch_stream", async {
            a.watch_stream("v").await.map(drop)
        }),
        fails_unreachable("dist_lock", a.dist_lock()),
    );
    b.store("w", "1").await.expect("store");
    b.store("w", "2").await.expect("store");
    no_event(&mut stream, "A's watcher while cut").await;
    assert_eq!(b.get("t/a").await.expect("get").as_deref(), Some("1"));
    assert!(guard.lost().now_or_never().is_none(), "lost() while cut");
    assert!(!b_waits.is_finished(), "B took A's lock during a short cut");
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(cut.elapsed())).await;
    rig.resume();

    let w = once_reachable("get", || a.get("w")).await;
    assert_eq!(w.as_deref(), Some("2"));
    let caught_up = next_events(&mut stream, 2, "A's watcher after the cut").await;
    assert_eq!(
        caught_up.iter().map(seen).collect::<Vec<_>>(),
        [put("w", "1"), put("w", "2")]
    );
    b.store("w", "3").await.expect("store");
    assert_eq!(seen(&next_event(&mut stream, "w=3").await), put("w", "3"));
    no_event(&mut stream, "A's watcher repeats nothing").await;
    let everything = [put("w", "0"), put("w", "1"), put("w", "2"), put("w", "3")];
    eventually("the callback caught up", SETTLE, || {
        let calls = calls(&recorded);
        async move { calls.len() >= 4 }
    })
    .await;
    assert_eq!(calls(&recorded), everything, "none missed, none repeated");

    assert!(
        guard.lost().now_or_never().is_none(),
        "lost() after a short cut"
    );
    eventually("A's guard is held", SETTLE, || {
        let held = guard.is_held();
        async move { held }
    })
    .await;
    a.dist_lock().await.expect("A still holds its lock");
    assert!(!b_waits.is_finished(), "B took A's lock after a short cut");
    assert_eq!(b.get("t/a").await.expect("get").as_deref(), Some("1"));
    a.dist_unlock().await.expect("A unlocks");
    tokio::time::timeout(SETTLE, b_waits)
        .await
        .expect("B gets the lock")
        .expect("task")
        .expect("B locks");

    a.watch_cb_cancel(watcher);
    drop(guard);
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

/// What a cut-off holder's unlocks and leadership calls do during a partition shorter than
/// `lease_ttl`: `proclaim` fails and writes nothing; `dist_unlock`, a guard's `unlock` and
/// `resign` fail too (the key cannot be deleted yet), yet they let go: the key goes once the
/// cut ends, and the waiting handle gets the locks and the leadership then, not before.
async fn releases_during_a_partition(mut rig: Box<dyn Rig>) {
    let a = rig.open_faulty().await;
    let b: Arc<dyn Kvi> = Arc::from(rig.open_other().await);
    a.dist_lock().await.expect("A locks");
    let b_dist_locks = spawn_dist_lock(&b);
    let guard = a.lock("jobs").await.expect("A locks jobs");
    let mut leadership = a.campaign("boss", "a").await.expect("A campaigns");
    let b_locks = tokio::spawn({
        let b = Arc::clone(&b);
        async move { b.lock("jobs").await }
    });
    let b_campaigns = tokio::spawn({
        let b = Arc::clone(&b);
        async move { b.campaign("boss", "b").await }
    });
    eventually("B queues for both", Duration::from_secs(10), || async {
        let jobs = b.get_prefix("jobs/").await.map_or(0, |kvs| kvs.len());
        let boss = b.get_prefix("boss/").await.map_or(0, |kvs| kvs.len());
        let work = b.get_prefix(&format!("{LOCK_NAME}/")).await;
        jobs == 2 && boss == 2 && work.is_ok_and(|kvs| kvs.len() == 2)
    })
    .await;

    rig.cut();
    let cut = Instant::now();
    fails_unreachable("proclaim", leadership.proclaim("a, cut off")).await;
    assert_eq!(
        leadership.value(),
        "a",
        "a failed proclaim changed the value"
    );
    let leader = b.leader("boss").await.expect("leader").map(|kv| kv.value);
    assert_eq!(
        leader.as_deref(),
        Some("a"),
        "a failed proclaim was written"
    );
    futures::join!(
        fails_unreachable("dist_unlock", a.dist_unlock()),
        fails_unreachable("unlock", guard.unlock()),
        fails_unreachable("resign", leadership.resign()),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !b_dist_locks.is_finished(),
        "B took A's lock while A was cut off"
    );
    assert!(
        !b_locks.is_finished(),
        "B took the lock while A was cut off"
    );
    assert!(!b_campaigns.is_finished(), "B led while A was cut off");
    assert!(
        cut.elapsed() < LEASE_TTL / 2,
        "the cut took {:?}",
        cut.elapsed()
    );
    rig.resume();

    tokio::time::timeout(SETTLE, b_dist_locks)
        .await
        .expect("B never got A's lock after the cut")
        .expect("B's dist_lock task")
        .expect("B dist_locks");
    let b_guard = tokio::time::timeout(SETTLE, b_locks)
        .await
        .expect("B never got the lock after the cut")
        .expect("B's lock task")
        .expect("B locks");
    let b_leads = tokio::time::timeout(SETTLE, b_campaigns)
        .await
        .expect("B never led after the cut")
        .expect("B's campaign task")
        .expect("B campaigns");
    let leader = b.leader("boss").await.expect("leader").map(|kv| kv.value);
    assert_eq!(leader.as_deref(), Some("b"));
    b.dist_unlock().await.expect("B unlocks");
    b_guard.unlock().await.expect("B unlocks jobs");
    b_leads.resign().await.expect("B resigns");
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

/// A partition longer than `lease_ttl`: A's lease expires while it is cut off, so its lock is
/// lost (`SessionLost`, within the TTL) and handed on, and its temp keys go; a temp key that
/// B writes meanwhile is B's. When the cut ends A's watcher catches up with all of it, A
/// queues again instead of believing it holds the lock, and only its unclaimed temp key
/// comes back.
async fn long_partition(mut rig: Box<dyn Rig>) {
    let a = rig.open_faulty().await;
    let b: Arc<dyn Kvi> = Arc::from(rig.open_other().await);
    let mut b_temps = b.watch_prefix("t/").await.expect("watch t/");
    let mut a_temps = a.watch_prefix("t/").await.expect("watch t/");
    a.temp_key("t/1").await.expect("temp key");
    a.temp_key("t/2").await.expect("temp key");
    next_events(&mut b_temps, 2, "B sees A's temp keys").await;
    next_events(&mut a_temps, 2, "A sees its temp keys").await;
    a.dist_lock().await.expect("A locks");
    let guard = a.lock("jobs").await.expect("A locks jobs");
    let mut lock_keys = b
        .watch_prefix(&format!("{LOCK_NAME}/"))
        .await
        .expect("watch the lock");
    let b_waits = spawn_dist_lock(&b);
    queued_key(&mut lock_keys, "B queues for A's lock").await;

    rig.cut();
    let cut = Instant::now();
    let reason = tokio::time::timeout(LEASE_TTL + SETTLE, guard.lost())
        .await
        .expect("lost() resolves during a cut longer than lease_ttl");
    let lost_after = cut.elapsed();
    assert_eq!(reason, LostReason::SessionLost);
    assert!(!guard.is_held());
    assert!(
        lost_after >= LEASE_TTL / 2 && lost_after <= LEASE_TTL + Duration::from_millis(500),
        "lost {lost_after:?} after the cut, lease_ttl {LEASE_TTL:?}"
    );
    tokio::time::timeout(LEASE_TTL + SETTLE, b_waits)
        .await
        .expect("B gets A's lock once A's lease expired")
        .expect("task")
        .expect("B locks");
    let deleted = next_events(&mut b_temps, 2, "A's temp keys expire").await;
    assert_eq!(
        deleted.iter().map(seen).collect::<Vec<_>>(),
        [delete("t/1"), delete("t/2")]
    );
    assert_eq!(deleted[0].revision(), deleted[1].revision());
    b.store("t/2", "b").await.expect("B takes t/2");
    fails_unreachable("get", a.get("t/1")).await;
    no_event(&mut a_temps, "A's watcher while cut").await;
    tokio::time::sleep((LEASE_TTL + Duration::from_secs(1)).saturating_sub(cut.elapsed())).await;
    rig.resume();

    // "Holds" means holds now: A queues again, and gives up since B holds the lock.
    let attempt = once_reachable("dist_timed_lock", || async {
        match a.dist_timed_lock(Duration::from_secs(1)).await {
            Err(Error::LockTimeout { .. }) => Ok(()),
            Ok(()) => panic!("A took the lock B holds"),
            Err(err) => Err(err),
        }
    })
    .await;
    assert_eq!(attempt, ());
    let restored = next_events(&mut b_temps, 2, "B: B's write, A's restore").await;
    assert_eq!(
        restored.iter().map(seen).collect::<Vec<_>>(),
        [put("t/2", "b"), put("t/1", "1")],
        "only the temp key nobody took comes back"
    );
    let caught_up = next_events(&mut a_temps, 4, "A's watcher after the cut").await;
    assert_eq!(
        caught_up.iter().map(seen).collect::<Vec<_>>(),
        [
            delete("t/1"),
            delete("t/2"),
            put("t/2", "b"),
            put("t/1", "1")
        ]
    );
    assert_eq!(
        caught_up
            .iter()
            .map(WatchEvent::revision)
            .collect::<Vec<_>>(),
        deleted
            .iter()
            .chain(&restored)
            .map(WatchEvent::revision)
            .collect::<Vec<_>>(),
        "A's watcher saw what B's saw, at the same revisions"
    );
    guard.unlock().await.expect("a lost guard's unlock is Ok");
    b.dist_lock().await.expect("B still holds the lock");
    a.close().await.expect("close A");
    let left = b.get_range("t/", "t/~").await.expect("range");
    assert_eq!(
        left.iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_str()))
            .collect::<Vec<_>>(),
        [("t/2", "b")],
        "closing A takes its temp key, not B's"
    );
    b.close().await.expect("close B");
}

/// Compaction while A's watcher is cut off: history it still needs from the compaction
/// revision on is delivered; history before it gives `Compacted`, and the watch ends.
async fn compaction(mut rig: Box<dyn Rig>) {
    let a = rig.open_faulty().await;
    let b = rig.open_other().await;
    let mut stream = a.watch_stream("c").await.expect("watch_stream");
    let (recorded, callback) = recording_callback();
    let watcher = a
        .watch_with_cb("c", KeyChange::Put, callback)
        .await
        .expect("watch_with_cb");
    let mut observer = b.watch_stream("c").await.expect("watch_stream");
    let mut write = async |value: &str| {
        b.store("c", value).await.expect("store");
        next_event(&mut observer, "B's own write").await.revision()
    };
    write("1").await;
    assert_eq!(seen(&next_event(&mut stream, "c=1").await), put("c", "1"));

    // Compacted up to the first missed event: nothing A needs is gone.
    rig.cut();
    let r2 = write("2").await;
    write("3").await;
    rig.compact(r2).await;
    rig.resume();
    let caught_up = next_events(&mut stream, 2, "A's watcher after the first cut").await;
    assert_eq!(
        caught_up.iter().map(seen).collect::<Vec<_>>(),
        [put("c", "2"), put("c", "3")]
    );
    // The callback watcher catches up too. etcd may sync its re-created watch a moment after
    // the stream's (etcd 3.4 catches unsynced watches up every 100 ms): cut off again before
    // that, it would stay behind the compaction below, where `Compacted` is the right answer.
    eventually("the callback watcher to catch up", SETTLE, || {
        let calls = calls(&recorded);
        async move { calls == [put("c", "1"), put("c", "2"), put("c", "3")] }
    })
    .await;

    // Compacted past it: A's watch cannot resume.
    rig.cut();
    let r4 = write("4").await;
    let r5 = write("5").await;
    rig.compact(r5).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    rig.resume();
    match tokio::time::timeout(SETTLE * 2, stream.next()).await {
        Ok(Some(Err(Error::Compacted {
            key,
            revision,
            compact_revision,
        }))) => {
            assert_eq!(key, "c");
            assert_eq!(revision, r4, "the first revision A needed");
            assert_eq!(compact_revision, r5);
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    let after = tokio::time::timeout(SETTLE, stream.next()).await;
    assert!(
        matches!(after, Ok(None)),
        "Compacted is the stream's last item: {after:?}"
    );
    eventually("the callback watcher ends", SETTLE, || {
        let finished = watcher.is_finished();
        async move { finished }
    })
    .await;
    assert_eq!(
        calls(&recorded),
        [put("c", "1"), put("c", "2"), put("c", "3")],
        "the callback saw nothing past the compaction"
    );
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

/// Whether `compare` holds on `kv`, by a transaction that writes nothing.
async fn holds(kv: &dyn Kvi, compare: Compare) -> bool {
    kv.txn(Txn::new().when(compare).then(Op::get("probe")))
        .await
        .expect("txn")
        .succeeded
}

/// At a lease expiry `Compare::held` and `Compare::leading` stop holding (on the handle that
/// lost them and on another), so a lost holder cannot write through them; the temp keys of
/// `store_temp` and of a txn's `Op::put_temp` are deleted with the lease and come back with
/// their values, not `"1"`.
async fn guarded_writes_lease_expiry(mut rig: Box<dyn Rig>) {
    let a: Arc<dyn Kvi> = Arc::from(rig.open_faulty().await);
    let b: Arc<dyn Kvi> = Arc::from(rig.open_other().await);
    let mut temps = b.watch_prefix("t/").await.expect("watch t/");
    a.store_temp("t/1", "addr-1").await.expect("store_temp");
    let outcome = a
        .txn(Txn::new().then(Op::put_temp("t/2", "addr-2")))
        .await
        .expect("txn with put_temp");
    assert!(outcome.succeeded);
    next_events(&mut temps, 2, "A's temp keys").await;
    let guard = a.lock("jobs").await.expect("A locks jobs");
    let leadership = a.campaign("boss", "a").await.expect("A campaigns");
    let held = Compare::held(&guard);
    let leading = Compare::leading(&leadership);
    let write = Txn::new()
        .when(held.clone())
        .when(leading.clone())
        .then(Op::put("state", "written by A"));
    assert!(a.txn(write.clone()).await.expect("txn").succeeded);
    assert!(holds(b.as_ref(), held.clone()).await, "held, seen from B");
    assert!(
        holds(b.as_ref(), leading.clone()).await,
        "leading, seen from B"
    );

    rig.expire_lease("t/1").await;

    let deleted = next_events(&mut temps, 2, "temp keys deleted").await;
    assert_eq!(
        deleted.iter().map(seen).collect::<Vec<_>>(),
        [delete("t/1"), delete("t/2")]
    );
    assert!(
        !holds(b.as_ref(), held.clone()).await,
        "held after the expiry"
    );
    assert!(
        !holds(b.as_ref(), leading.clone()).await,
        "leading after the expiry"
    );
    let limit = LEASE_TTL + SETTLE;
    let reason = tokio::time::timeout(limit, guard.lost())
        .await
        .expect("the guard's lost() resolves");
    assert_eq!(reason, LostReason::SessionLost);
    let reason = tokio::time::timeout(limit, leadership.lost())
        .await
        .expect("the leadership's lost() resolves");
    assert_eq!(reason, LostReason::SessionLost);
    let outcome = a
        .txn(write.otherwise(Op::get("state")))
        .await
        .expect("A's guarded txn after the loss");
    assert!(!outcome.succeeded, "A wrote through a lost lock");
    assert!(!holds(a.as_ref(), held).await);
    assert!(!holds(a.as_ref(), leading).await);

    let mut restored: Vec<Seen> = next_events(&mut temps, 2, "temp keys restored")
        .await
        .iter()
        .map(seen)
        .collect();
    restored.sort_by_key(|seen| format!("{seen:?}"));
    assert_eq!(restored, [put("t/1", "addr-1"), put("t/2", "addr-2")]);
    for key in ["t/1", "t/2"] {
        let kv = b.get_kv(key).await.expect("get_kv").expect("restored");
        assert_ne!(kv.lease, 0, "{key} is on A's new lease");
        assert_eq!(kv.version, 1, "{key} was created again");
    }
    a.close().await.expect("close A");
    assert_eq!(b.get_prefix("t/").await.expect("get_prefix"), []);
    b.close().await.expect("close B");
}

/// A `watch_prefix_from` stream of the cut-off handle catches up once the link is back:
/// every change under the prefix once, in order, the history before the cut included.
async fn history_across_a_cut(mut rig: Box<dyn Rig>) {
    let a = rig.open_faulty().await;
    let b = rig.open_other().await;
    b.store("r/00", "0").await.expect("store");
    let from = b
        .get_kv("r/00")
        .await
        .expect("get_kv")
        .expect("r/00")
        .mod_revision;
    b.store("r/01", "1").await.expect("store");
    let mut stream = a.watch_prefix_from("r/", from).await.expect("watch");
    let mut got = next_events(&mut stream, 2, "the history").await;
    rig.cut();
    for i in 2..6 {
        b.store(&format!("r/{i:02}"), &i.to_string())
            .await
            .expect("store");
    }
    b.store("elsewhere", "x").await.expect("store");
    tokio::time::sleep(Duration::from_millis(700)).await;
    rig.resume();
    for i in 6..8 {
        b.store(&format!("r/{i:02}"), &i.to_string())
            .await
            .expect("store");
    }
    got.extend(next_events(&mut stream, 6, "after the cut").await);
    let expected: Vec<Seen> = (0..8)
        .map(|i| put(&format!("r/{i:02}"), &i.to_string()))
        .collect();
    assert_eq!(got.iter().map(seen).collect::<Vec<_>>(), expected);
    assert_eq!(got[0].revision(), from);
    assert!(
        got.windows(2).all(|p| p[0].revision() < p[1].revision()),
        "revisions strictly increase: {got:?}"
    );
    no_event(&mut stream, "after every write").await;
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

/// After a compaction at C, `watch_prefix_from(p, rev)` with `rev < C` yields
/// `Compacted { key: p, revision: rev, compact_revision: C }` as its first and last item;
/// from C itself it replays C's change on, then goes live.
async fn history_compaction(mut rig: Box<dyn Rig>) {
    let a = rig.open_faulty().await;
    let b = rig.open_other().await;
    let mut revisions = Vec::new();
    for i in 1..=3 {
        let key = format!("h/{i}");
        b.store(&key, &i.to_string()).await.expect("store");
        let kv = b.get_kv(&key).await.expect("get_kv").expect("stored");
        revisions.push(kv.mod_revision);
    }
    let compacted = revisions[1];
    rig.compact(compacted).await;
    for (kv, who) in [(&a, "A"), (&b, "B")] {
        for from in [revisions[0], compacted - 1] {
            let mut stream = kv
                .watch_prefix_from("h/", from)
                .await
                .unwrap_or_else(|err| panic!("{who}: the call itself succeeds: {err}"));
            match tokio::time::timeout(SETTLE, stream.next()).await {
                Ok(Some(Err(Error::Compacted {
                    key,
                    revision,
                    compact_revision,
                }))) => {
                    assert_eq!(key, "h/", "{who}");
                    assert_eq!(revision, from, "{who}");
                    assert_eq!(compact_revision, compacted, "{who}");
                }
                other => panic!("{who} from {from}: expected Compacted, got {other:?}"),
            }
            let after = tokio::time::timeout(SETTLE, stream.next()).await;
            assert!(
                matches!(after, Ok(None)),
                "{who}: Compacted is the stream's last item: {after:?}"
            );
        }
    }
    let mut stream = a
        .watch_prefix_from("h/", compacted)
        .await
        .expect("watch from the compaction revision");
    let replayed = next_events(&mut stream, 2, "from the compaction revision").await;
    assert_eq!(
        replayed.iter().map(seen).collect::<Vec<_>>(),
        [put("h/2", "2"), put("h/3", "3")]
    );
    assert_eq!(replayed[0].revision(), compacted);
    b.store("h/4", "4").await.expect("store");
    assert_eq!(
        seen(&next_event(&mut stream, "live after the replay").await),
        put("h/4", "4")
    );
    no_event(&mut stream, "after the live write").await;
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}
