//! Small helpers for retries and background work: sending a request again when its connection
//! failed under it, backoff between retries, abort-on-drop tasks, shutdown.

use std::error::Error as StdError;
use std::time::Duration;

use etcd_client::Error as EtcdError;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How many times one call's request is sent again at most (see [`resending!`]).
const MAX_RESENDS: u32 = 2;
/// The pause before a request is sent a second time again (the first goes at once).
const RESEND_PAUSE: Duration = Duration::from_millis(20);

/// When a request that failed before etcd answered may be sent again (see [`resending!`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resend {
    /// A read: again whenever the connection failed under it. A read sent twice does no harm.
    Read,
    /// A write: again only when it never went out (hyper dropped it before sending it, its
    /// connection closing). A write whose connection broke after it went out may have been
    /// applied, and sent again it could be applied twice, or over a later write.
    Write,
}

impl Resend {
    /// Whether a request of this kind that failed with `err` may be sent again.
    pub(crate) fn allows(self, err: &EtcdError) -> bool {
        match self {
            Resend::Read => failed_in_transport(err),
            Resend::Write => never_sent(err),
        }
    }
}

/// What caused `err`, outermost first (etcd-client's error does not name its source itself).
fn causes(err: &EtcdError) -> impl Iterator<Item = &(dyn StdError + 'static)> {
    let first: Option<&(dyn StdError + 'static)> = match err {
        EtcdError::GRpcStatus(status) => Some(status),
        EtcdError::TransportError(transport) => Some(transport),
        EtcdError::IoError(io) => Some(io),
        _ => None,
    };
    std::iter::successors(first, |&cause| cause.source())
}

/// Whether the request failed in the connection (broken, closed, not made), not by etcd's
/// answer: a gRPC status that etcd sent has no transport error behind it.
fn failed_in_transport(err: &EtcdError) -> bool {
    causes(err).any(|cause| cause.is::<hyper::Error>() || cause.is::<std::io::Error>())
}

/// Whether hyper dropped the request before it went out on a connection: its connection was
/// closing ("connection closed") or not ready. etcd never saw it.
fn never_sent(err: &EtcdError) -> bool {
    causes(err).any(|cause| {
        cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
    })
}

/// Evaluates `$send` (an awaited etcd request, `Result<_, etcd_client::Error>`), and again while
/// [`Resends::again`] allows for a request of kind `$resend` ([`Resend`]).
macro_rules! resending {
    ($resend:expr, $send:expr) => {{
        let mut resends = $crate::retry::Resends::new($resend);
        loop {
            match $send {
                Err(err) if resends.again(&err).await => {}
                outcome => break outcome,
            }
        }
    }};
}
pub(crate) use resending;

/// One call's budget of resends (see [`resending!`]): the first request after a connection
/// breaks typically meets the dying connection, and sent again it goes out on a new one. A
/// member that stays down fails each attempt at once, so the call still fails fast; the caller
/// bounds the whole by its `request_timeout`.
#[derive(Debug)]
pub(crate) struct Resends {
    resend: Resend,
    used: u32,
}

impl Resends {
    pub(crate) fn new(resend: Resend) -> Self {
        Resends { resend, used: 0 }
    }

    /// Whether the request that failed with `err` is to be sent again (at most
    /// [`MAX_RESENDS`] times, as `resend` allows); pauses first when it is not the first resend.
    pub(crate) async fn again(&mut self, err: &EtcdError) -> bool {
        if self.used >= MAX_RESENDS || !self.resend.allows(err) {
            return false;
        }
        tracing::debug!(error = %err, resend = ?self.resend, "the request failed before etcd answered; sending it again");
        if self.used > 0 {
            tokio::time::sleep(RESEND_PAUSE).await;
        }
        self.used += 1;
        true
    }
}

/// The first pause after a failure.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
/// The longest pause between two attempts.
const LONGEST_PAUSE: Duration = Duration::from_secs(2);

/// Exponential backoff with jitter: the n-th pause is drawn uniformly from [b/2, b] for
/// b = 100 ms, 200 ms, ... up to 2 s ("equal jitter"), so that many clients that lost etcd
/// at the same moment (a restart) do not all retry in lockstep.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff { next: FIRST_PAUSE }
    }

    /// The pause before the next attempt.
    pub(crate) fn next_pause(&mut self) -> Duration {
        let bound = self.next;
        self.next = (self.next * 2).min(LONGEST_PAUSE);
        let half = bound / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(fastrand::u64(0..=nanos))
    }

    pub(crate) fn reset(&mut self) {
        self.next = FIRST_PAUSE;
    }
}

/// A spawned task that is aborted when this guard is dropped.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves once the handle is closed or dropped (the sender sends `true` or goes away).
pub(crate) async fn shut_down(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: the handle was dropped.
    let _ = shutdown.wait_for(|closed| *closed).await;
}

/// Sleeps for `pause`; `false` if the handle was shut down meanwhile.
pub(crate) async fn pause_unless_shut_down(
    pause: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        () = shut_down(shutdown) => false,
        () = tokio::time::sleep(pause) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: std::io::ErrorKind) -> std::io::Error {
        std::io::Error::new(kind, "stream closed because of a broken pipe")
    }

    #[test]
    fn only_a_read_is_sent_again_after_a_broken_connection() {
        let broken = [
            EtcdError::IoError(io(std::io::ErrorKind::BrokenPipe)),
            // How tonic reports a transport failure: a status with the failure as its source.
            EtcdError::GRpcStatus(tonic::Status::from_error(Box::new(io(
                std::io::ErrorKind::BrokenPipe,
            )))),
        ];
        for err in &broken {
            assert!(Resend::Read.allows(err), "{err}");
            assert!(!Resend::Write.allows(err), "{err}");
        }
        // etcd's own answers are not transport failures, whatever their code.
        let answered = [
            EtcdError::GRpcStatus(tonic::Status::unavailable("etcdserver: leader changed")),
            EtcdError::GRpcStatus(tonic::Status::not_found(
                "etcdserver: requested lease not found",
            )),
            EtcdError::InvalidArgs("bad".to_owned()),
        ];
        for err in &answered {
            assert!(!Resend::Read.allows(err), "{err}");
            assert!(!Resend::Write.allows(err), "{err}");
        }
    }

    #[tokio::test]
    async fn resends_are_bounded_and_only_the_first_goes_at_once() {
        let broken = EtcdError::IoError(io(std::io::ErrorKind::BrokenPipe));
        let mut resends = Resends::new(Resend::Read);
        let began = std::time::Instant::now();
        assert!(resends.again(&broken).await);
        assert!(began.elapsed() < RESEND_PAUSE, "the first resend waited");
        assert!(resends.again(&broken).await);
        assert!(
            began.elapsed() >= RESEND_PAUSE,
            "the second resend did not wait"
        );
        assert!(!resends.again(&broken).await, "a third resend");
        let mut attempts = 0;
        let outcome: Result<(), EtcdError> = resending!(Resend::Read, {
            attempts += 1;
            Err(EtcdError::IoError(io(std::io::ErrorKind::BrokenPipe)))
        });
        assert!(outcome.is_err());
        assert_eq!(attempts, 1 + MAX_RESENDS);
        let mut attempts = 0;
        let outcome: Result<(), EtcdError> = resending!(Resend::Write, {
            attempts += 1;
            Err(EtcdError::IoError(io(std::io::ErrorKind::BrokenPipe)))
        });
        assert!(outcome.is_err());
        assert_eq!(attempts, 1, "a write that may have gone out, sent again");
    }

    #[test]
    fn pauses_grow_within_their_bounds_and_vary() {
        let mut pauses = Vec::new();
        for _ in 0..50 {
            let mut backoff = Backoff::new();
            let mut bound = FIRST_PAUSE;
            for _ in 0..8 {
                let pause = backoff.next_pause();
                assert!(
                    pause >= bound / 2 && pause <= bound,
                    "{pause:?} outside [{:?}, {bound:?}]",
                    bound / 2
                );
                bound = (bound * 2).min(LONGEST_PAUSE);
                pauses.push(pause);
            }
        }
        let first = pauses[0];
        assert!(
            pauses.iter().step_by(8).any(|pause| *pause != first),
            "50 first pauses all {first:?}: no jitter"
        );
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new();
        for _ in 0..10 {
            backoff.next_pause();
        }
        assert!(backoff.next_pause() >= LONGEST_PAUSE / 2);
        backoff.reset();
        assert!(backoff.next_pause() <= FIRST_PAUSE);
    }
}
