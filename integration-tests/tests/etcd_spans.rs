//! What an operator sees of the etcd backend: one `hmetcd` span per call with its operation,
//! key, backend `etcd`, the endpoints and the outcome. A binary of its own: it installs a
//! tracing subscriber for the whole process.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hmetcd_core::{Kvi, Op, Txn};
use integration_tests::backends;
use integration_tests::run_limited;
use libtest_mimic::{Arguments, Trial};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

type Fields = BTreeMap<String, String>;

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

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let server = match backends::etcd_server_or_exit("etcd_spans", &args) {
        Ok(server) => server,
        Err(exit) => return exit,
    };
    let endpoints = server.endpoints().to_owned();
    let spans = Spans::default();
    if let Err(err) =
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone()))
    {
        eprintln!("etcd_spans: cannot install the subscriber: {err}");
        return ExitCode::FAILURE;
    }
    let trial = Trial::test(
        format!(
            "etcd-{}::spans::every_call_is_one_span_with_its_outcome",
            server.version()
        ),
        move || {
            run_limited(2, Duration::from_secs(60), async move {
                let kv = match hmetcd_etcd::EtcdKvs::connect(&endpoints, "prefix=etcd-spans/").await
                {
                    Ok(kv) => kv,
                    Err(err) => panic!("connect: {err}"),
                };
                spans
                    .0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clear();
                kv.store("nodes/a", "up").await.ok();
                kv.get("nodes/a").await.ok();
                assert!(kv.store("", "v").await.is_err());
                kv.txn(Txn::new().then(Op::put("nodes/b", "up"))).await.ok();
                kv.close().await.ok();
                assert!(kv.get("nodes/a").await.is_err());
                let seen =
                    std::mem::take(&mut *spans.0.lock().unwrap_or_else(PoisonError::into_inner));
                let field = |span: &Fields, name: &str| span.get(name).cloned().unwrap_or_default();
                let calls: Vec<(String, String, String, String)> = seen
                    .iter()
                    .map(|span| {
                        assert_eq!(field(span, "endpoint"), endpoints, "{span:?}");
                        (
                            field(span, "operation"),
                            field(span, "key"),
                            field(span, "backend"),
                            field(span, "outcome"),
                        )
                    })
                    .collect();
                let expected: Vec<(String, String, String, String)> = [
                    ("store", "nodes/a", "etcd", "ok"),
                    ("get", "nodes/a", "etcd", "ok"),
                    ("store", "", "etcd", "invalid_key"),
                    ("txn", "nodes/b", "etcd", "ok"),
                    ("close", "", "etcd", "ok"),
                    ("get", "nodes/a", "etcd", "closed"),
                ]
                .iter()
                .map(|(a, b, c, d)| ((*a).into(), (*b).into(), (*c).into(), (*d).into()))
                .collect();
                assert_eq!(calls, expected);
            })
        },
    );
    let code = libtest_mimic::run(&args, vec![trial]).exit_code();
    drop(server);
    code
}
