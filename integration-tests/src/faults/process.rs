//! Child processes for the fault tests: the `lock_worker` and `leader` examples and the
//! `lease_holder` helper, killed when their guard is dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// How long building an example binary may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// The `lock_worker` example of the `hmetcd` crate, built with the `etcd` feature into the
/// target directory of the running test (once per process). `HMETCD_LOCK_WORKER` names a
/// prebuilt binary instead.
pub fn lock_worker_binary() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_example("lock_worker", "HMETCD_LOCK_WORKER"))
        .clone()
}

/// The `leader` example of the `hmetcd` crate, built like [`lock_worker_binary`];
/// `HMETCD_LEADER` names a prebuilt binary instead.
pub fn leader_binary() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_example("leader", "HMETCD_LEADER"))
        .clone()
}

/// The features the examples are built with: the etcd backend, with the pause points this
/// package turns on (inactive unless a test holds one).
const EXAMPLE_FEATURES: &str = "etcd,hmetcd-etcd/pause-points";

/// Builds the example `example` of `hmetcd` with the `etcd` feature, unless the variable
/// `prebuilt` names a binary.
fn build_example(example: &str, prebuilt: &str) -> Result<PathBuf, String> {
    if let Some(given) = std::env::var_os(prebuilt).filter(|bin| !bin.is_empty()) {
        let given = PathBuf::from(given);
        return if given.is_file() {
            Ok(given)
        } else {
            Err(format!("{prebuilt}={}: no such file", given.display()))
        };
    }
    // The test runs as <target dir>/<profile dir>/deps/<test>-<hash>.
    let exe = std::env::current_exe().map_err(|err| format!("locating the test binary: {err}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("{} is not under <target>/<profile>/deps", exe.display()))?;
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| format!("{} has no target directory", profile_dir.display()))?;
    let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => "dev".to_owned(),
        Some(name) => name.to_owned(),
        None => "dev".to_owned(),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut build = std::process::Command::new(&cargo);
    build
        .current_dir(&workspace)
        // hmetcd-etcd with the features this package builds it with, so that its build is
        // reused rather than made again with other features.
        .args([
            "build",
            "--quiet",
            "-p",
            "hmetcd",
            "--features",
            EXAMPLE_FEATURES,
        ])
        .args(["--example", example, "--message-format=json"])
        .arg("--profile")
        .arg(&profile)
        .arg("--target-dir")
        .arg(target_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!(
        "building the {example} example ({} build -p hmetcd --features {EXAMPLE_FEATURES} --example {example} --profile {profile} --target-dir {})",
        Path::new(&cargo).display(),
        target_dir.display()
    );
    eprintln!("faults: {what}");
    let child = build
        .spawn()
        .map_err(|err| format!("{what}: cannot run cargo: {err}"))?;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    let output = receiver
        .recv_timeout(BUILD_TIMEOUT)
        .map_err(|_| format!("{what}: not done within {BUILD_TIMEOUT:?}"))?
        .map_err(|err| format!("{what}: {err}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "{what}: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let name_field = format!("\"name\":\"{example}\"");
    let executable = stdout
        .lines()
        .filter(|line| line.contains("\"reason\":\"compiler-artifact\""))
        .filter(|line| line.contains(&name_field))
        .find_map(|line| json_string_field(line, "executable"))
        .ok_or_else(|| format!("{what}: cargo named no {example} executable"))?;
    let executable = PathBuf::from(executable);
    if executable.is_file() {
        Ok(executable)
    } else {
        Err(format!(
            "{what}: the {example} binary {} is missing",
            executable.display()
        ))
    }
}

/// The string value of `"field":"..."` in one line of cargo's JSON (paths need no unescaping
/// beyond backslashes).
fn json_string_field(line: &str, field: &str) -> Option<String> {
    let start = line.find(&format!("\"{field}\":\""))? + field.len() + 4;
    let mut value = String::new();
    let mut chars = line[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => value.push(chars.next()?),
            c => value.push(c),
        }
    }
    None
}

/// A child process killed (SIGKILL) and reaped when dropped; its stdout is read line by line.
pub struct ChildProcess {
    name: String,
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl ChildProcess {
    /// Starts `bin` with `args`, named `name` in messages; stderr goes to the test's stderr.
    pub fn spawn(name: &str, bin: &Path, args: &[String]) -> Result<ChildProcess, String> {
        // setpriv makes the kernel kill the child if the test process dies without cleaning up.
        let mut command = match setpriv() {
            Some(setpriv) => {
                let mut command = Command::new(setpriv);
                command.arg("--pdeathsig").arg("KILL").arg(bin);
                command
            }
            None => Command::new(bin),
        };
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|err| format!("starting {name} ({}): {err}", bin.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| format!("{name}: no stdout"))?;
        Ok(ChildProcess {
            name: name.to_owned(),
            child,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The process id.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// The next line of stdout; `None` at its end. Fails after `limit`.
    pub async fn next_line(&mut self, limit: Duration) -> Result<Option<String>, String> {
        tokio::time::timeout(limit, self.lines.next_line())
            .await
            .map_err(|_| format!("{}: no output within {limit:?}", self.name))?
            .map_err(|err| format!("{}: reading stdout: {err}", self.name))
    }

    /// Reads lines until one equals `expected`; fails on end of output or after `limit`.
    pub async fn expect_line(&mut self, expected: &str, limit: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_line(left).await? {
                Some(line) if line == expected => return Ok(()),
                Some(_) => continue,
                None => {
                    let status = self.child.wait().await;
                    return Err(format!(
                        "{} ended ({status:?}) before printing {expected:?}",
                        self.name
                    ));
                }
            }
        }
    }

    /// All remaining stdout lines, then the exit status; fails after `limit`.
    pub async fn finish(&mut self, limit: Duration) -> Result<Vec<String>, String> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_line(left).await? {
                Some(line) => lines.push(line),
                None => break,
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let status = tokio::time::timeout(left, self.child.wait())
            .await
            .map_err(|_| format!("{}: did not exit within {limit:?}", self.name))?
            .map_err(|err| format!("{}: {err}", self.name))?;
        if status.success() {
            Ok(lines)
        } else {
            Err(format!("{} exited with {status}", self.name))
        }
    }

    /// `kill -9` and reap.
    pub async fn kill(&mut self) -> Result<(), String> {
        self.child
            .kill()
            .await
            .map_err(|err| format!("killing {}: {err}", self.name))
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // kill_on_drop sends SIGKILL; tokio reaps the process in the background.
        let _ = self.child.start_kill();
    }
}

fn setpriv() -> Option<PathBuf> {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
}

#[cfg(test)]
mod tests {
    use super::json_string_field;

    #[test]
    fn reads_a_cargo_json_field() {
        let line = r#"{"reason":"compiler-artifact","target":{"name":"lock_worker"},"executable":"/t/debug/examples/lock_worker-ab12","fresh":true}"#;
        assert_eq!(
            json_string_field(line, "executable").as_deref(),
            Some("/t/debug/examples/lock_worker-ab12")
        );
        assert_eq!(json_string_field(line, "missing"), None);
    }
}
