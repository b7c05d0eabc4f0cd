#!/usr/bin/env bash
# The service proxy at scale, side by side with kube-proxy's iptables mode.
# For each N: tweed's proxy (in-process, the agent's own code) in one fresh
# namespace, then the same services as kube-proxy iptables-mode chains
# loaded with iptables-restore in another; connect() timed through the
# first and the last service in both.
# Usage (as root): bench/services.sh [N...]   (default: 1000 10000 30000)
# IPT_TIMEOUT (default 180) caps each iptables-restore.
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("${@:-1000 10000 30000}"); read -r -a sizes <<< "${sizes[*]}"
E=10; LISTEN=10.244.255.1; PORT=8080; IPT_TIMEOUT=${IPT_TIMEOUT:-180}
cargo build --release --locked -q
tweed=$PWD/target/release/tweed
work=$(mktemp -d)
pids=(); spaces=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for s in "${spaces[@]}"; do ip netns del "$s" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

setup() { # a namespace with a live server at LISTEN:PORT and a route for the service CIDR
  local ns=$1
  ip netns add "$ns"; spaces+=("$ns")
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add $LISTEN/32 dev lo
  ip -n "$ns" link add vb0 type veth peer name vb1
  ip -n "$ns" addr add 198.51.100.1/24 dev vb0
  ip -n "$ns" link set vb0 up; ip -n "$ns" link set vb1 up
  ip -n "$ns" route add 10.96.0.0/12 dev vb0
  ip netns exec "$ns" "$tweed" echo --pod bench --node bench --listen $LISTEN:$PORT >/dev/null 2>&1 & pids+=($!)
  ip netns exec "$ns" "$tweed" probe tcp-wait $LISTEN:$PORT --timeout 10
}
lat() { ip netns exec "$1" "$tweed" probe connect-latency "$2" --count 500 | jq -r '"\(.p50us|floor) / \(.p99us|floor)"'; }
ms() { awk -v s="$1" -v e="$2" 'BEGIN {printf "%.0f", (e - s) / 1e6}'; }

echo "## Service proxy at scale ($(date -u +%F), $(nproc) vCPU, kernel $(uname -r), nft $(nft --version | awk '{print $2}'), ${E} endpoints per service)"
echo
echo "| N services | engine | full sync ms | again, over its table ms | +1 service ms (median / max of 15) | +1 endpoint ms (median / max of 15) | −1 service ms (median / max of 15) | peak RSS MiB | connect() first svc p50/p99 µs | connect() last svc p50/p99 µs |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for n in "${sizes[@]}"; do
  ns=tw-bsvc-nft-$n; setup "$ns"
  j=$(ip netns exec "$ns" "$tweed" bench proxy --services "$n" --endpoints $E --listen $LISTEN:$PORT)
  first=$(jq -r .first <<< "$j"); last=$(jq -r .last <<< "$j")
  echo "| $n | tweed (nftables maps) | $(jq -r '.fullSyncMs|floor' <<< "$j") | $(jq -r '.refullSyncMs|floor' <<< "$j") | $(jq -r '"\(.addServiceMs*100|floor/100) / \(.addServiceMaxMs*100|floor/100)"' <<< "$j") | $(jq -r '"\(.addEndpointMs*100|floor/100) / \(.addEndpointMaxMs*100|floor/100)"' <<< "$j") | $(jq -r '"\(.delServiceMs*100|floor/100) / \(.delServiceMaxMs*100|floor/100)"' <<< "$j") | $(jq -r '.peakRssMiB|floor' <<< "$j") | $(lat "$ns" "$first") | $(lat "$ns" "$last") |"
  tweed_full=$(jq -r .fullSyncMs <<< "$j")
  ip netns del "$ns"

  ns=tw-bsvc-ipt-$n; setup "$ns"
  python3 bench/kube_proxy_iptables.py "$n" $E $LISTEN $PORT full > "$work/full.rules"
  python3 bench/kube_proxy_iptables.py "$n" $E $LISTEN $PORT add-endpoint > "$work/add.rules"
  s=$(date +%s%N)
  if timeout "$IPT_TIMEOUT" ip netns exec "$ns" iptables-restore < "$work/full.rules"; then
    e=$(date +%s%N); full=$(ms "$s" "$e")
    s=$(date +%s%N); ip netns exec "$ns" iptables-restore --noflush < "$work/add.rules"; e=$(date +%s%N); add=$(ms "$s" "$e")
    echo "| $n | kube-proxy iptables mode (iptables-restore, $(iptables --version | awk '{print $2, $3}')) | $full | – | – | $add | – | – | $(lat "$ns" "10.96.0.1:80") | $(lat "$ns" "$last") |"
    awk -v a="$full" -v b="$tweed_full" -v n="$n" 'BEGIN {ratios = ratios sprintf("- N=%d: iptables-restore full load / tweed full sync = **%.1f×**\n", n, a / b); printf "%s", ratios > "/dev/stderr"}'
  else
    echo "| $n | kube-proxy iptables mode (iptables-restore) | did not finish in ${IPT_TIMEOUT} s | – | – | – | – | – | – | – |"
  fi
  ip netns del "$ns"
done
