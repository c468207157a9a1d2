//! The hmetcd benchmark report: `EtcdKvs` against raw etcd-client doing the same work, in the
//! same run, against one etcd from the test harness (`HMETCD_TEST_ENDPOINTS`, a container or a
//! child process; see `integration-tests`). `MemKvs` runs the throughput and latency parts too.
//!
//! Measured here, where criterion's per-iteration model does not fit: sequential operations
//! (interleaved A/B blocks, so drift biases neither side), throughput with 1, 16 and 64 tasks on
//! one handle, watch and lock handoff latency (median and p99), leader handover and `observe`
//! latency (against etcd's own election service), `open()`, the resident memory of one
//! handle with 1,000 watchers, and the data API (`get_prefix`, `txn`, `update` under
//! contention, `list` paging; see `report/data.rs`). Writes `results.md` and `throughput.csv` to
//! `HMETCD_BENCH_OUT` (default `docs/bench` in the workspace); `scripts/bench.sh` runs it and
//! draws the chart.
//!
//! `cargo bench -p integration-tests --bench report`
//!
//! With `HMETCD_BENCH_RECORDER=debugging`, `metrics-util`'s debugging recorder is installed
//! first, so the `metrics` feature's figures are recorded (the cost of a recorder); without it
//! no recorder is installed.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, ConnectOptions, EventType, GetOptions, KvClient, LockOptions, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp,
};
use futures::StreamExt;
use hmetcd_core::{CompareOp, KeyChange, Kvi};
use hmetcd_mem::MemKvs;
use integration_tests::etcd_server::EtcdServer;

#[path = "report/data.rs"]
mod data;

/// Every key of the run lives under this prefix.
const PREFIX: &str = "bench/";
const VALUE: &str = "value-of-some-length";
/// Keys preloaded; get_range reads `RANGE_LEN` consecutive ones of them.
const KEYS: usize = 10_000;
const RANGE_LEN: usize = 100;
const LOCK_NAME: &str = "bench-lock";
const RAW_LOCK_NAME: &str = "bench/raw-lock";
const ELECTION_NAME: &str = "bench-election";
const RAW_ELECTION_NAME: &str = "bench/raw-election";
const WATCHERS: usize = 1_000;
const CONCURRENCY: [usize; 3] = [1, 16, 64];

/// Targets from the issue.
const SEQUENTIAL_SLOWDOWN_TARGET: f64 = 1.05;
/// The throughput target against raw etcd-client with `tasks` tasks on one handle.
fn throughput_target(tasks: usize) -> f64 {
    match tasks {
        1 => 0.97,
        16 => 1.5,
        _ => 3.0,
    }
}
const WATCH_MEDIAN_TARGET: Duration = Duration::from_millis(1);
const LOCK_MEDIAN_TARGET: Duration = Duration::from_millis(2);
const HANDOVER_MEDIAN_TARGET: Duration = Duration::from_millis(2);
const OBSERVE_MEDIAN_TARGET: Duration = Duration::from_millis(1);
const RSS_TARGET_KB: u64 = 20 * 1024;

fn main() {
    let settings = Settings::from_env();
    if settings.recorder {
        must(
            metrics_util::debugging::DebuggingRecorder::new().install(),
            "installing the debugging recorder",
        );
    }
    let mut server = must(EtcdServer::from_env(), "no etcd for the benchmark");
    let _ = ETCD_PID.set(server.process_id());
    let runtime = must(
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        "tokio runtime",
    );
    let mut report = Report::new(&server, &settings);
    runtime.block_on(run(&server, &settings, &mut report));
    report.finish();
    let out = settings.out_dir.clone();
    must(
        std::fs::create_dir_all(&out),
        "creating the output directory",
    );
    must(
        std::fs::write(out.join("results.md"), &report.markdown),
        "writing results.md",
    );
    must(
        std::fs::write(out.join("throughput.csv"), &report.csv),
        "writing throughput.csv",
    );
    eprintln!("{}", report.markdown);
    eprintln!("wrote {}/results.md and throughput.csv", out.display());
    server.shutdown();
}

struct Settings {
    out_dir: PathBuf,
    /// Seconds of each throughput run.
    throughput_secs: f64,
    /// Interleaved A/B rounds of each measurement.
    rounds: usize,
    /// Pairs of throughput runs (one each side) per operation and number of tasks.
    throughput_rounds: usize,
    /// Operations per side and round in the sequential part.
    block: usize,
    /// The parts to run (`HMETCD_BENCH_ONLY`, comma-separated); empty: all.
    only: Vec<String>,
    /// Whether a metrics recorder is installed (`HMETCD_BENCH_RECORDER=debugging`).
    recorder: bool,
}

impl Settings {
    fn from_env() -> Self {
        let number = |name: &str, default: f64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(default)
        };
        Settings {
            out_dir: std::env::var_os("HMETCD_BENCH_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/bench"))
                }),
            throughput_secs: number("HMETCD_BENCH_SECS", 0.6),
            throughput_rounds: number("HMETCD_BENCH_TP_ROUNDS", 10.0) as usize,
            rounds: number("HMETCD_BENCH_ROUNDS", 4.0) as usize,
            block: number("HMETCD_BENCH_BLOCK", 250.0) as usize,
            only: std::env::var("HMETCD_BENCH_ONLY")
                .unwrap_or_default()
                .split(',')
                .map(|part| part.trim().to_owned())
                .filter(|part| !part.is_empty())
                .collect(),
            recorder: std::env::var("HMETCD_BENCH_RECORDER").as_deref() == Ok("debugging"),
        }
    }

    /// Whether to run `part`: memory, sequential, open, throughput, data, watch, lock or
    /// election.
    fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|only| only == part)
    }
}

async fn run(server: &EtcdServer, settings: &Settings, report: &mut Report) {
    let endpoints = server.endpoints();
    let options = format!("prefix={PREFIX},lock_name={LOCK_NAME},lease_ttl=30s");
    let raw = must(connect_raw(endpoints).await, "raw connect");
    preload(&raw).await;

    // First, while the process is small: what 1,000 watchers on one handle cost.
    if settings.runs("memory") {
        memory(endpoints, &options, report).await;
    }

    let kv: Arc<dyn Kvi> = Arc::new(must(
        hmetcd_etcd::EtcdKvs::connect(endpoints, &options).await,
        "connect",
    ));
    let raw_lease = must(raw.lease_client().grant(300, None).await, "lease grant").id();
    let mem: Arc<dyn Kvi> = Arc::new(must(MemKvs::open("bench", &options), "mem open"));
    for i in 0..KEYS {
        must(mem.store(&key(i), VALUE).await, "mem preload");
    }

    if settings.runs("sequential") || settings.runs("open") {
        report.section("Sequential operations, one call at a time");
        report.sequential_header();
    }
    if settings.runs("sequential") {
        for op in [
            Op::Get,
            Op::Store,
            Op::Tas,
            Op::Transaction,
            Op::GetRange,
            Op::TempKey,
        ] {
            let measured = sequential(&*kv, &raw, raw_lease, op, settings).await;
            report.sequential_row(op.name(), &measured);
        }
    }
    if settings.runs("open") {
        let [hm, raw, raw_same_options] = open_times(endpoints, &options, settings).await;
        let measured = Sequential {
            hm: hm.clone(),
            raw,
            cpu_us: None,
        };
        report.sequential_row("open()", &measured);
        let measured = Sequential {
            hm,
            raw: raw_same_options,
            cpu_us: None,
        };
        report.sequential_row("open(), raw with hmetcd's connect options", &measured);
    }

    if settings.runs("throughput") {
        throughput_part(endpoints, &options, &kv, &raw, &mem, settings, report).await;
    }

    if settings.runs("data") {
        let metrics_url = endpoints.split(',').next();
        data::data_part(&kv, &raw, metrics_url, settings, report).await;
    }

    let watcher: Arc<dyn Kvi> = Arc::new(must(
        hmetcd_etcd::EtcdKvs::connect(endpoints, &options).await,
        "connect",
    ));
    let raw_watcher = must(connect_raw(endpoints).await, "raw connect");
    let mem_watcher: Arc<dyn Kvi> = Arc::new(must(MemKvs::open("bench", &options), "mem open"));
    if settings.runs("watch") {
        report.section("Watch latency: store by one handle to callback on another");
        let (hm, rw, mm) = watch_latency(
            (&kv, &watcher),
            (&raw, &raw_watcher),
            (&mem, &mem_watcher),
            settings,
        )
        .await;
        report.latency_table(&hm, &rw, &mm, WATCH_MEDIAN_TARGET);
    }
    if settings.runs("lock") {
        report.section("Lock handoff latency: unlock by one handle to acquire by a waiting one");
        let (hm, rw, mm) = lock_latency(
            (&kv, &watcher),
            (&raw, &raw_watcher),
            (&mem, &mem_watcher),
            settings,
        )
        .await;
        report.latency_table(&hm, &rw, &mm, LOCK_MEDIAN_TARGET);
    }

    if settings.runs("election") {
        report.section(
            "Leader handover latency: resign by the leader to campaign returning in the next candidate",
        );
        let (hm, rw, mm) = handover_latency(
            (&kv, &watcher),
            (&raw, &raw_watcher),
            (&mem, &mem_watcher),
            settings,
        )
        .await;
        report.latency_table(&hm, &rw, &mm, HANDOVER_MEDIAN_TARGET);
        report.section("Observe latency: proclaim by the leader to the value seen by an observer");
        let (hm, rw, mm) = observe_latency(
            (&kv, &watcher),
            (&raw, &raw_watcher),
            (&mem, &mem_watcher),
            settings,
        )
        .await;
        report.latency_table(&hm, &rw, &mm, OBSERVE_MEDIAN_TARGET);
    }

    for handle in [&kv, &watcher, &mem, &mem_watcher] {
        handle.close().await.ok();
    }
    raw.lease_client().revoke(raw_lease).await.ok();
    raw.kv_client()
        .delete(
            PREFIX,
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .ok();
}

async fn throughput_part(
    endpoints: &str,
    options: &str,
    kv: &Arc<dyn Kvi>,
    raw: &Client,
    mem: &Arc<dyn Kvi>,
    settings: &Settings,
    report: &mut Report,
) {
    report.section("Throughput, tasks sharing one handle (one client for raw etcd-client)");
    report.throughput_header();
    let uncoalesced: Arc<dyn Kvi> = Arc::new(must(
        hmetcd_etcd::EtcdKvs::connect(endpoints, &format!("{options},coalesce=off")).await,
        "connect with coalesce=off",
    ));
    let targets = [
        ("hmetcd-etcd", Target::Kvi(Arc::clone(kv))),
        ("etcd-client", Target::Raw(Box::new(raw.clone()))),
        (
            "hmetcd-etcd coalesce=off",
            Target::Kvi(Arc::clone(&uncoalesced)),
        ),
        ("hmetcd-mem", Target::Kvi(Arc::clone(mem))),
    ];
    let span = Duration::from_secs_f64(settings.throughput_secs);
    for op in [Op::Get, Op::Store] {
        // Warm the etcd paths so that the first measured round is not the one that pays for it.
        for (_, target) in &targets[..3] {
            throughput(target, op, 16, Duration::from_millis(300)).await;
        }
        for tasks in CONCURRENCY {
            let mut runs: [Vec<Run>; 4] = Default::default();
            for round in 0..settings.throughput_rounds {
                // Runs of the three etcd sides side by side, rotating which goes first.
                for step in 0..3 {
                    let which = (round + step) % 3;
                    runs[which].push(throughput(&targets[which].1, op, tasks, span).await);
                }
            }
            for _ in 0..2 {
                runs[3].push(throughput(&targets[3].1, op, tasks, span).await);
            }
            report.throughput_row(op.name(), tasks, &runs);
            for (which, (name, _)) in targets.iter().enumerate() {
                let _ = writeln!(
                    report.csv,
                    "{name},{},{tasks},{:.0}",
                    op.name(),
                    mean_rate(&runs[which])
                );
            }
        }
    }
    must(uncoalesced.close().await, "close");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Get,
    Store,
    Tas,
    Transaction,
    GetRange,
    TempKey,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Store => "store",
            Op::Tas => "tas",
            Op::Transaction => "transaction",
            Op::GetRange => "get_range 100 of 10k",
            Op::TempKey => "temp_key",
        }
    }
}

fn key(i: usize) -> String {
    format!("k{:05}", i % KEYS)
}

fn range_start(i: usize) -> usize {
    (i * 37) % (KEYS - RANGE_LEN)
}

/// One operation through the `Kvi` interface.
async fn kvi_op(kv: &dyn Kvi, op: Op, i: usize) -> Result<(), String> {
    let k = key(i);
    let outcome = match op {
        Op::Get => kv.get(&k).await.map(drop),
        Op::Store => kv.store(&k, VALUE).await,
        Op::Tas => kv.tas(&k, VALUE, VALUE).await.map(drop),
        Op::Transaction => kv
            .transaction(&k, CompareOp::Equal, VALUE, &k, VALUE, &key(i + 1), VALUE)
            .await
            .map(drop),
        Op::GetRange => {
            let start = range_start(i);
            let found = kv
                .get_range(&key(start), &key(start + RANGE_LEN - 1))
                .await
                .map_err(|err| err.to_string())?;
            if found.len() != RANGE_LEN {
                return Err(format!("get_range found {} keys", found.len()));
            }
            Ok(())
        }
        Op::TempKey => kv.temp_key(&format!("temp/{i}")).await,
    };
    outcome.map_err(|err| err.to_string())
}

/// The same operation with raw etcd-client: the same requests, the answer turned into the same
/// owned values.
async fn raw_op(kv: &mut KvClient, lease: i64, op: Op, i: usize) -> Result<(), String> {
    let stored = format!("{PREFIX}{}", key(i));
    let outcome: Result<(), etcd_client::Error> = async {
        match op {
            Op::Get => {
                let answer = kv.get(stored, None).await?;
                if let Some(found) = answer.kvs().first() {
                    drop(found.value_str()?.to_owned());
                }
            }
            Op::Store => drop(kv.put(stored, VALUE, None).await?),
            Op::Tas | Op::Transaction => {
                let mut txn = Txn::new()
                    .when([Compare::value(
                        stored.as_str(),
                        etcd_client::CompareOp::Equal,
                        VALUE,
                    )])
                    .and_then([TxnOp::put(stored.as_str(), VALUE, None)]);
                if op == Op::Transaction {
                    let other = format!("{PREFIX}{}", key(i + 1));
                    txn = txn.or_else([TxnOp::put(other, VALUE, None)]);
                }
                let _ran_then = kv.txn(txn).await?.succeeded();
            }
            Op::GetRange => {
                let start = range_start(i);
                let mut end = format!("{PREFIX}{}", key(start + RANGE_LEN - 1)).into_bytes();
                end.push(0);
                let options = GetOptions::new()
                    .with_range(end)
                    .with_sort(SortTarget::Key, SortOrder::Ascend);
                let answer = kv
                    .get(format!("{PREFIX}{}", key(start)), Some(options))
                    .await?;
                let mut found = Vec::with_capacity(answer.kvs().len());
                for pair in answer.kvs() {
                    let k = pair.key_str()?;
                    found.push((
                        k.strip_prefix(PREFIX).unwrap_or(k).to_owned(),
                        pair.value_str()?.to_owned(),
                    ));
                }
                if found.len() != RANGE_LEN {
                    return Err(etcd_client::Error::InvalidArgs(format!(
                        "range found {} keys",
                        found.len()
                    )));
                }
            }
            Op::TempKey => {
                let options = PutOptions::new().with_lease(lease);
                drop(
                    kv.put(format!("{PREFIX}temp/{i}"), "1", Some(options))
                        .await?,
                );
            }
        }
        Ok(())
    }
    .await;
    outcome.map_err(|err| err.to_string())
}

async fn connect_raw(endpoints: &str) -> Result<Client, etcd_client::Error> {
    Client::connect(endpoints.split(',').collect::<Vec<_>>(), None).await
}

/// Puts the 10,000 keys, 16 writers at a time.
async fn preload(raw: &Client) {
    let mut writers = Vec::new();
    for w in 0..16 {
        let mut kv = raw.kv_client();
        writers.push(tokio::spawn(async move {
            for i in (w..KEYS).step_by(16) {
                must(
                    kv.put(format!("{PREFIX}{}", key(i)), VALUE, None).await,
                    "preload",
                );
            }
        }));
    }
    for writer in writers {
        must(writer.await, "preload task");
    }
}

/// Per-call times of both sides, measured in interleaved blocks, and each side's CPU time.
struct Sequential {
    hm: Vec<Duration>,
    raw: Vec<Duration>,
    /// The process's CPU time per call in µs, when measured.
    cpu_us: Option<(f64, f64)>,
}

async fn sequential(
    kv: &dyn Kvi,
    raw: &Client,
    raw_lease: i64,
    op: Op,
    settings: &Settings,
) -> Sequential {
    let mut raw_kv = raw.kv_client();
    let (mut hm, mut rw) = (Vec::new(), Vec::new());
    let (mut hm_cpu, mut rw_cpu) = (0u64, 0u64);
    let block = settings.block;
    // One unmeasured block each first: connections and caches warm.
    let (mut warm_hm, mut warm_rw) = (Vec::new(), Vec::new());
    kvi_block(kv, op, 0, block, &mut warm_hm).await;
    raw_block(&mut raw_kv, raw_lease, op, 0, block, &mut warm_rw).await;
    for round in 0..settings.rounds * 2 {
        let first = (round + 1) * block;
        for side in [round % 2, 1 - round % 2] {
            let cpu_before = cpu_ns();
            if side == 0 {
                kvi_block(kv, op, first, block, &mut hm).await;
                hm_cpu += cpu_ns().saturating_sub(cpu_before);
            } else {
                raw_block(&mut raw_kv, raw_lease, op, first, block, &mut rw).await;
                rw_cpu += cpu_ns().saturating_sub(cpu_before);
            }
        }
    }
    let per_call = |cpu: u64, calls: usize| cpu as f64 / 1e3 / calls.max(1) as f64;
    Sequential {
        cpu_us: Some((per_call(hm_cpu, hm.len()), per_call(rw_cpu, rw.len()))),
        hm,
        raw: rw,
    }
}

async fn kvi_block(kv: &dyn Kvi, op: Op, first: usize, n: usize, times: &mut Vec<Duration>) {
    for i in first..first + n {
        let began = Instant::now();
        let outcome = kvi_op(kv, op, i).await;
        times.push(began.elapsed());
        must(outcome, op.name());
    }
}

async fn raw_block(
    kv: &mut KvClient,
    lease: i64,
    op: Op,
    first: usize,
    n: usize,
    times: &mut Vec<Duration>,
) {
    for i in first..first + n {
        let began = Instant::now();
        let outcome = raw_op(kv, lease, op, i).await;
        times.push(began.elapsed());
        must(outcome, op.name());
    }
}

/// `hmetcd::open` against raw etcd-client's connect plus the lease grant a handle needs, in
/// rotation: raw with default options, and raw with the connect options `EtcdKvs` sets (the
/// same work, connection settings included). Closing is not timed.
async fn open_times(endpoints: &str, options: &str, settings: &Settings) -> [Vec<Duration>; 3] {
    let mut times: [Vec<Duration>; 3] = Default::default();
    for round in 0..settings.rounds * 10 {
        for turn in 0..3 {
            let side = (round + turn) % 3;
            let began = Instant::now();
            if side == 0 {
                let kv = must(hmetcd::open(endpoints, options).await, "open");
                times[0].push(began.elapsed());
                kv.close().await.ok();
            } else {
                let connect_options = (side == 2).then(hmetcd_connect_options);
                let client = must(
                    Client::connect(endpoints.split(',').collect::<Vec<_>>(), connect_options)
                        .await,
                    "raw connect",
                );
                let lease = must(client.lease_client().grant(30, None).await, "lease grant");
                times[side].push(began.elapsed());
                client.lease_client().revoke(lease.id()).await.ok();
            }
        }
    }
    times
}

/// The connect options `EtcdKvs` uses with default hmetcd options (see
/// `crates/hmetcd-etcd/src/connect.rs`): HTTP/2 keep-alive, a connect timeout, etcd's
/// require-leader header and token refresh.
fn hmetcd_connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(10))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(false)
        .with_require_leader(true)
        .with_auto_token_refresh(true)
}

/// One throughput run: calls per second, and the process's (and etcd's) CPU time per call.
#[derive(Debug, Clone)]
struct Run {
    rate: f64,
    cpu_us_per_call: f64,
    /// etcd's CPU time per call, when etcd is a child process.
    etcd_cpu_us_per_call: Option<f64>,
    /// Every call's latency in the run.
    latencies: Vec<Duration>,
}

fn mean_rate(runs: &[Run]) -> f64 {
    mean(&runs.iter().map(|run| run.rate).collect::<Vec<_>>())
}

/// The process id of the etcd the harness runs as a child process, whose CPU time the
/// throughput runs read too; `None` for a container or a given server.
static ETCD_PID: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();

/// CPU time of every thread of this process so far, in ns (Linux schedstat).
fn cpu_ns() -> u64 {
    process_cpu_ns("self").unwrap_or(0)
}

/// CPU time of every thread of the etcd child process so far, in ns, if there is one.
fn etcd_cpu_ns() -> Option<u64> {
    let pid = (*ETCD_PID.get()?)?;
    process_cpu_ns(&pid.to_string())
}

/// CPU time of every thread of process `pid` (a number or `self`) so far, in ns.
fn process_cpu_ns(pid: &str) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .filter_map(|task| task.ok())
            .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
            .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
            .sum(),
    )
}

enum Target {
    Kvi(Arc<dyn Kvi>),
    Raw(Box<Client>),
}

/// Operations per second of `tasks` tasks doing `op` on one handle for `span`.
async fn throughput(target: &Target, op: Op, tasks: usize, span: Duration) -> Run {
    let cpu_before = cpu_ns();
    let etcd_cpu_before = etcd_cpu_ns();
    let began = Instant::now();
    let deadline = began + span;
    let mut running = Vec::with_capacity(tasks);
    for task in 0..tasks {
        let first = task * 7919;
        running.push(match target {
            Target::Kvi(kv) => {
                let kv = Arc::clone(kv);
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < deadline {
                        let called = Instant::now();
                        must(kvi_op(&*kv, op, first + latencies.len()).await, op.name());
                        latencies.push(called.elapsed());
                    }
                    latencies
                })
            }
            Target::Raw(client) => {
                let mut kv = client.kv_client();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < deadline {
                        let called = Instant::now();
                        must(
                            raw_op(&mut kv, 0, op, first + latencies.len()).await,
                            op.name(),
                        );
                        latencies.push(called.elapsed());
                    }
                    latencies
                })
            }
        });
    }
    let mut latencies = Vec::new();
    for task in running {
        latencies.extend(must(task.await, "throughput task"));
    }
    let elapsed = began.elapsed().as_secs_f64();
    let cpu = cpu_ns().saturating_sub(cpu_before) as f64;
    let etcd_cpu = etcd_cpu_before
        .zip(etcd_cpu_ns())
        .map(|(before, after)| after.saturating_sub(before) as f64);
    let done = latencies.len();
    Run {
        rate: done as f64 / elapsed,
        cpu_us_per_call: cpu / 1e3 / done.max(1) as f64,
        etcd_cpu_us_per_call: etcd_cpu.map(|cpu| cpu / 1e3 / done.max(1) as f64),
        latencies,
    }
}

type Pair<'a, T> = (&'a T, &'a T);

/// Store by the first handle, callback on the second; both sides in interleaved blocks.
async fn watch_latency(
    hm: Pair<'_, Arc<dyn Kvi>>,
    raw: Pair<'_, Client>,
    mem: Pair<'_, Arc<dyn Kvi>>,
    settings: &Settings,
) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>) {
    // Each side watches a key of its own, so that no side sees the other's writes.
    let (watched, mem_watched) = ("watched-hmetcd", "watched-mem");
    let (hm_tx, mut hm_rx) = tokio::sync::mpsc::unbounded_channel();
    let hm_watch = must(
        hm.1.watch_with_cb(
            watched,
            KeyChange::Put,
            Box::new(move |_| hm_tx.send(Instant::now()).is_ok()),
        )
        .await,
        "watch",
    );
    let (mem_tx, mut mem_rx) = tokio::sync::mpsc::unbounded_channel();
    let mem_watch = must(
        mem.1
            .watch_with_cb(
                mem_watched,
                KeyChange::Put,
                Box::new(move |_| mem_tx.send(Instant::now()).is_ok()),
            )
            .await,
        "mem watch",
    );
    let stored = format!("{PREFIX}watched-raw");
    let mut stream = must(
        raw.1.watch_client().watch(stored.as_str(), None).await,
        "raw watch",
    );
    // etcd confirms the watch first; only then is every later put seen.
    must(stream.message().await, "raw watch confirmation");
    let (raw_tx, mut raw_rx) = tokio::sync::mpsc::unbounded_channel();
    let raw_pump = tokio::spawn(async move {
        while let Ok(Some(answer)) = stream.message().await {
            for event in answer.events() {
                if event.event_type() == EventType::Put && raw_tx.send(Instant::now()).is_err() {
                    return;
                }
            }
        }
    });
    let mut raw_kv = raw.0.kv_client();
    let (mut hm_times, mut raw_times, mut mem_times) = (Vec::new(), Vec::new(), Vec::new());
    let per_block = settings.block / 5;
    for round in 0..settings.rounds * 2 + 1 {
        let measured = round > 0;
        for side in [round % 2, 1 - round % 2] {
            for n in 0..per_block {
                let value = n.to_string();
                while hm_rx.try_recv().is_ok() || raw_rx.try_recv().is_ok() {}
                let began = Instant::now();
                let arrived = if side == 0 {
                    must(hm.0.store(watched, &value).await, "store");
                    hm_rx.recv().await
                } else {
                    must(raw_kv.put(stored.as_str(), value, None).await, "put");
                    raw_rx.recv().await
                };
                let Some(arrived) = arrived else {
                    panic!("the watch ended");
                };
                if measured {
                    let times = if side == 0 {
                        &mut hm_times
                    } else {
                        &mut raw_times
                    };
                    times.push(arrived - began);
                }
            }
        }
        for n in 0..per_block {
            while mem_rx.try_recv().is_ok() {}
            let began = Instant::now();
            must(mem.0.store(mem_watched, &n.to_string()).await, "mem store");
            let Some(arrived) = mem_rx.recv().await else {
                panic!("the mem watch ended");
            };
            if measured {
                mem_times.push(arrived - began);
            }
        }
    }
    hm_watch.cancel();
    mem_watch.cancel();
    raw_pump.abort();
    (hm_times, raw_times, mem_times)
}

/// The first handle holds the lock, the second waits; the time from the unlock call to the
/// waiter's acquisition. Roles swap each time. Raw etcd-client uses etcd's Lock API.
async fn lock_latency(
    hm: Pair<'_, Arc<dyn Kvi>>,
    raw: Pair<'_, Client>,
    mem: Pair<'_, Arc<dyn Kvi>>,
    settings: &Settings,
) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>) {
    let lock_prefix = format!("{PREFIX}{LOCK_NAME}/");
    let raw_prefix = format!("{RAW_LOCK_NAME}/");
    let mut observer = raw.0.kv_client();
    let per_block = settings.block / 10;
    let (mut hm_times, mut raw_times, mut mem_times) = (Vec::new(), Vec::new(), Vec::new());

    let raw_leases = [
        must(raw.0.lease_client().grant(300, None).await, "lease grant").id(),
        must(raw.1.lease_client().grant(300, None).await, "lease grant").id(),
    ];
    let raw_clients = [raw.0.clone(), raw.1.clone()];
    let hm_handles = [Arc::clone(hm.0), Arc::clone(hm.1)];
    let mem_handles = [Arc::clone(mem.0), Arc::clone(mem.1)];
    must(hm_handles[0].dist_lock().await, "lock");
    must(mem_handles[0].dist_lock().await, "mem lock");
    let mut raw_held = must(
        raw_clients[0]
            .lock_client()
            .lock(
                RAW_LOCK_NAME,
                Some(LockOptions::new().with_lease(raw_leases[0])),
            )
            .await,
        "raw lock",
    )
    .key()
    .to_vec();
    // Who holds each lock now: 0 or 1.
    let (mut hm_holder, mut raw_holder, mut mem_holder) = (0, 0, 0);

    for round in 0..settings.rounds * 2 + 1 {
        let measured = round > 0;
        for side in [round % 2, 1 - round % 2] {
            for _ in 0..per_block {
                let took = if side == 0 {
                    let waiter = Arc::clone(&hm_handles[1 - hm_holder]);
                    let waiting = tokio::spawn(async move {
                        must(waiter.dist_lock().await, "lock");
                        Instant::now()
                    });
                    queued(&mut observer, &lock_prefix).await;
                    let began = Instant::now();
                    must(hm_handles[hm_holder].dist_unlock().await, "unlock");
                    hm_holder = 1 - hm_holder;
                    must(waiting.await, "lock task") - began
                } else {
                    let mut waiter = raw_clients[1 - raw_holder].lock_client();
                    let lease = raw_leases[1 - raw_holder];
                    let waiting = tokio::spawn(async move {
                        let held = must(
                            waiter
                                .lock(RAW_LOCK_NAME, Some(LockOptions::new().with_lease(lease)))
                                .await,
                            "raw lock",
                        );
                        (Instant::now(), held.key().to_vec())
                    });
                    queued(&mut observer, &raw_prefix).await;
                    let began = Instant::now();
                    must(
                        raw_clients[raw_holder].lock_client().unlock(raw_held).await,
                        "raw unlock",
                    );
                    raw_holder = 1 - raw_holder;
                    let (acquired, key) = must(waiting.await, "raw lock task");
                    raw_held = key;
                    acquired - began
                };
                if measured {
                    let times = if side == 0 {
                        &mut hm_times
                    } else {
                        &mut raw_times
                    };
                    times.push(took);
                }
            }
        }
        for _ in 0..per_block {
            let waiter = Arc::clone(&mem_handles[1 - mem_holder]);
            let waiting = tokio::spawn(async move {
                must(waiter.dist_lock().await, "mem lock");
                Instant::now()
            });
            // The waiter queues within microseconds in memory: a short pause is ample.
            tokio::time::sleep(Duration::from_millis(2)).await;
            let began = Instant::now();
            must(mem_handles[mem_holder].dist_unlock().await, "mem unlock");
            mem_holder = 1 - mem_holder;
            let took = must(waiting.await, "mem lock task") - began;
            if measured {
                mem_times.push(took);
            }
        }
    }
    must(hm_handles[hm_holder].dist_unlock().await, "unlock");
    must(mem_handles[mem_holder].dist_unlock().await, "mem unlock");
    raw_clients[raw_holder]
        .lock_client()
        .unlock(raw_held)
        .await
        .ok();
    for (client, lease) in raw_clients.iter().zip(raw_leases) {
        client.lease_client().revoke(lease).await.ok();
    }
    (hm_times, raw_times, mem_times)
}

/// The leader resigns while the other handle's campaign waits; the time from the resign call
/// to the waiting campaign returning. Roles swap each time. Raw etcd-client uses etcd's
/// election service (`Campaign`, `Resign`).
async fn handover_latency(
    hm: Pair<'_, Arc<dyn Kvi>>,
    raw: Pair<'_, Client>,
    mem: Pair<'_, Arc<dyn Kvi>>,
    settings: &Settings,
) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>) {
    let election_prefix = format!("{PREFIX}{ELECTION_NAME}/");
    let raw_prefix = format!("{RAW_ELECTION_NAME}/");
    let mut observer = raw.0.kv_client();
    let per_block = settings.block / 10;
    let (mut hm_times, mut raw_times, mut mem_times) = (Vec::new(), Vec::new(), Vec::new());
    let raw_leases = [
        must(raw.0.lease_client().grant(300, None).await, "lease grant").id(),
        must(raw.1.lease_client().grant(300, None).await, "lease grant").id(),
    ];
    let raw_clients = [raw.0.clone(), raw.1.clone()];
    let hm_handles = [Arc::clone(hm.0), Arc::clone(hm.1)];
    let mem_handles = [Arc::clone(mem.0), Arc::clone(mem.1)];
    let mut hm_leader = must(hm_handles[0].campaign(ELECTION_NAME, "0").await, "campaign");
    let mut mem_leader = must(
        mem_handles[0].campaign(ELECTION_NAME, "0").await,
        "mem campaign",
    );
    let mut raw_leader = must(
        raw_clients[0]
            .election_client()
            .campaign(RAW_ELECTION_NAME, "0", raw_leases[0])
            .await,
        "raw campaign",
    )
    .leader()
    .cloned();
    let (mut hm_holder, mut raw_holder, mut mem_holder) = (0, 0, 0);

    for round in 0..settings.rounds * 2 + 1 {
        let measured = round > 0;
        for side in [round % 2, 1 - round % 2] {
            for _ in 0..per_block {
                let took = if side == 0 {
                    let candidate = Arc::clone(&hm_handles[1 - hm_holder]);
                    let waiting = tokio::spawn(async move {
                        let leadership =
                            must(candidate.campaign(ELECTION_NAME, "v").await, "campaign");
                        (Instant::now(), leadership)
                    });
                    queued(&mut observer, &election_prefix).await;
                    let began = Instant::now();
                    must(hm_leader.resign().await, "resign");
                    hm_holder = 1 - hm_holder;
                    let (led, leadership) = must(waiting.await, "campaign task");
                    hm_leader = leadership;
                    led - began
                } else {
                    let mut candidate = raw_clients[1 - raw_holder].election_client();
                    let lease = raw_leases[1 - raw_holder];
                    let waiting = tokio::spawn(async move {
                        let led = must(
                            candidate.campaign(RAW_ELECTION_NAME, "v", lease).await,
                            "raw campaign",
                        );
                        (Instant::now(), led.leader().cloned())
                    });
                    queued(&mut observer, &raw_prefix).await;
                    let began = Instant::now();
                    let resign = raw_leader
                        .take()
                        .map(|leader| etcd_client::ResignOptions::new().with_leader(leader));
                    must(
                        raw_clients[raw_holder]
                            .election_client()
                            .resign(resign)
                            .await,
                        "raw resign",
                    );
                    raw_holder = 1 - raw_holder;
                    let (led, leader) = must(waiting.await, "raw campaign task");
                    raw_leader = leader;
                    led - began
                };
                if measured {
                    let times = if side == 0 {
                        &mut hm_times
                    } else {
                        &mut raw_times
                    };
                    times.push(took);
                }
            }
        }
        for _ in 0..per_block {
            let candidate = Arc::clone(&mem_handles[1 - mem_holder]);
            let waiting = tokio::spawn(async move {
                let leadership = must(candidate.campaign(ELECTION_NAME, "v").await, "mem campaign");
                (Instant::now(), leadership)
            });
            // The candidate queues within microseconds in memory: a short pause is ample.
            tokio::time::sleep(Duration::from_millis(2)).await;
            let began = Instant::now();
            must(mem_leader.resign().await, "mem resign");
            mem_holder = 1 - mem_holder;
            let (led, leadership) = must(waiting.await, "mem campaign task");
            mem_leader = leadership;
            if measured {
                mem_times.push(led - began);
            }
        }
    }
    must(hm_leader.resign().await, "resign");
    must(mem_leader.resign().await, "mem resign");
    for (client, lease) in raw_clients.iter().zip(raw_leases) {
        client.lease_client().revoke(lease).await.ok();
    }
    (hm_times, raw_times, mem_times)
}

/// The leader proclaims a new value; the time until an observer on another handle yields it.
/// Raw etcd-client uses etcd's election service (`Proclaim`, `Observe`).
async fn observe_latency(
    hm: Pair<'_, Arc<dyn Kvi>>,
    raw: Pair<'_, Client>,
    mem: Pair<'_, Arc<dyn Kvi>>,
    settings: &Settings,
) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>) {
    let per_block = settings.block / 5;
    let mut hm_leader = must(hm.0.campaign(ELECTION_NAME, "start").await, "campaign");
    let mut mem_leader = must(mem.0.campaign(ELECTION_NAME, "start").await, "mem campaign");
    let raw_lease = must(raw.0.lease_client().grant(300, None).await, "lease grant").id();
    let raw_leader = must(
        raw.0
            .election_client()
            .campaign(RAW_ELECTION_NAME, "start", raw_lease)
            .await,
        "raw campaign",
    )
    .leader()
    .cloned();
    let mut hm_observer = must(hm.1.observe(ELECTION_NAME).await, "observe");
    let mut mem_observer = must(mem.1.observe(ELECTION_NAME).await, "mem observe");
    let mut raw_observer = must(
        raw.1.election_client().observe(RAW_ELECTION_NAME).await,
        "raw observe",
    );
    // Each stream's first item is the current leader.
    must(
        hm_observer.next().await.transpose(),
        "observe: first leader",
    );
    must(
        mem_observer.next().await.transpose(),
        "mem observe: first leader",
    );
    must(raw_observer.message().await, "raw observe: first leader");
    let mut raw_election = raw.0.election_client();
    let (mut hm_times, mut raw_times, mut mem_times) = (Vec::new(), Vec::new(), Vec::new());
    let mut n = 0u64;
    for round in 0..settings.rounds * 2 + 1 {
        let measured = round > 0;
        for side in [round % 2, 1 - round % 2] {
            for _ in 0..per_block {
                n += 1;
                let value = n.to_string();
                let began = Instant::now();
                if side == 0 {
                    must(hm_leader.proclaim(&value).await, "proclaim");
                    loop {
                        let seen = must(hm_observer.next().await.transpose(), "observe");
                        if seen.flatten().is_some_and(|leader| leader.value == value) {
                            break;
                        }
                    }
                } else {
                    let options = raw_leader
                        .clone()
                        .map(|leader| etcd_client::ProclaimOptions::new().with_leader(leader));
                    must(
                        raw_election.proclaim(value.as_str(), options).await,
                        "raw proclaim",
                    );
                    loop {
                        let seen = must(raw_observer.message().await, "raw observe");
                        if seen
                            .as_ref()
                            .and_then(|answer| answer.kv())
                            .is_some_and(|kv| kv.value() == value.as_bytes())
                        {
                            break;
                        }
                    }
                }
                if measured {
                    let times = if side == 0 {
                        &mut hm_times
                    } else {
                        &mut raw_times
                    };
                    times.push(began.elapsed());
                }
            }
        }
        for _ in 0..per_block {
            n += 1;
            let value = n.to_string();
            let began = Instant::now();
            must(mem_leader.proclaim(&value).await, "mem proclaim");
            loop {
                let seen = must(mem_observer.next().await.transpose(), "mem observe");
                if seen.flatten().is_some_and(|leader| leader.value == value) {
                    break;
                }
            }
            if measured {
                mem_times.push(began.elapsed());
            }
        }
    }
    must(hm_leader.resign().await, "resign");
    must(mem_leader.resign().await, "mem resign");
    raw.0.lease_client().revoke(raw_lease).await.ok();
    (hm_times, raw_times, mem_times)
}

/// Waits until two keys (holder and waiter) are under `lock_prefix`, then a little longer, so
/// that the waiter is watching the holder's key when the unlock comes.
async fn queued(observer: &mut KvClient, lock_prefix: &str) {
    let options = GetOptions::new().with_prefix().with_count_only();
    loop {
        let answer = must(
            observer.get(lock_prefix, Some(options.clone())).await,
            "counting lock keys",
        );
        if answer.count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// The process's resident set, in kB.
fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// One handle with 1,000 callback watchers on distinct keys: resident memory before and after.
async fn memory(endpoints: &str, options: &str, report: &mut Report) {
    let before_open = rss_kb();
    let kv = must(
        hmetcd_etcd::EtcdKvs::connect(endpoints, options).await,
        "connect",
    );
    let before = rss_kb();
    let calls = Arc::new(AtomicUsize::new(0));
    let began = Instant::now();
    let mut handles = Vec::with_capacity(WATCHERS);
    for w in 0..WATCHERS {
        let calls = Arc::clone(&calls);
        let cb = Box::new(move |_: &hmetcd_core::WatchEvent| {
            calls.fetch_add(1, Ordering::SeqCst);
            true
        });
        handles.push(must(
            kv.watch_with_cb(&format!("watched/{w:04}"), KeyChange::Put, cb)
                .await,
            "watch",
        ));
    }
    let registering = began.elapsed();
    // Every watcher is live: a change to the first and the last key reaches its callback.
    let writer = must(
        hmetcd_etcd::EtcdKvs::connect(endpoints, options).await,
        "connect",
    );
    for w in [0, WATCHERS - 1] {
        must(writer.store(&format!("watched/{w:04}"), "x").await, "store");
    }
    let waiting = Instant::now();
    while calls.load(Ordering::SeqCst) < 2 && waiting.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kb();
    let live = calls.load(Ordering::SeqCst);
    for handle in handles {
        handle.cancel();
    }
    kv.close().await.ok();
    writer.close().await.ok();

    report.section("Memory: one EtcdKvs handle with 1,000 callback watchers");
    let _ = writeln!(
        report.markdown,
        "| measure | value | target | verdict |\n|---|---:|---:|---|\n\
         | process RSS before opening the handle | {:.1} MB | | |\n\
         | process RSS with the handle open | {:.1} MB | | |\n\
         | process RSS with 1,000 watchers | {:.1} MB | < 20 MB | {} |\n\
         | growth for 1,000 watchers | {:.1} MB ({:.1} kB each) | | |\n\
         | time to register 1,000 watchers | {:.0} ms | | |\n\
         | callbacks seen for 2 stores | {live} | 2 | {} |\n",
        mb(before_open),
        mb(before),
        mb(after),
        verdict(after < RSS_TARGET_KB),
        mb(after.saturating_sub(before)),
        after.saturating_sub(before) as f64 / WATCHERS as f64,
        registering.as_secs_f64() * 1e3,
        verdict(live == 2),
    );
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**missed**"
    }
}

/// The median of sorted `values`.
fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

fn mean_duration(times: &[Duration]) -> Duration {
    times.iter().sum::<Duration>() / u32::try_from(times.len().max(1)).unwrap_or(u32::MAX)
}

/// The `p`-quantile (0..=1) by the nearest-rank method.
fn quantile(times: &[Duration], p: f64) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied().unwrap_or_default()
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Report {
    markdown: String,
    csv: String,
    load_at_start: String,
}

impl Report {
    fn new(server: &EtcdServer, settings: &Settings) -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|line| line.strip_prefix("model name"))
                    .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|info| info.lines().next().map(str::to_owned))
            .unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let load_at_start = load_average();
        let mut markdown = String::new();
        let _ = writeln!(
            markdown,
            "# hmetcd benchmark results\n\n\
             - machine: {cpu}, {cores} cores, {}, Linux {}\n\
             - etcd {} {}\n\
             - load average at start: {load_at_start}\n\
             - settings: {} rounds, blocks of {} calls; {} pairs of throughput runs of {} s\n\
             - metrics: {}\n",
            memory
                .split_whitespace()
                .skip(1)
                .collect::<Vec<_>>()
                .join(" "),
            kernel.trim(),
            server.version(),
            server.description(),
            settings.rounds,
            settings.block,
            settings.throughput_rounds,
            settings.throughput_secs,
            if settings.recorder {
                "the debugging recorder installed"
            } else {
                "no recorder installed"
            },
        );
        Report {
            markdown,
            csv: "backend,op,tasks,ops_per_sec\n".to_owned(),
            load_at_start,
        }
    }

    fn finish(&mut self) {
        let _ = writeln!(
            self.markdown,
            "\nLoad average at start: {}; at the end: {}.",
            self.load_at_start,
            load_average()
        );
    }

    fn section(&mut self, title: &str) {
        eprintln!("{title} ...");
        let _ = writeln!(self.markdown, "\n## {title}\n");
    }

    fn sequential_header(&mut self) {
        let _ = writeln!(
            self.markdown,
            "Interleaved blocks of calls on both sides. Ratios are hmetcd's time per call over \
             raw etcd-client's: of the medians, and of the means (calls/s); target ≤ \
             {SEQUENTIAL_SLOWDOWN_TARGET:.2} (no more than 5% slower), judged on the median \
             ratio, which other load on the machine disturbs least.\n\n\
             CPU = the bench process's CPU time per call (client side only).\n\n\
             | operation | hmetcd calls/s | etcd-client calls/s | hmetcd median µs | etcd-client median µs | hmetcd p99 µs | etcd-client p99 µs | median ratio | mean ratio | verdict | hmetcd CPU µs/call | etcd-client CPU µs/call |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"
        );
    }

    fn sequential_row(&mut self, name: &str, measured: &Sequential) {
        let (hm, raw) = (&measured.hm, &measured.raw);
        let (hm_cpu, raw_cpu) = match measured.cpu_us {
            Some((hm, raw)) => (format!("{hm:.1}"), format!("{raw:.1}")),
            None => ("–".to_owned(), "–".to_owned()),
        };
        let (hm_mean, raw_mean) = (mean_duration(hm), mean_duration(raw));
        let ratio = hm_mean.as_secs_f64() / raw_mean.as_secs_f64();
        let median_ratio = quantile(hm, 0.5).as_secs_f64() / quantile(raw, 0.5).as_secs_f64();
        let _ = writeln!(
            self.markdown,
            "| {name} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} | {:.0} | {median_ratio:.3} | {ratio:.3} | {} | {hm_cpu} | {raw_cpu} |",
            1.0 / hm_mean.as_secs_f64(),
            1.0 / raw_mean.as_secs_f64(),
            us(quantile(hm, 0.5)),
            us(quantile(raw, 0.5)),
            us(quantile(hm, 0.99)),
            us(quantile(raw, 0.99)),
            verdict(median_ratio <= SEQUENTIAL_SLOWDOWN_TARGET),
        );
    }

    fn throughput_header(&mut self) {
        let _ = writeln!(
            self.markdown,
            "Calls per second, mean of the runs; the runs of the three etcd sides are adjacent, \
             rotating which goes first. Ratio = median over the rounds of hmetcd-etcd / \
             etcd-client (drift between rounds cancels out); targets: within 3% with 1 task \
             (≥ {:.2}), ≥ {:.1} with 16 tasks, ≥ {:.1} with 64, and a p99 latency not above raw's \
             with 16 and 64. p99 = over every call of the runs. CPU = the bench process's CPU time \
             per call (all threads, the client side); etcd CPU = etcd's, when the harness runs it \
             as a child process (else -). `coalesce=off` is hmetcd-etcd with each call a request \
             of its own.\n\n\
             | operation | tasks | hmetcd-etcd calls/s | etcd-client calls/s | ratio (median) | ratios min–max | p99 ms hmetcd / raw | verdict | coalesce=off calls/s (ratio) | hmetcd-etcd CPU µs/call | etcd-client CPU µs/call | etcd CPU µs/call: hmetcd / raw | hmetcd-mem calls/s |\n\
             |---|---:|---:|---:|---:|---|---|---|---|---:|---:|---|---:|",
            throughput_target(1),
            throughput_target(16),
            throughput_target(64),
        );
    }

    fn throughput_row(&mut self, name: &str, tasks: usize, runs: &[Vec<Run>; 4]) {
        let ratios_to_raw = |side: &[Run]| {
            let mut ratios: Vec<f64> = side
                .iter()
                .zip(&runs[1])
                .map(|(hm, raw)| hm.rate / raw.rate)
                .collect();
            ratios.sort_by(f64::total_cmp);
            ratios
        };
        let ratios = ratios_to_raw(&runs[0]);
        let ratio = median(&ratios);
        let p99 = |side: &[Run]| {
            let all: Vec<Duration> = side
                .iter()
                .flat_map(|run| run.latencies.iter().copied())
                .collect();
            quantile(&all, 0.99)
        };
        let (hm_p99, raw_p99) = (p99(&runs[0]), p99(&runs[1]));
        let met = ratio >= throughput_target(tasks) && (tasks == 1 || hm_p99 <= raw_p99);
        let cpu = |runs: &[Run]| {
            median(&{
                let mut cpu: Vec<f64> = runs.iter().map(|run| run.cpu_us_per_call).collect();
                cpu.sort_by(f64::total_cmp);
                cpu
            })
        };
        let etcd_cpu = |runs: &[Run]| {
            let mut cpu: Vec<f64> = runs
                .iter()
                .filter_map(|run| run.etcd_cpu_us_per_call)
                .collect();
            cpu.sort_by(f64::total_cmp);
            if cpu.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.1}", median(&cpu))
            }
        };
        let _ = writeln!(
            self.markdown,
            "| {name} | {tasks} | {:.0} | {:.0} | {ratio:.3} | {:.2}–{:.2} | {:.2} / {:.2} | {} | {:.0} ({:.3}) | {:.1} | {:.1} | {} / {} | {:.0} |",
            mean_rate(&runs[0]),
            mean_rate(&runs[1]),
            ratios.first().copied().unwrap_or_default(),
            ratios.last().copied().unwrap_or_default(),
            ms(hm_p99),
            ms(raw_p99),
            verdict(met),
            mean_rate(&runs[2]),
            median(&ratios_to_raw(&runs[2])),
            cpu(&runs[0]),
            cpu(&runs[1]),
            etcd_cpu(&runs[0]),
            etcd_cpu(&runs[1]),
            mean_rate(&runs[3]),
        );
    }

    fn latency_table(
        &mut self,
        hm: &[Duration],
        raw: &[Duration],
        mem: &[Duration],
        target: Duration,
    ) {
        let _ = writeln!(
            self.markdown,
            "| backend | samples | median ms | p99 ms | max ms | target (median) | verdict |\n\
             |---|---:|---:|---:|---:|---:|---|"
        );
        for (name, times, judged) in [
            ("hmetcd-etcd", hm, true),
            ("etcd-client", raw, false),
            ("hmetcd-mem", mem, false),
        ] {
            let median = quantile(times, 0.5);
            let _ = writeln!(
                self.markdown,
                "| {name} | {} | {:.3} | {:.3} | {:.3} | {} | {} |",
                times.len(),
                ms(median),
                ms(quantile(times, 0.99)),
                ms(quantile(times, 1.0)),
                if judged {
                    format!("≤ {:.0} ms", ms(target))
                } else {
                    String::new()
                },
                if judged {
                    verdict(median <= target)
                } else {
                    ""
                },
            );
        }
        let ratio = quantile(hm, 0.5).as_secs_f64() / quantile(raw, 0.5).as_secs_f64();
        let _ = writeln!(
            self.markdown,
            "\nMedian ratio hmetcd-etcd / etcd-client: {ratio:.3}."
        );
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|line| {
            line.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn must<T, E: std::fmt::Display>(outcome: Result<T, E>, what: &str) -> T {
    outcome.unwrap_or_else(|err| panic!("{what}: {err}"))
}
