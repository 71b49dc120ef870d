"""The all-or-nothing placement check, without a cluster."""

from __future__ import annotations

import pytest

from llmop import capacity
from llmop.builders import JobRef, workers
from llmop.capacity import Cluster
from llmop.planner import gang
from llmop_contract.api.v1alpha1 import LLMTrainingJobSpec


def node(name: str, gpus: int = 8, ready: bool = True, **labels: str) -> capacity.NodeView:
    return capacity.NodeView(
        name, dict(labels), {"nvidia.com/gpu": gpus, "cpu": 96.0, "memory": 2.0**40}, [], ready, False
    )


def worker(gpus: int, **selector: str) -> capacity.Demand:
    spec: dict[str, object] = {"containers": [{"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]}
    if selector:
        spec["nodeSelector"] = selector
    return capacity.Demand.of_pod(spec)


@pytest.mark.parametrize(("text", "value"), [("500m", 0.5), ("64Gi", 64 * 2**30), (8, 8.0), ("1e3", 1000.0)])
def test_quantity(text: object, value: float) -> None:
    assert capacity.quantity(text) == value


def test_gang_needs_distinct_nodes_with_room() -> None:
    nodes = [node(f"n{i}") for i in range(4)]
    assert capacity.gang_fits(nodes, worker(8), 4).fits
    fit = capacity.gang_fits(nodes, worker(8), 5)
    assert not fit.fits and fit.message == "needs 5 nodes with 8 free nvidia.com/gpu; 4 available"


def test_bound_usage_selectors_and_readiness_count() -> None:
    nodes = [node("a", product="h100"), node("b", product="a100"), node("c", ready=False, product="h100")]
    cluster = Cluster()
    fit = cluster.fit(("ns", "j"), nodes, [("a", {"nvidia.com/gpu": 4.0})], worker(8, product="h100"), 1)
    assert not fit.fits  # a is half used, b has the wrong product, c is not Ready
    assert cluster.fit(("ns", "j"), nodes, [], worker(4, product="h100"), 1).fits


def test_released_gangs_hold_capacity_until_bound_except_for_themselves() -> None:
    nodes = [node(f"n{i}") for i in range(2)]
    cluster = Cluster()
    cluster.releasing[("ns", "first")] = [{"nvidia.com/gpu": 8.0}] * 2
    assert not cluster.fit(("ns", "second"), nodes, [], worker(8), 2).fits
    assert cluster.fit(("ns", "first"), nodes, [], worker(8), 2).fits
    # Unbound but ungated pods seen in the index count the same way.
    assert not cluster.fit(("ns", "second"), nodes, [(None, {"nvidia.com/gpu": 8.0})], worker(8), 2).fits


def test_a_gangs_demand_is_read_from_the_spec_as_the_worker_pod_has_it() -> None:
    spec = LLMTrainingJobSpec.model_validate(
        {
            "data": {"prepare": False},
            "training": {"maxSteps": 10, "globalBatchSize": 8, "microBatchSize": 1},
            "workers": {
                "numNodes": 2,
                "procsPerNode": 4,
                "gpusPerNode": 4,
                "resourcesPerNode": {"requests": {"cpu": "8"}, "limits": {"memory": "64Gi"}},
                "nodeSelector": {"product": "h100"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
        }
    )
    ref = JobRef("j", "ns", "uid", spec)
    assert gang.demand(ref) == capacity.Demand.of_pod(workers.worker_pod_spec(ref))
    assert gang.demand(ref).requests == {"nvidia.com/gpu": 4.0, "cpu": 8.0, "memory": 64 * 2**30}
