//! Coalescing: one handle's concurrent plain reads and writes sent together.
//!
//! Each `get`, `get_kv`, `store` and `delete` is one small request, and with many tasks on one
//! handle most of the cost (client and server) is per request: framing, the auth check, a
//! read-index wait for a read, a raft entry for a write. So while [`LANES`] requests of a kind
//! (reads or writes) are in flight, further ones of that kind queue, and as soon as a lane frees
//! everything queued goes out as **one** etcd transaction: reads as a read-only transaction (one
//! linearizable read for all of them), writes as one transaction (one raft entry). Each caller
//! gets exactly its own operation's answer.
//!
//! Why this keeps every call's meaning:
//! - A batched operation takes effect at the transaction's commit, inside its caller's call
//!   (queued before, answered after): calls stay linearizable. Conditional calls (`tas`,
//!   `transaction`, `txn`, `update`) never come here; their compares stay their own.
//! - Nothing waits for a batch to fill: a call that finds a lane free and nothing queued goes
//!   out at once, alone, as it would without coalescing.
//! - A batch never writes one key twice (etcd refuses that): it ends before the repeat, so the
//!   later caller's write goes out in a later batch and lands later. Nor does it exceed etcd's
//!   default limits, [`MAX_BATCH_OPS`] operations and [`MAX_BATCH_BYTES`].
//! - etcd refuses a transaction as a whole, before applying anything, when one of its
//!   operations is refused (permission denied on one key, a value too large): the batch's
//!   operations are then sent one by one, so only the caller at fault gets the error. Any other
//!   failure (a timeout, a lost connection) is every caller's, as it would be for a request of
//!   its own.
//! - Reads are batched only on servers that survive a read-only transaction cancelled in
//!   flight (a batch is cancelled when it times out): not on etcd 3.5.0 to 3.5.4, which crash
//!   then (see [`crate::server_version`]), nor while the servers' versions are not known. There
//!   each read goes out alone, as a plain range request, with no lane to wait for.
//! - Every caller's `request_timeout` runs from its own call. A caller that goes away before its
//!   operation is sent is left out of the batch; after that its operation is applied or not
//!   with the whole transaction, never in part.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{Client, Error as EtcdError, KvClient, Txn, TxnOp, TxnOpResponse};
use tokio::sync::oneshot;
use tonic::Code;

use crate::pool::KvPool;
use crate::retry::{resending, Resend};
use crate::server_version::ReadOnlyTxns;

/// Requests of one kind (reads or writes) in flight at once before further ones queue.
pub(crate) const LANES: usize = 2;

/// Operations in one batch at most: etcd's default `--max-txn-ops`.
pub(crate) const MAX_BATCH_OPS: usize = 128;

/// Key and value bytes in one batch at most, well under etcd's default request limit of
/// 1.5 MiB (`--max-request-bytes`) with room for each operation's framing. A larger operation
/// goes out alone.
pub(crate) const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// The bytes one operation adds to a batch besides its key and value.
const OP_OVERHEAD: usize = 16;

/// A plain operation on one stored key (the handle's prefix applied).
pub(crate) enum PlainOp {
    Get(Vec<u8>),
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

/// An operation's answer, as etcd gives it inside a transaction.
pub(crate) type Answer = Result<TxnOpResponse, EtcdError>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Read,
    Write,
}

impl PlainOp {
    fn kind(&self) -> Kind {
        match self {
            PlainOp::Get(_) => Kind::Read,
            PlainOp::Put(..) | PlainOp::Delete(_) => Kind::Write,
        }
    }

    fn key(&self) -> &[u8] {
        match self {
            PlainOp::Get(key) | PlainOp::Put(key, _) | PlainOp::Delete(key) => key,
        }
    }

    fn size(&self) -> usize {
        let value = match self {
            PlainOp::Put(_, value) => value.len(),
            PlainOp::Get(_) | PlainOp::Delete(_) => 0,
        };
        self.key().len() + value + OP_OVERHEAD
    }

    fn txn_op(&self) -> TxnOp {
        match self {
            PlainOp::Get(key) => TxnOp::get(key.as_slice(), None),
            PlainOp::Put(key, value) => TxnOp::put(key.as_slice(), value.as_slice(), None),
            PlainOp::Delete(key) => TxnOp::delete(key.as_slice(), None),
        }
    }

    /// When the operation may be sent again after its connection failed (see [`resending!`]).
    pub(crate) fn resend(&self) -> Resend {
        match self.kind() {
            Kind::Read => Resend::Read,
            Kind::Write => Resend::Write,
        }
    }

    /// Sends the operation as a request of its own, and again if its connection fails under
    /// it where [`PlainOp::resend`] allows.
    pub(crate) async fn send_alone(&self, kv: &mut KvClient) -> Answer {
        resending!(
            self.resend(),
            match self {
                PlainOp::Get(key) => kv.get(key.as_slice(), None).await.map(TxnOpResponse::Get),
                PlainOp::Put(key, value) => kv
                    .put(key.as_slice(), value.as_slice(), None)
                    .await
                    .map(TxnOpResponse::Put),
                PlainOp::Delete(key) => kv
                    .delete(key.as_slice(), None)
                    .await
                    .map(TxnOpResponse::Delete),
            }
        )
    }
}

/// A queued operation and where its answer goes.
struct Pending {
    op: PlainOp,
    reply: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct SideState {
    queue: VecDeque<Pending>,
    /// Requests of this kind in flight (lone calls and batches).
    busy: usize,
}

/// What a handle's calls share for coalescing: a queue and lane count per kind.
pub(crate) struct Coalescer {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    pool: KvPool,
    request_timeout: Duration,
    /// Whether reads may be batched (see [`crate::server_version`]).
    read_only_txns: ReadOnlyTxns,
    reads: Mutex<SideState>,
    writes: Mutex<SideState>,
    batches: AtomicU64,
    batched_ops: AtomicU64,
    refused_batches: AtomicU64,
}

/// What a handle's coalescing has done so far (for tests and benchmarks).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoalesceStats {
    /// Transactions sent that held several callers' operations.
    pub batches: u64,
    /// The operations those transactions held.
    pub batched_ops: u64,
    /// Batches etcd refused as a whole, whose operations then went out one by one.
    pub refused_batches: u64,
}

/// How a call goes out.
pub(crate) enum Route {
    /// Alone, now, on a lane held until the [`Lane`] is dropped (`None`: a read where reads
    /// are not batched, which needs no lane).
    Alone(Option<Lane>, PlainOp),
    /// In a batch: the answer arrives here.
    Queued(oneshot::Receiver<Answer>),
}

/// A lane held by a request in flight; dropping it frees the lane and sends what queued.
pub(crate) struct Lane {
    inner: Arc<Inner>,
    kind: Kind,
}

impl Drop for Lane {
    fn drop(&mut self) {
        let mut side = self.inner.side(self.kind);
        side.busy = side.busy.saturating_sub(1);
        Inner::send_queued(&self.inner, self.kind, side);
    }
}

impl Coalescer {
    pub(crate) fn new(
        client: Client,
        request_timeout: Duration,
        read_only_txns: ReadOnlyTxns,
    ) -> Self {
        Coalescer {
            inner: Arc::new(Inner {
                client,
                pool: KvPool::new(),
                request_timeout,
                read_only_txns,
                reads: Mutex::default(),
                writes: Mutex::default(),
                batches: AtomicU64::new(0),
                batched_ops: AtomicU64::new(0),
                refused_batches: AtomicU64::new(0),
            }),
        }
    }

    pub(crate) fn stats(&self) -> CoalesceStats {
        let inner = &self.inner;
        CoalesceStats {
            batches: inner.batches.load(Ordering::Relaxed),
            batched_ops: inner.batched_ops.load(Ordering::Relaxed),
            refused_batches: inner.refused_batches.load(Ordering::Relaxed),
        }
    }

    /// Where `op` goes: alone when a lane of its kind is free and nothing of its kind waits,
    /// queued for the next batch otherwise; a read always alone where reads are not batched.
    pub(crate) fn route(&self, op: PlainOp) -> Route {
        let kind = op.kind();
        if kind == Kind::Read && !self.inner.read_only_txns.cancel_safe() {
            return Route::Alone(None, op);
        }
        let mut side = self.inner.side(kind);
        if side.queue.is_empty() && side.busy < LANES {
            side.busy += 1;
            drop(side);
            let lane = Lane {
                inner: Arc::clone(&self.inner),
                kind,
            };
            return Route::Alone(Some(lane), op);
        }
        let (reply, answer) = oneshot::channel();
        side.queue.push_back(Pending { op, reply });
        Inner::send_queued(&self.inner, kind, side);
        Route::Queued(answer)
    }
}

impl Inner {
    fn side(&self, kind: Kind) -> MutexGuard<'_, SideState> {
        let side = match kind {
            Kind::Read => &self.reads,
            Kind::Write => &self.writes,
        };
        side.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends what is queued of `kind` (`side` is its state, locked), a batch per free lane.
    fn send_queued(inner: &Arc<Inner>, kind: Kind, mut side: MutexGuard<'_, SideState>) {
        while !side.queue.is_empty() && side.busy < LANES {
            let batch = take_batch(&mut side.queue);
            if batch.is_empty() {
                continue;
            }
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                // No runtime (it is shutting down): these callers' answers never come, and
                // each of them times out as its own request would have.
                return;
            };
            side.busy += 1;
            let lane = Lane {
                inner: Arc::clone(inner),
                kind,
            };
            runtime.spawn(send_batch(Arc::clone(inner), batch, lane));
        }
    }
}

/// The next batch from the front of `queue`: callers still waiting, in order, up to the
/// limits and never a write to one key twice (etcd refuses that; reads of one key may repeat).
/// Callers that went away are dropped from the queue.
fn take_batch(queue: &mut VecDeque<Pending>) -> Vec<Pending> {
    let mut batch: Vec<Pending> = Vec::new();
    let mut keys: HashSet<Vec<u8>> = HashSet::new();
    let mut bytes = 0;
    while let Some(next) = queue.front() {
        if next.reply.is_closed() {
            queue.pop_front();
            continue;
        }
        let size = next.op.size();
        let full = batch.len() == MAX_BATCH_OPS
            || (!batch.is_empty() && bytes + size > MAX_BATCH_BYTES)
            || (next.op.kind() == Kind::Write && keys.contains(next.op.key()));
        if full {
            break;
        }
        let Some(next) = queue.pop_front() else {
            break;
        };
        bytes += size;
        keys.insert(next.op.key().to_vec());
        batch.push(next);
    }
    batch
}

/// Sends `batch` (one request, a transaction unless it holds one operation) and hands each
/// caller its answer; the lane frees when done.
async fn send_batch(inner: Arc<Inner>, batch: Vec<Pending>, lane: Lane) {
    if batch.len() == 1 {
        for pending in batch {
            answer_alone(&inner, pending).await;
        }
        return;
    }
    let mut kv = inner.pool.take(&inner.client);
    inner.batches.fetch_add(1, Ordering::Relaxed);
    inner
        .batched_ops
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    // A batch holds one kind of operation: sent again as a read or a write would be.
    let resend = batch
        .first()
        .map_or(Resend::Write, |pending| pending.op.resend());
    let sending = async {
        resending!(resend, {
            let ops: Vec<TxnOp> = batch.iter().map(|pending| pending.op.txn_op()).collect();
            kv.txn(Txn::new().and_then(ops)).await
        })
    };
    let outcome = bounded(&inner, sending).await;
    inner.pool.give_back(kv);
    match outcome {
        // Timed out: every caller times out on its own clock, its outcome unknown.
        None => {}
        Some(Ok(answer)) => {
            let answers = answer.op_responses();
            let sent = batch.len();
            if answers.len() != sent {
                tracing::error!(
                    sent,
                    answered = answers.len(),
                    "etcd answered a coalesced transaction with the wrong number of results"
                );
                for pending in batch {
                    let _ = pending.reply.send(Err(EtcdError::InvalidArgs(format!(
                        "etcd answered a transaction of {} operations with {} results",
                        sent,
                        answers.len()
                    ))));
                }
                return;
            }
            for (pending, answer) in batch.into_iter().zip(answers) {
                let _ = pending.reply.send(Ok(answer));
            }
        }
        Some(Err(err)) if refused_before_applying(&err) => {
            inner.refused_batches.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                operations = batch.len(),
                error = %err,
                "etcd refused a coalesced transaction; sending its operations one by one"
            );
            let alone = batch
                .into_iter()
                .map(|pending| answer_alone(&inner, pending));
            futures::future::join_all(alone).await;
        }
        Some(Err(err)) => {
            for pending in batch {
                let _ = pending.reply.send(Err(copy_error(&err)));
            }
        }
    }
    // Only now is the lane free for the next batch.
    drop(lane);
}

/// Sends `pending`'s operation as a request of its own and hands its caller the answer (none
/// when it timed out: the caller times out on its own clock).
async fn answer_alone(inner: &Inner, Pending { op, reply }: Pending) {
    let mut kv = inner.pool.take(&inner.client);
    if let Some(answer) = bounded(inner, op.send_alone(&mut kv)).await {
        let _ = reply.send(answer);
    }
    inner.pool.give_back(kv);
}

/// `request` bounded by `request_timeout`; `None` when it timed out.
async fn bounded<T>(inner: &Inner, request: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(inner.request_timeout, request)
        .await
        .ok()
}

/// Whether etcd refused the transaction as a whole before applying any of it, for a reason
/// that may belong to one of its operations.
fn refused_before_applying(err: &EtcdError) -> bool {
    let EtcdError::GRpcStatus(status) = err else {
        return false;
    };
    matches!(
        status.code(),
        Code::InvalidArgument | Code::PermissionDenied | Code::ResourceExhausted
    ) || status.message().contains("permission denied")
}

/// The same error for another caller of a failed batch (etcd-client's errors do not clone).
fn copy_error(err: &EtcdError) -> EtcdError {
    match err {
        EtcdError::GRpcStatus(status) => EtcdError::GRpcStatus(status.clone()),
        EtcdError::IoError(io) => {
            EtcdError::IoError(std::io::Error::new(io.kind(), io.to_string()))
        }
        EtcdError::TransportError(_) => EtcdError::IoError(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            err.to_string(),
        )),
        other => EtcdError::InvalidArgs(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(ops: Vec<PlainOp>) -> (VecDeque<Pending>, Vec<oneshot::Receiver<Answer>>) {
        let mut queue = VecDeque::new();
        let mut answers = Vec::new();
        for op in ops {
            let (reply, answer) = oneshot::channel();
            queue.push_back(Pending { op, reply });
            answers.push(answer);
        }
        (queue, answers)
    }

    fn put(key: &str, value_len: usize) -> PlainOp {
        PlainOp::Put(key.as_bytes().to_vec(), vec![b'v'; value_len])
    }

    fn keys(batch: &[Pending]) -> Vec<String> {
        batch
            .iter()
            .map(|pending| String::from_utf8_lossy(pending.op.key()).into_owned())
            .collect()
    }

    #[test]
    fn a_batch_ends_before_a_key_it_already_holds() {
        let (mut queue, _answers) = queued(vec![
            put("a", 1),
            PlainOp::Delete(b"b".to_vec()),
            put("a", 1),
            put("c", 1),
        ]);
        assert_eq!(keys(&take_batch(&mut queue)), ["a", "b"]);
        // The later write to "a" goes in the next batch, after the first.
        assert_eq!(keys(&take_batch(&mut queue)), ["a", "c"]);
        assert!(queue.is_empty());
    }

    #[test]
    fn reads_of_one_key_share_a_batch() {
        let get = |key: &str| PlainOp::Get(key.as_bytes().to_vec());
        let (mut queue, _answers) = queued(vec![get("a"), get("a"), get("b"), get("a")]);
        assert_eq!(keys(&take_batch(&mut queue)), ["a", "a", "b", "a"]);
    }

    #[test]
    fn a_batch_holds_at_most_max_batch_ops() {
        let ops = (0..MAX_BATCH_OPS + 3)
            .map(|i| PlainOp::Get(format!("k{i}").into_bytes()))
            .collect();
        let (mut queue, _answers) = queued(ops);
        assert_eq!(take_batch(&mut queue).len(), MAX_BATCH_OPS);
        assert_eq!(take_batch(&mut queue).len(), 3);
    }

    #[test]
    fn a_batch_holds_at_most_max_batch_bytes_but_a_large_op_goes_alone() {
        let half = MAX_BATCH_BYTES / 2;
        let (mut queue, _answers) = queued(vec![
            put("a", half),
            put("b", half),
            put("c", MAX_BATCH_BYTES * 2),
            put("d", 1),
        ]);
        assert_eq!(keys(&take_batch(&mut queue)), ["a"]);
        assert_eq!(keys(&take_batch(&mut queue)), ["b"]);
        assert_eq!(keys(&take_batch(&mut queue)), ["c"]);
        assert_eq!(keys(&take_batch(&mut queue)), ["d"]);
    }

    #[test]
    fn callers_that_went_away_are_left_out() {
        let (mut queue, mut answers) = queued(vec![put("a", 1), put("b", 1), put("c", 1)]);
        drop(answers.remove(1));
        assert_eq!(keys(&take_batch(&mut queue)), ["a", "c"]);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_refusal_of_one_operation_is_told_from_an_outage() {
        let status = |code, message: &str| EtcdError::GRpcStatus(tonic::Status::new(code, message));
        assert!(refused_before_applying(&status(
            Code::PermissionDenied,
            "etcdserver: permission denied"
        )));
        assert!(refused_before_applying(&status(
            Code::InvalidArgument,
            "etcdserver: request is too large"
        )));
        assert!(!refused_before_applying(&status(
            Code::Unavailable,
            "etcdserver: no leader"
        )));
        let copied = copy_error(&status(Code::Unavailable, "etcdserver: no leader"));
        assert!(
            matches!(&copied, EtcdError::GRpcStatus(s) if s.code() == Code::Unavailable),
            "{copied:?}"
        );
    }
}
