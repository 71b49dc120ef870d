"""Secrets reach every pod of a job by reference only: the operator never reads or copies a value.

A job refers to one Secret three ways (a workers.env secretKeyRef, workers.envFrom and
storage.objectStore.credentialsSecret, plus a Secret volume) and runs through every stage: prepare,
training (its remote uploads failing for a while, as the fake trainer's metrics say), compression,
the ONNX export and serving. Then everything the operator created for it (every kind it owns), the
job's status, its Events and the operator's own log are searched for the Secret's values, and the
references are checked to be there, in every kind of pod.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import Jobs, OperatorProcess, free_port
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster

URI = "s3://runs/sec"
# What the operator creates for a job, every kind (the PodGroup kinds only with a gang scheduler).
OWNED_KINDS = (
    "pods,jobs.batch,configmaps,services,serviceaccounts,persistentvolumeclaims,deployments,replicasets"
)
TERMINATION = {
    "step": 100,
    "totalSteps": 100,
    "modelPath": "/var/lib/llmop/output/model",
    "modelUri": f"{URI}/model",
    "results": {"sizeBytes": 1000.0, "sizeRatio": 0.3, "perplexityIncreasePercent": 1.0},
}


def remote_metrics(failing: bool) -> str:
    return (
        "# TYPE llmtrain_step gauge\nllmtrain_step 40\nllmtrain_total_steps 100\n"
        "llmtrain_resumed_from_remote 1\nllmtrain_resumed_from_step 20\n"
        "llmtrain_remote_checkpoint_step 20\n"
        f"llmtrain_remote_uploads_pending {1 if failing else 0}\n"
        "# TYPE llmtrain_remote_upload_failures counter\n"
        "llmtrain_remote_upload_failures_total 3\n"
        f"llmtrain_remote_upload_failing {1 if failing else 0}\n"
    )


@contextmanager
def fake_trainer(ip: str, port: int) -> Iterator[dict[str, bool]]:
    """The rank-0 trainer's /metrics on its pod's loopback IP; ``state["failing"]`` switches uploads."""
    state = {"failing": True}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = remote_metrics(state["failing"]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((ip, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def create_secret(cluster: Cluster, ns: str, name: str, data: dict[str, str]) -> None:
    manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(manifest))


def pod_specs(cluster: Cluster, ns: str, name: str) -> dict[str, dict[str, Any]]:
    """The pod spec of each kind of pod the job runs, keyed by role (stage for compression)."""
    out: dict[str, dict[str, Any]] = {}
    pods = cluster.kubectl_json("get", "pods", "-n", ns, "-l", f"llmop.io/job-name={name}")["items"]
    for pod in pods:
        labels = pod["metadata"]["labels"]
        out[labels.get("llmop.io/stage") or labels["llmop.io/role"]] = pod["spec"]
    return out


def test_secret_values_appear_in_no_object_status_event_or_log(
    jobs: Jobs, operator: OperatorProcess, cluster: Cluster
) -> None:
    ns = jobs.ns
    value = f"sv-{secrets.token_hex(16)}"  # the distinctive value searched for below
    key_id = f"AKID{secrets.token_hex(8).upper()}"
    create_secret(cluster, ns, "s3-keys", {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": value})
    port = free_port()
    jobs.create(
        "sec",
        data={"prepare": True, "sources": [{"uri": "s3://corpus/train.jsonl", "format": "JSONL"}]},
        workers={
            "numNodes": 2,
            "procsPerNode": 1,
            "gpusPerNode": 1,
            "metricsPort": port,
            "env": [
                {
                    "name": "UPLOAD_KEY",
                    "valueFrom": {"secretKeyRef": {"name": "s3-keys", "key": "AWS_SECRET_ACCESS_KEY"}},
                }
            ],
            "envFrom": [{"prefix": "COPY_", "secretRef": {"name": "s3-keys"}}],
            "volumes": [{"name": "keys", "mountPath": "/var/run/keys", "secret": {"secretName": "s3-keys"}}],
            "podAnnotations": {"llmop.io/kwok-termination-message": json.dumps(TERMINATION)},
        },
        storage={
            "objectStore": {"endpoint": "http://127.0.0.1:9", "credentialsSecret": "s3-keys"},
            "remote": {"uri": URI},
        },
        compression={
            "quantization": [{"method": "Int8WeightOnly"}],
            "selection": {"objective": "Smallest"},
        },
        serving={"enabled": True, "onnxExport": True},
    )

    # Training, its uploads failing: the condition and the Warning say so, with the URI and count.
    pods = jobs.wait_pods("sec", 2, timeout=90)
    rank0 = next(p for p in pods if p["metadata"]["name"] == "sec-worker-0")
    with fake_trainer(rank0["status"]["podIP"], port) as trainer:
        failing = jobs.wait_condition("sec", "RemoteSynced", status="False", timeout=60)
        assert failing["reason"] == "UploadFailed", failing
        assert URI in failing["message"] and "3 upload attempt(s)" in failing["message"]
        remote = jobs.status("sec")["remote"]
        assert remote["uri"] == URI and remote["checkpointStep"] == 20 and remote["failedUploads"] == 3
        assert remote["checkpointUri"] == f"{URI}/checkpoints/step-00000020"
        trainer["failing"] = False
        current = jobs.wait_condition("sec", "RemoteSynced", timeout=60)
        assert current["reason"] == "UploadsCurrent"
    events = {(e["reason"], e["type"]) for e in jobs.events("sec")}
    assert ("UploadFailed", "Warning") in events and ("ResumedFromRemote", "Normal") in events

    # Then every later stage: compression, the ONNX export, serving.
    jobs.annotate_pods("sec", {"llmop.io/kwok-exit-after": "1s"})
    jobs.wait_condition("sec", "Succeeded", timeout=120)
    wait_for(
        lambda: {"prepare", "worker", "quantize-0", "onnx", "serve"} <= set(pod_specs(cluster, ns, "sec")),
        timeout=90,
        what="a pod of every stage (prepare, worker, compression, ONNX export, serving)",
    )
    status = jobs.status("sec")
    assert status["remote"]["modelUri"] == f"{URI}/model"
    assert {s["name"]: s.get("outputUri") for s in status["stages"]}["train"] == f"{URI}/model"

    # Everything the operator made for the job, its status and Events, and the operator's log.
    selector = "llmop.io/job-name=sec"
    owned = cluster.kubectl("get", OWNED_KINDS, "-n", ns, "-l", selector, "-o", "yaml").stdout
    unlabelled = cluster.kubectl("get", OWNED_KINDS, "-n", ns, "-o", "yaml").stdout  # ReplicaSets' pods too
    job = cluster.kubectl("get", "llmtrainingjob", "sec", "-n", ns, "-o", "yaml").stdout
    events_text = yaml.safe_dump(cluster.kubectl_json("get", "events", "-n", ns))
    dump = "\n".join([owned, unlabelled, job, events_text, operator.full_log()])
    assert "kind: ConfigMap" in owned and "kind: Job" in owned and "kind: Deployment" in owned
    encoded = base64.b64encode(value.encode()).decode()
    for secret in (value, encoded, key_id, base64.b64encode(key_id.encode()).decode()):
        assert secret not in dump, "a Secret's value was copied into an object, the status, an Event or a log"
    # The search would find it: the Secret itself holds it, in the form an object would carry it.
    assert encoded in cluster.kubectl("get", "secret", "s3-keys", "-n", ns, "-o", "yaml").stdout

    # ... and the references are there, in every kind of pod.
    specs = pod_specs(cluster, ns, "sec")
    for role in ("prepare", "worker", "quantize-0", "onnx", "serve"):
        c = specs[role]["containers"][0]
        assert {"secretRef": {"name": "s3-keys"}} in c["envFrom"], role
        assert {"prefix": "COPY_", "secretRef": {"name": "s3-keys"}} in c["envFrom"], role
        ref = {"secretKeyRef": {"name": "s3-keys", "key": "AWS_SECRET_ACCESS_KEY"}}
        assert {"name": "UPLOAD_KEY", "valueFrom": ref} in c["env"], role
        assert {"name": "AWS_ENDPOINT_URL_S3", "value": "http://127.0.0.1:9"} in c["env"], role
        volume = next(v for v in specs[role]["volumes"] if v["name"] == "keys")
        assert volume["secret"]["secretName"] == "s3-keys" and volume["secret"]["defaultMode"] == 0o440, role
        assert {"name": "keys", "mountPath": "/var/run/keys", "readOnly": True} in c["volumeMounts"], role
