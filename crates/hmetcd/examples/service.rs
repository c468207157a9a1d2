//! A service the way a fleet runs it: it registers itself with a temp key (gone when the
//! process dies), follows its configuration prefix from a consistent snapshot on (nothing
//! missed between the read and the watch), and does leader-only work as the elected leader,
//! writing only while it still leads (`Compare::leading`), stepping down when the term is lost.
//! Everything it does is logged with `tracing_subscriber`; `RUST_LOG=info,hmetcd=debug` shows
//! one span per store call as well.
//!
//! ```text
//! cargo run --example service                                               # in memory
//! HMETCD_ENDPOINT=http://127.0.0.1:2379 cargo run -p hmetcd --features etcd --example service
//! ```
//!
//! On the in-memory store (no other replica, no operator) it plays both: a second task
//! changes the configuration while the service runs. `HMETCD_SERVICE_SECONDS` (default 3)
//! bounds the run; the service then resigns, closes the handle and exits.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hmetcd::{Compare, Kvi, ListRequest, Op, Txn, WatchEvent};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> hmetcd::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let endpoint = std::env::var("HMETCD_ENDPOINT").unwrap_or_else(|_| "mem:".to_owned());
    let seconds = std::env::var("HMETCD_SERVICE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let kv: Arc<dyn Kvi> = hmetcd::open(&endpoint, "prefix=demo-service/,lease_ttl=5s")
        .await?
        .into();
    let me = format!("instance-{}", std::process::id());
    tracing::info!(%endpoint, %me, "starting");

    // 1. Membership: a temp key, gone within lease_ttl if this process dies.
    kv.store_temp(&format!("members/{me}"), "10.0.0.7:8080")
        .await?;

    // 2. Configuration: read it once, then watch from the revision after that read.
    let config = follow_config(Arc::clone(&kv)).await?;
    if endpoint.starts_with("mem:") {
        tokio::spawn(operator(Arc::clone(&kv)));
    }

    // 3. Leader-only work, for as long as the service runs.
    let lead = lead(Arc::clone(&kv), me.clone());
    if tokio::time::timeout(Duration::from_secs(seconds), lead)
        .await
        .is_err()
    {
        tracing::info!(seconds, "run time is up; shutting down");
    }
    config.abort();
    let members = kv.get_prefix("members/").await?;
    tracing::info!(members = members.len(), "members before leaving");
    kv.close().await
}

/// Applies the configuration under `config/`: what is there now, then every change.
async fn follow_config(kv: Arc<dyn Kvi>) -> hmetcd::Result<tokio::task::JoinHandle<()>> {
    let snapshot = kv.list(ListRequest::prefix("config/")).await?;
    for item in &snapshot.items {
        tracing::info!(key = %item.key, value = %item.value, "config");
    }
    let mut changes = kv
        .watch_prefix_from("config/", snapshot.revision + 1)
        .await?;
    Ok(tokio::spawn(async move {
        while let Some(change) = changes.next().await {
            match change {
                Ok(WatchEvent::Put {
                    key,
                    value,
                    revision,
                }) => {
                    tracing::info!(%key, %value, revision, "config changed")
                }
                Ok(WatchEvent::Delete { key, revision }) => {
                    tracing::info!(%key, revision, "config removed")
                }
                Err(err) => {
                    // Compacted or closed: a real service would read the snapshot again.
                    tracing::warn!(error = %err, "config watch ended");
                    break;
                }
            }
        }
    }))
}

/// Campaigns, and while leading writes a heartbeat that only a current leader can write.
async fn lead(kv: Arc<dyn Kvi>, me: String) {
    loop {
        let leadership = match kv.campaign("leader", &me).await {
            Ok(leadership) => leadership,
            Err(err) => {
                tracing::warn!(error = %err, "campaign failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        tracing::info!(token = leadership.fencing_token(), "leading");
        tokio::select! {
            reason = leadership.lost() => {
                tracing::warn!(%reason, "no longer the leader; campaigning again");
            }
            () = work(&*kv, &leadership) => {
                tracing::warn!("fenced off; campaigning again");
            }
        }
    }
}

/// The leader-only work: each tick a fenced write, refused once the term is over.
async fn work(kv: &dyn Kvi, leadership: &hmetcd::Leadership) {
    for tick in 1u64.. {
        let heartbeat = Txn::new()
            .when(Compare::leading(leadership))
            .then(Op::put("status/heartbeat", tick.to_string()));
        match kv.txn(heartbeat).await {
            Ok(outcome) if outcome.succeeded => {
                tracing::info!(tick, revision = outcome.revision, "leader work done")
            }
            Ok(_) => {
                tracing::warn!(tick, "the write was fenced off: no longer the leader");
                return;
            }
            Err(err) => tracing::warn!(error = %err, tick, "leader work failed; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Stands in for an operator on the in-memory store: changes the configuration.
async fn operator(kv: Arc<dyn Kvi>) {
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _ = kv.store("config/log_level", "debug").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _ = kv.delete("config/log_level").await;
}
