//! A three-member etcd cluster that loses members while a service uses it: the leader is
//! killed (and later restarted), then a follower is frozen, as when its machine is cut off.
//! Throughout, a loop stores and reads a key every ~20 ms, two handles take turns on the lock,
//! and two watchers follow the key. The test measures the longest stretch without a
//! successful store+get after each fault, and checks that the watchers saw etcd's history of
//! the key exactly and that the lock never had two holders.
//!
//! etcd runs as child processes (`HMETCD_ETCD_BIN`, else `etcd` on `PATH`, else
//! `/usr/bin/etcd`); the handle is given all three endpoints.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{ConnectOptions, WatchOptions};
use futures::StreamExt;
use hmetcd_core::{KeyChange, Kvi, WatchEvent};
use hmetcd_etcd::EtcdKvs;
use integration_tests::cluster::{etcd_binary, etcd_version, ClusterSpec, EtcdCluster};
use integration_tests::coalescing::assert_reads_batched_only_where_safe;
use integration_tests::run_limited;
use libtest_mimic::{Arguments, Failed, Trial};

/// The longest a service may go without a successful request after one member fails.
const MAX_GAP: Duration = Duration::from_secs(5);
/// How often the writer stores and reads.
const WRITE_PERIOD: Duration = Duration::from_millis(20);
const OPTIONS: &str = "request_timeout=1s,lease_ttl=3s,connect_timeout=5s";

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let (bin, version) = match etcd_binary() {
        Ok(bin) => {
            let version = etcd_version(&bin);
            (bin, version)
        }
        Err(why) => {
            let trial = Trial::test("etcd::cluster", move || Err(Failed::from(why)));
            return libtest_mimic::run(&args, vec![trial]).exit_code();
        }
    };
    eprintln!(
        "cluster: three members of etcd {version} ({})",
        bin.display()
    );
    let trials = vec![
        Trial::test(
            format!("etcd-{version}::cluster::failover_keeps_reads_writes_watches_and_lock"),
            {
                let bin = bin.clone();
                move || run_limited(2, Duration::from_secs(80), failover(bin))
            },
        ),
        Trial::test(
            format!("etcd-{version}::cluster::reads_are_batched_only_where_every_member_survives_a_cancelled_batch"),
            {
                let bin = bin.clone();
                let version = version.clone();
                move || run_limited(2, Duration::from_secs(60), reads_batched_only_where_safe(bin, version))
            },
        ),
        Trial::test(
            format!("etcd-{version}::cluster::errors_stop_while_a_member_stays_down"),
            move || {
                run_limited(
                    2,
                    Duration::from_secs(80),
                    errors_stop_while_a_member_stays_down(bin),
                )
            },
        ),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}

/// A loop that stores a new value at `k` and reads it back every [`WRITE_PERIOD`], recording
/// when each store+get finished and whether it worked.
struct Writer {
    task: tokio::task::JoinHandle<()>,
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<(Instant, bool)>>>,
    late_writes: Arc<AtomicUsize>,
}

impl Writer {
    fn spawn(kv: Arc<dyn Kvi>, stop: Arc<AtomicBool>) -> Writer {
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let late_writes = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (stop, attempts, late_writes) =
                (stop.clone(), attempts.clone(), late_writes.clone());
            async move {
                let mut next = 0u64;
                let mut failed_stores = HashSet::new();
                while !stop.load(Ordering::SeqCst) {
                    next += 1;
                    let value = format!("{next:06}");
                    let ok = match kv.store("k", &value).await {
                        Ok(()) => match kv.get("k").await {
                            Ok(read) if read.as_deref() == Some(value.as_str()) => true,
                            // A store that timed out may still be applied later (a frozen
                            // member forwards it once it runs again); any other value is stale.
                            Ok(Some(read)) if failed_stores.contains(&read) => {
                                late_writes.fetch_add(1, Ordering::SeqCst);
                                true
                            }
                            Ok(read) => panic!("stale read: stored {value:?}, read {read:?}"),
                            Err(err) => {
                                debug_note(&format!("get: {err}"));
                                false
                            }
                        },
                        Err(err) => {
                            debug_note(&format!("store: {err}"));
                            failed_stores.insert(value);
                            false
                        }
                    };
                    attempts
                        .lock()
                        .expect("attempts")
                        .push((Instant::now(), ok));
                    tokio::time::sleep(WRITE_PERIOD).await;
                }
            }
        });
        Writer {
            task,
            stop,
            attempts,
            late_writes,
        }
    }

    /// Stops the loop; every attempt (finish time, success) and how many reads found a
    /// timed-out store that landed later.
    async fn finish(self) -> (Vec<(Instant, bool)>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the writer stops")
            .expect("writer task");
        let attempts = self.attempts.lock().expect("attempts").clone();
        (attempts, self.late_writes.load(Ordering::SeqCst))
    }
}

/// With `HMETCD_TEST_DEBUG` set, every failed request is printed with its time.
fn debug_note(what: &str) {
    if std::env::var_os("HMETCD_TEST_DEBUG").is_some() {
        eprintln!("cluster: {:?} {what}", Instant::now());
    }
}

/// What happened in one window of the run.
struct Window {
    what: String,
    from: Instant,
    to: Instant,
}

/// The longest time within `window` from its start or a success to the next success, how
/// many attempts failed in it, and how long after its start the last one failed.
fn longest_gap(finished_ok: &[(Instant, bool)], window: &Window) -> (Duration, usize, Duration) {
    let mut last_ok = window.from;
    let mut longest = Duration::ZERO;
    let mut failures = 0;
    let mut last_failure = Duration::ZERO;
    for &(finished, ok) in finished_ok {
        if finished < window.from || finished > window.to {
            continue;
        }
        if ok {
            longest = longest.max(finished - last_ok);
            last_ok = finished;
        } else {
            failures += 1;
            last_failure = finished - window.from;
        }
    }
    (longest.max(window.to - last_ok), failures, last_failure)
}

async fn open(endpoints: &str, prefix: &str) -> Arc<dyn Kvi> {
    let options = format!("{OPTIONS},prefix={prefix},lock_name=lock");
    Arc::new(
        EtcdKvs::connect(endpoints, &options)
            .await
            .unwrap_or_else(|err| panic!("opening {endpoints}: {err}")),
    )
}

/// Three members, ready, and a fresh key prefix.
async fn three_members(bin: &Path) -> (EtcdCluster, String) {
    let started = Instant::now();
    let mut cluster = EtcdCluster::spawn(bin, ClusterSpec::new(3)).expect("start the cluster");
    cluster
        .wait_ready(&ConnectOptions::new(), Duration::from_secs(30))
        .await
        .expect("cluster ready");
    eprintln!(
        "cluster: three members ready in {:.2} s at {}",
        started.elapsed().as_secs_f64(),
        cluster.endpoints()
    );
    let tag: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(8)
        .collect();
    (cluster, format!("cluster-{tag}/"))
}

/// With several endpoints, the member checks learn every member's version: reads are batched
/// (as read-only transactions) only when no member is etcd 3.5.0 to 3.5.4, which crash when
/// one is cancelled in flight. 64 concurrent gets, five times, once the first checks are in.
async fn reads_batched_only_where_safe(bin: PathBuf, version: String) {
    let (cluster, prefix) = three_members(&bin).await;
    let kv = EtcdKvs::connect(&cluster.endpoints(), &format!("{OPTIONS},prefix={prefix}"))
        .await
        .expect("connect");
    // The first round of member checks starts at once and takes milliseconds.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_reads_batched_only_where_safe(Arc::new(kv), &version).await;
    drop(cluster);
}

async fn failover(bin: PathBuf) {
    let plain = ConnectOptions::new();
    let (mut cluster, prefix) = three_members(&bin).await;
    let endpoints = cluster.endpoints();

    let writer_kv = open(&endpoints, &prefix).await;
    let lockers = [
        open(&endpoints, &prefix).await,
        open(&endpoints, &prefix).await,
    ];
    let stop = Arc::new(AtomicBool::new(false));

    // Watchers first, so that they see every write.
    let mut stream = writer_kv.watch_stream("k").await.expect("watch_stream");
    let streamed = Arc::new(Mutex::new(Vec::<(String, i64)>::new()));
    let stream_task = tokio::spawn({
        let streamed = streamed.clone();
        async move {
            while let Some(event) = stream.next().await {
                match event {
                    Ok(WatchEvent::Put {
                        value, revision, ..
                    }) => streamed.lock().expect("streamed").push((value, revision)),
                    Ok(other) => panic!("unexpected event {other:?}"),
                    Err(err) => panic!("watch_stream ended with {err}"),
                }
            }
        }
    });
    let called = Arc::new(Mutex::new(Vec::<(String, i64)>::new()));
    let handle = lockers[0]
        .watch_with_cb("k", KeyChange::Put, {
            let called = called.clone();
            Box::new(move |event: &WatchEvent| {
                if let Ok(mut called) = called.lock() {
                    called.push((
                        event.value().unwrap_or_default().to_owned(),
                        event.revision(),
                    ));
                }
                true
            })
        })
        .await
        .expect("watch_with_cb");

    let writer = Writer::spawn(writer_kv.clone(), stop.clone());

    let holders = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let acquisitions = Arc::new(Mutex::new(Vec::<(Instant, bool)>::new()));
    let mut lock_tasks = Vec::new();
    for kv in &lockers {
        let (kv, stop, holders, overlaps, acquisitions) = (
            kv.clone(),
            stop.clone(),
            holders.clone(),
            overlaps.clone(),
            acquisitions.clone(),
        );
        lock_tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let taken = kv.dist_timed_lock(Duration::from_secs(4)).await;
                acquisitions
                    .lock()
                    .expect("acquisitions")
                    .push((Instant::now(), taken.is_ok()));
                if taken.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                if holders.fetch_add(1, Ordering::SeqCst) != 0 {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                holders.fetch_sub(1, Ordering::SeqCst);
                // Until the unlock is through, the lock stays ours in etcd too.
                while kv.dist_unlock().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }

    let mut windows = Vec::new();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let leader = cluster.leader(&plain).await.expect("find the leader");
    cluster.kill(leader);
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.restart(leader).expect("restart the old leader");
    let restarted_at = Instant::now();
    let old_leader = cluster.endpoint(leader);
    windows.push(Window {
        what: format!("killing the leader ({old_leader})"),
        from: killed_at,
        to: restarted_at,
    });
    cluster
        .wait_ready(&plain, Duration::from_secs(20))
        .await
        .expect("the old leader rejoins");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let leader = cluster.leader(&plain).await.expect("find the leader");
    let follower = (0..cluster.len())
        .find(|&i| i != leader)
        .expect("a follower");
    cluster.freeze(follower);
    let frozen_at = Instant::now();
    windows.push(Window {
        what: format!("restarting the old leader ({old_leader})"),
        from: restarted_at,
        to: frozen_at,
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.thaw(follower);
    let thawed_at = Instant::now();
    windows.push(Window {
        what: format!("freezing a follower ({})", cluster.endpoint(follower)),
        from: frozen_at,
        to: thawed_at,
    });
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let stopped_at = Instant::now();
    windows.push(Window {
        what: "letting the frozen follower run again".to_owned(),
        from: thawed_at,
        to: stopped_at,
    });
    stop.store(true, Ordering::SeqCst);
    let (writes, late_writes) = writer.finish().await;
    for task in lock_tasks {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("a lock worker stops")
            .expect("lock worker task");
    }

    let locks = acquisitions.lock().expect("acquisitions").clone();
    let mut too_long = Vec::new();
    for window in &windows {
        let (gap, failures, last_failure) = longest_gap(&writes, window);
        let (lock_gap, lock_failures, _) = longest_gap(&locks, window);
        eprintln!(
            "cluster: longest error gap {:.2} s after {} ({failures} failed store+get, the last \
             {:.2} s after it); lock: longest time without an acquisition {:.2} s \
             ({lock_failures} failed attempts)",
            gap.as_secs_f64(),
            window.what,
            last_failure.as_secs_f64(),
            lock_gap.as_secs_f64(),
        );
        if gap > MAX_GAP || lock_gap > MAX_GAP {
            too_long.push(format!(
                "after {}: store+get {gap:?}, lock {lock_gap:?}",
                window.what
            ));
        }
    }
    let total = writes.len();
    let failed = writes.iter().filter(|(_, ok)| !ok).count();
    eprintln!(
        "cluster: {failed} of {total} store+get attempts failed in all; {} timed-out stores \
         landed later",
        late_writes
    );
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two handles held the lock at once"
    );
    assert!(
        too_long.is_empty(),
        "longer than {MAX_GAP:?} without success: {too_long:?}"
    );

    // The watchers saw exactly etcd's history of the key.
    let mut raw = etcd_client::Client::connect(
        endpoints.split(',').collect::<Vec<_>>(),
        Some(plain.clone().with_timeout(Duration::from_secs(3))),
    )
    .await
    .expect("raw client");
    let full_key = format!("{prefix}k");
    let last_revision = raw
        .get(full_key.as_str(), None)
        .await
        .expect("raw get")
        .kvs()
        .first()
        .expect("the key exists")
        .mod_revision();
    let expected = history(&mut raw, &full_key, last_revision).await;
    let successful = writes.iter().filter(|(_, ok)| *ok).count();
    assert!(
        expected.len() >= successful,
        "etcd has {} puts but {successful} store+get succeeded",
        expected.len()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let streamed_len = streamed.lock().expect("streamed").len();
        let called_len = called.lock().expect("called").len();
        if (streamed_len >= expected.len() && called_len >= expected.len())
            || Instant::now() >= deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let streamed = streamed.lock().expect("streamed").clone();
    let called = called.lock().expect("called").clone();
    eprintln!(
        "cluster: etcd holds {} puts of the key; watch_stream saw {}, watch_with_cb saw {}",
        expected.len(),
        streamed.len(),
        called.len()
    );
    assert_history("watch_stream", &streamed, &expected);
    assert_history("watch_with_cb", &called, &expected);
    assert!(!stream_task.is_finished(), "watch_stream ended");
    assert!(!handle.is_finished(), "watch_with_cb ended");

    handle.cancel();
    stream_task.abort();
    for kv in [writer_kv, lockers[0].clone(), lockers[1].clone()] {
        let _ = tokio::time::timeout(Duration::from_secs(3), kv.close()).await;
    }
    drop(cluster);
}

fn assert_history(who: &str, seen: &[(String, i64)], expected: &[(String, i64)]) {
    if seen == expected {
        return;
    }
    let first_difference = seen
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(seen.len().min(expected.len()));
    panic!(
        "{who} differs from etcd's history at position {first_difference}: saw {:?}, etcd has {:?} \
         (saw {} events, etcd has {})",
        &seen[first_difference..(first_difference + 5).min(seen.len())],
        &expected[first_difference..(first_difference + 5).min(expected.len())],
        seen.len(),
        expected.len()
    );
}

/// Every put on `key` up to `last_revision`, from etcd's own history.
async fn history(
    client: &mut etcd_client::Client,
    key: &str,
    last_revision: i64,
) -> Vec<(String, i64)> {
    let mut stream = client
        .watch(key, Some(WatchOptions::new().with_start_revision(1)))
        .await
        .expect("raw watch for the history");
    let mut puts = Vec::new();
    loop {
        let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("raw watch answers")
            .expect("raw watch message")
            .expect("raw watch goes on");
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
}

/// With one member of three down for good (killed, or frozen as when cut off), requests fail
/// for at most [`MAX_GAP`] and then work again: none fails later than that after the fault.
async fn errors_stop_while_a_member_stays_down(bin: PathBuf) {
    let plain = ConnectOptions::new();
    let (mut cluster, prefix) = three_members(&bin).await;
    let kv = open(&cluster.endpoints(), &prefix).await;
    let writer = Writer::spawn(kv.clone(), Arc::new(AtomicBool::new(false)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stay_down = MAX_GAP + Duration::from_secs(3);

    let leader = cluster.leader(&plain).await.expect("find the leader");
    let follower = (0..cluster.len())
        .find(|&i| i != leader)
        .expect("a follower");
    cluster.kill(follower);
    let killed = Window {
        what: format!("killing a follower ({})", cluster.endpoint(follower)),
        from: Instant::now(),
        to: Instant::now() + stay_down,
    };
    tokio::time::sleep(stay_down).await;
    cluster.restart(follower).expect("restart the follower");
    cluster
        .wait_ready(&plain, Duration::from_secs(20))
        .await
        .expect("the follower rejoins");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let leader = cluster.leader(&plain).await.expect("find the leader");
    let follower = (0..cluster.len())
        .find(|&i| i != leader)
        .expect("a follower");
    cluster.freeze(follower);
    let frozen = Window {
        what: format!("freezing a follower ({})", cluster.endpoint(follower)),
        from: Instant::now(),
        to: Instant::now() + stay_down,
    };
    tokio::time::sleep(stay_down).await;
    cluster.thaw(follower);
    let (writes, _) = writer.finish().await;
    let _ = tokio::time::timeout(Duration::from_secs(3), kv.close()).await;

    let mut broken = Vec::new();
    for window in [killed, frozen] {
        let settled = window.from + MAX_GAP;
        let late: Vec<Duration> = writes
            .iter()
            .filter(|&&(at, ok)| !ok && at > settled && at <= window.to)
            .map(|&(at, _)| at - window.from)
            .collect();
        let during = writes
            .iter()
            .filter(|&&(at, _)| at > settled && at <= window.to)
            .count();
        eprintln!(
            "cluster: {} of {during} store+get failed later than {MAX_GAP:?} after {} (the last \
             {:.2} s after it)",
            late.len(),
            window.what,
            late.last().map_or(0.0, Duration::as_secs_f64)
        );
        if !late.is_empty() {
            broken.push(format!("{} failures after {}", late.len(), window.what));
        }
    }
    assert!(
        broken.is_empty(),
        "requests kept failing while a member stayed down: {broken:?}"
    );
}
