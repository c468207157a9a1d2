//! Leader election: [`Kvi::campaign`](crate::Kvi::campaign) hands back a [`Leadership`],
//! [`Kvi::leader`](crate::Kvi::leader) and [`Kvi::observe`](crate::Kvi::observe) tell who
//! leads.
//!
//! The layout is etcd's election layout (Go's `concurrency.Election`, `etcdctl elect`): a
//! candidate puts `<name>/<lease id in hex>` = its value, bound to its handle's lease, and the
//! leader is the candidate whose key has the lowest create revision. Candidates therefore lead
//! in the order they campaigned, and Go services and `etcdctl elect` take part in the same
//! queue. An election follows the rules of a named lock (an election and a lock of the same
//! name are the same queue): `campaign_with` gives up after a timeout leaving no trace, and
//! `max_hold` bounds a term.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;

use crate::keys::is_participant_key;
use crate::{Error, KeyValue, LockRelease, LostReason, Result, WatchEvent, WatchStream};

/// The leaders of an election, as [`Kvi::observe`](crate::Kvi::observe) yields them: the
/// current one first (`None` when there is none), then every change.
pub type LeaderStream = BoxStream<'static, Result<Option<KeyValue>>>;

/// The backend side of a [`Leadership`]: a held lock that can also change its value.
/// Applications never use this; backends implement it and build leaderships with
/// [`Leadership::from_backend`].
pub trait Candidacy: LockRelease {
    /// Puts `value` on the candidate's key, only while it still leads (a transaction on the
    /// key's create revision); [`Error::NotLeader`] once the leadership is lost.
    fn proclaim(&self, value: &str) -> BoxFuture<'static, Result<()>>;
}

/// The leadership of an election, held until this value is dropped or
/// [`resign`](Leadership::resign)ed.
///
/// Made by [`Kvi::campaign`](crate::Kvi::campaign) and
/// [`Kvi::campaign_with`](crate::Kvi::campaign_with).
#[must_use = "dropping a Leadership resigns"]
pub struct Leadership {
    name: String,
    key: String,
    value: String,
    fencing_token: i64,
    backend: Option<Box<dyn Candidacy>>,
}

impl Leadership {
    /// The leadership of the election `name` with `value`, whose candidate key `key` (without
    /// the handle's prefix) was created at revision `fencing_token`. The backend side:
    /// applications get leaderships from [`Kvi::campaign`](crate::Kvi::campaign).
    pub fn from_backend(
        name: impl Into<String>,
        key: impl Into<String>,
        value: impl Into<String>,
        fencing_token: i64,
        backend: Box<dyn Candidacy>,
    ) -> Self {
        Leadership {
            name: name.into(),
            key: key.into(),
            value: value.into(),
            fencing_token,
            backend: Some(backend),
        }
    }

    /// The election's name, as given to `campaign` (without the handle's prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This candidate's key, `<name>/<lease id in hex>` (without the handle's prefix): what
    /// [`Compare::leading`](crate::Compare::leading) checks.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The value last proclaimed (at first, the one campaigned with).
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Whether this is still the leader; conservative, as [`LockGuard::is_held`]: `false`
    /// from the moment the store may have expired the handle's lease.
    ///
    /// [`LockGuard::is_held`]: crate::LockGuard::is_held
    pub fn is_leader(&self) -> bool {
        self.backend
            .as_ref()
            .is_some_and(|backend| backend.is_held())
    }

    /// The fencing token of this term: the revision at which this leader's key was created.
    /// It strictly increases from leader to leader of one election; see
    /// [`LockGuard::fencing_token`](crate::LockGuard::fencing_token).
    pub fn fencing_token(&self) -> i64 {
        self.fencing_token
    }

    /// Resolves once the leadership ends for any reason other than
    /// [`resign`](Leadership::resign) or drop, with the reason; see
    /// [`LockGuard::lost`](crate::LockGuard::lost).
    pub fn lost(&self) -> BoxFuture<'static, LostReason> {
        match &self.backend {
            Some(backend) => backend.lost(),
            None => Box::pin(std::future::pending()),
        }
    }

    /// Changes the leader's value in place (the same key, so no new term and no new token).
    /// [`Error::NotLeader`] once the leadership is lost.
    ///
    /// ```
    /// # use hmetcd_core::Kvi;
    /// # async fn example(kv: &dyn Kvi) -> hmetcd_core::Result<()> {
    /// let mut leadership = kv.campaign("scheduler", "10.0.0.7:8080").await?;
    /// leadership.proclaim("10.0.0.7:9090").await?;
    /// assert_eq!(leadership.value(), "10.0.0.7:9090");
    /// let leader = kv.leader("scheduler").await?;
    /// assert_eq!(leader.map(|kv| kv.value).as_deref(), Some("10.0.0.7:9090"));
    /// leadership.resign().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn proclaim(&mut self, value: &str) -> Result<()> {
        let Some(backend) = &self.backend else {
            return Err(Error::NotLeader {
                election: self.name.clone(),
                reason: "the leadership was resigned".to_owned(),
            });
        };
        backend.proclaim(value).await?;
        value.clone_into(&mut self.value);
        Ok(())
    }

    /// Steps down now: the next candidate leads at once. `Ok` if the leadership was already
    /// lost. If the store cannot be reached, the error says so and the leadership is let go
    /// all the same, as [`LockGuard::unlock`](crate::LockGuard::unlock).
    pub async fn resign(mut self) -> Result<()> {
        match self.backend.take() {
            Some(backend) => backend.release().await,
            None => Ok(()),
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if let Some(backend) = self.backend.take() {
            backend.release_on_drop();
        }
    }
}

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("name", &self.name)
            .field("value", &self.value)
            .field("fencing_token", &self.fencing_token)
            .field("leader", &self.is_leader())
            .finish()
    }
}

/// A candidate of an election as a backend read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its key, `<name>/<lease id in hex>`, without the handle's prefix.
    pub key: String,
    /// Its value.
    pub value: String,
    /// The revision its key was created at.
    pub create_revision: i64,
}

impl From<Candidate> for KeyValue {
    fn from(candidate: Candidate) -> Self {
        KeyValue::new(candidate.key, candidate.value)
    }
}

/// The candidates of one election, leader first.
struct Candidates {
    name: String,
    by_revision: BTreeMap<i64, KeyValue>,
    revisions: HashMap<String, i64>,
}

impl Candidates {
    fn leader(&self) -> Option<KeyValue> {
        self.by_revision.values().next().cloned()
    }

    fn insert(&mut self, key: String, value: String, create_revision: i64) {
        if let Some(&known) = self.revisions.get(&key) {
            // A proclaim: same key, same place in the queue.
            if let Some(entry) = self.by_revision.get_mut(&known) {
                entry.value = value;
            }
            return;
        }
        self.revisions.insert(key.clone(), create_revision);
        self.by_revision
            .insert(create_revision, KeyValue::new(key, value));
    }

    fn apply(&mut self, event: WatchEvent) {
        if !is_participant_key(&self.name, event.key()) {
            return;
        }
        match event {
            // A key this stream has not seen is created by this event: its create revision is
            // the event's revision.
            WatchEvent::Put {
                key,
                value,
                revision,
            } => self.insert(key, value, revision),
            WatchEvent::Delete { key, .. } => {
                if let Some(revision) = self.revisions.remove(&key) {
                    self.by_revision.remove(&revision);
                }
            }
        }
    }
}

/// The stream behind [`Kvi::observe`](crate::Kvi::observe), for backends: `candidates` are the
/// election's candidates read at some revision, `events` every change under `<name>/` after
/// that revision. Yields the leader of the read first, then each change of leader or of the
/// leader's value, never the same twice in a row. An `InvalidUtf8` item is passed on and the
/// stream goes on; any other error is its last item.
pub fn leader_stream(name: &str, candidates: Vec<Candidate>, events: WatchStream) -> LeaderStream {
    let mut state = Candidates {
        name: name.to_owned(),
        by_revision: BTreeMap::new(),
        revisions: HashMap::new(),
    };
    for candidate in candidates {
        if is_participant_key(name, &candidate.key) {
            state.insert(candidate.key, candidate.value, candidate.create_revision);
        }
    }
    let first = state.leader();
    let initial = futures::stream::iter([Ok(first.clone())]);
    let changes = futures::stream::unfold(
        (state, events, first, false),
        |(mut state, mut events, mut last, ended)| async move {
            if ended {
                return None;
            }
            loop {
                match events.next().await? {
                    Ok(event) => {
                        state.apply(event);
                        let now = state.leader();
                        if now != last {
                            last.clone_from(&now);
                            return Some((Ok(now), (state, events, last, false)));
                        }
                    }
                    Err(err @ Error::InvalidUtf8 { .. }) => {
                        return Some((Err(err), (state, events, last, false)));
                    }
                    Err(err) => return Some((Err(err), (state, events, last, true))),
                }
            }
        },
    );
    Box::pin(initial.chain(changes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str, revision: i64) -> Result<WatchEvent> {
        Ok(WatchEvent::Put {
            key: key.to_owned(),
            value: value.to_owned(),
            revision,
        })
    }

    fn delete(key: &str, revision: i64) -> Result<WatchEvent> {
        Ok(WatchEvent::Delete {
            key: key.to_owned(),
            revision,
        })
    }

    #[tokio::test]
    async fn leaders_follow_create_order_values_and_deletes_without_repeats() {
        let candidates = vec![
            Candidate {
                key: "e/2b".into(),
                value: "second".into(),
                create_revision: 9,
            },
            Candidate {
                key: "e/1a".into(),
                value: "first".into(),
                create_revision: 7,
            },
            Candidate {
                key: "e/config".into(),
                value: "not a candidate".into(),
                create_revision: 3,
            },
        ];
        let events = futures::stream::iter(vec![
            put("e/3c", "third", 11),
            put("e/1a", "first again", 12),
            put("e/1a", "first again", 13),
            put("e/7/ff", "another election", 14),
            delete("e/1a", 15),
            delete("e/2b", 16),
            delete("e/3c", 17),
            put("e/4d", "fourth", 18),
        ]);
        let seen: Vec<Option<(String, String)>> = leader_stream("e", candidates, Box::pin(events))
            .map(|item| item.map(|leader| leader.map(|kv| (kv.key, kv.value))))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_>>()
            .unwrap_or_default();
        let expected = [
            Some(("e/1a", "first")),
            Some(("e/1a", "first again")),
            Some(("e/2b", "second")),
            Some(("e/3c", "third")),
            None,
            Some(("e/4d", "fourth")),
        ]
        .map(|leader| leader.map(|(key, value)| (key.to_owned(), value.to_owned())));
        assert_eq!(seen, expected);
    }

    #[tokio::test]
    async fn an_error_other_than_invalid_utf8_ends_the_stream() {
        let events = futures::stream::iter(vec![Err(Error::Closed), put("e/1a", "never seen", 5)]);
        let seen: Vec<_> = leader_stream("e", Vec::new(), Box::pin(events))
            .collect()
            .await;
        assert_eq!(seen.len(), 2);
        assert!(matches!(seen[0], Ok(None)));
        assert!(matches!(seen[1], Err(Error::Closed)));
    }
}
