//! Which store an endpoint string names.

use std::fmt;

use crate::{Error, Result};

/// A parsed `open` endpoint.
///
/// ```
/// use hmetcd_core::Endpoint;
///
/// assert_eq!(Endpoint::parse("mem:")?, Endpoint::Memory { name: None });
/// assert_eq!(Endpoint::parse("mem:jobs")?, Endpoint::Memory { name: Some("jobs".into()) });
/// let Endpoint::Etcd(urls) = Endpoint::parse("http://10.0.0.1:2379, etcd2:2379")? else { unreachable!() };
/// assert_eq!(urls[1].to_string(), "etcd2:2379");
/// assert!(Endpoint::parse("ftp://x:1").is_err());
/// # Ok::<(), hmetcd_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `mem:` (the process-wide store, `name: None`) or `mem:NAME`.
    Memory {
        /// The named store, or `None` for the process-wide default.
        name: Option<String>,
    },
    /// One etcd cluster: one or more member URLs.
    Etcd(Vec<EtcdUrl>),
}

/// The scheme an etcd URL was written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `http://`
    Http,
    /// `https://`
    Https,
    /// Bare `host:port`: TLS when TLS options are given, plain otherwise.
    Unspecified,
}

/// One etcd member address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EtcdUrl {
    /// How it was written.
    pub scheme: Scheme,
    /// Host name or IP address (an IPv6 address keeps its brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl EtcdUrl {
    /// The URL with an explicit scheme, choosing `https` for a bare address when `tls` is set.
    pub fn to_url(&self, tls: bool) -> String {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Unspecified if tls => "https",
            Scheme::Unspecified => "http",
        };
        format!("{scheme}://{}:{}", self.host, self.port)
    }

    fn parse(whole: &str, item: &str) -> Result<Self> {
        let bad = |reason: String| Error::InvalidEndpoint {
            endpoint: whole.to_owned(),
            reason,
        };
        let (scheme, rest) = if let Some(rest) = item.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else if let Some(rest) = item.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else if item.contains("://") {
            return Err(bad(format!(
                "{item:?} has an unknown scheme; use mem:, mem:NAME, http://host:port, https://host:port or host:port"
            )));
        } else {
            (Scheme::Unspecified, item)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Err(bad(format!("{item:?} has no port; write host:port")));
        };
        let valid_host = if let Some(inner) = host.strip_prefix('[') {
            // Brackets hold an IPv6 address and nothing else.
            inner
                .strip_suffix(']')
                .is_some_and(|address| address.parse::<std::net::Ipv6Addr>().is_ok())
        } else {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        };
        if !valid_host {
            return Err(bad(format!("{item:?} has no valid host name")));
        }
        // Digits only: `u16::from_str` would also take a sign ("+2379").
        let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
        let port = match port.parse::<u16>() {
            Ok(port) if digits && port != 0 => port,
            _ => return Err(bad(format!("{item:?} has an invalid port {port:?}"))),
        };
        Ok(EtcdUrl {
            scheme,
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for EtcdUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scheme {
            Scheme::Http => write!(f, "http://{}:{}", self.host, self.port),
            Scheme::Https => write!(f, "https://{}:{}", self.host, self.port),
            Scheme::Unspecified => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

impl Endpoint {
    /// Classifies an endpoint; anything unrecognised is [`Error::InvalidEndpoint`].
    pub fn parse(endpoint: &str) -> Result<Self> {
        let trimmed = endpoint.trim();
        if let Some(name) = trimmed.strip_prefix("mem:") {
            return Ok(Endpoint::Memory {
                name: (!name.is_empty()).then(|| name.to_owned()),
            });
        }
        if trimmed.is_empty() {
            return Err(Error::InvalidEndpoint {
                endpoint: endpoint.to_owned(),
                reason: "empty endpoint; use mem:, mem:NAME or an etcd address such as http://127.0.0.1:2379".to_owned(),
            });
        }
        let urls = trimmed
            .split(',')
            .map(str::trim)
            .map(|item| {
                if item.is_empty() {
                    Err(Error::InvalidEndpoint {
                        endpoint: endpoint.to_owned(),
                        reason: "empty address in the comma-separated list".to_owned(),
                    })
                } else {
                    EtcdUrl::parse(endpoint, item)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Endpoint::Etcd(urls))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_endpoints() {
        assert_eq!(
            Endpoint::parse("mem:").ok(),
            Some(Endpoint::Memory { name: None })
        );
        assert_eq!(
            Endpoint::parse(" mem:a ").ok(),
            Some(Endpoint::Memory {
                name: Some("a".into())
            })
        );
    }

    #[test]
    fn etcd_endpoints() {
        let Ok(Endpoint::Etcd(urls)) =
            Endpoint::parse("http://a:1,https://b.example:2379 , c-1:3,[::1]:4")
        else {
            panic!("did not parse");
        };
        let shown: Vec<String> = urls.iter().map(|u| u.to_url(false)).collect();
        assert_eq!(
            shown,
            [
                "http://a:1",
                "https://b.example:2379",
                "http://c-1:3",
                "http://[::1]:4"
            ]
        );
        assert_eq!(urls[2].to_url(true), "https://c-1:3");
        // Shown as given: a scheme only where the endpoint had one.
        let shown: Vec<String> = urls.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            ["http://a:1", "https://b.example:2379", "c-1:3", "[::1]:4"]
        );
    }

    #[test]
    fn rejections_name_the_endpoint() {
        for bad in [
            "",
            "memory",
            "localhost",
            "ftp://a:1",
            "a:b",
            "a:0",
            "a:70000",
            ":1",
            "a:1,,b:2",
            "[]:1",
            "a b:1",
            "[]]:1",
            "[zz]:1",
            "[::1]]:1",
            "[1.2.3.4]:1",
            "a:+1",
            "a:-1",
        ] {
            match Endpoint::parse(bad) {
                Err(Error::InvalidEndpoint { endpoint, .. }) => assert_eq!(endpoint, bad),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }
}
