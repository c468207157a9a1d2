//! What `EtcdKvs` costs over raw etcd-client, in criterion's terms: sequential get, store, tas,
//! transaction, get_range (100 of 10,000 keys), temp_key and `open()`, each done both ways
//! against the same etcd in the same run. `benches/report.rs` measures the rest (throughput
//! with concurrent tasks, watch and lock latency, memory) and writes docs/bench/results.md. The etcd comes from the test harness
//! (`HMETCD_TEST_ENDPOINTS`, a container, or a child process; see `integration-tests`).
//!
//! `cargo bench -p integration-tests --bench etcd_overhead`

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp};
use hmetcd_core::Kvi;
use hmetcd_etcd::EtcdKvs;
use integration_tests::etcd_server::EtcdServer;

const PREFIX: &str = "bench-overhead/";
const VALUE: &str = "value-of-some-length";
/// Keys `r00000`.. that get_range reads 100 of at a time.
const RANGE_KEYS: usize = 10_000;
const RANGE_LEN: usize = 100;

fn overhead(c: &mut Criterion) {
    let mut server = match EtcdServer::from_env() {
        Ok(server) => server,
        Err(why) => panic!("no etcd for the benchmark: {why}"),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => panic!("tokio runtime: {err}"),
    };
    let endpoints = server.endpoints().to_owned();
    let (kv, raw) = rt.block_on(async {
        let kv = EtcdKvs::connect(&endpoints, &format!("prefix={PREFIX}"))
            .await
            .unwrap_or_else(|err| panic!("connect: {err}"));
        let raw = etcd_client::Client::connect(endpoints.split(',').collect::<Vec<_>>(), None)
            .await
            .unwrap_or_else(|err| panic!("raw connect: {err}"));
        let mut writers = Vec::new();
        for w in 0..16 {
            let mut client = raw.kv_client();
            writers.push(tokio::spawn(async move {
                for i in (w..RANGE_KEYS).step_by(16) {
                    client
                        .put(format!("{PREFIX}r{i:05}"), VALUE, None)
                        .await
                        .ok();
                }
            }));
        }
        for writer in writers {
            writer.await.ok();
        }
        for i in 0..100 {
            kv.store(&format!("k{i:03}"), VALUE).await.ok();
        }
        (kv, raw)
    });
    let lease = rt
        .block_on(raw.lease_client().grant(300, None))
        .unwrap_or_else(|err| panic!("lease grant: {err}"))
        .id();
    let keys: Vec<String> = (0..100).map(|i| format!("k{i:03}")).collect();
    let raw_keys: Vec<String> = keys.iter().map(|k| format!("{PREFIX}{k}")).collect();

    let mut group = c.benchmark_group(format!("etcd-{}_sequential", server.version()));
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut i = 0usize;
    group.bench_function("get/hmetcd", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % keys.len();
            let (kv, key) = (&kv, &keys[i]);
            async move { kv.get(key).await.ok() }
        })
    });
    group.bench_function("get/etcd-client", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % keys.len();
            let (mut client, key) = (raw.kv_client(), &raw_keys[i]);
            async move {
                let response = client.get(key.as_str(), None).await.ok()?;
                let kv = response.kvs().first()?;
                kv.value_str().ok().map(str::to_owned)
            }
        })
    });
    group.bench_function("store/hmetcd", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % keys.len();
            let (kv, key) = (&kv, &keys[i]);
            async move { kv.store(key, VALUE).await.ok() }
        })
    });
    group.bench_function("store/etcd-client", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % keys.len();
            let (mut client, key) = (raw.kv_client(), &raw_keys[i]);
            async move { client.put(key.as_str(), VALUE, None).await.ok().map(drop) }
        })
    });
    group.bench_function("tas/hmetcd", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % keys.len();
            let (kv, key) = (&kv, &keys[i]);
            async move { kv.tas(key, VALUE, VALUE).await.ok() }
        })
    });
    group.bench_function("tas/etcd-client", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % keys.len();
            let (mut client, key) = (raw.kv_client(), &raw_keys[i]);
            async move {
                let txn = Txn::new()
                    .when([Compare::value(key.as_str(), CompareOp::Equal, VALUE)])
                    .and_then([TxnOp::put(key.as_str(), VALUE, None)]);
                client.txn(txn).await.ok().map(|r| r.succeeded())
            }
        })
    });
    group.bench_function("transaction/hmetcd", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % keys.len();
            let (kv, key, other) = (&kv, &keys[i], &keys[(i + 1) % keys.len()]);
            async move {
                kv.transaction(
                    key,
                    hmetcd_core::CompareOp::Equal,
                    VALUE,
                    key,
                    VALUE,
                    other,
                    VALUE,
                )
                .await
                .ok()
            }
        })
    });
    group.bench_function("transaction/etcd-client", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % keys.len();
            let (mut client, key) = (raw.kv_client(), &raw_keys[i]);
            let other = &raw_keys[(i + 1) % keys.len()];
            async move {
                let txn = Txn::new()
                    .when([Compare::value(key.as_str(), CompareOp::Equal, VALUE)])
                    .and_then([TxnOp::put(key.as_str(), VALUE, None)])
                    .or_else([TxnOp::put(other.as_str(), VALUE, None)]);
                client.txn(txn).await.ok().map(|r| r.succeeded())
            }
        })
    });
    let mut start = 0usize;
    group.bench_function("get_range_100_of_10k/hmetcd", |b| {
        b.to_async(&rt).iter(|| {
            start = (start + 37) % (RANGE_KEYS - RANGE_LEN);
            let kv = &kv;
            let (first, last) = (
                format!("r{start:05}"),
                format!("r{:05}", start + RANGE_LEN - 1),
            );
            async move {
                kv.get_range(&first, &last)
                    .await
                    .ok()
                    .map(|found| found.len())
            }
        })
    });
    group.bench_function("get_range_100_of_10k/etcd-client", |b| {
        b.to_async(&rt).iter(|| {
            start = (start + 37) % (RANGE_KEYS - RANGE_LEN);
            let mut client = raw.kv_client();
            let (first, mut last) = (
                format!("{PREFIX}r{start:05}"),
                format!("{PREFIX}r{:05}", start + RANGE_LEN - 1).into_bytes(),
            );
            last.push(0);
            async move {
                let options = GetOptions::new()
                    .with_range(last)
                    .with_sort(SortTarget::Key, SortOrder::Ascend);
                let answer = client.get(first, Some(options)).await.ok()?;
                let mut found = Vec::with_capacity(answer.kvs().len());
                for pair in answer.kvs() {
                    let key = pair.key_str().ok()?;
                    found.push((
                        key.strip_prefix(PREFIX).unwrap_or(key).to_owned(),
                        pair.value_str().ok()?.to_owned(),
                    ));
                }
                Some(found.len())
            }
        })
    });
    group.bench_function("temp_key/hmetcd", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % keys.len();
            let (kv, key) = (&kv, format!("temp/{i}"));
            async move { kv.temp_key(&key).await.ok() }
        })
    });
    group.bench_function("temp_key/etcd-client", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % keys.len();
            let (mut client, key) = (raw.kv_client(), format!("{PREFIX}temp/{i}"));
            let options = PutOptions::new().with_lease(lease);
            async move { client.put(key, "1", Some(options)).await.ok().map(drop) }
        })
    });
    group.finish();

    let mut group = c.benchmark_group(format!("etcd-{}_open", server.version()));
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let options = format!("prefix={PREFIX}");
    group.bench_function("open/hmetcd", |b| {
        b.to_async(&rt).iter(|| {
            let (endpoints, options) = (&endpoints, &options);
            async move {
                let kv = hmetcd::open(endpoints, options).await.ok()?;
                kv.close().await.ok()
            }
        })
    });
    group.bench_function("open/etcd-client", |b| {
        b.to_async(&rt).iter(|| {
            let endpoints = &endpoints;
            async move {
                let client =
                    etcd_client::Client::connect(endpoints.split(',').collect::<Vec<_>>(), None)
                        .await
                        .ok()?;
                let lease = client.lease_client().grant(10, None).await.ok()?;
                client
                    .lease_client()
                    .revoke(lease.id())
                    .await
                    .ok()
                    .map(drop)
            }
        })
    });
    group.finish();
    rt.block_on(async {
        kv.close().await.ok();
        raw.lease_client().revoke(lease).await.ok();
        let everything = etcd_client::DeleteOptions::new().with_prefix();
        raw.kv_client().delete(PREFIX, Some(everything)).await.ok();
    });
    server.shutdown();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
