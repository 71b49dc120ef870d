"""Pod status documents as a kubelet writes them (strategic-merge patches of /status)."""

from __future__ import annotations

from llmop_dev.runtime.api import Obj
from llmop_dev.runtime.nodes import now


def _conditions(ready: bool, reason: str = "") -> list[Obj]:
    stamp = now()
    out: list[Obj] = [
        {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": stamp},
        {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
    ]
    for kind in ("ContainersReady", "Ready"):
        cond: Obj = {"type": kind, "status": "True" if ready else "False", "lastTransitionTime": stamp}
        if not ready and reason:
            cond["reason"] = reason
        out.append(cond)
    return out


def _container(c: Obj, state: Obj, ready: bool, started: bool) -> Obj:
    return {
        "name": c["name"],
        "image": c.get("image", ""),
        "imageID": "",
        "containerID": "",
        "ready": ready,
        "started": started,
        "restartCount": 0,
        "state": state,
    }


def _ips(pod_ip: str, host_ip: str) -> Obj:
    return {"podIP": pod_ip, "podIPs": [{"ip": pod_ip}], "hostIP": host_ip, "hostIPs": [{"ip": host_ip}]}


def pending(pod: Obj, pod_ip: str, host_ip: str, reason: str, message: str = "") -> Obj:
    waiting: Obj = {"reason": reason}
    if message:
        waiting["message"] = message
    containers = [_container(c, {"waiting": waiting}, False, False) for c in pod["spec"]["containers"]]
    return {
        "phase": "Pending",
        **_ips(pod_ip, host_ip),
        "conditions": _conditions(False, "ContainersNotReady"),
        "containerStatuses": containers,
    }


def running(pod: Obj, pod_ip: str, host_ip: str, started_at: str, ready: bool = True) -> Obj:
    state = {"running": {"startedAt": started_at}}
    return {
        "phase": "Running",
        **_ips(pod_ip, host_ip),
        "startTime": started_at,
        "conditions": _conditions(ready, "" if ready else "ContainersNotReady"),
        "containerStatuses": [_container(c, state, ready, True) for c in pod["spec"]["containers"]],
    }


# The kubelet's cap on a container's termination message.
MESSAGE_LIMIT = 4096


def terminated(
    pod: Obj,
    exit_codes: dict[str, int],
    started_at: str,
    message: str = "",
    messages: dict[str, str] | None = None,
) -> Obj:
    """Succeeded when every container exited 0 (restartPolicy Never/OnFailure), else Failed."""
    finished = now()
    containers = []
    for c in pod["spec"]["containers"]:
        code = exit_codes.get(c["name"], 137)
        term: Obj = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": started_at,
            "finishedAt": finished,
        }
        if text := (messages or {}).get(c["name"]) or message:
            term["message"] = text
        containers.append(_container(c, {"terminated": term}, False, False))
    phase = "Succeeded" if all(code == 0 for code in exit_codes.values()) else "Failed"
    return {
        "phase": phase,
        "conditions": _conditions(False, "PodCompleted" if phase == "Succeeded" else "PodFailed"),
        "containerStatuses": containers,
    }
