#!/usr/bin/env bash
# dcoord vs etcd, side by side (issue 7): installs what it needs (protoc, and Debian's
# etcd-server package with apt when `etcd` is missing), builds, and runs the benchmark, which
# starts its own etcd members and dcoord nodes on free 127.0.0.1 ports and stops exactly the
# processes it started. Writes docs/benchmarks.md (or --out FILE). Takes about 5-10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

if ! command -v etcd >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "bench-etcd: etcd is missing and this is not root; install etcd-server" >&2; exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  echo "bench-etcd: installing etcd-server with apt-get" >&2
  if ! $SUDO apt-get install -y --no-install-recommends etcd-server >/dev/null 2>&1; then
    $SUDO apt-get update >/dev/null
    $SUDO apt-get install -y --no-install-recommends etcd-server >/dev/null
  fi
fi
etcd --version | head -1 >&2

# One build of both (the dcoord binary runs the 3-node cluster's nodes); building them in two
# commands would compile d-engine twice (the two packages unify dependency features apart).
cargo build --release -p dcoord -p dcoord-vs-etcd --bins
exec ./target/release/dcoord-vs-etcd "$@"
