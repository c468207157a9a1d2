//! Leader failover across processes: three `leader` workers (the example of `hmetcd`)
//! campaign in one election on etcd with `lease_ttl=3s`; the current leader is killed with
//! SIGKILL, twice. From the workers' own lines (`leading`, `tick`, `stepped-down`, each with
//! its fencing token and a wall-clock time) and from an `observe` stream, the test checks
//! that there is at most one leader at any instant (terms ordered by fencing token never
//! overlap in time) and that the next worker leads within `lease_ttl + 2 s` of the kill.
//! Every measured handover time is printed to stderr.
//!
//! A second etcd test revokes a leader's lease from outside (what its expiry does): the term
//! ends with `SessionLost`, the next candidate leads at once, and the handle campaigns again
//! on a new lease.
//!
//! Named `leader_failover::<backend>::<what it proves>`; the memory test runs one worker on
//! `mem:` through terms bounded by `max_hold`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use hmetcd_core::{Error, Kvi, LockOptions, LostReason};
use integration_tests::backends::EtcdOpener;
use integration_tests::etcd_server::{raw_client, EtcdServer};
use integration_tests::faults::process::{leader_binary, ChildProcess};
use integration_tests::faults::runner::{run_fault_binary, EtcdTrials};
use integration_tests::{run_limited, TestStore};
use libtest_mimic::{Failed, Trial};
use tokio::sync::mpsc;

/// The workers' lease TTL.
const LEASE_TTL: Duration = Duration::from_secs(3);
/// What the contract allows beyond `lease_ttl` for the next leader to lead after a crash.
const HANDOVER_SLACK: Duration = Duration::from_secs(2);
/// The election the workers campaign in (under the test's prefix).
const ELECTION: &str = "leader/election";
/// How many workers run.
const WORKERS: usize = 3;

fn main() -> ExitCode {
    // The example is built (once) before a test's time starts.
    let trials = vec![Trial::test(
        "leader_failover::mem::a_worker_steps_down_at_max_hold_and_rejoins",
        || {
            let bin = leader_binary().map_err(Failed::from)?;
            run_limited(2, Duration::from_secs(60), worker_on_mem(bin))
        },
    )];
    run_fault_binary("leader_failover", trials, etcd_trials)
}

fn etcd_trials(server: &EtcdServer) -> Vec<Trial> {
    let mut trials = EtcdTrials::new("leader_failover", server);
    let endpoints = server.endpoints().to_owned();
    let store = TestStore::new(Arc::new(EtcdOpener::on(server)));
    trials.add_future(
        "kill_9_of_the_leader_hands_over_within_lease_ttl_plus_2s",
        90,
        move || {
            let bin = leader_binary();
            Box::pin(async move { failover(ok(bin), endpoints, store).await })
        },
    );
    trials.add(
        "a_revoked_lease_ends_the_term_with_session_lost_and_the_handle_campaigns_again",
        60,
        |e, s| Box::pin(revoked_lease(e, s)),
    );
    trials.into_trials()
}

fn ok<T>(outcome: Result<T, String>) -> T {
    outcome.unwrap_or_else(|why| panic!("{why}"))
}

fn unix_nanos() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_nanos() as i128)
        .unwrap_or(0)
}

fn secs(nanos: i128) -> String {
    format!("{:.2} s", nanos as f64 / 1e9)
}

/// One line of a worker: `<who> <kind> key=value ...`.
#[derive(Debug, Clone)]
struct Line {
    who: String,
    kind: String,
    fields: BTreeMap<String, String>,
}

impl Line {
    fn parse(line: &str) -> Line {
        let mut words = line.split(' ');
        let who = words.next().unwrap_or_default().to_owned();
        let kind = words.next().unwrap_or_default().to_owned();
        let fields = words
            .filter_map(|word| word.split_once('='))
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        Line { who, kind, fields }
    }

    fn number(&self, field: &str) -> i128 {
        self.fields
            .get(field)
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no number {field}= in {self:?}"))
    }

    fn token(&self) -> i64 {
        self.number("token") as i64
    }

    fn at(&self) -> i128 {
        self.number("at")
    }
}

/// One term as the workers' lines show it: who led with which token, from `start` to the
/// last line of the term (`end`), in unix nanoseconds.
#[derive(Debug, Clone)]
struct Term {
    who: String,
    token: i64,
    start: i128,
    end: i128,
}

/// The terms that `lines` show, in the order they began; checks that every tick and
/// step-down belongs to its worker's current term.
fn terms(lines: &[Line]) -> Vec<Term> {
    let mut terms: Vec<Term> = Vec::new();
    let mut current: BTreeMap<String, usize> = BTreeMap::new();
    for line in lines {
        match line.kind.as_str() {
            "leading" => {
                current.insert(line.who.clone(), terms.len());
                terms.push(Term {
                    who: line.who.clone(),
                    token: line.token(),
                    start: line.at(),
                    end: line.at(),
                });
            }
            "tick" | "stepped-down" => {
                let index = *current
                    .get(&line.who)
                    .unwrap_or_else(|| panic!("{line:?} outside a term"));
                let term = &mut terms[index];
                assert_eq!(term.token, line.token(), "{line:?} in the term {term:?}");
                term.end = term.end.max(line.at());
                if line.kind == "stepped-down" {
                    current.remove(&line.who);
                }
            }
            _ => {}
        }
    }
    terms.sort_by_key(|term| term.start);
    terms
}

/// Checks that no two terms overlap and that tokens grow from term to term.
fn assert_one_leader_at_a_time(terms: &[Term]) {
    for pair in terms.windows(2) {
        assert!(
            pair[0].token < pair[1].token,
            "fencing tokens out of order: {pair:?}"
        );
        assert!(
            pair[0].end < pair[1].start,
            "two leaders at once: {:?} acted until {} after {:?} began",
            pair[0],
            secs(pair[0].end - pair[1].start),
            pair[1]
        );
    }
}

/// One worker on `mem:` with terms bounded by `max_hold`: it leads, ticks, steps down with
/// `MaxHold`, campaigns again and leads with a larger token, and resigns after its ticks.
async fn worker_on_mem(bin: PathBuf) {
    let args: Vec<String> = [
        "--endpoint",
        "mem:",
        "--name",
        "solo",
        "--max-hold-ms",
        "500",
        "--tick-ms",
        "100",
        "--ticks",
        "10",
    ]
    .map(str::to_owned)
    .to_vec();
    let mut worker = ok(ChildProcess::spawn("leader solo", &bin, &args));
    let output = ok(worker.finish(Duration::from_secs(30)).await);
    let lines: Vec<Line> = output.iter().map(|line| Line::parse(line)).collect();
    let kinds: Vec<&str> = lines.iter().map(|line| line.kind.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"ready"), "{output:#?}");
    assert_eq!(kinds.last(), Some(&"done"), "{output:#?}");
    let ended: Vec<&str> = lines
        .iter()
        .filter(|line| line.kind == "stepped-down")
        .map(|line| line.fields["reason"].as_str())
        .collect();
    assert!(
        ended.len() >= 2 && ended[..ended.len() - 1].iter().all(|why| *why == "MaxHold"),
        "terms should end by max_hold, the last by resigning: {ended:?}"
    );
    assert_eq!(ended.last(), Some(&"resigned"));
    let terms = terms(&lines);
    assert_eq!(terms.len(), ended.len(), "{output:#?}");
    assert_one_leader_at_a_time(&terms);
    let ticks = lines.iter().filter(|line| line.kind == "tick").count();
    assert_eq!(ticks, 10, "{output:#?}");
}

/// A worker whose lines a reader task forwards; killed by pid.
struct Worker {
    name: String,
    pid: u32,
}

impl Worker {
    fn kill(&self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// Starts worker `name` and a task that sends each of its lines to `lines`.
fn start_worker(
    bin: &Path,
    name: &str,
    endpoints: &str,
    options: &str,
    lines: mpsc::UnboundedSender<Line>,
) -> Worker {
    let args: Vec<String> = [
        "--endpoint",
        endpoints,
        "--options",
        options,
        "--name",
        name,
        "--election",
        ELECTION,
        "--tick-ms",
        "100",
    ]
    .map(str::to_owned)
    .to_vec();
    let mut child = ok(ChildProcess::spawn(&format!("leader {name}"), bin, &args));
    let pid = child
        .id()
        .unwrap_or_else(|| panic!("leader {name} has no pid"));
    tokio::spawn(async move {
        while let Ok(Some(line)) = child.next_line(Duration::from_secs(3600)).await {
            if lines.send(Line::parse(&line)).is_err() {
                break;
            }
        }
    });
    Worker {
        name: name.to_owned(),
        pid,
    }
}

/// The lines of every worker so far, and a way to wait for one.
struct Lines {
    receiver: mpsc::UnboundedReceiver<Line>,
    seen: Vec<Line>,
}

impl Lines {
    /// Waits up to `limit` for a line that `wanted` accepts, and returns it.
    async fn wait_for(
        &mut self,
        limit: Duration,
        what: &str,
        wanted: impl Fn(&Line) -> bool,
    ) -> Line {
        if let Some(line) = self.seen.iter().find(|line| wanted(line)) {
            return line.clone();
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let line = match tokio::time::timeout_at(deadline, self.receiver.recv()).await {
                Ok(Some(line)) => line,
                Ok(None) => panic!("{what}: every worker ended"),
                Err(_) => panic!("{what}: not within {limit:?}; lines: {:#?}", self.seen),
            };
            self.seen.push(line.clone());
            if wanted(&line) {
                return line;
            }
        }
    }

    /// Takes in every line that has arrived.
    fn drain(&mut self) {
        while let Ok(line) = self.receiver.try_recv() {
            self.seen.push(line);
        }
    }
}

/// Kills the current leader and waits for the next; returns the new leader's `leading` line
/// and the handover time in nanoseconds.
async fn kill_and_wait_for_the_next(
    workers: &[Worker],
    leading: &Line,
    lines: &mut Lines,
) -> (Line, i128) {
    let victim = workers
        .iter()
        .find(|worker| worker.name == leading.who)
        .unwrap_or_else(|| panic!("no worker {}", leading.who));
    let token = leading.token();
    lines
        .wait_for(Duration::from_secs(5), "the leader's second tick", |line| {
            line.kind == "tick" && line.token() == token && line.number("n") >= 2
        })
        .await;
    let killed = unix_nanos();
    victim.kill();
    let limit = LEASE_TTL + HANDOVER_SLACK + Duration::from_secs(5);
    let next = lines
        .wait_for(limit, "the next leader after the kill", |line| {
            line.kind == "leading" && line.token() > token
        })
        .await;
    assert_ne!(next.who, leading.who, "the killed worker led again");
    let handover = next.at() - killed;
    eprintln!(
        "leader_failover: {} (token {token}) killed; {} leads (token {}) {} later",
        leading.who,
        next.who,
        next.token(),
        secs(handover)
    );
    (next, handover)
}

/// What `observe` yielded, and when (unix nanoseconds): the leader's value or `None`.
type Observed = (i128, Option<String>);

async fn failover(bin: PathBuf, endpoints: String, store: TestStore) {
    let options = format!("lease_ttl=3s,prefix={}", store.prefix());
    let observer = store.open().await;
    let mut stream = observer.observe(ELECTION).await.expect("observe");
    let observed: Arc<Mutex<Vec<Observed>>> = Arc::default();
    let recorder = tokio::spawn({
        let observed = Arc::clone(&observed);
        async move {
            while let Some(item) = stream.next().await {
                let leader = item.expect("observe item").map(|leader| leader.value);
                observed.lock().unwrap().push((unix_nanos(), leader));
            }
        }
    });
    let (sender, receiver) = mpsc::unbounded_channel();
    let mut lines = Lines {
        receiver,
        seen: Vec::new(),
    };
    let mut workers = Vec::new();
    for index in 1..=WORKERS {
        let name = format!("w{index}");
        workers.push(start_worker(
            &bin,
            &name,
            &endpoints,
            &options,
            sender.clone(),
        ));
        // Each worker queues before the next starts, so the order of terms is known.
        lines
            .wait_for(Duration::from_secs(20), "a worker campaigning", |line| {
                line.who == name && line.kind == "campaigning"
            })
            .await;
    }
    drop(sender);
    let first = lines
        .wait_for(Duration::from_secs(10), "the first leader", |line| {
            line.kind == "leading"
        })
        .await;
    let mut handovers = Vec::new();
    let mut leading = first.clone();
    for _ in 1..WORKERS {
        let (next, handover) = kill_and_wait_for_the_next(&workers, &leading, &mut lines).await;
        handovers.push(handover);
        leading = next;
    }
    let last = leading.token();
    lines
        .wait_for(Duration::from_secs(5), "the last leader's ticks", |line| {
            line.kind == "tick" && line.token() == last && line.number("n") >= 3
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    lines.drain();
    for worker in &workers {
        worker.kill();
    }

    let terms = terms(&lines.seen);
    eprintln!("leader_failover: terms {terms:?}");
    assert_eq!(terms.len(), WORKERS, "one term per worker: {terms:?}");
    assert_one_leader_at_a_time(&terms);
    assert_eq!(
        terms
            .iter()
            .map(|term| term.who.as_str())
            .collect::<Vec<_>>(),
        ["w1", "w2", "w3"],
        "workers led in the order they campaigned"
    );
    let bound = (LEASE_TTL + HANDOVER_SLACK).as_nanos() as i128;
    for handover in &handovers {
        assert!(
            *handover <= bound,
            "a handover took {}, more than lease_ttl + 2 s",
            secs(*handover)
        );
    }
    let trouble: Vec<&Line> = lines
        .seen
        .iter()
        .filter(|line| line.kind == "error" || line.kind == "stepped-down")
        .collect();
    assert!(
        trouble.is_empty(),
        "no worker should fail or step down: {trouble:?}"
    );

    recorder.abort();
    let observed = observed.lock().unwrap().clone();
    let leaders: Vec<Option<&str>> = observed
        .iter()
        .map(|(_, leader)| leader.as_deref())
        .collect();
    let expected = [None, Some("w1"), Some("w2"), Some("w3")];
    assert!(
        leaders == expected || leaders == expected[1..],
        "observe: {leaders:?}"
    );
    for term in &terms[1..] {
        let (seen_at, _) = observed
            .iter()
            .find(|(_, leader)| leader.as_deref() == Some(term.who.as_str()))
            .unwrap_or_else(|| panic!("observe never saw {}", term.who));
        let lag = seen_at - term.start;
        eprintln!(
            "leader_failover: observe saw {} lead {} after its own line",
            term.who,
            secs(lag)
        );
        assert!(
            lag.abs() < Duration::from_secs(2).as_nanos() as i128,
            "observe saw {} lead {} away from its term's start",
            term.who,
            secs(lag)
        );
    }
    eprintln!(
        "leader_failover: handover after kill -9 with lease_ttl=3s: {}",
        handovers
            .iter()
            .map(|handover| secs(*handover))
            .collect::<Vec<_>>()
            .join(", ")
    );
    observer.close().await.expect("close");
}

/// A leader's lease revoked from outside: its `lost()` says `SessionLost` within
/// `lease_ttl + 2 s`, it no longer leads and cannot proclaim, a waiting candidate leads at
/// once (etcd deleted the key with the lease), and the handle campaigns again on a new lease.
async fn revoked_lease(endpoints: String, store: TestStore) {
    let name = "leader/revoked";
    let mut raw = ok(raw_client(&endpoints).await);
    let leader = store.open_with("lease_ttl=3s").await.expect("open");
    let waiter: Arc<dyn Kvi> = Arc::from(store.open().await);
    let mut leadership = leader.campaign(name, "first").await.expect("campaign");
    let token = leadership.fencing_token();
    let key = leader
        .leader(name)
        .await
        .expect("leader()")
        .expect("a leader")
        .key;
    let stored = format!("{}{key}", store.prefix());
    let answer = raw.get(stored.as_str(), None).await.expect("raw get");
    let lease = answer.kvs().first().expect("the leader's key").lease();
    assert_ne!(lease, 0, "the leader's key has no lease");
    let waiting = tokio::spawn({
        let waiter = Arc::clone(&waiter);
        async move {
            let options = LockOptions::new().timeout(Duration::from_secs(30));
            let leadership = waiter.campaign_with(name, "second", options).await?;
            Ok::<_, Error>((leadership, tokio::time::Instant::now()))
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the waiter led beside the leader");
    let lost = leadership.lost();
    raw.lease_revoke(lease).await.expect("raw lease_revoke");
    let revoked = tokio::time::Instant::now();
    let limit = LEASE_TTL + HANDOVER_SLACK;
    let (next, led) = tokio::time::timeout(limit, waiting)
        .await
        .unwrap_or_else(|_| panic!("the waiter did not lead within {limit:?} of the revoke"))
        .expect("the waiter's task")
        .expect("the waiter's campaign");
    let reason = tokio::time::timeout(limit, lost)
        .await
        .unwrap_or_else(|_| panic!("lost() did not resolve within {limit:?} of the revoke"));
    let lost_after = revoked.elapsed();
    eprintln!(
        "leader_failover: lease revoked; the waiter led {:.2} s later; lost() said {reason:?} within {:.2} s",
        (led - revoked).as_secs_f64(),
        lost_after.as_secs_f64()
    );
    assert!(
        led - revoked < HANDOVER_SLACK,
        "the waiter led {:?} after the revoke",
        led - revoked
    );
    assert_eq!(reason, LostReason::SessionLost);
    assert!(!leadership.is_leader(), "a leader whose lease was revoked");
    assert!(next.fencing_token() > token);
    match leadership.proclaim("stale").await {
        Err(Error::NotLeader { election, .. }) => assert_eq!(election, name),
        other => panic!("proclaim after the revoke should be NotLeader, got {other:?}"),
    }
    let now = waiter
        .leader(name)
        .await
        .expect("leader()")
        .expect("a leader");
    assert_eq!(now.value, "second", "a refused proclaim changed the leader");
    assert_ne!(now.key, key);
    leadership
        .resign()
        .await
        .expect("resign of a lost leadership");
    assert!(
        next.is_leader(),
        "the lost leadership's resign ended the next term"
    );
    let next_token = next.fencing_token();
    next.resign().await.expect("resign");
    let again = tokio::time::timeout(limit, leader.campaign(name, "again"))
        .await
        .unwrap_or_else(|_| panic!("the handle did not lead again within {limit:?}"))
        .expect("campaign on the recovered handle");
    assert!(again.is_leader() && again.fencing_token() > next_token);
    let key_again = waiter
        .leader(name)
        .await
        .expect("leader()")
        .expect("a leader")
        .key;
    assert_ne!(key_again, key, "the handle campaigned on its revoked lease");
    again.resign().await.expect("resign");
    leader.close().await.expect("close");
    waiter.close().await.expect("close");
}
