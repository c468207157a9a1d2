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
//! Every handle is a [`Kvi`]: its page is the contract — reads and writes, ranges and
//! prefixes, transactions ([`Txn`]), temp keys, locks ([`LockGuard`], with fencing tokens and a
//! lost-lock signal), leader election ([`Leadership`]) and watches — and both backends keep
//! it to the letter. Errors are one enum, [`Error`].
//!
//! **Cargo features.** `mem` (default): the in-memory store, [`MemKvs`]. `etcd`: the etcd
//! backend, `EtcdKvs`; its build needs `protoc`, the Protocol Buffers compiler
//! (`apt install protobuf-compiler libprotobuf-dev`, or set `PROTOC`). Tests of a service can
//! depend on `hmetcd-mem` alone, whose `MemKvs::faults()` causes lease expiry, partitions and
//! compaction on demand.
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

#![cfg_attr(docsrs, feature(doc_cfg))]

pub use hmetcd_core::watch::WatchEnd;
pub use hmetcd_core::{
    Compare, CompareOp, CompareTarget, Error, KeyChange, KeyRange, KeyValue, Kvi, LeaderStream,
    Leadership, ListPage, ListRequest, LockGuard, LockOptions, LostReason, Op, Options, Result,
    Txn, TxnOutcome, UpdateFn, WatchCallback, WatchEvent, WatchHandle, WatchStream,
    DEFAULT_HISTORY, DEFAULT_LOCK_NAME, MAX_TXN_OPS,
};

/// What backends are built from: the traits a backend implements behind [`LockGuard`] and
/// [`Leadership`], key and prefix rules, the callback-watcher runner, and the endpoint and
/// option parsers. Applications do not need any of it; a new backend (or a test double) does.
pub mod backend {
    pub use hmetcd_core::keys;
    pub use hmetcd_core::watch::{first_event, spawn_callback_watcher};
    pub use hmetcd_core::{
        leader_stream, update_with_txn, BoxError, Candidacy, Candidate, Endpoint, EtcdUrl,
        LockRelease, LostSignal, Password, Scheme,
    };
}

/// The etcd backend (cargo feature `etcd`).
#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub use hmetcd_etcd::{self as etcd, EtcdKvs};
/// The in-memory backend (cargo feature `mem`, on by default).
#[cfg(feature = "mem")]
#[cfg_attr(docsrs, doc(cfg(feature = "mem")))]
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
    match backend::Endpoint::parse(endpoint)? {
        #[cfg(feature = "mem")]
        backend::Endpoint::Memory { name } => Ok(Box::new(MemKvs::open(
            name.as_deref().unwrap_or(""),
            options,
        )?)),
        #[cfg(not(feature = "mem"))]
        backend::Endpoint::Memory { .. } => Err(missing_feature(endpoint, "mem")),
        #[cfg(feature = "etcd")]
        backend::Endpoint::Etcd(urls) => Ok(Box::new(
            EtcdKvs::connect_with(&urls, Options::parse(options)?).await?,
        )),
        #[cfg(not(feature = "etcd"))]
        backend::Endpoint::Etcd(_) => Err(missing_feature(endpoint, "etcd")),
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
