#!/usr/bin/env bash
# Checks docker-compose.yml end to end without registry access: builds a local etcd image
# from the static binaries in /opt/etcd-3.5 (scripts/install-etcd.sh), validates the compose
# file, brings the single node up, waits until it is healthy, runs the quickstart example
# against it, and always takes it down again.
#
# Environment:
#   ETCD35_DIR         static etcd and etcdctl (default /opt/etcd-3.5)
#   HMETCD_ETCD_PORT   host port of the node (default: a free one)
#   CARGO_TARGET_DIR   passed on to cargo
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

etcd35_dir=${ETCD35_DIR:-/opt/etcd-3.5}
if [ ! -x "$etcd35_dir/etcd" ] && [ -x "$repo_root/.cache/etcd-3.5/etcd" ]; then
    etcd35_dir="$repo_root/.cache/etcd-3.5"
fi
for tool in etcd etcdctl; do
    if [ ! -x "$etcd35_dir/$tool" ]; then
        echo "compose-smoke: no $etcd35_dir/$tool; run scripts/install-etcd.sh first" >&2
        exit 1
    fi
done

if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
else
    echo "compose-smoke: neither 'docker compose' nor 'docker-compose' is installed" >&2
    exit 1
fi
echo "compose-smoke: using $("${compose[@]}" version | sed -n 1p)"

version=$("$etcd35_dir/etcd" --version | sed -n 1p | awk '{print $3}')
image="hmetcd/etcd:${version}-local"
context=$(mktemp -d)
project="hmetcd-smoke-$$"
export HMETCD_ETCD_IMAGE="$image"
export HMETCD_ETCD_PORT=${HMETCD_ETCD_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

cleanup() {
    "${compose[@]}" -p "$project" down --volumes --remove-orphans >/dev/null 2>&1 || true
    rm -rf "$context"
}
trap cleanup EXIT

echo "compose-smoke: building $image from $etcd35_dir"
cp "$etcd35_dir/etcd" "$etcd35_dir/etcdctl" "$context/"
# The classic builder needs nothing from a registry for FROM scratch.
DOCKER_BUILDKIT=0 docker build --quiet -f docker/etcd/Dockerfile -t "$image" "$context"

echo "compose-smoke: ${compose[*]} config"
"${compose[@]}" -p "$project" config --quiet
"${compose[@]}" -p "$project" --profile cluster config --services

echo "compose-smoke: starting the single node on port $HMETCD_ETCD_PORT"
"${compose[@]}" -p "$project" up -d etcd
container=$("${compose[@]}" -p "$project" ps -q etcd)
status=starting
for _ in $(seq 1 60); do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$container")
    [ "$status" = healthy ] && break
    sleep 1
done
if [ "$status" != healthy ]; then
    echo "compose-smoke: etcd is $status after 60s" >&2
    docker logs --tail 30 "$container" >&2 || true
    exit 1
fi
endpoint="http://127.0.0.1:${HMETCD_ETCD_PORT}"
echo "compose-smoke: etcd is healthy at $endpoint"
"$etcd35_dir/etcdctl" --endpoints="$endpoint" endpoint status --write-out=table

HMETCD_ENDPOINT="$endpoint" cargo run --quiet -p hmetcd --features etcd --example quickstart
echo "compose-smoke: ok"
