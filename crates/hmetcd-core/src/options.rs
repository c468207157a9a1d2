//! The `options` string of `open`: comma-separated `name=value` pairs.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::{Error, Result};

/// A password that never shows itself in `Debug` or `Display` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps a password.
    pub fn new(password: impl Into<String>) -> Self {
        Password(password.into())
    }

    /// The password itself, for handing to the store's client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl fmt::Display for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Options for opening a store, parsed from `""` or `"name=value,name=value"`.
///
/// ```
/// use std::time::Duration;
/// use hmetcd_core::Options;
///
/// let options: Options = "request_timeout=500ms, lease_ttl=5s, prefix=svc/".parse()?;
/// assert_eq!(options.request_timeout, Duration::from_millis(500));
/// assert_eq!(options.lease_ttl, Duration::from_secs(5));
/// assert_eq!(options.prefix, "svc/");
/// assert_eq!(options.lock_name, "hbtd_dist_lock");
///
/// let err = "lease_ttl=soon".parse::<Options>().unwrap_err();
/// assert!(err.to_string().contains("lease_ttl=soon"));
/// # Ok::<(), hmetcd_core::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Options {
    /// Limit for every single request to etcd (not lock waits, not watches). Default 5 s.
    pub request_timeout: Duration,
    /// Limit for opening a connection. Default 10 s.
    pub connect_timeout: Duration,
    /// How long temp keys and lock sessions outlive a crashed owner. Default 10 s.
    pub lease_ttl: Duration,
    /// The name of the handle's distributed lock. Default `hbtd_dist_lock`.
    pub lock_name: String,
    /// Prefix every key is stored under; callers never see it. Default empty.
    pub prefix: String,
    /// etcd user name.
    pub user: Option<String>,
    /// etcd password. It may contain commas: everything after `password=` up to the next
    /// item that starts with a known option name belongs to it.
    pub password: Option<Password>,
    /// CA certificate (PEM) for `https://` endpoints.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for `https://` endpoints.
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM) for `https://` endpoints.
    pub key_file: Option<PathBuf>,
    /// In-memory store only: how many of the latest revisions the store keeps for
    /// `watch_prefix_from` at least (it compacts older history by itself, as etcd's periodic
    /// compaction would). Default 10,000; etcd accepts and ignores it (etcd's own
    /// `--auto-compaction-*` flags decide there).
    pub history: u64,
    /// etcd only: whether concurrent plain reads and writes of one handle (`get`, `get_kv`,
    /// `store`, `delete`) that queue while others are in flight go out together as one etcd
    /// transaction, each caller still getting its own answer (`coalesce=on`, the default), or
    /// each as a request of its own (`coalesce=off`). A lone call goes out at once either way.
    /// The in-memory store accepts and ignores it.
    pub coalesce: bool,
}

/// The revisions of history the in-memory store keeps by default.
pub const DEFAULT_HISTORY: u64 = 10_000;

/// The lock name used when none is given, the same as the Go package's.
pub const DEFAULT_LOCK_NAME: &str = "hbtd_dist_lock";

impl Default for Options {
    fn default() -> Self {
        Options {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(10),
            lock_name: DEFAULT_LOCK_NAME.to_owned(),
            prefix: String::new(),
            user: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            history: DEFAULT_HISTORY,
            coalesce: true,
        }
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("lease_ttl", &self.lease_ttl)
            .field("lock_name", &self.lock_name)
            .field("prefix", &self.prefix)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("history", &self.history)
            .field("coalesce", &self.coalesce)
            .finish()
    }
}

impl Options {
    /// Parses an options string; see the type's documentation.
    pub fn parse(options: &str) -> Result<Self> {
        let mut parsed = Options::default();
        let mut seen: Vec<&str> = Vec::new();
        let items = split_items(options);
        for item in items.iter().map(|item| item.trim()) {
            if item.is_empty() {
                if options.trim().is_empty() {
                    continue;
                }
                return Err(invalid(
                    item,
                    "empty item (two commas in a row, or a trailing comma)",
                ));
            }
            let Some((name, value)) = item.split_once('=') else {
                return Err(invalid(item, "expected name=value"));
            };
            let (name, value) = (name.trim(), value.trim());
            if seen.contains(&name) {
                return Err(invalid(item, "given more than once"));
            }
            parsed.set(name, value, item)?;
            seen.push(name);
        }
        parsed.check()?;
        Ok(parsed)
    }

    fn set(&mut self, name: &str, value: &str, item: &str) -> Result<()> {
        match name {
            "request_timeout" => self.request_timeout = duration(item, value)?,
            "connect_timeout" => self.connect_timeout = duration(item, value)?,
            "lease_ttl" => {
                let ttl = duration(item, value)?;
                if ttl < Duration::from_secs(1) {
                    return Err(invalid(
                        item,
                        "must be at least 1s (etcd leases count whole seconds)",
                    ));
                }
                if ttl.subsec_nanos() != 0 {
                    return Err(invalid(
                        item,
                        "must be whole seconds (etcd leases count whole seconds)",
                    ));
                }
                self.lease_ttl = ttl;
            }
            "lock_name" => {
                if value.is_empty() {
                    return Err(invalid(item, "must not be empty"));
                }
                self.lock_name = value.to_owned();
            }
            "prefix" => self.prefix = value.to_owned(),
            "user" => self.user = Some(non_empty(item, value)?.to_owned()),
            "password" => {
                if value.is_empty() {
                    return Err(invalid("password=", "must not be empty"));
                }
                self.password = Some(Password::new(value));
            }
            "ca_file" => self.ca_file = Some(non_empty(item, value)?.into()),
            "cert_file" => self.cert_file = Some(non_empty(item, value)?.into()),
            "key_file" => self.key_file = Some(non_empty(item, value)?.into()),
            "history" => match value.parse::<u64>() {
                Ok(revisions) if revisions >= 1 => self.history = revisions,
                _ => {
                    return Err(invalid(
                        item,
                        "expected a whole number of revisions, at least 1",
                    ))
                }
            },
            "coalesce" => match value {
                "on" => self.coalesce = true,
                "off" => self.coalesce = false,
                _ => return Err(invalid(item, "expected on or off")),
            },
            "" => return Err(invalid(item, "missing option name")),
            _ => {
                let known = OPTION_NAMES.join(", ");
                return Err(invalid(item, &format!("unknown option; known: {known}")));
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<()> {
        match (&self.user, &self.password) {
            (Some(user), None) => Err(invalid(&format!("user={user}"), "given without password")),
            (None, Some(_)) => Err(invalid("password=<redacted>", "given without user")),
            _ => match (&self.cert_file, &self.key_file) {
                (Some(cert), None) => Err(invalid(
                    &format!("cert_file={}", cert.display()),
                    "given without key_file",
                )),
                (None, Some(key)) => Err(invalid(
                    &format!("key_file={}", key.display()),
                    "given without cert_file",
                )),
                _ => Ok(()),
            },
        }
    }
}

impl FromStr for Options {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Options::parse(s)
    }
}

/// Every option name, in the order the documentation gives them.
const OPTION_NAMES: [&str; 12] = [
    "request_timeout",
    "connect_timeout",
    "lease_ttl",
    "lock_name",
    "prefix",
    "user",
    "password",
    "ca_file",
    "cert_file",
    "key_file",
    "history",
    "coalesce",
];

/// Splits at commas, except that a password keeps every comma up to the next item that
/// starts with a known option name: a password may hold commas, and no part of it may ever
/// be quoted back in an error as if it were an option.
fn split_items(options: &str) -> Vec<String> {
    let mut items: Vec<String> = Vec::new();
    for piece in options.split(',') {
        let starts_option = piece
            .split_once('=')
            .is_some_and(|(name, _)| OPTION_NAMES.contains(&name.trim()));
        match items.last_mut() {
            Some(last) if is_password(last) && !starts_option => {
                last.push(',');
                last.push_str(piece);
            }
            _ => items.push(piece.to_owned()),
        }
    }
    items
}

fn is_password(item: &str) -> bool {
    item.split_once('=')
        .is_some_and(|(name, _)| name.trim() == "password")
}

fn redact(item: &str) -> String {
    if is_password(item) {
        "password=<redacted>".to_owned()
    } else {
        item.to_owned()
    }
}

fn invalid(item: &str, reason: &str) -> Error {
    Error::InvalidOption {
        option: redact(item),
        reason: reason.to_owned(),
    }
}

fn non_empty<'a>(item: &str, value: &'a str) -> Result<&'a str> {
    if value.is_empty() {
        Err(invalid(item, "must not be empty"))
    } else {
        Ok(value)
    }
}

/// Reads `500ms`, `5s`, `2m` (and the other forms `humantime` knows, such as `1m30s`).
fn duration(item: &str, value: &str) -> Result<Duration> {
    let parsed = humantime::parse_duration(value).map_err(|err| {
        invalid(
            item,
            &format!("not a duration ({err}); write it like 500ms, 5s or 2m"),
        )
    })?;
    if parsed.is_zero() {
        return Err(invalid(item, "must be greater than zero"));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reject(options: &str) -> (String, String) {
        match Options::parse(options) {
            Err(Error::InvalidOption { option, reason }) => (option, reason),
            other => panic!("{options:?} gave {other:?}"),
        }
    }

    #[test]
    fn the_password_never_shows() {
        let options = Options::parse("user=svc,password=s3cret,prefix=p/").unwrap();
        let password = options.password.clone().unwrap();
        assert_eq!(password.expose(), "s3cret");
        assert_eq!(format!("{password}"), "<redacted>");
        assert_eq!(format!("{password:?}"), "Password(<redacted>)");
        let shown = format!("{options:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        for part in [
            "Options",
            "user: Some(\"svc\")",
            "password: Some(Password(<redacted>))",
            "prefix: \"p/\"",
            "request_timeout: ",
            "lease_ttl: ",
            "history: ",
            "coalesce: true",
        ] {
            assert!(shown.contains(part), "{part} in {shown}");
        }
    }

    #[test]
    fn edges_of_the_option_rules() {
        let shortest = Options::parse("lease_ttl=1s,coalesce=on").unwrap();
        assert_eq!(shortest.lease_ttl, Duration::from_secs(1));
        assert!(shortest.coalesce);
        let parsed: Options = "prefix=svc/,coalesce=off".parse().unwrap();
        assert_eq!(parsed.prefix, "svc/");
        assert!(!parsed.coalesce);
        assert!(reject("=5").1.contains("missing option name"));
        assert!(reject("nosuch=1").1.contains("unknown option"));
        assert_eq!(
            reject("cert_file=/c.pem"),
            (
                "cert_file=/c.pem".to_owned(),
                "given without key_file".to_owned()
            )
        );
        assert_eq!(
            reject("key_file=/k.pem"),
            (
                "key_file=/k.pem".to_owned(),
                "given without cert_file".to_owned()
            )
        );
        assert!(Options::parse("cert_file=/c.pem,key_file=/k.pem").is_ok());
    }

    #[test]
    fn empty_string_gives_defaults() {
        assert_eq!(Options::parse("").ok(), Some(Options::default()));
        assert_eq!(Options::parse("  ").ok(), Some(Options::default()));
    }

    #[test]
    fn parses_every_option() {
        let options = Options::parse(
            " request_timeout=500ms , connect_timeout=2m,lease_ttl=3s,lock_name=mine,prefix=a/b/,\
             user=svc,password=s3cret,ca_file=/ca.pem,cert_file=/c.pem,key_file=/k.pem,history=50",
        )
        .unwrap_or_default();
        assert_eq!(options.request_timeout, Duration::from_millis(500));
        assert_eq!(options.connect_timeout, Duration::from_secs(120));
        assert_eq!(options.lease_ttl, Duration::from_secs(3));
        assert_eq!(options.lock_name, "mine");
        assert_eq!(options.prefix, "a/b/");
        assert_eq!(options.user.as_deref(), Some("svc"));
        assert_eq!(
            options.password.as_ref().map(Password::expose),
            Some("s3cret")
        );
        assert_eq!(options.ca_file, Some(PathBuf::from("/ca.pem")));
        assert_eq!(options.key_file, Some(PathBuf::from("/k.pem")));
        assert_eq!(options.history, 50);
        assert_eq!(Options::default().history, DEFAULT_HISTORY);
        assert!(Options::default().coalesce);
        assert!(!Options::parse("coalesce=off")
            .map(|o| o.coalesce)
            .unwrap_or(true));
    }

    #[test]
    fn rejections_name_the_pair() {
        assert_eq!(reject("nosuch=1").0, "nosuch=1");
        assert_eq!(reject("request_timeout=fast").0, "request_timeout=fast");
        assert_eq!(reject("request_timeout=0s").0, "request_timeout=0s");
        assert_eq!(reject("lease_ttl=500ms").0, "lease_ttl=500ms");
        assert_eq!(reject("lease_ttl=1500ms").0, "lease_ttl=1500ms");
        assert_eq!(reject("lock_name=").0, "lock_name=");
        assert_eq!(reject("prefix").0, "prefix");
        assert_eq!(reject("prefix=a,,lease_ttl=2s").0, "");
        assert_eq!(reject("prefix=a,prefix=b").0, "prefix=b");
        assert_eq!(reject("=5").0, "=5");
        assert_eq!(reject("user=svc").0, "user=svc");
        assert_eq!(reject("history=0").0, "history=0");
        assert_eq!(reject("history=many").0, "history=many");
        assert_eq!(reject("coalesce=maybe").0, "coalesce=maybe");
    }

    #[test]
    fn password_may_hold_commas_and_never_shows_in_errors() {
        let options = Options::parse("user=u, password=ab,cd ,lease_ttl=2s").unwrap_or_default();
        assert_eq!(
            options.password.as_ref().map(Password::expose),
            Some("ab,cd")
        );
        assert_eq!(options.lease_ttl, Duration::from_secs(2));
        let err = Options::parse("user=u,password=ab,cd=ef,nosuch").err();
        assert!(!format!("{err:?}").contains("cd"), "{err:?}");
        let err = Options::parse("user=u,password=ab,cd,nosuch=1").err();
        assert!(
            !format!("{err:?}").contains("nosuch"),
            "a fragment after password= is the password's: {err:?}"
        );
        let err = Options::parse("password=p,q,lock_name=").err();
        assert!(
            matches!(&err, Some(Error::InvalidOption { option, .. }) if option == "lock_name="),
            "{err:?}"
        );
    }

    #[test]
    fn password_never_shows() {
        let (option, _) = reject("password=hunter2");
        assert!(!option.contains("hunter2"), "{option}");
        let options = Options::parse("user=u,password=hunter2").unwrap_or_default();
        assert!(!format!("{options:?}").contains("hunter2"));
        let err = Options::parse("user=u,password=hunter2,password=hunter2").err();
        assert!(!format!("{err:?}").contains("hunter2"));
        assert!(!err
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("hunter2"));
    }
}
