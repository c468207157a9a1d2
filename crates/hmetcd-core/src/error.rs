//! The one error type every backend returns.

use std::fmt;
use std::time::Duration;

/// Characters of a key that error messages show; the rest is summed up by its length.
const SHOWN_KEY_CHARS: usize = 100;

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
    #[error("invalid key {} given as `{argument}`: {reason}", clipped(.key))]
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
    ///
    /// **The outcome of a write is unknown**: the request may have reached the store and been
    /// applied after all. Re-read before retrying a conditional write (`tas`, `transaction`,
    /// `txn`), whose second attempt may see its own first one; plain `store` and `delete` are
    /// safe to repeat.
    #[error("{operation} timed out after {timeout:?} (a write may have been applied)")]
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

    /// A watch could not resume, or a read could not be answered, because the revision it
    /// needs was compacted away.
    #[error("{}", compacted_message(.key, *.revision, *.compact_revision))]
    Compacted {
        /// The watched or read key or prefix (without the handle's prefix).
        key: String,
        /// The revision that was needed; 0 when the store did not say (a read).
        revision: i64,
        /// The oldest revision the store still keeps; 0 when the store did not say.
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

    /// A key or value in the store is not valid UTF-8 (another client wrote raw bytes).
    #[error("key {} or its value is not valid UTF-8", clipped(.key))]
    InvalidUtf8 {
        /// The key whose value could not be read (without the handle's prefix); a key that is
        /// not UTF-8 itself is shown with U+FFFD for its invalid bytes.
        key: String,
        /// Where decoding failed.
        #[source]
        source: std::str::Utf8Error,
    },

    /// A leader-only call ([`Leadership::proclaim`](crate::Leadership::proclaim)) after the
    /// leadership was lost.
    #[error("not the leader of election {}: {reason}", clipped(.election))]
    NotLeader {
        /// The election's name.
        election: String,
        /// Why: how the leadership was lost.
        reason: String,
    },

    /// A request that is malformed as a whole: an empty or over-long transaction, a key
    /// written twice in one transaction branch, a list page limit of 0, a watch revision
    /// below 1. Nothing was written.
    #[error("invalid {what}: {reason}")]
    InvalidArgument {
        /// What was malformed (`transaction`, `list request`, ...).
        what: String,
        /// Why.
        reason: String,
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

    /// `key` as error messages show it: quoted like `{:?}`, and cut after its first 100
    /// characters, with its length in bytes (`"kkk…"… (2097152 bytes)`), so that a huge key
    /// does not make a huge message. Backends use it for keys in their own messages.
    pub fn clipped_key(key: &str) -> impl fmt::Display + '_ {
        clipped(key)
    }

    /// Whether retrying the same call later may succeed (timeouts and outages).
    ///
    /// This does not make a retry safe: after a [`Error::Timeout`] (and an
    /// [`Error::Unavailable`] from a connection lost mid-request) a write's outcome is
    /// unknown — it may have been applied. Reads, `store` and `delete` may be retried blindly;
    /// a `tas`, `transaction` or `txn` should re-read first, since a retry may compare against
    /// its own first attempt's write. [`Kvi::update`](crate::Kvi::update) retries safely by
    /// itself.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Timeout { .. } | Error::Unavailable { .. })
    }
}

/// The message of [`Error::Compacted`]: says only the revisions the store gave.
fn compacted_message(key: &str, revision: i64, compact_revision: i64) -> String {
    let key = clipped(key);
    match (revision, compact_revision) {
        (0, 0) => format!("read of {key} needs a revision that the store compacted away"),
        (0, kept) => format!(
            "read of {key} needs a revision that the store compacted away (it keeps revisions \
             from {kept} on)"
        ),
        (needed, 0) => format!("revision {needed} of {key} is compacted away"),
        (needed, kept) => format!(
            "watch on {key} cannot resume at revision {needed}: the store is compacted up to \
             revision {kept}"
        ),
    }
}

/// A key in a message: see [`Error::clipped_key`].
struct ClippedKey<'a>(&'a str);

fn clipped(key: &str) -> ClippedKey<'_> {
    ClippedKey(key)
}

impl fmt::Display for ClippedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = self.0;
        match key.char_indices().nth(SHOWN_KEY_CHARS) {
            None => write!(f, "{key:?}"),
            Some((cut, _)) => write!(f, "{:?}… ({} bytes)", &key[..cut], key.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_timeouts_and_outages_are_transient() {
        let timeout = Error::Timeout {
            operation: "get".into(),
            timeout: Duration::from_secs(1),
        };
        let unavailable = Error::Unavailable {
            endpoints: "http://127.0.0.1:2379".into(),
            reason: "connection refused".into(),
            source: None,
        };
        assert!(timeout.is_transient());
        assert!(unavailable.is_transient());
        for lasting in [
            Error::Closed,
            Error::LockTimeout {
                lock: "jobs".into(),
                timeout: Duration::from_secs(1),
            },
            Error::InvalidArgument {
                what: "key".into(),
                reason: "empty".into(),
            },
            Error::Compacted {
                key: "k".into(),
                revision: 3,
                compact_revision: 5,
            },
        ] {
            assert!(!lasting.is_transient(), "{lasting}");
        }
    }

    #[test]
    fn short_keys_are_shown_whole() {
        assert_eq!(Error::clipped_key("a/b").to_string(), "\"a/b\"");
        let hundred = "é".repeat(100);
        assert_eq!(
            Error::clipped_key(&hundred).to_string(),
            format!("{hundred:?}")
        );
        assert_eq!(Error::clipped_key("").to_string(), "\"\"");
    }

    #[test]
    fn long_keys_are_cut_with_their_length() {
        let key = "k".repeat(2 << 20);
        let shown = Error::clipped_key(&key).to_string();
        assert_eq!(shown, format!("{:?}… (2097152 bytes)", "k".repeat(100)));
        // Cut on a character boundary: 101 two-byte characters.
        let key = "é".repeat(101);
        assert_eq!(
            Error::clipped_key(&key).to_string(),
            format!("{:?}… (202 bytes)", "é".repeat(100))
        );
    }

    #[test]
    fn compacted_says_only_what_the_store_said() {
        let read = Error::Compacted {
            key: "k".into(),
            revision: 0,
            compact_revision: 0,
        };
        assert_eq!(
            read.to_string(),
            "read of \"k\" needs a revision that the store compacted away"
        );
        let watch = Error::Compacted {
            key: "k".into(),
            revision: 4,
            compact_revision: 9,
        };
        assert!(watch.to_string().contains("at revision 4"));
        assert!(watch.to_string().contains("up to revision 9"));
        assert!(!read.to_string().contains("revision 0"));
    }

    #[test]
    fn timeouts_warn_that_a_write_may_have_been_applied() {
        let err = Error::Timeout {
            operation: "tas \"k\"".into(),
            timeout: Duration::from_secs(5),
        };
        assert!(err.is_transient());
        assert!(err.to_string().contains("may have been applied"), "{err}");
    }

    #[test]
    fn messages_clip_their_keys() {
        let key = "k".repeat(2 << 20);
        let errors = [
            Error::InvalidKey {
                argument: "key",
                key: key.clone(),
                reason: "too long",
            },
            Error::Compacted {
                key: key.clone(),
                revision: 2,
                compact_revision: 3,
            },
        ];
        for err in errors {
            let shown = err.to_string();
            assert!(shown.len() < 300, "{shown}");
            assert!(shown.contains("(2097152 bytes)"), "{shown}");
        }
    }
}
