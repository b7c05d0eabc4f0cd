#!/usr/bin/env bash
# How long `tweed lab doctor` takes on a 3-node VXLAN lab (every node
# examined at once, each in its own namespace): healthy, where every probe
# answers, and with a fault whose probes wait for their timeout (UDP 8472
# blocked between two nodes). Goal: under 2 s. Prints each run and the
# median per case.
#
# Usage (as root): bench/doctor.sh [RUNS]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
cargo build --release --locked -q
tweed=$PWD/target/release/tweed
lab=bdoc
$tweed lab down --name $lab >/dev/null 2>&1 || true
trap '$tweed lab down --name $lab >/dev/null' EXIT
topo=$(mktemp)
printf 'cluster: {backend: vxlan}\nnodes: [{name: n1}, {name: n2}, {name: n3}]\npods: [{name: p1, node: n1}, {name: p2, node: n2}, {name: p3, node: n3}]\n' > "$topo"
$tweed lab up -f "$topo" --name $lab --no-matrix >/dev/null
rm -f "$topo"
measure() { # CASE EXPECTED_EXIT
  local case=$1 want=$2 ms=()
  for _ in $(seq "$runs"); do
    local t0 t1 rc=0
    t0=$(date +%s%N)
    $tweed lab doctor --name $lab -o json >/dev/null || rc=$?
    t1=$(date +%s%N)
    [ "$rc" = "$want" ] || { echo "doctor exited $rc in case $case (expected $want)" >&2; exit 1; }
    ms+=($(( (t1 - t0) / 1000000 )))
  done
  printf '%s\n' "${ms[@]}" | sort -n | awk -v c="$case" '{ a[NR] = $1 } END {
    printf "%-28s median %5d ms  min %5d  max %5d  (%d runs)\n", c, a[int((NR + 1) / 2)], a[1], a[NR], NR }'
}
measure "healthy" 0
$tweed lab fault inject vxlan-blocked --node n1 --peer n2 --name $lab >/dev/null
measure "vxlan-blocked n1<->n2" 1
$tweed lab fault clear --name $lab >/dev/null
