"""Peer benchmark: llmop against the Kubeflow Training Operator on the same kwok cluster.

The peer is github.com/kubeflow/training-operator at the version in hack/peer-versions.env (v1.8.1),
built from the Go module proxy by ``hack/build-peer.sh`` (not by CI) and run as a local process
against the same local kwok cluster as llmop (``llmop-peer``, deleted at the end unless ``--keep``),
with only the PyTorchJob scheme, no gang scheduler (the default scheduler; llmop's gang gate is its
own), info-level logs, and its webhook server on loopback with a self-signed certificate but no
webhook configuration, so the apiserver never calls it. Each controller runs alone, one after the other, as its own ServiceAccount
with its own FlowSchemas (``benchmarks/controlplane.py``'s buckets; PyTorchJobs in place of
LLMTrainingJobs), so requests, CPU and RSS are each one controller's own. Each side gets:

1. one job of ``--big-nodes`` pods with 8 GPUs each: an LLMTrainingJob (numNodes 128, gpusPerNode 8)
   or a PyTorchJob (1 Master + 127 Workers, nvidia.com/gpu 8 each, the same image): seconds from our
   POST to all pods created and Running, its API requests, CPU seconds and peak RSS; ``--big-repeats``
   runs per side, interleaved (the first side alternating), the median run reported;
2. ``--jobs`` concurrent jobs of ``--job-nodes`` pods (``--small-gpus`` GPUs each): the same per job;
3. ``--trials`` worker failures in a job of ``--recovery-workers`` pods with 8 GPUs each: a worker
   exits 1 (kwok's scripted exit, as in ``benchmarks/recovery.py``); seconds from our watch seeing it
   Failed until every pod of the job is Running again. Both sides run restartPolicy OnFailure: llmop
   restarts the whole gang, the training operator deletes and recreates the failed pod only.

Times come from our own pod watches (controlplane.PodWatcher, recovery.Pods); PyTorchJob pod
templates carry llmop's ``llmop.io/role``/``llmop.io/job-name`` labels so the same watches see them.

    python benchmarks/peer.py [--nodes 256] [--jobs 200] [--trials 10] [--keep]

The last line is ``time to all pods Running vs training-operator: X``, llmop's time over the
peer's for the big job (goal <= 0.5); nothing asserts on it. Exits non-zero only on errors.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import controlplane as cp
import recovery as rc

CLUSTER_NAME = "llmop-peer"
PEER = "training-operator"
PEER_NAMESPACE = "llmop-peer-system"  # its ServiceAccount and its webhook certificate's Secret
PEER_SERVICE_ACCOUNT = "llmop-peer-training-operator"
# Its FlowSchemas are named controlplane.FS_PREFIX + PEER_BUCKET + bucket, so parse_metrics() reads both
# controllers' counts in one pass and the "peer-" keys tell them apart.
PEER_BUCKET = "peer-"
# controlplane's LLMTrainingJob buckets, for PyTorchJobs.
JOB_BUCKETS = {
    "ltj-status-patch": ("kubeflow.org", "pytorchjobs/status"),
    "ltj-patch": ("kubeflow.org", "pytorchjobs"),
    "ltj-read": ("kubeflow.org", "*"),
}
IMAGE = "ghcr.io/llmop/trainer:0.1.0"  # spec.workers.image's default: llmop's workers run it too
WEBHOOK_SECRET = "training-operator-webhook-cert"  # its --webhook-secret-name default
# Where its webhook server reads its certificate and its rotator checks for it (fixed in its source;
# in a cluster the rotator's Secret is mounted there). Here a self-signed one is written instead.
WEBHOOK_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")
log = cp.log


# -- the peer's identity ------------------------------------------------------------------------
def peer_flow_schemas() -> list[dict[str, Any]]:
    subject = {
        "kind": "ServiceAccount",
        "serviceAccount": {"name": PEER_SERVICE_ACCOUNT, "namespace": PEER_NAMESPACE},
    }
    out: list[dict[str, Any]] = []
    base = 20 + len(cp.BUCKETS) + 1  # after llmop's; the subjects never overlap anyway
    for i, (bucket, verbs, groups, resources, cluster_scope) in enumerate(cp.BUCKETS):
        if bucket in JOB_BUCKETS:
            group, resource = JOB_BUCKETS[bucket]
            groups, resources = [group], [resource]
        rule: dict[str, Any] = {
            "verbs": verbs,
            "apiGroups": groups,
            "resources": resources,
            "namespaces": ["*"],
        }
        if cluster_scope:
            rule["clusterScope"] = True
        out.append(
            cp._flow_schema(PEER_BUCKET + bucket, base + i, {"subjects": [subject], "resourceRules": [rule]})
        )
    nonres = {"subjects": [subject], "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}]}
    out.append(cp._flow_schema(PEER_BUCKET + cp.NON_RESOURCE_BUCKET, base + len(cp.BUCKETS), nonres))
    return out


def setup_peer_identity(bench: cp.Bench) -> Path:
    """Its ServiceAccount, FlowSchemas and kubeconfig (llmop's, with the peer's token); call after
    bench.setup_operator_identity(). Also the empty Secret its certificate rotator fills."""
    bench.kubectl("create", "namespace", PEER_NAMESPACE, check=False)
    bench.kubectl("-n", PEER_NAMESPACE, "create", "serviceaccount", PEER_SERVICE_ACCOUNT, check=False)
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": PEER_SERVICE_ACCOUNT},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": PEER_SERVICE_ACCOUNT, "namespace": PEER_NAMESPACE}],
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": WEBHOOK_SECRET, "namespace": PEER_NAMESPACE},
    }
    docs = {"apiVersion": "v1", "kind": "List", "items": [binding, secret, *peer_flow_schemas()]}
    bench.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(docs))
    token = bench.kubectl(
        "-n", PEER_NAMESPACE, "create", "token", PEER_SERVICE_ACCOUNT, "--duration=6h"
    ).strip()
    kubeconfig = json.loads(bench.op_kubeconfig.read_text())
    kubeconfig["users"] = [{"name": "operator", "user": {"token": token}}]
    path = bench.work / "training-operator.kubeconfig"
    path.write_text(json.dumps(kubeconfig))
    path.chmod(0o600)
    write_webhook_cert()
    time.sleep(2)  # the apiserver's APF controller picks up new FlowSchemas asynchronously
    return path


def write_webhook_cert() -> None:
    """A self-signed certificate for its webhook server, which will not start without one. No webhook
    configuration names it, so the apiserver never calls it: PyTorchJobs are not validated by it."""
    WEBHOOK_CERT_DIR.mkdir(parents=True, exist_ok=True)
    dns = f"training-operator.{PEER_NAMESPACE}.svc"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={dns}",
         "-addext", f"subjectAltName=DNS:{dns},IP:127.0.0.1",
         "-keyout", str(WEBHOOK_CERT_DIR / "tls.key"), "-out", str(WEBHOOK_CERT_DIR / "tls.crt")],
        check=True, capture_output=True,
    )  # fmt: skip


def split_counts(api: cp.ApiCounts) -> tuple[dict[str, float], dict[str, float]]:
    """(llmop's, the peer's) requests by bucket."""
    ours = {k: v for k, v in api.operator.items() if not k.startswith(PEER_BUCKET)}
    peer = {k.removeprefix(PEER_BUCKET): v for k, v in api.operator.items() if k.startswith(PEER_BUCKET)}
    return ours, peer


# -- the peer process -----------------------------------------------------------------------------
class TrainingOperator(cp.Operator):
    """The training-operator binary in place of llmop's process; the rest (CPU, RSS and thread
    sampling, /metrics, stop) is controlplane's."""

    name = PEER

    def __init__(self, binary: Path, kubeconfig: Path, namespace: str, log_path: Path) -> None:
        super().__init__(kubeconfig, [namespace], log_path, {})
        self.binary = binary
        self.webhook_port = cp.free_port()

    def start(self) -> None:
        args = [
            str(self.binary),
            "--enable-scheme=pytorchjob",
            f"--namespace={self.namespaces[0]}",  # like LLMOP_NAMESPACES: one namespace's jobs
            f"--metrics-bind-address=127.0.0.1:{self.metrics_port}",
            f"--health-probe-bind-address=127.0.0.1:{self.health_port}",
            f"--webhook-server-port={self.webhook_port}",  # on 127.0.0.1 (hack/build-peer.sh)
            "--leader-elect=false",
            # Its default is development mode at debug level; llmop logs at info.
            "--zap-log-level=info",
        ]
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "MY_POD_NAMESPACE": PEER_NAMESPACE,
            "TMPDIR": "/tmp",  # its webhook server looks under TMPDIR, its rotator under /tmp
        }
        seen = self.log_path.stat().st_size if self.log_path.exists() else 0  # an earlier run's lines
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=out, cwd=cp.REPO)
        deadline = time.monotonic() + 90
        # Ready: certificates made, webhook server up; then its PyTorchJob controller's workers started.
        while not (self.healthy() and b"Starting workers" in self.log_path.read_bytes()[seen:]):
            self.alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{PEER} not ready after 90 s; see {self.log_path}")
            time.sleep(0.5)
        self._sampler.start()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{PEER} exited with {self.proc.returncode}; see {self.log_path}")


def pytorchjob(name: str, pods: int, gpus: int, backoff_limit: int | None = None) -> dict[str, Any]:
    """The PyTorchJob equivalent of controlplane.job_manifest(name, pods, gpus): as many pods, the
    same image and GPUs, restartPolicy OnFailure (llmop's runPolicy default)."""

    def replicas(count: int) -> dict[str, Any]:
        gpu = {"nvidia.com/gpu": str(gpus)}
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": {
                # The benchmark's own watches select on these, for both controllers' pods.
                "metadata": {"labels": {"llmop.io/role": "worker", cp.JOB_LABEL: name}},
                "spec": {
                    "containers": [
                        {"name": "pytorch", "image": IMAGE, "resources": {"requests": gpu, "limits": gpu}}
                    ]
                },
            },
        }

    specs = {"Master": replicas(1)}
    if pods > 1:
        specs["Worker"] = replicas(pods - 1)
    spec: dict[str, Any] = {"pytorchReplicaSpecs": specs}
    if backoff_limit is not None:
        spec["runPolicy"] = {"backoffLimit": backoff_limit}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name}, "spec": spec}


# -- scenarios: llmop's is controlplane's run_scenario; the peer's does the same with PyTorchJobs ----
def run_peer_scenario(
    bench: cp.Bench, binary: Path, kubeconfig: Path, title: str, ns: str, jobs: int, nodes: int, gpus: int,
    timeout: float,
) -> cp.ScenarioResult:  # fmt: skip
    bench.fresh_namespace(ns)
    op = TrainingOperator(binary, kubeconfig, ns, bench.work / f"{PEER}-{ns}.log")
    watcher = cp.PodWatcher(bench.core, ns)
    try:

        def post(name: str) -> None:
            bench.custom.create_namespaced_custom_object(
                "kubeflow.org", "v1", ns, "pytorchjobs", pytorchjob(name, nodes, gpus)
            )

        reconciles = "controller_runtime_reconcile_total"
        result = bench.measure(title, ns, op, watcher, jobs, nodes, gpus, post, reconciles, timeout)
    finally:
        bench.kubectl("-n", ns, "delete", "pytorchjobs", "--all", "--wait=false", check=False)
        watcher.close()
        bench.delete_namespace(ns)
        op.stop()
    return result


# -- worker failure: llmop's is recovery.py's trial; the peer's the same failure on a PyTorchJob ----
def llmop_recovery(cluster: ModuleType, args: argparse.Namespace) -> list[rc.Trial]:
    rargs = argparse.Namespace(
        workers=args.recovery_workers, trials=args.trials, timeout=args.recovery_timeout, nodes=args.nodes
    )
    rb = rc.Bench(rargs, cluster)
    rb.fresh_namespace()
    operator = rc.Operator(rb.kubeconfig, Path(args.workdir) / "operator-recovery.log")
    pods = rc.Pods(rb.core, rc.NAMESPACE)
    trials: list[rc.Trial] = []
    try:
        log(
            f"llmop worker failure: {args.trials} trials, {args.recovery_workers} workers (namespace {rc.NAMESPACE})"
        )
        operator.start()
        pods.start()
        rb.create_job()
        for number in range(1, args.trials + 1):
            rb.settle(pods)
            trials.append(rb.worker_failure(pods, number))
            print_trial("llmop", trials[-1])
    finally:
        pods.close()
        rb.kubectl(
            "delete",
            "llmtrainingjob",
            rc.JOB,
            "-n",
            rc.NAMESPACE,
            "--wait=true",
            "--timeout=60s",
            check=False,
        )
        operator.stop()
        rb.kubectl("delete", "namespace", rc.NAMESPACE, "--wait=false", check=False)
    return trials


Check = Callable[[dict[str, rc.PodState]], bool]


def pod_failed(name: str) -> Check:
    return lambda ps: name not in ps or ps[name].phase == "Failed"


def pod_replaced(name: str) -> Check:
    """The failed pod is gone: deleted, or already recreated under its name."""
    return lambda ps: name not in ps or not (ps[name].phase == "Failed" or ps[name].deleting)


def all_created(count: int) -> Check:
    return lambda ps: len(ps) == count and all(p.phase != "Failed" and not p.deleting for p in ps.values())


def all_pods_running(count: int) -> Check:
    return lambda ps: len(ps) == count and all(p.phase == "Running" and not p.deleting for p in ps.values())


def peer_recovery(
    bench: cp.Bench, binary: Path, kubeconfig: Path, args: argparse.Namespace
) -> list[rc.Trial]:
    ns, workers, timeout = "llmop-peer-recovery", args.recovery_workers, args.recovery_timeout
    bench.fresh_namespace(ns)
    op = TrainingOperator(binary, kubeconfig, ns, bench.work / f"{PEER}-{ns}.log")
    pods = rc.Pods(bench.core, ns)  # selects llmop.io/job-name=recover: the PyTorchJob's name
    all_running = all_pods_running(workers)
    trials: list[rc.Trial] = []
    try:
        log(f"{PEER} worker failure: {args.trials} trials, {workers} pods (namespace {ns})")
        op.start()
        pods.start()
        manifest = pytorchjob(rc.JOB, workers, 8, backoff_limit=4 * args.trials + 10)
        bench.custom.create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", manifest)
        for number in range(1, args.trials + 1):
            pods.wait("all pods Running", all_running, timeout)
            with pods.changed:
                name = sorted(pods.pods)[(number - 1) % workers]  # a different pod each trial
            # The same scripted exit as recovery.Bench.worker_failure.
            bench.kubectl(
                "annotate", "pod", name, "-n", ns, "llmop.io/kwok-exit-after=0s", "llmop.io/kwok-exit-code=1"
            )
            failed_at = pods.wait(f"{name} Failed", pod_failed(name), timeout)
            gone_at = pods.wait("failed pod gone", pod_replaced(name), timeout)
            created_at = pods.wait("pod recreated", all_created(workers), timeout)
            running_at = pods.wait("all pods Running again", all_running, timeout)
            t = rc.Trial(
                "worker-failure", number, gone_at - failed_at, created_at - failed_at, running_at - failed_at
            )
            trials.append(t)
            print_trial(PEER, t)
    finally:
        pods.close()
        bench.kubectl("-n", ns, "delete", "pytorchjobs", "--all", "--wait=false", check=False)
        bench.delete_namespace(ns)
        op.stop()
    return trials


def print_trial(side: str, t: rc.Trial) -> None:
    print(
        f"{side:>17} worker-failure trial {t.number:2}: failed pod(s) gone {t.old_gone:6.2f} s, "
        f"all pods created {t.created:6.2f} s, all Running {t.running:6.2f} s",
        flush=True,
    )


# -- report ---------------------------------------------------------------------------------------
def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def row(label: str, a: float | None, b: float | None, digits: int = 2) -> None:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    print(f"  {label:<40}{f(a):>12}{f(b):>20}{ratio(a, b):>10}")


def header(title: str) -> None:
    print()
    print(f"== {title} ==")
    print(f"  {'figure':<40}{'llmop':>12}{PEER:>20}{'ratio':>10}")


def scenario_rows(ours: cp.ScenarioResult, peer: cp.ScenarioResult) -> None:
    milestones: list[tuple[str, Callable[[cp.JobTimes], float | None]]] = [
        ("all pods created", lambda t: t.created),
        ("all pods Running", lambda t: t.running),
    ]
    for label, get in milestones:
        a = [v for v in (get(t) for t in ours.times) if v is not None]
        b = [v for v in (get(t) for t in peer.times) if v is not None]
        stats = [("p50", 0.5), ("p95", 0.95)] if ours.jobs > 1 else [("", 0.5)]
        for name, q in stats:
            row(
                f"{label} {name} s".replace("  ", " "),
                cp.pct(a, q) if a else None,
                cp.pct(b, q) if b else None,
            )
        if ours.jobs > 1:
            row(f"{label} max s", max(a, default=None), max(b, default=None))
        row(f"jobs with {label.removeprefix('all ')}", len(a), len(b), 0)
    a_api, b_api = sum(split_counts(ours.api)[0].values()), sum(split_counts(peer.api)[1].values())
    row("API requests, total", a_api, b_api, 0)
    row("API requests per job", a_api / ours.jobs, b_api / peer.jobs, 1)
    row(
        "API requests per pod",
        a_api / (ours.jobs * ours.nodes_per_job),
        b_api / (peer.jobs * peer.nodes_per_job),
    )
    row("controller CPU s (window + settle)", ours.cpu_seconds, peer.cpu_seconds)
    row("controller RSS idle MB", ours.rss_idle_mb, peer.rss_idle_mb, 0)
    row("controller peak RSS MB (VmHWM)", ours.rss_peak_mb, peer.rss_peak_mb, 0)
    row("controller max threads", ours.max_threads, peer.max_threads, 0)
    row("reconcile passes", ours.reconciles, peer.reconciles, 0)
    row("window s (POST to last pod Running)", ours.wall, peer.wall, 1)
    a_b, b_b = split_counts(ours.api)[0], split_counts(peer.api)[1]
    print("  API requests by bucket (ltj-* = LLMTrainingJob / PyTorchJob):")
    for bucket in sorted(set(a_b) | set(b_b), key=lambda k: -(a_b.get(k, 0) + b_b.get(k, 0))):
        if a_b.get(bucket, 0) >= 0.5 or b_b.get(bucket, 0) >= 0.5:
            row(f"  {bucket}", a_b.get(bucket, 0), b_b.get(bucket, 0), 0)
    for side, r in (("llmop", ours), (PEER, peer)):
        for note in r.notes:
            print(f"  NOTE ({side}): {note}")


def recovery_rows(ours: list[rc.Trial], peer: list[rc.Trial]) -> None:
    figures: list[tuple[str, Callable[[rc.Trial], float]]] = [
        ("failed pod(s) gone", lambda t: t.old_gone),
        ("all pods created again", lambda t: t.created),
        ("all pods Running again", lambda t: t.running),
    ]
    for label, get in figures:
        a, b = [get(t) for t in ours], [get(t) for t in peer]
        row(f"{label} p50 s", rc.percentile(a, 50) if a else None, rc.percentile(b, 50) if b else None)
        row(f"{label} max s", max(a, default=None), max(b, default=None))


def median_run(runs: list[cp.ScenarioResult]) -> cp.ScenarioResult:
    """The run with the median time to all pods Running (the lower middle one of an even count)."""

    def key(r: cp.ScenarioResult) -> float:
        t = big_running(r)
        return math.inf if t is None else t

    ordered = sorted(runs, key=key)
    return ordered[(len(ordered) - 1) // 2]


def big_running(r: cp.ScenarioResult | None) -> float | None:
    return r.times[0].running if r else None


def print_report(
    args: argparse.Namespace,
    results: dict[str, dict[str, cp.ScenarioResult]],
    trials: dict[str, list[rc.Trial]],
    big_runs: dict[str, list[cp.ScenarioResult]],
) -> None:
    print()
    print(
        f"llmop vs Kubeflow Training Operator {peer_version()} (PyTorchJob): kwok cluster '{CLUSTER_NAME}', "
        f"{args.nodes} fake nodes x 8 GPUs, {os.cpu_count()} CPUs; each controller alone, one after the other"
    )
    print("Times: seconds from the POST of the job until ALL its pods were seen created / Running on our own")
    print("pod watch; ratio = llmop / training-operator (below 1: llmop is faster, leaner, or asks less).")
    for key, title in (("big", f"1 job x {args.big_nodes} pods, 8 GPUs each"),
                       ("many", f"{args.jobs} concurrent jobs x {args.job_nodes} pods, {args.small_gpus} GPU(s) each")):  # fmt: skip
        if "llmop" in results.get(key, {}) and PEER in results.get(key, {}):
            header(title + (f": each side's median of {args.big_repeats} runs" if key == "big" else ""))
            scenario_rows(results[key]["llmop"], results[key][PEER])
            if key == "big":
                for side, runs in big_runs.items():
                    each = ", ".join(cp.fmt(big_running(r)) for r in runs)
                    print(f"  all pods Running, each run, s: {side:<17} {each}")
    if trials.get("llmop") and trials.get(PEER):
        header(
            f"worker failure (exit 1) to all pods Running again: {args.trials} trials, "
            f"{args.recovery_workers} pods x 8 GPUs"
        )
        recovery_rows(trials["llmop"], trials[PEER])
        print("  (llmop restarts the whole gang; training-operator recreates only the failed pod)")
    print()
    ours, peer = (
        big_running(results.get("big", {}).get("llmop")),
        big_running(results.get("big", {}).get(PEER)),
    )
    print(
        f"{args.big_nodes}-pod job, all pods Running: llmop {cp.fmt(ours)} s, {PEER} {cp.fmt(peer)} s (goal: ratio <= 0.5)"
    )
    print(f"time to all pods Running vs training-operator: {ratio(ours, peer)}")


# -- main -----------------------------------------------------------------------------------------
def peer_version() -> str:
    for line in (cp.REPO / "hack" / "peer-versions.env").read_text().splitlines():
        if line.startswith("TRAINING_OPERATOR_VERSION="):
            return line.split("=", 1)[1].strip()
    raise RuntimeError("TRAINING_OPERATOR_VERSION missing from hack/peer-versions.env")


def build_peer() -> Path:
    out = subprocess.run(
        [str(cp.REPO / "hack" / "build-peer.sh")], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def wait_established(bench: cp.Bench, crd: str, timeout: float = 60) -> None:
    # `kubectl wait` fails outright while a fresh CRD has no conditions yet.
    deadline = time.monotonic() + timeout
    path = '{.status.conditions[?(@.type=="Established")].status}'
    while bench.kubectl("get", "crd", crd, "-o", f"jsonpath={path}", check=False).strip() != "True":
        if time.monotonic() > deadline:
            raise TimeoutError(f"CRD {crd} not Established after {timeout:.0f} s")
        time.sleep(0.5)


def reuse_built_binaries(cluster: ModuleType) -> None:
    """cluster.ensure_binaries() runs all of hack/build-cluster-bins.sh, the tests' extra tools
    (SeaweedFS, Kueue) included; when the control plane's binaries are built, use them as they are."""
    bin_dir = Path(cluster.cache_dir()) / "bin"
    needed = (
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubectl",
        "kwok",
        "kwokctl",
    )
    if all((bin_dir / name).exists() for name in needed):
        setattr(cluster, "ensure_binaries", lambda: bin_dir)  # noqa: B010 (a module attribute, on purpose)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=256, help="fake 8-GPU nodes to register")
    parser.add_argument("--big-nodes", type=int, default=128, help="pods (nodes) of the single big job")
    parser.add_argument(
        "--big-repeats", type=int, default=3, help="runs of the big job per side, interleaved"
    )
    parser.add_argument("--jobs", type=int, default=200, help="concurrent small jobs")
    parser.add_argument("--job-nodes", type=int, default=8, help="pods (nodes) of each small job")
    parser.add_argument(
        "--small-gpus", type=int, default=1, help="GPUs per pod of the small jobs (as controlplane.py)"
    )
    parser.add_argument("--trials", type=int, default=10, help="worker failures per controller")
    parser.add_argument(
        "--recovery-workers", type=int, default=4, help="pods of the failure job (8 GPUs each)"
    )
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--skip-many", action="store_true")
    parser.add_argument("--skip-recovery", action="store_true")
    parser.add_argument("--big-timeout", type=float, default=300)
    parser.add_argument("--many-timeout", type=float, default=900)
    parser.add_argument("--recovery-timeout", type=float, default=120)
    parser.add_argument("--settle", type=float, default=5, help="seconds counted after the last pod Runs")
    parser.add_argument("--workdir", default="/tmp/llmop-peer", help="controller logs and kubeconfigs")
    parser.add_argument("--keep", action="store_true", help="keep the llmop-peer cluster afterwards")
    args = parser.parse_args(argv)
    # What controlplane.Bench and its run_scenario read (llmop's resync/progress: controlplane's defaults).
    args.resync_seconds, args.progress_interval, args.profile = 30.0, 10.0, False

    os.environ["LLMOP_CLUSTER_NAME"] = CLUSTER_NAME  # before the import: the module reads it then
    cluster = importlib.import_module("llmop_dev.cluster")
    if cluster.CLUSTER_NAME != CLUSTER_NAME:
        raise RuntimeError(f"llmop_dev.cluster was imported earlier with cluster {cluster.CLUSTER_NAME}")
    reuse_built_binaries(cluster)
    log(f"building (or reusing) {PEER} {peer_version()}")
    dist = build_peer()
    binary, crds = dist / PEER, dist / "training-operator-crds" / "kubeflow.org_pytorchjobs.yaml"
    results: dict[str, dict[str, cp.ScenarioResult]] = {"big": {}, "many": {}}
    trials: dict[str, list[rc.Trial]] = {}
    big_runs: dict[str, list[cp.ScenarioResult]] = {"llmop": [], PEER: []}
    try:
        log(f"bringing up cluster {CLUSTER_NAME} with {args.nodes} fake GPU nodes")
        cluster.up(node_count=args.nodes)
        bench = cp.Bench(args, cluster)
        bench.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds))
        wait_established(bench, "pytorchjobs.kubeflow.org")
        bench.wait_nodes_ready(args.nodes)
        bench.setup_operator_identity()
        peer_kubeconfig = setup_peer_identity(bench)

        def run(
            side: str, title: str, ns: str, jobs: int, nodes: int, gpus: int, timeout: float
        ) -> cp.ScenarioResult:
            if side == "llmop":
                return bench.run_scenario(title, f"llmop-peer-{ns}", jobs, nodes, gpus, timeout)
            return run_peer_scenario(
                bench, binary, peer_kubeconfig, title, f"llmop-peer-{ns}-to", jobs, nodes, gpus, timeout
            )

        if not args.skip_big:
            for i in range(args.big_repeats):  # alternating which side goes first
                for side in ("llmop", PEER) if i % 2 == 0 else (PEER, "llmop"):
                    title = f"{args.big_nodes}-pod job ({i + 1}/{args.big_repeats})"
                    big_runs[side].append(run(side, title, "big", 1, args.big_nodes, 8, args.big_timeout))
            results["big"] = {side: median_run(runs) for side, runs in big_runs.items()}
        if not args.skip_many:
            title = f"{args.jobs} concurrent {args.job_nodes}-pod jobs"
            for side in ("llmop", PEER):
                results["many"][side] = run(
                    side, title, "many", args.jobs, args.job_nodes, args.small_gpus, args.many_timeout
                )
        if not args.skip_recovery:
            trials["llmop"] = llmop_recovery(cluster, args)
            trials[PEER] = peer_recovery(bench, binary, peer_kubeconfig, args)
    finally:
        if not args.keep:
            log(f"deleting cluster {CLUSTER_NAME}")
            cluster.down()
    # After the clean-up, whose kwokctl lines would otherwise follow it: the figure is the last line.
    print_report(args, results, trials, big_runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
