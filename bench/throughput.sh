#!/usr/bin/env bash
# Pod-to-pod TCP throughput and round-trip time across VXLAN, side by side
# with the plain underlay between the same two nodes, in one run, rounds
# interleaved. Usage: sudo bench/throughput.sh [ROUNDS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; secs=${2:-5}
lab=bperf
cargo build --release --locked -q
tweed=$PWD/target/release/tweed
$tweed lab down --name $lab >/dev/null 2>&1 || true
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; $tweed lab down --name $lab >/dev/null; }
trap cleanup EXIT
topo=$(mktemp)
printf 'nodes: [{name: n1}, {name: n2}]\npods: [{name: a, node: n1}, {name: b, node: n2}]\n' > "$topo"
$tweed lab up -f "$topo" --name $lab --no-matrix >/dev/null
st=/run/tweed/lab/$lab/state.json
pa=$(jq -r '.pods.a.ip' $st); pb=$(jq -r '.pods.b.ip' $st)
n2=$(jq -r '.nodes[1].ip' $st)
na="tw-${lab}_n-n1"; nb="tw-${lab}_n-n2"; podA="tw-${lab}_p-a"; podB="tw-${lab}_p-b"
ip netns exec "$podB" iperf3 -s -p 5201 >/dev/null 2>&1 & pids+=($!)
ip netns exec "$nb" iperf3 -s -p 5202 >/dev/null 2>&1 & pids+=($!)
ip netns exec "$podA" "$tweed" probe tcp-wait "$pb:5201" --timeout 10
ip netns exec "$na" "$tweed" probe tcp-wait "$n2:5202" --timeout 10

gbps() { jq '.end.sum_received.bits_per_second / 1e9'; }
vx=(); ul=()
for r in $(seq "$rounds"); do
  vx+=("$(ip netns exec "$podA" iperf3 -c "$pb" -p 5201 -t "$secs" -J | gbps)")
  ul+=("$(ip netns exec "$na" iperf3 -c "$n2" -p 5202 -t "$secs" -J | gbps)")
done
rtt() { ip netns exec "$1" ping -q -c 200 -i 0.005 "$2" | awk -F'[/ ]' '/rtt|round-trip/ {print $8}'; }
rtt_vx=$(rtt "$podA" "$pb"); rtt_ul=$(rtt "$na" "$n2")

med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mvx=$(med "${vx[@]}"); mul=$(med "${ul[@]}")
echo "## Pod-to-pod throughput and RTT ($(date -u +%F), $(nproc) vCPU, kernel $(uname -r), iperf3 one TCP stream, ${secs} s x ${rounds} rounds interleaved)"
echo
echo "| path | TCP Gbit/s per round | median Gbit/s | ping avg RTT ms (200 pings) |"
echo "|---|---|---|---|"
echo "| pod → pod across VXLAN (n1 → n2) | ${vx[*]} | $mvx | $rtt_vx |"
echo "| node → node plain underlay (n1 → n2) | ${ul[*]} | $mul | $rtt_ul |"
echo
awk -v a="$mvx" -v b="$mul" 'BEGIN {printf "- VXLAN / underlay TCP throughput = **%.2f** (goal: 0.90 or better)\n", a / b}'
awk -v a="$rtt_vx" -v b="$rtt_ul" 'BEGIN {printf "- VXLAN / underlay RTT = **%.2f**\n", a / b}'
