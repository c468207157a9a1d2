//! Losing a lease, and what must hold then: reproductions of the lease-loss defects of the
//! etcd backend (contract, Part 2, "Losing a lock, and fencing"; design note SESSION.md).
//!
//! Named `lease_loss::<backend>::<what it proves>`. The etcd tests run against a private etcd
//! that the harness starts (container or child process, as `HMETCD_ETCD_MODE` says). A lease
//! is lost on purpose by revoking it from outside (`lease_revoke` on a raw etcd client; the
//! lease is found on a key the handle wrote: its temp key or its lock key), or by cutting one
//! handle's connection with a TCP proxy (`integration_tests::faults::proxy`) for longer than
//! `lease_ttl`. Tests run one at a time unless `--test-threads` says otherwise, because they
//! measure timings and one compares etcd's whole lease listing. Every measured figure is
//! printed to stderr.
//!
//! The last test runs 4 `lock_worker` processes (the example of `hmetcd`, in its `--fenced`
//! mode) doing fenced increments while a chaos loop revokes the lock holder's lease and cuts
//! one worker off.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions, SortOrder, SortTarget, WatchOptions};
use futures::{FutureExt, StreamExt};
use hmetcd_core::{Error, Kvi, LockOptions, LostReason};
use hmetcd_etcd::{EtcdKvs, PausePoint};
use integration_tests::backends::MemOpener;
use integration_tests::cluster::{etcd_binary, etcd_version, ClusterSpec, EtcdCluster};
use integration_tests::etcd_server::{lease_of, raw_client, wait_ready, EtcdServer};
use integration_tests::faults::pause::{arrivals, hold_renewals};
use integration_tests::faults::process::{lock_worker_binary, ChildProcess};
use integration_tests::faults::proxy::FaultProxy;
use integration_tests::faults::runner::{run_fault_binary, EtcdTrials};
use integration_tests::run_limited;
use integration_tests::TestStore;
use libtest_mimic::Trial;

/// The lease TTL of most tests here: short, so that a lost lease shows quickly.
const LEASE_TTL: Duration = Duration::from_secs(3);
/// What the contract allows beyond `lease_ttl` for a handle to be whole again after a loss.
const RECOVERY_SLACK: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    // RUST_LOG=hmetcd_etcd=debug shows what the handles did.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let mem = TestStore::new(Arc::new(MemOpener::new()));
    let trials = vec![Trial::test(
        "lease_loss::mem::lock_name_that_prefixes_other_keys",
        move || {
            run_limited(
                2,
                Duration::from_secs(30),
                lock_name_that_prefixes_other_keys(mem),
            )
        },
    )];
    run_fault_binary("lease_loss", trials, etcd_trials)
}

fn etcd_trials(server: &EtcdServer) -> Vec<Trial> {
    let mut trials = EtcdTrials::new("lease_loss", server);
    trials
        .add(
            "one_lease_loss_with_3000_temp_keys_recovers_within_ttl_plus_2s",
            60,
            |e, s| Box::pin(many_temp_keys_recover(e, s)),
        )
        .add(
            "temp_keys_come_back_where_etcd_allows_few_operations_per_transaction",
            60,
            |_, s| Box::pin(restore_with_few_txn_ops(s)),
        )
        .add(
            "temp_keys_come_back_past_one_too_big_to_put_back",
            60,
            |_, s| Box::pin(restore_past_a_key_too_big_to_restore(s)),
        )
        .add(
            "given_up_timed_lock_during_an_outage_leaves_no_waiter_key",
            60,
            |e, s| Box::pin(given_up_attempt(e, s, GiveUp::Timed)),
        )
        .add(
            "cancelled_lock_during_an_outage_leaves_no_waiter_key",
            60,
            |e, s| Box::pin(given_up_attempt(e, s, GiveUp::Cancelled)),
        )
        .add(
            "given_up_named_lock_during_an_outage_leaves_no_waiter_key",
            60,
            |e, s| Box::pin(given_up_attempt(e, s, GiveUp::NamedGuard)),
        )
        .add(
            "temp_key_restore_never_overwrites_another_clients_data_and_puts_back_the_last_value",
            60,
            |e, s| Box::pin(restore_never_overwrites(e, s)),
        )
        .add(
            "a_temp_put_etcd_refuses_fails_alone_and_loses_no_lease",
            30,
            |e, s| Box::pin(refused_temp_put(e, s)),
        )
        .add(
            "temp_puts_and_lock_waits_wait_for_the_new_lease_while_a_lost_one_is_replaced",
            30,
            |e, s| Box::pin(calls_during_a_lease_change(e, s)),
        )
        .add(
            "a_lease_granted_while_the_handle_closes_is_revoked",
            30,
            |e, s| Box::pin(grant_racing_close(e, s)),
        )
        .add(
            "a_request_that_finds_the_lease_gone_has_it_replaced_at_once",
            30,
            |e, s| Box::pin(reported_loss(e, s)),
        )
        .add(
            "requests_that_find_the_lease_gone_at_once_cost_one_new_lease",
            30,
            |e, s| Box::pin(reports_of_one_loss(e, s)),
        )
        .add(
            "a_keep_alive_stream_broken_by_a_short_outage_is_reopened_and_keeps_the_lease",
            30,
            |e, s| Box::pin(keep_alive_reopened_after_a_cut(e, s)),
        )
        .add("a_revoke_is_noticed_at_the_next_keep_alive", 30, |e, s| {
            Box::pin(revoke_noticed_at_the_next_keep_alive(e, s))
        })
        .add(
            "a_revoke_while_the_keep_alive_stream_is_down_is_noticed_when_it_is_reopened",
            30,
            |e, s| Box::pin(revoke_noticed_when_the_keep_alive_stream_is_reopened(e, s)),
        )
        .add(
            "a_restore_that_finds_its_new_lease_gone_has_it_replaced_at_once",
            30,
            |e, s| Box::pin(restore_finds_its_lease_gone(e, s)),
        )
        .add(
            "a_failed_revoke_of_a_lease_counted_lost_is_tried_again_before_the_temp_keys_go_back",
            30,
            |e, s| Box::pin(failed_revoke_of_a_lost_lease(e, s)),
        )
        .add(
            "a_lock_attempt_that_fails_on_a_down_member_costs_no_lease",
            30,
            |e, s| Box::pin(failed_lock_attempt_costs_no_lease(e, s)),
        )
        .add("lock_name_that_prefixes_other_keys", 30, |_, s| {
            Box::pin(lock_name_that_prefixes_other_keys(s))
        })
        .add(
            "is_held_is_conservative_after_external_revoke",
            60,
            |e, s| Box::pin(is_held_conservative(e, s)),
        )
        .add(
            "temp_key_or_lock_racing_close_never_outlives_close",
            60,
            |e, s| Box::pin(racing_close(e, s)),
        )
        .add(
            "fenced_increments_by_4_processes_under_lease_revokes_and_a_cut",
            180,
            |e, s| Box::pin(fenced_stress(e, s)),
        );
    trials.into_trials()
}

fn secs(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

fn ok<T>(outcome: Result<T, String>) -> T {
    outcome.unwrap_or_else(|why| panic!("{why}"))
}

/// A handle straight to etcd with the short [`LEASE_TTL`] and a 1 s request timeout.
async fn open_a(endpoints: &str, store: &TestStore) -> EtcdKvs {
    EtcdKvs::connect(
        endpoints,
        &store.options(&format!(
            "lease_ttl={}s,request_timeout=1s",
            LEASE_TTL.as_secs()
        )),
    )
    .await
    .expect("open A")
}

/// Puts A's temp key `name` and returns its stored form and the lease etcd has it on.
async fn temp_key_on_lease(
    a: &EtcdKvs,
    raw: &mut etcd_client::Client,
    store: &TestStore,
    name: &str,
) -> (String, i64) {
    a.temp_key(name).await.expect("A's temp key");
    let key = format!("{}{name}", store.prefix());
    let lease = lease_of(raw, &key).await.expect("A's temp key is there");
    (key, lease)
}

async fn raw(endpoints: &str) -> etcd_client::Client {
    ok(raw_client(endpoints).await)
}

/// Every key under `prefix` (stored form): (key, lease), oldest first.
async fn prefix_keys(raw: &mut etcd_client::Client, prefix: &str) -> Vec<(String, i64)> {
    let options = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend);
    let answer = raw
        .get(prefix, Some(options))
        .await
        .unwrap_or_else(|err| panic!("raw get of {prefix:?}: {err}"));
    answer
        .kvs()
        .iter()
        .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.lease()))
        .collect()
}

/// Revokes `lease` as another client (an operator, a test) would.
async fn revoke(raw: &mut etcd_client::Client, lease: i64) {
    raw.lease_revoke(lease)
        .await
        .unwrap_or_else(|err| panic!("raw revoke of lease {lease:x}: {err}"));
}

/// Whether etcd still has the lease and it has time left.
async fn lease_alive(raw: &mut etcd_client::Client, lease: i64) -> bool {
    match raw.lease_time_to_live(lease, None).await {
        Ok(answer) => answer.ttl() > 0,
        Err(_) => false,
    }
}

/// Every lease etcd has now.
async fn all_leases(raw: &mut etcd_client::Client) -> BTreeSet<i64> {
    raw.leases()
        .await
        .unwrap_or_else(|err| panic!("raw lease listing: {err}"))
        .leases()
        .iter()
        .map(|lease| lease.id())
        .collect()
}

/// Waits until `prefix` has `count` keys; panics after 10 s.
async fn wait_keys(
    raw: &mut etcd_client::Client,
    prefix: &str,
    count: usize,
) -> Vec<(String, i64)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let keys = prefix_keys(raw, prefix).await;
        if keys.len() == count {
            return keys;
        }
        assert!(
            Instant::now() < deadline,
            "expected {count} keys under {prefix:?}, found {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn lock_timeout(timeout: Duration) -> LockOptions {
    LockOptions::new().timeout(timeout)
}

// ---------------------------------------------------------------------------------------------
// 1. One lease loss with 3,000 temp keys

/// How the handle came back after a lease loss.
#[derive(Debug, Default)]
struct Recovery {
    /// When every temp key was back, once each, all on one live new lease.
    keys_back: Option<Duration>,
    /// That lease.
    lease: Option<i64>,
    /// What the raw listing showed last: keys found, and how many per lease.
    last_seen: String,
    /// When `dist_timed_lock` and `lock_with` on another name had both succeeded.
    locks_ok: Option<Duration>,
    /// Errors of the locking calls, with how often each was seen.
    lock_errors: BTreeMap<String, usize>,
}

impl Recovery {
    fn note_error(&mut self, what: &str, err: &Error) {
        *self
            .lock_errors
            .entry(format!("{what}: {err}"))
            .or_default() += 1;
    }

    fn errors(&self) -> String {
        if self.lock_errors.is_empty() {
            return "none".to_owned();
        }
        self.lock_errors
            .iter()
            .map(|(err, count)| format!("{count}× {err}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Errors of a lock call that name another key's temp-key restore.
    fn restore_errors(&self) -> Vec<&String> {
        self.lock_errors
            .keys()
            .filter(|err| err.contains("put temp key") || err.contains("lease not found"))
            .collect()
    }

    /// The new lease if the handle was whole again within `bound`, every temp key back and
    /// no lock call failing with a restore's error; otherwise everything that went wrong.
    fn verdict(&self, what: &str, bound: Duration) -> Result<i64, String> {
        let mut failures = Vec::new();
        match self.keys_back {
            Some(after) if after <= bound => {}
            Some(after) => failures.push(format!("temp keys back only after {}", secs(after))),
            None => failures.push("temp keys never all back on one live lease".to_owned()),
        }
        match self.locks_ok {
            Some(after) if after <= bound => {}
            Some(after) => failures.push(format!("locks taken only after {}", secs(after))),
            None => failures.push("dist_timed_lock or lock_with failed".to_owned()),
        }
        let restore_errors = self.restore_errors();
        if !restore_errors.is_empty() {
            failures.push(format!(
                "lock calls failed with a temp key's restore: {restore_errors:?}"
            ));
        }
        match self.lease {
            Some(lease) if failures.is_empty() => Ok(lease),
            _ => Err(format!(
                "{what}: not whole again within lease_ttl + 2 s = {}: {}; last listing: {}; lock errors: {}",
                secs(bound),
                failures.join("; "),
                self.last_seen,
                self.errors()
            )),
        }
    }
}

/// After a lease loss at `since`: polls etcd until every key of `expected` is there, and only
/// those under `dir`, all on one live lease that is none of `old` (giving up after `give_up`),
/// while probing `lock_with` on another name; then takes the handle's lock and a named lock.
async fn recover(
    a: &EtcdKvs,
    raw: &mut etcd_client::Client,
    dir: &str,
    expected: &BTreeSet<String>,
    old: &BTreeSet<i64>,
    since: Instant,
    give_up: Duration,
) -> Recovery {
    let mut recovery = Recovery::default();
    let probing = AtomicBool::new(true);
    let probe_errors = Mutex::new(BTreeMap::<String, usize>::new());
    let probe = async {
        let mut round = 0u64;
        while probing.load(Ordering::SeqCst) {
            round += 1;
            match a
                .lock_with(
                    &format!("probe-{round}"),
                    lock_timeout(Duration::from_millis(500)),
                )
                .await
            {
                Ok(guard) => {
                    let _ = guard.unlock().await;
                }
                Err(err) => {
                    if let Ok(mut errors) = probe_errors.lock() {
                        *errors.entry(format!("lock_with: {err}")).or_default() += 1;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let poll = async {
        loop {
            let keys = prefix_keys(raw, dir).await;
            let mut per_lease: BTreeMap<i64, usize> = BTreeMap::new();
            for (_, lease) in &keys {
                *per_lease.entry(*lease).or_default() += 1;
            }
            recovery.last_seen = format!(
                "{} keys; per lease: {}",
                keys.len(),
                per_lease
                    .iter()
                    .map(|(lease, count)| format!("{lease:x}: {count}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let names: BTreeSet<String> = keys.iter().map(|(key, _)| key.clone()).collect();
            if names == *expected && per_lease.len() == 1 {
                let lease = keys[0].1;
                if lease != 0 && !old.contains(&lease) && lease_alive(raw, lease).await {
                    recovery.keys_back = Some(since.elapsed());
                    recovery.lease = Some(lease);
                    break;
                }
            }
            if since.elapsed() > give_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        probing.store(false, Ordering::SeqCst);
    };
    tokio::join!(probe, poll);
    recovery.lock_errors = probe_errors.into_inner().unwrap_or_default();
    // (b) The handle's lock and a named lock on another name.
    let limit = if recovery.keys_back.is_some() {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(2)
    };
    let dist = a.dist_timed_lock(limit).await;
    if let Err(err) = &dist {
        recovery.note_error("dist_timed_lock", err);
    }
    let named = a.lock_with("other", lock_timeout(limit)).await;
    match named {
        Ok(guard) => {
            if dist.is_ok() {
                recovery.locks_ok = Some(since.elapsed());
            }
            let _ = guard.unlock().await;
        }
        Err(err) => recovery.note_error("lock_with(\"other\")", &err),
    }
    if dist.is_ok() {
        let _ = a.dist_unlock().await;
    }
    recovery
}

/// A one-member etcd of its own, from the etcd binary the cluster tests use (see
/// `integration_tests::cluster`), started with `flag` and ready; and that binary.
async fn member_with(flag: String) -> (EtcdCluster, PathBuf) {
    let bin = ok(etcd_binary());
    let mut spec = ClusterSpec::new(1);
    spec.extra_args.push(flag.clone());
    let server = EtcdCluster::spawn(&bin, spec)
        .unwrap_or_else(|err| panic!("start etcd with {flag}: {err}"));
    ok(wait_ready(&server.endpoints(), Duration::from_secs(20)).await);
    (server, bin)
}

/// On an etcd that allows few operations per transaction (`--max-txn-ops=4`; the default is
/// 128), the temp keys still come back after a lease loss: the restore makes its transactions
/// smaller until etcd takes them. A member of its own, from the etcd binary the cluster tests
/// use (see `integration_tests::cluster`).
async fn restore_with_few_txn_ops(store: TestStore) {
    const KEYS: usize = 21;
    let (server, bin) = member_with("--max-txn-ops=4".to_owned()).await;
    let endpoints = server.endpoints();
    let a = open_a(&endpoints, &store).await;
    let mut raw = raw(&endpoints).await;
    for i in 0..KEYS {
        a.store_temp(&format!("few/{i:02}"), &format!("v{i}"))
            .await
            .expect("store_temp");
    }
    let dir = format!("{}few/", store.prefix());
    let keys = prefix_keys(&mut raw, &dir).await;
    assert_eq!(keys.len(), KEYS, "temp keys written");
    let lease = keys[0].1;
    revoke(&mut raw, lease).await;
    let revoked = Instant::now();
    let bound = LEASE_TTL + RECOVERY_SLACK;
    loop {
        let keys = prefix_keys(&mut raw, &dir).await;
        let back = keys.iter().filter(|(_, on)| *on != lease).count();
        if back == KEYS {
            break;
        }
        assert!(
            revoked.elapsed() < bound,
            "{back} of {KEYS} temp keys back {} after the revoke, etcd {} with --max-txn-ops=4",
            secs(revoked.elapsed()),
            etcd_version(&bin)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..KEYS {
        assert_eq!(
            a.get(&format!("few/{i:02}")).await.expect("get").as_deref(),
            Some(format!("v{i}").as_str()),
            "temp key {i} came back with its value"
        );
    }
    eprintln!(
        "lease_loss: {KEYS} temp keys back {} after the revoke on etcd {} with --max-txn-ops=4",
        secs(revoked.elapsed()),
        etcd_version(&bin)
    );
    a.close().await.expect("close A");
}

/// A temp key whose put just fits etcd's request limit cannot come back after a lease loss: the
/// guarded put that restores it is a little bigger, and etcd refuses it even alone. The temp
/// keys after it must still come back. A member of its own with a small request limit
/// (`--max-request-bytes=16384`); the value's size is found by trying puts on a lease.
async fn restore_past_a_key_too_big_to_restore(store: TestStore) {
    const LIMIT: usize = 16 * 1024;
    let (server, bin) = member_with(format!("--max-request-bytes={LIMIT}")).await;
    let endpoints = server.endpoints();
    let mut raw = raw(&endpoints).await;
    // The largest value a leased put of a key of the same length takes.
    let probe_lease = raw
        .lease_grant(60, None)
        .await
        .expect("raw lease grant")
        .id();
    let probe = format!("{}big/x", store.prefix());
    let (mut fits, mut refused) = (0, LIMIT);
    while refused - fits > 1 {
        let size = (fits + refused) / 2;
        let options = etcd_client::PutOptions::new().with_lease(probe_lease);
        match raw
            .put(probe.as_str(), "v".repeat(size), Some(options))
            .await
        {
            Ok(_) => fits = size,
            Err(_) => refused = size,
        }
    }
    revoke(&mut raw, probe_lease).await;
    let a = open_a(&endpoints, &store).await;
    a.store_temp("big/0", &"v".repeat(fits))
        .await
        .expect("a temp key that just fits the request limit");
    for i in 1..=3 {
        a.store_temp(&format!("big/{i}"), &format!("v{i}"))
            .await
            .expect("store_temp");
    }
    let dir = format!("{}big/", store.prefix());
    let keys = prefix_keys(&mut raw, &dir).await;
    assert_eq!(keys.len(), 4, "temp keys written: {keys:?}");
    let lease = keys[0].1;
    revoke(&mut raw, lease).await;
    let revoked = Instant::now();
    let bound = LEASE_TTL + RECOVERY_SLACK;
    let back = loop {
        let keys = prefix_keys(&mut raw, &dir).await;
        let back: Vec<String> = keys
            .iter()
            .filter(|(_, on)| *on != lease)
            .map(|(key, _)| key.trim_start_matches(dir.as_str()).to_owned())
            .collect();
        if back.len() == 3 {
            break back;
        }
        assert!(
            revoked.elapsed() < bound,
            "temp keys back {} after the revoke: {back:?}; those after a key too big to put back \
             must come back (etcd {} with --max-request-bytes={LIMIT}, a value of {fits} bytes)",
            secs(revoked.elapsed()),
            etcd_version(&bin)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(back, ["1", "2", "3"], "the temp keys back");
    eprintln!(
        "lease_loss: 3 temp keys back {} after the revoke, past one of {fits} bytes that etcd {} \
         with --max-request-bytes={LIMIT} refuses to put back",
        secs(revoked.elapsed()),
        etcd_version(&bin)
    );
    // The handle goes on: a new temp key, and one more loss, all come back.
    a.temp_key("big/4")
        .await
        .expect("a temp key after the restore");
    let keys = prefix_keys(&mut raw, &dir).await;
    let lease = keys[0].1;
    revoke(&mut raw, lease).await;
    let keys = wait_keys(&mut raw, &dir, 4).await;
    assert!(
        keys.iter().all(|(_, on)| *on != lease),
        "temp keys after a second loss: {keys:?}"
    );
    a.close().await.expect("close A");
}

async fn many_temp_keys_recover(endpoints: String, store: TestStore) {
    const KEYS: usize = 3000;
    let bound = LEASE_TTL + RECOVERY_SLACK;
    let a = open_a(&endpoints, &store).await;
    let mut raw = raw(&endpoints).await;
    let names: Vec<String> = (0..KEYS).map(|i| format!("tk/{i:04}")).collect();
    let began = Instant::now();
    let handle = &a;
    let made: Vec<hmetcd_core::Result<()>> = futures::stream::iter(names.clone())
        .map(|key| async move { handle.temp_key(&key).await })
        .buffer_unordered(32)
        .collect()
        .await;
    for outcome in made {
        outcome.expect("temp_key");
    }
    let made_in = began.elapsed();
    let dir = format!("{}tk/", store.prefix());
    let expected: BTreeSet<String> = names
        .iter()
        .map(|key| format!("{}{key}", store.prefix()))
        .collect();
    let keys = prefix_keys(&mut raw, &dir).await;
    let leases: BTreeSet<i64> = keys.iter().map(|(_, lease)| *lease).collect();
    assert_eq!(keys.len(), KEYS, "temp keys written");
    assert_eq!(leases.len(), 1, "all temp keys on one lease: {leases:?}");
    let first_lease = keys[0].1;

    // Phase 1: one loss.
    let mut old = BTreeSet::from([first_lease]);
    revoke(&mut raw, first_lease).await;
    let revoked = Instant::now();
    let give_up = bound + Duration::from_secs(6);
    let first = recover(&a, &mut raw, &dir, &expected, &old, revoked, give_up).await;
    eprintln!(
        "lease_loss: {KEYS} temp keys (written in {}), lease revoked: keys back after {}, dist_timed_lock and lock_with done after {} (bound {}); last listing: {}; lock errors: {}",
        secs(made_in),
        first.keys_back.map_or("never".to_owned(), secs),
        first.locks_ok.map_or("never".to_owned(), secs),
        secs(bound),
        first.last_seen,
        first.errors()
    );
    let lease = ok(first.verdict("one lease loss", bound));

    // Phase 2: the lease is lost, and lost again while the keys are being put back.
    old.insert(lease);
    let mut events = raw
        .watch(dir.as_str(), Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap_or_else(|err| panic!("raw watch of {dir:?}: {err}"));
    revoke(&mut raw, lease).await;
    let second_revoked = Instant::now();
    let restoring = tokio::time::timeout(bound, async {
        loop {
            let answer = events
                .message()
                .await
                .unwrap_or_else(|err| panic!("raw watch: {err}"))
                .unwrap_or_else(|| panic!("raw watch ended"));
            let new_lease = answer
                .events()
                .iter()
                .filter(|event| event.event_type() == EventType::Put)
                .filter_map(|event| event.kv())
                .map(|kv| kv.lease())
                .find(|lease| *lease != 0 && !old.contains(lease));
            if let Some(new_lease) = new_lease {
                break new_lease;
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "second loss: no temp key came back within {} of the revoke",
            secs(bound)
        )
    });
    let first_back = second_revoked.elapsed();
    revoke(&mut raw, restoring).await;
    let third_revoked = Instant::now();
    old.insert(restoring);
    let again = recover(&a, &mut raw, &dir, &expected, &old, third_revoked, give_up).await;
    eprintln!(
        "lease_loss: lease revoked again, and once more {} later when the first key was back on the new lease: keys back after {}, locks after {} (from the last revoke; bound {}); last listing: {}; lock errors: {}",
        secs(first_back),
        again.keys_back.map_or("never".to_owned(), secs),
        again.locks_ok.map_or("never".to_owned(), secs),
        secs(bound),
        again.last_seen,
        again.errors()
    );
    ok(again.verdict("lost again during the restore", bound));
    a.close().await.expect("close A");
    assert!(
        prefix_keys(&mut raw, &dir).await.is_empty(),
        "temp keys outlived close"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A given-up lock attempt during an outage

/// How A gives up its attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GiveUp {
    /// `dist_timed_lock(2 s)`.
    Timed,
    /// `dist_lock()` under `tokio::time::timeout(2 s)`: the future is dropped.
    Cancelled,
    /// `lock_with(name, timeout 2 s)`.
    NamedGuard,
}

async fn given_up_attempt(endpoints: String, store: TestStore, how: GiveUp) {
    let attempt_for = Duration::from_secs(2);
    let cut_at = Duration::from_secs(1);
    let drop_at = Duration::from_secs(3);
    let resume_at = Duration::from_millis(3500);
    let name = match how {
        GiveUp::NamedGuard => "named".to_owned(),
        GiveUp::Timed | GiveUp::Cancelled => store.lock_name().to_owned(),
    };
    let dir = format!("{}{name}/", store.prefix());
    let proxy = ok(FaultProxy::start(&endpoints).await);
    // A lease that outlives the cut: the waiter key must go because A gave up, not with A's lease.
    let a = EtcdKvs::connect(
        proxy.endpoint(),
        &store.options("lease_ttl=6s,request_timeout=500ms"),
    )
    .await
    .expect("open A behind the proxy");
    let b = EtcdKvs::connect(
        &endpoints,
        &store.options("lease_ttl=6s,request_timeout=2s"),
    )
    .await
    .expect("open B");
    let mut raw = raw(&endpoints).await;

    let b_guard = match how {
        GiveUp::NamedGuard => Some(b.lock(&name).await.expect("B takes the named lock")),
        GiveUp::Timed | GiveUp::Cancelled => {
            b.dist_lock().await.expect("B takes the lock");
            None
        }
    };
    wait_keys(&mut raw, &dir, 1).await;
    let began = Instant::now();
    let attempt = async {
        let outcome = match how {
            GiveUp::Timed => a.dist_timed_lock(attempt_for).await,
            GiveUp::Cancelled => tokio::time::timeout(attempt_for, a.dist_lock())
                .await
                .unwrap_or_else(|_| {
                    Err(Error::LockTimeout {
                        lock: "(cancelled by the caller)".to_owned(),
                        timeout: attempt_for,
                    })
                }),
            GiveUp::NamedGuard => a
                .lock_with(&name, lock_timeout(attempt_for))
                .await
                .map(drop),
        };
        (outcome, began.elapsed())
    };
    let mut staging_raw = raw.clone();
    let staging = async {
        let keys = wait_keys(&mut staging_raw, &dir, 2).await;
        tokio::time::sleep(cut_at.saturating_sub(began.elapsed())).await;
        // The link goes silent, then its connections drop: whatever A sent meanwhile (its
        // attempt to remove the waiter key included) is lost, as in a real partition.
        proxy.freeze();
        tokio::time::sleep(drop_at.saturating_sub(began.elapsed())).await;
        proxy.cut();
        tokio::time::sleep(resume_at.saturating_sub(began.elapsed())).await;
        proxy.resume();
        keys
    };
    let ((outcome, gave_up_after), keys) = tokio::join!(attempt, staging);
    let resumed = Instant::now();
    assert!(
        matches!(outcome, Err(Error::LockTimeout { .. })),
        "A's attempt while B holds the lock: {outcome:?}"
    );
    let (waiter_key, a_lease) = keys[1].clone();

    // A's lease outlived the cut, so only giving up can have removed its waiter key.
    let waiter_gone_after = loop {
        let keys = prefix_keys(&mut raw, &dir).await;
        if !keys.iter().any(|(key, _)| *key == waiter_key) {
            break Some(resumed.elapsed());
        }
        if resumed.elapsed() > Duration::from_secs(3) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let a_lease_alive = lease_alive(&mut raw, a_lease).await;

    match b_guard {
        Some(guard) => guard.unlock().await.expect("B unlocks"),
        None => b.dist_unlock().await.expect("B unlocks"),
    }
    let c = EtcdKvs::connect(
        &endpoints,
        &store.options("lease_ttl=6s,request_timeout=2s"),
    )
    .await
    .expect("open C");
    let c_began = Instant::now();
    let c_outcome = match how {
        GiveUp::NamedGuard => c
            .lock_with(&name, lock_timeout(Duration::from_secs(5)))
            .await
            .map(drop),
        GiveUp::Timed | GiveUp::Cancelled => c.dist_timed_lock(Duration::from_secs(5)).await,
    };
    let c_took = c_began.elapsed();
    let left = prefix_keys(&mut raw, &dir).await;
    eprintln!(
        "lease_loss: {how:?} attempt gave up after {} during an outage (link silent from {}, connections dropped at {}, back at {} after it began); A's waiter key {}; A's lease alive after the outage: {a_lease_alive}; C's lock after B's unlock: {} after {}; lock keys then: {left:?}",
        secs(gave_up_after),
        secs(cut_at),
        secs(drop_at),
        secs(resume_at),
        waiter_gone_after.map_or("still there 3 s after the outage ended".to_owned(), |after| format!(
            "gone {} after the outage ended",
            secs(after)
        )),
        match &c_outcome {
            Ok(()) => "Ok".to_owned(),
            Err(err) => err.to_string(),
        },
        secs(c_took)
    );
    assert!(
        a_lease_alive,
        "A's lease expired during the cut: the test no longer shows what it should"
    );
    assert!(
        waiter_gone_after.is_some() && c_outcome.is_ok(),
        "A gave up its attempt ({how:?}) during an outage, yet its waiter key {waiter_key:?} {} and C's lock after B's unlock: {c_outcome:?} after {}",
        if waiter_gone_after.is_some() { "went" } else { "was still there 3 s after the outage" },
        secs(c_took)
    );
    c.close().await.expect("close C");
    a.close().await.expect("close A");
    b.close().await.expect("close B");
}

// ---------------------------------------------------------------------------------------------
// 3. A temp key's restore never overwrites another client's data

async fn restore_never_overwrites(endpoints: String, store: TestStore) {
    let a = open_a(&endpoints, &store).await;
    let b = store.open().await;
    let mut raw = raw(&endpoints).await;
    a.temp_key("m").await.expect("A's temp key m");
    a.temp_key("n").await.expect("A's temp key n");
    // A temp key whose value changed comes back with the value it had last.
    a.store_temp("v", "first").await.expect("A's temp key v");
    a.store_temp("v", "last")
        .await
        .expect("A's temp key v again");
    b.store("m", "B-data").await.expect("B overwrites m");
    let (m_key, n_key) = (
        format!("{}m", store.prefix()),
        format!("{}n", store.prefix()),
    );
    assert_eq!(
        lease_of(&mut raw, &m_key).await,
        Some(0),
        "B's m has no lease"
    );
    let lease = lease_of(&mut raw, &n_key)
        .await
        .expect("A's temp key n is there");
    revoke(&mut raw, lease).await;
    let revoked = Instant::now();
    let back_after = loop {
        if let Some(now) = lease_of(&mut raw, &n_key).await {
            if now != 0 && now != lease {
                break revoked.elapsed();
            }
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(15),
            "A's temp key n not back on a new lease 15 s after the revoke"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v_key = format!("{}v", store.prefix());
    let v_back = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match lease_of(&mut raw, &v_key).await {
                Some(now) if now != 0 && now != lease => break,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert!(
        v_back.is_ok(),
        "A's temp key v not back on a new lease 15 s after the revoke"
    );
    assert_eq!(
        b.get("v").await.expect("get v").as_deref(),
        Some("last"),
        "A's temp key v came back with an old value"
    );
    let m_after_restore = b.get("m").await.expect("get m");
    let m_lease = lease_of(&mut raw, &m_key).await;
    a.close().await.expect("close A");
    let m_after_close = b.get("m").await.expect("get m");
    eprintln!(
        "lease_loss: A's temp key n back {} after its lease was revoked; m (B's since) then: {m_after_restore:?} (lease {m_lease:?}), after A's close: {m_after_close:?}",
        secs(back_after)
    );
    assert_eq!(
        m_after_restore.as_deref(),
        Some("B-data"),
        "A's temp-key restore overwrote B's data at m"
    );
    assert_eq!(
        m_after_close.as_deref(),
        Some("B-data"),
        "A's close removed B's data at m"
    );
    b.close().await.expect("close B");
}

/// A temp put that etcd refuses for its own sake (a value over etcd's request limit) fails
/// with that error at once, and is not taken for a lost lease: the handle keeps its lease and
/// its other temp keys stay where they are. Only "lease not found" means the lease is gone.
async fn refused_temp_put(endpoints: String, store: TestStore) {
    let a = EtcdKvs::connect(
        &endpoints,
        &store.options(&format!(
            "lease_ttl={}s,request_timeout=2s",
            LEASE_TTL.as_secs()
        )),
    )
    .await
    .expect("open A");
    let mut raw = raw(&endpoints).await;
    let (kept, lease) = temp_key_on_lease(&a, &mut raw, &store, "kept").await;
    let big = "x".repeat(2 * 1024 * 1024);
    let refused = tokio::time::timeout(Duration::from_secs(10), a.store_temp("big", &big)).await;
    let refused = refused.expect("a refused temp put must fail, not retry for ever");
    assert!(refused.is_err(), "etcd took a 2 MiB value: {refused:?}");
    // A lease taken for lost would be replaced and the temp key put back on a new one at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        lease_of(&mut raw, &kept).await,
        Some(lease),
        "A's temp key moved to another lease after a refused temp put"
    );
    assert!(lease_alive(&mut raw, lease).await, "A's lease is gone");
    assert_eq!(a.get("big").await.expect("get big"), None);
    a.close().await.expect("close A");
}

/// While the handle replaces a lost lease, a temp put and a lock wait wait for the new lease:
/// neither goes out on the lost one, which etcd may still keep (its renewals were not
/// confirmed in time) but which the handle revokes before it puts the temp keys back, so that
/// what went on it would vanish after the call said it was done. Staged with pause points:
/// A's renewals stop (the lease's validity runs out unconfirmed) and its grant of a new lease
/// is held while the test calls.
async fn calls_during_a_lease_change(endpoints: String, store: TestStore) {
    let a = Arc::new(
        EtcdKvs::connect(
            &endpoints,
            &store.options(&format!(
                "lease_ttl={}s,request_timeout=3s",
                LEASE_TTL.as_secs()
            )),
        )
        .await
        .expect("open A"),
    );
    let mut raw = raw(&endpoints).await;
    a.store_temp("change/before", "1")
        .await
        .expect("A's temp key");
    let before = format!("{}change/before", store.prefix());
    let lost = lease_of(&mut raw, &before)
        .await
        .expect("A's temp key is there");
    // A holds the handle's lock; its key stays in etcd while the lost lease is not revoked.
    a.dist_lock().await.expect("A's dist_lock");
    let points = a.pause_points();
    points.hold(PausePoint::LeaseGrant);
    points.hold(PausePoint::KeepAliveRenewal);
    arrivals(
        &a,
        PausePoint::LeaseGrant,
        1,
        LEASE_TTL * 2,
        "A counted its lease lost once its validity ran out",
    )
    .await;
    assert!(
        lease_alive(&mut raw, lost).await,
        "etcd still keeps A's lease (counted lost, not yet revoked)"
    );
    let put = tokio::spawn({
        let a = Arc::clone(&a);
        async move { a.store_temp("change/during", "2").await }
    });
    let locked = tokio::spawn({
        let a = Arc::clone(&a);
        async move { a.lock("change").await }
    });
    // "Already holds it" only while the lease is sure: A queues again for its lock.
    let again = tokio::spawn({
        let a = Arc::clone(&a);
        async move { a.dist_lock().await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let early = (put.is_finished(), locked.is_finished(), again.is_finished());
    let lock_keys = prefix_keys(&mut raw, &format!("{}change/", store.prefix())).await;
    points.open(PausePoint::LeaseGrant);
    points.open(PausePoint::KeepAliveRenewal);
    assert_eq!(
        early,
        (false, false, false),
        "(temp put, lock, dist_lock again) done while A had no live lease; keys: {lock_keys:?}"
    );
    put.await.expect("put task").expect("A's temp put");
    let guard = locked.await.expect("lock task").expect("A's lock");
    again
        .await
        .expect("dist_lock task")
        .expect("A's dist_lock again");
    let during = format!("{}change/during", store.prefix());
    let now = lease_of(&mut raw, &during)
        .await
        .expect("A's temp put is there");
    assert_ne!(now, lost, "A's temp put went on the lost lease");
    let back = wait_keys(&mut raw, &before, 1).await;
    assert_eq!(
        back[0].1, now,
        "A's earlier temp key is back on the new lease"
    );
    assert!(guard.is_held(), "A's lock");
    assert!(
        !lease_alive(&mut raw, lost).await,
        "A revoked the lost lease"
    );
    guard.unlock().await.expect("A unlocks");
    a.dist_unlock().await.expect("A's dist_unlock");
    a.close().await.expect("close A");
}

// ---------------------------------------------------------------------------------------------
// 4. Lock names that prefix other keys (both backends)

async fn lock_name_that_prefixes_other_keys(store: TestStore) {
    let a = store.open().await;
    let b = store.open().await;
    let mut failures = Vec::new();

    let held = a.lock("jobs/7").await.expect("A takes jobs/7");
    let began = Instant::now();
    match b
        .lock_with("jobs", lock_timeout(Duration::from_secs(2)))
        .await
    {
        Ok(guard) => guard.unlock().await.expect("B unlocks jobs"),
        Err(err) => failures.push(format!(
            "B's lock \"jobs\" while A holds \"jobs/7\": {err} after {}",
            secs(began.elapsed())
        )),
    }
    let beside_lock = began.elapsed();
    held.unlock().await.expect("A unlocks jobs/7");

    a.store("jobs/config", "x")
        .await
        .expect("store jobs/config");
    let began = Instant::now();
    match b
        .lock_with("jobs", lock_timeout(Duration::from_secs(2)))
        .await
    {
        Ok(guard) => guard.unlock().await.expect("B unlocks jobs"),
        Err(err) => failures.push(format!(
            "B's lock \"jobs\" beside the plain key \"jobs/config\": {err} after {}",
            secs(began.elapsed())
        )),
    }
    let beside_key = began.elapsed();
    eprintln!(
        "lease_loss: {}: lock \"jobs\" beside the held lock \"jobs/7\" took {}, beside the plain key \"jobs/config\" {}",
        store.backend(),
        secs(beside_lock),
        secs(beside_key)
    );
    a.close().await.expect("close A");
    b.close().await.expect("close B");
    assert!(failures.is_empty(), "{}", failures.join("; "));
}

// ---------------------------------------------------------------------------------------------
// 5. is_held() is conservative, and lost() fires, after an external revoke

async fn is_held_conservative(endpoints: String, store: TestStore) {
    let ttl = Duration::from_secs(6);
    let options = store.options("lease_ttl=6s,request_timeout=1s");
    let a = EtcdKvs::connect(&endpoints, &options)
        .await
        .expect("open A");
    let b = Arc::new(
        EtcdKvs::connect(&endpoints, &options)
            .await
            .expect("open B"),
    );
    let mut raw = raw(&endpoints).await;
    let g_dir = format!("{}g/", store.prefix());
    let dist_dir = format!("{}{}/", store.prefix(), store.lock_name());

    a.dist_lock().await.expect("A takes the handle's lock");
    let a_guard = Arc::new(a.lock("g").await.expect("A takes g"));
    let a_token = a_guard.fencing_token();
    let a_lease = wait_keys(&mut raw, &g_dir, 1).await[0].1;

    let b_holds = Arc::new(AtomicBool::new(false));
    let b_named = tokio::spawn({
        let (b, b_holds) = (b.clone(), b_holds.clone());
        async move {
            let guard = b
                .lock_with("g", lock_timeout(Duration::from_secs(10)))
                .await;
            if guard.is_ok() {
                b_holds.store(true, Ordering::SeqCst);
            }
            (guard, Instant::now())
        }
    });
    let b_dist = tokio::spawn({
        let b = b.clone();
        async move { b.dist_timed_lock(Duration::from_secs(10)).await }
    });
    wait_keys(&mut raw, &g_dir, 2).await;
    wait_keys(&mut raw, &dist_dir, 2).await;

    // Watches A's guard from before the revoke: any instant at which B holds g and A's guard
    // says it is held is a violation.
    let stop = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn({
        let (a_guard, b_holds, stop) = (a_guard.clone(), b_holds.clone(), stop.clone());
        async move {
            let mut polls = 0u64;
            let mut violations = 0u64;
            let mut first_violation: Option<Instant> = None;
            let mut last_violation: Option<Instant> = None;
            let mut first_false: Option<Instant> = None;
            while !stop.load(Ordering::SeqCst) {
                let b_has_it = b_holds.load(Ordering::SeqCst);
                let held = a_guard.is_held();
                polls += 1;
                if b_has_it && held {
                    violations += 1;
                    first_violation.get_or_insert_with(Instant::now);
                    last_violation = Some(Instant::now());
                }
                if !held {
                    first_false.get_or_insert_with(Instant::now);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (
                polls,
                violations,
                first_violation,
                last_violation,
                first_false,
            )
        }
    });
    let lost = a_guard.lost();
    let lost_task = tokio::spawn(async move {
        let reason = tokio::time::timeout(ttl + RECOVERY_SLACK + Duration::from_secs(1), lost)
            .await
            .ok();
        (reason, Instant::now())
    });

    revoke(&mut raw, a_lease).await;
    let revoked = Instant::now();
    let (b_guard, b_at) = b_named.await.expect("B's task");
    let b_guard = b_guard.expect("B takes g after A's lease was revoked");
    b_dist
        .await
        .expect("B's task")
        .expect("B takes the handle's lock after A's lease was revoked");
    // Nothing asks A anything for 3 s (a call could tell it the lease is gone): its guard
    // must know by itself. Then "holds" means holds now: A's lock went with its lease, and B
    // holds it.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(b_at.elapsed())).await;
    let a_again = Instant::now();
    let a_attempt = a.dist_timed_lock(Duration::from_secs(1)).await;
    let a_attempt_took = a_again.elapsed();

    let (reason, lost_at) = lost_task.await.expect("the lost() task");
    stop.store(true, Ordering::SeqCst);
    let (polls, violations, first_violation, last_violation, first_false) =
        poller.await.expect("the poller");
    let after_b = |at: Option<Instant>| {
        at.map_or("never".to_owned(), |at| {
            if at >= b_at {
                format!("{} ms after B held g", (at - b_at).as_millis())
            } else {
                format!("{} ms before B held g", (b_at - at).as_millis())
            }
        })
    };
    eprintln!(
        "lease_loss: A's lease revoked; B held g {} ms after; A's is_held() first false {}; {violations} of {polls} polls said A holds g while B held it (first {}, last {}); A's lost(): {reason:?} {} after the revoke; A's dist_timed_lock(1 s) while B holds the lock: {a_attempt:?} after {} ms; fencing tokens A {a_token}, B {}",
        (b_at - revoked).as_millis(),
        after_b(first_false),
        after_b(first_violation),
        after_b(last_violation),
        if reason.is_some() { secs(lost_at - revoked) } else { "(never) ".to_owned() + &secs(lost_at - revoked) },
        a_attempt_took.as_millis(),
        b_guard.fencing_token()
    );
    let mut failures = Vec::new();
    if violations > 0 {
        failures.push(format!(
            "A's guard said is_held() == true while B held g: {violations} polls, from {} to {}",
            after_b(first_violation),
            after_b(last_violation)
        ));
    }
    if reason != Some(LostReason::SessionLost) {
        failures.push(format!(
            "A's lost() gave {reason:?} within {} of the revoke, not SessionLost",
            secs(ttl + RECOVERY_SLACK)
        ));
    } else if lost_at - revoked > ttl + RECOVERY_SLACK {
        failures.push(format!(
            "A's lost() resolved only {} after the revoke",
            secs(lost_at - revoked)
        ));
    }
    if !matches!(a_attempt, Err(Error::LockTimeout { .. })) {
        failures.push(format!(
            "A's dist_timed_lock(1 s) while B holds the lock: {a_attempt:?}"
        ));
    }
    if b_guard.fencing_token() <= a_token {
        failures.push(format!(
            "B's fencing token {} is not above A's {a_token}",
            b_guard.fencing_token()
        ));
    }
    drop(b_guard);
    a.close().await.expect("close A");
    b.close().await.expect("close B");
    assert!(failures.is_empty(), "{}", failures.join("; "));
}

/// A lease the owner asks for while the handle closes (its lease was just lost) is revoked
/// once granted: nothing the handle took outlives `close()`. Staged with the pause point
/// `LeaseGrant`: the grant is held until `close()` has begun, then sent.
async fn grant_racing_close(endpoints: String, store: TestStore) {
    let mut raw = raw(&endpoints).await;
    let before = all_leases(&mut raw).await;
    // A long lease: one taken after close lives on long enough to be seen.
    let a = Arc::new(
        EtcdKvs::connect(
            &endpoints,
            &store.options("lease_ttl=10s,request_timeout=2s"),
        )
        .await
        .expect("open A"),
    );
    let (_, lease) = temp_key_on_lease(&a, &mut raw, &store, "racing/grant").await;
    let points = a.pause_points();
    points.hold(PausePoint::LeaseGrant);
    revoke(&mut raw, lease).await;
    // A's next keep-alive (a third of the TTL) finds the lease gone.
    arrivals(
        &a,
        PausePoint::LeaseGrant,
        1,
        Duration::from_secs(8),
        "A took its lease for lost",
    )
    .await;
    let closing = tokio::spawn({
        let a = Arc::clone(&a);
        async move { a.close().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    points.open(PausePoint::LeaseGrant);
    closing.await.expect("close task").expect("A's close");
    let left: Vec<_> = all_leases(&mut raw)
        .await
        .difference(&before)
        .copied()
        .collect();
    assert!(
        left.is_empty(),
        "leases A took that outlived its close(): {left:x?}"
    );
}

/// A request that finds the lease gone has it replaced at once, without waiting for the
/// keep-alive to notice: a temp put right after an outside revoke goes through on a new lease
/// within its request timeout. Staged with the pause point `KeepAliveRenewal`: A's renewals
/// are held, so only the put's "lease not found" can tell A (its lease stays valid in its own
/// eyes for over a second more, longer than the put's 1 s timeout).
async fn reported_loss(endpoints: String, store: TestStore) {
    let mut raw = raw(&endpoints).await;
    let a = open_a(&endpoints, &store).await;
    let (_, lease) = temp_key_on_lease(&a, &mut raw, &store, "reported/first").await;
    let points = a.pause_points();
    // The renewal is due: A's lease is valid for 1.75 s more in A's eyes.
    hold_renewals(&a, LEASE_TTL).await;
    revoke(&mut raw, lease).await;
    let began = Instant::now();
    let put = a.temp_key("reported/second").await;
    let took = began.elapsed();
    points.open(PausePoint::KeepAliveRenewal);
    eprintln!(
        "lease_loss: a temp put after an outside revoke (renewals held): {put:?} after {}",
        secs(took)
    );
    put.unwrap_or_else(|err| {
        panic!(
            "A's temp put after its lease was revoked: {err} after {}",
            secs(took)
        )
    });
    let now = lease_of(&mut raw, &format!("{}reported/second", store.prefix()))
        .await
        .expect("A's second temp key is there");
    assert_ne!(now, lease, "A's temp put on the revoked lease");
    let back = wait_keys(&mut raw, &format!("{}reported/first", store.prefix()), 1).await;
    assert_eq!(
        back[0].1, now,
        "A's first temp key is back on the new lease"
    );
    a.close().await.expect("close A");
}

/// Several requests that find the lease gone at once each report it: the handle takes one new
/// lease for them all. A report of a lease already replaced must not cost the new one: its
/// temp keys would then be taken for someone else's by the next restore, and go with it when
/// it expires. Staged like the test above, with four temp puts at once.
async fn reports_of_one_loss(endpoints: String, store: TestStore) {
    let mut raw = raw(&endpoints).await;
    let a = Arc::new(open_a(&endpoints, &store).await);
    let (_, lease) = temp_key_on_lease(&a, &mut raw, &store, "reports/first").await;
    let points = a.pause_points();
    hold_renewals(&a, LEASE_TTL).await;
    revoke(&mut raw, lease).await;
    let puts: Vec<_> = (0..4)
        .map(|i| {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.temp_key(&format!("reports/{i}")).await })
        })
        .collect();
    for put in puts {
        put.await
            .expect("temp put task")
            .expect("A's temp put after the revoke");
    }
    points.open(PausePoint::KeepAliveRenewal);
    // Past the TTL of any lease A took and let go: what is left is what A keeps.
    let settle = LEASE_TTL + Duration::from_secs(1);
    tokio::time::sleep(settle).await;
    let keys = prefix_keys(&mut raw, &format!("{}reports/", store.prefix())).await;
    assert_eq!(
        keys.len(),
        5,
        "A's temp keys {} after four temp puts found its lease gone: {keys:?}",
        secs(settle)
    );
    let now = keys[0].1;
    assert!(
        keys.iter().all(|(_, on)| *on == now) && now != lease,
        "A's temp keys are not all on one new lease: {keys:?}"
    );
    assert!(lease_alive(&mut raw, now).await, "A's new lease is gone");
    a.close().await.expect("close A");
}

/// A keep-alive stream broken by a short outage (the member down: connections refused) is
/// reopened once the member is back; a reopen that fails meanwhile (a transport error, not
/// "lease not found") is no lost lease: the lease, its temp key and its lock are all kept.
/// Staged with the pause point `KeepAliveRenewal`: the outage begins while a renewal is held,
/// so that the renewal finds the stream broken and the reopens happen during the outage.
async fn keep_alive_reopened_after_a_cut(endpoints: String, store: TestStore) {
    let mut raw = raw(&endpoints).await;
    let proxy = ok(FaultProxy::start(&endpoints).await);
    let a = open_a(proxy.endpoint(), &store).await;
    let (key, lease) = temp_key_on_lease(&a, &mut raw, &store, "reopen/key").await;
    let guard = a.lock("reopen").await.expect("A takes the lock");
    let points = a.pause_points();
    hold_renewals(&a, LEASE_TTL).await;
    // 1.75 s of validity left: an outage of 0.8 s, during which the renewal finds the stream
    // broken and the stream is opened again (and again).
    proxy.refuse();
    points.open(PausePoint::KeepAliveRenewal);
    tokio::time::sleep(Duration::from_millis(800)).await;
    proxy.resume();
    tokio::time::sleep(LEASE_TTL).await;
    assert!(
        guard.is_held(),
        "A lost its lock in an outage shorter than its lease's validity: {:?}",
        guard.lost().now_or_never()
    );
    assert_eq!(
        lease_of(&mut raw, &key).await,
        Some(lease),
        "A's temp key is on another lease after a short outage"
    );
    assert!(lease_alive(&mut raw, lease).await, "A's lease is gone");
    guard.unlock().await.expect("A unlocks");
    a.close().await.expect("close A");
}

/// Waits until `key` is on a lease other than `lease` (A put its temp key back on a new one)
/// and returns that lease; panics 5 s after `since`.
async fn back_on_another_lease(
    raw: &mut etcd_client::Client,
    key: &str,
    lease: i64,
    since: Instant,
) -> i64 {
    let deadline = since + Duration::from_secs(5);
    loop {
        match lease_of(raw, key).await {
            Some(now) if now != lease => return now,
            _ => {
                assert!(Instant::now() < deadline, "A's temp key never came back");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// A lease revoked from outside is noticed at the handle's next keep-alive (etcd answers it
/// with TTL 0), not only when the lease's validity runs out: the temp keys are back on a new
/// lease moments after that keep-alive. Staged with the pause point `KeepAliveRenewal`: the
/// revoke comes while a renewal is held, with 1.75 s of validity left in A's eyes, and the
/// renewal goes out right after it.
async fn revoke_noticed_at_the_next_keep_alive(endpoints: String, store: TestStore) {
    let mut raw = raw(&endpoints).await;
    let a = open_a(&endpoints, &store).await;
    let (key, lease) = temp_key_on_lease(&a, &mut raw, &store, "noticed/key").await;
    let points = a.pause_points();
    hold_renewals(&a, LEASE_TTL).await;
    revoke(&mut raw, lease).await;
    let revoked = Instant::now();
    points.open(PausePoint::KeepAliveRenewal);
    let back = back_on_another_lease(&mut raw, &key, lease, revoked).await;
    let took = revoked.elapsed();
    eprintln!(
        "lease_loss: temp key back on a new lease {} after an outside revoke, the keep-alive sent right after it",
        secs(took)
    );
    assert!(
        took < Duration::from_secs(1),
        "the revoke was noticed only after {} (the keep-alive right after it says TTL 0; A's \
         lease was valid 1.75 s more in its eyes)",
        secs(took)
    );
    assert_ne!(back, 0);
    a.close().await.expect("close A");
}

/// A lease revoked from outside while the handle's keep-alive stream is down is noticed when
/// the stream is opened again (etcd answers the reopen "lease not found"), not only when the
/// lease's validity runs out. Staged with the pause point `KeepAliveRenewal`: while a renewal
/// is held, with 1.75 s of validity left in A's eyes, the member goes down for A (its
/// connections refused) and the lease is revoked; the renewal then finds the stream broken,
/// and the first reopen after the member is back finds the lease gone.
async fn revoke_noticed_when_the_keep_alive_stream_is_reopened(
    endpoints: String,
    store: TestStore,
) {
    let mut raw = raw(&endpoints).await;
    let proxy = ok(FaultProxy::start(&endpoints).await);
    let a = open_a(proxy.endpoint(), &store).await;
    let (key, lease) = temp_key_on_lease(&a, &mut raw, &store, "reopened/key").await;
    let points = a.pause_points();
    hold_renewals(&a, LEASE_TTL).await;
    let held = Instant::now();
    proxy.refuse();
    revoke(&mut raw, lease).await;
    points.open(PausePoint::KeepAliveRenewal);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.resume();
    let back = back_on_another_lease(&mut raw, &key, lease, held).await;
    let took = held.elapsed();
    eprintln!(
        "lease_loss: temp key back on a new lease {} after the renewal was held, the lease \
         revoked while the keep-alive stream was down for 0.30 s",
        secs(took)
    );
    assert!(
        took < Duration::from_millis(1400),
        "the revoke was noticed only after {} (the reopened keep-alive stream says \"lease not \
         found\"; A's lease was valid 1.75 s more in its eyes)",
        secs(took)
    );
    assert_ne!(back, 0);
    a.close().await.expect("close A");
}

/// A new lease revoked while the handle puts its temp keys back on it: the restore hears
/// "lease not found" and has the owner take another lease at once, rather than retry on the
/// lost one until its validity runs out. Staged with pause points: the restore is held while
/// the test revokes the new lease, and A's renewals are held, so that only the restore can
/// tell A.
async fn restore_finds_its_lease_gone(endpoints: String, store: TestStore) {
    let mut raw = raw(&endpoints).await;
    let a = open_a(&endpoints, &store).await;
    let (key, first) = temp_key_on_lease(&a, &mut raw, &store, "regone/key").await;
    let points = a.pause_points();
    points.hold(PausePoint::RestoreTempKeys);
    revoke(&mut raw, first).await;
    arrivals(
        &a,
        PausePoint::RestoreTempKeys,
        1,
        LEASE_TTL * 2,
        "A's restore after the first revoke",
    )
    .await;
    points.hold(PausePoint::KeepAliveRenewal);
    // A's new lease: the one a temp put of A's goes on now.
    a.temp_key("regone/probe")
        .await
        .expect("A's probe temp key");
    let second = lease_of(&mut raw, &format!("{}regone/probe", store.prefix()))
        .await
        .expect("A's probe temp key is there");
    assert_ne!(second, first);
    revoke(&mut raw, second).await;
    let revoked = Instant::now();
    points.open(PausePoint::RestoreTempKeys);
    let deadline = revoked + Duration::from_secs(5);
    let third = loop {
        match lease_of(&mut raw, &key).await {
            Some(now) if now != first && now != second => break now,
            _ => {
                assert!(Instant::now() < deadline, "A's temp key never came back");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let took = revoked.elapsed();
    points.open(PausePoint::KeepAliveRenewal);
    eprintln!(
        "lease_loss: temp key back {} after the new lease was revoked under the restore",
        secs(took)
    );
    assert!(
        took < Duration::from_secs(1),
        "the restore on a revoked lease took {} to have it replaced (renewals held: only the \
         restore's \"lease not found\" can tell)",
        secs(took)
    );
    assert_ne!(third, 0);
    a.close().await.expect("close A");
}

/// A lease the handle counted lost without etcd saying so may still hold its temp keys in
/// etcd: it is revoked before they go back on the new lease, and a revoke that fails is tried
/// again, not counted done. Counted done, the restore would find each temp key on the old
/// lease, take it for someone else's write, and let it go with that lease. Staged with pause
/// points: A's renewals are held, so that A counts its lease lost while the test keeps it
/// alive in etcd (a link that drops only A's keep-alives); A's first revoke of it is let go
/// while A's member is down for it (every connection refused), and its restore is held until
/// the member is back.
async fn failed_revoke_of_a_lost_lease(endpoints: String, store: TestStore) {
    let mut raw = raw(&endpoints).await;
    let proxy = ok(FaultProxy::start(&endpoints).await);
    let a = open_a(proxy.endpoint(), &store).await;
    let (key, lost) = temp_key_on_lease(&a, &mut raw, &store, "unrevoked/key").await;
    let (mut keeper, mut answers) = raw
        .lease_keep_alive(lost)
        .await
        .unwrap_or_else(|err| panic!("raw keep-alive of lease {lost:x}: {err}"));
    let kept_alive = tokio::spawn(async move {
        loop {
            if keeper.keep_alive().await.is_err() {
                return;
            }
            match answers.message().await {
                Ok(Some(answer)) if answer.ttl() > 0 => {}
                _ => return,
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let points = a.pause_points();
    points.hold(PausePoint::LostLeaseRevoke);
    points.hold(PausePoint::RestoreTempKeys);
    hold_renewals(&a, LEASE_TTL).await;
    arrivals(
        &a,
        PausePoint::LostLeaseRevoke,
        1,
        LEASE_TTL * 2,
        "A's revoke of the lease it counted lost",
    )
    .await;
    // A's new lease is renewed from now on.
    points.open(PausePoint::KeepAliveRenewal);
    proxy.refuse();
    points.pass_one(PausePoint::LostLeaseRevoke);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        lease_alive(&mut raw, lost).await,
        "A revoked its lost lease with every connection refused: the test staged nothing"
    );
    proxy.resume();
    let resumed = Instant::now();
    points.open(PausePoint::LostLeaseRevoke);
    points.open(PausePoint::RestoreTempKeys);
    let back = back_on_another_lease(&mut raw, &key, lost, resumed).await;
    eprintln!(
        "lease_loss: temp key back on a new lease {} after the member was back, A's first revoke \
         of the lease it counted lost having failed",
        secs(resumed.elapsed())
    );
    assert!(
        !lease_alive(&mut raw, lost).await,
        "the lease A counted lost is still alive: A's revoke of it was never tried again"
    );
    assert_ne!(back, 0);
    kept_alive.abort();
    a.close().await.expect("close A");
}

/// A lock attempt that fails because its member is down (every connection refused: a
/// transport error, not "lease not found") fails alone: it is not taken for a lost lease, so
/// the handle keeps its lease, its other lock and its temp key.
async fn failed_lock_attempt_costs_no_lease(endpoints: String, store: TestStore) {
    let mut raw = raw(&endpoints).await;
    let proxy = ok(FaultProxy::start(&endpoints).await);
    let a = open_a(proxy.endpoint(), &store).await;
    let (key, lease) = temp_key_on_lease(&a, &mut raw, &store, "attempt/key").await;
    let kept = a.lock("attempt/kept").await.expect("A takes a lock");
    proxy.refuse();
    let attempt = a
        .lock_with("attempt/other", lock_timeout(Duration::from_millis(500)))
        .await;
    proxy.resume();
    assert!(
        attempt.is_err(),
        "A took a lock with every connection refused: {attempt:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        kept.is_held(),
        "A lost its other lock after a lock attempt failed on a down member ({attempt:?}): {:?}",
        kept.lost().now_or_never()
    );
    assert_eq!(
        lease_of(&mut raw, &key).await,
        Some(lease),
        "A's temp key moved to another lease after a failed lock attempt ({attempt:?})"
    );
    kept.unlock().await.expect("A unlocks");
    a.close().await.expect("close A");
}

// ---------------------------------------------------------------------------------------------
// 6. temp_key / lock_with racing close()

async fn racing_close(endpoints: String, store: TestStore) {
    const ROUNDS: usize = 20;
    const CALLS: usize = 50;
    let mut raw = raw(&endpoints).await;
    let mut leaked = Vec::new();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let began = Instant::now();
    for round in 0..ROUNDS {
        let before = all_leases(&mut raw).await;
        // A long lease: one taken after close lives on long enough to be seen.
        let h = Arc::new(
            EtcdKvs::connect(
                &endpoints,
                &store.options("lease_ttl=10s,request_timeout=1s"),
            )
            .await
            .expect("open H"),
        );
        // Many calls at once, so that some are past their closed-check when close() starts
        // and reach etcd after its revoke.
        let mut temps = Vec::new();
        for call in 0..CALLS {
            let h = h.clone();
            temps.push(tokio::spawn(async move {
                h.temp_key(&format!("r{round}/{call}")).await
            }));
        }
        let mut locks = Vec::new();
        for call in 0..CALLS / 10 {
            let h = h.clone();
            locks.push(tokio::spawn(async move {
                h.lock_with(
                    &format!("l{round}/{call}"),
                    lock_timeout(Duration::from_secs(2)),
                )
                .await
                .map(drop)
            }));
        }
        tokio::time::sleep(Duration::from_micros(fastrand::u64(0..=2000))).await;
        let closed = h.close().await;
        let mut calls = vec![("close", closed.map_err(|err| err.to_string()))];
        for temp in temps {
            calls.push((
                "temp_key",
                temp.await
                    .expect("temp_key task")
                    .map_err(|err| err.to_string()),
            ));
        }
        for lock in locks {
            calls.push((
                "lock_with",
                lock.await
                    .expect("lock_with task")
                    .map_err(|err| err.to_string()),
            ));
        }
        for (what, outcome) in calls {
            let shown = match outcome {
                Ok(()) => format!("{what}: Ok"),
                Err(err) => format!("{what}: {}", err.split(':').next().unwrap_or_default()),
            };
            *outcomes.entry(shown).or_default() += 1;
        }
        drop(h);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = all_leases(&mut raw).await;
        let new_leases: Vec<i64> = after.difference(&before).copied().collect();
        let mut keys: Vec<(String, i64)> =
            prefix_keys(&mut raw, &format!("{}r{round}/", store.prefix())).await;
        keys.extend(prefix_keys(&mut raw, &format!("{}l{round}/", store.prefix())).await);
        keys.retain(|(_, lease)| *lease != 0);
        if !new_leases.is_empty() || !keys.is_empty() {
            leaked.push(format!(
                "round {round}: leases alive 1 s after close: {:?}, {} keys with a lease (first: {:?})",
                new_leases
                    .iter()
                    .map(|lease| format!("{lease:x}"))
                    .collect::<Vec<_>>(),
                keys.len(),
                keys.first()
            ));
        }
    }
    eprintln!(
        "lease_loss: {ROUNDS} rounds of temp_key and lock_with racing close in {}: {} rounds left a lease or key behind; outcomes: {outcomes:?}",
        secs(began.elapsed()),
        leaked.len()
    );
    assert!(
        leaked.is_empty(),
        "a lease or key outlived close(): {}",
        leaked.join("; ")
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Fenced increments by 4 processes under lease revokes and a cut

/// One line of a fenced `lock_worker`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum WorkerLine {
    Commit {
        iteration: u64,
        token: i64,
        counter: u64,
        late: bool,
    },
    Refused {
        stage: String,
    },
    Lost {
        how: String,
    },
    Error {
        stage: String,
        err: String,
    },
    Done,
    Other,
}

fn parse_fenced_line(line: &str) -> WorkerLine {
    let mut words = line.split(' ');
    let _who = words.next();
    let kind = words.next().unwrap_or_default();
    let rest: Vec<&str> = words.collect();
    let field = |name: &str| {
        rest.iter()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_default()
    };
    match kind {
        "commit" => match (
            field("iter").parse(),
            field("token").parse(),
            field("counter").parse(),
        ) {
            (Ok(iteration), Ok(token), Ok(counter)) => WorkerLine::Commit {
                iteration,
                token,
                counter,
                late: !field("confirmed").is_empty(),
            },
            _ => WorkerLine::Other,
        },
        "refused" => WorkerLine::Refused {
            stage: field("stage").to_owned(),
        },
        "lost" => WorkerLine::Lost {
            how: field("how").to_owned(),
        },
        "error" => WorkerLine::Error {
            stage: field("stage").to_owned(),
            err: line
                .split_once(" err=")
                .map(|(_, err)| err.to_owned())
                .unwrap_or_default(),
        },
        "done" => WorkerLine::Done,
        _ => WorkerLine::Other,
    }
}

/// What the test has seen of the workers so far.
#[derive(Debug, Default)]
struct Tally {
    commits: u64,
    refused: BTreeMap<String, u64>,
    lost: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    done: usize,
}

async fn fenced_stress(endpoints: String, store: TestStore) {
    const WORKERS: usize = 4;
    const ROUNDS: u64 = 250;
    const LOCK: &str = "work";
    let limit = Duration::from_secs(170);
    let began = Instant::now();
    let worker = ok(lock_worker_binary());
    let options = store.options(&format!(
        "lease_ttl={}s,request_timeout=1s",
        LEASE_TTL.as_secs()
    ));
    let mut proxies = Vec::new();
    let mut children = Vec::new();
    for index in 0..WORKERS {
        let proxy = Arc::new(ok(FaultProxy::start(&endpoints).await));
        let name = format!("w{index}");
        let args: Vec<String> = [
            "--endpoint",
            proxy.endpoint(),
            "--options",
            &options,
            "--name",
            &name,
            "--counter",
            "counter",
            "--iterations",
            &ROUNDS.to_string(),
            // Work long enough in each hold that a revoke often lands in the middle of one.
            "--max-sleep-ms",
            "10",
            "--fenced",
            LOCK,
            "--fence-key",
            "fence",
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
        children.push(ok(ChildProcess::spawn(&name, &worker, &args)));
        proxies.push(proxy);
    }
    for (index, child) in children.iter_mut().enumerate() {
        ok(child
            .expect_line(&format!("w{index} ready"), Duration::from_secs(30))
            .await);
    }
    let started = Instant::now();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let readers: Vec<_> = children
        .into_iter()
        .enumerate()
        .map(|(index, mut child)| {
            let tally = tally.clone();
            tokio::spawn(async move {
                let mut lines = Vec::new();
                let ended = loop {
                    let left = limit.saturating_sub(began.elapsed());
                    match child.next_line(left).await {
                        Ok(Some(line)) => {
                            if let Ok(mut tally) = tally.lock() {
                                match parse_fenced_line(&line) {
                                    WorkerLine::Commit { .. } => tally.commits += 1,
                                    WorkerLine::Refused { stage } => {
                                        *tally.refused.entry(stage).or_default() += 1
                                    }
                                    WorkerLine::Lost { how } => {
                                        *tally.lost.entry(how).or_default() += 1
                                    }
                                    WorkerLine::Error { stage, err } => {
                                        *tally
                                            .errors
                                            .entry(format!("{stage}: {err}"))
                                            .or_default() += 1
                                    }
                                    WorkerLine::Done => tally.done += 1,
                                    WorkerLine::Other => {}
                                }
                            }
                            lines.push(line);
                        }
                        Ok(None) => break Ok(()),
                        Err(why) => break Err(why),
                    }
                };
                let status = match ended {
                    Ok(()) => child.finish(Duration::from_secs(5)).await.map(drop),
                    Err(why) => Err(why),
                };
                (index, lines, status)
            })
        })
        .collect();

    // Chaos: revoke the holder's lease every 2–4 s; once, cut one worker off for 5 s.
    let mut raw = raw(&endpoints).await;
    let lock_dir = format!("{}{LOCK}/", store.prefix());
    let mut revokes = 0u64;
    let mut cut: Option<(usize, Duration)> = None;
    let mut cut_task = None;
    let finished = |tally: &Mutex<Tally>| tally.lock().map(|tally| tally.done).unwrap_or(0);
    while finished(&tally) < WORKERS && began.elapsed() < limit {
        let pause = Duration::from_millis(fastrand::u64(2000..=4000));
        let until = Instant::now() + pause;
        while Instant::now() < until && finished(&tally) < WORKERS && began.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if finished(&tally) >= WORKERS {
            break;
        }
        if let Some((_, lease)) = prefix_keys(&mut raw, &lock_dir).await.first().cloned() {
            if raw.lease_revoke(lease).await.is_ok() {
                revokes += 1;
            }
        }
        if cut.is_none() && started.elapsed() >= Duration::from_secs(8) {
            let index = fastrand::usize(0..WORKERS);
            let proxy = proxies[index].clone();
            cut = Some((index, started.elapsed()));
            cut_task = Some(tokio::spawn(async move {
                proxy.cut();
                tokio::time::sleep(Duration::from_secs(5)).await;
                proxy.resume();
            }));
        }
    }
    if let Some(task) = cut_task {
        let _ = task.await;
    }
    let mut outputs = Vec::new();
    for reader in readers {
        outputs.push(reader.await.expect("a worker's reader"));
    }
    let elapsed = started.elapsed();
    let tally = tally
        .lock()
        .map(|tally| format!("{tally:?}"))
        .unwrap_or_default();

    // The audit.
    let mut failures = Vec::new();
    let mut commits: Vec<(u64, i64, String, u64)> = Vec::new();
    let mut late = 0u64;
    for (index, lines, status) in &outputs {
        if let Err(why) = status {
            let tail: Vec<&String> = lines.iter().rev().take(5).collect();
            failures.push(format!(
                "w{index}: {why}; last lines (newest first): {tail:?}"
            ));
        }
        let mut iterations = Vec::new();
        for line in lines {
            if let WorkerLine::Commit {
                iteration,
                token,
                counter,
                late: confirmed_late,
            } = parse_fenced_line(line)
            {
                iterations.push(iteration);
                commits.push((counter, token, format!("w{index}"), iteration));
                late += u64::from(confirmed_late);
            }
        }
        let expected: Vec<u64> = (1..=ROUNDS).collect();
        if status.is_ok() && iterations != expected {
            failures.push(format!(
                "w{index} committed iterations {} of {ROUNDS}, not 1..={ROUNDS} once each",
                iterations.len()
            ));
        }
    }
    commits.sort_unstable();
    let counters: Vec<u64> = commits.iter().map(|commit| commit.0).collect();
    let total = WORKERS as u64 * ROUNDS;
    let mut seen = BTreeMap::<u64, u64>::new();
    for counter in &counters {
        *seen.entry(*counter).or_default() += 1;
    }
    let doubled: Vec<u64> = seen
        .iter()
        .filter(|(_, times)| **times > 1)
        .map(|(counter, _)| *counter)
        .collect();
    let highest = counters.last().copied().unwrap_or(0);
    let missing: Vec<u64> = (1..=highest).filter(|n| !seen.contains_key(n)).collect();
    if !doubled.is_empty() || !missing.is_empty() {
        failures.push(format!(
            "counter values committed twice: {doubled:?}; missing: {missing:?}"
        ));
    }
    let backwards = commits
        .windows(2)
        .filter(|pair| pair[1].1 < pair[0].1)
        .count();
    if backwards > 0 {
        failures.push(format!(
            "{backwards} commits carry a lower fencing token than the commit before them"
        ));
    }
    let stored = raw
        .get(format!("{}counter", store.prefix()), None)
        .await
        .ok()
        .and_then(|answer| {
            answer
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
        })
        .unwrap_or_default();
    let (stored_count, stored_list) = stored.split_once(' ').unwrap_or((&stored, ""));
    let applied: Vec<&str> = stored_list.split(',').filter(|e| !e.is_empty()).collect();
    let distinct: BTreeSet<&str> = applied.iter().copied().collect();
    let logged: Vec<String> = commits
        .iter()
        .map(|(_, _, who, iteration)| format!("{who}:{iteration}"))
        .collect();
    if stored_count != total.to_string() || applied.len() as u64 != total {
        failures.push(format!(
            "final counter {stored_count:?} with {} increments listed, not {total}",
            applied.len()
        ));
    }
    if distinct.len() != applied.len() {
        failures.push(format!(
            "{} increments applied twice",
            applied.len() - distinct.len()
        ));
    }
    if applied != logged.iter().map(String::as_str).collect::<Vec<_>>() {
        failures.push(
            "the increments applied (the counter's list) differ from the commits the workers logged"
                .to_owned(),
        );
    }
    if commits.len() as u64 != total {
        failures.push(format!("{} commits logged, not {total}", commits.len()));
    }
    eprintln!(
        "lease_loss: {WORKERS} fenced lock_worker processes × {ROUNDS} increments in {} ({} holder leases revoked; {}): {} commits ({late} confirmed after an ambiguous answer), final counter {stored_count}; tally {tally}",
        secs(elapsed),
        revokes,
        cut.map_or("no cut".to_owned(), |(index, at)| format!(
            "w{index} cut off for 5 s at {}",
            secs(at)
        )),
        commits.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("; "));
}
