"""Errors on a job's children are visible on the job, and a child is used only when it is the job's own.

- An object of the job's name left by an earlier job (deleted and applied again before garbage
  collection caught up: what a GitOps re-sync or `make demo` run twice does) is never adopted: the new
  job waits with ``Synced=False`` (LeftoverPending) until it is gone, then creates its own.
- A child the cluster refuses (a policy: 422 when invalid, 403 when forbidden) fails the job with the
  API's message and a Warning Event, instead of being retried for ever with nothing on the job.
- An object of a child's name that no job of this name owns is not taken over: the job fails (NameConflict).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import HOLD, Jobs, OperatorProcess
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster


def _controller_uid(obj: dict[str, Any]) -> str | None:
    refs = obj["metadata"].get("ownerReferences") or []
    return next((r["uid"] for r in refs if r.get("controller")), None)


def _hold(cluster: Cluster, ns: str, kind: str, name: str) -> None:
    patch = json.dumps({"metadata": {"finalizers": [HOLD]}})
    cluster.kubectl("patch", kind, name, "-n", ns, "--type=merge", "-p", patch)


def _release(cluster: Cluster, ns: str, kind: str, name: str) -> None:
    patch = json.dumps({"metadata": {"finalizers": None}})
    cluster.kubectl("patch", kind, name, "-n", ns, "--type=merge", "-p", patch, check=False)


def test_reapplied_job_waits_for_the_old_jobs_children_and_never_adopts_them(
    cluster: Cluster, namespace: str, jobs: Jobs, operator: OperatorProcess
) -> None:
    jobs.create("again")
    jobs.wait_pods("again", 4, attempt=1)
    old_uid = jobs.get("again")["metadata"]["uid"]
    # Garbage collection is slower than a re-sync: keep the old ConfigMap and one old worker
    # Terminating after their job is gone.
    _hold(cluster, namespace, "configmap", "again-config")
    jobs.hold_pods(["again-worker-0"])
    try:
        cluster.kubectl("delete", "llmtrainingjob", "again", "-n", namespace, "--wait=true", "--timeout=60s")
        jobs.create("again")
        new_uid = jobs.get("again")["metadata"]["uid"]
        assert new_uid != old_uid

        synced = jobs.wait_condition("again", "Synced", "False", timeout=30)
        assert synced["reason"] == "LeftoverPending", synced
        assert "again-config" in synced["message"] or "again-worker-0" in synced["message"], synced
        # Meanwhile nothing of the new job runs next to, or on top of, the old objects.
        pods = jobs.pods("again")
        assert all(_controller_uid(p) == old_uid for p in pods), "a new worker started next to old ones"
        config = cluster.kubectl_json("get", "configmap", "again-config", "-n", namespace)
        assert _controller_uid(config) == old_uid and config["metadata"].get("deletionTimestamp")
        # Waiting for the garbage collector is normal: an Event, but not a Warning.
        assert not [
            e for e in jobs.events("again") if e["type"] == "Warning" and e["reason"] == "LeftoverPending"
        ]
    finally:
        _release(cluster, namespace, "configmap", "again-config")
        jobs.release_pods()

    def new_gang() -> list[dict[str, Any]] | None:
        pods = jobs.pods("again")
        running = [p for p in pods if p["status"].get("phase") == "Running" and _controller_uid(p) == new_uid]
        return pods if len(running) == 4 and len(pods) == 4 else None

    # Then the old pods are gone and the new job's gang, all four of its own, runs alone.
    pods = wait_for(new_gang, timeout=90, what="the new job's own gang, alone")
    assert {p["metadata"]["labels"]["llmop.io/attempt"] for p in pods} == {"1"}

    def own_config() -> dict[str, Any] | None:
        c = cluster.kubectl_json("get", "configmap", "again-config", "-n", namespace)
        return dict(c) if _controller_uid(c) == new_uid else None

    config = wait_for(own_config, what="the new job's own ConfigMap")
    assert config["data"]
    jobs.wait_condition("again", "Running")
    jobs.wait_condition("again", "Synced", "True")
    status = jobs.status("again")
    assert (status["attempt"], status["restartCount"], status.get("disruptionCount", 0)) == (1, 0, 0)


@pytest.fixture
def refusing_policy(cluster: Cluster, namespace: str) -> Iterator[Any]:
    """A ValidatingAdmissionPolicy of the kind platform teams run (Gatekeeper/Kyverno do the same
    through webhooks), refusing the worker pods of jobs labelled for it in this namespace."""
    created: list[str] = []

    def make(job: str, reason: str) -> str:
        name = f"{namespace}-{job}"
        message = f"pods of job {job} are refused by policy {name}"
        policy = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["pods"],
                        }
                    ]
                },
                "validations": [
                    {
                        "expression": f"!has(object.metadata.labels) || object.metadata.labels[?'llmop.io/job-name'].orValue('') != '{job}'",
                        "message": message,
                        "reason": reason,
                    }
                ],
            },
        }
        binding = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
                },
            },
        }
        for manifest in (policy, binding):
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
        created.append(name)
        # The policy takes effect once the apiserver has loaded it: wait until a probe pod is refused.
        probe = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"probe-{job}", "labels": {"llmop.io/job-name": job}},
            "spec": {"containers": [{"name": "c", "image": "none"}]},
        }

        def refused() -> bool:
            out = cluster.kubectl(
                "create",
                "-n",
                namespace,
                "--dry-run=server",
                "-f",
                "-",
                input=yaml.safe_dump(probe),
                check=False,
            )
            return out.returncode != 0 and message in (out.stderr or "")

        wait_for(refused, timeout=30, what="the admission policy in force")
        return message

    yield make
    for name in created:
        cluster.kubectl("delete", "validatingadmissionpolicybinding", name, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "validatingadmissionpolicy", name, "--ignore-not-found", check=False)


@pytest.mark.parametrize(("reason", "job_reason"), [("Invalid", "ChildRejected"), ("Forbidden", "Forbidden")])
def test_a_child_the_cluster_refuses_fails_the_job_with_the_api_message(
    jobs: Jobs, operator: OperatorProcess, refusing_policy: Any, reason: str, job_reason: str
) -> None:
    name = f"refused-{reason.lower()}"
    message = refusing_policy(name, reason)
    jobs.create(name)
    failed = jobs.wait_condition(name, "Failed", timeout=30)
    assert failed["reason"] == job_reason, failed
    assert message in failed["message"] and f"{name}-worker-" in failed["message"], failed
    assert jobs.status(name)["state"] == "Failed"
    warnings = [e for e in jobs.events(name) if e["type"] == "Warning" and e["reason"] == job_reason]
    assert warnings and message in warnings[0]["message"]
    # Final: the operator stops trying (a retry loop would keep bumping the error counter).
    operator.wait_passes(3)
    assert jobs.status(name)["state"] == "Failed" and jobs.pods(name) == []


def test_a_name_held_by_an_object_the_job_does_not_own_is_not_taken_over(
    cluster: Cluster, namespace: str, jobs: Jobs, operator: OperatorProcess
) -> None:
    cluster.kubectl("create", "configmap", "mine-config", "-n", namespace, "--from-literal=keep=me")
    jobs.create("mine")
    failed = jobs.wait_condition("mine", "Failed", timeout=30)
    assert failed["reason"] == "NameConflict" and "mine-config" in failed["message"], failed
    config = cluster.kubectl_json("get", "configmap", "mine-config", "-n", namespace)
    assert config["data"] == {"keep": "me"} and not config["metadata"].get("ownerReferences")
