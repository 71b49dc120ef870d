"""The installed chart, end to end: the operator runs as the chart's ServiceAccount (RBAC enforced
by the apiserver) through real job lifecycles, while a real Prometheus scrapes it and a trainer.

One release and one scenario for the module (it is the expensive part); each test then checks one
promise against what the scenario recorded or left behind:
  * job `ok`: data preparation, 2 workers, a real `llmtrain train` serving its metrics on rank 0's
    address (held at steps the test chooses, see paced_train), one compression method, serving
    switched on then off again by a spec change;
  * job `bad`: a worker fails, the gang restarts, fails again: Failed (BackoffLimitExceeded), then
    deleted by its ttlSecondsAfterFinished;
  * search `hp`: two trial jobs that succeed; search `hpfail`: one trial that fails, so it fails.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmtrain.adapt import llama_args
from llmtrain.config import load_config
from llmtrain.testing import debug_config, license_documents, write_shards
from llmtrain.train.metrics import flops_per_token
from llmtrain.train.schedule import total_steps
from tests.helm import argocd, paced_train
from tests.helm.chart import CHART, Tools
from tests.helm.prometheus import KubernetesDiscovery, Prometheus, scrape_job
from tests.helm.release import (
    Release,
    ServiceAccountOperator,
    audit_events,
    audit_offset,
    install_monitoring_crds,
    wait_state,
)
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster
EXIT_AFTER = "llmop.io/kwok-exit-after"
EXIT_CODE = "llmop.io/kwok-exit-code"
# What the kwok-played pods report when they end (the trainer and `llmtrain compress` write the same
# JSON to their termination message): the trained model, and the compression figures.
TERMINATION = {
    "step": 100,
    "totalSteps": 100,
    "validationLoss": 2.9,
    "modelPath": "/var/lib/llmop/output/model",
    "results": {"sizeBytes": 1000.0, "sizeRatio": 0.27, "perplexityIncreasePercent": 1.2, "speedup": 1.6},
}
MONITORING_VALUES = {
    "operator": {"progressIntervalSeconds": 1, "resyncSeconds": 5},
    "serviceMonitor": {"enabled": True, "interval": "1s"},
    "podMonitor": {"enabled": True, "interval": "1s"},
    # Short enough that the trainer held before its first step fires it within the scenario.
    "prometheusRule": {"enabled": True, "stalledAfter": "2s"},
    "grafanaDashboard": {"enabled": True},
}


def trial_template(exit_code: str) -> dict[str, Any]:
    message = {"step": 100, "totalSteps": 100, "validationLoss": 3.1}
    annotations = {
        EXIT_AFTER: "2s",
        EXIT_CODE: exit_code,
        "llmop.io/kwok-termination-message": json.dumps(message),
    }
    return {
        "data": {"prepare": False, "sources": [{"uri": "builtin://english"}]},
        "training": {"maxSteps": 100, "globalBatchSize": 8, "microBatchSize": 1},
        "workers": {"numNodes": 1, "procsPerNode": 1, "gpusPerNode": 1, "podAnnotations": annotations},
    }


LR = {"name": "lr", "path": "training.optimizer.learningRate", "type": "Float", "min": 1e-4, "max": 1e-3}
SEARCHES = {
    "hp": {
        "algorithm": "Random",
        "maxTrials": 2,
        "parallelTrials": 2,
        "parameters": [LR],
        "trialTemplate": trial_template("0"),
    },
    "hpfail": {
        "algorithm": "Random",
        "maxTrials": 1,
        "maxFailedTrials": 0,
        "parameters": [LR],
        "trialTemplate": trial_template("1"),
    },
}


@dataclass
class Scenario:
    release: Release
    ns: str  # the jobs' namespace
    operator: ServiceAccountOperator
    prometheus: Prometheus
    started: float
    states: dict[str, dict[str, Any]] = field(default_factory=dict)  # captured objects, by name
    audit: list[dict[str, Any]] = field(default_factory=list)
    bad_deleted_by_ttl: bool = False
    trainer: dict[str, Any] = field(default_factory=dict)  # what the real trainer run recorded

    def kubectl_json(self, *args: str) -> Any:
        return self.release.cluster.kubectl_json(*args, "-n", self.ns)


def manifest(name: str, spec: dict[str, Any], kind: str = "LLMTrainingJob") -> str:
    return yaml.safe_dump(
        {"apiVersion": "llmop.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}
    )


def wait_search(cluster: Cluster, ns: str, name: str, states: tuple[str, ...]) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        search = cluster.kubectl_json("get", "llmhyperparametersearch", name, "-n", ns)
        return dict(search) if (search.get("status") or {}).get("state") in states else None

    return dict(wait_for(check, timeout=90, interval=0.3, what=f"search {name} in state {states}"))


def worker_pods(
    cluster: Cluster, ns: str, job: str, attempt: int, phase: str = "Running"
) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        pods = cluster.kubectl_json(
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            f"llmop.io/job-name={job},llmop.io/attempt={attempt},llmop.io/role=worker",
        )["items"]
        live = [p for p in pods if p["status"].get("phase") == phase and p["status"].get("podIP")]
        return live if len(live) == 2 else None

    return list(wait_for(check, timeout=60, what=f"2 {phase} workers of {job} attempt {attempt}"))


def annotate(cluster: Cluster, ns: str, pods: list[str], **annotations: str) -> None:
    for pod in pods:
        cluster.kubectl(
            "annotate", "pod", pod, "-n", ns, "--overwrite", *(f"{k}={v}" for k, v in annotations.items())
        )


def fail_bad_job(cluster: Cluster, ns: str, states: dict[str, dict[str, Any]]) -> None:
    for attempt in (1, 2):
        pods = worker_pods(cluster, ns, "bad", attempt)
        annotate(cluster, ns, [pods[-1]["metadata"]["name"]], **{EXIT_AFTER: "1s", EXIT_CODE: "1"})
    states["bad-Failed"] = wait_state(cluster, ns, "bad", ("Failed",))


# The real trainer behind ok's rank 0: debug.yaml's tiny model (a few seconds of CPU), as many steps
# as the job, a peak FLOP/s as one would set for a device llmtrain's table lacks (so MFU exists).
TRAINER_SPEC = {
    "training": {
        "maxSteps": 100,
        "logIntervalSteps": 5,
        "evaluation": {"intervalSteps": 50},
        "checkpointing": {"intervalSteps": 50},
    },
}
PEAK_FLOPS = 1e12
HOLD_STEP = 30  # held here mid-run, so a scrape and the operator's progress reader see it for sure


def trainer_env(addr: str, port: int, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "NNODES", "NPROC_PER_NODE")}
    env.update(
        DS_ACCELERATOR="cpu",
        LLMTRAIN_LOG_FORMAT="json",
        # What the pod's metrics port is: rank 0's (loopback) pod IP, its containerPort "metrics".
        LLMOP_METRICS_ADDR=addr,
        LLMOP_METRICS_PORT=str(port),
        LLMOP_PEAK_FLOPS=str(PEAK_FLOPS),
        LLMOP_TERMINATION_LOG=str(tmp / "termination-log"),
    )
    return env


def run_trainer(s: Scenario, tmp: Path, addr: str, port: int) -> None:
    """`llmtrain train` on rank 0's address, held at step 0, HOLD_STEP and its last step in turn;
    each hold lasts until Prometheus (and at HOLD_STEP the operator) has seen it."""
    prom, rec = s.prometheus, s.trainer
    work = tmp / "trainer"
    data = write_shards(work / "data", license_documents(), vocab_size=512)
    config = debug_config(work / "run", data, TRAINER_SPEC)
    cfg = load_config(config)
    rec["config"] = cfg
    gate = work / "gate"
    paced_train.open_gate(gate, 0)
    log = tmp / "trainer.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helm.paced_train", str(gate), str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=trainer_env(addr, port, tmp),
        )

    def alive() -> bool:
        """True while the trainer runs; fails the wait at once if it stopped."""
        if proc.poll() is not None:
            raise AssertionError(f"llmtrain train exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        return True

    def held_at(step: int) -> bool:
        """Held after `step`, and at least two scrapes have read that step (raw samples)."""
        if not (alive() and paced_train.held(gate) == step):
            return False
        window = math.ceil(time.time() - s.started) + 5
        series = prom.query(f'llmtrain_step{{job="ok"}}[{window}s]')
        return bool(series) and [float(v) for _, v in series[0]["values"]].count(step) >= 2

    def stalled() -> list[dict[str, Any]]:
        alerts = prom.api("alerts")["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "LLMTrainingJobStalled"]

    try:
        # Before its first step: rank 0 up, step 0 of 100 and not moving, so the chart's alert fires.
        wait_for(lambda: held_at(0), timeout=300, interval=0.5, what="llmtrain train held at step 0, scraped")
        rec["stalled"] = wait_for(
            lambda: alive() and [a for a in stalled() if a["state"] == "firing"],
            timeout=60,
            what="LLMTrainingJobStalled firing on the trainer held at step 0",
        )
        rec["at-0"] = time.time()

        paced_train.open_gate(gate, HOLD_STEP)
        wait_for(lambda: held_at(HOLD_STEP), timeout=120, what=f"trainer held at step {HOLD_STEP}, scraped")

        def progressed() -> dict[str, Any] | None:
            alive()
            job = s.kubectl_json("get", "llmtrainingjob", "ok")
            step = ((job.get("status") or {}).get("progress") or {}).get("step", 0)
            return dict(job) if job["status"]["state"] == "Running" and step == HOLD_STEP else None

        s.states["ok-Running"] = wait_for(
            progressed, timeout=60, interval=0.3, what="ok's progress in status"
        )
        # Steps moved: the alert resolves (a resolved alert leaves the active list).
        wait_for(lambda: alive() and not stalled(), timeout=60, what="LLMTrainingJobStalled resolved")
        rec["at-hold"] = time.time()

        total = total_steps(cfg.spec.training)
        paced_train.open_gate(gate, total)
        wait_for(lambda: held_at(total), timeout=120, what=f"trainer held after its last step {total}")
        # The last validation (at step 100) is set before the export, so it is served by now.
        wait_for(
            lambda: alive() and prom.query(f'llmtrain_validation_step{{job="ok"}} == {total}'),
            timeout=30,
            what="the last validation, scraped",
        )
        rec["at-last"] = time.time()
        paced_train.open_gate(gate, total + 1)
        rec["exit_code"] = proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    rec["log"] = log.read_text()
    rec["termination"] = json.loads((tmp / "termination-log").read_text())
    rec["export"] = Path(cfg.paths.output_dir) / "model"


def run_ok_job(s: Scenario, tmp: Path) -> None:
    cluster = s.release.cluster
    pods = worker_pods(cluster, s.ns, "ok", 1)
    rank0 = next(p for p in pods if p["metadata"]["labels"]["llmop.io/worker-index"] == "0")
    port = next(p["containerPort"] for p in rank0["spec"]["containers"][0]["ports"] if p["name"] == "metrics")
    run_trainer(s, tmp, rank0["status"]["podIP"], port)
    annotate(cluster, s.ns, [p["metadata"]["name"] for p in pods], **{EXIT_AFTER: "1s"})
    s.states["ok-Serving"] = wait_state(cluster, s.ns, "ok", ("Serving",), timeout=120)
    # Switching serving off in the spec (as a Git commit would) removes the model server.
    cluster.kubectl(
        "patch",
        "llmtrainingjob",
        "ok",
        "-n",
        s.ns,
        "--type=merge",
        "-p",
        '{"spec":{"serving":{"enabled":false}}}',
    )

    def served_off() -> dict[str, Any] | None:
        job = s.kubectl_json("get", "llmtrainingjob", "ok")
        serving = next((c for c in job["status"]["conditions"] if c["type"] == "Serving"), {})
        return (
            dict(job)
            if job["status"]["state"] == "Succeeded" and serving.get("reason") == "ServingDisabled"
            else None
        )

    s.states["ok-Succeeded"] = wait_for(served_off, timeout=60, what="ok without serving")
    wait_for(
        lambda: not s.kubectl_json("get", "deployments", "-l", "llmop.io/job-name=ok")["items"],
        timeout=30,
        what="serving Deployment removed",
    )


@pytest.fixture(scope="module")
def scenario(cluster: Cluster, tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    tmp = tmp_path_factory.mktemp("release")
    install_monitoring_crds(cluster)
    ops_ns, ns = cluster.new_namespace(), cluster.new_namespace()
    release = Release(cluster, tools, f"rel-{uuid.uuid4().hex[:6]}", ops_ns)
    (tmp / "values.yaml").write_text(yaml.safe_dump(MONITORING_VALUES))
    release.install("-f", str(tmp / "values.yaml"))
    offset = audit_offset()
    # Cluster-wide mode: the ClusterRole is bound cluster-wide. The operator still watches only this
    # test's namespace: other tests' operators run jobs in their own namespaces at the same time.
    operator = ServiceAccountOperator(release, tmp, LLMOP_NAMESPACES=ns)
    prometheus = Prometheus(tools.bin_dir / "prometheus", tmp)
    discovery = KubernetesDiscovery(cluster.api())
    s = Scenario(release, ns, operator, prometheus, time.time())
    try:
        operator.start()
        discovery.start()
        monitors = [
            *cluster.kubectl_json("get", "servicemonitors", "-n", ops_ns)["items"],
            *cluster.kubectl_json("get", "podmonitors", "-n", ops_ns)["items"],
        ]
        rule = cluster.kubectl_json("get", "prometheusrules", "-n", ops_ns)["items"][0]
        prometheus.start([scrape_job(m, discovery) for m in monitors], rule["spec"]["groups"], "1s")

        annotations = {"llmop.io/kwok-termination-message": json.dumps(TERMINATION)}
        workers = {"numNodes": 2, "procsPerNode": 1, "gpusPerNode": 1}
        ok = {
            "data": {"prepare": True, "sources": [{"uri": "builtin://english"}]},
            "training": {"maxSteps": 100, "globalBatchSize": 8, "microBatchSize": 1},
            "workers": {**workers, "podAnnotations": annotations},
            "compression": {"quantization": [{"method": "Int8WeightOnly"}]},
            "serving": {"enabled": True},
        }
        bad = {
            "data": {"prepare": False, "sources": [{"uri": "builtin://english"}]},
            "training": {"maxSteps": 100, "globalBatchSize": 8, "microBatchSize": 1},
            "workers": workers,
            "runPolicy": {"backoffLimit": 1, "ttlSecondsAfterFinished": 20},
        }
        cluster.kubectl(
            "apply", "-n", ns, "-f", "-", input=manifest("ok", ok) + "---\n" + manifest("bad", bad)
        )
        searches = [manifest(name, spec, "LLMHyperparameterSearch") for name, spec in SEARCHES.items()]
        cluster.kubectl("apply", "-n", ns, "-f", "-", input="---\n".join(searches))
        s.states["hp-Running"] = wait_search(cluster, ns, "hp", ("Running",))
        fail_bad_job(cluster, ns, s.states)
        s.states["hp-Succeeded"] = wait_search(cluster, ns, "hp", ("Succeeded",))
        s.states["hpfail-Failed"] = wait_search(cluster, ns, "hpfail", ("Failed",))
        run_ok_job(s, tmp)
        wait_for(
            lambda: (
                not s.kubectl_json("get", "llmtrainingjobs", "--field-selector", "metadata.name=bad")["items"]
            ),
            timeout=60,
            what="bad deleted after its TTL",
        )
        s.bad_deleted_by_ttl = True
        time.sleep(3)  # a few more scrapes and rule evaluations of the finished state
        s.audit = audit_events(release.service_account, offset)
        yield s
    finally:
        # Searches and jobs go while the operator still runs (it removes their finalizers), then the rest.
        for kind in ("llmhyperparametersearches", "llmtrainingjobs"):
            cluster.kubectl("delete", kind, "--all", "-n", ns, "--wait=true", "--timeout=60s", check=False)
        operator.stop()
        prometheus.stop()
        discovery.stop()
        release.helm("uninstall", release.name, "--wait", check=False)
        for name in (ns, ops_ns):
            cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
        print(
            f"\n--- operator log (tail) ---\n{operator.log()}\n--- prometheus log (tail) ---\n{prometheus.log()}"
        )


def condition(job: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in job["status"]["conditions"] if c["type"] == kind)


def test_jobs_run_their_whole_lifecycle_with_the_operator_holding_only_the_charts_rights(
    scenario: Scenario,
) -> None:
    hp = scenario.states["hp-Succeeded"]["status"]
    assert hp["counts"]["succeeded"] == 2 and hp["bestTrial"]["value"] == 3.1
    assert scenario.states["hpfail-Failed"]["status"]["counts"]["failed"] == 1
    ok = scenario.states["ok-Succeeded"]
    assert condition(ok, "Succeeded")["status"] == "True"
    assert [(st["name"], st["state"]) for st in ok["status"]["stages"]] == [
        ("prepare", "Succeeded"),
        ("train", "Succeeded"),
        ("quantize-0", "Succeeded"),
    ]
    assert scenario.states["ok-Serving"]["status"]["serving"]["ready"] is True
    bad = scenario.states["bad-Failed"]
    assert condition(bad, "Failed")["reason"] == "BackoffLimitExceeded"
    assert bad["status"]["restartCount"] == 1
    assert scenario.bad_deleted_by_ttl
    # Not once did the apiserver refuse the operator.
    denied = [(e["verb"], e["requestURI"]) for e in scenario.audit if e["responseStatus"]["code"] == 403]
    assert denied == []
    assert "Forbidden" not in scenario.operator.log()


def granted_rules(cluster: Cluster, release: Release) -> set[tuple[str, str, str]]:
    role = cluster.kubectl_json("get", "clusterrole", release.fullname)
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def used_rules(audit: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    used = set()
    for event in audit:
        ref = event.get("objectRef")
        if not ref or event["responseStatus"]["code"] >= 400:
            continue  # non-resource URLs (discovery) need no rule
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        used.add((ref.get("apiGroup", ""), resource, event["verb"]))
        if event["verb"] == "patch" and event["responseStatus"]["code"] == 201:
            # A server-side apply that created its object was authorised as create as well.
            used.add((ref.get("apiGroup", ""), resource, "create"))
    return used


# Rules the scenario does not exercise, each for a reason; nothing else may be granted unused.
NOT_EXERCISED = {
    # Gang schedulers: PodGroups (their CRDs are not installed in this cluster).
    ("scheduling.x-k8s.io", "podgroups", "create"): "spec.scheduling.gangScheduler: Coscheduling",
    ("scheduling.volcano.sh", "podgroups", "create"): "spec.scheduling.gangScheduler: Volcano",
    # Kueue (its CRDs are not installed in this cluster; tests/cluster/test_kueue.py runs it).
    ("kueue.x-k8s.io", "workloads", "delete"): "spec.scheduling.queueName: a Kueue gang attempt ended",
    # KServe serving (its CRDs are not installed in this cluster).
    ("serving.kserve.io", "inferenceservices", "get"): "spec.serving.kserve: true",
    ("serving.kserve.io", "inferenceservices", "create"): "spec.serving.kserve: true",
    ("serving.kserve.io", "inferenceservices", "patch"): "spec.serving.kserve: true",
    ("serving.kserve.io", "inferenceservices", "delete"): "spec.serving.kserve: true",
    # Only after a scheduling-gate patch raced with another change of the pod's gates.
    ("", "pods", "get"): "re-read of a pod whose gates changed under the patch",
    # Only when a failed compression stage is retried.
    ("batch", "jobs", "delete"): "a compression stage retried after it failed",
    # Read before each server-side apply of serving (an apply would take over a namesake); in this
    # run every read came before the object existed, and the audit filter skips those 404s.
    ("", "services", "get"): "read before a server-side apply of serving found the object there",
    ("apps", "deployments", "get"): "read before a server-side apply of serving found the object there",
    # Only when a create meets an object of the same name (409): its owner is read, and a leftover
    # of an earlier job of this name is removed (tests/cluster/test_child_errors.py).
    **{
        (group, resource, verb): "a create that met a namesake (409): read its owner, remove a leftover"
        for group, resource in (
            ("", "serviceaccounts"),
            ("", "configmaps"),
            ("", "persistentvolumeclaims"),
            ("batch", "jobs"),
            ("llmop.io", "llmtrainingjobs"),
            ("scheduling.x-k8s.io", "podgroups"),
            ("scheduling.volcano.sh", "podgroups"),
        )
        for verb in ("get", "delete")
        if (group, resource, verb)
        not in {("batch", "jobs", "delete"), ("llmop.io", "llmtrainingjobs", "delete")}
    },
}


def test_cluster_role_grants_nothing_beyond_the_calls_the_operator_made(scenario: Scenario) -> None:
    granted = granted_rules(scenario.release.cluster, scenario.release)
    used = used_rules(scenario.audit)
    assert ("", "pods", "create") in used and ("llmop.io", "llmtrainingjobs/status", "patch") in used
    unexplained = granted - used - set(NOT_EXERCISED)
    assert unexplained == set(), f"granted but never used: {sorted(unexplained)}"
    # The list stays honest: every entry is a rule the chart really grants.
    assert set(NOT_EXERCISED) <= granted
    # And nothing used was missing (the apiserver would have said 403, see the lifecycle test).
    assert used <= granted
    print(
        f"\n{len(granted)} granted (group, resource, verb); {len(granted & used)} used in the run; not exercised:"
    )
    for rule in sorted(granted - used):
        print(f"  {rule}: {NOT_EXERCISED[rule]}")


FORBIDDEN = [
    ("get", "secrets", "-A"),
    ("list", "secrets", "-n", "{ns}"),
    ("create", "pods", "--subresource=exec", "-n", "{ns}"),
    ("get", "pods", "--subresource=log", "-n", "{ns}"),
    ("delete", "customresourcedefinitions"),
    ("update", "customresourcedefinitions"),
    ("create", "clusterrolebindings"),
    ("create", "rolebindings", "-n", "{ns}"),
    ("escalate", "clusterroles"),
    ("impersonate", "serviceaccounts", "-A"),
    ("create", "serviceaccounts", "--subresource=token", "-n", "{ns}"),
    ("delete", "nodes"),
    ("patch", "nodes"),
    ("delete", "namespaces"),
    ("update", "llmtrainingjobs", "-n", "{ns}"),
    ("patch", "pods", "--subresource=status", "-n", "{ns}"),
]


def test_the_operator_cannot_read_secrets_exec_into_pods_or_touch_crds_and_rbac(scenario: Scenario) -> None:
    release, ns = scenario.release, scenario.ns
    # Positive controls, so a broken `can-i` call cannot pass the negative checks.
    assert release.can_i("list", "pods", "-A") and release.can_i(
        "patch", "llmtrainingjobs", "--subresource=status", "-n", ns
    )
    allowed = [args for args in FORBIDDEN if release.can_i(*(a.format(ns=ns) for a in args))]
    assert allowed == []


def test_trainer_pods_service_account_has_no_api_permissions(scenario: Scenario) -> None:
    release, ns = scenario.release, scenario.ns
    trainer = f"system:serviceaccount:{ns}:ok-trainer"
    assert (
        scenario.kubectl_json("get", "serviceaccount", "ok-trainer")["automountServiceAccountToken"] is False
    )
    for verb, resource in [
        ("get", "pods"),
        ("list", "configmaps"),
        ("get", "secrets"),
        ("create", "pods"),
        ("get", "llmtrainingjobs"),
        ("list", "nodes"),
    ]:
        assert not release.can_i(verb, resource, "-n", ns, as_user=trainer), f"trainer can {verb} {resource}"
    # Everything it may do is what every authenticated identity may: ask what it may do.
    rules = release.cluster.kubectl("auth", "can-i", "--list", "-n", ns, f"--as={trainer}").stdout
    # Lines of resource rules start with the resource; non-resource URL lines start with blanks.
    resources = {line.split()[0] for line in rules.splitlines()[1:] if line[:1].strip()}
    assert resources <= {
        "selfsubjectreviews.authentication.k8s.io",
        "selfsubjectaccessreviews.authorization.k8s.io",
        "selfsubjectrulesreviews.authorization.k8s.io",
    }, rules


def test_prometheus_scrapes_the_operator_with_each_jobs_labels(scenario: Scenario) -> None:
    prom, ns, release = scenario.prometheus, scenario.ns, scenario.release
    up = {r["metric"]["job"]: r for r in prom.query("up")}
    # The ServiceMonitor's target is the operator pod's IP behind the metrics Service.
    operator_target = up[f"{release.fullname}-metrics"]
    assert (
        operator_target["metric"]["instance"]
        == f"{scenario.operator.ip}:{scenario.operator.ports['metrics']}"
    )
    assert operator_target["value"][1] == "1"
    # The operator's per-job series carry the job's own namespace and name (honorLabels).
    loss = prom.query_range(
        f'llmop_job_training_loss{{namespace="{ns}", job="ok"}}', scenario.started, time.time()
    )
    # The gauge reads 0 until rank 0 logs its first step; from then on the loss falls.
    logged = [float(v) for _, v in loss[0]["values"] if float(v) > 0]
    assert len(logged) > 3 and logged[-1] < logged[0], "the loss fell"
    # ok and the two trials of hp succeeded; bad and hpfail's trial failed.
    succeeded = prom.query(f'llmop_jobs_succeeded_total{{namespace="{ns}"}}')
    failed = prom.query(f'llmop_jobs_failed_total{{namespace="{ns}", reason="BackoffLimitExceeded"}}')
    assert (succeeded[0]["value"][1], failed[0]["value"][1]) == ("3", "2")
    figures = prom.query(f'llmop_compression_result{{namespace="{ns}", job="ok", method="Int8WeightOnly"}}')
    assert {r["metric"]["figure"]: r["value"][1] for r in figures}["sizeRatio"] == "0.27"


def at(prom: Prometheus, expr: str, when: float) -> float:
    """The one value of `expr` at time `when`."""
    result = prom.query(expr, time=when)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def test_prometheus_scrapes_a_real_llmtrain_train_on_rank_0_through_the_charts_pod_monitor(
    scenario: Scenario,
) -> None:
    prom, ns, rec = scenario.prometheus, scenario.ns, scenario.trainer
    cfg = rec["config"]
    tr = cfg.spec.training
    total, tokens_per_step = total_steps(tr), tr.global_batch_size * tr.sequence_length
    # A whole real run: it exported a model and wrote its last words as a trainer pod does.
    assert rec["exit_code"] == 0, rec["log"][-4000:]
    assert (rec["export"] / "model.safetensors").is_file()
    assert rec["termination"]["step"] == total and rec["termination"]["stage"] == "train"

    # Every scrape of the step counter over the run (raw samples, not a range query's resampling):
    # one series, with the PodMonitor's labels; it only ever rose, through each hold (read by two
    # scrapes or more: the scenario waited for that) to the last step.
    window = math.ceil(time.time() - scenario.started) + 5
    series = prom.query(f'llmtrain_step{{job="ok"}}[{window}s]')
    assert len(series) == 1, series
    labels = series[0]["metric"]
    assert {k: labels[k] for k in ("namespace", "pod", "attempt", "container", "endpoint")} == {
        "namespace": ns,
        "pod": "ok-worker-0",
        "attempt": "1",
        "container": "trainer",
        "endpoint": "metrics",
    }
    steps = [float(v) for _, v in series[0]["values"]]
    assert steps == sorted(steps), steps
    for step in (0, HOLD_STEP, total):
        assert steps.count(step) >= 2, (step, steps)
    print(f"\nllmtrain_step as scraped ({len(steps)} scrapes): {sorted(set(steps))}")

    # The series a user watches, each with the same labels, at the hold and after the last step.
    sel = f'{{namespace="{ns}", job="ok", pod="ok-worker-0", attempt="1"}}'
    hold, last = rec["at-hold"], rec["at-last"]
    assert at(prom, f"llmtrain_step{sel}", hold) == HOLD_STEP
    assert at(prom, f"llmtrain_total_steps{sel}", hold) == total
    # The token counter counts every token of every reported step, exactly.
    assert at(prom, f"llmtrain_tokens_total{sel}", hold) == HOLD_STEP * tokens_per_step
    assert at(prom, f"llmtrain_tokens_total{sel}", last) == total * tokens_per_step
    # Real learning: the training loss fell from the hold to the end, the validation loss from step 0.
    loss_hold, loss_last = at(prom, f"llmtrain_loss{sel}", hold), at(prom, f"llmtrain_loss{sel}", last)
    assert 0 < loss_last < loss_hold < math.log(cfg.spec.model.vocab_size) + 1, (loss_hold, loss_last)
    val_0 = at(prom, f"llmtrain_validation_loss{sel}", rec["at-0"])
    assert at(prom, f"llmtrain_validation_step{sel}", last) == total
    assert at(prom, f"llmtrain_validation_loss{sel}", last) < val_0
    assert at(prom, f"llmtrain_learning_rate{sel}", hold) > 0
    assert at(prom, f"llmtrain_checkpoint_seconds{sel}", last) > 0
    assert at(prom, f"llmtrain_memory_bytes{sel}", last) > 0
    # Throughput, and MFU from it by the PaLM FLOP count and the configured peak.
    assert at(prom, f"llmtrain_tokens_per_second{sel}", last) > 0
    assert at(prom, f"llmtrain_samples_per_second{sel}", last) > 0
    per_token = at(prom, f"llmtrain_flops_per_second{sel} / llmtrain_tokens_per_second{sel}", last)
    assert per_token == pytest.approx(
        flops_per_token(llama_args(cfg.spec.model), tr.sequence_length), rel=1e-9
    )
    mfu = at(prom, f"llmtrain_mfu{sel} * {PEAK_FLOPS} / llmtrain_flops_per_second{sel}", last)
    assert mfu == pytest.approx(1, rel=1e-9)

    # The operator's progress reader read the same endpoint: the status at the hold has its figures.
    progress = scenario.states["ok-Running"]["status"]["progress"]
    assert (progress["step"], progress["totalSteps"]) == (HOLD_STEP, total)
    assert progress["loss"] == pytest.approx(loss_hold, abs=1e-4)  # the status keeps a few decimals

    # The chart's stall alert fired on the trainer held before its first step, with the job's labels.
    alert = rec["stalled"][0]
    assert {k: alert["labels"][k] for k in ("namespace", "job", "pod", "severity")} == {
        "namespace": ns,
        "job": "ok",
        "pod": "ok-worker-0",
        "severity": "warning",
    }
    assert float(alert["value"]) == 0
    assert alert["annotations"]["description"] == "Rank 0 (ok-worker-0) is at step 0 and not moving."


# Dashboard targets that may legitimately return no data in this scenario, and why.
EMPTY_IN_SCENARIO = {
    "Reconcile errors": "no reconcile pass failed",
    # kwok plays the serving pod: the serving PodMonitor finds it, but nothing answers its /metrics.
    "Requests running": "no serving engine runs under kwok",
    "Generated tokens/s": "no serving engine runs under kwok",
    "Time to first token (p95)": "no serving engine runs under kwok",
    "Serving energy per generated token": "no serving engine runs under kwok",
    # Measured energy only: empty where the trainer's node has no NVML GPU and no readable RAPL.
    "Energy (kWh)": "no energy counter the trainer can read on this machine",
    "Energy per token": "no energy counter the trainer can read on this machine",
}


def dashboard_targets() -> list[tuple[str, str]]:
    dashboard = json.loads((CHART / "files" / "dashboards" / "llmop.json").read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]


def test_every_dashboard_and_alert_expression_evaluates_against_the_scraped_series(
    scenario: Scenario,
) -> None:
    prom, ns = scenario.prometheus, scenario.ns
    grafana = {
        "$namespace": ns,
        "$job": ".*",
        "$__rate_interval": "1m",
        "$__range": "5m",
        "$__interval": "1s",
    }
    empty = []
    for title, expr in dashboard_targets():
        for var, value in grafana.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        if not prom.query_range(expr, scenario.started, time.time()):
            empty.append(title)
    assert set(empty) <= set(EMPTY_IN_SCENARIO), f"panels without data: {empty}"

    groups = prom.api("rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 5
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
    alerts = {(a["labels"]["alertname"], a["state"]): a for a in prom.api("alerts")["data"]["alerts"]}
    failed = alerts[("LLMTrainingJobFailed", "firing")]["labels"]
    assert (failed["namespace"], failed["reason"]) == (ns, "BackoffLimitExceeded")
    # The operator was scraped all along, and nothing stalled.
    assert not [k for k in alerts if k[0] in ("LLMOperatorDown", "LLMTrainingJobStalled")]


def test_argocd_health_of_the_status_the_operator_wrote(scenario: Scenario) -> None:
    verdicts = {name: argocd.health(job) for name, job in scenario.states.items()}
    running = verdicts["ok-Running"]
    assert running["status"] == "Progressing"
    assert re.fullmatch(r"Running: step \d+/100 \(\d+%\)", running["message"]), running
    assert verdicts["ok-Serving"]["status"] == "Healthy"
    assert "answers at http://ok-serve." in verdicts["ok-Serving"]["message"]
    assert verdicts["ok-Succeeded"] == {
        "status": "Healthy",
        "message": condition(scenario.states["ok-Succeeded"], "Succeeded")["message"],
    }
    assert verdicts["bad-Failed"]["status"] == "Degraded"
    assert verdicts["bad-Failed"]["message"].startswith("BackoffLimitExceeded: ")
    # The search kind, on status its controller wrote.
    assert verdicts["hp-Running"]["status"] == "Progressing"
    assert re.fullmatch(r"Running: [0-2]/2 trials finished.*", verdicts["hp-Running"]["message"]), verdicts
    assert verdicts["hp-Succeeded"]["status"] == "Healthy"
    assert (
        verdicts["hp-Succeeded"]["message"]
        == condition(scenario.states["hp-Succeeded"], "Succeeded")["message"]
    )
    assert verdicts["hpfail-Failed"]["status"] == "Degraded"
    print("\n" + "\n".join(f"  {name}: {v}" for name, v in verdicts.items()))


def test_the_operator_never_writes_spec(scenario: Scenario) -> None:
    job = scenario.kubectl_json("get", "llmtrainingjob", "ok", "--show-managed-fields")
    entries = [
        (m["manager"], m.get("subresource", ""), set(m["fieldsV1"])) for m in job["metadata"]["managedFields"]
    ]
    spec_writers = {manager for manager, _, fields in entries if "f:spec" in fields}
    # Only the user's own kubectl apply and patch own spec fields; the operator's writers own
    # metadata (Kopf: its finalizer and annotations) and status, so Argo CD / Flux see no drift.
    assert spec_writers == {"kubectl-client-side-apply", "kubectl-patch"}, entries
    operator = [(m, sub, fields) for m, sub, fields in entries if m not in spec_writers]
    assert {sub for _, sub, _ in operator} == {"", "status"}, entries
    assert all(fields <= {"f:metadata", "f:status"} for _, _, fields in operator), entries
