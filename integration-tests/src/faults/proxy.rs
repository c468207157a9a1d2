//! A TCP proxy between one client and etcd that a test can freeze and cut, to stage network
//! faults that touch only that client, and that can deliver what a client sent after the
//! client gave up on it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

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
    /// The last cut strands its connections instead of closing them (see
    /// [`FaultProxy::strand`]).
    strands: bool,
    /// New connections are closed as soon as they are accepted (see [`FaultProxy::refuse`]).
    refuses: bool,
}

/// The server side of a stranded connection and the bytes the client had sent on it that
/// never reached the server.
struct Stranded {
    server: tokio::net::tcp::OwnedWriteHalf,
    held: Vec<u8>,
}

/// A TCP proxy on a free loopback port forwarding to one etcd endpoint.
pub struct FaultProxy {
    endpoint: String,
    gate: Arc<watch::Sender<Gate>>,
    stranded: Arc<Mutex<Vec<Stranded>>>,
    /// Connections accepted so far, refused ones included.
    accepted: Arc<AtomicU64>,
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
            strands: false,
            refuses: false,
        });
        let gate = Arc::new(gate);
        let stranded = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicU64::new(0));
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream,
            gate.clone(),
            stranded.clone(),
            accepted.clone(),
        ));
        Ok(FaultProxy {
            endpoint: format!("http://{local}"),
            gate,
            stranded,
            accepted,
            accept,
        })
    }

    /// The endpoint a client behind the proxy connects to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// How many connections clients have opened through the proxy so far, those closed at once
    /// by [`Self::refuse`] included: how hard a client tries to reconnect.
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
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
            gate.strands = false;
            gate.refuses = false;
        });
    }

    /// A member that is down: closes every open connection, and closes each new one as soon as
    /// it is accepted, until [`Self::resume`]. Unlike [`Self::cut`], where new connections
    /// hang, every request fails at once with a transport error.
    pub fn refuse(&self) {
        self.gate.send_modify(|gate| {
            gate.open = false;
            gate.epoch += 1;
            gate.strands = false;
            gate.refuses = true;
        });
    }

    /// Closes the client's side of every open connection but keeps what the client sent on
    /// them that has not reached etcd (held since [`Self::freeze`]) and their server side
    /// open, for [`Self::deliver_stranded`]: requests the client counts failed that a router
    /// or a paused member still holds. New connections flow at once.
    pub fn strand(&self) {
        self.gate.send_modify(|gate| {
            gate.open = true;
            gate.epoch += 1;
            gate.strands = true;
        });
    }

    /// Delivers what stranded connections held to etcd, and keeps their server side open (so
    /// that etcd sees neither a reset nor a close that could cancel the requests). Returns
    /// how many bytes it delivered.
    pub async fn deliver_stranded(&self) -> std::io::Result<usize> {
        let stranded =
            std::mem::take(&mut *self.stranded.lock().unwrap_or_else(PoisonError::into_inner));
        let mut delivered = 0;
        let mut kept = Vec::with_capacity(stranded.len());
        for mut connection in stranded {
            connection.server.write_all(&connection.held).await?;
            delivered += connection.held.len();
            connection.held.clear();
            kept.push(connection);
        }
        self.stranded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(kept);
        Ok(delivered)
    }

    /// Lets bytes flow again.
    pub fn resume(&self) {
        self.gate.send_modify(|gate| {
            gate.open = true;
            gate.refuses = false;
        });
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Closes every connection.
        self.gate.send_modify(|gate| gate.epoch += 1);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: String,
    gate: Arc<watch::Sender<Gate>>,
    stranded: Arc<Mutex<Vec<Stranded>>>,
    accepted: Arc<AtomicU64>,
) {
    while let Ok((client, _)) = listener.accept().await {
        accepted.fetch_add(1, Ordering::SeqCst);
        if gate.borrow().refuses {
            drop(client);
            continue;
        }
        let upstream = upstream.clone();
        let gate = gate.subscribe();
        let stranded = stranded.clone();
        tokio::spawn(async move {
            let epoch = gate.borrow().epoch;
            let _ = relay(client, upstream, gate, epoch, stranded).await;
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

/// Relays one connection until either side closes it or its epoch ends; if the epoch ended by
/// [`FaultProxy::strand`], its server side and what it held go to `stranded`.
async fn relay(
    client: TcpStream,
    upstream: String,
    mut gate: watch::Receiver<Gate>,
    epoch: u64,
    stranded: Arc<Mutex<Vec<Stranded>>>,
) -> std::io::Result<()> {
    if !wait_open(&mut gate, epoch).await {
        return Ok(());
    }
    let server = TcpStream::connect(upstream.as_str()).await?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Either pump ending ends the connection: the client's side closes when this returns.
    // The client-to-server pump first: when an epoch ends by `strand`, both see it in the
    // same poll, and only that pump keeps what the connection held.
    tokio::select! {
        biased;
        () = pump_up(client_read, server_write, gate.clone(), epoch, stranded) => {}
        _ = pump(server_read, client_write, gate, epoch) => {}
    }
    Ok(())
}

/// Copies from the client to the server, holding what the client sends while the gate is
/// closed. When the epoch ends by a strand, puts the server side and the held bytes in
/// `stranded` before the client's side closes (so that a client that sees its connection go
/// finds them there).
async fn pump_up(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: watch::Receiver<Gate>,
    epoch: u64,
    stranded: Arc<Mutex<Vec<Stranded>>>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    let mut held = Vec::new();
    let mut client_open = true;
    loop {
        let now = *gate.borrow_and_update();
        if now.epoch != epoch {
            if now.strands {
                stranded
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Stranded { server: to, held });
            }
            return;
        }
        if now.open && !held.is_empty() {
            if to.write_all(&held).await.is_err() {
                return;
            }
            held.clear();
        }
        if !client_open && held.is_empty() {
            let _ = to.shutdown().await;
            return;
        }
        tokio::select! {
            read = from.read(&mut buffer), if client_open => match read {
                Ok(0) | Err(_) => client_open = false,
                Ok(read) => held.extend_from_slice(&buffer[..read]),
            },
            changed = gate.changed() => if changed.is_err() {
                return;
            },
        }
    }
}

/// Copies from the server to the client, holding each chunk while the gate is closed.
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
