//! The data API on etcd: reads with metadata, listing pages, prefix deletes, temp values,
//! multi-operation transactions and watches from a revision.
//!
//! - `get_kv` is one range request; `get_prefix` and `list` are range reads paged at one
//!   revision (see [`range`](crate::range)). A list's `count` is etcd's count for the range
//!   from the request's lower bound, `revision` the first page's header revision.
//! - `txn` is one etcd transaction: every key gets the handle's prefix, an `Op::put_temp` is
//!   put on the session's live lease (and, once its branch ran, remembered like a temp key so
//!   that it is put back with its value after a lease loss), an `Op::delete_prefix` is a
//!   prefix range delete. etcd's refusals of the transaction as a whole (more operations than
//!   its `max-txn-ops`, a key written twice) are `Error::InvalidArgument`.
//! - `watch_prefix_from` registers a prefix watch on the handle's watch multiplexer starting
//!   at the given revision, so it resumes after reconnects like every other watch.

use etcd_client::{DeleteOptions, PutOptions, TxnOpResponse};
use futures::stream;
use hmetcd_core::keys::{check_key, KeyPrefix};
use hmetcd_core::{
    Compare, CompareTarget, Error, KeyValue, ListPage, ListRequest, Op, Result, Txn, TxnOutcome,
    WatchStream,
};

use crate::error::{is_lease_not_found, revision_of, Request};
use crate::range::{ReadShape, StoredRange};
use crate::retry::{resending, Resend};
use crate::{compare_op, watch, Shared};

/// etcd's refusals of a transaction as a whole, as its error messages say them.
const TXN_REFUSALS: [&str; 2] = [
    "too many operations in txn request",
    "duplicate key given in txn request",
];

/// Whether `ops` put a key on the handle's lease.
fn has_temp_puts(ops: &[Op]) -> bool {
    ops.iter().any(|op| matches!(op, Op::PutTemp { .. }))
}

/// `compare` as etcd's, with the handle's prefix on its key.
pub(crate) fn etcd_compare(compare: &Compare, prefix: &KeyPrefix) -> etcd_client::Compare {
    let key = prefix.stored(compare.key()).into_owned();
    match compare.target() {
        CompareTarget::Value(op, value) => {
            etcd_client::Compare::value(key, compare_op(*op), value.as_str())
        }
        CompareTarget::CreateRevision(op, revision) => {
            etcd_client::Compare::create_revision(key, compare_op(*op), *revision)
        }
        CompareTarget::ModRevision(op, revision) => {
            etcd_client::Compare::mod_revision(key, compare_op(*op), *revision)
        }
        CompareTarget::Version(op, version) => {
            etcd_client::Compare::version(key, compare_op(*op), *version)
        }
        // CompareTarget is non-exhaustive across crates; every variant is handled above.
        _ => etcd_client::Compare::create_revision(key, etcd_client::CompareOp::Less, 0),
    }
}

/// `op` as etcd's, with the handle's prefix on its key; `lease` for `put_temp`.
pub(crate) fn etcd_op(op: &Op, prefix: &KeyPrefix, lease: i64) -> etcd_client::TxnOp {
    let key = prefix.stored(op.key()).into_owned();
    match op {
        Op::Put { value, .. } => etcd_client::TxnOp::put(key, value.as_str(), None),
        Op::PutTemp { value, .. } => etcd_client::TxnOp::put(
            key,
            value.as_str(),
            Some(PutOptions::new().with_lease(lease)),
        ),
        Op::Delete { .. } => etcd_client::TxnOp::delete(key, None),
        // `Txn::check` refuses an empty prefix, so the stored prefix is never empty here.
        Op::DeletePrefix { .. } => {
            etcd_client::TxnOp::delete(key, Some(DeleteOptions::new().with_prefix()))
        }
        // Op is non-exhaustive across crates: `Op::Get` and anything newer reads.
        _ => etcd_client::TxnOp::get(key, None),
    }
}

/// Whether etcd takes `txn` as read-only: it reads, and writes in neither branch.
fn reads_only(txn: &Txn) -> bool {
    let ops = || txn.then_ops().iter().chain(txn.else_ops());
    ops().next().is_some() && ops().all(|op| matches!(op, Op::Get { .. }))
}

/// `txn` as one etcd transaction; `lease` for its `put_temp`s.
pub(crate) fn etcd_txn(txn: &Txn, prefix: &KeyPrefix, lease: i64) -> etcd_client::Txn {
    let compares: Vec<_> = txn
        .compares()
        .iter()
        .map(|compare| etcd_compare(compare, prefix))
        .collect();
    let branch =
        |ops: &[Op]| -> Vec<_> { ops.iter().map(|op| etcd_op(op, prefix, lease)).collect() };
    etcd_client::Txn::new()
        .when(compares)
        .and_then(branch(txn.then_ops()))
        .or_else(branch(txn.else_ops()))
}

/// etcd's refusal of a transaction as a whole, as `Error::InvalidArgument`; `None` for any
/// other error.
pub(crate) fn txn_refusal(err: &etcd_client::Error) -> Option<Error> {
    let etcd_client::Error::GRpcStatus(status) = err else {
        return None;
    };
    let message = status.message();
    TXN_REFUSALS
        .iter()
        .any(|refusal| message.contains(refusal))
        .then(|| Error::InvalidArgument {
            what: "transaction".to_owned(),
            reason: format!("etcd refuses it: {message}"),
        })
}

/// The error of `watch_prefix_from` with a revision below 1.
pub(crate) fn check_watch_revision(revision: i64) -> Result<()> {
    if revision < 1 {
        return Err(Error::InvalidArgument {
            what: "watch revision".to_owned(),
            reason: format!("{revision}: store revisions start at 1"),
        });
    }
    Ok(())
}

impl Shared {
    /// A key-value pair read from etcd, as callers see it (prefix taken off, metadata kept),
    /// without copying its key or value; `None` when it lies outside the prefix.
    pub(crate) fn key_value(&self, pair: etcd_client::KeyValue) -> Result<Option<KeyValue>> {
        let (create_revision, mod_revision, version, lease) = (
            pair.create_revision(),
            pair.mod_revision(),
            pair.version(),
            pair.lease(),
        );
        let (key, value) = pair.into_key_value();
        let prefix = self.prefix.as_str();
        let mut key = match String::from_utf8(key) {
            Ok(key) => key,
            Err(err) => {
                let source = err.utf8_error();
                let Some(rest) = err.as_bytes().strip_prefix(prefix.as_bytes()) else {
                    return Ok(None);
                };
                return Err(Error::InvalidUtf8 {
                    key: String::from_utf8_lossy(rest).into_owned(),
                    source,
                });
            }
        };
        if !key.starts_with(prefix) {
            return Ok(None);
        }
        key.drain(..prefix.len());
        let value = match String::from_utf8(value) {
            Ok(value) => value,
            Err(err) => {
                return Err(Error::InvalidUtf8 {
                    key,
                    source: err.utf8_error(),
                })
            }
        };
        Ok(Some(KeyValue::new(key, value).with_metadata(
            create_revision,
            mod_revision,
            version,
            lease,
        )))
    }

    pub(crate) async fn get_kv(&self, key: &str) -> Result<Option<KeyValue>> {
        self.ensure_open()?;
        check_key("key", key)?;
        let stored = self.prefix.stored(key).into_owned().into_bytes();
        let mut answer = self.plain_get(Request::new("get", key), stored).await?;
        match answer.take_kvs().into_iter().next() {
            Some(pair) => self.key_value(pair),
            None => Ok(None),
        }
    }

    pub(crate) async fn get_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        self.ensure_open()?;
        let range = StoredRange::prefix(&self.prefix.stored(prefix));
        self.read_range(Request::new("get prefix", prefix), &range)
            .await
    }

    pub(crate) async fn list(&self, request: ListRequest) -> Result<ListPage> {
        self.ensure_open()?;
        request.check()?;
        let shown = match request.key_range() {
            hmetcd_core::KeyRange::Prefix(prefix) => prefix.as_str(),
            hmetcd_core::KeyRange::Inclusive { start, .. } => start.as_str(),
        };
        let what = Request::new("list", shown);
        let Some(range) = StoredRange::of_list(&self.prefix, &request) else {
            // Nothing can match; the page still says the store's revision.
            let key = self.prefix.stored("\0");
            let answer = self
                .kv_request(what, async |kv| {
                    resending!(
                        Resend::Read,
                        kv.get(
                            key.as_bytes(),
                            Some(etcd_client::GetOptions::new().with_count_only()),
                        )
                        .await
                    )
                })
                .await?;
            return Ok(ListPage::new(
                Vec::new(),
                false,
                0,
                revision_of(answer.header(), what)?,
            ));
        };
        let shape = ReadShape {
            max_items: request.page_limit(),
            keys_only: request.is_keys_only(),
        };
        let answer = self.read_paged(what, &range, shape).await?;
        Ok(ListPage::new(
            answer.items,
            answer.more,
            answer.count,
            answer.revision,
        ))
    }

    pub(crate) async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        self.ensure_open()?;
        check_key("prefix", prefix)?;
        let stored = self.prefix.apply(prefix);
        self.session.forget_temp_prefix(&stored);
        let answer = self
            .kv_request(Request::new("delete prefix", prefix), async |kv| {
                resending!(
                    Resend::Write,
                    kv.delete(stored.as_str(), Some(DeleteOptions::new().with_prefix()))
                        .await
                )
            })
            .await?;
        Ok(answer.deleted().max(0).unsigned_abs())
    }

    pub(crate) async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        self.ensure_open()?;
        txn.check()?;
        let key = txn
            .compares()
            .first()
            .map(Compare::key)
            .or_else(|| txn.then_ops().first().map(Op::key))
            .or_else(|| txn.else_ops().first().map(Op::key))
            .unwrap_or_default();
        let request = Request::new("transaction on", key);
        let temp = has_temp_puts(txn.then_ops()) || has_temp_puts(txn.else_ops());
        let mut not = None;
        let (answer, generation) = loop {
            // Only a transaction with temp puts needs the lease (and waits for a live one).
            let (lease, generation) = if temp {
                self.session
                    .live_lease(not, self.options.request_timeout, request)
                    .await?
            } else {
                (0, 0)
            };
            let answer = if reads_only(&txn) {
                self.read_only_txn(request, etcd_txn(&txn, &self.prefix, lease))
                    .await?
            } else {
                // Built for each attempt: a resend needs its own, and the first costs no copy.
                self.kv_bounded(request, async |kv| {
                    resending!(
                        Resend::Write,
                        kv.txn(etcd_txn(&txn, &self.prefix, lease)).await
                    )
                })
                .await?
            };
            match answer {
                Ok(answer) => break (answer, generation),
                Err(err) if temp && is_lease_not_found(&err) && not.is_none() => {
                    self.session.report_lost(lease);
                    not = Some(lease);
                }
                Err(err) => {
                    return Err(txn_refusal(&err).unwrap_or_else(|| self.errors.map(request, err)))
                }
            }
        };
        let succeeded = answer.succeeded();
        let revision = revision_of(answer.header(), request)?;
        let ran = if succeeded {
            txn.then_ops()
        } else {
            txn.else_ops()
        };
        let mut gets = Vec::new();
        if ran.iter().any(|op| matches!(op, Op::Get { .. })) {
            for response in answer.op_responses() {
                if let TxnOpResponse::Get(mut read) = response {
                    gets.push(match read.take_kvs().into_iter().next() {
                        Some(pair) => self.key_value(pair)?,
                        None => None,
                    });
                }
            }
        }
        self.apply_effects(ran, generation).await?;
        Ok(TxnOutcome::new(succeeded, revision, gets))
    }

    /// What the transaction branch `ops` that ran did to the temp keys: plain writes and
    /// deletes are no longer temp keys, temp puts are remembered with their values. A temp put
    /// made on a lease that was lost meanwhile (the session's generation moved on, so the
    /// restore may have run already) is put again on the live lease.
    async fn apply_effects(&self, ops: &[Op], generation: u64) -> Result<()> {
        let moved_on = has_temp_puts(ops) && self.session.state().generation != generation;
        for op in ops {
            match op {
                // Without temp keys (the usual case) forgetting takes no lock.
                Op::Put { key, .. } | Op::Delete { key } => {
                    self.session.forget_temp_key(&self.prefix.stored(key));
                }
                Op::DeletePrefix { prefix } => {
                    self.session.forget_temp_prefix(&self.prefix.stored(prefix));
                }
                Op::PutTemp { key, value } if moved_on => self.put_temp_key(key, value).await?,
                Op::PutTemp { key, value } => {
                    self.session
                        .remember_temp_key(&self.prefix.stored(key), value);
                }
                // Op is non-exhaustive across crates; gets write nothing.
                _ => {}
            }
        }
        Ok(())
    }

    pub(crate) async fn watch_prefix_from(
        &self,
        prefix: &str,
        revision: i64,
    ) -> Result<WatchStream> {
        self.ensure_open()?;
        check_watch_revision(revision)?;
        let target = watch::Target::prefix(prefix, &self.prefix);
        match self.watch_from(target, revision, false).await {
            // etcd refused the watch at its creation: the stream says so as its only item,
            // as it does when the compaction shows only after the creation.
            Err(compacted @ Error::Compacted { .. }) => {
                Ok(Box::pin(stream::once(async move { Err(compacted) })))
            }
            outcome => outcome,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmetcd_core::CompareOp;

    fn shown<T: std::fmt::Debug>(value: &T) -> String {
        format!("{value:?}")
    }

    fn bytes(text: &str) -> String {
        format!("{:?}", text.as_bytes())
    }

    #[test]
    fn compares_carry_the_prefix_and_the_target() {
        let prefix = KeyPrefix::new("p/");
        let value = shown(&etcd_compare(
            &Compare::value("k", CompareOp::Less, "v"),
            &prefix,
        ));
        assert!(value.contains(&bytes("p/k")), "{value}");
        assert!(value.contains("Less") && value.contains("Value"), "{value}");
        let missing = shown(&etcd_compare(&Compare::missing("k"), &prefix));
        assert!(
            missing.contains("Create") && missing.contains("CreateRevision(0)"),
            "{missing}"
        );
        let modified = shown(&etcd_compare(
            &Compare::mod_revision("k", CompareOp::Equal, 7),
            &KeyPrefix::default(),
        ));
        assert!(modified.contains("ModRevision(7)"), "{modified}");
        assert!(modified.contains(&bytes("k")), "{modified}");
        let version = shown(&etcd_compare(
            &Compare::version("k", CompareOp::Greater, 2),
            &prefix,
        ));
        assert!(version.contains("Version(2)") && version.contains("Greater"));
    }

    #[test]
    fn ops_carry_the_prefix_lease_and_ranges() {
        let prefix = KeyPrefix::new("p/");
        let temp = shown(&etcd_op(&Op::put_temp("k", "v"), &prefix, 42));
        assert!(
            temp.contains("lease: 42") && temp.contains(&bytes("p/k")),
            "{temp}"
        );
        let put = shown(&etcd_op(&Op::put("k", "v"), &prefix, 42));
        assert!(put.contains("lease: 0"), "{put}");
        let deleted = shown(&etcd_op(&Op::delete_prefix("d/"), &prefix, 0));
        // The range end of "p/d/" is "p/d0".
        assert!(
            deleted.contains(&bytes("p/d/")) && deleted.contains(&bytes("p/d0")),
            "{deleted}"
        );
        let single = shown(&etcd_op(&Op::delete("k"), &prefix, 0));
        assert!(single.contains("range_end: []"), "{single}");
        let get = shown(&etcd_op(&Op::get("k"), &prefix, 0));
        assert!(get.contains("RequestRange"), "{get}");
    }

    #[test]
    fn transactions_translate_branch_by_branch() {
        let txn = Txn::new()
            .when(Compare::exists("a"))
            .then(Op::put("b", "1"))
            .then(Op::get("b"))
            .otherwise(Op::delete("c"));
        let sent = shown(&etcd_txn(&txn, &KeyPrefix::new("x/"), 0));
        let success = sent.find("success").unwrap_or(0);
        let failure = sent.find("failure").unwrap_or(0);
        assert!(success > 0 && failure > success, "{sent}");
        assert!(sent[success..failure].contains("RequestPut"));
        assert!(sent[success..failure].contains("RequestRange"));
        assert!(sent[failure..].contains("RequestDeleteRange"));
        assert!(sent.contains(&bytes("x/a")), "{sent}");
    }

    #[test]
    fn compares_keep_their_target_and_operand() {
        use hmetcd_core::CompareOp;
        let prefix = KeyPrefix::new("x/");
        let create = shown(&etcd_compare(
            &Compare::create_revision("a", CompareOp::Greater, 7),
            &prefix,
        ));
        assert!(create.contains("CreateRevision(7)"), "{create}");
        let modified = shown(&etcd_compare(
            &Compare::mod_revision("a", CompareOp::Less, 9),
            &prefix,
        ));
        assert!(modified.contains("ModRevision(9)"), "{modified}");
        let version = shown(&etcd_compare(
            &Compare::version("a", CompareOp::Equal, 3),
            &prefix,
        ));
        assert!(version.contains("Version(3)"), "{version}");
    }

    #[test]
    fn only_a_transaction_of_reads_alone_is_read_only() {
        assert!(reads_only(
            &Txn::new().then(Op::get("a")).then(Op::get("b"))
        ));
        assert!(reads_only(
            &Txn::new()
                .when(Compare::exists("a"))
                .otherwise(Op::get("b"))
        ));
        assert!(!reads_only(
            &Txn::new().then(Op::get("a")).then(Op::put("b", "1"))
        ));
        assert!(!reads_only(
            &Txn::new().then(Op::get("a")).otherwise(Op::delete("b"))
        ));
        // Nothing read, nothing written: etcd reads nothing either, so nothing to protect.
        assert!(!reads_only(&Txn::new().when(Compare::exists("a"))));
    }

    #[test]
    fn temp_puts_need_the_lease() {
        let ops = [Op::put("p", "1"), Op::get("g"), Op::put_temp("t", "v")];
        assert!(has_temp_puts(&ops));
        assert!(!has_temp_puts(&ops[..2]));
    }

    #[test]
    fn etcd_refusals_are_invalid_arguments() {
        let status = |message: &str| {
            etcd_client::Error::GRpcStatus(tonic::Status::new(
                tonic::Code::InvalidArgument,
                message,
            ))
        };
        for message in [
            "etcdserver: too many operations in txn request",
            "etcdserver: duplicate key given in txn request",
        ] {
            assert!(matches!(
                txn_refusal(&status(message)),
                Some(Error::InvalidArgument { what, reason }) if what == "transaction" && reason.contains(message)
            ));
        }
        assert!(txn_refusal(&status("etcdserver: request timed out")).is_none());
        assert!(txn_refusal(&etcd_client::Error::InvalidArgs("x".into())).is_none());
    }

    #[test]
    fn watch_revisions_start_at_one() {
        assert!(matches!(
            check_watch_revision(0),
            Err(Error::InvalidArgument { what, .. }) if what == "watch revision"
        ));
        assert!(check_watch_revision(-5).is_err());
        assert!(check_watch_revision(1).is_ok());
    }
}
