//! Checks of the etcd backend's coalescing shared by the etcd-only test binaries.

use std::sync::Arc;

use hmetcd_core::Kvi;
use hmetcd_etcd::EtcdKvs;

/// Whether etcd `version` crashes when a read-only transaction is cancelled in flight: 3.5.0
/// to 3.5.4 and their pre-releases (etcd issue 14110, fixed in 3.5.5). Written out here, apart
/// from the library's own rule, so that the tests check the library against it.
pub fn crashes_on_cancelled_read_txn(version: &str) -> bool {
    ["3.5.0", "3.5.1", "3.5.2", "3.5.3", "3.5.4"]
        .iter()
        .any(|bad| version == *bad || version.starts_with(&format!("{bad}-")))
}

/// Stores 16 keys through `kv`, reads them with 64 concurrent gets five times over, and checks
/// that the reads were batched (as read-only transactions) exactly where etcd `version`
/// survives a cancelled one: some batches on any other version, none on 3.5.0 to 3.5.4.
pub async fn assert_reads_batched_only_where_safe(kv: Arc<EtcdKvs>, version: &str) {
    for key in 0..16 {
        kv.store(&format!("batched/{key}"), "v")
            .await
            .expect("store");
    }
    let before = kv.coalesce_stats();
    for _ in 0..5 {
        let reads: Vec<_> = (0..64)
            .map(|read| {
                let kv = Arc::clone(&kv);
                tokio::spawn(async move { kv.get(&format!("batched/{}", read % 16)).await })
            })
            .collect();
        for read in reads {
            let value = read.await.expect("task").expect("get");
            assert_eq!(value.as_deref(), Some("v"));
        }
    }
    let batches = kv.coalesce_stats().batches - before.batches;
    if crashes_on_cancelled_read_txn(version) {
        assert_eq!(batches, 0, "etcd {version}: reads must not be batched");
    } else {
        assert!(
            batches > 0,
            "etcd {version}: 320 concurrent gets made no batch"
        );
    }
}
