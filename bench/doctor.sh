#!/usr/bin/env bash
# How long `tweed lab doctor` takes on a 3-node VXLAN lab (every node
# examined at once, each in its own namespace): healthy, where every probe
# answers, and with a fault whose probes wait for their timeout (UDP 8472
# blocked between two nodes). Goal: under 2 s. Also `tweed lab trace` of a
# ClusterIP with 3 endpoints on 3 nodes (the prediction alone, and with
# --verify: a real request plus nftables' trace of it). Prints the median
# per case.
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
measure() { # CASE EXPECTED_EXIT [COMMAND...] (default: lab doctor)
  local case=$1 want=$2 ms=()
  shift 2
  [ $# -gt 0 ] || set -- lab doctor --name $lab -o json
  for _ in $(seq "$runs"); do
    local t0 t1 rc=0
    t0=$(date +%s%N)
    $tweed "$@" >/dev/null || rc=$?
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
manifest=$(mktemp)
printf 'apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 3\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: web, ports: [{containerPort: 8080}]}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n' > "$manifest"
$tweed lab apply -f "$manifest" --name $lab >/dev/null
rm -f "$manifest"
svc=$($tweed lab status --name $lab | awk '$1 == "default/web" { print $3 }')
measure "trace p1 -> ClusterIP" 0 lab trace --name $lab p1 "$svc:80" -o json
measure "trace --verify p1 -> ClusterIP" 0 lab trace --name $lab p1 "$svc:80" --verify -o json
