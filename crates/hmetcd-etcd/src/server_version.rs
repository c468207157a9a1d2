//! What the handle must know of the etcd servers' versions.
//!
//! etcd 3.5.0 to 3.5.4 crash (`panic: unexpected error during txn`, etcd issue 14110, fixed
//! in 3.5.5) when the request of a **read-only** transaction is cancelled while the server
//! reads for it: it hands the request's context down to the read, and a read that fails inside
//! a transaction is fatal. A request is cancelled when its caller gives up on it (a timeout, a
//! dropped future) or its connection closes. Plain range requests are not affected, nor are
//! transactions that write, nor etcd 3.4 and 3.5.5 on.
//!
//! So on such a server the handle sends no read-only transaction it might cancel:
//! - coalesced reads go out one by one, as plain range requests (see [`crate::coalesce`]);
//! - the lock's wait reads with plain range requests in any case (see [`crate::lock`]);
//! - a caller's own read-only [`hmetcd_core::Txn`] (reads only) is sent on a task of its own
//!   that lets it finish: the caller still gets its timeout on time, but the request is not
//!   cancelled. Only a connection that closes under it (the handle closed, or the link lost)
//!   can still cancel it.
//!
//! Until the servers' versions are known, the handle assumes the worst.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Whether every etcd server this handle talks to survives a cancelled read-only transaction;
/// `false` until known. Shared by the handle, its coalescer and its member health checks.
#[derive(Clone, Default)]
pub(crate) struct ReadOnlyTxns(Arc<AtomicBool>);

impl ReadOnlyTxns {
    /// Whether read-only transactions may be cancelled in flight.
    pub(crate) fn cancel_safe(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Records the versions of every server the handle talks to (`None` for one whose version
    /// is not known).
    pub(crate) fn set_from<'a>(&self, versions: impl IntoIterator<Item = Option<&'a str>>) {
        let mut versions = versions.into_iter().peekable();
        let known = versions.peek().is_some();
        let safe =
            known && versions.all(|version| version.is_some_and(survives_cancelled_read_txn));
        let was = self.0.swap(safe, Ordering::AcqRel);
        if was != safe {
            tracing::debug!(
                cancel_safe = safe,
                "read-only transactions {}",
                if safe {
                    "may be cancelled in flight on every etcd server"
                } else {
                    "must not be cancelled in flight (etcd 3.5.0 to 3.5.4, or a version not known)"
                }
            );
        }
    }
}

/// Whether etcd `version` (as its status reports it, e.g. `3.5.1`) survives a read-only
/// transaction cancelled while it reads: anything but 3.5.0 to 3.5.4 (their pre-releases
/// included). A version that does not parse is taken as unsafe.
pub(crate) fn survives_cancelled_read_txn(version: &str) -> bool {
    let mut parts = version.trim().trim_start_matches('v').splitn(3, '.');
    let number = |part: Option<&str>| -> Option<u64> {
        let digits: String = part?.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    match (
        number(parts.next()),
        number(parts.next()),
        number(parts.next()),
    ) {
        (Some(3), Some(5), Some(patch)) => patch >= 5,
        (Some(_), Some(_), Some(_)) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_etcd_3_5_0_to_3_5_4_crash_on_a_cancelled_read_txn() {
        for safe in [
            "3.4.23", "3.4.0", "3.5.5", "3.5.17", "3.6.0", "v3.5.9", "3.5.10", "4.0.0",
        ] {
            assert!(survives_cancelled_read_txn(safe), "{safe}");
        }
        for unsafe_ in [
            "3.5.0",
            "3.5.1",
            "3.5.4",
            "3.5.0-rc.1",
            "v3.5.2",
            "",
            "3.5",
            "x.y.z",
        ] {
            assert!(!survives_cancelled_read_txn(unsafe_), "{unsafe_}");
        }
    }

    #[test]
    fn every_server_must_be_known_and_safe() {
        let flag = ReadOnlyTxns::default();
        assert!(!flag.cancel_safe());
        flag.set_from([Some("3.5.5"), Some("3.4.23")]);
        assert!(flag.cancel_safe());
        flag.set_from([Some("3.5.5"), None]);
        assert!(!flag.cancel_safe());
        flag.set_from([Some("3.5.5")]);
        assert!(flag.cancel_safe());
        flag.set_from([Some("3.5.5"), Some("3.5.1")]);
        assert!(!flag.cancel_safe());
        flag.set_from(std::iter::empty());
        assert!(!flag.cancel_safe());
    }
}
