#!/usr/bin/env bash
# BGP (issue 11): pods routed natively across racks against VXLAN over the
# same fabric and against the plain underlay, and how fast the fabric
# follows a node. Two labs of examples/two-racks.yaml up side by side (two
# racks, an FRR ToR each, a core router, an outside host `ext`): one as it
# is (backend auto: pods across racks routed natively, mode bgp), one with
# `backend: vxlan` and the same `bgp:` (same sessions and routes in the
# fabric; pods across racks encapsulated node to node).
#  1. pa1 (a1, rack-a) → pb1 (b1, rack-b): iperf3 one TCP stream and ping
#     (median of each round's echoes), rounds interleaved: native, VXLAN,
#     node a1 → node b1 on the underlay (same path: a1 → tor-a → tor-b →
#     b1; the ToRs share the transit segment and peer directly, so the
#     core is not on it).
#  2. Convergence, in the native lab:
#     a) a2's eth0 down → tor-a's `show ip route bgp json` no longer holds
#        a2's pod subnet; eth0 up → the subnet is back at tor-a. In both
#        labs: the native one runs BFD (as the example), the VXLAN one not.
#     b) `tweed lab pod add` on a1 or b1 → the outside host's first
#        successful GET of the new pod's address through the fabric.
#        Done before (a): the lab's nodes get their default route once, at
#        `lab up`, and a NIC going down takes it with it.
#     c) a LoadBalancer Service's first ready endpoint (its pod applied on
#        b1) → the outside host's first answer through its pool address.
# Every wait has a deadline; times are wall clock around polling loops
# (the poll period is printed with them).
# Usage (as root): bench/bgp.sh [ROUNDS] [SECONDS] [REPS]
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
rounds=${1:-5}; secs=${2:-3}; reps=${3:-5}
cargo build --release --locked -q
tweed=$PWD/target/release/tweed
labs=(bbnat bbvx)
pids=()
work=$(mktemp -d)
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for l in "${labs[@]}"; do timeout 60 "$tweed" lab down --name "$l" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.2f", b - a}'; }
# LAB NODE PEER: NODE's mode towards PEER (peers[].mode in its status.json)
mode() { jq -r --arg p "$3" '.peers[]? | select(.name == $p) | .mode' \
  "/run/tweed/lab/$1/nodes/$2/run/status.json" 2>/dev/null || true; }
wait_mode() { # LAB WANT SECS: a1 and b1 route each other in mode WANT
  local end=$((SECONDS + $3))
  while [ $SECONDS -lt "$end" ]; do
    [ "$(mode "$1" a1 b1)" = "$2" ] && [ "$(mode "$1" b1 a1)" = "$2" ] && return
    sleep 0.2
  done
  echo "lab $1: a1 <-> b1 did not reach mode $2 in $3 s (a1: $(mode "$1" a1 b1), b1: $(mode "$1" b1 a1))" >&2; exit 1
}
st() { echo "/run/tweed/lab/$1/state.json"; }

# --- Labs ---------------------------------------------------------------------
cp examples/two-racks.yaml "$work/native.yaml"
# Same file, VXLAN forced; `bgp:` kept so the fabric carries the same routes.
# BFD stripped from it (nodes and ToRs): its withdrawals take the hold time.
sed -e '/^cluster:$/a\  backend: vxlan' -e 's/, bfd: {}//' examples/two-racks.yaml > "$work/vxlan.yaml"
grep -q '^  backend: vxlan$' "$work/vxlan.yaml" || { echo "no cluster: block in examples/two-racks.yaml" >&2; exit 1; }
! grep -q 'bfd' "$work/vxlan.yaml" || { echo "BFD left in the VXLAN lab's topology" >&2; exit 1; }
declare -A topo=([bbnat]=$work/native.yaml [bbvx]=$work/vxlan.yaml) want=([bbnat]=bgp [bbvx]=vxlan)
for l in "${labs[@]}"; do
  timeout 60 "$tweed" lab down --name "$l" >/dev/null 2>&1 || true
  timeout 120 "$tweed" lab up -f "${topo[$l]}" --name "$l" --no-matrix >/dev/null
done
for l in "${labs[@]}"; do wait_mode "$l" "${want[$l]}" 90; done
pb1=$(jq -r .pods.pb1.ip "$(st bbnat)")
b1=$(jq -r '.nodes[] | select(.name == "b1") | .ip' "$(st bbnat)")
for l in "${labs[@]}"; do
  ip netns exec "tw-${l}_p-pb1" iperf3 -s -p 5201 >/dev/null 2>&1 & pids+=($!)
  ip netns exec "tw-${l}_p-pa1" "$tweed" probe tcp-wait "$(jq -r .pods.pb1.ip "$(st "$l")"):5201" --timeout 10
done
ip netns exec tw-bbnat_n-b1 iperf3 -s -p 5202 >/dev/null 2>&1 & pids+=($!)
ip netns exec tw-bbnat_n-a1 "$tweed" probe tcp-wait "$b1:5202" --timeout 10

# --- 1. Throughput and RTT, rounds interleaved ----------------------------------
tcp() { # NS ADDR PORT: Gbit/s received
  timeout $((secs + 30)) ip netns exec "$1" iperf3 -c "$2" -p "$3" -t "$secs" -J |
    jq '.end.sum_received.bits_per_second / 1e9 * 100 | round / 100'; }
pings() { # NS ADDR: each echo's RTT in ms, one a line (20 echoes)
  { timeout 20 ip netns exec "$1" ping -n -c 20 -i 0.05 -w 15 "$2" || true; } | sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p'; }
med() { sort -g | awk -v f="${1:-%.3f}" '{a[NR]=$1} END {if (NR) printf f, (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; else printf "nan"}'; }
declare -A T R
for p in native vxlan underlay; do : >"$work/rtt-$p"; done
for r in $(seq "$rounds"); do
  for p in native vxlan underlay; do
    case $p in
      native)   ns=tw-bbnat_p-pa1; dst=$pb1; port=5201; l=bbnat ;;
      vxlan)    ns=tw-bbvx_p-pa1;  dst=$(jq -r .pods.pb1.ip "$(st bbvx)"); port=5201; l=bbvx ;;
      underlay) ns=tw-bbnat_n-a1;  dst=$b1;  port=5202; l=bbnat ;;
    esac
    # the path must still be what the row says (auto could have moved it)
    [ $p = underlay ] || [ "$(mode $l a1 b1)" = "${want[$l]}" ] || { echo "round $r: $p path is $(mode $l a1 b1)" >&2; exit 1; }
    T[$p]+="$(tcp $ns "$dst" $port) "
    pings $ns "$dst" >"$work/rtt-$p-$r"
    cat "$work/rtt-$p-$r" >>"$work/rtt-$p"
    R[$p]+="$(med <"$work/rtt-$p-$r") "
  done
done
# the native path crossed the fabric unencapsulated, as routes say
natroute=$(ip netns exec tw-bbnat_n-a1 ip -o route get "$pb1" | sed 's/ *uid.*//')
vxroute=$(ip netns exec tw-bbvx_n-a1 ip -o route get "$(jq -r .pods.pb1.ip "$(st bbvx)")" | sed 's/ *uid.*//')

# --- 2b. New pod → outside host's first GET (native lab) ------------------------
addtimes=; gettimes=
for i in $(seq "$reps"); do
  node=$([ $((i % 2)) = 1 ] && echo b1 || echo a1)
  t0=$(now)
  out=$(timeout 60 "$tweed" lab pod add "bbnew$i" --node $node --name bbnat)
  tadd=$(since "$t0")
  ip=$(awk '{print $NF}' <<<"$out")
  # retried every 200 ms (1 s connect timeout) for up to 30 s
  ip netns exec tw-bbnat_h-ext "$tweed" probe http "$ip:8080" --timeout 1 --retry-for 30 >/dev/null
  addtimes+="$tadd "; gettimes+="$(since "$t0") "
  echo "pod bbnew$i on $node ($ip): pod add $tadd s, first GET from ext at $(since "$t0") s" >>"$work/raw"
done
for i in $(seq "$reps"); do timeout 60 "$tweed" lab pod del "bbnew$i" --name bbnat >/dev/null; done

# --- 2c. A Service's first ready endpoint → outside host's first success -------
# A LoadBalancer Service (policy Local) with no pod yet gets its address
# from the pool; then its pod is created on b1: the clock runs from the
# `lab apply` of the pod through CNI, endpoints, the agent announcing the
# address by BGP, the fabric learning it, to ext's first answer from it.
svctimes=
for i in $(seq "$reps"); do
  cat >"$work/svc$i.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: bbsvc$i}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: bbsvc$i}
  ports: [{port: 80, targetPort: 8080}]
YAML
  cat >"$work/pod$i.yaml" <<YAML
apiVersion: v1
kind: Pod
metadata: {name: bbsvc$i-pod, labels: {app: bbsvc$i}}
spec:
  nodeName: b1
  containers:
  - name: web
    ports: [{containerPort: 8080}]
YAML
  timeout 60 "$tweed" lab apply -f "$work/svc$i.yaml" --name bbnat >/dev/null
  lbip=$(timeout 30 "$tweed" lab status --name bbnat -o json | jq -r --arg id "default/bbsvc$i" '.services[] | select(.id == $id) | .loadBalancerIps[0] // empty')
  [ -n "$lbip" ] || { echo "bbsvc$i got no load balancer address" >&2; exit 1; }
  t0=$(now)
  timeout 60 "$tweed" lab apply -f "$work/pod$i.yaml" --name bbnat >/dev/null
  ip netns exec tw-bbnat_h-ext "$tweed" probe http "$lbip:80" --timeout 1 --retry-for 30 >/dev/null
  t=$(since "$t0"); svctimes+="$t "
  echo "bbsvc$i ($lbip): pod applied → first answer at ext after $t s" >>"$work/raw"
  timeout 60 "$tweed" lab delete -f "$work/pod$i.yaml" --name bbnat >/dev/null
  timeout 60 "$tweed" lab delete -f "$work/svc$i.yaml" --name bbnat >/dev/null
done

# --- 2a. Node NIC down → withdrawn at its ToR; up → back ------------------------
# Both labs, repetitions interleaved: the native lab runs BFD (300 ms x 3,
# as the example does), the VXLAN lab none (stripped below), so the same
# fabric shows BFD's detection against the 9 s hold time's.
declare -A sub downtimes uptimes
for l in "${labs[@]}"; do
  sub[$l]=$(timeout 30 "$tweed" lab status --name "$l" -o json | jq -r '.nodes[] | select(.name == "a2") | .subnet')
done
polls=0
has() { # LAB: tor-a holds a2's subnet (as lab.rs router_routes reads it)
  polls=$((polls + 1))
  timeout 5 ip netns exec "tw-${1}_r-tor-a" vtysh --vty_socket "/run/tweed/lab/$1/routers/tor-a/run" -d zebra -c 'show ip route bgp json' |
    jq -e --arg s "${sub[$1]}" 'has($s)' >/dev/null
}
for l in "${labs[@]}"; do has "$l" || { echo "lab $l: tor-a does not hold a2's subnet ${sub[$l]}" >&2; exit 1; }; done
pollstart=$(now); polls=0
for i in $(seq "$reps"); do
  for l in "${labs[@]}"; do
    t0=$(now); ip netns exec "tw-${l}_n-a2" ip link set eth0 down
    end=$((SECONDS + 60)); while has "$l"; do [ $SECONDS -lt $end ] || { echo "lab $l: tor-a kept ${sub[$l]} 60 s after a2 went down" >&2; exit 1; }; sleep 0.05; done
    td=$(since "$t0")
    t0=$(now); ip netns exec "tw-${l}_n-a2" ip link set eth0 up
    end=$((SECONDS + 120)); until has "$l"; do [ $SECONDS -lt $end ] || { echo "lab $l: ${sub[$l]} not back at tor-a 120 s after a2 came back" >&2; exit 1; }; sleep 0.05; done
    tu=$(since "$t0")
    downtimes[$l]+="$td "; uptimes[$l]+="$tu "
    echo "lab $l: a2 eth0 down → ${sub[$l]} gone from tor-a after $td s; up → back after $tu s" >>"$work/raw"
  done
done
pollms=$(awk -v a="$pollstart" -v b="$(now)" -v n=$polls 'BEGIN {printf "%.0f", (b - a) / n * 1000}')

# --- Report -------------------------------------------------------------------
m() { printf '%s\n' $1 | med %.2f; }
echo "## BGP: native routing across racks ($(date -u +%F), $(nproc) vCPU, kernel $(uname -r), examples/two-racks.yaml, iperf3 one TCP stream ${secs} s and 20 pings x ${rounds} rounds interleaved)"
echo
echo "| path (pa1 on a1 → pb1 on b1, through tor-a and tor-b) | TCP Gbit/s per round | TCP median | RTT ms per round (median of 20) | RTT median ms (all echoes) |"
echo "|---|---|---|---|---|"
for p in native vxlan underlay; do
  label=$p; [ $p = native ] && label="pod → pod, native (BGP, mode bgp)"; [ $p = vxlan ] && label="pod → pod, VXLAN (backend vxlan, same fabric)"; [ $p = underlay ] && label="node a1 → node b1, underlay"
  echo "| $label | ${T[$p]}| $(m "${T[$p]}") | ${R[$p]}| $(med <"$work/rtt-$p") |"
done
echo
awk -v n="$(m "${T[native]}")" -v v="$(m "${T[vxlan]}")" -v u="$(m "${T[underlay]}")" 'BEGIN {
  printf "- TCP: native / underlay = **%.2f**, VXLAN / underlay = **%.2f**, native / VXLAN = **%.2f**\n", n / u, v / u, n / v }'
awk -v n="$(med <"$work/rtt-native")" -v v="$(med <"$work/rtt-vxlan")" -v u="$(med <"$work/rtt-underlay")" 'BEGIN {
  printf "- RTT: native / underlay = **%.2f**, VXLAN / underlay = **%.2f**, native / VXLAN = **%.2f**\n", n / u, v / u, n / v }'
echo "- a1's route to pb1: native \`$natroute\`; VXLAN lab \`$vxroute\`"
echo
echo "| convergence (native lab unless said) | per repetition s | median s |"
echo "|---|---|---|"
echo "| a2's eth0 down → tor-a no longer holds a2's subnet, BFD 300 ms x 3 | ${downtimes[bbnat]}| $(m "${downtimes[bbnat]}") |"
echo "| … the same without BFD (VXLAN lab; hold time 9 s) | ${downtimes[bbvx]}| $(m "${downtimes[bbvx]}") |"
echo "| a2's eth0 up → the subnet back at tor-a, BFD | ${uptimes[bbnat]}| $(m "${uptimes[bbnat]}") |"
echo "| … without BFD | ${uptimes[bbvx]}| $(m "${uptimes[bbvx]}") |"
echo "| \`tweed lab pod add\` (a1/b1 alternately) → ext's first successful GET of the pod | $gettimes| $(m "$gettimes") |"
echo "| … of which \`tweed lab pod add\` itself (CNI ADD, echo server ready) | $addtimes| $(m "$addtimes") |"
echo "| LoadBalancer Service (policy Local): its pod applied on b1 → ext's first answer through the load balancer address | $svctimes| $(m "$svctimes") |"
echo
echo "- tor-a polled with vtysh \`show ip route bgp json\` every ~${pollms} ms (one call and a 50 ms pause)"
echo
echo "Raw:"
echo
echo '```'
for p in native vxlan underlay; do
  for r in $(seq "$rounds"); do echo "$p round $r TCP $(printf '%s\n' ${T[$p]} | sed -n "${r}p") Gbit/s, RTT ms: $(tr '\n' ' ' <"$work/rtt-$p-$r")"; done
done
cat "$work/raw"
echo '```'
