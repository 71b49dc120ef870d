"""The local control plane is real, loopback-only, and its fake pods can be scripted by annotation."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
import yaml

from llmop_dev import cluster as devcluster
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def test_apiserver_is_the_pinned_build(cluster: Cluster) -> None:
    pinned = dict(
        line.split("=", 1)
        for line in (devcluster.REPO / "hack" / "versions.env").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert cluster.server_version() == pinned["K8S_VERSION"]


def test_cluster_up_is_idempotent_and_prints_kubeconfig(cluster: Cluster) -> None:
    before = cluster.kubectl_json("get", "nodes")["items"]
    assert devcluster.up() == cluster.kubeconfig
    after = cluster.kubectl_json("get", "nodes")["items"]
    assert [n["metadata"]["uid"] for n in after] == [n["metadata"]["uid"] for n in before]


def test_a_cluster_made_by_another_checkout_is_refused_not_recreated(cluster: Cluster) -> None:
    stamp = devcluster.kwok_home() / "clusters" / devcluster.CLUSTER_NAME / "llmop-config.json"
    ours = stamp.read_text()
    before = cluster.kubectl_json("get", "nodes")["items"]
    stamp.write_text(json.dumps({**json.loads(ours), "checkout": "/elsewhere/llmop"}))
    try:
        with pytest.raises(
            devcluster.ClusterInUse, match=r"another checkout \(/elsewhere/llmop\).*LLMOP_CLUSTER_NAME"
        ):
            devcluster.up()
    finally:
        stamp.write_text(ours)
    after = cluster.kubectl_json("get", "nodes")["items"]
    assert [n["metadata"]["uid"] for n in after] == [n["metadata"]["uid"] for n in before]


def test_fake_gpu_nodes_are_ready_with_loopback_addresses(cluster: Cluster) -> None:
    def ready_gpu_nodes() -> list[dict[str, Any]]:
        nodes = cluster.kubectl_json("get", "nodes", "-l", "nvidia.com/gpu.present=true")["items"]
        ready = [
            n
            for n in nodes
            if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
        ]
        return ready if len(ready) >= 4 else []

    nodes = wait_for(ready_gpu_nodes, what="4 Ready GPU nodes")
    for node in nodes:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == devcluster.GPU_PRODUCT
        for address in node["status"]["addresses"]:
            if address["type"] == "InternalIP":
                assert ipaddress.ip_address(address["address"]) in LOOPBACK


def _pod(name: str, annotations: dict[str, str], gpus: int = 1) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "main",
                        "image": "trainer",
                        "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                    }
                ],
            },
        }
    )


def _phase(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    pod = cluster.kubectl_json("get", "pod", name, "-n", namespace)
    return pod if pod["status"].get("phase") in ("Succeeded", "Failed") else None


def test_pods_get_loopback_ips_and_run(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=_pod("runner", {}, gpus=8))
    pod = wait_for(
        lambda: (
            (p := cluster.kubectl_json("get", "pod", "runner", "-n", namespace))["status"].get("phase")
            == "Running"
            and p
        ),
        what="pod Running",
    )
    assert ipaddress.ip_address(pod["status"]["podIP"]) in LOOPBACK
    assert ipaddress.ip_address(pod["status"]["hostIP"]) in LOOPBACK


@pytest.mark.parametrize(("code", "phase"), [("0", "Succeeded"), ("3", "Failed")])
def test_annotation_scripts_exit_code(cluster: Cluster, namespace: str, code: str, phase: str) -> None:
    annotations = {"llmop.io/kwok-exit-after": "1s", "llmop.io/kwok-exit-code": code}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=_pod("scripted", annotations))
    pod = wait_for(lambda: _phase(cluster, namespace, "scripted"), what="pod to terminate")
    assert pod["status"]["phase"] == phase
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == int(code)


def test_annotation_scripts_eviction(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=_pod("evicted", {"llmop.io/kwok-evict-after": "1s"})
    )
    pod = wait_for(lambda: _phase(cluster, namespace, "evicted"), what="pod to be evicted")
    assert pod["status"]["reason"] == "Evicted"
    assert any(c["type"] == "DisruptionTarget" and c["status"] == "True" for c in pod["status"]["conditions"])


def test_batch_job_pods_complete(cluster: Cluster, namespace: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "prep"},
        "spec": {
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "trainer"}]}
            }
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(job))
    wait_for(
        lambda: cluster.kubectl_json("get", "job", "prep", "-n", namespace)["status"].get("succeeded") == 1,
        what="Job to succeed",
    )


def test_too_large_pod_stays_pending(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=_pod("huge", {}, gpus=9))
    pod = wait_for(
        lambda: next(
            (
                p
                for p in [cluster.kubectl_json("get", "pod", "huge", "-n", namespace)]
                if any(
                    c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
                    for c in p["status"].get("conditions", [])
                )
            ),
            None,
        ),
        what="Unschedulable condition",
    )
    assert "nvidia.com/gpu" in next(
        c["message"] for c in pod["status"]["conditions"] if c["type"] == "PodScheduled"
    )


def test_kubectl_explain_teaches_the_api(cluster: Cluster) -> None:
    out = cluster.kubectl("explain", "llmtrainingjob.spec", "--recursive").stdout
    for field in (
        "globalBatchSize",
        "zeroStage",
        "nearDuplicates" if False else "near",
        "backoffLimit",
        "quantization",
    ):
        assert field in out
    described = cluster.kubectl("explain", "llmtrainingjob.spec.deepspeed.zeroStage").stdout
    assert "ZeRO stage" in described
