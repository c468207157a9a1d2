//! The `data` part of the report (`HMETCD_BENCH_ONLY=data`): the data API of issue 10 against
//! raw etcd-client doing the same thing, in the same run, in alternating rounds.
//!
//! - `get_prefix` of 100 and of 10,000 keys; raw: one range request with the prefix. The
//!   10,000 keys once more against raw paging the way hmetcd's etcd backend pages (a first
//!   page of 1,000 keys, then the rest at its revision): the request shape apart from the
//!   library.
//! - a 4-op `txn`: a value compare, then 2 puts and 2 gets; raw: the same txn.
//! - `update` under contention: 16 tasks on one key, successful updates per second; raw: a
//!   hand-written CAS loop (get, then txn `mod_revision ==` seen → put, else get) on one client.
//! - `list` paging 100,000 keys by 1,000 to the end; raw: range requests with limit 1,000, each
//!   starting after the last key, at the first page's revision.
//! - `get_prefix` of all 100,000 keys (5.3 MiB), reported without a target: raw's single range
//!   request needs its decode limit raised above tonic's 4 MiB default; hmetcd pages.
//!
//! For every single-call figure it also reads etcd's own counters (`/metrics` on the client
//! URL) around each side's block: the gRPC calls (Range, Txn) and the response bytes each call
//! cost the server, so a ratio that misses its target says whether it is the request shape.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, KvClient, TxnOp, TxnOpResponse};
use hmetcd_core::{Compare, CompareOp, KeyValue, Kvi, ListRequest, Op, Txn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{cpu_ns, mean_duration, median, must, quantile, us, verdict, Report, Settings};
use super::{PREFIX, SEQUENTIAL_SLOWDOWN_TARGET, VALUE};

/// The prefixes of the preloaded key sets, under the handle's prefix.
const SMALL: &str = "data/p100/";
const MID: &str = "data/p10k/";
const BIG: &str = "data/list/";
const SMALL_KEYS: usize = 100;
const MID_KEYS: usize = 10_000;
const BIG_KEYS: usize = 100_000;
const PAGE: usize = 1_000;
/// The txn's keys: compared and put (a, b), read (c, d).
const TXN_KEYS: [&str; 4] = ["data/txn/a", "data/txn/b", "data/txn/c", "data/txn/d"];
/// The counters of the contention runs, one per side.
const HM_COUNTER: &str = "data/counter-hmetcd";
const RAW_COUNTER: &str = "data/counter-raw";
const UPDATE_TASKS: usize = 16;
/// `update` against the raw CAS loop: at least 90% of its successful updates per second.
const UPDATE_RATIO_TARGET: f64 = 0.90;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataOp {
    Prefix100,
    Prefix10k,
    /// The same `get_prefix`, against raw etcd-client paging the way hmetcd does.
    Prefix10kPaged,
    Txn4,
    ListScan,
}

impl DataOp {
    fn name(self) -> &'static str {
        match self {
            DataOp::Prefix100 => "get_prefix, 100 keys",
            DataOp::Prefix10k => "get_prefix, 10,000 keys",
            DataOp::Prefix10kPaged => {
                "get_prefix, 10,000 keys; raw paged like hmetcd (1,000 keys, then the rest at that revision)"
            }
            DataOp::Txn4 => "txn: compare + 2 puts + 2 gets",
            DataOp::ListScan => "list 100,000 keys by 1,000 (whole scan, 100 pages)",
        }
    }

    /// Calls per side and block, scaled from `HMETCD_BENCH_BLOCK` (250) by the call's cost.
    fn per_block(self, block: usize) -> usize {
        match self {
            DataOp::Prefix100 | DataOp::Txn4 => block,
            DataOp::Prefix10k | DataOp::Prefix10kPaged => (block / 25).max(1),
            DataOp::ListScan => 1,
        }
    }
}

/// Runs the part and writes its section of the report.
pub(super) async fn data_part(
    kv: &Arc<dyn Kvi>,
    raw: &Client,
    metrics_url: Option<&str>,
    settings: &Settings,
    report: &mut Report,
) {
    let loading = Instant::now();
    preload(raw).await;
    eprintln!(
        "data: {} keys preloaded in {:.1} s",
        SMALL_KEYS + MID_KEYS + BIG_KEYS,
        loading.elapsed().as_secs_f64()
    );
    report.section("Data API: get_prefix, txn, update, list against raw etcd-client");
    let _ = writeln!(
        report.markdown,
        "Interleaved blocks of calls on both sides (alternating which goes first), as in the \
         sequential part. Ratios are hmetcd's time per call over raw etcd-client's; target ≤ \
         {SEQUENTIAL_SLOWDOWN_TARGET:.2}, judged on the median ratio. Raw: `get_prefix` = one \
         range request with the prefix; the txn = the same compare and ops; `list` = range \
         requests with limit {PAGE} each starting after the last key, at the first page's \
         revision. Both sides turn every answer into the same owned `KeyValue`s (key without \
         the prefix, value, metadata).\n\n\
         RPCs and bytes per call are etcd's own counters (`grpc_server_handled_total` for \
         Range and Txn, `etcd_network_client_grpc_sent_bytes_total`), read around each side's \
         blocks: what each call cost the server.\n\n\
         | operation | calls per side | hmetcd median µs | etcd-client median µs | hmetcd p99 µs | etcd-client p99 µs | median ratio | mean ratio | verdict | Range+Txn RPCs per call hmetcd / raw | response kB per call hmetcd / raw | client CPU µs per call hmetcd / raw |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"
    );
    for op in [
        DataOp::Prefix100,
        DataOp::Prefix10k,
        DataOp::Prefix10kPaged,
        DataOp::Txn4,
        DataOp::ListScan,
    ] {
        eprintln!("data: {} ...", op.name());
        let measured = measure(&**kv, raw, op, metrics_url, settings).await;
        row(report, op, &measured);
    }
    whole_big_prefix(&**kv, raw, settings, report).await;
    update_part(kv, raw, settings, report).await;
    // The 110,000 keys would only slow the parts that follow.
    delete_data_keys(raw).await;
}

/// Deletes every key of the part.
async fn delete_data_keys(raw: &Client) {
    raw.kv_client()
        .delete(
            format!("{PREFIX}data/"),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .ok();
}

/// Puts the three key sets, 100 puts per txn, 16 txns at a time.
async fn preload(raw: &Client) {
    delete_data_keys(raw).await;
    let mut keys: Vec<String> = Vec::with_capacity(SMALL_KEYS + MID_KEYS + BIG_KEYS + 4);
    keys.extend((0..SMALL_KEYS).map(|i| format!("{PREFIX}{SMALL}{i:03}")));
    keys.extend((0..MID_KEYS).map(|i| format!("{PREFIX}{MID}{i:05}")));
    keys.extend((0..BIG_KEYS).map(|i| format!("{PREFIX}{BIG}{i:06}")));
    keys.extend(TXN_KEYS.iter().map(|k| format!("{PREFIX}{k}")));
    let batches: Vec<Vec<String>> = keys.chunks(100).map(<[String]>::to_vec).collect();
    let batches = Arc::new(std::sync::Mutex::new(batches));
    let mut writers = Vec::new();
    for _ in 0..16 {
        let mut kv = raw.kv_client();
        let batches = Arc::clone(&batches);
        writers.push(tokio::spawn(async move {
            loop {
                let batch = match batches.lock() {
                    Ok(mut batches) => batches.pop(),
                    Err(_) => None,
                };
                let Some(batch) = batch else { break };
                let puts: Vec<TxnOp> = batch
                    .into_iter()
                    .map(|k| TxnOp::put(k, VALUE, None))
                    .collect();
                must(
                    kv.txn(etcd_client::Txn::new().and_then(puts)).await,
                    "data preload",
                );
            }
        }));
    }
    for writer in writers {
        must(writer.await, "data preload task");
    }
}

/// A raw answer's pair as the same owned `KeyValue` hmetcd returns, taken apart without
/// copying (as hmetcd does).
fn owned(pair: etcd_client::KeyValue) -> Result<KeyValue, String> {
    let metadata = (
        pair.create_revision(),
        pair.mod_revision(),
        pair.version(),
        pair.lease(),
    );
    let (key, value) = pair.into_key_value();
    let mut key = String::from_utf8(key).map_err(|err| err.to_string())?;
    key.drain(..PREFIX.len().min(key.len()));
    let value = String::from_utf8(value).map_err(|err| err.to_string())?;
    let (create, modified, version, lease) = metadata;
    Ok(KeyValue::new(key, value).with_metadata(create, modified, version, lease))
}

/// All pairs of a raw answer, owned.
fn all_owned(pairs: Vec<etcd_client::KeyValue>) -> Result<Vec<KeyValue>, String> {
    pairs.into_iter().map(owned).collect()
}

/// The end of the range of every key starting with `prefix` (etcd's prefix end).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn hm_txn() -> Txn {
    let [a, b, c, d] = TXN_KEYS;
    Txn::new()
        .when(Compare::value(a, CompareOp::Equal, VALUE))
        .then(Op::put(a, VALUE))
        .then(Op::put(b, VALUE))
        .then(Op::get(c))
        .then(Op::get(d))
}

fn raw_txn() -> etcd_client::Txn {
    let [a, b, c, d] = TXN_KEYS.map(|k| format!("{PREFIX}{k}"));
    etcd_client::Txn::new()
        .when([etcd_client::Compare::value(
            a.as_str(),
            etcd_client::CompareOp::Equal,
            VALUE,
        )])
        .and_then([
            TxnOp::put(a, VALUE, None),
            TxnOp::put(b, VALUE, None),
            TxnOp::get(c, None),
            TxnOp::get(d, None),
        ])
}

fn expect_len(what: &str, found: usize, expected: usize) -> Result<(), String> {
    if found == expected {
        Ok(())
    } else {
        Err(format!("{what}: {found} keys, expected {expected}"))
    }
}

/// One call through the `Kvi` interface.
async fn hm_call(kv: &dyn Kvi, op: DataOp) -> Result<(), String> {
    let err = |err: hmetcd_core::Error| err.to_string();
    match op {
        DataOp::Prefix100 => {
            let found = kv.get_prefix(SMALL).await.map_err(err)?;
            expect_len("get_prefix", found.len(), SMALL_KEYS)
        }
        DataOp::Prefix10k | DataOp::Prefix10kPaged => {
            let found = kv.get_prefix(MID).await.map_err(err)?;
            expect_len("get_prefix", found.len(), MID_KEYS)
        }
        DataOp::Txn4 => {
            let outcome = kv.txn(hm_txn()).await.map_err(err)?;
            let found = outcome.gets.iter().flatten().count();
            if !outcome.succeeded || found != 2 {
                return Err(format!(
                    "txn: succeeded {}, {found} of 2 gets found",
                    outcome.succeeded
                ));
            }
            Ok(())
        }
        DataOp::ListScan => {
            let mut request = ListRequest::prefix(BIG).limit(PAGE);
            let mut seen = 0;
            loop {
                let page = kv.list(request.clone()).await.map_err(err)?;
                seen += page.items.len();
                match page.items.last() {
                    Some(last) if page.more => request = request.after(last.key.clone()),
                    _ => break,
                }
            }
            expect_len("list scan", seen, BIG_KEYS)
        }
    }
}

/// The same with raw etcd-client: the same requests, the answers turned into the same values.
async fn raw_call(kv: &mut KvClient, op: DataOp) -> Result<(), String> {
    let err = |err: etcd_client::Error| err.to_string();
    match op {
        DataOp::Prefix100 | DataOp::Prefix10k => {
            let (prefix, expected) = if op == DataOp::Prefix100 {
                (SMALL, SMALL_KEYS)
            } else {
                (MID, MID_KEYS)
            };
            let mut answer = kv
                .get(
                    format!("{PREFIX}{prefix}"),
                    Some(GetOptions::new().with_prefix()),
                )
                .await
                .map_err(err)?;
            let found = all_owned(answer.take_kvs())?;
            expect_len("range", found.len(), expected)
        }
        DataOp::Prefix10kPaged => {
            // hmetcd's shape: a first page of 1,000 keys, then the rest in one page read at
            // the first page's revision.
            let end = prefix_end(&format!("{PREFIX}{MID}"));
            let options = GetOptions::new().with_range(end.clone()).with_limit(1_000);
            let mut first = kv
                .get(format!("{PREFIX}{MID}"), Some(options))
                .await
                .map_err(err)?;
            let revision = first.header().map_or(0, |header| header.revision());
            let mut found = all_owned(first.take_kvs())?;
            if let Some(last) = found.last().filter(|_| first.more()) {
                let options = GetOptions::new()
                    .with_range(end)
                    .with_limit(MID_KEYS as i64)
                    .with_revision(revision);
                let mut rest = kv
                    .get(format!("{PREFIX}{}\0", last.key), Some(options))
                    .await
                    .map_err(err)?;
                found.extend(all_owned(rest.take_kvs())?);
            }
            expect_len("raw paged range", found.len(), MID_KEYS)
        }
        DataOp::Txn4 => {
            let answer = kv.txn(raw_txn()).await.map_err(err)?;
            let mut gets = Vec::with_capacity(2);
            for response in answer.op_responses() {
                if let TxnOpResponse::Get(mut got) = response {
                    gets.push(got.take_kvs().into_iter().next().map(owned).transpose()?);
                }
            }
            let found = gets.iter().flatten().count();
            if !answer.succeeded() || found != 2 {
                return Err(format!(
                    "raw txn: succeeded {}, {found} of 2 gets found",
                    answer.succeeded()
                ));
            }
            Ok(())
        }
        DataOp::ListScan => {
            let end = prefix_end(&format!("{PREFIX}{BIG}"));
            let mut start = format!("{PREFIX}{BIG}").into_bytes();
            let mut revision = 0;
            let mut seen = 0;
            loop {
                let mut options = GetOptions::new()
                    .with_range(end.clone())
                    .with_limit(PAGE as i64);
                if revision > 0 {
                    options = options.with_revision(revision);
                }
                let mut answer = kv.get(start, Some(options)).await.map_err(err)?;
                if revision == 0 {
                    revision = answer.header().map_or(0, |header| header.revision());
                }
                let more = answer.more();
                let items = all_owned(answer.take_kvs())?;
                seen += items.len();
                match items.last() {
                    Some(last) if more => {
                        start = format!("{PREFIX}{}\0", last.key).into_bytes();
                    }
                    _ => break,
                }
            }
            expect_len("raw list scan", seen, BIG_KEYS)
        }
    }
}

/// What etcd counted: Range and Txn calls handled, bytes sent to gRPC clients.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    rpcs: f64,
    sent_bytes: f64,
}

/// etcd's counters from `/metrics` on its client URL (plain HTTP only); `None` if unreadable.
async fn counters(url: Option<&str>) -> Option<Counters> {
    let address = url?.strip_prefix("http://")?.trim_end_matches('/');
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok()?;
    let mut found = Counters::default();
    let mut any = false;
    for line in body.lines() {
        let value = || line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if line.starts_with("grpc_server_handled_total{")
            && (line.contains("grpc_method=\"Range\"") || line.contains("grpc_method=\"Txn\""))
        {
            found.rpcs += value().unwrap_or(0.0);
            any = true;
        } else if line.starts_with("etcd_network_client_grpc_sent_bytes_total ") {
            found.sent_bytes += value().unwrap_or(0.0);
            any = true;
        }
    }
    any.then_some(found)
}

/// Per-call times of both sides, and what they cost the server and the client.
struct Measured {
    hm: Vec<Duration>,
    raw: Vec<Duration>,
    /// Per side: etcd's counters over its blocks (when readable), CPU ns.
    counted: [Option<Counters>; 2],
    cpu_ns: [u64; 2],
    /// What hmetcd answered instead, when it cannot do the call (a backend without it).
    hm_error: Option<String>,
}

async fn measure(
    kv: &dyn Kvi,
    raw: &Client,
    op: DataOp,
    metrics_url: Option<&str>,
    settings: &Settings,
) -> Measured {
    let mut raw_kv = raw.kv_client();
    let per_block = op.per_block(settings.block);
    let mut measured = Measured {
        hm: Vec::new(),
        raw: Vec::new(),
        counted: [Some(Counters::default()); 2],
        cpu_ns: [0; 2],
        hm_error: hm_call(kv, op).await.err(),
    };
    // One unmeasured block each first: connections and caches warm.
    for _ in 0..per_block {
        if measured.hm_error.is_none() {
            must(hm_call(kv, op).await, op.name());
        }
        must(raw_call(&mut raw_kv, op).await, op.name());
    }
    for round in 0..settings.rounds * 2 {
        for side in [round % 2, 1 - round % 2] {
            if side == 0 && measured.hm_error.is_some() {
                continue;
            }
            let before = counters(metrics_url).await;
            let cpu_before = cpu_ns();
            for _ in 0..per_block {
                let began = Instant::now();
                if side == 0 {
                    let outcome = hm_call(kv, op).await;
                    measured.hm.push(began.elapsed());
                    must(outcome, op.name());
                } else {
                    let outcome = raw_call(&mut raw_kv, op).await;
                    measured.raw.push(began.elapsed());
                    must(outcome, op.name());
                }
            }
            measured.cpu_ns[side] += cpu_ns().saturating_sub(cpu_before);
            let after = counters(metrics_url).await;
            measured.counted[side] = match (measured.counted[side], before, after) {
                (Some(sum), Some(before), Some(after)) => Some(Counters {
                    rpcs: sum.rpcs + after.rpcs - before.rpcs,
                    sent_bytes: sum.sent_bytes + after.sent_bytes - before.sent_bytes,
                }),
                _ => None,
            };
        }
    }
    measured
}

fn row(report: &mut Report, op: DataOp, measured: &Measured) {
    if let Some(error) = &measured.hm_error {
        let raw = &measured.raw;
        let _ = writeln!(
            report.markdown,
            "| {} | {} | hmetcd: {error} | {:.1} | | {:.0} | | | not measured | | | |",
            op.name(),
            raw.len(),
            us(quantile(raw, 0.5)),
            us(quantile(raw, 0.99)),
        );
        return;
    }
    let (hm, raw) = (&measured.hm, &measured.raw);
    let mean_ratio = mean_duration(hm).as_secs_f64() / mean_duration(raw).as_secs_f64();
    let median_ratio = quantile(hm, 0.5).as_secs_f64() / quantile(raw, 0.5).as_secs_f64();
    let calls = [hm.len().max(1) as f64, raw.len().max(1) as f64];
    let per_call = |side: usize, pick: fn(&Counters) -> f64, scale: f64, digits: usize| {
        measured.counted[side].map_or("–".to_owned(), |counted| {
            format!("{:.digits$}", pick(&counted) / calls[side] / scale)
        })
    };
    let rpcs = |side| per_call(side, |c| c.rpcs, 1.0, 2);
    let kb = |side| per_call(side, |c| c.sent_bytes, 1024.0, 1);
    let cpu = |side: usize| measured.cpu_ns[side] as f64 / 1e3 / calls[side];
    let _ = writeln!(
        report.markdown,
        "| {} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {median_ratio:.3} | {mean_ratio:.3} | {} | {} / {} | {} / {} | {:.1} / {:.1} |",
        op.name(),
        hm.len(),
        us(quantile(hm, 0.5)),
        us(quantile(raw, 0.5)),
        us(quantile(hm, 0.99)),
        us(quantile(raw, 0.99)),
        verdict(median_ratio <= SEQUENTIAL_SLOWDOWN_TARGET),
        rpcs(0),
        rpcs(1),
        kb(0),
        kb(1),
        cpu(0),
        cpu(1),
    );
}

/// One contention run: successful updates and attempts.
#[derive(Debug, Clone, Copy)]
struct UpdateRun {
    rate: f64,
    attempts_per_update: f64,
}

/// 16 tasks updating one key through one shared handle for `span`.
async fn hm_updates(kv: &Arc<dyn Kvi>, span: Duration) -> (UpdateRun, u64) {
    let attempts = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let deadline = began + span;
    let mut tasks = Vec::with_capacity(UPDATE_TASKS);
    for _ in 0..UPDATE_TASKS {
        let kv = Arc::clone(kv);
        let attempts = Arc::clone(&attempts);
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                let mut increment = |current: Option<&str>| {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    let n: u64 = current.and_then(|v| v.parse().ok()).unwrap_or(0);
                    Some((n + 1).to_string())
                };
                must(kv.update(HM_COUNTER, &mut increment).await, "update");
                done += 1;
            }
            done
        }));
    }
    let mut done = 0;
    for task in tasks {
        done += must(task.await, "update task");
    }
    let run = UpdateRun {
        rate: done as f64 / began.elapsed().as_secs_f64(),
        attempts_per_update: attempts.load(Ordering::Relaxed) as f64 / done.max(1) as f64,
    };
    (run, done)
}

/// One raw read-modify-write: get, then txn `mod_revision == seen` → put, else get; again
/// from the else branch's answer until it succeeds. Returns the attempts.
async fn raw_cas(kv: &mut KvClient, key: &str) -> Result<u64, String> {
    let err = |err: etcd_client::Error| err.to_string();
    let mut answer = kv.get(key, None).await.map_err(err)?;
    let mut current = answer
        .take_kvs()
        .into_iter()
        .next()
        .map(owned)
        .transpose()?;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let n: u64 = current
            .as_ref()
            .and_then(|kv| kv.value.parse().ok())
            .unwrap_or(0);
        let seen = current.as_ref().map_or(0, |kv| kv.mod_revision);
        let txn = etcd_client::Txn::new()
            .when([etcd_client::Compare::mod_revision(
                key,
                etcd_client::CompareOp::Equal,
                seen,
            )])
            .and_then([TxnOp::put(key, (n + 1).to_string(), None)])
            .or_else([TxnOp::get(key, None)]);
        let answer = kv.txn(txn).await.map_err(err)?;
        if answer.succeeded() {
            return Ok(attempts);
        }
        current = None;
        for response in answer.op_responses() {
            if let TxnOpResponse::Get(mut got) = response {
                current = got.take_kvs().into_iter().next().map(owned).transpose()?;
            }
        }
    }
}

/// 16 tasks, each with a `KvClient` of one `Client`, running the raw CAS loop for `span`.
async fn raw_updates(raw: &Client, span: Duration) -> (UpdateRun, u64) {
    let began = Instant::now();
    let deadline = began + span;
    let mut tasks = Vec::with_capacity(UPDATE_TASKS);
    for _ in 0..UPDATE_TASKS {
        let mut kv = raw.kv_client();
        tasks.push(tokio::spawn(async move {
            let key = format!("{PREFIX}{RAW_COUNTER}");
            let (mut done, mut attempts) = (0u64, 0u64);
            while Instant::now() < deadline {
                attempts += must(raw_cas(&mut kv, &key).await, "raw CAS");
                done += 1;
            }
            (done, attempts)
        }));
    }
    let (mut done, mut attempts) = (0, 0);
    for task in tasks {
        let (d, a) = must(task.await, "raw CAS task");
        done += d;
        attempts += a;
    }
    let run = UpdateRun {
        rate: done as f64 / began.elapsed().as_secs_f64(),
        attempts_per_update: attempts as f64 / done.max(1) as f64,
    };
    (run, done)
}

/// A counter's value as stored.
async fn counter(raw: &Client, key: &str) -> u64 {
    let answer = must(
        raw.kv_client().get(format!("{PREFIX}{key}"), None).await,
        "reading a counter",
    );
    answer
        .kvs()
        .first()
        .and_then(|kv| kv.value_str().ok()?.parse().ok())
        .unwrap_or(0)
}

async fn update_part(kv: &Arc<dyn Kvi>, raw: &Client, settings: &Settings, report: &mut Report) {
    eprintln!("data: update, {UPDATE_TASKS} tasks on one key ...");
    let span = Duration::from_secs_f64(settings.throughput_secs);
    let mut probe = |_: Option<&str>| Some("0".to_owned());
    if let Err(err) = kv.update(HM_COUNTER, &mut probe).await {
        let (run, _) = raw_updates(raw, span).await;
        let _ = writeln!(
            report.markdown,
            "\nupdate, {UPDATE_TASKS} tasks on one key: hmetcd answered {err}; the raw CAS \
             loop alone made {:.0} updates/s ({:.2} attempts each).",
            run.rate, run.attempts_per_update
        );
        return;
    }
    must(kv.delete(HM_COUNTER).await, "resetting the counter");
    // Warm both paths; the counters keep counting from there.
    let (_, mut hm_total) = hm_updates(kv, Duration::from_millis(300)).await;
    let (_, mut raw_total) = raw_updates(raw, Duration::from_millis(300)).await;
    let (mut hm_runs, mut raw_runs) = (Vec::new(), Vec::new());
    for round in 0..settings.throughput_rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            if side == 0 {
                let (run, done) = hm_updates(kv, span).await;
                hm_runs.push(run);
                hm_total += done;
            } else {
                let (run, done) = raw_updates(raw, span).await;
                raw_runs.push(run);
                raw_total += done;
            }
        }
    }
    // No update lost on either side: each counter is the number of successful updates.
    let (hm_value, raw_value) = (
        counter(raw, HM_COUNTER).await,
        counter(raw, RAW_COUNTER).await,
    );
    let mut ratios: Vec<f64> = hm_runs
        .iter()
        .zip(&raw_runs)
        .map(|(hm, raw)| hm.rate / raw.rate)
        .collect();
    ratios.sort_by(f64::total_cmp);
    let ratio = median(&ratios);
    let mean_of = |runs: &[UpdateRun], pick: fn(&UpdateRun) -> f64| {
        runs.iter().map(pick).sum::<f64>() / runs.len().max(1) as f64
    };
    let _ = writeln!(
        report.markdown,
        "\n{UPDATE_TASKS} tasks incrementing one key, {} adjacent pairs of {:.1} s runs \
         (alternating which side goes first): hmetcd `update` on one shared handle against a \
         hand-written CAS loop on one etcd-client `Client` (get; txn `mod_revision == seen` → \
         put, else get; again from the else branch's answer). Ratio = median over the pairs of \
         hmetcd / raw successful updates per second; target ≥ {UPDATE_RATIO_TARGET:.2}.\n\n\
         | figure | hmetcd `update` | raw CAS loop | ratio (median of pairs) | pair ratios min–max | verdict |\n\
         |---|---:|---:|---:|---|---|\n\
         | successful updates/s, {UPDATE_TASKS} tasks, one key | {:.0} | {:.0} | {ratio:.3} | {:.2}–{:.2} | {} |\n\
         | attempts (txns) per successful update | {:.2} | {:.2} | | | |\n\
         | counter = successful updates (nothing lost) | {hm_value} = {hm_total}: {} | {raw_value} = {raw_total}: {} | | | |",
        settings.throughput_rounds,
        settings.throughput_secs,
        mean_of(&hm_runs, |run| run.rate),
        mean_of(&raw_runs, |run| run.rate),
        ratios.first().copied().unwrap_or_default(),
        ratios.last().copied().unwrap_or_default(),
        verdict(ratio >= UPDATE_RATIO_TARGET),
        mean_of(&hm_runs, |run| run.attempts_per_update),
        mean_of(&raw_runs, |run| run.attempts_per_update),
        verdict(hm_value == hm_total),
        verdict(raw_value == raw_total),
    );
}

/// `get_prefix` of all 100,000 keys (5.3 MiB of answer): hmetcd pages it; raw etcd-client's
/// single range request is refused by tonic's default 4 MiB decode limit, and works once the
/// `KvClient`'s limit is raised. A few alternating calls each, reported, no target.
async fn whole_big_prefix(kv: &dyn Kvi, raw: &Client, settings: &Settings, report: &mut Report) {
    eprintln!("data: get_prefix of 100,000 keys ...");
    let prefix = format!("{PREFIX}{BIG}");
    let options = || Some(GetOptions::new().with_prefix());
    let refused = match raw.kv_client().get(prefix.as_str(), options()).await {
        Ok(answer) => format!("answered {} keys", answer.kvs().len()),
        Err(err) => format!("refused: `{err}`"),
    };
    let mut raised = raw.kv_client().max_decoding_message_size(64 << 20);
    let (mut hm, mut rw) = (Vec::new(), Vec::new());
    for round in 0..settings.rounds.max(1) * 2 {
        for side in [round % 2, 1 - round % 2] {
            let began = Instant::now();
            if side == 0 {
                let found = must(kv.get_prefix(BIG).await, "get_prefix of 100,000 keys");
                hm.push(began.elapsed());
                must(
                    expect_len("get_prefix", found.len(), BIG_KEYS),
                    "get_prefix",
                );
            } else {
                let mut answer = must(raised.get(prefix.as_str(), options()).await, "raw range");
                let found = must(all_owned(answer.take_kvs()), "raw range");
                rw.push(began.elapsed());
                must(expect_len("raw range", found.len(), BIG_KEYS), "raw range");
            }
        }
    }
    let _ = writeln!(
        report.markdown,
        "\n`get_prefix` of all 100,000 keys of the list set (a 5.3 MiB answer), {} calls \
         per side alternating, no target: hmetcd (paged under the 4 MiB decode limit) {:.1} ms \
         median; raw etcd-client, one range request with its decode limit raised to 64 MiB \
         (`KvClient::max_decoding_message_size`), {:.1} ms; ratio {:.3}. Raw with its default \
         limit: {refused}",
        hm.len(),
        quantile(&hm, 0.5).as_secs_f64() * 1e3,
        quantile(&rw, 0.5).as_secs_f64() * 1e3,
        quantile(&hm, 0.5).as_secs_f64() / quantile(&rw, 0.5).as_secs_f64(),
    );
}
