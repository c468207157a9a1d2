//! Fault tolerance: what the lock, temp keys and watches promise when processes crash, etcd
//! becomes unreachable for a while, or a watcher falls behind a compaction.
//!
//! Named `faults::<backend>::<what it proves>`. The etcd tests run against a private etcd
//! that the harness starts (container or child process, as `HMETCD_ETCD_MODE` says; never
//! `HMETCD_TEST_ENDPOINTS`, because one test compacts the store). Outages are staged with a
//! TCP proxy between one handle and etcd (`integration_tests::faults::proxy`), which can
//! freeze the connection (the client sees a paused etcd), cut it (a network partition) or
//! strand it (the client's side closes, and what it sent arrives later), while other handles
//! and processes reach etcd directly. Tests run one at a time unless
//! `--test-threads` says otherwise, because they measure timings. Every measured figure is
//! printed to stderr.
//!
//! The processes are the `lock_worker` example of `hmetcd` (built by the first test that needs
//! it with `cargo build -p hmetcd --features etcd --example lock_worker` into this test's
//! target directory, or taken from `HMETCD_LOCK_WORKER`) and this package's `lease_holder`
//! binary; each is killed when its test ends, passes or not.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{GetOptions, SortOrder, SortTarget};
use futures::StreamExt;
use hmetcd_core::{Error, KeyChange, Kvi, WatchEvent, WatchStream};
use hmetcd_etcd::{EtcdKvs, PausePoint};
use hmetcd_mem::MemKvs;
use integration_tests::backends::EtcdOpener;
use integration_tests::etcd_server::{lease_of, raw_client, EtcdPauser, EtcdServer};
use integration_tests::faults::pause::{arrivals, hold_renewals};
use integration_tests::faults::process::{lock_worker_binary, ChildProcess};
use integration_tests::faults::proxy::FaultProxy;
use integration_tests::faults::runner::{run_fault_binary, EtcdTrials};
use integration_tests::run_limited;
use integration_tests::TestStore;
use libtest_mimic::Trial;

/// The lease TTL of every etcd fault test: short, so that expiry is quick.
const LEASE_TTL: Duration = Duration::from_secs(3);
/// The request timeout of the handles whose connection the tests break.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// Leases are renewed every third of their TTL, so a crashed holder's lease may expire as
/// early as two thirds of the TTL after the crash.
const EARLIEST_EXPIRY: Duration = Duration::from_secs(2);
/// What the contract allows beyond `lease_ttl` for a crashed process's lease to go.
const EXPIRY_SLACK: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let trials = vec![Trial::test(
        "faults::mem::lock_excludes_8_handles_over_2000_increments",
        || run_limited(2, Duration::from_secs(60), mem_lock_excludes_8_handles()),
    )];
    run_fault_binary("faults", trials, etcd_trials)
}

fn etcd_trials(server: &EtcdServer) -> Vec<Trial> {
    let mut trials = EtcdTrials::new("faults", server);
    trials
        .add(
            "lock_excludes_4_processes_over_1000_increments",
            120,
            |e, s| Box::pin(lock_excludes_4_processes(e, s)),
        )
        .add(
            "lock_holder_crash_takeover_after_lease_expiry",
            60,
            |e, s| Box::pin(lock_holder_crash_takeover(e, s)),
        )
        .add("temp_key_owner_crash_removes_only_its_keys", 60, |e, s| {
            Box::pin(temp_key_owner_crash(e, s))
        })
        .add(
            "outage_shorter_than_lease_ttl_fails_fast_then_keeps_lock_keys_and_watches",
            60,
            |e, s| Box::pin(short_outage(e, s, Outage::Frozen)),
        )
        .add(
            "network_cut_shorter_than_lease_ttl_fails_fast_then_keeps_lock_keys_and_watches",
            60,
            |e, s| Box::pin(short_outage(e, s, Outage::Cut)),
        )
        .add(
            "outage_longer_than_lease_ttl_loses_lock_and_restores_temp_keys",
            60,
            |e, s| Box::pin(long_outage(e, s)),
        )
        .add(
            "an_unlock_or_a_lock_wait_in_an_outage_goes_through_once_the_link_is_back",
            60,
            |e, s| Box::pin(unlock_in_an_outage(e, s)),
        )
        .add(
            "lock_key_deletes_that_arrive_late_delete_no_later_hold",
            60,
            |e, s| Box::pin(late_lock_key_deletes(e, s)),
        )
        .add(
            "a_lock_wait_given_up_whose_put_arrives_late_blocks_nobody",
            60,
            |e, s| Box::pin(late_waiter_put(e, s)),
        )
        .add(
            "a_proclaim_that_arrives_late_undoes_no_later_one",
            60,
            |e, s| Box::pin(late_proclaim(e, s)),
        )
        .add(
            "a_read_right_after_its_connection_breaks_is_sent_again_and_a_write_only_if_it_never_went_out",
            60,
            |e, s| Box::pin(calls_right_after_a_break(e, s)),
        )
        .add(
            "a_handle_keeps_no_lock_name_once_its_guards_and_waits_are_gone",
            60,
            |e, s| Box::pin(lock_names_return_to_zero(e, s)),
        )
        .add(
            "a_lock_is_not_granted_on_a_lease_whose_renewal_is_overdue",
            60,
            |e, s| Box::pin(grant_on_overdue_lease(e, s)),
        )
        .add(
            "a_temp_key_restore_that_arrives_late_brings_back_no_deleted_key",
            60,
            |e, s| Box::pin(late_restore(e, s)),
        );
    let endpoints = server.endpoints().to_owned();
    let store = TestStore::new(Arc::new(EtcdOpener::on(server)));
    let pauser = server.pauser();
    trials.add_future(
        "etcd_paused_shorter_than_lease_ttl_fails_fast_then_keeps_lock_keys_and_watches",
        60,
        move || Box::pin(etcd_paused(endpoints, store, pauser)),
    );
    // Last: compaction concerns the whole store.
    trials.add(
        "a_lock_waiter_cut_off_while_the_holder_lets_go_and_history_is_compacted_gets_the_lock",
        60,
        |e, s| Box::pin(lock_wait_behind_compaction(e, s)),
    );
    trials.add("watch_behind_compaction_reports_compacted", 60, |e, s| {
        Box::pin(watch_behind_compaction(e, s))
    });
    trials.into_trials()
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_nanos())
        .unwrap_or(0)
}

fn secs(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

fn ok<T>(outcome: Result<T, String>) -> T {
    outcome.unwrap_or_else(|why| panic!("{why}"))
}

/// One critical section: who, when it began and ended (any clock shared by all), and the
/// counter value it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Section {
    who: String,
    enter: u128,
    leave: u128,
    counter: u64,
}

/// Fails unless no two sections overlap and the counters written are exactly 1..=n.
fn check_exclusion(mut sections: Vec<Section>) {
    sections.sort_by_key(|section| section.enter);
    for pair in sections.windows(2) {
        assert!(
            pair[0].leave <= pair[1].enter,
            "two lock holders at once: {:?} and {:?}",
            pair[0],
            pair[1]
        );
    }
    let mut counters: Vec<u64> = sections.iter().map(|section| section.counter).collect();
    counters.sort_unstable();
    let expected: Vec<u64> = (1..=sections.len() as u64).collect();
    assert!(
        counters == expected,
        "the counter values written are not exactly 1..={}: a lost or doubled increment",
        sections.len()
    );
}

/// A line of `lock_worker`: `<name> <i> enter=<ns> leave=<ns> counter=<n>`.
fn parse_worker_line(line: &str) -> Option<Section> {
    let mut parts = line.split(' ');
    let who = parts.next()?.to_owned();
    let _iteration: u64 = parts.next()?.parse().ok()?;
    let enter = parts.next()?.strip_prefix("enter=")?.parse().ok()?;
    let leave = parts.next()?.strip_prefix("leave=")?.parse().ok()?;
    let counter = parts.next()?.strip_prefix("counter=")?.parse().ok()?;
    Some(Section {
        who,
        enter,
        leave,
        counter,
    })
}

fn worker_args(
    endpoint: &str,
    options: &str,
    name: &str,
    iterations: u64,
    sleep_ms: u64,
) -> Vec<String> {
    [
        "--endpoint",
        endpoint,
        "--options",
        options,
        "--name",
        name,
        "--counter",
        "counter",
        "--iterations",
        &iterations.to_string(),
        "--max-sleep-ms",
        &sleep_ms.to_string(),
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect()
}

fn holder_args(endpoint: &str, options: &str, extra: &[&str]) -> Vec<String> {
    ["--endpoint", endpoint, "--options", options]
        .iter()
        .chain(extra)
        .map(|arg| (*arg).to_owned())
        .collect()
}

/// The lock keys under the store's lock name, oldest first: (key, lease id).
async fn lock_keys(raw: &mut etcd_client::Client, store: &TestStore) -> Vec<(String, i64)> {
    let prefix = format!("{}{}/", store.prefix(), store.lock_name());
    let options = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend);
    let answer = raw
        .get(prefix.as_str(), Some(options))
        .await
        .unwrap_or_else(|err| panic!("raw get of the lock keys: {err}"));
    answer
        .kvs()
        .iter()
        .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.lease()))
        .collect()
}

/// Waits until there are `count` lock keys (holder plus waiters).
async fn wait_lock_keys(
    raw: &mut etcd_client::Client,
    store: &TestStore,
    count: usize,
) -> Vec<(String, i64)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let keys = lock_keys(raw, store).await;
        if keys.len() == count {
            return keys;
        }
        assert!(
            Instant::now() < deadline,
            "expected {count} lock keys, found {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether etcd still has the lease: not yet revoked, though its TTL may have run out (etcd
/// answers -1 for a lease it no longer has, and revokes expired leases every 500 ms or so).
async fn lease_exists(raw: &mut etcd_client::Client, lease: i64) -> bool {
    match raw.lease_time_to_live(lease, None).await {
        Ok(answer) => answer.ttl() >= 0,
        Err(_) => false,
    }
}

/// Polls until etcd has revoked `lease`; returns the unix time in ns when that was seen.
async fn lease_gone_at(endpoints: String, lease: i64) -> u128 {
    let mut raw = ok(raw_client(&endpoints).await);
    while lease_exists(&mut raw, lease).await {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unix_nanos()
}

fn options(store: &TestStore, request_timeout: Duration) -> String {
    store.options(&format!(
        "lease_ttl={}s,request_timeout={}ms",
        LEASE_TTL.as_secs(),
        request_timeout.as_millis()
    ))
}

async fn mem_lock_excludes_8_handles() {
    const HANDLES: usize = 8;
    const ROUNDS: u64 = 250;
    let name: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(12)
        .collect();
    let name = format!("faults-{name}");
    let origin = Instant::now();
    let mut tasks = Vec::new();
    for handle in 0..HANDLES {
        let kv = MemKvs::open(&name, "").unwrap_or_else(|err| panic!("mem:{name}: {err}"));
        tasks.push(tokio::spawn(async move {
            let mut sections = Vec::new();
            for _ in 0..ROUNDS {
                kv.dist_lock().await.expect("dist_lock");
                let enter = origin.elapsed().as_nanos();
                let current: u64 = match kv.get("counter").await.expect("get") {
                    Some(text) => text.parse().expect("a number"),
                    None => 0,
                };
                tokio::time::sleep(Duration::from_micros(fastrand::u64(0..=2000))).await;
                kv.store("counter", &(current + 1).to_string())
                    .await
                    .expect("store");
                let leave = origin.elapsed().as_nanos();
                kv.dist_unlock().await.expect("dist_unlock");
                sections.push(Section {
                    who: format!("handle-{handle}"),
                    enter,
                    leave,
                    counter: current + 1,
                });
            }
            kv.close().await.expect("close");
            sections
        }));
    }
    let mut sections = Vec::new();
    for task in tasks {
        sections.extend(task.await.expect("a handle's task"));
    }
    let total = HANDLES as u64 * ROUNDS;
    assert_eq!(sections.len() as u64, total);
    check_exclusion(sections);
    let kv = MemKvs::open(&name, "").expect("mem");
    assert_eq!(
        kv.get("counter").await.expect("get"),
        Some(total.to_string())
    );
    eprintln!(
        "faults: mem: {HANDLES} handles × {ROUNDS} locked increments in {}; counter {total}; no overlap",
        secs(origin.elapsed())
    );
}

async fn lock_excludes_4_processes(endpoints: String, store: TestStore) {
    const WORKERS: usize = 4;
    const ROUNDS: u64 = 250;
    let worker = ok(lock_worker_binary());
    let options = store.options("request_timeout=5s");
    let mut workers = Vec::new();
    for index in 0..WORKERS {
        let name = format!("w{index}");
        workers.push(ok(ChildProcess::spawn(
            &name,
            &worker,
            &worker_args(&endpoints, &options, &name, ROUNDS, 2),
        )));
    }
    let began = Instant::now();
    for (index, worker) in workers.iter_mut().enumerate() {
        ok(worker
            .expect_line(&format!("w{index} ready"), Duration::from_secs(30))
            .await);
    }
    let outputs = futures::future::join_all(
        workers
            .iter_mut()
            .map(|worker| worker.finish(Duration::from_secs(100))),
    )
    .await;
    let elapsed = began.elapsed();
    let mut sections = Vec::new();
    for (index, output) in outputs.into_iter().enumerate() {
        let lines = ok(output);
        let steps: Vec<Section> = lines
            .iter()
            .filter_map(|line| parse_worker_line(line))
            .collect();
        assert_eq!(steps.len() as u64, ROUNDS, "w{index} printed {lines:?}");
        assert_eq!(
            lines.last().map(String::as_str),
            Some(format!("w{index} done").as_str())
        );
        sections.extend(steps);
    }
    let total = WORKERS as u64 * ROUNDS;
    check_exclusion(sections);
    let kv = store.open().await;
    assert_eq!(
        kv.get("counter").await.expect("get"),
        Some(total.to_string())
    );
    kv.close().await.expect("close");
    eprintln!(
        "faults: {WORKERS} lock_worker processes × {ROUNDS} locked increments in {}; counter {total}; no overlap",
        secs(elapsed)
    );
}

async fn lock_holder_crash_takeover(endpoints: String, store: TestStore) {
    let options = options(&store, Duration::from_secs(1));
    let mut raw = ok(raw_client(&endpoints).await);
    let mut holder = ok(ChildProcess::spawn(
        "lease_holder",
        std::path::Path::new(env!("CARGO_BIN_EXE_lease_holder")),
        &holder_args(&endpoints, &options, &["--lock"]),
    ));
    ok(holder.expect_line("ready", Duration::from_secs(20)).await);
    let mut waiter = ok(ChildProcess::spawn(
        "waiter",
        &ok(lock_worker_binary()),
        &worker_args(&endpoints, &options, "waiter", 1, 0),
    ));
    ok(waiter
        .expect_line("waiter ready", Duration::from_secs(20))
        .await);
    // The holder's key first, the waiter's behind it.
    let keys = wait_lock_keys(&mut raw, &store, 2).await;
    let holder_lease = keys[0].1;
    let expiry = tokio::spawn(lease_gone_at(endpoints.clone(), holder_lease));
    let killed_at = unix_nanos();
    ok(holder.kill().await);
    let line = ok(waiter
        .next_line(LEASE_TTL + EXPIRY_SLACK + Duration::from_secs(3))
        .await)
    .unwrap_or_else(|| panic!("the waiter ended without taking the lock"));
    let section = parse_worker_line(&line).unwrap_or_else(|| panic!("waiter printed {line:?}"));
    let expired_seen_at = tokio::time::timeout(Duration::from_secs(5), expiry)
        .await
        .expect("the holder's lease expires")
        .expect("the lease poll");
    let takeover = Duration::from_nanos((section.enter.saturating_sub(killed_at)) as u64);
    let expired = Duration::from_nanos((expired_seen_at.saturating_sub(killed_at)) as u64);
    eprintln!(
        "faults: takeover after {} (lease_ttl {}; etcd revoked the holder's lease {} after the kill -9)",
        secs(takeover),
        secs(LEASE_TTL),
        secs(expired)
    );
    assert!(
        takeover <= LEASE_TTL + EXPIRY_SLACK,
        "the lock was taken over only {} after the holder died",
        secs(takeover)
    );
    assert!(
        takeover + Duration::from_millis(250) >= EARLIEST_EXPIRY,
        "the lock was taken over {} after the holder died, before its lease could expire",
        secs(takeover)
    );
    // The lease poll sees the revocation at most ~20 ms and a round trip after it happened.
    assert!(
        section.enter + 150_000_000 >= expired_seen_at,
        "the waiter entered {} before the holder's lease was gone",
        secs(Duration::from_nanos(
            expired_seen_at.saturating_sub(section.enter) as u64
        ))
    );
    ok(waiter.finish(Duration::from_secs(10)).await);
}

async fn temp_key_owner_crash(endpoints: String, store: TestStore) {
    let options = options(&store, Duration::from_secs(1));
    let mut owner = ok(ChildProcess::spawn(
        "lease_holder",
        std::path::Path::new(env!("CARGO_BIN_EXE_lease_holder")),
        &holder_args(&endpoints, &options, &["--temp-key", "crashed/owner"]),
    ));
    ok(owner.expect_line("ready", Duration::from_secs(20)).await);
    let live = store
        .open_with(&options)
        .await
        .expect("open the live handle");
    live.temp_key("live/owner").await.expect("temp_key");
    let observer = store.open().await;
    assert_eq!(
        observer.get("crashed/owner").await.expect("get").as_deref(),
        Some("1")
    );
    assert_eq!(
        observer.get("live/owner").await.expect("get").as_deref(),
        Some("1")
    );

    let killed = Instant::now();
    ok(owner.kill().await);
    let gone_after = loop {
        if observer.get("crashed/owner").await.expect("get").is_none() {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() <= LEASE_TTL + EXPIRY_SLACK,
            "the crashed owner's temp key is still there {} after kill -9",
            secs(killed.elapsed())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "faults: temp key gone {} after kill -9 of its owner (lease_ttl {})",
        secs(gone_after),
        secs(LEASE_TTL)
    );
    assert!(
        gone_after + Duration::from_millis(250) >= EARLIEST_EXPIRY,
        "the temp key went {} after the crash, before its lease could expire",
        secs(gone_after)
    );
    // The live handle's key outlives a whole TTL and more.
    tokio::time::sleep((LEASE_TTL + Duration::from_secs(1)).saturating_sub(killed.elapsed())).await;
    assert_eq!(
        observer.get("live/owner").await.expect("get").as_deref(),
        Some("1"),
        "a live handle's temp key vanished"
    );
    live.close().await.expect("close");
    observer.close().await.expect("close");
}

/// Records every event a callback sees.
fn recording_callback() -> (Arc<Mutex<Vec<WatchEvent>>>, hmetcd_core::WatchCallback) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let callback = Box::new(move |event: &WatchEvent| {
        if let Ok(mut seen) = sink.lock() {
            seen.push(event.clone());
        }
        true
    });
    (seen, callback)
}

fn values(events: &[WatchEvent]) -> Vec<(String, i64)> {
    events
        .iter()
        .map(|event| {
            (
                event.value().unwrap_or_default().to_owned(),
                event.revision(),
            )
        })
        .collect()
}

async fn next_event(stream: &mut WatchStream, limit: Duration) -> WatchEvent {
    tokio::time::timeout(limit, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no watch event within {limit:?}"))
        .unwrap_or_else(|| panic!("the watch stream ended"))
        .unwrap_or_else(|err| panic!("watch stream error: {err}"))
}

/// The value of `key` and its revision, written directly.
async fn raw_put(raw: &mut etcd_client::Client, store: &TestStore, key: &str, value: &str) -> i64 {
    let answer = raw
        .put(format!("{}{key}", store.prefix()), value, None)
        .await
        .unwrap_or_else(|err| panic!("raw put: {err}"));
    answer
        .header()
        .map(|header| header.revision())
        .unwrap_or_default()
}

/// Times one call made while etcd is unreachable: it must fail with `Timeout` or
/// `Unavailable` within `request_timeout` (and a little scheduling slack).
async fn fails_fast<T: std::fmt::Debug>(
    what: &str,
    call: impl std::future::Future<Output = hmetcd_core::Result<T>>,
) -> String {
    let began = Instant::now();
    let outcome = tokio::time::timeout(REQUEST_TIMEOUT * 4, call).await;
    let took = began.elapsed();
    let err = match outcome {
        Err(_) => panic!("{what} during the outage hung for {took:?}"),
        Ok(Ok(answer)) => panic!("{what} during the outage answered {answer:?}"),
        Ok(Err(err)) => err,
    };
    assert!(
        matches!(err, Error::Timeout { .. } | Error::Unavailable { .. }),
        "{what} during the outage: {err:?}"
    );
    assert!(
        took <= REQUEST_TIMEOUT + Duration::from_millis(300),
        "{what} during the outage took {took:?}, request_timeout is {REQUEST_TIMEOUT:?}"
    );
    let kind = if matches!(err, Error::Timeout { .. }) {
        "Timeout"
    } else {
        "Unavailable"
    };
    format!("{what} {kind} after {} ms", took.as_millis())
}

/// How a short outage looks to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    /// Connections stay open but carry nothing: a paused etcd.
    Frozen,
    /// Connections are closed and new ones hang: a network cut; watches must re-subscribe.
    Cut,
}

/// After an outage: the same handle answers again without reopening (it may keep failing for
/// up to 3 s after `resumed`; its value of `w` must be `w_value`), writes, still holds its lock
/// under the same key (B's timed lock gives up), and its temp key stands. Returns how long
/// after `resumed` the first answer came.
async fn still_holds_after_outage(
    a: &EtcdKvs,
    b: &dyn Kvi,
    raw: &mut etcd_client::Client,
    store: &TestStore,
    lock_before: &[(String, i64)],
    resumed: Instant,
    w_value: &str,
) -> Duration {
    let answer = loop {
        match a.get("w").await {
            Ok(answer) => break answer,
            Err(err) if resumed.elapsed() < Duration::from_secs(3) => {
                eprintln!("faults: after the outage: {err}; retrying");
            }
            Err(err) => panic!(
                "A still fails {} after the outage: {err}",
                secs(resumed.elapsed())
            ),
        }
    };
    let answered_after = resumed.elapsed();
    assert_eq!(answer.as_deref(), Some(w_value));
    a.store("a/plain", "ok")
        .await
        .expect("A writes after the outage");

    // Still A's lock: B cannot take it, and A's lock key is the one from before.
    let attempt = b.dist_timed_lock(Duration::from_millis(500)).await;
    assert!(
        matches!(attempt, Err(Error::LockTimeout { .. })),
        "B: {attempt:?}"
    );
    a.dist_lock().await.expect("A still holds the lock");
    assert_eq!(
        lock_keys(raw, store).await,
        lock_before,
        "A's lock key after the outage"
    );
    assert_eq!(b.get("a/temp").await.expect("get").as_deref(), Some("1"));
    answered_after
}

/// The watch stream yields `expected` after its first entry (already read), once each and in
/// order, and the callback watcher has seen all of `expected`, none lost and none repeated.
async fn watchers_saw_once_in_order(
    stream: &mut WatchStream,
    seen: &Mutex<Vec<WatchEvent>>,
    expected: &[(String, i64)],
) {
    let mut streamed = Vec::new();
    while streamed.len() < expected.len() - 1 {
        streamed.extend(values(&[next_event(stream, Duration::from_secs(10)).await]));
    }
    assert_eq!(streamed, expected[1..], "watch_stream across the outage");
    let extra = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(extra.is_err(), "watch_stream repeated an event: {extra:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().map(|seen| seen.len()).unwrap_or(0) < expected.len()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let called = values(&seen.lock().map(|seen| seen.clone()).unwrap_or_default());
    assert_eq!(
        called, expected,
        "watch_with_cb across the outage (none lost, none repeated)"
    );
}

/// A guard's `unlock` fails while A's link is frozen (shorter than the lease TTL): the key is
/// deleted in the background, retried until the link is back, and the waiting B gets the lock
/// then, not when A's lease ends. Then A waits for B's lock while its link is cut: the wait
/// rides the cut out.
async fn unlock_in_an_outage(endpoints: String, store: TestStore) {
    let proxy = ok(FaultProxy::start(&endpoints).await);
    let a = EtcdKvs::connect(proxy.endpoint(), &options(&store, REQUEST_TIMEOUT))
        .await
        .expect("open A behind the proxy");
    let b: Arc<dyn Kvi> = Arc::from(store.open_with("request_timeout=2s").await.expect("open B"));
    let guard = a.lock("outage").await.expect("A takes the lock");
    let b_locking = tokio::spawn({
        let b = b.clone();
        async move { b.lock("outage").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.freeze();
    let unlocked = guard.unlock().await;
    assert!(
        matches!(
            unlocked,
            Err(Error::Timeout { .. } | Error::Unavailable { .. })
        ),
        "A's unlock on a frozen link: {unlocked:?}"
    );
    // Long enough for the background delete to fail more than once.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        !b_locking.is_finished(),
        "B got the lock while A's link was frozen"
    );
    proxy.resume();
    let resumed = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(LEASE_TTL.as_secs()), b_locking)
        .await
        .unwrap_or_else(|_| {
            panic!("B did not get the lock within {LEASE_TTL:?} of the link coming back")
        })
        .expect("B's task")
        .expect("B's lock");
    let b_got = resumed.elapsed();

    // A waits for B's lock while its link is cut (its watch of B's key breaks), for less than
    // the lease TTL: the wait goes on, and A gets the lock when B lets go.
    let a = Arc::new(a);
    let a_locking = tokio::spawn({
        let a = a.clone();
        async move { a.lock("outage").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    proxy.resume();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !a_locking.is_finished(),
        "A's wait ended while B held the lock: {:?}",
        a_locking.await
    );
    got.unlock().await.expect("B unlocks");
    let unlocked = Instant::now();
    let a_got = tokio::time::timeout(Duration::from_secs(LEASE_TTL.as_secs()), a_locking)
        .await
        .unwrap_or_else(|_| panic!("A did not get the lock within {LEASE_TTL:?} of B's unlock"))
        .expect("A's task")
        .expect("A's lock after its link was cut while it waited");
    eprintln!(
        "faults: A's unlock failed on a frozen link; B got the lock {} after the link came back; A, cut off while it waited, got it {} after B's unlock",
        secs(b_got),
        secs(unlocked.elapsed())
    );
    a_got.unlock().await.expect("A unlocks");
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

async fn short_outage(endpoints: String, store: TestStore, kind: Outage) {
    let outage = Duration::from_millis(1200);
    let proxy = ok(FaultProxy::start(&endpoints).await);
    let a = EtcdKvs::connect(proxy.endpoint(), &options(&store, REQUEST_TIMEOUT))
        .await
        .expect("open A behind the proxy");
    let b = store.open_with("request_timeout=2s").await.expect("open B");
    let mut raw = ok(raw_client(&endpoints).await);

    a.dist_lock().await.expect("A takes the lock");
    a.temp_key("a/temp").await.expect("A's temp key");
    let mut stream = a.watch_stream("w").await.expect("watch_stream");
    let (seen, callback) = recording_callback();
    let watcher = a
        .watch_with_cb("w", KeyChange::Put, callback)
        .await
        .expect("watch_with_cb");
    let mut expected = vec![("0".to_owned(), raw_put(&mut raw, &store, "w", "0").await)];
    assert_eq!(
        values(&[next_event(&mut stream, Duration::from_secs(5)).await]),
        expected
    );
    let lock_before = lock_keys(&mut raw, &store).await;
    assert_eq!(lock_before.len(), 1, "{lock_before:?}");

    match kind {
        Outage::Frozen => proxy.freeze(),
        Outage::Cut => proxy.cut(),
    }
    let frozen = Instant::now();
    let calls = futures::join!(
        fails_fast("get", a.get("x")),
        fails_fast("store", a.store("y", "1")),
        fails_fast("get_range", a.get_range("a", "z")),
        fails_fast("tas", a.tas("y", "1", "2")),
        fails_fast("watch_stream", async {
            a.watch_stream("v").await.map(drop)
        }),
        // Enough at once that most queue behind the ones in flight (coalescing): each still
        // fails within its own request_timeout.
        futures::future::join_all((0..16).map(|i| {
            let a = &a;
            async move {
                let key = format!("many/{i}");
                if i % 2 == 0 {
                    fails_fast("a concurrent get", a.get(&key)).await
                } else {
                    fails_fast("a concurrent store", a.store(&key, "1")).await
                }
            }
        })),
    );
    // Again once the first answers are in: after a cut these go out on a new connection.
    let later = fails_fast("a later get", a.get("x")).await;
    // Others change the watched key meanwhile; A's lock and temp key stand.
    expected.push(("1".to_owned(), raw_put(&mut raw, &store, "w", "1").await));
    expected.push(("2".to_owned(), raw_put(&mut raw, &store, "w", "2").await));
    assert_eq!(
        lock_keys(&mut raw, &store).await,
        lock_before,
        "A's lock key during the outage"
    );
    assert_eq!(b.get("a/temp").await.expect("get").as_deref(), Some("1"));
    tokio::time::sleep(outage.saturating_sub(frozen.elapsed())).await;
    proxy.resume();
    let resumed = Instant::now();

    let answered_after =
        still_holds_after_outage(&a, &*b, &mut raw, &store, &lock_before, resumed, "2").await;

    expected.push(("3".to_owned(), raw_put(&mut raw, &store, "w", "3").await));
    watchers_saw_once_in_order(&mut stream, &seen, &expected).await;

    eprintln!(
        "faults: etcd unreachable ({}) for {}: {}; first call after it answered in {} ms",
        match kind {
            Outage::Frozen => "frozen connection, as if paused",
            Outage::Cut => "connection cut, new ones hang",
        },
        secs(outage),
        [
            calls.0,
            calls.1,
            calls.2,
            calls.3,
            calls.4,
            format!(
                "16 concurrent gets and stores all failed fast ({} Timeout, {} Unavailable)",
                calls.5.iter().filter(|c| c.contains("Timeout")).count(),
                calls.5.iter().filter(|c| c.contains("Unavailable")).count()
            ),
            later
        ]
        .join(", "),
        answered_after.as_millis()
    );
    a.watch_cb_cancel(watcher);
    a.dist_unlock().await.expect("dist_unlock");
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

/// etcd itself paused (SIGSTOP for a child process, `docker pause` for a container) for less
/// than `lease_ttl`: calls fail fast, then the same handle works again with its lock, its temp
/// key and its watchers. Everything etcd was sent during the pause waits, so nobody writes then.
async fn etcd_paused(endpoints: String, store: TestStore, pauser: EtcdPauser) {
    let pause = Duration::from_millis(1200);
    // A longer lease than the other fault tests: a paused etcd cannot renew it either, and
    // this test is about an outage the lease outlives.
    let a_options = store.options(&format!(
        "lease_ttl=5s,request_timeout={}ms",
        REQUEST_TIMEOUT.as_millis()
    ));
    let a = EtcdKvs::connect(&endpoints, &a_options)
        .await
        .expect("open A");
    let b = store.open_with("request_timeout=2s").await.expect("open B");
    let mut raw = ok(raw_client(&endpoints).await);

    a.dist_lock().await.expect("A takes the lock");
    a.temp_key("a/temp").await.expect("A's temp key");
    let mut stream = a.watch_stream("w").await.expect("watch_stream");
    let (seen, callback) = recording_callback();
    let watcher = a
        .watch_with_cb("w", KeyChange::Put, callback)
        .await
        .expect("watch_with_cb");
    let mut expected = vec![("0".to_owned(), raw_put(&mut raw, &store, "w", "0").await)];
    assert_eq!(
        values(&[next_event(&mut stream, Duration::from_secs(5)).await]),
        expected
    );
    let lock_before = lock_keys(&mut raw, &store).await;
    assert_eq!(lock_before.len(), 1, "{lock_before:?}");

    ok(pauser.pause().await);
    let paused = Instant::now();
    let calls = futures::join!(
        fails_fast("get", a.get("x")),
        fails_fast("get_range", a.get_range("a", "z")),
        fails_fast("tas", a.tas("y", "1", "2")),
    );
    tokio::time::sleep(pause.saturating_sub(paused.elapsed())).await;
    ok(pauser.resume().await);
    let resumed = Instant::now();

    let answered_after =
        still_holds_after_outage(&a, &*b, &mut raw, &store, &lock_before, resumed, "0").await;

    expected.push(("1".to_owned(), raw_put(&mut raw, &store, "w", "1").await));
    expected.push(("2".to_owned(), raw_put(&mut raw, &store, "w", "2").await));
    watchers_saw_once_in_order(&mut stream, &seen, &expected).await;

    eprintln!(
        "faults: etcd itself paused for {}: {}; first call after it answered in {} ms",
        secs(pause),
        [calls.0, calls.1, calls.2].join(", "),
        answered_after.as_millis()
    );
    a.watch_cb_cancel(watcher);
    a.dist_unlock().await.expect("dist_unlock");
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

async fn long_outage(endpoints: String, store: TestStore) {
    let proxy = ok(FaultProxy::start(&endpoints).await);
    let a = EtcdKvs::connect(proxy.endpoint(), &options(&store, REQUEST_TIMEOUT))
        .await
        .expect("open A behind the proxy");
    let b: Arc<dyn Kvi> = Arc::from(
        store
            .open_with(&options(&store, Duration::from_secs(1)))
            .await
            .expect("open B"),
    );
    let mut raw = ok(raw_client(&endpoints).await);

    a.dist_lock().await.expect("A takes the lock");
    a.temp_key("a/temp").await.expect("A's temp key");
    let b_locking = tokio::spawn({
        let b = b.clone();
        async move { b.dist_lock().await }
    });
    let queued = wait_lock_keys(&mut raw, &store, 2).await;

    proxy.cut();
    let cut = Instant::now();
    let b_locked =
        tokio::time::timeout(LEASE_TTL + EXPIRY_SLACK + Duration::from_secs(2), b_locking)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "B did not get the lock {} after A was cut off",
                    secs(cut.elapsed())
                )
            });
    b_locked.expect("B's task").expect("B's dist_lock");
    let b_took = cut.elapsed();
    assert_eq!(
        b.get("a/temp").await.expect("get"),
        None,
        "A's temp key outlived its lease"
    );
    assert_eq!(
        lock_keys(&mut raw, &store).await,
        queued[1..],
        "B's lock key alone"
    );
    // The cut lasts well beyond the lease TTL.
    tokio::time::sleep((LEASE_TTL + Duration::from_secs(1)).saturating_sub(cut.elapsed())).await;
    proxy.resume();
    let resumed = Instant::now();

    // At once, before anything else could tell A: it queues again instead of believing it
    // still holds the lock, and gives up since B holds it.
    let attempt = a.dist_timed_lock(Duration::from_secs(1)).await;
    let a_waited = resumed.elapsed();
    assert!(
        matches!(attempt, Err(Error::LockTimeout { .. })),
        "A after losing its lease, while B holds the lock: {attempt:?}"
    );
    let restored_after = loop {
        if b.get("a/temp").await.expect("get").as_deref() == Some("1") {
            break resumed.elapsed();
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(10),
            "A's temp key not back 10 s after the outage"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // And again once A has its new lease.
    let attempt = a.dist_timed_lock(Duration::from_millis(500)).await;
    assert!(
        matches!(attempt, Err(Error::LockTimeout { .. })),
        "A on its new lease, while B holds the lock: {attempt:?}"
    );
    // B keeps it.
    b.dist_lock().await.expect("B still holds the lock");
    assert_eq!(
        lock_keys(&mut raw, &store).await,
        queued[1..],
        "B's lock key alone after A's attempt"
    );
    b.dist_unlock().await.expect("B unlocks");
    a.dist_timed_lock(Duration::from_secs(5))
        .await
        .expect("A takes the lock after B");
    eprintln!(
        "faults: A cut off for {} (lease_ttl {}): B took the lock {} after the cut; A's temp key back {} after the cut ended; A's dist_timed_lock(1 s) right after the cut ended gave up after {} ms while B held the lock",
        secs(cut.elapsed() - resumed.elapsed()),
        secs(LEASE_TTL),
        secs(b_took),
        secs(restored_after),
        a_waited.as_millis()
    );
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

/// The lock key of `lease` (hex) under the store's lock name, and its create revision.
async fn lock_key_of(
    raw: &mut etcd_client::Client,
    store: &TestStore,
    lease: i64,
) -> Option<(String, i64)> {
    let key = format!("{}{}/{lease:x}", store.prefix(), store.lock_name());
    let answer = raw
        .get(key.as_str(), None)
        .await
        .unwrap_or_else(|err| panic!("raw get of {key}: {err}"));
    answer.kvs().first().map(|kv| (key, kv.create_revision()))
}

/// The store's revision now.
async fn revision_now(raw: &mut etcd_client::Client) -> i64 {
    raw.get("\0", Some(GetOptions::new().with_count_only()))
        .await
        .unwrap_or_else(|err| panic!("raw get: {err}"))
        .header()
        .map_or(0, |header| header.revision())
}

/// Every put of a lock key (under the store's lock name) from revision `from` to now, in
/// order: (key, lease id), from etcd's own history.
async fn lock_key_puts(
    raw: &mut etcd_client::Client,
    store: &TestStore,
    from: i64,
) -> Vec<(String, i64)> {
    let until = revision_now(raw).await;
    let prefix = format!("{}{}/", store.prefix(), store.lock_name());
    let mut stream = raw
        .watch(
            prefix.as_str(),
            Some(
                etcd_client::WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(from),
            ),
        )
        .await
        .expect("raw watch of the lock keys");
    let mut puts = Vec::new();
    let mut seen = from - 1;
    while seen < until {
        let Ok(Ok(Some(response))) =
            tokio::time::timeout(Duration::from_millis(500), stream.message()).await
        else {
            // Nothing more under the prefix up to now.
            break;
        };
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            seen = seen.max(kv.mod_revision());
            if event.event_type() == etcd_client::EventType::Put {
                puts.push((String::from_utf8_lossy(kv.key()).into_owned(), kv.lease()));
            }
        }
    }
    puts
}

/// Freezes A's link, lets `send` put a request on it (and a marker store after it), then
/// strands the link: A's requests fail, while the proxy keeps what A sent for later.
async fn strand_after(proxy: &FaultProxy, a: &Arc<EtcdKvs>, marker: &str, send: impl FnOnce()) {
    proxy.freeze();
    send();
    let marking = tokio::spawn({
        let (a, marker) = (a.clone(), marker.to_owned());
        async move { a.store(&marker, "sent").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.strand();
    let marked = tokio::time::timeout(Duration::from_secs(5), marking)
        .await
        .expect("the marker store ends once stranded")
        .expect("marker task");
    assert!(
        marked.is_err(),
        "the marker store got through a frozen link: {marked:?}"
    );
    // A write that A hands to its old connection while that connection is closing can fail as
    // well (a broken pipe: it may have gone out, so A does not send it again), as the contract
    // allows for a call meeting a broken link. Wait until A's requests get through again, so
    // that what the test does next meets the new connection.
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(err) = a.get(marker).await {
        assert!(
            Instant::now() < deadline,
            "A's requests do not get through after the strand: {err}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Delivers what A sent on its stranded link and waits until etcd has applied it (the marker
/// store sent last is there), plus a moment for the requests sent before it.
async fn deliver_late(
    proxy: &FaultProxy,
    raw: &mut etcd_client::Client,
    store: &TestStore,
    marker: &str,
) {
    let delivered = proxy
        .deliver_stranded()
        .await
        .expect("deliver the stranded requests");
    assert!(delivered > 0, "nothing was stranded");
    let key = format!("{}{marker}", store.prefix());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = raw
            .get(key.as_str(), None)
            .await
            .unwrap_or_else(|err| panic!("raw get of {key}: {err}"));
        if !found.kvs().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stranded marker store never reached etcd ({delivered} bytes delivered)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// A behind a proxy that can strand its link, B and a raw client straight to etcd.
struct Late {
    proxy: FaultProxy,
    a: Arc<EtcdKvs>,
    b: Arc<dyn Kvi>,
    raw: etcd_client::Client,
}

impl Late {
    async fn open(endpoints: &str, store: &TestStore) -> Late {
        let proxy = ok(FaultProxy::start(endpoints).await);
        // Longer than each step of the staging, so that only the stranding fails A's requests.
        let a = Arc::new(
            EtcdKvs::connect(proxy.endpoint(), &options(store, Duration::from_secs(3)))
                .await
                .expect("open A behind the proxy"),
        );
        let b = Arc::from(store.open_with("request_timeout=2s").await.expect("open B"));
        let raw = ok(raw_client(endpoints).await);
        Late { proxy, a, b, raw }
    }
}

/// B's timed lock gives up: A holds the lock.
async fn assert_lock_taken(b: &dyn Kvi) {
    let taken = b.dist_timed_lock(Duration::from_millis(500)).await;
    assert!(
        matches!(taken, Err(Error::LockTimeout { .. })),
        "B while A holds the lock: {taken:?}"
    );
}

/// A proclaims `value` on a link that is then stranded (the marker is `marker/<value>`): the
/// proclaim fails, and etcd gets it only when it is delivered.
async fn proclaim_stranded(
    proxy: &FaultProxy,
    a: &Arc<EtcdKvs>,
    leadership: hmetcd_core::Leadership,
    value: &'static str,
) -> hmetcd_core::Leadership {
    let (proclaimed_tx, proclaimed_rx) = tokio::sync::oneshot::channel();
    strand_after(proxy, a, &format!("marker/{value}"), || {
        tokio::spawn(async move {
            let mut leadership = leadership;
            let proclaimed = leadership.proclaim(value).await;
            drop(proclaimed_tx.send((leadership, proclaimed)));
        });
    })
    .await;
    let (leadership, proclaimed) = proclaimed_rx
        .await
        .expect("the proclaim ends once stranded");
    assert!(
        proclaimed.is_err(),
        "the proclaim got through a frozen link"
    );
    leadership
}

/// A lock key delete that A gave up on (its link broke) but that reaches etcd later, when A
/// holds the lock again under the same key (same lease), must not delete that later hold:
/// once for an unlock's delete, once for the delete of an abandoned wait's key. A release
/// that failed is retried in the background, so such a late copy is what a link through a
/// paused member or a slow router delivers.
async fn late_lock_key_deletes(endpoints: String, store: TestStore) {
    let Late {
        proxy,
        a,
        b,
        mut raw,
    } = Late::open(&endpoints, &store).await;
    let spawn_lock = |kv: Arc<dyn Kvi>| tokio::spawn(async move { kv.dist_lock().await });
    let settle = |task: tokio::task::JoinHandle<hmetcd_core::Result<()>>, who: &'static str| async move {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap_or_else(|_| panic!("{who} never got the lock"))
            .expect("lock task")
            .unwrap_or_else(|err| panic!("{who}'s dist_lock: {err}"));
    };

    // 1. An unlock's delete, stranded; A takes the lock again under the same key.
    a.dist_lock().await.expect("A takes the lock");
    let lease = wait_lock_keys(&mut raw, &store, 1).await[0].1;
    let b_locking = spawn_lock(b.clone());
    wait_lock_keys(&mut raw, &store, 2).await;
    let (unlock_tx, unlock_rx) = tokio::sync::oneshot::channel();
    strand_after(&proxy, &a, "marker/unlock", || {
        let a = a.clone();
        tokio::spawn(async move { drop(unlock_tx.send(a.dist_unlock().await)) });
    })
    .await;
    let unlocked = unlock_rx.await.expect("the unlock ends once stranded");
    assert!(unlocked.is_err(), "the unlock got through a frozen link");
    settle(b_locking, "B").await;
    let a_locking = spawn_lock(a.clone());
    wait_lock_keys(&mut raw, &store, 2).await;
    b.dist_unlock().await.expect("B unlocks");
    settle(a_locking, "A, again,").await;
    let again = lock_key_of(&mut raw, &store, lease)
        .await
        .expect("A's lock key");
    deliver_late(&proxy, &mut raw, &store, "marker/unlock").await;
    assert_eq!(
        lock_key_of(&mut raw, &store, lease).await,
        Some(again.clone()),
        "the late delete of A's unlock deleted A's later hold"
    );
    assert_lock_taken(b.as_ref()).await;

    // 2. The delete of an abandoned wait's key, stranded; A queues and takes the lock again.
    let b_locking = spawn_lock(b.clone());
    wait_lock_keys(&mut raw, &store, 2).await;
    a.dist_unlock().await.expect("A unlocks");
    settle(b_locking, "B").await;
    let a_waiting = spawn_lock(a.clone());
    wait_lock_keys(&mut raw, &store, 2).await;
    // A has read its key's revision by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    strand_after(&proxy, &a, "marker/wait", || a_waiting.abort()).await;
    wait_lock_keys(&mut raw, &store, 1).await;
    let a_locking = spawn_lock(a.clone());
    wait_lock_keys(&mut raw, &store, 2).await;
    b.dist_unlock().await.expect("B unlocks");
    settle(a_locking, "A, again,").await;
    let again = lock_key_of(&mut raw, &store, lease)
        .await
        .expect("A's lock key");
    deliver_late(&proxy, &mut raw, &store, "marker/wait").await;
    assert_eq!(
        lock_key_of(&mut raw, &store, lease).await,
        Some(again),
        "the late delete of A's abandoned wait deleted A's later hold"
    );
    assert_lock_taken(b.as_ref()).await;
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

/// A lock attempt that failed before its waiter key's put was answered (its link broke): the
/// put reaches etcd later, when nobody in A waits for the lock. That key of A's must not block
/// the lock for everyone else until A's lease ends.
async fn late_waiter_put(endpoints: String, store: TestStore) {
    let Late {
        proxy,
        a,
        b,
        mut raw,
    } = Late::open(&endpoints, &store).await;
    b.dist_lock().await.expect("B takes the lock");
    let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
    strand_after(&proxy, &a, "marker/wait", || {
        let a = a.clone();
        tokio::spawn(async move {
            drop(locked_tx.send(a.dist_timed_lock(Duration::from_secs(20)).await));
        });
    })
    .await;
    let locked = locked_rx.await.expect("A's attempt ends once stranded");
    assert!(
        matches!(
            locked,
            Err(Error::Unavailable { .. } | Error::Timeout { .. })
        ),
        "A's lock attempt on a stranded link: {locked:?}"
    );
    let b_lease = lock_keys(&mut raw, &store).await[0].1;
    let before = revision_now(&mut raw).await;
    deliver_late(&proxy, &mut raw, &store, "marker/wait").await;
    let late: Vec<_> = lock_key_puts(&mut raw, &store, before + 1)
        .await
        .into_iter()
        .filter(|&(_, lease)| lease != b_lease)
        .collect();
    assert_eq!(
        late.len(),
        1,
        "A's waiter key put arrives once, late: {late:?}"
    );
    b.dist_unlock().await.expect("B unlocks");
    let again = b.dist_timed_lock(Duration::from_secs(3)).await;
    assert!(
        again.is_ok(),
        "B could not take the lock again: {again:?}; lock keys: {:?}",
        lock_keys(&mut raw, &store).await
    );
    assert_eq!(
        lock_keys(&mut raw, &store).await.len(),
        1,
        "B's lock key alone"
    );
    b.dist_unlock().await.expect("B unlocks");
    // A takes the lock as usual afterwards, and its key is left alone while it holds it.
    a.dist_timed_lock(Duration::from_secs(3))
        .await
        .expect("A takes the lock");
    let held = lock_keys(&mut raw, &store).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_lock_taken(b.as_ref()).await;
    assert_eq!(
        lock_keys(&mut raw, &store).await,
        held,
        "A's lock key alone"
    );
    a.dist_unlock().await.expect("A unlocks");
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

/// A (an `EtcdKvs`, straight to etcd) and B, both with a 2 s request timeout.
async fn open_a_and_b(endpoints: &str, store: &TestStore) -> (Arc<EtcdKvs>, Box<dyn Kvi>) {
    let a = EtcdKvs::connect(endpoints, &options(store, Duration::from_secs(2)))
        .await
        .expect("open A");
    let b = store.open_with("request_timeout=2s").await.expect("open B");
    (Arc::new(a), b)
}

/// A lock must not be granted on a lease whose renewal is overdue: such a lease may be counted
/// lost any moment and revoked, its lock key with it, and the next waiter would take the lock
/// while its holder had only begun. Staged with the pause point `KeepAliveRenewal`: A's
/// renewals stop while its other requests go through, and B lets go of the lock when A's
/// lease has about half a second of sure validity left (a renewal is overdue after two
/// thirds of that). A must then hold the lock it gets for longer than that.
async fn grant_on_overdue_lease(endpoints: String, store: TestStore) {
    let (a, b) = open_a_and_b(&endpoints, &store).await;
    let held = b.lock("overdue").await.expect("B takes the lock");
    let waiting = tokio::spawn({
        let a = Arc::clone(&a);
        async move { a.lock("overdue").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "A got the lock while B held it");
    let points = a.pause_points();
    // A renewal is due a renewal interval (a third of the TTL, 1 s) after the last one was
    // sent: that one was confirmed valid until 2.75 s after it was sent.
    hold_renewals(&a, LEASE_TTL).await;
    let due = Instant::now();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // About 0.55 s of validity left.
    held.unlock().await.expect("B unlocks");
    let unlocked = Instant::now();
    let guard = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("A never got the lock")
        .expect("lock task")
        .expect("A's lock");
    let granted = Instant::now();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let still = guard.is_held();
    let taken = b
        .lock_with(
            "overdue",
            hmetcd_core::LockOptions::new().timeout(Duration::from_millis(300)),
        )
        .await;
    eprintln!(
        "faults: B unlocked {:.2} s after A's renewal was due (renewals held); A got the lock {:.2} s later, held it 0.8 s later: {still}",
        (unlocked - due).as_secs_f64(),
        (granted - unlocked).as_secs_f64(),
    );
    assert!(
        still,
        "A's lock, granted {:.2} s after B's unlock on a lease whose renewal was overdue, was lost within 0.8 s",
        (granted - unlocked).as_secs_f64()
    );
    assert!(
        matches!(taken, Err(Error::LockTimeout { .. })),
        "B took the lock while A held it: {taken:?}"
    );
    points.open(PausePoint::KeepAliveRenewal);
    guard.unlock().await.expect("A unlocks");
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

/// A restore of temp keys (after a lost lease) whose transaction A gave up on but that reaches
/// etcd later, after A deleted one of those keys, must not bring the key back: A no longer
/// counts it a temp key, so nothing of A would ever delete it again. Staged with a pause point:
/// A's restore is held until the link is frozen, so that its transaction, and nothing before
/// it, goes into the stranded link.
async fn late_restore(endpoints: String, store: TestStore) {
    let Late {
        proxy, a, mut raw, ..
    } = Late::open(&endpoints, &store).await;
    a.store_temp("late/gone", "mine")
        .await
        .expect("A's temp key");
    a.store_temp("late/kept", "mine")
        .await
        .expect("A's temp key");
    let gone = format!("{}late/gone", store.prefix());
    let kept = format!("{}late/kept", store.prefix());
    let points = a.pause_points();
    points.hold(PausePoint::RestoreTempKeys);
    let lease = lease_of(&mut raw, &gone)
        .await
        .expect("A's temp key has a lease");
    raw.lease_revoke(lease)
        .await
        .unwrap_or_else(|err| panic!("revoke A's lease: {err}"));
    // A sees its lease gone, takes a new one, and is about to put the temp keys back.
    arrivals(
        &a,
        PausePoint::RestoreTempKeys,
        1,
        LEASE_TTL * 2,
        "A's restore after the revoke",
    )
    .await;
    proxy.freeze();
    points.pass_one(PausePoint::RestoreTempKeys);
    // The restore transaction goes into the frozen link; the marker after it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    strand_after(&proxy, &a, "marker/restore", || {}).await;
    // The restore failed on the stranded link; A tries again. Meanwhile A deletes a temp key.
    arrivals(
        &a,
        PausePoint::RestoreTempKeys,
        2,
        LEASE_TTL * 2,
        "A's restore tried again",
    )
    .await;
    a.delete("late/gone").await.expect("A deletes a temp key");
    points.open(PausePoint::RestoreTempKeys);
    wait_until_present(&mut raw, &kept).await;
    // The first restore transaction arrives now.
    deliver_late(&proxy, &mut raw, &store, "marker/restore").await;
    let back = raw
        .get(gone.as_str(), None)
        .await
        .unwrap_or_else(|err| panic!("raw get of {gone}: {err}"));
    assert!(
        back.kvs().is_empty(),
        "the late restore brought back the temp key A deleted: {:?}",
        back.kvs()
            .iter()
            .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease()))
            .collect::<Vec<_>>()
    );
    // A's other temp key is back, on A's current lease, and goes with A.
    let now = lease_of(&mut raw, &kept)
        .await
        .expect("A's other temp key is back");
    a.close().await.expect("close A");
    assert!(
        !lease_exists(&mut raw, now).await,
        "A's lease outlived close()"
    );
    assert!(
        raw.get(kept.as_str(), None)
            .await
            .map(|found| found.kvs().is_empty())
            .unwrap_or(false),
        "A's temp key outlived close()"
    );
}

async fn wait_until_present(raw: &mut etcd_client::Client, key: &str) {
    let deadline = Instant::now() + LEASE_TTL * 2;
    while lease_of(raw, key).await.is_none() {
        assert!(Instant::now() < deadline, "{key} never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A leader's proclaim that failed (its link broke) but reaches etcd later must not undo the
/// value the leader proclaimed after it: observers would see an older value win. One that
/// lands before the next proclaim does not stop that one.
async fn late_proclaim(endpoints: String, store: TestStore) {
    let Late {
        proxy,
        a,
        b,
        mut raw,
    } = Late::open(&endpoints, &store).await;
    let leadership = a.campaign("late", "v0").await.expect("A campaigns");
    let mut leadership = proclaim_stranded(&proxy, &a, leadership, "v1").await;
    leadership.proclaim("v2").await.expect("A proclaims again");
    deliver_late(&proxy, &mut raw, &store, "marker/v1").await;
    let leader = b.leader("late").await.expect("leader");
    assert_eq!(
        leader.map(|kv| kv.value).as_deref(),
        Some("v2"),
        "the late proclaim undid the one after it"
    );
    assert!(leadership.is_leader(), "A no longer leads");
    leadership
        .proclaim("v3")
        .await
        .expect("A proclaims once more");
    let leader = b.leader("late").await.expect("leader");
    assert_eq!(leader.map(|kv| kv.value).as_deref(), Some("v3"));

    // A proclaim counted failed that lands before the next one: the next one still wins.
    let mut leadership = proclaim_stranded(&proxy, &a, leadership, "v4").await;
    deliver_late(&proxy, &mut raw, &store, "marker/v4").await;
    let leader = b.leader("late").await.expect("leader");
    assert_eq!(
        leader.map(|kv| kv.value).as_deref(),
        Some("v4"),
        "the late proclaim landed"
    );
    leadership
        .proclaim("v5")
        .await
        .expect("A proclaims after its late one landed");
    let leader = b.leader("late").await.expect("leader");
    assert_eq!(leader.map(|kv| kv.value).as_deref(), Some("v5"));
    leadership.resign().await.expect("resign");
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

/// A lock waiter cut off while the holder lets go, and while etcd compacts the history that
/// holds the delete: its watch of the key ahead can no longer be resumed (etcd refuses it as
/// compacted, and the key is gone), so the waiter looks at the queue again and takes the lock.
/// It must not give up: nothing is wrong with its place in the queue.
async fn lock_wait_behind_compaction(endpoints: String, store: TestStore) {
    let proxy = ok(FaultProxy::start(&endpoints).await);
    let a = Arc::new(
        EtcdKvs::connect(proxy.endpoint(), &options(&store, Duration::from_secs(2)))
            .await
            .expect("open A behind the proxy"),
    );
    let b = store.open_with("request_timeout=2s").await.expect("open B");
    let mut raw = ok(raw_client(&endpoints).await);
    let held = b.lock("compacted").await.expect("B takes the lock");
    let waiting = tokio::spawn({
        let a = Arc::clone(&a);
        async move { a.lock("compacted").await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "A got the lock while B held it");
    proxy.cut();
    held.unlock().await.expect("B unlocks");
    let last = raw_put(&mut raw, &store, "compacted-marker", "1").await;
    raw.compact(last, None).await.expect("raw compact");
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.resume();
    let resumed = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("A neither got the lock nor gave up within 10 s of the link coming back")
        .expect("lock task");
    let guard = got.unwrap_or_else(|err| {
        panic!("A gave up its lock wait after the cut and the compaction: {err}")
    });
    eprintln!(
        "faults: A, cut off while B let go and the history was compacted, got the lock {:.2} s after the link came back",
        resumed.elapsed().as_secs_f64()
    );
    assert!(guard.is_held());
    guard.unlock().await.expect("A unlocks");
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

async fn watch_behind_compaction(endpoints: String, store: TestStore) {
    let proxy = ok(FaultProxy::start(&endpoints).await);
    let a = EtcdKvs::connect(proxy.endpoint(), &options(&store, REQUEST_TIMEOUT))
        .await
        .expect("open A behind the proxy");
    let mut raw = ok(raw_client(&endpoints).await);
    let mut stream = a.watch_stream("c").await.expect("watch_stream");
    let (seen, callback) = recording_callback();
    let watcher = a
        .watch_with_cb("c", KeyChange::Put, callback)
        .await
        .expect("watch_with_cb");
    let first = vec![("1".to_owned(), raw_put(&mut raw, &store, "c", "1").await)];
    assert_eq!(
        values(&[next_event(&mut stream, Duration::from_secs(5)).await]),
        first
    );

    proxy.cut();
    raw_put(&mut raw, &store, "c", "2").await;
    let last = raw_put(&mut raw, &store, "c", "3").await;
    raw.compact(last, None).await.expect("raw compact");
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.resume();
    let resumed = Instant::now();

    let outcome = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stream says something within 10 s of the connection coming back");
    let reported_after = resumed.elapsed();
    match outcome {
        Some(Err(Error::Compacted {
            key,
            revision,
            compact_revision,
        })) => {
            assert_eq!(key, "c");
            eprintln!(
                "faults: the watch reported Compacted (needed revision {revision}, compacted at {compact_revision}) {} ms after the connection came back",
                reported_after.as_millis()
            );
        }
        other => panic!("a watch behind a compaction must report Compacted, got {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !watcher.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the callback watcher did not end after the compaction"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let called = values(&seen.lock().map(|seen| seen.clone()).unwrap_or_default());
    assert_eq!(called, first, "the callback saw events past the compaction");
    a.close().await.expect("close");
}

// ---------------------------------------------------------------------------------------------
// Calls right after a connection breaks

/// How the test breaks A's connection in one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Break {
    /// Closes A's side, keeps what A sent (`strand`).
    Strand,
    /// Closes every connection, then lets new ones through (`cut`, `resume`).
    Cut,
    /// Closes every connection and refuses new ones, then lets them through.
    Refuse,
}

/// The first call after A's connection breaks meets the dying connection: hyper drops a
/// request handed to it before it goes out ("operation was canceled"), and the connection's
/// broken pipe fails a request that may have gone out. A read is sent again on the new
/// connection, so it succeeds; a write is sent again only when it never went out (one that may
/// have gone out could be applied twice, or over a later write), so it may fail, but never for
/// want of being sent. Rounds of each kind of break, each followed at once by one call: a
/// `get`, a `get_range` or a `store`, in turn. Without resending, most of these calls failed.
/// Why a write that may have gone out is not sent again: the late tests above strand a write
/// that did go out; sent again, it went through at once and arrived a second time later.
async fn calls_right_after_a_break(endpoints: String, store: TestStore) {
    const ROUNDS: usize = 36;
    let proxy = ok(FaultProxy::start(&endpoints).await);
    let a = EtcdKvs::connect(proxy.endpoint(), &options(&store, Duration::from_secs(3)))
        .await
        .expect("open A behind the proxy");
    a.store("resent/k", "v").await.expect("A stores");
    let mut failed_reads = Vec::new();
    let mut unsent_writes = Vec::new();
    let mut failed_writes = 0;
    for round in 0..ROUNDS {
        let how = [Break::Strand, Break::Cut, Break::Refuse][round % 3];
        match how {
            Break::Strand => proxy.strand(),
            Break::Cut => {
                proxy.cut();
                proxy.resume();
            }
            Break::Refuse => {
                proxy.refuse();
                proxy.resume();
            }
        }
        match round / 3 % 3 {
            0 => {
                if let Err(err) = a.get("resent/k").await {
                    failed_reads.push(format!("{how:?} get: {err}"));
                }
            }
            1 => {
                if let Err(err) = a.get_range("resent/", "resent/z").await {
                    failed_reads.push(format!("{how:?} get_range: {err}"));
                }
            }
            _ => {
                if let Err(err) = a.store("resent/k", "v").await {
                    failed_writes += 1;
                    if err.to_string().contains("operation was canceled") {
                        unsent_writes.push(format!("{how:?} store: {err}"));
                    }
                }
            }
        }
        // The next round breaks a connection in use.
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(err) = a.get("resent/k").await {
            assert!(
                Instant::now() < deadline,
                "A's requests do not get through after the break: {err}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!(
        "faults: {} of {} reads right after a break failed; {failed_writes} of {} writes (sent \
         perhaps), {} never sent",
        failed_reads.len(),
        ROUNDS * 2 / 3,
        ROUNDS / 3,
        unsent_writes.len()
    );
    assert!(
        failed_reads.is_empty(),
        "reads right after A's connection broke failed: {failed_reads:#?}"
    );
    assert!(
        unsent_writes.is_empty(),
        "writes right after A's connection broke failed without being sent: {unsent_writes:#?}"
    );
    a.close().await.expect("close A");
}

// ---------------------------------------------------------------------------------------------
// Bookkeeping

/// What a handle keeps per lock name (a local mutex) goes once no guard, lock wait or
/// background delete of the handle needs it: after an unlock, a dropped guard, `dist_unlock`,
/// a timed-out wait and an aborted one. A leak there grows with every lock name a service ever
/// uses, and no call shows it.
async fn lock_names_return_to_zero(endpoints: String, store: TestStore) {
    let (a, b) = open_a_and_b(&endpoints, &store).await;
    a.lock("names/unlocked")
        .await
        .expect("A locks")
        .unlock()
        .await
        .expect("A unlocks");
    drop(a.lock("names/dropped").await.expect("A locks"));
    a.dist_lock().await.expect("A's dist_lock");
    a.dist_unlock().await.expect("A's dist_unlock");
    let held = b.lock("names/busy").await.expect("B locks");
    let timed_out = a
        .lock_with(
            "names/busy",
            hmetcd_core::LockOptions::new().timeout(Duration::from_millis(300)),
        )
        .await;
    assert!(timed_out.is_err(), "A took a lock B holds: {timed_out:?}");
    let waiting = tokio::spawn({
        let a = Arc::clone(&a);
        async move { a.lock("names/busy").await.map(drop) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.lock_names_in_use(), 1, "A waits for one lock name");
    waiting.abort();
    drop(waiting.await);
    held.unlock().await.expect("B unlocks");
    // Background deletes (a dropped guard's key, an abandoned wait's) end within a moment.
    let deadline = Instant::now() + Duration::from_secs(3);
    while a.lock_names_in_use() > 0 {
        assert!(
            Instant::now() < deadline,
            "A still keeps {} lock names 3 s after its last guard and wait were gone",
            a.lock_names_in_use()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}
