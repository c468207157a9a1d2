//! Finding the Docker engine, and bridging testcontainers' Docker API version to it.
//!
//! testcontainers 0.28 speaks Docker API 1.53 and never negotiates; older engines (Docker
//! 20.10 speaks 1.41) refuse such requests outright. For those, a small proxy on a private
//! unix socket strips the version from each request path (the engine then answers in its
//! own version) and `DOCKER_HOST` points testcontainers at it.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use testcontainers::bollard::API_DEFAULT_VERSION;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// Where the Docker engine listens.
#[derive(Debug, Clone)]
enum Address {
    Unix(PathBuf),
    Tcp(String),
}

impl Address {
    fn from_env() -> Result<Address, String> {
        let host = std::env::var("DOCKER_HOST").unwrap_or_default();
        let host = host.trim();
        if host.is_empty() {
            return Ok(Address::Unix(PathBuf::from("/var/run/docker.sock")));
        }
        if let Some(path) = host.strip_prefix("unix://") {
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = host
            .strip_prefix("tcp://")
            .or_else(|| host.strip_prefix("http://"))
        {
            return Ok(Address::Tcp(addr.trim_end_matches('/').to_owned()));
        }
        Err(format!(
            "DOCKER_HOST={host:?}: only unix:// and tcp:// hosts are supported here"
        ))
    }

    async fn connect(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(match self {
            Address::Unix(path) => Box::new(UnixStream::connect(path).await?),
            Address::Tcp(addr) => Box::new(TcpStream::connect(addr.as_str()).await?),
        })
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// A Docker engine that answered.
#[derive(Debug, Clone)]
pub(crate) struct Engine {
    /// The engine's version, e.g. `20.10.24`.
    pub(crate) version: String,
    /// The engine's API version, e.g. `1.41`.
    pub(crate) api_version: String,
    /// Whether the engine runs on this machine (a unix socket), so that its containers'
    /// owner process ids mean something here.
    pub(crate) local: bool,
}

impl Engine {
    /// Asks the engine at `DOCKER_HOST` (default `/var/run/docker.sock`) for its version, and
    /// bridges testcontainers to it if it speaks an older API. Process-wide, probed once.
    pub(crate) async fn probe() -> Result<Engine, String> {
        static PROBED: tokio::sync::OnceCell<Result<Engine, String>> =
            tokio::sync::OnceCell::const_new();
        PROBED.get_or_init(Self::probe_once).await.clone()
    }

    async fn probe_once() -> Result<Engine, String> {
        let address = Address::from_env()?;
        let response = tokio::time::timeout(Duration::from_secs(5), get_version(&address))
            .await
            .map_err(|_| format!("the Docker engine at {address:?} did not answer within 5s"))?
            .map_err(|err| format!("the Docker engine at {address:?}: {err}"))?;
        let version = json_string(&response, "Version").ok_or_else(|| {
            format!("the Docker engine at {address:?} sent no version: {response}")
        })?;
        let api_version = json_string(&response, "ApiVersion").ok_or_else(|| {
            format!("the Docker engine at {address:?} sent no API version: {response}")
        })?;
        let local = matches!(address, Address::Unix(_));
        if api_older_than_client(&api_version) {
            let socket = start_proxy(address)?;
            // Edition 2021: set_var is safe; this runs before testcontainers makes its client.
            std::env::set_var("DOCKER_HOST", format!("unix://{}", socket.display()));
        }
        Ok(Engine {
            version,
            api_version,
            local,
        })
    }
}

async fn get_version(address: &Address) -> std::io::Result<String> {
    let mut stream = address.connect().await?;
    stream
        .write_all(b"GET /version HTTP/1.0\r\nHost: docker\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response).into_owned();
    if !text.starts_with("HTTP/1.") || !text.contains(" 200 ") {
        return Err(std::io::Error::other(format!(
            "unexpected answer to GET /version: {}",
            text.lines().next().unwrap_or_default()
        )));
    }
    Ok(text)
}

/// The string value of `"name":"value"` in a flat JSON text (enough for `/version`).
fn json_string(text: &str, name: &str) -> Option<String> {
    let start = text.find(&format!("\"{name}\":\""))? + name.len() + 4;
    let len = text[start..].find('"')?;
    Some(text[start..start + len].to_owned())
}

fn api_older_than_client(api_version: &str) -> bool {
    let mut parts = api_version
        .split('.')
        .map(|part| part.parse::<usize>().unwrap_or(0));
    let engine = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    engine
        < (
            API_DEFAULT_VERSION.major_version,
            API_DEFAULT_VERSION.minor_version,
        )
}

/// Starts the version-stripping proxy (once per process) and returns its socket path.
fn start_proxy(upstream: Address) -> Result<PathBuf, String> {
    static PROXY: OnceLock<Result<(tempfile::TempDir, PathBuf), String>> = OnceLock::new();
    let started = PROXY.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("hmetcd-docker-")
            .tempdir()
            .map_err(|err| format!("creating a directory for the Docker API proxy: {err}"))?;
        let socket = dir.path().join("docker.sock");
        let runtime = super::harness_runtime()?;
        let listener = {
            let _entered = runtime.enter();
            UnixListener::bind(&socket)
                .map_err(|err| format!("binding {}: {err}", socket.display()))?
        };
        runtime.spawn(serve(listener, upstream));
        Ok((dir, socket))
    });
    started
        .as_ref()
        .map(|(_, socket)| socket.clone())
        .map_err(Clone::clone)
}

async fn serve(listener: UnixListener, upstream: Address) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let upstream = upstream.clone();
        tokio::spawn(async move {
            if let Ok(engine) = upstream.connect().await {
                // A broken connection is the client's or the engine's to report.
                let _ = relay(client, engine).await;
            }
        });
    }
}

/// Relays one connection: requests with their version stripped, responses unchanged, and
/// everything after an upgrade (attach, BuildKit sessions) unchanged both ways.
async fn relay(client: UnixStream, engine: Box<dyn Stream>) -> std::io::Result<()> {
    let (client_read, mut client_write) = client.into_split();
    let (engine_read, mut engine_write) = tokio::io::split(engine);
    let responses = tokio::spawn(async move {
        let mut engine_read = engine_read;
        let copied = tokio::io::copy(&mut engine_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
        copied
    });
    let mut client_read = BufReader::new(client_read);
    let forwarded = forward_requests(&mut client_read, &mut engine_write).await;
    let _ = engine_write.shutdown().await;
    let _ = responses.await;
    forwarded
}

async fn forward_requests(
    from: &mut (impl AsyncBufRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
) -> std::io::Result<()> {
    loop {
        let Some(head) = read_head(from).await? else {
            return Ok(());
        };
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let mut content_length = 0u64;
        let mut chunked = false;
        let mut upgrade = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let (name, value) = (
                name.trim().to_ascii_lowercase(),
                value.trim().to_ascii_lowercase(),
            );
            match name.as_str() {
                "content-length" => content_length = value.parse().unwrap_or(0),
                "transfer-encoding" => chunked = value.contains("chunked"),
                "upgrade" => upgrade = true,
                _ => {}
            }
        }
        let rewritten = head.replacen(request_line, &strip_version(request_line), 1);
        to.write_all(rewritten.as_bytes()).await?;
        if chunked {
            forward_chunked(from, to).await?;
        } else {
            tokio::io::copy(&mut from.take(content_length), to).await?;
        }
        to.flush().await?;
        if upgrade {
            tokio::io::copy(from, to).await?;
            return Ok(());
        }
    }
}

/// Reads one request head up to and including its blank line; `None` at a clean end.
async fn read_head(from: &mut (impl AsyncBufRead + Unpin)) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let start = head.len();
        if from.read_until(b'\n', &mut head).await? == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        let line = &head[start..];
        if line == b"\r\n" || line == b"\n" {
            if start == 0 {
                head.clear();
                continue;
            }
            return Ok(Some(head));
        }
    }
}

async fn forward_chunked(
    from: &mut (impl AsyncBufRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
) -> std::io::Result<()> {
    loop {
        let mut size_line = Vec::new();
        if from.read_until(b'\n', &mut size_line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        to.write_all(&size_line).await?;
        let size_text = String::from_utf8_lossy(&size_line);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size_text, 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {size_text:?}")))?;
        if size == 0 {
            // Trailers, up to the blank line.
            loop {
                let mut line = Vec::new();
                if from.read_until(b'\n', &mut line).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                to.write_all(&line).await?;
                if line == b"\r\n" || line == b"\n" {
                    return Ok(());
                }
            }
        }
        // The chunk and its CRLF.
        tokio::io::copy(&mut from.take(size + 2), to).await?;
    }
}

/// `POST /v1.53/containers/create HTTP/1.1` -> `POST /containers/create HTTP/1.1`.
fn strip_version(request_line: &str) -> String {
    let mut parts = request_line.splitn(3, ' ');
    let (Some(method), Some(target), Some(protocol)) = (parts.next(), parts.next(), parts.next())
    else {
        return request_line.to_owned();
    };
    let Some(rest) = target.strip_prefix("/v") else {
        return request_line.to_owned();
    };
    let version_len = rest.find('/').unwrap_or(0);
    let version = &rest[..version_len];
    let is_version = !version.is_empty() && version.chars().all(|c| c.is_ascii_digit() || c == '.');
    if !is_version {
        return request_line.to_owned();
    }
    format!("{method} {} {protocol}", &rest[version_len..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_the_api_version() {
        assert_eq!(
            strip_version("POST /v1.53/containers/create?name=x HTTP/1.1"),
            "POST /containers/create?name=x HTTP/1.1"
        );
        assert_eq!(strip_version("GET /_ping HTTP/1.1"), "GET /_ping HTTP/1.1");
        assert_eq!(
            strip_version("GET /volumes HTTP/1.1"),
            "GET /volumes HTTP/1.1"
        );
    }

    #[test]
    fn reads_flat_json() {
        let text = r#"{"Version":"20.10.24","ApiVersion":"1.41","MinAPIVersion":"1.12"}"#;
        assert_eq!(json_string(text, "Version").as_deref(), Some("20.10.24"));
        assert_eq!(json_string(text, "ApiVersion").as_deref(), Some("1.41"));
        assert!(api_older_than_client("1.41"));
        assert!(!api_older_than_client("9.0"));
    }
}
