//! Elections: etcd's election layout (Go's `concurrency.Election`, `etcdctl elect`) on the
//! lock machinery of `lock.rs`.
//!
//! A candidate is a lock participant whose key `<name>/<lease id in hex>` holds its value;
//! it leads when it holds the lock, that is when its key has the lowest create revision of
//! the election's keys. So a leadership is a lock hold (with its monitor, fencing token and
//! `lost()`) that can also change its value: `proclaim` puts the new value on the same key in
//! a transaction on the key's create revision, so it fails once the key is gone, and on its
//! mod revision as the candidate last wrote it, so that a proclaim given up on that reaches
//! etcd late never undoes a later one.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};
use futures::future::BoxFuture;
use hmetcd_core::keys::{check_key, is_participant_key};
use hmetcd_core::{
    leader_stream, Candidacy, Candidate, Error, KeyValue, LeaderStream, Leadership, LockOptions,
    Result,
};

use crate::error::{is_lease_not_found, revision_of, Request};
use crate::lock::EtcdLockRelease;
use crate::watch::Target;
use crate::Shared;

/// Candidates read per request.
const CANDIDATES_PAGE: i64 = 64;

/// How often a proclaim writes again after finding the leader key changed since its last
/// write (each time it learns the new mod revision; only another writer racing it makes a
/// second try fail).
const PROCLAIM_TRIES: usize = 4;

impl Shared {
    /// `campaign` and `campaign_with`.
    pub(crate) async fn campaign(
        self: &Arc<Self>,
        name: &str,
        value: &str,
        options: LockOptions,
    ) -> Result<Leadership> {
        let release = self.take_named(name, value, options).await?;
        let fencing_token = release.hold.revision;
        let key = format!("{name}/{}", crate::lease_hex(release.hold.lease));
        Ok(Leadership::from_backend(
            name,
            key,
            value,
            fencing_token,
            Box::new(release),
        ))
    }

    /// `leader`: the candidate created first.
    pub(crate) async fn leader(&self, name: &str) -> Result<Option<KeyValue>> {
        self.ensure_open()?;
        check_key("name", name)?;
        let (candidates, _) = self.candidates(name, true).await?;
        Ok(candidates.into_iter().next().map(KeyValue::from))
    }

    /// `observe`: the candidates read at one revision, then every change after it.
    pub(crate) async fn observe(&self, name: &str) -> Result<LeaderStream> {
        self.ensure_open()?;
        check_key("name", name)?;
        let (candidates, revision) = self.candidates(name, false).await?;
        let target = Target::prefix(&format!("{name}/"), &self.prefix);
        let events = self.watch_from(target, revision + 1, false).await?;
        Ok(leader_stream(name, candidates, events))
    }

    /// The candidates of the election `name` in the order they lead, read at one revision
    /// (returned too); only the first with `first_only`.
    async fn candidates(&self, name: &str, first_only: bool) -> Result<(Vec<Candidate>, i64)> {
        let dir = format!("{}/", self.prefix.apply(name));
        let request = Request::new("read candidates of", name);
        let mut found = Vec::new();
        let mut revision = 0;
        // Pages go by create revision, from `from` on (inclusive: keys created by one
        // transaction share a revision and may straddle pages); `seen` skips the repeats.
        let mut from = 0;
        let mut seen = HashSet::new();
        let mut limit = CANDIDATES_PAGE;
        loop {
            let mut options = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Ascend)
                .with_min_create_revision(from)
                .with_limit(limit);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let page = self
                .kv_request(request, async |kv| {
                    kv.get(dir.as_str(), Some(options)).await
                })
                .await?;
            if revision == 0 {
                revision = revision_of(page.header(), request)?;
            }
            let last = page.kvs().last().map(|kv| kv.create_revision());
            for kv in page.kvs() {
                if !seen.insert(kv.key().to_vec()) {
                    continue;
                }
                let Some(key) = self.shown_key(kv.key())? else {
                    continue;
                };
                if !is_participant_key(name, key) {
                    continue;
                }
                found.push(Candidate {
                    key: key.to_owned(),
                    value: self.text(key, kv.value())?,
                    create_revision: kv.create_revision(),
                });
                if first_only {
                    return Ok((found, revision));
                }
            }
            let Some(last) = last.filter(|_| page.more()) else {
                return Ok((found, revision));
            };
            if last == from {
                // A whole page of one revision: read more of it at once.
                limit = limit.saturating_mul(2);
            } else {
                from = last;
                limit = CANDIDATES_PAGE;
            }
        }
    }
}

impl Candidacy for EtcdLockRelease {
    fn proclaim(&self, value: &str) -> BoxFuture<'static, Result<()>> {
        let shared = Arc::clone(&self.shared);
        let hold = Arc::clone(&self.hold);
        let value = value.to_owned();
        Box::pin(async move {
            let not_leader = |reason: &str| Error::NotLeader {
                election: hold.name.clone(),
                reason: reason.to_owned(),
            };
            if let Some(reason) = hold.lost.reason() {
                return Err(not_leader(&reason.to_string()));
            }
            let Some(key) = hold.stored_key() else {
                return Err(not_leader("the leadership ended"));
            };
            let request = Request::new("proclaim in", &hold.name);
            for _ in 0..PROCLAIM_TRIES {
                // Only while this candidate's key is still the one it created (the leader's),
                // and still as this candidate last wrote it: a proclaim given up on that
                // reaches etcd late then finds a later one there and changes nothing.
                let written = hold.written.load(Ordering::SeqCst);
                let txn = Txn::new()
                    .when([
                        Compare::create_revision(key.as_str(), CompareOp::Equal, hold.revision),
                        Compare::mod_revision(key.as_str(), CompareOp::Equal, written),
                    ])
                    .and_then([TxnOp::put(
                        key.as_str(),
                        value.as_str(),
                        Some(PutOptions::new().with_lease(hold.lease)),
                    )])
                    .or_else([TxnOp::get(key.as_str(), None)]);
                let answer = match shared
                    .kv_bounded(request, async |kv| kv.txn(txn).await)
                    .await?
                {
                    Ok(answer) => answer,
                    Err(err) if is_lease_not_found(&err) => {
                        shared.session.report_lost(hold.lease);
                        return Err(not_leader("its lease is gone"));
                    }
                    Err(err) => return Err(shared.errors.map(request, err)),
                };
                if answer.succeeded() {
                    hold.written
                        .store(revision_of(answer.header(), request)?, Ordering::SeqCst);
                    return Ok(());
                }
                let found = answer
                    .op_responses()
                    .into_iter()
                    .find_map(|read| match read {
                        TxnOpResponse::Get(read) => read
                            .kvs()
                            .first()
                            .map(|kv| (kv.create_revision(), kv.mod_revision())),
                        _ => None,
                    });
                match found {
                    // Written since: a proclaim of ours that we counted failed, or someone
                    // else's put of our key. Ours to write over.
                    Some((created, modified)) if created == hold.revision => {
                        hold.written.store(modified, Ordering::SeqCst);
                    }
                    _ => return Err(not_leader("its key is gone")),
                }
            }
            Err(Error::Backend {
                operation: request.to_string(),
                reason: format!("the leader key changed under each of {PROCLAIM_TRIES} tries"),
                source: None,
            })
        })
    }
}
