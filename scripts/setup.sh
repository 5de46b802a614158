#!/usr/bin/env bash
# Installs what building dcoord needs on a fresh Debian/Ubuntu machine: protoc (d-engine's
# build script runs it). `setup.sh etcd` also installs etcd (for scripts/bench-etcd.sh).
# Skips everything that is already there. Safe to run again.
set -euo pipefail

# ensure COMMAND PACKAGE: installs PACKAGE with apt-get unless COMMAND is on the PATH.
ensure() {
  local cmd=$1 pkg=$2
  if command -v "$cmd" >/dev/null 2>&1; then
    echo "setup: $cmd present" >&2
    return
  fi
  local sudo=""
  if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "setup: $cmd is missing and this is not root; install $pkg" >&2; exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  echo "setup: installing $pkg with apt-get" >&2
  if ! $sudo apt-get install -y --no-install-recommends "$pkg" >/dev/null 2>&1; then
    $sudo apt-get update >/dev/null
    $sudo apt-get install -y --no-install-recommends "$pkg" >/dev/null
  fi
}

ensure protoc protobuf-compiler
protoc --version >&2
for extra in "$@"; do
  case "$extra" in
    etcd) ensure etcd etcd-server; etcd --version | head -1 >&2 ;;
    *) echo "setup: unknown extra '$extra' (known: etcd)" >&2; exit 2 ;;
  esac
done
