#!/usr/bin/env python3
"""Write kube-proxy's iptables-mode nat rules (as seed 001 shows them:
KUBE-SERVICES -> KUBE-SVC-* with statistic random -> KUBE-SEP-* DNAT, with
KUBE-MARK-MASQ and KUBE-POSTROUTING) for N services x E endpoints, for
iptables-restore. The first and last services point at LISTEN so connect()
through them can be timed; the others at unreachable pod addresses.

usage: kube_proxy_iptables.py N E LISTEN_IP LISTEN_PORT full|add-endpoint
"""
import hashlib
import sys

n, e, lip, lport, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
CLUSTER_CIDR = "10.244.0.0/16"


def h(s):
    return hashlib.sha256(s.encode()).hexdigest()[:16].upper()


def svc_ip(i):
    x = (10 << 24 | 96 << 16) + 1 + i
    return f"{x >> 24}.{x >> 16 & 255}.{x >> 8 & 255}.{x & 255}"


def ep(i, j):
    if i in (0, n - 1):
        return lip
    x = (10 << 24 | 244 << 16) + (i * e + j) % 65000
    return f"{x >> 24}.{x >> 16 & 255}.{x >> 8 & 255}.{x & 255}"


def svc_rules(i, count, out, chains):
    svc = f"KUBE-SVC-{h(f'svc{i}')}"
    chains.append(svc)
    for j in range(count):
        sep = f"KUBE-SEP-{h(f'sep{i}-{j}')}"
        chains.append(sep)
        left = count - j
        stat = f"-m statistic --mode random --probability {1.0 / left:.11f} " if left > 1 else ""
        out.append(f'-A {svc} -m comment --comment "bench/s{i}" {stat}-j {sep}')
        ip = ep(i, j)
        port = lport if i in (0, n - 1) else 8080
        out.append(f'-A {sep} -s {ip}/32 -m comment --comment "bench/s{i}" -j KUBE-MARK-MASQ')
        out.append(f'-A {sep} -p tcp -m comment --comment "bench/s{i}" -m tcp -j DNAT --to-destination {ip}:{port}')
    return svc


rules, chains = [], []
if mode == "full":
    head = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]",
            ":KUBE-SERVICES - [0:0]", ":KUBE-MARK-MASQ - [0:0]", ":KUBE-POSTROUTING - [0:0]"]
    rules += ['-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
              '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
              '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
              "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
              "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
              "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
              '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully']
    for i in range(n):
        svc = svc_rules(i, e, rules, chains)
        rules.append(f'-A KUBE-SERVICES ! -s {CLUSTER_CIDR} -d {svc_ip(i)}/32 -p tcp -m comment --comment "bench/s{i} cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ')
        rules.append(f'-A KUBE-SERVICES -d {svc_ip(i)}/32 -p tcp -m comment --comment "bench/s{i} cluster IP" -m tcp --dport 80 -j {svc}')
    print("\n".join(head + [f":{c} - [0:0]" for c in chains] + rules + ["COMMIT"]))
else:
    # kube-proxy's partial sync for one more endpoint of a middle service:
    # the service chain is rewritten and the new endpoint chain added (--noflush).
    svc_rules(n // 2, e + 1, rules, chains)
    print("\n".join(["*nat"] + [f":{c} - [0:0]" for c in chains] + rules + ["COMMIT"]))
