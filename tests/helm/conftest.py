"""Fixtures for the chart's tests: the tool binaries and kubeconform's schemas, made offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llmop_dev import cluster as devcluster
from tests.helm import k8s_schemas
from tests.helm.chart import CHART, THIRD_PARTY_CRDS, Tools
from tests.kube import Cluster


@pytest.fixture(scope="session")
def tools() -> Tools:
    """helm, kubeconform, prometheus, promtool: built or unpacked by `make bins prometheus`."""
    return Tools(devcluster.ensure_binaries())


@pytest.fixture(scope="session")
def schema_dir(cluster: Cluster, tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kubeconform schemas: built-in kinds from the running apiserver, custom kinds from CRD files."""
    out = tmp_path_factory.mktemp("kubeconform-schemas")
    openapi = json.loads(cluster.kubectl("get", "--raw", "/openapi/v2").stdout)
    all_on = tools.render("--include-crds", "-f", str(Path(__file__).parent / "values-all-on.yaml"))
    default = tools.render("--include-crds")
    kinds = {(d["apiVersion"], d["kind"]) for d in [*all_on, *default]}
    builtin = k8s_schemas.from_openapi_v2(openapi, kinds, out)
    crd_files = [*(CHART / "crds").glob("*.yaml"), *THIRD_PARTY_CRDS.glob("*.yaml")]
    custom = k8s_schemas.from_crds((yaml.safe_load(p.read_text()) for p in crd_files), out)
    assert builtin and custom
    return out
