//! The figures of the `instrument` module's table, through the `metrics` facade's debugging
//! recorder (feature `metrics`; the workspace test run turns it on).

use std::time::Duration;

use futures::StreamExt;
use hmetcd::{Kvi, MemKvs};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};

fn value(
    snapshot: &[(
        CompositeKey,
        Option<metrics::Unit>,
        Option<metrics::SharedString>,
        DebugValue,
    )],
    kind: MetricKind,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<DebugValue> {
    snapshot.iter().find_map(|(key, _, _, value)| {
        let matches = key.kind() == kind
            && key.key().name() == name
            && labels.iter().all(|(label, wanted)| {
                key.key()
                    .labels()
                    .any(|l| l.key() == *label && l.value() == *wanted)
            });
        matches.then(|| match value {
            DebugValue::Counter(n) => DebugValue::Counter(*n),
            DebugValue::Gauge(g) => DebugValue::Gauge(*g),
            DebugValue::Histogram(samples) => DebugValue::Histogram(samples.clone()),
        })
    })
}

fn snapshot(
    snapshotter: &Snapshotter,
) -> Vec<(
    CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)> {
    snapshotter.snapshot().into_vec()
}

type Seen = Vec<(
    CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

fn counter(seen: &Seen, name: &str, labels: &[(&str, &str)]) -> u64 {
    match value(seen, MetricKind::Counter, name, labels) {
        Some(DebugValue::Counter(n)) => n,
        other => panic!("{name} {labels:?}: {other:?}"),
    }
}

/// Samples of the histogram `name` over all its label sets.
fn samples(seen: &Seen, name: &str) -> usize {
    seen.iter()
        .filter(|(key, ..)| key.kind() == MetricKind::Histogram && key.key().name() == name)
        .map(|(.., value)| match value {
            DebugValue::Histogram(samples) => samples.len(),
            _ => 0,
        })
        .sum()
}

fn watchers_gauge(seen: &Seen) -> Option<DebugValue> {
    value(
        seen,
        MetricKind::Gauge,
        "hmetcd_watchers_open",
        &[("backend", "mem")],
    )
}

/// A current-thread runtime: a local recorder is seen only on its own thread.
fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => panic!("runtime: {err}"),
    }
}

/// The debugging recorder's snapshots hold what changed since the one before.
#[test]
fn calls_locks_leases_and_watchers_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = runtime();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let kv = MemKvs::new();
            kv.store("a", "1").await.ok();
            kv.store("", "1").await.ok();
            let mut watch = kv.watch_prefix("a").await.ok();
            let guard = kv.lock("jobs").await.ok();
            let opened = snapshot(&snapshotter);
            assert_eq!(
                counter(
                    &opened,
                    "hmetcd_calls_total",
                    &[("operation", "store"), ("outcome", "ok")]
                ),
                1
            );
            assert_eq!(
                counter(
                    &opened,
                    "hmetcd_calls_total",
                    &[("operation", "store"), ("outcome", "invalid_key")]
                ),
                1
            );
            assert_eq!(watchers_gauge(&opened), Some(DebugValue::Gauge(1.0.into())));
            assert_eq!(samples(&opened, "hmetcd_lock_wait_seconds"), 1);
            assert_eq!(samples(&opened, "hmetcd_lock_hold_seconds"), 0);
            assert!(samples(&opened, "hmetcd_call_duration_seconds") >= 3);
            tokio::time::sleep(Duration::from_millis(5)).await;
            drop(guard);
            kv.store("a", "2").await.ok();
            if let Some(watch) = watch.as_mut() {
                watch.next().await;
            }
            drop(watch);
            kv.faults().expire_lease();
            kv.close().await.ok();
        })
    });
    let seen = snapshot(&snapshotter);
    assert_eq!(
        counter(
            &seen,
            "hmetcd_calls_total",
            &[("operation", "store"), ("outcome", "ok")]
        ),
        1
    );
    assert_eq!(
        counter(&seen, "hmetcd_leases_lost_total", &[("backend", "mem")]),
        1
    );
    assert_eq!(samples(&seen, "hmetcd_lock_hold_seconds"), 1);
    assert_eq!(samples(&seen, "hmetcd_watch_delivery_lag_seconds"), 1);
    // Down by the one watcher that was open.
    assert_eq!(
        watchers_gauge(&seen),
        Some(DebugValue::Gauge((-1.0).into()))
    );
}

/// Calls made while no recorder is installed cost no clock reads and are not counted; a recorder
/// installed afterwards counts the calls from then on.
#[test]
fn a_recorder_installed_later_counts_the_calls_after_it() {
    let runtime = runtime();
    let kv = MemKvs::new();
    runtime.block_on(async {
        kv.store("a", "1").await.ok();
        kv.get("a").await.ok();
    });
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            kv.get("a").await.ok();
        })
    });
    let seen = snapshot(&snapshotter);
    assert_eq!(
        counter(
            &seen,
            "hmetcd_calls_total",
            &[("operation", "get"), ("outcome", "ok")]
        ),
        1
    );
    assert!(value(
        &seen,
        MetricKind::Counter,
        "hmetcd_calls_total",
        &[("operation", "store")]
    )
    .is_none());
    assert_eq!(samples(&seen, "hmetcd_call_duration_seconds"), 1);
}
