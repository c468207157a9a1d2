//! What an operator sees: one `hmetcd` span per call with its operation, key, backend and
//! outcome, and (feature `metrics`) the figures of the `instrument` module's table, checked
//! with the metrics facade's debugging recorder.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use hmetcd::{Kvi, MemKvs, Op, Txn};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

type Fields = BTreeMap<String, String>;

/// Collects the fields of every closed `hmetcd` span.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<Fields>>>);

struct Collect<'a>(&'a mut Fields);

impl Visit for Collect<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().target() != "hmetcd" {
            return;
        }
        let mut fields = Fields::new();
        attrs.record(&mut Collect(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<Fields>() {
                values.record(&mut Collect(fields));
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            if let Some(fields) = span.extensions_mut().remove::<Fields>() {
                self.0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(fields);
            }
        }
    }
}

impl Spans {
    fn taken(&self) -> Vec<Fields> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

fn field<'a>(span: &'a Fields, name: &str) -> &'a str {
    span.get(name).map_or("", String::as_str)
}

#[tokio::test(flavor = "current_thread")]
async fn every_call_is_one_span_with_its_outcome() {
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    let kv = MemKvs::new();
    kv.store("nodes/a", "up").await.ok();
    assert_eq!(
        kv.get("nodes/a").await.ok().flatten().as_deref(),
        Some("up")
    );
    assert!(kv.store("", "v").await.is_err());
    let long = "k".repeat(300);
    kv.get(&long).await.ok();
    kv.txn(Txn::new().then(Op::put("nodes/b", "up"))).await.ok();
    kv.close().await.ok();
    assert!(kv.get("nodes/a").await.is_err());

    let seen = spans.taken();
    let calls: Vec<(&str, &str, &str, &str)> = seen
        .iter()
        .map(|span| {
            (
                field(span, "operation"),
                field(span, "key"),
                field(span, "backend"),
                field(span, "outcome"),
            )
        })
        .collect();
    let cut = "k".repeat(100);
    assert_eq!(
        calls,
        [
            ("store", "nodes/a", "mem", "ok"),
            ("get", "nodes/a", "mem", "ok"),
            ("store", "", "mem", "invalid_key"),
            ("get", cut.as_str(), "mem", "ok"),
            ("txn", "nodes/b", "mem", "ok"),
            ("close", "", "mem", "ok"),
            ("get", "nodes/a", "mem", "closed"),
        ]
    );
}

#[cfg(feature = "metrics")]
mod figures {
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

    #[test]
    fn calls_locks_leases_and_watchers_are_counted() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(err) => panic!("runtime: {err}"),
        };
        metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let kv = MemKvs::new();
                kv.store("a", "1").await.ok();
                kv.store("", "1").await.ok();
                let mut watch = kv.watch_prefix("a").await.ok();
                let guard = kv.lock("jobs").await.ok();
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(guard);
                kv.store("a", "2").await.ok();
                if let Some(watch) = watch.as_mut() {
                    watch.next().await;
                }
                let opened = snapshot(&snapshotter);
                assert_eq!(
                    value(
                        &opened,
                        MetricKind::Gauge,
                        "hmetcd_watchers_open",
                        &[("backend", "mem")]
                    ),
                    Some(DebugValue::Gauge(1.0.into()))
                );
                drop(watch);
                kv.faults().expire_lease();
                kv.close().await.ok();
            })
        });
        let seen = snapshot(&snapshotter);
        let counter = |name: &str, labels: &[(&str, &str)]| match value(
            &seen,
            MetricKind::Counter,
            name,
            labels,
        ) {
            Some(DebugValue::Counter(n)) => n,
            other => panic!("{name} {labels:?}: {other:?}"),
        };
        assert_eq!(
            counter(
                "hmetcd_calls_total",
                &[("operation", "store"), ("outcome", "ok")]
            ),
            2
        );
        assert_eq!(
            counter(
                "hmetcd_calls_total",
                &[("operation", "store"), ("outcome", "invalid_key")]
            ),
            1
        );
        assert_eq!(
            counter("hmetcd_leases_lost_total", &[("backend", "mem")]),
            1
        );
        let histogram =
            |name: &str| match value(&seen, MetricKind::Histogram, name, &[("backend", "mem")]) {
                Some(DebugValue::Histogram(samples)) => samples.len(),
                other => panic!("{name}: {other:?}"),
            };
        assert!(histogram("hmetcd_call_duration_seconds") >= 3);
        assert_eq!(histogram("hmetcd_lock_wait_seconds"), 1);
        assert_eq!(histogram("hmetcd_lock_hold_seconds"), 1);
        assert_eq!(histogram("hmetcd_watch_delivery_lag_seconds"), 1);
        assert_eq!(
            value(
                &seen,
                MetricKind::Gauge,
                "hmetcd_watchers_open",
                &[("backend", "mem")]
            ),
            Some(DebugValue::Gauge(0.0.into()))
        );
    }
}
