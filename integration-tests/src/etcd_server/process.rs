//! etcd as a child process on free loopback ports, with a temporary data directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::free_port;

/// How long etcd may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a freshly spawned etcd may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running (or stopped, between restarts) etcd child process.
pub(crate) struct EtcdProcess {
    bin: PathBuf,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdProcess {
    /// Starts `bin` and waits until it answers.
    pub(crate) async fn start(bin: &Path) -> Result<EtcdProcess, String> {
        let dir = tempfile::Builder::new()
            .prefix("hmetcd-etcd-")
            .tempdir()
            .map_err(|err| format!("creating a data directory for etcd: {err}"))?;
        let client_port = free_port("127.0.0.1")?;
        let peer_port = free_port("127.0.0.1")?;
        let mut process = EtcdProcess {
            bin: bin.to_owned(),
            dir,
            client_port,
            peer_port,
            child: None,
        };
        process.spawn().await?;
        Ok(process)
    }

    /// The client endpoint.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Stops and starts etcd again on the same ports and data directory.
    pub(crate) async fn restart(&mut self) -> Result<(), String> {
        self.stop().await?;
        self.spawn().await
    }

    /// SIGSTOP (`paused`) or SIGCONT: a paused etcd keeps its sockets but answers nothing.
    pub(crate) fn set_paused(&self, paused: bool) -> Result<(), String> {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .and_then(|pid| rustix::process::Pid::from_raw(pid as i32))
            .ok_or_else(|| "etcd is not running".to_owned())?;
        let signal = if paused {
            rustix::process::Signal::STOP
        } else {
            rustix::process::Signal::CONT
        };
        rustix::process::kill_process(pid, signal)
            .map_err(|err| format!("sending {signal:?} to etcd: {err}"))
    }

    /// The running etcd's process id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Stops etcd; the data directory goes with `self`. An etcd that exited by itself first
    /// has its exit status and the end of its log written to stderr: the log goes with the
    /// directory, and the tests that failed after it only say that the connection was refused.
    pub(crate) async fn stop_for_good(mut self) -> Result<(), String> {
        if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
            let log_path = self.dir.path().join("etcd.log");
            let log = std::fs::read_to_string(&log_path)
                .unwrap_or_else(|err| format!("(unreadable: {err})"));
            eprintln!(
                "etcd for the tests: {} stopped by itself before teardown ({status}); the end \
                 of its log {}:\n{}",
                self.bin.display(),
                log_path.display(),
                super::crash_excerpt(&log, super::CRASH_LOG_LINES)
            );
        }
        self.stop().await
    }

    async fn spawn(&mut self) -> Result<(), String> {
        let client_url = format!("http://127.0.0.1:{}", self.client_port);
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let member = MemberCommand {
            bin: &self.bin,
            dir: self.dir.path(),
            name: "hmetcd-test",
            client_url: &client_url,
            peer_url: &peer_url,
            initial_cluster: &format!("hmetcd-test={peer_url}"),
        };
        let (command, log_path) = member.command()?;
        let mut command = Command::from(command);
        command.kill_on_drop(true);
        let child = command
            .spawn()
            .map_err(|err| format!("starting {}: {err}", self.bin.display()))?;
        self.child = Some(child);
        self.wait_started(&log_path).await
    }

    /// Waits until etcd answers, failing early (with its log) if it exits.
    async fn wait_started(&mut self, log_path: &Path) -> Result<(), String> {
        let endpoint = self.endpoint();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "{} exited ({status}) before answering; its log {}:\n{}",
                        self.bin.display(),
                        log_path.display(),
                        log_tail(log_path)
                    ));
                }
            }
            let why = match super::status_version(&endpoint).await {
                Ok(_) => return Ok(()),
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not answer at {endpoint} within {START_TIMEOUT:?} ({why}); its log:\n{}",
                    self.bin.display(),
                    log_tail(log_path)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; waits for the exit either way.
    async fn stop(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child
            .id()
            .and_then(|pid| rustix::process::Pid::from_raw(pid as i32))
        {
            // An error here means the process is already gone; wait() below reaps it.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            if let Ok(waited) = tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
                return waited
                    .map(drop)
                    .map_err(|err| format!("waiting for etcd to exit: {err}"));
            }
        }
        child
            .kill()
            .await
            .map_err(|err| format!("killing etcd: {err}"))
    }
}

/// One etcd member to start on loopback.
pub(crate) struct MemberCommand<'a> {
    pub(crate) bin: &'a Path,
    /// Holds the data directory and `etcd.log`.
    pub(crate) dir: &'a Path,
    pub(crate) name: &'a str,
    pub(crate) client_url: &'a str,
    pub(crate) peer_url: &'a str,
    /// `name=peer_url,...` of every member of the new cluster.
    pub(crate) initial_cluster: &'a str,
}

impl MemberCommand<'_> {
    /// The member's command line, with stdout and stderr appended to `<dir>/etcd.log` (also
    /// returned), under `setpriv --pdeathsig KILL` where there is one: the kernel kills etcd
    /// if the thread that started it goes away without tearing it down.
    pub(crate) fn command(&self) -> Result<(std::process::Command, PathBuf), String> {
        let log_path = self.dir.join("etcd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|err| format!("opening {}: {err}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|err| format!("opening {}: {err}", log_path.display()))?;
        let mut command = match setpriv() {
            Some(setpriv) => {
                let mut command = std::process::Command::new(setpriv);
                command.arg("--pdeathsig").arg("KILL").arg(self.bin);
                command
            }
            None => std::process::Command::new(self.bin),
        };
        let (client_url, peer_url) = (self.client_url, self.peer_url);
        command
            .arg(format!("--name={}", self.name))
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg("--initial-cluster-state=new")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        Ok((command, log_path))
    }
}

fn setpriv() -> Option<PathBuf> {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
}

/// The last lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|err| format!("(unreadable: {err})"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
