"""Pod start to first packet, driven from inside the lab node's network
namespace (it receives the pods' datagrams on the node's address).
Usage: pod_start.py TWEED LAB NET_D ROUNDS PER_ROUND"""
import json
import os
import socket
import statistics
import subprocess
import sys
import time

tweed, lab, net_d, rounds, per = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
PORT = 9999
node_ip = subprocess.run(["ip", "-4", "-o", "addr", "show", "eth0"], capture_output=True, text=True,
                         check=True).stdout.split()[3].split("/")[0]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((node_ip, PORT))

BRIDGE = os.path.join(net_d, "00-bench-bridge.conflist")
BRIDGE_CONF = {
    "cniVersion": "1.0.0", "name": "bench-bridge",
    "plugins": [{"type": "bridge", "bridge": "cni-bench0", "isGateway": True, "ipMasq": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}}],
}


def kubectl(*args, stdin=None):
    r = subprocess.run([tweed, "lab", "kubectl", "--name", lab, "--", *args], input=stdin,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def pod(name):
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"bench": "pod-start"}},
        "spec": {"nodeName": "n1", "restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                 "containers": [{"name": "c", "image": "tweed:0.1.0", "imagePullPolicy": "Never",
                                 "command": ["bash", "-c", f"echo -n $HOSTNAME >/dev/udp/{node_ip}/{PORT}"]}]},
    })


def start(name, deadline=90):
    """Seconds from just before `kubectl create` to the pod's datagram."""
    t0 = time.monotonic()
    kubectl("create", "-f", "-", stdin=pod(name))
    sock.settimeout(deadline)
    while True:
        data, _ = sock.recvfrom(256)
        if data.decode() == name:
            return time.monotonic() - t0


def use(plugin):
    """Make `plugin` the node's network; a warm-up pod proves the runtime took it."""
    def write():
        if plugin == "bridge+host-local":
            tmp = BRIDGE + ".tmp"
            with open(tmp, "w") as f:
                json.dump(BRIDGE_CONF, f)
            os.rename(tmp, BRIDGE)
        elif os.path.exists(BRIDGE):
            os.remove(BRIDGE)
        else:
            # containerd re-reads the conf dir on any change in it: nudge it.
            nudge = os.path.join(net_d, "bench-nudge")
            open(nudge, "w").close()
            os.remove(nudge)
    # Each warm-up pod checks whether the runtime has re-read the conf dir
    # (it does so when the directory changes; an attempt that finds the old
    # network changes it again).
    want = "10.88." if plugin == "bridge+host-local" else "10.244."
    for i in range(20):
        write()
        name = f"warm-{plugin.split('+')[0]}-{time.monotonic_ns()}"
        start(name)
        # The kubelet posts the pod's IP moments after it has started.
        deadline = time.monotonic() + 30
        ip = ""
        while not ip and time.monotonic() < deadline:
            ip = kubectl("get", "pod", name, "-o", "jsonpath={.status.podIP}")
        kubectl("delete", "pod", name, "--wait=true")
        if ip.startswith(want):
            return i
    sys.exit(f"the runtime did not switch to {plugin}")


results = {"tweed": [], "bridge+host-local": []}
order = ["tweed", "bridge+host-local"]
for r in range(rounds):
    for plugin in (order if r % 2 == 0 else order[::-1]):
        tries = use(plugin)
        if tries:
            print(f"(round {r}: the runtime took {plugin} after {tries + 1} warm-up pods)", file=sys.stderr)
        for i in range(per):
            results[plugin].append(start(f"ps-{plugin.split('+')[0]}-{r}-{i}") * 1000)
        kubectl("delete", "pods", "-l", "bench=pod-start", "--wait=true")
if os.path.exists(BRIDGE):
    os.remove(BRIDGE)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


print("| plugin | pods | p50 ms | p99 ms | mean ms |")
print("|---|---|---|---|---|")
for plugin in order:
    xs = results[plugin]
    print(f"| {plugin} | {len(xs)} | {pct(xs, 50):.0f} | {pct(xs, 99):.0f} | {statistics.mean(xs):.0f} |")
t, b = results["tweed"], results["bridge+host-local"]
print()
print(f"- tweed p50 / reference p50 = **{pct(t, 50) / pct(b, 50):.2f}**; p99 ratio {pct(t, 99) / pct(b, 99):.2f}")
print("- raw ms, tweed: " + " ".join(f"{x:.0f}" for x in t))
print("- raw ms, bridge+host-local: " + " ".join(f"{x:.0f}" for x in b))
