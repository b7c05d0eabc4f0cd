#!/usr/bin/env bash
# IPv4 BIG TCP: pod → pod against node → node on an underlay whose NICs
# allow 192 KiB packets (`underlay: {bigTcp: true}`) and on a plain one,
# two labs up side by side, rounds interleaved. Each round: both labs on
# direct routes (pod → pod and node → node on each), then both on VXLAN
# (`tweed lab fabric --drop-pod-traffic true`: auto moves the peers over
# and the pods back to 64 KiB). iperf3, one TCP stream.
# Usage (as root): bench/bigtcp.sh [ROUNDS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; secs=${2:-5}
cargo build --release --locked -q
tweed=$PWD/target/release/tweed
labs=(bigb bigp)
declare -A big=([bigb]=true [bigp]=false)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for l in "${labs[@]}"; do $tweed lab down --name "$l" >/dev/null || true; done
}
trap cleanup EXIT
for l in "${labs[@]}"; do
  $tweed lab down --name "$l" >/dev/null 2>&1 || true
  topo=$(mktemp)
  printf 'underlay: {bigTcp: %s}\nnodes: [{name: n1}, {name: n2}]\npods: [{name: a, node: n1}, {name: b, node: n2}]\nagent: {leaseTtl: 10, resync: 1}\n' "${big[$l]}" > "$topo"
  $tweed lab up -f "$topo" --name "$l" --no-matrix >/dev/null
  st=/run/tweed/lab/$l/state.json
  ip netns exec "tw-${l}_p-b" iperf3 -s -p 5201 >/dev/null 2>&1 & pids+=($!)
  ip netns exec "tw-${l}_n-n2" iperf3 -s -p 5202 >/dev/null 2>&1 & pids+=($!)
  ip netns exec "tw-${l}_p-a" "$tweed" probe tcp-wait "$(jq -r .pods.b.ip $st):5201" --timeout 10
  ip netns exec "tw-${l}_n-n1" "$tweed" probe tcp-wait "$(jq -r '.nodes[1].ip' $st):5202" --timeout 10
done

mode() { jq -r '.peers[0].mode' "/run/tweed/lab/$1/nodes/$2/run/status.json"; }
path() { # LAB direct|vxlan: the fabric passes or drops pod traffic; wait for both agents and the pods' size
  local l=$1 want=$2 drop=false size=
  [ "$want" = vxlan ] && drop=true
  $tweed lab fabric --name "$l" --drop-pod-traffic $drop >/dev/null
  size=$([ "$want" = direct ] && [ "${big[$l]}" = true ] && echo 196608 || echo 65536)
  for _ in $(seq 300); do
    [ "$(mode "$l" n1)" = "$want" ] && [ "$(mode "$l" n2)" = "$want" ] &&
      [ "$(ip netns exec "tw-${l}_p-a" "$tweed" probe gso eth0 | jq .gsoIpv4MaxSize)" = "$size" ] && return
    sleep 0.1
  done
  echo "lab $l: the path did not become $want (pods at $size)" >&2; exit 1
}
# Gbit/s and the sender's retransmissions, as "G/R".
tcp() { ip netns exec "$1" iperf3 -c "$2" -p "$3" -t "$secs" -J |
  jq -r '"\(.end.sum_received.bits_per_second / 1e9 * 100 | round / 100)/\(.end.sum_sent.retransmits)"'; }
declare -A R
for r in $(seq "$rounds"); do
  for l in "${labs[@]}"; do path "$l" direct; done
  for l in "${labs[@]}"; do
    st=/run/tweed/lab/$l/state.json
    R[$l-pod]+="$(tcp "tw-${l}_p-a" "$(jq -r .pods.b.ip $st)" 5201) "
    R[$l-node]+="$(tcp "tw-${l}_n-n1" "$(jq -r '.nodes[1].ip' $st)" 5202) "
  done
  for l in "${labs[@]}"; do path "$l" vxlan; done
  for l in "${labs[@]}"; do
    st=/run/tweed/lab/$l/state.json
    R[$l-vxlan]+="$(tcp "tw-${l}_p-a" "$(jq -r .pods.b.ip $st)" 5201) "
  done
done
gbit() { for x in $1; do echo "${x%/*}"; done; }
med() { gbit "$1" | sort -g | awk '{a[NR]=$1} END {printf "%.2f", a[int((NR+1)/2)]}'; }
retr() { for x in $1; do echo "${x#*/}"; done | awk '{s+=$1} END {print s}'; }
echo "## IPv4 BIG TCP: pod → pod against node → node ($(date -u +%F), $(nproc) vCPU, kernel $(uname -r), iperf3 one TCP stream, ${secs} s x ${rounds} rounds interleaved)"
echo
echo "| underlay | path | Gbit/s / retransmits per round | median Gbit/s | retransmits (sum) |"
echo "|---|---|---|---|---|"
for l in "${labs[@]}"; do
  u=$([ "${big[$l]}" = true ] && echo "BIG TCP (192 KiB)" || echo "plain (64 KiB)")
  for p in pod node vxlan; do
    label=$p; [ $p = pod ] && label="pod → pod, direct"; [ $p = node ] && label="node → node"; [ $p = vxlan ] && label="pod → pod, VXLAN"
    echo "| $u | $label | ${R[$l-$p]}| $(med "${R[$l-$p]}") | $(retr "${R[$l-$p]}") |"
  done
done
echo
for l in "${labs[@]}"; do
  u=$([ "${big[$l]}" = true ] && echo "BIG TCP underlay" || echo "plain underlay")
  awk -v u="$u" -v p="$(med "${R[$l-pod]}")" -v n="$(med "${R[$l-node]}")" -v v="$(med "${R[$l-vxlan]}")" 'BEGIN {
    printf "- %s: pod → pod direct / node → node = **%.2f**, VXLAN / node → node = **%.2f**\n", u, p / n, v / n }'
done
