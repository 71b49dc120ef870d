"""The development runtime's nodes: one runtime per node (--first-index) serves disjoint nodes, and a
pod of the same namespace that another runtime runs is in this runtime's pods' hosts files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmop_dev.runtime import hosts, main, nodes
from llmop_dev.runtime.kubelet import Kubelet


def test_default_nodes_are_unchanged_and_first_index_gives_disjoint_ones() -> None:
    assert [(n.name, n.ip) for n in nodes.default_nodes()] == [
        ("local-0", "127.0.2.1"),
        ("local-1", "127.0.2.2"),
    ]
    one, other = nodes.default_nodes(1, 2), nodes.default_nodes(1, 3)
    assert [(n.name, n.ip) for n in one + other] == [("local-2", "127.0.2.3"), ("local-3", "127.0.2.4")]


@pytest.mark.parametrize("argv", [["--nodes", "0"], ["--first-index", "-1"], ["--first-index", "253"]])
def test_node_ranges_without_a_loopback_ip_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main.main(["--kubeconfig", "/nonexistent", *argv])
    assert exited.value.code == 2


def pod(name: str, uid: str, node: str, ip: str | None, phase: str = "Running") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "uid": uid},
        "spec": {"nodeName": node, "hostname": name, "subdomain": "gang", "containers": [{"name": "c"}]},
        "status": {"phase": phase, **({"podIP": ip} if ip else {})},
    }


class FakeApi:
    def __init__(self, pods: list[dict[str, Any]]) -> None:
        self.pods = pods

    def pods_in_namespace(self, namespace: str) -> list[dict[str, Any]]:
        return [p for p in self.pods if p["metadata"]["namespace"] == namespace]


def test_hosts_name_the_pods_another_runtime_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ours = pod("w-0", "u0", "local-2", None, phase="Pending")  # this runtime gives it an IP
    theirs = pod("w-1", "u1", "local-3", "127.2.0.11")
    pending_elsewhere = pod("w-2", "u2", "local-3", None, phase="Pending")  # no IP yet: no entry
    finished = pod("w-3", "u3", "local-3", "127.2.0.13", phase="Failed")
    kwok = pod("w-4", "u4", "gpu-node-0", "127.0.1.5")  # a kwok pod, not a runtime's
    monkeypatch.setattr("llmop_dev.runtime.sandbox.build_shim", lambda: None)
    monkeypatch.setattr("llmop_dev.runtime.paths.pod_dir", lambda ns, name, uid: tmp_path / uid)
    api = FakeApi([ours, theirs, pending_elsewhere, finished, kwok])
    kubelet = Kubelet(api, nodes.default_nodes(1, 2))  # type: ignore[arg-type]
    monkeypatch.setattr(kubelet.api, "patch_pod_status", lambda pod, status: None, raising=False)
    kubelet.admit(ours)
    kubelet.write_hosts_files()
    text = (tmp_path / "u0" / "hosts").read_text()
    assert "127.2.0.11\t" + hosts.dns_names(theirs)[0] in text
    assert "w-2" not in text and "w-3" not in text and "w-4" not in text
