//! What `EtcdKvs` costs over raw etcd-client: sequential get, store and tas, each done both
//! ways against the same etcd in the same run. The etcd comes from the test harness
//! (`HMETCD_TEST_ENDPOINTS`, a container, or a child process; see `integration-tests`).
//!
//! `cargo bench -p integration-tests --bench etcd_overhead`

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use hmetcd_core::Kvi;
use hmetcd_etcd::EtcdKvs;
use integration_tests::etcd_server::EtcdServer;

const PREFIX: &str = "bench-overhead/";
const VALUE: &str = "value-of-some-length";

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
        for i in 0..100 {
            kv.store(&format!("k{i:03}"), VALUE).await.ok();
        }
        (kv, raw)
    });
    let keys: Vec<String> = (0..100).map(|i| format!("k{i:03}")).collect();
    let raw_keys: Vec<String> = keys.iter().map(|k| format!("{PREFIX}{k}")).collect();

    let mut group = c.benchmark_group(format!("etcd-{}_sequential", server.version()));
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(4));
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
                    .when([
                        Compare::version(key.as_str(), CompareOp::Greater, 0),
                        Compare::value(key.as_str(), CompareOp::Equal, VALUE),
                    ])
                    .and_then([TxnOp::put(key.as_str(), VALUE, None)]);
                client.txn(txn).await.ok().map(|r| r.succeeded())
            }
        })
    });
    group.finish();
    rt.block_on(async { kv.close().await.ok() });
    server.shutdown();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
