//! Bad input, fuzzed: the options and endpoint parsers on arbitrary strings and on
//! near-valid ones. No input panics; every rejection is `InvalidOption`/`InvalidEndpoint`
//! naming the offending pair or endpoint (never a password's value); accepted input means
//! what it says.
//!
//! Each property runs a fixed number of cases from a fixed seed (`HMETCD_PROPTEST_SEED`
//! overrides it), prints how many ran, and on failure prints the seed and the shrunk input.

use std::fmt::Debug;
use std::io::Write as _;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hmetcd_core::{Endpoint, Error, Options, Scheme};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::string::string_regex;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

const DEFAULT_SEED: u64 = 0x686d_6574_6364_0002;
const CASES: u32 = 4096;

fn seed() -> u64 {
    std::env::var("HMETCD_PROPTEST_SEED")
        .ok()
        .and_then(|seed| seed.trim().parse().ok())
        .unwrap_or(DEFAULT_SEED)
}

/// Runs `test` on `cases` inputs from `strategy`, prints how many ran, panics with the
/// seed and the shrunk input on failure.
fn check<S>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let seed = seed();
    let mut runner = TestRunner::new(Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        max_shrink_iters: 4096,
        max_shrink_time: 10_000,
        ..Config::default()
    });
    let ran = AtomicU64::new(0);
    let result = runner.run(&strategy, |input| {
        ran.fetch_add(1, Ordering::Relaxed);
        test(input)
    });
    // Written to the stream itself, not with eprintln!, so that the harness does not hide it.
    let _ = writeln!(
        std::io::stderr(),
        "{name}: {} cases run (seed {seed})",
        ran.load(Ordering::Relaxed)
    );
    if let Err(err) = result {
        panic!("{name}: seed {seed} (rerun with HMETCD_PROPTEST_SEED={seed}): {err}");
    }
}

/// Strings made of the characters the parsers care about, so that near misses are common.
fn near_valid_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        string_regex("[a-z_=, \t\n0-9msh.:/\\[\\]@+-]{0,48}").expect("valid regex"),
    ]
}

// ---- options ----

const NAMES: &[&str] = &[
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
];

/// The pair as the parser reads it: name and value trimmed.
fn normalized(pair: &str) -> String {
    match pair.split_once('=') {
        Some((name, value)) => format!("{}={}", name.trim(), value.trim()),
        None => pair.trim().to_owned(),
    }
}

/// The option named by a rejection is one of the input's items (or the redacted password,
/// or the empty item between two commas).
fn names_an_item(input: &str, option: &str) -> bool {
    let items: Vec<&str> = input.split(',').map(str::trim).collect();
    if option == "password=<redacted>" {
        return items.iter().any(|item| {
            item.split_once('=')
                .is_some_and(|(n, _)| n.trim() == "password")
        });
    }
    if option.is_empty() {
        return items.iter().any(|item| item.is_empty());
    }
    items
        .iter()
        .any(|item| *item == option || normalized(item) == normalized(option))
}

fn rejection_names_an_item(
    input: &str,
    result: &hmetcd_core::Result<Options>,
) -> Result<(), TestCaseError> {
    match result {
        Ok(_) => Ok(()),
        Err(Error::InvalidOption { option, .. }) => {
            let err = result
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default();
            prop_assert!(
                names_an_item(input, option),
                "{input:?}: the rejection names {option:?}, not an item of the input"
            );
            prop_assert!(
                err.contains(&format!("{option:?}")),
                "message {err:?} does not name {option:?}"
            );
            Ok(())
        }
        Err(other) => Err(TestCaseError::fail(format!(
            "{input:?} gave {other:?}, not InvalidOption"
        ))),
    }
}

#[test]
fn options_any_text() {
    check("options_any_text", CASES, near_valid_text(), |input| {
        let result = Options::parse(&input);
        rejection_names_an_item(&input, &result)
    });
}

#[derive(Debug, Clone)]
struct OptionItem {
    name: String,
    value: String,
    /// Whitespace before the name, around `=`, after the value.
    pads: [&'static str; 4],
    has_equals: bool,
}

impl OptionItem {
    fn text(&self) -> String {
        let [a, b, c, d] = self.pads;
        if self.has_equals {
            format!("{a}{}{b}={c}{}{d}", self.name, self.value)
        } else {
            format!("{a}{}{d}", self.name)
        }
    }
}

fn pad() -> impl Strategy<Value = &'static str> {
    prop_oneof![4 => Just(""), 1 => select(&[" ", "  ", "\t", " \n"][..])]
}

fn duration_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            0u64..100_000,
            select(&["ms", "s", "m", "h", "", "us", "d", "x", " s"][..])
        )
            .prop_map(|(n, unit)| format!("{n}{unit}")),
        Just("1m30s".to_owned()),
        Just("-5s".to_owned()),
        Just("99999999999999999999s".to_owned()),
        Just("18446744073709551615h".to_owned()),
        string_regex("[0-9a-z. ]{0,8}").expect("valid regex"),
    ]
}

/// Password values, drawn from an alphabet no other generated text uses; some hold commas,
/// and no part of them may show.
fn secret() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => string_regex("PW[A-Z]{6}").expect("valid regex"),
        1 => string_regex("PW[A-Z]{2},[A-Z]{3}(,QX[A-Z]{3})?").expect("valid regex"),
    ]
}

fn option_item() -> impl Strategy<Value = OptionItem> {
    let name = prop_oneof![
        8 => select(NAMES).prop_map(str::to_owned),
        1 => string_regex("[a-z_]{0,12}").expect("valid regex"),
        1 => select(&["Request_Timeout", "lease ttl", "prefix ", "user\u{e9}"][..]).prop_map(str::to_owned),
    ];
    (name, any::<bool>(), [pad(), pad(), pad(), pad()], 0u8..10)
        .prop_flat_map(|(name, has_equals, pads, kind)| {
            let value: BoxedStrategy<String> = match name.as_str() {
                "request_timeout" | "connect_timeout" | "lease_ttl" => duration_text().boxed(),
                "password" => secret().boxed(),
                _ if kind == 0 => Just(String::new()).boxed(),
                _ => string_regex("[a-z0-9/._=-]{1,12}")
                    .expect("valid regex")
                    .boxed(),
            };
            (Just(name), value, Just(pads), Just(has_equals || kind > 1))
        })
        .prop_map(|(name, value, pads, has_equals)| OptionItem {
            name,
            value,
            pads,
            has_equals,
        })
}

fn option_list() -> impl Strategy<Value = (Vec<OptionItem>, Vec<&'static str>)> {
    (1usize..6).prop_flat_map(|n| {
        (
            vec(option_item(), n),
            vec(
                prop_oneof![12 => Just(","), 1 => Just(",,"), 1 => Just(" , ")],
                n,
            ),
        )
    })
}

fn expected_duration(text: &str) -> Option<Duration> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let n: u64 = digits.parse().ok()?;
    match &text[digits.len()..] {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        "h" => Some(Duration::from_secs(n * 3600)),
        _ => None,
    }
}

/// Which items belong to the password before them: a password keeps every comma up to the
/// next item that starts with a known option name (`name=`), so what follows it otherwise,
/// empty items between two commas included, is part of it.
fn absorbed_by_password(items: &[OptionItem]) -> Vec<bool> {
    let mut in_password = false;
    let mut absorbed = Vec::with_capacity(items.len());
    for item in items {
        let text = item.text();
        let starts_option = text
            .split_once('=')
            .is_some_and(|(name, _)| NAMES.contains(&name.trim()));
        absorbed.push(in_password && !starts_option);
        if starts_option {
            in_password = text
                .split_once('=')
                .is_some_and(|(name, _)| name.trim() == "password");
        }
    }
    absorbed
}

/// What an accepted item must have set.
fn item_took_effect(options: &Options, item: &OptionItem) -> Result<(), TestCaseError> {
    let value = item.value.trim();
    let duration = |field: Duration| -> Result<(), TestCaseError> {
        if let Some(expected) = expected_duration(value) {
            prop_assert_eq!(field, expected, "{:?}", item.text());
        }
        Ok(())
    };
    match item.name.trim() {
        "request_timeout" => duration(options.request_timeout)?,
        "connect_timeout" => duration(options.connect_timeout)?,
        "lease_ttl" => duration(options.lease_ttl)?,
        "lock_name" => prop_assert_eq!(options.lock_name.as_str(), value),
        "prefix" => prop_assert_eq!(options.prefix.as_str(), value),
        "user" => prop_assert_eq!(options.user.as_deref(), Some(value)),
        "password" => {
            // Items after it that start no known option are part of it.
            let password = options
                .password
                .as_ref()
                .map(|p| p.expose())
                .unwrap_or_default();
            let continues = password
                .strip_prefix(value)
                .is_some_and(|rest| rest.is_empty() || rest.trim_start().starts_with(','));
            prop_assert!(
                continues,
                "password {password:?} from item {:?}",
                item.text()
            );
        }
        "ca_file" => prop_assert_eq!(options.ca_file.clone(), Some(PathBuf::from(value))),
        "cert_file" => prop_assert_eq!(options.cert_file.clone(), Some(PathBuf::from(value))),
        "key_file" => prop_assert_eq!(options.key_file.clone(), Some(PathBuf::from(value))),
        other => {
            return Err(TestCaseError::fail(format!(
                "unknown option {other:?} was accepted"
            )))
        }
    }
    Ok(())
}

#[test]
fn options_near_valid_lists() {
    check(
        "options_near_valid_lists",
        CASES,
        option_list(),
        |(items, commas)| {
            let mut input = String::new();
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    input.push_str(commas[i]);
                }
                input.push_str(&item.text());
            }
            let result = Options::parse(&input);
            rejection_names_an_item(&input, &result)?;
            let secrets: Vec<&str> = items
                .iter()
                .filter(|item| item.name == "password")
                .map(|item| item.value.trim())
                .filter(|value| !value.is_empty())
                .collect();
            let shown = match &result {
                Ok(options) => format!("{options:?}"),
                Err(err) => format!("{err} {err:?}"),
            };
            for fragment in secrets.iter().flat_map(|secret| secret.split(',')) {
                prop_assert!(
                    !shown.contains(fragment),
                    "{input:?}: the password (or {fragment:?} of it) shows in {shown:?}"
                );
            }
            // Whitespace alone is the empty options string: every default.
            if let (Ok(options), false) = (&result, input.trim().is_empty()) {
                for (item, absorbed) in items.iter().zip(absorbed_by_password(&items)) {
                    if absorbed {
                        continue;
                    }
                    item_took_effect(options, item)?;
                }
            }
            Ok(())
        },
    );
}

#[test]
fn options_durations_mean_what_they_say() {
    let strategy = (
        select(&["request_timeout", "connect_timeout", "lease_ttl"][..]),
        0u64..1_000_000,
        select(&["ms", "s", "m", "h"][..]),
    );
    check(
        "options_durations_mean_what_they_say",
        CASES,
        strategy,
        |(name, n, unit)| {
            let input = format!("{name}={n}{unit}");
            let expected = expected_duration(&format!("{n}{unit}")).unwrap_or_default();
            let whole_seconds = expected.subsec_nanos() == 0 && expected >= Duration::from_secs(1);
            let should_accept = !expected.is_zero() && (name != "lease_ttl" || whole_seconds);
            match Options::parse(&input) {
                Ok(options) => {
                    prop_assert!(should_accept, "{input:?} was accepted");
                    let got = match name {
                        "request_timeout" => options.request_timeout,
                        "connect_timeout" => options.connect_timeout,
                        _ => options.lease_ttl,
                    };
                    prop_assert_eq!(got, expected, "{:?}", input);
                }
                Err(Error::InvalidOption { option, .. }) => {
                    prop_assert!(!should_accept, "{input:?} was rejected");
                    prop_assert_eq!(option, input);
                }
                Err(other) => return Err(TestCaseError::fail(format!("{input:?} gave {other:?}"))),
            }
            Ok(())
        },
    );
}

// ---- endpoints ----

#[test]
fn endpoint_any_text() {
    check("endpoint_any_text", CASES, near_valid_text(), |input| {
        match Endpoint::parse(&input) {
            Ok(Endpoint::Memory { .. }) => prop_assert!(input.trim().starts_with("mem:")),
            Ok(Endpoint::Etcd(urls)) => {
                prop_assert!(!urls.is_empty());
                round_trips(&urls)?;
            }
            Err(err @ Error::InvalidEndpoint { .. }) => {
                let Error::InvalidEndpoint { endpoint, .. } = &err else {
                    unreachable!()
                };
                prop_assert_eq!(endpoint, &input);
                let shown = err.to_string();
                prop_assert!(shown.contains(&format!("{input:?}")), "{shown}");
            }
            Err(other) => return Err(TestCaseError::fail(format!("{input:?} gave {other:?}"))),
        }
        Ok(())
    });
}

/// Writing the parsed addresses out and parsing them again gives the same addresses.
fn round_trips(urls: &[hmetcd_core::EtcdUrl]) -> Result<(), TestCaseError> {
    let written: Vec<String> = urls.iter().map(ToString::to_string).collect();
    let again = Endpoint::parse(&written.join(","));
    prop_assert_eq!(
        again.ok(),
        Some(Endpoint::Etcd(urls.to_vec())),
        "{:?}",
        written
    );
    Ok(())
}

#[derive(Debug, Clone)]
struct Address {
    scheme: &'static str,
    host: String,
    port: String,
    slash: bool,
    pads: (&'static str, &'static str),
}

impl Address {
    fn text(&self) -> String {
        let slash = if self.slash { "/" } else { "" };
        format!(
            "{}{}{}:{}{slash}{}",
            self.pads.0, self.scheme, self.host, self.port, self.pads.1
        )
    }

    fn scheme(&self) -> Option<Scheme> {
        match self.scheme {
            "" => Some(Scheme::Unspecified),
            "http://" => Some(Scheme::Http),
            "https://" => Some(Scheme::Https),
            _ => None,
        }
    }

    fn host_is_valid(&self) -> bool {
        let host = self.host.as_str();
        match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(inner) => inner.parse::<Ipv6Addr>().is_ok(),
            None => {
                !host.is_empty()
                    && host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            }
        }
    }

    fn port(&self) -> Option<u16> {
        if self.port.is_empty() || !self.port.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        self.port.parse().ok().filter(|port| *port != 0)
    }

    fn is_valid(&self) -> bool {
        self.scheme().is_some() && self.host_is_valid() && self.port().is_some()
    }
}

fn address() -> impl Strategy<Value = Address> {
    let scheme = select(
        &[
            "", "", "http://", "https://", "ftp://", "HTTP://", "http:/", "unix://",
        ][..],
    );
    let host = prop_oneof![
        6 => string_regex("[a-z][a-z0-9-]{0,8}(\\.[a-z0-9]{1,4}){0,2}").expect("valid regex"),
        2 => (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
        2 => select(&["[::1]", "[fe80::1]", "[2001:db8::2:1]", "[::ffff:10.0.0.1]"][..]).prop_map(str::to_owned),
        3 => select(&[
            "", "a b", "\u{fc}ber", "a@b", "a/b", "a:b", "[::1", "::1]", "[]", "[]]", "[zz]", "[::1]]",
            "[ ]", "[[::1]]", "[1.2.3.4]", "[::1%eth0]", "*",
        ][..])
        .prop_map(str::to_owned),
    ];
    let port = prop_oneof![
        6 => (1u32..=65535).prop_map(|p| p.to_string()),
        3 => select(&["0", "65536", "70000", "", "+1", "-1", "1a", " 1", "02379", "0x10", "\u{661}"][..])
            .prop_map(str::to_owned),
    ];
    (
        scheme,
        host,
        port,
        prop::bool::weighted(0.1),
        (pad(), pad()),
    )
        .prop_map(|(scheme, host, port, slash, pads)| Address {
            scheme,
            host,
            port,
            slash,
            pads,
        })
}

#[test]
fn endpoint_near_valid_lists() {
    let strategy = (vec(address(), 1..4), prop::bool::weighted(0.05));
    check(
        "endpoint_near_valid_lists",
        CASES,
        strategy,
        |(addresses, double_comma)| {
            let texts: Vec<String> = addresses.iter().map(Address::text).collect();
            let double_comma = double_comma && addresses.len() > 1;
            let input = texts.join(if double_comma { ",," } else { "," });
            let should_accept = !double_comma && addresses.iter().all(Address::is_valid);
            match Endpoint::parse(&input) {
                Ok(Endpoint::Etcd(urls)) => {
                    prop_assert!(should_accept, "{input:?} was accepted as {urls:?}");
                    prop_assert_eq!(urls.len(), addresses.len());
                    for (url, address) in urls.iter().zip(&addresses) {
                        prop_assert_eq!(Some(url.scheme), address.scheme());
                        prop_assert_eq!(&url.host, &address.host);
                        prop_assert_eq!(Some(url.port), address.port());
                    }
                    round_trips(&urls)?;
                }
                Ok(memory) => {
                    return Err(TestCaseError::fail(format!("{input:?} gave {memory:?}")))
                }
                Err(Error::InvalidEndpoint { endpoint, reason }) => {
                    prop_assert!(!should_accept, "{input:?} was rejected: {reason}");
                    prop_assert_eq!(&endpoint, &input);
                    // The reason names the bad address (an empty one has nothing to name).
                    let named = double_comma
                        || addresses
                            .iter()
                            .filter(|a| !a.is_valid())
                            .any(|a| reason.contains(&format!("{:?}", a.text().trim())));
                    prop_assert!(
                        named,
                        "{input:?}: the reason {reason:?} names no bad address"
                    );
                }
                Err(other) => return Err(TestCaseError::fail(format!("{input:?} gave {other:?}"))),
            }
            Ok(())
        },
    );
}

#[test]
fn memory_endpoints_keep_their_name() {
    let name = string_regex("[a-zA-Z0-9_./-]{0,16}").expect("valid regex");
    check(
        "memory_endpoints_keep_their_name",
        CASES,
        (name, pad(), pad()),
        |(name, before, after)| {
            let input = format!("{before}mem:{name}{after}");
            let expected = Endpoint::Memory {
                name: (!name.is_empty()).then(|| name.clone()),
            };
            prop_assert_eq!(Endpoint::parse(&input).ok(), Some(expected), "{:?}", input);
            Ok(())
        },
    );
}
