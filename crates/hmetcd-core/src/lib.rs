//! The core of hmetcd: the [`Kvi`] trait every backend implements, its types, the one
//! [`Error`] enum, and the parsers for `open`'s endpoint and options strings.
//!
//! Applications use the `hmetcd` crate; backends depend on this crate alone.
//!
//! ```
//! use hmetcd_core::{CompareOp, Endpoint, Options};
//!
//! let op: CompareOp = "<".parse()?;
//! assert!(op.holds("val0051", "val0052"));
//! assert!(matches!(Endpoint::parse("mem:tests")?, Endpoint::Memory { .. }));
//! assert_eq!(Options::parse("")?, Options::default());
//! # Ok::<(), hmetcd_core::Error>(())
//! ```

mod data;
mod election;
mod endpoint;
mod error;
pub mod instrument;
pub mod keys;
mod kvi;
mod lock;
mod options;
mod types;
pub mod watch;

pub use data::{
    Compare, CompareTarget, KeyRange, ListPage, ListRequest, Op, Txn, TxnOutcome, MAX_TXN_OPS,
};
pub use election::{leader_stream, Candidacy, Candidate, LeaderStream, Leadership};
pub use endpoint::{Endpoint, EtcdUrl, Scheme};
pub use error::{BoxError, Error, Result};
pub use kvi::{update_with_txn, Kvi, UpdateFn};
pub use lock::{LockGuard, LockOptions, LockRelease, LostReason, LostSignal};
pub use options::{Options, Password, DEFAULT_HISTORY, DEFAULT_LOCK_NAME};
pub use types::{CompareOp, KeyChange, KeyValue, WatchEvent};
pub use watch::{WatchCallback, WatchHandle, WatchStream};
