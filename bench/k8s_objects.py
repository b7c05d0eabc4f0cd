#!/usr/bin/env python3
"""N selector-less Services with E endpoints each, as Kubernetes objects
(core/v1 Services and discovery.k8s.io EndpointSlices), written as K JSON
Lists (files OUT-0.json ... OUT-{K-1}.json) so K kubectl processes can
create them in parallel. Endpoint addresses are in 10.244.250.0/23-style
pod ranges on node NODE; nothing answers there (the benchmark times rule
programming, not traffic).

usage: k8s_objects.py N E API_VERSION NODE OUT K [PREFIX]"""
import json
import sys

n, e, api, node, out, k = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
prefix = sys.argv[7] if len(sys.argv) > 7 else "s"
lists = [[] for _ in range(k)]
v1 = api.endswith("/v1")
for i in range(n):
    name = f"{prefix}{i}"
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}
    eps = []
    for j in range(e):
        x = i * e + j
        ep = {"addresses": [f"10.{200 + x // 65536 % 50}.{x // 256 % 256}.{x % 256}"],
              "conditions": {"ready": True}}
        if v1:
            ep["nodeName"] = node
        else:
            ep["topology"] = {"kubernetes.io/hostname": node}
        eps.append(ep)
    sl = {"apiVersion": api, "kind": "EndpointSlice",
          "metadata": {"name": f"{name}-bench", "namespace": "default",
                       "labels": {"kubernetes.io/service-name": name,
                                  "endpointslice.kubernetes.io/managed-by": "bench.tweed.io"}},
          "addressType": "IPv4", "endpoints": eps,
          "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}
    lists[i % k] += [svc, sl]
for idx, items in enumerate(lists):
    with open(f"{out}-{idx}.json", "w") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": items}, f)
