//! Differential test: the same random sequences of operations applied to the in-memory store
//! and to etcd must give the same answers, operation by operation, and leave the same data.
//!
//! The data API takes part: `get_kv`, `get_prefix`, `list` pages, `delete_prefix`, `txn` with
//! random compares and operations (malformed ones included), and `update`. Metadata is
//! compared too, revisions counted from the store revision at the start of the sequence (the
//! test has both stores to itself, so both must count exactly one revision per write that
//! changed something, as etcd does); a lease is compared as "none" or "some".
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

use hmetcd_core::{
    Compare, CompareOp, Error, KeyValue, Kvi, ListPage, ListRequest, Op as TxnOp, Txn, TxnOutcome,
};
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

/// Prefixes for `get_prefix`, `list` and `delete_prefix` (`""` is refused by `delete_prefix`).
const PREFIXES: &[&str] = &["", "a", "a/", "a\0", "b", "é", "\u{10FFFF}", "z"];

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
    GetKv(&'static str),
    GetPrefix(&'static str),
    DeletePrefix(&'static str),
    List(List),
    Txn {
        compares: Vec<Cmp>,
        then: Vec<Step>,
        otherwise: Vec<Step>,
    },
    Update(&'static str, Change),
}

/// A `list` request.
#[derive(Debug, Clone)]
struct List {
    /// A prefix, or an inclusive range.
    prefix: Option<&'static str>,
    range: (&'static str, &'static str),
    /// `Some(0)` is refused on both.
    limit: Option<usize>,
    after: Option<&'static str>,
    keys_only: bool,
}

/// A compare of a random transaction; revisions count from the sequence's start.
#[derive(Debug, Clone)]
enum Cmp {
    Value(&'static str, CompareOp, &'static str),
    Exists(&'static str),
    Missing(&'static str),
    ModRevision(&'static str, CompareOp, i64),
    Version(&'static str, CompareOp, i64),
}

/// An operation of a random transaction.
#[derive(Debug, Clone)]
enum Step {
    Put(&'static str, &'static str),
    Delete(&'static str),
    DeletePrefix(&'static str),
    Get(&'static str),
}

/// What an `update`'s function returns.
#[derive(Debug, Clone, Copy)]
enum Change {
    /// The current value with this appended (just this when missing).
    Append(&'static str),
    /// Delete the key.
    Delete,
}

/// A key-value with its metadata as both backends must agree on it: revisions counted from
/// the sequence's base revision, the lease as none/some.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    key: String,
    value: String,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    leased: bool,
}

impl Item {
    fn of(kv: &KeyValue, base: i64) -> Self {
        let relative = |revision: i64| if revision == 0 { 0 } else { revision - base };
        Item {
            key: kv.key.clone(),
            value: kv.value.clone(),
            create_revision: relative(kv.create_revision),
            mod_revision: relative(kv.mod_revision),
            version: kv.version,
            leased: kv.lease != 0,
        }
    }

    fn all(kvs: &[KeyValue], base: i64) -> Vec<Self> {
        kvs.iter().map(|kv| Item::of(kv, base)).collect()
    }
}

/// What one operation answered; errors compare by their full message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Done,
    Value(Option<String>),
    Range(Vec<Item>),
    Bool(bool),
    Item(Option<Item>),
    Count(u64),
    Page {
        items: Vec<Item>,
        more: bool,
        count: i64,
        revision: i64,
    },
    Txn {
        succeeded: bool,
        revision: i64,
        gets: Vec<Option<Item>>,
    },
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

fn prefix() -> impl Strategy<Value = &'static str> {
    prop_oneof![2 => select(PREFIXES), 1 => select(KEYS)]
}

fn cmp() -> impl Strategy<Value = Cmp> {
    prop_oneof![
        3 => (key(), compare_op(), value()).prop_map(|(k, op, v)| Cmp::Value(k, op, v)),
        1 => key().prop_map(Cmp::Exists),
        1 => key().prop_map(Cmp::Missing),
        2 => (key(), compare_op(), 0..60i64).prop_map(|(k, op, r)| Cmp::ModRevision(k, op, r)),
        2 => (key(), compare_op(), 0..4i64).prop_map(|(k, op, v)| Cmp::Version(k, op, v)),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (key(), value()).prop_map(|(k, v)| Step::Put(k, v)),
        2 => key().prop_map(Step::Delete),
        1 => prefix().prop_map(Step::DeletePrefix),
        3 => key().prop_map(Step::Get),
    ]
}

fn list() -> impl Strategy<Value = List> {
    (
        proptest::option::of(prefix()),
        (bound(), bound()),
        prop_oneof![2 => Just(None), 3 => (0..5usize).prop_map(Some)],
        proptest::option::of(bound()),
        any::<bool>(),
    )
        .prop_map(|(prefix, range, limit, after, keys_only)| List {
            prefix,
            range,
            limit,
            after,
            keys_only,
        })
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![3 => value().prop_map(Change::Append), 1 => Just(Change::Delete)]
}

/// The data API's operations.
fn data_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => key().prop_map(Op::GetKv),
        2 => prefix().prop_map(Op::GetPrefix),
        1 => prefix().prop_map(Op::DeletePrefix),
        3 => list().prop_map(Op::List),
        4 => (vec(cmp(), 0..3), vec(step(), 0..4), vec(step(), 0..3)).prop_map(
            |(compares, then, otherwise)| Op::Txn {
                compares,
                then,
                otherwise,
            }
        ),
        2 => (key(), change()).prop_map(|(k, c)| Op::Update(k, c)),
    ]
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![13 => op(), 14 => data_op()]
}

fn sequence() -> impl Strategy<Value = Vec<Op>> {
    vec(any_op(), OPS_PER_SEQUENCE)
}

fn outcome<T>(result: Result<T, Error>, done: impl FnOnce(T) -> Outcome) -> Outcome {
    match result {
        Ok(value) => done(value),
        Err(err) => Outcome::Failed(format!("{err}")),
    }
}

/// The store revision `kv` reads at now: what revisions of a sequence count from.
async fn base_revision(kv: &dyn Kvi) -> Result<i64, String> {
    kv.list(ListRequest::prefix("").limit(1))
        .await
        .map(|page| page.revision)
        .map_err(|err| format!("reading the base revision: {err}"))
}

fn page_outcome(page: ListPage, base: i64) -> Outcome {
    Outcome::Page {
        items: Item::all(&page.items, base),
        more: page.more,
        count: page.count,
        revision: page.revision - base,
    }
}

fn txn_outcome(outcome: TxnOutcome, base: i64) -> Outcome {
    Outcome::Txn {
        succeeded: outcome.succeeded,
        revision: outcome.revision - base,
        gets: outcome
            .gets
            .iter()
            .map(|got| got.as_ref().map(|kv| Item::of(kv, base)))
            .collect(),
    }
}

fn compare(cmp: &Cmp, base: i64) -> Compare {
    match *cmp {
        Cmp::Value(k, op, v) => Compare::value(k, op, v),
        Cmp::Exists(k) => Compare::exists(k),
        Cmp::Missing(k) => Compare::missing(k),
        // Revision 0 is "missing"; others count from the base like the answers.
        Cmp::ModRevision(k, op, 0) => Compare::mod_revision(k, op, 0),
        Cmp::ModRevision(k, op, r) => Compare::mod_revision(k, op, base + r),
        Cmp::Version(k, op, v) => Compare::version(k, op, v),
    }
}

fn txn_op(step: &Step) -> TxnOp {
    match *step {
        Step::Put(k, v) => TxnOp::put(k, v),
        Step::Delete(k) => TxnOp::delete(k),
        Step::DeletePrefix(p) => TxnOp::delete_prefix(p),
        Step::Get(k) => TxnOp::get(k),
    }
}

fn list_request(list: &List) -> ListRequest {
    let mut request = match list.prefix {
        Some(prefix) => ListRequest::prefix(prefix),
        None => ListRequest::range(list.range.0, list.range.1),
    };
    if let Some(limit) = list.limit {
        request = request.limit(limit);
    }
    if let Some(after) = list.after {
        request = request.after(after);
    }
    if list.keys_only {
        request = request.keys_only();
    }
    request
}

async fn apply(kv: &dyn Kvi, op: &Op, base: i64) -> Outcome {
    match op {
        &Op::Store(k, v) => outcome(kv.store(k, v).await, |()| Outcome::Done),
        &Op::Get(k) => outcome(kv.get(k).await, Outcome::Value),
        &Op::Delete(k) => outcome(kv.delete(k).await, |()| Outcome::Done),
        &Op::GetRange(a, b) => outcome(kv.get_range(a, b).await, |kvs| {
            Outcome::Range(Item::all(&kvs, base))
        }),
        &Op::Tas(k, t, s) => outcome(kv.tas(k, t, s).await, Outcome::Bool),
        &Op::Transaction {
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
        &Op::GetKv(k) => outcome(kv.get_kv(k).await, |got| {
            Outcome::Item(got.map(|kv| Item::of(&kv, base)))
        }),
        &Op::GetPrefix(p) => outcome(kv.get_prefix(p).await, |kvs| {
            Outcome::Range(Item::all(&kvs, base))
        }),
        &Op::DeletePrefix(p) => outcome(kv.delete_prefix(p).await, Outcome::Count),
        Op::List(list) => outcome(kv.list(list_request(list)).await, |page| {
            page_outcome(page, base)
        }),
        Op::Txn {
            compares,
            then,
            otherwise,
        } => {
            let mut txn = Txn::new();
            for cmp in compares {
                txn = txn.when(compare(cmp, base));
            }
            for step in then {
                txn = txn.then(txn_op(step));
            }
            for step in otherwise {
                txn = txn.otherwise(txn_op(step));
            }
            outcome(kv.txn(txn).await, |done| txn_outcome(done, base))
        }
        &Op::Update(k, change) => {
            let mut f = |current: Option<&str>| match change {
                Change::Append(v) => Some(format!("{}{v}", current.unwrap_or(""))),
                Change::Delete => None,
            };
            outcome(kv.update(k, &mut f).await, Outcome::Value)
        }
    }
}

/// Everything under the handle's prefix, with metadata.
async fn everything(kv: &dyn Kvi, base: i64) -> Outcome {
    outcome(kv.get_range("", "\u{10FFFF}\u{10FFFF}").await, |kvs| {
        Outcome::Range(Item::all(&kvs, base))
    })
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
        let etcd_base = base_revision(&etcd).await?;
        let mem_base = base_revision(&mem).await?;
        let mut report = String::new();
        let mut diverged = false;
        for (i, op) in ops.iter().enumerate() {
            let expected = apply(&etcd, op, etcd_base).await;
            let got = apply(&mem, op, mem_base).await;
            self.operations.fetch_add(1, Ordering::Relaxed);
            let _ = writeln!(report, "  #{i:<2} {op:?} -> etcd {expected:?}");
            if expected != got {
                let _ = writeln!(report, "      mem differs: {got:?}");
                diverged = true;
                break;
            }
        }
        if !diverged {
            let expected = everything(&etcd, etcd_base).await;
            let got = everything(&mem, mem_base).await;
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
