//! The etcd server that the etcd tests run against, found or started in this order:
//!
//! 1. `HMETCD_TEST_ENDPOINTS`: an etcd that is already running (comma-separated endpoints);
//! 2. a Docker engine that answers: etcd in a container started with testcontainers, from a
//!    `FROM scratch` image built here around a static etcd binary (`HMETCD_ETCD_BIN`,
//!    `/opt/etcd-3.5/etcd` or `.cache/etcd-3.5/etcd` in the workspace), else from the image
//!    `HMETCD_ETCD_IMAGE` (default `quay.io/coreos/etcd:v3.5.17`);
//! 3. an etcd binary (`HMETCD_ETCD_BIN`, `etcd` on `PATH`) run as a child process on free
//!    loopback ports with a temporary data directory.
//!
//! `HMETCD_ETCD_MODE=container` or `process` forces route 2 or 3. A started server is torn
//! down by [`EtcdServer::shutdown`] or, failing that, when the [`EtcdServer`] is dropped.

mod container;
mod docker;
mod process;

pub(crate) use process::MemberCommand;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// How long a started etcd may take to answer its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How much of the log of an etcd that stopped by itself to show.
const CRASH_LOG_LINES: usize = 150;

/// What to tell a user who has no etcd at all.
const HOW_TO_PROVIDE: &str =
    "provide one with HMETCD_TEST_ENDPOINTS=http://127.0.0.1:2379 (a running \
etcd), a Docker engine plus HMETCD_ETCD_BIN=/path/to/static/etcd or a pullable HMETCD_ETCD_IMAGE, \
or an etcd binary on PATH or in HMETCD_ETCD_BIN (scripts/install-etcd.sh installs both); \
or run in memory only with HMETCD_TEST_BACKENDS=mem";

/// The route `HMETCD_ETCD_MODE` forces, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Endpoints, then Docker, then a child process.
    Auto,
    /// etcd in a container only.
    Container,
    /// etcd as a child process only.
    Process,
}

impl Mode {
    /// The mode from `HMETCD_ETCD_MODE` (unset or empty: [`Mode::Auto`]).
    pub fn from_env() -> Result<Mode, String> {
        match std::env::var("HMETCD_ETCD_MODE").unwrap_or_default().trim() {
            "" | "auto" => Ok(Mode::Auto),
            "container" => Ok(Mode::Container),
            "process" => Ok(Mode::Process),
            other => Err(format!(
                "HMETCD_ETCD_MODE={other:?}: expected container, process or auto"
            )),
        }
    }
}

enum Running {
    External,
    Container(Box<container::EtcdContainer>),
    Process(Box<process::EtcdProcess>),
}

/// An etcd the tests can use: running somewhere already, or started (and owned) by this harness.
pub struct EtcdServer {
    running: Arc<Mutex<Option<Running>>>,
    endpoints: String,
    version: String,
    description: String,
}

impl std::fmt::Debug for EtcdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdServer")
            .field("endpoints", &self.endpoints)
            .field("version", &self.version)
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

impl EtcdServer {
    /// Finds or starts an etcd as the environment says (see the module doc) and prints one
    /// line to stderr naming it and its version.
    pub fn from_env() -> Result<EtcdServer, String> {
        Self::start(Mode::from_env()?, true)
    }

    /// Starts an etcd owned by this harness (container or child process, never
    /// `HMETCD_TEST_ENDPOINTS`), for tests that stop and restart it.
    pub fn start_owned() -> Result<EtcdServer, String> {
        Self::start(Mode::from_env()?, false)
    }

    fn start(mode: Mode, external_allowed: bool) -> Result<EtcdServer, String> {
        let runtime = harness_runtime()?;
        let (running, endpoints, description) = run_on(
            runtime.handle(),
            Self::start_running(mode, external_allowed),
        )??;
        let mut server = EtcdServer {
            running: Arc::new(Mutex::new(Some(running))),
            endpoints,
            version: String::new(),
            description,
        };
        let endpoints = server.endpoints.clone();
        let version = run_on(runtime.handle(), async move {
            wait_ready(&endpoints, READY_TIMEOUT).await
        })?;
        // On failure, dropping `server` tears down what was started.
        server.version = version.map_err(|why| format!("etcd {}: {why}", server.description))?;
        eprintln!(
            "etcd for the tests: etcd {} {}",
            server.version, server.description
        );
        Ok(server)
    }

    async fn start_running(
        mode: Mode,
        external_allowed: bool,
    ) -> Result<(Running, String, String), String> {
        let endpoints = std::env::var("HMETCD_TEST_ENDPOINTS").unwrap_or_default();
        if mode == Mode::Auto && external_allowed && !endpoints.trim().is_empty() {
            let endpoints = endpoints.trim().to_owned();
            let description = format!("at {endpoints} (HMETCD_TEST_ENDPOINTS)");
            return Ok((Running::External, endpoints, description));
        }
        if let Some(bin) = env_binary().filter(|bin| !is_file(bin)) {
            return Err(format!("HMETCD_ETCD_BIN={}: no such file", bin.display()));
        }
        if mode != Mode::Process {
            match docker::Engine::probe().await {
                Ok(engine) if mode == Mode::Container => {
                    return Self::start_container(&engine).await
                }
                Ok(engine) => match Self::start_container(&engine).await {
                    Ok(started) => return Ok(started),
                    Err(why) if process_binary().is_some() => {
                        eprintln!(
                            "etcd for the tests: no container ({why}); trying a child process"
                        );
                    }
                    Err(why) => return Err(why),
                },
                Err(why) if mode == Mode::Container => {
                    return Err(format!(
                        "HMETCD_ETCD_MODE=container but no Docker engine answers: {why}"
                    ))
                }
                Err(_) => {}
            }
        }
        let bin = process_binary().ok_or_else(|| match mode {
            Mode::Process => "HMETCD_ETCD_MODE=process but no etcd binary found (HMETCD_ETCD_BIN, \
                              etcd on PATH, /opt/etcd-3.5/etcd)"
                .to_owned(),
            _ => format!("no etcd for the etcd backend: {HOW_TO_PROVIDE}"),
        })?;
        let process = process::EtcdProcess::start(&bin).await?;
        let endpoints = process.endpoint();
        let description = format!("as a child process ({}) at {endpoints}", bin.display());
        Ok((Running::Process(Box::new(process)), endpoints, description))
    }

    async fn start_container(engine: &docker::Engine) -> Result<(Running, String, String), String> {
        let source = match container_binary() {
            Some(bin) => container::ImageSource::StaticBinary(bin),
            None => container::ImageSource::Image(
                std::env::var("HMETCD_ETCD_IMAGE")
                    .ok()
                    .filter(|image| !image.trim().is_empty())
                    .unwrap_or_else(|| container::DEFAULT_IMAGE.to_owned()),
            ),
        };
        let container = container::EtcdContainer::start(engine, source).await?;
        let endpoints = container.endpoint();
        let description = format!("in a container ({}) at {endpoints}", container.describe());
        Ok((
            Running::Container(Box::new(container)),
            endpoints,
            description,
        ))
    }

    /// The client endpoints, comma-separated.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// The server version from its status response, e.g. `3.5.1`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// How the server runs, e.g. `as a child process (/usr/bin/etcd) at http://127.0.0.1:1234`.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The process id of an etcd the harness runs as a child process (`None` for a container
    /// or a server given by `HMETCD_TEST_ENDPOINTS`), e.g. to read its CPU time. It changes
    /// with a restart.
    pub fn process_id(&self) -> Option<u32> {
        match self.running.try_lock().ok()?.as_ref()? {
            Running::Process(process) => process.pid(),
            Running::Container(_) | Running::External => None,
        }
    }

    /// Whether [`EtcdServer::restart`] can work (the harness owns the server).
    pub fn can_restart(&self) -> bool {
        !self.description.ends_with("(HMETCD_TEST_ENDPOINTS)")
    }

    /// Stops the server (SIGTERM) and starts it again on the same ports with the same data,
    /// then waits until it answers. Callable from any tokio runtime.
    pub async fn restart(&self) -> Result<(), String> {
        let running = self.running.clone();
        let endpoints = self.endpoints.clone();
        self.spawn(async move {
            let mut guard = running.lock().await;
            match guard.as_mut() {
                Some(Running::Process(process)) => process.restart().await?,
                Some(Running::Container(container)) => container.restart().await?,
                Some(Running::External) => {
                    return Err("cannot restart an etcd given by HMETCD_TEST_ENDPOINTS".into())
                }
                None => return Err("the etcd server was already shut down".into()),
            }
            drop(guard);
            wait_ready(&endpoints, READY_TIMEOUT).await.map(drop)
        })
        .await
    }

    /// Stops the server (if the harness started it) and removes its data. Idempotent.
    pub fn shutdown(&mut self) {
        let running = self.running.clone();
        let stopped = harness_runtime().and_then(|runtime| {
            run_on(runtime.handle(), async move {
                match running.lock().await.take() {
                    Some(Running::Process(process)) => process.stop_for_good().await,
                    Some(Running::Container(container)) => container.remove().await,
                    Some(Running::External) | None => Ok(()),
                }
            })
        });
        if let Ok(Err(why)) | Err(why) = stopped {
            eprintln!("etcd for the tests: shutting down: {why}");
        }
    }

    /// A handle that pauses and resumes this server (SIGSTOP/SIGCONT for a child process,
    /// `docker pause`/`unpause` for a container), for tests of an etcd outage.
    pub fn pauser(&self) -> EtcdPauser {
        EtcdPauser {
            running: self.running.clone(),
        }
    }

    /// Runs `future` on the harness runtime and awaits it from any runtime.
    async fn spawn<T: Send + 'static>(
        &self,
        future: impl std::future::Future<Output = Result<T, String>> + Send + 'static,
    ) -> Result<T, String> {
        harness_runtime()?
            .spawn(future)
            .await
            .map_err(|err| format!("the etcd harness task failed: {err}"))?
    }
}

/// Pauses and resumes an [`EtcdServer`] the harness started; see [`EtcdServer::pauser`].
#[derive(Clone)]
pub struct EtcdPauser {
    running: Arc<Mutex<Option<Running>>>,
}

impl EtcdPauser {
    /// Freezes the server: it keeps its connections but answers nothing.
    pub async fn pause(&self) -> Result<(), String> {
        self.set_paused(true).await
    }

    /// Lets a paused server run again.
    pub async fn resume(&self) -> Result<(), String> {
        self.set_paused(false).await
    }

    async fn set_paused(&self, paused: bool) -> Result<(), String> {
        let running = self.running.clone();
        harness_runtime()?
            .spawn(async move {
                match running.lock().await.as_ref() {
                    Some(Running::Process(process)) => process.set_paused(paused),
                    Some(Running::Container(container)) => container.set_paused(paused).await,
                    Some(Running::External) => {
                        Err("cannot pause an etcd given by HMETCD_TEST_ENDPOINTS".into())
                    }
                    None => Err("the etcd server was already shut down".into()),
                }
            })
            .await
            .map_err(|err| format!("the etcd harness task failed: {err}"))?
    }
}

/// The process-wide runtime that owns everything the harness starts (child processes, the
/// testcontainers client, the Docker API proxy), so that it outlives every test's runtime.
fn harness_runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("etcd-harness")
                .enable_all()
                .build()
                .map_err(|err| format!("etcd harness: cannot start a tokio runtime: {err}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Runs `future` on a worker of `handle`'s runtime and waits for it from a thread of its own,
/// so that the caller may itself be inside a tokio runtime. Child processes are spawned from
/// the long-lived worker, which matters for their parent-death signal.
fn run_on<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    future: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, String> {
    let handle = handle.clone();
    std::thread::scope(|scope| {
        scope
            .spawn(move || handle.block_on(handle.spawn(future)))
            .join()
            .map_err(|_| "the etcd harness panicked".to_owned())?
            .map_err(|err| format!("the etcd harness task failed: {err}"))
    })
}

/// Connects to `endpoints` and asks for the server's status until it answers or `timeout`
/// passes; returns the server version.
pub async fn wait_ready(endpoints: &str, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let why = match status_version(endpoints).await {
            Ok(version) => return Ok(version),
            Err(why) => why,
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "etcd at {endpoints} did not answer within {timeout:?}: {why}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The version from one status request to `endpoints`.
pub async fn status_version(endpoints: &str) -> Result<String, String> {
    let mut client = raw_client(endpoints).await?;
    let status = tokio::time::timeout(Duration::from_secs(3), client.status())
        .await
        .map_err(|_| "status request timed out".to_owned())?
        .map_err(|err| format!("status request: {err}"))?;
    Ok(status.version().to_owned())
}

/// A raw etcd-client connected to `endpoints` (comma-separated), for tests that write the
/// way other clients do.
pub async fn raw_client(endpoints: &str) -> Result<etcd_client::Client, String> {
    let list: Vec<&str> = endpoints
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5));
    tokio::time::timeout(
        Duration::from_secs(5),
        etcd_client::Client::connect(list, Some(options)),
    )
    .await
    .map_err(|_| format!("connecting to {endpoints} timed out"))?
    .map_err(|err| format!("connecting to {endpoints}: {err}"))
}

/// The lease `key` (stored form) is bound to, read with a raw client; `None` when the key is
/// missing, 0 for a key without a lease. Panics (failing the test) if etcd cannot be read.
pub async fn lease_of(raw: &mut etcd_client::Client, key: &str) -> Option<i64> {
    let answer = raw
        .get(key, None)
        .await
        .unwrap_or_else(|err| panic!("raw get of {key:?}: {err}"));
    answer.kvs().first().map(|kv| kv.lease())
}

/// The value of one of etcd's own Prometheus figures (a gauge or a counter without labels,
/// e.g. `etcd_debugging_mvcc_watcher_total`), read from `/metrics` on the first of
/// `endpoints` (comma-separated `http://host:port`) with a plain HTTP/1.0 request.
pub async fn server_metric(endpoints: &str, name: &str) -> Result<f64, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let first = endpoints.split(',').next().unwrap_or_default().trim();
    let address = first
        .strip_prefix("http://")
        .ok_or_else(|| format!("server_metric needs an http:// endpoint, not {first:?}"))?
        .trim_end_matches('/');
    let scrape = async {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|err| format!("connecting to {address} for /metrics: {err}"))?;
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|err| format!("asking {address} for /metrics: {err}"))?;
        let mut body = Vec::new();
        stream
            .read_to_end(&mut body)
            .await
            .map_err(|err| format!("reading /metrics from {address}: {err}"))?;
        Ok::<_, String>(String::from_utf8_lossy(&body).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), scrape)
        .await
        .map_err(|_| format!("reading /metrics from {address} timed out"))??;
    text.lines()
        .find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(' ')?;
            value.trim().parse::<f64>().ok()
        })
        .ok_or_else(|| format!("{address}/metrics has no figure {name}"))
}

/// The static etcd binary to build a container image from: `HMETCD_ETCD_BIN`, or a known
/// install path that `scripts/install-etcd.sh` fills.
fn container_binary() -> Option<PathBuf> {
    if let Some(bin) = env_binary() {
        return Some(bin);
    }
    known_static_paths().into_iter().find(|path| is_file(path))
}

/// The etcd binary to run as a child process: `HMETCD_ETCD_BIN`, `etcd` on `PATH`, or a
/// known install path.
fn process_binary() -> Option<PathBuf> {
    if let Some(bin) = env_binary() {
        return Some(bin);
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("etcd"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(known_static_paths())
        .find(|path| is_file(path))
}

fn env_binary() -> Option<PathBuf> {
    std::env::var_os("HMETCD_ETCD_BIN")
        .filter(|bin| !bin.is_empty())
        .map(PathBuf::from)
}

fn known_static_paths() -> Vec<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    vec![
        PathBuf::from("/opt/etcd-3.5/etcd"),
        workspace.join(".cache/etcd-3.5/etcd"),
    ]
}

fn is_file(path: &Path) -> bool {
    path.metadata().map(|meta| meta.is_file()).unwrap_or(false)
}

/// A free port on `addr` never handed out before in this process, so that two servers of one
/// test binary never share one (the OS may give a just-released port again, to a server
/// started later while a client of the earlier one still dials it).
pub(crate) fn free_port(addr: &str) -> Result<u16, String> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind((addr, 0))
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .map_err(|err| format!("finding a free port on {addr}: {err}"))?;
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
}

/// What tells why a process ended: a Go panic (or fatal runtime error), the few lines logged
/// before it and the start of its trace if there is one (the trace of every goroutine runs to
/// thousands of lines, its cause at the top), otherwise the last `lines` lines.
pub(crate) fn crash_excerpt(log: &str, lines: usize) -> String {
    const BEFORE_PANIC: usize = 10;
    let all: Vec<&str> = log.lines().collect();
    let start = all
        .iter()
        .position(|line| line.starts_with("panic:") || line.starts_with("fatal error:"))
        .map(|at| at.saturating_sub(BEFORE_PANIC))
        .unwrap_or(all.len().saturating_sub(lines));
    all[start..all.len().min(start + lines)].join("\n")
}

#[cfg(test)]
mod tests {
    use super::crash_excerpt;

    #[test]
    fn a_crash_excerpt_starts_at_the_panic() {
        let before: String = (0..12).map(|n| format!("{n}\n")).collect();
        let log = format!("{before}panic: boom\ngoroutine 1\nx\n");
        let excerpt = crash_excerpt(&log, 12);
        assert!(excerpt.starts_with("2\n3\n"), "{excerpt}");
        assert!(
            excerpt.ends_with("11\npanic: boom\ngoroutine 1"),
            "{excerpt}"
        );
        assert_eq!(crash_excerpt("a\nb\nc\n", 2), "b\nc");
        assert_eq!(crash_excerpt("", 2), "");
    }
}
