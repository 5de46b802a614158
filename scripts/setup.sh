#!/usr/bin/env bash
# Installs what building dcoord needs on a fresh Debian/Ubuntu machine: protoc (d-engine's
# build script runs it), and d-engine-core 0.2.4 with dcoord's own patch in .patched/ (the
# README's "Patched d-engine-core" says why). `setup.sh etcd` also installs etcd (for
# scripts/bench-etcd.sh). Skips everything that is already there. Safe to run again.
set -euo pipefail

# ensure COMMAND PACKAGE: installs PACKAGE with apt-get unless COMMAND is on the PATH (or,
# for an absolute path, unless that file exists).
present() {
  case $1 in
    /*) [ -e "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}
ensure() {
  local cmd=$1 pkg=$2
  if present "$cmd"; then
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

# patch_crate NAME VERSION SHA256: fetches the pristine crate through cargo (its registry
# cache, else a throwaway project's `cargo fetch`), checks it against crates.io's checksum
# (the one Cargo.lock had before the patch), applies patches/NAME-VERSION.patch, and puts the
# result in .patched/NAME, where Cargo.toml's [patch.crates-io] points. Redone only when the
# patch changes.
patch_crate() {
  local name=$1 version=$2 sum=$3
  local root; root=$(cd "$(dirname "$0")/.." && pwd)
  local patch="$root/patches/$name-$version.patch" dest="$root/.patched/$name"
  local stamp; stamp="$version $(sha256sum "$patch" | cut -d' ' -f1)"
  if [ -f "$dest/.dcoord-patch" ] && [ "$(cat "$dest/.dcoord-patch")" = "$stamp" ]; then
    echo "setup: patched $name $version present" >&2
    return
  fi
  local cache="${CARGO_HOME:-$HOME/.cargo}/registry/cache"
  local crate; crate=$(ls "$cache"/*/"$name-$version.crate" 2>/dev/null | head -1 || true)
  if [ -z "$crate" ]; then
    echo "setup: fetching $name $version through cargo" >&2
    local tmp; tmp=$(mktemp -d)
    mkdir "$tmp/src"
    : > "$tmp/src/lib.rs"
    printf '[package]\nname = "dcoord-fetch-pristine"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\n%s = "=%s"\n' \
      "$name" "$version" > "$tmp/Cargo.toml"
    cargo fetch --quiet --manifest-path "$tmp/Cargo.toml"
    rm -rf "$tmp"
    crate=$(ls "$cache"/*/"$name-$version.crate" | head -1)
  fi
  if ! echo "$sum  $crate" | sha256sum --check --quiet - >/dev/null 2>&1; then
    echo "setup: $crate does not have crates.io's checksum $sum; refusing to patch it" >&2
    exit 1
  fi
  local work; work=$(mktemp -d)
  tar xzf "$crate" -C "$work"
  # Fresh mtimes: cargo rebuilds a path dependency only when a source file is newer than its
  # last build, and the crate's files carry their 2006 publish-time stamps.
  find "$work" -type f -exec touch {} +
  if ! (cd "$work/$name-$version" && git apply --whitespace=nowarn "$patch"); then
    echo "setup: $patch does not apply to $name $version" >&2
    exit 1
  fi
  echo "$stamp" > "$work/$name-$version/.dcoord-patch"
  rm -rf "$dest"
  mkdir -p "$(dirname "$dest")"
  mv "$work/$name-$version" "$dest"
  rm -rf "$work"
  echo "setup: patched $name $version into $dest" >&2
}

ensure protoc protobuf-compiler
protoc --version >&2
ensure git git
patch_crate d-engine-core 0.2.4 1f0df85c4c123417ee95ac56eb9736b67cef6bfc1cb885dcb738c5a289894bb7
patch_crate d-engine-server 0.2.4 4554cdd3c74d58f85d01e3b2e2e10b4ee5b12677164b73398ab1dd027f6fa063
patch_crate d-engine-client 0.2.4 786ec55815b6f2deaa669d19e99cac66c40f35888a5c06fe468bfe496f75e81d
for extra in "$@"; do
  case "$extra" in
    etcd)
      ensure etcd etcd-server; etcd --version | head -1 >&2
      # etcd-client's build compiles against protobuf's well-known types, which Debian ships
      # in libprotobuf-dev (protobuf-compiler alone has no descriptor.proto).
      ensure /usr/include/google/protobuf/descriptor.proto libprotobuf-dev ;;
    *) echo "setup: unknown extra '$extra' (known: etcd)" >&2; exit 2 ;;
  esac
done
