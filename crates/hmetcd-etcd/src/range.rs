//! Range reads (`get_range`, `get_prefix`, `list`) in pages, all read at one revision.
//!
//! A small range is one request. A range with more than [`FIRST_PAGE_KEYS`] keys is read in
//! pages: each page asks for up to a count of keys (etcd has no byte limit) starting right
//! after the last key of the page before, sized from the bytes per key seen so far to about
//! [`PAGE_BYTES`]. Every page after the first is read at the first page's revision
//! (`with_revision`), so the result is one consistent snapshot, as a single request would be.
//!
//! Pages are decoded with a limit of [`PAGE_DECODE_LIMIT`] (tonic's default, 4 MiB), so no
//! single response is bigger than that: a page that would be (big values, or the first page
//! before any size is known) is refused by the client (`OutOfRange`, "decoded message length
//! too large") and asked for again with half the keys. Only a single key bigger than the
//! limit (a server allowing requests above its default 1.5 MiB) is read on its own with the
//! handle's usual, unlimited client.
//!
//! If the first page's revision is compacted away before the last page is in, the read
//! starts over at the current revision (up to [`ATTEMPTS`] times).

use etcd_client::GetOptions;
use hmetcd_core::keys::KeyPrefix;
use hmetcd_core::{Error, KeyRange, KeyValue, ListRequest, Result};
use tonic::Code;

use crate::error::{revision_of, Request};
use crate::pool::MAX_RESPONSE_BYTES;
use crate::retry::{resending, Resend};
use crate::Shared;

/// Keys the first page asks for: ranges up to this size take one request, as a raw range
/// request would (10,000 keys of up to ~400 bytes fit the decode limit; a first page that
/// does not is refused by the client and asked for again, smaller).
const FIRST_PAGE_KEYS: i64 = 10_000;
/// The size later pages aim at, half the decode limit: page sizes are estimates.
const PAGE_BYTES: usize = 2 << 20;
/// The largest page response decoded (tonic's default limit); a bigger one is asked for again
/// in smaller pages.
pub(crate) const PAGE_DECODE_LIMIT: usize = 4 << 20;
/// What a key costs in a response besides its key and value bytes: the revisions, version,
/// lease and the protobuf framing, rounded up.
const PER_KEY_OVERHEAD: usize = 48;
/// Reads at most, when compaction overtakes a paged read.
const ATTEMPTS: u32 = 3;

/// A range of stored keys to read: `[start, end)`, an `end` of `"\0"` meaning every key from
/// `start` on (etcd's convention).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredRange {
    pub(crate) start: Vec<u8>,
    pub(crate) end: Vec<u8>,
}

impl StoredRange {
    /// Every stored key starting with `stored_prefix`; an empty one is the whole keyspace.
    pub(crate) fn prefix(stored_prefix: &str) -> Self {
        StoredRange {
            start: first_key(stored_prefix.as_bytes()),
            end: prefix_end(stored_prefix.as_bytes()),
        }
    }

    /// The stored keys of the inclusive caller range `[start, end]`; `None` when empty.
    pub(crate) fn inclusive(prefix: &KeyPrefix, start: &str, end: &str) -> Option<Self> {
        let (start, end) = prefix.range(start, end)?;
        let mut end = end.into_bytes();
        end.push(0);
        Some(StoredRange {
            start: first_key(start.as_bytes()),
            end,
        })
    }

    /// The stored keys a list request covers, from its lower bound on; `None` when nothing
    /// can match.
    pub(crate) fn of_list(prefix: &KeyPrefix, request: &ListRequest) -> Option<Self> {
        let lower = request.lower_bound()?;
        match request.key_range() {
            KeyRange::Prefix(listed) => {
                let whole = StoredRange::prefix(&prefix.apply(listed));
                let start = first_key(prefix.apply(&lower).as_bytes());
                let bounded = whole.end.as_slice() != b"\0";
                if bounded && start >= whole.end {
                    return None;
                }
                Some(StoredRange {
                    start: start.max(whole.start),
                    end: whole.end,
                })
            }
            KeyRange::Inclusive { end, .. } => StoredRange::inclusive(prefix, &lower, end),
        }
    }
}

/// etcd refuses an empty key: `"\0"` is the first possible one.
fn first_key(stored: &[u8]) -> Vec<u8> {
    if stored.is_empty() {
        vec![0]
    } else {
        stored.to_vec()
    }
}

/// The first key after every key starting with `prefix` (etcd's `GetPrefixRangeEnd`); `"\0"`
/// (to the end of the keyspace) when there is none.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            if let Some(byte) = end.last_mut() {
                *byte = last + 1;
            }
            return end;
        }
        end.pop();
    }
    vec![0]
}

/// How to read a range.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadShape {
    /// Stop after this many keys (a list page); `None` for all.
    pub(crate) max_items: Option<usize>,
    /// Leave values out.
    pub(crate) keys_only: bool,
}

impl ReadShape {
    /// Every key with its value.
    pub(crate) const ALL: ReadShape = ReadShape {
        max_items: None,
        keys_only: false,
    };
}

/// What a range read found.
#[derive(Debug)]
pub(crate) struct RangeAnswer {
    /// The keys read, sorted, as callers see them, with metadata.
    pub(crate) items: Vec<KeyValue>,
    /// How many keys the range holds at `revision` (from its start), `items` included.
    pub(crate) count: i64,
    /// Whether keys of the range follow the last item.
    pub(crate) more: bool,
    /// The revision everything was read at.
    pub(crate) revision: i64,
}

/// The page size after a page of `keys` keys and `bytes` bytes of keys and values, aiming at
/// [`PAGE_BYTES`]; at least 1.
pub(crate) fn next_page_keys(keys: usize, bytes: usize) -> i64 {
    let per_key = bytes / keys.max(1) + PER_KEY_OVERHEAD;
    i64::try_from(PAGE_BYTES / per_key)
        .unwrap_or(i64::MAX)
        .max(1)
}

/// The page size after a page of `keys` keys was refused at `found` bytes: sized to
/// [`PAGE_BYTES`] from the bytes per key it had, and at most half of it; at least 1. A `found`
/// of 0 (unknown) halves.
pub(crate) fn shrunk_page_keys(keys: i64, found: usize) -> i64 {
    let half = (keys / 2).max(1);
    let Ok(keys_sent) = usize::try_from(keys) else {
        return half;
    };
    if found == 0 {
        return half;
    }
    let per_key = (found / keys_sent.max(1)).max(1);
    i64::try_from(PAGE_BYTES / per_key)
        .unwrap_or(i64::MAX)
        .clamp(1, half)
}

/// The response size in tonic's "decoded message length too large: found N bytes" refusal.
fn refused_size(err: &etcd_client::Error) -> Option<usize> {
    let etcd_client::Error::GRpcStatus(status) = err else {
        return None;
    };
    let (_, after) = status.message().split_once("found ")?;
    after.split(' ').next()?.parse().ok()
}

/// Whether the client refused a response for its size (tonic's decode limit).
pub(crate) fn is_response_too_large(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == Code::OutOfRange
                && status.message().contains("message length too large")
        }
        _ => false,
    }
}

/// Whether etcd says the revision asked for is compacted away.
fn is_compacted(err: &etcd_client::Error) -> bool {
    matches!(err, etcd_client::Error::GRpcStatus(status)
        if status.message().contains("required revision has been compacted"))
}

/// Why one page was not read.
enum PageError {
    /// The revision of a later page was compacted: read again from the start.
    Compacted,
    /// Anything else, mapped.
    Failed(Error),
}

impl Shared {
    /// Every key in `range` (stored keys), sorted, as callers see them, with metadata.
    pub(crate) async fn read_range(
        &self,
        request: Request<'_>,
        range: &StoredRange,
    ) -> Result<Vec<KeyValue>> {
        Ok(self.read_paged(request, range, ReadShape::ALL).await?.items)
    }

    /// Reads `range` in pages at one revision, as `shape` says.
    pub(crate) async fn read_paged(
        &self,
        request: Request<'_>,
        range: &StoredRange,
        shape: ReadShape,
    ) -> Result<RangeAnswer> {
        let mut attempt = 1;
        loop {
            match self.read_paged_once(request, range, shape).await {
                Err(PageError::Compacted) if attempt < ATTEMPTS => {
                    tracing::debug!(
                        %request,
                        attempt,
                        "the revision of a paged range read was compacted; reading again"
                    );
                    attempt += 1;
                }
                Err(PageError::Compacted) => {
                    return Err(Error::Compacted {
                        key: request.key.to_owned(),
                        revision: 0,
                        compact_revision: 0,
                    })
                }
                Err(PageError::Failed(err)) => return Err(err),
                Ok(answer) => return Ok(answer),
            }
        }
    }

    async fn read_paged_once(
        &self,
        request: Request<'_>,
        range: &StoredRange,
        shape: ReadShape,
    ) -> Result<RangeAnswer, PageError> {
        let wanted = |collected: usize| {
            shape
                .max_items
                .map(|max| i64::try_from(max.saturating_sub(collected)).unwrap_or(i64::MAX))
        };
        let mut items = Vec::new();
        let mut from = range.start.clone();
        let mut limit = FIRST_PAGE_KEYS;
        // 0 for the first page: the current revision, which the later pages then read at.
        let mut revision = 0;
        let mut count: i64 = 0;
        loop {
            if let Some(wanted) = wanted(items.len()) {
                // Never 0: etcd reads a limit of 0 as "no limit".
                limit = limit.min(wanted).max(1);
            }
            let mut options = GetOptions::new()
                .with_range(range.end.clone())
                .with_limit(limit);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            if shape.keys_only {
                options = options.with_keys_only();
            }
            let mut page = match self.read_page(request, &from, options, limit).await? {
                Ok(page) => page,
                Err(found) => {
                    // How many keys the refused page held: the limit, or fewer when the
                    // range has fewer (counted once for the first page, whose count is not
                    // known yet).
                    let left = if revision == 0 {
                        self.count_keys(request, &from, &range.end)
                            .await
                            .map_err(PageError::Failed)?
                    } else {
                        count.saturating_sub(i64::try_from(items.len()).unwrap_or(i64::MAX))
                    };
                    let smaller = shrunk_page_keys(limit.min(left.max(1)), found);
                    tracing::debug!(%request, limit, smaller, found, "a range page is too big to decode; asking for fewer keys");
                    limit = smaller;
                    continue;
                }
            };
            if revision == 0 {
                revision = revision_of(page.header(), request).map_err(PageError::Failed)?;
                count = page.count();
            }
            let more = page.more();
            let pairs = page.take_kvs();
            let read = pairs.len();
            let last_key = pairs.last().map(|pair| pair.key().to_vec());
            let mut bytes = 0;
            items.reserve(read);
            for pair in pairs {
                bytes += pair.key().len() + pair.value().len();
                if let Some(kv) = self.key_value(pair).map_err(PageError::Failed)? {
                    items.push(kv);
                }
            }
            let done = wanted(items.len()).is_some_and(|wanted| wanted <= 0);
            let Some(mut last) = last_key.filter(|_| more && !done) else {
                // etcd answers in key order; this keeps the promise if a server ever did not,
                // for the price of one pass over the answer.
                if !items.is_sorted_by(|a: &KeyValue, b: &KeyValue| a.key <= b.key) {
                    items.sort_unstable_by(|a, b| a.key.cmp(&b.key));
                }
                return Ok(RangeAnswer {
                    items,
                    count,
                    more,
                    revision,
                });
            };
            // The next page starts right after the last key of this one.
            last.push(0);
            from = last;
            limit = next_page_keys(read, bytes);
        }
    }

    /// How many keys `[from, end)` holds now.
    async fn count_keys(&self, request: Request<'_>, from: &[u8], end: &[u8]) -> Result<i64> {
        let options = GetOptions::new().with_range(end.to_vec()).with_count_only();
        let answer = self
            .kv_request(request, async |kv| {
                resending!(Resend::Read, kv.get(from, Some(options.clone())).await)
            })
            .await?;
        Ok(answer.count())
    }

    /// One page: `Ok(Ok(page))`, or `Ok(Err(found))` with the size of the response when it
    /// was too big to decode (0 when the client did not say).
    async fn read_page(
        &self,
        request: Request<'_>,
        from: &[u8],
        options: GetOptions,
        limit: i64,
    ) -> Result<Result<etcd_client::GetResponse, usize>, PageError> {
        // A single key above the page limit: read with the usual client.
        let decode_limit = if limit <= 1 {
            MAX_RESPONSE_BYTES
        } else {
            PAGE_DECODE_LIMIT
        };
        let mut kv = self
            .kv_pool
            .take(&self.client)
            .max_decoding_message_size(decode_limit);
        let reading = async { resending!(Resend::Read, kv.get(from, Some(options.clone())).await) };
        let answer = self.bounded(request, Box::pin(reading)).await;
        // A timed-out request leaves the client fit for the next one.
        self.kv_pool
            .give_back(kv.max_decoding_message_size(MAX_RESPONSE_BYTES));
        let answer = answer.map_err(PageError::Failed)?;
        match answer {
            Ok(page) => Ok(Ok(page)),
            Err(err) if is_response_too_large(&err) && limit > 1 => {
                Ok(Err(refused_size(&err).unwrap_or(0)))
            }
            Err(err) if is_compacted(&err) => Err(PageError::Compacted),
            Err(err) => Err(PageError::Failed(self.errors.map(request, err))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: &str, end: &str) -> StoredRange {
        StoredRange {
            start: start.as_bytes().to_vec(),
            end: end.as_bytes().to_vec(),
        }
    }

    #[test]
    fn prefix_ends_are_etcds() {
        assert_eq!(prefix_end(b"foo1"), b"foo2");
        assert_eq!(prefix_end(b"a/\xff"), b"a0");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    #[test]
    fn prefixes_cover_their_keys_or_everything() {
        assert_eq!(StoredRange::prefix("p/"), range("p/", "p0"));
        // No prefix at all: the whole keyspace, from the first possible key.
        assert_eq!(StoredRange::prefix(""), range("\0", "\0"));
    }

    #[test]
    fn inclusive_ranges_end_after_their_last_key() {
        let none = KeyPrefix::default();
        assert_eq!(
            StoredRange::inclusive(&none, "a", "c"),
            Some(range("a", "c\0"))
        );
        assert_eq!(
            StoredRange::inclusive(&none, "", "c"),
            Some(range("\0", "c\0"))
        );
        assert_eq!(StoredRange::inclusive(&none, "d", "c"), None);
        let p = KeyPrefix::new("p/");
        assert_eq!(
            StoredRange::inclusive(&p, "", "c"),
            Some(range("p/", "p/c\0"))
        );
    }

    #[test]
    fn lists_start_at_their_lower_bound() {
        let none = KeyPrefix::default();
        let p = KeyPrefix::new("p/");
        let of = |prefix: &KeyPrefix, request: ListRequest| StoredRange::of_list(prefix, &request);
        assert_eq!(
            of(&none, ListRequest::prefix("a/")),
            Some(range("a/", "a0"))
        );
        assert_eq!(
            of(&none, ListRequest::prefix("a/").after("a/x")),
            Some(range("a/x\0", "a0"))
        );
        // `after` before the prefix: from the prefix; after it: nothing.
        assert_eq!(
            of(&none, ListRequest::prefix("b/").after("a")),
            Some(range("b/", "b0"))
        );
        assert_eq!(of(&none, ListRequest::prefix("b/").after("c")), None);
        assert_eq!(of(&none, ListRequest::prefix("")), Some(range("\0", "\0")));
        assert_eq!(
            of(&none, ListRequest::prefix("").after("k")),
            Some(range("k\0", "\0"))
        );
        assert_eq!(of(&p, ListRequest::prefix("")), Some(range("p/", "p0")));
        assert_eq!(
            of(&p, ListRequest::prefix("").after("k")),
            Some(range("p/k\0", "p0"))
        );
        assert_eq!(
            of(&p, ListRequest::range("a", "c").after("b")),
            Some(range("p/b\0", "p/c\0"))
        );
        assert_eq!(of(&p, ListRequest::range("a", "c").after("c")), None);
        assert_eq!(of(&p, ListRequest::range("c", "a")), None);
    }

    #[test]
    fn pages_aim_at_a_few_mebibytes() {
        // Tiny keys: many per page, but the page stays near PAGE_BYTES with the overhead.
        let tiny = next_page_keys(1000, 10_000);
        assert!(tiny > 10_000, "{tiny}");
        let tiny = usize::try_from(tiny).unwrap_or(0);
        assert!(tiny * (10 + PER_KEY_OVERHEAD) <= PAGE_BYTES);
        // Values of 1 MiB: two per page; bigger ones one at a time.
        assert_eq!(next_page_keys(10, 10 << 20), 1);
        assert_eq!(next_page_keys(4, 4 << 20), 1);
        assert_eq!(
            next_page_keys(0, 0),
            i64::try_from(PAGE_BYTES / PER_KEY_OVERHEAD).unwrap_or(0)
        );
    }

    #[test]
    fn decode_refusals_are_recognised() {
        let status =
            |code, message: &str| etcd_client::Error::GRpcStatus(tonic::Status::new(code, message));
        assert!(is_response_too_large(&status(
            Code::OutOfRange,
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes"
        )));
        assert!(!is_response_too_large(&status(
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted"
        )));
        assert!(is_compacted(&status(
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted"
        )));
        assert!(!is_compacted(&status(Code::Unavailable, "no leader")));
        assert_eq!(
            refused_size(&status(
                Code::OutOfRange,
                "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes"
            )),
            Some(5_000_000)
        );
        assert_eq!(refused_size(&status(Code::OutOfRange, "other")), None);
    }

    #[test]
    fn refused_pages_shrink_to_fit() {
        // 12 keys of 700 KB: 8.4 MB refused; pages of 2 MiB hold 2 of them.
        assert_eq!(shrunk_page_keys(12, 8_400_000), 2);
        // Barely too big: about half.
        assert_eq!(shrunk_page_keys(1000, 4_200_000), 499);
        // Unknown size: halved; never below 1.
        assert_eq!(shrunk_page_keys(9, 0), 4);
        assert_eq!(shrunk_page_keys(2, 100 << 20), 1);
        assert_eq!(shrunk_page_keys(1, 100 << 20), 1);
    }
}
