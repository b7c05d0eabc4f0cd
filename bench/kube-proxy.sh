#!/usr/bin/env bash
# tweed's agent against the real kube-proxy 1.20.2 (iptables mode), on the
# same real API server, with the same Services and EndpointSlices, in one
# run: first full sync, +1 endpoint, +1 Service, peak RSS.
#
# A two-node Kubernetes lab (examples: `kubernetes: true`): n1 runs tweed's
# agent (Kubernetes datastore), n2 runs kube-proxy in its own network
# namespace (n2's tweed agent is stopped first). N selector-less Services
# with 10 endpoints each are created through the API, then each proxy is
# started fresh and timed by its own account: tweed's log line ("service
# proxy: full sync millis=..." / "applied millis=..."), kube-proxy's
# metric kubeproxy_sync_proxy_rules_duration_seconds (sum and count before
# and after). kube-proxy is told to leave the machine's conntrack limits and
# timeouts and its own OOM score alone (it would change machine-wide values).
#
# Usage (as root): bench/kube-proxy.sh [N...]   (default: 1000 10000)
# KP_TIMEOUT (default 600) caps each wait for kube-proxy's first sync.
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("${@:-1000 10000}"); read -r -a sizes <<< "${sizes[*]}"
E=10; KP_TIMEOUT=${KP_TIMEOUT:-600}
./scripts/install-kubernetes.sh >/dev/null
cargo build --release --locked -q
tweed=$PWD/target/release/tweed
k8s=/var/cache/tweed/kubernetes/v1.20.2/bin
lab=bkp
work=$(mktemp -d)
kp=""
cleanup() {
  [ -n "$kp" ] && kill "$kp" 2>/dev/null || true
  $tweed lab down --name $lab >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
kc() { "$tweed" lab kubectl --name $lab -- "$@"; }
wait_for() { # SECONDS COMMAND...: until COMMAND succeeds
  local until=$(( $(date +%s) + $1 )); shift
  until "$@"; do [ "$(date +%s)" -lt "$until" ] || return 1; sleep 0.2; done
}
kp_metric() { # sum count of the sync histogram, from kube-proxy's metrics port
  ip netns exec "tw-${lab}_n-n2" curl -s http://127.0.0.1:10249/metrics |
    awk '/^kubeproxy_sync_proxy_rules_duration_seconds_sum/ {s=$2} /^kubeproxy_sync_proxy_rules_duration_seconds_count/ {c=$2} END {print s+0, c+0}'
}
rss() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
tweed_syncs() { grep -c "$1" "/run/tweed/lab/$lab/nodes/n1/agent.log" || true; }
tweed_last_ms() { grep "$1" "/run/tweed/lab/$lab/nodes/n1/agent.log" | tail -1 | grep -o 'millis="[0-9.]*"' | tr -dc '0-9.'; }

echo "## Real kube-proxy 1.20.2 (iptables) vs tweed on one API server ($(date -u +%F), $(nproc) vCPU, kernel $(uname -r), ${E} endpoints per Service)"
echo
echo "| N services | proxy | first full sync ms | +1 endpoint ms | +1 Service ms | peak RSS MiB |"
echo "|---|---|---|---|---|---|"
for n in "${sizes[@]}"; do
  $tweed lab down --name $lab >/dev/null 2>&1 || true
  printf 'kubernetes: true\nnodes: [{name: n1}, {name: n2}]\n' > "$work/topo.yaml"
  $tweed lab up -f "$work/topo.yaml" --name $lab --no-matrix >/dev/null
  st=/run/tweed/lab/$lab/state.json
  $tweed lab agent stop n1 --name $lab
  $tweed lab agent stop n2 --name $lab
  api=$(jq -r .kube.slices_api $st)
  python3 bench/k8s_objects.py "$n" $E "$api" n1 "$work/objs" 4
  start=$(date +%s)
  for i in 0 1 2 3; do kc create -f - < "$work/objs-$i.json" >/dev/null & done
  wait
  echo "(created $n Services and their slices through the API in $(( $(date +%s) - start )) s)" >&2

  # tweed: a fresh agent's first full sync.
  before=$(tweed_syncs 'service proxy: full sync')
  $tweed lab agent start n1 --name $lab --no-wait
  wait_for 600 bash -c "[ \$(grep -c 'service proxy: full sync' /run/tweed/lab/$lab/nodes/n1/agent.log) -gt $before ]"
  t_full=$(tweed_last_ms 'service proxy: full sync')
  apid=$(jq -r '.nodes[0].agent_pid' $st)

  # kube-proxy in n2's namespace, with the admin kubeconfig.
  cat > "$work/kp.yaml" <<KP
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: /run/tweed/lab/$lab/kube/admin.kubeconfig}
mode: iptables
clusterCIDR: 10.244.0.0/16
hostnameOverride: n2
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
oomScoreAdj: 0
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
KP
  ip netns exec "tw-${lab}_n-n2" "$k8s/kube-proxy" --config "$work/kp.yaml" > "$work/kp-$n.log" 2>&1 & kp=$!
  kp_done=1
  if ! wait_for "$KP_TIMEOUT" bash -c "read s c <<< \"\$(ip netns exec tw-${lab}_n-n2 curl -s http://127.0.0.1:10249/metrics | awk '/^kubeproxy_sync_proxy_rules_duration_seconds_count/ {print 0, \$2}')\"; [ \"\${c:-0}\" -ge 1 ]"; then
    kp_done=""
  fi
  read -r s1 c1 <<< "$(kp_metric)"
  k_full=$(awk -v s="$s1" -v c="$c1" 'BEGIN {if (c > 0) printf "%.0f", (c == 1 ? s : s / c) * 1000}')

  # +1 endpoint in one Service's slice.
  read -r s1 c1 <<< "$(kp_metric)"; b=$(tweed_syncs 'applied full=false')
  kc patch endpointslice s0-bench --type=json -p '[{"op":"add","path":"/endpoints/-","value":{"addresses":["10.199.0.1"],"conditions":{"ready":true}}}]' >/dev/null
  wait_for 120 bash -c "[ \$(grep -c 'applied full=false' /run/tweed/lab/$lab/nodes/n1/agent.log) -gt $b ]"
  t_ep=$(tweed_last_ms 'applied full=false')
  [ -n "$kp_done" ] && wait_for 300 bash -c "[ \"\$(ip netns exec tw-${lab}_n-n2 curl -s http://127.0.0.1:10249/metrics | awk '/^kubeproxy_sync_proxy_rules_duration_seconds_count/ {print \$2}')\" -gt $c1 ]"
  read -r s2 c2 <<< "$(kp_metric)"
  k_ep=$(awk -v a="$s1" -v b="$s2" -v x="$c1" -v y="$c2" 'BEGIN {if (y > x) printf "%.0f", (b - a) / (y - x) * 1000}')

  # +1 Service with its slice.
  python3 bench/k8s_objects.py 1 $E "$api" n1 "$work/one" 1 extra
  read -r s1 c1 <<< "$(kp_metric)"; b=$(tweed_syncs 'applied full=false')
  kc create -f - < "$work/one-0.json" >/dev/null
  wait_for 120 bash -c "[ \$(grep -c 'applied full=false' /run/tweed/lab/$lab/nodes/n1/agent.log) -gt $b ]"
  sleep 1 # the Service and its slice may arrive as two updates: take the last
  t_svc=$(tweed_last_ms 'applied full=false')
  [ -n "$kp_done" ] && wait_for 300 bash -c "[ \"\$(ip netns exec tw-${lab}_n-n2 curl -s http://127.0.0.1:10249/metrics | awk '/^kubeproxy_sync_proxy_rules_duration_seconds_count/ {print \$2}')\" -gt $c1 ]"
  [ -n "$kp_done" ] && sleep 2 # likewise for kube-proxy (its minimum sync period batches them)
  read -r s2 c2 <<< "$(kp_metric)"
  k_svc=$(awk -v a="$s1" -v b="$s2" -v x="$c1" -v y="$c2" 'BEGIN {if (y > x) printf "%.0f", (b - a) / (y - x) * 1000}')

  echo "| $n | tweed (nftables maps) | ${t_full%.*} | ${t_ep} | ${t_svc} | $(rss "$apid") |"
  if [ -n "$kp_done" ]; then
    echo "| $n | kube-proxy 1.20.2 (iptables) | $k_full | $k_ep | $k_svc | $(rss "$kp") |"
  else
    echo "| $n | kube-proxy 1.20.2 (iptables) | not done after ${KP_TIMEOUT} s | | | $(rss "$kp") so far |"
  fi
  kill "$kp"; wait "$kp" 2>/dev/null || true; kp=""
  $tweed lab down --name $lab >/dev/null
done
