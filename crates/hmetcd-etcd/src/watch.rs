//! Resumable watch streams: one etcd watch per stream, re-subscribed after the last delivered
//! revision whenever the etcd stream breaks, so nothing is lost or repeated.

use std::pin::Pin;
use std::task::{Context, Poll};

use etcd_client::{Client, Event, EventType, GetOptions, WatchOptions};
use futures::Stream;
use hmetcd_core::keys::KeyPrefix;
use hmetcd_core::{Error, Result, WatchEvent, WatchStream};
use tokio::sync::{mpsc, watch};

use crate::error::{ErrorContext, Request};
use crate::retry::{pause_unless_shut_down, shut_down, AbortOnDrop, Backoff};
use crate::Shared;

/// What a stream watches.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The key or prefix as the caller gave it (for messages and errors).
    shown: String,
    /// The stored key or prefix.
    stored: String,
    /// Every key starting with `stored`, rather than `stored` alone.
    is_prefix: bool,
}

impl Target {
    pub(crate) fn key(key: &str, prefix: &KeyPrefix) -> Self {
        Target {
            shown: key.to_owned(),
            stored: prefix.apply(key),
            is_prefix: false,
        }
    }

    pub(crate) fn prefix(key_prefix: &str, prefix: &KeyPrefix) -> Self {
        Target {
            shown: key_prefix.to_owned(),
            stored: prefix.apply(key_prefix),
            is_prefix: true,
        }
    }
}

/// Everything the background task of one stream needs; it holds no reference to the handle.
struct Watcher {
    client: Client,
    errors: ErrorContext,
    prefix: KeyPrefix,
    target: Target,
}

impl Shared {
    /// Registers a watch for every change after now and returns its stream.
    pub(crate) async fn open_watch_stream(&self, target: Target) -> Result<WatchStream> {
        let request = Request::new("watch", &target.shown);
        // The store's revision now: the watch starts right after it, so every change made
        // after this call began is delivered, and none before.
        let mut kv = self.client.kv_client();
        let key = if target.stored.is_empty() {
            "\0"
        } else {
            target.stored.as_str()
        };
        let now = self
            .request(
                request,
                kv.get(key, Some(GetOptions::new().with_count_only())),
            )
            .await?;
        let revision = now
            .header()
            .map(|header| header.revision())
            .ok_or_else(|| Error::Backend {
                operation: request.to_string(),
                reason: "etcd answered without a response header".to_owned(),
                source: None,
            })?;
        let watcher = Watcher {
            client: self.client.clone(),
            errors: self.errors.clone(),
            prefix: self.prefix.clone(),
            target,
        };
        let first = watcher.subscribe(revision + 1).await?;
        let (events, receiver) = mpsc::unbounded_channel();
        let pump =
            tokio::spawn(watcher.pump(first, revision + 1, events, self.shutdown.subscribe()));
        Ok(Box::pin(EventStream {
            events: receiver,
            _pump: AbortOnDrop(pump),
        }))
    }
}

impl Watcher {
    /// Opens an etcd watch from `start` and waits until etcd confirms it, bounded by
    /// `request_timeout`.
    async fn subscribe(&self, start: i64) -> Result<etcd_client::WatchStream> {
        let request = Request::new("watch", &self.target.shown);
        let mut options = WatchOptions::new().with_start_revision(start);
        if self.target.is_prefix {
            options = options.with_prefix();
        }
        let mut watches = self.client.watch_client();
        let subscribing = async {
            let mut stream = watches
                .watch(self.target.stored.as_str(), Some(options))
                .await
                .map_err(|err| self.errors.map(request, err))?;
            loop {
                match stream
                    .message()
                    .await
                    .map_err(|err| self.errors.map(request, err))?
                {
                    Some(answer) if answer.created() => {
                        if answer.compact_revision() > 0 {
                            return Err(self.compacted(start, answer.compact_revision()));
                        }
                        if answer.canceled() {
                            return Err(self.refused(request, answer.cancel_reason()));
                        }
                        return Ok(stream);
                    }
                    Some(_) => continue,
                    None => {
                        return Err(self.errors.unavailable(
                            format!("{request}: etcd ended the watch before confirming it"),
                            None,
                        ))
                    }
                }
            }
        };
        tokio::time::timeout(self.errors.request_timeout, subscribing)
            .await
            .map_err(|_| self.errors.timeout(request))?
    }

    fn compacted(&self, revision: i64, compact_revision: i64) -> Error {
        Error::Compacted {
            key: self.target.shown.clone(),
            revision,
            compact_revision,
        }
    }

    /// etcd cancelled the watch for a reason other than compaction.
    fn refused(&self, request: Request<'_>, reason: &str) -> Error {
        if reason.contains("permission denied") {
            Error::PermissionDenied {
                operation: request.to_string(),
                reason: reason.to_owned(),
                source: None,
            }
        } else {
            Error::Backend {
                operation: request.to_string(),
                reason: format!("etcd cancelled the watch: {reason}"),
                source: None,
            }
        }
    }

    /// Delivers every event in order until the receiver goes away or the handle shuts down;
    /// re-subscribes from the revision after the last one delivered whenever the stream breaks.
    async fn pump(
        self,
        mut stream: etcd_client::WatchStream,
        mut next: i64,
        events: mpsc::UnboundedSender<Result<WatchEvent>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            // This etcd watch started at `start`; nothing before it was asked for.
            let start = next;
            let broken = loop {
                let message = tokio::select! {
                    () = shut_down(&mut shutdown) => return,
                    () = events.closed() => return,
                    message = stream.message() => message,
                };
                let answer = match message {
                    Ok(Some(answer)) => answer,
                    Ok(None) => break "etcd ended the watch stream".to_owned(),
                    Err(err) => break err.to_string(),
                };
                if answer.compact_revision() > 0 {
                    let _ = events.send(Err(self.compacted(next, answer.compact_revision())));
                    return;
                }
                for event in answer.events() {
                    let converted = match self.convert(event) {
                        Ok(Some(converted)) => converted,
                        Ok(None) => continue,
                        Err(err) => {
                            let _ = events.send(Err(err));
                            return;
                        }
                    };
                    // Never repeat: a re-subscription starts after the last delivered revision.
                    if converted.revision() < start {
                        continue;
                    }
                    let revision = converted.revision();
                    if events.send(Ok(converted)).is_err() {
                        return;
                    }
                    // All events of one revision (one transaction) come in one answer, so a
                    // re-subscription starts at the revision after the last one delivered.
                    next = next.max(revision + 1);
                }
                if answer.canceled() {
                    break format!("etcd cancelled the watch: {}", answer.cancel_reason());
                }
            };
            drop(stream);
            tracing::debug!(key = %self.target.shown, reason = %broken, next, "watch broke; re-subscribing");
            stream = match self.resubscribe(next, &events, &mut shutdown).await {
                Some(stream) => stream,
                None => return,
            };
        }
    }

    /// Retries with backoff until etcd takes the watch again. `None` when the stream is over
    /// (an error was delivered, the receiver went away, or the handle shut down).
    async fn resubscribe(
        &self,
        next: i64,
        events: &mpsc::UnboundedSender<Result<WatchEvent>>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<etcd_client::WatchStream> {
        let mut backoff = Backoff::new();
        let mut refusals = 0;
        loop {
            if events.is_closed() || !pause_unless_shut_down(backoff.next_pause(), shutdown).await {
                return None;
            }
            let attempt = tokio::select! {
                () = shut_down(shutdown) => return None,
                attempt = self.subscribe(next) => attempt,
            };
            match attempt {
                Ok(stream) => return Some(stream),
                Err(err @ Error::Compacted { .. }) => {
                    let _ = events.send(Err(err));
                    return None;
                }
                Err(err @ (Error::PermissionDenied { .. } | Error::Unauthenticated { .. })) => {
                    // An expired token shows as a refused watch; a fresh token gets one more try.
                    refusals += 1;
                    if refusals > 1 {
                        let _ = events.send(Err(err));
                        return None;
                    }
                    if let Err(refresh) = self.client.refresh_token().await {
                        tracing::debug!(error = %refresh, "could not refresh the auth token");
                    }
                }
                Err(err) => {
                    tracing::debug!(key = %self.target.shown, error = %err, "re-subscribing the watch failed; retrying");
                }
            }
        }
    }

    /// One etcd event as callers see it; `None` for a key outside the prefix.
    fn convert(&self, event: &Event) -> Result<Option<WatchEvent>> {
        let Some(kv) = event.kv() else {
            return Ok(None);
        };
        let stored = std::str::from_utf8(kv.key()).map_err(|source| Error::InvalidUtf8 {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            source,
        })?;
        let Some(key) = self.prefix.strip(stored) else {
            return Ok(None);
        };
        let revision = kv.mod_revision();
        Ok(Some(match event.event_type() {
            EventType::Put => WatchEvent::Put {
                key: key.to_owned(),
                value: std::str::from_utf8(kv.value())
                    .map_err(|source| Error::InvalidUtf8 {
                        key: key.to_owned(),
                        source,
                    })?
                    .to_owned(),
                revision,
            },
            EventType::Delete => WatchEvent::Delete {
                key: key.to_owned(),
                revision,
            },
        }))
    }
}

/// The stream handed to callers: events from the background task, which is aborted (and its
/// etcd watch cancelled) when the stream is dropped.
struct EventStream {
    events: mpsc::UnboundedReceiver<Result<WatchEvent>>,
    _pump: AbortOnDrop,
}

impl Stream for EventStream {
    type Item = Result<WatchEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}
