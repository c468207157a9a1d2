//! The data API's requests and answers: listing pages of keys ([`ListRequest`],
//! [`ListPage`]) and multi-operation transactions ([`Txn`], [`Compare`], [`Op`],
//! [`TxnOutcome`]).

use std::collections::HashSet;

use crate::keys::check_key;
use crate::{CompareOp, Error, KeyValue, Leadership, LockGuard, Result};

/// The most operations etcd accepts in one branch of a transaction, and the most compares
/// (its `--max-txn-ops`, 128 by default). Both backends refuse more.
pub const MAX_TXN_OPS: usize = 128;

/// Which keys a [`ListRequest`] covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRange {
    /// Every key starting with the prefix (an empty prefix: every key under the handle's
    /// `prefix` option).
    Prefix(String),
    /// Every key `k` with `start <= k <= end`, both inclusive, byte order; empty when
    /// `start > end`. An empty `start` means from the first key.
    Inclusive {
        /// The first key.
        start: String,
        /// The last key, inclusive.
        end: String,
    },
}

impl KeyRange {
    /// Whether `key` (without the handle's prefix) lies in this range.
    pub fn contains(&self, key: &str) -> bool {
        match self {
            KeyRange::Prefix(prefix) => key.starts_with(prefix.as_str()),
            KeyRange::Inclusive { start, end } => start.as_str() <= key && key <= end.as_str(),
        }
    }
}

/// What [`Kvi::list`](crate::Kvi::list) reads: a range or a prefix, in pages.
///
/// ```
/// use hmetcd_core::ListRequest;
///
/// let first = ListRequest::prefix("nodes/").limit(1000);
/// let next = ListRequest::prefix("nodes/").limit(1000).after("nodes/0999");
/// let names = ListRequest::range("a", "m").keys_only();
/// # let _ = (first, next, names);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRequest {
    range: KeyRange,
    limit: Option<usize>,
    after: Option<String>,
    keys_only: bool,
}

impl ListRequest {
    /// Every key starting with `prefix`; an empty prefix is every key under the handle's
    /// `prefix` option.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        Self::of(KeyRange::Prefix(prefix.into()))
    }

    /// Every key `k` with `start <= k <= end_inclusive` (byte order), as
    /// [`get_range`](crate::Kvi::get_range) reads.
    pub fn range(start: impl Into<String>, end_inclusive: impl Into<String>) -> Self {
        Self::of(KeyRange::Inclusive {
            start: start.into(),
            end: end_inclusive.into(),
        })
    }

    fn of(range: KeyRange) -> Self {
        ListRequest {
            range,
            limit: None,
            after: None,
            keys_only: false,
        }
    }

    /// At most `n` items per page (at least 1; the default is every matching key).
    #[must_use]
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = Some(n);
        self
    }

    /// Starts strictly after `key`: give the last key of one page to read the next.
    #[must_use]
    pub fn after(mut self, key: impl Into<String>) -> Self {
        self.after = Some(key.into());
        self
    }

    /// Reads the keys and their metadata only; values are left empty.
    #[must_use]
    pub fn keys_only(mut self) -> Self {
        self.keys_only = true;
        self
    }

    /// The keys the request covers.
    pub fn key_range(&self) -> &KeyRange {
        &self.range
    }

    /// The page size; `None` for every matching key.
    pub fn page_limit(&self) -> Option<usize> {
        self.limit
    }

    /// The key the page starts after, if any.
    pub fn start_after(&self) -> Option<&str> {
        self.after.as_deref()
    }

    /// Whether values are left out.
    pub fn is_keys_only(&self) -> bool {
        self.keys_only
    }

    /// Whether `key` (without the handle's prefix) matches: in the range and after `after`.
    pub fn matches(&self, key: &str) -> bool {
        self.range.contains(key) && self.after.as_deref().is_none_or(|after| key > after)
    }

    /// The first key (without the handle's prefix) that may match, inclusive; `None` when
    /// nothing can match (an inclusive range with `start > end`).
    pub fn lower_bound(&self) -> Option<String> {
        let start = match &self.range {
            KeyRange::Prefix(prefix) => prefix.as_str(),
            KeyRange::Inclusive { start, end } => {
                if start > end {
                    return None;
                }
                start.as_str()
            }
        };
        match self.after.as_deref() {
            // The first key after `after` is `after` followed by a NUL byte.
            Some(after) if after >= start => Some(format!("{after}\0")),
            _ => Some(start.to_owned()),
        }
    }

    /// Checks the request: the limit is at least 1.
    pub fn check(&self) -> Result<()> {
        if self.limit == Some(0) {
            return Err(Error::InvalidArgument {
                what: "list request".into(),
                reason: "limit(0): a page holds at least one item".into(),
            });
        }
        Ok(())
    }
}

/// One page of a [`list`](crate::Kvi::list).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// The items, sorted by key.
    pub items: Vec<KeyValue>,
    /// Whether more matching keys follow this page: ask again with
    /// [`after`](ListRequest::after) the last item's key.
    pub more: bool,
    /// How many keys match the request in total (its range, after its `after`), this
    /// page's included.
    pub count: i64,
    /// The store revision the page was read at.
    pub revision: i64,
}

impl ListPage {
    /// A page; backends build it.
    pub fn new(items: Vec<KeyValue>, more: bool, count: i64, revision: i64) -> Self {
        ListPage {
            items,
            more,
            count,
            revision,
        }
    }
}

/// What a [`Compare`] looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CompareTarget {
    /// The value, byte-wise; false for every operator when the key is missing.
    Value(CompareOp, String),
    /// The key's create revision (0 when missing).
    CreateRevision(CompareOp, i64),
    /// The key's last modification revision (0 when missing).
    ModRevision(CompareOp, i64),
    /// The key's version (0 when missing).
    Version(CompareOp, i64),
}

/// One condition of a [`Txn`]; all of a transaction's conditions must hold for its `then`
/// branch to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    key: String,
    target: CompareTarget,
}

impl Compare {
    /// `value_of(key) op value`, byte-wise; false for every operator when `key` is missing.
    pub fn value(key: impl Into<String>, op: CompareOp, value: impl Into<String>) -> Self {
        Self::on(key, CompareTarget::Value(op, value.into()))
    }

    /// `key` exists.
    pub fn exists(key: impl Into<String>) -> Self {
        Self::on(key, CompareTarget::CreateRevision(CompareOp::Greater, 0))
    }

    /// `key` does not exist.
    pub fn missing(key: impl Into<String>) -> Self {
        Self::on(key, CompareTarget::CreateRevision(CompareOp::Equal, 0))
    }

    /// `mod_revision_of(key) op revision`; a missing key's is 0.
    pub fn mod_revision(key: impl Into<String>, op: CompareOp, revision: i64) -> Self {
        Self::on(key, CompareTarget::ModRevision(op, revision))
    }

    /// `create_revision_of(key) op revision`; a missing key's is 0.
    pub fn create_revision(key: impl Into<String>, op: CompareOp, revision: i64) -> Self {
        Self::on(key, CompareTarget::CreateRevision(op, revision))
    }

    /// `version_of(key) op version`; a missing key's is 0.
    pub fn version(key: impl Into<String>, op: CompareOp, version: i64) -> Self {
        Self::on(key, CompareTarget::Version(op, version))
    }

    /// Holds while `guard`'s lock key still exists with the guard's fencing token: the lock is
    /// still this guard's (Go's `Mutex.IsOwner()`). A holder that lost its lock — `max_hold`,
    /// a lost lease, a deleted key, an unlock — cannot write through it. Use it in a
    /// transaction on the handle that took the lock (or one with the same `prefix` option).
    ///
    /// ```
    /// # use hmetcd_core::{Compare, Kvi, Op, Txn};
    /// # async fn example(kv: &dyn Kvi) -> hmetcd_core::Result<()> {
    /// let guard = kv.lock("jobs").await?;
    /// let outcome = kv
    ///     .txn(Txn::new().when(Compare::held(&guard)).then(Op::put("jobs/state", "done")))
    ///     .await?;
    /// assert!(outcome.succeeded);
    /// # Ok(())
    /// # }
    /// ```
    pub fn held(guard: &LockGuard) -> Self {
        Self::create_revision(guard.key(), CompareOp::Equal, guard.fencing_token())
    }

    /// Holds while `leadership`'s candidate key still exists with its fencing token: this
    /// candidate still leads. Use it on the handle that campaigned (or one with the same
    /// `prefix` option).
    pub fn leading(leadership: &Leadership) -> Self {
        Self::create_revision(
            leadership.key(),
            CompareOp::Equal,
            leadership.fencing_token(),
        )
    }

    fn on(key: impl Into<String>, target: CompareTarget) -> Self {
        Compare {
            key: key.into(),
            target,
        }
    }

    /// The key compared (without the handle's prefix).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What is compared.
    pub fn target(&self) -> &CompareTarget {
        &self.target
    }

    /// Whether the condition holds for `kv`, the key's current state (`None`: missing), as
    /// etcd decides it.
    pub fn holds(&self, kv: Option<&KeyValue>) -> bool {
        let number = |field: fn(&KeyValue) -> i64| kv.map_or(0, field);
        let ordered = |op: CompareOp, stored: i64, given: i64| match op {
            CompareOp::Equal => stored == given,
            CompareOp::NotEqual => stored != given,
            CompareOp::Less => stored < given,
            CompareOp::Greater => stored > given,
        };
        match &self.target {
            CompareTarget::Value(op, value) => kv.is_some_and(|kv| op.holds(&kv.value, value)),
            CompareTarget::CreateRevision(op, given) => {
                ordered(*op, number(|kv| kv.create_revision), *given)
            }
            CompareTarget::ModRevision(op, given) => {
                ordered(*op, number(|kv| kv.mod_revision), *given)
            }
            CompareTarget::Version(op, given) => ordered(*op, number(|kv| kv.version), *given),
        }
    }
}

/// One operation of a [`Txn`] branch. Operations run in order; a [`get`](Op::get) sees the
/// writes before it in the same branch.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// Create or overwrite `key` (no lease).
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Create or overwrite `key`, bound to the handle's lease like a temp key.
    PutTemp {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Delete `key` (absent: nothing happens).
    Delete {
        /// The key.
        key: String,
    },
    /// Delete every key starting with `prefix` (never empty).
    DeletePrefix {
        /// The prefix.
        prefix: String,
    },
    /// Read `key`; its state lands in [`TxnOutcome::gets`].
    Get {
        /// The key.
        key: String,
    },
}

impl Op {
    /// Create or overwrite `key` with `value`.
    pub fn put(key: impl Into<String>, value: impl Into<String>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    /// Create or overwrite `key` with `value`, bound to the handle's lease: like
    /// [`store_temp`](crate::Kvi::store_temp), the key vanishes with the handle.
    pub fn put_temp(key: impl Into<String>, value: impl Into<String>) -> Self {
        Op::PutTemp {
            key: key.into(),
            value: value.into(),
        }
    }

    /// Delete `key`.
    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }

    /// Delete every key starting with `prefix` (an empty prefix is refused).
    pub fn delete_prefix(prefix: impl Into<String>) -> Self {
        Op::DeletePrefix {
            prefix: prefix.into(),
        }
    }

    /// Read `key`.
    pub fn get(key: impl Into<String>) -> Self {
        Op::Get { key: key.into() }
    }

    /// The key (or prefix) the operation is about.
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. }
            | Op::PutTemp { key, .. }
            | Op::Delete { key }
            | Op::Get { key } => key,
            Op::DeletePrefix { prefix } => prefix,
        }
    }
}

/// An atomic multi-key transaction: if every [`when`](Txn::when) condition holds, the
/// [`then`](Txn::then) operations run, otherwise the [`otherwise`](Txn::otherwise) ones, all
/// in one step. Run it with [`Kvi::txn`](crate::Kvi::txn).
///
/// A branch may write a key once: two puts of one key, or a put of a key that a delete in the
/// same branch covers, are refused (etcd's rule; deletes may overlap). A transaction needs at
/// least one operation, and at most [`MAX_TXN_OPS`] compares and operations per branch.
///
/// ```
/// # use hmetcd_core::{Compare, CompareOp, Kvi, Op, Txn};
/// # async fn example(kv: &dyn Kvi) -> hmetcd_core::Result<()> {
/// // Move a job from "queued" to "running" only if nobody took it first.
/// let outcome = kv
///     .txn(
///         Txn::new()
///             .when(Compare::value("jobs/17/state", CompareOp::Equal, "queued"))
///             .then(Op::put("jobs/17/state", "running"))
///             .then(Op::put_temp("jobs/17/owner", "worker-3"))
///             .otherwise(Op::get("jobs/17/owner")),
///     )
///     .await?;
/// if !outcome.succeeded {
///     let owner = outcome.gets[0].as_ref().map(|kv| kv.value.as_str());
///     tracing::info!(?owner, "job already taken");
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use = "a transaction does nothing until given to Kvi::txn"]
pub struct Txn {
    compares: Vec<Compare>,
    then: Vec<Op>,
    otherwise: Vec<Op>,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Txn::default()
    }

    /// Adds a condition; all must hold.
    pub fn when(mut self, compare: Compare) -> Self {
        self.compares.push(compare);
        self
    }

    /// Adds an operation to the branch that runs when every condition holds.
    pub fn then(mut self, op: Op) -> Self {
        self.then.push(op);
        self
    }

    /// Adds an operation to the branch that runs when a condition fails.
    pub fn otherwise(mut self, op: Op) -> Self {
        self.otherwise.push(op);
        self
    }

    /// The conditions.
    pub fn compares(&self) -> &[Compare] {
        &self.compares
    }

    /// The operations run when every condition holds.
    pub fn then_ops(&self) -> &[Op] {
        &self.then
    }

    /// The operations run when a condition fails.
    pub fn else_ops(&self) -> &[Op] {
        &self.otherwise
    }

    /// Checks the transaction as a whole before anything is sent: not empty, no branch (and
    /// not the conditions) longer than [`MAX_TXN_OPS`], no empty key, no key written twice
    /// in one branch. Errors are [`Error::InvalidArgument`] naming the reason, or
    /// [`Error::InvalidKey`] for an empty key.
    pub fn check(&self) -> Result<()> {
        if self.then.is_empty() && self.otherwise.is_empty() {
            return Err(invalid_txn(
                "it has no operation in either branch".to_owned(),
            ));
        }
        for (part, len) in [
            ("conditions", self.compares.len()),
            ("then branch", self.then.len()),
            ("otherwise branch", self.otherwise.len()),
        ] {
            if len > MAX_TXN_OPS {
                return Err(invalid_txn(format!(
                    "its {part} has {len} entries; at most {MAX_TXN_OPS} are allowed \
                     (etcd's max-txn-ops)"
                )));
            }
        }
        for compare in &self.compares {
            check_key("compare key", &compare.key)?;
        }
        check_branch("then", &self.then)?;
        check_branch("otherwise", &self.otherwise)
    }
}

fn check_branch(branch: &str, ops: &[Op]) -> Result<()> {
    for op in ops {
        let argument = match op {
            Op::DeletePrefix { .. } => "delete_prefix prefix",
            _ => "op key",
        };
        check_key(argument, op.key())?;
    }
    let mut puts = HashSet::new();
    for op in ops {
        let (Op::Put { key, .. } | Op::PutTemp { key, .. }) = op else {
            continue;
        };
        let deleted = ops.iter().any(|other| match other {
            Op::Delete { key: deleted } => deleted == key,
            Op::DeletePrefix { prefix } => key.starts_with(prefix.as_str()),
            _ => false,
        });
        if !puts.insert(key.as_str()) || deleted {
            return Err(invalid_txn(format!(
                "key {} is written twice in its {branch} branch",
                Error::clipped_key(key)
            )));
        }
    }
    Ok(())
}

fn invalid_txn(reason: String) -> Error {
    Error::InvalidArgument {
        what: "transaction".into(),
        reason,
    }
}

/// What a [`Txn`] did.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether every condition held, so the `then` branch ran.
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: i64,
    /// One entry per [`Op::get`] of the branch that ran, in order: the key's state, `None`
    /// when missing.
    pub gets: Vec<Option<KeyValue>>,
}

impl TxnOutcome {
    /// An outcome; backends build it.
    pub fn new(succeeded: bool, revision: i64, gets: Vec<Option<KeyValue>>) -> Self {
        TxnOutcome {
            succeeded,
            revision,
            gets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(txn: &Txn) -> String {
        match txn.check() {
            Err(Error::InvalidArgument { reason, .. }) => reason,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn a_list_request_says_what_it_was_given() {
        let plain = ListRequest::prefix("jobs/");
        assert_eq!(plain.key_range(), &KeyRange::Prefix("jobs/".to_owned()));
        assert_eq!(plain.page_limit(), None);
        assert_eq!(plain.start_after(), None);
        assert!(!plain.is_keys_only());
        let paged = ListRequest::range("a", "m")
            .limit(10)
            .after("c")
            .keys_only();
        assert_eq!(paged.page_limit(), Some(10));
        assert_eq!(paged.start_after(), Some("c"));
        assert!(paged.is_keys_only());
        assert!(!paged.matches("c"), "strictly after");
        assert!(paged.matches("d"));
        assert!(paged.matches("m"), "the end is inclusive");
        assert!(!paged.matches("n"));
    }

    #[test]
    fn transactions_are_checked_as_a_whole() {
        assert!(reason(&Txn::new()).contains("no operation"));
        assert!(reason(&Txn::new().when(Compare::exists("a"))).contains("no operation"));
        let mut long = Txn::new();
        for i in 0..=MAX_TXN_OPS {
            long = long.then(Op::put(format!("k{i}"), "v"));
        }
        assert!(reason(&long).contains("129 entries"));
        let twice = Txn::new()
            .then(Op::put("a", "1"))
            .then(Op::put_temp("a", "2"));
        assert!(reason(&twice).contains("\"a\" is written twice in its then branch"));
        let covered = Txn::new()
            .otherwise(Op::delete_prefix("a/"))
            .otherwise(Op::put("a/b", "1"));
        assert!(reason(&covered).contains("otherwise branch"));
        let deleted = Txn::new().then(Op::delete("a")).then(Op::put("a", "1"));
        assert!(reason(&deleted).contains("\"a\" is written twice in its then branch"));
        // Deletes may overlap, and each branch is checked on its own.
        Txn::new()
            .then(Op::delete("a/b"))
            .then(Op::delete_prefix("a/"))
            .then(Op::put("b", "1"))
            .otherwise(Op::put("b", "2"))
            .check()
            .unwrap_or_else(|err| panic!("{err}"));
        let mut full = Txn::new();
        for i in 0..MAX_TXN_OPS {
            full = full.then(Op::put(format!("k{i}"), "v"));
        }
        assert!(full.check().is_ok());
        match Txn::new().then(Op::delete_prefix("")).check() {
            Err(Error::InvalidKey { argument, .. }) => assert_eq!(argument, "delete_prefix prefix"),
            other => panic!("expected InvalidKey, got {other:?}"),
        }
        match Txn::new().then(Op::delete("")).check() {
            Err(Error::InvalidKey { argument, .. }) => assert_eq!(argument, "op key"),
            other => panic!("expected InvalidKey, got {other:?}"),
        }
    }

    #[test]
    fn compares_decide_like_etcd() {
        let kv = KeyValue::new("k", "b").with_metadata(3, 5, 2, 0);
        assert!(Compare::value("k", CompareOp::Less, "c").holds(Some(&kv)));
        assert!(!Compare::value("k", CompareOp::NotEqual, "x").holds(None));
        assert!(Compare::missing("k").holds(None));
        assert!(!Compare::missing("k").holds(Some(&kv)));
        assert!(Compare::exists("k").holds(Some(&kv)));
        assert!(Compare::mod_revision("k", CompareOp::Equal, 0).holds(None));
        assert!(Compare::version("k", CompareOp::Greater, 1).holds(Some(&kv)));
        assert!(Compare::create_revision("k", CompareOp::Equal, 3).holds(Some(&kv)));
    }

    #[test]
    fn list_bounds() {
        let request = ListRequest::prefix("p/").after("p/b");
        assert_eq!(request.lower_bound().as_deref(), Some("p/b\0"));
        assert!(request.matches("p/c") && !request.matches("p/b") && !request.matches("q"));
        assert_eq!(
            ListRequest::prefix("p/")
                .after("a")
                .lower_bound()
                .as_deref(),
            Some("p/")
        );
        assert_eq!(ListRequest::range("b", "a").lower_bound(), None);
        assert!(ListRequest::range("a", "c").matches("c"));
        assert!(matches!(
            ListRequest::prefix("").limit(0).check(),
            Err(Error::InvalidArgument { .. })
        ));
    }
}
