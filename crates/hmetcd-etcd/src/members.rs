//! Keeping cluster members that do not answer out of the handle's balanced channel.
//!
//! etcd-client spreads requests over all endpoints and keeps sending a share of them to a
//! member that is down: a killed member fails them at once, a frozen or cut-off one lets each
//! wait for the whole `request_timeout`. With more than one endpoint, a background task asks
//! every member for its status about twice a second, on a client of its own per member (same
//! TLS options, no credentials: it sends no keys and needs no token), takes a member that does
//! not answer out of the handle's channel and puts it back once it answers again. A member
//! without a leader counts as not answering, as the handle requires a leader too. When no
//! member answers at all, the rotation stays as it is: that is no member's fault.
//!
//! The probes also learn each member's version, for [`crate::server_version`].

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use hmetcd_core::{EtcdUrl, Options};
use tokio::sync::watch;
use tonic::Code;

use crate::connect;
use crate::retry::{pause_unless_shut_down, AbortOnDrop};
use crate::server_version::ReadOnlyTxns;

/// The pause between two rounds of probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// The longest a member may take to answer a probe.
const LONGEST_PROBE: Duration = Duration::from_secs(1);

/// Starts the health task for a handle with more than one endpoint; `None` for a single one
/// (there is nothing to route around then) or when the probe clients cannot be set up.
pub(crate) fn spawn_health_task(
    client: &Client,
    urls: &[EtcdUrl],
    options: &Options,
    read_only_txns: ReadOnlyTxns,
    shutdown: watch::Receiver<bool>,
) -> Option<AbortOnDrop> {
    let timeout = options.request_timeout.min(LONGEST_PROBE);
    let (mut dial, probe_options) = match connect::probe_arguments(urls, options, timeout) {
        Ok(arguments) => arguments,
        Err(err) => {
            tracing::debug!(error = %err, "no health checks of the etcd members");
            return None;
        }
    };
    // The channel knows a URL given twice as one member.
    let mut seen = std::collections::HashSet::new();
    dial.retain(|url| seen.insert(url.clone()));
    if dial.len() < 2 {
        return None;
    }
    let members = dial
        .into_iter()
        .map(|url| Member {
            url,
            probe: None,
            in_rotation: true,
            version: None,
        })
        .collect();
    let task = HealthTask {
        client: client.clone(),
        members,
        probe_options,
        timeout,
        read_only_txns,
    };
    Some(AbortOnDrop(tokio::spawn(task.run(shutdown))))
}

struct Member {
    /// The URL as the handle's channel knows it.
    url: String,
    /// A client on this member alone, made on first use.
    probe: Option<Client>,
    /// Whether the handle's channel sends requests to it.
    in_rotation: bool,
    /// Its version, from its last status answer.
    version: Option<String>,
}

struct HealthTask {
    /// The handle's client, whose balanced channel the members are taken out of.
    client: Client,
    members: Vec<Member>,
    probe_options: ConnectOptions,
    timeout: Duration,
    /// Told the members' versions after every round.
    read_only_txns: ReadOnlyTxns,
}

impl HealthTask {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        // The first round goes at once: until it has every member's version, reads are not
        // batched (see `server_version`).
        loop {
            let answers = self.probe_all().await;
            self.learn_versions(&answers);
            self.rotate(&answers).await;
            if !pause_unless_shut_down(PROBE_INTERVAL, &mut shutdown).await {
                return;
            }
        }
    }

    fn learn_versions(&mut self, answers: &[Result<Option<String>, String>]) {
        for (member, answer) in self.members.iter_mut().zip(answers) {
            if let Ok(Some(version)) = answer {
                member.version = Some(version.clone());
            }
        }
        self.read_only_txns
            .set_from(self.members.iter().map(|member| member.version.as_deref()));
    }

    /// Probes every member at once: `Ok` if it answered with a leader (with its version when
    /// the answer was a status), else why not.
    async fn probe_all(&mut self) -> Vec<Result<Option<String>, String>> {
        let (options, timeout) = (&self.probe_options, self.timeout);
        futures::future::join_all(
            self.members
                .iter_mut()
                .map(|member| probe(member, options, timeout)),
        )
        .await
    }

    async fn rotate(&mut self, answers: &[Result<Option<String>, String>]) {
        if answers.iter().all(Result::is_err) {
            return;
        }
        // Members come back before others go, so the channel is never empty.
        for (member, answer) in self.members.iter_mut().zip(answers) {
            if answer.is_ok() && !member.in_rotation {
                match self.client.add_endpoint(&member.url).await {
                    Ok(()) => {
                        member.in_rotation = true;
                        tracing::info!(member = %member.url, "etcd member answers again; sending it requests");
                    }
                    Err(err) => {
                        tracing::debug!(member = %member.url, error = %err, "cannot put the etcd member back")
                    }
                }
            }
        }
        for (member, answer) in self.members.iter_mut().zip(answers) {
            if let Err(reason) = answer {
                if member.in_rotation {
                    match self.client.remove_endpoint(&member.url).await {
                        Ok(()) => {
                            member.in_rotation = false;
                            tracing::warn!(
                                member = %member.url,
                                reason = %reason,
                                "etcd member does not answer; sending requests to the others"
                            );
                        }
                        Err(err) => {
                            tracing::debug!(member = %member.url, error = %err, "cannot take the etcd member out")
                        }
                    }
                }
            }
        }
    }
}

async fn probe(
    member: &mut Member,
    options: &ConnectOptions,
    timeout: Duration,
) -> Result<Option<String>, String> {
    let client = match &member.probe {
        Some(client) => client.clone(),
        None => {
            // Without credentials this only sets up the channel; it connects on first use.
            let client = Client::connect([member.url.as_str()], Some(options.clone()))
                .await
                .map_err(|err| err.to_string())?;
            member.probe = Some(client.clone());
            client
        }
    };
    let mut maintenance = client.maintenance_client();
    match tokio::time::timeout(timeout, maintenance.status()).await {
        Err(_) => Err(format!("no answer within {timeout:?}")),
        Ok(Ok(status)) if status.leader() == 0 => Err("no leader".to_owned()),
        Ok(Ok(status)) => Ok(Some(status.version().to_owned())),
        Ok(Err(err)) if answered(&err) => Ok(None),
        Ok(Err(err)) => Err(err.to_string()),
    }
}

/// Whether an error came from a member that is up and has a leader (a refusal, for example
/// when the cluster wants credentials for the status request).
fn answered(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::GRpcStatus(status) => match status.code() {
            Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => false,
            Code::Unknown => status.message() != "transport error",
            _ => true,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Status;

    #[test]
    fn refusals_are_answers_but_lost_connections_are_not() {
        let status = |status: Status| etcd_client::Error::GRpcStatus(status);
        assert!(answered(&status(Status::permission_denied("denied"))));
        assert!(answered(&status(Status::invalid_argument(
            "etcdserver: user name is empty"
        ))));
        assert!(!answered(&status(Status::unavailable(
            "etcdserver: no leader"
        ))));
        assert!(!answered(&status(Status::deadline_exceeded("late"))));
        assert!(!answered(&status(Status::unknown("transport error"))));
        assert!(!answered(&etcd_client::Error::InvalidArgs("x".to_owned())));
    }
}
