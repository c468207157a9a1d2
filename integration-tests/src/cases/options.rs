//! Opening: the options string and the `prefix` option.

use futures::StreamExt;
use hmetcd_core::{Error, Kvi};

use super::{all_keys, next_event, put_of, within, PROMPTLY};
use crate::TestStore;

/// The option an `open` was rejected for, and the error's message.
fn rejected_option(result: hmetcd_core::Result<Box<dyn Kvi>>) -> (String, String) {
    let err = match result {
        Err(err) => err,
        Ok(kv) => panic!("opened with a bad option: {kv:?}"),
    };
    let message = err.to_string();
    match err {
        Error::InvalidOption { option, .. } => (option, message),
        other => panic!("expected InvalidOption, got {other}"),
    }
}

/// An unknown option name is `InvalidOption` naming the pair.
pub async fn unknown_option_names_the_pair(store: TestStore) {
    let (option, message) = rejected_option(store.open_with("nosuch=1").await);
    assert_eq!(option, "nosuch=1", "{message}");
    assert!(message.contains("nosuch=1"), "{message}");
}

/// An unparsable value is `InvalidOption` naming the pair.
pub async fn unparsable_value_names_the_pair(store: TestStore) {
    let (option, message) = rejected_option(store.open_with("lease_ttl=soon").await);
    assert_eq!(option, "lease_ttl=soon", "{message}");
    let (option, message) = rejected_option(store.open_with("request_timeout=fast").await);
    assert_eq!(option, "request_timeout=fast", "{message}");
}

/// Durations read as `500ms`, `5s`, `2m`, and spaces around items are ignored.
pub async fn durations_and_spaces_are_accepted(store: TestStore) {
    let kv = store
        .open_with(" request_timeout=500ms , connect_timeout=2m,  lease_ttl=5s ")
        .await
        .unwrap_or_else(|err| panic!("opening with valid options: {err}"));
    kv.store("k", "v").await.unwrap();
    assert_eq!(kv.get("k").await.unwrap().as_deref(), Some("v"));
    kv.close().await.unwrap();
}

/// `prefix`: keys are stored under it, and ranges and watch events carry them without it.
pub async fn prefix_is_hidden_from_callers(store: TestStore) {
    let outer = store.open().await;
    let inner = store
        .open_with(&format!("prefix={}inner/", store.prefix()))
        .await
        .unwrap();

    let mut inner_events = inner.watch_prefix("").await.unwrap();
    let mut outer_events = outer.watch_stream("inner/k").await.unwrap();
    inner.store("k", "v").await.unwrap();

    assert_eq!(outer.get("inner/k").await.unwrap().as_deref(), Some("v"));
    assert_eq!(outer.get("k").await.unwrap(), None);
    assert_eq!(
        super::pairs(&inner.get_range("", super::LAST_KEY).await.unwrap()),
        [("k", "v")]
    );
    assert_eq!(
        super::pairs(&outer.get_range("inner/", "inner/~").await.unwrap()),
        [("inner/k", "v")]
    );
    let event = next_event(
        &mut inner_events,
        PROMPTLY,
        "watch_prefix on the inner handle",
    )
    .await;
    assert_eq!(put_of(&event), ("k", "v"));
    let event = next_event(
        &mut outer_events,
        PROMPTLY,
        "watch_stream on the outer handle",
    )
    .await;
    assert_eq!(put_of(&event), ("inner/k", "v"));

    outer.store("inner/j", "w").await.unwrap();
    assert_eq!(inner.get("j").await.unwrap().as_deref(), Some("w"));
    let event = next_event(
        &mut inner_events,
        PROMPTLY,
        "watch_prefix on the inner handle",
    )
    .await;
    assert_eq!(put_of(&event), ("j", "w"));

    inner.close().await.unwrap();
    outer.close().await.unwrap();
}

/// Two handles with different prefixes never see each other's keys.
pub async fn different_prefixes_do_not_see_each_other(store: TestStore) {
    let a = store
        .open_with(&format!("prefix={}a/", store.prefix()))
        .await
        .unwrap();
    let b = store
        .open_with(&format!("prefix={}b/", store.prefix()))
        .await
        .unwrap();
    let mut a_events = a.watch_prefix("").await.unwrap();

    a.store("k", "from a").await.unwrap();
    b.store("k", "from b").await.unwrap();
    b.store("only-b", "x").await.unwrap();
    a.store("done", "").await.unwrap();

    assert_eq!(a.get("k").await.unwrap().as_deref(), Some("from a"));
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("from b"));
    assert_eq!(a.get("only-b").await.unwrap(), None);
    assert_eq!(all_keys(a.as_ref()).await, ["done", "k"]);
    assert_eq!(all_keys(b.as_ref()).await, ["k", "only-b"]);

    b.delete("k").await.unwrap();
    assert_eq!(a.get("k").await.unwrap().as_deref(), Some("from a"));

    let mut seen = Vec::new();
    within(PROMPTLY, "a's watch_prefix to see its own keys", async {
        while let Some(item) = a_events.next().await {
            let event = item.unwrap();
            seen.push(event.key().to_owned());
            if event.key() == "done" {
                break;
            }
        }
    })
    .await;
    assert_eq!(seen, ["k", "done"], "a's watch saw keys of b");

    a.close().await.unwrap();
    b.close().await.unwrap();
}
