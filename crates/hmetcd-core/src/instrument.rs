//! What every backend reports about its calls: one `tracing` span per operation (target
//! `hmetcd`), and with the cargo feature `metrics`, figures through the `metrics` crate's
//! facade, so that any exporter (Prometheus, OpenTelemetry, statsd) can collect them.
//!
//! # Spans
//!
//! Each call of a [`Kvi`](crate::Kvi) method runs in a `DEBUG` span named `hmetcd` with the
//! fields `operation` (the method), `key` (the key, prefix or name, cut to 100 characters),
//! `backend` (`mem` or `etcd`), `endpoint` (etcd: the endpoints), and `outcome` (`ok` or the
//! error's [`kind`](crate::Error::kind)), recorded when the call ends. Events inside the span
//! (lease trouble, reconnects, lock waits) carry its fields.
//!
//! # Metrics
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `hmetcd_calls_total` | counter | `operation`, `outcome`, `backend` | calls, by how they ended |
//! | `hmetcd_call_duration_seconds` | histogram | `operation`, `backend` | how long calls took |
//! | `hmetcd_leases_lost_total` | counter | `backend` | sessions whose lease was lost (expired, revoked, cut off) |
//! | `hmetcd_lock_wait_seconds` | histogram | `backend` | time from asking for a lock or leadership to holding it |
//! | `hmetcd_lock_hold_seconds` | histogram | `backend` | time a lock or leadership was held |
//! | `hmetcd_watchers_open` | gauge | `backend` | watch streams and callback watchers open now |
//! | `hmetcd_watch_reconnects_total` | counter | `backend` | watch streams re-established after a broken link |
//! | `hmetcd_watch_delivery_lag_seconds` | histogram | `backend` | time from the backend receiving an event to the watcher taking it |
//!
//! Without the feature, or without a recorder installed, recording costs next to nothing: each
//! call asks the `metrics` facade which recorder is current (a thread-local and an atomic load)
//! and, when that is the facade's no-op recorder, neither reads the clock nor looks up a figure.
//! A recorder installed later, globally or for a scope with `metrics::with_local_recorder`, is
//! seen from the next call on. The no-op recorder is told apart by its size: it is the facade's
//! only recorder of zero size, so a recorder of your own must hold some state (every exporter
//! does) for hmetcd to report to it.

use std::future::Future;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;

use tracing::field::Empty;
use tracing::{Instrument, Span};

use crate::{Error, KeyRange, ListRequest, Result, Txn, WatchEvent};

/// Characters of a key that a span shows.
const SHOWN_KEY_CHARS: usize = 100;

/// One call of a backend: its span, and its start for the duration metric.
#[derive(Debug)]
pub struct Call {
    span: Span,
    /// What the call's figures need, if a recorder was installed when it started.
    #[cfg(feature = "metrics")]
    timing: Option<Timing>,
}

/// A call's start and labels, for its figures.
#[cfg(feature = "metrics")]
#[derive(Debug)]
struct Timing {
    started: std::time::Instant,
    operation: &'static str,
    backend: &'static str,
}

impl Call {
    /// Starts the call `operation` of `backend` on `key` (a key, prefix or name; cut to a
    /// readable length), against `endpoint` when the backend has one.
    pub fn start(
        backend: &'static str,
        endpoint: Option<&str>,
        operation: &'static str,
        key: &str,
    ) -> Self {
        let span = tracing::debug_span!(
            target: "hmetcd",
            "hmetcd",
            operation,
            key = shown(key),
            backend,
            endpoint = endpoint.unwrap_or(""),
            outcome = Empty,
        );
        Call {
            span,
            #[cfg(feature = "metrics")]
            timing: figures::recording().then(|| Timing {
                started: std::time::Instant::now(),
                operation,
                backend,
            }),
        }
    }

    /// Runs `call` in this call's span and records how it ended.
    pub async fn run<T>(self, call: impl Future<Output = Result<T>>) -> Result<T> {
        // Without a subscriber that wants the span, nothing enters it: no wrapper at all.
        let result = if self.span.is_disabled() {
            call.await
        } else {
            call.instrument(self.span.clone()).await
        };
        self.finish(outcome(&result));
        result
    }

    /// Records the end of a call that is not a future (a synchronous method).
    #[inline]
    pub fn finish(self, outcome: &'static str) {
        if !self.span.is_disabled() {
            self.span.record("outcome", outcome);
        }
        #[cfg(feature = "metrics")]
        if let Some(timing) = self.timing {
            figures::call(
                timing.operation,
                outcome,
                timing.backend,
                timing.started.elapsed(),
            );
        }
    }

    /// The call's span, for work the call hands to a task of its own.
    pub fn span(&self) -> &Span {
        &self.span
    }
}

/// The key a span names for a transaction: its first compare's, else its first operation's.
pub fn txn_key(txn: &Txn) -> &str {
    txn.compares()
        .first()
        .map(|compare| compare.key())
        .or_else(|| txn.then_ops().first().map(|op| op.key()))
        .or_else(|| txn.else_ops().first().map(|op| op.key()))
        .unwrap_or("")
}

/// The key a span names for a list request: its prefix or its range's start.
pub fn list_key(request: &ListRequest) -> &str {
    match request.key_range() {
        KeyRange::Prefix(prefix) => prefix,
        KeyRange::Inclusive { start, .. } => start,
    }
}

/// `ok`, or the error's kind.
pub fn outcome<T>(result: &Result<T>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(err) => err.kind(),
    }
}

/// `key`, cut after its first 100 characters.
fn shown(key: &str) -> &str {
    match key.char_indices().nth(SHOWN_KEY_CHARS) {
        Some((cut, _)) => &key[..cut],
        None => key,
    }
}

/// A session of `backend` lost its lease.
pub fn lease_lost(backend: &'static str) {
    #[cfg(feature = "metrics")]
    figures::count("hmetcd_leases_lost_total", backend);
    let _ = backend;
}

/// The lock or leadership `lock` of `backend` was taken, with the fencing token `token`, after
/// waiting `waited`: a `DEBUG` event, and `hmetcd_lock_wait_seconds`.
pub fn lock_taken(backend: &'static str, lock: &str, token: i64, waited: Duration) {
    tracing::debug!(backend, lock, token, ?waited, "took the lock");
    #[cfg(feature = "metrics")]
    figures::record("hmetcd_lock_wait_seconds", backend, waited);
}

/// The hold of `lock` (fencing token `token`) of `backend` ended after `held`, released or
/// lost (a loss has a `WARN` event of its own): a `DEBUG` event, and
/// `hmetcd_lock_hold_seconds`. The next waiter, if any, takes the lock over from here.
pub fn lock_ended(backend: &'static str, lock: &str, token: i64, held: Duration) {
    tracing::debug!(backend, lock, token, ?held, "let go of the lock");
    #[cfg(feature = "metrics")]
    figures::record("hmetcd_lock_hold_seconds", backend, held);
}

/// A watcher of `backend` opened (`+1`) or closed (`-1`).
pub fn watchers_changed(backend: &'static str, by: f64) {
    #[cfg(feature = "metrics")]
    figures::gauge("hmetcd_watchers_open", backend, by);
    let _ = (backend, by);
}

/// A watch stream of `backend` was re-established after a broken link.
pub fn watch_reconnected(backend: &'static str) {
    #[cfg(feature = "metrics")]
    figures::count("hmetcd_watch_reconnects_total", backend);
    let _ = backend;
}

/// An event reached its watcher `lag` after the backend received it.
pub fn watch_delivered(backend: &'static str, lag: Duration) {
    #[cfg(feature = "metrics")]
    figures::record("hmetcd_watch_delivery_lag_seconds", backend, lag);
    let _ = (backend, lag);
}

/// The figures, recorded without building a key per call: the `metrics` macros allocate and
/// hash each figure's key before asking for the recorder, which on the in-memory store costs
/// more than the call itself. Keys here are made once: the per-backend ones at compile time,
/// one pair per (operation, outcome, backend) on first use, then kept (a bounded set: the
/// methods times the error kinds times the backends).
#[cfg(feature = "metrics")]
mod figures {
    use std::sync::{OnceLock, PoisonError, RwLock};
    use std::time::Duration;

    use metrics::{Key, Label, Level, Metadata, Recorder};

    static METADATA: Metadata<'static> = Metadata::new("hmetcd", Level::INFO, Some(module_path!()));
    static MEM: [Label; 1] = [Label::from_static_parts("backend", "mem")];
    static ETCD: [Label; 1] = [Label::from_static_parts("backend", "etcd")];

    /// Whether a recorder other than the facade's no-op one is current (on this thread, or
    /// globally). The no-op recorder is the facade's only recorder of zero size; the facade
    /// offers no other way to tell it apart.
    #[inline]
    pub(super) fn recording() -> bool {
        metrics::with_recorder(|recorder: &dyn Recorder| std::mem::size_of_val(recorder) != 0)
    }

    /// The per-backend figures, keys made at compile time.
    macro_rules! backend_keys {
        ($($name:literal),* $(,)?) => {
            /// The key of the per-backend figure `name`.
            fn backend_key(name: &'static str, backend: &'static str) -> Option<&'static Key> {
                match (name, backend) {
                    $(
                        ($name, "mem") => {
                            static KEY: Key = Key::from_static_parts($name, &MEM);
                            Some(&KEY)
                        }
                        ($name, "etcd") => {
                            static KEY: Key = Key::from_static_parts($name, &ETCD);
                            Some(&KEY)
                        }
                    )*
                    _ => None,
                }
            }
        };
    }

    backend_keys!(
        "hmetcd_leases_lost_total",
        "hmetcd_lock_wait_seconds",
        "hmetcd_lock_hold_seconds",
        "hmetcd_watchers_open",
        "hmetcd_watch_reconnects_total",
        "hmetcd_watch_delivery_lag_seconds",
    );

    /// The keys of one call's two figures: (calls_total, call_duration_seconds).
    type CallKeys = (Key, Key);
    type CallKind = (&'static str, &'static str, &'static str);

    fn call_keys(
        operation: &'static str,
        outcome: &'static str,
        backend: &'static str,
    ) -> &'static CallKeys {
        static KNOWN: OnceLock<RwLock<hashbrown::HashMap<CallKind, &'static CallKeys>>> =
            OnceLock::new();
        let known = KNOWN.get_or_init(Default::default);
        let kind = (operation, outcome, backend);
        if let Some(keys) = known
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&kind)
        {
            return keys;
        }
        let mut known = known.write().unwrap_or_else(PoisonError::into_inner);
        known.entry(kind).or_insert_with(|| {
            let calls: &'static [Label] = Box::leak(Box::new([
                Label::from_static_parts("operation", operation),
                Label::from_static_parts("outcome", outcome),
                Label::from_static_parts("backend", backend),
            ]));
            let durations: &'static [Label] = Box::leak(Box::new([
                Label::from_static_parts("operation", operation),
                Label::from_static_parts("backend", backend),
            ]));
            Box::leak(Box::new((
                Key::from_static_parts("hmetcd_calls_total", calls),
                Key::from_static_parts("hmetcd_call_duration_seconds", durations),
            )))
        })
    }

    #[inline(never)]
    pub(super) fn call(
        operation: &'static str,
        outcome: &'static str,
        backend: &'static str,
        took: Duration,
    ) {
        let (calls, durations) = call_keys(operation, outcome, backend);
        metrics::with_recorder(|recorder| {
            recorder.register_counter(calls, &METADATA).increment(1);
            recorder
                .register_histogram(durations, &METADATA)
                .record(took.as_secs_f64());
        });
    }

    pub(super) fn count(name: &'static str, backend: &'static str) {
        if let Some(key) = backend_key(name, backend) {
            metrics::with_recorder(|recorder| {
                recorder.register_counter(key, &METADATA).increment(1)
            });
        }
    }

    pub(super) fn record(name: &'static str, backend: &'static str, value: Duration) {
        if let Some(key) = backend_key(name, backend) {
            metrics::with_recorder(|recorder| {
                recorder
                    .register_histogram(key, &METADATA)
                    .record(value.as_secs_f64())
            });
        }
    }

    pub(super) fn gauge(name: &'static str, backend: &'static str, by: f64) {
        if let Some(key) = backend_key(name, backend) {
            metrics::with_recorder(|recorder| {
                recorder.register_gauge(key, &METADATA).increment(by)
            });
        }
    }
}

/// When an event entered a watcher's channel, if a recorder was installed then; nothing at
/// all without the `metrics` feature.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    #[cfg(feature = "metrics")]
    at: Option<std::time::Instant>,
}

impl Stamp {
    #[inline]
    fn now() -> Self {
        Stamp {
            #[cfg(feature = "metrics")]
            at: figures::recording().then(std::time::Instant::now),
        }
    }
}

/// The channel from a backend to one watcher: counts the watcher in `hmetcd_watchers_open`
/// while its receiving end lives, and each event's time in the channel in
/// `hmetcd_watch_delivery_lag_seconds`.
pub fn event_channel(backend: &'static str) -> (EventSender, EventReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    watchers_changed(backend, 1.0);
    (EventSender { tx }, EventReceiver { rx, backend })
}

/// The sending end of [`event_channel`].
#[derive(Debug, Clone)]
pub struct EventSender {
    tx: mpsc::UnboundedSender<(Stamp, Result<WatchEvent>)>,
}

/// The watcher is gone: the event was not delivered.
#[derive(Debug)]
pub struct Gone;

impl EventSender {
    /// Sends `item` to the watcher; `Err` once it is gone.
    #[inline]
    pub fn send(&self, item: Result<WatchEvent>) -> std::result::Result<(), Gone> {
        self.tx.send((Stamp::now(), item)).map_err(|_| Gone)
    }

    /// Whether the watcher is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The receiving end of [`event_channel`].
#[derive(Debug)]
pub struct EventReceiver {
    rx: mpsc::UnboundedReceiver<(Stamp, Result<WatchEvent>)>,
    backend: &'static str,
}

impl EventReceiver {
    /// The next event, as `UnboundedReceiver::poll_recv`.
    #[inline]
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<WatchEvent>>> {
        self.rx.poll_recv(cx).map(|item| {
            item.map(|(stamp, item)| {
                #[cfg(feature = "metrics")]
                if let Some(at) = stamp.at {
                    watch_delivered(self.backend, at.elapsed());
                }
                let _ = stamp;
                item
            })
        })
    }
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        watchers_changed(self.backend, -1.0);
    }
}

impl Error {
    /// A short, stable name of the variant (`timeout`, `unavailable`, `invalid_key`, ...): the
    /// `outcome` of spans and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidEndpoint { .. } => "invalid_endpoint",
            Error::InvalidOption { .. } => "invalid_option",
            Error::InvalidKey { .. } => "invalid_key",
            Error::InvalidOperator { .. } => "invalid_operator",
            Error::InvalidArgument { .. } => "invalid_argument",
            Error::LockTimeout { .. } => "lock_timeout",
            Error::Timeout { .. } => "timeout",
            Error::Unavailable { .. } => "unavailable",
            Error::Closed => "closed",
            Error::Compacted { .. } => "compacted",
            Error::Unauthenticated { .. } => "unauthenticated",
            Error::PermissionDenied { .. } => "permission_denied",
            Error::InvalidUtf8 { .. } => "invalid_utf8",
            Error::NotLeader { .. } => "not_leader",
            Error::NotSupported { .. } => "not_supported",
            Error::Backend { .. } => "backend",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Compare, Op};

    #[test]
    fn spans_name_the_key_a_call_is_about() {
        assert_eq!(list_key(&ListRequest::prefix("jobs/")), "jobs/");
        assert_eq!(list_key(&ListRequest::range("a", "m").after("c")), "a");
        let compared = Txn::new()
            .when(Compare::exists("guard"))
            .then(Op::put("a", "1"));
        assert_eq!(txn_key(&compared), "guard");
        assert_eq!(txn_key(&Txn::new().then(Op::delete("b"))), "b");
        assert_eq!(txn_key(&Txn::new().otherwise(Op::get("c"))), "c");
        assert_eq!(txn_key(&Txn::new()), "");
    }

    #[test]
    fn an_event_sender_knows_when_its_watcher_is_gone() {
        let (tx, rx) = event_channel("mem");
        assert!(!tx.is_closed());
        assert!(tx.send(Err(Error::Closed)).is_ok());
        drop(rx);
        assert!(tx.is_closed());
        assert!(tx.send(Err(Error::Closed)).is_err());
    }

    #[test]
    fn long_keys_are_cut_in_spans() {
        let key = "é".repeat(150);
        assert_eq!(shown(&key).chars().count(), 100);
        assert_eq!(shown("a/b"), "a/b");
    }

    #[tokio::test]
    async fn outcomes_name_the_error_kind() {
        let ok = Call::start("mem", None, "get", "k")
            .run(async { Ok::<_, Error>(1) })
            .await;
        assert_eq!(outcome(&ok), "ok");
        let closed: Result<()> = Call::start("mem", None, "get", "k")
            .run(async { Err(Error::Closed) })
            .await;
        assert_eq!(outcome(&closed), "closed");
    }
}
