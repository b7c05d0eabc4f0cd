#!/usr/bin/env bash
# Installs what tweed needs, builds it, and brings up the demo lab: 3 nodes,
# 2 pods each, then prints the pod-to-pod reachability matrix.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo build --release --locked
# A demo lab left from an earlier run is replaced.
./target/release/tweed lab down --name demo >/dev/null 2>&1 || true
./target/release/tweed lab up -f examples/demo.yaml --name demo
