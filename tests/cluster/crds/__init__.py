"""The vendored gang-scheduler CRDs (README.md beside this file: projects, tags, commits, licences).

One place names the files, so the unit test (offline schema check) and the cluster test (the
real kube-apiserver) prove the operator's PodGroups against the same released schemas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
VOLCANO = HERE / "volcano-v1.15.1" / "scheduling.volcano.sh_podgroups.yaml"
COSCHEDULING = HERE / "scheduler-plugins-v0.34.7" / "crd.yaml"
# The PodGroup kinds the operator writes, and the CRD that serves each.
BY_API_VERSION = {
    "scheduling.volcano.sh/v1beta1": VOLCANO,
    "scheduling.x-k8s.io/v1alpha1": COSCHEDULING,
}


def load(path: Path) -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(path.read_text())
    return crd


def crd_name(path: Path) -> str:
    return str(load(path)["metadata"]["name"])


def schema(api_version: str) -> dict[str, Any]:
    """The openAPIV3Schema of the served version `api_version` (group/version)."""
    crd = load(BY_API_VERSION[api_version])
    group, _, version = api_version.partition("/")
    assert crd["spec"]["group"] == group
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    found: dict[str, Any] = served["schema"]["openAPIV3Schema"]
    return found


def lost_fields(sent: Any, stored: Any, path: str = "") -> list[str]:
    """Every field of `sent` that `stored` does not hold with the same value (defaults added by the
    schema are not losses)."""
    if isinstance(sent, dict) and isinstance(stored, dict):
        out: list[str] = []
        for key, value in sent.items():
            if key not in stored:
                out.append(f"{path}.{key}")
            else:
                out.extend(lost_fields(value, stored[key], f"{path}.{key}"))
        return out
    return [] if sent == stored else [f"{path}: sent {sent!r}, stored {stored!r}"]
