//! Watches and ranges of the etcd backend under faults: a reconnect past a compaction,
//! responses larger than gRPC's default 4 MiB, values and keys that are not UTF-8, keys too
//! large for etcd.
//!
//! Named `watch_faults::<backend>::<what it proves>`. The etcd tests run against a private
//! etcd that the harness starts (container or child process, as `HMETCD_ETCD_MODE` says;
//! never `HMETCD_TEST_ENDPOINTS`, because some tests compact the store). The handle under
//! test reaches etcd through a TCP proxy (`integration_tests::faults::proxy`) that cuts its
//! connections, while a raw etcd-client writes and compacts directly. Tests run one at a time
//! unless `--test-threads` says otherwise; every measured figure is printed to stderr.
//!
//! A child-process etcd gets a progress notification interval of [`PROGRESS_INTERVAL`]
//! (etcd's default is ten minutes) through its environment, for the test of watches that
//! progress notifications keep current; the harness hands ETCD_* variables to a container
//! etcd too.
//!
//! A global `metrics` debugging recorder counts what the handles report, so a test can check
//! a figure only the etcd backend has (`hmetcd_watch_reconnects_total`).

use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hmetcd_core::watch::WatchEnd;
use hmetcd_core::{Error, KeyChange, Kvi, WatchEvent, WatchStream};
use hmetcd_etcd::EtcdKvs;
use integration_tests::etcd_server::{raw_client, server_metric, EtcdServer};
use integration_tests::faults::proxy::FaultProxy;
use integration_tests::faults::runner::{run_fault_binary, EtcdTrials};
use integration_tests::TestStore;
use libtest_mimic::Trial;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;

/// The request timeout of the handles whose connection the tests cut.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the link stays cut.
const CUT: Duration = Duration::from_millis(700);
/// One mebibyte.
const MIB: usize = 1 << 20;
/// How often a child-process etcd sends watch progress notifications.
const PROGRESS_INTERVAL: &str = "1s";

fn main() -> ExitCode {
    // Read by a child-process etcd as --experimental-watch-progress-notify-interval (etcd
    // takes every flag from an ETCD_* variable too); set before any thread is started.
    std::env::set_var(
        "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL",
        PROGRESS_INTERVAL,
    );
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    if let Err(err) = recorder.install() {
        eprintln!("watch_faults: cannot install the metrics recorder: {err}");
        return ExitCode::FAILURE;
    }
    let _ = FIGURES.set(snapshotter);
    run_fault_binary("watch_faults", Vec::new(), etcd_trials)
}

/// The figures the handles of this process report (the recorder `main` installs).
static FIGURES: OnceLock<Snapshotter> = OnceLock::new();

/// How many times the etcd backend's watch streams were re-established since the last call
/// (the recorder's snapshots hand back what changed since the one before).
fn watch_reconnects() -> u64 {
    let Some(figures) = FIGURES.get() else {
        panic!("no metrics recorder installed");
    };
    figures
        .snapshot()
        .into_vec()
        .into_iter()
        .find_map(|(key, _, _, value)| {
            let wanted = key.kind() == MetricKind::Counter
                && key.key().name() == "hmetcd_watch_reconnects_total"
                && key
                    .key()
                    .labels()
                    .any(|label| label.key() == "backend" && label.value() == "etcd");
            match value {
                DebugValue::Counter(count) if wanted => Some(count),
                _ => None,
            }
        })
        .unwrap_or(0)
}

fn etcd_trials(server: &EtcdServer) -> Vec<Trial> {
    let mut trials = EtcdTrials::new("watch_faults", server);
    trials
        .add(
            "quiet_key_watch_resumes_after_reconnect_past_compaction",
            40,
            |e, s| Box::pin(quiet_key_resumes(e, s)),
        )
        .add(
            "key_put_while_watched_resumes_after_reconnect_past_compaction",
            40,
            |e, s| Box::pin(put_key_resumes(e, s)),
        )
        .add(
            "a_watch_given_up_before_etcd_confirms_it_is_cancelled_on_the_server",
            30,
            |e, s| Box::pin(abandoned_watch_cancelled(e, s)),
        )
        .add(
            "a_watch_stream_reconnects_at_a_measured_pace_while_the_member_is_down",
            30,
            |e, s| Box::pin(reconnect_pace(e, s)),
        )
        .add(
            "prefix_watch_that_saw_its_own_prefix_key_put_still_reports_compacted",
            40,
            |e, s| Box::pin(prefix_with_its_own_key_compacted(e, s)),
        )
        .add(
            "key_changed_at_the_first_revision_the_watch_had_not_seen_reports_compacted",
            40,
            |e, s| Box::pin(changed_at_next_compacted(e, s)),
        )
        .add(
            "absent_key_watch_behind_compaction_reports_compacted_and_why",
            40,
            |e, s| Box::pin(absent_key_compacted(e, s)),
        )
        .add(
            "prefix_watch_behind_compaction_reports_compacted",
            40,
            |e, s| Box::pin(prefix_compacted(e, s)),
        )
        .add(
            "watch_prefix_catches_up_6_mib_after_reconnect",
            45,
            |e, s| Box::pin(large_catch_up(e, s)),
        )
        .add("get_range_reads_5_mib", 40, |e, s| {
            Box::pin(large_range(e, s))
        })
        .add("small_get_range_takes_one_request", 40, |e, s| {
            Box::pin(small_range_speed(e, s))
        })
        .add("paged_get_range_is_one_snapshot", 50, |e, s| {
            Box::pin(paged_range_snapshot(e, s))
        })
        .add(
            "non_utf8_in_prefix_watch_is_an_err_item_then_events_go_on",
            30,
            |e, s| Box::pin(non_utf8_watch(e, s)),
        )
        .add(
            "store_of_a_2_mib_key_fails_with_a_short_message",
            30,
            |e, s| Box::pin(huge_key_message(e, s)),
        )
        .add(
            "prefix_watch_kept_current_by_progress_survives_compaction",
            40,
            |e, s| Box::pin(prefix_kept_current(e, s)),
        );
    trials.into_trials()
}

fn ok<T>(outcome: Result<T, String>) -> T {
    outcome.unwrap_or_else(|why| panic!("{why}"))
}

fn options(store: &TestStore) -> String {
    store.options(&format!(
        "request_timeout={}ms",
        REQUEST_TIMEOUT.as_millis()
    ))
}

/// A handle reaching etcd through a fresh proxy, and a raw client reaching it directly.
async fn behind_proxy(
    endpoints: &str,
    store: &TestStore,
) -> (FaultProxy, EtcdKvs, etcd_client::Client) {
    let proxy = ok(FaultProxy::start(endpoints).await);
    let kv = EtcdKvs::connect(proxy.endpoint(), &options(store))
        .await
        .expect("open a handle behind the proxy");
    let raw = ok(raw_client(endpoints).await);
    (proxy, kv, raw)
}

/// Writes `value` at `key` (under the case's prefix) directly; the revision of the write.
async fn raw_put(
    raw: &mut etcd_client::Client,
    store: &TestStore,
    key: impl AsRef<[u8]>,
    value: impl Into<Vec<u8>>,
) -> i64 {
    let mut stored = store.prefix().as_bytes().to_vec();
    stored.extend_from_slice(key.as_ref());
    let answer = raw
        .put(stored, value, None)
        .await
        .unwrap_or_else(|err| panic!("raw put: {err}"));
    answer.header().map(|h| h.revision()).unwrap_or_default()
}

/// Compacts the store up to its current revision; returns that revision.
async fn compact_now(raw: &mut etcd_client::Client) -> i64 {
    let status = raw.status().await.expect("raw status");
    let revision = status.header().map(|h| h.revision()).unwrap_or_default();
    raw.compact(revision, None).await.expect("raw compact");
    revision
}

/// Cuts the proxy, runs `meanwhile` (writes by others), then lets bytes flow again.
async fn cut_while(proxy: &FaultProxy, meanwhile: impl std::future::Future<Output = ()>) {
    proxy.cut();
    let cut = Instant::now();
    meanwhile.await;
    tokio::time::sleep(CUT.saturating_sub(cut.elapsed())).await;
    proxy.resume();
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

fn seen_values(seen: &Mutex<Vec<WatchEvent>>) -> Vec<String> {
    seen.lock()
        .map(|seen| {
            seen.iter()
                .map(|event| event.value().unwrap_or("<delete>").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn next_item(stream: &mut WatchStream, limit: Duration) -> hmetcd_core::Result<WatchEvent> {
    tokio::time::timeout(limit, stream.next())
        .await
        .unwrap_or_else(|_| panic!("nothing from the watch stream within {limit:?}"))
        .unwrap_or_else(|| panic!("the watch stream ended"))
}

async fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not so after {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A watched key that nobody changes, while the link is cut and the store compacted past the
/// watch's start: after the reconnect the watch goes on (no event of the key was missed) and
/// delivers the key's next change; so does a callback watcher.
async fn quiet_key_resumes(endpoints: String, store: TestStore) {
    let (proxy, kv, mut raw) = behind_proxy(&endpoints, &store).await;
    raw_put(&mut raw, &store, "quiet", "0").await;
    let mut stream = kv.watch_stream("quiet").await.expect("watch_stream");
    let (seen, callback) = recording_callback();
    let watcher = kv
        .watch_with_cb("quiet", KeyChange::Put, callback)
        .await
        .expect("watch_with_cb");
    let before = watch_reconnects();

    cut_while(&proxy, async {
        for i in 0..5 {
            raw_put(&mut raw, &store, format!("other/{i}"), "x").await;
        }
        let compacted = compact_now(&mut raw).await;
        eprintln!("watch_faults: compacted to revision {compacted} while the link was cut");
    })
    .await;
    let resumed = Instant::now();
    // Time for the watch stream to come back (reconnects back off up to 2 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !watcher.is_finished(),
        "the callback watcher of a quiet key ended after the reconnect: {:?}",
        watcher.finish_reason()
    );
    let revision = raw_put(&mut raw, &store, "quiet", "1").await;
    match next_item(&mut stream, Duration::from_secs(10)).await {
        Ok(event) => {
            assert_eq!(event.value(), Some("1"), "{event:?}");
            assert_eq!(event.revision(), revision, "{event:?}");
        }
        Err(err) => panic!("a quiet key's watch failed after a reconnect: {err}"),
    }
    wait_until(
        Duration::from_secs(5),
        "the callback to see the put",
        || seen_values(&seen) == ["1"],
    )
    .await;
    let reconnects = watch_reconnects();
    eprintln!(
        "watch_faults: the quiet key's put arrived {} ms after the link came back; \
         hmetcd_watch_reconnects_total went up by {reconnects} (by {before} before the cut)",
        resumed.elapsed().as_millis()
    );
    assert!(reconnects >= 1, "the reconnect was not counted");
    kv.close().await.expect("close");
}

/// A watched key that was absent when the watch began and has been put since (the watch
/// delivered the put), then left alone while the link is cut and the store compacted past the
/// watch's next revision: the watch knows the key is present, so a read proves nothing was
/// missed, and it goes on to deliver the key's next change instead of failing with
/// `Compacted`.
async fn put_key_resumes(endpoints: String, store: TestStore) {
    let (proxy, kv, mut raw) = behind_proxy(&endpoints, &store).await;
    let mut stream = kv.watch_stream("late").await.expect("watch_stream");
    let first = raw_put(&mut raw, &store, "late", "1").await;
    match next_item(&mut stream, Duration::from_secs(10)).await {
        Ok(event) => assert_eq!((event.value(), event.revision()), (Some("1"), first)),
        Err(err) => panic!("the watch of an absent key failed at its first put: {err}"),
    }
    cut_while(&proxy, async {
        for i in 0..3 {
            raw_put(&mut raw, &store, format!("other/{i}"), "x").await;
        }
        compact_now(&mut raw).await;
    })
    .await;
    // Time for the watch stream to come back (reconnects back off up to 2 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = raw_put(&mut raw, &store, "late", "2").await;
    match next_item(&mut stream, Duration::from_secs(10)).await {
        Ok(event) => assert_eq!((event.value(), event.revision()), (Some("2"), second)),
        Err(err) => panic!(
            "the watch of a key it saw put failed after a reconnect past a compaction \
             although the key did not change: {err}"
        ),
    }
    kv.close().await.expect("close");
}

/// etcd's gauge of the watchers it keeps, over all its watch streams.
const ETCD_WATCHERS: &str = "etcd_debugging_mvcc_watcher_total";

/// Watches whose callers gave up (their futures dropped) after the create requests were sent
/// but before etcd's confirmations came back, on a link frozen in between: when the
/// confirmations arrive, the handle cancels those watches, so etcd keeps no watcher (and
/// sends no events) for a watch nobody reads. etcd's own watcher gauge comes back to where it
/// was.
async fn abandoned_watch_cancelled(endpoints: String, store: TestStore) {
    let (proxy, kv, mut raw) = behind_proxy(&endpoints, &store).await;
    let revision = raw_put(&mut raw, &store, "abandoned/0", "x").await;
    // The handle's watch stream is open before the freeze, so the creates go out on it.
    let anchor = kv
        .watch_prefix_from("anchor/", revision)
        .await
        .expect("watch_prefix_from");
    let before = ok(server_metric(&endpoints, ETCD_WATCHERS).await);
    proxy.freeze();
    for i in 0..3 {
        let prefix = format!("abandoned/{i}");
        let given_up = tokio::time::timeout(
            Duration::from_millis(200),
            kv.watch_prefix_from(&prefix, revision),
        )
        .await;
        assert!(
            given_up.is_err(),
            "a watch was confirmed through a frozen link"
        );
    }
    proxy.resume();
    // etcd answers creates in order: once a later watch is confirmed, the three given up have
    // been confirmed and handled before it.
    let later = kv
        .watch_prefix_from("later/", revision)
        .await
        .expect("a watch after the link came back");
    drop(later);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = ok(server_metric(&endpoints, ETCD_WATCHERS).await);
        if now <= before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "etcd keeps {} more watchers than before the watches given up (3) and the later \
             one: they were never cancelled",
            now - before
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(anchor);
    kv.close().await.expect("close");
}

/// How long the member stays down in [`reconnect_pace`].
const DOWN: Duration = Duration::from_secs(3);
/// The most connections one handle with one watch may open in [`DOWN`] while every attempt
/// is refused at once. Its watch stream backs off (doubling pauses up to 2 s); so do its
/// lease's keep-alives. A client that retried without pausing would open thousands.
const MOST_ATTEMPTS_WHILE_DOWN: u64 = 40;

/// A member that is down (every connection closed as soon as it is opened) for [`DOWN`]: the
/// handle's watch stream tries again at a measured pace, not in a tight loop, and once the
/// member is back the watch reconnects and delivers the next change.
async fn reconnect_pace(endpoints: String, store: TestStore) {
    let (proxy, kv, mut raw) = behind_proxy(&endpoints, &store).await;
    let mut stream = kv.watch_stream("paced").await.expect("watch_stream");
    let before = proxy.connections();
    proxy.refuse();
    tokio::time::sleep(DOWN).await;
    let attempts = proxy.connections() - before;
    proxy.resume();
    eprintln!(
        "watch_faults: the handle opened {attempts} connections in {} s of a member refusing them",
        DOWN.as_secs()
    );
    assert!(
        attempts <= MOST_ATTEMPTS_WHILE_DOWN,
        "{attempts} connection attempts in {DOWN:?} of a member that is down: no backoff"
    );
    assert!(
        attempts >= 1,
        "the watch stream never noticed the member was down"
    );
    let revision = raw_put(&mut raw, &store, "paced", "1").await;
    match next_item(&mut stream, Duration::from_secs(10)).await {
        Ok(event) => assert_eq!((event.value(), event.revision()), (Some("1"), revision)),
        Err(err) => panic!("the watch failed after the member came back: {err}"),
    }
    kv.close().await.expect("close");
}

/// A prefix watch whose last event put the key named exactly as the prefix, behind a
/// compaction that hides the put of another key under the prefix: that one key's read proves
/// nothing about the others, so the watch reports `Compacted` rather than resuming past the
/// lost put.
async fn prefix_with_its_own_key_compacted(endpoints: String, store: TestStore) {
    let (proxy, kv, mut raw) = behind_proxy(&endpoints, &store).await;
    let mut stream = kv.watch_prefix("p3/").await.expect("watch_prefix");
    let own = raw_put(&mut raw, &store, "p3/", "the prefix key").await;
    match next_item(&mut stream, Duration::from_secs(10)).await {
        Ok(event) => assert_eq!((event.key(), event.revision()), ("p3/", own)),
        Err(err) => panic!("the prefix watch failed at its first put: {err}"),
    }
    cut_while(&proxy, async {
        raw_put(&mut raw, &store, "p3/other", "lost to compaction").await;
        raw_put(&mut raw, &store, "elsewhere", "x").await;
        compact_now(&mut raw).await;
    })
    .await;
    match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        Ok(Some(Err(Error::Compacted { key, .. }))) => assert_eq!(key, "p3/"),
        Ok(other) => panic!("expected Compacted, got {other:?}"),
        Err(_) => panic!(
            "the prefix watch resumed past a compaction that hid the put of p3/other, \
             reporting nothing"
        ),
    }
    kv.close().await.expect("close");
}

/// A watched key changed while the link is cut, by the very first write after the last
/// revision the watch had seen, then the store compacted past it: the read after the reconnect
/// finds the key changed at the first revision the watch still needed, so the watch reports
/// `Compacted` rather than resuming past the change.
async fn changed_at_next_compacted(endpoints: String, store: TestStore) {
    let (proxy, kv, mut raw) = behind_proxy(&endpoints, &store).await;
    raw_put(&mut raw, &store, "edge", "0").await;
    let mut stream = kv.watch_stream("edge").await.expect("watch_stream");
    let mut changed = 0;
    cut_while(&proxy, async {
        // Nobody else writes to this store: this put takes the revision right after the
        // watch's start.
        changed = raw_put(&mut raw, &store, "edge", "1").await;
        raw_put(&mut raw, &store, "elsewhere", "x").await;
        compact_now(&mut raw).await;
    })
    .await;
    match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        Ok(Some(Err(Error::Compacted { key, revision, .. }))) => {
            assert_eq!(key, "edge");
            assert_eq!(revision, changed, "the first revision the watch needed");
        }
        Ok(other) => panic!("expected Compacted, got {other:?}"),
        Err(_) => panic!(
            "the watch resumed past a compaction that hid the change of its key at revision \
             {changed}, reporting nothing"
        ),
    }
    kv.close().await.expect("close");
}

/// A watched key that is absent, put and deleted while the link is cut, and the store
/// compacted past both: the stream reports `Compacted` (the put and delete are gone from
/// history), and the callback watcher ends saying so.
async fn absent_key_compacted(endpoints: String, store: TestStore) {
    let (proxy, kv, mut raw) = behind_proxy(&endpoints, &store).await;
    let mut stream = kv.watch_stream("gone").await.expect("watch_stream");
    let watcher = kv
        .watch_with_cb("gone", KeyChange::Put, Box::new(|_: &WatchEvent| true))
        .await
        .expect("watch_with_cb");
    assert!(watcher.finish_reason().is_none(), "a running watcher");

    cut_while(&proxy, async {
        raw_put(&mut raw, &store, "gone", "briefly").await;
        raw.delete(format!("{}gone", store.prefix()), None)
            .await
            .expect("raw delete");
        compact_now(&mut raw).await;
    })
    .await;
    let resumed = Instant::now();
    match next_item(&mut stream, Duration::from_secs(10)).await {
        Err(Error::Compacted { key, .. }) => assert_eq!(key, "gone"),
        other => panic!("expected Compacted, got {other:?}"),
    }
    wait_until(
        Duration::from_secs(10),
        "the callback watcher to end",
        || watcher.is_finished(),
    )
    .await;
    match watcher.finish_reason() {
        Some(WatchEnd::Failed(err)) => {
            assert!(matches!(*err, Error::Compacted { .. }), "{err}")
        }
        other => panic!("the callback watcher should end with Compacted, got {other:?}"),
    }
    eprintln!(
        "watch_faults: the absent key's watch reported Compacted {} ms after the link came back",
        resumed.elapsed().as_millis()
    );
    kv.close().await.expect("close");
}

/// A prefix watch behind a compaction cannot prove that nothing under the prefix changed:
/// it reports `Compacted`, even when nothing did.
async fn prefix_compacted(endpoints: String, store: TestStore) {
    let (proxy, kv, mut raw) = behind_proxy(&endpoints, &store).await;
    let mut stream = kv.watch_prefix("p/").await.expect("watch_prefix");
    cut_while(&proxy, async {
        // Two writes: compacting at revision r keeps r, so a watch from the first survives.
        raw_put(&mut raw, &store, "elsewhere", "x").await;
        raw_put(&mut raw, &store, "elsewhere", "y").await;
        compact_now(&mut raw).await;
    })
    .await;
    match next_item(&mut stream, Duration::from_secs(10)).await {
        Err(Error::Compacted { key, .. }) => assert_eq!(key, "p/"),
        other => panic!("expected Compacted, got {other:?}"),
    }
    kv.close().await.expect("close");
}

/// A quiet prefix watch that progress notifications have moved on to the store's current
/// revision, behind a compaction of everything before it: it resumes without `Compacted`
/// and delivers the next change.
async fn prefix_kept_current(endpoints: String, store: TestStore) {
    let (proxy, kv, mut raw) = behind_proxy(&endpoints, &store).await;
    let mut stream = kv.watch_prefix("p2/").await.expect("watch_prefix");
    // Writes elsewhere move the store on; the notifications (every second) move the watch on.
    for i in 0..3 {
        raw_put(&mut raw, &store, format!("elsewhere/{i}"), "x").await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    cut_while(&proxy, async {
        compact_now(&mut raw).await;
    })
    .await;
    let revision = raw_put(&mut raw, &store, "p2/k", "1").await;
    match next_item(&mut stream, Duration::from_secs(10)).await {
        Ok(event) => assert_eq!(
            (event.key(), event.value(), event.revision()),
            ("p2/k", Some("1"), revision)
        ),
        Err(err) => panic!("a prefix watch kept current by progress notifications: {err}"),
    }
    kv.close().await.expect("close");
}

/// Six 1 MiB puts under a watched prefix while the link is cut: etcd sends them back as one
/// response of over 6 MiB on the reconnect. All six arrive, and later small puts too.
async fn large_catch_up(endpoints: String, store: TestStore) {
    let (proxy, kv, mut raw) = behind_proxy(&endpoints, &store).await;
    let mut stream = kv.watch_prefix("k/").await.expect("watch_prefix");
    let big = "x".repeat(MIB);
    cut_while(&proxy, async {
        for i in 0..6 {
            raw_put(&mut raw, &store, format!("k/{i}"), big.clone()).await;
        }
    })
    .await;
    let resumed = Instant::now();
    for i in 0..6 {
        let event = next_item(&mut stream, Duration::from_secs(20))
            .await
            .unwrap_or_else(|err| panic!("event {i} of 6: {err}"));
        assert_eq!(event.key(), format!("k/{i}"));
        assert_eq!(event.value().map(str::len), Some(MIB));
    }
    let caught_up = resumed.elapsed();
    raw_put(&mut raw, &store, "k/small", "s").await;
    let event = next_item(&mut stream, Duration::from_secs(5))
        .await
        .expect("the small put after the catch-up");
    assert_eq!((event.key(), event.value()), ("k/small", Some("s")));
    eprintln!(
        "watch_faults: 6 x 1 MiB caught up {} ms after the link came back",
        caught_up.as_millis()
    );
    kv.close().await.expect("close");
}

/// `get_range` over five 1 MiB values (over gRPC's default 4 MiB per message).
async fn large_range(endpoints: String, store: TestStore) {
    let mut raw = ok(raw_client(&endpoints).await);
    let kv = store.open().await;
    let big = "y".repeat(MIB);
    for i in 0..5 {
        raw_put(&mut raw, &store, format!("r/{i}"), big.clone()).await;
    }
    let started = Instant::now();
    let found = kv
        .get_range("r/", "r/~")
        .await
        .expect("get_range over 5 MiB");
    let took = started.elapsed();
    let keys: Vec<&str> = found.iter().map(|pair| pair.key.as_str()).collect();
    assert_eq!(keys, ["r/0", "r/1", "r/2", "r/3", "r/4"]);
    assert!(found.iter().all(|pair| pair.value.len() == MIB));
    eprintln!(
        "watch_faults: get_range of 5 x 1 MiB took {} ms",
        took.as_millis()
    );
    kv.close().await.expect("close");
}

/// A range of 100 small keys is read in one request, as fast as etcd-client's single get:
/// paging costs small ranges nothing.
async fn small_range_speed(endpoints: String, store: TestStore) {
    let mut raw = ok(raw_client(&endpoints).await);
    let kv = store.open().await;
    let ops: Vec<etcd_client::TxnOp> = (0..100)
        .map(|i| etcd_client::TxnOp::put(format!("{}q/{i:03}", store.prefix()), "v", None))
        .collect();
    raw.txn(etcd_client::Txn::new().and_then(ops))
        .await
        .expect("raw txn of 100 keys");
    const READS: u32 = 300;
    let started = Instant::now();
    for _ in 0..READS {
        let found = kv.get_range("q/000", "q/099").await.expect("get_range");
        assert_eq!(found.len(), 100);
    }
    let ours = started.elapsed() / READS;
    let (start, end) = (
        format!("{}q/000", store.prefix()),
        format!("{}q/099\0", store.prefix()),
    );
    let started = Instant::now();
    for _ in 0..READS {
        let options = etcd_client::GetOptions::new().with_range(end.as_str());
        let found = raw
            .get(start.as_str(), Some(options))
            .await
            .expect("raw get");
        assert_eq!(found.kvs().len(), 100);
    }
    let theirs = started.elapsed() / READS;
    eprintln!(
        "watch_faults: get_range of 100 small keys: {} µs per call; etcd-client's get: {} µs",
        ours.as_micros(),
        theirs.as_micros()
    );
    // Two requests per call would double it; scheduling noise on a shared machine stays below.
    assert!(
        ours < theirs * 2,
        "get_range {ours:?} per call against etcd-client's {theirs:?}"
    );
    kv.close().await.expect("close");
}

/// A range too large for one page is still one snapshot: a writer changes its first and last
/// key together in one transaction, over and over, and every read sees them equal.
async fn paged_range_snapshot(endpoints: String, store: TestStore) {
    let mut raw = ok(raw_client(&endpoints).await);
    let kv = store.open().await;
    // 1,500 keys of 8 KiB between the two: more than one page by count and by size.
    let filler = "f".repeat(8 << 10);
    for chunk in (0..1500).collect::<Vec<u32>>().chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| {
                etcd_client::TxnOp::put(
                    format!("{}s/m{i:05}", store.prefix()),
                    filler.clone(),
                    None,
                )
            })
            .collect();
        raw.txn(etcd_client::Txn::new().and_then(ops))
            .await
            .expect("raw txn of filler keys");
    }
    let (first, last) = (
        format!("{}s/a", store.prefix()),
        format!("{}s/z", store.prefix()),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (mut raw, stop) = (raw.clone(), stop.clone());
        tokio::spawn(async move {
            let mut generation = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                generation += 1;
                let value = generation.to_string();
                let txn = etcd_client::Txn::new().and_then([
                    etcd_client::TxnOp::put(first.as_str(), value.as_str(), None),
                    etcd_client::TxnOp::put(last.as_str(), value.as_str(), None),
                ]);
                if let Err(err) = raw.txn(txn).await {
                    panic!("writer txn: {err}");
                }
            }
            generation
        })
    };
    // The writer is under way.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut took = Vec::new();
    for read in 0..5 {
        let started = Instant::now();
        let found = kv.get_range("s/", "s/~").await.expect("paged get_range");
        took.push(started.elapsed().as_millis());
        assert_eq!(found.len(), 1502, "read {read}");
        let (a, z) = (&found[0], &found[1501]);
        assert_eq!((a.key.as_str(), z.key.as_str()), ("s/a", "s/z"));
        assert_eq!(
            a.value, z.value,
            "read {read} mixed two revisions: s/a and s/z were written together"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let generations = writer.await.expect("writer");
    eprintln!(
        "watch_faults: 5 reads of 1,502 keys (12 MiB) took {took:?} ms while {generations} transactions ran"
    );
    kv.close().await.expect("close");
}

/// A value and a key that are not UTF-8, written by another client under a watched prefix:
/// the stream yields one `Err(InvalidUtf8)` item for each, naming the key, and goes on with
/// the next event. A callback watcher of the key with the bad value ends with the error.
async fn non_utf8_watch(endpoints: String, store: TestStore) {
    let mut raw = ok(raw_client(&endpoints).await);
    let kv = store.open().await;
    let mut stream = kv.watch_prefix("u/").await.expect("watch_prefix");
    let watcher = kv
        .watch_with_cb("u/bad", KeyChange::Put, Box::new(|_: &WatchEvent| true))
        .await
        .expect("watch_with_cb");
    raw_put(&mut raw, &store, "u/bad", vec![0xff_u8, 0xfe]).await;
    raw_put(&mut raw, &store, b"u/\xff\xfe", "v").await;
    kv.store("u/good", "ok").await.expect("store");

    match next_item(&mut stream, Duration::from_secs(5)).await {
        Err(Error::InvalidUtf8 { key, .. }) => assert_eq!(key, "u/bad"),
        other => panic!("expected InvalidUtf8 for u/bad, got {other:?}"),
    }
    match next_item(&mut stream, Duration::from_secs(5)).await {
        Err(Error::InvalidUtf8 { key, .. }) => assert!(key.starts_with("u/"), "{key}"),
        other => panic!("expected InvalidUtf8 for the bad key, got {other:?}"),
    }
    let event = next_item(&mut stream, Duration::from_secs(5))
        .await
        .expect("the stream goes on after InvalidUtf8 items");
    assert_eq!((event.key(), event.value()), ("u/good", Some("ok")));

    wait_until(
        Duration::from_secs(5),
        "the callback watcher to end",
        || watcher.is_finished(),
    )
    .await;
    match watcher.finish_reason() {
        Some(WatchEnd::Failed(err)) => {
            assert!(
                matches!(&*err, Error::InvalidUtf8 { key, .. } if key == "u/bad"),
                "{err}"
            )
        }
        other => panic!("expected the callback watcher to end with InvalidUtf8, got {other:?}"),
    }
    // A whole range still fails, naming the key.
    let err = kv.get_range("u/", "u/~").await.expect_err("range over u/");
    assert!(matches!(err, Error::InvalidUtf8 { .. }), "{err}");
    kv.close().await.expect("close");
}

/// etcd refuses a 2 MiB key (its request size limit); the error names the key in a few
/// hundred characters, with its length.
async fn huge_key_message(_endpoints: String, store: TestStore) {
    let kv = store.open().await;
    let key = "k".repeat(2 * MIB);
    let err = kv
        .store(&key, "v")
        .await
        .expect_err("etcd refuses a 2 MiB key");
    let shown = err.to_string();
    eprintln!("watch_faults: the 2 MiB key's error: {shown}");
    assert!(shown.len() < 1000, "{} bytes of error text", shown.len());
    assert!(shown.contains("2097152 bytes"), "{shown}");
    kv.close().await.expect("close");
}
