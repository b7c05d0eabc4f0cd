#!/usr/bin/env bash
# Pod-to-pod TCP and UDP throughput and round-trip time for direct routes,
# VXLAN, a flannel-shaped path and the plain underlay between the same two
# nodes, in one run, rounds interleaved. One lab (backend auto): direct while
# the fabric passes pod-addressed traffic, VXLAN while `tweed lab fabric`
# makes it drop it (auto moves the peers over); node to node for the
# underlay.
# The flannel-shaped path is what flannel's vxlan backend builds, on the same
# two lab nodes, so tweed's routed veths are compared with the wiring flannel
# users run today: a pod namespace per node plugged into a `cni0` bridge by
# Debian's reference CNI plugins (bridge + host-local, called through the CNI
# 1.0 protocol exactly as a runtime calls them), and a kernel VXLAN device
# `flannel.1` with flannel's static per-peer route, neighbour and FDB entry.
# Usage (as root): bench/throughput.sh [ROUNDS] [SECONDS]
set -euo pipefail
# errexit inside $(...) too: the setup helpers below run in command
# substitutions and must stop the run at their first failing step.
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
rounds=${1:-3}; secs=${2:-5}
lab=bperf
cargo build --release --locked -q
tweed=$PWD/target/release/tweed
na="tw-${lab}_n-n1"; nb="tw-${lab}_n-n2"; podA="tw-${lab}_p-a"; podB="tw-${lab}_p-b"
# The flannel-shaped pods: our own namespaces (the lab does not know them, so
# `lab down` would leave them behind); named with the lab prefix so they are
# plainly this script's.
flA="tw-${lab}_fl-a"; flB="tw-${lab}_fl-b"
$tweed lab down --name $lab >/dev/null 2>&1 || true
# A run killed with SIGKILL skips the trap: its pod namespaces would make
# `ip netns add` fail below.
for ns in "$flA" "$flB"; do ip netns del "$ns" 2>/dev/null || true; done
pids=()
work=$(mktemp -d)
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # cni0, flannel.1 and the host ends of the veths live in the node
  # namespaces and go with them; the pod namespaces are ours to delete.
  for ns in "$flA" "$flB"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$work"
  $tweed lab down --name $lab >/dev/null
}
trap cleanup EXIT
topo=$work/topo.yaml
printf 'nodes: [{name: n1}, {name: n2}]\npods: [{name: a, node: n1}, {name: b, node: n2}]\nagent: {leaseTtl: 10, resync: 1}\n' > "$topo"
$tweed lab up -f "$topo" --name $lab --no-matrix >/dev/null
st=/run/tweed/lab/$lab/state.json
pb=$(jq -r '.pods.b.ip' $st); n1=$(jq -r '.nodes[0].ip' $st); n2=$(jq -r '.nodes[1].ip' $st)

# --- The flannel-shaped path -------------------------------------------------
# 10.245.0.0/16 as the flannel network, /24 per node: outside tweed's cluster
# (10.244.0.0/16) and service (10.96.0.0/12) CIDRs, so neither stack routes
# the other's addresses.
flnet=10.245.0.0/16; flsubA=10.245.1.0/24; flsubB=10.245.2.0/24
# flannel's defaults are VNI 1 on UDP 8472. The kernel keeps one VXLAN device
# per (VNI, port) in a namespace ("A VXLAN device with the specified VNI
# already exists"), and tweed.1 may hold exactly that pair, so move flannel.1
# to the next port rather than to another VNI: the port changes nothing in
# the data path (both are plain UDP tunnel sockets with the same offloads).
flvni=1; flport=8472
tw=$(ip netns exec "$na" ip -d -j link show tweed.1 | jq -r '.[0].linkinfo.info_data | "\(.id) \(.port)"')
[ "$tw" = "$flvni $flport" ] && flport=8473
# The underlay NIC, as flannel finds it: the device towards the peer node.
ulA=$(ip netns exec "$na" ip -j route get "$n2" | jq -r '.[0].dev')
ulB=$(ip netns exec "$nb" ip -j route get "$n1" | jq -r '.[0].dev')
cni() { # node-ns pod-ns plugin ifname: CNI ADD for one interface, config on stdin, result on stdout
  # What a runtime does (CNI spec 1.0): run the plugin named by the config's
  # "type" from CNI_PATH, in the node's namespace (the bridge side lives
  # there), with the pod's namespace as a path in CNI_NETNS.
  ip netns exec "$1" env CNI_COMMAND=ADD CNI_CONTAINERID="$2" CNI_NETNS="/run/netns/$2" \
    CNI_IFNAME="$4" CNI_PATH=/usr/lib/cni "/usr/lib/cni/$3"
}
flpod() { # node-ns pod-ns subnet: create the pod sandbox and wire it like flannel's CNI plugin does; prints the pod IP
  local res
  ip netns add "$2"
  cni "$1" "$2" loopback lo <<<'{"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}' >/dev/null
  # The config flannel's CNI plugin hands to bridge (delegate of flannel's
  # conflist: hairpinMode, gateway on cni0; ipMasq false because flannel
  # masquerades itself; routes: the flannel network via the gateway; MTU of
  # flannel.1). host-local keeps its leases in our temp dir, not in
  # /var/lib/cni, so nothing outlives the run.
  if ! res=$(cni "$1" "$2" bridge eth0 <<EOF
{"cniVersion": "1.0.0", "name": "cbr0", "type": "bridge", "bridge": "cni0",
 "mtu": 1450, "isGateway": true, "ipMasq": false, "hairpinMode": true,
 "ipam": {"type": "host-local", "ranges": [[{"subnet": "$3"}]],
          "routes": [{"dst": "$flnet"}], "dataDir": "$work/ipam-$2"}}
EOF
  ); then echo "CNI ADD (bridge) for $2 failed: $res" >&2; return 1; fi
  jq -r '.ips[0].address | split("/")[0]' <<<"$res"
}
vtep() { # node-ns underlay-ip underlay-dev subnet: flannel.1 as flannel's vxlan backend creates it
  ip netns exec "$1" ip link add flannel.1 mtu 1450 type vxlan id $flvni dstport $flport nolearning local "$2" dev "$3"
  # flannel gives the VTEP the subnet's network address, /32
  ip netns exec "$1" ip addr add "${4%/*}/32" dev flannel.1
  ip netns exec "$1" ip link set flannel.1 up
  ip netns exec "$1" ip -j link show flannel.1 | jq -r '.[0].address'
}
flpeer() { # node-ns peer-subnet peer-vtep-mac peer-underlay-ip: flannel's static entries for one peer (no learning, no ARP on the overlay)
  local gw=${2%/*}
  ip netns exec "$1" ip route add "$2" via "$gw" dev flannel.1 onlink
  ip netns exec "$1" ip neigh add "$gw" lladdr "$3" dev flannel.1 nud permanent
  ip netns exec "$1" bridge fdb add "$3" dev flannel.1 dst "$4"
}
fa=$(flpod "$na" "$flA" $flsubA); fb=$(flpod "$nb" "$flB" $flsubB)
macA=$(vtep "$na" "$n1" "$ulA" $flsubA); macB=$(vtep "$nb" "$n2" "$ulB" $flsubB)
flpeer "$na" $flsubB "$macB" "$n2"; flpeer "$nb" $flsubA "$macA" "$n1"

ip netns exec "$podB" iperf3 -s -p 5201 >/dev/null 2>&1 & pids+=($!)
ip netns exec "$nb" iperf3 -s -p 5202 >/dev/null 2>&1 & pids+=($!)
ip netns exec "$flB" iperf3 -s -p 5203 >/dev/null 2>&1 & pids+=($!)
ip netns exec "$podA" "$tweed" probe tcp-wait "$pb:5201" --timeout 10
ip netns exec "$na" "$tweed" probe tcp-wait "$n2:5202" --timeout 10
ip netns exec "$flA" "$tweed" probe tcp-wait "$fb:5203" --timeout 10

mode() { jq -r '.peers[0].mode' /run/tweed/lab/$lab/nodes/n1/run/status.json; }
path() { # direct | vxlan: make the fabric pass or drop pod traffic, wait for both agents to follow
  local want=$1 drop=false
  [ "$want" = vxlan ] && drop=true
  $tweed lab fabric --name $lab --drop-pod-traffic $drop >/dev/null
  # 30 s: falling back to VXLAN takes the agent up to ~8 s (a 1 s resync,
  # then two missed probes of up to 2 s each, 2 s apart); the rest is slack
  # for a loaded 2-vCPU machine. Polled, so a quick switch costs nothing.
  for _ in $(seq 300); do
    [ "$(mode)" = "$want" ] && [ "$(jq -r '.peers[0].mode' /run/tweed/lab/$lab/nodes/n2/run/status.json)" = "$want" ] && return
    sleep 0.1
  done
  echo "the path did not become $want" >&2; exit 1
}
tcp() { ip netns exec "$1" iperf3 -c "$2" -p "$3" -t "$secs" -J | jq '.end.sum_received.bits_per_second / 1e9'; }
udp() { ip netns exec "$1" iperf3 -c "$2" -p "$3" -u -b 0 -l 1400 -t "$secs" -J | jq '.end.sum.bits_per_second / 1e9'; }
rtt() { ip netns exec "$1" ping -q -c 200 -i 0.005 "$2" | awk -F'[/ ]' '/rtt|round-trip/ {print $8}'; }
natseen() { # node-ns: "<flows> <untranslated flows>" of flannel pod a → pod b in that node's conntrack
  # tweed's nftables sit on the same nodes; 10.245/16 is outside its cluster
  # CIDR, so check whether it masqueraded (or otherwise NATed) these flows:
  # untranslated means the reply tuple is the original one reversed. If n1
  # masqueraded them, n2 sees no flow from pod a's address at all.
  echo "$(ip netns exec "$1" conntrack -L -s "$fa" -d "$fb" 2>/dev/null | wc -l)" \
    "$(ip netns exec "$1" conntrack -L -s "$fa" -d "$fb" --reply-src "$fb" --reply-dst "$fa" 2>/dev/null | wc -l)"
}
declare -A T U
for r in $(seq "$rounds"); do
  path direct; T[direct]+="$(tcp "$podA" "$pb" 5201) "; U[direct]+="$(udp "$podA" "$pb" 5201) "
  path vxlan;  T[vxlan]+="$(tcp "$podA" "$pb" 5201) ";  U[vxlan]+="$(udp "$podA" "$pb" 5201) "
  T[flannel]+="$(tcp "$flA" "$fb" 5203) "; U[flannel]+="$(udp "$flA" "$fb" 5203) "
  # right after the first flannel streams, while their conntrack entries live
  [ "$r" = 1 ] && { natA=$(natseen "$na"); natB=$(natseen "$nb"); }
  T[underlay]+="$(tcp "$na" "$n2" 5202) "; U[underlay]+="$(udp "$na" "$n2" 5202) "
done
path direct; R_direct=$(rtt "$podA" "$pb")
path vxlan; R_vxlan=$(rtt "$podA" "$pb")
R_flannel=$(rtt "$flA" "$fb")
R_underlay=$(rtt "$na" "$n2")
read -r allA cleanA <<<"$natA"; read -r allB cleanB <<<"$natB"
if [ "$allA" -gt 0 ] && [ "$allA" = "$cleanA" ] && [ "$allB" -gt 0 ] && [ "$allB" = "$cleanB" ]; then
  nat="tweed's nftables left its packets alone (conntrack on n1 and n2: $allA and $allB flows $fa → $fb, none translated)"
else
  nat="**its packets were NATed by the node rules** (conntrack: n1 $cleanA of $allA flows $fa → $fb untranslated, n2 $cleanB of $allB)"
fi
med() { printf '%s\n' $1 | sort -g | awk '{a[NR]=$1} END {printf "%.2f", a[int((NR+1)/2)]}'; }
echo "## Pod-to-pod paths side by side ($(date -u +%F), $(nproc) vCPU, kernel $(uname -r), iperf3 one stream, ${secs} s x ${rounds} rounds interleaved)"
echo
echo "| path | TCP Gbit/s per round | TCP median | UDP Gbit/s per round (1400-byte datagrams, unlimited rate) | UDP median | avg RTT ms (200 pings) |"
echo "|---|---|---|---|---|---|"
for p in direct vxlan flannel underlay; do
  r=R_$p
  label=$p; [ $p = direct ] && label="pod → pod, direct routes (auto)"; [ $p = vxlan ] && label="pod → pod, VXLAN (auto, fabric drops pod traffic)"
  [ $p = flannel ] && label="pod → pod, flannel-shaped (cni0 bridge + flannel.1 VXLAN)"; [ $p = underlay ] && label="node → node, plain underlay"
  echo "| $label | ${T[$p]}| $(med "${T[$p]}") | ${U[$p]}| $(med "${U[$p]}") | ${!r} |"
done
echo
# flannel-shaped / underlay places the bridge wiring on the same scale as
# tweed; VXLAN / flannel-shaped is the fair comparison (both encapsulate);
# direct / flannel-shaped is what a user switching gains where routes work.
awk -v d="$(med "${T[direct]}")" -v v="$(med "${T[vxlan]}")" -v f="$(med "${T[flannel]}")" -v u="$(med "${T[underlay]}")" 'BEGIN {
  printf "- TCP: direct / underlay = **%.2f** (goal 0.97), VXLAN / underlay = **%.2f** (goal 0.90), flannel-shaped / underlay = **%.2f**; VXLAN / flannel-shaped = **%.2f**, direct / flannel-shaped = **%.2f**\n", d / u, v / u, f / u, v / f, d / f }'
awk -v d="$(med "${U[direct]}")" -v v="$(med "${U[vxlan]}")" -v f="$(med "${U[flannel]}")" -v u="$(med "${U[underlay]}")" 'BEGIN {
  printf "- UDP: direct / underlay = **%.2f**, VXLAN / underlay = **%.2f**, flannel-shaped / underlay = **%.2f**; VXLAN / flannel-shaped = **%.2f**, direct / flannel-shaped = **%.2f**\n", d / u, v / u, f / u, v / f, d / f }'
awk -v d="$R_direct" -v v="$R_vxlan" -v f="$R_flannel" -v u="$R_underlay" 'BEGIN {
  printf "- RTT: direct / underlay = **%.2f**, VXLAN / underlay = **%.2f**, flannel-shaped / underlay = **%.2f**; VXLAN / flannel-shaped = **%.2f**, direct / flannel-shaped = **%.2f**\n", d / u, v / u, f / u, v / f, d / f }'
echo "- flannel-shaped: pods $fa → $fb on cni0 bridges (CNI bridge + host-local, MTU 1450, hairpin), flannel.1 VXLAN VNI $flvni on UDP $flport$([ "$flport" != 8472 ] && echo " (not flannel's 8472: tweed.1 holds VNI $flvni on 8472 in the same node namespaces)") with static route/neighbour/FDB per peer; $nat"
