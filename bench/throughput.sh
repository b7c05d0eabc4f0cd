#!/usr/bin/env bash
# Pod-to-pod TCP and UDP throughput and round-trip time for direct routes,
# VXLAN and the plain underlay between the same two nodes, in one run,
# rounds interleaved. One lab (backend auto): direct while the fabric
# passes pod-addressed traffic, VXLAN while `tweed lab fabric` makes it drop
# it (auto moves the peers over); node to node for the underlay.
# Usage (as root): bench/throughput.sh [ROUNDS] [SECONDS]
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
printf 'nodes: [{name: n1}, {name: n2}]\npods: [{name: a, node: n1}, {name: b, node: n2}]\nagent: {leaseTtl: 10, resync: 1}\n' > "$topo"
$tweed lab up -f "$topo" --name $lab --no-matrix >/dev/null
st=/run/tweed/lab/$lab/state.json
pb=$(jq -r '.pods.b.ip' $st); n2=$(jq -r '.nodes[1].ip' $st)
na="tw-${lab}_n-n1"; nb="tw-${lab}_n-n2"; podA="tw-${lab}_p-a"; podB="tw-${lab}_p-b"
ip netns exec "$podB" iperf3 -s -p 5201 >/dev/null 2>&1 & pids+=($!)
ip netns exec "$nb" iperf3 -s -p 5202 >/dev/null 2>&1 & pids+=($!)
ip netns exec "$podA" "$tweed" probe tcp-wait "$pb:5201" --timeout 10
ip netns exec "$na" "$tweed" probe tcp-wait "$n2:5202" --timeout 10

mode() { jq -r '.peers[0].mode' /run/tweed/lab/$lab/nodes/n1/run/status.json; }
path() { # direct | vxlan: make the fabric pass or drop pod traffic, wait for both agents to follow
  local want=$1 drop=false
  [ "$want" = vxlan ] && drop=true
  $tweed lab fabric --name $lab --drop-pod-traffic $drop >/dev/null
  for _ in $(seq 100); do
    [ "$(mode)" = "$want" ] && [ "$(jq -r '.peers[0].mode' /run/tweed/lab/$lab/nodes/n2/run/status.json)" = "$want" ] && return
    sleep 0.1
  done
  echo "the path did not become $want" >&2; exit 1
}
tcp() { ip netns exec "$1" iperf3 -c "$2" -p "$3" -t "$secs" -J | jq '.end.sum_received.bits_per_second / 1e9'; }
udp() { ip netns exec "$1" iperf3 -c "$2" -p "$3" -u -b 0 -l 1400 -t "$secs" -J | jq '.end.sum.bits_per_second / 1e9'; }
rtt() { ip netns exec "$1" ping -q -c 200 -i 0.005 "$2" | awk -F'[/ ]' '/rtt|round-trip/ {print $8}'; }
declare -A T U
for r in $(seq "$rounds"); do
  path direct; T[direct]+="$(tcp "$podA" "$pb" 5201) "; U[direct]+="$(udp "$podA" "$pb" 5201) "
  path vxlan;  T[vxlan]+="$(tcp "$podA" "$pb" 5201) ";  U[vxlan]+="$(udp "$podA" "$pb" 5201) "
  T[underlay]+="$(tcp "$na" "$n2" 5202) "; U[underlay]+="$(udp "$na" "$n2" 5202) "
done
path direct; R_direct=$(rtt "$podA" "$pb")
path vxlan; R_vxlan=$(rtt "$podA" "$pb")
R_underlay=$(rtt "$na" "$n2")
med() { printf '%s\n' $1 | sort -g | awk '{a[NR]=$1} END {printf "%.2f", a[int((NR+1)/2)]}'; }
echo "## Pod-to-pod paths side by side ($(date -u +%F), $(nproc) vCPU, kernel $(uname -r), iperf3 one stream, ${secs} s x ${rounds} rounds interleaved)"
echo
echo "| path | TCP Gbit/s per round | TCP median | UDP Gbit/s per round (1400-byte datagrams, unlimited rate) | UDP median | avg RTT ms (200 pings) |"
echo "|---|---|---|---|---|---|"
for p in direct vxlan underlay; do
  r=R_$p
  label=$p; [ $p = direct ] && label="pod → pod, direct routes (auto)"; [ $p = vxlan ] && label="pod → pod, VXLAN (auto, fabric drops pod traffic)"; [ $p = underlay ] && label="node → node, plain underlay"
  echo "| $label | ${T[$p]}| $(med "${T[$p]}") | ${U[$p]}| $(med "${U[$p]}") | ${!r} |"
done
echo
awk -v d="$(med "${T[direct]}")" -v v="$(med "${T[vxlan]}")" -v u="$(med "${T[underlay]}")" 'BEGIN {
  printf "- TCP: direct / underlay = **%.2f** (goal 0.97), VXLAN / underlay = **%.2f** (goal 0.90)\n", d / u, v / u }'
awk -v d="$(med "${U[direct]}")" -v v="$(med "${U[vxlan]}")" -v u="$(med "${U[underlay]}")" 'BEGIN {
  printf "- UDP: direct / underlay = **%.2f**, VXLAN / underlay = **%.2f**\n", d / u, v / u }'
awk -v d="$R_direct" -v v="$R_vxlan" -v u="$R_underlay" 'BEGIN { printf "- RTT: direct / underlay = **%.2f**, VXLAN / underlay = **%.2f**\n", d / u, v / u }'
