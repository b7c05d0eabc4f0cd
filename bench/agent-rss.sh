#!/usr/bin/env bash
# The real agent with N Services × 10 endpoints in etcd: restart it, wait
# for its first full sync, report the sync time it logs and its peak RSS
# (VmHWM). Usage (as root): bench/agent-rss.sh [N...] (default 1000 10000 30000)
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("${@:-1000 10000 30000}"); read -r -a sizes <<< "${sizes[*]}"
cargo build --release --locked -q
tweed=$PWD/target/release/tweed
lab=brss
trap '$tweed lab down --name $lab >/dev/null 2>&1 || true' EXIT
echo "| N services | agent full sync ms (its log) | agent peak RSS MiB (VmHWM) |"
echo "|---|---|---|"
for n in "${sizes[@]}"; do
  $tweed lab down --name $lab >/dev/null 2>&1 || true
  topo=$(mktemp); printf 'nodes: [{name: n1}]\n' > "$topo"
  $tweed lab up -f "$topo" --name $lab --no-matrix >/dev/null
  st=/run/tweed/lab/$lab/state.json
  ip netns exec "tw-${lab}_cp" "$tweed" store bulk-load --services "$n" --endpoints 10 --etcd-endpoints "http://$(jq -r .cp_ip $st):2379" >/dev/null
  log=/run/tweed/lab/$lab/nodes/n1/agent.log
  before=$(grep -c 'service proxy: full sync' "$log" || true)
  $tweed lab agent restart n1 --name $lab
  for _ in $(seq 600); do
    [ "$(grep -c 'service proxy: full sync' "$log" || true)" -gt "$before" ] && break
    sleep 0.1
  done
  ms=$(grep 'service proxy: full sync' "$log" | tail -1 | grep -o 'millis="[0-9.]*"' | tr -dc '0-9.')
  pid=$(jq -r '.nodes[0].agent_pid' $st)
  rss=$(awk '/VmHWM/ {printf "%.0f", $2 / 1024}' /proc/$pid/status)
  echo "| $n | ${ms%.*} | $rss |"
  $tweed lab down --name $lab >/dev/null
done
