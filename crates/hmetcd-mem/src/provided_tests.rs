//! The methods `Kvi` provides to an implementation that does not write them: a `Kvi` of one's
//! own (here, one that hands every call to a [`MemKvs`] but `update`) gets them working.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hmetcd_core::{
    CompareOp, KeyChange, KeyValue, Kvi, LeaderStream, Leadership, ListPage, ListRequest,
    LockGuard, LockOptions, Result, Txn, TxnOutcome, WatchCallback, WatchEvent, WatchHandle,
    WatchStream,
};

use crate::MemKvs;

/// A `Kvi` that writes every method but the provided ones.
#[derive(Debug)]
struct Plain(MemKvs);

#[async_trait]
impl Kvi for Plain {
    async fn dist_lock(&self) -> Result<()> {
        self.0.dist_lock().await
    }
    async fn dist_timed_lock(&self, timeout: Duration) -> Result<()> {
        self.0.dist_timed_lock(timeout).await
    }
    async fn dist_unlock(&self) -> Result<()> {
        self.0.dist_unlock().await
    }
    async fn store(&self, key: &str, value: &str) -> Result<()> {
        self.0.store(key, value).await
    }
    async fn temp_key(&self, key: &str) -> Result<()> {
        self.0.temp_key(key).await
    }
    async fn get(&self, key: &str) -> Result<Option<String>> {
        self.0.get(key).await
    }
    async fn get_range(&self, key_start: &str, key_end: &str) -> Result<Vec<KeyValue>> {
        self.0.get_range(key_start, key_end).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.0.delete(key).await
    }
    async fn transaction(
        &self,
        key: &str,
        op: CompareOp,
        value: &str,
        then_key: &str,
        then_value: &str,
        else_key: &str,
        else_value: &str,
    ) -> Result<bool> {
        self.0
            .transaction(key, op, value, then_key, then_value, else_key, else_value)
            .await
    }
    async fn tas(&self, key: &str, test_value: &str, set_value: &str) -> Result<bool> {
        self.0.tas(key, test_value, set_value).await
    }
    async fn watch(&self, key: &str) -> Result<WatchEvent> {
        self.0.watch(key).await
    }
    async fn watch_with_cb(
        &self,
        key: &str,
        change: KeyChange,
        cb: WatchCallback,
    ) -> Result<WatchHandle> {
        self.0.watch_with_cb(key, change, cb).await
    }
    fn watch_cb_cancel(&self, handle: WatchHandle) {
        self.0.watch_cb_cancel(handle)
    }
    async fn close(&self) -> Result<()> {
        self.0.close().await
    }
    async fn watch_stream(&self, key: &str) -> Result<WatchStream> {
        self.0.watch_stream(key).await
    }
    async fn watch_prefix(&self, prefix: &str) -> Result<WatchStream> {
        self.0.watch_prefix(prefix).await
    }
    async fn lock(&self, name: &str) -> Result<LockGuard> {
        self.0.lock(name).await
    }
    async fn lock_with(&self, name: &str, options: LockOptions) -> Result<LockGuard> {
        self.0.lock_with(name, options).await
    }
    async fn campaign(&self, name: &str, value: &str) -> Result<Leadership> {
        self.0.campaign(name, value).await
    }
    async fn campaign_with(
        &self,
        name: &str,
        value: &str,
        options: LockOptions,
    ) -> Result<Leadership> {
        self.0.campaign_with(name, value, options).await
    }
    async fn leader(&self, name: &str) -> Result<Option<KeyValue>> {
        self.0.leader(name).await
    }
    async fn observe(&self, name: &str) -> Result<LeaderStream> {
        self.0.observe(name).await
    }
    async fn get_kv(&self, key: &str) -> Result<Option<KeyValue>> {
        self.0.get_kv(key).await
    }
    async fn get_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        self.0.get_prefix(prefix).await
    }
    async fn list(&self, request: ListRequest) -> Result<ListPage> {
        self.0.list(request).await
    }
    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        self.0.delete_prefix(prefix).await
    }
    async fn store_temp(&self, key: &str, value: &str) -> Result<()> {
        self.0.store_temp(key, value).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        self.0.txn(txn).await
    }
    async fn watch_prefix_from(&self, prefix: &str, revision: i64) -> Result<WatchStream> {
        self.0.watch_prefix_from(prefix, revision).await
    }
}

#[tokio::test]
async fn provided_update_writes_what_f_returns_and_none_deletes() {
    let kv = Plain(MemKvs::new());
    let mut seen = Vec::new();
    let mut f = |current: Option<&str>| {
        seen.push(current.map(str::to_owned));
        Some(format!("{}+", current.unwrap_or("")))
    };
    assert_eq!(kv.update("k", &mut f).await.unwrap(), Some("+".to_owned()));
    assert_eq!(kv.update("k", &mut f).await.unwrap(), Some("++".to_owned()));
    assert_eq!(seen, [None, Some("+".to_owned())]);
    assert_eq!(kv.get("k").await.unwrap().as_deref(), Some("++"));

    assert_eq!(kv.update("k", &mut |_| None).await.unwrap(), None);
    assert_eq!(kv.get("k").await.unwrap(), None);
    assert!(
        kv.update("", &mut |_| Some("v".to_owned())).await.is_err(),
        "an empty key is refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provided_update_loses_no_increment_under_contention() {
    let kv = Arc::new(Plain(MemKvs::new()));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let kv = Arc::clone(&kv);
            tokio::spawn(async move {
                for _ in 0..50 {
                    let mut increment = |current: Option<&str>| {
                        let n: u64 = current.map_or(0, |v| v.parse().unwrap());
                        Some((n + 1).to_string())
                    };
                    kv.update("counter", &mut increment).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(kv.get("counter").await.unwrap().as_deref(), Some("400"));
}
