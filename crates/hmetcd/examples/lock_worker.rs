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
//!
//! With `--fenced LOCK` it does the same increments under the named lock `LOCK` (a guard from
//! `lock`), but as a service that cannot trust its lock alone would: every write is fenced
//! with the guard's fencing token. The fence key (`--fence-key`, default `fence`) holds the
//! highest token that ever claimed the counter, zero-padded to 20 digits so that etcd's
//! byte-wise comparison is numeric. Each increment
//!
//! 1. takes the lock and claims the fence: one `transaction` that writes its token to the fence
//!    unless the stored token is higher (then the holder is stale: refused);
//! 2. reads the counter, works a little (watching `lost()`), checks `is_held()`;
//! 3. commits: one `transaction` that writes the counter only while the fence still holds its
//!    own token (a newer holder claimed it meanwhile: refused).
//!
//! A refused or failed increment is tried again under a new hold, so transient errors (etcd
//! unreachable, a lost lease) are ridden out, not fatal. The counter's value is
//! `<n> <who>:<iteration>,...`: the count and every increment applied so far, so that a commit
//! whose answer was lost (the link cut mid-request) is recognized and not applied twice.
//! Lines: `<name> commit iter=<i> token=<t> counter=<n>`, `<name> refused iter=<i> token=<t>
//! stage=<claim|commit>`, `<name> lost iter=<i> token=<t> how=<...>`, `<name> error iter=<i>
//! stage=<...> err=<text>`, and `<name> done` at the end.

#![allow(clippy::print_stdout)]

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmetcd::{CompareOp, Kvi, LockGuard};

struct Args {
    endpoint: String,
    options: String,
    iterations: u64,
    counter: String,
    max_sleep_ms: u64,
    name: String,
    /// `--fenced LOCK`: fenced increments under the named lock `LOCK`.
    fenced: Option<String>,
    fence_key: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        endpoint: std::env::var("HMETCD_ENDPOINT").unwrap_or_else(|_| "mem:".to_owned()),
        options: String::new(),
        iterations: 100,
        counter: "lock_worker/counter".to_owned(),
        max_sleep_ms: 2,
        name: format!("worker-{}", std::process::id()),
        fenced: None,
        fence_key: "fence".to_owned(),
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
            "--fenced" => args.fenced = Some(value.clone()),
            "--fence-key" => args.fence_key = value.clone(),
            other => {
                return Err(format!(
                    "unknown flag {other}; flags: --endpoint --options --iterations --counter --max-sleep-ms --name --fenced --fence-key"
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
    if let Some(lock) = args.fenced.clone() {
        return fenced(&args, &*kv, &lock).await;
    }
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

/// One line of output, flushed at once (a test reads the lines as they come).
fn say(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// The counter's value: the count, and who applied each increment (`<who>:<iteration>`).
fn parse_counter(value: Option<&str>) -> Result<(u64, Vec<String>), String> {
    let Some(value) = value else {
        return Ok((0, Vec::new()));
    };
    let (count, applied) = value.split_once(' ').unwrap_or((value, ""));
    let count = count
        .parse::<u64>()
        .map_err(|err| format!("counter value {value:?}: {err}"))?;
    let applied: Vec<String> = applied
        .split(',')
        .filter(|entry| !entry.is_empty())
        .map(str::to_owned)
        .collect();
    if applied.len() as u64 != count {
        return Err(format!(
            "counter value says {count} but lists {} increments",
            applied.len()
        ));
    }
    Ok((count, applied))
}

/// How one fenced attempt at an increment ended.
enum Step {
    /// Committed (or found committed by an earlier attempt whose answer was lost).
    Committed,
    /// Not applied; try again under a new hold.
    Again,
}

async fn fenced(args: &Args, kv: &dyn Kvi, lock: &str) -> Result<(), Box<dyn std::error::Error>> {
    say(&format!("{} ready", args.name))?;
    let mut iteration = 0u64;
    while args.iterations == 0 || iteration < args.iterations {
        iteration += 1;
        // The commit of this iteration that may have been applied although its answer was
        // lost: resolved by the counter's list of applied increments.
        let mut uncertain = false;
        loop {
            let guard = match kv.lock(lock).await {
                Ok(guard) => guard,
                Err(err) => {
                    say(&format!(
                        "{} error iter={iteration} stage=lock err={err}",
                        args.name
                    ))?;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let step = fenced_step(args, kv, &guard, iteration, &mut uncertain).await?;
            // A failed release is the next holder's wait, not this worker's problem: the key
            // goes with the lease at the latest.
            if let Err(err) = guard.unlock().await {
                say(&format!(
                    "{} error iter={iteration} stage=unlock err={err}",
                    args.name
                ))?;
            }
            match step {
                Step::Committed => break,
                Step::Again => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    kv.close().await?;
    say(&format!("{} done", args.name))?;
    Ok(())
}

/// One attempt at increment `iteration` under `guard`: claim the fence, read, work, commit.
async fn fenced_step(
    args: &Args,
    kv: &dyn Kvi,
    guard: &LockGuard,
    iteration: u64,
    uncertain: &mut bool,
) -> Result<Step, Box<dyn std::error::Error>> {
    let name = &args.name;
    let token = guard.fencing_token();
    let fence = format!("{token:020}");
    let me = format!("{name}:{iteration}");
    let refusals = format!("{}.refused/{name}", args.fence_key);
    let error = |stage: &str, err: &dyn std::fmt::Display| {
        say(&format!(
            "{name} error iter={iteration} stage={stage} token={token} err={err}"
        ))
    };
    // 1. Claim: a stored token above ours means a newer holder exists: we are stale.
    let stale = match kv
        .transaction(
            &args.fence_key,
            CompareOp::Greater,
            &fence,
            &refusals,
            &fence,
            &args.fence_key,
            &fence,
        )
        .await
    {
        Ok(stale) => stale,
        Err(err) => {
            error("claim", &err)?;
            return Ok(Step::Again);
        }
    };
    if stale {
        say(&format!(
            "{name} refused iter={iteration} token={token} stage=claim"
        ))?;
        return Ok(Step::Again);
    }
    // 2. Read. Nobody older can write any more; a newer holder would have to claim first.
    let read = match kv.get(&args.counter).await {
        Ok(read) => read,
        Err(err) => {
            error("read", &err)?;
            return Ok(Step::Again);
        }
    };
    let (count, mut applied) = parse_counter(read.as_deref())?;
    if *uncertain {
        if let Some(at) = applied.iter().position(|entry| *entry == me) {
            let counter = at as u64 + 1;
            say(&format!(
                "{name} commit iter={iteration} token={token} counter={counter} confirmed=late"
            ))?;
            return Ok(Step::Committed);
        }
        *uncertain = false;
    }
    if args.max_sleep_ms > 0 {
        let work = tokio::time::sleep(Duration::from_micros(fastrand::u64(
            0..=args.max_sleep_ms * 1000,
        )));
        tokio::select! {
            () = work => {}
            reason = guard.lost() => {
                say(&format!("{name} lost iter={iteration} token={token} how=lost({reason})"))?;
                return Ok(Step::Again);
            }
        }
    }
    if !guard.is_held() {
        say(&format!(
            "{name} lost iter={iteration} token={token} how=is_held"
        ))?;
        return Ok(Step::Again);
    }
    // 3. Commit, fenced: only while the fence still holds our token.
    applied.push(me);
    let counter = count + 1;
    let value = format!("{counter} {}", applied.join(","));
    match kv
        .transaction(
            &args.fence_key,
            CompareOp::Equal,
            &fence,
            &args.counter,
            &value,
            &refusals,
            &fence,
        )
        .await
    {
        Ok(true) => {
            say(&format!(
                "{name} commit iter={iteration} token={token} counter={counter}"
            ))?;
            Ok(Step::Committed)
        }
        Ok(false) => {
            say(&format!(
                "{name} refused iter={iteration} token={token} stage=commit"
            ))?;
            Ok(Step::Again)
        }
        Err(err) => {
            // Maybe applied, maybe not: the next attempt reads the counter and knows.
            *uncertain = true;
            error("commit", &err)?;
            Ok(Step::Again)
        }
    }
}
