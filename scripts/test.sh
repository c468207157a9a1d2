#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what is missing (protoc for etcd-client's
# build, etcd 3.5.1 and Debian's etcd 3.4.23; see scripts/install-etcd.sh), then runs
# `cargo test --workspace`: unit tests, doctests, and the conformance suite against the
# in-memory store and a real etcd (in a container when Docker runs, else a child process).
# Extra arguments go to `cargo test`; README.md "Getting started" lists the HMETCD_* variables
# (HMETCD_TEST_BACKENDS=mem: the in-memory store only).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-etcd.sh
exec cargo test --workspace "$@"
