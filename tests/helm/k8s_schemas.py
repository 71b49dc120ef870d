"""JSON schemas for kubeconform, made offline: built-in kinds from the running kube-apiserver's
OpenAPI v2 document, custom kinds from CRD files.

kubeconform normally downloads schemas from GitHub; here every schema comes from this machine. The
layout is kubeconform's `{{ .ResourceKind }}{{ .KindSuffix }}.json` (e.g. `deployment-apps-v1.json`),
and the schemas are "strict" like kubeconform's own: an object with declared properties accepts no
other key, so a misspelt field is an error.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Schema = dict[str, Any]
INT_OR_STRING: Schema = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
QUANTITY: Schema = {"oneOf": [{"type": "string"}, {"type": "number"}]}
LOCATION = "{{ .ResourceKind }}{{ .KindSuffix }}.json"


def filename(api_version: str, kind: str) -> str:
    """kubeconform's name for a kind's schema (registry.go: first label of the group, then version)."""
    group, _, version = api_version.rpartition("/")
    suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
    return f"{kind.lower()}{suffix.lower()}.json"


def _strict(schema: Schema) -> Schema:
    """Forbid undeclared keys in every object that declares its properties (kubeconform -strict).

    Walks schema positions only: a `properties` map holds field names, which may well be "type",
    "nullable" or "x-kubernetes-int-or-string" (JSONSchemaProps has all three).
    """
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_strict(sub) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.update(INT_OR_STRING)
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _refs(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/definitions/"):
            yield ref.removeprefix("#/definitions/")
        for v in node.values():
            yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def from_openapi_v2(openapi: Schema, kinds: set[tuple[str, str]], out_dir: Path) -> list[Path]:
    """One standalone schema per wanted (apiVersion, kind): the definition plus those it references."""
    defs: dict[str, Schema] = copy.deepcopy(openapi["definitions"])
    # JSON spells these two as a string or a number; OpenAPI v2 only says "string".
    for name, d in defs.items():
        if d.get("format") == "int-or-string":
            defs[name] = {"description": d.get("description", ""), **INT_OR_STRING}
        elif name.endswith(".api.resource.Quantity"):
            defs[name] = {"description": d.get("description", ""), **QUANTITY}
    written: list[Path] = []
    for name, definition in defs.items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            if (api_version, gvk["kind"]) not in kinds:
                continue
            needed, todo = {name}, [name]
            while todo:
                for ref in _refs(defs[todo.pop()]):
                    if ref not in needed:
                        needed.add(ref)
                        todo.append(ref)
            schema = {**_strict(definition), "definitions": {n: _strict(defs[n]) for n in sorted(needed)}}
            path = out_dir / filename(api_version, gvk["kind"])
            path.write_text(json.dumps(schema))
            written.append(path)
    return written


def from_crds(crds: Iterable[Schema], out_dir: Path) -> list[Path]:
    """One schema per served version of each CRD, from its openAPIV3Schema."""
    written: list[Path] = []
    for crd in crds:
        spec = crd["spec"]
        for version in spec["versions"]:
            schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            # apiVersion/kind/metadata are not spelt out in a CRD's schema; the apiserver adds them.
            schema.setdefault("properties", {}).update(
                {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
            )
            path = out_dir / filename(f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            path.write_text(json.dumps(schema))
            written.append(path)
    return written
