#!/usr/bin/env python3
"""CNI ADD latency: tweed vs Debian's reference bridge + host-local plugins.

Runs inside a lab node's network namespace (bench/cni-add.sh puts it there),
so both plugins are exec'd directly, exactly as a runtime would exec them.
Rounds alternate between the two plugins so machine noise hits both alike.
Prints one markdown table.
"""
import concurrent.futures as cf
import json
import os
import statistics
import subprocess
import sys
import time

tweed_bin, tweed_conf_path, lab, rounds, per_round = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

with open(tweed_conf_path) as f:
    lst = json.load(f)
tweed_conf = dict(lst["plugins"][0], name=lst["name"], cniVersion="1.0.0")
ref_conf = {
    "cniVersion": "1.0.0", "name": "refnet", "type": "bridge", "bridge": "cniref0",
    "isGateway": True, "ipMasq": False,
    "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.250.0.0/16"}]],
             "dataDir": f"/run/tweed/lab/{lab}/ref-ipam"},
}
PLUGINS = {
    "tweed": (tweed_bin, json.dumps(tweed_conf), os.path.dirname(tweed_bin)),
    "bridge+host-local": ("/usr/lib/cni/bridge", json.dumps(ref_conf), "/usr/lib/cni"),
}


def netns(i):
    return f"tw-{lab}_b-{i}"


def call(plugin, cmd, cid, ns):
    exe, conf, path = PLUGINS[plugin]
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": cmd, "CNI_CONTAINERID": cid,
           "CNI_NETNS": f"/run/netns/{ns}", "CNI_IFNAME": "eth0", "CNI_PATH": path}
    t = time.perf_counter()
    p = subprocess.run([exe], input=conf.encode(), env=env, capture_output=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{plugin} {cmd} {cid} failed: {p.stdout.decode()} {p.stderr.decode()}")
    return dt


def batch(plugin, conc, rnd):
    ids = [(f"{plugin[:5]}-{rnd}-{i}", netns(i)) for i in range(per_round)]
    with cf.ThreadPoolExecutor(max_workers=conc) as ex:
        adds = list(ex.map(lambda a: call(plugin, "ADD", *a), ids))
    with cf.ThreadPoolExecutor(max_workers=conc) as ex:
        list(ex.map(lambda a: call(plugin, "DEL", *a), ids))
    return adds


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


# Warm up both (page cache, first bridge creation).
for plugin in PLUGINS:
    batch(plugin, 1, "warm")

print("| concurrency | plugin | ADDs | p50 ms | p99 ms | mean ms |")
print("|---|---|---|---|---|---|")
summary = {}
for conc in (1, 16):
    res = {p: [] for p in PLUGINS}
    for rnd in range(rounds):
        order = list(PLUGINS) if rnd % 2 == 0 else list(reversed(PLUGINS))
        for plugin in order:
            res[plugin] += batch(plugin, conc, f"{conc}x{rnd}")
    for plugin, xs in res.items():
        ms = [x * 1000 for x in xs]
        summary[(conc, plugin)] = pct(ms, 50)
        print(f"| {conc} | {plugin} | {len(ms)} | {pct(ms, 50):.1f} | {pct(ms, 99):.1f} | {statistics.mean(ms):.1f} |")
print()
for conc in (1, 16):
    r = summary[(conc, "tweed")] / summary[(conc, "bridge+host-local")]
    print(f"- concurrency {conc}: tweed p50 / reference p50 = **{r:.2f}**")
