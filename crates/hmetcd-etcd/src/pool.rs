//! Idle KV clients for requests to borrow.
//!
//! etcd-client's calls take `&mut self`, so a shared handle needs a client per request in
//! flight. Cloning one (`Client::kv_client`) clones two channel handles and the auth state, and
//! dropping it undoes all of that: a few hundred nanoseconds of contended atomics per call. A
//! request takes an idle clone from a lock-free queue instead and gives it back when its answer
//! is in; the queue ends up holding as many clients as requests were in flight at once (up to
//! `CAPACITY`). A cancelled request simply drops its client.
//!
//! Every client takes responses up to [`MAX_RESPONSE_BYTES`], not tonic's default 4 MiB.

use crossbeam_queue::ArrayQueue;
use etcd_client::{Client, KvClient};

/// Idle clients kept at most; beyond that, concurrent requests clone and drop their own.
const CAPACITY: usize = 128;

/// The largest response the KV and watch clients decode: etcd's own limit on what it sends
/// (its gRPC server's `MaxSendMsgSize` is `math.MaxInt32`). tonic's default of 4 MiB would
/// refuse a range or a watch catch-up that etcd answers without complaint (a handful of values
/// near etcd's 1.5 MiB request limit), and refuse it again on every retry.
pub(crate) const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;

pub(crate) struct KvPool {
    idle: ArrayQueue<KvClient>,
}

impl KvPool {
    pub(crate) fn new() -> Self {
        KvPool {
            idle: ArrayQueue::new(CAPACITY),
        }
    }

    /// An idle client, or a new clone of `client`'s when none is idle.
    pub(crate) fn take(&self, client: &Client) -> KvClient {
        self.idle.pop().unwrap_or_else(|| {
            client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES)
        })
    }

    /// Gives a client back for the next request.
    pub(crate) fn give_back(&self, kv: KvClient) {
        // A full queue drops the extra client.
        let _ = self.idle.push(kv);
    }
}
