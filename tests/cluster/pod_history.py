"""Every change to a job's worker pods, in the apiserver's order, and the invariants over it.

A thread watches the pods straight from the apiserver (never through the chaos proxy) and keeps
each event. One watch of one namespace delivers its changes in resourceVersion order, so replaying
the events rebuilds the pods as they were at every moment in between, not just when a test
happened to poll. A watch that loses history (410 Gone) is recorded as a gap: the invariants cannot
be checked across it, and ``violations`` says so.

Definitions:
- a pod is *live* while its phase is Pending or Running and it has no deletionTimestamp: the
  workers the operator counts as its gang;
- a pod *exists* from its ADDED event to its DELETED event, terminating or not.
Invariants:
- no two live pods share a worker index; no two live pods belong to different attempts;
- a pod of attempt N is created only when no pod of an earlier attempt exists (the operator's rule:
  the next gang starts once every pod of the old one is gone, so two gangs never share the nodes).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.watch.watch import iter_resp_lines

ATTEMPT_LABEL = "llmop.io/attempt"
INDEX_LABEL = "llmop.io/worker-index"


@dataclass(frozen=True)
class PodState:
    uid: str
    name: str
    index: int
    attempt: int
    phase: str
    deleting: bool
    node: str | None

    @property
    def live(self) -> bool:
        return self.phase in ("Pending", "Running") and not self.deleting

    @classmethod
    def of(cls, pod: dict[str, Any]) -> PodState:
        meta, labels = pod["metadata"], pod["metadata"].get("labels") or {}
        return cls(
            uid=meta["uid"],
            name=meta["name"],
            index=int(labels.get(INDEX_LABEL, -1)),
            attempt=int(labels.get(ATTEMPT_LABEL, -1)),
            phase=(pod.get("status") or {}).get("phase") or "Pending",
            deleting=bool(meta.get("deletionTimestamp")),
            node=(pod.get("spec") or {}).get("nodeName"),
        )


@dataclass(frozen=True)
class Change:
    at: float  # time.monotonic() when the test saw it
    kind: str  # ADDED, MODIFIED, DELETED
    pod: PodState


@dataclass
class PodHistory:
    api: client.ApiClient
    namespace: str
    job: str
    changes: list[Change] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._core = client.CoreV1Api(self.api)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"pod-history-{self.job}", daemon=True)
        self._error: BaseException | None = None
        self._rv = ""

    @property
    def selector(self) -> str:
        return f"llmop.io/job-name={self.job},llmop.io/role=worker"

    def start(self) -> None:
        # The list is taken before the job exists, so every pod of it arrives as a watch event.
        self._rv = self._list_rv(empty=True)
        self._thread.start()

    def _list_rv(self, empty: bool = False) -> str:
        listed = self._core.list_namespaced_pod(self.namespace, label_selector=self.selector)
        if empty and listed.items:
            raise AssertionError(f"pods of {self.job} exist before the history starts")
        assert listed.metadata is not None and listed.metadata.resource_version
        return str(listed.metadata.resource_version)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(30)
        if self._error is not None:
            raise AssertionError(f"the pod watch failed: {self._error!r}") from self._error

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._watch_once()
        except BaseException as e:  # reported by stop()
            self._error = e

    def _watch_once(self) -> None:
        # Short server-side windows so stop() returns promptly; each resumes where the last ended.
        resp: Any = self._core.list_namespaced_pod(
            self.namespace,
            label_selector=self.selector,
            watch=True,
            resource_version=self._rv,
            allow_watch_bookmarks=True,
            timeout_seconds=3,
            _preload_content=False,
            _request_timeout=(10, 30),
        )
        try:
            for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                event = json.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    # 410 Gone: the resourceVersion is too old. Start over from a fresh list and
                    # record that what happened in between is unknown.
                    self.gaps.append(f"watch error at rv {self._rv}: {obj.get('message')}")
                    self._rv = self._list_rv()
                    return
                self._rv = obj["metadata"]["resourceVersion"]
                if kind == "BOOKMARK":
                    continue
                with self._lock:
                    self.changes.append(Change(time.monotonic(), kind, PodState.of(obj)))
        finally:
            resp.release_conn()

    # -- what the history shows -------------------------------------------------------------
    def snapshot(self) -> list[Change]:
        with self._lock:
            return list(self.changes)

    def existing(self) -> dict[str, PodState]:
        """The pods as of the last event seen, by uid."""
        pods: dict[str, PodState] = {}
        for change in self.snapshot():
            if change.kind == "DELETED":
                pods.pop(change.pod.uid, None)
            else:
                pods[change.pod.uid] = change.pod
        return pods

    def attempts(self) -> list[int]:
        return sorted({c.pod.attempt for c in self.snapshot()})

    def violations(self) -> list[str]:
        found: list[str] = [f"history gap: {g}" for g in self.gaps]
        pods: dict[str, PodState] = {}
        for n, change in enumerate(self.snapshot()):
            pod = change.pod
            if change.kind == "ADDED" and pod.uid not in pods:
                older = [p for p in pods.values() if p.attempt < pod.attempt]
                if older:
                    found.append(
                        f"event {n}: {pod.name} of attempt {pod.attempt} created while "
                        + ", ".join(f"{p.name} of attempt {p.attempt} ({p.phase})" for p in older)
                        + " still existed"
                    )
            if change.kind == "DELETED":
                pods.pop(pod.uid, None)
            else:
                pods[pod.uid] = pod
            live = [p for p in pods.values() if p.live]
            indexes = [p.index for p in live]
            if len(set(indexes)) != len(indexes):
                found.append(f"event {n}: two live pods of one index: {_names(live)}")
            if len({p.attempt for p in live}) > 1:
                found.append(f"event {n}: live pods of two attempts: {_names(live)}")
        return found


def _names(pods: list[PodState]) -> str:
    return ", ".join(f"{p.name}/attempt {p.attempt}/{p.phase}" for p in sorted(pods, key=lambda p: p.name))
