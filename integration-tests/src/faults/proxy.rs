//! A TCP proxy between one client and etcd that a test can freeze and cut, to stage network
//! faults that touch only that client.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gate {
    /// Bytes flow; when `false`, every connection (new ones included) holds its bytes, the way
    /// a paused server or a silent network looks to the client.
    open: bool,
    /// Grows by one with every cut; connections of an older epoch are closed.
    epoch: u64,
}

/// A TCP proxy on a free loopback port forwarding to one etcd endpoint.
pub struct FaultProxy {
    endpoint: String,
    gate: Arc<watch::Sender<Gate>>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts forwarding to `upstream` (`http://host:port` or `host:port`).
    pub async fn start(upstream: &str) -> Result<FaultProxy, String> {
        let upstream = upstream
            .split(',')
            .next()
            .unwrap_or_default()
            .trim()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|err| format!("fault proxy: binding a loopback port: {err}"))?;
        let local: SocketAddr = listener
            .local_addr()
            .map_err(|err| format!("fault proxy: {err}"))?;
        let (gate, _) = watch::channel(Gate {
            open: true,
            epoch: 0,
        });
        let gate = Arc::new(gate);
        let accept = tokio::spawn(accept_loop(listener, upstream, gate.clone()));
        Ok(FaultProxy {
            endpoint: format!("http://{local}"),
            gate,
            accept,
        })
    }

    /// The endpoint a client behind the proxy connects to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Stops moving bytes; connections stay open and new ones are accepted but held.
    pub fn freeze(&self) {
        self.gate.send_modify(|gate| gate.open = false);
    }

    /// A network cut: closes every open connection and holds new ones until [`Self::resume`].
    pub fn cut(&self) {
        self.gate.send_modify(|gate| {
            gate.open = false;
            gate.epoch += 1;
        });
    }

    /// Lets bytes flow again.
    pub fn resume(&self) {
        self.gate.send_modify(|gate| gate.open = true);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Closes every connection.
        self.gate.send_modify(|gate| gate.epoch += 1);
    }
}

async fn accept_loop(listener: TcpListener, upstream: String, gate: Arc<watch::Sender<Gate>>) {
    while let Ok((client, _)) = listener.accept().await {
        let upstream = upstream.clone();
        let gate = gate.subscribe();
        tokio::spawn(async move {
            let epoch = gate.borrow().epoch;
            let _ = relay(client, upstream, gate, epoch).await;
        });
    }
}

/// Waits until the gate is open; `false` if this connection's epoch ended meanwhile.
async fn wait_open(gate: &mut watch::Receiver<Gate>, epoch: u64) -> bool {
    match gate.wait_for(|now| now.open || now.epoch != epoch).await {
        Ok(now) => now.epoch == epoch,
        Err(_) => false,
    }
}

async fn relay(
    client: TcpStream,
    upstream: String,
    mut gate: watch::Receiver<Gate>,
    epoch: u64,
) -> std::io::Result<()> {
    if !wait_open(&mut gate, epoch).await {
        return Ok(());
    }
    let server = TcpStream::connect(upstream.as_str()).await?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let ended = |mut gate: watch::Receiver<Gate>| async move {
        let _ = gate.wait_for(|now| now.epoch != epoch).await;
    };
    tokio::select! {
        _ = pump(client_read, server_write, gate.clone(), epoch) => {}
        _ = pump(server_read, client_write, gate.clone(), epoch) => {}
        () = ended(gate) => {}
    }
    Ok(())
}

/// Copies one direction, holding each chunk while the gate is closed.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: watch::Receiver<Gate>,
    epoch: u64,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = from.read(&mut buffer).await?;
        if read == 0 {
            return to.shutdown().await;
        }
        if !wait_open(&mut gate, epoch).await {
            return Ok(());
        }
        to.write_all(&buffer[..read]).await?;
    }
}
