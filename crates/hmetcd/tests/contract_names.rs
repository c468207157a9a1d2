//! The contract's "Names" section, written the way a caller writes it: if a name or a
//! signature changes, this stops compiling.

use std::str::FromStr;
use std::time::Duration;

use futures::StreamExt;
use hmetcd::{
    Compare, CompareOp, Error, KeyChange, KeyValue, Kvi, LeaderStream, Leadership, ListPage,
    ListRequest, LockGuard, LockOptions, LostReason, Op, Result, Txn, TxnOutcome, WatchCallback,
    WatchEvent, WatchHandle, WatchStream,
};

fn error_names(err: &Error) -> &'static str {
    match err {
        Error::InvalidEndpoint { .. } => "InvalidEndpoint",
        Error::InvalidOption { .. } => "InvalidOption",
        Error::InvalidKey { .. } => "InvalidKey",
        Error::InvalidOperator { .. } => "InvalidOperator",
        Error::LockTimeout { .. } => "LockTimeout",
        Error::Timeout { .. } => "Timeout",
        Error::Unavailable { .. } => "Unavailable",
        Error::Closed => "Closed",
        Error::Compacted { .. } => "Compacted",
        Error::Unauthenticated { .. } => "Unauthenticated",
        Error::InvalidUtf8 { .. } => "InvalidUtf8",
        Error::NotSupported { .. } => "NotSupported",
        Error::Backend { .. } => "Backend",
        Error::NotLeader { .. } => "NotLeader",
        Error::InvalidArgument { .. } => "InvalidArgument",
        _ => "other",
    }
}

async fn every_method(kv: &dyn Kvi) -> Result<()> {
    kv.dist_lock().await?;
    kv.dist_timed_lock(Duration::from_millis(10)).await?;
    kv.dist_unlock().await?;
    kv.store("k", "v").await?;
    kv.temp_key("t").await?;
    let value: Option<String> = kv.get("k").await?;
    assert_eq!(value.as_deref(), Some("v"));
    let pairs: Vec<KeyValue> = kv.get_range("a", "z").await?;
    let pairs: Vec<(&str, &str)> = pairs.iter().map(KeyValue::pair).collect();
    assert_eq!(pairs, [("k", "v"), ("t", "1")]);
    kv.delete("k").await?;
    let ran_then: bool = kv
        .transaction("t", CompareOp::Equal, "1", "a", "then", "b", "else")
        .await?;
    assert!(ran_then);
    let set: bool = kv.tas("a", "then", "set").await?;
    assert!(set);
    let mut stream: WatchStream = kv.watch_stream("w").await?;
    let mut prefixed: WatchStream = kv.watch_prefix("w").await?;
    let cb: WatchCallback = Box::new(|event: &WatchEvent| event.value() != Some("stop"));
    let handle: WatchHandle = kv.watch_with_cb("w", KeyChange::Put, cb).await?;
    kv.store("w", "x").await?;
    let event = stream.next().await.transpose()?;
    assert!(
        matches!(&event, Some(WatchEvent::Put { key, value, revision }) if key == "w" && value == "x" && *revision > 0)
    );
    let event = prefixed.next().await.transpose()?;
    assert_eq!(event.as_ref().map(WatchEvent::key), Some("w"));
    assert_eq!(event.as_ref().map(WatchEvent::change), Some(KeyChange::Put));
    assert!(event.as_ref().map(WatchEvent::revision).unwrap_or(0) > 0);
    assert!(!handle.is_finished());
    kv.watch_cb_cancel(handle);
    let waiter = kv.watch("w");
    let (event, stored) = futures::join!(waiter, async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        kv.delete("w").await
    });
    stored?;
    assert!(matches!(event?, WatchEvent::Delete { ref key, .. } if key == "w"));
    let guard: LockGuard = kv.lock("jobs").await?;
    assert_eq!(guard.name(), "jobs");
    assert!(guard.is_held());
    let token: i64 = guard.fencing_token();
    assert!(token > 0);
    let lost: futures::future::BoxFuture<'static, LostReason> = guard.lost();
    drop(lost);
    guard.unlock().await?;
    let next = kv.lock("jobs").await?;
    assert!(next.fencing_token() > token);
    let reasons = [
        LostReason::MaxHold,
        LostReason::SessionLost,
        LostReason::Closed,
        LostReason::KeyDeleted,
    ];
    assert_eq!(reasons.len(), 4);
    next.unlock().await?;
    let options: LockOptions = LockOptions::new()
        .timeout(Duration::from_secs(1))
        .max_hold(Duration::from_secs(60));
    assert_eq!(options.get_timeout(), Some(Duration::from_secs(1)));
    assert_eq!(options.get_max_hold(), Some(Duration::from_secs(60)));
    let guard = kv.lock_with("jobs", options).await?;
    let err = kv
        .lock_with(
            "jobs",
            LockOptions::new().timeout(Duration::from_millis(10)),
        )
        .await
        .err();
    assert_eq!(err.as_ref().map(error_names), Some("LockTimeout"));
    assert!(format!("{guard:?}").contains("jobs"));
    drop(guard);
    drop(kv.lock("jobs").await?);
    let err = kv.lock("").await.err();
    assert_eq!(err.as_ref().map(error_names), Some("InvalidKey"));
    elections(kv).await?;
    data_api(kv).await?;
    let kept = kv.lock("kept").await?;
    let led: Leadership = kv.campaign("kept-election", "v").await?;
    kv.close().await?;
    assert!(!kept.is_held());
    kept.unlock().await?;
    assert!(!led.is_leader());
    assert_eq!(led.lost().await, LostReason::Closed);
    led.resign().await?;
    let err = kv.get("k").await.err();
    assert_eq!(err.as_ref().map(error_names), Some("Closed"));
    let err = kv.lock("jobs").await.err();
    assert_eq!(err.as_ref().map(error_names), Some("Closed"));
    Ok(())
}

/// The contract's "Leader election" names.
async fn elections(kv: &dyn Kvi) -> Result<()> {
    let mut observed: LeaderStream = kv.observe("scheduler").await?;
    assert_eq!(observed.next().await.transpose()?, Some(None));
    let none: Option<KeyValue> = kv.leader("scheduler").await?;
    assert_eq!(none, None);
    let mut leadership: Leadership = kv.campaign("scheduler", "10.0.0.7:8080").await?;
    assert_eq!(leadership.name(), "scheduler");
    assert_eq!(leadership.value(), "10.0.0.7:8080");
    assert!(leadership.is_leader());
    let token: i64 = leadership.fencing_token();
    assert!(token > 0);
    let leader = kv.leader("scheduler").await?;
    assert_eq!(
        leader.as_ref().map(|kv| kv.value.as_str()),
        Some("10.0.0.7:8080")
    );
    assert_eq!(observed.next().await.transpose()?, Some(leader));
    leadership.proclaim("10.0.0.7:9090").await?;
    assert_eq!(leadership.value(), "10.0.0.7:9090");
    let proclaimed = observed.next().await.transpose()?.flatten();
    assert_eq!(
        proclaimed.map(|kv| kv.value).as_deref(),
        Some("10.0.0.7:9090")
    );
    let lost: futures::future::BoxFuture<'static, LostReason> = leadership.lost();
    drop(lost);
    let err = kv
        .campaign_with(
            "scheduler",
            "rival",
            LockOptions::new().timeout(Duration::from_millis(10)),
        )
        .await
        .err();
    assert_eq!(err.as_ref().map(error_names), Some("LockTimeout"));
    leadership.resign().await?;
    assert_eq!(observed.next().await.transpose()?, Some(None));
    let options = LockOptions::new().max_hold(Duration::from_millis(20));
    let mut bounded = kv.campaign_with("scheduler", "bounded", options).await?;
    assert!(bounded.fencing_token() > token);
    assert_eq!(bounded.lost().await, LostReason::MaxHold);
    let err = bounded.proclaim("too late").await.err();
    assert_eq!(err.as_ref().map(error_names), Some("NotLeader"));
    drop(bounded);
    Ok(())
}

/// The contract's "The data API" names.
async fn data_api(kv: &dyn Kvi) -> Result<()> {
    kv.store("data/a", "1").await?;
    let kv_a: Option<KeyValue> = kv.get_kv("data/a").await?;
    let Some(first) = kv_a else {
        panic!("data/a is missing");
    };
    let KeyValue {
        create_revision,
        mod_revision,
        version,
        lease,
        ..
    } = first;
    assert!(create_revision > 0 && mod_revision == create_revision);
    assert_eq!((version, lease), (1, 0));
    kv.store_temp("data/~temp", "mine").await?;
    let all: Vec<KeyValue> = kv.get_prefix("data/").await?;
    let pairs: Vec<(&str, &str)> = all.iter().map(KeyValue::pair).collect();
    assert_eq!(pairs, [("data/a", "1"), ("data/~temp", "mine")]);
    assert!(all[1].lease != 0);
    let page: ListPage = kv
        .list(ListRequest::prefix("data/").limit(1).keys_only())
        .await?;
    assert!(page.more && page.count == 2 && page.revision >= mod_revision);
    assert_eq!(page.items[0].pair(), ("data/a", ""));
    let rest = kv
        .list(ListRequest::range("data/", "data/~~").after("data/a"))
        .await?;
    assert!(!rest.more && rest.count == 1);
    let guard = kv.lock("data-lock").await?;
    let outcome: TxnOutcome = kv
        .txn(
            Txn::new()
                .when(Compare::value("data/a", CompareOp::Equal, "1"))
                .when(Compare::exists("data/a"))
                .when(Compare::missing("data/b"))
                .when(Compare::mod_revision(
                    "data/a",
                    CompareOp::Equal,
                    mod_revision,
                ))
                .when(Compare::version("data/a", CompareOp::Equal, 1))
                .when(Compare::held(&guard))
                .then(Op::put("data/b", "2"))
                .then(Op::put_temp("data/c", "3"))
                .then(Op::delete("data/a"))
                .then(Op::get("data/b"))
                .otherwise(Op::delete_prefix("data/")),
        )
        .await?;
    assert!(outcome.succeeded && outcome.revision > mod_revision);
    assert_eq!(
        outcome.gets[0].as_ref().map(KeyValue::pair),
        Some(("data/b", "2"))
    );
    let leadership = kv.campaign("data-election", "me").await?;
    let leading = kv
        .txn(
            Txn::new()
                .when(Compare::leading(&leadership))
                .then(Op::get("data/b")),
        )
        .await?;
    assert!(leading.succeeded);
    leadership.resign().await?;
    guard.unlock().await?;
    let err = kv.txn(Txn::new()).await.err();
    assert_eq!(err.as_ref().map(error_names), Some("InvalidArgument"));
    let written: Option<String> = kv
        .update("data/n", &mut |n| Some(format!("{}+", n.unwrap_or(""))))
        .await?;
    assert_eq!(written.as_deref(), Some("+"));
    let mut history: WatchStream = kv.watch_prefix_from("data/", create_revision).await?;
    let replayed = history.next().await.transpose()?;
    assert_eq!(replayed.as_ref().map(WatchEvent::key), Some("data/a"));
    let deleted: u64 = kv.delete_prefix("data/").await?;
    assert_eq!(deleted, 4);
    let err = kv.delete_prefix("").await.err();
    assert_eq!(err.as_ref().map(error_names), Some("InvalidKey"));
    Ok(())
}

#[tokio::test]
async fn the_contract_names_compile_and_work() -> Result<()> {
    assert_eq!(CompareOp::from_str("==")?, CompareOp::Equal);
    assert_eq!(
        CompareOp::from_str("<=").err().as_ref().map(error_names),
        Some("InvalidOperator")
    );

    let boxed: Box<dyn Kvi> = hmetcd::open("mem:contract-names", "").await?;
    every_method(&*boxed).await?;
    every_method(&hmetcd_mem::MemKvs::new()).await?;
    every_method(&hmetcd_mem::MemKvs::open("contract-names-2", "prefix=p/")?).await?;
    let shared: std::sync::Arc<dyn Kvi> = std::sync::Arc::new(hmetcd_mem::MemKvs::new());
    every_method(&shared).await?;
    Ok(())
}

/// `hmetcd_etcd::EtcdKvs::connect(endpoints, options).await`, as the contract names it.
#[cfg(feature = "etcd")]
#[allow(dead_code)]
async fn etcd_is_named_as_in_the_contract() -> Result<Box<dyn Kvi>> {
    Ok(Box::new(
        hmetcd_etcd::EtcdKvs::connect("http://127.0.0.1:2379,127.0.0.1:22379", "").await?,
    ))
}

/// The test kit as the contract names it: `MemKvs::faults()` and the three faults.
#[test]
fn the_test_kit_names_compile() {
    let faults: fn(&hmetcd_mem::MemKvs) -> hmetcd_mem::Faults = hmetcd_mem::MemKvs::faults;
    let expire_lease: fn(&hmetcd_mem::Faults) = hmetcd_mem::Faults::expire_lease;
    let partition: fn(&hmetcd_mem::Faults, bool) = hmetcd_mem::Faults::partition;
    let compact: fn(&hmetcd_mem::Faults, i64) = hmetcd_mem::Faults::compact;
    let kv = hmetcd_mem::MemKvs::new();
    let kit = faults(&kv);
    compact(&kit, 1);
    expire_lease(&kit);
    partition(&kit, false);
}
