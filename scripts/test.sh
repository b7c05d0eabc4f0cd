#!/usr/bin/env bash
# Runs every test: pure unit and property tests, then the lab end-to-end
# tests (root, network namespaces, a real etcd per lab, podman).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "test.sh: the end-to-end tests build network namespaces and need root" >&2
  exit 1
fi
./scripts/install-deps.sh
cargo build --workspace --all-targets --locked
cargo test --workspace --locked -- --test-threads 4
