"""helm upgrade to the per-namespace RBAC mode, a job under it, and helm uninstall keeping CRDs and jobs."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from tests.helm.chart import Tools
from tests.helm.release import Release, ServiceAccountOperator, wait_state
from tests.kube import Cluster

pytestmark = pytest.mark.cluster


def test_upgrade_to_namespaced_rbac_runs_jobs_and_uninstall_keeps_crds_and_jobs(
    cluster: Cluster, tools: Tools, tmp_path: Path
) -> None:
    ops_ns, ns, other = cluster.new_namespace(), cluster.new_namespace(), cluster.new_namespace()
    release = Release(cluster, tools, f"up-{uuid.uuid4().hex[:6]}", ops_ns)
    operator = ServiceAccountOperator(release, tmp_path)
    crd_before = cluster.kubectl_json("get", "crd", "llmtrainingjobs.llmop.io")
    try:
        release.install()
        assert release.can_i("list", "pods", "-n", other), "cluster-wide mode to begin with"

        out = release.upgrade(
            "--set",
            f"operator.watchNamespaces={{{ns}}}",
            "--set",
            "operator.logFormat=plain",
            "--set",
            "resources.limits.memory=2Gi",
        )
        assert "REVISION: 2" in out
        pod = release.deployment()["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value", "") for e in pod["containers"][0]["env"]}
        assert (env["LLMOP_NAMESPACES"], env["LLMOP_LOG_FORMAT"]) == (ns, "plain")
        assert pod["containers"][0]["resources"]["limits"]["memory"] == "2Gi"
        # Rights now only in the watched namespace (and reading Nodes cluster-wide).
        assert release.can_i("create", "pods", "-n", ns) and release.can_i("list", "nodes")
        assert not release.can_i("list", "pods", "-n", other)
        assert not release.can_i("list", "pods", "-A")
        assert not release.can_i("patch", "llmtrainingjobs", "-n", other)

        # The operator with exactly the upgraded release's settings (its own LLMOP_NAMESPACES).
        operator.start()
        job = {
            "apiVersion": "llmop.io/v1alpha1",
            "kind": "LLMTrainingJob",
            "metadata": {"name": "scoped"},
            "spec": {
                "data": {"prepare": True, "sources": [{"uri": "builtin://english"}]},
                "training": {"maxSteps": 10, "globalBatchSize": 8, "microBatchSize": 1},
                "workers": {
                    "numNodes": 2,
                    "procsPerNode": 1,
                    "gpusPerNode": 1,
                    "podAnnotations": {"llmop.io/kwok-exit-after": "2s"},
                },
            },
        }
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(job))
        wait_state(cluster, ns, "scoped", ("Succeeded",))
        operator.stop()
        assert "Forbidden" not in operator.log()

        print(release.uninstall())
        leftovers = (
            cluster.kubectl(
                "get",
                "deployment,serviceaccount,role,rolebinding,service",
                "-n",
                ops_ns,
                "-o",
                "name",
                "-l",
                f"app.kubernetes.io/instance={release.name}",
            ).stdout
            + cluster.kubectl("get", "role,rolebinding", "-n", ns, "-o", "name").stdout
        )
        assert leftovers.strip() == ""
        gone = cluster.kubectl("get", "clusterrole,clusterrolebinding", release.fullname, check=False)
        assert gone.returncode != 0 and "NotFound" in gone.stderr
        # CRDs live in the chart's crds/: never deleted (nor changed) by helm, so users' jobs stay.
        crd_after = cluster.kubectl_json("get", "crd", "llmtrainingjobs.llmop.io")
        assert crd_after["metadata"]["uid"] == crd_before["metadata"]["uid"]
        assert "meta.helm.sh/release-name" not in crd_after["metadata"].get("annotations", {})
        kept = cluster.kubectl_json("get", "llmtrainingjob", "scoped", "-n", ns)
        assert kept["status"]["state"] == "Succeeded"
        assert kept["metadata"]["finalizers"] == ["llmop.io/finalizer"]
    finally:
        operator.stop()
        release.helm("uninstall", release.name, check=False)
        # Without an operator the finalizer stays: take it off by hand (docs/helm.md, Uninstall).
        cluster.kubectl(
            "patch",
            "llmtrainingjob",
            "scoped",
            "-n",
            ns,
            "--type=merge",
            "-p",
            '{"metadata":{"finalizers":null}}',
            check=False,
        )
        for name in (ns, ops_ns, other):
            cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
