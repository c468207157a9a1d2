//! Key checks and prefix handling shared by every backend.

use std::borrow::Cow;

use crate::{Error, Result};

/// Checks that `key`, given as the argument named `argument`, is a valid key.
pub fn check_key(argument: &'static str, key: &str) -> Result<()> {
    if key.is_empty() {
        Err(Error::empty_key(argument))
    } else {
        Ok(())
    }
}

/// Whether `key` is a participant key of the lock or election `name`: exactly
/// `<name>/<lease id in lowercase hex>`, one segment, as Go's `fmt.Sprintf("%x", id)` writes
/// an `int64` lease id (a negative one with a leading `-`). `<name>/config`, or the keys of a
/// lock named `<name>/7`, are not.
///
/// ```
/// use hmetcd_core::keys::is_participant_key;
///
/// assert!(is_participant_key("jobs", "jobs/694d7a1b2c3d4e5f"));
/// assert!(!is_participant_key("jobs", "jobs/config"));
/// assert!(!is_participant_key("jobs", "jobs/7/694d7a1b2c3d4e5f"));
/// ```
pub fn is_participant_key(name: &str, key: &str) -> bool {
    key.strip_prefix(name)
        .and_then(|rest| rest.strip_prefix('/'))
        .is_some_and(|suffix| is_lease_suffix(suffix.as_bytes()))
}

/// Whether `suffix` (what follows `<name>/`) is a lease id as participant keys write it.
pub fn is_lease_suffix(suffix: &[u8]) -> bool {
    let digits = suffix.strip_prefix(b"-").unwrap_or(suffix);
    !digits.is_empty()
        && digits
            .iter()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(byte))
}

/// The `prefix` option: puts it in front of every key and takes it off again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    /// A prefix; empty means none.
    pub fn new(prefix: impl Into<String>) -> Self {
        KeyPrefix(prefix.into())
    }

    /// The prefix itself.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `key` as stored.
    pub fn apply(&self, key: &str) -> String {
        let mut stored = String::with_capacity(self.0.len() + key.len());
        stored.push_str(&self.0);
        stored.push_str(key);
        stored
    }

    /// `key` as stored, borrowing it when there is no prefix (no allocation on the hot path).
    pub fn stored<'a>(&self, key: &'a str) -> Cow<'a, str> {
        if self.0.is_empty() {
            Cow::Borrowed(key)
        } else {
            Cow::Owned(self.apply(key))
        }
    }

    /// `stored` as callers see it, or `None` when it lies outside the prefix.
    pub fn strip<'a>(&self, stored: &'a str) -> Option<&'a str> {
        stored.strip_prefix(self.0.as_str())
    }

    /// The stored keys of the inclusive caller range `[start, end]`, or `None` when it is empty
    /// (`start > end`). An empty `start` means "from the first key under the prefix".
    pub fn range(&self, start: &str, end: &str) -> Option<(String, String)> {
        // No key is empty, so nothing lies at or below an empty `end`.
        if end.is_empty() || start > end {
            return None;
        }
        Some((self.apply(start), self.apply(end)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let none = KeyPrefix::default();
        assert_eq!(none.range("b", "a"), None);
        assert_eq!(none.range("a", ""), None);
        assert_eq!(none.range("", ""), None);
        assert_eq!(none.range("", "z"), Some((String::new(), "z".into())));
        let p = KeyPrefix::new("p/");
        assert_eq!(p.range("", ""), None);
        assert_eq!(p.range("", "a"), Some(("p/".into(), "p/a".into())));
        assert_eq!(p.range("a", "b"), Some(("p/a".into(), "p/b".into())));
        assert_eq!(p.strip("p/a"), Some("a"));
        assert_eq!(p.strip("q/a"), None);
    }
}
