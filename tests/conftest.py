"""Fixtures: one real local control plane per session, a fresh namespace per test.

The cluster fixture never skips: a test that needs the cluster fails when it cannot be started, so a
CI run cannot pass without having really talked to kube-apiserver.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from llmop_dev import cluster as devcluster
from tests.kube import Cluster


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
