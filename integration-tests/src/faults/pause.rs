//! Holding a handle's background work at one step (`hmetcd-etcd`'s pause points), to stage a
//! fault at that step.

use std::time::Duration;

use hmetcd_etcd::{EtcdKvs, PausePoint};

/// Waits until `count` arrivals at `point` of `kv` since the point was held; panics (failing
/// the test) after `limit`, saying `what` did not happen.
pub async fn arrivals(kv: &EtcdKvs, point: PausePoint, count: u64, limit: Duration, what: &str) {
    if tokio::time::timeout(limit, kv.pause_points().arrivals(point, count))
        .await
        .is_err()
    {
        panic!("{what}: not within {limit:?} ({point:?} reached fewer than {count} times)");
    }
}

/// Holds `kv`'s keep-alive renewals and waits until the next one is due. From then on its lease
/// has, in its own eyes, a TTL less one renewal interval (a third of the TTL) and a 250 ms
/// margin of validity left, and no renewal goes out until the point is let go.
pub async fn hold_renewals(kv: &EtcdKvs, lease_ttl: Duration) {
    kv.pause_points().hold(PausePoint::KeepAliveRenewal);
    arrivals(
        kv,
        PausePoint::KeepAliveRenewal,
        1,
        lease_ttl * 2,
        "the handle's next renewal",
    )
    .await;
}
