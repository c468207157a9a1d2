#!/usr/bin/env bash
# Mutation testing: does the suite fail when the code is wrong? Runs cargo-mutants (27.x,
# installed if missing) and writes its report under target/mutants/<part>/mutants.out
# (caught.txt, missed.txt, timeout.txt, unviable.txt). Not part of CI: a whole part takes
# tens of minutes to hours on 2 cores; docs/TESTING.md has the last figures.
#
#   scripts/mutants.sh mem   [cargo-mutants args]   hmetcd-mem: first against its unit tests,
#                                                   then what they missed against its tests
#                                                   (test kit, callbacks) and the in-memory
#                                                   conformance, mem_concurrency, test_kit,
#                                                   faults and observability suites;
#                                                   target/mutants/mem/summary.txt adds up both
#   scripts/mutants.sh core  [cargo-mutants args]   hmetcd-core (with its `metrics` feature) the
#                                                   same way, with hmetcd-mem's unit tests in
#                                                   the first pass and the facade's metrics
#                                                   test in the second
#   scripts/mutants.sh etcd  [cargo-mutants args]   the etcd backend's pure logic (endpoints
#                                                   and options, error mapping, key ranges,
#                                                   retries, data translation, server
#                                                   versions) against its
#                                                   unit tests; no etcd needed
#   scripts/mutants.sh etcd-live [cargo-mutants args]
#                                                   the etcd backend's session, lock and
#                                                   watch code on a real etcd
#                                                   (HMETCD_ETCD_BIN, default the static
#                                                   3.5.1 that scripts/install-etcd.sh puts
#                                                   at /opt/etcd-3.5/etcd): first against
#                                                   its unit tests and the conformance
#                                                   suite, then what they missed against the
#                                                   lease-loss, fault, watch-fault,
#                                                   test-kit and auth/TLS tests; 501
#                                                   mutants, so split
#                                                   the first pass with --shard k/n or --re
#                                                   (the second takes exactly its misses)
#   scripts/mutants.sh all                          mem, core and etcd, one after the other
#
# Extra arguments go to cargo-mutants, e.g. `--file crates/hmetcd-mem/src/store.rs` (one
# file), `--re 'Store::revoke'` (matching mutants only), `--list` (what would be tried),
# `--in-place` (mutate this tree instead of a copy: faster, but leave the sources alone while
# it runs), `-j 2`.
#
# The baseline is skipped: with --test-package, cargo-mutants 27.1 still runs its unmutated
# baseline on the mutated package's own tests only, which proves nothing here and may fail
# for want of an etcd; so run the suites once yourself first (scripts/test.sh, or
# HMETCD_TEST_BACKENDS=mem cargo test -p hmetcd-mem -p integration-tests) and give every
# mutant an explicit test timeout instead (MUTANTS_TIMEOUT seconds, default 180: the
# in-memory suites take well under a minute, so a mutant past it hangs them).
set -euo pipefail
cd "$(dirname "$0")/.."

version=27
if ! cargo mutants --version 2>/dev/null | grep -q "^cargo-mutants ${version}\."; then
    cargo install cargo-mutants --locked --version "^${version}"
fi

part=${1:-}
[ $# -gt 0 ] && shift
timeout=${MUTANTS_TIMEOUT:-180}
mkdir -p target/mutants/mem target/mutants/core target/mutants/etcd target/mutants/etcd-live
# A copy of the tree reuses the built dependencies (only the workspace's crates rebuild);
# --in-place needs no copy.
copy=(--copy-target=true)
# The same, for a run that is not given the caller's arguments (etcd-live's second pass).
place=(--copy-target=true)
for arg in "$@"; do
    if [ "$arg" = --in-place ]; then
        copy=()
        place=(--in-place)
    fi
done

# The in-memory suites: the conformance cases, mem_concurrency, test_kit, faults and
# observability on memory only, plus the unit tests and tests (test kit, callbacks) of the
# packages given. The targets go to the build too
# (--cargo-arg, not --cargo-test-arg): building every test binary of integration-tests for
# each mutant would double its time.
mem_suites() {
    HMETCD_TEST_BACKENDS=mem cargo mutants "$@" \
        --test-package integration-tests \
        --cargo-arg=--lib \
        --cargo-arg=--test=conformance \
        --cargo-arg=--test=mem_concurrency \
        --cargo-arg=--test=test_kit \
        --cargo-arg=--test=callbacks \
        --cargo-arg=--test=faults \
        --cargo-arg=--test=observability \
        --baseline skip --timeout "$timeout" "${copy[@]}"
}

# Whether the arguments ask cargo-mutants only to list the mutants.
listing() {
    local arg
    for arg in "$@"; do
        [ "$arg" = --list ] && return 0
    done
    return 1
}

# Two passes over the same mutants, one report directory. First the packages' own unit tests
# (a mutant rebuilds one crate's test binary and runs it in well under a second: seconds a
# mutant); then, with --iterate, the in-memory suites on only what the unit tests did not
# catch (about 30 s a mutant). cargo-mutants keeps the first pass in mutants.out.old and
# lists its caught and unviable mutants in the second's previously_caught.txt; summary.txt
# adds the two up. The caller sets `unit` (the first pass's arguments) and `suites` (what the
# second adds to mem_suites).
two_passes() {
    local out=$1
    shift
    if listing "$@"; then
        cargo mutants "${unit[@]}" "$@"
        return
    fi
    rm -rf "$out/mutants.out" "$out/mutants.out.old"
    local status=0
    cargo mutants "${unit[@]}" --cargo-arg=--lib \
        --baseline skip --timeout "${MUTANTS_UNIT_TIMEOUT:-30}" "${copy[@]}" \
        --output "$out" "$@" || status=$?
    # Exit status 2 means some mutants were missed, 3 that some timed out: the second pass is
    # for the missed ones. A mutant that hangs the unit tests hangs the suites too: it is not
    # tried again (cargo-mutants counts a timeout as caught).
    if [ "$status" -ne 0 ] && [ "$status" -ne 2 ] && [ "$status" -ne 3 ]; then
        return "$status"
    fi
    if [ -f "$out/mutants.out/timeout.txt" ]; then
        cat "$out/mutants.out/timeout.txt" >>"$out/mutants.out/previously_caught.txt"
    fi
    status=0
    mem_suites "${unit[@]}" "${suites[@]}" --iterate --output "$out" "$@" || status=$?
    summarize "$out"
    return "$status"
}

# Counts over both passes: the first pass's caught, timed-out and unviable mutants, and
# whatever the second made of the rest.
summarize() {
    local out=$1 first=$1/mutants.out.old second=$1/mutants.out
    [ -d "$first" ] && [ -d "$second" ] || return 0
    count() { if [ -f "$1" ]; then grep -c . "$1" || true; else echo 0; fi; }
    local unit_caught suite_caught timeout missed unviable viable
    unit_caught=$(count "$first/caught.txt")
    suite_caught=$(count "$second/caught.txt")
    timeout=$(($(count "$first/timeout.txt") + $(count "$second/timeout.txt")))
    missed=$(count "$second/missed.txt")
    unviable=$(($(count "$first/unviable.txt") + $(count "$second/unviable.txt")))
    viable=$((unit_caught + suite_caught + timeout + missed))
    {
        echo "caught: $((unit_caught + suite_caught)) (unit tests: $unit_caught, suites: $suite_caught)"
        echo "timeout: $timeout"
        echo "missed: $missed"
        echo "unviable: $unviable"
        if [ "$viable" -gt 0 ]; then
            echo "caught or timed out, of the viable ones: $(((viable - missed) * 100 / viable))%"
        fi
        echo
        echo "missed:"
        cat "$second/missed.txt" 2>/dev/null || true
    } | tee "$out/summary.txt"
}

run_mem() {
    unit=(--package hmetcd-mem --test-package hmetcd-mem)
    suites=()
    two_passes target/mutants/mem "$@"
}

# The core's figures (the `metrics` feature's counters and gauges) are checked by the
# facade's metrics test (its spans by the observability test, one of the in-memory suites).
run_core() {
    unit=(--package hmetcd-core --test-package hmetcd-core --test-package hmetcd-mem
        --features hmetcd-core/metrics)
    suites=(--test-package hmetcd --features hmetcd/metrics --cargo-arg=--test=metrics)
    two_passes target/mutants/core "$@"
}

run_etcd() {
    cargo mutants --package hmetcd-etcd --test-package hmetcd-etcd \
        --file crates/hmetcd-etcd/src/connect.rs \
        --file crates/hmetcd-etcd/src/error.rs \
        --file crates/hmetcd-etcd/src/range.rs \
        --file crates/hmetcd-etcd/src/retry.rs \
        --file crates/hmetcd-etcd/src/data.rs \
        --file crates/hmetcd-etcd/src/members.rs \
        --file crates/hmetcd-etcd/src/server_version.rs \
        --cargo-arg=--lib \
        --baseline skip --timeout "$timeout" "${copy[@]}" \
        --output target/mutants/etcd "$@"
}

# The etcd backend's session, lock and watch code: a mutant there shows only against a real
# etcd, with leases lost and links cut. Two passes, as for mem: first the backend's unit tests
# and the conformance suite on etcd alone, 16 cases at once, without its two slow contention
# cases (they test plain calls and transactions, not this code, and take some 100 s of the
# 110), about 10 s a run; then, for what it missed, the lease-loss, fault, watch-fault and
# test-kit tests on etcd, one at a time as they run in CI, without the two long multi-process
# stress tests (lease_loss' fenced increments and faults' 1000 locked increments, whose
# properties the shorter tests check one by one): a few minutes a run.
run_etcd_live() {
    local out=target/mutants/etcd-live
    local files=(--package hmetcd-etcd
        --file crates/hmetcd-etcd/src/session.rs
        --file crates/hmetcd-etcd/src/lock.rs
        --file crates/hmetcd-etcd/src/watch.rs)
    local first=(--lib --test=conformance)
    local first_args=(--skip update_loses_no_write_under_contention
        --skip concurrent_plain_calls_are_linearizable --test-threads 16)
    # etcd_auth_tls starts members of its own (auth with a short token TTL, TLS): the watch
    # and lock code's token refresh runs only there.
    local second=(--test=lease_loss --test=faults --test=watch_faults --test=test_kit
        --test=etcd_auth_tls)
    local second_args=(--skip fenced_increments_by_4_processes --skip lock_excludes_4_processes)
    if listing "$@"; then
        cargo mutants "${files[@]}" "$@"
        return
    fi
    export HMETCD_TEST_BACKENDS=etcd HMETCD_ETCD_MODE=process
    export HMETCD_ETCD_BIN="${HMETCD_ETCD_BIN:-/opt/etcd-3.5/etcd}"
    # The baseline, by hand: a pass whose tests fail unmutated would count every mutant caught.
    echo "etcd-live: the first pass's tests, unmutated"
    cargo test -q -p hmetcd-etcd -p integration-tests "${first[@]}" -- "${first_args[@]}"
    rm -rf "$out/mutants.out" "$out/mutants.out.old"
    local status=0
    # cargo-mutants takes the first `--` as its own: what follows the second goes to the tests.
    cargo mutants "${files[@]}" --test-package hmetcd-etcd --test-package integration-tests \
        "${first[@]/#/--cargo-arg=}" \
        --baseline skip --timeout "${MUTANTS_UNIT_TIMEOUT:-120}" "${copy[@]}" \
        --output "$out" "$@" -- -- "${first_args[@]}" || status=$?
    if [ "$status" -ne 0 ] && [ "$status" -ne 2 ] && [ "$status" -ne 3 ]; then
        return "$status"
    fi
    # The second pass takes exactly the first's misses, named one by one (--shard and --re
    # would pick others: cargo-mutants shards what --iterate leaves).
    local exact=()
    if [ -f "$out/mutants.out/missed.txt" ]; then
        mapfile -t exact < <(sed -e 's/[][\\.+*?(){}|^$]/\\&/g' -e 's/^/--re=^/' -e 's/$/$/' \
            "$out/mutants.out/missed.txt")
    fi
    if [ "${#exact[@]}" -eq 0 ]; then
        echo "etcd-live: the first pass missed nothing"
        return 0
    fi
    echo "etcd-live: the second pass's tests, unmutated"
    cargo test -q -p integration-tests "${second[@]}" -- "${second_args[@]}"
    status=0
    cargo mutants "${files[@]}" --test-package integration-tests \
        "${second[@]/#/--cargo-arg=}" \
        --baseline skip --timeout "${MUTANTS_TIMEOUT:-600}" "${place[@]}" \
        --iterate --output "$out" "${exact[@]}" -- -- "${second_args[@]}" || status=$?
    summarize "$out"
    return "$status"
}

case "$part" in
    mem) run_mem "$@" ;;
    etcd-live) run_etcd_live "$@" ;;
    core) run_core "$@" ;;
    etcd) run_etcd "$@" ;;
    all)
        status=0
        run_mem "$@" || status=$?
        run_core "$@" || status=$?
        run_etcd "$@" || status=$?
        exit "$status"
        ;;
    *)
        sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
