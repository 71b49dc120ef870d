"""The chart as the tests use it: helm and kubeconform invocations, rendering, tool lookup."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.helm import k8s_schemas

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "llmop"
HERE = Path(__file__).resolve().parent
ALL_ON_VALUES = HERE / "values-all-on.yaml"
THIRD_PARTY_CRDS = HERE / "thirdparty-crds"


def k8s_version() -> str:
    """The pinned Kubernetes version (hack/versions.env); `helm template` needs it for kubeVersion."""
    for line in (REPO / "hack" / "versions.env").read_text().splitlines():
        if line.startswith("K8S_VERSION="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("K8S_VERSION missing from hack/versions.env")


@dataclass(frozen=True)
class Tools:
    bin_dir: Path

    def run(
        self, tool: str, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        path = self.bin_dir / tool
        if not path.exists():
            raise AssertionError(f"{path} is missing: run `make bins prometheus` (make test does)")
        proc = subprocess.run(
            [str(path), *args], capture_output=True, text=True, input=input, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def helm(
        self, *args: str, check: bool = True, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        extra = ["--kubeconfig", str(kubeconfig)] if kubeconfig else []
        return self.run("helm", *args, *extra, check=check)

    def template(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.helm(
            "template",
            "llmop",
            str(CHART),
            "--namespace",
            "llmop-system",
            "--kube-version",
            k8s_version(),
            *args,
            check=check,
        )

    def render(self, *args: str) -> list[dict[str, Any]]:
        """The manifests `helm template` renders with these extra arguments (values files, --set)."""
        return [d for d in yaml.safe_load_all(self.template(*args).stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def kubeconform(tools: Tools, schema_dir: Path, manifests: str) -> dict[str, Any]:
    """kubeconform -strict over the YAML ``manifests`` against the schemas in ``schema_dir``
    (k8s_schemas.from_openapi_v2); its JSON report."""
    location = str(schema_dir / k8s_schemas.LOCATION)
    out = tools.run(
        "kubeconform",
        "-strict",
        "-summary",
        "-output",
        "json",
        "-schema-location",
        location,
        "-kubernetes-version",
        k8s_version().lstrip("v"),
        "-",
        input=manifests,
        check=False,
    )
    return dict(json.loads(out.stdout))
