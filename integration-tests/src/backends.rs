//! The backends the suite runs against, chosen by `HMETCD_TEST_BACKENDS` (a comma-separated
//! list of `mem` and `etcd`; default `mem,etcd`).

use std::sync::Arc;
use std::time::Duration;

use hmetcd_core::{Kvi, Result};
use hmetcd_etcd::EtcdKvs;
use hmetcd_mem::MemKvs;

use crate::etcd_server::EtcdServer;
use crate::Opener;

/// What `HMETCD_TEST_BACKENDS` means when unset.
pub const DEFAULT_BACKENDS: &str = "mem,etcd";

/// What the runners print when etcd is left out.
pub const MEM_ONLY_NOTICE: &str = "etcd backend not requested: running in-memory only";

/// The in-memory backend: every handle of one run opens the same named store.
pub struct MemOpener {
    store_name: String,
}

impl MemOpener {
    /// An opener on a fresh named store.
    pub fn new() -> Self {
        let tag: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(12)
            .collect();
        MemOpener {
            store_name: format!("conformance-{tag}"),
        }
    }
}

impl Default for MemOpener {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait::async_trait]
impl Opener for MemOpener {
    fn name(&self) -> &str {
        "mem"
    }

    async fn open(&self, options: &str) -> Result<Box<dyn Kvi>> {
        Ok(Box::new(MemKvs::open(&self.store_name, options)?))
    }

    fn drop_release_bound(&self, _lease_ttl: Duration) -> Duration {
        Duration::ZERO
    }
}

/// The etcd backend on one server; named `etcd-<server version>`.
pub struct EtcdOpener {
    name: String,
    endpoints: String,
}

impl EtcdOpener {
    /// An opener on the server at `endpoints` (comma-separated) whose version is `version`.
    pub fn new(endpoints: &str, version: &str) -> Self {
        EtcdOpener {
            name: format!("etcd-{version}"),
            endpoints: endpoints.to_owned(),
        }
    }

    /// An opener on `server`.
    pub fn on(server: &EtcdServer) -> Self {
        Self::new(server.endpoints(), server.version())
    }

    /// The endpoints it opens.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }
}

#[async_trait::async_trait]
impl Opener for EtcdOpener {
    fn name(&self) -> &str {
        &self.name
    }

    async fn open(&self, options: &str) -> Result<Box<dyn Kvi>> {
        Ok(Box::new(EtcdKvs::connect(&self.endpoints, options).await?))
    }

    fn drop_release_bound(&self, lease_ttl: Duration) -> Duration {
        // A dropped handle's lease is no longer kept alive; etcd expires it after its TTL.
        lease_ttl
    }
}

/// The backends of one run.
#[derive(Default)]
pub struct Selection {
    /// The backends to run every case against.
    pub openers: Vec<Arc<dyn Opener>>,
    /// The etcd behind the etcd backend, if the harness found or started one; call
    /// [`EtcdServer::shutdown`] when the tests are done (dropping it does the same).
    pub etcd_server: Option<EtcdServer>,
    /// Why the etcd backend was requested but has no server: its tests must fail with this.
    pub etcd_unavailable: Option<String>,
}

/// The backend names `HMETCD_TEST_BACKENDS` asks for, checked.
pub fn requested() -> std::result::Result<Vec<String>, String> {
    let wanted =
        std::env::var("HMETCD_TEST_BACKENDS").unwrap_or_else(|_| DEFAULT_BACKENDS.to_owned());
    let mut names = Vec::new();
    for name in wanted.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match name {
            "mem" | "etcd" if names.iter().any(|known| known == name) => {}
            "mem" | "etcd" => names.push(name.to_owned()),
            other => {
                return Err(format!(
                    "HMETCD_TEST_BACKENDS: unknown backend {other:?} (known: mem, etcd)"
                ))
            }
        }
    }
    Ok(names)
}

/// Whether `HMETCD_TEST_BACKENDS` asks for etcd.
pub fn etcd_requested() -> std::result::Result<bool, String> {
    Ok(requested()?.iter().any(|name| name == "etcd"))
}

/// The backends to test, from `HMETCD_TEST_BACKENDS`; finds or starts an etcd if asked for.
pub fn from_env() -> std::result::Result<Selection, String> {
    let mut selection = Selection::default();
    for name in requested()? {
        match name.as_str() {
            "mem" => selection.openers.push(Arc::new(MemOpener::new())),
            _ => match EtcdServer::from_env() {
                Ok(server) => {
                    selection.openers.push(Arc::new(EtcdOpener::on(&server)));
                    selection.etcd_server = Some(server);
                }
                Err(why) => selection.etcd_unavailable = Some(why),
            },
        }
    }
    Ok(selection)
}

/// For a test binary that needs etcd: the etcd of the environment, or the exit code to end
/// with instead. That is a run of no tests (said on stderr) when the runner asked for
/// in-memory only, a failure for a bad `HMETCD_TEST_BACKENDS`, and one failing `etcd::server`
/// test that says why when no etcd can be had.
pub fn etcd_server_or_exit(
    binary: &str,
    args: &libtest_mimic::Arguments,
) -> std::result::Result<EtcdServer, std::process::ExitCode> {
    match etcd_requested() {
        Err(why) => {
            eprintln!("{binary}: {why}");
            return Err(std::process::ExitCode::FAILURE);
        }
        Ok(false) => {
            eprintln!("{binary}: {MEM_ONLY_NOTICE}; its tests need etcd and are skipped");
            return Err(libtest_mimic::run(args, Vec::new()).exit_code());
        }
        Ok(true) => {}
    }
    EtcdServer::from_env().map_err(|why| {
        let trial = libtest_mimic::Trial::test("etcd::server", move || {
            Err(libtest_mimic::Failed::from(why))
        });
        libtest_mimic::run(args, vec![trial]).exit_code()
    })
}
