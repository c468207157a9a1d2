//! Runs every conformance case against every backend chosen by `HMETCD_TEST_BACKENDS`
//! (default `mem,etcd`), one test per (backend, case), named `<backend>::<case>`, e.g.
//! `mem::reads::get_absent` and `etcd-3.5.1::reads::get_absent`.
//!
//! The etcd comes from `integration_tests::etcd_server` (see there for the environment
//! variables); it is torn down after the tests, before the process exits.

use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::time::Duration;

use integration_tests::{backends, cases, Case, TestStore};
use libtest_mimic::{Arguments, Failed, Trial};

/// The longest a single case may run before it fails.
const CASE_LIMIT: Duration = Duration::from_secs(60);

/// Cases run at once unless `--test-threads` says otherwise.
const DEFAULT_TEST_THREADS: usize = 8;

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    let mut selection = match backends::from_env() {
        Ok(selection) => selection,
        Err(why) => {
            eprintln!("conformance: {why}");
            return ExitCode::FAILURE;
        }
    };
    if !backends::etcd_requested().unwrap_or(false) {
        eprintln!("conformance: {}", backends::MEM_ONLY_NOTICE);
    }
    let mut trials = Vec::new();
    for opener in &selection.openers {
        let limited = cases::all()
            .into_iter()
            .map(|case| (case, CASE_LIMIT))
            .chain(
                cases::slow()
                    .into_iter()
                    .map(|case| (case, cases::SLOW_CASE_LIMIT)),
            );
        for (case, limit) in limited {
            let opener = opener.clone();
            trials.push(Trial::test(
                format!("{}::{}", opener.name(), case.name),
                move || run_case(case, limit, TestStore::new(opener)),
            ));
        }
    }
    if let Some(why) = selection.etcd_unavailable.clone() {
        trials.push(Trial::test("etcd::server", move || Err(Failed::from(why))));
    }
    if args.test_threads.is_none() {
        // Cases mostly wait on timers and the server, not on the CPU.
        args.test_threads = Some(DEFAULT_TEST_THREADS);
    }
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(server) = selection.etcd_server.as_mut() {
        server.shutdown();
    }
    conclusion.exit_code()
}

/// Runs one case on a runtime of its own, bounded by `limit` ([`CASE_LIMIT`] but for the
/// slow cases). The runtime is shut down without waiting for its tasks, so a task that never
/// yields cannot hang the suite.
fn run_case(case: Case, limit: Duration, store: TestStore) -> Result<(), Failed> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|err| Failed::from(format!("tokio runtime: {err}")))?;
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        runtime.block_on(async { tokio::time::timeout(limit, (case.run)(store)).await })
    }));
    runtime.shutdown_background();
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Failed::from(format!(
            "the case did not finish within {limit:?}"
        ))),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
