//! The one error type every backend returns.

use std::time::Duration;

/// A boxed error from a backend or the operating system, kept as [`std::error::Error::source`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in an hmetcd call.
///
/// Callers match on the variant; the message names the key, option or endpoint
/// involved, and the backend's own error is kept as [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The endpoint given to `open` is not one this library understands.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },

    /// An option is unknown, given twice, or its value cannot be parsed.
    #[error("invalid option {option:?}: {reason}")]
    InvalidOption {
        /// The `name=value` pair as given (a password's value is redacted).
        option: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A key argument is not a valid key (keys are non-empty).
    #[error("invalid key {key:?} given as `{argument}`: {reason}")]
    InvalidKey {
        /// Which argument held the key (`key`, `then_key`, `else_key`, ...).
        argument: &'static str,
        /// The key as given.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A comparison operator string is not one of `=`, `==`, `!=`, `<`, `>`.
    #[error("invalid comparison operator {operator:?}: expected one of \"=\", \"==\", \"!=\", \"<\", \">\"")]
    InvalidOperator {
        /// The operator as given.
        operator: String,
    },

    /// `dist_timed_lock` gave up waiting.
    #[error("gave up waiting for lock {lock:?} after {timeout:?}")]
    LockTimeout {
        /// The lock's name.
        lock: String,
        /// How long the caller waited.
        timeout: Duration,
    },

    /// A request did not complete within `request_timeout`.
    #[error("{operation} timed out after {timeout:?}")]
    Timeout {
        /// The request that timed out, with its key where there is one.
        operation: String,
        /// The limit that was exceeded.
        timeout: Duration,
    },

    /// The store cannot be reached.
    #[error("{endpoints} unavailable: {reason}")]
    Unavailable {
        /// The endpoints that were tried.
        endpoints: String,
        /// What happened.
        reason: String,
        /// The backend's error.
        #[source]
        source: Option<BoxError>,
    },

    /// The handle was closed; no call succeeds on it any more.
    #[error("the handle is closed")]
    Closed,

    /// A watch could not resume because the revision it needs was compacted away.
    #[error("watch on {key:?} cannot resume at revision {revision}: the store is compacted up to revision {compact_revision}")]
    Compacted {
        /// The watched key or prefix (without the handle's prefix).
        key: String,
        /// The revision the watch needed.
        revision: i64,
        /// The oldest revision the store still keeps.
        compact_revision: i64,
    },

    /// The store rejected the credentials.
    #[error("authentication failed for user {user:?}: {reason}")]
    Unauthenticated {
        /// The user name (never the password).
        user: String,
        /// What the store said.
        reason: String,
        /// The backend's error.
        #[source]
        source: Option<BoxError>,
    },

    /// The user may not do this to this key.
    #[error("permission denied for {operation}: {reason}")]
    PermissionDenied {
        /// The request, with its key.
        operation: String,
        /// What the store said.
        reason: String,
        /// The backend's error.
        #[source]
        source: Option<BoxError>,
    },

    /// A value in the store is not valid UTF-8 (another client wrote raw bytes).
    #[error("value of key {key:?} is not valid UTF-8")]
    InvalidUtf8 {
        /// The key whose value could not be read (without the handle's prefix).
        key: String,
        /// Where decoding failed.
        #[source]
        source: std::str::Utf8Error,
    },

    /// The request needs something this build or backend does not have.
    #[error("{what} is not supported: {reason}")]
    NotSupported {
        /// What was asked for.
        what: String,
        /// Why it cannot be done, and what would make it possible.
        reason: String,
    },

    /// Any other failure reported by the backend.
    #[error("{operation} failed: {reason}")]
    Backend {
        /// The request that failed, with its key where there is one.
        operation: String,
        /// What the backend said.
        reason: String,
        /// The backend's error.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// An [`Error::InvalidKey`] for an empty key given as `argument`.
    pub fn empty_key(argument: &'static str) -> Self {
        Error::InvalidKey {
            argument,
            key: String::new(),
            reason: "keys must not be empty",
        }
    }

    /// Whether retrying the same call later may succeed (timeouts and outages).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Timeout { .. } | Error::Unavailable { .. })
    }
}
