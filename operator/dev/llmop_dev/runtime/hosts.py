"""The pod's /etc/hosts: its own names and the DNS names of its namespace's headless-service pods.

There is no cluster DNS here. Cluster names of pods with hostname+subdomain
(``<hostname>.<subdomain>.<ns>.svc[.cluster.local]``, what a headless Service publishes) are written
into every local pod's hosts file instead, and rewritten in place whenever a pod IP appears, so a
name resolves as soon as its pod has an IP, whichever pod started first.
"""

from __future__ import annotations

from llmop_dev.runtime.api import Obj

CLUSTER_DOMAIN = "cluster.local"


def pod_hostname(pod: Obj) -> str:
    return str(pod["spec"].get("hostname") or pod["metadata"]["name"])[:63]


def dns_names(pod: Obj) -> list[str]:
    sub = pod["spec"].get("subdomain")
    if not sub:
        return []
    base = f"{pod_hostname(pod)}.{sub}.{pod['metadata']['namespace']}.svc"
    return [f"{base}.{CLUSTER_DOMAIN}", base]


def render(pod: Obj, ip: str, peers: list[tuple[Obj, str]]) -> str:
    """peers: (pod, IP) of the namespace's local pods, this one included or not."""
    lines = [
        "# Kubernetes-managed hosts file (llmop development runtime).",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "\t".join([ip, *dns_names(pod), pod_hostname(pod)]),
    ]
    uid = pod["metadata"]["uid"]
    for peer, peer_ip in sorted(peers, key=lambda p: p[0]["metadata"]["name"]):
        names = dns_names(peer)
        if peer["metadata"]["uid"] != uid and names:
            lines.append("\t".join([peer_ip, *names]))
    return "\n".join(lines) + "\n"
