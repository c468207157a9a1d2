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
/// It ends when the handle is closed; an `Err` item (such as [`Error::Compacted`]) is its last.
pub type WatchStream = BoxStream<'static, Result<WatchEvent>>;

/// The callback of [`Kvi::watch_with_cb`](crate::Kvi::watch_with_cb): return `false` to stop watching.
pub type WatchCallback = Box<dyn FnMut(&WatchEvent) -> bool + Send + 'static>;

thread_local! {
    // The watcher whose callback this thread is running, so that a callback may cancel its own watch.
    static RUNNING_WATCHER: Cell<usize> = const { Cell::new(0) };
}

struct Control {
    callback: Mutex<Option<WatchCallback>>,
    cancelled: AtomicBool,
    finished: AtomicBool,
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

    /// Runs the callback unless cancelled; `false` means stop.
    fn call(self: &Arc<Self>, event: &WatchEvent) -> bool {
        let mut slot = self.callback();
        if self.cancelled.load(Ordering::SeqCst) {
            return false;
        }
        let Some(callback) = slot.as_mut() else {
            return false;
        };
        let previous = RUNNING_WATCHER.with(|running| running.replace(self.id()));
        let outcome = catch_unwind(AssertUnwindSafe(|| callback(event)));
        RUNNING_WATCHER.with(|running| running.set(previous));
        match outcome {
            Ok(keep_going) => keep_going,
            Err(_) => {
                tracing::error!(key = event.key(), "watch callback panicked; the watch ends");
                false
            }
        }
    }

    fn finish(&self) {
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
    /// A callback may cancel its own watcher; it is then not called again after it returns.
    pub fn cancel(self) {
        let control = &self.control;
        control.cancelled.store(true, Ordering::SeqCst);
        let inside_own_callback = RUNNING_WATCHER.with(|running| running.get() == control.id());
        if !inside_own_callback {
            // Waits for a callback in flight on another thread, then drops it.
            control.finish();
        }
        control.finished.store(true, Ordering::SeqCst);
        self.task.abort();
    }

    /// Whether the watcher has stopped, for any reason.
    pub fn is_finished(&self) -> bool {
        self.control.finished.load(Ordering::SeqCst) || self.task.is_finished()
    }
}

/// Runs `callback` for every event of kind `change` that `stream` yields, with the
/// stop rules of the contract: the callback returns `false`; the key is deleted (a
/// `Delete` callback sees that event first); the handle is cancelled; the stream
/// ends (the store handle was closed) or fails.
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
    });
    let task = tokio::spawn(drive(stream, change, Arc::clone(&control)));
    WatchHandle { control, task }
}

async fn drive(mut stream: WatchStream, change: KeyChange, control: Arc<Control>) {
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(event) => event,
            Err(err) => {
                tracing::warn!(error = %err, "callback watcher ends");
                break;
            }
        };
        if event.change() == change && !control.call(&event) {
            break;
        }
        if event.change() == KeyChange::Delete {
            break;
        }
    }
    control.finish();
}

/// The first event of `stream`: how backends implement [`Kvi::watch`](crate::Kvi::watch).
/// A stream that ends without an event (the handle was closed) gives [`Error::Closed`].
pub async fn first_event(mut stream: WatchStream) -> Result<WatchEvent> {
    stream.next().await.unwrap_or(Err(Error::Closed))
}
