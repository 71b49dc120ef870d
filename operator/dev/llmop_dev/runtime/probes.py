"""Readiness probes (httpGet) run as the kubelet runs them.

Without them a pod would be Ready the moment its process starts, and a Deployment's readyReplicas
would claim a model server answers while it is still loading the model.
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass

from llmop_dev.runtime.api import Obj


@dataclass
class Readiness:
    url: str
    period: float
    timeout: float
    failure_threshold: int
    success_threshold: int
    next_at: float
    ready: bool = False
    last_ok: bool = False
    streak: int = 0  # consecutive results equal to last_ok

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def observe(self, ok: bool, now: float) -> bool:
        """Record one probe result; returns the (possibly changed) readiness."""
        self.next_at = now + self.period
        self.streak = self.streak + 1 if ok == self.last_ok else 1
        self.last_ok = ok
        if ok and self.streak >= self.success_threshold:
            self.ready = True
        elif not ok and self.streak >= self.failure_threshold:
            self.ready = False
        return self.ready


def _port(container: Obj, port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    named = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
    value = named.get(port)
    return int(value) if value is not None else None


def readiness(container: Obj, pod_ip: str) -> Readiness | None:
    """The container's httpGet readiness probe aimed at its pod IP; None without one."""
    probe = container.get("readinessProbe") or {}
    get = probe.get("httpGet")
    if not get:
        return None
    port = _port(container, get.get("port", 80))
    if port is None:
        return None
    path = get.get("path", "/")
    return Readiness(
        url=f"http://{pod_ip}:{port}{path if path.startswith('/') else '/' + path}",
        period=float(probe.get("periodSeconds", 10)),
        timeout=float(probe.get("timeoutSeconds", 1)),
        failure_threshold=int(probe.get("failureThreshold", 3)),
        success_threshold=int(probe.get("successThreshold", 1)),
        next_at=time.monotonic() + float(probe.get("initialDelaySeconds", 0)),
    )


def http_ok(url: str, timeout: float) -> bool:
    """Success is any status from 200 to 399, as the kubelet counts it."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status: int = resp.status
            return 200 <= status < 400
    except OSError:
        return False
