"""Kubernetes Events about jobs and searches, posted by the operator itself.

Why not ``kopf.info``/``kopf.warn``: Kopf queues Events in memory and posts them from a background
task, retrying with backoffs of up to a minute; an operator that is killed meanwhile (a node drain,
an OOM kill, a rollout) loses whatever was queued, and a restart then has no Event. Here an Event is
posted within the reconcile pass that decided it, retried briefly on transient API errors.

A keyed Event (a gang restart, keyed by the attempt it starts) has a name derived from the object's
UID and the key and is posted *before* the status write that records the decision: a pass repeated
after a crash or a failed write plans the same key, the create answers 409 (already posted), and so
each restart has exactly one Event. If it cannot be posted the pass fails and is retried, like a
failed status write. Every other Event has a generated name and is best-effort, as the API
conventions treat Events: posted after the status write, logged and dropped if the API keeps
refusing it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from llmop.kube import Kube, Manifest

log = logging.getLogger(__name__)

COMPONENT = "llmop-operator"
# The pod's name in the chart (downward API); a host name elsewhere (make run, tests).
INSTANCE = os.environ.get("POD_NAME") or socket.gethostname()
# Seconds between tries of one Event; a few seconds in all, so a pass is never held long.
BACKOFFS = (0.2, 0.5, 1.0, 2.0)
MAX_MESSAGE = 1024  # what the apiserver accepts for core/v1 Event.message
_NAME_LIMIT = 253


class EventNotPosted(Exception):
    """A keyed Event could not be posted after its retries; the pass is retried."""


def event_name(obj: Mapping[str, Any], key: str) -> str:
    """The name of the object's Event for ``key``: the same in every pass that plans it."""
    meta = obj["metadata"]
    uid = str(meta.get("uid") or "")
    digest = hashlib.sha256(f"{uid}/{key}".encode()).hexdigest()[:10]
    return f"{meta['name']}.{digest}"[:_NAME_LIMIT]


def _short(message: str) -> str:
    if len(message) <= MAX_MESSAGE:
        return message
    half = (MAX_MESSAGE - 3) // 2
    return f"{message[:half]}...{message[-half:]}"


def manifest(
    obj: Mapping[str, Any], reason: str, message: str, warning: bool, key: str | None = None
) -> Manifest:
    """A core/v1 Event about ``obj`` (a job or search as Kopf hands it to a handler)."""
    meta = obj["metadata"]
    now = datetime.now(UTC)
    name: dict[str, str] = (
        {"name": event_name(obj, key)} if key is not None else {"generateName": f"{meta['name']}."}
    )
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"namespace": meta["namespace"], **name},
        "involvedObject": {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "type": "Warning" if warning else "Normal",
        "reason": reason,
        "message": _short(message),
        "action": reason,
        "source": {"component": COMPONENT},  # the "From" column of kubectl describe
        "reportingComponent": COMPONENT,
        "reportingInstance": INSTANCE,
        "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "count": 1,
    }


async def post(
    kube: Kube,
    obj: Mapping[str, Any],
    reason: str,
    message: str,
    warning: bool = False,
    key: str | None = None,
) -> None:
    """Post one Event; see the module's docstring for what keyed and unkeyed ones promise."""
    event = manifest(obj, reason, message, warning, key)
    for delay in (*BACKOFFS, None):
        try:
            await kube.create_event(event)
            return
        except ApiException as e:
            # Only throttling, timeouts and server errors pass; any other 4xx is the request's own.
            transient = e.status is None or e.status >= 500 or e.status in (408, 429)
            problem = f"{e.status} {e.reason}"
        except (HTTPError, OSError) as e:  # connection refused, reset, timed out
            transient, problem = True, repr(e)
        if transient and delay is not None:
            await asyncio.sleep(delay)
            continue
        if transient and key is not None:
            raise EventNotPosted(f"Event {reason} ({key}) not posted: {problem}")
        log.warning("Event %s on %s not posted: %s", reason, obj["metadata"]["name"], problem)
        return
