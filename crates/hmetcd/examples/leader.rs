//! A worker that campaigns for leadership, does leader-only work fenced by its term's fencing
//! token, steps down when the term is lost, and campaigns again: the shape of a fleet of
//! replicas of which exactly one may act at a time.
//!
//! ```text
//! cargo run --example leader -- --name w1 --max-hold-ms 1000 --ticks 10     # in memory
//! HMETCD_ENDPOINT=http://127.0.0.1:2379 HMETCD_OPTIONS=lease_ttl=3s \
//!     cargo run --features etcd --example leader -- --name w1                # one of several
//! ```
//!
//! Leader-only work is a fenced write. The epoch key (`--epoch-key`, default `leader/epoch`)
//! holds the highest fencing token that ever claimed the work, zero-padded to 20 digits so
//! that the store's byte-wise comparison is numeric. A new leader first claims it: one
//! `transaction` that writes its token unless a higher one is stored (then a newer leader
//! exists and this one is stale). Every tick of work is then one `transaction` that writes
//! the work key only while the epoch still holds its own token, so a leader that lost its
//! term without noticing yet (paused, cut off) can never overwrite its successor's work.
//!
//! Every event is one line on stdout, `<name> <event> key=value ...`, with `at=<unix ns>`:
//!
//! - `<name> ready`, `<name> campaigning`, `<name> done`;
//! - `<name> leading token=<t> at=<ns>`: this worker's term began;
//! - `<name> tick token=<t> n=<n> at=<ns>`: one fenced write of the term applied;
//! - `<name> stepped-down token=<t> reason=<why> at=<ns>`: the term ended; `<why>` is a
//!   [`LostReason`] (`MaxHold`, `SessionLost`, `Closed`, `KeyDeleted`), `fenced` (a newer
//!   token holds the epoch), `is_leader` (no longer sure it leads) or `resigned` (`--ticks`
//!   reached);
//! - `<name> error stage=<campaign|claim|work|resign> err=<text>`: a failed call, retried.
//!
//! Flags: `--endpoint` (default `HMETCD_ENDPOINT`, else `mem:`), `--options` (default
//! `HMETCD_OPTIONS`, e.g. `lease_ttl=3s,prefix=app/`), `--name`, `--election` (default
//! `leader/election`), `--epoch-key`, `--work-key` (default `leader/work`), `--tick-ms`
//! (default 200), `--max-hold-ms` (a bound on every term; default none), `--ticks` (resign
//! and stop after this many ticks in all; default 0, run until killed).

#![allow(clippy::print_stdout)]

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmetcd::{CompareOp, Kvi, Leadership, LockOptions};

struct Args {
    endpoint: String,
    options: String,
    name: String,
    election: String,
    epoch_key: String,
    work_key: String,
    tick: Duration,
    max_hold: Option<Duration>,
    ticks: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        endpoint: std::env::var("HMETCD_ENDPOINT").unwrap_or_else(|_| "mem:".to_owned()),
        options: std::env::var("HMETCD_OPTIONS").unwrap_or_default(),
        name: format!("leader-{}", std::process::id()),
        election: "leader/election".to_owned(),
        epoch_key: "leader/epoch".to_owned(),
        work_key: "leader/work".to_owned(),
        tick: Duration::from_millis(200),
        max_hold: None,
        ticks: 0,
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
            "--name" => args.name = value.clone(),
            "--election" => args.election = value.clone(),
            "--epoch-key" => args.epoch_key = value.clone(),
            "--work-key" => args.work_key = value.clone(),
            "--tick-ms" => args.tick = Duration::from_millis(number()?),
            "--max-hold-ms" => args.max_hold = Some(Duration::from_millis(number()?)),
            "--ticks" => args.ticks = number()?,
            other => {
                return Err(format!(
                    "unknown flag {other}; flags: --endpoint --options --name --election \
                     --epoch-key --work-key --tick-ms --max-hold-ms --ticks"
                ))
            }
        }
    }
    Ok(args)
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_nanos())
        .unwrap_or(0)
}

/// One line of output, flushed at once (a test reads the lines as they come).
fn say(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// How a term ended.
enum TermEnd {
    /// The term is over for this reason; campaign again.
    SteppedDown(String),
    /// `--ticks` reached: resign and stop.
    Finished,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let kv = hmetcd::open(&args.endpoint, &args.options).await?;
    say(&format!("{} ready", args.name))?;
    let mut ticks = 0u64;
    loop {
        say(&format!("{} campaigning", args.name))?;
        let mut options = LockOptions::new();
        if let Some(max_hold) = args.max_hold {
            options = options.max_hold(max_hold);
        }
        let leadership = match kv.campaign_with(&args.election, &args.name, options).await {
            Ok(leadership) => leadership,
            Err(err) => {
                say(&format!("{} error stage=campaign err={err}", args.name))?;
                tokio::time::sleep(args.tick).await;
                continue;
            }
        };
        let token = leadership.fencing_token();
        say(&format!(
            "{} leading token={token} at={}",
            args.name,
            unix_nanos()
        ))?;
        let end = lead(&args, &*kv, &leadership, &mut ticks).await?;
        let reason = match &end {
            TermEnd::SteppedDown(reason) => reason.as_str(),
            TermEnd::Finished => "resigned",
        };
        // Said before resigning, so that the line comes before the successor's term.
        say(&format!(
            "{} stepped-down token={token} reason={reason} at={}",
            args.name,
            unix_nanos()
        ))?;
        // Resigning a lost leadership is Ok and releases nobody; a live one hands over now.
        if let Err(err) = leadership.resign().await {
            say(&format!("{} error stage=resign err={err}", args.name))?;
        }
        if let TermEnd::Finished = end {
            break;
        }
    }
    kv.close().await?;
    say(&format!("{} done", args.name))?;
    Ok(())
}

/// One term: claim the epoch, then a fenced write every tick until the term is lost, the
/// epoch is taken by a newer token, or `--ticks` is reached.
async fn lead(
    args: &Args,
    kv: &dyn Kvi,
    leadership: &Leadership,
    ticks: &mut u64,
) -> std::io::Result<TermEnd> {
    let name = &args.name;
    let token = leadership.fencing_token();
    let fence = format!("{token:020}");
    let refusals = format!("{}.refused/{name}", args.epoch_key);
    // Claim: a stored token above ours means a newer leader exists: we are stale.
    let stale = loop {
        match kv
            .transaction(
                &args.epoch_key,
                CompareOp::Greater,
                &fence,
                &refusals,
                &fence,
                &args.epoch_key,
                &fence,
            )
            .await
        {
            Ok(stale) => break stale,
            Err(err) => say(&format!("{name} error stage=claim err={err}"))?,
        }
        if !leadership.is_leader() {
            return Ok(TermEnd::SteppedDown("is_leader".to_owned()));
        }
        tokio::time::sleep(args.tick).await;
    };
    if stale {
        return Ok(TermEnd::SteppedDown("fenced".to_owned()));
    }
    let mut lost = leadership.lost();
    let mut n = 0u64;
    loop {
        tokio::select! {
            reason = &mut lost => return Ok(TermEnd::SteppedDown(format!("{reason:?}"))),
            () = tokio::time::sleep(args.tick) => {}
        }
        if !leadership.is_leader() {
            return Ok(TermEnd::SteppedDown("is_leader".to_owned()));
        }
        n += 1;
        let work = format!("{name} token={token} n={n}");
        // The work, fenced: only while the epoch still holds our token.
        match kv
            .transaction(
                &args.epoch_key,
                CompareOp::Equal,
                &fence,
                &args.work_key,
                &work,
                &refusals,
                &fence,
            )
            .await
        {
            Ok(true) => {
                say(&format!(
                    "{name} tick token={token} n={n} at={}",
                    unix_nanos()
                ))?;
                *ticks += 1;
                if args.ticks > 0 && *ticks >= args.ticks {
                    return Ok(TermEnd::Finished);
                }
            }
            Ok(false) => return Ok(TermEnd::SteppedDown("fenced".to_owned())),
            Err(err) => say(&format!("{name} error stage=work err={err}"))?,
        }
    }
}
