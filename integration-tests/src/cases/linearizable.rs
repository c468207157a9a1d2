//! Many tasks on one handle: every plain read and write stays linearizable, however the
//! backend groups them (the etcd backend coalesces concurrent calls into transactions).

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use hmetcd_core::{KeyChange, Kvi};
use tokio::time::Instant;

use super::{within, PROMPTLY, SLOW_CASE_LIMIT};
use crate::TestStore;

const TASKS: usize = 64;
const OPS_PER_TASK: usize = 500;
const KEYS: usize = 50;
/// Written after every task is done; its event tells that the watch has seen everything.
const END: &str = "hot/~end";

#[derive(Debug, Clone)]
enum Did {
    /// Read the value with this mod revision, or nothing.
    Read(Option<(String, i64)>),
    Stored(String),
    Deleted,
}

/// One call as its task saw it: when it was made, when it returned, and what it did.
#[derive(Debug, Clone)]
struct Call {
    /// Shown in violation reports.
    #[allow(dead_code)]
    task: usize,
    key: String,
    invoked: Instant,
    returned: Instant,
    did: Did,
}

/// A write as the watch saw it: the new value (`None` for a delete) at `revision`.
#[derive(Debug, Clone)]
struct Change {
    value: Option<String>,
    revision: i64,
}

async fn run_task(kv: Arc<dyn Kvi>, task: usize, seed: u64) -> Vec<Call> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut calls = Vec::with_capacity(OPS_PER_TASK);
    for n in 0..OPS_PER_TASK {
        let key = format!("hot/{:02}", rng.usize(..KEYS));
        let invoked = Instant::now();
        let did = match rng.u8(..10) {
            0..=4 => {
                let read = kv
                    .get_kv(&key)
                    .await
                    .unwrap_or_else(|err| panic!("task {task}: get_kv {key}: {err}"));
                Did::Read(read.map(|found| (found.value, found.mod_revision)))
            }
            5..=8 => {
                let value = format!("t{task}-{n}");
                kv.store(&key, &value)
                    .await
                    .unwrap_or_else(|err| panic!("task {task}: store {key}: {err}"));
                Did::Stored(value)
            }
            _ => {
                kv.delete(&key)
                    .await
                    .unwrap_or_else(|err| panic!("task {task}: delete {key}: {err}"));
                Did::Deleted
            }
        };
        calls.push(Call {
            task,
            key,
            invoked,
            returned: Instant::now(),
            did,
        });
    }
    calls
}

/// 64 tasks share one handle and make 500 calls each (half `get_kv`, 40% `store` of a value
/// of their own, 10% `delete`) on 50 keys. A watch of the keys gives each key's writes in
/// order. Then, against each task's log of when its calls were made and returned:
/// - every store is in the watch, at a revision after every write that returned before it
///   was made (no write lost or reordered);
/// - every read saw the key as it was at some instant within its call: its value was
///   written before the read returned, and no write that returned before the read was made
///   had overwritten or deleted it (no stale read, no read from the future).
pub async fn concurrent_plain_calls_are_linearizable(store: TestStore) {
    let kv: Arc<dyn Kvi> = Arc::from(store.open().await);
    let mut watch = kv.watch_prefix("hot/").await.unwrap();
    let seed = fastrand::u64(..);
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let kv = Arc::clone(&kv);
        tasks.push(tokio::spawn(run_task(kv, task, seed ^ task as u64)));
    }
    let mut calls = Vec::new();
    for task in tasks {
        calls.extend(
            within(SLOW_CASE_LIMIT, "64 tasks × 500 calls", task)
                .await
                .unwrap(),
        );
    }
    kv.store(END, "").await.unwrap();
    let mut changes: HashMap<String, Vec<Change>> = HashMap::new();
    let mut last_revision = 0;
    loop {
        let event = within(PROMPTLY, "the watch to reach the end marker", watch.next())
            .await
            .unwrap_or_else(|| panic!("the watch ended"))
            .unwrap_or_else(|err| panic!("the watch failed: {err}"));
        // Writes sent together as one transaction share its revision.
        assert!(
            event.revision() >= last_revision,
            "watch revisions never go down: {} after {last_revision}",
            event.revision()
        );
        last_revision = event.revision();
        if event.key() == END {
            break;
        }
        let value = match event.change() {
            KeyChange::Put => event.value().map(str::to_owned),
            KeyChange::Delete => None,
        };
        changes
            .entry(event.key().to_owned())
            .or_default()
            .push(Change {
                value,
                revision: event.revision(),
            });
    }
    let violations = check(&calls, &changes);
    assert!(
        violations.is_empty(),
        "seed {seed}: {} of {} calls break linearizability; the first: {:#?}",
        violations.len(),
        calls.len(),
        &violations[..violations.len().min(5)]
    );
    kv.close().await.unwrap();
}

/// The calls that break the rules of [`concurrent_plain_calls_are_linearizable`], with why.
fn check(calls: &[Call], changes: &HashMap<String, Vec<Change>>) -> Vec<String> {
    let mut violations = Vec::new();
    // Every store's revision, by its (unique) value.
    let mut revision_of: HashMap<&str, i64> = HashMap::new();
    for change in changes.values().flatten() {
        if let Some(value) = &change.value {
            revision_of.insert(value, change.revision);
        }
    }
    let mut by_key: HashMap<&str, Vec<&Call>> = HashMap::new();
    // One key's writes have revisions of their own, in the watch's order.
    for (key, history) in changes {
        if let Some(pair) = history
            .windows(2)
            .find(|pair| pair[0].revision >= pair[1].revision)
        {
            violations.push(format!("{key}: two writes at revisions {pair:?}"));
        }
    }
    for call in calls {
        by_key.entry(&call.key).or_default().push(call);
    }
    for calls in by_key.into_values() {
        let stores: Vec<(&Call, i64)> = calls
            .iter()
            .filter_map(|call| match &call.did {
                Did::Stored(value) => Some((*call, revision_of.get(value.as_str()).copied())),
                _ => None,
            })
            .filter_map(|(call, revision)| {
                if revision.is_none() {
                    violations.push(format!("lost write: {call:?} is not in the watch"));
                }
                revision.map(|revision| (call, revision))
            })
            .collect();
        for &(a, a_revision) in &stores {
            for &(b, b_revision) in &stores {
                if a.returned < b.invoked && a_revision > b_revision {
                    violations.push(format!(
                        "reordered writes: {a:?} (revision {a_revision}) returned before \
                         {b:?} (revision {b_revision}) was made"
                    ));
                }
            }
        }
        let store_of: HashMap<&str, (&Call, i64)> = stores
            .iter()
            .filter_map(|&(call, revision)| match &call.did {
                Did::Stored(value) => Some((value.as_str(), (call, revision))),
                _ => None,
            })
            .collect();
        let deletes: Vec<&Call> = calls
            .iter()
            .copied()
            .filter(|call| matches!(call.did, Did::Deleted))
            .collect();
        for read in calls.iter().copied() {
            let Did::Read(seen) = &read.did else {
                continue;
            };
            match seen {
                Some((value, revision)) => {
                    let Some(&(write, written_at)) = store_of.get(value.as_str()) else {
                        violations.push(format!("read of a value never stored: {read:?}"));
                        continue;
                    };
                    if written_at != *revision {
                        violations.push(format!(
                            "read {read:?} reports mod revision {revision}, the watch {written_at}"
                        ));
                    }
                    if write.invoked > read.returned {
                        violations.push(format!("read from the future: {read:?} saw {write:?}"));
                    }
                    if let Some((later, _)) = stores.iter().find(|(call, revision)| {
                        *revision > written_at && call.returned < read.invoked
                    }) {
                        violations.push(format!(
                            "stale read: {read:?}; {later:?} wrote over it before it was made"
                        ));
                    }
                    if let Some(delete) = deletes.iter().find(|delete| {
                        write.returned < delete.invoked && delete.returned < read.invoked
                    }) {
                        violations.push(format!(
                            "stale read: {read:?}; {delete:?} deleted it after {write:?}, before \
                             the read was made"
                        ));
                    }
                }
                None => {
                    // The latest store that returned before the read was made must have been
                    // deleted by a delete that overlaps or follows it and began before the
                    // read returned.
                    let latest = stores
                        .iter()
                        .filter(|(call, _)| call.returned < read.invoked)
                        .max_by_key(|(_, revision)| *revision);
                    if let Some(&(write, _)) = latest {
                        let deleted = deletes.iter().any(|delete| {
                            delete.invoked < read.returned && delete.returned > write.invoked
                        });
                        if !deleted {
                            violations.push(format!(
                                "stale read: {read:?} found nothing, but {write:?} returned \
                                 before it was made and no delete could have removed it"
                            ));
                        }
                    }
                }
            }
        }
    }
    violations
}
