//! etcd backend (in progress).
