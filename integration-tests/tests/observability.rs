//! What an operator sees of the memory backend: one `hmetcd` span per call with its operation,
//! key, backend and outcome, and the events of lock waits, handovers and losses and of a lost
//! lease (the etcd backend's: `tests/etcd_spans.rs`). The figures of the `metrics` feature are
//! checked in the facade's `tests/metrics.rs`. Spans are captured here with a thread-local
//! subscriber, so each test runs on a current-thread runtime.

use std::time::Duration;

use hmetcd_core::{Kvi, LockOptions, LostReason, Op, Txn};
use hmetcd_mem::MemKvs;
use integration_tests::spans::{calls, check_lock_handover, with_message, Captured};
use tracing::Level;
use tracing_subscriber::layer::SubscriberExt;

fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(captured.clone());
    (captured, tracing::subscriber::set_default(subscriber))
}

#[tokio::test(flavor = "current_thread")]
async fn every_call_is_one_span_with_its_outcome() {
    let (spans, _guard) = capture();

    let kv = MemKvs::new();
    kv.store("nodes/a", "up").await.ok();
    assert_eq!(
        kv.get("nodes/a").await.ok().flatten().as_deref(),
        Some("up")
    );
    assert!(kv.store("", "v").await.is_err());
    let long = "k".repeat(300);
    kv.get(&long).await.ok();
    kv.txn(Txn::new().then(Op::put("nodes/b", "up"))).await.ok();
    kv.update("nodes/c", &mut |_| Some("up".to_owned()))
        .await
        .ok();
    kv.close().await.ok();
    assert!(kv.get("nodes/a").await.is_err());

    let seen = spans.take_spans();
    let cut = "k".repeat(100);
    assert_eq!(
        calls(&seen),
        [
            ("store", "nodes/a", "mem", "ok"),
            ("get", "nodes/a", "mem", "ok"),
            ("store", "", "mem", "invalid_key"),
            ("get", cut.as_str(), "mem", "ok"),
            ("txn", "nodes/b", "mem", "ok"),
            // update's own span closes after those of the calls it makes.
            ("get_kv", "nodes/c", "mem", "ok"),
            ("txn", "nodes/c", "mem", "ok"),
            ("update", "nodes/c", "mem", "ok"),
            ("close", "", "mem", "ok"),
            ("get", "nodes/a", "mem", "closed"),
        ]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn lock_waits_handovers_and_losses_are_events() {
    let (captured, _guard) = capture();
    let first = match MemKvs::open("observability-locks", "") {
        Ok(kv) => kv,
        Err(err) => panic!("open: {err}"),
    };
    let second = match first.open_sibling("") {
        Ok(kv) => kv,
        Err(err) => panic!("open: {err}"),
    };
    check_lock_handover(&first, &second, Duration::from_millis(20), &captured, "mem").await;

    // A hold cut by max_hold is a WARN with the reason.
    let bounded = second
        .lock_with(
            "bounded",
            LockOptions::new().max_hold(Duration::from_millis(10)),
        )
        .await;
    let bounded = match bounded {
        Ok(guard) => guard,
        Err(err) => panic!("lock_with: {err}"),
    };
    assert_eq!(bounded.lost().await, LostReason::MaxHold);
    let events = captured.take_events();
    let lost = with_message(&events, "lost the lock");
    assert_eq!(lost.len(), 1, "{events:#?}");
    assert_eq!(lost[0].level, Level::WARN);
    assert_eq!(lost[0].field("reason"), LostReason::MaxHold.to_string());
    assert_eq!(lost[0].field("token"), bounded.fencing_token().to_string());

    // A lost lease is a WARN too.
    second.faults().expire_lease();
    let events = captured.take_events();
    let lease_lost = with_message(&events, "the lease is lost");
    assert_eq!(lease_lost.len(), 1, "{events:#?}");
    assert_eq!(lease_lost[0].level, Level::WARN);
    assert!(!lease_lost[0].field("lease").is_empty());
}
