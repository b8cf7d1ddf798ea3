#!/usr/bin/env bash
# Installs what a fresh machine lacks to build mailmesh: the rocksdb crate's bindgen needs libclang
# (libclang-dev), RocksDB's C++ needs g++, and tests/durability.rs needs strace.
set -euo pipefail
source "$(dirname "$0")/lib/libclang.sh"
missing=()
mapfile -t directories < <(libclang_directories)
libclang_in "${directories[@]}" >/dev/null || missing+=(libclang-dev)   # the rocksdb crate's bindgen
command -v g++ >/dev/null || missing+=(g++)                             # RocksDB's C++ sources
command -v strace >/dev/null || missing+=(strace)                       # tests/durability.rs counts WAL syncs
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    mapfile -t directories < <(libclang_directories)
    libclang_in "${directories[@]}" >/dev/null || { echo "setup: libclang-dev installed but no libclang.so found" >&2; exit 1; }
fi
command -v cargo >/dev/null || { echo "setup: cargo is missing: install the Rust toolchain (rustup)" >&2; exit 1; }
