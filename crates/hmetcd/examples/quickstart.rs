//! The typical flow of a service using hmetcd, step by step.
//!
//! ```text
//! cargo run --example quickstart                                   # in-memory store
//! HMETCD_ENDPOINT=http://127.0.0.1:2379 cargo run --features etcd --example quickstart
//! ```

#![allow(clippy::print_stdout)]

use std::sync::mpsc;
use std::time::Duration;

use hmetcd::{CompareOp, KeyChange, Kvi};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = std::env::var("HMETCD_ENDPOINT").unwrap_or_else(|_| "mem:".to_owned());
    let options = std::env::var("HMETCD_OPTIONS")
        .unwrap_or_else(|_| "prefix=quickstart/,lease_ttl=5s".to_owned());

    let kv = hmetcd::open(&endpoint, &options).await?;
    println!("open       {endpoint} with {options:?}: {kv:?}");

    kv.store("config/mode", "active").await?;
    println!("store      config/mode = active");
    println!(
        "get        config/mode -> {:?}",
        kv.get("config/mode").await?
    );
    println!(
        "get        config/missing -> {:?}",
        kv.get("config/missing").await?
    );

    for node in ["x1000c0s0b0n0", "x1000c0s0b0n1", "x1000c0s1b0n0"] {
        kv.store(&format!("nodes/{node}"), "ready").await?;
    }
    let nodes = kv.get_range("nodes/x1000c0s0", "nodes/x1000c0s0~").await?;
    println!(
        "get_range  nodes/x1000c0s0 ..= nodes/x1000c0s0~ -> {} keys",
        nodes.len()
    );
    for pair in &nodes {
        println!("             {} = {}", pair.key, pair.value);
    }

    let took = kv.tas("nodes/x1000c0s0b0n0", "ready", "busy").await?;
    println!("tas        nodes/x1000c0s0b0n0 ready -> busy: {took}");
    let again = kv.tas("nodes/x1000c0s0b0n0", "ready", "busy").await?;
    println!("tas        again: {again} (the value is no longer \"ready\")");

    let ran_then = kv
        .transaction(
            "config/mode",
            CompareOp::Equal,
            "active",
            "status",
            "serving",
            "status",
            "standby",
        )
        .await?;
    println!("transaction config/mode = active ? status=serving : status=standby -> then ran: {ran_then}");

    kv.temp_key("members/quickstart").await?;
    println!(
        "temp_key   members/quickstart -> {:?} (gone when this handle closes)",
        kv.get("members/quickstart").await?
    );

    kv.dist_timed_lock(Duration::from_secs(5)).await?;
    println!("dist_timed_lock  taken");
    kv.dist_unlock().await?;
    println!("dist_unlock      released");

    let (seen_tx, seen_rx) = mpsc::channel();
    let watcher = kv
        .watch_with_cb(
            "config/mode",
            KeyChange::Put,
            Box::new(move |event| {
                let _ = seen_tx.send(event.clone());
                false
            }),
        )
        .await?;
    kv.store("config/mode", "draining").await?;
    let event =
        tokio::task::spawn_blocking(move || seen_rx.recv_timeout(Duration::from_secs(5))).await??;
    println!(
        "watch_with_cb    saw {:?} = {:?} at revision {}",
        event.key(),
        event.value(),
        event.revision()
    );
    kv.watch_cb_cancel(watcher);

    kv.close().await?;
    match kv.get("config/mode").await {
        Err(err) => println!("close      done; later calls fail: {err}"),
        Ok(value) => return Err(format!("get after close answered {value:?}").into()),
    }
    Ok(())
}
