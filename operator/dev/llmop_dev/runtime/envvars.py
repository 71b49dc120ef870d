"""A container's environment, resolved the way a kubelet resolves it."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

from llmop_dev.runtime.api import Obj

# (kind, name, namespace) -> object or None; injected so this module stays free of API calls.
Lookup = Callable[[str, str, str], Obj | None]

_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class EnvError(Exception):
    """A reference that cannot be resolved yet (CreateContainerConfigError on a real kubelet)."""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: defined names are substituted, $$ escapes, unknown refs stay."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _REF.sub(sub, text)


def field_value(pod: Obj, path: str) -> str:
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
        "status.podIPs": ",".join(p["ip"] for p in status.get("podIPs") or []),
    }
    if path in simple:
        return str(simple[path] or "")
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    raise EnvError(f"unsupported fieldRef {path}")


def _key_ref(kind: str, ref: Obj, namespace: str, lookup: Lookup) -> str | None:
    obj = lookup(kind, ref["name"], namespace)
    data = (obj or {}).get("data") or {}
    if ref["key"] in data:
        value = str(data[ref["key"]])
        return base64.b64decode(value).decode() if kind == "secret" else value
    if ref.get("optional"):
        return None
    raise EnvError(
        f"{kind} {ref['name']} has no key {ref['key']}" if obj else f"{kind} {ref['name']} not found"
    )


def _from_sources(container: Obj, namespace: str, lookup: Lookup) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        kind, ref = (
            ("configmap", source["configMapRef"])
            if "configMapRef" in source
            else ("secret", source["secretRef"])
        )
        obj = lookup(kind, ref["name"], namespace)
        if obj is None:
            if ref.get("optional"):
                continue
            raise EnvError(f"{kind} {ref['name']} not found")
        for key, value in (obj.get("data") or {}).items():
            text = base64.b64decode(value).decode() if kind == "secret" else str(value)
            env[source.get("prefix", "") + key] = text
    return env


def resolve(pod: Obj, container: Obj, lookup: Lookup) -> dict[str, str]:
    """envFrom first, then env in order; later $(VAR) references see earlier entries."""
    namespace = pod["metadata"]["namespace"]
    env = _from_sources(container, namespace, lookup)
    for var in container.get("env") or []:
        source = var.get("valueFrom")
        if source is None:
            env[var["name"]] = expand(str(var.get("value", "")), env)
            continue
        value: str | None
        if "fieldRef" in source:
            value = field_value(pod, source["fieldRef"]["fieldPath"])
        elif "configMapKeyRef" in source:
            value = _key_ref("configmap", source["configMapKeyRef"], namespace, lookup)
        elif "secretKeyRef" in source:
            value = _key_ref("secret", source["secretKeyRef"], namespace, lookup)
        else:
            raise EnvError(f"unsupported valueFrom in {var['name']}: {sorted(source)}")
        if value is not None:
            env[var["name"]] = value
    return env
