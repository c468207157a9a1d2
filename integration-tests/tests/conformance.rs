//! Runs every conformance case against every backend chosen by `HMETCD_TEST_BACKENDS`,
//! one test per (backend, case), named `<backend>::<case>`.

use std::process::ExitCode;

use integration_tests::{backends, cases, TestStore};
use libtest_mimic::{Arguments, Failed, Trial};

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let openers = match backends::from_env() {
        Ok(openers) => openers,
        Err(why) => {
            eprintln!("conformance: {why}");
            return ExitCode::FAILURE;
        }
    };
    let mut trials = Vec::new();
    for opener in &openers {
        for case in cases::all() {
            let opener = opener.clone();
            trials.push(Trial::test(format!("{}::{}", opener.name(), case.name), move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(|err| Failed::from(format!("tokio runtime: {err}")))?;
                runtime.block_on((case.run)(TestStore::new(opener)));
                Ok(())
            }));
        }
    }
    libtest_mimic::run(&args, trials).exit_code()
}
