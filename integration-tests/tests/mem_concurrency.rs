//! In-memory timings and heavy concurrency: targets of the in-memory backend only, so they
//! are not conformance cases (etcd round trips would make them slow or their bounds wrong).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmetcd_core::{Error, KeyChange, Kvi, WatchEvent};
use hmetcd_mem::MemKvs;
use tokio::time::{timeout, Instant};

/// A named store no other test opens.
fn store_name(test: &str) -> String {
    let tag: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(12)
        .collect();
    format!("mem-concurrency-{test}-{tag}")
}

fn open(name: &str) -> MemKvs {
    MemKvs::open(name, "").unwrap_or_else(|err| panic!("opening mem:{name}: {err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_serialises_1600_increments() {
    const HANDLES: usize = 8;
    const ROUNDS: usize = 200;
    let name = store_name("counter");
    let first = open(&name);
    first.store("counter", "0").await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..HANDLES {
        let kv = open(&name);
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                kv.dist_lock().await.unwrap();
                let count: usize = kv.get("counter").await.unwrap().unwrap().parse().unwrap();
                tokio::task::yield_now().await;
                kv.store("counter", &(count + 1).to_string()).await.unwrap();
                kv.dist_unlock().await.unwrap();
            }
            kv.close().await.unwrap();
        }));
    }
    let all_done = async {
        for task in tasks {
            task.await.unwrap();
        }
    };
    timeout(Duration::from_secs(60), all_done)
        .await
        .expect("1600 locked increments within 60 s");
    let expected = (HANDLES * ROUNDS).to_string();
    assert_eq!(first.get("counter").await.unwrap(), Some(expected));
    first.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_sees_10000_tight_stores_in_order() {
    const STORES: usize = 10_000;
    let kv = open(&store_name("callback"));
    let seen = Arc::new(Mutex::new(Vec::with_capacity(STORES)));
    let recorder = Arc::clone(&seen);
    let handle = kv
        .watch_with_cb(
            "k",
            KeyChange::Put,
            Box::new(move |event: &WatchEvent| {
                recorder
                    .lock()
                    .unwrap()
                    .push(event.value().unwrap_or_default().to_owned());
                true
            }),
        )
        .await
        .unwrap();
    for i in 0..STORES {
        kv.store("k", &i.to_string()).await.unwrap();
    }
    let caught_up = async {
        while seen.lock().unwrap().len() < STORES {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    timeout(Duration::from_secs(20), caught_up)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "callback saw {} of {STORES} stores",
                seen.lock().unwrap().len()
            )
        });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let expected: Vec<String> = (0..STORES).map(|i| i.to_string()).collect();
    assert!(
        *seen.lock().unwrap() == expected,
        "callback missed, repeated or reordered stores"
    );
    handle.cancel();
    kv.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_lock_gives_up_in_50_to_250_ms_and_unlock_admits_at_once() {
    let name = store_name("timed-lock");
    let (holder, quitter, later) = (open(&name), open(&name), open(&name));
    holder.dist_lock().await.unwrap();

    let started = Instant::now();
    let attempt = quitter.dist_timed_lock(Duration::from_millis(50)).await;
    let waited = started.elapsed();
    assert!(
        matches!(attempt, Err(Error::LockTimeout { .. })),
        "{attempt:?}"
    );
    assert!(
        (Duration::from_millis(50)..=Duration::from_millis(250)).contains(&waited),
        "dist_timed_lock(50ms) gave up after {waited:?}"
    );

    holder.dist_unlock().await.unwrap();
    let started = Instant::now();
    later.dist_timed_lock(Duration::from_secs(1)).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(50),
        "the free lock took {waited:?}"
    );

    for kv in [holder, quitter, later] {
        kv.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_holder_lets_a_waiter_in() {
    let name = store_name("drop");
    let holder = open(&name);
    let waiter = Arc::new(open(&name));
    holder.dist_lock().await.unwrap();
    let queued = Arc::clone(&waiter);
    let acquired = tokio::spawn(async move { queued.dist_lock().await.map(|()| Instant::now()) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!acquired.is_finished(), "the waiter got a held lock");

    let dropped = Instant::now();
    drop(holder);
    let acquired = timeout(Duration::from_secs(1), acquired)
        .await
        .expect("the waiter got the lock within 1 s of the holder's drop")
        .unwrap()
        .unwrap();
    assert!(
        acquired - dropped < Duration::from_millis(50),
        "took {:?}",
        acquired - dropped
    );
    waiter.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_arrive_at_once_not_on_a_polling_period() {
    use futures::StreamExt;
    const ROUNDS: usize = 100;
    let kv = open(&store_name("latency"));
    let mut stream = kv.watch_stream("k").await.unwrap();
    let mut latencies = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS {
        let stored = Instant::now();
        kv.store("k", &i.to_string()).await.unwrap();
        let event = timeout(Duration::from_secs(1), stream.next())
            .await
            .expect("an event within 1 s")
            .expect("the stream goes on")
            .unwrap();
        latencies.push(stored.elapsed());
        assert_eq!(event.value(), Some(i.to_string().as_str()));
    }
    latencies.sort();
    let median = latencies[ROUNDS / 2];
    assert!(
        median < Duration::from_millis(2),
        "median store-to-event latency {median:?}"
    );
    kv.close().await.unwrap();
}
