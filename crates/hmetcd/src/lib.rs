//! hmetcd: a small, hard-to-misuse interface to etcd — get/store/delete, inclusive key
//! ranges, atomic if-then-else transactions and test-and-set, temporary keys that vanish
//! when their process dies, a distributed lock, and watches — with an in-memory backend
//! that behaves identically, for tests and single-instance services.
//!
//! [`open`] picks the backend from the endpoint:
//!
//! | endpoint | backend | cargo feature |
//! |---|---|---|
//! | `mem:` | the process-wide in-memory store | `mem` (default) |
//! | `mem:NAME` | the in-memory store named NAME | `mem` (default) |
//! | `http://h:p`, `https://h:p`, `h:p`, or a comma-separated list | etcd | `etcd` |
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> hmetcd::Result<()> {
//! use hmetcd::{CompareOp, Kvi};
//!
//! let kv = hmetcd::open("mem:", "prefix=demo/").await?;
//! kv.store("x0051", "val0051").await?;
//! let ran_then = kv
//!     .transaction("x0051", CompareOp::Less, "val0052", "winner", "then", "winner", "else")
//!     .await?;
//! assert!(ran_then);
//! assert_eq!(kv.get("winner").await?.as_deref(), Some("then"));
//! kv.close().await?;
//! # Ok(())
//! # }
//! ```

pub use hmetcd_core::keys;
pub use hmetcd_core::watch;
pub use hmetcd_core::{
    BoxError, Compare, CompareOp, CompareTarget, Endpoint, Error, EtcdUrl, KeyChange, KeyRange,
    KeyValue, Kvi, LeaderStream, Leadership, ListPage, ListRequest, LockGuard, LockOptions,
    LockRelease, LostReason, LostSignal, Op, Options, Password, Result, Scheme, Txn, TxnOutcome,
    UpdateFn, WatchCallback, WatchEvent, WatchHandle, WatchStream, DEFAULT_HISTORY,
    DEFAULT_LOCK_NAME, MAX_TXN_OPS,
};

/// The etcd backend (cargo feature `etcd`).
#[cfg(feature = "etcd")]
pub use hmetcd_etcd::{self as etcd, EtcdKvs};
/// The in-memory backend (cargo feature `mem`, on by default).
#[cfg(feature = "mem")]
pub use hmetcd_mem::{self as mem, MemKvs};

/// Opens a handle on the store named by `endpoint`, with `options` (`""` or comma-separated
/// `name=value` pairs: `request_timeout`, `connect_timeout`, `lease_ttl`, `lock_name`,
/// `prefix`, `user`, `password`, `ca_file`, `cert_file`, `key_file`).
///
/// Errors: [`Error::InvalidEndpoint`] for an endpoint that is neither `mem:`/`mem:NAME` nor
/// an etcd address; [`Error::NotSupported`] naming the cargo feature when the backend is not
/// compiled in; [`Error::InvalidOption`] naming the bad pair; [`Error::Unavailable`] when no
/// etcd endpoint answers within `connect_timeout`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let err = hmetcd::open("ftp://example:21", "").await.unwrap_err();
/// assert!(matches!(err, hmetcd::Error::InvalidEndpoint { .. }), "{err}");
/// let err = hmetcd::open("mem:", "lease_ttl=never").await.unwrap_err();
/// assert!(err.to_string().contains("lease_ttl=never"), "{err}");
/// # }
/// ```
pub async fn open(endpoint: &str, options: &str) -> Result<Box<dyn Kvi>> {
    match Endpoint::parse(endpoint)? {
        #[cfg(feature = "mem")]
        Endpoint::Memory { name } => Ok(Box::new(MemKvs::open(
            name.as_deref().unwrap_or(""),
            options,
        )?)),
        #[cfg(not(feature = "mem"))]
        Endpoint::Memory { .. } => Err(missing_feature(endpoint, "mem")),
        #[cfg(feature = "etcd")]
        Endpoint::Etcd(urls) => Ok(Box::new(
            EtcdKvs::connect_with(&urls, Options::parse(options)?).await?,
        )),
        #[cfg(not(feature = "etcd"))]
        Endpoint::Etcd(_) => Err(missing_feature(endpoint, "etcd")),
    }
}

#[cfg(any(not(feature = "mem"), not(feature = "etcd")))]
fn missing_feature(endpoint: &str, feature: &str) -> Error {
    Error::NotSupported {
        what: format!("endpoint {endpoint:?}"),
        reason: format!("this build of hmetcd lacks the `{feature}` cargo feature; enable it: hmetcd = {{ features = [\"{feature}\"] }}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mem_endpoints_share_by_name() {
        let a = open("mem:facade-test", "").await.unwrap();
        let b = open("mem:facade-test", "").await.unwrap();
        let other = open("mem:facade-other", "").await.unwrap();
        a.store("k", "v").await.unwrap();
        assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v"));
        assert_eq!(other.get("k").await.unwrap(), None);
    }

    #[tokio::test]
    async fn default_mem_store_outlives_close() {
        let a = open("mem:", "prefix=facade-default/").await.unwrap();
        a.store("k", "v").await.unwrap();
        a.close().await.unwrap();
        let b = open("mem:", "prefix=facade-default/").await.unwrap();
        assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v"));
    }

    #[cfg(not(feature = "etcd"))]
    #[tokio::test]
    async fn etcd_without_feature_names_the_feature() {
        for endpoint in [
            "http://127.0.0.1:2379",
            "127.0.0.1:2379",
            "https://a:1,https://b:2",
        ] {
            let err = open(endpoint, "").await.unwrap_err();
            assert!(matches!(err, Error::NotSupported { .. }), "{err}");
            assert!(err.to_string().contains("`etcd` cargo feature"), "{err}");
        }
    }

    #[tokio::test]
    async fn bad_endpoints_are_named() {
        for endpoint in ["", "mem", "etcd", "ftp://h:1", "h:port"] {
            let err = open(endpoint, "").await.unwrap_err();
            assert!(
                matches!(&err, Error::InvalidEndpoint { endpoint: e, .. } if e == endpoint),
                "{err}"
            );
        }
    }
}
