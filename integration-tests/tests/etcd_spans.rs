//! What an operator sees of the etcd backend: one `hmetcd` span per call with its operation,
//! key, backend `etcd`, the endpoints and the outcome; and a lock's wait, hold and handover as
//! events. A binary of its own: it installs a tracing subscriber for the whole process.

use std::process::ExitCode;
use std::time::Duration;

use hmetcd_core::Kvi;
use integration_tests::backends;
use integration_tests::run_limited;
use integration_tests::spans::{
    check_call_spans, check_lock_handover, field, with_message, Captured,
};
use libtest_mimic::{Arguments, Trial};
use tracing_subscriber::layer::SubscriberExt;

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let server = match backends::etcd_server_or_exit("etcd_spans", &args) {
        Ok(server) => server,
        Err(exit) => return exit,
    };
    let endpoints = server.endpoints().to_owned();
    let spans = Captured::default();
    if let Err(err) =
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone()))
    {
        eprintln!("etcd_spans: cannot install the subscriber: {err}");
        return ExitCode::FAILURE;
    }
    let trial = Trial::test(
        format!(
            "etcd-{}::spans::calls_are_spans_and_lock_handovers_are_events",
            server.version()
        ),
        move || {
            run_limited(2, Duration::from_secs(60), async move {
                let kv = match hmetcd_etcd::EtcdKvs::connect(&endpoints, "prefix=etcd-spans/").await
                {
                    Ok(kv) => kv,
                    Err(err) => panic!("connect: {err}"),
                };
                for span in check_call_spans(&kv, &spans, "etcd").await {
                    assert_eq!(field(&span, "endpoint"), endpoints, "{span:?}");
                }
                lock_handover_events(&endpoints, &spans).await;
            })
        },
    );
    let code = libtest_mimic::run(&args, vec![trial]).exit_code();
    drop(server);
    code
}

/// One handle holds a lock while another waits for it, then hands it over: both takes (token,
/// wait), the wait behind the key ahead, and the end of the first hold are events.
async fn lock_handover_events(endpoints: &str, captured: &Captured) {
    let connect = || hmetcd_etcd::EtcdKvs::connect(endpoints, "prefix=etcd-spans/");
    let (first, second) = match (connect().await, connect().await) {
        (Ok(first), Ok(second)) => (first, second),
        (Err(err), _) | (_, Err(err)) => panic!("connect: {err}"),
    };
    let (events, [_, second_token]) = check_lock_handover(
        &first,
        &second,
        Duration::from_millis(300),
        captured,
        "etcd",
    )
    .await;
    let waiting = with_message(&events, "waiting for the lock: the key ahead goes first");
    assert!(!waiting.is_empty(), "{events:#?}");
    assert_eq!(waiting[0].field("token"), second_token.to_string());
    first.close().await.ok();
    second.close().await.ok();
}
