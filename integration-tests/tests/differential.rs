//! Differential test: the same random sequences of operations applied to the in-memory store
//! and to etcd must give the same answers, operation by operation, and leave the same data.
//!
//! Each sequence runs under a fresh key prefix on both backends. Keys and values come from
//! small alphabets (with `\0`, `/`, non-ASCII and empty strings) so that operations collide;
//! an empty key must be `InvalidKey` on both. A divergence is a backend defect: fix the backend
//! that disagrees with the contract (and so with etcd), not this test.
//!
//! `HMETCD_DIFFERENTIAL_CASES` (default 200 sequences of 50 operations) and
//! `HMETCD_DIFFERENTIAL_SEED` (a u64, or `random`; default a fixed seed) steer the run; a
//! failure prints the seed and the shrunk sequence.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hmetcd_core::{CompareOp, Error, KeyValue, Kvi};
use hmetcd_etcd::EtcdKvs;
use hmetcd_mem::MemKvs;
use integration_tests::backends;
use libtest_mimic::{Arguments, Failed, Trial};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

/// Operations per sequence.
const OPS_PER_SEQUENCE: usize = 50;
const DEFAULT_SEQUENCES: u32 = 200;
const DEFAULT_SEED: u64 = 0x686d_6574_6364_0001;
/// The whole test, shrinking included, fails after this (or 150 ms a sequence, if longer).
const TIME_LIMIT: Duration = Duration::from_secs(150);

/// Few keys, so that operations collide; sorted here only for reading.
const KEYS: &[&str] = &[
    "\0",
    "a",
    "a\0",
    "a\0b",
    "a/",
    "a/b",
    "ab",
    "b",
    "b/c",
    "é",
    "ü/ß",
    "\u{10FFFF}",
];

const VALUES: &[&str] = &["", "0", "1", "10", "x", "\0", "x\0", "é", "a/b", " "];

/// Range bounds beyond the keys themselves: between, before and after them.
const BOUNDS: &[&str] = &["", "\0\0", "a\0\0", "a0", "aa", "c", "\u{10FFFF}\u{10FFFF}"];

#[derive(Debug, Clone)]
enum Op {
    Store(&'static str, &'static str),
    Get(&'static str),
    Delete(&'static str),
    GetRange(&'static str, &'static str),
    Tas(&'static str, &'static str, &'static str),
    Transaction {
        key: &'static str,
        op: CompareOp,
        value: &'static str,
        then: (&'static str, &'static str),
        otherwise: (&'static str, &'static str),
    },
}

/// What one operation answered; errors compare by their full message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Done,
    Value(Option<String>),
    Range(Vec<KeyValue>),
    Bool(bool),
    Failed(String),
}

fn key() -> impl Strategy<Value = &'static str> {
    prop_oneof![30 => select(KEYS), 1 => Just("")]
}

fn value() -> impl Strategy<Value = &'static str> {
    select(VALUES)
}

fn bound() -> impl Strategy<Value = &'static str> {
    prop_oneof![3 => select(KEYS), 1 => select(BOUNDS)]
}

fn compare_op() -> impl Strategy<Value = CompareOp> {
    select(
        &[
            CompareOp::Equal,
            CompareOp::NotEqual,
            CompareOp::Less,
            CompareOp::Greater,
        ][..],
    )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (key(), value()).prop_map(|(k, v)| Op::Store(k, v)),
        2 => key().prop_map(Op::Get),
        1 => key().prop_map(Op::Delete),
        2 => (bound(), bound()).prop_map(|(a, b)| Op::GetRange(a, b)),
        2 => (key(), value(), value()).prop_map(|(k, t, s)| Op::Tas(k, t, s)),
        3 => (key(), compare_op(), value(), key(), value(), key(), value()).prop_map(
            |(key, op, value, tk, tv, ek, ev)| Op::Transaction {
                key,
                op,
                value,
                then: (tk, tv),
                otherwise: (ek, ev),
            }
        ),
    ]
}

fn sequence() -> impl Strategy<Value = Vec<Op>> {
    vec(op(), OPS_PER_SEQUENCE)
}

fn outcome<T>(result: Result<T, Error>, done: impl FnOnce(T) -> Outcome) -> Outcome {
    match result {
        Ok(value) => done(value),
        Err(err) => Outcome::Failed(format!("{err}")),
    }
}

async fn apply(kv: &dyn Kvi, op: &Op) -> Outcome {
    match *op {
        Op::Store(k, v) => outcome(kv.store(k, v).await, |()| Outcome::Done),
        Op::Get(k) => outcome(kv.get(k).await, Outcome::Value),
        Op::Delete(k) => outcome(kv.delete(k).await, |()| Outcome::Done),
        Op::GetRange(a, b) => outcome(kv.get_range(a, b).await, Outcome::Range),
        Op::Tas(k, t, s) => outcome(kv.tas(k, t, s).await, Outcome::Bool),
        Op::Transaction {
            key,
            op,
            value,
            then,
            otherwise,
        } => outcome(
            kv.transaction(key, op, value, then.0, then.1, otherwise.0, otherwise.1)
                .await,
            Outcome::Bool,
        ),
    }
}

/// Everything under the handle's prefix.
async fn everything(kv: &dyn Kvi) -> Outcome {
    outcome(
        kv.get_range("", "\u{10FFFF}\u{10FFFF}").await,
        Outcome::Range,
    )
}

struct Differential {
    endpoints: String,
    run_tag: String,
    sequences: AtomicU64,
    operations: AtomicU64,
}

impl Differential {
    async fn run_sequence(&self, ops: &[Op]) -> Result<(), String> {
        let n = self.sequences.fetch_add(1, Ordering::Relaxed);
        let options = format!("prefix=diff-{}-{n}/,request_timeout=5s", self.run_tag);
        let mem = MemKvs::open(&format!("differential-{}", self.run_tag), &options)
            .map_err(|err| format!("opening mem: {err}"))?;
        let etcd = EtcdKvs::connect(&self.endpoints, &options)
            .await
            .map_err(|err| format!("opening etcd: {err}"))?;
        let mut report = String::new();
        let mut diverged = false;
        for (i, op) in ops.iter().enumerate() {
            let expected = apply(&etcd, op).await;
            let got = apply(&mem, op).await;
            self.operations.fetch_add(1, Ordering::Relaxed);
            let _ = writeln!(report, "  #{i:<2} {op:?} -> etcd {expected:?}");
            if expected != got {
                let _ = writeln!(report, "      mem differs: {got:?}");
                diverged = true;
                break;
            }
        }
        if !diverged {
            let expected = everything(&etcd).await;
            let got = everything(&mem).await;
            if expected != got {
                let _ = writeln!(
                    report,
                    "  final contents differ:\n      etcd {expected:?}\n      mem  {got:?}"
                );
                diverged = true;
            }
        }
        let _ = etcd.close().await;
        let _ = mem.close().await;
        if diverged {
            Err(format!("backends diverged (etcd decides):\n{report}"))
        } else {
            Ok(())
        }
    }
}

fn seed_from_env() -> Result<u64, String> {
    match std::env::var("HMETCD_DIFFERENTIAL_SEED") {
        Err(_) => Ok(DEFAULT_SEED),
        Ok(text) if text.trim() == "random" => Ok(fastrand::u64(..)),
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| format!("HMETCD_DIFFERENTIAL_SEED={text:?}: expected a u64 or `random`")),
    }
}

fn cases_from_env() -> Result<u32, String> {
    match std::env::var("HMETCD_DIFFERENTIAL_CASES") {
        Err(_) => Ok(DEFAULT_SEQUENCES),
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| format!("HMETCD_DIFFERENTIAL_CASES={text:?}: expected a number")),
    }
}

fn differential(endpoints: String) -> Result<(), Failed> {
    let seed = seed_from_env()?;
    let cases = cases_from_env()?;
    let (done, outcome) = mpsc::channel();
    // The runner blocks its thread; a watchdog on this one bounds the whole test.
    std::thread::spawn(move || {
        let _ = done.send(run_property(endpoints, seed, cases));
    });
    let limit = TIME_LIMIT.max(Duration::from_millis(150) * cases);
    match outcome.recv_timeout(limit) {
        Ok(result) => result.map_err(Failed::from),
        Err(_) => Err(Failed::from(format!(
            "did not finish within {limit:?} (seed {seed})"
        ))),
    }
}

fn run_property(endpoints: String, seed: u64, cases: u32) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|err| format!("tokio runtime: {err}"))?;
    let state = Differential {
        endpoints,
        run_tag: std::iter::repeat_with(fastrand::alphanumeric)
            .take(8)
            .collect(),
        sequences: AtomicU64::new(0),
        operations: AtomicU64::new(0),
    };
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        max_shrink_iters: 256,
        max_shrink_time: 30_000,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let started = Instant::now();
    let result = runner.run(&sequence(), |ops| {
        runtime.block_on(async {
            match tokio::time::timeout(Duration::from_secs(30), state.run_sequence(&ops)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(why)) => Err(TestCaseError::fail(why)),
                Err(_) => Err(TestCaseError::fail("the sequence took over 30 s")),
            }
        })
    });
    let (sequences, operations) = (
        state.sequences.load(Ordering::Relaxed),
        state.operations.load(Ordering::Relaxed),
    );
    eprintln!(
        "differential: {sequences} sequences, {operations} operations on each backend in {:.1?} \
         (seed {seed}, {cases} cases of {OPS_PER_SEQUENCE} operations asked for)",
        started.elapsed()
    );
    runtime.shutdown_background();
    match result {
        Ok(()) => Ok(()),
        // The shrunk sequence, up to the operation where the backends part, is in `why`.
        Err(TestError::Fail(why, _)) => Err(format!(
            "seed {seed} (rerun with HMETCD_DIFFERENTIAL_SEED={seed}), shrunk: {why}"
        )),
        Err(TestError::Abort(why)) => Err(format!("seed {seed}: aborted: {why}")),
    }
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let mut server = match backends::etcd_server_or_exit("differential", &args) {
        Ok(server) => server,
        Err(exit) => return exit,
    };
    let name = format!(
        "etcd-{}::differential::mem_matches_etcd_on_random_sequences",
        server.version()
    );
    let endpoints = server.endpoints().to_owned();
    let trials = vec![Trial::test(name, move || differential(endpoints))];
    let conclusion = libtest_mimic::run(&args, trials);
    server.shutdown();
    conclusion.exit_code()
}
