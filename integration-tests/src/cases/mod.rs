//! Every conformance case, grouped by the contract's sections.

pub mod conditional;
pub mod data;
pub mod election;
pub mod fencing;
pub mod go_data;
pub mod history;
pub mod keys;
pub mod lifetime;
pub mod linearizable;
pub mod lock;
pub mod named_locks;
pub mod options;
pub mod ranges;
pub mod revisions;
pub mod streams;
pub mod temp_keys;
pub mod txn;
pub mod watch;
pub mod watch_end;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use hmetcd_core::{KeyValue, Kvi, WatchCallback, WatchEvent, WatchStream};

use crate::{case, Case};

/// Every case of the suite.
pub fn all() -> Vec<Case> {
    vec![
        case!(options::unknown_option_names_the_pair),
        case!(options::unparsable_value_names_the_pair),
        case!(options::durations_and_spaces_are_accepted),
        case!(options::prefix_is_hidden_from_callers),
        case!(options::different_prefixes_do_not_see_each_other),
        case!(keys::empty_key_is_invalid_and_writes_nothing),
        case!(keys::empty_then_or_else_key_is_invalid_and_writes_nothing),
        case!(keys::empty_value_round_trips),
        case!(keys::get_of_absent_key_is_none),
        case!(keys::store_creates_and_overwrites),
        case!(keys::delete_removes_and_absent_delete_is_ok),
        case!(keys::unusual_keys_and_values_round_trip),
        case!(keys::handles_on_one_store_share_data),
        case!(ranges::both_ends_are_inclusive),
        case!(ranges::sorted_ascending_by_bytes),
        case!(ranges::bounds_are_exact),
        case!(ranges::start_after_end_is_empty),
        case!(ranges::empty_end_is_empty),
        case!(ranges::empty_end_is_empty_without_a_prefix),
        case!(ranges::empty_start_means_from_the_first_key),
        case!(ranges::no_match_is_empty),
        case!(ranges::start_equal_to_end_is_that_key),
        case!(conditional::missing_key_takes_the_else_branch_for_every_operator),
        case!(conditional::empty_value_is_not_a_missing_key),
        case!(conditional::comparison_is_bytewise),
        case!(conditional::branch_may_write_the_compared_key),
        case!(conditional::transaction_is_one_write),
        case!(conditional::transaction_is_atomic_under_concurrency),
        case!(conditional::tas_sets_only_on_a_match),
        case!(conditional::tas_on_missing_key_is_false_and_writes_nothing),
        case!(conditional::tas_with_empty_values),
        case!(conditional::tas_is_atomic_under_concurrency),
        case!(conditional::failed_writes_make_no_events),
        case!(conditional::compare_op_parses_the_five_spellings),
        case!(temp_keys::temp_key_stores_one),
        case!(temp_keys::temp_keys_vanish_at_once_on_close),
        case!(temp_keys::temp_keys_vanish_after_drop),
        case!(temp_keys::temp_keys_of_a_live_handle_stay),
        case!(temp_keys::temp_keys_belong_to_their_handle),
        case!(lock::two_handles_exclude_each_other),
        case!(lock::timed_lock_gives_up_after_its_timeout),
        case!(lock::given_up_attempt_leaves_no_trace),
        case!(lock::relock_by_holder_is_ok_at_once),
        case!(lock::timed_lock_takes_any_timeout),
        case!(lock::unlock_without_holding_is_ok_and_releases_nothing),
        case!(lock::waiters_are_served_first_come_first_served),
        case!(lock::unlock_releases_at_once),
        case!(lock::close_releases_at_once),
        case!(lock::drop_releases_within_the_bound),
        case!(lock::different_lock_names_do_not_exclude),
        case!(lock::lock_protects_a_counter),
        case!(lock::lock_keys_come_and_go_with_participants),
        case!(lock::own_handle_queues_after_other_handles),
        case!(named_locks::guards_exclude_across_handles),
        case!(named_locks::guards_exclude_among_tasks_of_one_handle),
        case!(named_locks::dropping_a_guard_releases_it),
        case!(named_locks::unlock_releases_and_reports_ok),
        case!(named_locks::guard_waiters_are_served_first_come_first_served),
        case!(named_locks::timed_guard_gives_up_without_a_trace),
        case!(named_locks::max_hold_releases_to_a_waiter),
        case!(named_locks::unlock_before_max_hold_stops_the_timer),
        case!(named_locks::close_releases_every_guard),
        case!(named_locks::a_foreign_write_of_the_handles_own_lock_key_is_taken_over),
        case!(named_locks::close_ends_every_wait_and_no_wait_queues_again),
        case!(named_locks::dropping_the_handle_releases_its_guards),
        case!(named_locks::lock_name_guard_is_the_handles_lock),
        case!(named_locks::distinct_names_do_not_exclude),
        case!(named_locks::empty_name_is_invalid),
        case!(named_locks::guard_protects_a_counter),
        case!(named_locks::guard_keys_come_and_go_with_participants),
        case!(named_locks::watch_prefix_sees_guard_keys),
        case!(named_locks::own_handle_guards_queue_after_other_handles),
        case!(fencing::fencing_token_is_positive_and_strictly_increases_across_holders),
        case!(fencing::lost_resolves_max_hold),
        case!(fencing::lost_resolves_closed_on_close),
        case!(fencing::lost_resolves_key_deleted_when_another_handle_deletes_the_lock_key),
        case!(fencing::lost_resolves_key_deleted_when_its_own_handle_deletes_the_lock_key),
        case!(fencing::lost_future_dropped_is_fine_and_many_may_be_taken),
        case!(fencing::unlock_of_a_lost_guard_releases_nobody),
        case!(fencing::dist_lock_queues_again_after_its_key_was_deleted),
        case!(fencing::a_plain_key_under_the_lock_name_does_not_block),
        case!(fencing::pages_of_plain_keys_between_holder_and_waiter_keep_the_waiter_waiting),
        case!(fencing::a_lock_named_with_a_longer_path_does_not_block),
        case!(fencing::is_held_false_after_loss),
        case!(fencing::a_key_in_lock_key_form_queues_like_a_participant),
        case!(fencing::a_waiter_whose_key_was_deleted_queues_again),
        case!(election::one_leader_at_a_time_across_handles),
        case!(election::one_leader_at_a_time_across_handles_and_tasks),
        case!(election::one_leader_at_a_time_among_tasks_of_one_handle),
        case!(election::candidates_lead_first_come_first_served),
        case!(election::observe_yields_the_current_leader_then_every_change),
        case!(election::leader_names_the_key_without_the_prefix),
        case!(election::timed_campaign_gives_up_without_a_trace),
        case!(election::max_hold_ends_a_term),
        case!(election::resign_hands_over_at_once),
        case!(election::dropping_the_leadership_hands_over_at_once),
        case!(election::close_hands_over_at_once),
        case!(election::a_crashed_leaders_successor_leads_within_the_bound),
        case!(election::proclaim_changes_the_value_in_place),
        case!(election::fencing_token_strictly_increases_from_leader_to_leader),
        case!(election::lost_resolves_max_hold),
        case!(election::lost_resolves_closed_on_close),
        case!(election::lost_resolves_key_deleted_when_another_handle_deletes_the_key),
        case!(election::an_election_and_a_lock_of_one_name_are_one_queue),
        case!(election::one_handle_leads_several_elections),
        case!(election::empty_name_is_invalid),
        case!(election::election_calls_after_close_are_closed),
        case!(election::plain_keys_under_the_name_are_not_candidates),
        case!(watch::watch_returns_the_next_put),
        case!(watch::watch_returns_a_delete),
        case!(watch::watch_sees_only_its_key),
        case!(watch::callback_sees_every_put_in_order),
        case!(watch::callback_stops_when_it_returns_false),
        case!(watch::put_callback_ends_on_delete_without_a_call),
        case!(watch::delete_callback_sees_the_delete_then_ends),
        case!(watch::cancel_means_no_call_after_it_returns),
        case!(watch::dropped_watch_handle_keeps_running),
        case!(watch::close_stops_watchers),
        case!(watch::events_carry_increasing_revisions),
        case!(watch_end::callbacks_cancelling_each_other_do_not_deadlock),
        case!(watch_end::a_blocked_callback_stalls_no_other_watcher),
        case!(watch_end::a_callback_may_call_the_store_synchronously),
        case!(watch_end::finish_reason_says_the_callback_returned_false),
        case!(watch_end::finish_reason_says_the_key_was_deleted),
        case!(watch_end::finish_reason_says_the_handle_was_closed),
        case!(watch_end::finish_reason_says_the_callback_panicked),
        case!(streams::watch_stream_yields_every_change_in_order),
        case!(streams::watch_stream_misses_nothing_made_after_it_returns),
        case!(streams::watch_prefix_yields_every_change_under_the_prefix),
        case!(streams::watch_prefix_misses_nothing_made_after_it_returns),
        case!(lifetime::every_call_after_close_is_closed),
        case!(lifetime::close_twice_is_ok),
        case!(lifetime::data_outlives_close),
        case!(lifetime::one_handle_serves_many_tasks),
        case!(go_data::thousand_keys_read_back),
        case!(go_data::range_0100_to_0500_is_401_keys),
        case!(go_data::range_without_keys_is_empty),
        case!(go_data::deleted_key_reads_none),
        case!(go_data::transaction_table),
        case!(go_data::test_and_set_table),
        case!(data::metadata_has_etcds_meanings),
        case!(data::revisions_strictly_increase_across_every_kind_of_write),
        case!(revisions::plain_writes_take_increasing_revisions),
        case!(revisions::lock_keys_are_written_at_increasing_revisions),
        case!(revisions::close_deletes_every_lease_key_in_one_revision),
        case!(revisions::close_hands_the_lock_over_after_its_revision),
        case!(data::get_prefix_includes_keys_sorting_after_tilde),
        case!(data::get_prefix_reads_thousands_of_keys),
        case!(data::list_pages_say_count_more_and_revision),
        case!(data::list_paging_visits_every_key_once_while_others_write),
        case!(data::delete_prefix_counts_and_refuses_an_empty_prefix),
        case!(data::store_temp_keeps_its_value_and_vanishes_on_close),
        case!(data::data_calls_check_keys_and_fail_closed_after_close),
        case!(txn::malformed_transactions_are_refused_and_write_nothing),
        case!(txn::compares_decide_like_etcd),
        case!(txn::ops_run_in_order_and_gets_see_earlier_writes),
        case!(txn::put_temp_in_a_txn_vanishes_on_close),
        case!(txn::held_holds_only_while_the_lock_is_held),
        case!(txn::leading_holds_only_while_leading),
        case!(txn::update_writes_what_f_returns_and_none_deletes),
        case!(history::watch_prefix_from_replays_history_then_goes_live),
        case!(history::watch_prefix_from_misses_nothing_while_others_write),
        case!(history::watch_prefix_from_below_one_is_invalid_argument),
    ]
}

/// The cases that take longer than a case may (each has [`SLOW_CASE_LIMIT`]): on etcd, 64
/// tasks contending for one key retry their transactions some 400,000 times in all.
pub fn slow() -> Vec<Case> {
    vec![
        case!(txn::update_loses_no_write_under_contention),
        case!(linearizable::concurrent_plain_calls_are_linearizable),
    ]
}

/// How long one of the [`slow`] cases may run.
pub const SLOW_CASE_LIMIT: Duration = Duration::from_secs(300);

/// A key above every key the cases write, for "the whole store" ranges.
pub(crate) const LAST_KEY: &str = "\u{10FFFF}";

/// How long a single request or an "at once" effect may take on any backend.
pub(crate) const PROMPTLY: Duration = Duration::from_secs(5);

/// Slack on top of a backend's promised bound, for scheduling and round trips.
pub(crate) const MARGIN: Duration = Duration::from_secs(2);

/// How long a "the lock is taken" probe waits before giving up.
pub(crate) const PROBE: Duration = Duration::from_millis(300);

/// Checks that `release` hands a lock to `waiter` (a task queued for it) at once: the waiter
/// is still waiting after [`PROBE`], and has the lock less than [`MARGIN`] after `release`
/// began. `how` names the release in messages. Hands back what the waiter got.
pub(crate) async fn assert_handed_over_at_once<T>(
    waiter: tokio::task::JoinHandle<hmetcd_core::Result<(T, tokio::time::Instant)>>,
    how: &str,
    release: impl Future<Output = ()>,
) -> T {
    tokio::time::sleep(PROBE).await;
    assert!(!waiter.is_finished(), "the waiter got a held lock");
    let released = tokio::time::Instant::now();
    release.await;
    let what = format!("the waiter to get the lock after {how}");
    let (got, acquired) = within(MARGIN, &what, waiter)
        .await
        .unwrap()
        .unwrap_or_else(|err| panic!("waiter after {how}: {err}"));
    assert!(
        acquired - released < MARGIN,
        "the waiter waited {:?}",
        acquired - released
    );
    got
}

/// Awaits `fut`, panicking with `what` if it is not done within `limit`.
pub(crate) async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(output) => output,
        Err(_) => panic!("{what}: not done within {limit:?}"),
    }
}

/// Polls `check` until it holds, panicking with `what` if it still does not after `limit`.
pub(crate) async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{what}: still not so after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every key `kv` sees, in the order `get_range` gives them.
pub(crate) async fn all_keys(kv: &dyn Kvi) -> Vec<String> {
    kv.get_range("", LAST_KEY)
        .await
        .unwrap_or_else(|err| panic!("get_range over every key: {err}"))
        .into_iter()
        .map(|pair| pair.key)
        .collect()
}

/// The lock keys `<name>/<id>` that `kv` sees for the lock `name`: each must have a
/// non-empty id and the value `""`, as in etcd's lock layout. Sorted by key.
pub(crate) async fn lock_keys(kv: &dyn Kvi, name: &str) -> Vec<String> {
    let dir = format!("{name}/");
    kv.get_range("", LAST_KEY)
        .await
        .unwrap_or_else(|err| panic!("get_range over every key: {err}"))
        .into_iter()
        .filter(|pair| pair.key.starts_with(&dir))
        .map(|pair| {
            let id = &pair.key[dir.len()..];
            assert!(
                !id.is_empty() && !id.contains('/'),
                "lock key {:?} is not <name>/<id>",
                pair.key
            );
            assert_eq!(pair.value, "", "the value of the lock key {:?}", pair.key);
            pair.key
        })
        .collect()
}

/// Waits until `kv` sees `count` lock keys for `name`, and returns them.
pub(crate) async fn wait_for_lock_keys(
    kv: &dyn Kvi,
    name: &str,
    count: usize,
    what: &str,
) -> Vec<String> {
    let what = format!("{what}: {count} lock key(s) under {name:?}");
    eventually(PROMPTLY, &what, || async {
        lock_keys(kv, name).await.len() == count
    })
    .await;
    lock_keys(kv, name).await
}

/// The events a callback watcher was given, shared with the case.
#[derive(Clone, Default)]
pub(crate) struct Recorded(Arc<Mutex<Vec<WatchEvent>>>);

impl Recorded {
    /// A callback that records every event and keeps watching.
    pub(crate) fn callback(&self) -> WatchCallback {
        self.callback_until(usize::MAX)
    }

    /// A callback that records every event and asks to stop after the `stop_after`-th.
    pub(crate) fn callback_until(&self, stop_after: usize) -> WatchCallback {
        let events = Arc::clone(&self.0);
        Box::new(move |event: &WatchEvent| {
            let mut events = events.lock().unwrap_or_else(|p| p.into_inner());
            events.push(event.clone());
            events.len() < stop_after
        })
    }

    /// The events so far.
    pub(crate) fn events(&self) -> Vec<WatchEvent> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many events so far.
    pub(crate) fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Waits until at least `count` events arrived.
    pub(crate) async fn wait_for(&self, count: usize, limit: Duration) {
        eventually(
            limit,
            &format!("callback to see {count} events"),
            || async { self.len() >= count },
        )
        .await;
    }
}

/// The next item of `stream`, which must be an event and come within `limit`.
pub(crate) async fn next_event(
    stream: &mut WatchStream,
    limit: Duration,
    what: &str,
) -> WatchEvent {
    match within(limit, what, stream.next()).await {
        Some(Ok(event)) => event,
        Some(Err(err)) => panic!("{what}: the stream failed: {err}"),
        None => panic!("{what}: the stream ended"),
    }
}

/// The `(key, value)` pairs of `kvs`, without their metadata: what to compare when only the
/// data matters (the metadata holds store revisions, which differ from run to run).
pub(crate) fn pairs(kvs: &[KeyValue]) -> Vec<(&str, &str)> {
    kvs.iter().map(KeyValue::pair).collect()
}

/// A `Put` event's key and value, or panics.
pub(crate) fn put_of(event: &WatchEvent) -> (&str, &str) {
    match event {
        WatchEvent::Put { key, value, .. } => (key, value),
        other => panic!("expected a Put, got {other:?}"),
    }
}
