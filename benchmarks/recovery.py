"""Gang recovery benchmark: seconds from a failure to the whole gang recreated and Running again.

Runs on its own local kwok cluster (``--cluster``, default ``llmop-bench-recovery``; deleted at the
end unless ``--keep``) with ``--nodes`` fake 8-GPU nodes and one operator subprocess with its
production timings (resync 30 s, progress interval 10 s), so only the watch events can make it fast.
One job of ``--workers`` workers (8 GPUs each, so one per node) suffers, alternately, ``--trials``
times each:

- ``worker-failure``: a worker exits 1 (kwok's scripted exit, ``llmop.io/kwok-exit-after: 0s``);
  the clock starts when our own watch sees the pod Failed;
- ``node-deletion``: the node of a worker is deleted; the clock starts at our DELETE request. The
  node is registered again after the trial (kwok makes it Ready), so every trial has the same room.

The clock stops when our watch sees every worker of the next attempt Running (not Terminating).
Per trial it also prints when the old gang was gone and when the new one was created (all its pods
seen). Times are receive times of our own watch events (time.monotonic).

    python benchmarks/recovery.py [--trials 10] [--workers 4] [--nodes 8] [--cluster NAME] [--keep]

The last line is ``gang recovery p50 seconds: X`` over all trials; nothing asserts on timings. Exits
non-zero only on errors (cluster, operator, a trial that does not recover within --timeout).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "llmop-recovery"
JOB = "recover"
ATTEMPT_LABEL = "llmop.io/attempt"
WORKER_SELECTOR = f"llmop.io/job-name={JOB},llmop.io/role=worker"


def log(msg: str) -> None:
    print(f"[recovery {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class PodState:
    attempt: int
    phase: str
    deleting: bool
    node: str


class Pods:
    """Our own watch on the job's workers: their current states, and a wait on them."""

    def __init__(self, core: Any, namespace: str) -> None:
        self.core, self.namespace = core, namespace
        self.pods: dict[str, PodState] = {}
        self.changed = threading.Condition()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="watch", daemon=True)
        self.ready = threading.Event()

    def start(self) -> None:
        self.thread.start()
        if not self.ready.wait(30):
            raise TimeoutError("pod watch did not start")

    def _note(self, kind: str, pod: dict[str, Any]) -> None:
        meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
        with self.changed:
            if kind == "DELETED":
                self.pods.pop(meta["name"], None)
            else:
                self.pods[meta["name"]] = PodState(
                    attempt=int((meta.get("labels") or {}).get(ATTEMPT_LABEL, "0")),
                    phase=status.get("phase") or "Pending",
                    deleting=bool(meta.get("deletionTimestamp")),
                    node=spec.get("nodeName") or "",
                )
            self.changed.notify_all()

    def _run(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        try:
            rv = ""
            while not self.stop.is_set():
                if not rv:
                    listed = self.core.list_namespaced_pod(
                        self.namespace, label_selector=WORKER_SELECTOR, _preload_content=False
                    )
                    body = json.loads(listed.data)
                    with self.changed:
                        self.pods.clear()
                    for item in body.get("items", []):
                        self._note("ADDED", item)
                    rv = body["metadata"]["resourceVersion"]
                    self.ready.set()
                resp = self.core.list_namespaced_pod(
                    self.namespace,
                    label_selector=WORKER_SELECTOR,
                    watch=True,
                    resource_version=rv,
                    allow_watch_bookmarks=True,
                    timeout_seconds=60,
                    _preload_content=False,
                    _request_timeout=90,
                )
                try:
                    for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                        event = json.loads(line)
                        obj = event.get("object", {})
                        if event.get("type") == "ERROR":
                            rv = ""  # 410 Gone and friends: list again
                            break
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                            self._note(event["type"], obj)
                        if self.stop.is_set():
                            break
                finally:
                    resp.release_conn()
        except BaseException as e:  # surfaced by the waiting side
            self.error = e
            self.ready.set()
            with self.changed:
                self.changed.notify_all()

    def wait(self, what: str, predicate: Callable[[dict[str, PodState]], bool], timeout: float) -> float:
        """Block until the pods satisfy ``predicate``; returns the monotonic time it first held."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate(self.pods):
                if self.error is not None:
                    raise RuntimeError(f"pod watch failed: {self.error!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}: {self.pods}")
                self.changed.wait(min(left, 1.0))
            return time.monotonic()

    def close(self) -> None:
        self.stop.set()


def gang_running(attempt: int, workers: int) -> Callable[[dict[str, PodState]], bool]:
    def check(pods: dict[str, PodState]) -> bool:
        running = [
            p for p in pods.values() if p.attempt == attempt and p.phase == "Running" and not p.deleting
        ]
        return len(running) == workers and all(p.attempt == attempt for p in pods.values())

    return check


def gang_running_from(attempt: int, workers: int) -> Callable[[dict[str, PodState]], bool]:
    """Every pod belongs to one attempt at or after ``attempt``, and all ``workers`` of it run."""

    def check(pods: dict[str, PodState]) -> bool:
        attempts = {p.attempt for p in pods.values()}
        return len(attempts) == 1 and min(attempts) >= attempt and gang_running(min(attempts), workers)(pods)

    return check


# -- the operator process ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Operator:
    def __init__(self, kubeconfig: Path, log_path: Path) -> None:
        self.kubeconfig, self.log_path = kubeconfig, log_path
        self.health_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "LLMOP_NAMESPACES": NAMESPACE,
            "LLMOP_BIND_ADDRESS": "127.0.0.1",
            "LLMOP_METRICS_PORT": str(free_port()),
            "LLMOP_HEALTH_PORT": str(self.health_port),
        }
        for name in ("LLMOP_RESYNC_SECONDS", "LLMOP_PROGRESS_INTERVAL"):
            env.pop(name, None)  # the production defaults: recovery must not come from a resync
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llmop.cli", "operator"], env=env, stdout=out, stderr=out, cwd=REPO
            )
        deadline = time.monotonic() + 90
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"operator not healthy after 90 s; see {self.log_path}")
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# -- trials -------------------------------------------------------------------------------------
@dataclass
class Trial:
    kind: str
    number: int
    old_gone: float  # seconds from the failure until no pod of the old gang is left
    created: float  # ... until every worker of the new gang exists
    running: float  # ... until every worker of the new gang is Running: the recovery time


class Bench:
    def __init__(self, args: argparse.Namespace, cluster: Any) -> None:
        from kubernetes import client, config

        self.args, self.cluster = args, cluster
        self.bin_dir: Path = cluster.ensure_binaries()
        self.kubeconfig: Path = cluster.kubeconfig_path()
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)  # type: ignore[no-untyped-call]
        self.core = client.CoreV1Api(client.ApiClient(cfg))
        self.fakes = {n.name: n for n in cluster.default_nodes(args.nodes)}
        self.attempt = 1

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        out: str = self.cluster.kubectl(self.bin_dir, self.kubeconfig, *args, input=input, check=check)
        return out

    def nodes_ready(self) -> bool:
        items = json.loads(self.kubectl("get", "nodes", "-o", "json"))["items"]
        ready = {
            n["metadata"]["name"]
            for n in items
            if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
        }
        return set(self.fakes) <= ready

    def wait_nodes_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.nodes_ready():
            if time.monotonic() > deadline:
                raise TimeoutError("fake nodes not Ready")
            time.sleep(0.5)

    def fresh_namespace(self) -> None:
        self.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true", "--timeout=180s")
        self.kubectl("create", "namespace", NAMESPACE)

    def create_job(self) -> None:
        workers = self.args.workers
        manifest = {
            "apiVersion": "llmop.io/v1alpha1",
            "kind": "LLMTrainingJob",
            "metadata": {"name": JOB, "namespace": NAMESPACE},
            "spec": {
                "data": {"prepare": False},
                "training": {
                    "maxSteps": 100,
                    "globalBatchSize": math.lcm(1024, workers * 8),
                    "microBatchSize": 1,
                },
                # 8 GPUs each: one worker per node, as a real gang of full nodes.
                "workers": {"numNodes": workers, "gpusPerNode": 8, "procsPerNode": 8},
                # Every trial is a restart: the default backoffLimit would fail the job midway.
                "runPolicy": {"backoffLimit": 4 * self.args.trials + 10},
            },
        }
        self.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def job_status(self) -> dict[str, Any]:
        got = json.loads(self.kubectl("get", "llmtrainingjob", JOB, "-n", NAMESPACE, "-o", "json"))
        return dict(got.get("status") or {})

    def settle(self, pods: Pods) -> None:
        """Wait for the current gang Running, as pods and in the job's status."""
        pods.wait(f"attempt {self.attempt} Running", gang_running(self.attempt, self.args.workers), 120)
        deadline = time.monotonic() + 60
        while True:
            status = self.job_status()
            if status.get("attempt") == self.attempt and status.get("state") == "Running":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"job not Running in attempt {self.attempt}: {status}")
            time.sleep(0.2)

    def victim(self, pods: Pods) -> tuple[str, PodState]:
        with pods.changed:
            current = sorted((n, p) for n, p in pods.pods.items() if p.attempt == self.attempt)
        return current[(self.attempt - 1) % len(current)]  # a different index each trial

    def recover(self, pods: Pods, kind: str, number: int, failed_at: float) -> Trial:
        old, new, workers = self.attempt, self.attempt + 1, self.args.workers
        timeout = self.args.timeout
        gone = pods.wait("old gang gone", lambda ps: all(p.attempt != old for p in ps.values()), timeout)
        created = pods.wait(
            "new gang created", lambda ps: sum(p.attempt >= new for p in ps.values()) == workers, timeout
        )
        # Recovered when a whole later gang runs. Usually that is attempt ``new``; a gang restarted
        # once more on the way (its pod bound to the deleted node by a scheduler that had not seen
        # the deletion yet) counts in the time, and the extra restart is shown.
        running = pods.wait(f"attempt >= {new} Running", gang_running_from(new, workers), timeout)
        with pods.changed:
            reached = max(p.attempt for p in pods.pods.values())
        if reached > new:
            print(f"{kind:15} trial {number:2}: {reached - new} extra restart(s) before the gang ran")
        self.attempt = reached
        return Trial(kind, number, gone - failed_at, created - failed_at, running - failed_at)

    def worker_failure(self, pods: Pods, number: int) -> Trial:
        name, _ = self.victim(pods)
        exit_now = {"llmop.io/kwok-exit-after": "0s", "llmop.io/kwok-exit-code": "1"}
        self.kubectl("annotate", "pod", name, "-n", NAMESPACE, *[f"{k}={v}" for k, v in exit_now.items()])
        failed_at = pods.wait(
            f"{name} Failed", lambda ps: name not in ps or ps[name].phase == "Failed", self.args.timeout
        )
        return self.recover(pods, "worker-failure", number, failed_at)

    def node_deletion(self, pods: Pods, number: int) -> Trial:
        _, victim = self.victim(pods)
        failed_at = time.monotonic()
        self.kubectl("delete", "node", victim.node, "--wait=false")
        trial = self.recover(pods, "node-deletion", number, failed_at)
        # Registered again (kwok makes it Ready), so every trial has the same room.
        self.kubectl("create", "-f", "-", input=json.dumps(self.fakes[victim.node].manifest()))
        self.wait_nodes_ready()
        return trial

    def run(self) -> list[Trial]:
        self.fresh_namespace()
        work = Path(self.args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        operator = Operator(self.kubeconfig, work / "operator.log")
        pods = Pods(self.core, NAMESPACE)
        trials: list[Trial] = []
        try:
            operator.start()
            pods.start()
            self.create_job()
            for number in range(1, self.args.trials + 1):
                for kind in (self.worker_failure, self.node_deletion):
                    self.settle(pods)
                    trial = kind(pods, number)
                    trials.append(trial)
                    print(
                        f"{trial.kind:15} trial {trial.number:2}: old gang gone {trial.old_gone:6.2f} s, "
                        f"new gang created {trial.created:6.2f} s, Running {trial.running:6.2f} s",
                        flush=True,
                    )
            status = self.job_status()
            print(
                f"job after {len(trials)} recoveries: attempt {status.get('attempt')}, "
                f"restartCount {status.get('restartCount')}, disruptionCount {status.get('disruptionCount')}",
                flush=True,
            )
        finally:
            pods.close()
            self.kubectl(
                "delete", "llmtrainingjob", JOB, "-n", NAMESPACE, "--wait=true", "--timeout=60s", check=False
            )
            operator.stop()
        return trials


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def report(trials: list[Trial]) -> None:
    print()
    for kind in ("worker-failure", "node-deletion"):
        times = [t.running for t in trials if t.kind == kind]
        if times:
            print(
                f"{kind:15}: n={len(times)}  p50 {percentile(times, 50):.2f} s  p90 {percentile(times, 90):.2f} s  "
                f"max {max(times):.2f} s"
            )
    every = [t.running for t in trials]
    print(f"goal: p50 <= 5 s; {'met' if percentile(every, 50) <= 5 else 'NOT met'}")
    print(f"gang recovery p50 seconds: {percentile(every, 50):.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=10, help="trials of each kind")
    parser.add_argument("--workers", type=int, default=4, help="numNodes of the job (8 GPUs each)")
    parser.add_argument("--nodes", type=int, default=8, help="fake 8-GPU nodes to register")
    parser.add_argument("--timeout", type=float, default=120, help="seconds one recovery may take")
    parser.add_argument("--workdir", default="/tmp/llmop-recovery", help="the operator's log")
    parser.add_argument("--cluster", default="llmop-bench-recovery", help="the local cluster's name")
    parser.add_argument("--keep", action="store_true", help="keep the cluster afterwards")
    args = parser.parse_args(argv)
    if args.nodes <= args.workers:
        parser.error("--nodes must exceed --workers: a gang whose node was deleted needs a spare node")

    # Before importing the cluster module: it reads the name at import time.
    # Its own cluster by default, never the development one: it is deleted at the end.
    os.environ["LLMOP_CLUSTER_NAME"] = args.cluster
    cluster = importlib.import_module("llmop_dev.cluster")
    if cluster.CLUSTER_NAME != args.cluster:
        raise RuntimeError(f"llmop_dev.cluster was imported earlier with cluster {cluster.CLUSTER_NAME}")
    trials: list[Trial] = []
    try:
        log(f"bringing up cluster {cluster.CLUSTER_NAME} with {args.nodes} fake GPU nodes")
        cluster.up(node_count=args.nodes)
        bench = Bench(args, cluster)
        bench.wait_nodes_ready()
        trials = bench.run()
    finally:
        if not args.keep:
            log(f"deleting cluster {cluster.CLUSTER_NAME}")
            cluster.down()
    # After the clean-up, whose kwokctl lines would otherwise follow it: the figure is the last line.
    report(trials)
    return 0


if __name__ == "__main__":
    sys.exit(main())
