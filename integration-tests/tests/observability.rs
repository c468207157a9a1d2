//! What an operator sees of the memory backend: one `hmetcd` span per call with its operation,
//! key, backend and outcome, and the events of lock waits, handovers and losses and of a lost
//! lease (the etcd backend's: `tests/etcd_spans.rs`). The figures of the `metrics` feature are
//! checked in the facade's `tests/metrics.rs`. Spans are captured here with a thread-local
//! subscriber, so each test runs on a current-thread runtime.

use std::time::Duration;

use hmetcd_core::{Kvi, LockOptions, LostReason};
use hmetcd_mem::MemKvs;
use integration_tests::spans::{check_call_spans, check_lock_handover, with_message, Captured};
use tracing::Level;
use tracing_subscriber::layer::SubscriberExt;

fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(captured.clone());
    (captured, tracing::subscriber::set_default(subscriber))
}

#[tokio::test(flavor = "current_thread")]
async fn every_call_is_one_span_with_its_outcome() {
    let (captured, _guard) = capture();
    check_call_spans(&MemKvs::new(), &captured, "mem").await;
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

    // So is a hold whose key someone else deleted.
    let deleted = match second.lock("deleted").await {
        Ok(guard) => guard,
        Err(err) => panic!("lock: {err}"),
    };
    let key = deleted.key().to_owned();
    if let Err(err) = first.delete(&key).await {
        panic!("delete {key}: {err}");
    }
    assert_eq!(deleted.lost().await, LostReason::KeyDeleted);
    let events = captured.take_events();
    let lost = with_message(&events, "lost the lock");
    assert_eq!(lost.len(), 1, "{events:#?}");
    assert_eq!(lost[0].level, Level::WARN);
    assert_eq!(lost[0].field("reason"), LostReason::KeyDeleted.to_string());
    assert_eq!(lost[0].field("token"), deleted.fencing_token().to_string());

    // A lost lease is a WARN too.
    second.faults().expire_lease();
    let events = captured.take_events();
    let lease_lost = with_message(&events, "the lease is lost");
    assert_eq!(lease_lost.len(), 1, "{events:#?}");
    assert_eq!(lease_lost[0].level, Level::WARN);
    assert!(!lease_lost[0].field("lease").is_empty());
}
