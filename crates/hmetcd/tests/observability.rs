//! What an operator sees: one `hmetcd` span per call with its operation, key, backend and
//! outcome. (The figures of the `metrics` feature are checked in `tests/metrics.rs`: a test
//! binary of its own, since spans are checked here with a thread-local subscriber.)

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
