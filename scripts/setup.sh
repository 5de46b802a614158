#!/usr/bin/env bash
# Installs what building dcoord needs on a fresh Debian/Ubuntu machine: protoc (d-engine's
# build script runs it). Skips everything that is already there. Safe to run again.
set -euo pipefail

if command -v protoc >/dev/null 2>&1; then
  echo "setup: protoc present ($(protoc --version))" >&2
  exit 0
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "setup: protoc is missing and this is not root; install protobuf-compiler" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
echo "setup: installing protobuf-compiler with apt-get" >&2
if ! $SUDO apt-get install -y --no-install-recommends protobuf-compiler >/dev/null 2>&1; then
  $SUDO apt-get update >/dev/null
  $SUDO apt-get install -y --no-install-recommends protobuf-compiler >/dev/null
fi
protoc --version >&2
