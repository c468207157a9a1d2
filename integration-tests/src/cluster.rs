//! Small etcd clusters run as child processes, for the fault-tolerance, authentication and
//! TLS tests: every member on free loopback ports with a data directory of its own, started
//! by static bootstrap (`--initial-cluster`), killed, frozen or restarted one by one, and
//! killed for good when the [`EtcdCluster`] is dropped.
//!
//! The binary is `HMETCD_ETCD_BIN` if set, else `etcd` on `PATH`, else `/usr/bin/etcd`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use etcd_client::ConnectOptions;

use crate::etcd_server::{free_port, MemberCommand};

/// The etcd binary these tests run: `HMETCD_ETCD_BIN`, `etcd` on `PATH`, or `/usr/bin/etcd`.
pub fn etcd_binary() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("HMETCD_ETCD_BIN").filter(|bin| !bin.is_empty()) {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!("HMETCD_ETCD_BIN={}: no such file", bin.display()))
        };
    }
    std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("etcd"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin/etcd")])
        .find(|path| path.is_file())
        .ok_or_else(|| "no etcd binary: set HMETCD_ETCD_BIN or put etcd on PATH".to_owned())
}

/// The version `bin --version` prints, e.g. `3.5.1`.
pub fn etcd_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|line| {
                    line.strip_prefix("etcd Version:")
                        .map(|v| v.trim().to_owned())
                })
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Server-side TLS for the client URLs (the peers talk plain HTTP on loopback).
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The server certificate (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// The CA that client certificates must be signed by; with it, etcd requires one.
    pub client_ca_file: Option<PathBuf>,
}

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// How many members.
    pub members: usize,
    /// Extra etcd flags for every member, e.g. `--auth-token-ttl=2`.
    pub extra_args: Vec<String>,
    /// TLS on the client URLs (`https://`), if any.
    pub tls: Option<ServerTls>,
}

impl ClusterSpec {
    /// `members` plain-HTTP members with etcd's defaults.
    pub fn new(members: usize) -> Self {
        ClusterSpec {
            members,
            extra_args: Vec::new(),
            tls: None,
        }
    }
}

struct Member {
    name: String,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    paused: bool,
}

/// A running etcd cluster of child processes; every member is killed when it is dropped.
pub struct EtcdCluster {
    bin: PathBuf,
    spec: ClusterSpec,
    token: String,
    members: Vec<Member>,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("bin", &self.bin)
            .field("endpoints", &self.endpoints())
            .finish_non_exhaustive()
    }
}

impl EtcdCluster {
    /// Spawns every member of `spec` with `bin`; call [`EtcdCluster::wait_ready`] next.
    pub fn spawn(bin: &Path, spec: ClusterSpec) -> Result<EtcdCluster, String> {
        let ports = free_ports(spec.members * 2)?;
        let tag: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(8)
            .collect();
        let mut members = Vec::with_capacity(spec.members);
        for (index, pair) in ports.chunks(2).enumerate() {
            let dir = tempfile::Builder::new()
                .prefix("hmetcd-cluster-")
                .tempdir()
                .map_err(|err| format!("creating a data directory for etcd: {err}"))?;
            members.push(Member {
                name: format!("m{index}"),
                dir,
                client_port: pair[0],
                peer_port: pair[1],
                child: None,
                paused: false,
            });
        }
        let mut cluster = EtcdCluster {
            bin: bin.to_owned(),
            spec,
            token: format!("hmetcd-{tag}"),
            members,
        };
        for index in 0..cluster.members.len() {
            cluster.start_member(index)?;
        }
        Ok(cluster)
    }

    /// How many members the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The binary the members run.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The client URL of member `index`.
    pub fn endpoint(&self, index: usize) -> String {
        let scheme = if self.spec.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.members[index].client_port)
    }

    /// Every member's client URL, comma-separated.
    pub fn endpoints(&self) -> String {
        (0..self.members.len())
            .map(|index| self.endpoint(index))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn peer_url(&self, index: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[index].peer_port)
    }

    fn start_member(&mut self, index: usize) -> Result<(), String> {
        let initial_cluster = (0..self.members.len())
            .map(|i| format!("{}={}", self.members[i].name, self.peer_url(i)))
            .collect::<Vec<_>>()
            .join(",");
        let client_url = self.endpoint(index);
        let peer_url = self.peer_url(index);
        let member = &self.members[index];
        let (mut command, _log) = MemberCommand {
            bin: &self.bin,
            dir: member.dir.path(),
            name: &member.name,
            client_url: &client_url,
            peer_url: &peer_url,
            initial_cluster: &initial_cluster,
        }
        .command()?;
        command.arg(format!("--initial-cluster-token={}", self.token));
        if let Some(tls) = &self.spec.tls {
            command
                .arg(format!("--cert-file={}", tls.cert_file.display()))
                .arg(format!("--key-file={}", tls.key_file.display()));
            if let Some(ca) = &tls.client_ca_file {
                command
                    .arg(format!("--trusted-ca-file={}", ca.display()))
                    .arg("--client-cert-auth");
            }
        }
        command.args(&self.spec.extra_args);
        let child = command
            .spawn()
            .map_err(|err| format!("starting {}: {err}", self.bin.display()))?;
        let member = &mut self.members[index];
        member.child = Some(child);
        member.paused = false;
        Ok(())
    }

    /// Waits until every running member answers a status request (connecting with
    /// `options`, e.g. TLS) and the cluster has a leader.
    pub async fn wait_ready(
        &mut self,
        options: &ConnectOptions,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        for index in 0..self.members.len() {
            if self.members[index].child.is_none() {
                continue;
            }
            loop {
                self.check_alive(index)?;
                let why = match member_status(&self.endpoint(index), options).await {
                    Ok(status) if status.leader != 0 => break,
                    Ok(_) => "no leader yet".to_owned(),
                    Err(why) => why,
                };
                if Instant::now() >= deadline {
                    return Err(format!(
                        "etcd member {} did not get ready within {timeout:?} ({why}); its log:\n{}",
                        self.endpoint(index),
                        self.log_tail(index)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    fn check_alive(&mut self, index: usize) -> Result<(), String> {
        let member = &mut self.members[index];
        if let Some(child) = member.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                member.child = None;
                return Err(format!(
                    "etcd member {index} exited ({status}); its log:\n{}",
                    self.log_tail(index)
                ));
            }
        }
        Ok(())
    }

    /// The index of the member that is the leader now: the running member that names itself.
    pub async fn leader(&self, options: &ConnectOptions) -> Result<usize, String> {
        let mut why = Vec::new();
        for index in self.running() {
            match member_status(&self.endpoint(index), options).await {
                Ok(status) if status.leader != 0 && status.leader == status.member_id => {
                    return Ok(index)
                }
                Ok(status) => why.push(format!(
                    "{} follows {:x}",
                    self.endpoint(index),
                    status.leader
                )),
                Err(err) => why.push(err),
            }
        }
        Err(format!(
            "no running member is the leader: {}",
            why.join("; ")
        ))
    }

    /// The members whose process runs and is not frozen.
    pub fn running(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].child.is_some() && !self.members[i].paused)
            .collect()
    }

    /// Kills member `index` with SIGKILL, as a crash would.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.members[index].paused = false;
    }

    /// Freezes member `index` (SIGSTOP): its connections stay open but nothing answers, as
    /// when a machine is cut off from the network.
    pub fn freeze(&mut self, index: usize) {
        self.signal(index, rustix::process::Signal::STOP);
        self.members[index].paused = true;
    }

    /// Lets a frozen member `index` run again (SIGCONT).
    pub fn thaw(&mut self, index: usize) {
        self.signal(index, rustix::process::Signal::CONT);
        self.members[index].paused = false;
    }

    fn signal(&self, index: usize, signal: rustix::process::Signal) {
        if let Some(pid) = self.members[index]
            .child
            .as_ref()
            .and_then(|child| rustix::process::Pid::from_raw(child.id() as i32))
        {
            // setpriv execs etcd, so the child's pid is etcd's.
            let _ = rustix::process::kill_process(pid, signal);
        }
    }

    /// Starts a killed member `index` again on its ports with its data.
    pub fn restart(&mut self, index: usize) -> Result<(), String> {
        self.kill(index);
        self.start_member(index)
    }

    /// The last lines of member `index`'s log.
    pub fn log_tail(&self, index: usize) -> String {
        let path = self.members[index].dir.path().join("etcd.log");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|err| format!("(unreadable: {err})"));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
        }
    }
}

/// What one member says about itself.
#[derive(Debug, Clone, Copy)]
pub struct MemberStatus {
    /// Its member id.
    pub member_id: u64,
    /// The member id of the leader it knows, 0 for none.
    pub leader: u64,
}

/// One status request to the single member at `endpoint`.
pub async fn member_status(
    endpoint: &str,
    options: &ConnectOptions,
) -> Result<MemberStatus, String> {
    let options = options
        .clone()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(1));
    let mut client = tokio::time::timeout(
        Duration::from_secs(2),
        etcd_client::Client::connect([endpoint], Some(options)),
    )
    .await
    .map_err(|_| format!("connecting to {endpoint} timed out"))?
    .map_err(|err| format!("connecting to {endpoint}: {err}"))?;
    let status = tokio::time::timeout(Duration::from_secs(2), client.status())
        .await
        .map_err(|_| format!("status of {endpoint} timed out"))?
        .map_err(|err| format!("status of {endpoint}: {err}"))?;
    Ok(MemberStatus {
        member_id: status.header().map(|h| h.member_id()).unwrap_or_default(),
        leader: status.leader(),
    })
}

/// `count` free loopback ports, none handed out before in this process.
fn free_ports(count: usize) -> Result<Vec<u16>, String> {
    (0..count).map(|_| free_port("127.0.0.1")).collect()
}
