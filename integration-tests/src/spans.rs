//! What an operator sees, captured for tests: the fields of every closed `hmetcd` span, and
//! every event of hmetcd's crates with its level. Install [`Captured`] as a layer of a
//! `tracing_subscriber` registry (for a thread, or for the process).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hmetcd_core::{Kvi, Op, Txn};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// A span's or an event's fields by name, as text (an event's text is its `message`).
pub type Fields = BTreeMap<String, String>;

/// One event: its level and fields.
#[derive(Debug, Clone)]
pub struct CapturedEvent {
    /// The event's level.
    pub level: Level,
    /// Its fields, `message` included.
    pub fields: Fields,
}

impl CapturedEvent {
    /// The field `name`, or `""`.
    pub fn field(&self, name: &str) -> &str {
        field(&self.fields, name)
    }
}

/// The layer that captures; clones share what they captured.
#[derive(Clone, Default)]
pub struct Captured {
    spans: Arc<Mutex<Vec<Fields>>>,
    events: Arc<Mutex<Vec<CapturedEvent>>>,
}

impl Captured {
    /// The closed `hmetcd` spans so far, in the order they closed; forgets them.
    pub fn take_spans(&self) -> Vec<Fields> {
        std::mem::take(&mut *self.spans.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The events of hmetcd's crates so far; forgets them.
    pub fn take_events(&self) -> Vec<CapturedEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Forgets everything captured so far.
    pub fn clear(&self) {
        self.take_spans();
        self.take_events();
    }
}

/// The field `name` of `fields`, or `""`.
pub fn field<'a>(fields: &'a Fields, name: &str) -> &'a str {
    fields.get(name).map_or("", String::as_str)
}

struct Collect<'a>(&'a mut Fields);

impl Visit for Collect<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Captured {
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
                self.spans
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(fields);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if !event.metadata().target().starts_with("hmetcd") {
            return;
        }
        let mut fields = Fields::new();
        event.record(&mut Collect(&mut fields));
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(CapturedEvent {
                level: *event.metadata().level(),
                fields,
            });
    }
}

/// Each span's `(operation, key, backend, outcome)`.
pub fn calls(spans: &[Fields]) -> Vec<(&str, &str, &str, &str)> {
    spans
        .iter()
        .map(|span| {
            (
                field(span, "operation"),
                field(span, "key"),
                field(span, "backend"),
                field(span, "outcome"),
            )
        })
        .collect()
}

/// The events whose message is `message`.
pub fn with_message<'a>(events: &'a [CapturedEvent], message: &str) -> Vec<&'a CapturedEvent> {
    events
        .iter()
        .filter(|event| event.field("message") == message)
        .collect()
}

/// `first` holds the lock `jobs` while `second` waits for it (for `wait`), then hands it over.
/// Checks what `captured` saw: both takes as `DEBUG` events of `backend` with the lock, token
/// and wait, and the end of the first hold. Returns the events and both tokens, for what one
/// backend shows besides.
pub async fn check_lock_handover(
    first: &dyn Kvi,
    second: &dyn Kvi,
    wait: Duration,
    captured: &Captured,
    backend: &str,
) -> (Vec<CapturedEvent>, [i64; 2]) {
    captured.clear();
    let held = match first.lock("jobs").await {
        Ok(guard) => guard,
        Err(err) => panic!("lock: {err}"),
    };
    let first_token = held.fencing_token();
    let handing_over = async move {
        tokio::time::sleep(wait).await;
        drop(held);
    };
    let (taken, ()) = tokio::join!(second.lock("jobs"), handing_over);
    let second_token = match taken {
        Ok(guard) => guard.fencing_token(),
        Err(err) => panic!("the waiter: {err}"),
    };
    let events = captured.take_events();
    let taken = with_message(&events, "took the lock");
    assert_eq!(taken.len(), 2, "{events:#?}");
    for (event, token) in taken.iter().zip([first_token, second_token]) {
        assert_eq!(event.level, Level::DEBUG);
        assert_eq!(event.field("backend"), backend);
        assert!(event.field("lock").ends_with("jobs"), "{event:?}");
        assert_eq!(event.field("token"), token.to_string());
        assert!(!event.field("waited").is_empty(), "{event:?}");
    }
    let ended = with_message(&events, "let go of the lock");
    assert!(
        ended
            .iter()
            .any(|event| event.field("token") == first_token.to_string()
                && !event.field("held").is_empty()),
        "{events:#?}"
    );
    (events, [first_token, second_token])
}

/// Makes the same calls on `kv` as on every backend (a store, a get, an invalid key, a get of a
/// 300-character key, a txn, an update, a close, a get once closed) and checks that each is one
/// closed span of `backend` with its operation, key (cut to 100 characters) and outcome, in the
/// order they ended. Returns the spans, for what one backend shows besides.
pub async fn check_call_spans(kv: &dyn Kvi, captured: &Captured, backend: &str) -> Vec<Fields> {
    captured.clear();
    kv.store("nodes/a", "up").await.ok();
    assert_eq!(
        kv.get("nodes/a").await.ok().flatten().as_deref(),
        Some("up")
    );
    assert!(kv.store("", "v").await.is_err());
    let long = "k".repeat(300);
    kv.get(&long).await.ok();
    kv.txn(Txn::new().then(Op::put("nodes/b", "up"))).await.ok();
    kv.update("nodes/c", &mut |_| Some("up".to_owned()))
        .await
        .ok();
    kv.close().await.ok();
    assert!(kv.get("nodes/a").await.is_err());

    let seen = captured.take_spans();
    let cut = "k".repeat(100);
    let expected: Vec<(&str, &str, &str, &str)> = [
        ("store", "nodes/a", "ok"),
        ("get", "nodes/a", "ok"),
        ("store", "", "invalid_key"),
        ("get", cut.as_str(), "ok"),
        ("txn", "nodes/b", "ok"),
        // update's own span closes after those of the calls it makes.
        ("get_kv", "nodes/c", "ok"),
        ("txn", "nodes/c", "ok"),
        ("update", "nodes/c", "ok"),
        ("close", "", "ok"),
        ("get", "nodes/a", "closed"),
    ]
    .into_iter()
    .map(|(operation, key, outcome)| (operation, key, backend, outcome))
    .collect();
    assert_eq!(calls(&seen), expected);
    seen
}
