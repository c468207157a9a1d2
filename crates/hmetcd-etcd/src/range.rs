//! `get_range` in pages, all read at one revision.
//!
//! A small range is one request, as before. A range with more than [`FIRST_PAGE_KEYS`] keys is
//! read in pages: each page asks for up to a count of keys (etcd has no byte limit) starting
//! right after the last key of the page before, sized from the bytes per key seen so far to
//! about [`PAGE_BYTES`]. Every page after the first is read at the first page's revision
//! (`with_revision`), so the result is one consistent snapshot, as a single request would be.
//! If that revision is compacted away before the last page is in, the read starts over at
//! the current revision (up to [`ATTEMPTS`] times).

use etcd_client::{GetOptions, SortOrder, SortTarget};
use hmetcd_core::{Error, KeyValue, Result};

use crate::error::{revision_of, Request};
use crate::Shared;

/// Keys the first page asks for: ranges up to this size take one request. etcd's 1.5 MiB
/// request limit bounds a key and its value, so the first page stays far below what etcd
/// can send (2 GiB).
const FIRST_PAGE_KEYS: i64 = 1000;
/// The size later pages aim at.
const PAGE_BYTES: usize = 4 << 20;
/// Reads at most, when compaction overtakes a paged read.
const ATTEMPTS: u32 = 3;

impl Shared {
    /// Every key in `[start, range_end)` (stored keys), sorted, as callers see them.
    /// `key_start` is the caller's start key, for messages.
    pub(crate) async fn read_range(
        &self,
        key_start: &str,
        start: &[u8],
        range_end: &[u8],
    ) -> Result<Vec<KeyValue>> {
        let mut attempt = 1;
        loop {
            match self.read_range_once(key_start, start, range_end).await {
                Err(Error::Compacted { .. }) if attempt < ATTEMPTS => {
                    tracing::debug!(
                        key_start,
                        attempt,
                        "the revision of a paged range read was compacted; reading again"
                    );
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    async fn read_range_once(
        &self,
        key_start: &str,
        start: &[u8],
        range_end: &[u8],
    ) -> Result<Vec<KeyValue>> {
        let request = Request::new("get range from", key_start);
        let mut found = Vec::new();
        let mut from = start.to_vec();
        let mut limit = FIRST_PAGE_KEYS;
        // 0 for the first page: the current revision, which the later pages then read at.
        let mut revision = 0;
        loop {
            let mut options = GetOptions::new()
                .with_range(range_end.to_vec())
                .with_sort(SortTarget::Key, SortOrder::Ascend)
                .with_limit(limit);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let page = self
                .kv_request(request, async |kv| kv.get(from, Some(options)).await)
                .await?;
            if revision == 0 {
                revision = revision_of(page.header(), request)?;
            }
            let mut bytes = 0;
            for pair in page.kvs() {
                bytes += pair.key().len() + pair.value().len();
                let Some(key) = self.shown_key(pair.key())? else {
                    continue;
                };
                found.push(KeyValue::new(key, self.text(key, pair.value())?));
            }
            let last = match page.kvs().last() {
                Some(last) if page.more() => last,
                _ => break,
            };
            // The next page starts right after the last key of this one.
            from = last.key().to_vec();
            from.push(0);
            let per_key = (bytes / page.kvs().len()).max(1);
            limit = i64::try_from(PAGE_BYTES / per_key)
                .unwrap_or(i64::MAX)
                .max(1);
        }
        // etcd answers in key order (we ask it to); this keeps the promise if a server ever
        // did not, for the price of one pass over the answer.
        if !found.is_sorted_by(|a, b| a.key <= b.key) {
            found.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        }
        Ok(found)
    }
}
