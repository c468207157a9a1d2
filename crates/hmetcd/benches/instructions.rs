//! A driver for counting instructions per call under `valgrind --tool=callgrind`
//! (deterministic, unlike wall-clock time on a shared machine): it fills a store with 1,000
//! keys, then makes `HMETCD_CALLS` calls of `HMETCD_OP` (`get` or `store`) on a current-thread
//! runtime. Instructions per call are the difference between a run of N calls and one of 0,
//! over N. The store is a `MemKvs`, or with `HMETCD_ENDPOINT` (and the `etcd` feature) that
//! etcd through `hmetcd::open`. With `HMETCD_RECORDER=debugging` (and the `metrics` feature)
//! `metrics-util`'s debugging recorder is installed first. See docs/BENCHMARKS.md for the
//! commands.

#![allow(missing_docs)]

use std::hint::black_box;

use hmetcd::{Kvi, MemKvs};

const KEYS: usize = 1_000;

fn main() {
    let calls: usize = std::env::var("HMETCD_CALLS")
        .ok()
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(20_000);
    let op = std::env::var("HMETCD_OP").unwrap_or_else(|_| "get".to_owned());
    if std::env::var("HMETCD_RECORDER").as_deref() == Ok("debugging") {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        if recorder.install().is_err() {
            return;
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => panic!("runtime: {err}"),
    };
    runtime.block_on(async {
        match std::env::var("HMETCD_ENDPOINT") {
            Ok(endpoint) => match hmetcd::open(&endpoint, "prefix=instructions/").await {
                Ok(kv) => calls_on(&*kv, &op, calls).await,
                Err(err) => panic!("open {endpoint}: {err}"),
            },
            Err(_) => calls_on(&MemKvs::new(), &op, calls).await,
        }
    });
}

async fn calls_on<K: Kvi + ?Sized>(kv: &K, op: &str, calls: usize) {
    let keys: Vec<String> = (0..KEYS).map(|i| format!("key_{i:04}")).collect();
    for key in &keys {
        kv.store(key, "value-of-some-length").await.ok();
    }
    for i in 0..calls {
        let key = &keys[i % KEYS];
        match op {
            "store" => black_box(kv.store(key, "value-of-some-length").await.ok()),
            _ => black_box(kv.get(key).await.ok().map(|_| ())),
        };
    }
}
