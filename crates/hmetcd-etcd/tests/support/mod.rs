//! A private etcd server for one test: started on free loopback ports in a temporary data
//! directory, stopped (SIGTERM, then SIGKILL) when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::Client;

/// Where to look for an etcd binary, first match wins: `$HMETCD_ETCD_BIN`, then these.
const CANDIDATES: [&str; 3] = ["/opt/etcd-3.5/etcd", "/usr/bin/etcd", "/usr/local/bin/etcd"];

pub(crate) struct EtcdServer {
    binary: PathBuf,
    data: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    extra_args: Vec<String>,
    child: Option<Child>,
}

/// A free loopback port never handed out before in this process: the OS may give a port
/// that one test's etcd released (or has not bound yet) to another test, whose raw client
/// then talks to the wrong server (a peer port answers gRPC with a connection reset).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("no free loopback port");
        let port = listener.local_addr().expect("no local address").port();
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("HMETCD_ETCD_BIN") {
        return PathBuf::from(path);
    }
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "these tests need an etcd binary: none of {CANDIDATES:?} exists; \
                 install etcd or set HMETCD_ETCD_BIN=/path/to/etcd"
            )
        })
}

impl EtcdServer {
    /// Starts a fresh server and waits until it answers.
    pub(crate) async fn start() -> EtcdServer {
        EtcdServer::start_with(&[]).await
    }

    /// Starts a fresh server with extra command-line flags.
    pub(crate) async fn start_with(extra_args: &[&str]) -> EtcdServer {
        let mut server = EtcdServer {
            extra_args: extra_args.iter().map(|arg| (*arg).to_owned()).collect(),
            binary: binary(),
            data: tempfile::tempdir().expect("no temporary directory"),
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
        };
        server.spawn();
        server.wait_ready().await;
        server
    }

    /// How many watchers the server has right now (its `etcd_debugging_mvcc_watcher_total`).
    pub(crate) fn watcher_count(&self) -> u64 {
        use std::io::{Read, Write};

        let mut connection = std::net::TcpStream::connect(("127.0.0.1", self.client_port)).unwrap();
        connection
            .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .unwrap();
        let mut metrics = String::new();
        connection.read_to_string(&mut metrics).unwrap();
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("etcd_debugging_mvcc_watcher_total "))
            .and_then(|count| count.trim().parse::<f64>().ok())
            .map(|count| count as u64)
            .expect("no etcd_debugging_mvcc_watcher_total metric")
    }

    /// The `etcdctl` next to the etcd binary (Go's client, for checking interplay with Go).
    pub(crate) fn etcdctl(&self) -> PathBuf {
        let etcdctl = self.binary.with_file_name("etcdctl");
        assert!(etcdctl.is_file(), "this test needs {}", etcdctl.display());
        etcdctl
    }

    /// `https://127.0.0.1:<port>` for a server started with `start_tls`.
    pub(crate) fn tls_endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.client_port)
    }

    /// `http://127.0.0.1:<port>`
    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// A plain etcd-client connection, for looking behind the library's back.
    pub(crate) async fn raw_client(&self) -> Client {
        Client::connect([self.endpoint()], None)
            .await
            .expect("raw etcd client")
    }

    fn spawn(&mut self) {
        self.spawn_on(self.client_port);
    }

    fn spawn_on(&mut self, client_port: u16) {
        let scheme = if self
            .extra_args
            .iter()
            .any(|arg| arg.starts_with("--cert-file"))
        {
            "https"
        } else {
            "http"
        };
        let client_url = format!("{scheme}://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(&self.binary)
            .arg("--name=hmetcd-test")
            .arg(format!(
                "--data-dir={}",
                self.data.path().join("etcd").display()
            ))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=hmetcd-test={peer_url}"))
            .arg("--log-level=error")
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", self.binary.display()));
        self.child = Some(child);
    }

    async fn wait_ready(&self) {
        if self
            .extra_args
            .iter()
            .any(|arg| arg.starts_with("--cert-file"))
        {
            // TLS: wait for the port only; the test's own client checks the rest.
            let deadline = Instant::now() + Duration::from_secs(20);
            while std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
                assert!(Instant::now() < deadline, "etcd did not listen within 20 s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            return;
        }
        self.wait_ready_on(&self.endpoint()).await;
    }

    async fn wait_ready_on(&self, endpoint: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let probe = async {
                let mut client = Client::connect([endpoint], None).await.ok()?;
                client.status().await.ok()
            };
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(1), probe).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd ({}) did not answer on {} within 20 s",
                self.binary.display(),
                endpoint
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the server: SIGTERM, then SIGKILL after two seconds.
    pub(crate) fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the server and starts it again on the same data directory and ports.
    pub(crate) async fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.wait_ready().await;
    }
}

impl EtcdServer {
    /// Restarts the server on another client port, where this test's handles cannot reach it,
    /// and returns a client for that port; `restart` brings it back on the usual port.
    pub(crate) async fn restart_out_of_reach(&mut self) -> Client {
        self.stop();
        let hidden = free_port();
        self.spawn_on(hidden);
        let endpoint = format!("http://127.0.0.1:{hidden}");
        self.wait_ready_on(&endpoint).await;
        Client::connect([endpoint], None)
            .await
            .expect("raw etcd client")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}
