//! Watch streams and callback watchers, shared by every backend so that the
//! callback rules of the contract are written once.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::stream::BoxStream;
use futures::StreamExt;

use crate::{Error, KeyChange, Result, WatchEvent};

/// A stream of changes, in revision order, none missed and none repeated.
///
/// It ends when the handle is closed. An `Err` item is its last, with one exception: an
/// [`Error::InvalidUtf8`] item (another client wrote a key or value that is not UTF-8) stands
/// for that one event, and the stream goes on with the next. Every other error, such as
/// [`Error::Compacted`], ends the stream.
pub type WatchStream = BoxStream<'static, Result<WatchEvent>>;

/// The callback of [`Kvi::watch_with_cb`](crate::Kvi::watch_with_cb): return `false` to stop watching.
///
/// Callbacks are plain functions and may block: each runs where blocking is allowed (on a
/// multi-thread runtime in place, its worker's other tasks handed to another thread, as
/// `tokio::task::block_in_place` does; on a current-thread runtime on the blocking pool). A slow
/// callback therefore holds up only its own watcher's later events, never the runtime or other
/// watchers, and a callback may use a store handle synchronously:
///
/// ```
/// # use std::sync::Arc;
/// # use hmetcd_core::{KeyChange, Kvi, WatchEvent};
/// # async fn example(kv: Arc<dyn Kvi>) -> hmetcd_core::Result<()> {
/// let copier = Arc::clone(&kv);
/// let _handle = kv
///     .watch_with_cb("config", KeyChange::Put, Box::new(move |event: &WatchEvent| {
///         let copy = copier.store("config.copy", event.value().unwrap_or_default());
///         tokio::runtime::Handle::current().block_on(copy).is_ok()
///     }))
///     .await?;
/// # Ok(())
/// # }
/// ```
pub type WatchCallback = Box<dyn FnMut(&WatchEvent) -> bool + Send + 'static>;

/// Why a callback watcher stopped, as [`WatchHandle::finish_reason`] tells it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum WatchEnd {
    /// The callback returned `false`.
    CallbackReturnedFalse,
    /// The callback panicked (the panic is logged); it is not called again.
    CallbackPanicked,
    /// The key was deleted (a `Delete` callback saw that event first).
    KeyDeleted,
    /// The handle was cancelled (from inside a callback, or by [`WatchHandle::cancel`]).
    Cancelled,
    /// The store handle was closed or dropped, which ends every watcher.
    Closed,
    /// The watch failed, with this error; for example [`Error::Compacted`] when the watch
    /// could not resume after a reconnect without possibly skipping an event, or
    /// [`Error::InvalidUtf8`] for an event whose key or value is not UTF-8 (a callback
    /// watcher ends on it, since it cannot call the callback with that event).
    Failed(Arc<Error>),
}

thread_local! {
    // The watcher whose callback this thread is running (0: none), so that a callback may
    // cancel its own watch, and never waits for another watcher's callback.
    static RUNNING_WATCHER: Cell<usize> = const { Cell::new(0) };
}

struct Control {
    callback: Mutex<Option<WatchCallback>>,
    cancelled: AtomicBool,
    finished: AtomicBool,
    /// Why it finished; the first reason recorded stays.
    end: Mutex<Option<WatchEnd>>,
}

impl Control {
    fn id(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }

    fn callback(&self) -> MutexGuard<'_, Option<WatchCallback>> {
        self.callback
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records why the watcher stops, unless a reason is recorded already.
    fn end_with(&self, reason: WatchEnd) {
        self.end
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get_or_insert(reason);
    }

    /// Runs the callback unless cancelled; `Some` reason means stop.
    fn call(self: &Arc<Self>, event: &WatchEvent) -> Option<WatchEnd> {
        let mut slot = self.callback();
        if self.cancelled.load(Ordering::SeqCst) {
            return Some(WatchEnd::Cancelled);
        }
        let Some(callback) = slot.as_mut() else {
            return Some(WatchEnd::Cancelled);
        };
        let previous = RUNNING_WATCHER.with(|running| running.replace(self.id()));
        let outcome = catch_unwind(AssertUnwindSafe(|| callback(event)));
        RUNNING_WATCHER.with(|running| running.set(previous));
        match outcome {
            Ok(true) => None,
            Ok(false) => Some(WatchEnd::CallbackReturnedFalse),
            Err(_) => {
                tracing::error!(key = event.key(), "watch callback panicked; the watch ends");
                Some(WatchEnd::CallbackPanicked)
            }
        }
    }

    /// Runs the callback where blocking is allowed, so that a slow callback holds up only its
    /// own watcher: on a multi-thread runtime in place, after handing this worker's other tasks
    /// to another thread (`block_in_place`); on any other runtime on the blocking pool.
    async fn call_off_the_workers(control: &Arc<Self>, event: WatchEvent) -> Option<WatchEnd> {
        let flavor = tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor());
        if let Ok(tokio::runtime::RuntimeFlavor::MultiThread) = flavor {
            return tokio::task::block_in_place(|| control.call(&event));
        }
        let control = Arc::clone(control);
        match tokio::task::spawn_blocking(move || control.call(&event)).await {
            Ok(outcome) => outcome,
            // The runtime is shutting down and never ran it.
            Err(_) => Some(WatchEnd::Closed),
        }
    }

    fn finish(&self, reason: WatchEnd) {
        self.end_with(reason);
        self.callback().take();
        self.finished.store(true, Ordering::SeqCst);
    }
}

/// A running callback watcher, returned by [`Kvi::watch_with_cb`](crate::Kvi::watch_with_cb).
///
/// [`cancel`](WatchHandle::cancel) stops it; once `cancel` returns, the callback is never
/// called again. Dropping the handle detaches it: the watcher keeps running until one of
/// its own stop conditions.
pub struct WatchHandle {
    control: Arc<Control>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for WatchHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchHandle")
            .field("finished", &self.is_finished())
            .finish_non_exhaustive()
    }
}

impl WatchHandle {
    /// Stops the watcher. Once this returns the callback is not running and is never called again.
    ///
    /// Called from inside a watch callback (this watcher's or another's), it never waits: the
    /// watcher is marked cancelled and its callback is not called again after the one running
    /// now (if any) returns. Waiting there could deadlock, for instance two callbacks that
    /// cancel each other's watcher at the same moment.
    pub fn cancel(self) {
        let control = &self.control;
        control.cancelled.store(true, Ordering::SeqCst);
        control.end_with(WatchEnd::Cancelled);
        let inside_a_callback = RUNNING_WATCHER.with(|running| running.get() != 0);
        if !inside_a_callback {
            // Waits for a callback in flight on another thread, then drops it.
            control.finish(WatchEnd::Cancelled);
        }
        control.finished.store(true, Ordering::SeqCst);
        self.task.abort();
    }

    /// Whether the watcher has stopped, for any reason.
    pub fn is_finished(&self) -> bool {
        self.control.finished.load(Ordering::SeqCst) || self.task.is_finished()
    }

    /// Why the watcher stopped, once it has; `None` while it runs.
    ///
    /// A watcher that ends on an error (say [`Error::Compacted`] after a reconnect) reports
    /// [`WatchEnd::Failed`] with it here, so its owner learns what a log line alone would hide.
    pub fn finish_reason(&self) -> Option<WatchEnd> {
        let reason = self
            .control
            .end
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        match reason {
            Some(reason) => Some(reason),
            // Only a task that ended without recording a reason (it cannot, short of a bug).
            None if self.task.is_finished() => Some(WatchEnd::Closed),
            None => None,
        }
    }
}

/// Runs `callback` for every event of kind `change` that `stream` yields, with the
/// stop rules of the contract: the callback returns `false`; the key is deleted (a
/// `Delete` callback sees that event first); the handle is cancelled; the stream
/// ends (the store handle was closed) or yields an error. Every `Err` item ends the watcher,
/// an [`Error::InvalidUtf8`] one included (the callback cannot be given that event, and
/// skipping it would break "none missed"); [`WatchHandle::finish_reason`] then carries it.
///
/// Backends implement [`Kvi::watch_with_cb`](crate::Kvi::watch_with_cb) with it. It must be
/// called within a Tokio runtime.
pub fn spawn_callback_watcher(
    stream: WatchStream,
    change: KeyChange,
    callback: WatchCallback,
) -> WatchHandle {
    let control = Arc::new(Control {
        callback: Mutex::new(Some(callback)),
        cancelled: AtomicBool::new(false),
        finished: AtomicBool::new(false),
        end: Mutex::new(None),
    });
    let task = tokio::spawn(drive(stream, change, Arc::clone(&control)));
    WatchHandle { control, task }
}

async fn drive(mut stream: WatchStream, change: KeyChange, control: Arc<Control>) {
    let reason = loop {
        let Some(item) = stream.next().await else {
            break WatchEnd::Closed;
        };
        let event = match item {
            Ok(event) => event,
            Err(err) => {
                tracing::warn!(error = %err, "callback watcher ends");
                break WatchEnd::Failed(Arc::new(err));
            }
        };
        let deleted = event.change() == KeyChange::Delete;
        if event.change() == change {
            if let Some(reason) = Control::call_off_the_workers(&control, event).await {
                break reason;
            }
        }
        if deleted {
            break WatchEnd::KeyDeleted;
        }
    };
    control.finish(reason);
}

/// The first event of `stream`: how backends implement [`Kvi::watch`](crate::Kvi::watch).
/// A stream that ends without an event (the handle was closed) gives [`Error::Closed`].
pub async fn first_event(mut stream: WatchStream) -> Result<WatchEvent> {
    stream.next().await.unwrap_or(Err(Error::Closed))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    fn never_ending_watcher() -> WatchHandle {
        spawn_callback_watcher(
            futures::stream::pending().boxed(),
            KeyChange::Put,
            Box::new(|_| true),
        )
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|err| panic!("runtime: {err}"))
    }

    #[test]
    fn a_running_watcher_says_so() {
        let runtime = runtime();
        let handle = runtime.block_on(async { never_ending_watcher() });
        assert!(!handle.is_finished());
        assert!(handle.finish_reason().is_none());
        assert_eq!(format!("{handle:?}"), "WatchHandle { finished: false, .. }");
    }

    #[test]
    fn a_watcher_whose_runtime_shut_down_is_finished_and_says_closed() {
        let runtime = runtime();
        let handle = runtime.block_on(async { never_ending_watcher() });
        // Its task is dropped unfinished: it never recorded a reason.
        drop(runtime);
        assert!(handle.is_finished());
        assert!(matches!(handle.finish_reason(), Some(WatchEnd::Closed)));
    }
}
