//! The frame every fault-test binary shares: its own private etcd, tests named
//! `<binary>::<backend>::<what they prove>`, run one at a time, each bounded in time.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use libtest_mimic::{Arguments, Failed, Trial};

use crate::backends::{self, EtcdOpener};
use crate::etcd_server::EtcdServer;
use crate::{run_limited, TestStore};

/// What a fault test runs.
pub type TestFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A fault test against etcd: given the server's endpoints and a store view of its own.
pub type EtcdTest = fn(String, TestStore) -> TestFuture;

/// Builds the etcd tests of one binary, named `<binary>::etcd-<version>::<name>`.
pub struct EtcdTrials<'a> {
    binary: &'static str,
    server: &'a EtcdServer,
    trials: Vec<Trial>,
}

impl<'a> EtcdTrials<'a> {
    /// The tests of `binary` against `server`.
    pub fn new(binary: &'static str, server: &'a EtcdServer) -> Self {
        EtcdTrials {
            binary,
            server,
            trials: Vec::new(),
        }
    }

    /// The server the tests run against.
    pub fn server(&self) -> &'a EtcdServer {
        self.server
    }

    /// The full name of the test `name`.
    pub fn name(&self, name: &str) -> String {
        format!("{}::etcd-{}::{name}", self.binary, self.server.version())
    }

    /// Adds the test `name`, failed if it takes longer than `limit_secs`.
    pub fn add(&mut self, name: &str, limit_secs: u64, test: EtcdTest) -> &mut Self {
        let endpoints = self.server.endpoints().to_owned();
        let store = TestStore::new(Arc::new(EtcdOpener::on(self.server)));
        self.add_future(name, limit_secs, move || test(endpoints, store))
    }

    /// Adds the test `name` whose future `make` builds when it runs.
    pub fn add_future(
        &mut self,
        name: &str,
        limit_secs: u64,
        make: impl FnOnce() -> TestFuture + Send + 'static,
    ) -> &mut Self {
        self.trials.push(Trial::test(self.name(name), move || {
            run_limited(2, Duration::from_secs(limit_secs), make())
        }));
        self
    }

    /// The tests added.
    pub fn into_trials(self) -> Vec<Trial> {
        self.trials
    }
}

/// Runs a fault-test binary: `mem_trials` always, and the tests `etcd_trials` builds against
/// a private etcd that the harness starts (as `HMETCD_ETCD_MODE` says) when the runner asks
/// for etcd. Tests run one at a time unless `--test-threads` says otherwise, since they
/// measure timings. No etcd when one was asked for is a failing `<binary>::etcd::server` test.
pub fn run_fault_binary(
    binary: &'static str,
    mut trials: Vec<Trial>,
    etcd_trials: impl FnOnce(&EtcdServer) -> Vec<Trial>,
) -> ExitCode {
    let mut args = Arguments::from_args();
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let mut server = None;
    match backends::etcd_requested() {
        Err(why) => {
            eprintln!("{binary}: {why}");
            return ExitCode::FAILURE;
        }
        Ok(false) => eprintln!("{binary}: {}", backends::MEM_ONLY_NOTICE),
        Ok(true) => match EtcdServer::start_owned() {
            Ok(started) => {
                trials.extend(etcd_trials(&started));
                server = Some(started);
            }
            Err(why) => trials.push(Trial::test(format!("{binary}::etcd::server"), move || {
                Err(Failed::from(why))
            })),
        },
    }
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(server) = server.as_mut() {
        server.shutdown();
    }
    conclusion.exit_code()
}
