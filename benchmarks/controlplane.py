"""Control-plane benchmark: how fast the operator turns LLMTrainingJobs into running gangs.

Runs on its own local kwok cluster (``LLMOP_CLUSTER_NAME=llmop-bench``, deleted at the end unless
``--keep``) with ``--nodes`` fake 8-GPU nodes, and a fresh operator subprocess per scenario:

1. one 128-node job (gpusPerNode 8): time from our POST of the job to all 128 worker pods created,
   ungated, bound and Running;
2. ``--jobs`` concurrent 8-node jobs (created from a thread pool): the same times per job, p50/p95.

Times come from our own watch on the pods (receive time of the first event showing the pod, its
gate lifted, its nodeName set, its phase Running), not from creationTimestamp (1 s resolution).

API requests are counted exactly for the operator alone: the operator runs as its own ServiceAccount,
and one FlowSchema per (resource, verb) bucket matches that ServiceAccount (routed to the ``exempt``
priority level, so nothing is throttled); ``apiserver_flowcontrol_dispatched_requests_total`` per
flow schema, before and after, gives the operator's requests by bucket. Operator CPU seconds come from
/proc/<pid>/stat (utime+stime), peak RSS from VmHWM in /proc/<pid>/status.

    python benchmarks/controlplane.py [--nodes 256] [--jobs 200] [--keep]

The last two lines compare with the goals; nothing here asserts on timings. Exits non-zero only on
errors (cluster, operator or API failures), never because a goal was missed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CLUSTER_NAME = "llmop-bench"
OP_NAMESPACE = "llmop-bench-system"
OP_SERVICE_ACCOUNT = "llmop-bench-operator"
FS_PREFIX = "llmop-bench-"
JOB_LABEL = "llmop.io/job-name"
WORKER_SELECTOR = "llmop.io/role=worker"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- API request accounting ---------------------------------------------------------------------
# (bucket, verbs, apiGroups, resources, clusterScope). First match wins (matchingPrecedence order).
BUCKETS: list[tuple[str, list[str], list[str], list[str], bool]] = [
    ("pods-create", ["create"], [""], ["pods"], False),
    ("pods-get", ["get"], [""], ["pods"], False),
    ("pods-patch", ["patch", "update"], [""], ["pods"], False),
    ("pods-delete", ["delete", "deletecollection"], [""], ["pods"], False),
    ("pods-list-watch", ["list", "watch"], [""], ["pods"], True),
    ("ltj-status-patch", ["patch", "update"], ["llmop.io"], ["llmtrainingjobs/status"], False),
    ("ltj-patch", ["patch", "update"], ["llmop.io"], ["llmtrainingjobs"], False),
    ("ltj-read", ["get", "list", "watch"], ["llmop.io"], ["*"], True),
    ("services", ["*"], [""], ["services"], False),
    ("configmaps", ["*"], [""], ["configmaps"], False),
    ("serviceaccounts", ["*"], [""], ["serviceaccounts"], False),
    ("pvcs", ["*"], [""], ["persistentvolumeclaims"], False),
    ("events", ["*"], ["", "events.k8s.io"], ["events"], False),
    ("batch-jobs", ["*"], ["batch"], ["jobs"], True),
    ("nodes", ["*"], [""], ["nodes"], True),
    ("other-resources", ["*"], ["*"], ["*"], True),
]
NON_RESOURCE_BUCKET = "non-resource"  # discovery (/api, /apis, /version, ...)


def flow_schemas() -> list[dict[str, Any]]:
    subject = {
        "kind": "ServiceAccount",
        "serviceAccount": {"name": OP_SERVICE_ACCOUNT, "namespace": OP_NAMESPACE},
    }
    out: list[dict[str, Any]] = []
    for i, (bucket, verbs, groups, resources, cluster_scope) in enumerate(BUCKETS):
        rule: dict[str, Any] = {
            "verbs": verbs,
            "apiGroups": groups,
            "resources": resources,
            "namespaces": ["*"],
        }
        if cluster_scope:
            rule["clusterScope"] = True
        out.append(_flow_schema(bucket, 20 + i, {"subjects": [subject], "resourceRules": [rule]}))
    nonres = {"subjects": [subject], "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}]}
    out.append(_flow_schema(NON_RESOURCE_BUCKET, 20 + len(BUCKETS), nonres))
    return out


def _flow_schema(bucket: str, precedence: int, rule: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
        "kind": "FlowSchema",
        "metadata": {"name": FS_PREFIX + bucket},
        "spec": {
            "matchingPrecedence": precedence,
            # The mandatory exempt level: requests are counted per flow schema but never queued.
            "priorityLevelConfiguration": {"name": "exempt"},
            "rules": [rule],
        },
    }


@dataclass
class ApiCounts:
    operator: dict[str, float]  # our FlowSchema buckets: the operator's requests only
    everyone: dict[tuple[str, str], float]  # apiserver_request_total by (resource[/sub], verb)

    def minus(self, before: ApiCounts) -> ApiCounts:
        return ApiCounts(
            {k: v - before.operator.get(k, 0.0) for k, v in self.operator.items()},
            {k: v - before.everyone.get(k, 0.0) for k, v in self.everyone.items()},
        )


def parse_metrics(text: str) -> ApiCounts:
    from prometheus_client.parser import text_string_to_metric_families

    operator: dict[str, float] = defaultdict(float)
    everyone: dict[tuple[str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        if family.name == "apiserver_flowcontrol_dispatched_requests":
            for s in family.samples:
                fs = s.labels.get("flow_schema", "")
                if s.name.endswith("_total") and fs.startswith(FS_PREFIX):
                    operator[fs.removeprefix(FS_PREFIX)] += s.value
        elif family.name == "apiserver_request":
            for s in family.samples:
                if not s.name.endswith("_total"):
                    continue
                res = s.labels.get("resource", "")
                if s.labels.get("subresource"):
                    res += "/" + s.labels["subresource"]
                everyone[(res or "(non-resource)", s.labels.get("verb", ""))] += s.value
    return ApiCounts(dict(operator), dict(everyone))


# -- watching pods ------------------------------------------------------------------------------
@dataclass
class PodTimes:
    job: str
    created: float
    ungated: float | None = None
    bound: float | None = None
    running: float | None = None


class PodWatcher:
    """Receive times (time.monotonic) of each worker pod's milestones in one namespace."""

    def __init__(self, core: Any, namespace: str) -> None:
        self.core, self.namespace = core, namespace
        self.pods: dict[str, PodTimes] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.events = 0
        self.thread = threading.Thread(target=self._run, name=f"watch-{namespace}", daemon=True)
        self.ready = threading.Event()

    def start(self) -> None:
        self.thread.start()
        if not self.ready.wait(30):
            raise TimeoutError(f"pod watch in {self.namespace} did not start")

    def _note(self, pod: dict[str, Any], now: float) -> None:
        meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
        name = meta.get("name", "")
        with self.lock:
            t = self.pods.get(name)
            if t is None:
                t = self.pods[name] = PodTimes(job=(meta.get("labels") or {}).get(JOB_LABEL, ""), created=now)
            if t.ungated is None and not spec.get("schedulingGates"):
                t.ungated = now
            if t.bound is None and spec.get("nodeName"):
                t.bound = now
            if t.running is None and status.get("phase") == "Running":
                t.running = now

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException
        from kubernetes.watch.watch import iter_resp_lines

        try:
            rv = ""
            while not self.stop.is_set():
                if not rv:
                    listed = self.core.list_namespaced_pod(
                        self.namespace, label_selector=WORKER_SELECTOR, _preload_content=False
                    )
                    body = json.loads(listed.data)
                    now = time.monotonic()
                    for item in body.get("items", []):
                        self._note(item, now)
                    rv = body["metadata"]["resourceVersion"]
                    self.ready.set()
                try:
                    resp = self.core.list_namespaced_pod(
                        self.namespace,
                        label_selector=WORKER_SELECTOR,
                        watch=True,
                        resource_version=rv,
                        allow_watch_bookmarks=True,
                        timeout_seconds=20,
                        _preload_content=False,
                        _request_timeout=30,
                    )
                except ApiException as e:
                    if e.status == 410:
                        rv = ""
                        continue
                    raise
                try:
                    for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                        now = time.monotonic()
                        event = json.loads(line)
                        obj = event.get("object", {})
                        if event.get("type") == "ERROR":
                            rv = ""  # 410 Gone and friends: relist
                            break
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if event.get("type") in ("ADDED", "MODIFIED"):
                            self.events += 1
                            self._note(obj, now)
                        if self.stop.is_set():
                            break
                finally:
                    resp.release_conn()
        except BaseException as e:  # surfaced by the waiting side
            self.error = e
            self.ready.set()

    def snapshot(self) -> dict[str, PodTimes]:
        with self.lock:
            return {
                k: PodTimes(v.job, v.created, v.ungated, v.bound, v.running) for k, v in self.pods.items()
            }

    def close(self) -> None:
        self.stop.set()
        self.thread.join(35)


@dataclass
class JobTimes:
    """Seconds from our POST of the job to the moment all of its pods reached each milestone."""

    created: float | None
    ungated: float | None
    bound: float | None
    running: float | None


def job_times(pods: Iterable[PodTimes], posted: float, count: int) -> JobTimes:
    pods = list(pods)

    def all_at(get: Callable[[PodTimes], float | None]) -> float | None:
        values = [get(p) for p in pods]
        if len(values) < count or any(v is None for v in values):
            return None
        return max(v for v in values if v is not None) - posted

    return JobTimes(
        all_at(lambda p: p.created),
        all_at(lambda p: p.ungated),
        all_at(lambda p: p.bound),
        all_at(lambda p: p.running),
    )


# -- the operator process -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15)


def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])  # kB, or a count for Threads
    return out


class Operator:
    name = "the operator"  # in progress lines

    def __init__(
        self,
        kubeconfig: Path,
        namespaces: list[str],
        log_path: Path,
        env: dict[str, str],
        profile: Path | None = None,
    ) -> None:
        self.kubeconfig, self.namespaces, self.log_path = kubeconfig, namespaces, log_path
        self.profile = profile
        self.extra_env = env
        self.metrics_port, self.health_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.max_threads = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "LLMOP_NAMESPACES": ",".join(self.namespaces),
            "LLMOP_BIND_ADDRESS": "127.0.0.1",
            "LLMOP_METRICS_PORT": str(self.metrics_port),
            "LLMOP_HEALTH_PORT": str(self.health_port),
            **self.extra_env,
        }
        # cProfile sees the main thread only: the event loop, where reconcile passes run.
        profiler = ["-m", "cProfile", "-o", str(self.profile)] if self.profile else []
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, *profiler, "-m", "llmop.cli", "operator"],
                env=env,
                stdout=out,
                stderr=out,
                cwd=REPO,
            )
        deadline = time.monotonic() + 90
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"operator not healthy after 90 s; see {self.log_path}")
            time.sleep(0.5)
        self._sampler.start()

    def healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.health_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.max_threads = max(self.max_threads, proc_status(self.pid).get("Threads", 0))
            except OSError:
                return

    def alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}; see {self.log_path}")

    def metric_sum(self, name: str) -> float:
        """Sum of one metric's samples from the operator's own /metrics (e.g. reconcile count)."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

    def stop(self) -> None:
        self._stop.set()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# -- scenarios ----------------------------------------------------------------------------------
def job_manifest(name: str, nodes: int, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "llmop.io/v1alpha1",
        "kind": "LLMTrainingJob",
        "metadata": {"name": name},
        "spec": {
            "data": {"prepare": False},
            # A multiple of 1024 and of microBatchSize x numNodes x procsPerNode, as the API requires.
            "training": {
                "maxSteps": 100,
                "globalBatchSize": math.lcm(1024, nodes * gpus),
                "microBatchSize": 1,
            },
            "workers": {"numNodes": nodes, "gpusPerNode": gpus, "procsPerNode": gpus},
        },
    }


@dataclass
class ScenarioResult:
    title: str
    jobs: int
    nodes_per_job: int
    times: list[JobTimes]
    api: ApiCounts
    cpu_seconds: float
    cpu_total: float
    rss_idle_mb: float
    rss_peak_mb: float
    max_threads: int
    reconciles: float
    wall: float
    watch_events: int
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace, cluster: ModuleType) -> None:
        self.args, self.cluster = args, cluster
        self.bin_dir: Path = cluster.ensure_binaries()
        self.kubeconfig: Path = cluster.kubeconfig_path()
        self.work = Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)  # type: ignore[no-untyped-call]
        cfg.connection_pool_maxsize = 64
        self.api = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.op_kubeconfig = self.work / "operator.kubeconfig"

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        out: str = self.cluster.kubectl(self.bin_dir, self.kubeconfig, *args, input=input, check=check)
        return out

    def api_counts(self) -> ApiCounts:
        return parse_metrics(self.kubectl("get", "--raw", "/metrics"))

    # The operator's own identity, so FlowSchemas can single its requests out.
    def wait_nodes_ready(self, count: int, timeout: float = 300) -> None:
        """Measure gangs, not fresh nodes coming up: a gang waits for schedulable nodes by design.

        New nodes carry the node-lifecycle controller's not-ready NoSchedule taint until its next
        pass (kwokctl runs it every 25 s), even after they report Ready.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = json.loads(self.kubectl("get", "nodes", "-o", "json"))["items"]
            ready = sum(
                any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
                and not any(t.get("effect") == "NoSchedule" for t in n["spec"].get("taints", []))
                for n in nodes
            )
            if ready >= count:
                log(f"{ready} nodes Ready and untainted")
                return
            time.sleep(2)
        raise TimeoutError(f"fewer than {count} nodes became Ready")

    def setup_operator_identity(self) -> None:
        self.kubectl("create", "namespace", OP_NAMESPACE, check=False)
        self.kubectl("-n", OP_NAMESPACE, "create", "serviceaccount", OP_SERVICE_ACCOUNT, check=False)
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": OP_SERVICE_ACCOUNT},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "cluster-admin",
            },
            "subjects": [{"kind": "ServiceAccount", "name": OP_SERVICE_ACCOUNT, "namespace": OP_NAMESPACE}],
        }
        docs = {"apiVersion": "v1", "kind": "List", "items": [binding, *flow_schemas()]}
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(docs))
        token = self.kubectl(
            "-n", OP_NAMESPACE, "create", "token", OP_SERVICE_ACCOUNT, "--duration=6h"
        ).strip()
        admin = json.loads(self.kubectl("config", "view", "--raw", "--minify", "-o", "json"))
        cluster_entry = admin["clusters"][0]["cluster"]
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "bench", "cluster": cluster_entry}],
            "users": [{"name": "operator", "user": {"token": token}}],
            "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "operator"}}],
            "current-context": "bench",
        }
        self.op_kubeconfig.write_text(json.dumps(kubeconfig))
        self.op_kubeconfig.chmod(0o600)
        time.sleep(2)  # the apiserver's APF controller picks up new FlowSchemas asynchronously

    def fresh_namespace(self, ns: str) -> None:
        self.delete_namespace(ns)
        self.kubectl("create", "namespace", ns)
        deadline = time.monotonic() + 60  # the default ServiceAccount arrives from the controller-manager
        while not self.kubectl("-n", ns, "get", "serviceaccount", "default", "-o", "name", check=False):
            if time.monotonic() > deadline:
                raise TimeoutError(f"namespace {ns}: no default ServiceAccount after 60 s")
            time.sleep(0.5)

    def delete_namespace(self, ns: str, timeout: float = 240) -> None:
        if not self.kubectl("get", "namespace", ns, "-o", "name", check=False):
            return
        self.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        if self.wait_namespace_gone(ns, timeout):
            return
        # A finalizer nobody serves any more could hold the jobs: drop it, then give up waiting.
        for job in self.kubectl("-n", ns, "get", "llmtrainingjobs", "-o", "name", check=False).split():
            patch = '{"metadata":{"finalizers":[]}}'
            self.kubectl("-n", ns, "patch", job, "--type=merge", "-p", patch, check=False)
        if not self.wait_namespace_gone(ns, 60):
            log(f"namespace {ns} still terminating after {timeout + 60:.0f} s; going on")

    def delete_pods(self, ns: str) -> None:
        """All pods of the namespace in one deletecollection, without grace (nothing runs them): the
        namespace controller alone takes minutes over 1600 of them at its own request rate."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_collection_namespaced_pod(ns, grace_period_seconds=0)
        except ApiException as e:
            log(f"deleting the pods of {ns}: {e.status} {e.reason}; the namespace deletion takes them")

    def wait_namespace_gone(self, ns: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.kubectl("get", "namespace", ns, "-o", "name", check=False):
            if time.monotonic() > deadline:
                return False
            time.sleep(1)
        return True

    def measure(
        self,
        title: str,
        ns: str,
        op: Operator,
        watcher: PodWatcher,
        jobs: int,
        nodes: int,
        gpus: int,
        post: Callable[[str], None],
        reconcile_metric: str,
        timeout: float,
    ) -> ScenarioResult:
        """Start ``op``, POST ``jobs`` jobs with ``post`` (one per name) and wait until their
        ``jobs * nodes`` pods are Running: the figures of one scenario, for any controller."""
        watcher.start()
        log(f"{title}: starting {op.name} (namespace {ns})")
        op.start()
        time.sleep(3)  # let its initial lists and watches settle out of the measured window
        rss_idle = proc_status(op.pid)["VmRSS"] / 1024
        api_before, cpu_before = self.api_counts(), proc_cpu_seconds(op.pid)
        reconciles_before = op.metric_sum(reconcile_metric)
        names = [f"b{nodes}-{i:03d}" if jobs > 1 else f"big-{nodes}" for i in range(jobs)]
        posted: dict[str, float] = {}

        def timed_post(name: str) -> None:
            t = time.monotonic()
            post(name)
            posted[name] = t

        log(f"{title}: creating {jobs} job(s) of {nodes} nodes x {gpus} GPUs")
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=min(16, jobs)) as pool:
            list(pool.map(timed_post, names))
        log(f"{title}: {jobs} job(s) created in {time.monotonic() - started:.2f} s; waiting for Running")
        notes: list[str] = []
        deadline = started + timeout
        last_report = 0.0
        while True:
            if watcher.error:
                raise RuntimeError(f"pod watch failed: {watcher.error!r}")
            op.alive()
            pods = watcher.snapshot()
            running = sum(1 for p in pods.values() if p.running is not None)
            if running >= jobs * nodes:
                break
            now = time.monotonic()
            if now > deadline:
                notes.append(f"timed out after {timeout:.0f} s with {running}/{jobs * nodes} pods Running")
                log(notes[-1])
                break
            if now - last_report > 15:
                last_report = now
                created = len(pods)
                ungated = sum(1 for p in pods.values() if p.ungated is not None)
                rss = proc_status(op.pid)
                log(
                    f"  {now - started:6.1f} s: pods created {created}, ungated {ungated}, Running {running};"
                    f" operator RSS {rss['VmRSS'] / 1024:.0f} MB (peak {rss['VmHWM'] / 1024:.0f})"
                )
            time.sleep(0.2)
        wall = time.monotonic() - started
        time.sleep(self.args.settle)  # trailing status writes belong to this scenario's request count
        api_delta = self.api_counts().minus(api_before)
        cpu = proc_cpu_seconds(op.pid) - cpu_before
        cpu_total = proc_cpu_seconds(op.pid)
        status = proc_status(op.pid)
        reconciles = op.metric_sum(reconcile_metric) - reconciles_before
        pods = watcher.snapshot()
        by_job: dict[str, list[PodTimes]] = defaultdict(list)
        for p in pods.values():
            by_job[p.job].append(p)
        times = [job_times(by_job.get(n, []), posted[n], nodes) for n in names]
        result = ScenarioResult(
            title=title,
            jobs=jobs,
            nodes_per_job=nodes,
            times=times,
            api=api_delta,
            cpu_seconds=cpu,
            cpu_total=cpu_total,
            rss_idle_mb=rss_idle,
            rss_peak_mb=status["VmHWM"] / 1024,
            max_threads=op.max_threads,
            reconciles=reconciles,
            wall=wall,
            watch_events=watcher.events,
            notes=notes,
        )
        log(f"{title}: done in {wall:.1f} s; deleting jobs and namespace {ns}")
        return result

    def run_scenario(
        self, title: str, ns: str, jobs: int, nodes: int, gpus: int, timeout: float
    ) -> ScenarioResult:
        self.fresh_namespace(ns)
        env = {
            "LLMOP_PROGRESS_INTERVAL": str(self.args.progress_interval),
            "LLMOP_RESYNC_SECONDS": str(self.args.resync_seconds),
        }
        profile = self.work / f"operator-{ns}.prof" if self.args.profile else None
        op = Operator(self.op_kubeconfig, [ns], self.work / f"operator-{ns}.log", env, profile)
        watcher = PodWatcher(self.core, ns)
        try:

            def post(name: str) -> None:
                self.custom.create_namespaced_custom_object(
                    "llmop.io", "v1alpha1", ns, "llmtrainingjobs", job_manifest(name, nodes, gpus)
                )

            reconciles = "llmop_reconcile_duration_seconds_count"
            result = self.measure(title, ns, op, watcher, jobs, nodes, gpus, post, reconciles, timeout)
        finally:
            # Delete while the operator still runs, so anything it holds (finalizers) is released.
            self.kubectl("-n", ns, "delete", "llmtrainingjobs", "--all", "--wait=false", check=False)
            self.delete_pods(ns)
            watcher.close()
            self.delete_namespace(ns)
            op.stop()
        if profile and profile.exists():
            import pstats

            log(f"operator event-loop profile ({profile}), top functions by own time:")
            pstats.Stats(str(profile), stream=sys.stderr).sort_stats("tottime").print_stats(15)
        return result


# -- report -------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_report(results: list[ScenarioResult], args: argparse.Namespace) -> None:
    print()
    print(
        f"llmop control-plane benchmark: kwok cluster '{CLUSTER_NAME}', {args.nodes} fake nodes x 8 GPUs, "
        f"{os.cpu_count()} CPUs; LLMOP_RESYNC_SECONDS={args.resync_seconds} "
        f"LLMOP_PROGRESS_INTERVAL={args.progress_interval}"
    )
    print("Times: seconds from the POST of the job until ALL its worker pods were seen created / ungated / ")
    print("bound (nodeName) / Running, by receive time on our own pod watch.")
    for r in results:
        print()
        print(f"== {r.title}: {r.jobs} job(s) x {r.nodes_per_job} nodes ==")
        print(f"{'milestone':<22}{'p50 s':>9}{'p95 s':>9}{'max s':>9}{'jobs done':>11}")
        milestones: list[tuple[str, Callable[[JobTimes], float | None]]] = [
            ("all pods created", lambda t: t.created),
            ("all pods ungated", lambda t: t.ungated),
            ("all pods bound", lambda t: t.bound),
            ("all pods Running", lambda t: t.running),
        ]
        for label, get in milestones:
            vals = [v for v in (get(t) for t in r.times) if v is not None]
            done = f"{len(vals)}/{r.jobs}"
            if vals:
                print(f"{label:<22}{pct(vals, 0.5):>9.2f}{pct(vals, 0.95):>9.2f}{max(vals):>9.2f}{done:>11}")
            else:
                print(f"{label:<22}{'-':>9}{'-':>9}{'-':>9}{done:>11}")
        print(
            f"operator: CPU {r.cpu_seconds:.1f} s in the window ({r.cpu_total:.1f} s since start), "
            f"RSS idle {r.rss_idle_mb:.0f} MB, peak RSS (VmHWM) {r.rss_peak_mb:.0f} MB, "
            f"max threads {r.max_threads}, reconcile passes {r.reconciles:.0f} "
            f"({r.reconciles / r.jobs:.1f}/job), window {r.wall:.1f} s + {args.settle:.0f} s settle"
        )
        total = sum(r.api.operator.values())
        print(
            f"operator API requests (its ServiceAccount, by FlowSchema bucket): {total:.0f} total, "
            f"{total / r.jobs:.1f} per job, {total / (r.jobs * r.nodes_per_job):.2f} per pod"
        )
        print(f"  {'bucket':<20}{'requests':>10}{'per job':>10}")
        for bucket, v in sorted(r.api.operator.items(), key=lambda kv: -kv[1]):
            if v >= 0.5:
                print(f"  {bucket:<20}{v:>10.0f}{v / r.jobs:>10.1f}")
        print(
            "all clients (apiserver_request_total deltas; scheduler, kwok, controller-manager, bench included):"
        )
        top = sorted(((k, v) for k, v in r.api.everyone.items() if v >= 0.5), key=lambda kv: -kv[1])[:12]
        for (res, verb), v in top:
            print(f"  {res + ' ' + verb:<34}{v:>10.0f}{v / r.jobs:>10.1f}/job")
        for note in r.notes:
            print(f"NOTE: {note}")
    print()
    big = next((r for r in results if r.jobs == 1), None)
    many = next((r for r in results if r.jobs > 1), None)
    if big:
        created = big.times[0].created
        print(
            f"128-node job: all pods created in {fmt(created)} s (goal <= 2 s)"
            + (f", ratio {created / 2:.2f}x goal" if created is not None else "")
        )
    if many:
        print(
            f"{many.jobs}x{many.nodes_per_job} jobs: operator peak RSS {many.rss_peak_mb:.0f} MB (goal < 150 MB), "
            f"ratio {many.rss_peak_mb / 150:.2f}x goal"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=256, help="fake 8-GPU nodes to register")
    parser.add_argument("--big-nodes", type=int, default=128, help="numNodes of the single big job")
    parser.add_argument("--jobs", type=int, default=200, help="concurrent small jobs")
    parser.add_argument("--job-nodes", type=int, default=8, help="numNodes of each small job")
    parser.add_argument(
        "--small-gpus", type=int, default=1,
        help="gpusPerNode of the small jobs (1: 200x8 pods fit on 256 8-GPU nodes; 8 needs --nodes 1600)",
    )  # fmt: skip
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--skip-many", action="store_true")
    parser.add_argument("--big-timeout", type=float, default=300)
    parser.add_argument("--many-timeout", type=float, default=900)
    parser.add_argument("--settle", type=float, default=5, help="seconds counted after the last pod Runs")
    parser.add_argument("--resync-seconds", type=float, default=30, help="LLMOP_RESYNC_SECONDS")
    parser.add_argument("--progress-interval", type=float, default=10, help="LLMOP_PROGRESS_INTERVAL")
    parser.add_argument("--workdir", default="/tmp/llmop-bench", help="operator logs and kubeconfig")
    parser.add_argument(
        "--profile", action="store_true", help="run the operator under cProfile (slower; diagnosis only)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the llmop-bench cluster afterwards")
    args = parser.parse_args(argv)

    # Before importing the cluster module: it reads the name at import time.
    os.environ["LLMOP_CLUSTER_NAME"] = CLUSTER_NAME
    cluster = importlib.import_module("llmop_dev.cluster")
    if cluster.CLUSTER_NAME != CLUSTER_NAME:
        raise RuntimeError(f"llmop_dev.cluster was imported earlier with cluster {cluster.CLUSTER_NAME}")
    results: list[ScenarioResult] = []
    try:
        log(f"bringing up cluster {CLUSTER_NAME} with {args.nodes} fake GPU nodes")
        cluster.up(node_count=args.nodes)
        bench = Bench(args, cluster)
        bench.wait_nodes_ready(args.nodes)
        bench.setup_operator_identity()
        if not args.skip_big:
            results.append(
                bench.run_scenario(
                    f"{args.big_nodes}-node job", "llmop-bench-big", 1, args.big_nodes, 8, args.big_timeout
                )
            )
        if not args.skip_many:
            results.append(
                bench.run_scenario(
                    f"{args.jobs} concurrent {args.job_nodes}-node jobs",
                    "llmop-bench-many",
                    args.jobs,
                    args.job_nodes,
                    args.small_gpus,
                    args.many_timeout,
                )
            )
        print_report(results, args)
    finally:
        if not args.keep:
            log(f"deleting cluster {CLUSTER_NAME}")
            cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
