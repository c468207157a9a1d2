//! A service in which only the lock holder works, and the unit tests that prove it stops
//! working within one step of losing its lock: the tests to copy into your own service.
//!
//! The service ([`run_worker`]) runs on any [`Kvi`] (etcd in production, memory in tests). Each
//! replica waits for the lock `billing`, then does one step of work after another for as long
//! as it holds it, racing every step against [`LockGuard::lost`]; when the lock is lost it goes
//! back to waiting. The tests use [`MemKvs::faults`] to cause what takes an outage on etcd (a
//! lease that expires, a network partition longer than `lease_ttl`) under Tokio's paused
//! clock, so that a 30-second lease expires in microseconds.
//!
//! Run the tests with `cargo test -p hmetcd-mem --example failover_test`, the demo with
//! `cargo run -p hmetcd-mem --example failover_test`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hmetcd_core::{Kvi, LockGuard, LostReason};
use hmetcd_mem::MemKvs;

/// How long one step of work takes.
const STEP: Duration = Duration::from_secs(1);

/// What a replica did: the steps it completed, and why it last lost the lock.
#[derive(Debug, Default)]
struct Progress {
    steps: AtomicU64,
    losses: std::sync::Mutex<Vec<LostReason>>,
}

impl Progress {
    fn steps(&self) -> u64 {
        self.steps.load(Ordering::SeqCst)
    }

    fn losses(&self) -> Vec<LostReason> {
        self.losses.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// One step of work, done only by the lock holder. The fencing token goes with the write, so
/// that a reader (or a conditional write) can refuse work from a holder that lost the lock.
async fn step(kv: &dyn Kvi, guard: &LockGuard, n: u64) -> hmetcd_core::Result<()> {
    tokio::time::sleep(STEP).await;
    kv.store(
        "billing/progress",
        &format!("{} {n}", guard.fencing_token()),
    )
    .await
}

/// The service: holds the lock `billing` and works while it holds it, forever.
async fn run_worker(kv: Arc<dyn Kvi>, progress: Arc<Progress>) {
    loop {
        let guard = match kv.lock("billing").await {
            Ok(guard) => guard,
            Err(err) => {
                // Unreachable store, closed handle: try again in a moment.
                tracing::debug!(error = %err, "cannot take the lock yet");
                tokio::time::sleep(STEP).await;
                continue;
            }
        };
        let lost = guard.lost();
        tokio::pin!(lost);
        let reason = loop {
            let n = progress.steps() + 1;
            tokio::select! {
                // Biased: once the lock is lost, no further step starts.
                biased;
                reason = &mut lost => break reason,
                done = step(&*kv, &guard, n) => match done {
                    Ok(()) => {
                        progress.steps.fetch_add(1, Ordering::SeqCst);
                    }
                    // A failed step is not done; the next one tries again.
                    Err(err) => tracing::debug!(error = %err, "step failed"),
                },
            }
        };
        if let Ok(mut losses) = progress.losses.lock() {
            losses.push(reason);
        }
    }
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> hmetcd_core::Result<()> {
    let a = MemKvs::open("failover-demo", "lease_ttl=30s")?;
    let b: Arc<dyn Kvi> = Arc::new(a.open_sibling("lease_ttl=30s")?);
    let faults = a.faults();
    let a: Arc<dyn Kvi> = Arc::new(a);
    let (pa, pb) = (Arc::new(Progress::default()), Arc::new(Progress::default()));
    tokio::spawn(run_worker(Arc::clone(&a), Arc::clone(&pa)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    tokio::spawn(run_worker(Arc::clone(&b), Arc::clone(&pb)));
    tokio::time::sleep(STEP * 5).await;
    faults.partition(true);
    tokio::time::sleep(Duration::from_secs(60)).await;
    faults.partition(false);
    tokio::time::sleep(STEP * 5).await;
    tracing::info!(a = pa.steps(), b = pb.steps(), "done");
    let report = format!(
        "replica A: {} steps, lost the lock: {:?}; replica B: {} steps\n",
        pa.steps(),
        pa.losses(),
        pb.steps()
    );
    use std::io::Write;
    let _ = std::io::stdout().write_all(report.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use hmetcd_mem::Faults;

    use super::*;

    /// Two replicas of the service on one memory store; A starts first and holds the lock.
    async fn two_replicas(store: &str) -> (Faults, Arc<Progress>, Arc<Progress>) {
        let a = MemKvs::open(store, "lease_ttl=30s").expect("open A");
        let b = a.open_sibling("lease_ttl=30s").expect("open B");
        let faults = a.faults();
        let (pa, pb) = (Arc::new(Progress::default()), Arc::new(Progress::default()));
        tokio::spawn(run_worker(Arc::new(a), Arc::clone(&pa)));
        tokio::time::sleep(Duration::from_millis(1)).await;
        tokio::spawn(run_worker(Arc::new(b), Arc::clone(&pb)));
        tokio::time::sleep(STEP * 5 + Duration::from_millis(1)).await;
        assert_eq!((pa.steps(), pb.steps()), (5, 0), "only the holder works");
        (faults, pa, pb)
    }

    #[tokio::test(start_paused = true)]
    async fn stops_within_one_step_of_losing_its_lease() {
        let (faults, a, b) = two_replicas("failover-expiry").await;
        faults.expire_lease();
        let at_loss = a.steps();
        tokio::time::sleep(STEP * 10).await;
        assert!(a.steps() <= at_loss + 1, "A worked on without the lock");
        assert_eq!(a.losses(), [LostReason::SessionLost]);
        assert!(b.steps() >= 9, "B took over: {} steps", b.steps());
    }

    #[tokio::test(start_paused = true)]
    async fn stops_within_one_step_of_a_partition_outlasting_its_lease() {
        let (faults, a, b) = two_replicas("failover-partition").await;
        faults.partition(true);
        // Cut off, A's steps fail; the lease lasts 30 s, then B takes over.
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(b.steps(), 0, "B worked while A still held the lock");
        let at_cut = a.steps();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(a.losses(), [LostReason::SessionLost]);
        assert!(a.steps() <= at_cut + 1);
        faults.partition(false);
        tokio::time::sleep(STEP * 10).await;
        assert!(
            a.steps() <= at_cut + 1,
            "A came back and worked without the lock"
        );
        assert!(b.steps() >= 9, "B works: {} steps", b.steps());
    }
}
