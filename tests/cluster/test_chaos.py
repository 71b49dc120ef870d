"""Chaos: a long job survives worker kills, node loss, operator kills and API errors, and accounts
for every restart.

The operator reaches the apiserver only through ``chaos_proxy`` (a share of its requests answered
with 500/503/429 throughout, in bursts much more); a seeded schedule then kills workers (a retryable
exit code, a deletion, an eviction), deletes a node the gang runs on (a replacement node keeps the
capacity), and SIGKILLs the operator (alone, while a worker fails, and in the middle of a restart).
Each fault is injected only into a gang that is Running, and the next one only once the gang is
Running again, so every fault makes exactly one restart: that is what lets the test demand exact
counts rather than "some restarts happened". The pod history (``pod_history``, watched straight from
the apiserver) checks that no two gangs ever overlapped.

Reproduce a run with its seed: ``LLMOP_CHAOS_SEED=<seed>`` (printed at the start and in every
failure); ``LLMOP_CHAOS_SECONDS`` sets how long faults keep coming (default 90).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from llmop_dev import cluster as devcluster
from tests.cluster.chaos_proxy import ChaosProxy, Upstream, describe
from tests.cluster.conftest import Jobs, OperatorProcess
from tests.cluster.pod_history import Change, PodHistory, PodState
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster
EXIT_AFTER = "llmop.io/kwok-exit-after"
EXIT_CODE = "llmop.io/kwok-exit-code"
EVICT_AFTER = "llmop.io/kwok-evict-after"
CHAOS_NODE_LABEL = "test.llmop.io/chaos-node"

SEED = int(os.environ.get("LLMOP_CHAOS_SEED") or random.SystemRandom().randrange(1 << 31))
CHAOS_SECONDS = float(os.environ.get("LLMOP_CHAOS_SECONDS", "90"))
JOB = "chaos"
WORKERS = 3


def _rates(text: str) -> tuple[float, float]:
    mutating, reads = (float(x) for x in text.split(","))
    return mutating, reads


# (mutating, reads): the share of the operator's requests faulted all the time it runs, and in a
# burst. LLMOP_CHAOS_API_RATES="0,0" runs the other faults alone (to tell an API-error bug apart).
BASE_RATES = _rates(os.environ.get("LLMOP_CHAOS_API_RATES", "0.10,0.05"))
BURST_RATES = (min(1.0, BASE_RATES[0] * 5), min(1.0, BASE_RATES[1] * 6))
# Non-zero, so Failed; retried under the default OnFailure policy; not 75, which is "preempted".
RETRYABLE_EXIT_CODES = (1, 3, 137)
FAILURE_REASONS = {"WorkerFailed"}
DISRUPTION_REASONS = {"WorkerDisrupted", "WorkerLost", "NodeLost"}
RECOVERY_SECONDS = 90.0
NODE_RECOVERY_SECONDS = 150.0  # a deleted node's pods linger until noticed (operator or pod GC)


# -- the proxy on its own: a broken rig must not make the chaos test vacuous ------------------
@pytest.fixture
def proxy(cluster: Cluster) -> Iterator[ChaosProxy]:
    p = ChaosProxy(Upstream.from_kubeconfig(cluster.kubeconfig), seed=SEED)
    p.start()
    yield p
    p.stop()


def _get(url: str, timeout: float = 10) -> tuple[int, dict[str, str], dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_proxy_injects_transient_faults_and_passes_watches(
    cluster: Cluster, namespace: str, proxy: ChaosProxy
) -> None:
    url = f"{proxy.url()}/api/v1/namespaces/{namespace}/configmaps"
    assert _get(url)[0] == 200, "faults are off until switched on"
    proxy.enabled = True
    proxy.set_rates(1.0, 1.0)
    answers = [_get(url) for _ in range(30)]
    assert {code for code, _, _ in answers} == {500, 503, 429}, "only transient errors, of each kind"
    for code, headers, body in answers:
        assert body["kind"] == "Status" and body["code"] == code and body["status"] == "Failure"
        if code == 429:
            assert headers["Retry-After"] == "1" and body["details"]["retryAfterSeconds"] == 1
    assert proxy.fault_count() == 30 and proxy.forwarded["GET"] == 1

    # Every non-watch request fails, yet a watch started through the proxy delivers its events.
    seen: list[dict[str, Any]] = []

    def watch() -> None:
        with urllib.request.urlopen(f"{url}?watch=true&timeoutSeconds=30", timeout=40) as r:
            for line in r:
                seen.append(json.loads(line))
                if seen[-1]["object"]["metadata"]["name"] == "probe":
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    wait_for(lambda: proxy.forwarded["WATCH"] == 1, timeout=10, what="the watch forwarded")
    cluster.kubectl("create", "configmap", "probe", "-n", namespace, "--from-literal=k=v")
    watcher.join(30)
    assert [e["type"] for e in seen if e["object"]["metadata"]["name"] == "probe"] == ["ADDED"]
    assert proxy.watch_bytes > 0 and proxy.fault_count() == 30

    proxy.set_rates(0.0, 0.0)
    code, _, body = _get(url)
    assert code == 200 and "probe" in {i["metadata"]["name"] for i in body["items"]}
    proxy.set_rates(1.0, 1.0)
    proxy.enabled = False
    assert _get(url)[0] == 200, "switched off, nothing is injected whatever the rates"
    assert proxy.fault_count() == 30


def test_pod_history_flags_overlapping_gangs() -> None:
    """The invariants can fail: each kind of overlap, replayed, is named."""

    def change(kind: str, uid: str, index: int, attempt: int, phase: str, deleting: bool = False) -> Change:
        return Change(0.0, kind, PodState(uid, f"w-{index}", index, attempt, phase, deleting, "n"))

    def violations(*changes: Change) -> list[str]:
        history = PodHistory(client.ApiClient(), "ns", "job")
        history.changes = list(changes)
        return history.violations()

    one_gang = [change("ADDED", f"a{i}", i, 1, "Running") for i in range(2)]
    assert violations(*one_gang) == []
    # A restart done right: the old gang is gone before the new one is created.
    gone = [change("DELETED", f"a{i}", i, 1, "Running", deleting=True) for i in range(2)]
    assert violations(*one_gang, *gone, change("ADDED", "b0", 0, 2, "Pending")) == []
    # Created while an old pod still terminates (not live, but it holds its node).
    terminating = [change("MODIFIED", f"a{i}", i, 1, "Running", deleting=True) for i in range(2)]
    [found] = violations(*one_gang, *terminating, gone[0], change("ADDED", "b0", 0, 2, "Pending"))
    assert "w-0 of attempt 2 created while w-1 of attempt 1 (Running) still existed" in found
    # Live beside a live pod of the old gang.
    found_all = violations(*one_gang, change("ADDED", "b1", 1, 2, "Running"))
    assert any("two live pods of one index" in f for f in found_all)
    assert any("live pods of two attempts" in f for f in found_all)


# -- the chaos test ---------------------------------------------------------------------------
@dataclass
class Expected:
    """What the faults injected so far must have made the operator count."""

    failures: int = 0  # restartCount: retryable worker failures
    disruptions: int = 0  # disruptionCount: deletions, evictions, lost nodes

    @property
    def attempt(self) -> int:
        return 1 + self.failures + self.disruptions


@dataclass
class Chaos:
    cluster: Cluster
    jobs: Jobs
    operator: OperatorProcess
    proxy: ChaosProxy
    history: PodHistory
    rng: random.Random
    began: float = field(default_factory=time.monotonic)
    expected: Expected = field(default_factory=Expected)
    done: list[str] = field(default_factory=list)  # what was injected, in order
    nodes_made: int = 0

    # -- observing --------------------------------------------------------------------------
    def state(self) -> str:
        status = self.jobs.status(JOB)
        conds = {c["type"]: f"{c['status']}/{c.get('reason')}" for c in status.get("conditions", [])}
        pods = [
            f"{p['metadata']['name']}@{p['metadata']['labels'].get('llmop.io/attempt')}:"
            f"{p['status'].get('phase')}{'(deleting)' if p['metadata'].get('deletionTimestamp') else ''}"
            f"@{p['spec'].get('nodeName')}"
            for p in self.jobs.pods(JOB)
        ]
        keys = ("state", "attempt", "restartCount", "disruptionCount")
        return f"status { ({k: status.get(k) for k in keys}) } conditions {conds} pods {pods}"

    def restarts(self) -> list[str]:
        """The job's restart Events, oldest first: what the operator said each restart was."""
        events = sorted(self.jobs.events(JOB), key=lambda e: e.get("lastTimestamp") or e["eventTime"] or "")
        return [
            f"{e['reason']}: {e['message']}"
            for e in events
            if e["reason"] in FAILURE_REASONS | DISRUPTION_REASONS
        ]

    def fail(self, message: str) -> AssertionError:
        restarts = "\n    ".join(self.restarts())
        changes = "\n    ".join(
            f"{c.at - self.began:6.1f}s {c.kind:8} {c.pod.name} attempt {c.pod.attempt} {c.pod.phase}"
            f"{' deleting' if c.pod.deleting else ''} uid {c.pod.uid[:8]}"
            for c in self.history.snapshot()[-60:]
        )
        return AssertionError(
            f"seed {SEED}: {message}\n  now: {self.state()}\n  injected so far:\n    "
            + "\n    ".join(self.done)
            + f"\n  restart Events:\n    {restarts}\n  pod history (last 60):\n    {changes}\n"
            f"  expected: {self.expected}\n"
            f"  proxy: {describe(self.proxy)}\n--- operator log (tail) ---\n{self.operator.log()}"
        )

    def steady(self, timeout: float = RECOVERY_SECONDS) -> list[dict[str, Any]]:
        """Wait for the expected attempt's whole gang Running, and nothing else; its pods."""
        attempt = self.expected.attempt
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.jobs.status(JOB)
            if (status.get("attempt") or 1) > attempt:
                raise self.fail(f"attempt {status['attempt']} where {attempt} was expected")
            pods = self.jobs.pods(JOB)
            if (
                status.get("attempt") == attempt
                and status.get("state") == "Running"
                and len(pods) == WORKERS
                and all(
                    p["metadata"]["labels"]["llmop.io/attempt"] == str(attempt)
                    and p["status"].get("phase") == "Running"
                    and not p["metadata"].get("deletionTimestamp")
                    for p in pods
                )
            ):
                return pods
            time.sleep(0.5)
        raise self.fail(f"not Running as attempt {attempt} within {timeout:.0f}s after {self.done[-1:]}")

    def worker(self, pods: list[dict[str, Any]]) -> dict[str, Any]:
        return self.rng.choice(sorted(pods, key=lambda p: str(p["metadata"]["name"])))

    # -- the faults on a Running gang ---------------------------------------------------------
    def pod_fault(
        self, pods: list[dict[str, Any]], kinds: tuple[str, ...] = ("exit", "delete", "evict")
    ) -> str:
        """Kill one worker of the running gang one way or another; counts what it must cost."""
        pod = self.worker(pods)
        name = pod["metadata"]["name"]
        kind = self.rng.choice(kinds)
        if kind == "exit":
            code = self.rng.choice(RETRYABLE_EXIT_CODES)
            self.jobs.annotate_pods(JOB, {EXIT_AFTER: "0s", EXIT_CODE: str(code)}, only=[name])
            self.expected.failures += 1
            return f"{name} exits {code}"
        if kind == "delete":
            self.cluster.kubectl("delete", "pod", name, "-n", self.jobs.ns, "--wait=false")
            self.expected.disruptions += 1
            return f"{name} deleted"
        self.jobs.annotate_pods(JOB, {EVICT_AFTER: "0s"}, only=[name])
        self.expected.disruptions += 1
        return f"{name} evicted"

    def lose_node(self, pods: list[dict[str, Any]]) -> str:
        pod = self.worker(pods)
        node = pod["spec"]["nodeName"]
        self.nodes_made += 1
        spare = devcluster.FakeNode(
            name=f"chaos-{self.jobs.ns}-{self.nodes_made}",
            ip=f"127.0.2.{self.nodes_made}",
            labels={CHAOS_NODE_LABEL: self.jobs.ns},
        )
        # The replacement first: capacity for the next gang is there however fast the loss is seen.
        self.cluster.kubectl("create", "-f", "-", input=json.dumps(spare.manifest()))
        self.cluster.kubectl("delete", "node", node, "--wait=false")
        self.expected.disruptions += 1
        return f"node {node} of {pod['metadata']['name']} deleted ({spare.name} added)"

    def restart_operator(self, pause: float) -> None:
        self.operator.kill()
        time.sleep(pause)
        self.operator.start()

    # -- one scheduled step each ----------------------------------------------------------------
    def step(self, kind: str) -> None:
        pods = self.steady()
        started = time.monotonic()
        if kind == "worker":
            what = self.pod_fault(pods)
        elif kind == "node":
            what = self.lose_node(pods)
        elif kind == "kill":
            # Alone: a new operator takes over a running gang, and must not restart it.
            self.restart_operator(self.rng.uniform(0, 2))
            self.operator.wait_passes(2)
            what = "operator killed"
        elif kind == "kill-mid-restart":
            what = self.pod_fault(pods) + "; operator killed moments later"
            time.sleep(self.rng.uniform(0.2, 2.5))
            self.restart_operator(self.rng.uniform(0, 1))
        elif kind == "fault-while-down":
            self.operator.kill()
            what = "operator killed; then " + self.pod_fault(pods)
            self.wait_worker_gone_or_failed(pods)
            self.operator.start()
        elif kind == "burst":
            self.proxy.set_rates(*BURST_RATES)
            time.sleep(self.rng.uniform(2, 4))  # the gang is steady: errors alone restart nothing
            what = f"API fault burst {BURST_RATES}; then " + self.pod_fault(pods)
        else:
            raise AssertionError(f"unknown fault {kind}")
        self.done.append(what)
        print(f"[chaos {time.monotonic() - started:5.1f}s] {what}", flush=True)
        self.steady(NODE_RECOVERY_SECONDS if kind == "node" else RECOVERY_SECONDS)
        self.proxy.set_rates(*BASE_RATES)

    def wait_worker_gone_or_failed(self, before: list[dict[str, Any]]) -> None:
        uids = {p["metadata"]["uid"] for p in before}

        def hit() -> bool:
            now = self.jobs.pods(JOB)
            return len(now) < len(uids) or any(
                p["status"].get("phase") == "Failed" or p["metadata"].get("deletionTimestamp") for p in now
            )

        wait_for(hit, timeout=30, what="the worker fault while the operator is down")


MANDATORY = ["worker", "worker", "node", "kill", "kill-mid-restart", "fault-while-down", "burst"]
OPTIONAL = ["worker", "worker", "kill", "kill-mid-restart", "fault-while-down", "burst"]


def schedule(rng: random.Random, elapsed: Callable[[], float]) -> Iterator[str]:
    """Every kind of fault at least once, in a seeded order, then more until the time is up."""
    first = list(MANDATORY)
    rng.shuffle(first)
    yield from first
    while elapsed() < CHAOS_SECONDS:
        yield rng.choice(OPTIONAL)


def restore_nodes(cluster: Cluster) -> None:
    """Put the default nodes back and remove the replacements: the next test finds the usual cluster."""
    devcluster.install(cluster.bin_dir, cluster.kubeconfig, devcluster.default_nodes())

    def ready() -> bool:
        nodes = cluster.kubectl_json("get", "nodes", "-l", "nvidia.com/gpu.present=true")["items"]
        return all(
            any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
            for n in nodes
            if not n["metadata"]["labels"].get(CHAOS_NODE_LABEL)
        )

    wait_for(ready, timeout=60, what="the default nodes Ready again")
    cluster.kubectl("delete", "nodes", "-l", CHAOS_NODE_LABEL, "--wait=false", check=False)


def test_chaos_job_succeeds_and_accounts_for_every_restart(
    cluster: Cluster, namespace: str, jobs: Jobs, proxy: ChaosProxy, tmp_path: Path
) -> None:
    print(
        f"\nchaos seed {SEED} (LLMOP_CHAOS_SEED={SEED} reproduces it), {CHAOS_SECONDS:.0f}s of faults,"
        f" API fault rates {BASE_RATES}, in bursts {BURST_RATES}"
    )
    operator = OperatorProcess(cluster, namespace, tmp_path, kubeconfig=proxy.kubeconfig(tmp_path / "kc"))
    history = PodHistory(cluster.api(), namespace, JOB)
    chaos = Chaos(cluster, jobs, operator, proxy, history, random.Random(SEED))
    began = time.monotonic()
    try:
        proxy.set_rates(*BASE_RATES)
        proxy.enabled = True
        operator.start()
        history.start()
        jobs.create(
            JOB,
            workers={"numNodes": WORKERS, "procsPerNode": 2, "gpusPerNode": 2},
            training={"globalBatchSize": 12},
            runPolicy={"backoffLimit": 1000},
        )
        chaos.steady()
        chaos_began = time.monotonic()
        for kind in schedule(chaos.rng, lambda: time.monotonic() - chaos_began):
            chaos.step(kind)
        # The last attempt finishes; the faulty API stays on for that too.
        pods = chaos.steady()
        jobs.annotate_pods(
            JOB, {EXIT_AFTER: "0s", EXIT_CODE: "0"}, only=[p["metadata"]["name"] for p in pods]
        )
        try:
            jobs.wait_condition(JOB, "Succeeded", timeout=RECOVERY_SECONDS)
        except AssertionError as e:
            raise chaos.fail(f"the job did not succeed: {e}") from None
        status = jobs.status(JOB)
        wait_for(
            lambda: {p["metadata"]["uid"] for p in jobs.pods(JOB)} == set(history.existing()),
            timeout=30,
            what="the pod history to catch up with the cluster",
        )
        history.stop()
        print(f"chaos: {len(chaos.done)} faults in {time.monotonic() - began:.0f}s; proxy {describe(proxy)}")
        print(
            f"chaos: final status { ({k: status.get(k) for k in ('attempt', 'restartCount', 'disruptionCount')}) }"
        )

        assert status["state"] == "Succeeded", chaos.fail("not Succeeded")
        assert history.violations() == [], chaos.fail("two gangs overlapped")
        counted = (status["attempt"], status["restartCount"], status["disruptionCount"])
        want = (chaos.expected.attempt, chaos.expected.failures, chaos.expected.disruptions)
        assert counted == want, chaos.fail(f"(attempt, restartCount, disruptionCount) {counted} != {want}")
        assert history.attempts() == list(range(1, want[0] + 1)), chaos.fail(
            f"attempts that had pods: {history.attempts()}"
        )
        reasons = Counter(e["reason"] for e in jobs.events(JOB) for _ in range(e.get("count") or 1))
        failed = sum(reasons[r] for r in FAILURE_REASONS)
        disrupted = sum(reasons[r] for r in DISRUPTION_REASONS)
        # Exactly one Event per restart, even when the operator is SIGKILLed in the middle of one
        # or the API refuses the post: a restart's Event is named by its attempt and posted before
        # the status write that records the restart (llmop.events).
        assert (failed, disrupted) == want[1:], chaos.fail(
            f"restart Events (failed, disrupted) {(failed, disrupted)} != restarts {want[1:]}: {reasons}"
        )
        # The proxy really injected faults into the operator's requests, of every kind of request.
        faulted = Counter(f.method for f in proxy.faults)
        if BASE_RATES == (0.0, 0.0):
            print("chaos: LLMOP_CHAOS_API_RATES=0,0: no API faults were injected on purpose")
            return
        assert proxy.fault_count(since=began) > 20 and {"GET", "POST", "PATCH", "DELETE"} <= set(faulted), (
            describe(proxy)
        )
    finally:
        proxy.enabled = False
        history.stop()
        operator.shutdown()
        restore_nodes(cluster)
        print(f"\n--- operator log (tail) ---\n{operator.log()}")
