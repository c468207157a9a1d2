//! Speed of the in-memory backend on a 100,000-key store (keys made before timing).
//!
//! `cargo bench -p hmetcd-mem`

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hmetcd_core::{KeyChange, Kvi};
use hmetcd_mem::MemKvs;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};

const KEYS: usize = 100_000;

fn key(i: usize) -> String {
    format!("key_{i:06}")
}

fn runtime() -> Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => panic!("tokio runtime: {err}"),
    }
}

fn filled_store(rt: &Runtime) -> Arc<MemKvs> {
    let kv = Arc::new(MemKvs::new());
    rt.block_on(async {
        for i in 0..KEYS {
            kv.store(&key(i), "value-of-some-length").await.ok();
        }
    });
    kv
}

fn point_operations(c: &mut Criterion) {
    let rt = runtime();
    let kv = filled_store(&rt);
    let keys: Vec<String> = (0..KEYS).map(key).collect();
    let mut group = c.benchmark_group("mem_100k");
    group.throughput(Throughput::Elements(1));

    let mut i = 0usize;
    group.bench_function("get", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % KEYS;
            let key = &keys[i];
            let kv = &kv;
            async move { black_box(kv.get(key).await.ok()) }
        })
    });
    group.bench_function("store_overwrite", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % KEYS;
            let key = &keys[i];
            let kv = &kv;
            async move { black_box(kv.store(key, "value-of-some-length").await.ok()) }
        })
    });
    group.bench_function("tas", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % KEYS;
            let key = &keys[i];
            let kv = &kv;
            async move {
                black_box(
                    kv.tas(key, "value-of-some-length", "value-of-some-length")
                        .await
                        .ok(),
                )
            }
        })
    });
    group.bench_function("get_range_100", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 7919) % (KEYS - 100);
            let (start, end) = (&keys[i], &keys[i + 99]);
            let kv = &kv;
            async move {
                let found = kv.get_range(start, end).await.map(|r| r.len()).unwrap_or(0);
                assert_eq!(found, 100);
            }
        })
    });
    group.finish();
}

/// The same operations on a bare `RwLock<BTreeMap>` with no API around it, run side by side
/// so the figures above can be read as a ratio to the least the work can cost.
fn baseline(c: &mut Criterion) {
    use std::collections::BTreeMap;
    use std::sync::RwLock;

    let keys: Vec<String> = (0..KEYS).map(key).collect();
    let map: RwLock<BTreeMap<String, String>> = RwLock::new(
        keys.iter()
            .map(|k| (k.clone(), "value-of-some-length".to_owned()))
            .collect(),
    );
    let mut group = c.benchmark_group("baseline_btreemap_100k");
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    group.bench_function("get", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(map.read().ok().and_then(|m| m.get(&keys[i]).cloned()))
        })
    });
    group.bench_function("store_overwrite", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            if let Ok(mut m) = map.write() {
                if let Some(v) = m.get_mut(&keys[i]) {
                    v.clear();
                    v.push_str("value-of-some-length");
                }
            }
        })
    });
    group.bench_function("get_range_100", |b| {
        b.iter(|| {
            i = (i + 1) % (KEYS - 100);
            let found: Vec<(String, String)> = map
                .read()
                .map(|m| {
                    m.range(keys[i].clone()..=keys[i + 99].clone())
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(found.len(), 100);
        })
    });
    group.finish();
}

/// Store by one handle to the callback of a watcher on another handle of the same store.
fn watch_latency(c: &mut Criterion) {
    let rt = runtime();
    let (writer, watcher_handle) = rt.block_on(async {
        let writer = MemKvs::open("bench-watch", "").unwrap_or_default();
        let watcher_handle = MemKvs::open("bench-watch", "").unwrap_or_default();
        for i in 0..KEYS {
            writer.store(&key(i), "v").await.ok();
        }
        (writer, watcher_handle)
    });
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Instant>();
    let _watch = rt.block_on(async {
        watcher_handle
            .watch_with_cb(
                "watched",
                KeyChange::Put,
                Box::new(move |_| seen_tx.send(Instant::now()).is_ok()),
            )
            .await
    });
    c.benchmark_group("mem_100k")
        .bench_function("watch_latency", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let started = Instant::now();
                        writer.store("watched", "v").await.ok();
                        if let Some(seen) = seen_rx.recv().await {
                            total += seen - started;
                        }
                    }
                    total
                })
            })
        });
}

/// Unlock by one handle to acquire by a handle already waiting for the lock.
fn lock_handoff(c: &mut Criterion) {
    let rt = runtime();
    let a = Arc::new(MemKvs::open("bench-lock", "").unwrap_or_default());
    let b_handle = Arc::new(MemKvs::open("bench-lock", "").unwrap_or_default());
    c.benchmark_group("mem_100k")
        .bench_function("lock_handoff", |bench| {
            bench.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        a.dist_lock().await.ok();
                        let (acquired_tx, acquired_rx) = oneshot::channel::<Instant>();
                        let waiter = Arc::clone(&b_handle);
                        let task = tokio::spawn(async move {
                            waiter.dist_lock().await.ok();
                            let _ = acquired_tx.send(Instant::now());
                            waiter.dist_unlock().await.ok();
                        });
                        // On a current-thread runtime this lets the waiter run until it queues.
                        for _ in 0..4 {
                            tokio::task::yield_now().await;
                        }
                        let released = Instant::now();
                        a.dist_unlock().await.ok();
                        if let Ok(acquired) = acquired_rx.await {
                            total += acquired - released;
                        }
                        task.await.ok();
                    }
                    total
                })
            })
        });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = point_operations, baseline, watch_latency, lock_handoff
}
criterion_main!(benches);
