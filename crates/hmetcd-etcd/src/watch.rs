//! Watch streams of one handle, all carried by a single etcd watch stream.
//!
//! Each handle has one [`WatchHub`]. On first use it starts a background task, the
//! [`Multiplexer`], which owns the handle's one etcd watch stream (a gRPC stream on the
//! handle's connection) and every watcher on it. Callers talk to it by [`Command`]s; it talks
//! to etcd by sending create and cancel requests and routing every response, by etcd's watch
//! id, to the watcher it belongs to.
//!
//! The multiplexer's states:
//!
//! - **Idle**: no etcd stream, no watchers. A registration starts *Connecting* at once.
//! - **Connecting**: opening the etcd stream with the first watcher's create request, then
//!   sending the others' (each from its own next revision). Success leads to *Connected*;
//!   failure fails the registrations still waiting for a confirmation and leads to *Waiting*
//!   (or *Idle* when no watcher is left).
//! - **Connected**: creates and cancels go out as watchers come and go; responses are routed.
//!   A broken stream (etcd restart, leader change, network) leads to *Waiting*. A create that
//!   etcd refuses for want of permission gets one token refresh and a new stream
//!   (*Connecting* at once), since etcd checks the token the stream was opened with.
//! - **Waiting**: no etcd stream, backing off before *Connecting* again; every watcher keeps
//!   its next revision, so the new stream resumes each one without loss or repetition. The
//!   backoff (jittered, 100 ms up to 2 s) starts over only once a watch delivers events or
//!   progress, not when a create succeeds: a stream that opens and breaks at once (say on a
//!   response it cannot take) must not be reopened ten times a second.
//!
//! ## The next revision, and compaction
//!
//! Each watcher keeps `next`, the first revision it has not delivered; a new stream creates
//! its watch from there. `next` moves past every delivered event, and past the revision of a
//! **progress notification**: every watch is created `with_progress_notify()`, and etcd sends
//! such a notification (a response for that watch with no events, neither created nor
//! cancelled, compact revision 0) only while the watch is synced, that is when it has sent
//! every event up to the header's revision. `next` never moves on the header of a created
//! response or of an event response: a watch catching up sends its history in batches
//! (etcd's `watchBatchMaxRevs`) whose header is the store's current revision while more
//! events are still to come. Nor is the stream-wide `request_progress` (watch id -1) used:
//! before etcd 3.5.8 and 3.4.24 it is answered even while some watchers of the stream are not
//! synced (etcd issue 15220), so moving on its revision could skip events.
//!
//! When etcd refuses to (re)create a watch because `next` was compacted away, an event may
//! have been lost, or not: a quiet key's watch would otherwise fail on every compaction that
//! happens while the stream is down. So before reporting [`Error::Compacted`]:
//!
//! - a single-key watch reads the key (one get). If the key exists and its `mod_revision` is
//!   below `next`, it has not changed since the last delivered event: the watch is created
//!   again from the read's revision + 1 and goes on. If the key was changed meanwhile, or is
//!   missing, it reports `Compacted`: a missing key may have been put and deleted inside the
//!   compacted gap, which history no longer shows. (The watcher also tracks whether the key
//!   exists as far as it knows, from the registration's read and from the events since; it
//!   only resumes when that says "present".)
//! - a prefix watch reports `Compacted`: nothing short of the compacted history proves that
//!   no key under it changed, unless progress notifications had already moved `next` past the
//!   compaction (then etcd does not refuse the watch at all).
//!
//! ## Keys and values that are not UTF-8
//!
//! An event whose key or value is not UTF-8 (written by another client) reaches the stream as
//! one `Err(Error::InvalidUtf8)` item naming the key; the stream goes on with the next event.
//!
//! In every state the task ends when the handle is closed or dropped (`shutdown`), which ends
//! every watcher's stream. The task holds no reference to the handle.

use hmetcd_core::instrument::{event_channel, EventReceiver, EventSender};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};

use etcd_client::{
    Client, Event, EventType, GetOptions, WatchOptions, WatchRequestSender, WatchResponse,
    WatchResponseStream,
};
use futures::Stream;
use hmetcd_core::keys::KeyPrefix;
use hmetcd_core::{Error, Result, WatchEvent, WatchStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::error::{revision_of, ErrorContext, Request};
use crate::pool::MAX_RESPONSE_BYTES;
use crate::retry::{resending, shut_down, AbortOnDrop, Backoff, Resend};
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

/// A watcher of the handle. It is also the `watch_id` the watcher asks etcd for, so ids start
/// at 1 (0 would let etcd choose).
type WatcherId = i64;

/// The handle's side of the multiplexer: starts it on first use and hands it commands.
pub(crate) struct WatchHub {
    next_id: AtomicI64,
    running: Mutex<Option<Running>>,
}

struct Running {
    commands: mpsc::UnboundedSender<Command>,
    _task: AbortOnDrop,
}

/// What callers ask of the multiplexer.
enum Command {
    /// Watch `target` from revision `start`; answer on `confirmed` once etcd created the watch.
    Register {
        id: WatcherId,
        target: Target,
        start: i64,
        events: EventSender,
        confirmed: oneshot::Sender<Result<()>>,
        /// Whether the key existed at `start - 1` (unused for a prefix watch).
        present: bool,
    },
    /// The watcher's stream was dropped (or its registration abandoned).
    Cancel(WatcherId),
}

impl WatchHub {
    pub(crate) fn new() -> Self {
        WatchHub {
            next_id: AtomicI64::new(1),
            running: Mutex::new(None),
        }
    }
}

impl Shared {
    /// Registers a watch for every change after now and returns its stream once etcd has
    /// confirmed the watch.
    pub(crate) async fn open_watch_stream(&self, target: Target) -> Result<WatchStream> {
        let shown = target.shown.clone();
        let request = Request::new("watch", &shown);
        // The store's revision now: the watch starts right after it, so every change made
        // after this call began is delivered, and none before.
        let key = if target.stored.is_empty() {
            "\0"
        } else {
            target.stored.as_str()
        };
        // The count also tells whether the key exists, the watcher's first known state.
        let now = self
            .kv_request(request, async |kv| {
                resending!(
                    Resend::Read,
                    kv.get(key, Some(GetOptions::new().with_count_only())).await
                )
            })
            .await?;
        let present = now.count() > 0;
        let revision = revision_of(now.header(), request)?;
        self.watch_from(target, revision + 1, present).await
    }

    /// Registers a watch for every change from revision `start` on and returns its stream
    /// once etcd has confirmed the watch. `present` says whether the key existed just before
    /// `start` (see the module docs on compaction).
    pub(crate) async fn watch_from(
        &self,
        target: Target,
        start: i64,
        present: bool,
    ) -> Result<WatchStream> {
        let shown = target.shown.clone();
        let request = Request::new("watch", &shown);
        let commands = self.watch_commands();
        let id = self.watches.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, receiver) = event_channel("etcd");
        let (confirmed, confirmation) = oneshot::channel();
        commands
            .send(Command::Register {
                id,
                target,
                start,
                events,
                confirmed,
                present,
            })
            .map_err(|_| Error::Closed)?;
        // From here on, dropping the stream (also on an error below) cancels the watch.
        let stream = EventStream {
            events: receiver,
            _registration: Registration { id, commands },
        };
        match tokio::time::timeout(self.options.request_timeout, confirmation).await {
            Ok(Ok(Ok(()))) => Ok(Box::pin(stream)),
            Ok(Ok(Err(err))) => Err(err),
            // The multiplexer ended: the handle was closed or dropped.
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(self.errors.timeout(request)),
        }
    }

    /// The multiplexer's command channel, starting it on first use.
    fn watch_commands(&self) -> mpsc::UnboundedSender<Command> {
        let mut running = self
            .watches
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(running) = running.as_ref() {
            return running.commands.clone();
        }
        let (commands, receiver) = mpsc::unbounded_channel();
        let multiplexer = Multiplexer {
            client: self.client.clone(),
            errors: self.errors.clone(),
            prefix: self.prefix.clone(),
            commands: receiver,
            shutdown: self.shutdown.subscribe(),
            watchers: BTreeMap::new(),
            connection: None,
            reconnect_at: None,
            broken: false,
            backoff: Backoff::new(),
        };
        let task = AbortOnDrop(tokio::spawn(multiplexer.run()));
        *running = Some(Running {
            commands: commands.clone(),
            _task: task,
        });
        commands
    }
}

/// The background task owning the handle's etcd watch stream; see the module docs.
struct Multiplexer {
    client: Client,
    errors: ErrorContext,
    prefix: KeyPrefix,
    commands: mpsc::UnboundedReceiver<Command>,
    shutdown: watch::Receiver<bool>,
    /// Every live watcher, in registration order (the order they are created in again).
    watchers: BTreeMap<WatcherId, Watcher>,
    /// `None` while idle or waiting.
    connection: Option<Connection>,
    /// When to connect next; `None` while connected or idle.
    reconnect_at: Option<Instant>,
    /// The stream broke since it was last open: the next one is a reconnect.
    broken: bool,
    backoff: Backoff,
}

struct Watcher {
    target: Target,
    events: EventSender,
    /// The registering call, until etcd has confirmed the watch.
    confirmed: Option<oneshot::Sender<Result<()>>>,
    /// The first revision not yet delivered.
    next: i64,
    /// Where its etcd watch on the current stream started; an event before it is a repeat.
    start: i64,
    /// etcd's id for its watch on the current stream, once created.
    etcd_id: Option<i64>,
    /// Creations refused in a row; an expired token gets one refresh.
    refusals: u32,
    /// Whether the watched key exists at `next - 1`, as far as the watcher knows (unused for
    /// a prefix watch).
    known_present: bool,
}

impl Watcher {
    fn compacted(&self, compact_revision: i64) -> Error {
        Error::Compacted {
            key: self.target.shown.clone(),
            revision: self.next,
            compact_revision,
        }
    }

    /// The create request of its etcd watch, from its next revision.
    fn create_request(&mut self, id: WatcherId) -> (String, WatchOptions) {
        self.start = self.next;
        // Progress notifications move `next` on for a quiet watch; see the module docs.
        let mut options = WatchOptions::new()
            .with_start_revision(self.next)
            .with_watch_id(id)
            .with_progress_notify();
        if self.target.is_prefix {
            options = options.with_prefix();
        }
        (self.target.stored.clone(), options)
    }
}

/// One open etcd watch stream.
struct Connection {
    /// Requests to the writer task, which sends them on the stream.
    requests: mpsc::UnboundedSender<Outgoing>,
    responses: WatchResponseStream,
    /// Watchers whose create request is sent and not yet answered, in the order sent: etcd
    /// answers the creates of one stream in that order.
    creating: VecDeque<WatcherId>,
    /// etcd's watch id → the watcher it belongs to.
    routes: HashMap<i64, WatcherId>,
    _writer: AbortOnDrop,
}

enum Outgoing {
    Create { key: String, options: WatchOptions },
    Cancel { watch_id: i64 },
}

impl Connection {
    fn create(&mut self, id: WatcherId, watcher: &mut Watcher) {
        let (key, options) = watcher.create_request(id);
        self.creating.push_back(id);
        // A writer that is gone means a broken stream; reading the responses tells.
        let _ = self.requests.send(Outgoing::Create { key, options });
    }

    fn cancel(&mut self, watch_id: i64) {
        self.routes.remove(&watch_id);
        let _ = self.requests.send(Outgoing::Cancel { watch_id });
    }
}

/// What woke the multiplexer.
enum Wake {
    Command(Option<Command>),
    Response(Result<Option<WatchResponse>, etcd_client::Error>),
    Reconnect,
}

impl Multiplexer {
    async fn run(mut self) {
        loop {
            let wake = tokio::select! {
                () = shut_down(&mut self.shutdown) => return,
                command = self.commands.recv() => Wake::Command(command),
                response = next_response(self.connection.as_mut()) => Wake::Response(response),
                () = reconnect_due(self.reconnect_at) => Wake::Reconnect,
            };
            match wake {
                // Unreachable while the hub holds a sender; ends the task all the same.
                Wake::Command(None) => return,
                Wake::Command(Some(command)) => self.on_command(command),
                Wake::Response(Ok(Some(response))) if response.created() => {
                    self.on_created(&response).await;
                }
                Wake::Response(Ok(Some(response))) => self.on_update(&response).await,
                Wake::Response(Ok(None)) => self.disconnect("etcd ended the watch stream"),
                Wake::Response(Err(err)) => self.disconnect(&err.to_string()),
                Wake::Reconnect => self.connect().await,
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Register {
                id,
                target,
                start,
                events,
                confirmed,
                present,
            } => {
                let watcher = self.watchers.entry(id).or_insert(Watcher {
                    target,
                    events,
                    confirmed: Some(confirmed),
                    next: start,
                    start,
                    etcd_id: None,
                    refusals: 0,
                    known_present: present,
                });
                match self.connection.as_mut() {
                    Some(connection) => connection.create(id, watcher),
                    // A caller is waiting: connect now, even while backing off.
                    None => self.reconnect_at = Some(Instant::now()),
                }
            }
            Command::Cancel(id) => {
                self.remove(id);
            }
        }
    }

    /// Forgets a watcher and cancels its etcd watch. One still being created is cancelled
    /// when etcd confirms it.
    fn remove(&mut self, id: WatcherId) -> Option<Watcher> {
        let watcher = self.watchers.remove(&id)?;
        if let (Some(connection), Some(watch_id)) = (self.connection.as_mut(), watcher.etcd_id) {
            connection.cancel(watch_id);
        }
        Some(watcher)
    }

    /// Ends a watcher with `err`: the registering call gets it if it is still waiting,
    /// otherwise the stream yields it as its last item.
    fn fail(&mut self, id: WatcherId, err: Error) {
        let Some(mut watcher) = self.remove(id) else {
            return;
        };
        match watcher.confirmed.take() {
            Some(confirmed) => {
                let _ = confirmed.send(Err(err));
            }
            None => {
                let _ = watcher.events.send(Err(err));
            }
        }
    }

    /// etcd answered the create request at the head of the queue.
    async fn on_created(&mut self, response: &WatchResponse) {
        let Some(connection) = self.connection.as_mut() else {
            return;
        };
        let watch_id = response.watch_id();
        let Some(id) = connection.creating.pop_front() else {
            tracing::warn!(watch_id, "etcd confirmed a watch that was never asked for");
            if !response.canceled() {
                connection.cancel(watch_id);
            }
            return;
        };
        let Some(watcher) = self.watchers.get_mut(&id) else {
            // Dropped while being created.
            if !response.canceled() {
                connection.cancel(watch_id);
            }
            return;
        };
        if response.compact_revision() > 0 {
            if !response.canceled() {
                connection.cancel(watch_id);
            }
            self.on_compacted(id, response.compact_revision()).await;
            return;
        }
        if response.canceled() {
            let err = refused(&self.errors, &watcher.target, response.cancel_reason());
            let unauthorised = matches!(
                err,
                Error::PermissionDenied { .. } | Error::Unauthenticated { .. }
            );
            if unauthorised && watcher.refusals == 0 {
                // etcd checks the token the stream was opened with: a fresh token needs a new
                // stream, on which every watch resumes.
                watcher.refusals += 1;
                tracing::debug!(key = %watcher.target.shown, reason = response.cancel_reason(), "etcd refused a watch; refreshing the auth token");
                self.refresh_token().await;
                self.disconnect("refreshing the auth token");
                self.reconnect_at = Some(Instant::now());
            } else {
                self.fail(id, err);
            }
            return;
        }
        if watch_id != id {
            // A server that ignores `watch_id` (before etcd 3.4): routing by its id still works.
            tracing::debug!(id, watch_id, "etcd chose its own id for a watch");
        }
        watcher.refusals = 0;
        watcher.etcd_id = Some(watch_id);
        connection.routes.insert(watch_id, id);
        if let Some(confirmed) = watcher.confirmed.take() {
            let _ = confirmed.send(Ok(()));
        }
    }

    /// Events, a progress notification, or a cancellation for a created watch.
    async fn on_update(&mut self, response: &WatchResponse) {
        let Some(connection) = self.connection.as_mut() else {
            return;
        };
        let watch_id = response.watch_id();
        // None: the last words of a watch already cancelled.
        let Some(&id) = connection.routes.get(&watch_id) else {
            return;
        };
        let Some(watcher) = self.watchers.get_mut(&id) else {
            connection.cancel(watch_id);
            return;
        };
        let is_progress = response.events().is_empty()
            && !response.canceled()
            && response.compact_revision() == 0;
        if is_progress {
            // etcd sends these to synced watches only: every change up to the header's
            // revision has been sent (see the module docs).
            if let Some(header) = response.header() {
                watcher.next = watcher.next.max(header.revision() + 1);
            }
            self.backoff.reset();
            return;
        }
        if !response.events().is_empty() {
            self.backoff.reset();
        }
        for event in response.events() {
            let Some(kv) = event.kv() else {
                continue;
            };
            let revision = kv.mod_revision();
            // Never repeat: a re-created watch starts after the last delivered revision.
            if revision < watcher.start {
                continue;
            }
            let item = match convert(&self.prefix, event) {
                Ok(Some(converted)) => Ok(converted),
                Ok(None) => continue,
                // One item for this event; the next events follow (see the module docs).
                Err(err) => Err(err),
            };
            watcher.known_present = event.event_type() == EventType::Put;
            if watcher.events.send(item).is_err() {
                self.remove(id);
                return;
            }
            // All events of one revision (one transaction) come in one response, so a
            // re-created watch starts at the revision after the last one delivered.
            watcher.next = watcher.next.max(revision + 1);
        }
        if response.compact_revision() > 0 {
            // etcd has stopped the watch, but keeps its id taken on this stream until it is
            // cancelled: a watch created again under that id would be refused as a duplicate.
            connection.cancel(watch_id);
            watcher.etcd_id = None;
            self.on_compacted(id, response.compact_revision()).await;
        } else if response.canceled() {
            let reason = format!(
                "etcd cancelled the watch of {}: {}",
                Error::clipped_key(&watcher.target.shown),
                response.cancel_reason()
            );
            self.disconnect(&reason);
        }
    }

    /// etcd refused a watch (or cancelled one catching up) because its next revision is
    /// compacted away: resume it if no event can have been lost, else fail it with
    /// `Compacted`. See the module docs.
    async fn on_compacted(&mut self, id: WatcherId, compact_revision: i64) {
        let Some(watcher) = self.watchers.get(&id) else {
            return;
        };
        if watcher.target.is_prefix || !watcher.known_present {
            // A prefix, or a key last known absent: a put and a delete may hide in the gap.
            let err = watcher.compacted(compact_revision);
            return self.fail(id, err);
        }
        let (key, next) = (watcher.target.stored.clone(), watcher.next);
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let reading = tokio::time::timeout(self.errors.request_timeout, kv.get(key, None));
        let read = tokio::select! {
            // The next turn of the loop sees the shutdown and ends the task.
            () = shut_down(&mut self.shutdown) => return,
            read = reading => read,
        };
        let answer = match read {
            Ok(Ok(answer)) => answer,
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "cannot read a watched key behind a compaction");
                return self.disconnect("reading a watched key behind a compaction failed");
            }
            Err(_) => {
                return self.disconnect("reading a watched key behind a compaction timed out")
            }
        };
        let Some(watcher) = self.watchers.get_mut(&id) else {
            return;
        };
        let unchanged = answer.kvs().first().map(|kv| kv.mod_revision() < next);
        match (unchanged, answer.header()) {
            (Some(true), Some(header)) => {
                // Unchanged since before `next`: nothing was missed up to the read's revision.
                watcher.next = watcher.next.max(header.revision() + 1);
                tracing::debug!(
                    key = %Error::clipped_key(&watcher.target.shown),
                    compact_revision,
                    next = watcher.next,
                    "a watch behind a compaction missed nothing; resuming it"
                );
                if let Some(connection) = self.connection.as_mut() {
                    connection.create(id, watcher);
                }
            }
            _ => {
                let err = watcher.compacted(compact_revision);
                self.fail(id, err);
            }
        }
    }

    /// Drops the etcd stream; every watcher is created again on the next one, after a pause.
    fn disconnect(&mut self, reason: &str) {
        if self.connection.take().is_some() {
            tracing::info!(
                reason,
                watchers = self.watchers.len(),
                "the etcd watch stream broke; reconnecting"
            );
            self.broken = true;
        }
        for watcher in self.watchers.values_mut() {
            watcher.etcd_id = None;
        }
        self.reconnect_at = if self.watchers.is_empty() {
            None
        } else {
            Some(Instant::now() + self.backoff.next_pause())
        };
    }

    /// Opens the etcd stream and creates every watcher on it, each from its next revision.
    async fn connect(&mut self) {
        self.reconnect_at = None;
        let Some((&first, watcher)) = self.watchers.iter_mut().next() else {
            return;
        };
        let shown = watcher.target.shown.clone();
        let request = Request::new("watch", &shown);
        let (key, options) = watcher.create_request(first);
        let mut watches = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let opening = tokio::time::timeout(
            self.errors.request_timeout,
            watches.watch(key, Some(options)),
        );
        let opened = tokio::select! {
            // The next turn of the loop sees the shutdown and ends the task.
            () = shut_down(&mut self.shutdown) => return,
            opened = opening => opened,
        };
        let stream = match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                let err = self.errors.map(request, err);
                return self.connect_failed(err);
            }
            Err(_) => {
                let err = self.errors.timeout(request);
                return self.connect_failed(err);
            }
        };
        let (sender, responses) = stream.split();
        let (requests, outgoing) = mpsc::unbounded_channel();
        let mut connection = Connection {
            requests,
            responses,
            creating: VecDeque::from([first]),
            routes: HashMap::new(),
            _writer: AbortOnDrop(tokio::spawn(send_requests(sender, outgoing))),
        };
        for (&id, watcher) in self.watchers.iter_mut().skip(1) {
            connection.create(id, watcher);
        }
        if std::mem::take(&mut self.broken) {
            hmetcd_core::instrument::watch_reconnected("etcd");
            for watcher in self.watchers.values() {
                tracing::info!(
                    watch = %watcher.target.shown,
                    resume_revision = watcher.next,
                    "the watch resumes on the new etcd watch stream"
                );
            }
        } else {
            tracing::debug!(
                watchers = self.watchers.len(),
                "opened the etcd watch stream"
            );
        }
        self.connection = Some(connection);
    }

    /// The stream could not be opened: registrations still waiting fail, the others wait for
    /// the next attempt.
    fn connect_failed(&mut self, err: Error) {
        tracing::debug!(error = %err, "cannot open the etcd watch stream");
        let waiting: Vec<WatcherId> = self
            .watchers
            .iter()
            .filter(|(_, watcher)| watcher.confirmed.is_some())
            .map(|(&id, _)| id)
            .collect();
        let mut err = Some(err);
        for id in waiting {
            let shown = self
                .watchers
                .get(&id)
                .map(|watcher| watcher.target.shown.clone())
                .unwrap_or_default();
            // The first gets the error itself (with its source), the others its description.
            let failure = err.take().unwrap_or_else(|| {
                self.errors.unavailable(
                    format!("watch {shown:?}: cannot open the etcd watch stream"),
                    None,
                )
            });
            self.fail(id, failure);
        }
        self.disconnect("the etcd watch stream could not be opened");
    }

    /// One refresh of the auth token, bounded by `request_timeout`.
    async fn refresh_token(&mut self) {
        let refreshing =
            tokio::time::timeout(self.errors.request_timeout, self.client.refresh_token());
        tokio::select! {
            () = shut_down(&mut self.shutdown) => {}
            refreshed = refreshing => match refreshed {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::debug!(error = %err, "could not refresh the auth token"),
                Err(_) => tracing::debug!("refreshing the auth token timed out"),
            },
        }
    }
}

/// The next response of the stream; never resolves without one.
async fn next_response(
    connection: Option<&mut Connection>,
) -> Result<Option<WatchResponse>, etcd_client::Error> {
    match connection {
        Some(connection) => connection.responses.message().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`; never resolves for `None`.
async fn reconnect_due(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sends the multiplexer's requests on the etcd stream, so that it never waits for room in
/// the stream's request buffer while responses pile up.
async fn send_requests(
    mut sender: WatchRequestSender,
    mut requests: mpsc::UnboundedReceiver<Outgoing>,
) {
    while let Some(request) = requests.recv().await {
        let sent = match request {
            Outgoing::Create { key, options } => sender.watch(key, Some(options)).await,
            Outgoing::Cancel { watch_id } => sender.cancel(watch_id).await,
        };
        if let Err(err) = sent {
            tracing::debug!(error = %err, "the etcd watch stream takes no more requests");
            return;
        }
    }
}

/// etcd refused to create a watch, for a reason other than compaction.
fn refused(errors: &ErrorContext, target: &Target, reason: &str) -> Error {
    let request = Request::new("watch", &target.shown);
    // An expired token reads "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token".
    if reason.contains("Unauthenticated") || reason.contains("auth token") {
        Error::Unauthenticated {
            user: errors.user.clone().unwrap_or_default(),
            reason: reason.to_owned(),
            source: None,
        }
    } else if reason.contains("permission denied") {
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

/// One etcd event as callers see it; `None` for a key outside the prefix. A key or value that
/// is not UTF-8 is `Error::InvalidUtf8` naming the key (its invalid bytes shown as U+FFFD).
fn convert(prefix: &KeyPrefix, event: &Event) -> Result<Option<WatchEvent>> {
    let Some(kv) = event.kv() else {
        return Ok(None);
    };
    let stored = match std::str::from_utf8(kv.key()) {
        Ok(stored) => stored,
        Err(source) => {
            let Some(rest) = kv.key().strip_prefix(prefix.as_str().as_bytes()) else {
                return Ok(None);
            };
            return Err(Error::InvalidUtf8 {
                key: String::from_utf8_lossy(rest).into_owned(),
                source,
            });
        }
    };
    let Some(key) = prefix.strip(stored) else {
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

/// Cancels the watcher when its stream (or an abandoned registration) is dropped.
struct Registration {
    id: WatcherId,
    commands: mpsc::UnboundedSender<Command>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Fails only when the multiplexer has ended, and with it every watch.
        let _ = self.commands.send(Command::Cancel(self.id));
    }
}

/// The stream handed to callers: the watcher's events, routed by the multiplexer.
struct EventStream {
    events: EventReceiver,
    _registration: Registration,
}

impl Stream for EventStream {
    type Item = Result<WatchEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}
