#!/usr/bin/env bash
# dcoord vs etcd, side by side (issue 7): installs what it needs (protoc, and Debian's
# etcd-server package with apt when `etcd` is missing), builds, and runs the benchmark, which
# starts its own etcd members and dcoord nodes on free 127.0.0.1 ports and stops exactly the
# processes it started. Writes docs/benchmarks.md (or --out FILE). Takes about 5-10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh etcd

# One build of both (the dcoord binary runs the 3-node cluster's nodes); building them in two
# commands would compile d-engine twice (the two packages unify dependency features apart).
cargo build --release -p dcoord -p dcoord-vs-etcd --bins
exec ./target/release/dcoord-vs-etcd "$@"
