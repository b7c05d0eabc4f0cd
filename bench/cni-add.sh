#!/usr/bin/env bash
# CNI ADD latency, tweed vs the reference bridge + host-local plugins, in one
# lab node, side by side. Usage (as root): bench/cni-add.sh [ROUNDS] [PER_ROUND]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-4}; per=${2:-50}
lab=bcni
cargo build --release --locked -q
tweed=$PWD/target/release/tweed
$tweed lab down --name $lab >/dev/null 2>&1 || true
trap '$tweed lab down --name $lab >/dev/null' EXIT
topo=$(mktemp); printf 'nodes: [{name: n1}]\n' > "$topo"
$tweed lab up -f "$topo" --name $lab --no-matrix >/dev/null
for i in $(seq 0 $((per - 1))); do ip netns add "tw-${lab}_b-$i"; done
echo "## CNI ADD latency ($(date -u +%F), $(nproc) vCPU, kernel $(uname -r), ${rounds} rounds x ${per} ADDs per plugin per concurrency)"
echo
ip netns exec "tw-${lab}_n-n1" python3 bench/cni_add.py "$tweed" "/run/tweed/lab/$lab/nodes/n1/net.d/10-tweed.conflist" $lab "$rounds" "$per"
