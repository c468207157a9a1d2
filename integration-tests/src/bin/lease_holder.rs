//! A process that opens an etcd handle, optionally takes the lock and puts temp keys, prints
//! `ready`, and then sleeps until it is killed: the victim of the fault tests' `kill -9`.
//!
//! ```text
//! lease_holder --endpoint http://127.0.0.1:2379 --options lease_ttl=3s [--lock] [--temp-key KEY]...
//! ```

#![allow(clippy::print_stdout)]

use std::io::Write;

use hmetcd_core::Kvi;
use hmetcd_etcd::EtcdKvs;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut endpoint = String::new();
    let mut options = String::new();
    let mut lock = false;
    let mut temp_keys = Vec::new();
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let mut value = || given.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--endpoint" => endpoint = value()?,
            "--options" => options = value()?,
            "--temp-key" => temp_keys.push(value()?),
            "--lock" => lock = true,
            other => {
                return Err(format!(
                    "unknown flag {other}; flags: --endpoint --options --lock --temp-key KEY"
                )
                .into())
            }
        }
    }
    let kv = EtcdKvs::connect(&endpoint, &options).await?;
    if lock {
        kv.dist_lock().await?;
    }
    for key in &temp_keys {
        kv.temp_key(key).await?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    drop(out);
    // Keeps the lease alive in the background until killed.
    std::future::pending::<()>().await;
    Ok(())
}
