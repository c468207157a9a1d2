//! A worker that takes the distributed lock, does one step of work, releases it, in a loop:
//! the shape of a fleet of services sharing one resource. Run several at once against one
//! etcd and the counter they share ends at exactly workers × iterations.
//!
//! ```text
//! cargo run --features etcd --example lock_worker -- \
//!     --endpoint http://127.0.0.1:2379 --iterations 250 --max-sleep-ms 2 --name w1
//! ```
//!
//! Every step prints one line, `<name> <iteration> enter=<unix ns> leave=<unix ns> counter=<n>`,
//! so a test can check that no two workers ever held the lock at the same time. With
//! `--iterations 0` it runs until killed.

#![allow(clippy::print_stdout)]

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmetcd::Kvi;

struct Args {
    endpoint: String,
    options: String,
    iterations: u64,
    counter: String,
    max_sleep_ms: u64,
    name: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        endpoint: std::env::var("HMETCD_ENDPOINT").unwrap_or_else(|_| "mem:".to_owned()),
        options: String::new(),
        iterations: 100,
        counter: "lock_worker/counter".to_owned(),
        max_sleep_ms: 2,
        name: format!("worker-{}", std::process::id()),
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let value = given
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|err| format!("{flag} {value:?}: {err}"))
        };
        match flag.as_str() {
            "--endpoint" => args.endpoint = value.clone(),
            "--options" => args.options = value.clone(),
            "--iterations" => args.iterations = number()?,
            "--counter" => args.counter = value.clone(),
            "--max-sleep-ms" => args.max_sleep_ms = number()?,
            "--name" => args.name = value.clone(),
            other => {
                return Err(format!(
                    "unknown flag {other}; flags: --endpoint --options --iterations --counter --max-sleep-ms --name"
                ))
            }
        }
    }
    Ok(args)
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let kv = hmetcd::open(&args.endpoint, &args.options).await?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{} ready", args.name)?;
    out.flush()?;
    let mut iteration = 0u64;
    while args.iterations == 0 || iteration < args.iterations {
        iteration += 1;
        kv.dist_lock().await?;
        let enter = unix_nanos();
        let current: u64 = match kv.get(&args.counter).await? {
            Some(text) => text.parse()?,
            None => 0,
        };
        if args.max_sleep_ms > 0 {
            tokio::time::sleep(Duration::from_micros(fastrand::u64(
                0..=args.max_sleep_ms * 1000,
            )))
            .await;
        }
        kv.store(&args.counter, &(current + 1).to_string()).await?;
        let leave = unix_nanos();
        kv.dist_unlock().await?;
        writeln!(
            out,
            "{} {iteration} enter={enter} leave={leave} counter={}",
            args.name,
            current + 1
        )?;
        out.flush()?;
    }
    kv.close().await?;
    writeln!(out, "{} done", args.name)?;
    Ok(())
}
