"""Fixtures: one real local control plane per session, a fresh namespace per test.

The cluster fixture never skips: a test that needs the cluster fails when it cannot be started, so a
CI run cannot pass without having really talked to kube-apiserver.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from llmop_dev import cluster as devcluster
from tests.kube import Cluster

if TYPE_CHECKING:
    from tests.s3server import S3Server

# What runs where (tests/README.md): the directory is the layer, and the layer is a marker, so
# `pytest -m unit` or `pytest tests/unit` runs the seconds-long tests without a cluster.
LAYERS = {
    "unit": "pure: models, planners, builders, capacity; no cluster, no trainer process",
    "trainer": "the trainer in-process or under torchrun on CPU; no cluster",
    "cluster": "the real kube-apiserver and the operator; pods are kwok's fakes",
    "e2e": "the development runtime: pods are real trainer processes",
    "helm": "the chart: rendered, validated, installed; a real Prometheus",
}
NO_CLUSTER = {"unit", "trainer"}


def pytest_configure(config: pytest.Config) -> None:
    for layer, what in LAYERS.items():
        config.addinivalue_line("markers", f"{layer}: {what}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_dir = Path(__file__).parent
    for item in items:
        parts = item.path.relative_to(tests_dir).parts
        layer = parts[0] if len(parts) > 1 else None
        if layer not in LAYERS:
            raise pytest.UsageError(
                f"{item.nodeid}: every test lives in one of tests/{{{','.join(LAYERS)}}}/"
            )
        item.add_marker(layer)
        if layer in NO_CLUSTER and "cluster" in getattr(item, "fixturenames", ()):
            raise pytest.UsageError(
                f"{item.nodeid}: a {layer} test may not use the cluster; move it to tests/cluster/"
            )


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    kubeconfig = devcluster.up()
    c = Cluster(kubeconfig=kubeconfig, bin_dir=devcluster.ensure_binaries())
    print(f"\nlocal cluster: kube-apiserver {c.server_version()} ({kubeconfig})", file=sys.stderr)
    return c


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = cluster.new_namespace()
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """One real S3 server (SeaweedFS, loopback only, authentication on) for the session.

    Fails, never skips, when `weed` is missing: `make bins` builds it with the cluster's binaries.
    """
    # Imported here so that a venv without s3fs fails only the tests that use this fixture.
    from tests.s3server import S3Server

    weed = devcluster.cache_dir() / "bin" / "weed"
    if not weed.exists():
        pytest.fail(f"{weed} is missing: run `make bins` (hack/build-cluster-bins.sh) to build it")
    server = S3Server(weed).start()
    print(
        f"\nS3 server: {server.endpoint} up in {server.start_seconds:.1f}s ({server.log_path})",
        file=sys.stderr,
    )
    yield server
    server.stop()
