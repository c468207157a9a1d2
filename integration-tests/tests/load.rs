//! Load on one etcd handle: many tasks sharing it with no error and no lost write, and a
//! thousand callback watchers on it that each see exactly their key's values, in order.
//!
//! Named `etcd-<version>::load::<test>`; each prints its throughput and time.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use hmetcd_core::{KeyChange, KeyValue, Kvi, WatchEvent};
use hmetcd_etcd::EtcdKvs;
use integration_tests::backends;
use integration_tests::run_limited;
use libtest_mimic::{Arguments, Trial};

const TASKS: usize = 64;
const OPS_PER_TASK: usize = 1_000;
const KEYS_PER_TASK: usize = 8;
const WATCHERS: usize = 1_000;
const WRITES_PER_WATCHED_KEY: usize = 3;

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let mut server = match backends::etcd_server_or_exit("load", &args) {
        Ok(server) => server,
        Err(exit) => return exit,
    };
    let backend = format!("etcd-{}", server.version());
    let trials = vec![
        Trial::test(format!("{backend}::load::many_tasks_share_one_handle"), {
            let endpoints = server.endpoints().to_owned();
            move || {
                run_limited(
                    4,
                    Duration::from_secs(90),
                    many_tasks_share_one_handle(endpoints),
                )
            }
        }),
        Trial::test(
            format!("{backend}::load::a_thousand_watchers_on_one_handle"),
            {
                let endpoints = server.endpoints().to_owned();
                move || {
                    run_limited(
                        4,
                        Duration::from_secs(90),
                        a_thousand_watchers_on_one_handle(endpoints),
                    )
                }
            },
        ),
    ];
    let conclusion = libtest_mimic::run(&args, trials);
    server.shutdown();
    conclusion.exit_code()
}

fn tag() -> String {
    std::iter::repeat_with(fastrand::alphanumeric)
        .take(8)
        .collect()
}

async fn connect(endpoints: &str, prefix: &str) -> EtcdKvs {
    EtcdKvs::connect(endpoints, &format!("prefix={prefix},request_timeout=10s"))
        .await
        .unwrap_or_else(|err| panic!("connecting to {endpoints}: {err}"))
}

fn failed(task: usize, n: usize, what: &str, key: &str, err: hmetcd_core::Error) -> ! {
    panic!("task {task}, operation {n}: {what} {key:?}: {err}")
}

/// One task's mixed operations on its own keys, checked against what it wrote; returns
/// what its keys must hold at the end.
async fn mixed_operations(kv: Arc<EtcdKvs>, task: usize) -> BTreeMap<String, String> {
    let mut rng = fastrand::Rng::with_seed(task as u64);
    let mut model: BTreeMap<String, String> = BTreeMap::new();
    let (first, last) = (format!("t{task:02}/"), format!("t{task:02}/\u{10FFFF}"));
    for n in 0..OPS_PER_TASK {
        let key = format!("t{task:02}/k{}", rng.usize(..KEYS_PER_TASK));
        match rng.u8(..100) {
            0..35 => {
                let value = format!("{task}-{n}");
                kv.store(&key, &value)
                    .await
                    .unwrap_or_else(|err| failed(task, n, "store", &key, err));
                model.insert(key, value);
            }
            35..60 => {
                let got = kv
                    .get(&key)
                    .await
                    .unwrap_or_else(|err| failed(task, n, "get", &key, err));
                assert_eq!(got.as_ref(), model.get(&key), "task {task}: get {key:?}");
            }
            60..75 => {
                let test = match model.get(&key) {
                    Some(value) if rng.bool() => value.clone(),
                    _ => "no such value".to_owned(),
                };
                let set = format!("{task}-{n}-tas");
                let expected = model.get(&key) == Some(&test);
                let swapped = kv
                    .tas(&key, &test, &set)
                    .await
                    .unwrap_or_else(|err| failed(task, n, "tas", &key, err));
                assert_eq!(swapped, expected, "task {task}: tas {key:?}");
                if swapped {
                    model.insert(key, set);
                }
            }
            75..90 => {
                let got = kv
                    .get_range(&first, &last)
                    .await
                    .unwrap_or_else(|err| failed(task, n, "get_range", &key, err));
                let got: Vec<(&str, &str)> = got.iter().map(KeyValue::pair).collect();
                let expected: Vec<(&str, &str)> = model
                    .iter()
                    .map(|(key, value)| (key.as_str(), value.as_str()))
                    .collect();
                assert_eq!(got, expected, "task {task}: get_range of its keys");
            }
            _ => {
                kv.delete(&key)
                    .await
                    .unwrap_or_else(|err| failed(task, n, "delete", &key, err));
                model.remove(&key);
            }
        }
    }
    model
}

async fn many_tasks_share_one_handle(endpoints: String) {
    let kv = Arc::new(connect(&endpoints, &format!("load-{}/", tag())).await);
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| tokio::spawn(mixed_operations(Arc::clone(&kv), task)))
        .collect();
    let mut expected = BTreeMap::new();
    for task in tasks {
        match task.await {
            Ok(model) => expected.extend(model),
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }
    let elapsed = started.elapsed();
    let operations = TASKS * OPS_PER_TASK;
    eprintln!(
        "load: {TASKS} tasks x {OPS_PER_TASK} mixed operations = {operations} operations on one \
         handle in {elapsed:.2?}: {:.0} operations/s",
        operations as f64 / elapsed.as_secs_f64()
    );
    // No lost write: every key holds the last value its task wrote, and nothing else is there.
    for (key, value) in &expected {
        let got = kv
            .get(key)
            .await
            .unwrap_or_else(|err| panic!("get {key:?}: {err}"));
        assert_eq!(got.as_ref(), Some(value), "{key:?} lost its last write");
    }
    let everything = kv
        .get_range("", "\u{10FFFF}")
        .await
        .unwrap_or_else(|err| panic!("get_range: {err}"));
    let found: BTreeMap<String, String> = everything
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect();
    assert_eq!(found, expected, "the store holds exactly the last writes");
    kv.close()
        .await
        .unwrap_or_else(|err| panic!("close: {err}"));
}

async fn a_thousand_watchers_on_one_handle(endpoints: String) {
    let prefix = format!("watch-load-{}/", tag());
    let kv = connect(&endpoints, &prefix).await;
    let writer = connect(&endpoints, &prefix).await;
    let seen: Vec<Arc<Mutex<Vec<String>>>> = (0..WATCHERS).map(|_| Arc::default()).collect();

    let started = Instant::now();
    let handles: Vec<_> = futures::stream::iter(0..WATCHERS)
        .map(|i| {
            let (kv, sink) = (&kv, Arc::clone(&seen[i]));
            async move {
                let cb = Box::new(move |event: &WatchEvent| {
                    if let Some(value) = event.value() {
                        sink.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(value.to_owned());
                    }
                    true
                });
                kv.watch_with_cb(&format!("w{i:04}"), KeyChange::Put, cb)
                    .await
            }
        })
        .buffered(64)
        .try_collect()
        .await
        .unwrap_or_else(|err| panic!("watch_with_cb: {err}"));
    let registered = started.elapsed();

    let started = Instant::now();
    futures::stream::iter(0..WATCHERS)
        .map(|i| {
            let writer = &writer;
            async move {
                let key = format!("w{i:04}");
                for n in 0..WRITES_PER_WATCHED_KEY {
                    writer
                        .store(&key, &format!("{i}-{n}"))
                        .await
                        .unwrap_or_else(|err| panic!("store {key:?}: {err}"));
                }
            }
        })
        .buffer_unordered(64)
        .collect::<()>()
        .await;
    let written = started.elapsed();

    let complete = || {
        seen.iter().all(|values| {
            values.lock().unwrap_or_else(|p| p.into_inner()).len() >= WRITES_PER_WATCHED_KEY
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !complete() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered = started.elapsed();
    // Time for any repeated or stray event to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = WATCHERS * WRITES_PER_WATCHED_KEY;
    eprintln!(
        "load: {WATCHERS} watchers registered in {registered:.2?}; {events} writes in \
         {written:.2?}, all delivered {delivered:.2?} after the first write ({:.0} events/s)",
        events as f64 / delivered.as_secs_f64()
    );
    let mut wrong = Vec::new();
    for (i, values) in seen.iter().enumerate() {
        let got = values.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let expected: Vec<String> = (0..WRITES_PER_WATCHED_KEY)
            .map(|n| format!("{i}-{n}"))
            .collect();
        if got != expected {
            wrong.push(format!("w{i:04}: saw {got:?}, expected {expected:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {WATCHERS} watchers did not see exactly their values in order, e.g.:\n{}",
        wrong.len(),
        wrong[..wrong.len().min(10)].join("\n")
    );
    for handle in handles {
        kv.watch_cb_cancel(handle);
    }
    kv.close()
        .await
        .unwrap_or_else(|err| panic!("close: {err}"));
    writer
        .close()
        .await
        .unwrap_or_else(|err| panic!("close: {err}"));
}
