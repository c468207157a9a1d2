#!/usr/bin/env bash
# Runs the hmetcd benchmarks and writes the figures behind docs/BENCHMARKS.md:
#   docs/bench/results.md     every figure against its target (the `report` bench)
#   docs/bench/throughput.csv calls/s against concurrent tasks, per backend
#   docs/bench/throughput.svg the chart of it (examples/bench_chart.rs)
#   docs/bench/criterion.txt  criterion's summary of the sequential calls (`etcd_overhead`)
#
# etcd comes from the test harness, as for the tests: by default etcd 3.4.23 from Debian
# (/usr/bin/etcd, installed by scripts/install-etcd.sh) as a child process on loopback.
# Override with HMETCD_ETCD_MODE / HMETCD_ETCD_BIN, or HMETCD_TEST_ENDPOINTS for a running etcd.
# HMETCD_BENCH_CRITERION=0 skips the criterion part; HMETCD_BENCH_SECS, HMETCD_BENCH_ROUNDS
# and HMETCD_BENCH_BLOCK tune the report (see integration-tests/benches/report.rs).
# Not run in CI. A full run takes about 5 minutes on 2 cores, plus the first build.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${HMETCD_TEST_ENDPOINTS:-}" ]; then
    export HMETCD_ETCD_MODE=${HMETCD_ETCD_MODE:-auto}
else
    export HMETCD_ETCD_MODE=${HMETCD_ETCD_MODE:-process}
    export HMETCD_ETCD_BIN=${HMETCD_ETCD_BIN:-/usr/bin/etcd}
    if [ ! -x "$HMETCD_ETCD_BIN" ]; then
        echo "bench: $HMETCD_ETCD_BIN missing; installing etcd with scripts/install-etcd.sh"
        bash scripts/install-etcd.sh
    fi
fi

out="$PWD/docs/bench"
mkdir -p "$out"
echo "bench: load average before building: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo bench -p integration-tests --no-run
cargo build -p integration-tests --example bench_chart --release

echo "bench: load average before measuring: $(cut -d' ' -f1-3 /proc/loadavg)"
HMETCD_BENCH_OUT="$out" cargo bench -p integration-tests --bench report

if [ "${HMETCD_BENCH_CRITERION:-1}" != 0 ]; then
    # One line per benchmark: its name and criterion's [low estimate high] time per call.
    cargo bench -p integration-tests --bench etcd_overhead -- --noplot 2>&1 |
        awk '/^etcd-[0-9.]+_/ { name = $1 } /time: / { sub(/.*time: */, ""); printf "%-50s %s\n", name, $0 }' \
            >"$out/criterion.txt"
fi

cargo run -q -p integration-tests --example bench_chart --release -- \
    "$out/throughput.csv" "$out/throughput.svg"
echo "bench: load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "bench: wrote $out/results.md, $out/throughput.csv, $out/throughput.svg"
