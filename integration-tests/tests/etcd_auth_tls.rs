//! etcd with authentication, and etcd with TLS and client certificates.
//!
//! Authentication: a service user whose role may read and write one key prefix only; a wrong
//! password fails at open, keys outside the prefix are refused with an error naming the key,
//! a two-second token TTL is ridden out (requests, a watch, the lock, the lease keep-alive),
//! and the password shows in no `Debug`, `Display`, error or log line: every log line of the
//! whole run, at TRACE level, is captured and searched.
//!
//! TLS: a CA, a server certificate for 127.0.0.1 and localhost and a client certificate, all
//! made here with rcgen; the right files work, a wrong CA or a missing client certificate
//! fails at open within `connect_timeout`, naming the endpoint.
//!
//! etcd runs as a child process (`HMETCD_ETCD_BIN`, else `etcd` on `PATH`, else
//! `/usr/bin/etcd`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Certificate, ConnectOptions, Identity, Permission, TlsOptions};
use futures::StreamExt;
use hmetcd_core::{CompareOp, Error, KeyChange, Kvi, WatchEvent, WatchStream};
use hmetcd_etcd::EtcdKvs;
use integration_tests::cluster::{etcd_binary, etcd_version, ClusterSpec, EtcdCluster, ServerTls};
use integration_tests::run_limited;
use libtest_mimic::{Arguments, Failed, Trial};
use tracing_subscriber::filter::LevelFilter;

/// The service user's password: it must never be shown anywhere.
const PASSWORD: &str = "svc-Pw-4f9Kq2-secret";
/// A wrong password tried at open: it must not be shown either.
const WRONG_PASSWORD: &str = "wrong-Pw-8Hd3x-secret";
const ROOT_PASSWORD: &str = "root-Pw-2Lm7c-secret";
/// The key prefix the service user's role may read and write.
const ALLOWED: &str = "svc/";
const TOKEN_TTL_SECONDS: u64 = 2;

/// Every log line of the run, at TRACE level.
static CAPTURED: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct CaptureWriter;

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut captured) = CAPTURED.lock() {
            captured.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let installed = tracing_subscriber::fmt()
        .with_max_level(LevelFilter::TRACE)
        .with_ansi(false)
        .with_writer(|| CaptureWriter)
        .try_init();
    if let Err(err) = installed {
        eprintln!("auth: cannot capture the log: {err}");
        return ExitCode::FAILURE;
    }
    let (bin, version) = match etcd_binary() {
        Ok(bin) => {
            let version = etcd_version(&bin);
            (bin, version)
        }
        Err(why) => {
            let trial = Trial::test("etcd::auth_tls", move || Err(Failed::from(why)));
            return libtest_mimic::run(&args, vec![trial]).exit_code();
        }
    };
    eprintln!("auth, tls: etcd {version} ({})", bin.display());
    let trials = vec![
        Trial::test(
            format!("etcd-{version}::auth::role_prefix_token_expiry_and_no_password_shown"),
            {
                let bin = bin.clone();
                move || run_limited(2, Duration::from_secs(60), authentication(bin))
            },
        ),
        Trial::test(
            format!("etcd-{version}::tls::certificates_wrong_ca_and_missing_client_cert"),
            move || run_limited(2, Duration::from_secs(40), tls(bin)),
        ),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}

/// Calls coalesced into one transaction with a call outside the role's prefix: etcd refuses
/// the whole transaction, its operations go out again one by one, and only the call at fault
/// fails. Rounds of concurrent calls go on until a batch held a refused call.
async fn refused_call_in_a_batch_fails_alone(endpoint: &str, base: &str) {
    let options = format!("{base},user=svc,password={PASSWORD},lock_name={ALLOWED}lock");
    let kv = Arc::new(
        EtcdKvs::connect(endpoint, &options)
            .await
            .unwrap_or_else(|err| panic!("open as svc without a prefix: {err}")),
    );
    for round in 0..20 {
        let mut calls = Vec::new();
        for i in 0..48 {
            let kv = Arc::clone(&kv);
            let key = if i % 8 == 0 {
                format!("other/denied-{round}-{i}")
            } else {
                format!("{ALLOWED}mixed-{round}-{i}")
            };
            calls.push(tokio::spawn(async move {
                let stored = kv.store(&key, "v").await;
                let read = kv.get(&key).await;
                (key, stored, read)
            }));
        }
        for call in calls {
            let (key, stored, read) = call.await.expect("a caller task");
            if key.starts_with(ALLOWED) {
                stored.unwrap_or_else(|err| panic!("store {key} in a batch: {err}"));
                let read = read.unwrap_or_else(|err| panic!("get {key} in a batch: {err}"));
                assert_eq!(read.as_deref(), Some("v"), "get {key} in a batch");
            } else {
                assert_denied("a store in a batch", &key, stored);
                assert_denied("a get in a batch", &key, read);
            }
        }
        if kv.coalesce_stats().refused_batches > 0 {
            break;
        }
    }
    let stats = kv.coalesce_stats();
    assert!(
        stats.refused_batches > 0,
        "no batch held a refused call in 20 rounds of 48 concurrent calls: {stats:?}"
    );
    eprintln!("auth: a refused call in a coalesced batch fails alone ({stats:?})");
    let _ = kv.close().await;
}

/// Asserts that no secret shows in `text`.
fn assert_no_secret(what: &str, text: &str) {
    for secret in [PASSWORD, WRONG_PASSWORD, ROOT_PASSWORD] {
        assert!(!text.contains(secret), "{what} shows a password: {text}");
    }
}

/// Asserts that `err` shows no secret in Display, Debug or any source.
fn assert_error_hides_secrets(err: &Error) {
    assert_no_secret("an error's Display", &err.to_string());
    assert_no_secret("an error's Debug", &format!("{err:?}"));
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        assert_no_secret("an error's source", &format!("{inner} {inner:?}"));
        source = inner.source();
    }
}

/// Asserts that `outcome` is `Error::PermissionDenied` naming `key`.
fn assert_denied<T: std::fmt::Debug>(what: &str, key: &str, outcome: hmetcd_core::Result<T>) {
    match outcome {
        Err(err @ Error::PermissionDenied { .. }) => {
            assert!(
                err.to_string().contains(key),
                "{what}: the error does not name {key:?}: {err}"
            );
            assert_error_hides_secrets(&err);
        }
        other => panic!("{what}: expected PermissionDenied naming {key:?}, got {other:?}"),
    }
}

/// A watch outside the role's prefix fails with `PermissionDenied` within 5 s: from the call
/// that opens it, or as its stream's first item.
async fn assert_watch_denied(
    what: &str,
    opening: impl std::future::Future<Output = hmetcd_core::Result<WatchStream>>,
) {
    let first = tokio::time::timeout(Duration::from_secs(5), async {
        match opening.await {
            Ok(mut stream) => stream.next().await.map(|event| event.map(|_| ())),
            Err(err) => Some(Err(err)),
        }
    })
    .await
    .unwrap_or_else(|_| panic!("a refused {what} neither failed nor ended within 5 s"));
    if !matches!(first, Some(Err(Error::PermissionDenied { .. }))) {
        panic!("{what} outside the prefix: expected PermissionDenied, got {first:?}");
    }
}

async fn authentication(bin: PathBuf) {
    let spec = ClusterSpec {
        extra_args: vec![format!("--auth-token-ttl={TOKEN_TTL_SECONDS}")],
        ..ClusterSpec::new(1)
    };
    let mut server = EtcdCluster::spawn(&bin, spec).expect("start etcd");
    server
        .wait_ready(&ConnectOptions::new(), Duration::from_secs(30))
        .await
        .expect("etcd ready");
    let endpoint = server.endpoint(0);
    let mut raw = etcd_client::Client::connect([endpoint.as_str()], None)
        .await
        .expect("raw client");
    raw.user_add("root", ROOT_PASSWORD, None)
        .await
        .expect("add root");
    raw.role_add("root").await.expect("add the root role");
    raw.user_grant_role("root", "root")
        .await
        .expect("grant root");
    raw.role_add("svc-role")
        .await
        .expect("add the service role");
    raw.role_grant_permission("svc-role", Permission::read_write(ALLOWED).with_prefix())
        .await
        .expect("grant the prefix");
    raw.user_add("svc", PASSWORD, None)
        .await
        .expect("add the service user");
    raw.user_grant_role("svc", "svc-role")
        .await
        .expect("grant the service role");
    raw.auth_enable().await.expect("enable authentication");
    let mut root = etcd_client::Client::connect(
        [endpoint.as_str()],
        Some(
            ConnectOptions::new()
                .with_user("root", ROOT_PASSWORD)
                .with_auto_token_refresh(true),
        ),
    )
    .await
    .expect("root client");

    let base = "request_timeout=1s,lease_ttl=2s,connect_timeout=3s";
    // A wrong password or an unknown user fails at open, promptly.
    for (user, password) in [("svc", WRONG_PASSWORD), ("nobody", WRONG_PASSWORD)] {
        let started = Instant::now();
        let err = EtcdKvs::connect(
            &endpoint,
            &format!("{base},user={user},password={password}"),
        )
        .await
        .expect_err("open with a wrong password");
        eprintln!(
            "auth: user {user} with a wrong password fails at open in {:.2} s: {err}",
            started.elapsed().as_secs_f64()
        );
        assert!(
            matches!(&err, Error::Unauthenticated { user: named, .. } if named == user),
            "{err:?}"
        );
        assert_error_hides_secrets(&err);
    }

    let options = format!("{base},user=svc,password={PASSWORD},prefix={ALLOWED},lock_name=lock");
    let kv: Arc<dyn Kvi> = Arc::new(
        EtcdKvs::connect(&endpoint, &options)
            .await
            .unwrap_or_else(|err| panic!("open as svc: {err}")),
    );
    assert_no_secret("the handle's Debug", &format!("{kv:?}"));
    let other: Arc<dyn Kvi> = Arc::new(
        EtcdKvs::connect(&endpoint, &options)
            .await
            .unwrap_or_else(|err| panic!("open as svc: {err}")),
    );

    // Outside the role's prefix: refused, naming the key.
    let outside: Arc<dyn Kvi> = Arc::new(
        EtcdKvs::connect(
            &endpoint,
            &format!("{base},user=svc,password={PASSWORD},lock_name=other/lock"),
        )
        .await
        .unwrap_or_else(|err| panic!("open as svc without a prefix: {err}")),
    );
    assert_no_secret("the handle's Debug", &format!("{outside:?}"));
    let key = "other/forbidden";
    assert_denied("store", key, outside.store(key, "x").await);
    assert_denied("get", key, outside.get(key).await);
    assert_denied("delete", key, outside.delete(key).await);
    assert_denied("temp_key", key, outside.temp_key(key).await);
    assert_denied(
        "get_range",
        "other/a",
        outside.get_range("other/a", "other/z").await,
    );
    assert_denied("tas", key, outside.tas(key, "a", "b").await);
    assert_denied(
        "transaction",
        key,
        outside
            .transaction(key, CompareOp::Equal, "a", key, "b", key, "c")
            .await,
    );
    assert_denied(
        "dist_timed_lock",
        "other/lock",
        outside.dist_timed_lock(Duration::from_secs(2)).await,
    );
    // A refused watch ends with the error instead of waiting forever.
    assert_watch_denied("watch_stream", outside.watch_stream(key)).await;
    // watch_prefix_from reads nothing first: etcd refuses the watch itself. The handle
    // refreshes its token once (the refusal may be an expired token's) and then fails the
    // watch, instead of retrying for ever.
    assert_watch_denied("watch_prefix_from", outside.watch_prefix_from("other/", 1)).await;
    eprintln!("auth: every request outside {ALLOWED} is PermissionDenied naming its key");
    let _ = outside.close().await;
    refused_call_in_a_batch_fails_alone(&endpoint, base).await;

    // The service works inside its prefix, and goes on working past the token's expiry.
    kv.store("a", "1").await.expect("store");
    kv.temp_key("t").await.expect("temp_key");
    let mut stream = kv.watch_stream("w").await.expect("watch_stream");
    let called = Arc::new(Mutex::new(Vec::new()));
    let handle = kv
        .watch_with_cb("w", KeyChange::Put, {
            let called = called.clone();
            Box::new(move |event: &WatchEvent| {
                if let Ok(mut called) = called.lock() {
                    called.push(event.value().unwrap_or_default().to_owned());
                }
                true
            })
        })
        .await
        .expect("watch_with_cb");
    kv.dist_lock().await.expect("dist_lock");
    let waiter = tokio::spawn({
        let other = other.clone();
        async move { other.dist_lock().await }
    });
    let expired = Duration::from_secs(TOKEN_TTL_SECONDS * 2 + 1);
    tokio::time::sleep(expired).await;
    assert!(!waiter.is_finished(), "the lock had two holders");
    // A new watch before any other request refreshes the token: etcd refuses its create on
    // the watch stream opened with the expired token, and the handle refreshes the token and
    // creates it again on a new stream. (watch_prefix_from reads nothing first.)
    let replayed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut from_history = kv.watch_prefix_from("a", 1).await?;
        from_history.next().await.unwrap_or(Err(Error::Closed))
    })
    .await
    .expect("a watch created after the token expired: no answer within 5 s")
    .expect("a watch created after the token expired");
    assert_eq!(replayed.value(), Some("1"), "{replayed:?}");

    assert_eq!(
        kv.get("a").await.expect("get after expiry").as_deref(),
        Some("1")
    );
    kv.store("w", "after-expiry")
        .await
        .expect("store after expiry");
    let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the watch delivers after the token expired")
        .expect("the watch goes on")
        .expect("watch event");
    assert_eq!(event.value(), Some("after-expiry"));
    kv.dist_unlock().await.expect("dist_unlock after expiry");
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter gets the lock after the token expired")
        .expect("waiter task")
        .expect("dist_lock of the waiter");
    let late_watch = kv.watch("a");
    let (watched, stored) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(5), late_watch),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            kv.store("a", "2").await
        }
    );
    stored.expect("store");
    let watched = watched
        .expect("a watch opened after the token expired delivers")
        .expect("watch");
    assert_eq!(watched.value(), Some("2"));
    // The lease was kept alive with expired tokens: the temp key (lease_ttl 2 s) is still there.
    let temp = root
        .get(format!("{ALLOWED}t"), None)
        .await
        .expect("root get");
    assert_eq!(
        temp.kvs().len(),
        1,
        "the temp key vanished: the lease expired"
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while called.lock().map(|c| c.len()).unwrap_or_default() < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        called.lock().expect("called").clone(),
        vec!["after-expiry".to_owned()],
        "watch_with_cb past the token's expiry"
    );
    eprintln!(
        "auth: requests, watches, the lock and the lease keep working {} s into a {TOKEN_TTL_SECONDS} s token TTL",
        expired.as_secs()
    );
    handle.cancel();
    other.dist_unlock().await.expect("dist_unlock");
    kv.close().await.expect("close");
    other.close().await.expect("close");
    assert_no_secret("the closed handle's Debug", &format!("{kv:?}"));

    let captured = String::from_utf8_lossy(&CAPTURED.lock().expect("captured log")).into_owned();
    assert_no_secret("the captured log", &captured);
    eprintln!(
        "auth: {} log lines captured at TRACE; no password in any of them",
        captured.lines().count()
    );
    drop(server);
}

/// A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, as PEM
/// files in `dir`; returns (ca, server cert, server key, client cert, client key).
fn make_certificates(dir: &Path, tag: &str) -> [PathBuf; 5] {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("hmetcd test CA {tag}"));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().expect("CA key");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |name: &str, purposes: Vec<ExtendedKeyUsagePurpose>| {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = purposes;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &issuer).expect("leaf certificate");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        "etcd",
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    let (client_cert, client_key) = leaf("svc", vec![ExtendedKeyUsagePurpose::ClientAuth]);
    let files = [
        ("ca.pem", ca_cert.pem()),
        ("server.pem", server_cert),
        ("server.key", server_key),
        ("client.pem", client_cert),
        ("client.key", client_key),
    ];
    files.map(|(name, pem)| {
        let path = dir.join(format!("{tag}-{name}"));
        std::fs::write(&path, pem).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        path
    })
}

async fn tls(bin: PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let [ca, server_cert, server_key, client_cert, client_key] =
        make_certificates(dir.path(), "good");
    let [wrong_ca, ..] = make_certificates(dir.path(), "wrong");
    let spec = ClusterSpec {
        tls: Some(ServerTls {
            cert_file: server_cert,
            key_file: server_key,
            client_ca_file: Some(ca.clone()),
        }),
        ..ClusterSpec::new(1)
    };
    let read = |path: &Path| std::fs::read(path).expect("read a PEM file");
    let client_tls = ConnectOptions::new().with_tls(
        TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&ca)))
            .identity(Identity::from_pem(read(&client_cert), read(&client_key))),
    );
    let mut server = EtcdCluster::spawn(&bin, spec).expect("start etcd");
    server
        .wait_ready(&client_tls, Duration::from_secs(30))
        .await
        .expect("etcd with TLS ready");
    let endpoint = server.endpoint(0);
    let base = "request_timeout=1s,lease_ttl=2s,connect_timeout=2s";
    let files = format!(
        "ca_file={},cert_file={},key_file={}",
        ca.display(),
        client_cert.display(),
        client_key.display()
    );

    let kv = EtcdKvs::connect(&endpoint, &format!("{base},{files},prefix=tls/"))
        .await
        .unwrap_or_else(|err| panic!("open {endpoint} with TLS: {err}"));
    let mut stream = kv.watch_stream("k").await.expect("watch_stream");
    kv.store("k", "secure").await.expect("store");
    assert_eq!(kv.get("k").await.expect("get").as_deref(), Some("secure"));
    let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("watch event in time")
        .expect("the watch goes on")
        .expect("watch event");
    assert_eq!(event.value(), Some("secure"));
    kv.dist_timed_lock(Duration::from_secs(3))
        .await
        .expect("dist_timed_lock");
    kv.dist_unlock().await.expect("dist_unlock");
    let localhost = endpoint.replace("127.0.0.1", "localhost");
    let by_name = EtcdKvs::connect(&localhost, &format!("{base},{files},prefix=tls/"))
        .await
        .unwrap_or_else(|err| panic!("open {localhost} with TLS: {err}"));
    assert_eq!(
        by_name.get("k").await.expect("get").as_deref(),
        Some("secure")
    );
    by_name.close().await.expect("close");
    kv.close().await.expect("close");
    eprintln!("tls: store, get, watch and lock work over https with a client certificate");

    let port = endpoint.rsplit(':').next().unwrap_or_default().to_owned();
    let refused = [
        (
            "a wrong CA",
            format!(
                "{base},ca_file={},cert_file={},key_file={}",
                wrong_ca.display(),
                client_cert.display(),
                client_key.display()
            ),
        ),
        (
            "no client certificate",
            format!("{base},ca_file={}", ca.display()),
        ),
    ];
    for (what, options) in refused {
        let started = Instant::now();
        let outcome = EtcdKvs::connect(&endpoint, &options).await;
        let took = started.elapsed();
        let err = match outcome {
            Ok(kv) => {
                let _ = kv.close().await;
                panic!("open with {what} succeeded")
            }
            Err(err) => err,
        };
        eprintln!(
            "tls: open with {what} fails in {:.2} s: {err}",
            took.as_secs_f64()
        );
        assert!(
            took <= Duration::from_secs(3),
            "open with {what} took {took:?}, connect_timeout is 2 s"
        );
        assert!(
            matches!(err, Error::Unavailable { .. }),
            "open with {what}: {err:?}"
        );
        assert!(
            err.to_string().contains(&port),
            "open with {what}: the error does not name the endpoint: {err}"
        );
    }
    drop(server);
}
