//! Plain data types: key-value pairs, changes, watch events and comparison operators.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// One key, its value, and etcd's metadata for it, as reads return them.
///
/// The metadata has etcd's meanings on both backends: `create_revision` is the store revision
/// at which the key was created (since it was last deleted), `mod_revision` the revision of
/// its last write, `version` counts the writes since creation starting from 1 (a delete
/// resets it), and `lease` is the id of the lease the key is bound to (0: none). A pair built
/// with [`KeyValue::new`] has metadata 0.
///
/// ```
/// use hmetcd_core::KeyValue;
///
/// let kv = KeyValue::new("nodes/a", "up");
/// assert_eq!((kv.key.as_str(), kv.value.as_str()), ("nodes/a", "up"));
/// assert_eq!((kv.create_revision, kv.mod_revision, kv.version, kv.lease), (0, 0, 0, 0));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyValue {
    /// The key, without the handle's prefix.
    pub key: String,
    /// The value (empty when read with [`ListRequest::keys_only`](crate::ListRequest::keys_only)).
    pub value: String,
    /// The store revision at which the key was created (since it was last deleted).
    pub create_revision: i64,
    /// The store revision of the key's last write.
    pub mod_revision: i64,
    /// How many times the key was written since it was created, counting from 1.
    pub version: i64,
    /// The lease the key is bound to (a temp key's), 0 when none.
    pub lease: i64,
}

impl KeyValue {
    /// A pair from anything string-like, with metadata 0.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: 0,
            mod_revision: 0,
            version: 0,
            lease: 0,
        }
    }

    /// This pair with the given metadata; backends fill it in as they read.
    #[must_use]
    pub fn with_metadata(
        mut self,
        create_revision: i64,
        mod_revision: i64,
        version: i64,
        lease: i64,
    ) -> Self {
        self.create_revision = create_revision;
        self.mod_revision = mod_revision;
        self.version = version;
        self.lease = lease;
        self
    }

    /// The key and the value, without the metadata: what to compare when only they matter.
    pub fn pair(&self) -> (&str, &str) {
        (&self.key, &self.value)
    }
}

/// The kind of change a watch event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyChange {
    /// The key was created or overwritten.
    Put,
    /// The key was deleted (or its lease expired).
    Delete,
}

/// One change to a watched key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or overwritten with `value`.
    Put {
        /// The key, without the handle's prefix.
        key: String,
        /// The new value.
        value: String,
        /// The store revision of the change.
        revision: i64,
    },
    /// The key was deleted.
    Delete {
        /// The key, without the handle's prefix.
        key: String,
        /// The store revision of the change.
        revision: i64,
    },
}

impl WatchEvent {
    /// The key that changed.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { key, .. } | WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The new value of a `Put`; `None` for a `Delete`.
    pub fn value(&self) -> Option<&str> {
        match self {
            WatchEvent::Put { value, .. } => Some(value),
            WatchEvent::Delete { .. } => None,
        }
    }

    /// Whether this is a put or a delete.
    pub fn change(&self) -> KeyChange {
        match self {
            WatchEvent::Put { .. } => KeyChange::Put,
            WatchEvent::Delete { .. } => KeyChange::Delete,
        }
    }

    /// The store revision of the change; revisions grow with every write to the store.
    pub fn revision(&self) -> i64 {
        match self {
            WatchEvent::Put { revision, .. } | WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// How [`Kvi::transaction`](crate::Kvi::transaction) compares the stored value
/// with the given one. Comparison is byte-wise lexicographic.
///
/// ```
/// use hmetcd_core::CompareOp;
///
/// assert_eq!("!=".parse::<CompareOp>().unwrap(), CompareOp::NotEqual);
/// assert!("<=".parse::<CompareOp>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompareOp {
    /// `=` or `==`
    Equal,
    /// `!=`
    NotEqual,
    /// `<`
    Less,
    /// `>`
    Greater,
}

impl CompareOp {
    /// Whether `stored op given` holds, comparing bytes.
    pub fn holds(self, stored: &str, given: &str) -> bool {
        let (a, b) = (stored.as_bytes(), given.as_bytes());
        match self {
            CompareOp::Equal => a == b,
            CompareOp::NotEqual => a != b,
            CompareOp::Less => a < b,
            CompareOp::Greater => a > b,
        }
    }

    /// The operator's canonical spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CompareOp::Equal => "=",
            CompareOp::NotEqual => "!=",
            CompareOp::Less => "<",
            CompareOp::Greater => ">",
        }
    }
}

impl FromStr for CompareOp {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "=" | "==" => Ok(CompareOp::Equal),
            "!=" => Ok(CompareOp::NotEqual),
            "<" => Ok(CompareOp::Less),
            ">" => Ok(CompareOp::Greater),
            other => Err(Error::InvalidOperator {
                operator: other.to_owned(),
            }),
        }
    }
}

impl fmt::Display for CompareOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_compare_bytes_and_print_as_written() {
        use CompareOp::{Equal, Greater, Less, NotEqual};
        // (stored, given): equal, then stored before given, then after.
        for (stored, given, holding) in [
            ("b", "b", [Equal].as_slice()),
            ("a", "b", &[NotEqual, Less]),
            ("b", "a", &[NotEqual, Greater]),
            ("10", "9", &[NotEqual, Less]),
            ("", "a", &[NotEqual, Less]),
        ] {
            for op in [Equal, NotEqual, Less, Greater] {
                assert_eq!(
                    op.holds(stored, given),
                    holding.contains(&op),
                    "{stored:?} {op} {given:?}"
                );
            }
        }
        let shown: Vec<String> = [Equal, NotEqual, Less, Greater]
            .iter()
            .map(|op| format!("{op}/{}", op.as_str()))
            .collect();
        assert_eq!(shown, ["=/=", "!=/!=", "</<", ">/>"]);
    }

    #[test]
    fn operators_parse_and_reject() {
        for (s, op) in [
            ("=", CompareOp::Equal),
            ("==", CompareOp::Equal),
            ("!=", CompareOp::NotEqual),
            ("<", CompareOp::Less),
            (">", CompareOp::Greater),
        ] {
            assert_eq!(s.parse::<CompareOp>().ok(), Some(op));
        }
        for bad in ["", "<=", ">=", "=!", " =", "eq"] {
            let err = bad.parse::<CompareOp>().err();
            assert!(
                matches!(&err, Some(Error::InvalidOperator { operator }) if operator == bad),
                "{err:?}"
            );
        }
    }

    #[test]
    fn comparison_is_bytewise() {
        assert!(CompareOp::Less.holds("Z", "a"));
        assert!(CompareOp::Greater.holds("é", "z"));
        assert!(CompareOp::Less.holds("", "a"));
        assert!(CompareOp::NotEqual.holds("a", "a\0"));
    }
}
