//! Turning endpoints and options into etcd-client's connect arguments.

use std::path::Path;
use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use hmetcd_core::{Error, EtcdUrl, Options, Result, Scheme};

/// HTTP/2 pings on the connection, so a silently dead etcd member is noticed by watches.
/// etcd refuses pings more often than every 5 s, so stay well above that.
const HTTP2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// The URLs to dial and the options to dial them with.
pub(crate) fn connect_arguments(
    urls: &[EtcdUrl],
    options: &Options,
) -> Result<(Vec<String>, ConnectOptions)> {
    if urls.is_empty() {
        return Err(Error::InvalidEndpoint {
            endpoint: String::new(),
            reason: "no etcd address given".to_owned(),
        });
    }
    let tls_options_given = options.ca_file.is_some() || options.cert_file.is_some();
    let any_https = urls.iter().any(|url| url.scheme == Scheme::Https);
    let any_http = urls.iter().any(|url| url.scheme == Scheme::Http);
    if any_https && any_http {
        return Err(Error::InvalidEndpoint {
            endpoint: joined(urls),
            reason: "mixes http:// and https:// addresses; one cluster uses one of them".to_owned(),
        });
    }
    let use_tls = any_https || (!any_http && tls_options_given);
    if tls_options_given && !use_tls {
        tracing::warn!(
            endpoints = %joined(urls),
            "ca_file/cert_file/key_file are ignored for http:// endpoints"
        );
    }
    let dial: Vec<String> = urls.iter().map(|url| url.to_url(use_tls)).collect();

    let mut connect = ConnectOptions::new()
        .with_connect_timeout(options.connect_timeout)
        .with_keep_alive(HTTP2_KEEP_ALIVE_INTERVAL, options.request_timeout)
        .with_keep_alive_while_idle(false)
        // A member cut off from the cluster fails requests and watches instead of serving stale data.
        .with_require_leader(true)
        // etcd-client re-authenticates and retries once when etcd says the token is invalid or expired.
        .with_auto_token_refresh(true);
    if let (Some(user), Some(password)) = (&options.user, &options.password) {
        connect = connect.with_user(user.clone(), password.expose().to_owned());
    }
    if use_tls {
        connect = connect.with_tls(tls_options(options)?);
    }
    Ok((dial, connect))
}

/// How many members `urls` name: an address given twice is one member.
pub(crate) fn distinct_members(urls: &[EtcdUrl]) -> usize {
    let mut seen = std::collections::HashSet::new();
    urls.iter()
        .filter(|url| seen.insert(url.to_url(false)))
        .count()
}

/// The URLs and options for the clients that probe each member on its own: the same TLS
/// options, no credentials (a probe sends no keys), and `timeout` to connect.
pub(crate) fn probe_arguments(
    urls: &[EtcdUrl],
    options: &Options,
    timeout: Duration,
) -> Result<(Vec<String>, ConnectOptions)> {
    let mut probe = options.clone();
    probe.user = None;
    probe.password = None;
    probe.connect_timeout = timeout;
    probe.request_timeout = timeout;
    connect_arguments(urls, &probe)
}

fn tls_options(options: &Options) -> Result<TlsOptions> {
    let mut tls = TlsOptions::new();
    if let Some(ca_file) = &options.ca_file {
        tls = tls.ca_certificate(Certificate::from_pem(read_option_file("ca_file", ca_file)?));
    }
    if let (Some(cert_file), Some(key_file)) = (&options.cert_file, &options.key_file) {
        let cert = read_option_file("cert_file", cert_file)?;
        let key = read_option_file("key_file", key_file)?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Ok(tls)
}

fn read_option_file(option: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|err| Error::InvalidOption {
        option: format!("{option}={}", path.display()),
        reason: format!("cannot read the file: {err}"),
    })
}

/// The endpoints as one comma-separated string, for messages.
pub(crate) fn joined(urls: &[EtcdUrl]) -> String {
    urls.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmetcd_core::Endpoint;

    fn urls(endpoints: &str) -> Vec<EtcdUrl> {
        match Endpoint::parse(endpoints) {
            Ok(Endpoint::Etcd(urls)) => urls,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn plain_and_mixed_endpoints() {
        let (dial, _) = connect_arguments(&urls("a:1,http://b:2"), &Options::default()).unwrap();
        assert_eq!(dial, ["http://a:1", "http://b:2"]);
        let err = connect_arguments(&urls("http://a:1,https://b:2"), &Options::default()).err();
        assert!(
            matches!(err, Some(Error::InvalidEndpoint { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn tls_follows_the_scheme_or_else_the_tls_options() {
        let dir = std::env::temp_dir().join(format!("hmetcd-connect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem = dir.join("any.pem");
        std::fs::write(&pem, "not checked until connecting").unwrap();
        let pem = pem.display();
        let dial = |endpoints: &str, options: &str| {
            let options = Options::parse(options).unwrap();
            connect_arguments(&urls(endpoints), &options).unwrap().0
        };
        // Bare host:port: TLS when a CA or a client certificate is given, either one.
        assert_eq!(dial("a:1", &format!("ca_file={pem}")), ["https://a:1"]);
        assert_eq!(
            dial("a:1", &format!("cert_file={pem},key_file={pem}")),
            ["https://a:1"]
        );
        assert_eq!(dial("a:1", ""), ["http://a:1"]);
        // An explicit scheme wins over the options.
        assert_eq!(
            dial("http://a:1", &format!("ca_file={pem}")),
            ["http://a:1"]
        );
        assert_eq!(dial("https://a:1", ""), ["https://a:1"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_address_given_twice_is_one_member() {
        assert_eq!(distinct_members(&urls("a:1")), 1);
        assert_eq!(distinct_members(&urls("a:1,a:1")), 1);
        assert_eq!(distinct_members(&urls("a:1,http://a:1")), 1);
        assert_eq!(distinct_members(&urls("a:1,b:1,a:1")), 2);
        assert_eq!(distinct_members(&urls("a:1,a:2,b:1")), 3);
    }

    #[test]
    fn missing_tls_file_names_the_option() {
        let options = Options::parse("ca_file=/nonexistent/ca.pem").unwrap();
        let err = connect_arguments(&urls("https://a:1"), &options).err();
        assert!(
            matches!(&err, Some(Error::InvalidOption { option, .. }) if option == "ca_file=/nonexistent/ca.pem"),
            "{err:?}"
        );
    }
}
