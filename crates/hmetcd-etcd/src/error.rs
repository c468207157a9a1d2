//! The one place where etcd-client errors become [`hmetcd_core::Error`].

use std::fmt;
use std::time::Duration;

use etcd_client::Error as EtcdError;
use hmetcd_core::Error;
use tonic::Code;

/// A request to etcd, named the way error messages show it: `get "a/b"` (a key longer than
/// 100 characters is cut, with its length: see [`Error::clipped_key`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request<'a> {
    /// What was asked (`get`, `put`, `lease grant`, ...).
    pub(crate) what: &'static str,
    /// The key involved, as the caller wrote it (without the prefix); empty for none.
    pub(crate) key: &'a str,
}

impl<'a> Request<'a> {
    pub(crate) fn new(what: &'static str, key: &'a str) -> Self {
        Request { what, key }
    }

    pub(crate) fn keyless(what: &'static str) -> Self {
        Request { what, key: "" }
    }
}

impl fmt::Display for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(self.what)
        } else {
            write!(f, "{} {}", self.what, Error::clipped_key(self.key))
        }
    }
}

/// What an error message needs to know about the handle.
#[derive(Debug, Clone)]
pub(crate) struct ErrorContext {
    /// The endpoints, comma-separated, as given.
    pub(crate) endpoints: String,
    /// The user name, if any (never the password).
    pub(crate) user: Option<String>,
    /// `request_timeout`, reported when etcd itself says a deadline passed.
    pub(crate) request_timeout: Duration,
}

impl ErrorContext {
    /// The `Error::Timeout` for a request that did not finish within `request_timeout`.
    pub(crate) fn timeout(&self, request: Request<'_>) -> Error {
        Error::Timeout {
            operation: request.to_string(),
            timeout: self.request_timeout,
        }
    }

    /// Maps an etcd-client error of `request` to the shared error enum.
    pub(crate) fn map(&self, request: Request<'_>, err: EtcdError) -> Error {
        let operation = request.to_string();
        let status = match &err {
            EtcdError::GRpcStatus(status) => status,
            EtcdError::TransportError(_) | EtcdError::IoError(_) => {
                return self.unavailable(format!("{operation}: {err}"), err);
            }
            _ => return backend(operation, err),
        };
        let message = status.message().to_owned();
        let message = message.as_str();
        match status.code() {
            // We never cancel a request ourselves: a cancelled one lost its connection.
            Code::Unavailable | Code::Cancelled => {
                self.unavailable(format!("{operation}: {message}"), err)
            }
            // tonic's wrapping of a broken connection (etcd 3.4 closing on a TLS client it
            // refuses; "Service was not ready: transport error" for a server going away).
            Code::Unknown if message.ends_with("transport error") => {
                self.unavailable(format!("{operation}: {err}"), err)
            }
            Code::DeadlineExceeded => self.timeout(request),
            Code::Unauthenticated => self.unauthenticated(message, err),
            Code::PermissionDenied => Error::PermissionDenied {
                operation,
                reason: message.to_owned(),
                source: Some(Box::new(err)),
            },
            _ if is_auth_failure(message) => self.unauthenticated(message, err),
            _ if message.contains("permission denied") => Error::PermissionDenied {
                operation,
                reason: message.to_owned(),
                source: Some(Box::new(err)),
            },
            // etcd answers these while it has no leader or its raft is slow: an outage, not a bug.
            _ if message.contains("request timed out") => self.timeout(request),
            _ if message.contains("no leader") || message.contains("leader changed") => {
                self.unavailable(format!("{operation}: {message}"), err)
            }
            // Only reads of an old revision are compacted; the message carries no revision numbers.
            _ if message.contains("compacted") => Error::Compacted {
                key: request.key.to_owned(),
                revision: 0,
                compact_revision: 0,
            },
            _ => backend(operation, err),
        }
    }

    /// An `Error::Unavailable` naming the endpoints.
    pub(crate) fn unavailable(&self, reason: String, err: impl Into<Option<EtcdError>>) -> Error {
        Error::Unavailable {
            endpoints: self.endpoints.clone(),
            reason,
            source: err.into().map(|err| Box::new(err) as hmetcd_core::BoxError),
        }
    }

    fn unauthenticated(&self, message: &str, err: EtcdError) -> Error {
        Error::Unauthenticated {
            user: self.user.clone().unwrap_or_default(),
            reason: message.to_owned(),
            source: Some(Box::new(err)),
        }
    }
}

fn backend(operation: String, err: EtcdError) -> Error {
    Error::Backend {
        operation,
        reason: err.to_string(),
        source: Some(Box::new(err)),
    }
}

/// Whether etcd refused the credentials or the token (it uses several status codes for it).
fn is_auth_failure(message: &str) -> bool {
    message.contains("authentication failed")
        || message.contains("user name is empty")
        || message.contains("user name not found")
        || message.contains("auth token")
}

/// The store revision an answer of `request` was read at.
pub(crate) fn revision_of(
    header: Option<&etcd_client::ResponseHeader>,
    request: Request<'_>,
) -> Result<i64, Error> {
    header
        .map(|header| header.revision())
        .ok_or_else(|| Error::Backend {
            operation: request.to_string(),
            reason: "etcd answered without a response header".to_owned(),
            source: None,
        })
}

/// Whether etcd says the lease does not exist (expired or revoked).
pub(crate) fn is_lease_not_found(err: &EtcdError) -> bool {
    match err {
        EtcdError::GRpcStatus(status) => status.message().contains("requested lease not found"),
        EtcdError::LeaseKeepAliveError(message) => message.contains("lease not found"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> ErrorContext {
        ErrorContext {
            endpoints: "http://127.0.0.1:1".into(),
            user: Some("svc".into()),
            request_timeout: Duration::from_secs(5),
        }
    }

    fn status(code: Code, message: &str) -> EtcdError {
        EtcdError::GRpcStatus(tonic::Status::new(code, message))
    }

    #[test]
    fn requests_cut_long_keys() {
        assert_eq!(Request::new("get", "a/b").to_string(), "get \"a/b\"");
        let key = "k".repeat(2 << 20);
        let shown = Request::new("put", &key).to_string();
        assert!(shown.len() < 200, "{} bytes", shown.len());
        assert!(shown.ends_with("… (2097152 bytes)"), "{shown}");
        let err = context().map(
            Request::new("put", &key),
            status(Code::InvalidArgument, "etcdserver: request is too large"),
        );
        assert!(err.to_string().len() < 300, "{err}");
    }

    #[test]
    fn every_kind_of_refusal_maps_to_its_variant() {
        let cx = context();
        let get = Request::new("get", "k");
        let io = EtcdError::IoError(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
        assert!(matches!(cx.map(get, io), Error::Unavailable { .. }));
        // By status code, whatever the message says.
        assert!(matches!(
            cx.map(get, status(Code::Unauthenticated, "x")),
            Error::Unauthenticated { .. }
        ));
        assert!(matches!(
            cx.map(get, status(Code::PermissionDenied, "x")),
            Error::PermissionDenied { .. }
        ));
        assert!(matches!(
            cx.map(get, status(Code::Cancelled, "x")),
            Error::Unavailable { .. }
        ));
        // An unknown status is a transport failure only when it says so.
        assert!(matches!(
            cx.map(get, status(Code::Unknown, "boom")),
            Error::Backend { .. }
        ));
        // By message, whatever the status code.
        for message in [
            "etcdserver: authentication failed, invalid user ID or password",
            "etcdserver: user name is empty",
            "etcdserver: user name not found",
            "etcdserver: invalid auth token",
        ] {
            assert!(
                matches!(
                    cx.map(get, status(Code::FailedPrecondition, message)),
                    Error::Unauthenticated { .. }
                ),
                "{message}"
            );
        }
        assert!(matches!(
            cx.map(
                get,
                status(Code::FailedPrecondition, "etcdserver: permission denied")
            ),
            Error::PermissionDenied { .. }
        ));
        assert!(matches!(
            cx.map(get, status(Code::Unknown, "etcdserver: request timed out")),
            Error::Timeout { .. }
        ));
        for message in ["etcdserver: no leader", "etcdserver: leader changed"] {
            assert!(
                matches!(
                    cx.map(get, status(Code::Unknown, message)),
                    Error::Unavailable { .. }
                ),
                "{message}"
            );
        }
    }

    #[test]
    fn only_a_missing_lease_is_a_lost_lease() {
        assert!(is_lease_not_found(&EtcdError::LeaseKeepAliveError(
            "lease not found".into()
        )));
        assert!(!is_lease_not_found(&EtcdError::LeaseKeepAliveError(
            "stream closed".into()
        )));
        assert!(!is_lease_not_found(&status(
            Code::NotFound,
            "key not found"
        )));
        assert!(!is_lease_not_found(&EtcdError::InvalidArgs(
            "requested lease not found".into()
        )));
    }

    #[test]
    fn statuses_map_to_variants() {
        let cx = context();
        let get = Request::new("get", "k");
        assert!(matches!(
            cx.map(get, status(Code::Unavailable, "x")),
            Error::Unavailable { .. }
        ));
        assert!(
            matches!(cx.map(get, status(Code::DeadlineExceeded, "x")), Error::Timeout { operation, .. } if operation == "get \"k\"")
        );
        assert!(matches!(
            cx.map(get, status(Code::InvalidArgument, "etcdserver: authentication failed, invalid user ID or password")),
            Error::Unauthenticated { user, .. } if user == "svc"
        ));
        assert!(matches!(
            cx.map(get, status(Code::PermissionDenied, "etcdserver: permission denied")),
            Error::PermissionDenied { operation, .. } if operation.contains("\"k\"")
        ));
        assert!(matches!(
            cx.map(
                get,
                status(
                    Code::OutOfRange,
                    "etcdserver: mvcc: required revision has been compacted"
                )
            ),
            Error::Compacted { .. }
        ));
        assert!(matches!(
            cx.map(get, status(Code::Unknown, "transport error")),
            Error::Unavailable { .. }
        ));
        assert!(matches!(
            cx.map(
                get,
                status(Code::Unknown, "Service was not ready: transport error")
            ),
            Error::Unavailable { .. }
        ));
        assert!(matches!(
            cx.map(get, status(Code::Internal, "boom")),
            Error::Backend { .. }
        ));
        assert!(is_lease_not_found(&status(
            Code::NotFound,
            "etcdserver: requested lease not found"
        )));
    }
}
