//! A driver for counting the client's instructions per etcd call under
//! `valgrind --tool=callgrind`, hmetcd-etcd against raw etcd-client side by side: it connects
//! to `HMETCD_ENDPOINT`, puts 1,000 keys, then makes `HMETCD_CALLS` sequential calls of
//! `HMETCD_OP` (`get` or `store`) on a current-thread runtime through `HMETCD_SIDE` (`hmetcd`,
//! the default, or `raw`). Instructions per call are the difference between a run of N calls
//! and one of 0, over N. See docs/BENCHMARKS.md for the commands.

#![allow(missing_docs)]

use std::hint::black_box;

use hmetcd_core::Kvi;

const KEYS: usize = 1_000;
const VALUE: &str = "value-of-some-length";

fn main() {
    let calls: usize = std::env::var("HMETCD_CALLS")
        .ok()
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(2_000);
    let op = std::env::var("HMETCD_OP").unwrap_or_else(|_| "get".to_owned());
    let side = std::env::var("HMETCD_SIDE").unwrap_or_else(|_| "hmetcd".to_owned());
    let Ok(endpoint) = std::env::var("HMETCD_ENDPOINT") else {
        panic!("set HMETCD_ENDPOINT to an etcd, e.g. http://127.0.0.1:2379");
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => panic!("runtime: {err}"),
    };
    let keys: Vec<String> = (0..KEYS)
        .map(|i| format!("instructions/key_{i:04}"))
        .collect();
    runtime.block_on(async {
        if side == "raw" {
            let client = match etcd_client::Client::connect([endpoint.as_str()], None).await {
                Ok(client) => client,
                Err(err) => panic!("connect {endpoint}: {err}"),
            };
            let mut kv = client.kv_client();
            for key in &keys {
                kv.put(key.as_str(), VALUE, None).await.ok();
            }
            for i in 0..calls {
                let key = keys[i % KEYS].as_str();
                match op.as_str() {
                    "store" => black_box(kv.put(key, VALUE, None).await.ok().map(|_| ())),
                    _ => black_box(kv.get(key, None).await.ok().map(|_| ())),
                };
            }
        } else {
            let kv = match hmetcd_etcd::EtcdKvs::connect(&endpoint, "").await {
                Ok(kv) => kv,
                Err(err) => panic!("connect {endpoint}: {err}"),
            };
            for key in &keys {
                kv.store(key, VALUE).await.ok();
            }
            for i in 0..calls {
                let key = &keys[i % KEYS];
                match op.as_str() {
                    "store" => black_box(kv.store(key, VALUE).await.ok()),
                    _ => black_box(kv.get(key).await.ok().map(|_| ())),
                };
            }
        }
    });
}
