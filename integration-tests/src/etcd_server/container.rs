//! etcd in a container started with testcontainers.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use testcontainers::bollard::query_parameters::{
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use testcontainers::core::{BuildImageOptions, IntoContainerPort};
use testcontainers::runners::{AsyncBuilder, AsyncRunner};
use testcontainers::{ContainerAsync, GenericBuildableImage, GenericImage, ImageExt};

use super::docker::Engine;
use super::free_port;

/// The image used when there is no static etcd binary to build one from.
pub(crate) const DEFAULT_IMAGE: &str = "quay.io/coreos/etcd:v3.5.17";

/// The repository of images built here from a static binary.
const LOCAL_IMAGE: &str = "hmetcd-test-etcd";

/// Where etcd sits in both the official image and the ones built here.
const ETCD_PATH: &str = "/usr/local/bin/etcd";

const CLIENT_PORT: u16 = 2379;

/// Marks the containers this harness starts.
const LABEL: &str = "org.hmetcd.test";

/// The id of the process that started a container, so that a later run can remove the
/// containers of a run that was killed before it could.
const PID_LABEL: &str = "org.hmetcd.test.pid";

/// The host name of the machine (or container) whose process id [`PID_LABEL`] holds.
const HOST_LABEL: &str = "org.hmetcd.test.host";

/// What the container runs.
#[derive(Debug, Clone)]
pub(crate) enum ImageSource {
    /// A `FROM scratch` image built here around this static binary.
    StaticBinary(PathBuf),
    /// An image reference, pulled if absent.
    Image(String),
}

/// A running (or stopped, between restarts) etcd container.
pub(crate) struct EtcdContainer {
    container: ContainerAsync<GenericImage>,
    host_port: u16,
    image: String,
    engine: Engine,
}

impl EtcdContainer {
    /// Builds the image if needed and starts a container from it, its client port published
    /// on a fixed free host port (so a restart keeps the endpoint).
    pub(crate) async fn start(
        engine: &Engine,
        source: ImageSource,
    ) -> Result<EtcdContainer, String> {
        let (image, descriptor) = match &source {
            ImageSource::StaticBinary(bin) => {
                let image = build_image(bin).await?;
                let descriptor = format!("{LOCAL_IMAGE}:{}", image_tag(bin)?);
                (image, format!("{descriptor} built from {}", bin.display()))
            }
            ImageSource::Image(reference) => {
                let (name, tag) = split_reference(reference);
                (GenericImage::new(name, tag), reference.clone())
            }
        };
        if engine.local {
            reap_leftovers().await;
        }
        let host_port = free_port("0.0.0.0")?;
        let mut request = image
            .with_entrypoint(ETCD_PATH)
            .with_exposed_port(CLIENT_PORT.tcp())
            .with_mapped_port(host_port, CLIENT_PORT.tcp());
        // etcd reads every flag from an ETCD_* variable too: a test that sets one (a progress
        // notification interval, say) gets it in the container as in a child process.
        for (name, value) in std::env::vars().filter(|(name, _)| name.starts_with("ETCD_")) {
            request = request.with_env_var(name, value);
        }
        let container = request
            .with_cmd([
                "--name=hmetcd-test",
                "--data-dir=/var/lib/etcd",
                "--listen-client-urls=http://0.0.0.0:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=hmetcd-test=http://127.0.0.1:2380",
                "--initial-cluster-state=new",
            ])
            .with_label(LABEL, "etcd")
            .with_label(PID_LABEL, std::process::id().to_string())
            .with_label(HOST_LABEL, hostname())
            .with_startup_timeout(Duration::from_secs(60))
            .start()
            .await
            .map_err(|err| match &source {
                ImageSource::Image(_) => format!(
                    "starting etcd from image {descriptor}: {err} (no registry reachable? set \
                     HMETCD_ETCD_BIN to a static etcd binary to build a local image instead)"
                ),
                ImageSource::StaticBinary(_) => {
                    format!("starting etcd from image {descriptor}: {err}")
                }
            })?;
        let started = EtcdContainer {
            container,
            host_port,
            image: descriptor,
            engine: engine.clone(),
        };
        match super::wait_ready(&started.endpoint(), Duration::from_secs(30)).await {
            Ok(_) => Ok(started),
            Err(why) => {
                let logs = started.logs(20).await;
                let _ = started.remove().await;
                Err(format!("{why}; container log:\n{logs}"))
            }
        }
    }

    /// The client endpoint on the host.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.host_port)
    }

    /// The image and engine, for the harness's one line of output.
    pub(crate) fn describe(&self) -> String {
        format!(
            "image {}, Docker {} API {}",
            self.image, self.engine.version, self.engine.api_version
        )
    }

    /// Stops the container (SIGTERM, SIGKILL after 10 s) and starts it again; the data
    /// stays in the container's file system and the host port stays mapped.
    /// `docker pause` (`paused`) or `docker unpause`.
    pub(crate) async fn set_paused(&self, paused: bool) -> Result<(), String> {
        let outcome = if paused {
            self.container.pause().await
        } else {
            self.container.unpause().await
        };
        outcome.map_err(|err| format!("pausing ({paused}) the etcd container: {err}"))
    }

    pub(crate) async fn restart(&mut self) -> Result<(), String> {
        self.container
            .stop_with_timeout(Some(10))
            .await
            .map_err(|err| format!("stopping the etcd container: {err}"))?;
        self.container
            .start()
            .await
            .map_err(|err| format!("starting the etcd container again: {err}"))
    }

    /// Removes the container (and its data). A container that stopped by itself (etcd
    /// crashed or exited) first has its exit code and the end of its log written to stderr:
    /// removing it removes the log, and the tests that failed after it only say that the
    /// connection was refused.
    pub(crate) async fn remove(self) -> Result<(), String> {
        if let Ok(false) = self.container.is_running().await {
            let code = self.container.exit_code().await.ok().flatten();
            eprintln!(
                "etcd for the tests: the container ({}) stopped by itself before teardown, exit \
                 code {}; the end of its log:\n{}",
                self.image,
                code.map_or_else(|| "unknown".to_owned(), |code| code.to_string()),
                super::crash_excerpt(&self.logs(usize::MAX).await, super::CRASH_LOG_LINES)
            );
        }
        self.container
            .rm()
            .await
            .map_err(|err| format!("removing the etcd container: {err}"))
    }

    /// The last `lines` lines etcd wrote to stderr.
    async fn logs(&self, lines: usize) -> String {
        let stderr = self.container.stderr_to_vec().await.unwrap_or_default();
        let text = String::from_utf8_lossy(&stderr);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Removes containers left by earlier runs of this harness on this host (same host name, so
/// the same process ids) whose process is gone (killed before it could tear down). Best effort: failures only cost disk space.
async fn reap_leftovers() {
    let Ok(docker) = testcontainers::core::client::docker_client_instance().await else {
        return;
    };
    let filters = HashMap::from([("label".to_owned(), vec![LABEL.to_owned()])]);
    let options = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    let Ok(containers) = docker.list_containers(Some(options)).await else {
        return;
    };
    for container in containers {
        let labels = container.labels.clone().unwrap_or_default();
        if labels.get(HOST_LABEL) != Some(&hostname()) {
            continue;
        }
        let owner = labels
            .get(PID_LABEL)
            .and_then(|pid| pid.parse::<u32>().ok());
        let (Some(id), Some(pid)) = (container.id.as_deref(), owner) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        if docker.remove_container(id, Some(options)).await.is_ok() {
            eprintln!("etcd for the tests: removed container {id} left by process {pid}");
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}

/// Builds (or reuses) `hmetcd-test-etcd:<hash of the binary>`: `FROM scratch` plus `bin`.
async fn build_image(bin: &Path) -> Result<GenericImage, String> {
    check_static(bin)?;
    let tag = image_tag(bin)?;
    GenericBuildableImage::new(LOCAL_IMAGE, &tag)
        .with_dockerfile_string(format!(
            "FROM scratch\nCOPY etcd {ETCD_PATH}\nENTRYPOINT [\"{ETCD_PATH}\"]\n"
        ))
        .with_file(bin, "./etcd")
        .build_image_with(BuildImageOptions::new().with_skip_if_exists(true))
        .await
        .map_err(|err| {
            format!(
                "building image {LOCAL_IMAGE}:{tag} from {}: {err}",
                bin.display()
            )
        })
}

/// A tag that changes when the binary does.
fn image_tag(bin: &Path) -> Result<String, String> {
    let bytes = std::fs::read(bin).map_err(|err| format!("reading {}: {err}", bin.display()))?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    Ok(format!("{:016x}", hasher.finish()))
}

/// A `FROM scratch` image has no dynamic loader: refuse an ELF binary that needs one.
fn check_static(bin: &Path) -> Result<(), String> {
    let bytes = std::fs::read(bin).map_err(|err| format!("reading {}: {err}", bin.display()))?;
    if elf_interpreter(&bytes) {
        return Err(format!(
            "{} is dynamically linked and cannot run in a FROM scratch image; set HMETCD_ETCD_BIN \
             to a static etcd (scripts/install-etcd.sh puts one at /opt/etcd-3.5/etcd)",
            bin.display()
        ));
    }
    Ok(())
}

/// Whether a 64-bit little-endian ELF file has a `PT_INTERP` program header.
fn elf_interpreter(bytes: &[u8]) -> bool {
    let read_u16 = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let read_u32 = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let read_u64 = |at: usize| {
        bytes
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(|b| u64::from_le_bytes(b) as usize)
    };
    if bytes.get(..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (read_u64(0x20), read_u16(0x36), read_u16(0x38))
    else {
        return false;
    };
    (0..phnum).any(|index| read_u32(phoff + index * phentsize) == Some(3))
}

/// `quay.io/coreos/etcd:v3.5.17` -> (`quay.io/coreos/etcd`, `v3.5.17`).
fn split_reference(reference: &str) -> (String, String) {
    match reference.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name.to_owned(), tag.to_owned()),
        _ => (reference.to_owned(), "latest".to_owned()),
    }
}

/// A free port never handed out before in this process, so that two servers of one test
/// binary never share one (the OS may give a just-released port again).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_image_references() {
        assert_eq!(
            split_reference("quay.io/coreos/etcd:v3.5.17"),
            ("quay.io/coreos/etcd".to_owned(), "v3.5.17".to_owned())
        );
        assert_eq!(
            split_reference("localhost:5000/etcd"),
            ("localhost:5000/etcd".to_owned(), "latest".to_owned())
        );
    }
}
