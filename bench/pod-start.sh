#!/usr/bin/env bash
# Pod start to first packet on a real kubelet node, tweed's CNI plugin
# against Debian's reference bridge + host-local (containernetworking-plugins),
# side by side on the same node: a one-node lab with containerd 1.6 and
# kubelet 1.20.2 (`kubelet:` topology). Each pod is created with kubectl
# (nodeName set, so the scheduler is not part of it); its only command sends
# one UDP datagram to the node, and the time from just before `kubectl
# create` to that datagram's arrival is the pod's start-to-first-packet:
# API server, kubelet, containerd's sandbox (netns, pause, CNI ADD through
# the plugin under test), container start. One pod at a time; rounds
# alternate the plugin (the reference runs while its conflist sorts first in
# the node's /etc/cni/net.d); pods are deleted between rounds, not timed.
#
# Usage (as root): bench/pod-start.sh [ROUNDS] [PODS_PER_ROUND]   (default 2 x 25)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}; per=${2:-25}
./scripts/install-kubernetes.sh >/dev/null
./scripts/install-containerd.sh >/dev/null
cargo build --release --locked -q
tweed=$PWD/target/release/tweed
lab=bpod
image=$PWD/target/image/bench-pod-start.oci.tar
./scripts/build-image.sh --tag tweed:0.1.0 --out "$image" >/dev/null
$tweed lab down --name $lab >/dev/null 2>&1 || true
trap '$tweed lab down --name $lab >/dev/null' EXIT
topo=$(mktemp); printf 'kubelet:\n  images: [%s]\nnodes: [{name: n1}]\n' "$image" > "$topo"
$tweed lab up -f "$topo" --name $lab --no-matrix >/dev/null
rm -f "$topo"
node=/run/tweed/lab/$lab/nodes/n1
for p in bridge host-local; do cp /usr/lib/cni/$p "$node/k/opt/cni/bin/"; done
echo "## Pod start to first packet ($(date -u +%F), $(nproc) vCPU, kernel $(uname -r), ${rounds} rounds x ${per} pods per plugin)"
echo
ip netns exec "tw-${lab}_n-n1" python3 bench/pod_start.py "$tweed" "$lab" "$node/net.d" "$rounds" "$per"
